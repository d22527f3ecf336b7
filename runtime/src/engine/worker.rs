//! The engine thread: admission, batching, one forward pass per step, sampling and
//! streaming (the steps the [module documentation](super) lists).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;

use super::admission::{admission, step_members, Admission};
use super::late::{start_late, Late, TriggerScan};
use super::prefix_cache::PrefixCache;
use super::{
    EngineConfig, EngineStats, GenConstraint, GenEvent, GenRequest, LogprobInfo, StopReason,
    Submission, TokenLogprob,
};
use crate::detokenize::StreamDecoder;
use crate::fair::{FairQueue, Tenant};
use crate::model::{KvCache, LlamaModel, SeqStep};
use crate::sampling::{Sampled, Sampler};
use crate::stop::StopMatcher;
use crate::tokenizer::ModelTokenizer;
use crate::{Error, Result};

/// A sequence admitted to the running set.
struct Sequence {
    prompt: Vec<u32>,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    /// Prompt tokens that came from the prefix cache.
    cached: usize,
    /// Sampled tokens; the last one is not yet in the cache.
    generated: Vec<u32>,
    max_tokens: usize,
    cache: KvCache,
    sampler: Sampler,
    decoder: StreamDecoder,
    stop: StopMatcher,
    logprobs: bool,
    reply: UnboundedSender<GenEvent>,
    reserved_bytes: usize,
    progress: Option<Arc<AtomicUsize>>,
    constraint: Option<GenConstraint>,
    tenant: Tenant,
    weight: u32,
    /// Where a late grammar's triggers were looked for.
    scan: TriggerScan,
    /// The last step this sequence ran in (the least recent goes first when its tenant is
    /// over its share of the batch).
    last_step: u64,
}

enum Outcome {
    Continue,
    Finished(StopReason),
    /// This sequence alone failed (its grammar); the others go on.
    Failed(String),
}

pub(super) struct Worker {
    model: LlamaModel,
    tokenizer: Arc<ModelTokenizer>,
    config: EngineConfig,
    incoming: Receiver<Submission>,
    stats: Arc<EngineStats>,
    waiting: FairQueue<Submission>,
    running: Vec<Sequence>,
    /// Steps run so far.
    steps: u64,
    reserved_bytes: usize,
    prefixes: PrefixCache,
}

impl Worker {
    pub(super) fn new(
        model: LlamaModel,
        tokenizer: Arc<ModelTokenizer>,
        config: EngineConfig,
        incoming: Receiver<Submission>,
        stats: Arc<EngineStats>,
    ) -> Self {
        let prefixes = PrefixCache::new(config.prefix_cache_bytes);
        Self {
            model,
            tokenizer,
            config,
            incoming,
            stats,
            waiting: FairQueue::new(),
            running: Vec::new(),
            steps: 0,
            reserved_bytes: 0,
            prefixes,
        }
    }

    pub(super) fn run(mut self) {
        loop {
            if !self.receive() {
                return;
            }
            self.drop_cancelled();
            self.admit();
            self.publish_stats();
            if self.running.is_empty() {
                continue;
            }
            if let Err(e) = self.step() {
                tracing::error!(error = %e, "engine step failed; failing the running sequences");
                for seq in self.running.drain(..) {
                    let _ = seq.reply.send(GenEvent::Failed {
                        message: e.to_string(),
                    });
                }
                self.reserved_bytes = 0;
            }
            // Again after the step, so finished sequences show before the engine idles.
            self.publish_stats();
        }
    }

    /// Moves queued submissions into `waiting`; blocks while there is nothing to do.
    /// Returns false when every handle is gone and no work is left.
    fn receive(&mut self) -> bool {
        let idle = self.running.is_empty() && self.waiting.is_empty();
        if idle {
            // Wake periodically so a sender that is gone is noticed without spinning.
            loop {
                match self.incoming.recv_timeout(Duration::from_millis(500)) {
                    Ok(sub) => {
                        self.enqueue(sub);
                        break;
                    }
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return false,
                }
            }
        }
        while let Ok(sub) = self.incoming.try_recv() {
            self.enqueue(sub);
        }
        true
    }

    fn drop_cancelled(&mut self) {
        let before = self.running.len();
        let mut freed = 0;
        self.running.retain(|seq| {
            let keep = !seq.reply.is_closed();
            if !keep {
                freed += seq.reserved_bytes;
            }
            keep
        });
        self.reserved_bytes -= freed;
        if before != self.running.len() {
            tracing::debug!(
                cancelled = before - self.running.len(),
                "dropped sequences whose client went away"
            );
        }
        let gone = self.waiting.retain(|sub| !sub.reply.is_closed());
        if gone > 0 {
            self.stats.waiting.fetch_sub(gone as u64, Ordering::Relaxed);
        }
    }

    /// Queues a submission under its tenant, costed by the tokens it may take.
    fn enqueue(&mut self, sub: Submission) {
        let (tenant, weight) = tenancy(&sub.request);
        let cost = (sub.request.prompt_ids.len() + sub.request.max_tokens) as f64;
        self.waiting.push(tenant, weight, cost, sub);
    }

    fn admit(&mut self) {
        let per_token = self.model.kv_bytes_per_token();
        while let Some((tenant, front)) = self.waiting.peek() {
            let need = (front.request.prompt_ids.len() + front.request.max_tokens) * per_token;
            let verdict = admission(
                self.running.iter().map(|s| (&s.tenant, s.weight)),
                (tenant, tenancy(&front.request).1),
                self.config.max_running,
                (self.reserved_bytes, need, self.config.kv_cache_bytes),
            );
            if verdict != Admission::Admit {
                break;
            }
            let Some((tenant, sub)) = self.waiting.pop() else {
                break;
            };
            let weight = tenancy(&sub.request).1;
            tracing::debug!(
                tenant = %tenant,
                weight,
                prompt_tokens = sub.request.prompt_ids.len(),
                running = self.running.len(),
                "admitted a sequence"
            );
            self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
            let _ = sub.reply.send(GenEvent::Admitted);
            let GenRequest {
                prompt_ids,
                max_tokens,
                sampling,
                stop,
                progress,
                constraint,
                tenant: _,
                cached,
            } = sub.request;
            let logprobs = sampling.logprobs.is_some();
            let sampler = Sampler::new(sampling, &prompt_ids);
            self.reserved_bytes += need;
            let cache = match self.prefixes.lookup(&prompt_ids) {
                Ok(Some(cache)) => {
                    self.stats
                        .prefix_hit_tokens_total
                        .fetch_add(cache.len() as u64, Ordering::Relaxed);
                    cache
                }
                Ok(None) => self.model.new_cache(),
                Err(e) => {
                    tracing::warn!(error = %e, "prefix cache copy failed; prefilling in full");
                    self.model.new_cache()
                }
            };
            if let Some(c) = &cached {
                c.store(cache.len(), Ordering::Relaxed);
            }
            self.running.push(Sequence {
                prefilled: cache.len(),
                cached: cache.len(),
                generated: Vec::new(),
                max_tokens,
                cache,
                sampler,
                decoder: StreamDecoder::new(self.tokenizer.clone()),
                stop: StopMatcher::new(stop),
                logprobs,
                reply: sub.reply,
                reserved_bytes: need,
                prompt: prompt_ids,
                progress,
                constraint,
                tenant,
                weight,
                scan: TriggerScan::default(),
                last_step: 0,
            });
        }
    }

    fn publish_stats(&self) {
        let s = &self.stats;
        s.running
            .store(self.running.len() as u64, Ordering::Relaxed);
        s.kv_reserved_bytes
            .store(self.reserved_bytes as u64, Ordering::Relaxed);
        let used: usize = self.running.iter().map(|q| q.cache.bytes()).sum();
        s.kv_used_bytes.store(used as u64, Ordering::Relaxed);
        s.prefix_cache_bytes
            .store(self.prefixes.bytes() as u64, Ordering::Relaxed);
    }

    /// Which running sequences take part in this step: all of them while they fit the
    /// step; else each tenant's fair share, its least recently run sequences first.
    fn choose(&self) -> Vec<bool> {
        let running: Vec<(&Tenant, u32, u64)> = self
            .running
            .iter()
            .map(|s| (&s.tenant, s.weight, s.last_step))
            .collect();
        let cap = self.config.max_running.min(self.config.max_step_sequences);
        step_members(&running, cap)
    }

    /// One forward pass over the running sequences, then sampling and streaming.
    fn step(&mut self) -> Result<()> {
        let mut budget = self.config.max_batch_tokens.max(1);
        self.steps += 1;
        let chosen = self.choose();
        // Decode tokens first (one each), then prompt chunks in admission order.
        let mut plan: Vec<(usize, usize, usize)> = Vec::new(); // (seq index, start, len) of input
        for (i, seq) in self.running.iter().enumerate() {
            if !chosen[i] {
                continue;
            }
            if seq.prefilled == seq.prompt.len() && budget > 0 {
                plan.push((i, 0, 1));
                budget -= 1;
            }
        }
        for (i, seq) in self.running.iter().enumerate() {
            let left = seq.prompt.len() - seq.prefilled;
            if chosen[i] && left > 0 && budget > 0 {
                let len = left.min(budget);
                plan.push((i, seq.prefilled, len));
                budget -= len;
            }
        }
        plan.sort_by_key(|p| p.0);
        for &(i, _, _) in &plan {
            self.running[i].last_step = self.steps;
        }

        let mut prefill_tokens = 0usize;
        let mut decode_tokens = 0usize;
        let mut wants = Vec::with_capacity(plan.len());
        {
            // Borrow each planned sequence's cache mutably, once, in index order.
            let mut steps: Vec<SeqStep<'_>> = Vec::with_capacity(plan.len());
            let mut plan_iter = plan.iter().peekable();
            for (i, seq) in self.running.iter_mut().enumerate() {
                let Some(&&(pi, start, len)) = plan_iter.peek() else {
                    break;
                };
                if pi != i {
                    continue;
                }
                plan_iter.next();
                let (tokens, want): (&[u32], bool) = if seq.prefilled < seq.prompt.len() {
                    prefill_tokens += len;
                    let end = start + len;
                    (&seq.prompt[start..end], end == seq.prompt.len())
                } else {
                    decode_tokens += 1;
                    let n = seq.generated.len();
                    (&seq.generated[n - 1..n], true)
                };
                wants.push((
                    i,
                    want,
                    if seq.prefilled < seq.prompt.len() {
                        len
                    } else {
                        0
                    },
                ));
                steps.push(SeqStep {
                    tokens,
                    cache: &mut seq.cache,
                    want_logits: want,
                });
            }
            let logits = self.model.forward(&mut steps)?;
            drop(steps);
            self.stats
                .last_batch_size
                .store(wants.len() as u64, Ordering::Relaxed);
            self.stats
                .prefill_tokens_total
                .fetch_add(prefill_tokens as u64, Ordering::Relaxed);
            self.stats
                .decode_tokens_total
                .fetch_add(decode_tokens as u64, Ordering::Relaxed);
            self.stats.steps_total.fetch_add(1, Ordering::Relaxed);

            let mut logits = logits.into_iter();
            let mut finished: Vec<(usize, Outcome)> = Vec::new();
            for &(i, want, prefill_len) in &wants {
                self.running[i].prefilled += prefill_len;
                if !want {
                    continue;
                }
                let Some(mut row) = logits.next() else {
                    return Err(Error::Weights(
                        "the forward pass returned fewer logit rows than requested".into(),
                    ));
                };
                let outcome = self.advance(i, &mut row)?;
                finished.push((i, outcome));
            }
            // Remove finished sequences, highest index first so indices stay valid.
            finished.sort_by_key(|f| std::cmp::Reverse(f.0));
            for (i, outcome) in finished {
                if let Outcome::Failed(message) = outcome {
                    let seq = self.running.remove(i);
                    self.reserved_bytes -= seq.reserved_bytes;
                    let _ = seq.reply.send(GenEvent::Failed { message });
                    continue;
                }
                if let Outcome::Finished(reason) = outcome {
                    // `remove`, not `swap_remove`: admission order is the prefill order.
                    let seq = self.running.remove(i);
                    self.reserved_bytes -= seq.reserved_bytes;
                    if self.prefixes.is_enabled() {
                        match seq.cache.copy_prefix(seq.prompt.len()) {
                            Ok(cache) => {
                                self.prefixes.insert(seq.prompt.clone(), cache);
                                // Before `Finished` goes out, so a caller sees it at once.
                                self.stats
                                    .prefix_cache_bytes
                                    .store(self.prefixes.bytes() as u64, Ordering::Relaxed);
                            }
                            Err(e) => tracing::warn!(error = %e, "prefix cache copy failed"),
                        }
                    }
                    let _ = seq.reply.send(GenEvent::Finished {
                        reason,
                        prompt_tokens: seq.prompt.len(),
                        completion_tokens: seq.generated.len(),
                        cached_tokens: seq.cached,
                    });
                }
            }
        }
        Ok(())
    }

    /// Samples the next token of sequence `i` from `logits` and streams its text. A grammar
    /// failure fails this sequence only.
    fn advance(&mut self, i: usize, logits: &mut [f32]) -> Result<Outcome> {
        match self.advance_inner(i, logits) {
            Err(Error::Grammar(message)) => {
                tracing::warn!(error = %message, "constrained sequence failed");
                Ok(Outcome::Failed(format!("structured output: {message}")))
            }
            other => other,
        }
    }

    fn advance_inner(&mut self, i: usize, logits: &mut [f32]) -> Result<Outcome> {
        let context = self.model.config().context_length;
        let tokenizer = self.tokenizer.clone();
        let seq = &mut self.running[i];
        if let Some(GenConstraint::Now(c)) = &mut seq.constraint {
            c.mask(logits)?;
        }
        let sampled: Sampled = seq.sampler.sample(logits);
        let token = sampled.token;
        seq.generated.push(token);
        let mut grammar_done = false;
        match &mut seq.constraint {
            Some(GenConstraint::Now(c)) if !tokenizer.stop_token_ids().contains(&token) => {
                c.commit(token)?;
                grammar_done = c.is_finished();
            }
            Some(GenConstraint::Now(_)) => {}
            Some(GenConstraint::AfterTrigger { triggers, then }) => {
                match start_late(&tokenizer, &mut seq.scan, &seq.generated, triggers, then) {
                    Ok(Late::Waiting) => {}
                    Ok(Late::Never) => seq.constraint = None,
                    Ok(Late::Started(c)) => {
                        grammar_done = c.is_finished();
                        seq.constraint = Some(GenConstraint::Now(c));
                    }
                    // The tokens that carried the marker already left the grammar (the model
                    // wrote something else right after it): the output stays free text, and
                    // the caller's parser returns it as text.
                    Err(e) => {
                        tracing::warn!(error = %e, "late grammar did not accept the output so far");
                        seq.constraint = None;
                    }
                }
            }
            None => {}
        }
        let logprobs = if seq.logprobs {
            vec![LogprobInfo {
                chosen: resolve(&tokenizer, token, sampled.logprob),
                top: sampled
                    .top
                    .iter()
                    .map(|&(t, lp)| resolve(&tokenizer, t, lp))
                    .collect(),
            }]
        } else {
            Vec::new()
        };
        if tokenizer.stop_token_ids().contains(&token) {
            // The end token itself is counted (the model produced it) but never shown.
            let rest = seq.decoder.finish()?;
            let tail = seq.stop.push(&rest);
            let mut text = tail.emit;
            if !tail.stopped {
                text.push_str(&seq.stop.finish());
            }
            send(seq, text, logprobs);
            return Ok(Outcome::Finished(StopReason::Stop));
        }
        let piece = seq.decoder.push(token)?;
        let outcome = seq.stop.push(&piece);
        if outcome.stopped {
            send(seq, outcome.emit, logprobs);
            return Ok(Outcome::Finished(StopReason::Stop));
        }
        let mut text = outcome.emit;
        let at_limit = seq.generated.len() >= seq.max_tokens
            || seq.prompt.len() + seq.generated.len() >= context;
        if at_limit || grammar_done {
            let rest = seq.decoder.finish()?;
            let tail = seq.stop.push(&rest);
            text.push_str(&tail.emit);
            if tail.stopped {
                send(seq, text, logprobs);
                return Ok(Outcome::Finished(StopReason::Stop));
            }
            text.push_str(&seq.stop.finish());
            send(seq, text, logprobs);
            // A complete grammar is a natural end, even on the last allowed token.
            let reason = if grammar_done {
                StopReason::Stop
            } else {
                StopReason::Length
            };
            return Ok(Outcome::Finished(reason));
        }
        send(seq, text, logprobs);
        Ok(Outcome::Continue)
    }
}

/// A request's tenant and weight (requests without one share the anonymous tenant).
fn tenancy(request: &GenRequest) -> (Tenant, u32) {
    match &request.tenant {
        Some(t) => (t.name.clone(), t.weight.max(1)),
        None => (Tenant::from(""), 1),
    }
}

fn send(seq: &Sequence, text: String, logprobs: Vec<LogprobInfo>) {
    if let Some(p) = &seq.progress {
        p.store(seq.generated.len(), Ordering::Relaxed);
    }
    // A closed channel means the client went away; the next step drops the sequence.
    let _ = seq.reply.send(GenEvent::Delta {
        text,
        logprobs,
        completion_tokens: seq.generated.len(),
    });
}

fn resolve(tokenizer: &ModelTokenizer, token: u32, logprob: f32) -> TokenLogprob {
    TokenLogprob {
        token: tokenizer.token_text(token),
        bytes: tokenizer.token_bytes(token),
        logprob,
    }
}

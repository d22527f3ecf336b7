//! The engine thread: admission, batching, one forward pass per step, sampling and
//! streaming (the steps the [module documentation](super) lists).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;

use super::admission::{admission, step_members};
use super::late::{start_late, Late, TriggerScan};
use super::prefix_cache::PrefixCache;
use super::{
    EngineConfig, EngineStats, GenConstraint, GenEvent, GenRequest, LogprobInfo, StopReason,
    Submission, TokenLogprob,
};
use crate::detokenize::StreamDecoder;
use crate::fair::{FairQueue, Tenant, Visit};
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
    desk: Desk,
    running: Vec<Sequence>,
    /// Steps run so far.
    steps: u64,
}

/// What admission works with besides the model and the running set: the queues, the KV
/// reservation and the prefix cache. Apart from `Worker` so a step in flight can admit
/// ([`Intake`]) while its sequences' caches are borrowed.
struct Desk {
    tokenizer: Arc<ModelTokenizer>,
    config: EngineConfig,
    incoming: Receiver<Submission>,
    stats: Arc<EngineStats>,
    waiting: FairQueue<Submission>,
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
            desk: Desk {
                tokenizer,
                config,
                incoming,
                stats,
                waiting: FairQueue::new(),
                reserved_bytes: 0,
                prefixes,
            },
            running: Vec::new(),
            steps: 0,
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
                self.desk.reserved_bytes = 0;
            }
            // Again after the step, so finished sequences show before the engine idles.
            self.publish_stats();
        }
    }

    /// Moves queued submissions into `waiting`; blocks while there is nothing to do.
    /// Returns false when every handle is gone and no work is left.
    fn receive(&mut self) -> bool {
        let idle = self.running.is_empty() && self.desk.waiting.is_empty();
        if idle {
            // Wake periodically so a sender that is gone is noticed without spinning.
            loop {
                match self.desk.incoming.recv_timeout(Duration::from_millis(500)) {
                    Ok(sub) => {
                        self.desk.enqueue(sub);
                        break;
                    }
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return false,
                }
            }
        }
        while let Ok(sub) = self.desk.incoming.try_recv() {
            self.desk.enqueue(sub);
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
        self.desk.reserved_bytes -= freed;
        if before != self.running.len() {
            tracing::debug!(
                cancelled = before - self.running.len(),
                "dropped sequences whose client went away"
            );
        }
        let gone = self.desk.waiting.retain(|sub| !sub.reply.is_closed());
        if gone > 0 {
            self.desk
                .stats
                .waiting
                .fetch_sub(gone as u64, Ordering::Relaxed);
        }
    }

    fn admit(&mut self) {
        if self.desk.waiting.is_empty() {
            return;
        }
        let mut tenants: Vec<(Tenant, u32)> = self
            .running
            .iter()
            .map(|s| (s.tenant.clone(), s.weight))
            .collect();
        let budget = self.desk.config.max_batch_tokens;
        let before = tenants.clone();
        // While sequences run, a request whose customer has none of them is left to the step
        // about to run, which starts it before its first layer ([`Intake`]); with nothing
        // running there is no step to wait for, and every request joins the first.
        let joins = |tenant: &Tenant, sub: &Submission| {
            before.is_empty()
                || !starts_apart(&before, tenant, sub.request.prompt_ids.len(), budget)
        };
        while let Some(seq) = self.desk.admit_next(&self.model, &tenants, joins) {
            tenants.push((seq.tenant.clone(), seq.weight));
            self.running.push(seq);
        }
    }

    fn publish_stats(&self) {
        let s = &self.desk.stats;
        s.running
            .store(self.running.len() as u64, Ordering::Relaxed);
        s.kv_reserved_bytes
            .store(self.desk.reserved_bytes as u64, Ordering::Relaxed);
        let used: usize = self.running.iter().map(|q| q.cache.bytes()).sum();
        s.kv_used_bytes.store(used as u64, Ordering::Relaxed);
        s.prefix_cache_bytes
            .store(self.desk.prefixes.bytes() as u64, Ordering::Relaxed);
    }

    /// Which running sequences take part in this step: all of them while they fit the
    /// step; else each tenant's fair share, its least recently run sequences first.
    fn choose(&self) -> Vec<bool> {
        let running: Vec<(&Tenant, u32, u64)> = self
            .running
            .iter()
            .map(|s| (&s.tenant, s.weight, s.last_step))
            .collect();
        let cap = self
            .desk
            .config
            .max_running
            .min(self.desk.config.max_step_sequences);
        step_members(&running, cap)
    }

    /// One forward pass over the running sequences, then sampling and streaming. Between its
    /// layers, a newcomer whose tenant has nothing running is started in a pass of its own
    /// ([`Intake`]).
    fn step(&mut self) -> Result<()> {
        let mut budget = self.desk.config.max_batch_tokens.max(1);
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

        let Worker {
            model,
            desk,
            running,
            steps: step_number,
        } = self;
        let mut intake = Intake {
            desk,
            tenants: running
                .iter()
                .map(|s| (s.tenant.clone(), s.weight))
                .collect(),
            started: Vec::new(),
            step: *step_number,
        };
        let mut prefill_tokens = 0usize;
        let mut decode_tokens = 0usize;
        let mut wants = Vec::with_capacity(plan.len());
        // Borrow each planned sequence's cache mutably, once, in index order.
        let mut steps: Vec<SeqStep<'_>> = Vec::with_capacity(plan.len());
        let mut plan_iter = plan.iter().peekable();
        for (i, seq) in running.iter_mut().enumerate() {
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
        let logits = model.forward_between(&mut steps, &mut |m| intake.between_layers(m));
        drop(steps);
        let Intake { desk, started, .. } = intake;
        // Newcomers started during the step go on with the others, even when it failed.
        running.extend(started);
        let logits = logits?;
        let stats = &desk.stats;
        stats
            .last_batch_size
            .store(wants.len() as u64, Ordering::Relaxed);
        stats
            .prefill_tokens_total
            .fetch_add(prefill_tokens as u64, Ordering::Relaxed);
        stats
            .decode_tokens_total
            .fetch_add(decode_tokens as u64, Ordering::Relaxed);
        stats.steps_total.fetch_add(1, Ordering::Relaxed);

        let context = model.config().context_length;
        let mut logits = logits.into_iter();
        let mut finished: Vec<(usize, Outcome)> = Vec::new();
        for &(i, want, prefill_len) in &wants {
            running[i].prefilled += prefill_len;
            if !want {
                continue;
            }
            let Some(mut row) = logits.next() else {
                return Err(Error::Weights(
                    "the forward pass returned fewer logit rows than requested".into(),
                ));
            };
            let outcome = running[i].advance(&desk.tokenizer, context, &mut row)?;
            finished.push((i, outcome));
        }
        // Remove finished sequences, highest index first so indices stay valid.
        finished.sort_by_key(|f| std::cmp::Reverse(f.0));
        for (i, outcome) in finished {
            if !matches!(outcome, Outcome::Continue) {
                // `remove`, not `swap_remove`: admission order is the prefill order.
                let seq = running.remove(i);
                desk.retire(seq, outcome);
            }
        }
        Ok(())
    }
}

/// What a step in flight needs to start newcomers before each of its layers. A waiting
/// request whose tenant has nothing running, and whose prompt fits one step's token budget
/// ([`starts_apart`]), is admitted there (by the same rule and in the same fair order as at a
/// step's start), its prompt prefilled in a forward pass of its own and its first token sampled
/// and sent. So a customer's first token waits for one layer of another customer's step, not
/// for the whole step (at 32 sequences of this machine's development model a step takes about
/// 75 ms, a layer under 3 ms); one that arrives between steps is started before the next
/// step's first layer instead of joining it. The step's own sequences pay for the newcomer's
/// prefill, as they would if it joined them.
struct Intake<'a> {
    desk: &'a mut Desk,
    /// `(tenant, weight)` of every running sequence, those started here included.
    tenants: Vec<(Tenant, u32)>,
    /// Sequences started during the step, past their first token.
    started: Vec<Sequence>,
    /// The step in flight.
    step: u64,
}

impl Intake<'_> {
    fn between_layers(&mut self, model: &LlamaModel) -> Result<()> {
        let desk = &mut *self.desk;
        while let Ok(sub) = desk.incoming.try_recv() {
            desk.enqueue(sub);
        }
        // The common case, before every layer of every step: nothing waits.
        if desk.waiting.is_empty() {
            return Ok(());
        }
        let mut budget = desk.config.max_batch_tokens;
        let mut counted = self.tenants.clone();
        let mut fresh: Vec<Sequence> = Vec::new();
        loop {
            let running = &self.tenants;
            // A closed one is dropped at the next step boundary.
            let apart = |tenant: &Tenant, sub: &Submission| {
                !sub.reply.is_closed()
                    && starts_apart(running, tenant, sub.request.prompt_ids.len(), budget)
            };
            let Some(seq) = desk.admit_next(model, &counted, apart) else {
                break;
            };
            budget -= seq.prompt.len();
            counted.push((seq.tenant.clone(), seq.weight));
            fresh.push(seq);
        }
        if fresh.is_empty() {
            return Ok(());
        }
        let mut steps: Vec<SeqStep<'_>> = fresh
            .iter_mut()
            .map(|s| SeqStep {
                tokens: &s.prompt[s.prefilled..],
                cache: &mut s.cache,
                want_logits: true,
            })
            .collect();
        let prefill_tokens: usize = steps.iter().map(|s| s.tokens.len()).sum();
        let logits = model.forward(&mut steps);
        drop(steps);
        let logits = match logits {
            Ok(logits) if logits.len() == fresh.len() => logits,
            other => {
                let message = match other {
                    Err(e) => e.to_string(),
                    Ok(_) => "the forward pass returned fewer logit rows than requested".into(),
                };
                tracing::error!(error = %message, "a newcomer's prefill failed; failing it");
                for seq in fresh {
                    desk.reserved_bytes -= seq.reserved_bytes;
                    let _ = seq.reply.send(GenEvent::Failed {
                        message: message.clone(),
                    });
                }
                return Ok(());
            }
        };
        tracing::debug!(
            sequences = fresh.len(),
            prefill_tokens,
            "started newcomers between the layers of a step"
        );
        desk.stats
            .prefill_tokens_total
            .fetch_add(prefill_tokens as u64, Ordering::Relaxed);
        desk.stats.steps_total.fetch_add(1, Ordering::Relaxed);
        desk.stats
            .interleaved_steps_total
            .fetch_add(1, Ordering::Relaxed);
        let context = model.config().context_length;
        for (mut seq, mut row) in fresh.into_iter().zip(logits) {
            seq.prefilled = seq.prompt.len();
            seq.last_step = self.step;
            match seq.advance(&desk.tokenizer, context, &mut row)? {
                Outcome::Continue => {
                    self.tenants.push((seq.tenant.clone(), seq.weight));
                    self.started.push(seq);
                }
                outcome => desk.retire(seq, outcome),
            }
        }
        Ok(())
    }
}

/// Whether a waiting request of `tenant` starts in a forward pass of its own during the step
/// in flight ([`Intake`]) rather than joining a step: its tenant has none of the `running`
/// sequences, and its prompt fits one pass's token `budget`.
fn starts_apart(
    running: &[(Tenant, u32)],
    tenant: &Tenant,
    prompt_len: usize,
    budget: usize,
) -> bool {
    prompt_len <= budget && !running.iter().any(|(t, _)| t == tenant)
}

/// The KV bytes a submission reserves: its prompt and `max_tokens`.
fn kv_need(sub: &Submission, per_token: usize) -> usize {
    (sub.request.prompt_ids.len() + sub.request.max_tokens) * per_token
}

impl Desk {
    /// Queues a submission under its tenant, costed by the tokens it may take.
    fn enqueue(&mut self, sub: Submission) {
        let (tenant, weight) = tenancy(&sub.request);
        let cost = (sub.request.prompt_ids.len() + sub.request.max_tokens) as f64;
        self.waiting.push(tenant, weight, cost, sub);
    }

    /// Takes the first waiting submission, in fair order, that `eligible` lets start now and
    /// the admission rule admits beside `running` (the `(tenant, weight)` of each running
    /// sequence), reserves its KV and starts it.
    fn admit_next(
        &mut self,
        model: &LlamaModel,
        running: &[(Tenant, u32)],
        eligible: impl Fn(&Tenant, &Submission) -> bool,
    ) -> Option<Sequence> {
        let per_token = model.kv_bytes_per_token();
        let (config, reserved) = (&self.config, self.reserved_bytes);
        let (tenant, sub) = self.waiting.pop_first(|tenant, sub| {
            if !eligible(tenant, sub) {
                return Visit::Pass;
            }
            admission(
                running.iter().map(|(t, w)| (t, *w)),
                (tenant, tenancy(&sub.request).1),
                config.max_running,
                (reserved, kv_need(sub, per_token), config.kv_cache_bytes),
            )
            .visit()
        })?;
        let need = kv_need(&sub, per_token);
        self.reserved_bytes += need;
        Some(self.start(sub, tenant, need, model))
    }

    /// Starts an admitted submission (its KV, `need` bytes, already reserved): a copy of a
    /// cached prefix of its prompt when there is one, else an empty cache.
    fn start(
        &mut self,
        sub: Submission,
        tenant: Tenant,
        need: usize,
        model: &LlamaModel,
    ) -> Sequence {
        let (prefixes, stats, tokenizer) = (&mut self.prefixes, &self.stats, &self.tokenizer);
        let weight = tenancy(&sub.request).1;
        tracing::debug!(
            tenant = %tenant,
            weight,
            prompt_tokens = sub.request.prompt_ids.len(),
            "admitted a sequence"
        );
        stats.waiting.fetch_sub(1, Ordering::Relaxed);
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
        let cache = match prefixes.lookup(&prompt_ids) {
            Ok(Some(cache)) => {
                stats
                    .prefix_hit_tokens_total
                    .fetch_add(cache.len() as u64, Ordering::Relaxed);
                cache
            }
            Ok(None) => model.new_cache(),
            Err(e) => {
                tracing::warn!(error = %e, "prefix cache copy failed; prefilling in full");
                model.new_cache()
            }
        };
        if let Some(c) = &cached {
            c.store(cache.len(), Ordering::Relaxed);
        }
        Sequence {
            prefilled: cache.len(),
            cached: cache.len(),
            generated: Vec::new(),
            max_tokens,
            cache,
            sampler,
            decoder: StreamDecoder::new(tokenizer.clone()),
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
        }
    }

    /// Ends a sequence that finished or failed: frees its KV reservation, keeps its prompt's
    /// KV in the prefix cache when it finished, and tells its caller.
    fn retire(&mut self, seq: Sequence, outcome: Outcome) {
        let (prefixes, stats) = (&mut self.prefixes, &self.stats);
        self.reserved_bytes -= seq.reserved_bytes;
        match outcome {
            Outcome::Continue => {}
            Outcome::Failed(message) => {
                let _ = seq.reply.send(GenEvent::Failed { message });
            }
            Outcome::Finished(reason) => {
                if prefixes.is_enabled() {
                    match seq.cache.copy_prefix(seq.prompt.len()) {
                        Ok(cache) => {
                            prefixes.insert(seq.prompt.clone(), cache);
                            // Before `Finished` goes out, so a caller sees it at once.
                            stats
                                .prefix_cache_bytes
                                .store(prefixes.bytes() as u64, Ordering::Relaxed);
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
}

impl Sequence {
    /// Samples the next token from `logits` and streams its text. A grammar failure fails
    /// this sequence only.
    fn advance(
        &mut self,
        tokenizer: &Arc<ModelTokenizer>,
        context: usize,
        logits: &mut [f32],
    ) -> Result<Outcome> {
        match self.advance_inner(tokenizer, context, logits) {
            Err(Error::Grammar(message)) => {
                tracing::warn!(error = %message, "constrained sequence failed");
                Ok(Outcome::Failed(format!("structured output: {message}")))
            }
            other => other,
        }
    }

    fn advance_inner(
        &mut self,
        tokenizer: &Arc<ModelTokenizer>,
        context: usize,
        logits: &mut [f32],
    ) -> Result<Outcome> {
        if let Some(GenConstraint::Now(c)) = &mut self.constraint {
            c.mask(logits)?;
        }
        let sampled: Sampled = self.sampler.sample(logits);
        let token = sampled.token;
        self.generated.push(token);
        let mut grammar_done = false;
        match &mut self.constraint {
            Some(GenConstraint::Now(c)) if !tokenizer.stop_token_ids().contains(&token) => {
                c.commit(token)?;
                grammar_done = c.is_finished();
            }
            Some(GenConstraint::Now(_)) => {}
            Some(GenConstraint::AfterTrigger { triggers, then }) => {
                match start_late(tokenizer, &mut self.scan, &self.generated, triggers, then) {
                    Ok(Late::Waiting) => {}
                    Ok(Late::Never) => self.constraint = None,
                    Ok(Late::Started(c)) => {
                        grammar_done = c.is_finished();
                        self.constraint = Some(GenConstraint::Now(c));
                    }
                    // The tokens that carried the marker already left the grammar (the model
                    // wrote something else right after it): the output stays free text, and
                    // the caller's parser returns it as text.
                    Err(e) => {
                        tracing::warn!(error = %e, "late grammar did not accept the output so far");
                        self.constraint = None;
                    }
                }
            }
            None => {}
        }
        let logprobs = if self.logprobs {
            vec![LogprobInfo {
                chosen: resolve(tokenizer, token, sampled.logprob),
                top: sampled
                    .top
                    .iter()
                    .map(|&(t, lp)| resolve(tokenizer, t, lp))
                    .collect(),
            }]
        } else {
            Vec::new()
        };
        if tokenizer.stop_token_ids().contains(&token) {
            // The end token itself is counted (the model produced it) but never shown.
            let rest = self.decoder.finish()?;
            let tail = self.stop.push(&rest);
            let mut text = tail.emit;
            if !tail.stopped {
                text.push_str(&self.stop.finish());
            }
            send(self, text, logprobs);
            return Ok(Outcome::Finished(StopReason::Stop));
        }
        let piece = self.decoder.push(token)?;
        let outcome = self.stop.push(&piece);
        if outcome.stopped {
            send(self, outcome.emit, logprobs);
            return Ok(Outcome::Finished(StopReason::Stop));
        }
        let mut text = outcome.emit;
        let at_limit = self.generated.len() >= self.max_tokens
            || self.prompt.len() + self.generated.len() >= context;
        if at_limit || grammar_done {
            let rest = self.decoder.finish()?;
            let tail = self.stop.push(&rest);
            text.push_str(&tail.emit);
            if tail.stopped {
                send(self, text, logprobs);
                return Ok(Outcome::Finished(StopReason::Stop));
            }
            text.push_str(&self.stop.finish());
            send(self, text, logprobs);
            // A complete grammar is a natural end, even on the last allowed token.
            let reason = if grammar_done {
                StopReason::Stop
            } else {
                StopReason::Length
            };
            return Ok(Outcome::Finished(reason));
        }
        send(self, text, logprobs);
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

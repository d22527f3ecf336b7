//! The engine thread's loop: receiving, dropping cancelled sequences, admission at a step's
//! boundary, one forward pass per step, then sampling and streaming (the steps the [module
//! documentation](super) lists). Newcomers started between a step's layers are
//! [`super::intake`]'s; the queues and the KV reservation are [`super::desk`]'s.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use super::admission::{chunks_taken, step_members, Member};
use super::desk::{tenancy, Desk, Place};
use super::intake::{pass_budget, pass_takes_all, starts_apart, Intake};
use super::preempt;
use super::sequence::{Feed, Outcome, Sequence};
use super::{EngineConfig, EngineStats, GenEvent, Submission};
use crate::classes::ServiceClass;
use crate::fair::Tenant;
use crate::model::{LlamaModel, SeqStep};
use crate::tokenizer::ModelTokenizer;
use crate::{Error, Result};

pub(super) struct Worker {
    model: LlamaModel,
    desk: Desk,
    running: Vec<Sequence>,
    /// Steps run so far.
    steps: u64,
    /// Whether the last step left prompt chunks of work that can wait out
    /// ([`chunks_taken`]).
    yielded: bool,
    /// Whether the last admission left newcomers to a pass before the next step's first
    /// layer ([`pass_takes_all`]): that pass runs even when the step prefills prompts.
    pass_promised: bool,
}

impl Worker {
    pub(super) fn new(
        model: LlamaModel,
        tokenizer: Arc<ModelTokenizer>,
        config: EngineConfig,
        incoming: Receiver<Submission>,
        stats: Arc<EngineStats>,
    ) -> Self {
        Self {
            model,
            desk: Desk::new(tokenizer, config, incoming, stats),
            running: Vec::new(),
            steps: 0,
            yielded: false,
            pass_promised: false,
        }
    }

    pub(super) fn run(mut self) {
        loop {
            if !self.receive() {
                return;
            }
            self.drop_cancelled();
            self.admit();
            self.desk.forget_idle();
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
        let idle =
            self.running.is_empty() && self.desk.waiting.is_empty() && self.desk.evicted.is_empty();
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
        self.desk.receive_ready();
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
        self.desk.evicted.retain(|seq| !seq.reply.is_closed());
        let gone = self.desk.waiting.retain(|sub| !sub.reply.is_closed());
        if gone > 0 {
            self.desk
                .stats
                .waiting
                .fetch_sub(gone as u64, Ordering::Relaxed);
        }
    }

    /// Admission at a step's boundary: preempts for a higher class that needs the room
    /// ([`preempt`]), brings preempted sequences back when they fit, then admits waiting
    /// requests.
    fn admit(&mut self) {
        let every = self.desk.config.preempt_every;
        if every > 0 && self.steps.is_multiple_of(every) {
            preempt::force(&mut self.desk, &mut self.running, &self.model);
        }
        preempt::make_room(&mut self.desk, &mut self.running, &self.model);
        preempt::resume(&mut self.desk, &mut self.running, &self.model);
        if self.desk.waiting.is_empty() {
            return;
        }
        let mut tenants: Vec<Member> = self.running.iter().map(Sequence::member).collect();
        let config = &self.desk.config;
        // What a step's intake has at least once the step's decode tokens are counted (when
        // the step's prompt chunks take more, a newcomer left to it waits a step or more).
        let decoders = tenants
            .len()
            .min(config.max_running.min(config.max_step_sequences));
        let budget = pass_budget(config.max_batch_tokens, decoders);
        let before = tenants.clone();
        // While sequences run, a request whose customer has none of them may start before one
        // of the next step's layers ([`Intake`]) instead of joining it.
        let apart = |sub: &Submission, prefill: usize| {
            let (tenant, _, class) = tenancy(&sub.request);
            !before.is_empty() && starts_apart(&before, (&tenant, class), prefill, budget)
        };
        // Such requests are left to the step when it may run a pass and the pass takes them
        // all ([`pass_takes_all`]); they keep their place, so those behind them cannot take the
        // KV they wait for, nor join in their stead. Else they join the step. With nothing
        // running there is no step to wait for, and every request joins the first.
        let left = self.desk.waiting_prefill(apart);
        let interleave = self.desk.pass_ready(self.steps + 1) && pass_takes_all(left, budget);
        self.pass_promised = interleave && left > 0;
        let place = |_: &Tenant, sub: &Submission, prefill: usize| {
            if interleave && apart(sub, prefill) {
                Place::Elsewhere
            } else {
                Place::Here
            }
        };
        while let Some(seq) = self.desk.admit_next(&self.model, &tenants, place) {
            tenants.push(seq.member());
            self.running.push(seq);
        }
    }

    fn publish_stats(&self) {
        let s = &self.desk.stats;
        s.running
            .store(self.running.len() as u64, Ordering::Relaxed);
        s.preempted
            .store(self.desk.evicted.len() as u64, Ordering::Relaxed);
        s.kv_reserved_bytes
            .store(self.desk.reserved_bytes as u64, Ordering::Relaxed);
        let used: usize = self.running.iter().map(|q| q.cache.bytes()).sum();
        s.kv_used_bytes.store(used as u64, Ordering::Relaxed);
        s.prefix_cache_bytes
            .store(self.desk.prefix_bytes() as u64, Ordering::Relaxed);
        s.tenants_tracked
            .store(self.desk.waiting.tenants() as u64, Ordering::Relaxed);
    }

    /// Which running sequences take part in this step: all of them while they fit the
    /// step; else the highest classes first and within a class each tenant's fair share, its
    /// least recently run sequences first.
    fn choose(&self) -> Vec<bool> {
        let running: Vec<(&Tenant, u32, u64, ServiceClass)> = self
            .running
            .iter()
            .map(|s| (&s.tenant, s.weight, s.last_step, s.class))
            .collect();
        let cap = self
            .desk
            .config
            .max_running
            .min(self.desk.config.max_step_sequences);
        step_members(&running, cap)
    }

    /// What each running sequence feeds this step, `(index, feed)` in index order: decode
    /// tokens first (one each), then chunks of prompts (and of sampled tokens a preemption
    /// took out of a cache), the highest class first and in admission order within a class,
    /// up to the step's token budget; those of work that can wait sit out a step where an
    /// interactive class prefills ([`chunks_taken`]). Marks them as run in this step.
    fn plan(&mut self) -> Vec<(usize, Feed)> {
        let mut budget = self.desk.config.max_batch_tokens.max(1);
        let chosen = self.choose();
        let mut plan: Vec<(usize, Feed)> = Vec::new();
        let mut chunks: Vec<usize> = Vec::new();
        for (i, seq) in self.running.iter().enumerate() {
            if !chosen[i] {
                continue;
            }
            if seq.feed(1) != Feed::Decode {
                chunks.push(i);
            } else if budget > 0 {
                plan.push((i, Feed::Decode));
                budget -= 1;
            }
        }
        budget -= self.drafts(&mut plan, budget);
        chunks.sort_by_key(|&i| self.running[i].class);
        let classes: Vec<ServiceClass> = chunks.iter().map(|&i| self.running[i].class).collect();
        let taken = chunks_taken(&classes, self.yielded);
        self.yielded = taken < chunks.len();
        for &i in &chunks[..taken] {
            if budget == 0 {
                break;
            }
            let feed = self.running[i].feed(budget);
            if let Feed::Prompt(len) | Feed::Replay(len) = feed {
                plan.push((i, feed));
                budget -= len;
            }
        }
        plan.sort_by_key(|p| p.0);
        for &(i, _) in &plan {
            self.running[i].last_step = self.steps;
        }
        plan
    }

    /// Turns the decoding sequences of `plan` that have a draft into [`Feed::Draft`]s, within
    /// `budget` tokens, unless speculation is off or the step has more decoding sequences than
    /// [`EngineConfig::speculative_max_batch`], or the model is not on the CPU (only the CPU
    /// paths give a verified row the logits of the decoded one bit for bit). Returns the
    /// draft tokens added.
    fn drafts(&mut self, plan: &mut [(usize, Feed)], budget: usize) -> usize {
        let config = &self.desk.config;
        let (max, context) = (config.speculative_draft, self.model.config().context_length);
        if max == 0 || plan.len() > config.speculative_max_batch || !self.model.device().is_cpu() {
            return 0;
        }
        let mut added = 0;
        for (i, feed) in plan.iter_mut() {
            let room = max.min(budget - added);
            if room == 0 {
                break;
            }
            *feed = self.running[*i].draft(room, context);
            added += feed.tokens() - 1;
        }
        added
    }

    /// One forward pass over the running sequences, then sampling and streaming. Between its
    /// layers, newcomers whose tenants have nothing running are started in passes of their own
    /// ([`Intake`]).
    fn step(&mut self) -> Result<()> {
        self.steps += 1;
        let plan = self.plan();
        // A step that prefills prompts runs a smaller pass or none ([`step_pass_budget`]), unless newcomers
        // were left to it at the boundary.
        let prompt_tokens = if std::mem::take(&mut self.pass_promised) {
            0
        } else {
            plan.iter()
                .filter(|p| matches!(p.1, Feed::Prompt(_) | Feed::Replay(_)))
                .map(|p| p.1.tokens())
                .sum()
        };
        let Worker {
            model,
            desk,
            running,
            steps: step_number,
            ..
        } = self;
        let tenants = running.iter().map(Sequence::member).collect();
        let layers = model.config().n_layers;
        let own_tokens = plan.iter().map(|p| p.1.tokens()).sum();
        let step_class = plan.iter().map(|p| running[p.0].class).min();
        let mut intake = Intake::new(
            desk,
            tenants,
            *step_number,
            (layers, own_tokens, prompt_tokens),
            step_class,
        );
        // `(index, logit rows, what it fed)` of each sequence in the pass.
        let mut wants = Vec::with_capacity(plan.len());
        let (mut prefill_tokens, mut decode_tokens, mut draft_tokens) = (0usize, 0usize, 0usize);
        // Borrow each planned sequence's cache mutably, once, in index order.
        let mut steps: Vec<SeqStep<'_>> = Vec::with_capacity(plan.len());
        let mut plan_iter = plan.iter().peekable();
        for (i, seq) in running.iter_mut().enumerate() {
            let Some(&&(pi, feed)) = plan_iter.peek() else {
                break;
            };
            if pi != i {
                continue;
            }
            plan_iter.next();
            match feed {
                Feed::Prompt(len) | Feed::Replay(len) => prefill_tokens += len,
                Feed::Decode => decode_tokens += 1,
                Feed::Draft(n) => {
                    (decode_tokens, draft_tokens) = (decode_tokens + 1, draft_tokens + n)
                }
            }
            let input = seq.step_input(feed);
            wants.push((i, input.logits, feed));
            steps.push(input);
        }
        let logits = model.forward_between(&mut steps, &mut |m| intake.between_layers(m));
        drop(steps);
        let (desk, started) = intake.finish();
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
        stats
            .draft_tokens_total
            .fetch_add(draft_tokens as u64, Ordering::Relaxed);
        stats.steps_total.fetch_add(1, Ordering::Relaxed);
        advance_all(model, desk, running, &wants, logits)
    }
}

/// Samples and streams the next token (or tokens, where a draft is verified) of each
/// sequence of a step that wants logits (given as `(index, logit rows, what it fed)`), from
/// the step's `logits`; retires those that ended.
fn advance_all(
    model: &LlamaModel,
    desk: &mut Desk,
    running: &mut Vec<Sequence>,
    wants: &[(usize, usize, Feed)],
    logits: Vec<Vec<f32>>,
) -> Result<()> {
    let context = model.config().context_length;
    let max_draft = desk.config.speculative_draft;
    let mut logits = logits.into_iter();
    let mut finished: Vec<(usize, Outcome)> = Vec::new();
    let mut accepted = 0;
    for &(i, want, feed) in wants {
        running[i].fed(feed);
        if want == 0 {
            continue;
        }
        let mut rows: Vec<Vec<f32>> = logits.by_ref().take(want).collect();
        if rows.len() < want {
            return Err(Error::Weights(
                "the forward pass returned fewer logit rows than requested".into(),
            ));
        }
        let seq = &mut running[i];
        let before = seq.spec.accepted;
        let outcome = seq.verify(&desk.tokenizer, context, &mut rows, max_draft)?;
        accepted += seq.spec.accepted - before;
        finished.push((i, outcome));
    }
    desk.stats
        .accepted_draft_tokens_total
        .fetch_add(accepted as u64, Ordering::Relaxed);
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

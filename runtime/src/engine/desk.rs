//! What admission works with besides the model and the running set: the waiting queue (fair
//! between customers), the KV reservation and the prefix cache. Apart from the worker so a step
//! in flight can admit newcomers ([`super::intake`]) while its sequences' caches are borrowed.
//! It does not run forward passes.

use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use super::admission::{admission, Admission, Member};
use super::late::TriggerScan;
use super::prefix_cache::PrefixCache;
use super::sequence::{Outcome, Sequence};
use super::speculate::Speculation;
use super::{EngineConfig, EngineStats, GenEvent, GenRequest, Submission};
use crate::classes::{ClassQueues, ServiceClass};
use crate::detokenize::StreamDecoder;
use crate::fair::{Tenant, Visit};
use crate::model::LlamaModel;
use crate::sampling::Sampler;
use crate::stop::StopMatcher;
use crate::tokenizer::ModelTokenizer;

pub(super) struct Desk {
    pub(super) tokenizer: Arc<ModelTokenizer>,
    pub(super) config: EngineConfig,
    pub(super) incoming: Receiver<Submission>,
    pub(super) stats: Arc<EngineStats>,
    pub(super) waiting: ClassQueues<Submission>,
    pub(super) reserved_bytes: usize,
    /// The step that last ran a pass for newcomers ([`super::intake::Intake`]).
    pub(super) last_pass: Option<u64>,
    /// Sequences preempted for a higher class, without their cache, highest class first
    /// ([`super::preempt`]).
    pub(super) evicted: Vec<Sequence>,
    prefixes: PrefixCache,
}

/// Where a waiting request may start, as one admission point (a step's boundary, or between
/// the layers of a step in flight) sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Place {
    /// Here, when the admission rule admits it.
    Here,
    /// At the other admission point, which comes next: it keeps its place in the fair order,
    /// so nothing behind it starts here first and takes the KV memory it needs (a newcomer
    /// left to the next step's intake is not overtaken at the boundary again and again). Only
    /// a request the rule passes over (its tenant over its share) lets the others go.
    Elsewhere,
    /// Not now: the next request in fair order is looked at.
    Later,
}

/// What the queue does with a request at `place` that the rule judged `rule`.
pub(super) fn visit(place: Place, rule: Admission) -> Visit {
    match (place, rule) {
        (Place::Later, _) | (Place::Elsewhere, Admission::OverShare) => Visit::Pass,
        (Place::Elsewhere, _) => Visit::Stop,
        (Place::Here, rule) => rule.visit(),
    }
}

/// The KV bytes a submission reserves: its prompt and `max_tokens`.
pub(super) fn kv_need(sub: &Submission, per_token: usize) -> usize {
    (sub.request.prompt_ids.len() + sub.request.max_tokens) * per_token
}

/// A request's tenant, weight and class (requests without a tenant share the anonymous one,
/// in the default class).
pub(super) fn tenancy(request: &GenRequest) -> Member {
    match &request.tenant {
        Some(t) => (t.name.clone(), t.weight.max(1), t.class),
        None => (Tenant::from(""), 1, ServiceClass::Default),
    }
}

/// Prompt tokens a waiting request would prefill: its prompt after the longest prefix the
/// cache holds for its adapter (or none).
fn prefill(prefixes: &PrefixCache, sub: &Submission) -> usize {
    let prompt = &sub.request.prompt_ids;
    let key = sub.request.adapter.as_ref().map(|a| a.id());
    prompt.len() - prefixes.matched(key, prompt)
}

impl Desk {
    pub(super) fn new(
        tokenizer: Arc<ModelTokenizer>,
        config: EngineConfig,
        incoming: Receiver<Submission>,
        stats: Arc<EngineStats>,
    ) -> Self {
        Self {
            prefixes: PrefixCache::new(config.prefix_cache_bytes),
            tokenizer,
            config,
            incoming,
            stats,
            waiting: ClassQueues::new(),
            reserved_bytes: 0,
            last_pass: None,
            evicted: Vec::new(),
        }
    }

    /// Whether step number `step` may run a pass for newcomers: interleaving is on, and no
    /// pass ran in the `interleave_every - 1` steps before it (nor earlier in this one).
    pub(super) fn pass_ready(&self, step: u64) -> bool {
        self.config.interleave_passes > 0
            && super::intake::pass_due(self.last_pass, step, self.config.interleave_every)
    }

    /// Queues a submission under its tenant, costed by the tokens it may take.
    pub(super) fn enqueue(&mut self, sub: Submission) {
        let (tenant, weight, class) = tenancy(&sub.request);
        let cost = (sub.request.prompt_ids.len() + sub.request.max_tokens) as f64;
        self.waiting.push(class, tenant, weight, cost, sub);
    }

    /// Moves what arrived into the waiting queue, without blocking.
    pub(super) fn receive_ready(&mut self) {
        while let Ok(sub) = self.incoming.try_recv() {
            self.enqueue(sub);
        }
    }

    /// Takes the first waiting submission, in fair order, that may start here (`place`, given
    /// its tenant and the prompt tokens it would prefill after the prefix cache) and that the
    /// admission rule admits beside `running` (each running sequence's [`Member`]); reserves
    /// its KV and starts it.
    pub(super) fn admit_next(
        &mut self,
        model: &LlamaModel,
        running: &[Member],
        place: impl Fn(&Tenant, &Submission, usize) -> Place,
    ) -> Option<Sequence> {
        let per_token = model.kv_bytes_per_token();
        let (config, reserved, prefixes) = (&self.config, self.reserved_bytes, &self.prefixes);
        let (_, tenant, sub) = self.waiting.pop_first(|class, tenant, sub| {
            let at = place(tenant, sub, prefill(prefixes, sub));
            if at == Place::Later {
                return Visit::Pass;
            }
            let rule = admission(
                running.iter().map(|(t, w, c)| (t, *w, *c)),
                (tenant, tenancy(&sub.request).1, class),
                config.max_running,
                (reserved, kv_need(sub, per_token), config.kv_cache_bytes),
            );
            visit(at, rule)
        })?;
        let need = kv_need(&sub, per_token);
        self.reserved_bytes += need;
        Some(self.start(sub, tenant, need, model))
    }

    /// Prompt tokens, after the prefix cache, of the waiting requests that `apart` picks
    /// (from each one and the tokens it would prefill).
    pub(super) fn waiting_prefill(&self, apart: impl Fn(&Submission, usize) -> bool) -> usize {
        self.waiting
            .iter()
            .filter_map(|sub| {
                let prefill = prefill(&self.prefixes, sub);
                apart(sub, prefill).then_some(prefill)
            })
            .sum()
    }

    /// Forgets customers that have nothing waiting, but for the `max_running` most recently
    /// served, so the queue's state follows the active customers only.
    pub(super) fn forget_idle(&mut self) {
        self.waiting.forget_idle(self.config.max_running);
    }

    /// KV memory the prefix cache holds.
    pub(super) fn prefix_bytes(&self) -> usize {
        self.prefixes.bytes()
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
        let (_, weight, class) = tenancy(&sub.request);
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
            prediction,
            adapter,
        } = sub.request;
        let logprobs = sampling.logprobs.is_some();
        let sampler = Sampler::new(sampling, &prompt_ids);
        let cache = match prefixes.lookup(adapter.as_ref().map(|a| a.id()), &prompt_ids) {
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
            kv_generated: 0,
            preemptions: 0,
            decoded_since_resume: true,
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
            class,
            scan: TriggerScan::default(),
            last_step: 0,
            spec: Speculation::new(prediction),
            verify: Vec::new(),
            adapter,
        }
    }

    /// Takes a running sequence's cache and KV reservation away; it waits in `evicted` to
    /// come back ([`readmit`](Self::readmit)). Its KV goes to the prefix cache, which keeps it
    /// while it has room, so coming back may cost a copy rather than a prefill.
    pub(super) fn evict(&mut self, mut seq: Sequence, model: &LlamaModel) {
        tracing::debug!(tenant = %seq.tenant, class = %seq.class, generated = seq.generated.len(), "preempted a sequence");
        self.reserved_bytes -= seq.reserved_bytes;
        let cache = std::mem::replace(&mut seq.cache, model.new_cache());
        if self.prefixes.is_enabled() && !cache.is_empty() {
            let held = seq.context(cache.len()).to_vec();
            self.prefixes.insert(seq.adapter_key(), held, cache);
        }
        seq.prefilled = 0;
        seq.kv_generated = 0;
        seq.preemptions += 1;
        seq.decoded_since_resume = false;
        let at = self.evicted.partition_point(|s| s.class <= seq.class);
        self.evicted.insert(at, seq);
    }

    /// Gives a preempted sequence its KV reservation back and a cache (a copy of a cached
    /// prefix of its prompt when there is one); the steps feed it the rest of its prompt and
    /// its sampled tokens again before it goes on.
    pub(super) fn readmit(&mut self, mut seq: Sequence, model: &LlamaModel) -> Sequence {
        self.reserved_bytes += seq.reserved_bytes;
        // What its cache must hold to decode again: the prompt and all but the last sampled
        // token.
        let needed = seq.prompt.len() + seq.generated.len().saturating_sub(1);
        let context = seq.context(needed).to_vec();
        let cache = match self.prefixes.lookup(seq.adapter_key(), &context) {
            Ok(Some(cache)) => cache,
            Ok(None) => model.new_cache(),
            Err(e) => {
                tracing::warn!(error = %e, "prefix cache copy failed; prefilling in full");
                model.new_cache()
            }
        };
        seq.prefilled = cache.len().min(seq.prompt.len());
        seq.kv_generated = cache.len().saturating_sub(seq.prompt.len());
        seq.cache = cache;
        seq
    }

    /// Ends a sequence that finished or failed: frees its KV reservation, keeps its prompt's
    /// KV in the prefix cache when it finished, and tells its caller.
    pub(super) fn retire(&mut self, seq: Sequence, outcome: Outcome) {
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
                            prefixes.insert(seq.adapter_key(), seq.prompt.clone(), cache);
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
                    accepted_prediction_tokens: seq.spec.accepted_prediction,
                    rejected_prediction_tokens: seq.spec.rejected_prediction,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request left to the other admission point keeps its place in the fair order: unless
    /// the rule passes it over, nothing behind it is admitted here, so the KV it waits for is
    /// not taken by those behind it, step after step.
    #[test]
    fn a_request_left_to_the_other_admission_point_keeps_its_place() {
        use Admission::{Admit, NoKvRoom, OverShare};
        assert_eq!(visit(Place::Here, Admit), Visit::Take);
        assert_eq!(visit(Place::Here, OverShare), Visit::Pass);
        assert_eq!(visit(Place::Here, NoKvRoom), Visit::Stop);
        assert_eq!(visit(Place::Elsewhere, Admit), Visit::Stop);
        assert_eq!(visit(Place::Elsewhere, NoKvRoom), Visit::Stop);
        assert_eq!(visit(Place::Elsewhere, OverShare), Visit::Pass);
        for rule in [Admit, OverShare, NoKvRoom] {
            assert_eq!(visit(Place::Later, rule), Visit::Pass);
        }
    }
}

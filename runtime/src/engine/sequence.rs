//! One running sequence: its prompt, KV cache and sampler, and what a step's logits do to it
//! (sample, constrain, detokenize, match stop strings, stream). It does not decide when it
//! runs.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc::UnboundedSender;

use super::late::{start_late, Late, TriggerScan};
use super::speculate::Speculation;
use super::{GenConstraint, GenEvent, LogprobInfo, StopReason, TokenLogprob};
use crate::classes::ServiceClass;
use crate::detokenize::StreamDecoder;
use crate::fair::Tenant;
use crate::model::{KvCache, LoraAdapter, SeqStep};
use crate::sampling::{Sampled, Sampler};
use crate::stop::StopMatcher;
use crate::tokenizer::ModelTokenizer;
use crate::{Error, Result};

/// A sequence admitted to the running set.
pub(super) struct Sequence {
    pub(super) prompt: Vec<u32>,
    /// Prompt tokens already in the cache.
    pub(super) prefilled: usize,
    /// Prompt tokens that came from the prefix cache.
    pub(super) cached: usize,
    /// Sampled tokens; the last one is not yet in the cache.
    pub(super) generated: Vec<u32>,
    /// Sampled tokens in the cache: all but the last while it decodes; fewer after a
    /// preemption released its cache, until they are fed again ([`Feed::Replay`]).
    pub(super) kv_generated: usize,
    /// Times it was preempted, and whether it decoded since it last came back (a forced
    /// preemption takes only such a sequence, so each one makes progress).
    pub(super) preemptions: u32,
    pub(super) decoded_since_resume: bool,
    pub(super) max_tokens: usize,
    pub(super) cache: KvCache,
    pub(super) sampler: Sampler,
    pub(super) decoder: StreamDecoder,
    pub(super) stop: StopMatcher,
    pub(super) logprobs: bool,
    pub(super) reply: UnboundedSender<GenEvent>,
    pub(super) reserved_bytes: usize,
    pub(super) progress: Option<Arc<AtomicUsize>>,
    pub(super) constraint: Option<GenConstraint>,
    pub(super) tenant: Tenant,
    pub(super) weight: u32,
    pub(super) class: ServiceClass,
    /// Where a late grammar's triggers were looked for.
    pub(super) scan: TriggerScan,
    /// The last step this sequence ran in (the least recent goes first when its tenant is
    /// over its share of the batch).
    pub(super) last_step: u64,
    /// Its drafts ([`super::speculate`]).
    pub(super) spec: Speculation,
    /// What a [`Feed::Draft`] step feeds: the last sampled token, then the draft.
    pub(super) verify: Vec<u32>,
    /// The LoRA adapter its tokens run with.
    pub(super) adapter: Option<Arc<LoraAdapter>>,
}

/// What a running sequence feeds a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Feed {
    /// Its last sampled token, for the logits of the next.
    Decode,
    /// The next `len` tokens of its prompt.
    Prompt(usize),
    /// The next `len` of its sampled tokens, back into a cache a preemption released; no
    /// logits (those tokens were sampled already).
    Replay(usize),
    /// Its last sampled token and the `n` tokens of its draft after it, for the logits of
    /// each of those `n + 1` positions.
    Draft(usize),
}

impl Feed {
    /// Tokens it puts into the step.
    pub(super) fn tokens(self) -> usize {
        match self {
            Self::Prompt(len) | Self::Replay(len) => len,
            Self::Decode => 1,
            Self::Draft(n) => 1 + n,
        }
    }
}

pub(super) enum Outcome {
    Continue,
    Finished(StopReason),
    /// This sequence alone failed (its grammar); the others go on.
    Failed(String),
}

impl Sequence {
    /// The sequence as admission sees it ([`super::admission::Member`]).
    pub(super) fn member(&self) -> super::admission::Member {
        (self.tenant.clone(), self.weight, self.class)
    }

    /// The prefix cache's key of its KV: its adapter.
    pub(super) fn adapter_key(&self) -> Option<u64> {
        self.adapter.as_ref().map(|a| a.id())
    }

    /// The first `len` tokens of its prompt followed by its sampled tokens (all of them when
    /// `len` is longer).
    pub(super) fn context(&self, len: usize) -> std::borrow::Cow<'_, [u32]> {
        if len <= self.prompt.len() {
            return std::borrow::Cow::Borrowed(&self.prompt[..len]);
        }
        let mut all = self.prompt.clone();
        let sampled = (len - self.prompt.len()).min(self.generated.len());
        all.extend_from_slice(&self.generated[..sampled]);
        std::borrow::Cow::Owned(all)
    }

    /// What the sequence feeds next, `budget` (at least 1) tokens at most: the rest of its
    /// prompt, then the sampled tokens a preemption took out of its cache, then its last
    /// sampled token.
    pub(super) fn feed(&self, budget: usize) -> Feed {
        let prompt_left = self.prompt.len() - self.prefilled;
        if prompt_left > 0 {
            return Feed::Prompt(prompt_left.min(budget.max(1)));
        }
        let replay_left = self.generated.len().saturating_sub(1 + self.kv_generated);
        if replay_left > 0 {
            return Feed::Replay(replay_left.min(budget.max(1)));
        }
        Feed::Decode
    }

    /// What `feed` puts into a step: its tokens, this sequence's cache, and whether the step
    /// returns logits for them.
    pub(super) fn step_input(&mut self, feed: Feed) -> SeqStep<'_> {
        let n = self.generated.len();
        let (tokens, logits) = match feed {
            Feed::Prompt(len) => {
                let end = self.prefilled + len;
                let last = end == self.prompt.len() && self.generated.is_empty();
                (&self.prompt[self.prefilled..end], usize::from(last))
            }
            Feed::Replay(len) => {
                let start = self.kv_generated;
                (&self.generated[start..start + len], 0)
            }
            Feed::Decode => (&self.generated[n.saturating_sub(1)..n], 1),
            Feed::Draft(_) => {
                self.verify.clear();
                self.verify
                    .extend_from_slice(&self.generated[n.saturating_sub(1)..n]);
                self.verify.extend_from_slice(&self.spec.draft);
                (&self.verify[..], self.verify.len())
            }
        };
        SeqStep {
            tokens,
            cache: &mut self.cache,
            logits,
            adapter: self.adapter.as_deref(),
        }
    }

    /// Proposes this decoding sequence's draft for the next step, at most `max` tokens and no
    /// more than it may still generate within `context`; the feed that verifies it, or
    /// [`Feed::Decode`] without one.
    pub(super) fn draft(&mut self, max: usize, context: usize) -> Feed {
        let used = self.prompt.len() + self.generated.len();
        let room = (self.max_tokens.saturating_sub(self.generated.len()))
            .min(context.saturating_sub(used))
            .saturating_sub(1);
        let max = max.min(room);
        if max == 0 {
            return Feed::Decode;
        }
        let all = self.context(used).into_owned();
        self.spec.propose(&all, max);
        match self.spec.draft.len() {
            0 => Feed::Decode,
            n => Feed::Draft(n),
        }
    }

    /// Records that the step took `feed` into the cache.
    pub(super) fn fed(&mut self, feed: Feed) {
        match feed {
            Feed::Prompt(len) => self.prefilled += len,
            Feed::Replay(len) => self.kv_generated += len,
            Feed::Decode | Feed::Draft(_) => {
                self.kv_generated = self.generated.len();
                self.decoded_since_resume = true;
            }
        }
    }

    /// Samples a step's `rows` of logits in order (the positions of [`Feed::Decode`] or
    /// [`Feed::Draft`], or a prompt's last), each as [`advance`](Self::advance) alone would,
    /// going on to the next only while the token sampled is the draft's next: the output is
    /// the one without a draft. The rejected draft positions leave the cache. `max_draft` is
    /// the longest draft (for the next length).
    pub(super) fn verify(
        &mut self,
        tokenizer: &Arc<ModelTokenizer>,
        context: usize,
        rows: &mut [Vec<f32>],
        max_draft: usize,
    ) -> Result<Outcome> {
        let drafted = self.spec.draft.len();
        let mut kept = 0;
        let mut outcome = Outcome::Continue;
        for row in rows.iter_mut() {
            outcome = self.advance(tokenizer, context, row)?;
            let follows = self.spec.draft.get(kept) == self.generated.last();
            if !matches!(outcome, Outcome::Continue) || !follows {
                break;
            }
            kept += 1;
        }
        let rejected = drafted - kept;
        self.cache.truncate(self.cache.len() - rejected);
        self.kv_generated += kept;
        self.spec.verified(kept, max_draft);
        Ok(outcome)
    }

    /// Samples the next token from `logits` and streams its text. A grammar failure fails
    /// this sequence only.
    pub(super) fn advance(
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

    /// Moves the sequence's grammar past `token` (a late grammar starts when its trigger
    /// appears); whether the grammar is complete.
    fn follow_grammar(&mut self, tokenizer: &Arc<ModelTokenizer>, token: u32) -> Result<bool> {
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
        Ok(grammar_done)
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
        self.spec.follow(&self.generated);
        let grammar_done = self.follow_grammar(tokenizer, token)?;
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

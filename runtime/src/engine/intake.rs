//! Newcomers started between the layers of a step in flight. A waiting request whose customer
//! has nothing running, and whose prompt (after the prefix cache) fits a step's token budget
//! ([`starts_apart`]), is admitted there, by the same rule and in the same fair order as at a
//! step's boundary, its prompt prefilled in a forward pass beside the step and its first token
//! sampled and sent. So a customer's first token waits for a fraction of another customer's
//! step, not the whole step (at 32 sequences of this machine's development model a step takes
//! about 75 ms, a layer under 3 ms); one that arrives between steps starts before the next
//! step's first layer instead of joining it.
//!
//! The work added to a step is bounded: the intake looks for newcomers before at most
//! [`EngineConfig::interleave_passes`](super::EngineConfig::interleave_passes) evenly spaced
//! layers, starting every newcomer that arrived since in one batched pass, and the pass
//! prefills at most what the step's own tokens leave of `max_batch_tokens` ([`pass_budget`]),
//! and no more than the step's own tokens (64 beside a short step): a step and its pass
//! process no more tokens than one step could if the newcomers joined it, and a pass at most
//! doubles a step. Passes are
//! rationed: one at most every
//! [`EngineConfig::interleave_every`](super::EngineConfig::interleave_every) steps, since each
//! reads the weights a second time, which the running sequences pay for. A customer who comes
//! while another's streams run gets a pass; when newcomers are many, most join the next step,
//! where their prompts cost only their own tokens. A newcomer that does not fit, or finds no
//! pass, waits for the next step. At a step's boundary the newcomers waiting are left to a
//! pass before the step's first layer only when it takes them all ([`pass_takes_all`]); else
//! they join the step, as they would with interleaving off. A step that prefills prompts
//! (newcomers that joined it, a long prompt's chunk) runs a pass only for what they leave of
//! 64 tokens ([`step_pass_budget`]): it is already among the running sequences' longest waits.
//!
//! Beside a step of work that can wait only (`flex`, `batch`: sold as served from what higher
//! classes leave), none of these bounds holds for a newcomer of a class above every one in the
//! step: it starts at the next layer, in a pass of up to `max_batch_tokens`, however many
//! passes the step has run already ([`Intake::yielding`]). The step's sequences wait for it; an
//! interactive customer's first token does not wait for their step.
//!
//! A newcomer's failure (its pass, its first token) fails that newcomer only: the step in
//! flight and the other newcomers go on.

use std::sync::atomic::Ordering;

use super::admission::Member;
use super::desk::{tenancy, Desk, Place};
use super::sequence::{Outcome, Sequence};
use super::Submission;
use crate::classes::ServiceClass;
use crate::fair::Tenant;
use crate::model::{LlamaModel, SeqStep};
use crate::{Error, Result};

/// What a step in flight needs to start newcomers before its layers.
pub(super) struct Intake<'a> {
    desk: &'a mut Desk,
    /// Every running sequence's [`Member`], those started here included.
    tenants: Vec<Member>,
    /// Sequences started during the step, past their first token.
    started: Vec<Sequence>,
    /// The step in flight.
    step: u64,
    /// Prompt tokens the step's newcomers may still prefill.
    budget: usize,
    /// Layers of the step already reached, and of the model.
    layer: usize,
    layers: usize,
    /// The highest class of the step in flight ([`Intake::yielding`]); `None` for none.
    step_class: Option<ServiceClass>,
}

/// Whether a waiting request of `tenant` in `class` starts in a forward pass beside a step
/// ([`Intake`]) rather than joining one: its tenant has none of the `running` sequences, the
/// `prefill` tokens its prompt needs (after the prefix cache) fit a step's token `budget`, and
/// it is interactive (`priority` or `default`, sold with a first-token goal) or no running
/// sequence is of a higher class (whose tokens a pass would delay for work that can wait).
pub(super) fn starts_apart(
    running: &[Member],
    (tenant, class): (&Tenant, ServiceClass),
    prefill: usize,
    budget: usize,
) -> bool {
    let interactive = class.interactive();
    prefill <= budget
        && !running
            .iter()
            .any(|(t, _, c)| t == tenant || (!interactive && *c < class))
}

/// Whether the intake looks for newcomers before layer `layer` of `layers`: at `passes` evenly
/// spaced layers, the first included (every layer when `passes` is at least `layers`; never
/// when it is 0).
fn intake_point(layer: usize, layers: usize, passes: usize) -> bool {
    let layers = layers.max(1);
    passes > 0 && (layer == 0 || layer * passes / layers != (layer - 1) * passes / layers)
}

/// Prompt tokens a pass may prefill beside a step feeding `own_tokens` of its own: what the
/// step leaves of `max_batch_tokens`, and no more than the step's own tokens (or
/// [`PASS_FLOOR_TOKENS`] for a short step), so a pass at most doubles the time the running
/// sequences wait for their next token. A longer prompt joins the next step, in chunks.
pub(super) fn pass_budget(max_batch_tokens: usize, own_tokens: usize) -> usize {
    max_batch_tokens
        .saturating_sub(own_tokens)
        .min(own_tokens.max(PASS_FLOOR_TOKENS))
}

/// [`pass_budget`] for a step whose `own_tokens` include `prompt_tokens` of prompts: what its
/// prompts leave of [`PASS_FLOOR_TOKENS`], so none beside a step that prefills a short question
/// or more (newcomers that joined it, a long prompt's chunk). Such a step is already longer
/// than a decode step, and a pass beside it would add to the longest waits of the running
/// sequences, those that set their inter-token p99; newcomers that arrive during it join the
/// next step, as they would with interleaving off. A step whose prompts are a few tokens (a
/// returning customer's prompt found in the prefix cache but its last token) is a decode step
/// in all but name, and a lone customer arriving during it still gets its pass. (A newcomer of
/// a class above a step of work that can wait only is not bound by this: [`Intake::yielding`].)
pub(super) fn step_pass_budget(
    max_batch_tokens: usize,
    own_tokens: usize,
    prompt_tokens: usize,
) -> usize {
    let budget = pass_budget(max_batch_tokens, own_tokens);
    if prompt_tokens == 0 {
        return budget;
    }
    budget.min(PASS_FLOOR_TOKENS.saturating_sub(prompt_tokens))
}

/// Whether the newcomers waiting at a step's boundary, `prefill` prompt tokens together, are
/// left to a pass before the step's first layer rather than joining the step: only when the
/// pass's `budget` takes them all. A newcomer left to a pass that has no room for it would
/// wait a whole step longer than if it had joined the step (with many customers arriving,
/// every few steps), so when they do not all fit, they all join the step.
pub(super) fn pass_takes_all(prefill: usize, budget: usize) -> bool {
    prefill <= budget
}

/// The tokens a pass may prefill beside however short a step: a short question in a chat
/// template fits.
const PASS_FLOOR_TOKENS: usize = 64;

/// Whether step number `step` may run a pass when the last one ran in step `last`: one pass at
/// most every `every` steps (0 counts as 1).
pub(super) fn pass_due(last: Option<u64>, step: u64, every: u64) -> bool {
    last.is_none_or(|last| step >= last.saturating_add(every.max(1)))
}

impl<'a> Intake<'a> {
    /// The intake of step number `step`, of `layers` layers, which feeds `own_tokens` tokens
    /// of its own sequences, `prompt_tokens` of them prompts (or replays), the highest of them
    /// of `step_class`. A step that prefills prompts runs a smaller pass, or none
    /// ([`step_pass_budget`]).
    pub(super) fn new(
        desk: &'a mut Desk,
        tenants: Vec<Member>,
        step: u64,
        (layers, own_tokens, prompt_tokens): (usize, usize, usize),
        step_class: Option<ServiceClass>,
    ) -> Self {
        let budget = step_pass_budget(desk.config.max_batch_tokens, own_tokens, prompt_tokens);
        Self {
            desk,
            tenants,
            started: Vec::new(),
            step,
            budget,
            layer: 0,
            layers,
            step_class,
        }
    }

    /// The step's class when it holds work that can wait only (`flex`, `batch`) and a higher
    /// class waits: such a newcomer starts now, unrationed, at any layer, in a pass of up to
    /// `max_batch_tokens`, since the step's sequences are sold as served from what higher
    /// classes leave.
    fn yielding(&self) -> Option<ServiceClass> {
        let step = self.step_class.filter(|class| !class.interactive())?;
        let top = self.desk.waiting.top_class()?;
        (top < step).then_some(step)
    }

    /// The desk back, and the sequences started during the step.
    pub(super) fn finish(self) -> (&'a mut Desk, Vec<Sequence>) {
        (self.desk, self.started)
    }

    /// Called before each layer of the step: at an intake point, starts the newcomers waiting.
    /// Never fails the step.
    pub(super) fn between_layers(&mut self, model: &LlamaModel) -> Result<()> {
        let layer = self.layer;
        self.layer += 1;
        self.desk.receive_ready();
        // The common case, before every layer of every step: nothing waits.
        if self.desk.waiting.is_empty() {
            return Ok(());
        }
        if let Some(step_class) = self.yielding() {
            let fresh = self.admit(model, Some(step_class));
            if !fresh.is_empty() {
                self.start(model, fresh);
            }
            return Ok(());
        }
        if self.budget == 0
            || !intake_point(layer, self.layers, self.desk.config.interleave_passes)
            || !self.desk.pass_ready(self.step)
        {
            return Ok(());
        }
        let fresh = self.admit(model, None);
        if !fresh.is_empty() {
            self.desk.last_pass = Some(self.step);
            self.start(model, fresh);
        }
        Ok(())
    }

    /// Admits the newcomers that fit what is left of the step's budget, in fair order; when
    /// yielding a step of `yielding`'s class ([`Intake::yielding`]), those of a higher class
    /// that fit `max_batch_tokens`, whatever their tenants run of the step's class or lower.
    fn admit(&mut self, model: &LlamaModel, yielding: Option<ServiceClass>) -> Vec<Sequence> {
        let mut counted = self.tenants.clone();
        let mut fresh: Vec<Sequence> = Vec::new();
        let above = |class: ServiceClass| yielding.is_none_or(|step| class < step);
        let mut budget = match yielding {
            Some(_) => self.desk.config.max_batch_tokens,
            None => self.budget,
        };
        let running: Vec<Member> = self
            .tenants
            .iter()
            .filter(|m| above(m.2))
            .cloned()
            .collect();
        loop {
            let place = |tenant: &Tenant, sub: &Submission, prefill: usize| {
                let class = tenancy(&sub.request).2;
                // A closed one is dropped at the next step boundary.
                let here = !sub.reply.is_closed()
                    && above(class)
                    && starts_apart(&running, (tenant, class), prefill, budget);
                if here {
                    Place::Here
                } else {
                    Place::Later
                }
            };
            let Some(seq) = self.desk.admit_next(model, &counted, place) else {
                break;
            };
            budget = budget.saturating_sub(seq.prompt.len() - seq.prefilled);
            counted.push(seq.member());
            fresh.push(seq);
        }
        if yielding.is_none() {
            self.budget = budget;
        }
        fresh
    }

    /// Prefills `fresh` in one pass and sends their first tokens. When the pass fails, each
    /// is tried in a pass of its own (a failed pass leaves no trace in a cache), so a failure
    /// fails only the newcomer it comes from.
    fn start(&mut self, model: &LlamaModel, mut fresh: Vec<Sequence>) {
        match prefill(model, &mut fresh) {
            Ok(rows) => self.first_tokens(model, fresh, rows),
            Err(e) if fresh.len() == 1 => self.fail(fresh, &e),
            Err(e) => {
                tracing::warn!(error = %e, newcomers = fresh.len(), "a batched prefill failed; retrying each newcomer alone");
                for seq in fresh {
                    let mut one = vec![seq];
                    match prefill(model, &mut one) {
                        Ok(rows) => self.first_tokens(model, one, rows),
                        Err(e) => self.fail(one, &e),
                    }
                }
            }
        }
    }

    fn fail(&mut self, fresh: Vec<Sequence>, error: &Error) {
        tracing::error!(error = %error, "a newcomer's prefill failed; failing it");
        for seq in fresh {
            self.desk.retire(seq, Outcome::Failed(error.to_string()));
        }
    }

    /// Samples and sends each prefilled newcomer's first token from its logits `rows`.
    fn first_tokens(&mut self, model: &LlamaModel, fresh: Vec<Sequence>, rows: Vec<Vec<f32>>) {
        let desk = &mut *self.desk;
        let prefill_tokens: usize = fresh.iter().map(|s| s.prompt.len() - s.prefilled).sum();
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
        for (mut seq, mut row) in fresh.into_iter().zip(rows) {
            seq.prefilled = seq.prompt.len();
            seq.last_step = self.step;
            match seq.advance(&desk.tokenizer, context, &mut row) {
                Ok(Outcome::Continue) => {
                    self.tenants.push(seq.member());
                    self.started.push(seq);
                }
                Ok(outcome) => desk.retire(seq, outcome),
                Err(e) => desk.retire(seq, Outcome::Failed(e.to_string())),
            }
        }
    }
}

/// One forward pass over the newcomers' prompts; a row of logits for each.
fn prefill(model: &LlamaModel, fresh: &mut [Sequence]) -> Result<Vec<Vec<f32>>> {
    #[cfg(test)]
    if fresh
        .iter()
        .any(|s| &*s.tenant == super::tests::FAILING_TENANT)
    {
        return Err(Error::Weights(
            "injected failure of a newcomer's pass".into(),
        ));
    }
    let mut steps: Vec<SeqStep<'_>> = fresh
        .iter_mut()
        .map(|s| SeqStep {
            tokens: &s.prompt[s.prefilled..],
            cache: &mut s.cache,
            logits: 1,
            adapter: s.adapter.as_deref(),
        })
        .collect();
    let rows = model.forward(&mut steps)?;
    if rows.len() != fresh.len() {
        return Err(Error::Weights(
            "the forward pass returned fewer logit rows than requested".into(),
        ));
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interactive_newcomers_start_apart_beside_higher_classes_and_flex_does_not() {
        let (p, d, f, b) = (
            Tenant::from("p"),
            Tenant::from("d"),
            Tenant::from("f"),
            Tenant::from("b"),
        );
        let running: Vec<Member> = vec![
            (p.clone(), 1, ServiceClass::Priority),
            (f.clone(), 1, ServiceClass::Flex),
        ];
        let apart = |tenant: &Tenant, class| starts_apart(&running, (tenant, class), 30, 64);
        assert!(apart(&d, ServiceClass::Default));
        assert!(apart(&Tenant::from("p2"), ServiceClass::Priority));
        // Work that can wait joins a step while a higher class runs.
        assert!(!apart(&Tenant::from("f2"), ServiceClass::Flex));
        assert!(!apart(&b, ServiceClass::Batch));
        // Never a tenant with a sequence running, nor a prompt over the budget.
        assert!(!apart(&p, ServiceClass::Priority));
        assert!(!starts_apart(&running, (&d, ServiceClass::Default), 65, 64));
        // With only its own class and lower ones running, flex starts apart as before.
        let flex_only: Vec<Member> = vec![(f, 1, ServiceClass::Flex)];
        assert!(starts_apart(&flex_only, (&b, ServiceClass::Flex), 30, 64));
    }

    #[test]
    fn intake_points_are_evenly_spaced_layers() {
        let points = |layers: usize, passes: usize| -> Vec<usize> {
            (0..layers)
                .filter(|&l| intake_point(l, layers, passes))
                .collect()
        };
        assert_eq!(points(30, 4), [0, 8, 15, 23]);
        assert_eq!(points(30, 1), [0]);
        assert_eq!(points(30, 0), Vec::<usize>::new());
        assert_eq!(points(4, 9), [0, 1, 2, 3]);
    }

    #[test]
    fn a_pass_prefills_at_most_its_steps_own_tokens() {
        assert_eq!(pass_budget(512, 8), 64);
        assert_eq!(pass_budget(512, 200), 200);
        assert_eq!(pass_budget(512, 400), 112);
        assert_eq!(pass_budget(512, 600), 0);
    }

    #[test]
    fn a_step_that_prefills_prompts_runs_no_pass() {
        assert_eq!(step_pass_budget(512, 8, 0), 64);
        assert_eq!(step_pass_budget(512, 40, 0), 64);
        assert_eq!(step_pass_budget(512, 100, 0), 100);
        assert_eq!(step_pass_budget(512, 600, 0), 0);
        // Prefilling a short question or more: no pass.
        assert_eq!(step_pass_budget(512, 100, 64), 0);
        assert_eq!(step_pass_budget(512, 400, 300), 0);
        // Some prompt tokens: the pass gets what they leave of the floor.
        assert_eq!(step_pass_budget(512, 40, 32), 32);
    }

    /// 32 streams of one customer, one of them back with a prompt the prefix cache holds but
    /// its last token: that token must not cost a lone customer arriving meanwhile its pass
    /// (the two-tenant workload's B).
    #[test]
    fn a_cached_prompts_last_token_leaves_a_newcomer_its_pass() {
        assert_eq!(step_pass_budget(512, 33, 1), 63);
    }

    #[test]
    fn newcomers_are_left_to_a_pass_only_when_it_takes_them_all() {
        let budget = pass_budget(512, 8);
        assert!(pass_takes_all(30, budget));
        assert!(pass_takes_all(64, budget));
        // Three short questions of 30 tokens: two would fit, the third would wait a step.
        assert!(!pass_takes_all(90, budget));
    }

    #[test]
    fn passes_are_rationed_to_one_every_n_steps() {
        let due = |last, every| -> Vec<u64> {
            (1..=20)
                .filter(|&step| pass_due(last, step, every))
                .collect()
        };
        // None yet: any step may.
        assert_eq!(due(None, 8).len(), 20);
        // The last in step 3: the next in step 11 at the earliest, none in step 3 again.
        assert_eq!(due(Some(3), 8), (11..=20).collect::<Vec<_>>());
        // Every step may when `every` is 1 (or 0), but a step only once.
        assert_eq!(due(Some(3), 1), (4..=20).collect::<Vec<_>>());
        assert_eq!(due(Some(3), 0), (4..=20).collect::<Vec<_>>());
    }
}

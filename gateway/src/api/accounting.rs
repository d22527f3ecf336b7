//! The accounting guard: [`Completion`] settles one request exactly once, whether its answer
//! completed, failed, or the client went away (dropping the response drops the backend streams,
//! which cancels them): the settlement of its rate-limit and budget reservations and its usage
//! record, counted per choice ([`ChoiceTally`]) from the backends' own progress counters; then
//! its metrics, span and log ([`Completion::observe`]). Admission, which builds the guard, is in
//! [`super::admission`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::api::openai::{CompletionTokensDetails, CompletionUsage, PromptTokensDetails};
use crate::auth::Caller;
use crate::backend::{FinishReason, Usage, UsageSource};
use crate::concurrency::{RequestSlot, Slots};
use crate::AppState;
use tollgate_metering::kinds::{Endpoint, Outcome, ServiceTier};
use tollgate_metering::limits::{BudgetHold, TokenHold};
use tollgate_metering::money::{cached_part_nano_usd, cost_with_prediction_nano_usd};
use tollgate_metering::money::{rejected_prediction_part_nano_usd, Price, TierPrices};
use tollgate_metering::store::{now_micros, PredictionTokens, UsageRecord};
use tollgate_metering::tags::Tags;

/// What a request is billed as: set at admission, written on its record.
pub(super) struct Charge {
    pub request_id: String,
    pub model: String,
    pub endpoint: Endpoint,
    pub stream: bool,
    pub price: Price,
    /// The class of service it is asked to run and priced at.
    pub service_tier: ServiceTier,
    /// Tokens taken from the customer's reservation on the model (served at `reserved`), given
    /// back as far as unused when the request settles.
    pub reserved_tokens: Option<tollgate_metering::limits::Claim>,
    /// The model's prices per tier: an upstream that reports serving another tier the model
    /// is sold at is billed that tier's prices ([`Completion::billed_tier`]).
    pub prices: Option<TierPrices>,
    /// Cost-allocation tags for the record (request and key, merged).
    pub tags: Tags,
    /// A LoRA adapter's model id: its base model and the adapter's name.
    pub adapter: Option<(String, String)>,
}

/// What an admitted request holds until it ends (a stream outlives its handler); the slots
/// are only held, their drop frees them.
pub(super) struct Holds {
    pub tokens: Option<TokenHold>,
    pub budget: Option<BudgetHold>,
    /// The request's server span, to record the usage on; `Span::none()` when traces are off.
    pub server_span: tracing::Span,
    /// The customer's concurrency slots on this model.
    pub _slots: Option<Slots>,
    /// The request's place under its key's and customer's `max_concurrent_requests`.
    pub _request_slot: RequestSlot,
}

/// What one choice (one backend sequence) has produced, as its guard counts it.
pub(super) struct ChoiceTally {
    /// Prompt tokens as prepared (exact for local models, an upper bound for upstreams until
    /// they report usage).
    prompt: u32,
    /// Prompt tokens its backend reported when it finished.
    prompt_reported: Option<u32>,
    /// Tokens generated so far, as read from its stream.
    generated: u32,
    /// The backend's own count, ahead of what was read when a client goes away.
    progress: Option<Arc<AtomicUsize>>,
    /// Prompt tokens its backend served from its prefix cache, as reported when it finished.
    cached_reported: Option<u32>,
    /// The same, as its counter says (a client that went away).
    cached: Option<Arc<AtomicUsize>>,
    /// Where its counts came from, once it finished.
    source: Option<UsageSource>,
    /// The tier its backend said it served at, once it finished.
    served_tier: Option<ServiceTier>,
    /// Its prediction's tokens accepted and rejected, as reported when it finished (none
    /// for a client that went away: the engine counts them only at the end).
    prediction: (u32, u32),
}

impl ChoiceTally {
    /// A choice of `prompt` tokens (as prepared) not started yet, with the backend's counters
    /// of tokens produced and of prompt tokens served from a cache when it has them.
    pub(super) fn new(
        prompt: u32,
        progress: Option<Arc<AtomicUsize>>,
        cached: Option<Arc<AtomicUsize>>,
    ) -> Self {
        Self {
            prompt,
            prompt_reported: None,
            generated: 0,
            progress,
            cached_reported: None,
            cached,
            source: None,
            served_tier: None,
            prediction: (0, 0),
        }
    }

    /// Tokens produced: what was read, or the backend's counter when it is ahead.
    fn produced(&self) -> u32 {
        let counted = self
            .progress
            .as_ref()
            .map_or(0, |p| p.load(Ordering::Relaxed));
        self.generated
            .max(u32::try_from(counted).unwrap_or(u32::MAX))
    }

    /// Prompt tokens served from a prefix cache: as reported, else as its counter says.
    fn cached_tokens(&self) -> u32 {
        self.cached_reported.unwrap_or_else(|| {
            self.cached.as_ref().map_or(0, |c| {
                u32::try_from(c.load(Ordering::Relaxed)).unwrap_or(u32::MAX)
            })
        })
    }

    /// Where its counts came from: as its backend said once it finished; before that, the
    /// engine's counter if it has one, else what the gateway counted streaming by.
    fn source(&self) -> UsageSource {
        match (self.source, &self.progress) {
            (Some(s), _) => s,
            (None, Some(_)) => UsageSource::Engine,
            (None, None) => UsageSource::Observed,
        }
    }
}

/// Prompt tokens of the choices of one prompt, counted once: as one of their backends reported
/// them, else as prepared.
fn prompt_of(group: &[ChoiceTally]) -> u32 {
    group
        .iter()
        .find_map(|c| c.prompt_reported)
        .unwrap_or_else(|| group.first().map_or(0, |c| c.prompt))
}

/// Accounts one request exactly once, whether it completed, failed, or the client went away
/// (dropping the response drops the backend streams, which cancels them): the settlement of its
/// rate-limit and budget reservations and its usage record, then its metrics, span and log.
pub(crate) struct Completion {
    state: AppState,
    caller: Caller,
    charge: Charge,
    holds: Holds,
    started: Instant,
    started_at: i64,
    first_token: Option<Instant>,
    /// When the backend started the first of its sequences (a local engine admitted it).
    admitted: Option<Instant>,
    /// One per choice, `per_prompt` of them per distinct prompt.
    choices: Vec<ChoiceTally>,
    /// Choices per distinct prompt (`n`): a prompt is counted once for its `n` choices.
    per_prompt: usize,
    finish: Option<FinishReason>,
    outcome: Outcome,
    /// The record was written (or the request never reached a model).
    settled: bool,
    /// The gateway's own time on this request so far (see `tollgate_gateway_overhead_seconds`).
    overhead: Duration,
}

impl Completion {
    /// The guard of a request admitted with `holds`: its `choices`, `per_prompt` of them per
    /// distinct prompt. The request's clock starts now; it ends `cancelled` unless committed.
    pub(super) fn new(
        state: &AppState,
        caller: Caller,
        charge: Charge,
        holds: Holds,
        choices: Vec<ChoiceTally>,
        per_prompt: usize,
    ) -> Self {
        Self {
            state: state.clone(),
            caller,
            charge,
            holds,
            started: Instant::now(),
            started_at: now_micros(),
            first_token: None,
            admitted: None,
            choices,
            per_prompt,
            finish: None,
            outcome: Outcome::Cancelled,
            settled: false,
            overhead: Duration::ZERO,
        }
    }

    /// Adds to the gateway's own time on this request (see `tollgate_gateway_overhead_seconds`).
    pub(super) fn add_overhead(&mut self, took: Duration) {
        self.overhead += took;
    }

    pub(crate) fn completion_tokens(&self) -> u32 {
        self.choices.iter().map(ChoiceTally::produced).sum()
    }

    /// The choices of each distinct prompt.
    fn prompts(&self) -> std::slice::Chunks<'_, ChoiceTally> {
        self.choices.chunks(self.per_prompt.max(1))
    }

    /// Prompt tokens, once per distinct prompt: as the backend reported them, else as prepared.
    pub(crate) fn prompt_tokens(&self) -> u32 {
        self.prompts().map(prompt_of).sum()
    }

    /// Prompt tokens served from a prefix cache, once per distinct prompt: the fewest any of
    /// its choices reports (never more than the prompt), so no choice's discount is assumed
    /// for another.
    pub(crate) fn cached_tokens(&self) -> u32 {
        self.prompts()
            .map(|group| {
                let fewest = group.iter().map(ChoiceTally::cached_tokens).min();
                fewest.unwrap_or(0).min(prompt_of(group))
            })
            .sum()
    }

    /// Where the counts came from, the least trusted of any choice.
    fn usage_source(&self) -> UsageSource {
        self.choices
            .iter()
            .map(ChoiceTally::source)
            .max()
            .unwrap_or_default()
    }

    /// The reason the record and the span carry: `cancelled` for a client that went away,
    /// else the first choice's (or the first to finish).
    fn finish_reason(&self) -> Option<FinishReason> {
        match self.outcome {
            Outcome::Cancelled => Some(FinishReason::Cancelled),
            _ => self.finish,
        }
    }

    fn finish(&mut self, outcome: Outcome) {
        self.outcome = outcome;
    }

    /// A sequence started (`GenerateEvent::Started`): the end of its queue wait.
    pub(crate) fn on_started(&mut self) {
        self.admitted.get_or_insert_with(Instant::now);
    }

    pub(crate) fn on_delta(&mut self, choice: usize, completion_tokens: u32) {
        self.first_token.get_or_insert_with(Instant::now);
        if let Some(c) = self.choices.get_mut(choice) {
            c.generated = c.generated.max(completion_tokens);
        }
    }

    pub(crate) fn on_finished(&mut self, choice: usize, reason: FinishReason, usage: Usage) {
        if let Some(c) = self.choices.get_mut(choice) {
            // Never below what was seen streaming by.
            c.generated = c.generated.max(usage.completion_tokens);
            c.prompt_reported = Some(usage.prompt_tokens);
            c.cached_reported = Some(usage.cached_tokens);
            c.source = Some(usage.source);
            c.served_tier = usage.service_tier;
            c.prediction = (
                usage.accepted_prediction_tokens,
                usage.rejected_prediction_tokens,
            );
        }
        if choice == 0 || self.finish.is_none() {
            self.finish = Some(reason);
        }
    }

    /// The prediction tokens of every choice, accepted and rejected.
    fn prediction_tokens(&self) -> (u64, u64) {
        self.choices.iter().fold((0, 0), |(a, r), c| {
            (a + u64::from(c.prediction.0), r + u64::from(c.prediction.1))
        })
    }

    /// `usage` as the client sees it: the same counts the record holds.
    pub(crate) fn usage(&self) -> CompletionUsage {
        let p = u64::from(self.prompt_tokens());
        let c = u64::from(self.completion_tokens());
        let (accepted, rejected) = self.prediction_tokens();
        CompletionUsage {
            prompt_tokens: p,
            completion_tokens: c,
            total_tokens: p + c,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: u64::from(self.cached_tokens()).min(p),
            },
            completion_tokens_details: CompletionTokensDetails {
                accepted_prediction_tokens: accepted,
                rejected_prediction_tokens: rejected,
            },
        }
    }

    /// Settles the reservations and builds the usage record, once.
    fn settle(&mut self) -> Option<UsageRecord> {
        if self.settled {
            return None;
        }
        self.settled = true;
        // A request that lost its Idempotency-Key to another is not charged: that one is.
        if self.outcome.is_charged() && self.caller.idempotency.as_ref().is_some_and(|t| t.lost()) {
            self.outcome = Outcome::Superseded;
        }
        let input = u64::from(self.prompt_tokens());
        let cached = u64::from(self.cached_tokens()).min(input);
        let output = u64::from(self.completion_tokens());
        let (accepted, rejected) = self.prediction_tokens();
        let (service_tier, price) = self.billed_tier();
        let price = &price;
        // Failures are on us: recorded, never charged.
        let (cost, cached_cost, rejected_cost) = if self.outcome.is_charged() {
            (
                cost_with_prediction_nano_usd(price, (input, cached, output), rejected),
                cached_part_nano_usd(price, input, cached),
                rejected_prediction_part_nano_usd(price, rejected),
            )
        } else {
            (0, 0, 0)
        };
        let limiter = &self.state.limiter;
        if let Some(hold) = &self.holds.tokens {
            limiter.settle_tokens(hold, signed(input + output));
        }
        self.settle_reservation(signed(input + output));
        limiter.settle_spend(
            self.holds.budget.as_ref(),
            &self.caller.customer_id,
            &self.caller.key_id,
            self.started_at,
            cost,
        );
        if let Some(ticket) = &self.caller.idempotency {
            ticket.settled(self.outcome);
        }
        self.state.ledger.as_ref()?;
        Some(UsageRecord {
            id: self.charge.request_id.clone(),
            customer_id: self.caller.customer_id.clone(),
            key_id: self.caller.key_id.clone(),
            model: self.charge.model.clone(),
            endpoint: self.charge.endpoint,
            stream: self.charge.stream,
            status: self.outcome,
            finish_reason: self.finish_reason(),
            input_tokens: signed(input),
            output_tokens: signed(output),
            started_at: self.started_at,
            finished_at: now_micros(),
            ttft_ms: self
                .first_token
                .map(|f| i64::try_from((f - self.started).as_millis()).unwrap_or(i64::MAX)),
            input_price_per_mtok: price.input_per_mtok,
            output_price_per_mtok: price.output_per_mtok,
            cost_nano_usd: cost,
            cached_input_tokens: signed(cached),
            cached_input_price_per_mtok: Some(price.cached_input_per_mtok),
            cached_cost_nano_usd: cached_cost,
            usage_source: Some(self.usage_source()),
            tags: std::mem::take(&mut self.charge.tags),
            idempotency_key: self.caller.idempotency.as_ref().map(|t| t.key.clone()),
            service_tier,
            prediction: PredictionTokens {
                accepted: signed(accepted),
                rejected: signed(rejected),
                price_per_mtok: Some(price.rejected_prediction_per_mtok),
                cost_nano_usd: rejected_cost,
            },
            batch_id: self.caller.batch_id.clone(),
            base_model: self.charge.adapter.as_ref().map(|(base, _)| base.clone()),
            adapter: self.charge.adapter.as_ref().map(|(_, name)| name.clone()),
        })
    }

    /// The tier the record bills and its prices ([`billed`]).
    pub(crate) fn billed_tier(&self) -> (ServiceTier, Price) {
        let reported = self.choices.iter().find_map(|c| c.served_tier);
        billed(
            (self.charge.service_tier, self.charge.price),
            reported,
            self.charge.prices,
        )
    }

    /// Writes the record durably before the client sees the end of the response.
    pub(crate) async fn commit(&mut self, outcome: Outcome) {
        self.finish(outcome);
        // Charged only while it still holds its Idempotency-Key (the lease is renewed here).
        if let Some(ticket) = self.caller.idempotency.clone() {
            if self.outcome.is_charged() && !ticket.still_held().await {
                self.outcome = Outcome::Superseded;
            }
        }
        if let Some(record) = self.settle() {
            if let Some(ledger) = &self.state.ledger {
                let t = Instant::now();
                ledger.record(record).await;
                let took = t.elapsed();
                self.overhead += took;
                self.state
                    .metrics
                    .metering_duration
                    .with_label_values(&["record"])
                    .observe(took.as_secs_f64());
            }
        }
    }

    /// The request never reached a model (it could not be started): give the reservations
    /// back and write no record.
    pub(crate) fn abandon(&mut self) {
        self.settled = true;
        self.settle_reservation(0);
        if let Some(hold) = &self.holds.tokens {
            self.state.limiter.settle_tokens(hold, 0);
        }
        if let Some(hold) = &self.holds.budget {
            self.state.limiter.release_budget(hold);
        }
    }

    /// Gives back what the request took of its customer's reservation but did not use.
    fn settle_reservation(&self, used: i64) {
        if let Some(claim) = self.charge.reserved_tokens {
            self.state.reservations.release(
                &self.caller.customer_id,
                &self.charge.model,
                claim,
                used,
                now_micros(),
            );
        }
    }

    /// What the request's end shows outside the ledger: the model's token and latency
    /// metrics, the usage and finish reason on the request's span, and the log line.
    ///
    /// Called from `Drop`, once, after the record is settled, rather than from `commit`: the
    /// drop is the one point every request reaches exactly once (a client that goes away
    /// never reaches `commit`), and it is the end of the response (a stream is dropped after
    /// its last event was read), so the span ends and the per-token timing stops there, as
    /// the client saw them, whichever way the request ended.
    fn observe(&self) {
        let m = &self.state.metrics;
        let model = [self.charge.model.as_str()];
        let prompt_tokens = self.prompt_tokens();
        let completion_tokens = self.completion_tokens();
        m.gateway_overhead
            .with_label_values(&model)
            .observe(self.overhead.as_secs_f64());
        self.end_span(prompt_tokens, completion_tokens);
        m.input_tokens
            .with_label_values(&model)
            .inc_by(f64::from(prompt_tokens));
        m.output_tokens
            .with_label_values(&model)
            .inc_by(f64::from(completion_tokens));
        let tier = [self.charge.model.as_str(), self.billed_tier().0.as_str()];
        if let Some(admitted) = self.admitted.or(self.first_token) {
            m.tiers
                .queue_wait
                .with_label_values(&tier)
                .observe((admitted - self.started).as_secs_f64());
        }
        if let Some(first) = self.first_token {
            let ttft = (first - self.started).as_secs_f64();
            m.time_to_first_token
                .with_label_values(&model)
                .observe(ttft);
            m.tiers
                .time_to_first_token
                .with_label_values(&tier)
                .observe(ttft);
            if completion_tokens > 1 {
                let per = first.elapsed().as_secs_f64() / f64::from(completion_tokens - 1);
                m.time_per_output_token
                    .with_label_values(&model)
                    .observe(per);
                m.tiers
                    .inter_token_latency
                    .with_label_values(&tier)
                    .observe(per);
            }
        }
        // At debug: a line per request costs the gateway a formatted write to stderr each
        // (a measured share of its CPU per request), and the ledger holds the same facts.
        tracing::debug!(
            request_id = %self.charge.request_id,
            customer_id = %self.caller.customer_id,
            model = %self.charge.model,
            outcome = self.outcome.as_str(),
            prompt_tokens,
            completion_tokens,
            ttft_ms = self.first_token.map(|f| millis(f - self.started)),
            duration_ms = millis(self.started.elapsed()),
            "completion finished"
        );
    }

    /// Records the usage and the finish reason on the request's server span (when traces are
    /// exported).
    fn end_span(&self, prompt_tokens: u32, completion_tokens: u32) {
        let span = &self.holds.server_span;
        if span.is_none() {
            return;
        }
        // An exported span ends when it was last exited: a stream is read after its handler
        // returned, so the request's span is entered once more now that it ends.
        let _end = span.enter();
        // As i64: OpenTelemetry's integer attributes are signed.
        span.record("gen_ai.usage.input_tokens", i64::from(prompt_tokens));
        span.record("gen_ai.usage.output_tokens", i64::from(completion_tokens));
        let reason = self.finish_reason().map_or("error", FinishReason::as_str);
        // An array of strings, as the GenAI conventions define it (tracing fields are
        // scalars, so it is set on the OpenTelemetry span directly).
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        span.set_attribute(
            "gen_ai.response.finish_reasons",
            opentelemetry::Value::Array(opentelemetry::Array::String(vec![reason.into()])),
        );
    }
}

/// A count as the ledger's signed columns hold it (saturating; no request comes near).
fn signed(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The guard's one duty on drop: the request is settled and its record written, exactly once
/// (`settle` is a no-op after `commit` or `abandon`); then it is observed.
impl Drop for Completion {
    fn drop(&mut self) {
        if let Some(record) = self.settle() {
            if let Some(ledger) = &self.state.ledger {
                ledger.record_nowait(record);
            }
        }
        self.observe();
    }
}

/// The tier a request is billed at and its prices, from the tier `asked` (with its price), the
/// tier its backend `reported` serving (an upstream's `service_tier`) and the model's `prices`:
/// the reported tier when the model is sold at it, else the tier asked. A record never bills a
/// tier at another tier's price, and a backend that reports nothing is billed what it was asked.
/// Only this gateway grants a reservation: a request it admitted within one stays `reserved`
/// whatever its backend says, and a backend's report of `reserved` (not billed per token) is
/// never believed. A batch line is billed at the batch price, the Batch API's contract,
/// whatever tier its upstream served it at (it was asked for `flex`, OpenAI's nearest).
fn billed(
    asked: (ServiceTier, Price),
    reported: Option<ServiceTier>,
    prices: Option<TierPrices>,
) -> (ServiceTier, Price) {
    match (reported, prices) {
        _ if matches!(asked.0, ServiceTier::Reserved | ServiceTier::Batch) => asked,
        (Some(ServiceTier::Reserved), _) => asked,
        (Some(tier), Some(prices)) => prices.get(tier).map_or(asked, |price| (tier, price)),
        _ => asked,
    }
}

/// Whole milliseconds of `d`, for the logs (saturating; no request lasts 2^64 ms).
fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;

//! The accounting guard: [`Completion`] settles one request exactly once, whether its answer
//! completed, failed, or the client went away (dropping the response drops the backend streams,
//! which cancels them): metrics, the settlement of its rate-limit and budget reservations, and
//! its usage record, counted from the backends' own progress counters. Admission, which builds
//! the guard, is in [`super::admission`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::auth::Caller;
use crate::backend::{FinishReason, Usage, UsageSource};
use crate::openapi::schemas::{CompletionUsage, PromptTokensDetails};
use crate::AppState;
use tollgate_metering::kinds::{Endpoint, Outcome};
use tollgate_metering::limits::{BudgetHold, TokenHold};
use tollgate_metering::money::Price;
use tollgate_metering::money::{cached_part_nano_usd, cost_with_cached_nano_usd};
use tollgate_metering::store::{now_micros, UsageRecord};
use tollgate_metering::tags::Tags;

/// Accounts one request exactly once, whether it completed, failed, or the client went away
/// (dropping the response drops the backend streams, which cancels them): metrics, the
/// settlement of its rate-limit and budget reservations, and its usage record.
pub(crate) struct Completion {
    pub(super) state: AppState,
    pub(super) caller: Caller,
    pub(super) model: String,
    pub(super) endpoint: Endpoint,
    pub(super) stream: bool,
    pub(super) price: Price,
    pub(super) request_id: String,
    pub(super) started: Instant,
    pub(super) started_at: i64,
    pub(super) first_token: Option<Instant>,
    /// Prompt tokens of each choice as prepared (exact for local models, an upper bound for
    /// upstreams until they report usage).
    pub(super) prompts: Vec<u32>,
    /// Prompt tokens each choice's backend reported when it finished.
    pub(super) prompts_reported: Vec<Option<u32>>,
    /// Choices per distinct prompt (`n`): a prompt is counted once for its `n` choices.
    pub(super) per_prompt: usize,
    /// Tokens generated so far, per choice, as read from the streams.
    pub(super) generated: Vec<u32>,
    /// The backends' own counts, ahead of what was read when a client goes away.
    pub(super) progress: Vec<Option<Arc<AtomicUsize>>>,
    /// Prompt tokens each choice's backend served from its prefix cache: as reported when it
    /// finished, else as its counter says (a client that went away).
    pub(super) cached_reported: Vec<Option<u32>>,
    pub(super) cached: Vec<Option<Arc<AtomicUsize>>>,
    /// Where each finished choice's counts came from.
    pub(super) sources: Vec<Option<UsageSource>>,
    /// Cost-allocation tags for the record (request and key, merged).
    pub(super) tags: Tags,
    pub(super) finish: Option<FinishReason>,
    pub(super) outcome: Outcome,
    pub(super) tokens_hold: Option<TokenHold>,
    pub(super) budget_hold: Option<BudgetHold>,
    /// The record was written (or the request never reached a model).
    pub(super) settled: bool,
    /// The gateway's own time on this request so far (see `tollgate_gateway_overhead_seconds`).
    pub(super) overhead: Duration,
    /// The request's server span, held until the request ends (a stream outlives its
    /// handler), to record the usage on; `Span::none()` when traces are off.
    pub(super) server_span: tracing::Span,
    /// The customer's concurrency slots on this model, held until the request ends.
    pub(super) _slots: Option<crate::concurrency::Slots>,
    /// The request's place under its key's and customer's `max_concurrent_requests`.
    pub(super) _request_slot: crate::concurrency::RequestSlot,
}

impl Completion {
    pub(crate) fn completion_tokens(&self) -> u32 {
        self.generated
            .iter()
            .zip(&self.progress)
            .map(|(&read, p)| {
                let produced = p.as_ref().map_or(0, |p| p.load(Ordering::Relaxed));
                read.max(u32::try_from(produced).unwrap_or(u32::MAX))
            })
            .sum()
    }

    /// Prompt tokens, once per distinct prompt: as the backend reported them, else as prepared.
    pub(crate) fn prompt_tokens(&self) -> u32 {
        self.prompts
            .chunks(self.per_prompt.max(1))
            .zip(self.prompts_reported.chunks(self.per_prompt.max(1)))
            .map(|(prepared, reported)| {
                reported
                    .iter()
                    .flatten()
                    .next()
                    .copied()
                    .unwrap_or(prepared[0])
            })
            .sum()
    }

    /// Prompt tokens served from a prefix cache, once per distinct prompt: the fewest any of
    /// its choices reports (never more than the prompt), so no choice's discount is assumed
    /// for another.
    pub(crate) fn cached_tokens(&self) -> u32 {
        let per = self.per_prompt.max(1);
        let cached: Vec<u32> = self
            .cached_reported
            .iter()
            .zip(&self.cached)
            .map(|(reported, counter)| {
                reported.unwrap_or_else(|| {
                    counter.as_ref().map_or(0, |c| {
                        u32::try_from(c.load(Ordering::Relaxed)).unwrap_or(u32::MAX)
                    })
                })
            })
            .collect();
        let prompts = self
            .prompts
            .chunks(per)
            .zip(self.prompts_reported.chunks(per));
        cached
            .chunks(per)
            .zip(prompts)
            .map(|(group, (prepared, reported))| {
                let prompt = reported
                    .iter()
                    .flatten()
                    .next()
                    .copied()
                    .unwrap_or(prepared[0]);
                group.iter().copied().min().unwrap_or(0).min(prompt)
            })
            .sum()
    }

    /// Where the counts came from, the least trusted of any choice: as a finished choice's
    /// backend said; for one that did not finish, the engine's counter if it has one, else
    /// what the gateway counted streaming by.
    fn usage_source(&self) -> UsageSource {
        self.sources
            .iter()
            .zip(&self.progress)
            .map(|(source, progress)| match (source, progress) {
                (Some(s), _) => *s,
                (None, Some(_)) => UsageSource::Engine,
                (None, None) => UsageSource::Observed,
            })
            .max()
            .unwrap_or_default()
    }

    fn finish(&mut self, outcome: Outcome) {
        self.outcome = outcome;
    }

    pub(crate) fn on_delta(&mut self, choice: usize, completion_tokens: u32) {
        self.first_token.get_or_insert_with(Instant::now);
        self.generated[choice] = self.generated[choice].max(completion_tokens);
    }

    pub(crate) fn on_finished(&mut self, choice: usize, reason: FinishReason, usage: Usage) {
        // Never below what was seen streaming by.
        self.generated[choice] = self.generated[choice].max(usage.completion_tokens);
        self.prompts_reported[choice] = Some(usage.prompt_tokens);
        self.cached_reported[choice] = Some(usage.cached_tokens);
        self.sources[choice] = Some(usage.source);
        if choice == 0 || self.finish.is_none() {
            self.finish = Some(reason);
        }
    }

    /// `usage` as the client sees it: the same counts the record holds.
    pub(crate) fn usage(&self) -> CompletionUsage {
        let p = u64::from(self.prompt_tokens());
        let c = u64::from(self.completion_tokens());
        CompletionUsage {
            prompt_tokens: p,
            completion_tokens: c,
            total_tokens: p + c,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: u64::from(self.cached_tokens()).min(p),
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
        // Failures are on us: recorded, never charged.
        let (cost, cached_cost) = if self.outcome.is_charged() {
            (
                cost_with_cached_nano_usd(&self.price, input, cached, output),
                cached_part_nano_usd(&self.price, input, cached),
            )
        } else {
            (0, 0)
        };
        let limiter = &self.state.limiter;
        if let Some(hold) = &self.tokens_hold {
            limiter.settle_tokens(hold, signed(input + output));
        }
        limiter.settle_spend(
            self.budget_hold.as_ref(),
            &self.caller.customer_id,
            &self.caller.key_id,
            self.started_at,
            cost,
        );
        if let Some(ticket) = &self.caller.idempotency {
            ticket.settled(self.outcome);
        }
        self.state.ledger.as_ref()?;
        let finish_reason = match self.outcome {
            Outcome::Cancelled => Some(Outcome::Cancelled.to_string()),
            _ => self.finish.map(|f| f.as_str().to_string()),
        };
        Some(UsageRecord {
            id: self.request_id.clone(),
            customer_id: self.caller.customer_id.clone(),
            key_id: self.caller.key_id.clone(),
            model: self.model.clone(),
            endpoint: self.endpoint,
            stream: self.stream,
            status: self.outcome,
            finish_reason,
            input_tokens: signed(input),
            output_tokens: signed(output),
            started_at: self.started_at,
            finished_at: now_micros(),
            ttft_ms: self
                .first_token
                .map(|f| i64::try_from((f - self.started).as_millis()).unwrap_or(i64::MAX)),
            input_price_per_mtok: self.price.input_per_mtok.to_string(),
            output_price_per_mtok: self.price.output_per_mtok.to_string(),
            cost_nano_usd: cost,
            cached_input_tokens: signed(cached),
            cached_input_price_per_mtok: Some(self.price.cached_input_per_mtok.to_string()),
            cached_cost_nano_usd: cached_cost,
            usage_source: Some(self.usage_source()),
            tags: std::mem::take(&mut self.tags),
            idempotency_key: self.caller.idempotency.as_ref().map(|t| t.key.clone()),
        })
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
        if let Some(hold) = &self.tokens_hold {
            self.state.limiter.settle_tokens(hold, 0);
        }
        if let Some(hold) = &self.budget_hold {
            self.state.limiter.release_budget(hold);
        }
    }
}

/// A count as the ledger's signed columns hold it (saturating; no request comes near).
fn signed(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Drop for Completion {
    fn drop(&mut self) {
        if let Some(record) = self.settle() {
            if let Some(ledger) = &self.state.ledger {
                ledger.record_nowait(record);
            }
        }
        let m = &self.state.metrics;
        let model = [self.model.as_str()];
        let completion_tokens = self.completion_tokens();
        m.gateway_overhead
            .with_label_values(&model)
            .observe(self.overhead.as_secs_f64());
        if !self.server_span.is_none() {
            let span = &self.server_span;
            // An exported span ends when it was last exited: a stream is read after its
            // handler returned, so the request's span is entered once more now that it ends.
            let _end = span.enter();
            // As i64: OpenTelemetry's integer attributes are signed.
            span.record("gen_ai.usage.input_tokens", i64::from(self.prompt_tokens()));
            span.record("gen_ai.usage.output_tokens", i64::from(completion_tokens));
            let reason = match self.outcome {
                Outcome::Cancelled => Outcome::Cancelled.as_str(),
                _ => self.finish.map_or("error", |f| f.as_str()),
            };
            // An array of strings, as the GenAI conventions define it (tracing fields are
            // scalars, so it is set on the OpenTelemetry span directly).
            use tracing_opentelemetry::OpenTelemetrySpanExt;
            span.set_attribute(
                "gen_ai.response.finish_reasons",
                opentelemetry::Value::Array(opentelemetry::Array::String(vec![reason.into()])),
            );
        }
        m.input_tokens
            .with_label_values(&model)
            .inc_by(f64::from(self.prompt_tokens()));
        m.output_tokens
            .with_label_values(&model)
            .inc_by(f64::from(completion_tokens));
        if let Some(first) = self.first_token {
            m.time_to_first_token
                .with_label_values(&model)
                .observe((first - self.started).as_secs_f64());
            if completion_tokens > 1 {
                let per = first.elapsed().as_secs_f64() / f64::from(completion_tokens - 1);
                m.time_per_output_token
                    .with_label_values(&model)
                    .observe(per);
            }
        }
        tracing::info!(
            request_id = %self.request_id,
            customer_id = %self.caller.customer_id,
            model = %self.model,
            outcome = self.outcome.as_str(),
            prompt_tokens = self.prompt_tokens(),
            completion_tokens,
            ttft_ms = self.first_token.map(|f| (f - self.started).as_millis() as u64),
            duration_ms = self.started.elapsed().as_millis() as u64,
            "completion finished"
        );
    }
}

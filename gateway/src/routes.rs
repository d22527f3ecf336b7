//! The OpenAI endpoints: chat completions and completions (streamed or not), models, health
//! and metrics.
//!
//! A request fans out to one backend sequence per choice. Its outcome is accounted by a
//! [`Completion`] guard that fires exactly once, whether the answer completed, failed, or the
//! client went away (dropping the response drops the backend streams, which cancels them).

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures::stream::{select_all, StreamExt};
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::backend::{
    Backend, EventStream, FinishReason, GenerateEvent, LogprobEntry, Usage, UsageSource,
};
use crate::error::{ApiError, ApiJson};
use crate::openai::{ChatRequest, CompletionRequest, Plan};
use crate::{AppState, ModelLabel, RequestId};
use tollgate_metering::limits::{BudgetHold, TokenHold};
use tollgate_metering::money::Price;
use tollgate_metering::money::{
    cached_part_nano_usd, cost_with_cached_nano_usd, max_cost_nano_usd,
};
use tollgate_metering::store::{now_micros, UsageRecord};
use tollgate_metering::tags::Tags;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Text,
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Accounts one request exactly once, whether it completed, failed, or the client went away
/// (dropping the response drops the backend streams, which cancels them): metrics, the
/// settlement of its rate-limit and budget reservations, and its usage record.
pub(crate) struct Completion {
    state: AppState,
    caller: Caller,
    model: String,
    endpoint: &'static str,
    stream: bool,
    price: Price,
    request_id: String,
    started: Instant,
    started_at: i64,
    first_token: Option<Instant>,
    /// Prompt tokens of each choice as prepared (exact for local models, an upper bound for
    /// upstreams until they report usage).
    prompts: Vec<u32>,
    /// Prompt tokens each choice's backend reported when it finished.
    prompts_reported: Vec<Option<u32>>,
    /// Choices per distinct prompt (`n`): a prompt is counted once for its `n` choices.
    per_prompt: usize,
    /// Tokens generated so far, per choice, as read from the streams.
    generated: Vec<u32>,
    /// The backends' own counts, ahead of what was read when a client goes away.
    progress: Vec<Option<Arc<AtomicUsize>>>,
    /// Prompt tokens each choice's backend served from its prefix cache: as reported when it
    /// finished, else as its counter says (a client that went away).
    cached_reported: Vec<Option<u32>>,
    cached: Vec<Option<Arc<AtomicUsize>>>,
    /// Where each finished choice's counts came from.
    sources: Vec<Option<UsageSource>>,
    /// Cost-allocation tags for the record (request and key, merged).
    tags: Tags,
    finish: Option<FinishReason>,
    outcome: &'static str,
    tokens_hold: Option<TokenHold>,
    budget_hold: Option<BudgetHold>,
    /// The record was written (or the request never reached a model).
    settled: bool,
    /// The gateway's own time on this request so far (see `tollgate_gateway_overhead_seconds`).
    overhead: Duration,
    /// The request's server span, held until the request ends (a stream outlives its
    /// handler), to record the usage on; `Span::none()` when traces are off.
    server_span: tracing::Span,
    /// The customer's concurrency slots on this model, held until the request ends.
    _slots: Option<crate::concurrency::Slots>,
    /// The request's place under its key's and customer's `max_concurrent_requests`.
    _request_slot: crate::concurrency::RequestSlot,
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

    fn finish(&mut self, outcome: &'static str) {
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
    fn usage_json(&self) -> Value {
        let p = self.prompt_tokens();
        let c = self.completion_tokens();
        json!({
            "prompt_tokens": p,
            "completion_tokens": c,
            "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens().min(p)},
        })
    }

    /// Settles the reservations and builds the usage record, once.
    fn settle(&mut self) -> Option<UsageRecord> {
        if self.settled {
            return None;
        }
        self.settled = true;
        let input = u64::from(self.prompt_tokens());
        let cached = u64::from(self.cached_tokens()).min(input);
        let output = u64::from(self.completion_tokens());
        // Failures are on us: recorded, never charged.
        let (cost, cached_cost) = if self.outcome == "failed" {
            (0, 0)
        } else {
            (
                cost_with_cached_nano_usd(&self.price, input, cached, output),
                cached_part_nano_usd(&self.price, input, cached),
            )
        };
        let limiter = &self.state.limiter;
        if let Some(hold) = &self.tokens_hold {
            limiter.settle_tokens(hold, (input + output) as i64);
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
            "cancelled" => Some("cancelled".to_string()),
            _ => self.finish.map(|f| f.as_str().to_string()),
        };
        Some(UsageRecord {
            id: self.request_id.clone(),
            customer_id: self.caller.customer_id.clone(),
            key_id: self.caller.key_id.clone(),
            model: self.model.clone(),
            endpoint: self.endpoint.to_string(),
            stream: self.stream,
            status: self.outcome.to_string(),
            finish_reason,
            input_tokens: input as i64,
            output_tokens: output as i64,
            started_at: self.started_at,
            finished_at: now_micros(),
            ttft_ms: self
                .first_token
                .map(|f| (f - self.started).as_millis() as i64),
            input_price_per_mtok: self.price.input_per_mtok.to_string(),
            output_price_per_mtok: self.price.output_per_mtok.to_string(),
            cost_nano_usd: cost,
            cached_input_tokens: cached as i64,
            cached_input_price_per_mtok: Some(self.price.cached_input_per_mtok.to_string()),
            cached_cost_nano_usd: cached_cost,
            usage_source: Some(self.usage_source().as_str().to_string()),
            tags: std::mem::take(&mut self.tags),
            idempotency_key: self.caller.idempotency.as_ref().map(|t| t.key.clone()),
        })
    }

    /// Writes the record durably before the client sees the end of the response.
    pub(crate) async fn commit(&mut self, outcome: &'static str) {
        self.finish(outcome);
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
    fn abandon(&mut self) {
        self.settled = true;
        if let Some(hold) = &self.tokens_hold {
            self.state.limiter.settle_tokens(hold, 0);
        }
        if let Some(hold) = &self.budget_hold {
            self.state.limiter.release_budget(hold);
        }
    }
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
                "cancelled" => "cancelled",
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
            outcome = self.outcome,
            prompt_tokens = self.prompt_tokens(),
            completion_tokens,
            ttft_ms = self.first_token.map(|f| (f - self.started).as_millis() as u64),
            duration_ms = self.started.elapsed().as_millis() as u64,
            "completion finished"
        );
    }
}

pub(crate) fn backend_for(state: &AppState, model: &str) -> Result<Arc<dyn Backend>, ApiError> {
    state
        .backends
        .get(model)
        .cloned()
        .ok_or_else(|| ApiError::ModelNotFound(model.to_string()))
}

pub async fn chat_completions(
    State(state): State<AppState>,
    Extension(id): Extension<RequestId>,
    Extension(caller): Extension<Caller>,
    ApiJson(request): ApiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    let tags = request.common.tags()?;
    let plan = request.plan(&id.0, state.config.server.max_n)?;
    respond_tagged(state, id, caller, plan, Kind::Chat, tags).await
}

pub async fn completions(
    State(state): State<AppState>,
    Extension(id): Extension<RequestId>,
    Extension(caller): Extension<Caller>,
    ApiJson(request): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let tags = request.common.tags()?;
    let plan = request.plan(&id.0, state.config.server.max_n)?;
    respond_tagged(state, id, caller, plan, Kind::Text, tags).await
}

/// Admission: key may use the model, request rate, then (with real token counts) the token
/// rate and the budget, each reserved for the request's maximum.
async fn admit(
    state: &AppState,
    request_id: &str,
    caller: &Caller,
    prompt_tokens: u32,
    max_output: u64,
    price: &Price,
) -> Result<(Option<TokenHold>, Option<BudgetHold>), ApiError> {
    let limiter = &state.limiter;
    let tokens = limiter
        .reserve_tokens(&caller.limits, i64::from(prompt_tokens) + max_output as i64)
        .await?;
    let budget = match (caller.budget_nano_usd, caller.key_budget_nano_usd) {
        (None, None) => None,
        (customer_budget, key_budget) => {
            let max_cost = max_cost_nano_usd(price, u64::from(prompt_tokens), max_output);
            let reserved = limiter
                .reserve_budgets(
                    state.store.as_ref(),
                    request_id,
                    (&caller.customer_id, customer_budget),
                    (&caller.key_id, key_budget),
                    max_cost,
                )
                .await;
            match reserved {
                Ok(Ok(hold)) => hold,
                Ok(Err(refusal)) => {
                    limiter.settle_tokens(&tokens, 0);
                    return Err(refusal.into());
                }
                Err(e) => {
                    limiter.settle_tokens(&tokens, 0);
                    tracing::error!("budget lookup failed: {e}");
                    return Err(ApiError::Unavailable(
                        "the budget cannot be checked right now; retry shortly".into(),
                    ));
                }
            }
        }
    };
    Ok((Some(tokens), budget))
}

/// A request admitted and started: its backend streams (one per choice) and the guard that
/// accounts it.
pub(crate) struct Started {
    pub streams: Vec<EventStream>,
    pub completion: Completion,
}

/// Checks the key may use the model, admits the request against its rate limits and budgets
/// (with the prompts' real token counts), and starts every choice. Every billed endpoint
/// goes through here and its [`Completion`]; the record carries `tags` merged with the key's
/// default tags.
pub(crate) async fn start(
    state: &AppState,
    id: &RequestId,
    caller: Caller,
    plan: &Plan,
    endpoint: &'static str,
    tags: Tags,
) -> Result<Started, ApiError> {
    let tags = tollgate_metering::tags::merged(tags, &caller.key_tags);
    let backend = backend_for(state, &plan.model)?;
    if !caller.may_use(&plan.model) {
        return Err(ApiError::ModelNotAllowed(plan.model.clone()));
    }
    let request_slot = state.inflight_requests.acquire(caller.request_caps())?;
    let cap = state
        .config
        .models
        .get(&plan.model)
        .and_then(|m| m.max_sequences_per_customer);
    let slots = match cap {
        Some(limit) => Some(state.inflight.acquire(
            &caller.customer_id,
            &plan.model,
            plan.choices.len(),
            limit,
        )?),
        None => None,
    };
    let server_span = server_span(
        endpoint,
        &plan.model,
        &caller.customer_id,
        plan.choices.first().and_then(|c| c.params.max_tokens),
    );
    let t = Instant::now();
    let limits = crate::server::telemetry::span(|| tracing::info_span!("gateway.limits"));
    tracing::Instrument::instrument(state.limiter.admit_request(&caller.limits), limits.clone())
        .await?;
    let mut admit_time = t.elapsed();
    let mut prepared = Vec::with_capacity(plan.choices.len());
    // The backend's own work (tokenizing, templating), left out of the gateway's overhead.
    let t = Instant::now();
    for request in &plan.choices {
        let mut request = request.clone();
        request.customer = Some(caller.customer_id.clone());
        prepared.push(backend.prepare(request).await?);
    }
    let backend_time = t.elapsed();
    let price = state
        .config
        .models
        .get(&plan.model)
        .map(|m| m.price)
        .unwrap_or_default();
    // The prompt is billed once per distinct prompt (the `n` choices of one prompt share it).
    let n = plan.n.max(1) as usize;
    let prompt_tokens: u32 = prepared.iter().step_by(n).map(|p| p.prompt_tokens).sum();
    let max_output: u64 = prepared.iter().map(|p| u64::from(p.max_tokens)).sum();
    let t = Instant::now();
    let (tokens_hold, budget_hold) = tracing::Instrument::instrument(
        admit(state, &id.0, &caller, prompt_tokens, max_output, &price),
        limits,
    )
    .await?;
    admit_time += t.elapsed();
    state
        .metrics
        .metering_duration
        .with_label_values(&["admit"])
        .observe(admit_time.as_secs_f64());
    let mut completion = Completion {
        state: state.clone(),
        caller,
        model: plan.model.clone(),
        endpoint,
        stream: plan.stream,
        price,
        request_id: id.0.clone(),
        started: Instant::now(),
        started_at: now_micros(),
        first_token: None,
        prompts: prepared.iter().map(|p| p.prompt_tokens).collect(),
        prompts_reported: vec![None; prepared.len()],
        progress: prepared.iter().map(|p| p.progress.clone()).collect(),
        cached_reported: vec![None; prepared.len()],
        cached: prepared.iter().map(|p| p.cached.clone()).collect(),
        sources: vec![None; prepared.len()],
        tags,
        per_prompt: n,
        generated: vec![0; prepared.len()],
        finish: None,
        outcome: "cancelled",
        tokens_hold,
        budget_hold,
        settled: false,
        overhead: Duration::ZERO,
        server_span,
        _slots: slots,
        _request_slot: request_slot,
    };
    completion.overhead = id.1.elapsed().saturating_sub(backend_time);
    let mut streams = Vec::with_capacity(prepared.len());
    for p in prepared {
        match (p.start)() {
            Ok(s) => streams.push(s),
            Err(e) => {
                completion.abandon();
                return Err(e.into());
            }
        }
    }
    Ok(Started {
        streams,
        completion,
    })
}

/// Admits one sequence that a backend runs outside the [`Backend`] streams (a Responses API
/// request passed through to an upstream): the same checks, rate limits and budget
/// reservation as [`start`], for `prompt_tokens` (an upper bound) and at most `max_output`
/// tokens. The caller feeds the returned guard what streams by.
#[expect(
    clippy::too_many_arguments,
    reason = "the request's parts, each needed once; a struct would only rename them"
)]
pub(crate) async fn start_passthrough(
    state: &AppState,
    id: &RequestId,
    caller: Caller,
    model: &str,
    stream: bool,
    prompt_tokens: u32,
    max_output: u32,
    endpoint: &'static str,
    tags: Tags,
) -> Result<Completion, ApiError> {
    let tags = tollgate_metering::tags::merged(tags, &caller.key_tags);
    backend_for(state, model)?;
    if !caller.may_use(model) {
        return Err(ApiError::ModelNotAllowed(model.to_string()));
    }
    let request_slot = state.inflight_requests.acquire(caller.request_caps())?;
    let config = state.config.models.get(model);
    let slots = match config.and_then(|m| m.max_sequences_per_customer) {
        Some(limit) => Some(
            state
                .inflight
                .acquire(&caller.customer_id, model, 1, limit)?,
        ),
        None => None,
    };
    state.limiter.admit_request(&caller.limits).await?;
    let price = config.map(|m| m.price).unwrap_or_default();
    let (tokens_hold, budget_hold) = admit(
        state,
        &id.0,
        &caller,
        prompt_tokens,
        u64::from(max_output),
        &price,
    )
    .await?;
    let server_span = server_span(endpoint, model, &caller.customer_id, Some(max_output));
    Ok(Completion {
        state: state.clone(),
        caller,
        model: model.to_string(),
        endpoint,
        stream,
        price,
        request_id: id.0.clone(),
        started: Instant::now(),
        started_at: now_micros(),
        first_token: None,
        prompts: vec![prompt_tokens],
        prompts_reported: vec![None],
        progress: vec![None],
        cached_reported: vec![None],
        cached: vec![None],
        sources: vec![None],
        tags,
        per_prompt: 1,
        generated: vec![0],
        finish: None,
        outcome: "cancelled",
        tokens_hold,
        budget_hold,
        settled: false,
        _slots: slots,
        _request_slot: request_slot,
        overhead: Duration::ZERO,
        server_span,
    })
}

/// The request's server span (when traces are exported), named and given the GenAI request
/// attributes; the guard records the usage and finish reasons on it when the request ends.
fn server_span(
    endpoint: &str,
    model: &str,
    customer_id: &str,
    max_tokens: Option<u32>,
) -> tracing::Span {
    if !crate::server::telemetry::enabled() {
        return tracing::Span::none();
    }
    let span = tracing::Span::current();
    let operation = if endpoint == "/v1/completions" {
        "text_completion"
    } else {
        "chat"
    };
    span.record("gen_ai.operation.name", operation);
    span.record("gen_ai.request.model", model);
    crate::server::telemetry::rename(&span, format!("{operation} {model}"));
    span.record("tollgate.customer_id", customer_id);
    if let Some(max) = max_tokens {
        span.record("gen_ai.request.max_tokens", i64::from(max));
    }
    span
}

/// Runs a chat or text completion; its record carries `tags` merged with the key's.
async fn respond_tagged(
    state: AppState,
    id: RequestId,
    caller: Caller,
    plan: Plan,
    kind: Kind,
    tags: Tags,
) -> Result<Response, ApiError> {
    let endpoint = match kind {
        Kind::Chat => "/v1/chat/completions",
        Kind::Text => "/v1/completions",
    };
    let Started {
        streams,
        completion,
    } = start(&state, &id, caller, &plan, endpoint, tags).await?;
    let label = ModelLabel(plan.model.clone());
    let mut response = if plan.stream {
        stream_response(streams, plan, kind, id, completion).into_response()
    } else {
        Json(collect(streams, &plan, kind, &id, completion).await?).into_response()
    };
    response.extensions_mut().insert(label);
    Ok(response)
}

/// One choice's full result.
#[derive(Default)]
struct ChoiceResult {
    text: String,
    logprobs: Vec<LogprobEntry>,
    /// Calls by index: id, name, arguments text.
    tool_calls: Vec<(String, String, String)>,
    finish: Option<FinishReason>,
    usage: Usage,
}

impl ChoiceResult {
    /// Adds one streamed part of call `index`.
    fn on_tool_call(&mut self, index: u32, id: Option<String>, name: Option<String>, args: &str) {
        let index = index as usize;
        while self.tool_calls.len() <= index {
            self.tool_calls.push(Default::default());
        }
        let call = &mut self.tool_calls[index];
        if let Some(id) = id {
            call.0 = id;
        }
        if let Some(name) = name {
            call.1 = name;
        }
        call.2.push_str(args);
    }

    /// The assistant message in OpenAI's shape: content is null when the answer is calls only.
    fn message(&self) -> Value {
        if self.tool_calls.is_empty() {
            return json!({"role": "assistant", "content": self.text, "refusal": null});
        }
        let content = if self.text.trim().is_empty() {
            Value::Null
        } else {
            Value::String(self.text.clone())
        };
        let calls: Vec<Value> = self
            .tool_calls
            .iter()
            .map(|(id, name, arguments)| {
                json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}})
            })
            .collect();
        json!({"role": "assistant", "content": content, "refusal": null, "tool_calls": calls})
    }
}

async fn collect(
    streams: Vec<EventStream>,
    plan: &Plan,
    kind: Kind,
    id: &RequestId,
    mut completion: Completion,
) -> Result<Value, ApiError> {
    let mut results: Vec<ChoiceResult> = (0..streams.len())
        .map(|_| ChoiceResult::default())
        .collect();
    let mut merged = select_all(
        streams
            .into_iter()
            .enumerate()
            .map(|(i, s)| s.map(move |e| (i, e))),
    );
    while let Some((i, event)) = merged.next().await {
        let r = &mut results[i];
        match event {
            Ok(GenerateEvent::Started { prompt_tokens }) => r.usage.prompt_tokens = prompt_tokens,
            Ok(GenerateEvent::Delta {
                text,
                logprobs,
                completion_tokens,
            }) => {
                completion.on_delta(i, completion_tokens);
                r.text.push_str(&text);
                r.logprobs.extend(logprobs);
            }
            Ok(GenerateEvent::ToolCallDelta {
                index,
                id,
                name,
                arguments,
            }) => r.on_tool_call(index, id, name, &arguments),
            Ok(GenerateEvent::Finished { reason, usage }) => {
                r.finish = Some(reason);
                r.usage = usage;
                completion.on_finished(i, reason, usage);
            }
            Err(e) => {
                completion.commit("failed").await;
                return Err(e.into());
            }
        }
    }
    if results.iter().any(|r| r.finish.is_none()) {
        // A backend stream that ends without finishing (its engine went away) is a failure.
        completion.commit("failed").await;
        return Err(ApiError::Internal(
            "the model stopped before finishing".into(),
        ));
    }
    let usage = completion.usage_json();
    completion.commit("completed").await;
    let created = now_secs();
    let choices: Vec<Value> = results
        .into_iter()
        .enumerate()
        .map(|(index, r)| {
            let finish = r.finish.map(|f| f.as_str());
            match kind {
                Kind::Chat => json!({
                    "index": index,
                    "message": r.message(),
                    "logprobs": plan.logprobs.map(|_| chat_logprobs(&r.logprobs)),
                    "finish_reason": finish,
                }),
                Kind::Text => json!({
                    "index": index,
                    "text": r.text,
                    "logprobs": plan.logprobs.map(|_| legacy_logprobs(&r.logprobs, 0)),
                    "finish_reason": finish,
                }),
            }
        })
        .collect();
    Ok(match kind {
        Kind::Chat => json!({
            "id": format!("chatcmpl-{}", id.0),
            "object": "chat.completion",
            "created": created,
            "model": plan.model,
            "system_fingerprint": null,
            "choices": choices,
            "usage": usage,
        }),
        Kind::Text => json!({
            "id": format!("cmpl-{}", id.0),
            "object": "text_completion",
            "created": created,
            "model": plan.model,
            "system_fingerprint": null,
            "choices": choices,
            "usage": usage,
        }),
    })
}

fn token_json(t: &crate::backend::TokenLogprob) -> Value {
    json!({"token": t.token, "logprob": t.logprob, "bytes": t.bytes})
}

/// Chat shape: `{"content": [{token, logprob, bytes, top_logprobs: [...]}]}`.
fn chat_logprobs(entries: &[LogprobEntry]) -> Value {
    let content: Vec<Value> = entries
        .iter()
        .map(|e| {
            let mut v = token_json(&e.chosen);
            v["top_logprobs"] = Value::Array(e.top.iter().map(token_json).collect());
            v
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// Legacy completions shape: parallel arrays, `top_logprobs` as token→logprob maps.
fn legacy_logprobs(entries: &[LogprobEntry], text_offset: usize) -> Value {
    let mut offset = text_offset;
    let mut offsets = Vec::with_capacity(entries.len());
    for e in entries {
        offsets.push(offset);
        offset += e.chosen.token.len();
    }
    json!({
        "tokens": entries.iter().map(|e| e.chosen.token.clone()).collect::<Vec<_>>(),
        "token_logprobs": entries.iter().map(|e| e.chosen.logprob).collect::<Vec<_>>(),
        "top_logprobs": entries.iter().map(|e| {
            let map: serde_json::Map<String, Value> = e.top.iter().map(|t| (t.token.clone(), json!(t.logprob))).collect();
            Value::Object(map)
        }).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

fn data(v: &Value) -> Result<Event, Infallible> {
    Ok(Event::default().data(v.to_string()))
}

fn stream_response(
    streams: Vec<EventStream>,
    plan: Plan,
    kind: Kind,
    id: RequestId,
    mut completion: Completion,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let created = now_secs();
    let (object, prefix) = match kind {
        Kind::Chat => ("chat.completion.chunk", "chatcmpl"),
        Kind::Text => ("text_completion", "cmpl"),
    };
    let response_id = format!("{prefix}-{}", id.0);
    let n_choices = streams.len();
    let body = async_stream::stream! {
        let include_usage = plan.include_usage;
        let usage_null = if include_usage { json!({"usage": null}) } else { json!({}) };
        let chunk = |choice: Value| {
            let mut v = json!({
                "id": response_id, "object": object, "created": created,
                "model": plan.model, "system_fingerprint": null, "choices": [choice],
            });
            if include_usage {
                v["usage"] = usage_null["usage"].clone();
            }
            v
        };
        if kind == Kind::Chat {
            for index in 0..n_choices {
                yield data(&chunk(json!({
                    "index": index, "delta": {"role": "assistant", "content": ""},
                    "logprobs": null, "finish_reason": null,
                })));
            }
        }
        let mut text_offsets = vec![0usize; n_choices];
        let mut finished = vec![false; n_choices];
        let mut merged = select_all(streams.into_iter().enumerate().map(|(i, s)| s.map(move |e| (i, e))));
        while let Some((index, event)) = merged.next().await {
            match event {
                Ok(GenerateEvent::Started { .. }) => {}
                Ok(GenerateEvent::Delta { text, logprobs, completion_tokens }) => {
                    completion.on_delta(index, completion_tokens);
                    if text.is_empty() && logprobs.is_empty() {
                        continue;
                    }
                    let choice = match kind {
                        Kind::Chat => json!({
                            "index": index, "delta": {"content": text},
                            "logprobs": plan.logprobs.map(|_| chat_logprobs(&logprobs)),
                            "finish_reason": null,
                        }),
                        Kind::Text => {
                            let lp = plan.logprobs.map(|_| legacy_logprobs(&logprobs, text_offsets[index]));
                            text_offsets[index] += text.len();
                            json!({"index": index, "text": text, "logprobs": lp, "finish_reason": null})
                        }
                    };
                    yield data(&chunk(choice));
                }
                Ok(GenerateEvent::ToolCallDelta { index: call, id, name, arguments }) => {
                    let mut part = json!({"index": call, "function": {"arguments": arguments}});
                    if let Some(id) = id {
                        part["id"] = json!(id);
                        part["type"] = json!("function");
                    }
                    if let Some(name) = name {
                        part["function"]["name"] = json!(name);
                    }
                    yield data(&chunk(json!({
                        "index": index, "delta": {"tool_calls": [part]},
                        "logprobs": null, "finish_reason": null,
                    })));
                }
                Ok(GenerateEvent::Finished { reason, usage }) => {
                    completion.on_finished(index, reason, usage);
                    finished[index] = true;
                    let choice = match kind {
                        Kind::Chat => json!({"index": index, "delta": {}, "logprobs": null, "finish_reason": reason.as_str()}),
                        Kind::Text => json!({"index": index, "text": "", "logprobs": null, "finish_reason": reason.as_str()}),
                    };
                    yield data(&chunk(choice));
                }
                Err(e) => {
                    completion.commit("failed").await;
                    yield data(&ApiError::from(e).body());
                    yield Ok(Event::default().data("[DONE]"));
                    return;
                }
            }
        }
        if finished.iter().any(|f| !f) {
            completion.commit("failed").await;
            yield data(&ApiError::Internal("the model stopped before finishing".into()).body());
            yield Ok(Event::default().data("[DONE]"));
            return;
        }
        completion.commit("completed").await;
        if include_usage {
            yield data(&json!({
                "id": response_id, "object": object, "created": created,
                "model": plan.model, "system_fingerprint": null, "choices": [],
                "usage": completion.usage_json(),
            }));
        }
        yield Ok(Event::default().data("[DONE]"));
    };
    Sse::new(body).keep_alive(KeepAlive::default())
}

fn model_json(info: &crate::backend::ModelInfo) -> Value {
    json!({"id": info.id, "object": "model", "created": info.created, "owned_by": info.owned_by})
}

pub async fn list_models(State(state): State<AppState>) -> Json<Value> {
    let mut models: Vec<_> = state.backends.values().map(|b| b.info()).collect();
    models.sort_by(|a, b| a.id.cmp(&b.id));
    Json(json!({"object": "list", "data": models.iter().map(model_json).collect::<Vec<_>>()}))
}

pub async fn get_model(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let backend = backend_for(&state, &id)?;
    Ok(Json(model_json(&backend.info())))
}

/// Liveness and load: the server answers only once its models are loaded, and reports each
/// model's running and waiting sequences and KV-cache use (gateways route on it).
pub async fn health(State(state): State<AppState>) -> Json<Value> {
    let mut models: Vec<Value> = state
        .backends
        .iter()
        .map(|(id, b)| {
            let l = b.load();
            json!({
                "id": id,
                "running": l.running,
                "waiting": l.waiting,
                "kv_cache_used_bytes": l.kv_cache_used_bytes,
                "kv_cache_capacity_bytes": l.kv_cache_capacity_bytes,
            })
        })
        .collect();
    models.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    Json(json!({"status": "ok", "models": models}))
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        state.metrics.render(&state.backends),
    )
        .into_response()
}

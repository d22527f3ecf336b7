//! Admission of a billed request: the key may use the model, concurrency slots
//! (`crate::concurrency`), the request rate, then (with the prompts' real token counts from
//! `Backend::prepare`) the token rate and the budget, each reserved for the request's maximum;
//! then the backend streams start under a [`Completion`] guard. Every billed endpoint goes
//! through [`start`] or [`start_passthrough`].

use std::sync::Arc;
use std::time::Instant;

use crate::api::accounting::{Charge, ChoiceTally, Completion, Holds};
use crate::api::openai::{Plan, RequestedTier};
use crate::auth::Caller;
use crate::backend::{Backend, BackendError, EventStream, GenerateRequest, Prepared};
use crate::catalogue::Served;
use crate::concurrency::{RequestSlot, Slots};
use crate::config::ModelConfig;
use crate::error::ApiError;
use crate::{AppState, RequestId};
use tollgate_metering::kinds::{Endpoint, ServiceTier};
use tollgate_metering::limits::{BudgetError, BudgetHold, Claim, TokenHold};
use tollgate_metering::money::{max_cost_nano_usd, Price, TierPrices};
use tollgate_metering::store::now_micros;
use tollgate_metering::tags::Tags;

/// The model `model` as `customer`'s requests see it (the catalogue's, or one of the
/// customer's own adapters); 404 `model_not_found` for anything else, another customer's
/// adapters included (never said to exist).
pub(crate) fn served(state: &AppState, customer: &str, model: &str) -> Result<Served, ApiError> {
    state
        .catalogue
        .served(customer, model)
        .ok_or_else(|| ApiError::ModelNotFound(model.to_string()))
}

/// The backend of [`served`].
pub(crate) fn backend_for(
    state: &AppState,
    customer: &str,
    model: &str,
) -> Result<Arc<dyn Backend>, ApiError> {
    served(state, customer, model).map(|s| s.backend)
}

/// The configuration of `model` as `customer`'s requests see it, if it is served to them.
fn config_for(state: &AppState, customer: &str, model: &str) -> Option<ModelConfig> {
    state
        .catalogue
        .served(customer, model)
        .and_then(|s| s.config)
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
        .reserve_tokens(
            &caller.limits,
            i64::from(prompt_tokens).saturating_add(i64::try_from(max_output).unwrap_or(i64::MAX)),
        )
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
                Ok(hold) => hold,
                Err(BudgetError::Refused(refusal)) => {
                    limiter.settle_tokens(&tokens, 0);
                    return Err(refusal.into());
                }
                Err(BudgetError::Store(e)) => {
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
    /// The tier it was admitted at.
    pub service_tier: ServiceTier,
}

/// What a request may hold before its prompts are counted.
struct Entry {
    backend: Arc<dyn Backend>,
    /// A LoRA adapter's model id: its base model and the adapter's name (for the record).
    adapter: Option<(String, String)>,
    slots: Option<Slots>,
    request_slot: RequestSlot,
}

impl Entry {
    /// What the request holds until it is settled: these slots, and the token rate and budget
    /// reserved for it.
    fn into_holds(
        self,
        tokens: Option<TokenHold>,
        budget: Option<BudgetHold>,
        server_span: tracing::Span,
    ) -> Holds {
        Holds {
            tokens,
            budget,
            server_span,
            _slots: self.slots,
            _request_slot: self.request_slot,
        }
    }
}

/// The checks every billed request passes first, in order: the model is served, the key may
/// use it, the key's and customer's concurrent requests, and (when the model caps them) the
/// customer's `sequences` concurrent sequences on it.
fn enter(
    state: &AppState,
    caller: &Caller,
    model: &str,
    sequences: usize,
) -> Result<Entry, ApiError> {
    let Served { config, backend } = match &caller.forwarded_adapter {
        None => served(state, &caller.customer_id, model)?,
        // A worker's request with the adapter its gateway named.
        Some(adapter) => state
            .catalogue
            .forwarded(model, adapter)
            .map_err(ApiError::AdapterUnavailable)?
            .ok_or_else(|| ApiError::ModelNotFound(model.to_string()))?,
    };
    if !caller.may_use(model) {
        return Err(ApiError::ModelNotAllowed(model.to_string()));
    }
    let request_slot = state.inflight.requests.acquire(caller.request_caps())?;
    // The cap read at start for the catalogue's models; a customer's adapter has its base's.
    let cap = state
        .config
        .models
        .get(model)
        .or(config.as_ref())
        .and_then(|m| m.max_sequences_per_customer);
    let slots = match cap {
        Some(limit) => Some(state.inflight.sequences.acquire(
            &caller.customer_id,
            model,
            sequences,
            limit,
        )?),
        None => None,
    };
    Ok(Entry {
        backend,
        adapter: config.and_then(|c| c.adapter).map(|a| (a.base, a.name)),
        slots,
        request_slot,
    })
}

/// The model's price at `tier` (zero when the model has none). A tier the model is not sold at
/// is refused (400 naming `service_tier`), never billed at another tier's price.
pub(crate) fn price_of(
    state: &AppState,
    customer: &str,
    model: &str,
    tier: ServiceTier,
) -> Result<Price, ApiError> {
    let Some(m) = config_for(state, customer, model) else {
        return Ok(Price::default());
    };
    m.prices.get(tier).ok_or_else(|| {
        ApiError::invalid(
            format!("the model `{model}` is not offered at service_tier `{tier}`"),
            "service_tier",
        )
    })
}

/// The tier a request runs at. `auto` (or nothing) is the caller's default tier (its key's,
/// else its customer's, else `default`), falling back to `default` where that tier is not
/// allowed the caller or not sold for the model: `auto` never refuses. `priority` asked for
/// without the permission is refused (403 naming `service_tier`); a tier the model is not
/// sold at is refused by [`price_of`]. A line of a batch runs at `batch`.
pub(crate) fn resolve_tier(
    state: &AppState,
    caller: &Caller,
    model: &str,
    asked: Option<RequestedTier>,
) -> Result<ServiceTier, ApiError> {
    if caller.batch_id.is_some() {
        // A line of a batch runs and is billed at the batch tier, whatever its body asks.
        return Ok(ServiceTier::Batch);
    }
    Ok(match asked.unwrap_or(RequestedTier::Auto) {
        RequestedTier::Auto => {
            let tier = caller.auto_tier;
            let allowed = tier != ServiceTier::Priority || caller.allow_priority;
            let sold = config_for(state, &caller.customer_id, model)
                .is_none_or(|m| m.prices.get(tier).is_some());
            if allowed && sold {
                tier
            } else {
                ServiceTier::Default
            }
        }
        RequestedTier::Default => ServiceTier::Default,
        RequestedTier::Flex => ServiceTier::Flex,
        RequestedTier::Priority if caller.allow_priority => ServiceTier::Priority,
        RequestedTier::Priority => {
            return Err(ApiError::PermissionDenied {
                message: "this API key may not use service_tier `priority`; ask the operator \
                          to allow it, or use `auto`, `default` or `flex`"
                    .into(),
                param: "service_tier",
            })
        }
    })
}

/// How long a request at `tier` may wait for the engine to admit it: `flex` for the model's
/// `flex_max_wait_secs`, the others as long as it takes.
fn max_queue_wait(
    state: &AppState,
    customer: &str,
    model: &str,
    tier: ServiceTier,
) -> Option<std::time::Duration> {
    (tier == ServiceTier::Flex).then(|| {
        config_for(state, customer, model).map_or(
            std::time::Duration::from_secs(crate::config::DEFAULT_FLEX_MAX_WAIT_SECS),
            |m| m.flex_max_wait,
        )
    })
}

/// For a `flex` request: waits for each stream's first event (the engine admitted it, or
/// could not within `flex_max_wait_secs`) before the response begins, so a refusal is a 429
/// and not an error inside a stream that already said 200. The events read are put back.
async fn admitted(streams: &mut [EventStream]) -> Result<(), BackendError> {
    use futures::StreamExt;
    for stream in streams.iter_mut() {
        let rest = std::mem::replace(stream, Box::pin(futures::stream::empty()));
        let mut rest = rest;
        let first = rest.next().await;
        if let Some(Err(e @ BackendError::NoCapacity { .. })) = first {
            return Err(e);
        }
        *stream = Box::pin(futures::stream::iter(first).chain(rest));
    }
    Ok(())
}

/// The model's prices per tier, for billing the tier an upstream reports.
fn tier_prices(state: &AppState, customer: &str, model: &str) -> Option<TierPrices> {
    config_for(state, customer, model).map(|m| m.prices)
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
    endpoint: Endpoint,
    tags: Tags,
) -> Result<Started, ApiError> {
    let tags = tollgate_metering::tags::merged(tags, &caller.key_tags);
    let entry = enter(state, &caller, &plan.model, plan.choices.len())?;
    let asked_tier = resolve_tier(state, &caller, &plan.model, plan.service_tier)?;
    // Refused before any work when the tier asked for has no price.
    price_of(state, &caller.customer_id, &plan.model, asked_tier)?;
    // A customer with a reservation on the model is prepared at it (priority in the engine);
    // whether this request fits the minute's reserved tokens is known once its prompts are
    // counted.
    let reservable = state
        .reservations
        .reserved(&caller.customer_id, &plan.model)
        > 0;
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
    // The backend's own work (tokenizing, templating), left out of the gateway's overhead.
    let t = Instant::now();
    let n = plan.n.max(1) as usize;
    let AtTier {
        prepared,
        service_tier,
        reserved_tokens,
        prompt_tokens,
        max_output,
    } = prepare_at_tier(state, &entry.backend, &caller, plan, reservable, asked_tier).await?;
    let tier = reserved_tokens.map_or(asked_tier, |_| ServiceTier::Reserved);
    let price = price_of(state, &caller.customer_id, &plan.model, tier)?;
    let backend_time = t.elapsed();
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
    let choices = prepared
        .iter()
        .map(|p| ChoiceTally::new(p.prompt_tokens, p.progress.clone(), p.cached.clone()))
        .collect();
    let charge = Charge {
        request_id: id.0.clone(),
        model: plan.model.clone(),
        endpoint,
        stream: plan.stream,
        price,
        service_tier,
        reserved_tokens,
        prices: tier_prices(state, &caller.customer_id, &plan.model),
        tags,
        adapter: entry.adapter.clone(),
    };
    let holds = entry.into_holds(tokens_hold, budget_hold, server_span);
    let mut completion = Completion::new(state, caller, charge, holds, choices, n);
    completion.add_overhead(id.1.elapsed().saturating_sub(backend_time));
    match start_streams(prepared, service_tier).await {
        Ok(streams) => Ok(Started {
            streams,
            completion,
            service_tier,
        }),
        Err(e) => {
            // Never started: no record, the reservations given back.
            completion.abandon();
            Err(e.into())
        }
    }
}

/// A request's choices prepared at the tier it runs at, with their token counts.
struct AtTier {
    prepared: Vec<Prepared>,
    service_tier: ServiceTier,
    /// What it took of this minute's reservation (`None`: it runs unreserved).
    reserved_tokens: Option<Claim>,
    /// The prompts' tokens, once per distinct prompt (the `n` choices of one prompt share it).
    prompt_tokens: u32,
    max_output: u64,
}

/// Prepares `plan`'s choices: at the reserved tier when the customer has a reservation on the
/// model (`reservable`) and it has room this minute for the request's most tokens, else at
/// `asked_tier` (prepared again when the reservation had no room).
async fn prepare_at_tier(
    state: &AppState,
    backend: &Arc<dyn Backend>,
    caller: &Caller,
    plan: &Plan,
    reservable: bool,
    asked_tier: ServiceTier,
) -> Result<AtTier, ApiError> {
    let first_tier = if reservable {
        ServiceTier::Reserved
    } else {
        asked_tier
    };
    let mut prepared = prepare(state, backend, caller, plan, first_tier).await?;
    let n = plan.n.max(1) as usize;
    let prompt_tokens: u32 = prepared.iter().step_by(n).map(|p| p.prompt_tokens).sum();
    let max_output: u64 = prepared.iter().map(|p| u64::from(p.max_tokens)).sum();
    let most =
        i64::from(prompt_tokens).saturating_add(i64::try_from(max_output).unwrap_or(i64::MAX));
    let reserved_tokens = if reservable {
        state
            .reservations
            .claim(&caller.customer_id, &plan.model, most, now_micros())
            .await
    } else {
        None
    };
    let service_tier = match reserved_tokens {
        Some(_) => ServiceTier::Reserved,
        None if reservable => {
            // Beyond the reservation: run and bill at the tier asked.
            prepared = prepare(state, backend, caller, plan, asked_tier).await?;
            asked_tier
        }
        None => asked_tier,
    };
    Ok(AtTier {
        prepared,
        service_tier,
        reserved_tokens,
        prompt_tokens,
        max_output,
    })
}

/// Prepares every choice of `plan` on `backend` for `caller`, at `tier`.
async fn prepare(
    state: &AppState,
    backend: &Arc<dyn Backend>,
    caller: &Caller,
    plan: &Plan,
    tier: ServiceTier,
) -> Result<Vec<Prepared>, BackendError> {
    let max_wait = max_queue_wait(state, &caller.customer_id, &plan.model, tier);
    let mut prepared = Vec::with_capacity(plan.choices.len());
    for request in &plan.choices {
        let request = GenerateRequest {
            customer: Some(caller.customer_id.clone()),
            scheduling_weight: Some(caller.scheduling_weight),
            service_tier: tier,
            max_queue_wait: max_wait,
            ..request.clone()
        };
        prepared.push(backend.prepare(request).await?);
    }
    Ok(prepared)
}

/// Starts every prepared sequence; a `flex` request's streams once the engine admitted them
/// ([`admitted`]).
async fn start_streams(
    prepared: Vec<Prepared>,
    tier: ServiceTier,
) -> Result<Vec<EventStream>, BackendError> {
    let mut streams = prepared
        .into_iter()
        .map(|p| (p.start)())
        .collect::<Result<Vec<_>, _>>()?;
    if tier == ServiceTier::Flex {
        admitted(&mut streams).await?;
    }
    Ok(streams)
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
    endpoint: Endpoint,
    tags: Tags,
    service_tier: ServiceTier,
) -> Result<Completion, ApiError> {
    let tags = tollgate_metering::tags::merged(tags, &caller.key_tags);
    let entry = enter(state, &caller, model, 1)?;
    state.limiter.admit_request(&caller.limits).await?;
    let price = price_of(state, &caller.customer_id, model, service_tier)?;
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
    let charge = Charge {
        request_id: id.0.clone(),
        model: model.to_string(),
        endpoint,
        stream,
        price,
        service_tier,
        reserved_tokens: None,
        prices: tier_prices(state, &caller.customer_id, model),
        tags,
        adapter: entry.adapter.clone(),
    };
    let holds = entry.into_holds(tokens_hold, budget_hold, server_span);
    // One sequence, whose progress the relay feeds the guard itself.
    let choices = vec![ChoiceTally::new(prompt_tokens, None, None)];
    Ok(Completion::new(state, caller, charge, holds, choices, 1))
}

/// The request's server span (when traces are exported), named and given the GenAI request
/// attributes; the guard records the usage and finish reasons on it when the request ends.
fn server_span(
    endpoint: Endpoint,
    model: &str,
    customer_id: &str,
    max_tokens: Option<u32>,
) -> tracing::Span {
    if !crate::server::telemetry::enabled() {
        return tracing::Span::none();
    }
    let span = tracing::Span::current();
    let operation = match endpoint {
        Endpoint::Completions => "text_completion",
        Endpoint::ChatCompletions | Endpoint::Responses => "chat",
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

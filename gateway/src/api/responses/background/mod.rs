//! Background responses (`background: true` on `POST /v1/responses`): the request is checked
//! exactly as a direct one, stored `queued` in the ledger database (its response object for
//! polling, its run for the runners: metering's `store/background.rs`) and answered at once.
//! Every replica's runner (`run`) claims queued runs under a lease, as batch lines are
//! claimed, and runs each as the key that asked, at the tier asked, storing its events as they
//! are produced; a run whose gateway died is claimed again once its lease lapses and billed
//! once (its usage record's id is the response's own). `GET /v1/responses/{id}` polls it,
//! `?stream=true&starting_after=N` streams its stored events from `N + 1` (following the run
//! until it ends), `POST /v1/responses/{id}/cancel` cancels it.

mod run;

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::Value;
use tollgate_metering::kinds::RunStatus;
use tollgate_metering::store::{now_micros, NewBackground, Store};

pub use self::run::run;
use super::output::Builder;
use super::request::{in_response_terms, CreateResponse};
use super::{echo, history, not_found, tags_of, Item};
use crate::api::admission::{backend_for, price_of, resolve_tier};
use crate::auth::Caller;
use crate::error::{ApiError, ApiPath};
use crate::files::unix_now;
use crate::{AppState, RequestId};

/// How often a stream following a run looks for its next events.
const FOLLOW: Duration = Duration::from_millis(100);

/// The events read from the database at once.
const PAGE: u32 = 256;

/// The request a background response runs: the same body, run in the foreground, streamed
/// (its events are stored as they come).
fn runnable(body: &CreateResponse) -> CreateResponse {
    CreateResponse {
        background: None,
        stream: Some(true),
        ..body.clone()
    }
}

/// The usage record id of the request that created response `id` (`resp_` and its UUID's
/// hex): the run bills under it, whichever gateway runs it and however often.
fn request_id_of(id: &str) -> Option<String> {
    uuid::Uuid::try_parse(id.strip_prefix("resp_")?)
        .ok()
        .map(|u| u.to_string())
}

/// Accepts a background response: checked as the direct request would be (plan, tier,
/// conversation, tags), stored `queued`, answered at once (streamed with `stream: true`).
pub(super) async fn accept(
    state: AppState,
    id: RequestId,
    caller: Caller,
    body: CreateResponse,
    raw: &Value,
) -> Result<Response, ApiError> {
    let Some(store) = state.store.clone() else {
        return Err(ApiError::invalid(
            "background responses need the ledger database; this server runs without one - 'background'",
            "background",
        ));
    };
    if body.store == Some(false) {
        return Err(ApiError::invalid(
            "background responses must be stored: store cannot be false with background - 'store'",
            "store",
        ));
    }
    if backend_for(&state, &caller.customer_id, &body.model)?.passes_responses_through() {
        return Err(ApiError::invalid(
            "background responses are not supported for a model whose upstream serves the \
             Responses API itself - 'background'",
            "background",
        ));
    }
    let history = history(&state, &body, &caller).await?;
    tags_of(&body)?;
    let (plan, input) = runnable(&body).plan(&history, &id.0, state.config.server.max_n)?;
    let tier = resolve_tier(&state, &caller, &plan.model, plan.service_tier)
        .and_then(|tier| price_of(&state, &caller.customer_id, &plan.model, tier).map(|_| tier))
        .map_err(in_response_terms)?;
    let mut echo = echo(&body, &plan, &id, true);
    echo.service_tier = tier;
    let queued = serde_json::to_value(Builder::new(echo).queued())
        .map_err(|e| ApiError::Internal(format!("cannot encode the response: {e}")))?;
    let request = serde_json::to_string(raw)
        .map_err(|e| ApiError::Internal(format!("cannot encode the request: {e}")))?;
    let response_id = queued["id"].as_str().unwrap_or_default().to_string();
    let mut conversation = history;
    conversation.extend(input);
    let retention =
        i64::try_from(state.config.server.response_retention.as_micros()).unwrap_or(i64::MAX / 2);
    store
        .accept_background(&NewBackground {
            id: &response_id,
            customer_id: &caller.customer_id,
            key_id: &caller.key_id,
            model: &plan.model,
            request: &request,
            created_at: unix_now(),
            expires_at: now_micros() + retention,
            input_items: &conversation,
            response: &queued,
        })
        .await?;
    if body.stream == Some(true) {
        return Ok(follow(state, store, caller.customer_id, response_id, -1).into_response());
    }
    Ok(Json(queued).into_response())
}

/// `GET /v1/responses/{id}?stream=true&starting_after=N`: the stored events of the caller's
/// background response after `N` (all of them without it), then its next ones as the run
/// produces them, until it ends.
pub(super) async fn stream(
    state: &AppState,
    caller: &Caller,
    id: String,
    starting_after: Option<i64>,
) -> Result<Response, ApiError> {
    let store = state.store.clone().ok_or_else(|| not_found(&id))?;
    match store.background_status(&id, &caller.customer_id).await? {
        Some(_) => {}
        None if store
            .get_response::<Item>(&id, &caller.customer_id, now_micros())
            .await?
            .is_some() =>
        {
            return Err(ApiError::invalid(
                "only background responses can be streamed again - 'stream'",
                "stream",
            ))
        }
        None => return Err(not_found(&id)),
    }
    let after = starting_after.unwrap_or(-1);
    Ok(follow(state.clone(), store, caller.customer_id.clone(), id, after).into_response())
}

/// The events of background response `id` after `after`, following its run to its end.
fn follow(
    state: AppState,
    store: Store,
    customer_id: String,
    id: String,
    mut after: i64,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let body = async_stream::stream! {
        loop {
            // The status first: a run that has ended stored all its events before.
            let ended = match store.background_status(&id, &customer_id).await {
                Ok(status) => status.is_none_or(RunStatus::is_final),
                Err(e) => {
                    tracing::warn!(response_id = %id, "cannot read the response's status: {e}");
                    false
                }
            };
            let events = match store.background_events(&id, after, PAGE).await {
                Ok(events) => events,
                Err(e) => {
                    tracing::warn!(response_id = %id, "cannot read the response's events: {e}");
                    Vec::new()
                }
            };
            let full = u32::try_from(events.len()).is_ok_and(|n| n == PAGE);
            for (sequence, event) in events {
                after = sequence;
                let kind = serde_json::from_str::<Value>(&event)
                    .ok()
                    .and_then(|v| v["type"].as_str().map(str::to_string))
                    .unwrap_or_default();
                yield Ok(Event::default().event(kind).data(event));
            }
            if full {
                continue;
            }
            if ended {
                break;
            }
            tokio::time::sleep(FOLLOW).await;
        }
    };
    Sse::new(body).keep_alive(state.config.server.keep_alive())
}

/// Cancels a background response (OpenAI: only those can be); one that has ended is returned
/// as it is.
#[utoipa::path(post, operation_id = "cancel_response", path = "/v1/responses/{id}/cancel", tag = "public",
    params(("id" = String, Path, description = "The response id (`resp_...`)")),
    responses((status = 200, body = super::wire::Response), crate::openapi::PublicErrors),
    security(("api_key" = [])))]
pub async fn cancel(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let store = state.store.clone().ok_or_else(|| not_found(&id))?;
    let status = store
        .cancel_background(&id, &caller.customer_id, unix_now())
        .await?;
    let stored = store
        .get_response::<Item>(&id, &caller.customer_id, now_micros())
        .await?
        .ok_or_else(|| not_found(&id))?;
    if status.is_none() {
        return Err(ApiError::invalid(
            "Only responses created with background=true can be cancelled.",
            None,
        ));
    }
    Ok(Json(stored.response))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_responses_record_id_is_the_uuid_of_its_id() {
        let u = uuid::Uuid::now_v7().to_string();
        let id = format!("resp_{}", u.replace('-', ""));
        assert_eq!(request_id_of(&id), Some(u));
        assert_eq!(request_id_of("resp_nope"), None);
        assert_eq!(request_id_of("msg_0000"), None);
    }
}

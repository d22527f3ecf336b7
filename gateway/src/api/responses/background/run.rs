//! The runner of background responses (every replica, and the embedded server, runs one):
//! claims queued runs in the ledger database under a lease, at most `[server]
//! batch_concurrency` in flight here, and runs each as the direct request of its body would run
//! (plan, admission at the tier asked, routing, the accounting guard) as the key that asked.
//! Its events are stored as produced (a few at a time) and its end once; a run that lost its
//! claim (cancelled, or claimed again after its lease lapsed) stops at its next write, billed
//! for what it produced. Its usage record's id is the response's, so a run done again after
//! its gateway died is billed once. A run refused for now (queues full, a rate limit, a
//! concurrency cap) ran nowhere: it is put back and runs again a little later.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tollgate_metering::kinds::{Endpoint, Outcome, RunStatus};
use tollgate_metering::store::{now_micros, ClaimedRun, RunEnd, Store};

use super::super::output::{Builder, Status};
use super::super::request::{in_response_terms, CreateResponse};
use super::super::wire::StreamEvent;
use super::super::{echo, history, settle, step, tags_of, Item};
use super::{request_id_of, runnable};
use crate::api::accounting::Completion;
use crate::api::admission::{start, Started};
use crate::batches::under_lease;
use crate::error::{parse_json, ApiError};
use crate::files::unix_now;
use crate::{AppState, RequestId};

/// How often an idle runner looks for queued runs (a run that ends wakes it at once).
const IDLE: Duration = Duration::from_millis(250);

/// How long a run refused for now waits before it runs again.
const RETRY_AFTER_SECS: i64 = 2;

/// How often a run renews its lease (and learns whether it was cancelled while it waits).
const RENEW_EVERY: Duration = Duration::from_secs(1);

/// How often a run stores the events it has produced (and learns whether it was cancelled).
const FLUSH_EVERY: Duration = Duration::from_millis(100);

/// Runs background responses until `stop` (runs in flight finish as tasks of `state.tasks`).
pub async fn run(state: AppState, stop: CancellationToken) {
    let Some(store) = state.store.clone() else {
        return;
    };
    let slots = Arc::new(Semaphore::new(state.config.server.batch_concurrency));
    let ended = Arc::new(Notify::new());
    let lease = i64::try_from(state.config.server.batch_lease.as_secs()).unwrap_or(60);
    while !stop.is_cancelled() {
        let free = u32::try_from(slots.available_permits()).unwrap_or(u32::MAX);
        let now = unix_now();
        let claimed = match store.background_under_way().await {
            Ok(true) if free > 0 => store.claim_background(now, now + lease, free).await,
            Ok(_) => Ok(Vec::new()),
            Err(e) => Err(e),
        }
        .unwrap_or_else(|e| {
            tracing::warn!("background responses: cannot claim runs: {e}");
            Vec::new()
        });
        for claimed in claimed {
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                break; // not reached: the claim took at most the free slots
            };
            let (state, store, ended) = (state.clone(), store.clone(), ended.clone());
            state.tasks.clone().spawn(async move {
                run_claimed(&state, &store, &claimed, lease).await;
                drop(slot);
                ended.notify_one();
            });
        }
        tokio::select! {
            () = stop.cancelled() => {}
            () = ended.notified() => {}
            () = tokio::time::sleep(IDLE) => {}
        }
    }
}

/// What running a claimed response came to.
enum Ran {
    Ended(RunEnd),
    /// Refused for now: nothing ran, nothing was billed.
    Later,
    /// The run is no longer this claim's (cancelled, or claimed again).
    Lost,
}

/// Runs one claimed response under its lease (renewed every second or so: a cancel is seen
/// then at the latest) and stores its end.
async fn run_claimed(state: &AppState, store: &Store, claimed: &ClaimedRun, lease: i64) {
    let renew = |until| async move {
        store
            .renew_background(&claimed.id, claimed.attempt, until)
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(response_id = %claimed.id, "cannot renew the run's lease: {e}");
                true
            })
    };
    let ran = under_lease(respond(state, store, claimed), lease, RENEW_EVERY, renew).await;
    let ran = match ran {
        Some(Ran::Ended(end)) => store
            .end_background(&claimed.id, claimed.attempt, &end, unix_now())
            .await
            .map(|_| ()),
        Some(Ran::Later) => store
            .renew_background(&claimed.id, claimed.attempt, unix_now() + RETRY_AFTER_SECS)
            .await
            .map(|_| ()),
        Some(Ran::Lost) | None => {
            tracing::info!(response_id = %claimed.id, "the run was cancelled or taken over; it stopped");
            Ok(())
        }
    };
    if let Err(e) = ran {
        // Its lease lapses and it runs again; its record is the same one, billed once.
        tracing::error!(response_id = %claimed.id, "cannot store the run's end: {e}");
    }
}

/// Whether a refusal is for now only (the same request may be admitted later).
fn for_now(e: &ApiError) -> bool {
    matches!(
        e,
        ApiError::Overloaded { .. }
            | ApiError::ModelLoading { .. }
            | ApiError::AtCapacity { .. }
            | ApiError::ResourceUnavailable { .. }
            | ApiError::RateLimited { .. }
            | ApiError::Unavailable(_)
    )
}

/// The claimed response, run.
async fn respond(state: &AppState, store: &Store, claimed: &ClaimedRun) -> Ran {
    let (builder, started) = match admit(state, store, claimed).await {
        Ok(admitted) => admitted,
        Err(e) if for_now(&e) => return Ran::Later,
        Err(e) => return failed(store, claimed, &e).await,
    };
    generate(store, claimed, builder, started).await
}

/// The run admitted (its request planned and started as the key that asked), with its fold.
async fn admit(
    state: &AppState,
    store: &Store,
    claimed: &ClaimedRun,
) -> Result<(Builder, Started), ApiError> {
    let caller = state.auth.caller_of_key(store, &claimed.key_id).await?;
    let body: CreateResponse = parse_json(claimed.request.as_bytes())?;
    let request_id = request_id_of(&claimed.id)
        .ok_or_else(|| ApiError::Internal(format!("no request id in {}", claimed.id)))?;
    let id = RequestId(request_id, Instant::now());
    let history = history(state, &body, &caller).await?;
    let tags = tags_of(&body)?;
    let (plan, _) = runnable(&body).plan(&history, &id.0, state.config.server.max_n)?;
    let mut echo = echo(&body, &plan, &id, true);
    let started = start(state, &id, caller, &plan, Endpoint::Responses, tags)
        .await
        .map_err(in_response_terms)?;
    echo.service_tier = started.service_tier;
    Ok((Builder::new(echo), started))
}

/// A run that could not start: its stored response, `failed` with the reason.
async fn failed(store: &Store, claimed: &ClaimedRun, e: &ApiError) -> Ran {
    let stored = store
        .get_response::<Item>(&claimed.id, &claimed.customer_id, now_micros())
        .await;
    let mut response = match stored {
        Ok(Some(stored)) => stored.response,
        Ok(None) => json!({"id": claimed.id, "object": "response"}),
        Err(e) => {
            tracing::warn!(response_id = %claimed.id, "cannot read the stored response: {e}");
            return Ran::Later;
        }
    };
    // The refusal's own code (`insufficient_quota`, `invalid_api_key`...) and message, as the
    // direct request would have had them.
    let error = e.body().error;
    response["status"] = json!(RunStatus::Failed.as_str());
    response["error"] = json!({"code": error.code.unwrap_or(error.kind), "message": error.message});
    Ran::Ended(RunEnd {
        status: RunStatus::Failed,
        response,
        input_tokens: 0,
        output_tokens: 0,
    })
}

/// Stores `events` (emptied) and, if given, the response in its current state; whether the
/// run is still this claim's.
async fn flush(
    store: &Store,
    claimed: &ClaimedRun,
    events: &mut Vec<StreamEvent>,
    response: Option<&Value>,
) -> bool {
    let rows: Vec<(i64, String)> = events
        .drain(..)
        .map(|e| {
            let sequence = i64::try_from(e.sequence_number).unwrap_or(i64::MAX);
            (sequence, serde_json::to_string(&e).unwrap_or_default())
        })
        .collect();
    match store
        .add_background_events(&claimed.id, claimed.attempt, &rows, response)
        .await
    {
        Ok(ours) => ours,
        Err(e) => {
            // The run goes on; these events are missing from its stream (the response object
            // at its end is whole).
            tracing::warn!(response_id = %claimed.id, "cannot store the run's events: {e}");
            true
        }
    }
}

/// Generates the response, storing its events as they come; its end.
async fn generate(
    store: &Store,
    claimed: &ClaimedRun,
    mut builder: Builder,
    started: Started,
) -> Ran {
    let Started {
        mut streams,
        mut completion,
        ..
    } = started;
    let Some(mut stream) = streams.pop() else {
        completion.abandon();
        return failed(
            store,
            claimed,
            &ApiError::Internal("no backend stream".into()),
        )
        .await;
    };
    let mut events = builder.start();
    let in_progress = serde_json::to_value(builder.response()).ok();
    if !flush(store, claimed, &mut events, in_progress.as_ref()).await {
        return lost(&mut completion).await;
    }
    let mut status = None;
    let mut flushed = Instant::now();
    while let Some(event) = stream.next().await {
        if let Some(end) = step(event, &mut builder, &mut completion, &mut events) {
            status = Some(end);
            break;
        }
        if flushed.elapsed() >= FLUSH_EVERY {
            if !flush(store, claimed, &mut events, None).await {
                return lost(&mut completion).await;
            }
            flushed = Instant::now();
        }
    }
    let (status, usage) = settle(status, &mut completion).await;
    let run_status = match &status {
        Status::Completed | Status::InProgress => RunStatus::Completed,
        Status::Incomplete => RunStatus::Incomplete,
        Status::Failed(_) => RunStatus::Failed,
    };
    events.extend(builder.finish(status, Some(usage)));
    if !flush(store, claimed, &mut events, None).await {
        return Ran::Lost;
    }
    let Ok(response) = serde_json::to_value(builder.response()) else {
        return Ran::Lost;
    };
    Ran::Ended(RunEnd {
        status: run_status,
        response,
        input_tokens: i64::from(usage.prompt_tokens),
        output_tokens: i64::from(usage.completion_tokens),
    })
}

/// The run was cancelled (or taken over) while generating: it stops, billed for what it
/// produced.
async fn lost(completion: &mut Completion) -> Ran {
    completion.commit(Outcome::Cancelled).await;
    Ran::Lost
}

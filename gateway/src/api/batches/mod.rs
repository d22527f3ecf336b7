//! The Batch API's objects (`/v1/batches`), OpenAI's shapes and lifecycle: create (the batch is
//! `validating` while a tracked task checks every line of its input file, then `in_progress`
//! with its lines in the ledger database, or `failed` with the refused lines in `errors`),
//! retrieve, list and cancel. A batch is its customer's: another customer's id is a 404. Running
//! the lines is not this module's.

pub(crate) mod validate;
pub(crate) mod wire;

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::{Extension, Json};
use futures::StreamExt;
use tollgate_metering::store::{BatchRow, ListOrder, Store};

use crate::api::files::{storage, Paging};
use crate::auth::Caller;
use crate::error::{ApiError, ApiJson, ApiPath};
use crate::files::{unix_now, FileStorage};
use crate::AppState;
use validate::{Checker, LineError};
use wire::{Batch, BatchList, CreateBatch};

/// The one completion window offered.
const WINDOW: &str = "24h";
const WINDOW_SECONDS: i64 = 86_400;
/// At most this many metadata pairs, as OpenAI.
const MAX_METADATA: usize = 16;

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!("No batch found with id '{id}'."))
}

/// Creates a batch of the lines of a `batch` file.
#[utoipa::path(post, operation_id = "create_batch", path = "/v1/batches", tag = "public",
    request_body = CreateBatch,
    responses((status = 200, body = Batch), crate::openapi::PublicErrors),
    security(("api_key" = [])))]
pub(crate) async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiJson(request): ApiJson<CreateBatch>,
) -> Result<Json<Batch>, ApiError> {
    let (store, files) = storage(&state)?;
    if request.completion_window != WINDOW {
        return Err(ApiError::invalid(
            format!(
                "completion_window must be {WINDOW}, not {}",
                request.completion_window
            ),
            "completion_window",
        ));
    }
    if request
        .metadata
        .as_ref()
        .is_some_and(|m| m.len() > MAX_METADATA)
    {
        return Err(ApiError::invalid(
            format!("metadata has more than {MAX_METADATA} pairs"),
            "metadata",
        ));
    }
    let now = unix_now();
    let file = store
        .file(&request.input_file_id, &caller.customer_id, now)
        .await?
        .filter(|f| f.purpose == "batch")
        .ok_or_else(|| {
            ApiError::invalid(
                format!("no batch file {} of yours", request.input_file_id),
                "input_file_id",
            )
        })?;
    let metadata = request
        .metadata
        .as_ref()
        .map(|m| serde_json::Value::Object(m.clone()).to_string());
    let id = format!("batch_{}", uuid::Uuid::now_v7().simple());
    let row = BatchRow::validating(
        id,
        (&caller.customer_id, &caller.key_id),
        request.endpoint,
        file.id,
        metadata,
    )
    .window(WINDOW, now, WINDOW_SECONDS);
    store.insert_batch(&row).await?;
    let (task_state, task_row) = (state.clone(), row.clone());
    state.tasks.spawn(async move {
        if let Err(e) = validate_batch(&task_state, &store, &files, &task_row).await {
            tracing::error!(batch = %task_row.id, "cannot validate the batch: {e}");
            let error = LineError {
                code: "server_error".into(),
                message: "the input file could not be read; create the batch again".into(),
                param: None,
                line: None,
            };
            let errors = serde_json::to_string(&[error]).unwrap_or_default();
            if let Err(e) = store.fail_batch(&task_row.id, &errors, unix_now()).await {
                tracing::error!(batch = %task_row.id, "cannot fail the batch: {e}");
            }
        }
    });
    Ok(Json(Batch::from(&row)))
}

/// Checks every line of the batch's input file; starts the batch or fails it.
async fn validate_batch(
    state: &AppState,
    store: &Store,
    files: &FileStorage,
    batch: &BatchRow,
) -> anyhow::Result<()> {
    let mut checker = Checker::new(state, &batch.customer_id, batch.endpoint);
    let mut stream = files.read(&batch.input_file_id).await?;
    let mut partial: Vec<u8> = Vec::new();
    let mut line = 0i64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        let mut rest = &chunk[..];
        while let Some(at) = rest.iter().position(|&b| b == b'\n') {
            partial.extend_from_slice(&rest[..at]);
            line += 1;
            checker.line(line, &partial);
            partial.clear();
            rest = &rest[at + 1..];
        }
        partial.extend_from_slice(rest);
    }
    if !partial.is_empty() {
        line += 1;
        checker.line(line, &partial);
    }
    let now = unix_now();
    if checker.errors.is_empty() {
        store.start_batch(&batch.id, &checker.lines, now).await?;
    } else {
        store
            .fail_batch(&batch.id, &serde_json::to_string(&checker.errors)?, now)
            .await?;
    }
    Ok(())
}

/// One of the caller's batches.
#[utoipa::path(get, operation_id = "retrieve_batch", path = "/v1/batches/{id}", tag = "public",
    params(("id" = String, Path, description = "The batch id (`batch_...`)")),
    responses((status = 200, body = Batch), crate::openapi::PublicErrors),
    security(("api_key" = [])))]
pub(crate) async fn retrieve(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Batch>, ApiError> {
    let (store, _) = storage(&state)?;
    let row = store
        .batch(&id, &caller.customer_id)
        .await?
        .ok_or_else(|| not_found(&id))?;
    Ok(Json(Batch::from(&row)))
}

/// The caller's batches, newest first.
#[utoipa::path(get, operation_id = "list_batches", path = "/v1/batches", tag = "public",
    params(
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 100),
        ("after" = Option<String>, Query, description = "A batch id: list the batches after it"),
    ),
    responses((status = 200, body = BatchList), crate::openapi::PublicErrors),
    security(("api_key" = [])))]
pub(crate) async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<BatchList>, ApiError> {
    let (store, _) = storage(&state)?;
    let paging = Paging::parse(&query, 20, 100, ListOrder::Desc)?;
    let (rows, has_more) = store
        .batches(
            &caller.customer_id,
            paging.after.as_deref(),
            paging.limit,
            paging.order,
        )
        .await?;
    let data: Vec<Batch> = rows.iter().map(Batch::from).collect();
    Ok(Json(BatchList {
        object: "list",
        first_id: data.first().map(|b| b.id.clone()),
        last_id: data.last().map(|b| b.id.clone()),
        data,
        has_more,
    }))
}

/// Cancels one of the caller's batches: lines not started never run; the batch is
/// `cancelling` while lines still run, then `cancelled`.
#[utoipa::path(post, operation_id = "cancel_batch", path = "/v1/batches/{id}/cancel", tag = "public",
    params(("id" = String, Path, description = "The batch to cancel (`batch_...`)")),
    responses((status = 200, body = Batch), crate::openapi::PublicErrors),
    security(("api_key" = [])))]
pub(crate) async fn cancel(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Batch>, ApiError> {
    let now = unix_now();
    let (store, _) = storage(&state)?;
    let row = store
        .cancel_batch(&id, &caller.customer_id, now)
        .await?
        .ok_or_else(|| not_found(&id))?;
    Ok(Json(Batch::from(&row)))
}

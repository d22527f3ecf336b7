//! The Files API (`/v1/files`), OpenAI's shapes: upload (multipart, `purpose` `batch`, a JSONL
//! file streamed to the object store and checked line by line as it comes, never held whole),
//! list, retrieve, content and delete. A file belongs to the customer whose key uploaded it
//! (another customer's id is a 404), counts against the `[server] files_quota_bytes` of its
//! customer and expires as `expires_after` says. The rows are metering's `files` table, the
//! bytes [`crate::files::FileStorage`]'s.

mod lines;
pub(crate) mod upload;
pub(crate) mod wire;

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use tollgate_metering::store::{FileQuery, ListOrder, Store};

use crate::auth::Caller;
use crate::error::{ApiError, ApiPath};
use crate::files::{unix_now, FileStorage};
use crate::AppState;

use wire::{DeletedFile, FileList, FileObject};

/// A list's paging parameters, as OpenAI's list endpoints take them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Paging {
    pub limit: u32,
    pub order: ListOrder,
    pub after: Option<String>,
}

impl Paging {
    /// `limit` (1..=`max`, `default` when absent), `order` (`asc`/`desc`, `default_order` when
    /// absent) and `after`.
    pub fn parse(
        query: &HashMap<String, String>,
        default: u32,
        max: u32,
        default_order: ListOrder,
    ) -> Result<Self, ApiError> {
        let limit = match query.get("limit") {
            None => default,
            Some(l) => l
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=max).contains(n))
                .ok_or_else(|| ApiError::InvalidRequest {
                    message: format!("limit must be between 1 and {max}, not {l}"),
                    param: Some("limit".into()),
                })?,
        };
        let order = match query.get("order").map(String::as_str) {
            None => default_order,
            Some("asc") => ListOrder::Asc,
            Some("desc") => ListOrder::Desc,
            Some(other) => {
                return Err(ApiError::InvalidRequest {
                    message: format!("order must be asc or desc, not {other}"),
                    param: Some("order".into()),
                })
            }
        };
        Ok(Self {
            limit,
            order,
            after: query.get("after").cloned(),
        })
    }
}

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!("No such File object: {id}"))
}

/// The ledger and the object store: files need both.
pub(crate) fn storage(state: &AppState) -> Result<(Store, FileStorage), ApiError> {
    match (&state.store, &state.files) {
        (Some(store), Some(files)) => Ok((store.clone(), files.clone())),
        _ => Err(ApiError::invalid(
            "the Files API needs the ledger database; this server runs without one",
            None,
        )),
    }
}

/// The caller's files, a page at a time (newest first unless `order=asc`).
#[utoipa::path(get, operation_id = "list_files", path = "/v1/files", tag = "public",
    params(
        ("purpose" = Option<String>, Query, description = "Only files of this purpose"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 10000),
        ("order" = Option<String>, Query, pattern = "^(asc|desc)$"),
        ("after" = Option<String>, Query, description = "A file id: list the files after it"),
    ),
    responses((status = 200, body = FileList), crate::openapi::PublicErrors),
    security(("api_key" = [])))]
pub(crate) async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<FileList>, ApiError> {
    let (store, _) = storage(&state)?;
    let paging = Paging::parse(&query, 10_000, 10_000, ListOrder::Desc)?;
    let (rows, has_more) = store
        .files(&FileQuery {
            customer_id: &caller.customer_id,
            now: unix_now(),
            purpose: query.get("purpose").map(String::as_str),
            after: paging.after.as_deref(),
            limit: paging.limit,
            order: paging.order,
        })
        .await?;
    let data: Vec<FileObject> = rows.iter().map(FileObject::from).collect();
    Ok(Json(FileList {
        object: "list",
        first_id: data.first().map(|f| f.id.clone()),
        last_id: data.last().map(|f| f.id.clone()),
        data,
        has_more,
    }))
}

/// One of the caller's files.
#[utoipa::path(get, operation_id = "retrieve_file", path = "/v1/files/{id}", tag = "public",
    params(("id" = String, Path, description = "The file id (`file-...`)")),
    responses((status = 200, body = FileObject), crate::openapi::PublicErrors),
    security(("api_key" = [])))]
pub(crate) async fn retrieve(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<FileObject>, ApiError> {
    let (store, _) = storage(&state)?;
    let row = store
        .file(&id, &caller.customer_id, unix_now())
        .await?
        .ok_or_else(|| not_found(&id))?;
    Ok(Json(FileObject::from(&row)))
}

/// A file's bytes, streamed from the object store.
#[utoipa::path(get, operation_id = "download_file", path = "/v1/files/{id}/content", tag = "public",
    params(("id" = String, Path, description = "The file id (`file-...`)")),
    responses((status = 200, description = "The file's bytes", content_type = "application/octet-stream"),
        crate::openapi::PublicErrors),
    security(("api_key" = [])))]
pub(crate) async fn content(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let (store, files) = storage(&state)?;
    let row = store
        .file(&id, &caller.customer_id, unix_now())
        .await?
        .ok_or_else(|| not_found(&id))?;
    let stream = files.read(&row.id).await.map_err(|e| match e {
        object_store::Error::NotFound { .. } => not_found(&id),
        other => ApiError::Internal(format!("file {id}: {other}")),
    })?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, row.bytes.to_string()),
        ],
        crate::files::body(stream),
    )
        .into_response())
}

/// Deletes one of the caller's files, row then bytes.
#[utoipa::path(delete, operation_id = "delete_file", path = "/v1/files/{id}", tag = "public",
    params(("id" = String, Path, description = "The file id (`file-...`)")),
    responses((status = 200, body = DeletedFile), crate::openapi::PublicErrors),
    security(("api_key" = [])))]
pub(crate) async fn delete(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<DeletedFile>, ApiError> {
    let (store, files) = storage(&state)?;
    if !store.delete_file(&id, &caller.customer_id).await? {
        return Err(not_found(&id));
    }
    // The row is gone: the file is no more, whatever happens to the bytes.
    if let Err(e) = files.delete(&id).await {
        tracing::warn!(file = %id, "deleted file's bytes remain in the object store: {e}");
    }
    Ok(Json(DeletedFile {
        id,
        object: "file",
        deleted: true,
    }))
}

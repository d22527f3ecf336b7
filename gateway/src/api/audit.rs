//! `GET /admin/v1/audit`: pages of the audit log (whose rows and actors are in
//! `tollgate_metering::audit`).

use axum::extract::{Query, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use tollgate_metering::audit::{Entry, EntryView};
use utoipa::ToSchema;

use crate::error::ApiError;
use crate::AppState;

/// Entries per page of `/admin/v1/audit` unless `limit` says otherwise.
const DEFAULT_PAGE: i64 = 100;
const MAX_PAGE: i64 = 1_000;

/// `GET /admin/v1/audit`.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditPage {
    #[schema(value_type = String, pattern = "^list$")]
    pub object: &'static str,
    pub data: Vec<EntryView>,
    /// Pass as `after` for the next page; `null` on an empty page.
    #[schema(required)]
    pub next_cursor: Option<String>,
    pub has_more: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuditQuery {
    after: Option<String>,
    limit: Option<i64>,
}

// Entries oldest first after the cursor, with the cursor to continue from (`null` on an empty
// page: ask again later with the same cursor) and whether more entries follow it now.
/// The audit log of admin changes, oldest first, for export jobs that consume
/// incrementally.
#[utoipa::path(get, operation_id = "audit", path = "/admin/v1/audit", tag = "admin",
    params(
        ("after" = Option<String>, Query, description = "A `next_cursor`"),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 10000),
    ),
    responses((status = 200, body = AuditPage), crate::openapi::AdminErrors),
    security(("admin_token" = [])))]
pub(crate) async fn list(
    State(state): State<AppState>,
    q: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<AuditPage>, ApiError> {
    let q = crate::error::query(q)?;
    let param = |field: &str, message: String| ApiError::InvalidRequest {
        message,
        param: Some(field.to_string()),
    };
    let after = match q.after.as_deref() {
        None | Some("") => 0,
        Some(c) => tollgate_metering::store::parse_cursor(c).map_err(|e| param("after", e))?,
    };
    let limit = q.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(param(
            "limit",
            format!("limit {limit} must be between 1 and {MAX_PAGE}"),
        ));
    }
    let store = state
        .store
        .as_ref()
        .ok_or_else(|| ApiError::Unavailable("this gateway runs without a database".into()))?;
    // One more than the page: whether another page follows.
    let mut entries = store.audit_after(after, limit + 1).await?;
    let has_more = i64::try_from(entries.len()).is_ok_and(|n| n > limit);
    entries.truncate(usize::try_from(limit).unwrap_or(0));
    Ok(Json(AuditPage {
        object: "list",
        data: entries.iter().map(Entry::view).collect(),
        next_cursor: entries.last().map(|e| e.seq.to_string()),
        has_more,
    }))
}

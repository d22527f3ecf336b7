//! `/admin/v1/customers/{id}/keys` (issue, list) and `/admin/v1/keys/{key_id}` (read, update,
//! revoke). A key's secret is shown once, when it is issued; only its digest is stored.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{Map, Value};

use super::tiers::{allow_priority_field, default_tier_field, TIER_FIELDS};
use super::{invalid_field, limit_field, list, object, reject_unknown, store, string_field};
use crate::error::{ApiBytes, ApiError, ApiPath};
use crate::AppState;
use tollgate_metering::audit::Actor;
use tollgate_metering::billing::parse_time;
use tollgate_metering::money::parse_usd;
use tollgate_metering::periods::rfc3339;
use tollgate_metering::store::{now_micros, KeyFields, NewKey};
use tollgate_metering::tags::Tags;
use tollgate_metering::views::{CreatedKeyView, KeyView};

/// `budget_usd`: a decimal USD string or number (`null` clears it); `None` when absent.
fn key_budget_field(map: &Map<String, Value>) -> Result<Option<Option<i64>>, ApiError> {
    let parsed = |t: &str| {
        parse_usd(t)
            .map(|n| Some(Some(n)))
            .map_err(|e| invalid_field("budget_usd", format!("budget_usd: {e}")))
    };
    match map.get("budget_usd") {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(Value::String(t)) => parsed(t),
        Some(Value::Number(n)) => parsed(&n.to_string()),
        Some(v) => Err(invalid_field(
            "budget_usd",
            format!("budget_usd must be a decimal amount of USD, got {v}"),
        )),
    }
}

/// `tags`: a JSON object of string pairs within the limits of request `metadata`.
fn tags_field(map: &Map<String, Value>) -> Result<Option<Tags>, ApiError> {
    let tags: Tags = match map.get("tags") {
        None => return Ok(None),
        Some(Value::Null) => Tags::new(),
        Some(v) => serde_json::from_value(v.clone()).map_err(|_| {
            invalid_field(
                "tags",
                format!("`tags` must be an object of string values, got {v}"),
            )
        })?,
    };
    tollgate_metering::tags::check(&tags, "tags")
        .map_err(|e| invalid_field(&e.param, e.message))?;
    Ok(Some(tags))
}

/// `expires_at`: RFC 3339 or Unix seconds; must be in the future.
fn expiry_field(map: &Map<String, Value>) -> Result<Option<i64>, ApiError> {
    let micros = match map.get("expires_at") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => {
            parse_time(s).map_err(|e| invalid_field("expires_at", format!("expires_at: {e}")))?
        }
        Some(Value::Number(n)) => match n.as_i64() {
            Some(secs) => secs.saturating_mul(1_000_000),
            None => {
                return Err(invalid_field(
                    "expires_at",
                    format!("expires_at {n} is not whole Unix seconds"),
                ))
            }
        },
        Some(v) => {
            return Err(invalid_field(
                "expires_at",
                format!("expires_at must be an RFC 3339 time or Unix seconds, got {v}"),
            ))
        }
    };
    if micros <= now_micros() {
        return Err(invalid_field(
            "expires_at",
            format!("expires_at {} is in the past", rfc3339(micros)),
        ));
    }
    Ok(Some(micros))
}

fn models_field(
    state: &AppState,
    map: &Map<String, Value>,
) -> Result<Option<Vec<String>>, ApiError> {
    let models = match map.get("models") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str().map(str::to_string).ok_or_else(|| {
                    invalid_field(
                        "models",
                        format!("`models` must be a list of model ids, got {v}"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(v) => {
            return Err(invalid_field(
                "models",
                format!("`models` must be a list of model ids, got {v}"),
            ))
        }
    };
    if let Some(unknown) = models
        .iter()
        .find(|m| !state.catalogue.current().models.contains_key(*m))
    {
        return Err(invalid_field(
            "models",
            format!("unknown model `{unknown}` in `models`"),
        ));
    }
    Ok(Some(models))
}

/// Issues a key; its secret is in this answer only.
#[utoipa::path(post, path = "/admin/v1/customers/{id}/keys", tag = "admin",
    params(("id" = String, Path)),
    request_body = crate::openapi::admin_schemas::CreateKey,
    responses((status = 201, body = tollgate_metering::views::CreatedKeyView), crate::openapi::AdminErrors),
    security(("admin_token" = [])))]
pub(super) async fn create_key(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    ApiPath(customer_id): ApiPath<String>,
    ApiBytes(body): ApiBytes,
) -> Result<Response, ApiError> {
    let map = object(&body)?;
    reject_unknown(
        &map,
        &[
            &[
                "name",
                "models",
                "rpm",
                "tpm",
                "expires_at",
                "tags",
                "budget_usd",
                "max_concurrent_requests",
            ][..],
            TIER_FIELDS,
        ]
        .concat(),
    )?;
    let new = NewKey {
        name: string_field(&map, "name")?.unwrap_or_default(),
        models: models_field(&state, &map)?,
        rpm: limit_field(&map, "rpm")?.flatten(),
        tpm: limit_field(&map, "tpm")?.flatten(),
        expires_at: expiry_field(&map)?,
        tags: tags_field(&map)?.unwrap_or_default(),
        budget_nano_usd: key_budget_field(&map)?.flatten(),
        max_concurrent_requests: limit_field(&map, "max_concurrent_requests")?.flatten(),
        default_service_tier: default_tier_field(&map)?.flatten(),
        allow_priority: allow_priority_field(&map)?,
    };
    let (created, secret) = store(&state)?.issue_key(&customer_id, new, &actor).await?;
    let body = CreatedKeyView {
        key: KeyView::from(&created),
        secret,
    };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// A customer's keys, without their secrets.
#[utoipa::path(get, path = "/admin/v1/customers/{id}/keys", tag = "admin",
    params(("id" = String, Path)),
    responses((status = 200, body = crate::openapi::admin_schemas::ApiKeyList), crate::openapi::AdminErrors),
    security(("admin_token" = [])))]
pub(super) async fn list_keys(
    State(state): State<AppState>,
    ApiPath(customer_id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let keys = store(&state)?.list_keys(&customer_id).await?;
    Ok(list(keys.iter().map(KeyView::from).collect()))
}

/// A key (without its secret), with the customer it belongs to.
#[utoipa::path(get, path = "/admin/v1/keys/{key_id}", tag = "admin",
    params(("key_id" = String, Path)),
    responses((status = 200, body = tollgate_metering::views::KeyView), crate::openapi::AdminErrors),
    security(("admin_token" = [])))]
pub(super) async fn get_key(
    State(state): State<AppState>,
    ApiPath(key_id): ApiPath<String>,
) -> Result<Json<KeyView>, ApiError> {
    Ok(Json(KeyView::from(&store(&state)?.key(&key_id).await?)))
}

/// The fields `PATCH /admin/v1/keys/{key_id}` changes.
const KEY_CHANGES: &[&str] = &[
    "name",
    "models",
    "rpm",
    "tpm",
    "max_concurrent_requests",
    "expires_at",
    "tags",
    "budget_usd",
    "default_service_tier",
    "allow_priority",
];

// Changes the given fields (`null` clears a limit, the model list, the expiry or the budget;
// `{}` or `null` clears the tags). Requests made with the key see the change within the key
// cache's lifetime (at once on this gateway).
/// Changes a key's limits, models, expiry, default tags or budget (`null` clears one).
#[utoipa::path(patch, path = "/admin/v1/keys/{key_id}", tag = "admin",
    params(("key_id" = String, Path)),
    request_body = crate::openapi::admin_schemas::UpdateKey,
    responses((status = 200, body = tollgate_metering::views::KeyView), crate::openapi::AdminErrors),
    security(("admin_token" = [])))]
pub(super) async fn update_key(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    ApiPath(key_id): ApiPath<String>,
    ApiBytes(body): ApiBytes,
) -> Result<Json<KeyView>, ApiError> {
    let map = object(&body)?;
    reject_unknown(&map, KEY_CHANGES)?;
    let name = string_field(&map, "name")?;
    if name.as_deref().is_some_and(|n| n.trim().is_empty()) {
        return Err(invalid_field("name", "`name` must not be empty".into()));
    }
    let fields = KeyFields {
        name,
        models: match map.get("models") {
            None => None,
            Some(Value::Null) => Some(None),
            Some(_) => Some(models_field(&state, &map)?),
        },
        rpm: limit_field(&map, "rpm")?,
        tpm: limit_field(&map, "tpm")?,
        max_concurrent_requests: limit_field(&map, "max_concurrent_requests")?,
        expires_at: match map.get("expires_at") {
            None => None,
            Some(_) => Some(expiry_field(&map)?),
        },
        tags: tags_field(&map)?,
        budget_nano_usd: key_budget_field(&map)?,
        default_service_tier: default_tier_field(&map)?,
        allow_priority: allow_priority_field(&map)?,
    };
    if fields.is_empty() {
        return Err(invalid_field(
            "tags",
            format!("nothing to change: give one of {}", KEY_CHANGES.join(", ")),
        ));
    }
    let key = store(&state)?
        .set_key_fields(&key_id, fields, &actor)
        .await?;
    state.auth.forget_key(&key_id);
    Ok(Json(KeyView::from(&key)))
}

/// Revokes a key at once.
#[utoipa::path(delete, path = "/admin/v1/keys/{key_id}", tag = "admin",
    params(("key_id" = String, Path)),
    responses((status = 200, body = tollgate_metering::views::KeyView), crate::openapi::AdminErrors),
    security(("admin_token" = [])))]
pub(super) async fn revoke_key(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    ApiPath(key_id): ApiPath<String>,
) -> Result<Json<KeyView>, ApiError> {
    let key = store(&state)?.revoke_key(&key_id, &actor).await?;
    state.auth.forget_key(&key_id);
    Ok(Json(KeyView::from(&key)))
}

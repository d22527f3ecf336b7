//! The operators' API: customers, keys, usage aggregates, the record cursor and
//! invoices, behind `Authorization: Bearer $TOLLGATE_ADMIN_TOKEN`. Mounted only when the token
//! is set. JSON in and out, OpenAI's error shape, money as decimal strings.

use axum::extract::{ConnectInfo, Query, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde_json::{json, Map, Value};

use crate::api::admin_tokens;
use crate::error::ApiError;
use crate::{AppState, RequestId};
use tollgate_metering::audit::Actor;
use tollgate_metering::money::format_usd;
use tollgate_metering::periods::rfc3339;
use tollgate_metering::store::{ApiKey, Customer, Store};

/// Records per page of `/admin/v1/usage/records` unless `limit` says otherwise.
const DEFAULT_PAGE: i64 = 100;
const MAX_PAGE: i64 = 10_000;

mod customers;
mod keys;
mod usage;

use customers::{
    create_customer, get_alert_settings, get_customer, list_alerts, list_customers,
    put_alert_settings, update_customer,
};
pub use keys::issue_key;
use keys::{create_key, get_key, list_keys, revoke_key, update_key};
pub use usage::parse_cursor;
use usage::{invoice, usage, usage_records};

pub fn router(state: AppState) -> Router<AppState> {
    Router::new()
        .route(
            "/admin/v1/customers",
            get(list_customers).post(create_customer),
        )
        .route(
            "/admin/v1/customers/{id}",
            get(get_customer).patch(update_customer),
        )
        .route(
            "/admin/v1/customers/{id}/keys",
            get(list_keys).post(create_key),
        )
        .route(
            "/admin/v1/keys/{key_id}",
            get(get_key).delete(revoke_key).patch(update_key),
        )
        .route(
            "/admin/v1/customers/{id}/alerts",
            get(get_alert_settings).put(put_alert_settings),
        )
        .route("/admin/v1/alerts", get(list_alerts))
        .route("/admin/v1/usage", get(usage))
        .route("/admin/v1/usage/records", get(usage_records))
        .route("/admin/v1/invoices/{customer_id}", get(invoice))
        .route("/admin/v1/audit", get(crate::api::audit::list))
        .route(
            "/admin/v1/admin_tokens",
            get(admin_tokens::list_handler).post(admin_tokens::create),
        )
        .route(
            "/admin/v1/admin_tokens/{id}",
            delete(admin_tokens::revoke_handler),
        )
        .route_layer(middleware::from_fn_with_state(state, require_admin))
}

/// Admits the bootstrap token or an issued admin token whose scopes cover the route
/// (`admin_tokens::authorize`), and puts the caller's `AdminIdentity` in the extensions.
async fn require_admin(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    match admin_tokens::authorize(&state, admin_tokens::AdminRequest::of(&request)).await {
        Ok(identity) => {
            let actor = Actor::admin_api(
                &identity.token_id,
                remote_addr(&request),
                request.extensions().get::<RequestId>().map(|r| r.0.clone()),
            );
            request.extensions_mut().insert(actor);
            request.extensions_mut().insert(identity);
            if let Err(e) = known_params(&request) {
                return e.into_response();
            }
            next.run(request).await
        }
        Err(refusal) => refusal,
    }
}

/// The query parameters each admin route takes (by route template); a route not named takes
/// none, so every admin route refuses a parameter it would ignore.
fn route_params(route: &str) -> &'static [&'static str] {
    match route {
        "/admin/v1/usage" => &[
            "start",
            "end",
            "customer_id",
            "model",
            "tag",
            "group_by",
            "format",
        ],
        "/admin/v1/usage/records" => &[
            "after",
            "limit",
            "customer_id",
            "key_id",
            "model",
            "status",
            "start",
            "end",
        ],
        "/admin/v1/invoices/{customer_id}" => &["period", "tag", "group_by"],
        "/admin/v1/audit" => &["after", "limit"],
        "/admin/v1/alerts" => &["customer_id", "limit"],
        _ => &[],
    }
}

/// A 400 naming the first query parameter the route does not take.
fn known_params(request: &Request) -> Result<(), ApiError> {
    let Some(raw) = request.uri().query() else {
        return Ok(());
    };
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("", |p| p.as_str());
    let allowed = route_params(route);
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw)
        .map_err(|e| ApiError::invalid(format!("invalid query: {e}"), None))?;
    match pairs.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
        None => Ok(()),
        Some((k, _)) => Err(ApiError::InvalidRequest {
            message: if allowed.is_empty() {
                format!("unknown query parameter `{}`; {route} takes none", shown(k))
            } else {
                format!(
                    "unknown query parameter `{}`; {route} takes {}",
                    shown(k),
                    allowed.join(", ")
                )
            },
            param: Some(shown(k)),
        }),
    }
}

/// The peer's address (as the listener accepted it), for the audit log.
pub(crate) fn remote_addr(request: &Request) -> Option<String> {
    request
        .extensions()
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.to_string())
}

fn store(state: &AppState) -> Result<&Store, ApiError> {
    state
        .store
        .as_ref()
        .ok_or_else(|| ApiError::Unavailable("this gateway runs without a database".into()))
}

/// A JSON object body (whatever the `Content-Type`, so `curl -d` works); anything else is a
/// 400 naming the problem.
fn object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let text = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        body
    };
    match serde_json::from_slice::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::invalid(
            "the request body must be a JSON object",
            None,
        )),
        Err(e) => Err(ApiError::invalid(format!("invalid JSON body: {e}"), None)),
    }
}

fn reject_unknown(map: &Map<String, Value>, allowed: &[&str]) -> Result<(), ApiError> {
    match map.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(ApiError::InvalidRequest {
            message: format!(
                "unknown field `{k}`; expected one of {}",
                allowed.join(", ")
            ),
            param: Some(k.clone()),
        }),
        None => Ok(()),
    }
}

fn invalid_field(field: &str, message: String) -> ApiError {
    ApiError::InvalidRequest {
        message,
        param: Some(field.to_string()),
    }
}

fn string_field(map: &Map<String, Value>, field: &str) -> Result<Option<String>, ApiError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(invalid_field(
            field,
            format!("`{field}` must be a string, got {v}"),
        )),
    }
}

/// Absent → `None`; `null` → `Some(None)`; a positive integer → `Some(Some(n))`.
fn limit_field(map: &Map<String, Value>, field: &str) -> Result<Option<Option<i64>>, ApiError> {
    match map.get(field) {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(v) => match v.as_i64() {
            Some(n) if n > 0 => Ok(Some(Some(n))),
            _ => Err(invalid_field(
                field,
                format!("`{field}` must be a positive integer or null, got {v}"),
            )),
        },
    }
}

/// Ids are what operators and billing systems join on: short, printable, no spaces.
pub fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// A value quoted back in an error, cut to a readable length (a 3 MB id is not echoed).
fn shown(value: &str) -> String {
    const MAX: usize = 80;
    match value.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}…", &value[..end]),
        None => value.to_string(),
    }
}

pub fn customer_json(c: &Customer) -> Value {
    json!({
        "object": "customer",
        "id": c.id,
        "name": c.name,
        "budget_usd": c.budget_nano_usd.map(format_usd),
        "budget_period": c.budget_period,
        "rpm": c.rpm,
        "tpm": c.tpm,
        "max_concurrent_requests": c.max_concurrent_requests,
        "scheduling_weight": c.scheduling_weight,
        "created_at": rfc3339(c.created_at),
    })
}

pub fn key_json(k: &ApiKey) -> Value {
    json!({
        "object": "api_key",
        "id": k.id,
        "customer_id": k.customer_id,
        "name": k.name,
        "key_prefix": k.key_prefix,
        "models": k.models,
        "rpm": k.rpm,
        "tpm": k.tpm,
        "expires_at": k.expires_at.map(rfc3339),
        "revoked_at": k.revoked_at.map(rfc3339),
        "created_at": rfc3339(k.created_at),
        "tags": k.tags,
        "budget_usd": k.budget_nano_usd.map(format_usd),
        "max_concurrent_requests": k.max_concurrent_requests,
    })
}

fn list(data: Vec<Value>) -> Json<Value> {
    Json(json!({"object": "list", "data": data}))
}

/// A query string, or a 400 naming what is wrong with it.
pub(crate) fn query<T: serde::de::DeserializeOwned>(
    q: Result<Query<T>, axum::extract::rejection::QueryRejection>,
) -> Result<T, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::invalid(format!("invalid query: {}", e.body_text()), None))
}

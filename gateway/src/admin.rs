//! The operators' API: customers, keys, usage aggregates, the record cursor and
//! invoices, behind `Authorization: Bearer $TOLLGATE_ADMIN_TOKEN`. Mounted only when the token
//! is set. JSON in and out, OpenAI's error shape, money as decimal strings.

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::admin_tokens;
use crate::auth::{digest, hex, new_key};
use crate::error::ApiError;
use crate::{AppState, RequestId};
use tollgate_metering::audit::Actor;
use tollgate_metering::billing::{self, parse_time};
use tollgate_metering::money::{format_usd, parse_usd};
use tollgate_metering::periods::month_bounds;
use tollgate_metering::periods::rfc3339;
use tollgate_metering::store::{
    now_micros, ApiKey, Customer, CustomerFields, NewKey, Store, UsageFilter,
};
use tollgate_metering::tags::Tags;

/// Records per page of `/admin/v1/usage/records` unless `limit` says otherwise.
const DEFAULT_PAGE: i64 = 100;
const MAX_PAGE: i64 = 10_000;

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
            delete(revoke_key).patch(update_key),
        )
        .route(
            "/admin/v1/customers/{id}/alerts",
            get(get_alert_settings).put(put_alert_settings),
        )
        .route("/admin/v1/alerts", get(list_alerts))
        .route("/admin/v1/usage", get(usage))
        .route("/admin/v1/usage/records", get(usage_records))
        .route("/admin/v1/invoices/{customer_id}", get(invoice))
        .route("/admin/v1/audit", get(crate::audit::list))
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
            next.run(request).await
        }
        Err(refusal) => refusal,
    }
}

/// The peer's address (as the listener accepted it), for the audit log.
pub(crate) fn remote_addr(request: &Request) -> Option<String> {
    request
        .extensions()
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.to_string())
}

/// The fields of a customer that the admin API sets (besides its `id`, set at creation).
const CUSTOMER_FIELDS: &[&str] = &[
    "name",
    "budget_usd",
    "budget_period",
    "rpm",
    "tpm",
    "max_concurrent_requests",
];

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

/// `budget_usd`: a decimal string or a number (`"25.50"`, `25.5`), or `null` for none.
fn budget_field(map: &Map<String, Value>) -> Result<Option<Option<i64>>, ApiError> {
    let text = match map.get("budget_usd") {
        None => return Ok(None),
        Some(Value::Null) => return Ok(Some(None)),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(v) => {
            return Err(invalid_field(
                "budget_usd",
                format!("`budget_usd` must be a decimal string or a number, got {v}"),
            ))
        }
    };
    parse_usd(&text)
        .map(|n| Some(Some(n)))
        .map_err(|e| invalid_field("budget_usd", format!("budget_usd: {e}")))
}

fn period_field(map: &Map<String, Value>) -> Result<Option<String>, ApiError> {
    match string_field(map, "budget_period")? {
        None => Ok(None),
        Some(p) if p == "monthly" => Ok(Some(p)),
        Some(p) => Err(invalid_field(
            "budget_period",
            format!("budget_period `{p}` is not supported; use \"monthly\" (UTC calendar months)"),
        )),
    }
}

fn customer_fields(map: &Map<String, Value>) -> Result<CustomerFields, ApiError> {
    let name = string_field(map, "name")?;
    if name.as_deref().is_some_and(|n| n.trim().is_empty()) {
        return Err(invalid_field("name", "`name` must not be empty".into()));
    }
    Ok(CustomerFields {
        name,
        budget_nano_usd: budget_field(map)?,
        budget_period: period_field(map)?,
        rpm: limit_field(map, "rpm")?,
        tpm: limit_field(map, "tpm")?,
        max_concurrent_requests: limit_field(map, "max_concurrent_requests")?,
    })
}

/// Ids are what operators and billing systems join on: short, printable, no spaces.
pub fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
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

fn list(data: Vec<Value>) -> Json<Value> {
    Json(json!({"object": "list", "data": data}))
}

async fn create_customer(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let map = object(&body)?;
    reject_unknown(&map, &[&["id"], CUSTOMER_FIELDS].concat())?;
    let id =
        string_field(&map, "id")?.ok_or_else(|| invalid_field("id", "`id` is required".into()))?;
    if !valid_id(&id) {
        return Err(invalid_field(
            "id",
            format!("`{id}` is not a valid id: 1-64 characters of letters, digits, `-`, `_`, `.`"),
        ));
    }
    let mut fields = customer_fields(&map)?;
    fields.name.get_or_insert_with(|| id.clone());
    let customer = store(&state)?.create_customer(&id, fields, &actor).await?;
    Ok((StatusCode::CREATED, Json(customer_json(&customer))).into_response())
}

async fn list_customers(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let customers = store(&state)?.list_customers().await?;
    Ok(list(customers.iter().map(customer_json).collect()))
}

async fn get_customer(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let store = store(&state)?;
    let customer = store.customer(&id).await?;
    let (start, _) = month_bounds(now_micros());
    let spent = store.spent_since(&id, start).await?;
    let mut body = customer_json(&customer);
    body["spent_usd_this_period"] = json!(format_usd(spent));
    Ok(Json(body))
}

async fn update_customer(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let map = object(&body)?;
    reject_unknown(&map, CUSTOMER_FIELDS)?;
    let fields = customer_fields(&map)?;
    let customer = store(&state)?.update_customer(&id, fields, &actor).await?;
    state.auth.forget_customer(&id);
    Ok(Json(customer_json(&customer)))
}

async fn get_alert_settings(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let settings = store(&state)?.alert_settings(&id).await?;
    Ok(Json(crate::alerts::settings_json(&settings, None)))
}

/// `{"webhook_url": URL | null, "thresholds": [fractions], "rotate_secret": bool}`; the
/// answer carries `webhook_secret` when one was made (shown once).
async fn put_alert_settings(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let map = object(&body)?;
    reject_unknown(&map, &["webhook_url", "thresholds", "rotate_secret"])?;
    let webhook_url = match map.get("webhook_url") {
        None => None,
        Some(Value::Null) => Some(None),
        Some(Value::String(u)) => {
            crate::alerts::check_webhook_url(u).map_err(|e| invalid_field("webhook_url", e))?;
            Some(Some(u.clone()))
        }
        Some(v) => {
            return Err(invalid_field(
                "webhook_url",
                format!("`webhook_url` must be a URL string or null, got {v}"),
            ))
        }
    };
    let thresholds = match map.get("thresholds") {
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) => {
            let texts = items
                .iter()
                .map(|v| match v {
                    Value::Number(n) => Ok(n.to_string()),
                    Value::String(s) => Ok(s.clone()),
                    other => Err(invalid_field(
                        "thresholds",
                        format!("thresholds are fractions of the budget, got {other}"),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?;
            crate::alerts::parse_thresholds(&texts).map_err(|e| invalid_field("thresholds", e))?;
            Some(texts)
        }
        Some(v) => {
            return Err(invalid_field(
                "thresholds",
                format!("`thresholds` must be a list of fractions, got {v}"),
            ))
        }
    };
    let rotate_secret = match map.get("rotate_secret") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => {
            return Err(invalid_field(
                "rotate_secret",
                format!("`rotate_secret` must be a boolean, got {v}"),
            ))
        }
    };
    let change = crate::alerts::SettingsChange {
        webhook_url,
        thresholds,
        rotate_secret,
    };
    let (settings, secret) =
        crate::alerts::update_settings(store(&state)?, &id, change, &actor).await?;
    Ok(Json(crate::alerts::settings_json(
        &settings,
        secret.as_deref(),
    )))
}

/// `GET /admin/v1/alerts?customer_id=&limit=`: budget alerts, oldest first, with their
/// delivery.
async fn list_alerts(
    State(state): State<AppState>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let limit = match q.get("limit") {
        None => DEFAULT_PAGE,
        Some(l) => match l.parse::<i64>() {
            Ok(n) if (1..=MAX_PAGE).contains(&n) => n,
            _ => {
                return Err(invalid_field(
                    "limit",
                    format!("limit must be between 1 and {MAX_PAGE}, not {l}"),
                ))
            }
        },
    };
    let alerts = store(&state)?
        .list_alerts(q.get("customer_id").map(String::as_str), limit)
        .await?;
    Ok(list(alerts.iter().map(crate::alerts::alert_json).collect()))
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
        .find(|m| !state.config.models.contains_key(*m))
    {
        return Err(invalid_field(
            "models",
            format!("unknown model `{unknown}` in `models`"),
        ));
    }
    Ok(Some(models))
}

async fn create_key(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(customer_id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let map = object(&body)?;
    reject_unknown(
        &map,
        &[
            "name",
            "models",
            "rpm",
            "tpm",
            "expires_at",
            "tags",
            "budget_usd",
            "max_concurrent_requests",
        ],
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
    };
    let (created, secret) = issue_key(store(&state)?, &customer_id, new, &actor).await?;
    let mut body = key_json(&created);
    body["key"] = json!(secret);
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// Creates a key for a customer: returns it and its secret, which is never stored (only its
/// SHA-256) and cannot be shown again.
pub async fn issue_key(
    store: &Store,
    customer_id: &str,
    new: NewKey,
    actor: &Actor,
) -> Result<(ApiKey, String), tollgate_metering::store::StoreError> {
    let (id, secret) = new_key();
    let prefix: String = secret.chars().take(9).collect();
    let key = store
        .create_key(
            customer_id,
            &id,
            &hex(&digest(&secret)),
            &prefix,
            new,
            actor,
        )
        .await?;
    Ok((key, secret))
}

async fn list_keys(
    State(state): State<AppState>,
    Path(customer_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let keys = store(&state)?.list_keys(&customer_id).await?;
    Ok(list(keys.iter().map(key_json).collect()))
}

/// `PATCH /admin/v1/keys/{key_id}` `{"tags": {...}}`: replaces the key's default tags (`null`
/// or `{}` clears them). Requests made with the key see them within the key cache's lifetime.
async fn update_key(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(key_id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let map = object(&body)?;
    reject_unknown(&map, &["tags", "budget_usd"])?;
    let tags = tags_field(&map)?;
    let budget = key_budget_field(&map)?;
    if tags.is_none() && budget.is_none() {
        return Err(invalid_field(
            "tags",
            "nothing to change: give `tags` or `budget_usd`".into(),
        ));
    }
    let store = store(&state)?;
    let mut key = store.key(&key_id).await?;
    if let Some(tags) = tags {
        key = store.set_key_tags(&key_id, &tags, &actor).await?;
    }
    if let Some(budget) = budget {
        key = store.set_key_budget(&key_id, budget, &actor).await?;
    }
    state.auth.forget_key(&key_id);
    Ok(Json(key_json(&key)))
}

async fn revoke_key(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(key_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let key = store(&state)?.revoke_key(&key_id, &actor).await?;
    state.auth.forget_key(&key_id);
    Ok(Json(key_json(&key)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageQuery {
    start: Option<String>,
    end: Option<String>,
    customer_id: Option<String>,
    model: Option<String>,
    /// `key:value`: only records with this tag.
    tag: Option<String>,
    group_by: Option<String>,
    format: Option<String>,
}

/// The `tag` query parameter.
fn tag_filter(tag: Option<&str>) -> Result<Option<(String, String)>, ApiError> {
    tag.map(|t| billing::parse_tag_filter(t).map_err(|e| invalid_field("tag", e)))
        .transpose()
}

/// A query string, or a 400 naming what is wrong with it.
pub(crate) fn query<T: serde::de::DeserializeOwned>(
    q: Result<Query<T>, axum::extract::rejection::QueryRejection>,
) -> Result<T, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::invalid(format!("invalid query: {}", e.body_text()), None))
}

/// `start` defaults to the start of the current UTC month, `end` to now.
fn time_range(start: Option<&str>, end: Option<&str>) -> Result<(i64, i64), ApiError> {
    let now = now_micros();
    let start = match start {
        Some(s) => parse_time(s).map_err(|e| invalid_field("start", format!("start: {e}")))?,
        None => month_bounds(now).0,
    };
    let end = match end {
        Some(s) => parse_time(s).map_err(|e| invalid_field("end", format!("end: {e}")))?,
        None => now + 1,
    };
    if end <= start {
        return Err(invalid_field(
            "end",
            format!("end {} is not after start {}", rfc3339(end), rfc3339(start)),
        ));
    }
    Ok((start, end))
}

async fn usage(
    State(state): State<AppState>,
    q: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let q = query(q)?;
    let (start, end) = time_range(q.start.as_deref(), q.end.as_deref())?;
    let groups = billing::parse_group_by(q.group_by.as_deref().unwrap_or(""))
        .map_err(|e| invalid_field("group_by", e))?;
    let filter = UsageFilter {
        start,
        end,
        customer_id: q.customer_id,
        model: q.model,
        tag: tag_filter(q.tag.as_deref())?,
    };
    let rows = store(&state)?.aggregate(&filter, &groups, None).await?;
    let columns = billing::usage_columns(&groups);
    match q.format.as_deref().unwrap_or("json") {
        "json" => Ok(Json(json!({
            "object": "list",
            "start": rfc3339(start),
            "end": rfc3339(end),
            "data": rows.iter().map(|r| billing::usage_row_json(r, &columns)).collect::<Vec<_>>(),
        }))
        .into_response()),
        "csv" => {
            let text = billing::usage_csv(&rows, &columns)
                .map_err(|e| ApiError::Internal(e.to_string()))?;
            Ok(([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], text).into_response())
        }
        other => Err(invalid_field(
            "format",
            format!("format `{other}` is not supported; use json or csv"),
        )),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordsQuery {
    after: Option<String>,
    limit: Option<i64>,
}

/// Parses an export cursor (opaque to clients; a ledger sequence number here).
pub fn parse_cursor(text: &str) -> Result<i64, String> {
    text.trim()
        .parse::<i64>()
        .ok()
        .filter(|c| *c >= 0)
        .ok_or_else(|| format!("`{text}` is not a cursor returned by this API"))
}

async fn usage_records(
    State(state): State<AppState>,
    q: Result<Query<RecordsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let q = query(q)?;
    let after = match q.after.as_deref() {
        None | Some("") => 0,
        Some(c) => parse_cursor(c).map_err(|e| invalid_field("after", e))?,
    };
    let limit = q.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(invalid_field(
            "limit",
            format!("limit {limit} must be between 1 and {MAX_PAGE}"),
        ));
    }
    let (records, last) = store(&state)?.records_after(after, limit).await?;
    let has_more = records.len() as i64 == limit;
    Ok(Json(json!({
        "object": "list",
        "data": records.iter().map(billing::record_json).collect::<Vec<_>>(),
        "next_cursor": last.map(|c| c.to_string()),
        "has_more": has_more,
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InvoiceQuery {
    period: Option<String>,
    /// `key:value`: only records with this tag.
    tag: Option<String>,
    /// `tag:KEY`: lines split by the value of this tag.
    group_by: Option<String>,
}

async fn invoice(
    State(state): State<AppState>,
    Path(customer_id): Path<String>,
    q: Result<Query<InvoiceQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let q = query(q)?;
    let period = q.period.unwrap_or_else(billing::current_period);
    billing::parse_period(&period).map_err(|e| invalid_field("period", e))?;
    let group_tag = match q.group_by.as_deref() {
        None | Some("") => None,
        Some(g) => match g.strip_prefix("tag:") {
            Some(key) if !key.is_empty() => Some(key.to_string()),
            _ => {
                return Err(invalid_field(
                    "group_by",
                    format!("invoices group by `tag:KEY` only, not `{g}`"),
                ))
            }
        },
    };
    let tag = tag_filter(q.tag.as_deref())?;
    Ok(Json(
        billing::invoice_for(store(&state)?, &customer_id, &period, tag, group_tag).await?,
    ))
}

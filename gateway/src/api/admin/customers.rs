//! `/admin/v1/customers` (create, list, read, update) and the customers' budget alerts
//! (`/admin/v1/customers/{id}/alerts`, `/admin/v1/alerts`).

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{Map, Value};

use super::tiers::{allow_priority_field, default_tier_field};
use super::{
    invalid_field, limit_field, list, object, reject_unknown, store, string_field, valid_id,
    DEFAULT_PAGE, MAX_PAGE,
};
use crate::error::{ApiBytes, ApiError, ApiPath};
use crate::AppState;
use tollgate_metering::alerts;
use tollgate_metering::audit::Actor;
use tollgate_metering::kinds::BudgetPeriod;
use tollgate_metering::money::parse_usd;
use tollgate_metering::periods::month_bounds;
use tollgate_metering::store::{now_micros, CustomerFields, MAX_SCHEDULING_WEIGHT};
use tollgate_metering::views::CustomerView;

/// The fields of a customer that the admin API sets (besides its `id`, set at creation).
const CUSTOMER_FIELDS: &[&str] = &[
    "name",
    "budget_usd",
    "budget_period",
    "rpm",
    "tpm",
    "max_concurrent_requests",
    "scheduling_weight",
    "default_service_tier",
    "allow_priority",
];

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

fn period_field(map: &Map<String, Value>) -> Result<Option<BudgetPeriod>, ApiError> {
    let Some(p) = string_field(map, "budget_period")? else {
        return Ok(None);
    };
    match p.parse() {
        Ok(period) => Ok(Some(period)),
        Err(_) => Err(invalid_field(
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
        scheduling_weight: weight_field(map)?,
        default_service_tier: default_tier_field(map)?,
        allow_priority: allow_priority_field(map)?,
    })
}

/// `scheduling_weight`: an integer from 1 to [`MAX_SCHEDULING_WEIGHT`].
fn weight_field(map: &Map<String, Value>) -> Result<Option<i64>, ApiError> {
    let Some(v) = map.get("scheduling_weight") else {
        return Ok(None);
    };
    match v.as_i64() {
        Some(w) if (1..=MAX_SCHEDULING_WEIGHT).contains(&w) => Ok(Some(w)),
        _ => Err(invalid_field(
            "scheduling_weight",
            format!(
                "`scheduling_weight` must be an integer from 1 to {MAX_SCHEDULING_WEIGHT}, got {v}"
            ),
        )),
    }
}

#[utoipa::path(post, path = "/admin/v1/customers", tag = "admin",
    request_body = crate::openapi::admin_schemas::CreateCustomer,
    responses((status = 201, body = tollgate_metering::views::CustomerView), crate::openapi::AdminErrors),
    security(("admin_token" = [])))]
pub(super) async fn create_customer(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    ApiBytes(body): ApiBytes,
) -> Result<Response, ApiError> {
    let map = object(&body)?;
    reject_unknown(&map, &[&["id"], CUSTOMER_FIELDS].concat())?;
    let id =
        string_field(&map, "id")?.ok_or_else(|| invalid_field("id", "`id` is required".into()))?;
    if !valid_id(&id) {
        return Err(invalid_field(
            "id",
            format!(
                "`{}` is not a valid id: 1-64 characters of letters, digits, `-`, `_`, `.`",
                super::shown(&id)
            ),
        ));
    }
    let mut fields = customer_fields(&map)?;
    fields.name.get_or_insert_with(|| id.clone());
    let customer = store(&state)?.create_customer(&id, fields, &actor).await?;
    Ok((StatusCode::CREATED, Json(CustomerView::from(&customer))).into_response())
}

#[utoipa::path(get, path = "/admin/v1/customers", tag = "admin",
    responses((status = 200, body = crate::openapi::admin_schemas::CustomerList), crate::openapi::AdminErrors),
    security(("admin_token" = [])))]
pub(super) async fn list_customers(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let customers = store(&state)?.list_customers().await?;
    Ok(list(customers.iter().map(CustomerView::from).collect()))
}

/// A customer with its spend in the current budget period.
#[utoipa::path(get, path = "/admin/v1/customers/{id}", tag = "admin",
    params(("id" = String, Path)),
    responses((status = 200, body = tollgate_metering::views::CustomerView), crate::openapi::AdminErrors),
    security(("admin_token" = [])))]
pub(super) async fn get_customer(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<CustomerView>, ApiError> {
    let store = store(&state)?;
    let customer = store.customer(&id).await?;
    let (start, _) = month_bounds(now_micros());
    let spent = store.spent_since(&id, start).await?;
    Ok(Json(CustomerView::from(&customer).with_spend(spent)))
}

#[utoipa::path(patch, path = "/admin/v1/customers/{id}", tag = "admin",
    params(("id" = String, Path)),
    request_body = crate::openapi::admin_schemas::UpdateCustomer,
    responses((status = 200, body = tollgate_metering::views::CustomerView), crate::openapi::AdminErrors),
    security(("admin_token" = [])))]
pub(super) async fn update_customer(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    ApiPath(id): ApiPath<String>,
    ApiBytes(body): ApiBytes,
) -> Result<Json<CustomerView>, ApiError> {
    let map = object(&body)?;
    reject_unknown(&map, CUSTOMER_FIELDS)?;
    let fields = customer_fields(&map)?;
    let customer = store(&state)?.update_customer(&id, fields, &actor).await?;
    state.auth.forget_customer(&id);
    Ok(Json(CustomerView::from(&customer)))
}

/// A customer's budget-alert settings.
#[utoipa::path(get, path = "/admin/v1/customers/{id}/alerts", tag = "admin",
    params(("id" = String, Path)),
    responses((status = 200, body = crate::openapi::admin_schemas::AlertSettings), crate::openapi::AdminErrors),
    security(("admin_token" = [])))]
pub(super) async fn get_alert_settings(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let settings = store(&state)?.alert_settings(&id).await?;
    Ok(Json(alerts::settings_json(&settings, None)))
}

// `{"webhook_url": URL | null, "thresholds": [fractions], "rotate_secret": bool}`; the
// answer carries `webhook_secret` when one was made (shown once).
/// Sets the webhook and thresholds; a new signing secret is in this answer only.
#[utoipa::path(put, path = "/admin/v1/customers/{id}/alerts", tag = "admin",
    params(("id" = String, Path)),
    request_body = crate::openapi::admin_schemas::PutAlertSettings,
    responses((status = 200, body = crate::openapi::admin_schemas::AlertSettings), crate::openapi::AdminErrors),
    security(("admin_token" = [])))]
pub(super) async fn put_alert_settings(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    ApiPath(id): ApiPath<String>,
    ApiBytes(body): ApiBytes,
) -> Result<Json<Value>, ApiError> {
    let map = object(&body)?;
    reject_unknown(&map, &["webhook_url", "thresholds", "rotate_secret"])?;
    let webhook_url = match map.get("webhook_url") {
        None => None,
        Some(Value::Null) => Some(None),
        Some(Value::String(u)) => {
            alerts::check_webhook_url(u).map_err(|e| invalid_field("webhook_url", e))?;
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
            alerts::parse_thresholds(&texts).map_err(|e| invalid_field("thresholds", e))?;
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
    let change = alerts::SettingsChange {
        webhook_url,
        thresholds,
        rotate_secret,
    };
    let (settings, secret) = alerts::update_settings(store(&state)?, &id, change, &actor).await?;
    Ok(Json(alerts::settings_json(&settings, secret.as_deref())))
}

/// Budget alerts, oldest first, with their webhook delivery.
#[utoipa::path(get, path = "/admin/v1/alerts", tag = "admin",
    params(
        ("customer_id" = Option<String>, Query),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 10000),
    ),
    responses((status = 200, body = crate::openapi::admin_schemas::BudgetAlertList), crate::openapi::AdminErrors),
    security(("admin_token" = [])))]
pub(super) async fn list_alerts(
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
    Ok(list(alerts.iter().map(alerts::alert_json).collect()))
}

//! `/admin/v1/customers` (create, list, read, update) and the customers' budget alerts
//! (`/admin/v1/customers/{id}/alerts`, `/admin/v1/alerts`). The bodies are the types below:
//! the handlers read them (unknown fields refused first, each naming its field), check each
//! value, and `/openapi.json` describes them.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::tiers::{allow_priority, default_tier, DefaultServiceTier};
use super::{
    invalid_field, limit, limits_body, object, patch, reject_unknown, store, valid_id, UsdAmount,
    DEFAULT_PAGE, MAX_PAGE,
};
use crate::error::{from_object, ApiBytes, ApiError, ApiPath};
use crate::AppState;
use tollgate_metering::alerts::{self, AlertSettingsView, BudgetAlertView};
use tollgate_metering::audit::Actor;
use tollgate_metering::kinds::BudgetPeriod as Period;
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

/// Budgets reset on UTC calendar months.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BudgetPeriod {
    Monthly,
}

impl From<BudgetPeriod> for Period {
    fn from(p: BudgetPeriod) -> Self {
        match p {
            BudgetPeriod::Monthly => Self::Monthly,
        }
    }
}

/// Defines a customer body: its own fields, the budget and scheduling fields, and the limits
/// every admin body with limits takes ([`limits_body`]); with [`fields`](Self::fields), the
/// fields checked.
macro_rules! customer_body {
    ($(#[$attr:meta])* pub struct $name:ident { $($own:tt)* }) => {
        limits_body! {
            $(#[$attr])*
            pub struct $name {
                $($own)*
                #[serde(default, deserialize_with = "patch")]
                #[schema(value_type = Option<UsdAmount>)]
                pub budget_usd: Option<Option<UsdAmount>>,
                pub budget_period: Option<BudgetPeriod>,
                /// The customer's share of each model's engine when customers compete (weighted fair
                /// queueing; 1, the default, is an equal share).
                // Read as any JSON value, so that a value of the wrong type gets the same
                // message as one out of range.
                #[serde(default, deserialize_with = "patch")]
                #[schema(value_type = Option<i64>, minimum = 1, maximum = 100)]
                pub scheduling_weight: Option<Option<serde_json::Value>>,
            }
            concurrency = "Requests in flight at once; beyond it, 429 with `Retry-After`.",
            tier = "The tier of requests that ask for `service_tier: \"auto\"` (or none); `null`\nclears it.",
            priority = "Whether requests may ask for `service_tier: \"priority\"` (403 otherwise; false when created without it).",
        }

        impl $name {
            /// The fields checked, each error naming its field.
            fn fields(self) -> Result<CustomerFields, ApiError> {
                if self.name.as_deref().is_some_and(|n| n.trim().is_empty()) {
                    return Err(invalid_field("name", "`name` must not be empty".into()));
                }
                Ok(CustomerFields {
                    name: self.name,
                    budget_nano_usd: self
                        .budget_usd
                        .map(|b| b.map(|b| b.nano_usd("budget_usd")).transpose())
                        .transpose()?,
                    budget_period: self.budget_period.map(Period::from),
                    rpm: limit(self.rpm, "rpm")?,
                    tpm: limit(self.tpm, "tpm")?,
                    max_concurrent_requests: limit(
                        self.max_concurrent_requests,
                        "max_concurrent_requests",
                    )?,
                    scheduling_weight: weight(self.scheduling_weight)?,
                    default_service_tier: default_tier(self.default_service_tier),
                    allow_priority: allow_priority(self.allow_priority)?,
                })
            }
        }
    };
}

customer_body! {
    /// `POST /admin/v1/customers`.
    pub struct CreateCustomer {
        /// 1-64 letters, digits, `-`, `_`, `.`.
        #[serde(default)]
        #[schema(required, pattern = "^[A-Za-z0-9._-]{1,64}$")]
        pub id: String,
        /// Defaults to the id.
        #[schema(min_length = 1, pattern = "\\S")]
        pub name: Option<String>,
    }
}

customer_body! {
    /// `PATCH /admin/v1/customers/{id}`: the fields to change (`null` clears a limit or budget).
    pub struct UpdateCustomer {
        #[schema(min_length = 1, pattern = "\\S")]
        pub name: Option<String>,
    }
}

/// `scheduling_weight`: an integer from 1 to [`MAX_SCHEDULING_WEIGHT`]; anything else (a
/// fraction, a string, `null`, a boolean) is refused with the same message.
fn weight(value: Option<Option<serde_json::Value>>) -> Result<Option<i64>, ApiError> {
    let Some(value) = value else {
        return Ok(None);
    };
    match value.as_ref().and_then(serde_json::Value::as_i64) {
        Some(w) if (1..=MAX_SCHEDULING_WEIGHT).contains(&w) => Ok(Some(w)),
        _ => Err(invalid_field(
            "scheduling_weight",
            format!(
                "`scheduling_weight` must be an integer from 1 to {MAX_SCHEDULING_WEIGHT}, got {}",
                value.map_or_else(|| "null".to_string(), |w| w.to_string())
            ),
        )),
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CustomerList {
    #[schema(value_type = String, pattern = "^list$")]
    pub object: &'static str,
    pub data: Vec<CustomerView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BudgetAlertList {
    #[schema(value_type = String, pattern = "^list$")]
    pub object: &'static str,
    pub data: Vec<BudgetAlertView>,
}

/// `PUT /admin/v1/customers/{id}/alerts`: absent fields are unchanged.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutAlertSettings {
    /// An `http(s)` URL, or `null` to stop deliveries.
    #[serde(default, deserialize_with = "patch")]
    #[schema(value_type = Option<String>)]
    pub webhook_url: Option<Option<String>>,
    /// Fractions of the budget in (0, 1], as numbers or decimal strings.
    pub thresholds: Option<Vec<UsdAmount>>,
    /// Make a new signing secret (returned once).
    pub rotate_secret: Option<bool>,
}

#[utoipa::path(post, path = "/admin/v1/customers", tag = "admin",
    request_body = CreateCustomer,
    responses((status = 201, body = tollgate_metering::views::CustomerView), crate::openapi::AdminErrors),
    security(("admin_token" = [])))]
pub(super) async fn create_customer(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    ApiBytes(body): ApiBytes,
) -> Result<Response, ApiError> {
    let map = object(&body)?;
    reject_unknown(&map, &[&["id"], CUSTOMER_FIELDS].concat())?;
    let mut body: CreateCustomer = from_object(map)?;
    let id = std::mem::take(&mut body.id);
    if id.is_empty() {
        return Err(invalid_field("id", "`id` is required".into()));
    }
    if !valid_id(&id) {
        return Err(invalid_field(
            "id",
            format!(
                "`{}` is not a valid id: 1-64 characters of letters, digits, `-`, `_`, `.`",
                super::shown(&id)
            ),
        ));
    }
    let mut fields = body.fields()?;
    fields.name.get_or_insert_with(|| id.clone());
    let customer = store(&state)?.create_customer(&id, fields, &actor).await?;
    Ok((StatusCode::CREATED, Json(CustomerView::from(&customer))).into_response())
}

#[utoipa::path(get, path = "/admin/v1/customers", tag = "admin",
    responses((status = 200, body = CustomerList), crate::openapi::AdminErrors),
    security(("admin_token" = [])))]
pub(super) async fn list_customers(
    State(state): State<AppState>,
) -> Result<Json<CustomerList>, ApiError> {
    let customers = store(&state)?.list_customers().await?;
    Ok(Json(CustomerList {
        object: "list",
        data: customers.iter().map(CustomerView::from).collect(),
    }))
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
    request_body = UpdateCustomer,
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
    let fields = from_object::<UpdateCustomer>(map)?.fields()?;
    let customer = store(&state)?.update_customer(&id, fields, &actor).await?;
    state.auth.forget_customer(&id);
    Ok(Json(CustomerView::from(&customer)))
}

/// A customer's budget-alert settings.
#[utoipa::path(get, path = "/admin/v1/customers/{id}/alerts", tag = "admin",
    params(("id" = String, Path)),
    responses((status = 200, body = AlertSettingsView), crate::openapi::AdminErrors),
    security(("admin_token" = [])))]
pub(super) async fn get_alert_settings(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<AlertSettingsView>, ApiError> {
    let settings = store(&state)?.alert_settings(&id).await?;
    Ok(Json(AlertSettingsView::new(&settings, None)))
}

// `{"webhook_url": URL | null, "thresholds": [fractions], "rotate_secret": bool}`; the
// answer carries `webhook_secret` when one was made (shown once).
/// Sets the webhook and thresholds; a new signing secret is in this answer only.
#[utoipa::path(put, path = "/admin/v1/customers/{id}/alerts", tag = "admin",
    params(("id" = String, Path)),
    request_body = PutAlertSettings,
    responses((status = 200, body = AlertSettingsView), crate::openapi::AdminErrors),
    security(("admin_token" = [])))]
pub(super) async fn put_alert_settings(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    ApiPath(id): ApiPath<String>,
    ApiBytes(body): ApiBytes,
) -> Result<Json<AlertSettingsView>, ApiError> {
    let map = object(&body)?;
    reject_unknown(&map, &["webhook_url", "thresholds", "rotate_secret"])?;
    let body: PutAlertSettings = from_object(map)?;
    if let Some(Some(url)) = &body.webhook_url {
        alerts::check_webhook_url(url).map_err(|e| invalid_field("webhook_url", e))?;
    }
    let thresholds = body
        .thresholds
        .map(|items| {
            let texts: Vec<String> = items.iter().map(UsdAmount::text).collect();
            alerts::parse_thresholds(&texts).map_err(|e| invalid_field("thresholds", e))?;
            Ok::<_, ApiError>(texts)
        })
        .transpose()?;
    let change = alerts::SettingsChange {
        webhook_url: body.webhook_url,
        thresholds,
        rotate_secret: body.rotate_secret.unwrap_or(false),
    };
    let (settings, secret) = alerts::update_settings(store(&state)?, &id, change, &actor).await?;
    Ok(Json(AlertSettingsView::new(&settings, secret.as_deref())))
}

/// Budget alerts, oldest first, with their webhook delivery.
#[utoipa::path(get, path = "/admin/v1/alerts", tag = "admin",
    params(
        ("customer_id" = Option<String>, Query),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 10000),
    ),
    responses((status = 200, body = BudgetAlertList), crate::openapi::AdminErrors),
    security(("admin_token" = [])))]
pub(super) async fn list_alerts(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<BudgetAlertList>, ApiError> {
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
    Ok(Json(BudgetAlertList {
        object: "list",
        data: alerts.iter().map(BudgetAlertView::from).collect(),
    }))
}

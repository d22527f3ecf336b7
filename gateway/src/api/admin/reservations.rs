//! Reserved capacity: `/admin/v1/customers/{id}/reservations` (reserve, list) and
//! `/admin/v1/reservations/{reservation_id}` (read, end); and `/admin/v1/sla`, the month's
//! service levels per customer and tier. A model is reservable when models.toml gives it a
//! `capacity_tpm` and a `price.reserved_per_ktpm_month`; the store refuses (409) a reservation
//! that would take the model's reservations past its capacity.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{invalid_field, store};
use crate::error::{query, ApiError, ApiJson, ApiPath, RequestBody};
use crate::AppState;
use tollgate_metering::audit::Actor;
use tollgate_metering::billing::{current_period, parse_period, parse_time};
use tollgate_metering::kinds::ServiceTier;
use tollgate_metering::periods::rfc3339;
use tollgate_metering::store::{now_micros, Reservation, SlaFilter, SlaRow};
use tollgate_metering::views::ReservationView;

/// `POST /admin/v1/customers/{id}/reservations`: what the handler reads and the OpenAPI
/// document shows.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateReservation {
    /// A model with `capacity_tpm` and `price.reserved_per_ktpm_month` in models.toml.
    model: String,
    #[schema(minimum = 1)]
    reserved_tokens_per_minute: i64,
    /// RFC 3339, a date, or Unix seconds; default: now.
    #[schema(value_type = Option<String>)]
    starts_at: Option<Moment>,
    /// RFC 3339, a date, or Unix seconds; default: until ended.
    #[schema(value_type = Option<String>)]
    ends_at: Option<Moment>,
}

impl RequestBody for CreateReservation {}

/// A time as the admin API takes it: text (RFC 3339 or a date) or Unix seconds.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Moment {
    Text(String),
    Seconds(i64),
}

impl Moment {
    /// In microseconds, or a 400 naming `field`.
    fn micros(moment: Option<&Moment>, field: &str) -> Result<Option<i64>, ApiError> {
        match moment {
            None => Ok(None),
            Some(Moment::Seconds(secs)) => Ok(Some(secs.saturating_mul(1_000_000))),
            Some(Moment::Text(text)) => parse_time(text)
                .map(Some)
                .map_err(|e| invalid_field(field, format!("{field}: {e}"))),
        }
    }
}

/// Reserves `tpm` tokens per minute of `model` for a customer over `span` (start: now unless
/// given; end: until ended unless given), at the model's reserved price; refused with 400
/// when the model is not reservable or the numbers are not, 409 when its capacity is taken.
/// The admin API and the console both reserve through it.
pub(crate) async fn reserve(
    state: &AppState,
    customer_id: &str,
    model: &str,
    tpm: i64,
    span: (Option<i64>, Option<i64>),
    actor: &Actor,
) -> Result<Reservation, ApiError> {
    let config = state
        .config
        .models
        .get(model)
        .ok_or_else(|| invalid_field("model", format!("unknown model `{model}`")))?;
    let (new, capacity) = config
        .reservation(customer_id, tpm, span.0.unwrap_or_else(now_micros), span.1)
        .map_err(|(field, message)| invalid_field(field, message))?;
    let created = store(state)?
        .create_reservation(&new, capacity, actor)
        .await?;
    state.reload_reservations().await;
    Ok(created)
}

/// Reserves tokens per minute of a model for a customer, from `starts_at` (default: now)
/// until `ends_at` (default: until ended).
#[utoipa::path(post, path = "/admin/v1/customers/{id}/reservations", tag = "admin",
    params(("id" = String, Path)),
    request_body = CreateReservation,
    responses((status = 201, body = tollgate_metering::views::ReservationView), crate::openapi::AdminErrors),
    security(("admin_token" = [])))]
pub(super) async fn create_reservation(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    ApiPath(customer_id): ApiPath<String>,
    ApiJson(body): ApiJson<CreateReservation>,
) -> Result<Response, ApiError> {
    let span = (
        Moment::micros(body.starts_at.as_ref(), "starts_at")?,
        Moment::micros(body.ends_at.as_ref(), "ends_at")?,
    );
    let tpm = body.reserved_tokens_per_minute;
    let created = reserve(&state, &customer_id, &body.model, tpm, span, &actor).await?;
    Ok((StatusCode::CREATED, Json(ReservationView::from(&created))).into_response())
}

/// A customer's reservations, past, current and future.
#[utoipa::path(get, path = "/admin/v1/customers/{id}/reservations", tag = "admin",
    params(("id" = String, Path)),
    responses((status = 200, body = ReservationList), crate::openapi::AdminErrors),
    security(("admin_token" = [])))]
pub(super) async fn list_reservations(
    State(state): State<AppState>,
    ApiPath(customer_id): ApiPath<String>,
) -> Result<Json<ReservationList>, ApiError> {
    let store = store(&state)?;
    store.customer(&customer_id).await?;
    let held = store.reservations(Some(&customer_id), None).await?;
    Ok(Json(ReservationList {
        object: "list",
        data: held.iter().map(ReservationView::from).collect(),
    }))
}

/// `GET /admin/v1/customers/{id}/reservations`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReservationList {
    #[schema(value_type = String, pattern = "^list$")]
    pub object: &'static str,
    pub data: Vec<ReservationView>,
}

/// One reservation.
#[utoipa::path(get, path = "/admin/v1/reservations/{reservation_id}", tag = "admin",
    params(("reservation_id" = String, Path)),
    responses((status = 200, body = tollgate_metering::views::ReservationView), crate::openapi::AdminErrors),
    security(("admin_token" = [])))]
pub(super) async fn get_reservation(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<ReservationView>, ApiError> {
    let r = store(&state)?.reservation(&id).await?;
    Ok(Json(ReservationView::from(&r)))
}

/// Ends a reservation now: billed until now, its capacity free from now (one that has not
/// started is ended where it starts, and bills nothing).
#[utoipa::path(delete, path = "/admin/v1/reservations/{reservation_id}", tag = "admin",
    params(("reservation_id" = String, Path)),
    responses((status = 200, body = tollgate_metering::views::ReservationView), crate::openapi::AdminErrors),
    security(("admin_token" = [])))]
pub(super) async fn end_reservation(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<ReservationView>, ApiError> {
    let r = store(&state)?
        .end_reservation(&id, now_micros(), &actor)
        .await?;
    state.reload_reservations().await;
    Ok(Json(ReservationView::from(&r)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SlaQuery {
    month: Option<String>,
    customer_id: Option<String>,
    model: Option<String>,
}

/// One customer's requests at one tier in the month.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = SlaRow)]
pub struct SlaRowView {
    pub customer_id: String,
    #[schema(value_type = String)]
    pub service_tier: ServiceTier,
    pub requests: i64,
    pub failed: i64,
    /// Share of requests not `failed`.
    pub availability: f64,
    /// Requests whose first token reached the client.
    pub ttft_measured: i64,
    /// Of those, the ones at or under `priority_ttft_target_ms`.
    pub ttft_within_target: i64,
    pub ttft_within_target_share: f64,
    /// Upper bound of the histogram bucket holding the median TTFT.
    #[schema(required)]
    pub ttft_p50_ms: Option<i64>,
    #[schema(required)]
    pub ttft_p99_ms: Option<i64>,
    #[schema(required)]
    pub ttft_max_ms: Option<i64>,
}

impl From<&SlaRow> for SlaRowView {
    fn from(r: &SlaRow) -> Self {
        Self {
            customer_id: r.customer_id.clone(),
            service_tier: r.service_tier,
            requests: r.requests,
            failed: r.failed,
            availability: r.availability(),
            ttft_measured: r.ttft_measured,
            ttft_within_target: r.ttft_within_target,
            ttft_within_target_share: r.within_target(),
            ttft_p50_ms: r.ttft_quantile_ms(0.50),
            ttft_p99_ms: r.ttft_quantile_ms(0.99),
            ttft_max_ms: r.ttft_max_ms,
        }
    }
}

/// `GET /admin/v1/sla`.
#[derive(Debug, Serialize, ToSchema)]
pub struct SlaReport {
    #[schema(value_type = String, pattern = "^sla_report$")]
    pub object: &'static str,
    pub month: String,
    pub start: String,
    pub end: String,
    pub priority_ttft_target_ms: u64,
    pub ttft_percentiles: &'static str,
    pub data: Vec<SlaRowView>,
}

/// The month's service levels per customer and tier: requests, availability (the share not
/// `failed`), the share whose TTFT met `priority_ttft_target_ms`, and TTFT p50/p99 (upper
/// bounds of fixed histogram buckets).
#[utoipa::path(get, path = "/admin/v1/sla", tag = "admin",
    params(
        ("month" = Option<String>, Query, pattern = "^[0-9]{4}-[0-9]{2}$", description = "YYYY-MM; default: this month"),
        ("customer_id" = Option<String>, Query),
        ("model" = Option<String>, Query),
    ),
    responses((status = 200, body = SlaReport), crate::openapi::AdminErrors),
    security(("admin_token" = [])))]
pub(super) async fn sla(
    State(state): State<AppState>,
    q: Result<Query<SlaQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<SlaReport>, ApiError> {
    let q = query(q)?;
    let month = q.month.unwrap_or_else(current_period);
    let (start, end) = parse_period(&month).map_err(|e| invalid_field("month", e))?;
    let target = state.config.server.priority_ttft_target_ms;
    let filter = SlaFilter {
        start,
        end,
        customer_id: q.customer_id,
        model: q.model,
        ttft_target_ms: i64::try_from(target).unwrap_or(i64::MAX),
    };
    let rows = store(&state)?.sla(&filter).await?;
    Ok(Json(SlaReport {
        object: "sla_report",
        month: month.trim().to_string(),
        start: rfc3339(start),
        end: rfc3339(end),
        priority_ttft_target_ms: target,
        ttft_percentiles:
            "upper bounds of fixed histogram buckets (ms), capped by the largest TTFT seen",
        data: rows.iter().map(SlaRowView::from).collect(),
    }))
}

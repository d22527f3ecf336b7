//! The console's reserved capacity and service levels: a customer's reservations (a section of
//! its page, with the forms that reserve and end them, through the admin API's `reserve`) and
//! the month's SLA report per customer and tier.

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use maud::{html, Markup};
use serde::Deserialize;

use super::pages::{bad, store, time, Fields, PageResult};
use super::{csrf_field, layout, PageError, Signed};
use crate::api::admin::reserve;
use crate::AppState;
use tollgate_metering::billing::{self, parse_time};
use tollgate_metering::store::{now_micros, Reservation, SlaFilter};

/// The reservation form's inputs: label, name and type.
const RESERVATION_FIELDS: [(&str, &str, &str); 3] = [
    ("Tokens per minute ", "reserved_tokens_per_minute", "number"),
    ("From (date, blank: now) ", "starts_at", "date"),
    ("Until (date, blank: until ended) ", "ends_at", "date"),
];

/// A customer's reservations and the form that adds one (only reservable models offered).
pub(super) fn section(
    state: &AppState,
    signed: &Signed,
    customer_id: &str,
    held: &[Reservation],
) -> Markup {
    let now = now_micros();
    let reservable: Vec<&String> = state
        .config
        .models
        .iter()
        .filter(|(_, m)| m.reserved.is_some())
        .map(|(id, _)| id)
        .collect();
    html! {
        h2 { "Reserved capacity" }
        table #reservations {
            thead { tr { th { "Id" } th { "Model" } th { "Tokens / minute" } th { "USD / kTPM-month" } th { "From" } th { "Until" } th { "State" } th {} } }
            tbody {
                @for r in held {
                    tr id={"reservation-" (r.id)} {
                        td { (r.id) }
                        td { (r.model) }
                        td { (r.reserved_tokens_per_minute) }
                        td { (r.price_per_ktpm_month) }
                        td { (time(r.starts_at)) }
                        td { (r.ends_at.map(time).unwrap_or_else(|| "until ended".into())) }
                        td.state {
                            @if r.active_at(now) { "active" }
                            @else if r.starts_at > now { "scheduled" } @else { "ended" }
                        }
                        td {
                            @if r.ends_at.is_none_or(|e| e > now) {
                                form method="post" action={"/console/reservations/" (r.id) "/end"} {
                                    (csrf_field(signed))
                                    button.danger type="submit" name="end" { "End" }
                                }
                            }
                        }
                    }
                }
            }
        }
        @if reservable.is_empty() {
            p.empty { "No model can be reserved: give one capacity_tpm and price.reserved_per_ktpm_month in models.toml." }
        } @else {
            form.grid method="post" action={"/console/customers/" (customer_id) "/reservations"} {
                (csrf_field(signed))
                label { "Model " select name="model" {
                    @for m in &reservable { option value=(m) { (m) } }
                } }
                @for (text, name, kind) in RESERVATION_FIELDS {
                    label { (text) input name=(name) type=(kind) required[kind == "number"]; }
                }
                button type="submit" id="create-reservation" { "Reserve" }
            }
        }
    }
}

/// The customer page's reservation form: reserves through the admin API's rules, then shows
/// the page again (an error page says why not: 409 when the model's capacity is taken).
pub(crate) async fn create_reservation(
    State(state): State<AppState>,
    Extension(signed): Extension<Signed>,
    Path(customer_id): Path<String>,
    Form(fields): Form<Fields>,
) -> Result<Response, PageError> {
    let model = fields.get("model").unwrap_or_default();
    let tpm = fields
        .get("reserved_tokens_per_minute")
        .unwrap_or_default()
        .parse::<i64>()
        .map_err(|_| bad("tokens per minute must be a whole number"))?;
    let at = |name: &str| fields.get(name).map(parse_time).transpose().map_err(bad);
    let span = (at("starts_at")?, at("ends_at")?);
    reserve(&state, &customer_id, model, tpm, span, &signed.actor).await?;
    Ok(Redirect::to(&format!("/console/customers/{customer_id}")).into_response())
}

/// Ends a reservation now, from its row's button.
pub(crate) async fn end_reservation(
    State(state): State<AppState>,
    Extension(signed): Extension<Signed>,
    Path(id): Path<String>,
) -> Result<Response, PageError> {
    let r = store(&state)?
        .end_reservation(&id, now_micros(), &signed.actor)
        .await?;
    state.reload_reservations().await;
    Ok(Redirect::to(&format!("/console/customers/{}", r.customer_id)).into_response())
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct SlaQuery {
    month: Option<String>,
}

/// Percent with one decimal.
fn percent(share: f64) -> String {
    format!("{:.1}%", share * 100.0)
}

pub(crate) async fn sla(
    State(state): State<AppState>,
    Extension(signed): Extension<Signed>,
    Query(q): Query<SlaQuery>,
) -> PageResult {
    let month = q
        .month
        .filter(|m| !m.trim().is_empty())
        .unwrap_or_else(billing::current_period);
    let (start, end) = billing::parse_period(&month).map_err(bad)?;
    let target = state.config.server.priority_ttft_target_ms;
    let filter = SlaFilter {
        start,
        end,
        ttft_target_ms: i64::try_from(target).unwrap_or(i64::MAX),
        ..SlaFilter::default()
    };
    let rows = store(&state)?.sla(&filter).await?;
    let ms = |v: Option<i64>| v.map(|t| format!("≤ {t} ms")).unwrap_or_default();
    let content = html! {
        form.filters method="get" action="/console/sla" {
            label { "Month " input name="month" value=(month) pattern="[0-9]{4}-[0-9]{2}"; }
            button type="submit" { "Show" }
        }
        p { "TTFT target: " strong #ttft-target { (target) " ms" } " (priority_ttft_target_ms). "
            "Percentiles are the upper bounds of fixed histogram buckets." }
        table #sla {
            thead { tr { th { "Customer" } th { "Tier" } th { "Requests" } th { "Availability" } th { "TTFT within target" } th { "TTFT p50" } th { "TTFT p99" } } }
            tbody {
                @for r in &rows {
                    tr {
                        td { (r.customer_id) }
                        td.tier { (r.service_tier) }
                        td { (r.requests) }
                        td { (percent(r.availability())) }
                        td { (percent(r.within_target())) " of " (r.ttft_measured) }
                        td { (ms(r.ttft_quantile_ms(0.50))) }
                        td { (ms(r.ttft_quantile_ms(0.99))) }
                    }
                }
            }
        }
        @if rows.is_empty() { p.empty { "No requests this month." } }
    };
    Ok(layout(&signed, "Service levels", content))
}

//! `/admin/v1/usage` (aggregates, JSON or CSV), `/admin/v1/usage/records` (the record cursor
//! export jobs follow) and `/admin/v1/invoices/{customer_id}`.

use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use super::{invalid_field, query, store, DEFAULT_PAGE, MAX_PAGE};
use crate::error::{ApiError, ApiPath};
use crate::AppState;
use tollgate_metering::billing::views::{Invoice, UsageRecordPage, UsageReport};
use tollgate_metering::billing::{self, parse_time};
use tollgate_metering::kinds::Outcome;
use tollgate_metering::periods::{month_bounds, rfc3339};
use tollgate_metering::store::{now_micros, parse_cursor, RecordFilter, UsageFilter};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UsageQuery {
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

/// Usage aggregates, as JSON or CSV.
#[utoipa::path(get, path = "/admin/v1/usage", tag = "admin",
    params(
        ("start" = Option<String>, Query, description = "RFC 3339 or a date; default: the start of this UTC month"),
        ("end" = Option<String>, Query, description = "RFC 3339 or a date; default: now"),
        ("customer_id" = Option<String>, Query),
        ("model" = Option<String>, Query),
        ("tag" = Option<String>, Query, description = "`key:value`"),
        ("group_by" = Option<String>, Query, description = "Comma-separated: customer, model, key, day, service_tier, tag:KEY"),
        ("format" = Option<String>, Query, pattern = "^(json|csv)$"),
    ),
    responses(
        (status = 200, description = "One row per group",
         content((UsageReport = "application/json"), (String = "text/csv"))),
        crate::openapi::AdminErrors),
    security(("admin_token" = [])))]
pub(super) async fn usage(
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
        "json" => Ok(Json(UsageReport::new(start, end, &rows, &columns)).into_response()),
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
pub(super) struct RecordsQuery {
    after: Option<String>,
    limit: Option<i64>,
    customer_id: Option<String>,
    key_id: Option<String>,
    model: Option<String>,
    /// A record's outcome: `completed`, `cancelled`, `failed`.
    status: Option<String>,
    /// Records started at or after this time.
    start: Option<String>,
    /// Records started before this time.
    end: Option<String>,
}

/// The filter of a records page: each given parameter narrows it (an empty one is a 400, not
/// "no filter": a billing job that lost its customer id must not export everyone's records).
fn record_filter(q: &RecordsQuery) -> Result<RecordFilter, ApiError> {
    let text = |field: &str, value: &Option<String>| match value.as_deref() {
        Some("") => Err(invalid_field(field, format!("`{field}` must not be empty"))),
        v => Ok(v.map(str::to_string)),
    };
    let time = |field: &str, value: &Option<String>| {
        text(field, value)?
            .map(|t| parse_time(&t).map_err(|e| invalid_field(field, format!("{field}: {e}"))))
            .transpose()
    };
    let status = text("status", &q.status)?
        .map(|s| {
            s.parse::<Outcome>().map_err(|_| {
                invalid_field(
                    "status",
                    format!(
                        "status `{s}` is not a record status (e.g. completed, cancelled, failed)"
                    ),
                )
            })
        })
        .transpose()?;
    let filter = RecordFilter {
        customer_id: text("customer_id", &q.customer_id)?,
        key_id: text("key_id", &q.key_id)?,
        model: text("model", &q.model)?,
        status,
        start: time("start", &q.start)?,
        end: time("end", &q.end)?,
    };
    if let (Some(start), Some(end)) = (filter.start, filter.end) {
        if end <= start {
            return Err(invalid_field(
                "end",
                format!("end {} is not after start {}", rfc3339(end), rfc3339(start)),
            ));
        }
    }
    Ok(filter)
}

/// Usage records in ledger order, for export jobs that consume incrementally.
#[utoipa::path(get, path = "/admin/v1/usage/records", tag = "admin",
    params(
        ("after" = Option<String>, Query, description = "A `next_cursor`"),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 10000),
        ("customer_id" = Option<String>, Query, description = "Only this customer's records"),
        ("key_id" = Option<String>, Query, description = "Only this key's records"),
        ("model" = Option<String>, Query, description = "Only this model's records"),
        ("status" = Option<String>, Query, description = "Only records that ended so: `completed`, `cancelled`, `failed`"),
        ("start" = Option<String>, Query, description = "Records started at or after this time (RFC 3339 or a date)"),
        ("end" = Option<String>, Query, description = "Records started before this time (RFC 3339 or a date)"),
    ),
    responses((status = 200, body = UsageRecordPage), crate::openapi::AdminErrors),
    security(("admin_token" = [])))]
pub(super) async fn usage_records(
    State(state): State<AppState>,
    q: Result<Query<RecordsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<UsageRecordPage>, ApiError> {
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
    let filter = record_filter(&q)?;
    let page = store(&state)?.records_page(&filter, after, limit).await?;
    Ok(Json(UsageRecordPage::from(&page)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct InvoiceQuery {
    period: Option<String>,
    /// `key:value`: only records with this tag.
    tag: Option<String>,
    /// `tag:KEY`: lines split by the value of this tag.
    group_by: Option<String>,
    /// `json` (default) or `csv` (one row per line, `base_model` and `adapter` last).
    format: Option<String>,
}

/// A customer's invoice for a month, as JSON or as CSV (`format=csv`: a header line and one
/// row per line item, the columns of `InvoiceLine` with `base_model` and `adapter` last).
#[utoipa::path(get, path = "/admin/v1/invoices/{customer_id}", tag = "admin",
    params(
        ("customer_id" = String, Path),
        ("period" = Option<String>, Query, pattern = "^[0-9]{4}-[0-9]{2}$", description = "YYYY-MM; default: this month"),
        ("tag" = Option<String>, Query, description = "`key:value`"),
        ("group_by" = Option<String>, Query, description = "`tag:KEY`"),
        ("format" = Option<String>, Query, pattern = "^(json|csv)$"),
    ),
    responses((status = 200, description = "The invoice",
         content((Invoice = "application/json"), (String = "text/csv"))),
         crate::openapi::AdminErrors),
    security(("admin_token" = [])))]
pub(super) async fn invoice(
    State(state): State<AppState>,
    ApiPath(customer_id): ApiPath<String>,
    q: Result<Query<InvoiceQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let q = query(q)?;
    let csv = match q.format.as_deref() {
        None | Some("json") => false,
        Some("csv") => true,
        Some(other) => {
            return Err(invalid_field(
                "format",
                format!("format `{other}` is not supported; use json or csv"),
            ))
        }
    };
    let period = q.period.unwrap_or_else(billing::current_period);
    billing::parse_period(&period).map_err(|e| invalid_field("period", e))?;
    let group_tag = match q.group_by.as_deref() {
        None | Some("") => None,
        Some(g) => Some(billing::parse_invoice_group(g).map_err(|e| invalid_field("group_by", e))?),
    };
    let tag = tag_filter(q.tag.as_deref())?;
    let invoice =
        billing::invoice_for(store(&state)?, &customer_id, &period, tag, group_tag).await?;
    if !csv {
        return Ok(Json(invoice).into_response());
    }
    let text = invoice
        .csv()
        .map_err(|e| ApiError::Internal(format!("invoice CSV: {e}")))?;
    Ok(([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], text).into_response())
}

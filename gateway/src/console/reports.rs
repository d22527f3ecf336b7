//! The console's read-only screens: the request log, the models and their members' health,
//! invoices and the usage CSV export, the audit log.

use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use maud::{html, Markup};
use serde::Deserialize;

use super::pages::{bad, health, store, time, usd, PageResult, PAGE};
use super::{layout, PageError, Signed};
use crate::config::BackendConfig;
use crate::error::ApiError;
use crate::AppState;
use tollgate_metering::billing::views::Invoice;
use tollgate_metering::billing::{self, parse_time};
use tollgate_metering::console_queries::LogFilter;
use tollgate_metering::periods::{month_bounds, rfc3339};
use tollgate_metering::store::{now_micros, UsageFilter};

#[derive(Debug, Default, Deserialize)]
pub(crate) struct LogQuery {
    customer_id: Option<String>,
    key_id: Option<String>,
    model: Option<String>,
    status: Option<String>,
    start: Option<String>,
    end: Option<String>,
    before: Option<String>,
}

fn nonblank(v: &Option<String>) -> Option<String> {
    v.as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

fn time_param(v: &Option<String>, name: &str) -> Result<Option<i64>, PageError> {
    nonblank(v)
        .map(|t| parse_time(&t).map_err(|e| bad(format!("{name}: {e}"))))
        .transpose()
}

pub(crate) async fn requests(
    State(state): State<AppState>,
    Extension(signed): Extension<Signed>,
    Query(q): Query<LogQuery>,
) -> PageResult {
    let filter = LogFilter {
        customer_id: nonblank(&q.customer_id),
        key_id: nonblank(&q.key_id),
        model: nonblank(&q.model),
        status: nonblank(&q.status),
        start: time_param(&q.start, "start")?,
        end: time_param(&q.end, "end")?,
    };
    let before = match nonblank(&q.before) {
        Some(c) => Some(tollgate_metering::store::parse_cursor(&c).map_err(bad)?),
        None => None,
    };
    let records = store(&state)?.records_newest(&filter, before, PAGE).await?;
    let value = |v: &Option<String>| v.clone().unwrap_or_default();
    let next = (i64::try_from(records.len()) == Ok(PAGE))
        .then(|| records.last().map(|(seq, _)| *seq))
        .flatten();
    let next_link = next.map(|seq| {
        let mut pairs = url_pairs(&[
            ("customer_id", &q.customer_id),
            ("key_id", &q.key_id),
            ("model", &q.model),
            ("status", &q.status),
            ("start", &q.start),
            ("end", &q.end),
        ]);
        pairs.push(("before".into(), seq.to_string()));
        format!(
            "/console/requests?{}",
            serde_urlencoded::to_string(&pairs).unwrap_or_default()
        )
    });
    let content = html! {
        form.filters method="get" action="/console/requests" {
            label { "Customer " input name="customer_id" value=(value(&q.customer_id)); }
            label { "Key " input name="key_id" value=(value(&q.key_id)); }
            label { "Model " select name="model" {
                option value="" { "any" }
                @for m in state.catalogue.current().models.keys() {
                    option value=(m) selected[q.model.as_deref() == Some(m.as_str())] { (m) }
                }
            } }
            label { "Status " select name="status" {
                option value="" { "any" }
                @for s in ["completed", "cancelled", "failed"] {
                    option value=(s) selected[q.status.as_deref() == Some(s)] { (s) }
                }
            } }
            label { "From " input name="start" placeholder="2026-11-01 or RFC 3339" value=(value(&q.start)); }
            label { "To " input name="end" placeholder="2026-12-01" value=(value(&q.end)); }
            button type="submit" { "Filter" }
        }
        table #requests {
            thead { tr { th { "Started" } th { "Request id" } th { "Customer" } th { "Key" } th { "Model" } th { "Tier" } th { "Status" } th { "Finish" } th { "Input" } th { "Cached" } th { "Output" } th { "Cost" } th { "TTFT" } th { "Duration" } } }
            tbody {
                @for (_, r) in &records {
                    tr.record {
                        td { (time(r.started_at)) }
                        td.request-id { code { (r.id) } }
                        td { (r.customer_id) }
                        td { (r.key_id) }
                        td { (r.model) } td.tier { (r.service_tier) }
                        td class={"status " (r.status)} { (r.status) }
                        td { (r.finish_reason.map_or("", |f| f.as_str())) }
                        td { (r.input_tokens) }
                        td { (r.cached_input_tokens) }
                        td { (r.output_tokens) }
                        td { (usd(r.cost_nano_usd)) }
                        td { (r.ttft_ms.map(|t| format!("{t} ms")).unwrap_or_default()) }
                        td { (format!("{} ms", (r.finished_at - r.started_at) / 1000)) }
                    }
                }
            }
        }
        @if records.is_empty() { p.empty { "No requests match." } }
        @if let Some(link) = next_link { p { a href=(link) id="older" { "Older →" } } }
    };
    Ok(layout(&signed, "Requests", content))
}

fn url_pairs(params: &[(&str, &Option<String>)]) -> Vec<(String, String)> {
    params
        .iter()
        .filter_map(|(k, v)| nonblank(v).map(|v| (k.to_string(), v)))
        .collect()
}

pub(crate) async fn models(
    State(state): State<AppState>,
    Extension(signed): Extension<Signed>,
) -> PageResult {
    let catalogue = state.catalogue.current();
    let content = html! {
        table #models {
            thead { tr { th { "Model" } th { "Backend" } th { "Context" } th { "Tier" } th { "Input / Mtok" } th { "Cached input / Mtok" } th { "Output / Mtok" } th { "Health" } th { "Running / waiting" } th { "Memory" } } }
            tbody {
                @for (id, m) in catalogue.models.iter() {
                    @let backend = catalogue.backends.get(id);
                    @for (tier, price) in m.prices.offered() {
                    tr {
                        td { (id) }
                        td { (match &m.backend { BackendConfig::Local(l) => format!("local ({})", l.device), BackendConfig::Http(_) => "http".to_string() }) }
                        td { (m.context_length.map_or_else(|| "model's own".to_string(), |c| c.to_string())) }
                        td { (tier.as_str()) }
                        td { "$" (price.input_per_mtok) }
                        td { "$" (price.cached_input_per_mtok) }
                        td { "$" (price.output_per_mtok) }
                        td { @if let Some(b) = backend { (health(&b.members())) } @else { span.down { "not loaded" } } }
                        td { @if let Some(b) = backend { @let l = b.load(); (l.running) " / " (l.waiting) } }
                        td { @if let Some(r) = backend.and_then(|b| b.residency()) { (residency(&r)) } @else { "—" } }
                    }
                    }
                }
            }
        }
    };
    Ok(layout(&signed, "Models", content))
}

/// A model loaded on demand: where it stands, its memory and its last load's time.
fn residency(r: &crate::backend::Residency) -> Markup {
    let state = serde_json::to_value(r.state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    html! {
        (state) (if r.pinned { " (pinned)" } else { "" }) ", "
        (r.memory_bytes / (1024 * 1024)) " MiB"
        @if let Some(s) = r.load_seconds { ", loaded in " (format!("{s:.2}")) " s" }
    }
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct InvoiceQuery {
    customer_id: Option<String>,
    period: Option<String>,
}

pub(crate) async fn invoices(
    State(state): State<AppState>,
    Extension(signed): Extension<Signed>,
    Query(q): Query<InvoiceQuery>,
) -> PageResult {
    let store = store(&state)?;
    let customers = store.list_customers().await?;
    let period = nonblank(&q.period).unwrap_or_else(billing::current_period);
    billing::parse_period(&period).map_err(bad)?;
    let customer_id = nonblank(&q.customer_id);
    let invoice = match &customer_id {
        Some(id) => Some(billing::invoice_for(store, id, &period, None, None).await?),
        None => None,
    };
    let (month_start, _) = month_bounds(now_micros());
    let content = html! {
        form.filters method="get" action="/console/invoices" {
            label { "Customer " select name="customer_id" {
                @for c in &customers {
                    option value=(c.id) selected[customer_id.as_deref() == Some(c.id.as_str())] { (c.id) " — " (c.name) }
                }
            } }
            label { "Month " input name="period" value=(period) pattern="[0-9]{4}-[0-9]{2}"; }
            button type="submit" { "Show invoice" }
        }
        @if let Some(inv) = &invoice { (invoice_table(inv)) }
        h2 { "Export usage as CSV" }
        form.filters method="get" action="/console/usage.csv" {
            label { "From " input name="start" value=(rfc3339(month_start).get(..10).unwrap_or_default()); }
            label { "To " input name="end" placeholder="now"; }
            label { "Group by " select name="group_by" {
                @for g in ["customer,model", "customer,model,service_tier", "customer,model,day", "customer,key", "model", "service_tier", "day"] {
                    option value=(g) { (g) }
                }
            } }
            button type="submit" id="export-csv" { "Download CSV" }
        }
    };
    Ok(layout(&signed, "Invoices & exports", content))
}

fn invoice_table(inv: &Invoice) -> Markup {
    // A field a line of another kind leaves out: an empty cell.
    fn opt(v: Option<&impl ToString>) -> String {
        v.map(ToString::to_string).unwrap_or_default()
    }
    html! {
        table #invoice {
            thead { tr { th { "Kind" } th { "Model" } th { "Tier" } th { "Requests" } th { "Tokens" } th { "Price" } th { "Amount (USD)" } } }
            tbody {
                @for l in &inv.line_items {
                    @let cached = l.kind == "cached_input";
                    @let reserved = l.kind == "reservation";
                    @let rejected = l.kind == "rejected_prediction";
                    tr {
                        td { (l.kind) }
                        td { (l.model)
                             @if let (Some(base), Some(adapter)) = (&l.base_model, &l.adapter) {
                                 br; small { "adapter " (adapter) " on " (base) } } }
                        td.tier { (l.service_tier.as_str()) }
                        td { (opt(l.requests.as_ref())) }
                        td { @if cached { (opt(l.cached_input_tokens.as_ref())) " cached" }
                             @else if reserved { (opt(l.reserved_tokens_per_minute.as_ref())) " TPM, " (opt(l.days_active.as_ref())) " of " (opt(l.days_in_month.as_ref())) " days" }
                             @else if rejected { (opt(l.rejected_prediction_tokens.as_ref())) " rejected prediction" }
                             @else { (opt(l.input_tokens.as_ref())) " in / " (opt(l.output_tokens.as_ref())) " out" } }
                        td { @if cached { (opt(l.cached_input_price_per_mtok.as_ref())) " / Mtok" }
                             @else if reserved { (opt(l.price_per_ktpm_month.as_ref())) " / kTPM-month" }
                             @else if rejected { (opt(l.rejected_prediction_price_per_mtok.as_ref())) " / Mtok" }
                             @else { (opt(l.input_price_per_mtok.as_ref())) " / " (opt(l.output_price_per_mtok.as_ref())) " / Mtok" } }
                        td { (l.amount_usd) }
                    }
                }
            }
            tfoot { tr { th colspan="6" { "Total " (inv.period) } th #invoice-total { (inv.total_usd) } } }
        }
    }
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct CsvQuery {
    start: Option<String>,
    end: Option<String>,
    group_by: Option<String>,
}

pub(crate) async fn usage_csv(
    State(state): State<AppState>,
    Query(q): Query<CsvQuery>,
) -> Result<Response, PageError> {
    let now = now_micros();
    let start = time_param(&q.start, "start")?.unwrap_or(month_bounds(now).0);
    let end = time_param(&q.end, "end")?.unwrap_or(now + 1);
    if end <= start {
        return Err(bad("the end is not after the start"));
    }
    let groups =
        billing::parse_group_by(nonblank(&q.group_by).as_deref().unwrap_or("")).map_err(bad)?;
    let filter = UsageFilter {
        start,
        end,
        ..UsageFilter::default()
    };
    let rows = store(&state)?.aggregate(&filter, &groups, None).await?;
    let text = billing::usage_csv(&rows, &billing::usage_columns(&groups))
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"tollgate-usage.csv\"",
            ),
        ],
        text,
    )
        .into_response())
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct AuditQuery {
    before: Option<String>,
}

pub(crate) async fn audit(
    State(state): State<AppState>,
    Extension(signed): Extension<Signed>,
    Query(q): Query<AuditQuery>,
) -> PageResult {
    let before = match nonblank(&q.before) {
        Some(c) => Some(tollgate_metering::store::parse_cursor(&c).map_err(bad)?),
        None => None,
    };
    let entries = store(&state)?.audit_before(before, PAGE).await?;
    let next = (i64::try_from(entries.len()) == Ok(PAGE))
        .then(|| entries.last().map(|e| e.seq))
        .flatten();
    let content = html! {
        table #audit {
            thead { tr { th { "Time" } th { "Actor" } th { "From" } th { "Action" } th { "Target" } th { "Changes" } } }
            tbody {
                @for e in &entries {
                    tr {
                        td { (time(e.at)) }
                        td { (e.actor_kind) ": " (e.actor) }
                        td { (e.remote_addr.clone().unwrap_or_else(|| "local".into())) }
                        td { (e.action) }
                        td { (e.target_type) " " (e.target_id) }
                        td { code { (e.changes.to_string()) } }
                    }
                }
            }
        }
        @if let Some(seq) = next { p { a href={"/console/audit?before=" (seq)} { "Older →" } } }
    };
    Ok(layout(&signed, "Audit log", content))
}

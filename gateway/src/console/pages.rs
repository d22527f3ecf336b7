//! The console's screens: overview, customers and their keys, the request log, models,
//! invoices and exports, the audit log. Each handler reads through the store (or the backends
//! for live state) and renders one page; forms that change something go through the store's
//! audited methods as the signed-in session and answer with a redirect (or, for a new key, the
//! one page that shows its secret).

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use maud::{html, Markup};
use serde::Deserialize;
use serde_json::Value;

use super::chart::{self, Bar};
use super::{csrf_field, layout, raw, PageError, Signed};
use crate::admin::{issue_key, valid_id};
use crate::config::BackendConfig;
use crate::error::ApiError;
use crate::AppState;
use tollgate_metering::billing::{self, parse_time};
use tollgate_metering::console_queries::LogFilter;
use tollgate_metering::money::{format_usd, parse_usd};
use tollgate_metering::periods::month_bounds;
use tollgate_metering::periods::rfc3339;
use tollgate_metering::store::{now_micros, CustomerFields, GroupBy, NewKey, Store, UsageFilter};

const HOUR: i64 = 3_600_000_000;
const DAY: i64 = 24 * HOUR;
/// Rows per page of the request log and the audit log.
const PAGE: i64 = 50;

type PageResult = Result<Markup, PageError>;

fn store(state: &AppState) -> Result<&Store, ApiError> {
    state
        .store
        .as_ref()
        .ok_or_else(|| ApiError::Unavailable("this gateway runs without a database".into()))
}

fn bad(message: impl Into<String>) -> PageError {
    PageError::from(ApiError::invalid(message.into(), None))
}

/// A form's fields in order (repeated names, like checkboxes, appear once each).
#[derive(Debug, Deserialize)]
#[serde(transparent)]
pub(crate) struct Fields(Vec<(String, String)>);

impl Fields {
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty())
    }

    fn all(&self, name: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .collect()
    }
}

/// A limit field: blank clears it, otherwise a positive integer.
fn limit(fields: &Fields, name: &str) -> Result<Option<i64>, PageError> {
    match fields.get(name) {
        None => Ok(None),
        Some(t) => match t.parse::<i64>() {
            Ok(n) if n > 0 => Ok(Some(n)),
            _ => Err(bad(format!(
                "{name} must be a positive whole number, got `{t}`"
            ))),
        },
    }
}

/// A budget field: blank clears it, otherwise USD as a decimal.
fn budget(fields: &Fields) -> Result<Option<i64>, PageError> {
    fields
        .get("budget_usd")
        .map(|t| parse_usd(t).map_err(|e| bad(format!("budget: {e}"))))
        .transpose()
}

fn usd(nano: i64) -> String {
    // Six decimals are enough to read; exports carry all nine.
    let text = format_usd(nano);
    match text.split_once('.') {
        Some((whole, frac)) => format!("${whole}.{}", &frac[..6.min(frac.len())]),
        None => format!("${text}"),
    }
}

fn opt(v: Option<i64>) -> String {
    v.map_or_else(|| "—".into(), |n| n.to_string())
}

fn time(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_default()
}

// ---- overview -------------------------------------------------------------------------------

/// Totals of one window: requests, tokens, spend, errors.
struct Totals {
    requests: i64,
    input: i64,
    cached: i64,
    output: i64,
    cost: i64,
    errors: i64,
}

async fn totals(store: &Store, start: i64, end: i64) -> Result<Totals, PageError> {
    let filter = UsageFilter {
        start,
        end,
        ..UsageFilter::default()
    };
    let rows = store.aggregate(&filter, &[], None).await?;
    let errors = store
        .status_counts(start, end)
        .await?
        .into_iter()
        .filter(|(s, _)| s == "failed")
        .map(|(_, n)| n)
        .sum();
    let sum = |f: fn(&tollgate_metering::store::UsageRow) -> i64| rows.iter().map(f).sum::<i64>();
    Ok(Totals {
        requests: sum(|r| r.requests),
        input: sum(|r| r.input_tokens),
        cached: sum(|r| r.cached_input_tokens),
        output: sum(|r| r.output_tokens),
        cost: sum(|r| r.cost_nano_usd),
        errors,
    })
}

/// Per-bucket values of `rows` over `count` buckets of `width` from `origin`.
fn series(
    rows: &[tollgate_metering::store::UsageRow],
    origin: i64,
    width: i64,
    count: i64,
    label: impl Fn(i64) -> String,
    value: impl Fn(&tollgate_metering::store::UsageRow) -> f64,
) -> Vec<Bar> {
    (0..count)
        .map(|i| {
            let start = origin + i * width;
            let v = rows
                .iter()
                .filter(|r| r.bucket_start == Some(start))
                .map(&value)
                .sum();
            Bar {
                label: label(start),
                value: v,
            }
        })
        .collect()
}

pub(crate) async fn overview(
    State(state): State<AppState>,
    Extension(signed): Extension<Signed>,
) -> PageResult {
    let store = store(&state)?;
    let now = now_micros();
    let mut windows = Vec::new();
    for (label, id, width) in [
        ("Last hour", "1h", HOUR),
        ("Last 24 hours", "24h", DAY),
        ("Last 30 days", "30d", 30 * DAY),
    ] {
        windows.push((label, id, totals(store, now - width, now + 1).await?));
    }
    // Hourly over the last day, daily over the last 30 days.
    let hour_origin = (now / HOUR - 23) * HOUR;
    let all = |start| UsageFilter {
        start,
        end: now + 1,
        ..UsageFilter::default()
    };
    let hourly = store
        .aggregate(&all(hour_origin), &[], Some((hour_origin, HOUR)))
        .await?;
    let day_origin = (now / DAY - 29) * DAY;
    let daily = store
        .aggregate(&all(day_origin), &[], Some((day_origin, DAY)))
        .await?;
    let hour_label = |t: i64| {
        chrono::DateTime::from_timestamp_micros(t)
            .map(|t| t.format("%H:00").to_string())
            .unwrap_or_default()
    };
    let day_label = |t: i64| {
        chrono::DateTime::from_timestamp_micros(t)
            .map(|t| t.format("%m-%d").to_string())
            .unwrap_or_default()
    };
    let requests_chart = chart::bars(
        "Requests per hour, last 24 hours",
        &series(&hourly, hour_origin, HOUR, 24, hour_label, |r| {
            r.requests as f64
        }),
        |v| format!("{v:.0} requests"),
    );
    let spend_chart = chart::bars(
        "Spend per day, last 30 days",
        &series(&daily, day_origin, DAY, 30, day_label, |r| {
            r.cost_nano_usd as f64 / 1e9
        }),
        |v| format!("${v:.6}"),
    );
    let tokens_chart = chart::bars(
        "Tokens per day (input + output), last 30 days",
        &series(&daily, day_origin, DAY, 30, day_label, |r| {
            (r.input_tokens + r.output_tokens) as f64
        }),
        |v| format!("{v:.0} tokens"),
    );
    let month = all(now - 30 * DAY);
    let by_model = store.aggregate(&month, &[GroupBy::Model], None).await?;
    let by_customer = store.aggregate(&month, &[GroupBy::Customer], None).await?;
    let content = html! {
        section {
            h2 { "Traffic" }
            table.stats {
                thead { tr { th { "Window" } th { "Requests" } th { "Input tokens" } th { "Cached tokens" } th { "Output tokens" } th { "Spend" } th { "Errors" } } }
                tbody {
                    @for (label, id, t) in &windows {
                        tr {
                            th { (label) }
                            td id={"requests-" (id)} { (t.requests) }
                            td id={"input-" (id)} { (t.input) }
                            td id={"cached-" (id)} { (t.cached) }
                            td id={"output-" (id)} { (t.output) }
                            td id={"spend-" (id)} { (usd(t.cost)) }
                            td id={"errors-" (id)} { (t.errors) }
                        }
                    }
                }
            }
        }
        section.charts {
            figure { figcaption { "Requests per hour (24 h)" } (raw(requests_chart)) }
            figure { figcaption { "Spend per day (30 days)" } (raw(spend_chart)) }
            figure { figcaption { "Tokens per day (30 days)" } (raw(tokens_chart)) }
        }
        section.split {
            div {
                h2 { "By model (30 days)" }
                (usage_table("Model", by_model.iter().map(|r| (r.model.clone().unwrap_or_default(), r))))
            }
            div {
                h2 { "By customer (30 days)" }
                (usage_table("Customer", by_customer.iter().map(|r| (r.customer_id.clone().unwrap_or_default(), r))))
            }
        }
        section {
            h2 { "Engines and backends, now" }
            (live_state(&state))
        }
    };
    Ok(layout(&signed, "Overview", content))
}

fn usage_table<'a>(
    first: &str,
    rows: impl Iterator<Item = (String, &'a tollgate_metering::store::UsageRow)>,
) -> Markup {
    html! {
        table {
            thead { tr { th { (first) } th { "Requests" } th { "Input" } th { "Cached" } th { "Output" } th { "Spend" } } }
            tbody {
                @for (name, r) in rows {
                    tr { td { (name) } td { (r.requests) } td { (r.input_tokens) } td { (r.cached_input_tokens) } td { (r.output_tokens) } td { (usd(r.cost_nano_usd)) } }
                }
            }
        }
    }
}

fn live_state(state: &AppState) -> Markup {
    let mut models: Vec<_> = state.backends.iter().collect();
    models.sort_by(|a, b| a.0.cmp(b.0));
    html! {
        table #live {
            thead { tr { th { "Model" } th { "Running" } th { "Waiting" } th { "Batch" } th { "KV cache" } th { "Backends" } } }
            tbody {
                @for (id, backend) in models {
                    @let load = backend.load();
                    @let members = backend.members();
                    tr {
                        td { (id) }
                        td { (load.running) }
                        td { (load.waiting) }
                        td { (load.batch_size) }
                        td {
                            @if load.kv_cache_capacity_bytes > 0 {
                                (format!("{:.1}% of {} MiB",
                                    load.kv_cache_used_bytes as f64 * 100.0 / load.kv_cache_capacity_bytes as f64,
                                    load.kv_cache_capacity_bytes / (1024 * 1024)))
                            } @else { "—" }
                        }
                        td { (health(&members)) }
                    }
                }
            }
        }
    }
}

fn health(members: &[(String, bool)]) -> Markup {
    html! {
        @if members.is_empty() {
            span.ok { "in process" }
        }
        @for (name, healthy) in members {
            span class=@if *healthy { "ok" } @else { "down" } {
                (name) (if *healthy { " ✓" } else { " ✗ ejected" })
            }
            " "
        }
    }
}

// ---- customers and keys ----------------------------------------------------------------------

pub(crate) async fn customers(
    State(state): State<AppState>,
    Extension(signed): Extension<Signed>,
) -> PageResult {
    let store = store(&state)?;
    let (period_start, _) = month_bounds(now_micros());
    let mut rows = Vec::new();
    for c in store.list_customers().await? {
        let spent = store.spent_since(&c.id, period_start).await?;
        rows.push((c, spent));
    }
    let content = html! {
        table #customers {
            thead { tr { th { "Id" } th { "Name" } th { "Spent this month" } th { "Budget" } th { "RPM" } th { "TPM" } th { "Created" } } }
            tbody {
                @for (c, spent) in &rows {
                    tr {
                        td { a href={"/console/customers/" (c.id)} { (c.id) } }
                        td { (c.name) }
                        td { (usd(*spent)) }
                        td {
                            @match c.budget_nano_usd {
                                Some(b) => {
                                    (usd(b))
                                    @let pct = if b > 0 { (*spent as f64 / b as f64 * 100.0).min(999.0) } else { 100.0 };
                                    " " meter min="0" max="100" value=(format!("{pct:.0}")) {} " " (format!("{pct:.0}%"))
                                }
                                None => { "none" }
                            }
                        }
                        td { (opt(c.rpm)) }
                        td { (opt(c.tpm)) }
                        td { (time(c.created_at)) }
                    }
                }
            }
        }
        h2 { "New customer" }
        form.grid method="post" action="/console/customers" {
            (csrf_field(&signed))
            label { "Id " input name="id" required pattern="[A-Za-z0-9._-]{1,64}"; }
            label { "Name " input name="name"; }
            label { "Monthly budget (USD) " input name="budget_usd" inputmode="decimal"; }
            label { "RPM " input name="rpm" inputmode="numeric"; }
            label { "TPM " input name="tpm" inputmode="numeric"; }
            button type="submit" id="create-customer" { "Create customer" }
        }
    };
    Ok(layout(&signed, "Customers", content))
}

pub(crate) async fn create_customer(
    State(state): State<AppState>,
    Extension(signed): Extension<Signed>,
    Form(fields): Form<Fields>,
) -> Result<Response, PageError> {
    let id = fields.get("id").unwrap_or_default().to_string();
    if !valid_id(&id) {
        return Err(bad(format!(
            "`{id}` is not a valid id: 1-64 letters, digits, `-`, `_`, `.`"
        )));
    }
    let new = CustomerFields {
        name: Some(fields.get("name").unwrap_or(&id).to_string()),
        budget_nano_usd: Some(budget(&fields)?),
        budget_period: None,
        rpm: Some(limit(&fields, "rpm")?),
        tpm: Some(limit(&fields, "tpm")?),
        max_concurrent_requests: None,
    };
    store(&state)?
        .create_customer(&id, new, &signed.actor)
        .await?;
    Ok(Redirect::to(&format!("/console/customers/{id}")).into_response())
}

pub(crate) async fn update_customer(
    State(state): State<AppState>,
    Extension(signed): Extension<Signed>,
    Path(id): Path<String>,
    Form(fields): Form<Fields>,
) -> Result<Response, PageError> {
    let change = CustomerFields {
        name: fields.get("name").map(str::to_string),
        budget_nano_usd: Some(budget(&fields)?),
        budget_period: None,
        rpm: Some(limit(&fields, "rpm")?),
        tpm: Some(limit(&fields, "tpm")?),
        max_concurrent_requests: None,
    };
    store(&state)?
        .update_customer(&id, change, &signed.actor)
        .await?;
    state.auth.forget_customer(&id);
    Ok(Redirect::to(&format!("/console/customers/{id}")).into_response())
}

pub(crate) async fn customer(
    State(state): State<AppState>,
    Extension(signed): Extension<Signed>,
    Path(id): Path<String>,
) -> PageResult {
    customer_page(&state, &signed, &id, None).await
}

/// A customer's page; `issued` is a key just created and its secret, shown this once.
async fn customer_page(
    state: &AppState,
    signed: &Signed,
    id: &str,
    issued: Option<(String, String)>,
) -> PageResult {
    let store = store(state)?;
    let c = store.customer(id).await?;
    let keys = store.list_keys(id).await?;
    let (period_start, _) = month_bounds(now_micros());
    let spent = store.spent_since(id, period_start).await?;
    let now = now_micros();
    let field = |v: Option<i64>| v.map(|n| n.to_string()).unwrap_or_default();
    let content = html! {
        @if let Some((key_id, secret)) = &issued {
            section.secret #new-key {
                h2 { "New key " (key_id) }
                p { "Copy the secret now: it is not stored and cannot be shown again." }
                code #secret { (secret) }
                " "
                button type="button" data-copy="secret" { "Copy" }
            }
        }
        p { "Spent this month: " strong #spent { (usd(spent)) }
            @if let Some(b) = c.budget_nano_usd { " of " (usd(b)) } }
        h2 { "Settings" }
        form.grid method="post" action={"/console/customers/" (c.id)} {
            (csrf_field(signed))
            label { "Name " input name="name" value=(c.name); }
            label { "Monthly budget (USD, blank: none) " input name="budget_usd" value=(c.budget_nano_usd.map(format_usd).unwrap_or_default()); }
            label { "RPM (blank: none) " input name="rpm" value=(field(c.rpm)); }
            label { "TPM (blank: none) " input name="tpm" value=(field(c.tpm)); }
            button type="submit" id="save-customer" { "Save" }
        }
        h2 { "Keys" }
        table #keys {
            thead { tr { th { "Id" } th { "Name" } th { "Prefix" } th { "Models" } th { "RPM" } th { "TPM" } th { "Budget" } th { "Expires" } th { "State" } th {} } }
            tbody {
                @for k in &keys {
                    @let live = k.revoked_at.is_none() && k.expires_at.is_none_or(|e| e > now);
                    tr id={"key-" (k.id)} {
                        td { (k.id) }
                        td { (k.name) }
                        td { code { (k.key_prefix) "…" } }
                        td { (k.models.as_ref().map_or_else(|| "all".to_string(), |m| m.join(", "))) }
                        td { (opt(k.rpm)) }
                        td { (opt(k.tpm)) }
                        td { (k.budget_nano_usd.map_or_else(|| "—".to_string(), usd)) }
                        td { (k.expires_at.map(time).unwrap_or_else(|| "never".into())) }
                        td.state {
                            @if let Some(r) = k.revoked_at { "revoked " (time(r)) }
                            @else if live { "active" } @else { "expired" }
                        }
                        td {
                            @if k.revoked_at.is_none() {
                                form method="post" action={"/console/keys/" (k.id) "/revoke"} {
                                    (csrf_field(signed))
                                    button.danger type="submit" name="revoke" { "Revoke" }
                                }
                            }
                        }
                    }
                }
            }
        }
        h2 { "New key" }
        form.grid method="post" action={"/console/customers/" (c.id) "/keys"} {
            (csrf_field(signed))
            label { "Name " input name="name" id="key-name"; }
            fieldset {
                legend { "Models (none checked: all)" }
                @for m in state.config.models.keys() {
                    label.inline { input type="checkbox" name="models" value=(m); " " (m) }
                }
            }
            label { "RPM " input name="rpm" inputmode="numeric"; }
            label { "TPM " input name="tpm" inputmode="numeric"; }
            label { "Monthly budget (USD) " input name="budget_usd" inputmode="decimal"; }
            label { "Expires (date) " input name="expires_at" type="date"; }
            button type="submit" id="create-key" { "Create key" }
        }
        p { a href={"/console/requests?customer_id=" (c.id)} { "This customer's requests" } " · "
            a href={"/console/invoices?customer_id=" (c.id)} { "Invoice" } }
    };
    Ok(layout(signed, &format!("Customer {}", c.id), content))
}

pub(crate) async fn create_key(
    State(state): State<AppState>,
    Extension(signed): Extension<Signed>,
    Path(customer_id): Path<String>,
    Form(fields): Form<Fields>,
) -> Result<Response, PageError> {
    let models = fields.all("models");
    if let Some(unknown) = models
        .iter()
        .find(|m| !state.config.models.contains_key(*m))
    {
        return Err(bad(format!("unknown model `{unknown}`")));
    }
    let expires_at = match fields.get("expires_at") {
        Some(t) => {
            let at = parse_time(t).map_err(bad)?;
            if at <= now_micros() {
                return Err(bad(format!("the expiry {t} is in the past")));
            }
            Some(at)
        }
        None => None,
    };
    let new = NewKey {
        name: fields.get("name").unwrap_or_default().to_string(),
        models: (!models.is_empty()).then_some(models),
        rpm: limit(&fields, "rpm")?,
        tpm: limit(&fields, "tpm")?,
        expires_at,
        tags: Default::default(),
        budget_nano_usd: budget(&fields)?,
        max_concurrent_requests: None,
    };
    let (key, secret) = issue_key(store(&state)?, &customer_id, new, &signed.actor).await?;
    let page = customer_page(&state, &signed, &customer_id, Some((key.id, secret))).await?;
    Ok((StatusCode::CREATED, page).into_response())
}

pub(crate) async fn revoke_key(
    State(state): State<AppState>,
    Extension(signed): Extension<Signed>,
    Path(key_id): Path<String>,
) -> Result<Response, PageError> {
    let key = store(&state)?.revoke_key(&key_id, &signed.actor).await?;
    state.auth.forget_key(&key_id);
    Ok(Redirect::to(&format!("/console/customers/{}", key.customer_id)).into_response())
}

// ---- request log ------------------------------------------------------------------------------

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
        Some(c) => Some(crate::admin::parse_cursor(&c).map_err(bad)?),
        None => None,
    };
    let records = store(&state)?.records_newest(&filter, before, PAGE).await?;
    let value = |v: &Option<String>| v.clone().unwrap_or_default();
    let next = (records.len() as i64 == PAGE)
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
                @for m in state.config.models.keys() {
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
            thead { tr { th { "Started" } th { "Request id" } th { "Customer" } th { "Key" } th { "Model" } th { "Status" } th { "Finish" } th { "Input" } th { "Cached" } th { "Output" } th { "Cost" } th { "TTFT" } th { "Duration" } } }
            tbody {
                @for (_, r) in &records {
                    tr.record {
                        td { (time(r.started_at)) }
                        td.request-id { code { (r.id) } }
                        td { (r.customer_id) }
                        td { (r.key_id) }
                        td { (r.model) }
                        td class={"status " (r.status)} { (r.status) }
                        td { (r.finish_reason.clone().unwrap_or_default()) }
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

// ---- models -----------------------------------------------------------------------------------

pub(crate) async fn models(
    State(state): State<AppState>,
    Extension(signed): Extension<Signed>,
) -> PageResult {
    let content = html! {
        table #models {
            thead { tr { th { "Model" } th { "Backend" } th { "Context" } th { "Input / Mtok" } th { "Cached input / Mtok" } th { "Output / Mtok" } th { "Health" } th { "Running / waiting" } } }
            tbody {
                @for (id, m) in state.config.models.iter() {
                    @let backend = state.backends.get(id);
                    tr {
                        td { (id) }
                        td { (match &m.backend { BackendConfig::Local(l) => format!("local ({})", l.device), BackendConfig::Http(_) => "http".to_string() }) }
                        td { (m.context_length.map_or_else(|| "model's own".to_string(), |c| c.to_string())) }
                        td { "$" (m.price.input_per_mtok) }
                        td { "$" (m.price.cached_input_per_mtok) }
                        td { "$" (m.price.output_per_mtok) }
                        td { @if let Some(b) = backend { (health(&b.members())) } @else { span.down { "not loaded" } } }
                        td { @if let Some(b) = backend { @let l = b.load(); (l.running) " / " (l.waiting) } }
                    }
                }
            }
        }
    };
    Ok(layout(&signed, "Models", content))
}

// ---- invoices and exports ---------------------------------------------------------------------

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
                @for g in ["customer,model", "customer,model,day", "customer,key", "model", "day"] {
                    option value=(g) { (g) }
                }
            } }
            button type="submit" id="export-csv" { "Download CSV" }
        }
    };
    Ok(layout(&signed, "Invoices & exports", content))
}

fn invoice_table(inv: &Value) -> Markup {
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        v => v.to_string(),
    };
    let empty = Vec::new();
    let lines = inv["line_items"].as_array().unwrap_or(&empty);
    html! {
        table #invoice {
            thead { tr { th { "Kind" } th { "Model" } th { "Requests" } th { "Tokens" } th { "Price / Mtok" } th { "Amount (USD)" } } }
            tbody {
                @for l in lines {
                    @let cached = l["kind"] == "cached_input";
                    tr {
                        td { (text(&l["kind"])) }
                        td { (text(&l["model"])) }
                        td { (text(&l["requests"])) }
                        td { @if cached { (text(&l["cached_input_tokens"])) " cached" }
                             @else { (text(&l["input_tokens"])) " in / " (text(&l["output_tokens"])) " out" } }
                        td { @if cached { (text(&l["cached_input_price_per_mtok"])) }
                             @else { (text(&l["input_price_per_mtok"])) " / " (text(&l["output_price_per_mtok"])) } }
                        td { (text(&l["amount_usd"])) }
                    }
                }
            }
            tfoot { tr { th colspan="5" { "Total " (text(&inv["period"])) } th #invoice-total { (text(&inv["total_usd"])) } } }
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

// ---- audit log --------------------------------------------------------------------------------

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
        Some(c) => Some(crate::admin::parse_cursor(&c).map_err(bad)?),
        None => None,
    };
    let entries = store(&state)?.audit_before(before, PAGE).await?;
    let next = (entries.len() as i64 == PAGE)
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

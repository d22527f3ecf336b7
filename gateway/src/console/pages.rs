//! The console's screens: the overview here, customers and their keys in `customers`, the request
//! log, models, invoices and exports and the audit log in `reports`; and what they share (form
//! fields, money and time as shown). Each handler reads through the store (or the backends for
//! live state) and renders one page; forms that change something go through the store's audited
//! methods as the signed-in session and answer with a redirect (or, for a new key, the one page
//! that shows its secret).

use axum::extract::State;
use axum::Extension;
use maud::{html, Markup};
use serde::Deserialize;

use super::chart::{self, Bar};
use super::{layout, raw, PageError, Signed};
use crate::error::ApiError;
use crate::AppState;
use tollgate_metering::money::{format_usd, parse_usd};
use tollgate_metering::store::{now_micros, GroupBy, Store, UsageFilter};

const HOUR: i64 = 3_600_000_000;
const DAY: i64 = 24 * HOUR;
/// Rows per page of the request log and the audit log.
pub(super) const PAGE: i64 = 50;

pub(super) type PageResult = Result<Markup, PageError>;

pub(super) fn store(state: &AppState) -> Result<&Store, ApiError> {
    state
        .store
        .as_ref()
        .ok_or_else(|| ApiError::Unavailable("this gateway runs without a database".into()))
}

pub(super) fn bad(message: impl Into<String>) -> PageError {
    PageError::from(ApiError::invalid(message.into(), None))
}

/// A form's fields in order (repeated names, like checkboxes, appear once each).
#[derive(Debug, Deserialize)]
#[serde(transparent)]
pub(crate) struct Fields(Vec<(String, String)>);

impl Fields {
    pub(super) fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty())
    }

    pub(super) fn all(&self, name: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .collect()
    }
}

/// A limit field: blank clears it, otherwise a positive integer.
pub(super) fn limit(fields: &Fields, name: &str) -> Result<Option<i64>, PageError> {
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
pub(super) fn budget(fields: &Fields) -> Result<Option<i64>, PageError> {
    fields
        .get("budget_usd")
        .map(|t| parse_usd(t).map_err(|e| bad(format!("budget: {e}"))))
        .transpose()
}

pub(super) fn usd(nano: i64) -> String {
    // Six decimals are enough to read; exports carry all nine.
    let text = format_usd(nano);
    match text.split_once('.') {
        Some((whole, frac)) => format!("${whole}.{}", &frac[..6.min(frac.len())]),
        None => format!("${text}"),
    }
}

pub(super) fn opt(v: Option<i64>) -> String {
    v.map_or_else(|| "—".into(), |n| n.to_string())
}

pub(super) fn time(micros: i64) -> String {
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
        .filter(|(s, _)| *s == tollgate_metering::kinds::Outcome::Failed)
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

/// The overview's charts: requests per hour over the last day, spend and tokens per day over
/// the last 30 days.
async fn charts(store: &Store, now: i64) -> Result<Markup, PageError> {
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
            chart::drawn(r.requests.into())
        }),
        |v| format!("{v:.0} requests"),
    );
    let spend_chart = chart::bars(
        "Spend per day, last 30 days",
        &series(&daily, day_origin, DAY, 30, day_label, |r| {
            chart::drawn(r.cost_nano_usd.into()) / 1e9
        }),
        |v| format!("${v:.6}"),
    );
    let tokens_chart = chart::bars(
        "Tokens per day (input + output), last 30 days",
        &series(&daily, day_origin, DAY, 30, day_label, |r| {
            chart::drawn(i128::from(r.input_tokens) + i128::from(r.output_tokens))
        }),
        |v| format!("{v:.0} tokens"),
    );
    Ok(html! {
        section.charts {
            figure { figcaption { "Requests per hour (24 h)" } (raw(requests_chart)) }
            figure { figcaption { "Spend per day (30 days)" } (raw(spend_chart)) }
            figure { figcaption { "Tokens per day (30 days)" } (raw(tokens_chart)) }
        }
    })
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
    let charts = charts(store, now).await?;
    let month = UsageFilter {
        start: now - 30 * DAY,
        end: now + 1,
        ..UsageFilter::default()
    };
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
        (charts)
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
    let catalogue = state.catalogue.current();
    let mut models: Vec<_> = catalogue.backends.iter().collect();
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
                                    chart::drawn(load.kv_cache_used_bytes.into()) * 100.0 / chart::drawn(load.kv_cache_capacity_bytes.into()),
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

pub(super) fn health(members: &[(String, bool)]) -> Markup {
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

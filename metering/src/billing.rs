//! Reading the ledger for billing: aggregates, invoices and record exports, shaped once here and
//! shared by the admin API and the CLI (`tollgate usage ...`), so both print the same columns;
//! the shapes themselves are the types of [`views`].

pub mod views;

use chrono::{DateTime, TimeZone, Utc};
use rust_decimal::Decimal;
use serde_json::{json, Value};

use crate::kinds::ServiceTier;
use crate::money::{format_usd, reservation_nano_usd};
use crate::periods::{month_bounds, rfc3339};
use crate::store::{
    GroupBy, Reservation, Store, StoreError, StoreResult, UsageFilter, UsageRecord, UsageRow,
};
use views::{Invoice, InvoiceLine, TagPair};

/// RFC 3339 (or a bare `YYYY-MM-DD`, meaning its UTC midnight) → microseconds.
pub fn parse_time(text: &str) -> Result<i64, String> {
    let text = text.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.timestamp_micros());
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        if let Some(t) = d.and_hms_opt(0, 0, 0) {
            return Ok(t.and_utc().timestamp_micros());
        }
    }
    Err(format!(
        "`{text}` is not an RFC 3339 time (e.g. 2026-11-01T00:00:00Z) or a date (2026-11-01)"
    ))
}

/// `YYYY-MM` → the month's `[start, end)` in microseconds.
pub fn parse_period(text: &str) -> Result<(i64, i64), String> {
    let bad = || format!("`{text}` is not a month of the form YYYY-MM");
    let (y, m) = text.trim().split_once('-').ok_or_else(bad)?;
    let (y, m): (i32, u32) = (y.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    let start = Utc
        .with_ymd_and_hms(y, m, 1, 0, 0, 0)
        .single()
        .ok_or_else(bad)?;
    Ok(month_bounds(start.timestamp_micros()))
}

/// The current UTC month as `YYYY-MM`.
pub fn current_period() -> String {
    Utc::now().format("%Y-%m").to_string()
}

/// `customer,model,key,day,service_tier,tag:KEY` → group columns. Unknown names are an error naming them.
pub fn parse_group_by(text: &str) -> Result<Vec<GroupBy>, String> {
    let mut groups = Vec::new();
    for name in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let g = match name {
            tag if tag.starts_with("tag:") => {
                let key = &tag["tag:".len()..];
                if key.is_empty() {
                    return Err("`tag:` needs a tag key (`tag:project`)".into());
                }
                if groups.iter().any(|g| matches!(g, GroupBy::Tag(_))) {
                    return Err("group by one tag at a time".into());
                }
                GroupBy::Tag(key.to_string())
            }
            "customer" | "customer_id" => GroupBy::Customer,
            "model" => GroupBy::Model,
            "key" | "key_id" => GroupBy::Key,
            "day" => GroupBy::Day,
            "service_tier" | "tier" => GroupBy::ServiceTier,
            other => {
                return Err(format!(
                "cannot group by `{other}`; use customer, model, key, day, service_tier or tag:KEY"
            ))
            }
        };
        if !groups.contains(&g) {
            groups.push(g);
        }
    }
    Ok(groups)
}

/// An invoice's `group_by`: `tag:KEY` → the tag's key (invoices are split by nothing else).
/// Errors name the text.
pub fn parse_invoice_group(text: &str) -> Result<String, String> {
    match text.strip_prefix("tag:") {
        Some(key) if !key.is_empty() => Ok(key.to_string()),
        _ => Err(format!("invoices group by `tag:KEY` only, not `{text}`")),
    }
}

/// `key:value` (or `key=value`) → a tag filter. Errors name the text.
pub fn parse_tag_filter(text: &str) -> Result<(String, String), String> {
    crate::tags::parse_pair(text)
        .map_err(|_| format!("`{text}` is not a tag filter of the form key:value"))
}

/// Column names of an aggregate grouped by `groups`, in output order (a tag's column is
/// `tag:KEY`).
pub fn usage_columns(groups: &[GroupBy]) -> Vec<String> {
    let mut cols: Vec<String> = groups
        .iter()
        .filter_map(|g| match g {
            GroupBy::Customer => Some("customer_id".to_string()),
            GroupBy::Model => Some("model".to_string()),
            GroupBy::Key => Some("key_id".to_string()),
            GroupBy::Day => Some("day".to_string()),
            GroupBy::ServiceTier => Some("service_tier".to_string()),
            GroupBy::Tag(key) => Some(format!("tag:{key}")),
            GroupBy::Prices | GroupBy::Adapter => None,
        })
        .collect();
    cols.extend(
        [
            "requests",
            "input_tokens",
            "output_tokens",
            "cost_usd",
            "cached_input_tokens",
        ]
        .into_iter()
        .map(String::from),
    );
    cols
}

fn usage_cell(row: &UsageRow, column: &str) -> String {
    match column {
        "customer_id" => row.customer_id.clone().unwrap_or_default(),
        "model" => row.model.clone().unwrap_or_default(),
        "key_id" => row.key_id.clone().unwrap_or_default(),
        "service_tier" => row.service_tier.map(|t| t.to_string()).unwrap_or_default(),
        "day" => row
            .bucket_start
            .and_then(|m| Utc.timestamp_micros(m).single())
            .map(|t| t.format("%Y-%m-%d").to_string())
            .unwrap_or_default(),
        "requests" => row.requests.to_string(),
        "input_tokens" => row.input_tokens.to_string(),
        "output_tokens" => row.output_tokens.to_string(),
        "cost_usd" => format_usd(row.cost_nano_usd),
        "cached_input_tokens" => row.cached_input_tokens.to_string(),
        c if c.starts_with("tag:") => row.tag_value.clone().unwrap_or_default(),
        _ => String::new(),
    }
}

/// One aggregate row as JSON: group columns as strings, counts as numbers, money as a string.
pub fn usage_row_json(row: &UsageRow, columns: &[String]) -> Value {
    let mut obj = serde_json::Map::new();
    for c in columns {
        let v = match c.as_str() {
            "requests" => json!(row.requests),
            "input_tokens" => json!(row.input_tokens),
            "output_tokens" => json!(row.output_tokens),
            "cached_input_tokens" => json!(row.cached_input_tokens),
            // Records without the tag: null, not "".
            t if t.starts_with("tag:") => json!(row.tag_value),
            _ => json!(usage_cell(row, c)),
        };
        obj.insert(c.to_string(), v);
    }
    // The same count under the name it had before records and invoices set the one name
    // (`cached_input_tokens`); deprecated, kept for the clients that read it.
    obj.insert(
        "input_cached_tokens".to_string(),
        json!(row.cached_input_tokens),
    );
    Value::Object(obj)
}

/// An aggregate as CSV with a header line.
pub fn usage_csv(rows: &[UsageRow], columns: &[String]) -> Result<String, csv::Error> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(columns)?;
    for row in rows {
        w.write_record(columns.iter().map(|c| usage_cell(row, c)))?;
    }
    let bytes = w.into_inner().map_err(|e| e.into_error())?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Columns of an exported record, in order (the usage-record contract in the README).
pub const RECORD_COLUMNS: [&str; 30] = [
    "id",
    "customer_id",
    "key_id",
    "model",
    "endpoint",
    "stream",
    "status",
    "finish_reason",
    "input_tokens",
    "output_tokens",
    "started_at",
    "finished_at",
    "ttft_ms",
    "input_price_per_mtok",
    "output_price_per_mtok",
    "cost_usd",
    "cached_input_tokens",
    "cached_input_price_per_mtok",
    "cached_input_cost_usd",
    "usage_source",
    "tags",
    "idempotency_key",
    "service_tier",
    "accepted_prediction_tokens",
    "rejected_prediction_tokens",
    "rejected_prediction_price_per_mtok",
    "rejected_prediction_cost_usd",
    "batch_id",
    "base_model",
    "adapter",
];

/// The unit price a record's rejected prediction tokens were charged (the output price on
/// records older than predictions, which have none).
fn rejected_price(r: &UsageRecord) -> Decimal {
    r.prediction
        .price_per_mtok
        .unwrap_or(r.output_price_per_mtok)
}

/// The unit price a record's cached prompt tokens were charged (the input price on records
/// older than cached pricing).
fn cached_price(r: &UsageRecord) -> Decimal {
    r.cached_input_price_per_mtok
        .unwrap_or(r.input_price_per_mtok)
}

/// A record as a CSV row in [`RECORD_COLUMNS`] order.
pub fn record_cells(r: &UsageRecord) -> Vec<String> {
    vec![
        r.id.clone(),
        r.customer_id.clone(),
        r.key_id.clone(),
        r.model.clone(),
        r.endpoint.to_string(),
        r.stream.to_string(),
        r.status.to_string(),
        r.finish_reason.map(|f| f.to_string()).unwrap_or_default(),
        r.input_tokens.to_string(),
        r.output_tokens.to_string(),
        rfc3339(r.started_at),
        rfc3339(r.finished_at),
        r.ttft_ms.map(|t| t.to_string()).unwrap_or_default(),
        r.input_price_per_mtok.to_string(),
        r.output_price_per_mtok.to_string(),
        format_usd(r.cost_nano_usd),
        r.cached_input_tokens.to_string(),
        cached_price(r).to_string(),
        format_usd(r.cached_cost_nano_usd),
        r.usage_source.map(|s| s.to_string()).unwrap_or_default(),
        crate::tags::to_json(&r.tags).unwrap_or_default(),
        r.idempotency_key.clone().unwrap_or_default(),
        r.service_tier.to_string(),
        r.prediction.accepted.to_string(),
        r.prediction.rejected.to_string(),
        rejected_price(r).to_string(),
        format_usd(r.prediction.cost_nano_usd),
        r.batch_id.clone().unwrap_or_default(),
        r.base_model.clone().unwrap_or_default(),
        r.adapter.clone().unwrap_or_default(),
    ]
}

/// A customer's invoice for a month: one line per model, service tier and unit prices (fresh
/// input and output), and beside it a `cached_input` line for the prompt tokens served from a prefix
/// cache and a `rejected_prediction` line for the tokens of predictions computed and thrown
/// away; the total is the sum of the lines in integer nano-USD. A line's amount is the sum of
/// its records' parts: each record's cached part (`cached_input_cost_usd`, rounded alone) on
/// the cached line, its rejected prediction part (`rejected_prediction_cost_usd`) on that
/// line, the rest of its cost on the tokens line, so the lines add up to the records.
pub async fn invoice(store: &Store, customer_id: &str, period: &str) -> StoreResult<Invoice> {
    invoice_for(store, customer_id, period, None, None).await
}

/// [`invoice`], only of the records tagged `tag` (key, value) when given, and with its lines
/// split by the value of tag `group_tag` when given (each line then names it).
pub async fn invoice_for(
    store: &Store,
    customer_id: &str,
    period: &str,
    tag: Option<(String, String)>,
    group_tag: Option<String>,
) -> StoreResult<Invoice> {
    let (start, end) = parse_period(period).map_err(StoreError::Invalid)?;
    let customer = store.customer(customer_id).await?;
    let filter = UsageFilter {
        start,
        end,
        customer_id: Some(customer.id.clone()),
        model: None,
        tag: tag.clone(),
    };
    let mut groups = vec![
        GroupBy::Model,
        GroupBy::Adapter,
        GroupBy::ServiceTier,
        GroupBy::Prices,
    ];
    if let Some(key) = &group_tag {
        groups.insert(0, GroupBy::Tag(key.clone()));
    }
    let rows = store.aggregate(&filter, &groups, None).await?;
    let mut total: i64 = rows.iter().map(|r| r.cost_nano_usd).sum();
    let mut lines = Vec::new();
    for r in &rows {
        let row_lines = std::iter::once(InvoiceLine::tokens(r))
            .chain(InvoiceLine::cached_input(r))
            .chain(InvoiceLine::rejected_prediction(r));
        lines.extend(row_lines.map(|line| match &group_tag {
            Some(key) => line.tagged(key, r),
            None => line,
        }));
    }
    // Reservations are the customer's, not a tag's: on the invoice unless it is one tag's.
    if tag.is_none() {
        let reserved = store.reservations_between(&customer.id, start, end).await?;
        for r in &reserved {
            let (line, amount) = reservation_line(r, start, end);
            total += amount;
            lines.push(line);
        }
    }
    Ok(Invoice {
        object: "invoice",
        customer_id: customer.id,
        period: period.trim().to_string(),
        period_start: rfc3339(start),
        period_end: rfc3339(end),
        currency: "usd",
        line_items: lines,
        total_usd: format_usd(total),
        tag_filter: tag.map(|(key, value)| TagPair {
            key,
            value: Some(value),
        }),
    })
}

/// A reservation's line on the invoice of the month `[start, end)`: the share of the month it
/// was active × its TPM / 1000 × its price per 1,000 TPM per month, and that amount.
pub fn reservation_line(r: &Reservation, start: i64, end: i64) -> (InvoiceLine, i64) {
    const DAY: i64 = 86_400_000_000;
    let from = r.starts_at.max(start);
    let to = r.ends_at.map_or(end, |e| e.min(end));
    let active = (to - from).max(0);
    let amount = reservation_nano_usd(
        r.price_per_ktpm_month,
        r.reserved_tokens_per_minute,
        active,
        end - start,
    );
    let days = |micros: i64| (Decimal::from(micros) / Decimal::from(DAY)).normalize();
    let line = InvoiceLine {
        kind: "reservation",
        reservation_id: Some(r.id.clone()),
        model: r.model.clone(),
        service_tier: ServiceTier::Reserved,
        reserved_tokens_per_minute: Some(r.reserved_tokens_per_minute),
        price_per_ktpm_month: Some(r.price_per_ktpm_month),
        active_from: Some(rfc3339(from)),
        active_until: Some(rfc3339(to.max(from))),
        days_active: Some(days(active).to_string()),
        days_in_month: Some(days(end - start).to_string()),
        amount_usd: format_usd(amount),
        ..InvoiceLine::default()
    };
    (line, amount)
}

#[cfg(test)]
mod tests;

//! How the ledger's reports are shown: the usage report, a page of records and an invoice,
//! each one type that the admin API and the CLI serialize alike and that describes itself in
//! the OpenAPI document (`ToSchema`, named `UsageReport`, `UsageRecord`, `UsageRecordPage`,
//! `Invoice` and `InvoiceLine` there). Built from the store's rows by [`super`]; money as
//! decimal USD strings (prices the exact decimals they were configured as), times as RFC 3339.
//!
//! Fields keep the order the JSON has always had; the enums of [`crate::kinds`] are described
//! as the strings they serialize to (`value_type = String`), as the document always had them.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use crate::kinds::{Endpoint, FinishReason, Outcome, ServiceTier, UsageSource};
use crate::money::format_usd;
use crate::periods::rfc3339;
use crate::store::{RecordPage, UsageRecord, UsageRow};

/// `GET /admin/v1/usage`: one row per group, with the group's columns (`customer_id`,
/// `model`, `key_id`, `day`, `service_tier`, `tag:KEY`) and `requests`, `input_tokens`, `output_tokens`,
/// `cost_usd`, `cached_input_tokens` (and `input_cached_tokens`, the same count under its
/// deprecated name).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct UsageReport {
    #[schema(value_type = String, pattern = "^list$")]
    pub object: &'static str,
    pub start: String,
    pub end: String,
    // Rows of `usage_row_json`: their columns are the report's groups.
    #[schema(value_type = Vec<BTreeMap<String, Value>>)]
    pub data: Vec<Value>,
}

impl UsageReport {
    /// The report of `rows` over `[start, end)` (micros), in `columns` ([`super::usage_columns`]).
    pub fn new(start: i64, end: i64, rows: &[UsageRow], columns: &[String]) -> Self {
        Self {
            object: "list",
            start: rfc3339(start),
            end: rfc3339(end),
            data: rows
                .iter()
                .map(|r| super::usage_row_json(r, columns))
                .collect(),
        }
    }
}

/// One usage record, as the ledger holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
#[schema(as = UsageRecord)]
pub struct RecordView {
    pub id: String,
    pub customer_id: String,
    pub key_id: String,
    pub model: String,
    #[schema(value_type = String)]
    pub endpoint: Endpoint,
    pub stream: bool,
    /// `completed`, `cancelled` or `failed`.
    #[schema(value_type = String)]
    pub status: Outcome,
    #[schema(value_type = Option<String>, required)]
    pub finish_reason: Option<FinishReason>,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub started_at: String,
    pub finished_at: String,
    #[schema(required)]
    pub ttft_ms: Option<i64>,
    #[schema(value_type = String)]
    pub input_price_per_mtok: Decimal,
    #[schema(value_type = String)]
    pub output_price_per_mtok: Decimal,
    pub cost_usd: String,
    pub cached_input_tokens: i64,
    #[schema(value_type = String)]
    pub cached_input_price_per_mtok: Decimal,
    pub cached_input_cost_usd: String,
    // `null` on records older than it (the copy of this schema said a string).
    #[schema(value_type = Option<String>, required)]
    pub usage_source: Option<UsageSource>,
    pub tags: BTreeMap<String, String>,
    /// The `Idempotency-Key` its request carried.
    #[schema(required)]
    pub idempotency_key: Option<String>,
    /// The class of service it was served and priced at.
    #[schema(value_type = String)]
    pub service_tier: ServiceTier,
    /// Tokens of its `prediction` kept in the output (a part of `output_tokens`).
    pub accepted_prediction_tokens: i64,
    /// Tokens of its `prediction` computed and thrown away (not a part of `output_tokens`),
    /// charged at `rejected_prediction_price_per_mtok`; their part of `cost_usd`.
    pub rejected_prediction_tokens: i64,
    #[schema(value_type = String)]
    pub rejected_prediction_price_per_mtok: Decimal,
    pub rejected_prediction_cost_usd: String,
    /// The batch (Batch API) its request was a line of; `null` otherwise.
    pub batch_id: Option<String>,
    /// A request to a LoRA adapter's model id: its base model (`model` is the id requested,
    /// `<base_model>:<adapter>`); `null` otherwise.
    pub base_model: Option<String>,
    /// That adapter's name; `null` otherwise.
    pub adapter: Option<String>,
}

impl From<&UsageRecord> for RecordView {
    fn from(r: &UsageRecord) -> Self {
        Self {
            id: r.id.clone(),
            customer_id: r.customer_id.clone(),
            key_id: r.key_id.clone(),
            model: r.model.clone(),
            endpoint: r.endpoint,
            stream: r.stream,
            status: r.status,
            finish_reason: r.finish_reason,
            input_tokens: r.input_tokens,
            output_tokens: r.output_tokens,
            started_at: rfc3339(r.started_at),
            finished_at: rfc3339(r.finished_at),
            ttft_ms: r.ttft_ms,
            input_price_per_mtok: r.input_price_per_mtok,
            output_price_per_mtok: r.output_price_per_mtok,
            cost_usd: format_usd(r.cost_nano_usd),
            cached_input_tokens: r.cached_input_tokens,
            cached_input_price_per_mtok: super::cached_price(r),
            cached_input_cost_usd: format_usd(r.cached_cost_nano_usd),
            usage_source: r.usage_source,
            tags: r.tags.clone(),
            idempotency_key: r.idempotency_key.clone(),
            service_tier: r.service_tier,
            accepted_prediction_tokens: r.prediction.accepted,
            rejected_prediction_tokens: r.prediction.rejected,
            rejected_prediction_price_per_mtok: super::rejected_price(r),
            rejected_prediction_cost_usd: format_usd(r.prediction.cost_nano_usd),
            batch_id: r.batch_id.clone(),
            base_model: r.base_model.clone(),
            adapter: r.adapter.clone(),
        }
    }
}

/// `GET /admin/v1/usage/records`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct UsageRecordPage {
    #[schema(value_type = String, pattern = "^list$")]
    pub object: &'static str,
    pub data: Vec<RecordView>,
    /// Pass as `after` for the next page.
    #[schema(required)]
    pub next_cursor: Option<String>,
    pub has_more: bool,
}

impl From<&RecordPage> for UsageRecordPage {
    fn from(page: &RecordPage) -> Self {
        Self {
            object: "list",
            data: page.records.iter().map(RecordView::from).collect(),
            next_cursor: page.last.map(|c| c.to_string()),
            has_more: page.has_more,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct TagPair {
    pub key: String,
    #[schema(required)]
    pub value: Option<String>,
}

/// An invoice line: `kind` `tokens` (input and output tokens), `cached_input`,
/// `rejected_prediction` (tokens of predictions computed and thrown away), or `reservation`
/// (a month's share of reserved capacity).
// A line carries the fields of its kind only: the others are left out, not `null` (but
// `base_model` and `adapter`, on every line).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct InvoiceLine {
    #[schema(value_type = String)]
    pub kind: &'static str,
    /// Reservation lines: the reservation, its TPM and price, and the share of the month.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reservation_id: Option<String>,
    pub model: String,
    /// The base model of an adapter's model id (`<base_model>:<adapter>`, an operator's or a
    /// customer's adapter); `null` on other lines.
    #[schema(required)]
    pub base_model: Option<String>,
    /// The adapter's name of an adapter's model id; `null` on other lines.
    #[schema(required)]
    pub adapter: Option<String>,
    /// The tier the line's requests were served at (`reserved` on reservation lines).
    #[schema(value_type = String)]
    pub service_tier: ServiceTier,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_tokens: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_tokens: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_price_per_mtok: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_price_per_mtok: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cached_input_tokens: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cached_input_price_per_mtok: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejected_prediction_tokens: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub rejected_prediction_price_per_mtok: Option<Decimal>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reserved_tokens_per_minute: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub price_per_ktpm_month: Option<Decimal>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active_from: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active_until: Option<String>,
    /// Decimal days (`"15"`, `"2.5"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub days_active: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub days_in_month: Option<String>,
    pub amount_usd: String,
    /// With `group_by=tag:KEY`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<TagPair>,
}

impl InvoiceLine {
    /// The line of an aggregate row's fresh input and output tokens: its cost less the cached
    /// and the rejected prediction parts (they have lines of their own).
    pub fn tokens(r: &UsageRow) -> Self {
        Self {
            input_tokens: Some(r.input_tokens - r.cached_input_tokens),
            output_tokens: Some(r.output_tokens),
            input_price_per_mtok: r.input_price_per_mtok.clone(),
            output_price_per_mtok: r.output_price_per_mtok.clone(),
            ..Self::of_row(
                "tokens",
                r,
                r.cost_nano_usd - r.cached_cost_nano_usd - r.prediction.cost_nano_usd,
            )
        }
    }

    /// The line of an aggregate row's prompt tokens served from a prefix cache (none without
    /// them), at the cached price (the input price on records older than it).
    pub fn cached_input(r: &UsageRow) -> Option<Self> {
        (r.cached_input_tokens > 0).then(|| Self {
            cached_input_tokens: Some(r.cached_input_tokens),
            cached_input_price_per_mtok: r
                .cached_input_price_per_mtok
                .clone()
                .or_else(|| r.input_price_per_mtok.clone()),
            ..Self::of_row("cached_input", r, r.cached_cost_nano_usd)
        })
    }

    /// The line of an aggregate row's rejected prediction tokens (none without them).
    pub fn rejected_prediction(r: &UsageRow) -> Option<Self> {
        (r.prediction.rejected > 0).then(|| Self {
            rejected_prediction_tokens: Some(r.prediction.rejected),
            rejected_prediction_price_per_mtok: r.prediction.price_per_mtok,
            ..Self::of_row("rejected_prediction", r, r.prediction.cost_nano_usd)
        })
    }

    /// What the lines of an aggregate row share: its model (and adapter), tier and requests.
    fn of_row(kind: &'static str, r: &UsageRow, amount_nano_usd: i64) -> Self {
        Self {
            kind,
            model: r.model.clone().unwrap_or_default(),
            base_model: r.base_model.clone(),
            adapter: r.adapter.clone(),
            service_tier: r.service_tier.unwrap_or_default(),
            requests: Some(r.requests),
            amount_usd: format_usd(amount_nano_usd),
            ..Self::default()
        }
    }

    /// The line split by tag `key`, naming the row's value of it.
    pub fn tagged(self, key: &str, r: &UsageRow) -> Self {
        Self {
            tag: Some(TagPair {
                key: key.to_string(),
                value: r.tag_value.clone(),
            }),
            ..self
        }
    }
}

/// `GET /admin/v1/invoices/{customer_id}`: `total_usd` is exactly the sum of the lines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Invoice {
    #[schema(value_type = String, pattern = "^invoice$")]
    pub object: &'static str,
    pub customer_id: String,
    pub period: String,
    pub period_start: String,
    pub period_end: String,
    #[schema(value_type = String)]
    pub currency: &'static str,
    pub line_items: Vec<InvoiceLine>,
    pub total_usd: String,
    #[schema(required)]
    pub tag_filter: Option<TagPair>,
}

/// The columns of an invoice as CSV (`format=csv`, `tollgate usage invoice --format csv`):
/// one row per line, a line's fields by name (empty where its kind has none), the tag it is
/// split by as `tag_key`/`tag_value`, and last `base_model` and `adapter`.
pub const INVOICE_COLUMNS: [&str; 24] = [
    "kind",
    "model",
    "service_tier",
    "requests",
    "input_tokens",
    "output_tokens",
    "input_price_per_mtok",
    "output_price_per_mtok",
    "cached_input_tokens",
    "cached_input_price_per_mtok",
    "rejected_prediction_tokens",
    "rejected_prediction_price_per_mtok",
    "reservation_id",
    "reserved_tokens_per_minute",
    "price_per_ktpm_month",
    "active_from",
    "active_until",
    "days_active",
    "days_in_month",
    "tag_key",
    "tag_value",
    "amount_usd",
    "base_model",
    "adapter",
];

impl Invoice {
    /// The invoice's lines as CSV with a header line ([`INVOICE_COLUMNS`]); the total is the
    /// sum of `amount_usd`.
    pub fn csv(&self) -> Result<String, csv::Error> {
        let mut w = csv::Writer::from_writer(Vec::new());
        w.write_record(INVOICE_COLUMNS)?;
        for line in &self.line_items {
            let mut fields = match serde_json::to_value(line) {
                Ok(Value::Object(map)) => map,
                _ => serde_json::Map::new(),
            };
            if let Some(tag) = &line.tag {
                fields.insert("tag_key".into(), Value::String(tag.key.clone()));
                let value = tag.value.clone().map_or(Value::Null, Value::String);
                fields.insert("tag_value".into(), value);
            }
            let cell = |name: &str| match fields.get(name) {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
            };
            w.write_record(INVOICE_COLUMNS.map(cell))?;
        }
        let bytes = w.into_inner().map_err(|e| e.into_error())?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

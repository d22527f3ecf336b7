//! The usage reports' bodies, which metering's `billing` still writes as JSON by hand (`json!`,
//! shared with the CLI), typed for the OpenAPI document; the tests hold the two together. The
//! other admin bodies are the handlers' own types (next to each handler in `crate::api::admin`)
//! or metering's views, which the CLI and the audit log show too.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

/// `GET /admin/v1/usage`: one row per group, with the group's columns (`customer_id`,
/// `model`, `key_id`, `day`, `service_tier`, `tag:KEY`) and `requests`, `input_tokens`, `output_tokens`,
/// `cost_usd`, `cached_input_tokens` (and `input_cached_tokens`, the same count under its
/// deprecated name).
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageReport {
    #[schema(pattern = "^list$")]
    pub object: String,
    pub start: String,
    pub end: String,
    pub data: Vec<BTreeMap<String, Value>>,
}

/// One usage record, as the ledger holds it.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageRecord {
    pub id: String,
    pub customer_id: String,
    pub key_id: String,
    pub model: String,
    pub endpoint: String,
    pub stream: bool,
    /// `completed`, `cancelled` or `failed`.
    pub status: String,
    #[schema(required)]
    pub finish_reason: Option<String>,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub started_at: String,
    pub finished_at: String,
    #[schema(required)]
    pub ttft_ms: Option<i64>,
    pub input_price_per_mtok: String,
    pub output_price_per_mtok: String,
    pub cost_usd: String,
    pub cached_input_tokens: i64,
    pub cached_input_price_per_mtok: String,
    pub cached_input_cost_usd: String,
    pub usage_source: String,
    pub tags: BTreeMap<String, String>,
    /// The class of service it was served and priced at.
    pub service_tier: String,
    /// Tokens of its `prediction` kept in the output (a part of `output_tokens`).
    pub accepted_prediction_tokens: i64,
    /// Tokens of its `prediction` computed and thrown away (not a part of `output_tokens`),
    /// charged at `rejected_prediction_price_per_mtok`; their part of `cost_usd`.
    pub rejected_prediction_tokens: i64,
    pub rejected_prediction_price_per_mtok: String,
    pub rejected_prediction_cost_usd: String,
    /// The batch (Batch API) its request was a line of; `null` otherwise.
    pub batch_id: Option<String>,
}

/// `GET /admin/v1/usage/records`.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageRecordPage {
    #[schema(pattern = "^list$")]
    pub object: String,
    pub data: Vec<UsageRecord>,
    /// Pass as `after` for the next page.
    #[schema(required)]
    pub next_cursor: Option<String>,
    pub has_more: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TagPair {
    pub key: String,
    #[schema(required)]
    pub value: Option<String>,
}

/// An invoice line: `kind` `tokens` (input and output tokens), `cached_input`,
/// `rejected_prediction` (tokens of predictions computed and thrown away), or `reservation`
/// (a month's share of reserved capacity).
#[derive(Debug, Serialize, ToSchema)]
pub struct InvoiceLine {
    pub kind: String,
    pub model: String,
    /// The tier the line's requests were served at (`reserved` on reservation lines).
    pub service_tier: String,
    pub requests: Option<i64>,
    pub input_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
    pub cached_input_tokens: Option<i64>,
    pub input_price_per_mtok: Option<String>,
    pub output_price_per_mtok: Option<String>,
    pub cached_input_price_per_mtok: Option<String>,
    pub rejected_prediction_tokens: Option<i64>,
    pub rejected_prediction_price_per_mtok: Option<String>,
    pub amount_usd: String,
    /// With `group_by=tag:KEY`.
    pub tag: Option<TagPair>,
    /// Reservation lines: the reservation, its TPM and price, and the share of the month.
    pub reservation_id: Option<String>,
    pub reserved_tokens_per_minute: Option<i64>,
    pub price_per_ktpm_month: Option<String>,
    pub active_from: Option<String>,
    pub active_until: Option<String>,
    /// Decimal days (`"15"`, `"2.5"`).
    pub days_active: Option<String>,
    pub days_in_month: Option<String>,
}

/// `GET /admin/v1/invoices/{customer_id}`: `total_usd` is exactly the sum of the lines.
#[derive(Debug, Serialize, ToSchema)]
pub struct Invoice {
    #[schema(pattern = "^invoice$")]
    pub object: String,
    pub customer_id: String,
    pub period: String,
    pub period_start: String,
    pub period_end: String,
    pub currency: String,
    pub line_items: Vec<InvoiceLine>,
    pub total_usd: String,
    #[schema(required)]
    pub tag_filter: Option<TagPair>,
}

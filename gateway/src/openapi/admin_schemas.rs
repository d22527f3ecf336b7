//! The admin API's bodies, typed for the OpenAPI document. The admin handlers read their bodies
//! field by field (so every error names its field) and write most of them with `json!`; these
//! types say the same thing for clients and fuzzers, and the tests hold the two together.
//! Customers and keys are written and described by the same types,
//! [`tollgate_metering::views`].

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;
use tollgate_metering::views::{CustomerView, KeyView, ReservationView};
use utoipa::ToSchema;

/// An amount of USD: a decimal string (`"25.50"`) or a number (`25.5`).
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum UsdAmount {
    Text(String),
    Number(f64),
}

/// Budgets reset on UTC calendar months.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BudgetPeriod {
    Monthly,
}

/// `POST /admin/v1/customers`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCustomer {
    /// 1-64 letters, digits, `-`, `_`, `.`.
    #[schema(pattern = "^[A-Za-z0-9._-]{1,64}$")]
    pub id: String,
    /// Defaults to the id.
    #[schema(min_length = 1, pattern = "\\S")]
    pub name: Option<String>,
    pub budget_usd: Option<UsdAmount>,
    pub budget_period: Option<BudgetPeriod>,
    #[schema(minimum = 1)]
    pub rpm: Option<i64>,
    #[schema(minimum = 1)]
    pub tpm: Option<i64>,
    /// Requests in flight at once; beyond it, 429 with `Retry-After`.
    #[schema(minimum = 1)]
    pub max_concurrent_requests: Option<i64>,
    /// The customer's share of each model's engine when customers compete (weighted fair
    /// queueing; 1, the default, is an equal share).
    #[schema(minimum = 1, maximum = 100)]
    pub scheduling_weight: Option<i64>,
    /// The tier of requests that ask for `service_tier: "auto"` (or none); `null`
    /// clears it.
    pub default_service_tier: Option<DefaultServiceTier>,
    /// Whether requests may ask for `service_tier: "priority"` (403 otherwise; false when created without it).
    pub allow_priority: Option<bool>,
}

/// `PATCH /admin/v1/customers/{id}`: the fields to change (`null` clears a limit or budget).
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateCustomer {
    #[schema(min_length = 1, pattern = "\\S")]
    pub name: Option<String>,
    pub budget_usd: Option<UsdAmount>,
    pub budget_period: Option<BudgetPeriod>,
    #[schema(minimum = 1)]
    pub rpm: Option<i64>,
    #[schema(minimum = 1)]
    pub tpm: Option<i64>,
    /// Requests in flight at once; beyond it, 429 with `Retry-After`.
    #[schema(minimum = 1)]
    pub max_concurrent_requests: Option<i64>,
    /// The customer's share of each model's engine when customers compete (weighted fair
    /// queueing; 1, the default, is an equal share).
    #[schema(minimum = 1, maximum = 100)]
    pub scheduling_weight: Option<i64>,
    /// The tier of requests that ask for `service_tier: "auto"` (or none); `null`
    /// clears it.
    pub default_service_tier: Option<DefaultServiceTier>,
    /// Whether requests may ask for `service_tier: "priority"` (403 otherwise; false when created without it).
    pub allow_priority: Option<bool>,
}

/// A customer's or key's default service tier (`batch` is the Batch API's own).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DefaultServiceTier {
    Default,
    Flex,
    Priority,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CustomerList {
    #[schema(pattern = "^list$")]
    pub object: String,
    pub data: Vec<CustomerView>,
}

/// RFC 3339 or Unix seconds.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum Expiry {
    Rfc3339(String),
    UnixSeconds(i64),
}

/// `POST /admin/v1/customers/{id}/keys`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    pub name: Option<String>,
    /// The models this key may use (all when absent).
    pub models: Option<Vec<String>>,
    #[schema(minimum = 1)]
    pub rpm: Option<i64>,
    #[schema(minimum = 1)]
    pub tpm: Option<i64>,
    /// In the future.
    pub expires_at: Option<Expiry>,
    /// Default cost-allocation tags of the key's requests (at most 16 pairs).
    pub tags: Option<BTreeMap<String, String>>,
    pub budget_usd: Option<UsdAmount>,
    /// Requests in flight at once with this key; beyond it, 429 with `Retry-After`.
    #[schema(minimum = 1)]
    pub max_concurrent_requests: Option<i64>,
    /// The tier of requests that ask for `service_tier: "auto"` (or none) (else the customer's); `null`
    /// clears it.
    pub default_service_tier: Option<DefaultServiceTier>,
    /// Whether requests may ask for `service_tier: "priority"` (the key narrows its customer's permission, never widens it; true when created without it).
    pub allow_priority: Option<bool>,
}

/// `PATCH /admin/v1/keys/{key_id}`: at least one field; `null` clears a limit, the model list
/// (all models), the expiry or the budget.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateKey {
    #[schema(min_length = 1)]
    pub name: Option<String>,
    pub models: Option<Vec<String>>,
    #[schema(minimum = 1)]
    pub rpm: Option<i64>,
    #[schema(minimum = 1)]
    pub tpm: Option<i64>,
    #[schema(minimum = 1)]
    pub max_concurrent_requests: Option<i64>,
    pub expires_at: Option<Expiry>,
    pub tags: Option<BTreeMap<String, String>>,
    pub budget_usd: Option<UsdAmount>,
    /// The tier of requests that ask for `service_tier: "auto"` (or none) (else the customer's); `null`
    /// clears it.
    pub default_service_tier: Option<DefaultServiceTier>,
    /// Whether requests may ask for `service_tier: "priority"` (the key narrows its customer's permission, never widens it; true when created without it).
    pub allow_priority: Option<bool>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKeyList {
    #[schema(pattern = "^list$")]
    pub object: String,
    pub data: Vec<KeyView>,
}

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

/// `GET /admin/v1/customers/{id}/reservations`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReservationList {
    #[schema(pattern = "^list$")]
    pub object: String,
    pub data: Vec<ReservationView>,
}

/// One customer's requests at one tier in the month.
#[derive(Debug, Serialize, ToSchema)]
pub struct SlaRow {
    pub customer_id: String,
    pub service_tier: String,
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

/// `GET /admin/v1/sla`.
#[derive(Debug, Serialize, ToSchema)]
pub struct SlaReport {
    #[schema(pattern = "^sla_report$")]
    pub object: String,
    pub month: String,
    pub start: String,
    pub end: String,
    pub priority_ttft_target_ms: u64,
    pub ttft_percentiles: String,
    pub data: Vec<SlaRow>,
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

/// What an admin token may do.
#[derive(Debug, Serialize, ToSchema)]
pub enum AdminScope {
    #[serde(rename = "usage:read")]
    UsageRead,
    /// Listing and reading customers (`customers:write` implies it).
    #[serde(rename = "customers:read")]
    CustomersRead,
    #[serde(rename = "customers:write")]
    CustomersWrite,
    #[serde(rename = "keys:write")]
    KeysWrite,
    #[serde(rename = "admin")]
    Admin,
}

/// `POST /admin/v1/admin_tokens`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAdminToken {
    pub name: Option<String>,
    #[schema(min_items = 1)]
    pub scopes: Vec<AdminScope>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AdminToken {
    #[schema(pattern = "^admin_token$")]
    pub object: String,
    pub id: String,
    pub name: String,
    pub token_prefix: String,
    pub scopes: Vec<AdminScope>,
    pub created_at: String,
    #[schema(required)]
    pub revoked_at: Option<String>,
}

/// A new admin token: the secret is shown this once.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedAdminToken {
    #[serde(flatten)]
    pub token: AdminToken,
    /// The secret to send as `Authorization: Bearer`.
    #[serde(rename = "token")]
    pub secret: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AdminTokenList {
    #[schema(pattern = "^list$")]
    pub object: String,
    pub data: Vec<AdminToken>,
}

/// A customer's budget-alert settings (`GET`/`PUT /admin/v1/customers/{id}/alerts`).
#[derive(Debug, Serialize, ToSchema)]
pub struct AlertSettings {
    #[schema(pattern = "^alert_settings$")]
    pub object: String,
    pub customer_id: String,
    #[schema(required)]
    pub webhook_url: Option<String>,
    /// Fractions of the budget, as decimal strings (`"0.5"`).
    pub thresholds: Vec<String>,
    pub webhook_secret_set: bool,
    /// The signing secret, only in the answer that made it.
    pub webhook_secret: Option<String>,
}

/// `PUT /admin/v1/customers/{id}/alerts`: absent fields are unchanged.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutAlertSettings {
    /// An `http(s)` URL, or `null` to stop deliveries.
    pub webhook_url: Option<String>,
    /// Fractions of the budget in (0, 1], as numbers or decimal strings.
    pub thresholds: Option<Vec<UsdAmount>>,
    /// Make a new signing secret (returned once).
    pub rotate_secret: Option<bool>,
}

/// A budget threshold crossed, and its webhook delivery.
#[derive(Debug, Serialize, ToSchema)]
pub struct BudgetAlert {
    #[schema(pattern = "^budget_alert$")]
    pub object: String,
    pub id: String,
    pub customer_id: String,
    pub period_start: String,
    pub threshold: String,
    pub budget_usd: String,
    pub spent_usd: String,
    pub created_at: String,
    /// `pending`, `delivered`, `failed` or `no_webhook`.
    pub status: String,
    pub attempts: i64,
    #[schema(required)]
    pub next_attempt_at: Option<String>,
    #[schema(required)]
    pub delivered_at: Option<String>,
    #[schema(required)]
    pub last_error: Option<String>,
    /// The webhook's JSON payload.
    pub event: Value,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BudgetAlertList {
    #[schema(pattern = "^list$")]
    pub object: String,
    pub data: Vec<BudgetAlert>,
}

/// Who made a change: `admin_api`, `console` or `cli`, and a name (never a secret).
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditActor {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
}

/// What a change was made to.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditTarget {
    /// `customer`, `key` or `admin_token`.
    #[serde(rename = "type")]
    pub kind: String,
    pub id: String,
}

/// One entry of the audit log.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditEntry {
    #[schema(pattern = "^audit_entry$")]
    pub object: String,
    pub id: String,
    pub time: String,
    pub actor: AuditActor,
    #[schema(required)]
    pub remote_addr: Option<String>,
    #[schema(required)]
    pub request_id: Option<String>,
    /// `customer.created`, `customer.updated`, `key.created`, `key.updated`, `key.revoked`,
    /// `alert_settings.updated`, `admin_token.created`, `admin_token.revoked`.
    pub action: String,
    pub target: AuditTarget,
    /// For a creation the fields set; for an update `{"field": {"from", "to"}}`.
    pub changes: Value,
}

/// `GET /admin/v1/audit`.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditPage {
    #[schema(pattern = "^list$")]
    pub object: String,
    pub data: Vec<AuditEntry>,
    /// Pass as `after` for the next page; `null` on an empty page.
    #[schema(required)]
    pub next_cursor: Option<String>,
    pub has_more: bool,
}

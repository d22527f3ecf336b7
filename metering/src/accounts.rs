//! The customer, the API key and a reservation of capacity as the store reads them back: plain records that the store's
//! queries return, the views (`crate::views`) show and the gateway's auth caches. No queries:
//! those are `crate::store`'s.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::kinds::{BudgetPeriod, ServiceTier};
use crate::money::PriceTable;
use crate::tags::Tags;

/// A customer: who pays. Limits are optional (`None` = unlimited).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Customer {
    pub id: String,
    pub name: String,
    pub budget_nano_usd: Option<i64>,
    pub budget_period: BudgetPeriod,
    pub rpm: Option<i64>,
    pub tpm: Option<i64>,
    pub created_at: i64,
    /// Requests in flight at once across the customer's keys; `None` = no cap.
    #[serde(default)]
    pub max_concurrent_requests: Option<i64>,
    /// The customer's share of a model's engine when customers compete for it (weighted
    /// fair queueing; 1 = an equal share).
    #[serde(default = "default_weight")]
    pub scheduling_weight: i64,
    /// The tier of a request that asks for `auto` (or nothing), unless its key has one;
    /// `None`: `default`.
    #[serde(default)]
    pub default_service_tier: Option<ServiceTier>,
    /// Whether its requests may ask for `priority`.
    #[serde(default)]
    pub allow_priority: bool,
}

fn default_weight() -> i64 {
    1
}

/// An API key without its secret (only the SHA-256 of the secret is stored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    pub id: String,
    pub customer_id: String,
    pub name: String,
    /// The first characters of the secret, to recognise it in lists.
    pub key_prefix: String,
    /// Models the key may use; `None` = all.
    pub models: Option<Vec<String>>,
    pub rpm: Option<i64>,
    pub tpm: Option<i64>,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub created_at: i64,
    /// Default cost-allocation tags of the key's records.
    #[serde(default)]
    pub tags: Tags,
    /// The key's own monthly budget in nano-USD; `None` = only its customer's applies.
    #[serde(default)]
    pub budget_nano_usd: Option<i64>,
    /// Requests in flight at once with this key; `None` = no cap of its own.
    #[serde(default)]
    pub max_concurrent_requests: Option<i64>,
    /// The tier of a request that asks for `auto` (or nothing); `None`: its customer's.
    #[serde(default)]
    pub default_service_tier: Option<ServiceTier>,
    /// Whether the key may ask for `priority` when its customer may (`false` narrows the
    /// customer's permission; `true` never widens it).
    #[serde(default = "yes")]
    pub allow_priority: bool,
}

/// A customer's or key's `default_service_tier` by name: `default`, `flex` or `priority`
/// (`batch` is the Batch API's own class, never a default).
pub fn parse_default_tier(text: &str) -> Result<ServiceTier, String> {
    // `batch` is the Batch API's own, `reserved` a reservation's (never billed per token): a
    // default of either would let every request of the key claim it.
    match text.parse() {
        Ok(tier @ (ServiceTier::Default | ServiceTier::Flex | ServiceTier::Priority)) => Ok(tier),
        _ => Err(format!(
            "`{text}` is not a default service tier: use `default`, `flex` or `priority`"
        )),
    }
}

fn yes() -> bool {
    true
}

impl ApiKey {
    /// Whether requests with this key may ask for `priority`: both the customer and the key
    /// allow it.
    pub fn may_ask_priority(&self, customer: &Customer) -> bool {
        customer.allow_priority && self.allow_priority
    }

    /// The tier of a request with this key that asks for `auto`: the key's default, else its
    /// customer's, else `default`.
    pub fn auto_tier(&self, customer: &Customer) -> ServiceTier {
        self.default_service_tier
            .or(customer.default_service_tier)
            .unwrap_or_default()
    }
}

/// One reservation as stored. Times in Unix microseconds; `ends_at` `None`: open-ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub id: String,
    pub customer_id: String,
    pub model: String,
    pub reserved_tokens_per_minute: i64,
    /// USD per 1,000 tokens per minute per month, as sold (exact, its scale kept).
    pub price_per_ktpm_month: Decimal,
    pub starts_at: i64,
    pub ends_at: Option<i64>,
    pub created_at: i64,
}

impl Reservation {
    /// Whether it holds capacity at `at`.
    pub fn active_at(&self, at: i64) -> bool {
        self.starts_at <= at && self.ends_at.is_none_or(|end| at < end)
    }

    /// Whether it holds capacity at some moment of `[start, end)` (`end` `None`: for ever).
    pub(crate) fn overlaps(&self, start: i64, end: Option<i64>) -> bool {
        self.ends_at.is_none_or(|e| e > start) && end.is_none_or(|e| self.starts_at < e)
    }
}

/// A LoRA adapter a customer registered on a base model: the model id
/// [`CustomerAdapter::model_id`], which only the customer's keys see. `created_at` in Unix
/// microseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerAdapter {
    pub customer_id: String,
    /// Unique among the customer's adapters.
    pub name: String,
    pub base_model: String,
    /// The PEFT adapter directory (`adapter_config.json`, `adapter_model.safetensors`).
    pub path: String,
    /// Its own price table (checked by the gateway before it is stored); `None`: the base
    /// model's prices.
    pub price: Option<PriceTable>,
    pub created_at: i64,
}

impl CustomerAdapter {
    /// `<base_model>:<name>`, the id its owner's requests name.
    pub fn model_id(&self) -> String {
        format!("{}:{}", self.base_model, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_default_tier_is_one_a_request_may_ask_for() {
        for (text, tier) in [
            ("default", ServiceTier::Default),
            ("flex", ServiceTier::Flex),
            ("priority", ServiceTier::Priority),
        ] {
            assert_eq!(parse_default_tier(text), Ok(tier));
        }
        // A reservation's tier is never billed per token: as a default it would be free.
        for text in ["batch", "reserved", "scale", ""] {
            assert!(parse_default_tier(text).is_err(), "{text}");
        }
    }
}

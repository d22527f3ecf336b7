//! How customers, keys and reservations are shown: one view each, serialized by the admin API, the CLI and
//! the audit log alike (money as decimal USD strings, times as RFC 3339), and described by the
//! same type in the OpenAPI document (`ToSchema`, named `Customer` and `ApiKey` there).
//!
//! They live here, next to [`Customer`] and [`ApiKey`], because every writer of that JSON sees
//! this crate: the audit log is written by the store itself, and the CLI reads the store without
//! the HTTP admin module. `ToSchema` only describes the types; this crate still has no HTTP.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use crate::accounts::{ApiKey, Customer, CustomerAdapter, Reservation};
use crate::kinds::{BudgetPeriod, ServiceTier};
use crate::money::{format_usd, PriceTable};
use crate::periods::rfc3339;

/// A customer, its limits and budget.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
#[schema(as = Customer)]
pub struct CustomerView {
    #[schema(value_type = String, pattern = "^customer$")]
    pub object: &'static str,
    pub id: String,
    pub name: String,
    #[schema(required)]
    pub budget_usd: Option<String>,
    #[schema(value_type = Option<String>, required)]
    pub budget_period: BudgetPeriod,
    #[schema(required)]
    pub rpm: Option<i64>,
    #[schema(required)]
    pub tpm: Option<i64>,
    #[schema(required)]
    pub max_concurrent_requests: Option<i64>,
    pub scheduling_weight: i64,
    /// The tier of a request asking `service_tier: "auto"` (or nothing) unless its key has
    /// one; `null`: `default`.
    #[schema(required)]
    pub default_service_tier: Option<ServiceTier>,
    /// Whether its requests may ask for `service_tier: "priority"`.
    pub allow_priority: bool,
    /// RFC 3339.
    pub created_at: String,
    /// `GET /admin/v1/customers/{id}` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spent_usd_this_period: Option<String>,
}

impl From<&Customer> for CustomerView {
    fn from(c: &Customer) -> Self {
        Self {
            object: "customer",
            id: c.id.clone(),
            name: c.name.clone(),
            budget_usd: c.budget_nano_usd.map(format_usd),
            budget_period: c.budget_period,
            rpm: c.rpm,
            tpm: c.tpm,
            max_concurrent_requests: c.max_concurrent_requests,
            scheduling_weight: c.scheduling_weight,
            default_service_tier: c.default_service_tier,
            allow_priority: c.allow_priority,
            created_at: rfc3339(c.created_at),
            spent_usd_this_period: None,
        }
    }
}

impl CustomerView {
    /// With the spend of the current budget period (nano-USD), as a single customer is shown.
    pub fn with_spend(self, spent_nano_usd: i64) -> Self {
        Self {
            spent_usd_this_period: Some(format_usd(spent_nano_usd)),
            ..self
        }
    }

    /// The fields the audit log records of a customer: its settings, not its identity or
    /// creation time (the entry carries those).
    pub fn audited(&self) -> Value {
        without(
            self,
            &["object", "id", "created_at", "spent_usd_this_period"],
        )
    }
}

/// A client key, without its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
#[schema(as = ApiKey)]
pub struct KeyView {
    #[schema(value_type = String, pattern = "^api_key$")]
    pub object: &'static str,
    pub id: String,
    pub customer_id: String,
    pub name: String,
    pub key_prefix: String,
    #[schema(required)]
    pub models: Option<Vec<String>>,
    #[schema(required)]
    pub rpm: Option<i64>,
    #[schema(required)]
    pub tpm: Option<i64>,
    #[schema(required)]
    pub expires_at: Option<String>,
    #[schema(required)]
    pub revoked_at: Option<String>,
    pub created_at: String,
    // Written out (not `Tags`), so the schema shows a map of strings.
    pub tags: BTreeMap<String, String>,
    #[schema(required)]
    pub budget_usd: Option<String>,
    #[schema(required)]
    pub max_concurrent_requests: Option<i64>,
    /// The tier of a request asking `service_tier: "auto"` (or nothing); `null`: the
    /// customer's.
    #[schema(required)]
    pub default_service_tier: Option<ServiceTier>,
    /// Whether the key may ask for `priority` when its customer may (it narrows, never
    /// widens, the customer's permission).
    pub allow_priority: bool,
}

impl From<&ApiKey> for KeyView {
    fn from(k: &ApiKey) -> Self {
        Self {
            object: "api_key",
            id: k.id.clone(),
            customer_id: k.customer_id.clone(),
            name: k.name.clone(),
            key_prefix: k.key_prefix.clone(),
            models: k.models.clone(),
            rpm: k.rpm,
            tpm: k.tpm,
            expires_at: k.expires_at.map(rfc3339),
            revoked_at: k.revoked_at.map(rfc3339),
            created_at: rfc3339(k.created_at),
            tags: k.tags.clone(),
            budget_usd: k.budget_nano_usd.map(format_usd),
            max_concurrent_requests: k.max_concurrent_requests,
            default_service_tier: k.default_service_tier,
            allow_priority: k.allow_priority,
        }
    }
}

impl KeyView {
    /// The fields the audit log records of a key: never its secret, its digest or its prefix.
    pub fn audited(&self) -> Value {
        without(self, &["object", "id", "key_prefix", "created_at"])
    }
}

/// A new key: the secret is shown this once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
#[schema(as = CreatedApiKey)]
pub struct CreatedKeyView {
    #[serde(flatten)]
    pub key: KeyView,
    /// The secret to send as `Authorization: Bearer`.
    #[serde(rename = "key")]
    pub secret: String,
}

/// `view` as a JSON object without `fields`, the others in their order.
fn without(view: &impl Serialize, fields: &[&str]) -> Value {
    match serde_json::to_value(view) {
        Ok(Value::Object(map)) => map
            .into_iter()
            .filter(|(k, _)| !fields.contains(&k.as_str()))
            .collect(),
        // Not reached: a struct of strings, numbers and string-keyed maps is always an object.
        _ => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The views' fields in their order: the admin API's, the CLI's and the audit log's JSON.
    #[test]
    fn views_keep_their_fields_and_order() {
        let c = Customer {
            id: "acme".into(),
            name: "Acme".into(),
            budget_nano_usd: Some(25_500_000_000),
            budget_period: BudgetPeriod::default(),
            rpm: Some(60),
            tpm: None,
            created_at: 0,
            max_concurrent_requests: None,
            scheduling_weight: 2,
            default_service_tier: Some(ServiceTier::Flex),
            allow_priority: false,
        };
        let view = CustomerView::from(&c);
        assert_eq!(
            serde_json::to_string(&view).unwrap(),
            r#"{"object":"customer","id":"acme","name":"Acme","budget_usd":"25.500000000","budget_period":"monthly","rpm":60,"tpm":null,"max_concurrent_requests":null,"scheduling_weight":2,"default_service_tier":"flex","allow_priority":false,"created_at":"1970-01-01T00:00:00.000000Z"}"#
        );
        assert_eq!(
            serde_json::to_string(&view.audited()).unwrap(),
            r#"{"name":"Acme","budget_usd":"25.500000000","budget_period":"monthly","rpm":60,"tpm":null,"max_concurrent_requests":null,"scheduling_weight":2,"default_service_tier":"flex","allow_priority":false}"#
        );
        let spent = serde_json::to_value(view.with_spend(1_000_000_000)).unwrap();
        assert_eq!(spent["spent_usd_this_period"], "1.000000000");
        let k = ApiKey {
            id: "key_1".into(),
            customer_id: "acme".into(),
            name: "ci".into(),
            key_prefix: "tg-abc".into(),
            models: Some(vec!["m".into()]),
            rpm: None,
            tpm: Some(1000),
            expires_at: None,
            revoked_at: Some(0),
            created_at: 0,
            tags: crate::tags::Tags::from([("team".into(), "a".into())]),
            budget_nano_usd: None,
            max_concurrent_requests: Some(4),
            default_service_tier: None,
            allow_priority: true,
        };
        let view = KeyView::from(&k);
        assert_eq!(
            serde_json::to_string(&view).unwrap(),
            r#"{"object":"api_key","id":"key_1","customer_id":"acme","name":"ci","key_prefix":"tg-abc","models":["m"],"rpm":null,"tpm":1000,"expires_at":null,"revoked_at":"1970-01-01T00:00:00.000000Z","created_at":"1970-01-01T00:00:00.000000Z","tags":{"team":"a"},"budget_usd":null,"max_concurrent_requests":4,"default_service_tier":null,"allow_priority":true}"#
        );
        assert_eq!(
            serde_json::to_string(&view.audited()).unwrap(),
            r#"{"customer_id":"acme","name":"ci","models":["m"],"rpm":null,"tpm":1000,"expires_at":null,"revoked_at":"1970-01-01T00:00:00.000000Z","tags":{"team":"a"},"budget_usd":null,"max_concurrent_requests":4,"default_service_tier":null,"allow_priority":true}"#
        );
        let created = CreatedKeyView {
            key: view,
            secret: "tg-secret".into(),
        };
        let text = serde_json::to_string(&created).unwrap();
        assert!(
            text.ends_with(r#""allow_priority":true,"key":"tg-secret"}"#),
            "{text}"
        );
    }
}

/// A reservation of capacity: a customer's tokens per minute on a model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
#[schema(as = Reservation)]
pub struct ReservationView {
    #[schema(value_type = String, pattern = "^reservation$")]
    pub object: &'static str,
    pub id: String,
    pub customer_id: String,
    pub model: String,
    pub reserved_tokens_per_minute: i64,
    /// USD per 1,000 tokens per minute per month, as sold.
    pub price_per_ktpm_month: String,
    pub starts_at: String,
    /// `null`: until ended.
    #[schema(required)]
    pub ends_at: Option<String>,
    pub created_at: String,
}

impl From<&Reservation> for ReservationView {
    fn from(r: &Reservation) -> Self {
        Self {
            object: "reservation",
            id: r.id.clone(),
            customer_id: r.customer_id.clone(),
            model: r.model.clone(),
            reserved_tokens_per_minute: r.reserved_tokens_per_minute,
            price_per_ktpm_month: r.price_per_ktpm_month.to_string(),
            starts_at: rfc3339(r.starts_at),
            ends_at: r.ends_at.map(rfc3339),
            created_at: rfc3339(r.created_at),
        }
    }
}

impl ReservationView {
    /// The fields the audit log records of a new reservation.
    pub fn audited(&self) -> Value {
        without(self, &["object", "id", "created_at"])
    }
}

/// A customer's LoRA adapter: its model id and where its files are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
#[schema(as = Adapter)]
pub struct AdapterView {
    #[schema(value_type = String, pattern = "^adapter$")]
    pub object: &'static str,
    /// The model id its owner's requests name: `<base_model>:<name>`.
    pub id: String,
    pub customer_id: String,
    pub base_model: String,
    pub name: String,
    /// The PEFT adapter directory on the servers' disk.
    pub path: String,
    /// Its own prices, as given (a model's `price` keys in models.toml); `null`: its base
    /// model's prices.
    #[schema(required)]
    pub price: Option<PriceTable>,
    pub created_at: String,
}

impl From<&CustomerAdapter> for AdapterView {
    fn from(a: &CustomerAdapter) -> Self {
        Self {
            object: "adapter",
            id: a.model_id(),
            customer_id: a.customer_id.clone(),
            base_model: a.base_model.clone(),
            name: a.name.clone(),
            path: a.path.clone(),
            price: a.price.clone(),
            created_at: rfc3339(a.created_at),
        }
    }
}

impl AdapterView {
    /// The fields the audit log records of an adapter added, repriced or removed.
    pub fn audited(&self) -> Value {
        without(self, &["object", "created_at"])
    }
}

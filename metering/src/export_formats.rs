//! Usage records in the shapes billing systems ingest, one JSON object per record, so a cron
//! job can feed them without reshaping:
//!
//! - [`cloudevent`]: a CloudEvents 1.0 structured-mode JSON event (OpenMeter, Lago, any
//!   CloudEvents consumer). `id` is the record id, so a consumer that receives a record twice
//!   (a re-run export) deduplicates it; `subject` is the customer; `data` holds the model, the
//!   service tier, the token kinds, the cost and the tags.
//! - [`stripe_meter_event`]: the body of Stripe's `POST /v1/billing/meter_events`: `event_name`,
//!   `identifier` = the record id (Stripe deduplicates on it), `timestamp` in Unix seconds, and a
//!   `payload` of strings holding the customer mapping, the model, the service tier and one
//!   value per token kind; each Stripe meter reads its kind through its
//!   `value_settings.event_payload_key` (and may filter or group by `service_tier`).
//!
//! Owns only the shapes; reading the ledger and cursors belong to the callers.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::money::format_usd;
use crate::periods::rfc3339;
use crate::store::UsageRecord;

/// CloudEvents `type` of a usage record.
pub const CLOUDEVENT_TYPE: &str = "dev.tollgate.usage.v1";
/// CloudEvents `source` of a usage record (a URI reference naming the producer).
pub const CLOUDEVENT_SOURCE: &str = "/tollgate/gateway";
/// Stripe `event_name` unless the operator names another.
pub const STRIPE_EVENT_NAME: &str = "tollgate_usage";
/// The payload key Stripe meters map to a customer by default.
pub const STRIPE_CUSTOMER_KEY: &str = "stripe_customer_id";

/// A record as a CloudEvents 1.0 JSON event. `time` is when the request started (the instant
/// billing periods are cut on).
pub fn cloudevent(r: &UsageRecord) -> Value {
    json!({
        "specversion": "1.0",
        "id": r.id,
        "source": CLOUDEVENT_SOURCE,
        "type": CLOUDEVENT_TYPE,
        "subject": r.customer_id,
        "time": rfc3339(r.started_at),
        "datacontenttype": "application/json",
        "data": {
            "customer_id": r.customer_id,
            "key_id": r.key_id,
            "model": r.model,
            "base_model": r.base_model,
            "adapter": r.adapter,
            "service_tier": r.service_tier,
            "endpoint": r.endpoint,
            "status": r.status,
            "input_tokens": r.input_tokens,
            "cached_input_tokens": r.cached_input_tokens,
            "fresh_input_tokens": r.input_tokens - r.cached_input_tokens,
            "output_tokens": r.output_tokens,
            "accepted_prediction_tokens": r.prediction.accepted,
            "rejected_prediction_tokens": r.prediction.rejected,
            "cost_usd": format_usd(r.cost_nano_usd),
            "cost_nano_usd": r.cost_nano_usd,
            "tags": r.tags,
        },
    })
}

/// Where Stripe's customer ids come from: the Tollgate customer id itself, or a map from it.
#[derive(Debug, Clone, Default)]
pub struct StripeMapping {
    pub event_name: String,
    /// Payload key of the customer (the meter's `customer_mapping.event_payload_key`).
    pub customer_key: String,
    /// Tollgate customer id → Stripe customer id; empty: the Tollgate id is used as is.
    pub customers: BTreeMap<String, String>,
}

impl StripeMapping {
    pub fn new() -> Self {
        Self {
            event_name: STRIPE_EVENT_NAME.into(),
            customer_key: STRIPE_CUSTOMER_KEY.into(),
            customers: BTreeMap::new(),
        }
    }
}

/// A record as a Stripe billing meter event, or an error naming a customer the map lacks
/// (nothing is exported for a customer Stripe would not know).
pub fn stripe_meter_event(r: &UsageRecord, mapping: &StripeMapping) -> Result<Value, String> {
    let customer = if mapping.customers.is_empty() {
        r.customer_id.clone()
    } else {
        mapping
            .customers
            .get(&r.customer_id)
            .cloned()
            .ok_or_else(|| {
                format!(
                    "customer `{}` (record {}) has no Stripe customer in the map",
                    r.customer_id, r.id
                )
            })?
    };
    let mut payload = serde_json::Map::new();
    payload.insert(mapping.customer_key.clone(), json!(customer));
    // Stripe payload values are strings of whole numbers.
    for (key, value) in [
        ("input_tokens", r.input_tokens - r.cached_input_tokens),
        ("cached_input_tokens", r.cached_input_tokens),
        ("output_tokens", r.output_tokens),
        ("rejected_prediction_tokens", r.prediction.rejected),
        ("cost_nano_usd", r.cost_nano_usd),
        ("requests", 1),
    ] {
        payload.insert(key.into(), json!(value.to_string()));
    }
    payload.insert("model".into(), json!(r.model));
    if let (Some(base), Some(adapter)) = (&r.base_model, &r.adapter) {
        payload.insert("base_model".into(), json!(base));
        payload.insert("adapter".into(), json!(adapter));
    }
    payload.insert("service_tier".into(), json!(r.service_tier));
    Ok(json!({
        "event_name": mapping.event_name,
        "identifier": r.id,
        "timestamp": r.started_at.div_euclid(1_000_000),
        "payload": payload,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> UsageRecord {
        let mut r = UsageRecord {
            id: "0193a5c0-0000-7000-8000-000000000001".into(),
            customer_id: "acme".into(),
            key_id: "key_1".into(),
            model: "m".into(),
            input_tokens: 10,
            cached_input_tokens: 4,
            output_tokens: 3,
            cost_nano_usd: 1_234,
            started_at: 1_700_000_000_123_456,
            service_tier: crate::kinds::ServiceTier::Flex,
            ..UsageRecord::default()
        };
        r.tags.insert("project".into(), "alpha".into());
        r
    }

    #[test]
    fn cloudevents_carry_the_record_id_and_customer() {
        let e = cloudevent(&record());
        assert_eq!(e["specversion"], "1.0");
        assert_eq!(e["id"], "0193a5c0-0000-7000-8000-000000000001");
        assert_eq!(e["subject"], "acme");
        assert_eq!(e["time"], "2023-11-14T22:13:20.123456Z");
        assert_eq!(e["data"]["fresh_input_tokens"], 6);
        assert_eq!(e["data"]["cost_usd"], "0.000001234");
        assert_eq!(e["data"]["tags"]["project"], "alpha");
        assert_eq!(e["data"]["service_tier"], "flex");
    }

    #[test]
    fn stripe_events_map_customers_and_carry_strings() {
        let mut m = StripeMapping::new();
        let e = stripe_meter_event(&record(), &m).unwrap();
        assert_eq!(e["identifier"], "0193a5c0-0000-7000-8000-000000000001");
        assert_eq!(e["timestamp"], 1_700_000_000);
        assert_eq!(e["payload"]["stripe_customer_id"], "acme");
        assert_eq!(e["payload"]["input_tokens"], "6");
        assert_eq!(e["payload"]["cached_input_tokens"], "4");
        assert_eq!(e["payload"]["service_tier"], "flex");
        m.customers.insert("other".into(), "cus_1".into());
        assert!(stripe_meter_event(&record(), &m)
            .unwrap_err()
            .contains("acme"));
        m.customers.insert("acme".into(), "cus_A".into());
        m.customer_key = "customer".into();
        let e = stripe_meter_event(&record(), &m).unwrap();
        assert_eq!(e["payload"]["customer"], "cus_A");
    }
}

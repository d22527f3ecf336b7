//! The caller of a key named by its id rather than presented (the batch runner runs a batch's
//! lines as the key that created it), and the caller of a static key.

use std::sync::Arc;

use tollgate_metering::limits::Limits;
use tollgate_metering::store::{Store, StoreError};

use super::{unexpired, weight, AuthConfig, Caller, DEFAULT_CUSTOMER};
use crate::error::ApiError;

impl AuthConfig {
    /// The caller of key `key_id` as a request with that key would be now (the batch runner
    /// runs a batch's lines as the key that created it): refused when the key was revoked or
    /// expired since.
    pub async fn caller_of_key(&self, store: &Store, key_id: &str) -> Result<Caller, ApiError> {
        if self.statics.values().any(|k| k == key_id) {
            return Ok(self.static_caller(Some(store), key_id).await);
        }
        let key = match store.key(key_id).await {
            Ok(key) => key,
            Err(StoreError::NotFound(_)) => {
                return Err(ApiError::InvalidApiKey(
                    "the batch's API key no longer exists".into(),
                ))
            }
            Err(e) => return Err(e.into()),
        };
        if key.revoked_at.is_some() {
            return Err(ApiError::InvalidApiKey(
                "the batch's API key has been revoked".into(),
            ));
        }
        let customer = store.customer(&key.customer_id).await?;
        unexpired(Caller::new(&key, &customer))
    }

    /// The caller of static key `key_id`: the `default` customer's limits and budget.
    pub(super) async fn static_caller(&self, store: Option<&Store>, key_id: &str) -> Caller {
        let customer = match store {
            Some(s) => self.default_customer(s).await,
            None => None,
        };
        Caller {
            customer_id: DEFAULT_CUSTOMER.into(),
            key_id: key_id.into(),
            models: None,
            limits: Limits {
                key_id: key_id.into(),
                customer_id: DEFAULT_CUSTOMER.into(),
                customer_rpm: customer.as_ref().and_then(|c| c.rpm),
                customer_tpm: customer.as_ref().and_then(|c| c.tpm),
                ..Limits::default()
            },
            budget_nano_usd: customer.as_ref().and_then(|c| c.budget_nano_usd),
            expires_at: None,
            key_tags: Arc::default(),
            key_budget_nano_usd: None,
            idempotency: None,
            key_max_concurrent: None,
            customer_max_concurrent: customer.as_ref().and_then(|c| c.max_concurrent_requests),
            scheduling_weight: customer.as_ref().map_or(1, weight),
            auto_tier: customer
                .as_ref()
                .and_then(|c| c.default_service_tier)
                .unwrap_or_default(),
            // Without a database the static keys are the operator's own: every tier.
            allow_priority: customer.as_ref().is_none_or(|c| c.allow_priority),
            batch_id: None,
            forwarded_adapter: None,
        }
    }
}

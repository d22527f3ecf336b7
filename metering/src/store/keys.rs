//! API keys: a customer's keys, stored as the SHA-256 of their secret, with their models,
//! limits, budgets and tags. Every change is audited in its own transaction (`crate::audit`).

use sqlx::any::AnyRow;
use sqlx::Row;

use super::{
    now_micros, optional_kind_column, stored_tags, Customer, Store, StoreError, StoreResult,
};
use crate::accounts::ApiKey;
use crate::audit::{self, Action, Actor, Change};
use crate::kinds::ServiceTier;
use crate::secrets::{new_key, stored_digest};
use crate::tags::{self, Tags};
use crate::views::KeyView;

/// Fields of a new key.
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    pub name: String,
    pub models: Option<Vec<String>>,
    pub rpm: Option<i64>,
    pub tpm: Option<i64>,
    pub expires_at: Option<i64>,
    pub tags: Tags,
    pub budget_nano_usd: Option<i64>,
    pub max_concurrent_requests: Option<i64>,
    pub default_service_tier: Option<ServiceTier>,
    /// `None`: allowed (as far as the customer is).
    pub allow_priority: Option<bool>,
}

const KEY_COLUMNS: &str = "id, customer_id, name, key_prefix, models, rpm, tpm, expires_at, \
    revoked_at, created_at, tags, budget_nano_usd, max_concurrent_requests, default_service_tier, \
    allow_priority";

fn api_key(row: &AnyRow) -> StoreResult<ApiKey> {
    let models: Option<String> = row.try_get("models")?;
    let models = match models {
        Some(json) => Some(
            serde_json::from_str(&json)
                .map_err(|e| StoreError::Invalid(format!("stored key models `{json}`: {e}")))?,
        ),
        None => None,
    };
    Ok(ApiKey {
        id: row.try_get("id")?,
        customer_id: row.try_get("customer_id")?,
        name: row.try_get("name")?,
        key_prefix: row.try_get("key_prefix")?,
        models,
        rpm: row.try_get("rpm")?,
        tpm: row.try_get("tpm")?,
        expires_at: row.try_get("expires_at")?,
        revoked_at: row.try_get("revoked_at")?,
        created_at: row.try_get("created_at")?,
        tags: stored_tags(row)?,
        budget_nano_usd: row.try_get("budget_nano_usd")?,
        max_concurrent_requests: row.try_get("max_concurrent_requests")?,
        default_service_tier: optional_kind_column(row, "default_service_tier")?,
        allow_priority: row.try_get::<i64, _>("allow_priority")? != 0,
    })
}

/// A key's fields as the audit log shows them: never its secret, its digest or its prefix.
fn audited_key(k: &ApiKey) -> serde_json::Value {
    KeyView::from(k).audited()
}

/// Fields of an existing key to change: `None` leaves one as it is, `Some(None)` clears it
/// (no limit of the key's own, all models, no expiry, no budget of its own).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyFields {
    pub name: Option<String>,
    pub models: Option<Option<Vec<String>>>,
    pub rpm: Option<Option<i64>>,
    pub tpm: Option<Option<i64>>,
    pub max_concurrent_requests: Option<Option<i64>>,
    pub expires_at: Option<Option<i64>>,
    pub tags: Option<Tags>,
    pub budget_nano_usd: Option<Option<i64>>,
    pub default_service_tier: Option<Option<ServiceTier>>,
    pub allow_priority: Option<bool>,
}

impl KeyFields {
    /// Whether nothing would change.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    fn apply(self, key: &mut ApiKey) {
        let Self {
            name,
            models,
            rpm,
            tpm,
            max_concurrent_requests,
            expires_at,
            tags,
            budget_nano_usd,
            default_service_tier,
            allow_priority,
        } = self;
        key.name = name.unwrap_or(std::mem::take(&mut key.name));
        key.models = models.unwrap_or(key.models.take());
        key.rpm = rpm.unwrap_or(key.rpm);
        key.tpm = tpm.unwrap_or(key.tpm);
        key.max_concurrent_requests =
            max_concurrent_requests.unwrap_or(key.max_concurrent_requests);
        key.expires_at = expires_at.unwrap_or(key.expires_at);
        key.tags = tags.unwrap_or(std::mem::take(&mut key.tags));
        key.budget_nano_usd = budget_nano_usd.unwrap_or(key.budget_nano_usd);
        key.default_service_tier = default_service_tier.unwrap_or(key.default_service_tier);
        key.allow_priority = allow_priority.unwrap_or(key.allow_priority);
    }
}

/// A change to an existing key.
enum KeyChange {
    Fields(KeyFields),
    Revoke,
}

fn models_json(models: &Option<Vec<String>>) -> StoreResult<Option<String>> {
    models
        .as_ref()
        .map(|m| serde_json::to_string(m).map_err(|e| StoreError::Invalid(e.to_string())))
        .transpose()
}

/// One key by id, inside a transaction.
async fn key_in(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    key_id: &str,
) -> StoreResult<ApiKey> {
    let row = sqlx::query(&format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1"))
        .bind(key_id)
        .fetch_optional(&mut **tx)
        .await?;
    match row {
        Some(row) => api_key(&row),
        None => Err(StoreError::NotFound(format!("no key `{key_id}`"))),
    }
}

impl Store {
    /// Issues a key for a customer: returns it and its secret, which is never stored (only its
    /// SHA-256) and cannot be shown again.
    pub async fn issue_key(
        &self,
        customer_id: &str,
        new: NewKey,
        actor: &Actor,
    ) -> StoreResult<(ApiKey, String)> {
        let (id, secret) = new_key();
        let prefix: String = secret.chars().take(9).collect();
        let hash = stored_digest(&secret);
        let key = self
            .create_key(customer_id, &id, &hash, &prefix, new, actor)
            .await?;
        Ok((key, secret))
    }

    /// Stores a key given the SHA-256 hex of its secret.
    pub async fn create_key(
        &self,
        customer_id: &str,
        key_id: &str,
        key_hash: &str,
        key_prefix: &str,
        new: NewKey,
        actor: &Actor,
    ) -> StoreResult<ApiKey> {
        self.customer(customer_id).await?;
        let key = ApiKey {
            id: key_id.to_string(),
            customer_id: customer_id.to_string(),
            name: new.name,
            key_prefix: key_prefix.to_string(),
            models: new.models,
            rpm: new.rpm,
            tpm: new.tpm,
            expires_at: new.expires_at,
            revoked_at: None,
            created_at: now_micros(),
            tags: new.tags,
            budget_nano_usd: new.budget_nano_usd,
            max_concurrent_requests: new.max_concurrent_requests,
            default_service_tier: new.default_service_tier,
            allow_priority: new.allow_priority.unwrap_or(true),
        };
        let models = models_json(&key.models)?;
        let mut tx = self.write_tx().await?;
        sqlx::query(
            "INSERT INTO api_keys (id, customer_id, name, key_hash, key_prefix, models, rpm, tpm, \
             expires_at, revoked_at, created_at, tags, budget_nano_usd, max_concurrent_requests, \
             default_service_tier, allow_priority) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, NULL, $10, $11, $12, $13, $14, $15)",
        )
        .bind(&key.id)
        .bind(&key.customer_id)
        .bind(&key.name)
        .bind(key_hash)
        .bind(&key.key_prefix)
        .bind(models)
        .bind(key.rpm)
        .bind(key.tpm)
        .bind(key.expires_at)
        .bind(key.created_at)
        .bind(tags::to_json(&key.tags))
        .bind(key.budget_nano_usd)
        .bind(key.max_concurrent_requests)
        .bind(key.default_service_tier.map(ServiceTier::as_str))
        .bind(i64::from(key.allow_priority))
        .execute(&mut *tx)
        .await?;
        let change = Change {
            action: Action::KeyCreated,
            target_id: key.id.clone(),
            changes: audited_key(&key),
        };
        audit::record(&mut tx, self.kind(), actor, &change).await?;
        tx.commit().await?;
        Ok(key)
    }

    /// Replaces a key's default tags. Returns the key.
    pub async fn set_key_tags(
        &self,
        key_id: &str,
        tags: &Tags,
        actor: &Actor,
    ) -> StoreResult<ApiKey> {
        let fields = KeyFields {
            tags: Some(tags.clone()),
            ..KeyFields::default()
        };
        self.update_key(key_id, KeyChange::Fields(fields), actor)
            .await
    }

    /// Sets or clears (`None`) a key's own monthly budget. Returns the key.
    pub async fn set_key_budget(
        &self,
        key_id: &str,
        budget: Option<i64>,
        actor: &Actor,
    ) -> StoreResult<ApiKey> {
        let fields = KeyFields {
            budget_nano_usd: Some(budget),
            ..KeyFields::default()
        };
        self.update_key(key_id, KeyChange::Fields(fields), actor)
            .await
    }

    /// Changes a key's fields (its limits, models, expiry, tags, budget) with one audit
    /// entry. Returns the key.
    pub async fn set_key_fields(
        &self,
        key_id: &str,
        fields: KeyFields,
        actor: &Actor,
    ) -> StoreResult<ApiKey> {
        self.update_key(key_id, KeyChange::Fields(fields), actor)
            .await
    }

    /// Makes `change` to the key in one transaction with its audit entry (when anything
    /// changed). Returns the key as changed.
    async fn update_key(
        &self,
        key_id: &str,
        change: KeyChange,
        actor: &Actor,
    ) -> StoreResult<ApiKey> {
        let mut tx = self.write_tx().await?;
        let before = key_in(&mut tx, key_id).await?;
        let action = match change {
            KeyChange::Fields(fields) => {
                let mut key = before.clone();
                fields.apply(&mut key);
                sqlx::query(
                    "UPDATE api_keys SET name = $2, models = $3, rpm = $4, tpm = $5, \
                     max_concurrent_requests = $6, expires_at = $7, tags = $8, \
                     budget_nano_usd = $9, default_service_tier = $10, allow_priority = $11 \
                     WHERE id = $1",
                )
                .bind(key_id)
                .bind(&key.name)
                .bind(models_json(&key.models)?)
                .bind(key.rpm)
                .bind(key.tpm)
                .bind(key.max_concurrent_requests)
                .bind(key.expires_at)
                .bind(tags::to_json(&key.tags))
                .bind(key.budget_nano_usd)
                .bind(key.default_service_tier.map(ServiceTier::as_str))
                .bind(i64::from(key.allow_priority))
                .execute(&mut *tx)
                .await?;
                Action::KeyUpdated
            }
            KeyChange::Revoke => {
                sqlx::query(
                    "UPDATE api_keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL",
                )
                .bind(key_id)
                .bind(now_micros())
                .execute(&mut *tx)
                .await?;
                Action::KeyRevoked
            }
        };
        let after = key_in(&mut tx, key_id).await?;
        if let Some(changes) = audit::diff(&audited_key(&before), &audited_key(&after)) {
            let entry = Change {
                action,
                target_id: key_id.to_string(),
                changes,
            };
            audit::record(&mut tx, self.kind(), actor, &entry).await?;
        }
        tx.commit().await?;
        Ok(after)
    }

    /// One key by id.
    pub async fn key(&self, key_id: &str) -> StoreResult<ApiKey> {
        let row = sqlx::query(&format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1"))
            .bind(key_id)
            .fetch_optional(self.pool())
            .await?;
        match row {
            Some(row) => api_key(&row),
            None => Err(StoreError::NotFound(format!("no key `{key_id}`"))),
        }
    }

    pub async fn list_keys(&self, customer_id: &str) -> StoreResult<Vec<ApiKey>> {
        self.customer(customer_id).await?;
        sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE customer_id = $1 ORDER BY created_at, id"
        ))
        .bind(customer_id)
        .fetch_all(self.pool())
        .await?
        .iter()
        .map(api_key)
        .collect()
    }

    /// Revokes a key; revoking twice keeps the first time (and audits only the first).
    /// Returns the key.
    pub async fn revoke_key(&self, key_id: &str, actor: &Actor) -> StoreResult<ApiKey> {
        self.update_key(key_id, KeyChange::Revoke, actor).await
    }

    /// The key whose secret hashes to `key_hash`, with its stored hash, and its customer.
    /// On the request path: fails at once while the database is considered down.
    pub async fn find_key(
        &self,
        key_hash: &str,
    ) -> StoreResult<Option<(ApiKey, String, Customer)>> {
        if self.is_down() {
            return Err(StoreError::Down);
        }
        let row = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS}, key_hash FROM api_keys WHERE key_hash = $1"
        ))
        .bind(key_hash)
        .fetch_optional(self.pool())
        .await;
        self.observe(&row);
        let row = row?;
        let Some(row) = row else { return Ok(None) };
        let key = api_key(&row)?;
        let stored: String = row.try_get("key_hash")?;
        let customer = self.customer(&key.customer_id).await?;
        Ok(Some((key, stored, customer)))
    }
}

//! Stored responses (`store: true`) in the ledger database, one row per response, scoped to the
//! customer that made it and kept until it expires (expired rows are purged as new ones are
//! written, and never returned).

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use sqlx::Row;

use crate::store::{Store, StoreError, StoreResult};

/// A stored response: the conversation it answered (items of the gateway's Responses API
/// type `I`, kept as JSON) and the response object.
#[derive(Debug, Clone)]
pub struct StoredResponse<I> {
    pub input_items: Vec<I>,
    pub response: Value,
}

fn encode<T: serde::Serialize>(v: &T) -> StoreResult<String> {
    serde_json::to_string(v).map_err(|e| StoreError::Invalid(format!("cannot encode: {e}")))
}

impl Store {
    /// Stores (or replaces) a response, and purges expired ones.
    pub async fn put_response<I: Serialize>(
        &self,
        id: &str,
        customer_id: &str,
        created_at: i64,
        expires_at: i64,
        input_items: &[I],
        response: &Value,
    ) -> StoreResult<()> {
        sqlx::query("DELETE FROM responses WHERE expires_at <= $1")
            .bind(created_at)
            .execute(self.pool())
            .await?;
        sqlx::query("DELETE FROM responses WHERE id = $1")
            .bind(id)
            .execute(self.pool())
            .await?;
        sqlx::query(
            "INSERT INTO responses (id, customer_id, created_at, expires_at, input_items, response) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(id)
        .bind(customer_id)
        .bind(created_at)
        .bind(expires_at)
        .bind(encode(&input_items)?)
        .bind(encode(response)?)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// The customer's unexpired response `id`.
    pub async fn get_response<I: DeserializeOwned>(
        &self,
        id: &str,
        customer_id: &str,
        now: i64,
    ) -> StoreResult<Option<StoredResponse<I>>> {
        let row = sqlx::query(
            "SELECT input_items, response FROM responses \
             WHERE id = $1 AND customer_id = $2 AND expires_at > $3",
        )
        .bind(id)
        .bind(customer_id)
        .bind(now)
        .fetch_optional(self.pool())
        .await?;
        let Some(row) = row else { return Ok(None) };
        let items: String = row.try_get("input_items")?;
        let response: String = row.try_get("response")?;
        let decode =
            |e: serde_json::Error| StoreError::Invalid(format!("stored response {id}: {e}"));
        Ok(Some(StoredResponse {
            input_items: serde_json::from_str(&items).map_err(decode)?,
            response: serde_json::from_str(&response).map_err(decode)?,
        }))
    }

    /// Deletes the customer's response `id`; whether there was one.
    pub async fn delete_response(&self, id: &str, customer_id: &str) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM responses WHERE id = $1 AND customer_id = $2")
            .bind(id)
            .bind(customer_id)
            .execute(self.pool())
            .await?;
        Ok(done.rows_affected() > 0)
    }
}

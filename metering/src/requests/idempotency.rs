//! The `idempotency_keys` table (migration 0011): claiming a key, leasing it while its request
//! runs, and keeping the finished response to replay. Portable SQL, like the rest of the
//! store; a key is claimed by one conditional insert, so two gateways on one PostgreSQL
//! database never both run it.

use sqlx::Row;

use crate::kinds::IdempotencyState;
use crate::store::{kind_column, Store, StoreResult};

/// What a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The key is this request's to run (new, or taken over from a lease that ran out).
    Run,
    /// The key's first request finished: replay it.
    Replay(Stored),
    /// The key was used with another request body.
    Mismatch,
    /// The key's first request is still running (its lease is current).
    InProgress,
}

/// A finished response, as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: String,
    /// The first request's id (its usage record's).
    pub request_id: String,
}

/// A claim's identity and times (Unix microseconds).
#[derive(Debug, Clone)]
pub struct ClaimArgs<'a> {
    pub customer_id: &'a str,
    pub key: &'a str,
    pub request_hash: &'a str,
    pub request_id: &'a str,
    pub now: i64,
    /// When the key is forgotten (the window).
    pub expires_at: i64,
    /// Until when the claim holds without being renewed.
    pub lease_until: i64,
}

impl Store {
    /// Claims `key` for this request, or says what holds it. Expired keys are purged first.
    pub async fn claim_idempotency(&self, a: &ClaimArgs<'_>) -> StoreResult<Claim> {
        sqlx::query("DELETE FROM idempotency_keys WHERE expires_at <= $1")
            .bind(a.now)
            .execute(self.pool())
            .await?;
        let inserted = sqlx::query(
            "INSERT INTO idempotency_keys (customer_id, idempotency_key, request_hash, request_id, \
             state, created_at, expires_at, lease_until) \
             VALUES ($1, $2, $3, $4, 'running', $5, $6, $7) \
             ON CONFLICT (customer_id, idempotency_key) DO NOTHING",
        )
        .bind(a.customer_id)
        .bind(a.key)
        .bind(a.request_hash)
        .bind(a.request_id)
        .bind(a.now)
        .bind(a.expires_at)
        .bind(a.lease_until)
        .execute(self.pool())
        .await?;
        if inserted.rows_affected() == 1 {
            return Ok(Claim::Run);
        }
        let row = sqlx::query(
            "SELECT request_hash, request_id, state, status_code, content_type, body, lease_until \
             FROM idempotency_keys WHERE customer_id = $1 AND idempotency_key = $2",
        )
        .bind(a.customer_id)
        .bind(a.key)
        .fetch_optional(self.pool())
        .await?;
        let Some(row) = row else {
            // Released between the insert and the read: claim it again.
            return Box::pin(self.claim_idempotency(a)).await;
        };
        let hash: String = row.try_get("request_hash")?;
        if hash != a.request_hash {
            return Ok(Claim::Mismatch);
        }
        let state: IdempotencyState = kind_column(&row, "state")?;
        let holder: String = row.try_get("request_id")?;
        if state == IdempotencyState::Done {
            let status: Option<i64> = row.try_get("status_code")?;
            return Ok(Claim::Replay(Stored {
                status: status.and_then(|s| u16::try_from(s).ok()).unwrap_or(200),
                content_type: row.try_get("content_type")?,
                body: row
                    .try_get::<Option<String>, _>("body")?
                    .unwrap_or_default(),
                request_id: holder,
            }));
        }
        let lease_until: i64 = row.try_get("lease_until")?;
        if lease_until > a.now {
            return Ok(Claim::InProgress);
        }
        // The gateway running it stopped renewing its lease (it died): take it over.
        let taken = sqlx::query(
            "UPDATE idempotency_keys SET request_id = $3, lease_until = $4 \
             WHERE customer_id = $1 AND idempotency_key = $2 AND request_id = $5 \
             AND state = 'running' AND lease_until <= $6",
        )
        .bind(a.customer_id)
        .bind(a.key)
        .bind(a.request_id)
        .bind(a.lease_until)
        .bind(&holder)
        .bind(a.now)
        .execute(self.pool())
        .await?;
        Ok(if taken.rows_affected() == 1 {
            tracing::warn!(
                customer_id = a.customer_id,
                previous_request_id = %holder,
                "idempotency key abandoned by a stopped gateway: running it again"
            );
            Claim::Run
        } else {
            Claim::InProgress
        })
    }

    /// Renews the lease of a key this request runs; false when the request no longer holds it
    /// (its lease ran out and another request took the key over, or it was released).
    pub async fn renew_idempotency(
        &self,
        customer_id: &str,
        key: &str,
        request_id: &str,
        lease_until: i64,
    ) -> StoreResult<bool> {
        let renewed = sqlx::query(
            "UPDATE idempotency_keys SET lease_until = $4 \
             WHERE customer_id = $1 AND idempotency_key = $2 AND request_id = $3 \
             AND state = 'running'",
        )
        .bind(customer_id)
        .bind(key)
        .bind(request_id)
        .bind(lease_until)
        .execute(self.pool())
        .await?;
        Ok(renewed.rows_affected() == 1)
    }

    /// Keeps the finished response of the request that runs `key`; false when the request no
    /// longer holds it (nothing is kept).
    pub async fn finish_idempotency(
        &self,
        customer_id: &str,
        key: &str,
        request_id: &str,
        response: &Stored,
    ) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE idempotency_keys SET state = 'done', status_code = $4, content_type = $5, \
             body = $6 WHERE customer_id = $1 AND idempotency_key = $2 AND request_id = $3 \
             AND state = 'running'",
        )
        .bind(customer_id)
        .bind(key)
        .bind(request_id)
        .bind(i64::from(response.status))
        .bind(&response.content_type)
        .bind(&response.body)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Forgets `key` (its request failed or never reached a model), so a retry runs anew.
    pub async fn release_idempotency(
        &self,
        customer_id: &str,
        key: &str,
        request_id: &str,
    ) -> StoreResult<()> {
        sqlx::query(
            "DELETE FROM idempotency_keys \
             WHERE customer_id = $1 AND idempotency_key = $2 AND request_id = $3 \
             AND state = 'running'",
        )
        .bind(customer_id)
        .bind(key)
        .bind(request_id)
        .execute(self.pool())
        .await?;
        Ok(())
    }
}

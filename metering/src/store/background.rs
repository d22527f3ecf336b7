//! Background responses (`background: true` on `/v1/responses`, migration 0039): the run of
//! a stored response (its object is the `responses` row of the same id, which polling reads).
//! [`Store::accept_background`] writes both rows at once, `queued`. A runner claims queued runs
//! (and those whose lease lapsed: their runner died) as batch lines are claimed
//! ([`Store::claim_background`]: `FOR UPDATE SKIP LOCKED` on PostgreSQL, one writer transaction
//! on SQLite), each claim numbered by `attempts`: a run stores its events and its end only
//! while it is `in_progress` under its own claim, so a run that lost its claim (cancelled, or
//! claimed again after its lease lapsed) changes nothing. A new claim starts the events over.
//! The end of a run (`completed`, `incomplete`, `failed`, or a cancel) adds its webhook event
//! (`response.completed`, ...) to the customer's outbox in the transaction that ends it.
//! Times are Unix seconds.

use serde::Serialize;
use serde_json::Value;
use sqlx::any::AnyRow;
use sqlx::Row;

use super::{Store, StoreError, StoreResult};
use crate::db::kind_column;
use crate::kinds::RunStatus;
use crate::outbox::{add_event, EventObject};

/// A background response as accepted.
#[derive(Debug, Clone)]
pub struct NewBackground<'a, I> {
    pub id: &'a str,
    pub customer_id: &'a str,
    /// The key it runs as.
    pub key_id: &'a str,
    pub model: &'a str,
    /// The request body, as JSON.
    pub request: &'a str,
    /// Unix seconds.
    pub created_at: i64,
    /// When its stored response expires (Unix microseconds, as `responses` keeps it).
    pub expires_at: i64,
    /// The conversation it answers and its response object (`queued`).
    pub input_items: &'a [I],
    pub response: &'a Value,
}

/// A run a runner claimed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedRun {
    pub id: String,
    pub customer_id: String,
    pub key_id: String,
    pub model: String,
    pub request: String,
    /// This claim's number: the run's events and end are stored under it only.
    pub attempt: i64,
}

/// How a run ended: its status, its response object and its tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct RunEnd {
    pub status: RunStatus,
    pub response: Value,
    pub input_tokens: i64,
    pub output_tokens: i64,
}

fn encode<T: Serialize>(v: &T) -> StoreResult<String> {
    serde_json::to_string(v).map_err(|e| StoreError::Invalid(format!("cannot encode: {e}")))
}

/// The run is this claim's: `in_progress` under attempt `$2` (its id is `$1`).
const OURS: &str = "id = $1 AND status = 'in_progress' AND attempts = $2";

fn claimed(r: &AnyRow) -> StoreResult<ClaimedRun> {
    Ok(ClaimedRun {
        id: r.try_get("id")?,
        customer_id: r.try_get("customer_id")?,
        key_id: r.try_get("key_id")?,
        model: r.try_get("model")?,
        request: r.try_get("request")?,
        attempt: r.try_get("attempts")?,
    })
}

impl Store {
    /// Stores an accepted background response, `queued`: its response object and its run, in
    /// one transaction.
    pub async fn accept_background<I: Serialize>(
        &self,
        new: &NewBackground<'_, I>,
    ) -> StoreResult<()> {
        let mut tx = self.write_tx().await?;
        sqlx::query(
            "INSERT INTO responses (id, customer_id, created_at, expires_at, input_items, response) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(new.id)
        .bind(new.customer_id)
        .bind(new.created_at * 1_000_000)
        .bind(new.expires_at)
        .bind(encode(&new.input_items)?)
        .bind(encode(new.response)?)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO background_responses (id, customer_id, key_id, model, request, status, \
             created_at) VALUES ($1, $2, $3, $4, $5, 'queued', $6)",
        )
        .bind(new.id)
        .bind(new.customer_id)
        .bind(new.key_id)
        .bind(new.model)
        .bind(new.request)
        .bind(new.created_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Claims up to `limit` runs no runner holds (queued, or in progress under a lease that
    /// lapsed before `now`), oldest first, each `in_progress` until `lease_until`; their
    /// earlier events (of a claim that lapsed) are dropped.
    pub async fn claim_background(
        &self,
        now: i64,
        lease_until: i64,
        limit: u32,
    ) -> StoreResult<Vec<ClaimedRun>> {
        let lock = self.claim_lock("");
        let sql = format!(
            "UPDATE background_responses SET status = 'in_progress', lease_until = $2, \
             attempts = attempts + 1 WHERE id IN (SELECT id FROM background_responses \
             WHERE status = 'queued' OR (status = 'in_progress' AND lease_until < $1) \
             ORDER BY created_at, id LIMIT {limit} {lock}) \
             RETURNING id, customer_id, key_id, model, request, attempts"
        );
        let (mut tx, rows) = self.claim(&sql, now, lease_until).await?;
        let runs = rows.iter().map(claimed).collect::<StoreResult<Vec<_>>>()?;
        for run in &runs {
            sqlx::query("DELETE FROM background_events WHERE response_id = $1")
                .bind(&run.id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(runs)
    }

    /// Whether any run is queued or in progress (an idle runner asks only this).
    pub async fn background_under_way(&self) -> StoreResult<bool> {
        let any: Option<String> = sqlx::query_scalar(
            "SELECT id FROM background_responses WHERE status IN ('queued', 'in_progress') LIMIT 1",
        )
        .fetch_optional(self.pool())
        .await?;
        Ok(any.is_some())
    }

    /// Keeps claim `attempt` on run `id` until `lease_until` (`now + RETRY` puts a run refused
    /// for now back); whether the run is still this claim's.
    pub async fn renew_background(
        &self,
        id: &str,
        attempt: i64,
        lease_until: i64,
    ) -> StoreResult<bool> {
        let sql = format!("UPDATE background_responses SET lease_until = $3 WHERE {OURS}");
        let renewed = sqlx::query(&sql)
            .bind(id)
            .bind(attempt)
            .bind(lease_until)
            .execute(self.pool())
            .await?;
        Ok(renewed.rows_affected() > 0)
    }

    /// Appends the run's events (`sequence_number`, the event as JSON) and, if given, its
    /// response object in its current state; `false` (nothing stored) when the run is no
    /// longer claim `attempt`'s: it was cancelled or claimed again.
    pub async fn add_background_events(
        &self,
        id: &str,
        attempt: i64,
        events: &[(i64, String)],
        response: Option<&Value>,
    ) -> StoreResult<bool> {
        let mut tx = self.write_tx().await?;
        let ours: Option<i64> =
            sqlx::query_scalar(&format!("SELECT 1 FROM background_responses WHERE {OURS}"))
                .bind(id)
                .bind(attempt)
                .fetch_optional(&mut *tx)
                .await?;
        if ours.is_none() {
            return Ok(false);
        }
        for (sequence, event) in events {
            sqlx::query(
                "INSERT INTO background_events (response_id, sequence_number, event) \
                 VALUES ($1, $2, $3)",
            )
            .bind(id)
            .bind(sequence)
            .bind(event)
            .execute(&mut *tx)
            .await?;
        }
        if let Some(response) = response {
            sqlx::query("UPDATE responses SET response = $2 WHERE id = $1")
                .bind(id)
                .bind(encode(response)?)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Ends run `id` of claim `attempt` with `end` at `now`: its status, tokens and response
    /// object. `false` (nothing changed) when it is no longer this claim's.
    pub async fn end_background(
        &self,
        id: &str,
        attempt: i64,
        end: &RunEnd,
        now: i64,
    ) -> StoreResult<bool> {
        let mut tx = self.write_tx().await?;
        let r = sqlx::query(&format!(
            "UPDATE background_responses SET status = $3, lease_until = NULL, ended_at = $4, \
             input_tokens = $5, output_tokens = $6 WHERE {OURS}"
        ))
        .bind(id)
        .bind(attempt)
        .bind(end.status.as_str())
        .bind(now)
        .bind(end.input_tokens)
        .bind(end.output_tokens)
        .execute(&mut *tx)
        .await?;
        if r.rows_affected() == 0 {
            return Ok(false);
        }
        sqlx::query("UPDATE responses SET response = $2 WHERE id = $1")
            .bind(id)
            .bind(encode(&end.response)?)
            .execute(&mut *tx)
            .await?;
        let customer_id: String =
            sqlx::query_scalar("SELECT customer_id FROM background_responses WHERE id = $1")
                .bind(id)
                .fetch_one(&mut *tx)
                .await?;
        add_event(
            &mut tx,
            &customer_id,
            EventObject::Response,
            end.status.as_str(),
            id,
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Cancels the customer's background response `id` if it has not ended: its run stops at
    /// its next write, and its response object says `cancelled`. `None` when the customer has
    /// no background response `id`; else its status after the call.
    pub async fn cancel_background(
        &self,
        id: &str,
        customer_id: &str,
        now: i64,
    ) -> StoreResult<Option<RunStatus>> {
        let mut tx = self.write_tx().await?;
        let r = sqlx::query(
            "UPDATE background_responses SET status = 'cancelled', lease_until = NULL, \
             ended_at = $3 WHERE id = $1 AND customer_id = $2 \
             AND status IN ('queued', 'in_progress')",
        )
        .bind(id)
        .bind(customer_id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if r.rows_affected() == 0 {
            tx.rollback().await?;
            return self.background_status(id, customer_id).await;
        }
        let stored: Option<String> =
            sqlx::query_scalar("SELECT response FROM responses WHERE id = $1")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        if let Some(stored) = stored {
            let mut response: Value = serde_json::from_str(&stored)
                .map_err(|e| StoreError::Invalid(format!("stored response {id}: {e}")))?;
            response["status"] = Value::String(RunStatus::Cancelled.as_str().into());
            sqlx::query("UPDATE responses SET response = $2 WHERE id = $1")
                .bind(id)
                .bind(encode(&response)?)
                .execute(&mut *tx)
                .await?;
        }
        let end = RunStatus::Cancelled.as_str();
        add_event(&mut tx, customer_id, EventObject::Response, end, id).await?;
        tx.commit().await?;
        Ok(Some(RunStatus::Cancelled))
    }

    /// The status of the customer's background response `id`; `None` when there is none.
    pub async fn background_status(
        &self,
        id: &str,
        customer_id: &str,
    ) -> StoreResult<Option<RunStatus>> {
        let row = sqlx::query(
            "SELECT status FROM background_responses WHERE id = $1 AND customer_id = $2",
        )
        .bind(id)
        .bind(customer_id)
        .fetch_optional(self.pool())
        .await?;
        row.as_ref().map(|r| kind_column(r, "status")).transpose()
    }

    /// Up to `limit` events of background response `id` after `sequence_number` `after`, in
    /// order.
    pub async fn background_events(
        &self,
        id: &str,
        after: i64,
        limit: u32,
    ) -> StoreResult<Vec<(i64, String)>> {
        Ok(sqlx::query_as(&format!(
            "SELECT sequence_number, event FROM background_events \
             WHERE response_id = $1 AND sequence_number > $2 ORDER BY sequence_number LIMIT {limit}"
        ))
        .bind(id)
        .bind(after)
        .fetch_all(self.pool())
        .await?)
    }
}

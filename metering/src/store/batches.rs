//! The `batches` and `batch_lines` tables: the Batch API's batches (owner, endpoint, input
//! file, lifecycle and its times, counts, validation errors) and their lines once validated.
//! A batch moves `validating` → `in_progress` (its lines written) or `failed`; `cancel` moves
//! its queued lines to `cancelled` and it to `cancelling` (a validating one to `cancelled`);
//! running and ending it is `batch_runs`'.
//! Times are Unix seconds.

use sqlx::any::AnyRow;
use sqlx::Row;

use super::{ListOrder, Store, StoreError, StoreResult};
use crate::kinds::{BatchStatus, Endpoint};
use crate::outbox::{add_event, EventObject};

/// One batch's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRow {
    /// `batch_…`: time-ordered, so the id is also the list order.
    pub id: String,
    pub customer_id: String,
    /// The key that created it: its lines run as that key (`None` on batches older than the
    /// runner).
    pub key_id: Option<String>,
    /// Where each line goes.
    pub endpoint: Endpoint,
    pub input_file_id: String,
    pub completion_window: String,
    pub status: BatchStatus,
    /// The request's `metadata` object, as JSON.
    pub metadata: Option<String>,
    /// The validation's errors, a JSON list.
    pub errors: Option<String>,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub total: i64,
    pub completed: i64,
    pub failed: i64,
    pub created_at: i64,
    pub expires_at: i64,
    pub times: BatchTimes,
    /// Its lines' tokens, totalled when it is final.
    pub usage: BatchUsage,
}

/// A batch's tokens (its lines' totals), as its `usage` shows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchUsage {
    pub input_tokens: i64,
    pub output_tokens: i64,
    /// Of `input_tokens`, those served from a prefix cache.
    pub cached_tokens: i64,
}

/// When a batch reached each step of its lifecycle (Unix seconds; `None` until it does), as
/// OpenAI's batch object has them.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct BatchTimes {
    pub in_progress_at: Option<i64>,
    pub finalizing_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub failed_at: Option<i64>,
    pub expired_at: Option<i64>,
    pub cancelling_at: Option<i64>,
    pub cancelled_at: Option<i64>,
}

impl BatchRow {
    /// A new batch of `customer_id`'s, `validating`, created at 0 with no window yet (see
    /// [`BatchRow::window`]).
    pub fn validating(
        id: String,
        (customer_id, key_id): (&str, &str),
        endpoint: Endpoint,
        input_file_id: String,
        metadata: Option<String>,
    ) -> Self {
        Self {
            id,
            customer_id: customer_id.into(),
            key_id: Some(key_id.into()),
            endpoint,
            input_file_id,
            completion_window: String::new(),
            status: BatchStatus::Validating,
            metadata,
            errors: None,
            output_file_id: None,
            error_file_id: None,
            total: 0,
            completed: 0,
            failed: 0,
            created_at: 0,
            expires_at: 0,
            times: BatchTimes::default(),
            usage: BatchUsage::default(),
        }
    }

    /// Created at `now`, due within `seconds` (`window` as the API names it).
    pub fn window(mut self, window: &str, now: i64, seconds: i64) -> Self {
        self.completion_window = window.into();
        self.created_at = now;
        self.expires_at = now + seconds;
        self
    }
}

/// A validated line of a batch's input file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchLine {
    /// 1-based, as in the input file.
    pub line: i64,
    pub custom_id: String,
    /// The request body, as JSON.
    pub body: String,
    /// The body's `model`.
    pub model: String,
}

pub(super) const COLUMNS: &str =
    "id, customer_id, key_id, endpoint, input_file_id, completion_window, status, \
    metadata, errors, output_file_id, error_file_id, total, completed, failed, created_at, \
    expires_at, in_progress_at, finalizing_at, completed_at, failed_at, expired_at, \
    cancelling_at, cancelled_at, input_tokens, output_tokens, cached_tokens";

/// Lines per INSERT: 5 parameters each, well within SQLite's limit on parameters.
const LINE_CHUNK: usize = 500;

pub(super) fn row(r: &AnyRow) -> StoreResult<BatchRow> {
    let status: String = r.try_get("status")?;
    let endpoint: String = r.try_get("endpoint")?;
    Ok(BatchRow {
        id: r.try_get("id")?,
        customer_id: r.try_get("customer_id")?,
        key_id: r.try_get("key_id")?,
        endpoint: endpoint
            .parse()
            .map_err(|_| StoreError::Invalid(format!("unknown batch endpoint {endpoint}")))?,
        input_file_id: r.try_get("input_file_id")?,
        completion_window: r.try_get("completion_window")?,
        status: status
            .parse()
            .map_err(|_| StoreError::Invalid(format!("unknown batch status {status}")))?,
        metadata: r.try_get("metadata")?,
        errors: r.try_get("errors")?,
        output_file_id: r.try_get("output_file_id")?,
        error_file_id: r.try_get("error_file_id")?,
        total: r.try_get("total")?,
        completed: r.try_get("completed")?,
        failed: r.try_get("failed")?,
        created_at: r.try_get("created_at")?,
        expires_at: r.try_get("expires_at")?,
        times: BatchTimes {
            in_progress_at: r.try_get("in_progress_at")?,
            finalizing_at: r.try_get("finalizing_at")?,
            completed_at: r.try_get("completed_at")?,
            failed_at: r.try_get("failed_at")?,
            expired_at: r.try_get("expired_at")?,
            cancelling_at: r.try_get("cancelling_at")?,
            cancelled_at: r.try_get("cancelled_at")?,
        },
        usage: BatchUsage {
            input_tokens: r.try_get("input_tokens")?,
            output_tokens: r.try_get("output_tokens")?,
            cached_tokens: r.try_get("cached_tokens")?,
        },
    })
}

impl Store {
    /// Adds a new batch (`validating`).
    pub async fn insert_batch(&self, b: &BatchRow) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO batches (id, customer_id, endpoint, input_file_id, completion_window, \
             status, metadata, created_at, expires_at, key_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&b.id)
        .bind(&b.customer_id)
        .bind(b.endpoint.as_str())
        .bind(&b.input_file_id)
        .bind(&b.completion_window)
        .bind(b.status.as_str())
        .bind(&b.metadata)
        .bind(b.created_at)
        .bind(b.expires_at)
        .bind(&b.key_id)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// The customer's batch `id`.
    pub async fn batch(&self, id: &str, customer_id: &str) -> StoreResult<Option<BatchRow>> {
        let r = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM batches WHERE id = $1 AND customer_id = $2"
        ))
        .bind(id)
        .bind(customer_id)
        .fetch_optional(self.pool())
        .await?;
        r.as_ref().map(row).transpose()
    }

    /// A page of the customer's batches after `after` (newest first), and whether more follow.
    pub async fn batches(
        &self,
        customer_id: &str,
        after: Option<&str>,
        limit: u32,
        order: ListOrder,
    ) -> StoreResult<(Vec<BatchRow>, bool)> {
        let (cmp, dir) = match order {
            ListOrder::Asc => (">", "ASC"),
            ListOrder::Desc => ("<", "DESC"),
        };
        let page = u64::from(limit) + 1;
        let rows = match after {
            Some(after) => {
                sqlx::query(&format!(
                    "SELECT {COLUMNS} FROM batches WHERE customer_id = $1 AND id {cmp} $2 \
                     ORDER BY id {dir} LIMIT {page}"
                ))
                .bind(customer_id)
                .bind(after)
                .fetch_all(self.pool())
                .await?
            }
            None => {
                sqlx::query(&format!(
                    "SELECT {COLUMNS} FROM batches WHERE customer_id = $1 \
                     ORDER BY id {dir} LIMIT {page}"
                ))
                .bind(customer_id)
                .fetch_all(self.pool())
                .await?
            }
        };
        let mut batches = rows.iter().map(row).collect::<StoreResult<Vec<_>>>()?;
        let more = batches.len() > limit as usize;
        batches.truncate(limit as usize);
        Ok((batches, more))
    }

    /// A validated batch starts: its lines are written and it is `in_progress`, unless it
    /// left `validating` meanwhile (cancelled); whether it started.
    pub async fn start_batch(&self, id: &str, lines: &[BatchLine], now: i64) -> StoreResult<bool> {
        let mut tx = self.write_tx().await?;
        let started = sqlx::query(
            "UPDATE batches SET status = $1, in_progress_at = $2, total = $3 \
             WHERE id = $4 AND status = $5",
        )
        .bind(BatchStatus::InProgress.as_str())
        .bind(now)
        .bind(i64::try_from(lines.len()).unwrap_or(i64::MAX))
        .bind(id)
        .bind(BatchStatus::Validating.as_str())
        .execute(&mut *tx)
        .await?;
        if started.rows_affected() == 0 {
            return Ok(false);
        }
        for chunk in lines.chunks(LINE_CHUNK) {
            let values: Vec<String> = (0..chunk.len())
                .map(|i| {
                    let n = i * 5;
                    format!(
                        "(${}, ${}, ${}, ${}, ${}, 'queued')",
                        n + 1,
                        n + 2,
                        n + 3,
                        n + 4,
                        n + 5
                    )
                })
                .collect();
            let sql = format!(
                "INSERT INTO batch_lines (batch_id, line, custom_id, body, model, state) VALUES {}",
                values.join(", ")
            );
            let mut query = sqlx::query(&sql);
            for l in chunk {
                query = query
                    .bind(id)
                    .bind(l.line)
                    .bind(&l.custom_id)
                    .bind(&l.body)
                    .bind(&l.model);
            }
            query.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// A batch whose validation failed: `failed`, with its errors (a JSON list), unless it
    /// left `validating` meanwhile.
    pub async fn fail_batch(&self, id: &str, errors: &str, now: i64) -> StoreResult<()> {
        let mut tx = self.write_tx().await?;
        let failed = sqlx::query(
            "UPDATE batches SET status = $1, failed_at = $2, errors = $3 WHERE id = $4 AND status = $5",
        )
        .bind(BatchStatus::Failed.as_str())
        .bind(now)
        .bind(errors)
        .bind(id)
        .bind(BatchStatus::Validating.as_str())
        .execute(&mut *tx)
        .await?;
        if failed.rows_affected() == 1 {
            let customer_id: String =
                sqlx::query_scalar("SELECT customer_id FROM batches WHERE id = $1")
                    .bind(id)
                    .fetch_one(&mut *tx)
                    .await?;
            add_event(&mut tx, &customer_id, EventObject::Batch, "failed", id).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Cancels the customer's batch `id`: its queued lines `cancelled`; a batch still
    /// validating is `cancelled` at once, one in progress `cancelling` until the runner has
    /// finished its running lines and written its files (`cancelled` then). `None` when there is no such
    /// batch; a batch already done is a conflict.
    pub async fn cancel_batch(
        &self,
        id: &str,
        customer_id: &str,
        now: i64,
    ) -> StoreResult<Option<BatchRow>> {
        let mut tx = self.write_tx().await?;
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM batches WHERE id = $1 AND customer_id = $2")
                .bind(id)
                .bind(customer_id)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(status) = status else {
            return Ok(None);
        };
        let status: BatchStatus = status
            .parse()
            .map_err(|_| StoreError::Invalid(format!("unknown batch status {status}")))?;
        match status {
            BatchStatus::Validating | BatchStatus::InProgress => {
                sqlx::query(
                    "UPDATE batch_lines SET state = 'cancelled' WHERE batch_id = $1 AND state = 'queued'",
                )
                .bind(id)
                .execute(&mut *tx)
                .await?;
                let (to, cancelled_at) = if status == BatchStatus::Validating {
                    (BatchStatus::Cancelled, Some(now))
                } else {
                    (BatchStatus::Cancelling, None)
                };
                sqlx::query(
                    "UPDATE batches SET status = $1, cancelling_at = $2, cancelled_at = $3 WHERE id = $4",
                )
                .bind(to.as_str())
                .bind(now)
                .bind(cancelled_at)
                .bind(id)
                .execute(&mut *tx)
                .await?;
                if to == BatchStatus::Cancelled {
                    add_event(&mut tx, customer_id, EventObject::Batch, "cancelled", id).await?;
                }
            }
            BatchStatus::Cancelling | BatchStatus::Cancelled => {}
            done => {
                return Err(StoreError::Conflict(format!(
                    "Cannot cancel a batch with status {done}."
                )))
            }
        }
        tx.commit().await?;
        self.batch(id, customer_id).await
    }

    /// Batch `id`'s lines, in order (for tests and the runner).
    pub async fn batch_lines(&self, id: &str) -> StoreResult<Vec<(BatchLine, String)>> {
        let rows = sqlx::query(
            "SELECT line, custom_id, body, model, state FROM batch_lines WHERE batch_id = $1 ORDER BY line",
        )
        .bind(id)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    BatchLine {
                        line: r.try_get("line")?,
                        custom_id: r.try_get("custom_id")?,
                        body: r.try_get("body")?,
                        model: r.try_get("model")?,
                    },
                    r.try_get("state")?,
                ))
            })
            .collect()
    }
}

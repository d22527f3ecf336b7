//! Running the lines of the Batch API's batches (the rows are [`super::batches`]'): a runner
//! claims queued lines under a lease ([`Store::claim_batch_lines`]; on PostgreSQL with
//! `FOR UPDATE SKIP LOCKED`, so replicas never claim the same line; on SQLite in one writer
//! transaction), renews the lease while a line runs, and stores its result once
//! ([`Store::finish_batch_line`]: only a line still `running` takes one, so a line run twice
//! after its lease lapsed keeps the first result). A line whose lease lapsed (its runner died)
//! is claimed again. Lines of a batch past its window are `expired`. Once no line of a batch is
//! queued or running, one runner claims the batch to write its files
//! ([`Store::claim_batch_end`]) and ends it ([`Store::end_batch`]). Times are Unix seconds.

use sqlx::any::AnyRow;
use sqlx::Row;

use super::batches::{row, COLUMNS};
use super::{BatchRow, BatchUsage, Store, StoreResult};
use crate::db::{kind_column, DbKind};
use crate::kinds::{BatchStatus, LineState};
use crate::outbox::{add_event, EventObject};

/// A line a runner claimed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedLine {
    pub batch_id: String,
    /// 1-based, as in the input file.
    pub line: i64,
    pub custom_id: String,
    /// The request body, as JSON.
    pub body: String,
    pub model: String,
    /// Claims of it so far, this one included.
    pub attempts: i64,
    /// Runs of it that its engine failed, each run again under a new request id
    /// ([`Store::retry_batch_line`]).
    pub retries: i64,
}

/// What a line ended as: its state (`completed` or `failed`), its output or error file line
/// (JSON) and its tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineResult {
    pub state: LineState,
    pub result: String,
    pub usage: BatchUsage,
}

/// One line of a batch, as its files show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineOutcome {
    pub line: i64,
    pub custom_id: String,
    pub state: LineState,
    /// Its file line, when it ran.
    pub result: Option<String>,
}

/// Lines no runner holds: queued, or running under a lease that lapsed before `$1`.
const CLAIMABLE: &str = "(l.state = 'queued' OR (l.state = 'running' AND l.lease_until < $1))";

/// No line of batch `b` is queued or running.
const ALL_DONE: &str = "NOT EXISTS (SELECT 1 FROM batch_lines l WHERE l.batch_id = b.id \
    AND l.state IN ('queued', 'running'))";

fn claimed(r: &AnyRow) -> StoreResult<ClaimedLine> {
    Ok(ClaimedLine {
        batch_id: r.try_get("batch_id")?,
        line: r.try_get("line")?,
        custom_id: r.try_get("custom_id")?,
        body: r.try_get("body")?,
        model: r.try_get("model")?,
        attempts: r.try_get("attempts")?,
        retries: r.try_get("retries")?,
    })
}

impl Store {
    /// The row lock of a claim's inner `SELECT` (`of`: which table's rows): on PostgreSQL,
    /// rows another replica holds are skipped; on SQLite there is none, one writer at a time
    /// (the claim's transaction) is the lock.
    pub(super) fn claim_lock(&self, of: &str) -> String {
        match self.kind() {
            DbKind::Postgres => format!("FOR UPDATE {of} SKIP LOCKED"),
            DbKind::Sqlite => String::new(),
        }
    }

    /// Runs claim `sql` (bound: now, then the lease's end) in a writer transaction, left open
    /// for the caller to finish; the rows it returned.
    pub(super) async fn claim(
        &self,
        sql: &str,
        now: i64,
        lease_until: i64,
    ) -> StoreResult<(sqlx::Transaction<'static, sqlx::Any>, Vec<AnyRow>)> {
        let mut tx = self.write_tx().await?;
        let rows = sqlx::query(sql)
            .bind(now)
            .bind(lease_until)
            .fetch_all(&mut *tx)
            .await?;
        Ok((tx, rows))
    }

    /// Claims up to `limit` lines of batches in progress (or cancelling: a line whose runner
    /// died finishes) and within their window, oldest batch first, each `running` until
    /// `lease_until`.
    pub async fn claim_batch_lines(
        &self,
        now: i64,
        lease_until: i64,
        limit: u32,
    ) -> StoreResult<Vec<ClaimedLine>> {
        let lock = self.claim_lock("OF l");
        let sql = format!(
            "UPDATE batch_lines SET state = 'running', lease_until = $2, attempts = attempts + 1 \
             WHERE (batch_id, line) IN (SELECT l.batch_id, l.line FROM batch_lines l \
             JOIN batches b ON b.id = l.batch_id \
             WHERE b.status IN ('in_progress', 'cancelling') AND b.expires_at > $1 AND {CLAIMABLE} \
             ORDER BY l.batch_id, l.line LIMIT {limit} {lock}) \
             RETURNING batch_id, line, custom_id, body, model, attempts, retries"
        );
        let (tx, rows) = self.claim(&sql, now, lease_until).await?;
        tx.commit().await?;
        let mut lines = rows.iter().map(claimed).collect::<StoreResult<Vec<_>>>()?;
        lines.sort_by(|a, b| (&a.batch_id, a.line).cmp(&(&b.batch_id, b.line)));
        Ok(lines)
    }

    /// Keeps the claim on a running line until `lease_until`; whether it is still running.
    pub async fn renew_batch_line(
        &self,
        batch_id: &str,
        line: i64,
        lease_until: i64,
    ) -> StoreResult<bool> {
        self.hold_running_line("", batch_id, line, lease_until)
            .await
    }

    /// Puts back a running line that its engine failed, to be claimed again after
    /// `lease_until` as its next retry; whether it was still running.
    pub async fn retry_batch_line(
        &self,
        batch_id: &str,
        line: i64,
        lease_until: i64,
    ) -> StoreResult<bool> {
        self.hold_running_line(", retries = retries + 1", batch_id, line, lease_until)
            .await
    }

    /// Sets a running line's lease to `lease_until` (and `also`, more assignments);
    /// whether it was still running.
    async fn hold_running_line(
        &self,
        also: &str,
        batch_id: &str,
        line: i64,
        lease_until: i64,
    ) -> StoreResult<bool> {
        let r = sqlx::query(&format!(
            "UPDATE batch_lines SET lease_until = $1{also} \
             WHERE batch_id = $2 AND line = $3 AND state = 'running'"
        ))
        .bind(lease_until)
        .bind(batch_id)
        .bind(line)
        .execute(self.pool())
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Stores a running line's result and counts it on its batch; `false` (and nothing
    /// changed) when the line is no longer running: another run of it already ended it.
    pub async fn finish_batch_line(
        &self,
        batch_id: &str,
        line: i64,
        result: &LineResult,
    ) -> StoreResult<bool> {
        let mut tx = self.write_tx().await?;
        let r = sqlx::query(
            "UPDATE batch_lines SET state = $1, result = $2, input_tokens = $3, \
             output_tokens = $4, cached_tokens = $5, lease_until = NULL \
             WHERE batch_id = $6 AND line = $7 AND state = 'running'",
        )
        .bind(result.state.as_str())
        .bind(&result.result)
        .bind(result.usage.input_tokens)
        .bind(result.usage.output_tokens)
        .bind(result.usage.cached_tokens)
        .bind(batch_id)
        .bind(line)
        .execute(&mut *tx)
        .await?;
        if r.rows_affected() == 0 {
            return Ok(false);
        }
        let column = if result.state == LineState::Completed {
            "completed"
        } else {
            "failed"
        };
        sqlx::query(&format!(
            "UPDATE batches SET {column} = {column} + 1 WHERE id = $1"
        ))
        .bind(batch_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Lines of batches past their window at `now` that no runner holds: `expired`. How many.
    pub async fn expire_batch_lines(&self, now: i64) -> StoreResult<u64> {
        let r = sqlx::query(&format!(
            "UPDATE batch_lines SET state = 'expired', lease_until = NULL \
             WHERE (batch_id, line) IN (SELECT l.batch_id, l.line FROM batch_lines l \
             JOIN batches b ON b.id = l.batch_id \
             WHERE b.status = 'in_progress' AND b.expires_at <= $1 AND {CLAIMABLE})"
        ))
        .bind(now)
        .execute(self.pool())
        .await?;
        Ok(r.rows_affected())
    }

    /// Batches whose lines are all done and that no runner is ending (at `now`).
    pub async fn batches_to_end(&self, now: i64) -> StoreResult<Vec<String>> {
        Ok(sqlx::query_scalar(&format!(
            "SELECT b.id FROM batches b WHERE (b.status = 'in_progress' \
             OR (b.status IN ('finalizing', 'cancelling') \
             AND (b.lease_until IS NULL OR b.lease_until < $1))) AND {ALL_DONE} ORDER BY b.id"
        ))
        .bind(now)
        .fetch_all(self.pool())
        .await?)
    }

    /// Claims batch `id` to write its files, until `lease_until`: `finalizing` (a cancelled
    /// batch stays `cancelling`). `None` when its lines are not all done or another runner
    /// holds it.
    pub async fn claim_batch_end(
        &self,
        id: &str,
        now: i64,
        lease_until: i64,
    ) -> StoreResult<Option<BatchRow>> {
        let r = sqlx::query(
            "UPDATE batches SET \
             status = CASE WHEN status = 'cancelling' THEN 'cancelling' ELSE 'finalizing' END, \
             finalizing_at = CASE WHEN status = 'cancelling' THEN finalizing_at \
             ELSE COALESCE(finalizing_at, $1) END, lease_until = $2 \
             WHERE id = $3 AND (status = 'in_progress' OR (status IN ('finalizing', 'cancelling') \
             AND (lease_until IS NULL OR lease_until < $1))) \
             AND NOT EXISTS (SELECT 1 FROM batch_lines l WHERE l.batch_id = $3 \
             AND l.state IN ('queued', 'running'))",
        )
        .bind(now)
        .bind(lease_until)
        .bind(id)
        .execute(self.pool())
        .await?;
        if r.rows_affected() == 0 {
            return Ok(None);
        }
        self.batch_by_id(id).await
    }

    /// A page of batch `id`'s lines after line `after`, in order, as its files show them.
    pub async fn batch_outcomes(
        &self,
        id: &str,
        after: i64,
        limit: u32,
    ) -> StoreResult<Vec<LineOutcome>> {
        let rows = sqlx::query(&format!(
            "SELECT line, custom_id, state, result FROM batch_lines \
             WHERE batch_id = $1 AND line > $2 ORDER BY line LIMIT {limit}"
        ))
        .bind(id)
        .bind(after)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(LineOutcome {
                    line: r.try_get("line")?,
                    custom_id: r.try_get("custom_id")?,
                    state: kind_column(r, "state")?,
                    result: r.try_get("result")?,
                })
            })
            .collect()
    }

    /// Ends batch `id` (claimed by [`Store::claim_batch_end`]) with its files: `cancelled` if
    /// it was cancelled, `expired` if a line expired, else `completed`; its counts and tokens
    /// totalled from its lines. `None` when it was not this runner's to end any more.
    pub async fn end_batch(
        &self,
        id: &str,
        (output_file_id, error_file_id): (Option<&str>, Option<&str>),
        now: i64,
    ) -> StoreResult<Option<BatchStatus>> {
        let mut tx = self.write_tx().await?;
        let totals = sqlx::query(
            "SELECT state, COUNT(*) AS n, CAST(SUM(input_tokens) AS BIGINT) AS i, \
             CAST(SUM(output_tokens) AS BIGINT) AS o, CAST(SUM(cached_tokens) AS BIGINT) AS c \
             FROM batch_lines WHERE batch_id = $1 GROUP BY state",
        )
        .bind(id)
        .fetch_all(&mut *tx)
        .await?;
        let (mut completed, mut failed, mut expired) = (0i64, 0i64, false);
        let mut usage = BatchUsage::default();
        for r in &totals {
            let state: LineState = kind_column(r, "state")?;
            let n: i64 = r.try_get("n")?;
            match state {
                LineState::Completed => completed += n,
                LineState::Failed => failed += n,
                LineState::Expired => {
                    failed += n;
                    expired = true;
                }
                _ => {}
            }
            usage.input_tokens += r.try_get::<Option<i64>, _>("i")?.unwrap_or(0);
            usage.output_tokens += r.try_get::<Option<i64>, _>("o")?.unwrap_or(0);
            usage.cached_tokens += r.try_get::<Option<i64>, _>("c")?.unwrap_or(0);
        }
        let ending: Option<(String, String)> = sqlx::query_as(
            "SELECT status, customer_id FROM batches WHERE id = $1 \
             AND status IN ('finalizing', 'cancelling')",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((from, customer_id)) = ending else {
            return Ok(None);
        };
        let (status, at) = if from == BatchStatus::Cancelling.as_str() {
            (BatchStatus::Cancelled, "cancelled_at")
        } else if expired {
            (BatchStatus::Expired, "expired_at")
        } else {
            (BatchStatus::Completed, "completed_at")
        };
        sqlx::query(&format!(
            "UPDATE batches SET status = $1, {at} = $2, output_file_id = $3, error_file_id = $4, \
             completed = $5, failed = $6, input_tokens = $7, output_tokens = $8, \
             cached_tokens = $9, lease_until = NULL WHERE id = $10"
        ))
        .bind(status.as_str())
        .bind(now)
        .bind(output_file_id)
        .bind(error_file_id)
        .bind(completed)
        .bind(failed)
        .bind(usage.input_tokens)
        .bind(usage.output_tokens)
        .bind(usage.cached_tokens)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        add_event(
            &mut tx,
            &customer_id,
            EventObject::Batch,
            status.as_str(),
            id,
        )
        .await?;
        tx.commit().await?;
        Ok(Some(status))
    }

    /// Whether any batch has lines to run or is to be ended (a runner with nothing to do
    /// asks only this).
    pub async fn batches_under_way(&self) -> StoreResult<bool> {
        let any: Option<String> = sqlx::query_scalar(
            "SELECT id FROM batches WHERE status IN ('in_progress', 'finalizing', 'cancelling') \
             LIMIT 1",
        )
        .fetch_optional(self.pool())
        .await?;
        Ok(any.is_some())
    }

    /// Batch `id`, whoever owns it (for the runner).
    pub async fn batch_by_id(&self, id: &str) -> StoreResult<Option<BatchRow>> {
        let r = sqlx::query(&format!("SELECT {COLUMNS} FROM batches WHERE id = $1"))
            .bind(id)
            .fetch_optional(self.pool())
            .await?;
        r.as_ref().map(row).transpose()
    }

    /// Lines queued and running now, per model and state, over every batch (for `/metrics`).
    pub async fn batch_line_counts(&self) -> StoreResult<Vec<(String, LineState, i64)>> {
        let rows = sqlx::query(
            "SELECT model, state, COUNT(*) AS n FROM batch_lines \
             WHERE state IN ('queued', 'running') GROUP BY model, state",
        )
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("model")?,
                    kind_column(r, "state")?,
                    r.try_get("n")?,
                ))
            })
            .collect()
    }
}

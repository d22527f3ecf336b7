//! The reads only the console makes: the request log newest first with filters, request
//! counts by status, and a customer's batches and background responses with what their records
//! charged so far. Plain SQL over the same tables, portable between SQLite and PostgreSQL.

use sqlx::Row;

use crate::kinds::{BatchStatus, Outcome, RunStatus};
use crate::store::{kind_column, record, Store, StoreResult, UsageRecord, RECORD_COLUMNS};

/// A batch as the console lists it: its progress (OpenAI's `request_counts`) and the cost of
/// the records of its lines so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchSummary {
    pub id: String,
    pub status: BatchStatus,
    pub endpoint: String,
    pub total: i64,
    pub completed: i64,
    pub failed: i64,
    /// Unix seconds.
    pub created_at: i64,
    pub cost_nano_usd: i64,
}

/// A background response as the console lists it, with what its record charged (0 until it
/// is written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackgroundSummary {
    pub id: String,
    pub model: String,
    pub status: RunStatus,
    /// Unix seconds.
    pub created_at: i64,
    pub output_tokens: i64,
    pub cost_nano_usd: i64,
}

/// The usage record id of background response `r.id` (`resp_<32 hex>`: the UUID with its
/// dashes), in SQL both dialects speak.
const RECORD_OF_RESPONSE: &str = "substr(r.id, 6, 8) || '-' || substr(r.id, 14, 4) || '-' || \
    substr(r.id, 18, 4) || '-' || substr(r.id, 22, 4) || '-' || substr(r.id, 26, 12)";

/// Which records the request log shows (all given filters must hold).
#[derive(Debug, Clone, Default)]
pub struct LogFilter {
    pub customer_id: Option<String>,
    pub key_id: Option<String>,
    pub model: Option<String>,
    pub status: Option<String>,
    /// `started_at` in `[start, end)`, Unix micros.
    pub start: Option<i64>,
    pub end: Option<i64>,
}

impl Store {
    /// Records matching `filter` before the cursor `before` (a ledger `seq`, as in the export
    /// cursor; `None`: the newest), newest first, each with its cursor.
    pub async fn records_newest(
        &self,
        filter: &LogFilter,
        before: Option<i64>,
        limit: i64,
    ) -> StoreResult<Vec<(i64, UsageRecord)>> {
        let mut sql = format!("SELECT seq, {RECORD_COLUMNS} FROM usage_records WHERE seq < $1");
        let mut binds: Vec<String> = Vec::new();
        let mut n = 2;
        for (column, value) in [
            ("customer_id", &filter.customer_id),
            ("key_id", &filter.key_id),
            ("model", &filter.model),
            ("status", &filter.status),
        ] {
            if let Some(v) = value {
                sql.push_str(&format!(" AND {column} = ${n}"));
                binds.push(v.clone());
                n += 1;
            }
        }
        let mut times = Vec::new();
        for (cmp, value) in [(">=", filter.start), ("<", filter.end)] {
            if let Some(t) = value {
                sql.push_str(&format!(" AND started_at {cmp} ${n}"));
                times.push(t);
                n += 1;
            }
        }
        sql.push_str(&format!(" ORDER BY seq DESC LIMIT ${n}"));
        let mut q = sqlx::query(&sql).bind(before.unwrap_or(i64::MAX));
        for b in binds {
            q = q.bind(b);
        }
        for t in times {
            q = q.bind(t);
        }
        q.bind(limit)
            .fetch_all(self.pool())
            .await?
            .iter()
            .map(|row| Ok((row.try_get::<i64, _>("seq")?, record(row)?)))
            .collect()
    }

    /// Requests started in `[start, end)` by status.
    pub async fn status_counts(&self, start: i64, end: i64) -> StoreResult<Vec<(Outcome, i64)>> {
        sqlx::query(
            "SELECT status, CAST(COUNT(*) AS BIGINT) AS n FROM usage_records \
             WHERE started_at >= $1 AND started_at < $2 GROUP BY status ORDER BY status",
        )
        .bind(start)
        .bind(end)
        .fetch_all(self.pool())
        .await?
        .iter()
        .map(|row| Ok((kind_column(row, "status")?, row.try_get("n")?)))
        .collect()
    }

    /// The customer's newest `limit` batches, with their lines' cost so far.
    pub async fn batches_of(
        &self,
        customer_id: &str,
        limit: u32,
    ) -> StoreResult<Vec<BatchSummary>> {
        sqlx::query(&format!(
            "SELECT b.id, b.status, b.endpoint, b.total, b.completed, b.failed, b.created_at, \
             (SELECT CAST(COALESCE(SUM(u.cost_nano_usd), 0) AS BIGINT) FROM usage_records u \
             WHERE u.batch_id = b.id) AS cost FROM batches b WHERE b.customer_id = $1 \
             ORDER BY b.created_at DESC, b.id DESC LIMIT {limit}"
        ))
        .bind(customer_id)
        .fetch_all(self.pool())
        .await?
        .iter()
        .map(|row| {
            Ok(BatchSummary {
                id: row.try_get("id")?,
                status: kind_column(row, "status")?,
                endpoint: row.try_get("endpoint")?,
                total: row.try_get("total")?,
                completed: row.try_get("completed")?,
                failed: row.try_get("failed")?,
                created_at: row.try_get("created_at")?,
                cost_nano_usd: row.try_get("cost")?,
            })
        })
        .collect()
    }

    /// The customer's newest `limit` background responses, with what their records charged.
    pub async fn background_of(
        &self,
        customer_id: &str,
        limit: u32,
    ) -> StoreResult<Vec<BackgroundSummary>> {
        sqlx::query(&format!(
            "SELECT r.id, r.model, r.status, r.created_at, r.output_tokens, \
             (SELECT CAST(COALESCE(SUM(u.cost_nano_usd), 0) AS BIGINT) FROM usage_records u \
             WHERE u.id = {RECORD_OF_RESPONSE}) AS cost FROM background_responses r \
             WHERE r.customer_id = $1 ORDER BY r.created_at DESC, r.id DESC LIMIT {limit}"
        ))
        .bind(customer_id)
        .fetch_all(self.pool())
        .await?
        .iter()
        .map(|row| {
            Ok(BackgroundSummary {
                id: row.try_get("id")?,
                model: row.try_get("model")?,
                status: kind_column(row, "status")?,
                created_at: row.try_get("created_at")?,
                output_tokens: row.try_get("output_tokens")?,
                cost_nano_usd: row.try_get("cost")?,
            })
        })
        .collect()
    }
}

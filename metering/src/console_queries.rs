//! The reads only the console makes: the request log newest first with filters, and request
//! counts by status. Plain SQL over the same tables, portable between SQLite and PostgreSQL.

use sqlx::Row;

use crate::kinds::Outcome;
use crate::store::{kind_column, record, Store, StoreResult, UsageRecord, RECORD_COLUMNS};

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
}

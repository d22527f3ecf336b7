//! Reading the ledger's records page by page under a filter (customer, key, model, status, a
//! time range): what `GET /admin/v1/usage/records` and `tollgate usage export` follow. Pages are
//! in ledger order (`seq`) and a page knows whether another follows (it reads one row more than
//! it returns), so a full last page does not promise records that are not there.

use sqlx::Row;

use super::usage::{record, UsageRecord, RECORD_COLUMNS};
use super::{Store, StoreResult};
use crate::kinds::Outcome;

/// Parses an export cursor (opaque to clients; a ledger sequence number here).
pub fn parse_cursor(text: &str) -> Result<i64, String> {
    text.trim()
        .parse::<i64>()
        .ok()
        .filter(|c| *c >= 0)
        .ok_or_else(|| format!("`{text}` is not a cursor returned by this API"))
}

/// Which records a page holds: all of these that are given (`started_at` in `[start, end)`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordFilter {
    pub customer_id: Option<String>,
    pub key_id: Option<String>,
    pub model: Option<String>,
    pub status: Option<Outcome>,
    pub start: Option<i64>,
    pub end: Option<i64>,
}

/// One page of records after a cursor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordPage {
    pub records: Vec<UsageRecord>,
    /// The `seq` of the page's last record (`None` on an empty page: keep the old cursor).
    pub last: Option<i64>,
    /// Whether a record matching the filter follows this page.
    pub has_more: bool,
}

impl Store {
    /// Up to `limit` records matching `filter` after `cursor` (a `seq`), in ledger order.
    pub async fn records_page(
        &self,
        filter: &RecordFilter,
        cursor: i64,
        limit: i64,
    ) -> StoreResult<RecordPage> {
        let mut sql = format!("SELECT seq, {RECORD_COLUMNS} FROM usage_records WHERE seq > $1");
        let mut next = 2;
        let mut condition = |sql: &mut String, column: &str, op: &str| {
            sql.push_str(&format!(" AND {column} {op} ${next}"));
            next += 1;
        };
        let texts = [
            ("customer_id", filter.customer_id.as_deref()),
            ("key_id", filter.key_id.as_deref()),
            ("model", filter.model.as_deref()),
            ("status", filter.status.map(Outcome::as_str)),
        ];
        for (column, value) in texts {
            if value.is_some() {
                condition(&mut sql, column, "=");
            }
        }
        if filter.start.is_some() {
            condition(&mut sql, "started_at", ">=");
        }
        if filter.end.is_some() {
            condition(&mut sql, "started_at", "<");
        }
        sql.push_str(&format!(" ORDER BY seq LIMIT ${next}"));
        let mut q = sqlx::query(&sql).bind(cursor);
        for value in texts.iter().filter_map(|(_, v)| *v) {
            q = q.bind(value);
        }
        for time in [filter.start, filter.end].into_iter().flatten() {
            q = q.bind(time);
        }
        let mut rows = q
            .bind(limit.saturating_add(1))
            .fetch_all(self.pool())
            .await?;
        let has_more = i64::try_from(rows.len()).is_ok_and(|n| n > limit);
        rows.truncate(usize::try_from(limit).unwrap_or(0));
        let last = match rows.last() {
            Some(row) => Some(row.try_get::<i64, _>("seq")?),
            None => None,
        };
        let records = rows.iter().map(record).collect::<StoreResult<Vec<_>>>()?;
        Ok(RecordPage {
            records,
            last,
            has_more,
        })
    }
}

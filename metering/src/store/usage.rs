//! The usage ledger's table: inserting records (idempotent on their id, in `seq` order, see the
//! module above), reading them back in ledger order, spend since a moment, and the grouped
//! aggregates that reports and the Usage API are built from.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::Row;

use super::{
    kind_column, optional_kind_column, stored_tags, DbKind, Store, StoreError, StoreResult,
};
use crate::kinds::{BudgetScope, Endpoint, FinishReason, Outcome, ServiceTier, UsageSource};
use crate::tags::{self, Tags};

pub use super::prediction::PredictionTokens;
use super::usage_row::usage_row;
pub use super::usage_row::UsageRow;

/// Advisory lock id serializing ledger inserts on PostgreSQL.
const LEDGER_LOCK: i64 = 0x746f_6c6c_6761_7465;

/// Rows per multi-row insert on PostgreSQL (30 parameters each; well under its limit).
const INSERT_CHUNK: usize = 200;

/// Rows per multi-row insert on SQLite: binding a parameter looks its name up by a linear
/// search (`sqlite3_bind_parameter_name`), so a statement's binding cost grows with the square
/// of its parameters; at 200 rows it took a tenth of the gateway's CPU under load.
const INSERT_CHUNK_SQLITE: usize = 16;

/// One request's usage, as written to the ledger. Times in Unix microseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    pub id: String,
    pub customer_id: String,
    pub key_id: String,
    pub model: String,
    pub endpoint: Endpoint,
    pub stream: bool,
    pub status: Outcome,
    pub finish_reason: Option<FinishReason>,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub started_at: i64,
    pub finished_at: i64,
    pub ttft_ms: Option<i64>,
    /// The unit prices applied, exact (stored and exported as the decimal strings they were
    /// configured as: `Decimal` keeps its scale, so `0.10` stays `0.10`).
    pub input_price_per_mtok: Decimal,
    pub output_price_per_mtok: Decimal,
    pub cost_nano_usd: i64,
    /// Of `input_tokens`, those served from a prefix cache.
    #[serde(default)]
    pub cached_input_tokens: i64,
    /// The unit price of cached prompt tokens (`None` on records older than it: the input
    /// price).
    #[serde(default)]
    pub cached_input_price_per_mtok: Option<Decimal>,
    /// The part of `cost_nano_usd` that is cached prompt tokens (rounded alone).
    #[serde(default)]
    pub cached_cost_nano_usd: i64,
    /// Where the token counts came from: `engine`, `upstream`, or `observed` (an upstream
    /// reported fewer output tokens than the gateway saw, or none).
    #[serde(default)]
    pub usage_source: Option<UsageSource>,
    /// Cost-allocation tags: the request's `metadata` and `user` with its key's default tags.
    #[serde(default, skip_serializing_if = "Tags::is_empty")]
    pub tags: Tags,
    /// The `Idempotency-Key` its request carried: a repeat of the request replays the stored
    /// result and has no record of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// The class of service it was served and priced at (`default` on records older than
    /// tiers).
    #[serde(default)]
    pub service_tier: ServiceTier,
    /// Its `prediction`'s tokens (OpenAI's Predicted Outputs); zero without one.
    #[serde(default, skip_serializing_if = "PredictionTokens::is_none")]
    pub prediction: PredictionTokens,
    /// The batch (Batch API) its request was a line of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_id: Option<String>,
    /// A request to a LoRA adapter's model id: its base model and the adapter's name (`model`
    /// stays the id requested, `<base_model>:<adapter>`); `None` otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
}

/// Columns usage can be grouped by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupBy {
    /// The value of one tag (`tag:project`); records without it form their own group.
    Tag(String),
    Customer,
    Model,
    Key,
    /// UTC day (`started_at` truncated to the day).
    Day,
    /// The unit prices applied (for invoice line items).
    Prices,
    /// The class of service records were served and priced at.
    ServiceTier,
    /// The base model and adapter of an adapter's model id (`NULL` both for a model's own
    /// requests), for invoice lines.
    Adapter,
}

/// Which records an aggregate covers: `started_at` in `[start, end)`.
#[derive(Debug, Clone, Default)]
pub struct UsageFilter {
    pub start: i64,
    pub end: i64,
    pub customer_id: Option<String>,
    pub model: Option<String>,
    /// Only records whose tag `.0` has the value `.1`.
    pub tag: Option<(String, String)>,
}

pub const RECORD_COLUMNS: &str = "id, customer_id, key_id, model, endpoint, stream, status, \
    finish_reason, input_tokens, output_tokens, started_at, finished_at, ttft_ms, \
    input_price_per_mtok, output_price_per_mtok, cost_nano_usd, cached_input_tokens, \
    cached_input_price_per_mtok, cached_cost_nano_usd, usage_source, tags, idempotency_key, \
    service_tier, accepted_prediction_tokens, rejected_prediction_tokens, \
    rejected_prediction_price_per_mtok, rejected_prediction_cost_nano_usd, batch_id, base_model, \
    adapter";

/// Columns of [`RECORD_COLUMNS`], one bound parameter each.
const RECORD_PARAMS: usize = 30;

pub fn record(row: &AnyRow) -> StoreResult<UsageRecord> {
    Ok(UsageRecord {
        id: row.try_get("id")?,
        customer_id: row.try_get("customer_id")?,
        key_id: row.try_get("key_id")?,
        model: row.try_get("model")?,
        endpoint: kind_column(row, "endpoint")?,
        stream: row.try_get::<i64, _>("stream")? != 0,
        status: kind_column(row, "status")?,
        finish_reason: optional_kind_column(row, "finish_reason")?,
        input_tokens: row.try_get("input_tokens")?,
        output_tokens: row.try_get("output_tokens")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
        ttft_ms: row.try_get("ttft_ms")?,
        input_price_per_mtok: kind_column(row, "input_price_per_mtok")?,
        output_price_per_mtok: kind_column(row, "output_price_per_mtok")?,
        cost_nano_usd: row.try_get("cost_nano_usd")?,
        cached_input_tokens: row.try_get("cached_input_tokens")?,
        cached_input_price_per_mtok: optional_kind_column(row, "cached_input_price_per_mtok")?,
        cached_cost_nano_usd: row.try_get("cached_cost_nano_usd")?,
        usage_source: optional_kind_column(row, "usage_source")?,
        tags: stored_tags(row)?,
        idempotency_key: row.try_get("idempotency_key")?,
        service_tier: kind_column(row, "service_tier")?,
        prediction: PredictionTokens::read(row, None)?,
        batch_id: row.try_get("batch_id")?,
        base_model: row.try_get("base_model")?,
        adapter: row.try_get("adapter")?,
    })
}

/// Charged records whose `Idempotency-Key` already has a charged record (in the ledger, or
/// earlier in `records`) under another id, turned `superseded`: recorded with their tokens,
/// charged nothing. The database's unique index on (customer, key) of charged records holds
/// the rule; this keeps a second run's record from failing the batch (and the writer's retries)
/// on it. Runs under the ledger's write lock, so no other batch inserts meanwhile.
async fn supersede_repeats<'a>(
    conn: &mut sqlx::AnyConnection,
    records: &'a [UsageRecord],
) -> Result<std::borrow::Cow<'a, [UsageRecord]>, sqlx::Error> {
    use std::collections::HashMap;
    let keyed: Vec<(&str, &str)> = records
        .iter()
        .filter(|r| r.status.is_charged())
        .filter_map(|r| Some((r.customer_id.as_str(), r.idempotency_key.as_deref()?)))
        .collect();
    if keyed.is_empty() {
        return Ok(std::borrow::Cow::Borrowed(records));
    }
    // (customer, key) -> the id of the record charged for it.
    let mut charged: HashMap<(String, String), String> = HashMap::new();
    for chunk in keyed.chunks(100) {
        let pairs: Vec<String> = (0..chunk.len())
            .map(|i| {
                format!(
                    "(customer_id = ${} AND idempotency_key = ${})",
                    2 * i + 1,
                    2 * i + 2
                )
            })
            .collect();
        let sql = format!(
            "SELECT id, customer_id, idempotency_key FROM usage_records \
             WHERE ({}) AND idempotency_key IS NOT NULL AND status IN ('completed', 'cancelled')",
            pairs.join(" OR ")
        );
        let mut q = sqlx::query(&sql);
        for (customer, key) in chunk {
            q = q.bind(*customer).bind(*key);
        }
        for row in q.fetch_all(&mut *conn).await? {
            charged.insert(
                (row.try_get("customer_id")?, row.try_get("idempotency_key")?),
                row.try_get("id")?,
            );
        }
    }
    let mut out = records.to_vec();
    for r in &mut out {
        let Some(key) = r.idempotency_key.clone() else {
            continue;
        };
        if !r.status.is_charged() {
            continue;
        }
        let first = charged
            .entry((r.customer_id.clone(), key))
            .or_insert_with(|| r.id.clone());
        if *first != r.id {
            tracing::warn!(
                request_id = %r.id,
                charged_request_id = %first,
                customer_id = %r.customer_id,
                "a second charged record for one Idempotency-Key: recorded as superseded, not charged"
            );
            r.status = Outcome::Superseded;
            r.cost_nano_usd = 0;
            r.cached_cost_nano_usd = 0;
        }
    }
    Ok(std::borrow::Cow::Owned(out))
}

impl Store {
    /// Inserts records, skipping ids already present. Returns how many were new.
    ///
    /// In one transaction (serialized: PostgreSQL's advisory lock, SQLite's write lock): the
    /// records, a charged record of an `Idempotency-Key` that already has one turned
    /// `superseded` (see [`supersede_repeats`]), the month totals per customer and key, and
    /// the budget alert step, which reads those totals and cannot roll the records back.
    pub async fn insert_records(&self, records: &[UsageRecord]) -> StoreResult<u64> {
        let mut tx = self.write_tx().await?;
        if self.kind() == DbKind::Postgres {
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(LEDGER_LOCK)
                .execute(&mut *tx)
                .await?;
        }
        let records = supersede_repeats(&mut tx, records).await?;
        let records: &[UsageRecord] = &records;
        let postgres = self.kind() == DbKind::Postgres;
        let mut inserted = 0;
        // (scope, started_at, cost) of the rows this batch added: customer and key month totals.
        let mut added: Vec<(String, i64, i64)> = Vec::new();
        let chunk_rows = if postgres {
            INSERT_CHUNK
        } else {
            INSERT_CHUNK_SQLITE
        };
        for chunk in records.chunks(chunk_rows) {
            inserted += insert_chunk(&mut tx, chunk, &mut added).await?;
        }
        if postgres {
            // Each record's holds: its customer's (the record id) and its key's.
            let key_holds: Vec<String> = records
                .iter()
                .map(|r| crate::shared_limits::key_hold_id(&r.id))
                .collect();
            let ids: Vec<&str> = records
                .iter()
                .map(|r| r.id.as_str())
                .chain(key_holds.iter().map(String::as_str))
                .collect();
            crate::shared_limits::settle_in_ledger(&mut tx, &added, &ids).await?;
        } else {
            crate::shared_limits::add_month_spend(&mut tx, &added).await?;
        }
        // Budget alerts the spend crossed, in the same transaction (the outbox); a failure
        // there leaves the alert to be retried, never the records.
        crate::alerts::outbox_in_ledger(&mut tx, &added).await?;
        tx.commit().await?;
        Ok(inserted)
    }

    /// Cost of a customer's records started at or after `since`.
    pub async fn spent_since(&self, customer_id: &str, since: i64) -> StoreResult<i64> {
        self.scope_spent_since(&BudgetScope::Customer(customer_id.to_string()), since)
            .await
    }

    /// Cost of a budget scope's records (a customer's, or a key's) started at or after `since`.
    pub async fn scope_spent_since(&self, scope: &BudgetScope, since: i64) -> StoreResult<i64> {
        let (column, id) = match scope {
            BudgetScope::Customer(id) => ("customer_id", id),
            BudgetScope::Key(id) => ("key_id", id),
        };
        let row = sqlx::query(&format!(
            "SELECT CAST(COALESCE(SUM(cost_nano_usd), 0) AS BIGINT) AS spent FROM usage_records \
             WHERE {column} = $1 AND started_at >= $2"
        ))
        .bind(id)
        .bind(since)
        .fetch_one(self.pool())
        .await;
        self.observe(&row);
        let row = row?;
        Ok(row.try_get("spent")?)
    }

    /// Records after `cursor` (a `seq`) in ledger order, and the cursor to continue from.
    pub async fn records_after(
        &self,
        cursor: i64,
        limit: i64,
    ) -> StoreResult<(Vec<UsageRecord>, Option<i64>)> {
        self.records_between(i64::MIN, i64::MAX, cursor, limit)
            .await
    }

    /// Records started in `[start, end)` after `cursor`, in ledger order (for time-range
    /// exports, read page by page).
    pub async fn records_between(
        &self,
        start: i64,
        end: i64,
        cursor: i64,
        limit: i64,
    ) -> StoreResult<(Vec<UsageRecord>, Option<i64>)> {
        let rows = sqlx::query(&format!(
            "SELECT seq, {RECORD_COLUMNS} FROM usage_records \
             WHERE started_at >= $1 AND started_at < $2 AND seq > $3 ORDER BY seq LIMIT $4"
        ))
        .bind(start)
        .bind(end)
        .bind(cursor)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        let last = match rows.last() {
            Some(row) => Some(row.try_get::<i64, _>("seq")?),
            None => None,
        };
        let records = rows.iter().map(record).collect::<StoreResult<Vec<_>>>()?;
        Ok((records, last))
    }

    /// The selected columns `group` and time `buckets` ask for; the grouped tag's path when
    /// there is one (parameter 3), and the next free parameter.
    fn group_columns(
        &self,
        group: &[GroupBy],
        buckets: Option<(i64, i64)>,
    ) -> StoreResult<(Vec<String>, Option<String>, usize)> {
        const DAY: i64 = 86_400_000_000;
        let mut cols: Vec<String> = Vec::new();
        // Parameters after start and end: the grouped tag's path, then the filters.
        let mut next = 3;
        let mut tag_group = None;
        for g in group {
            match g {
                GroupBy::Tag(key) => {
                    cols.push(format!(
                        "{} AS tag_value",
                        tags::sql_value(self.kind(), next)
                    ));
                    tag_group = Some(key.clone());
                    next += 1;
                }
                GroupBy::Customer => cols.push("customer_id".into()),
                GroupBy::Model => cols.push("model".into()),
                GroupBy::Key => cols.push("key_id".into()),
                GroupBy::Day => cols.push(format!("(started_at / {DAY}) * {DAY} AS bucket_start")),
                GroupBy::ServiceTier => cols.push("service_tier".into()),
                GroupBy::Adapter => {
                    cols.push("base_model".into());
                    cols.push("adapter".into());
                }
                GroupBy::Prices => {
                    cols.push("input_price_per_mtok".into());
                    cols.push("output_price_per_mtok".into());
                    cols.push("cached_input_price_per_mtok".into());
                    cols.push("rejected_prediction_price_per_mtok".into());
                }
            }
        }
        if let Some((origin, width)) = buckets {
            if width <= 0 {
                return Err(StoreError::Invalid("bucket width must be positive".into()));
            }
            cols.push(format!(
                "((started_at - {origin}) / {width}) * {width} + {origin} AS bucket_start"
            ));
        }
        Ok((cols, tag_group, next))
    }

    /// Aggregates usage in `filter`, grouped by `group` and optionally by fixed-width time
    /// buckets `(origin, width)` in microseconds.
    pub async fn aggregate(
        &self,
        filter: &UsageFilter,
        group: &[GroupBy],
        buckets: Option<(i64, i64)>,
    ) -> StoreResult<Vec<UsageRow>> {
        let (cols, tag_group, next) = self.group_columns(group, buckets)?;
        let sql = self.aggregate_sql(filter, &cols, next);
        let mut q = sqlx::query(&sql).bind(filter.start).bind(filter.end);
        if let Some(path) = tag_group {
            q = q.bind(path);
        }
        if let Some(c) = &filter.customer_id {
            q = q.bind(c);
        }
        if let Some(m) = &filter.model {
            q = q.bind(m);
        }
        if let Some((key, value)) = &filter.tag {
            q = q.bind(key.clone()).bind(value);
        }
        let rows = q.fetch_all(self.pool()).await?;
        rows.iter()
            .map(|row| usage_row(row, group, buckets.is_some()))
            .filter(|r: &StoreResult<UsageRow>| r.as_ref().map_or(true, |r| r.requests > 0))
            .collect()
    }

    /// [`Store::aggregate`]'s statement: columns `cols` and the sums under `filter` (from `$next`).
    fn aggregate_sql(&self, filter: &UsageFilter, cols: &[String], mut next: usize) -> String {
        let mut sql = String::from("SELECT ");
        for c in cols {
            sql.push_str(c);
            sql.push_str(", ");
        }
        sql.push_str(
            "CAST(COUNT(*) AS BIGINT) AS requests, \
             CAST(SUM(input_tokens) AS BIGINT) AS input_tokens, \
             CAST(SUM(output_tokens) AS BIGINT) AS output_tokens, \
             CAST(SUM(cost_nano_usd) AS BIGINT) AS cost_nano_usd, \
             CAST(SUM(cached_input_tokens) AS BIGINT) AS cached_input_tokens, \
             CAST(SUM(cached_cost_nano_usd) AS BIGINT) AS cached_cost_nano_usd, \
             CAST(SUM(accepted_prediction_tokens) AS BIGINT) AS accepted_prediction_tokens, \
             CAST(SUM(rejected_prediction_tokens) AS BIGINT) AS rejected_prediction_tokens, \
             CAST(SUM(rejected_prediction_cost_nano_usd) AS BIGINT) \
             AS rejected_prediction_cost_nano_usd \
             FROM usage_records WHERE started_at >= $1 AND started_at < $2",
        );
        if filter.customer_id.is_some() {
            sql.push_str(&format!(" AND customer_id = ${next}"));
            next += 1;
        }
        if filter.model.is_some() {
            sql.push_str(&format!(" AND model = ${next}"));
            next += 1;
        }
        if filter.tag.is_some() {
            sql.push_str(&format!(
                " AND {} = ${}",
                tags::sql_value(self.kind(), next),
                next + 1
            ));
        }
        let group_exprs = group_exprs(cols);
        if !group_exprs.is_empty() {
            let list = group_exprs.join(", ");
            sql.push_str(&format!(" GROUP BY {list} ORDER BY {list}"));
        }
        sql
    }
}

/// The GROUP BY expressions of `cols`: each one's expression, its alias where that has a parameter.
fn group_exprs(cols: &[String]) -> Vec<String> {
    cols.iter()
        .map(|c| match c.rsplit_once(" AS ") {
            Some((_, "tag_value")) => "tag_value".to_string(),
            Some((expr, _)) => expr.to_string(),
            None => c.clone(),
        })
        .collect()
}

/// Inserts `chunk` in one statement, skipping ids already present; for each new row pushes
/// `(scope, started_at, cost)` onto `added`, for its customer and for its key. Returns how
/// many were new.
async fn insert_chunk(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    chunk: &[UsageRecord],
    added: &mut Vec<(String, i64, i64)>,
) -> StoreResult<u64> {
    let mut sql = format!("INSERT INTO usage_records ({RECORD_COLUMNS}) VALUES ");
    for i in 0..chunk.len() {
        let base = i * RECORD_PARAMS;
        let params: Vec<String> = (1..=RECORD_PARAMS)
            .map(|k| format!("${}", base + k))
            .collect();
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        sql.push_str(&params.join(", "));
        sql.push(')');
    }
    sql.push_str(" ON CONFLICT (id) DO NOTHING");
    sql.push_str(" RETURNING customer_id, key_id, started_at, cost_nano_usd");
    let mut q = sqlx::query(&sql);
    for r in chunk {
        q = q
            .bind(&r.id)
            .bind(&r.customer_id)
            .bind(&r.key_id)
            .bind(&r.model)
            .bind(r.endpoint.as_str())
            .bind(i64::from(r.stream))
            .bind(r.status.as_str())
            .bind(r.finish_reason.map(FinishReason::as_str))
            .bind(r.input_tokens)
            .bind(r.output_tokens)
            .bind(r.started_at)
            .bind(r.finished_at)
            .bind(r.ttft_ms)
            .bind(r.input_price_per_mtok.to_string())
            .bind(r.output_price_per_mtok.to_string())
            .bind(r.cost_nano_usd)
            .bind(r.cached_input_tokens)
            .bind(r.cached_input_price_per_mtok.map(|p| p.to_string()))
            .bind(r.cached_cost_nano_usd)
            .bind(r.usage_source.map(UsageSource::as_str))
            .bind(tags::to_json(&r.tags))
            .bind(&r.idempotency_key)
            .bind(r.service_tier.as_str())
            .bind(r.prediction.accepted)
            .bind(r.prediction.rejected)
            .bind(r.prediction.price_per_mtok.map(|p| p.to_string()))
            .bind(r.prediction.cost_nano_usd)
            .bind(&r.batch_id)
            .bind(&r.base_model)
            .bind(&r.adapter);
    }
    let mut inserted = 0;
    for row in q.fetch_all(&mut **tx).await? {
        let started_at: i64 = row.try_get("started_at")?;
        let cost: i64 = row.try_get("cost_nano_usd")?;
        let key_id: String = row.try_get("key_id")?;
        added.push((row.try_get("customer_id")?, started_at, cost));
        // The key's own spend, for key budgets.
        added.push((BudgetScope::Key(key_id).stored(), started_at, cost));
        inserted += 1;
    }
    Ok(inserted)
}

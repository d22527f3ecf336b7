//! Rate limits and budgets shared by every gateway replica on one PostgreSQL database, exact
//! across replicas (migration `postgres/0002_shared_limits.sql`).
//!
//! Rate buckets use GCRA: a bucket of `L` per minute stores one timestamp, its "theoretical
//! arrival time" `tat`. Taking `n` units moves `tat` to `max(tat, now) + n · 60 s / L`, allowed
//! only while the result stays within 60 s of now; so a full bucket holds `L` units and refills
//! continuously, the same semantics as the in-process token buckets. One conditional upsert per
//! bucket does it (PostgreSQL re-checks the condition on the row it locks, so concurrent takes
//! are exact); a request with both a key and a customer limit takes both in one transaction,
//! all or none. Time is the database's clock, so replicas' clocks do not matter.
//!
//! Budgets: `customer_spend` keeps per customer and month what was spent and what requests in
//! flight hold. Admission is one conditional upsert, `held += max cost` only while
//! `spent + held + max cost <= budget`, plus the hold's own row in `budget_holds` (same
//! statement). When the usage record reaches the ledger, its insert transaction deletes the hold,
//! takes it off `held` and adds the actual cost to `spent`. Holds of a replica that vanished
//! with its spool expire; they are cleared when they would refuse a request.

use std::collections::BTreeMap;

use sqlx::{AnyConnection, AnyPool, Row};

/// The shared hold id of a request's key budget hold.
pub fn key_hold_id(request_id: &str) -> String {
    format!("{request_id}/key")
}

/// The database's time in Unix microseconds (start of the current transaction).
const NOW_US: &str = "CAST(EXTRACT(EPOCH FROM now()) * 1000000 AS BIGINT)";
/// Every limit is per minute.
const WINDOW_US: i64 = 60_000_000;
/// Holds left by a replica that vanished (with its spool) expire after this long.
pub const HOLD_TTL_US: i64 = 3_600_000_000;

/// One bucket to take from.
#[derive(Debug, Clone)]
pub struct RateTake {
    /// `key:<id>` or `customer:<id>`.
    pub scope: String,
    /// `requests` or `tokens`.
    pub kind: &'static str,
    pub limit: i64,
    pub amount: i64,
}

/// A bucket after a successful take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLevel {
    pub limit: i64,
    pub tat_us: i64,
    pub now_us: i64,
}

impl RateLevel {
    /// Whole units left in the bucket.
    pub fn remaining(&self) -> i64 {
        if self.limit <= 0 {
            return 0;
        }
        let free_us = (self.now_us + WINDOW_US - self.tat_us).clamp(0, WINDOW_US);
        // At most `limit`, since `free_us` is at most the window.
        i64::try_from(i128::from(free_us) * i128::from(self.limit) / i128::from(WINDOW_US))
            .unwrap_or(self.limit)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateOutcome {
    /// Every bucket had room; their states after the take, in order.
    Taken(Vec<RateLevel>),
    /// Bucket `index` had no room; it will in `wait_us`. Nothing was taken.
    Refused { index: usize, wait_us: i64 },
}

/// Microseconds `amount` units move a bucket of `limit` per minute; rounded down, so a full
/// bucket always admits exactly `limit` single units.
fn span_us(limit: i64, amount: i64) -> i64 {
    if limit <= 0 {
        return WINDOW_US + 1;
    }
    i64::try_from(i128::from(amount) * i128::from(WINDOW_US) / i128::from(limit))
        .unwrap_or(i64::MAX)
}

/// One conditional GCRA upsert; the bucket's state when it had room.
async fn take_one(
    conn: &mut AnyConnection,
    t: &RateTake,
) -> Result<Option<RateLevel>, sqlx::Error> {
    let row = sqlx::query(&format!(
        "INSERT INTO rate_buckets (scope, kind, tat_us) VALUES ($1, $2, {NOW_US} + $3) \
         ON CONFLICT (scope, kind) DO UPDATE \
         SET tat_us = GREATEST(rate_buckets.tat_us, {NOW_US}) + $3 \
         WHERE GREATEST(rate_buckets.tat_us, {NOW_US}) + $3 <= {NOW_US} + $4 \
         RETURNING tat_us, {NOW_US} AS now_us"
    ))
    .bind(&t.scope)
    .bind(t.kind)
    .bind(span_us(t.limit, t.amount))
    .bind(WINDOW_US)
    .fetch_optional(&mut *conn)
    .await?;
    row.map(|row| {
        Ok(RateLevel {
            limit: t.limit,
            tat_us: row.try_get("tat_us")?,
            now_us: row.try_get("now_us")?,
        })
    })
    .transpose()
}

/// How long until `t` would fit in its bucket.
async fn wait_for(conn: &mut AnyConnection, t: &RateTake) -> Result<i64, sqlx::Error> {
    let row = sqlx::query(&format!(
        "SELECT tat_us, {NOW_US} AS now_us FROM rate_buckets WHERE scope = $1 AND kind = $2"
    ))
    .bind(&t.scope)
    .bind(t.kind)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else { return Ok(0) };
    let tat: i64 = row.try_get("tat_us")?;
    let now: i64 = row.try_get("now_us")?;
    Ok((tat.max(now) + span_us(t.limit, t.amount) - (now + WINDOW_US)).max(0))
}

/// Takes from every bucket or from none. The caller has checked `amount <= limit`.
pub async fn take(pool: &AnyPool, takes: &[RateTake]) -> Result<RateOutcome, sqlx::Error> {
    if let [t] = takes {
        // One bucket: one statement, no transaction to open.
        let mut conn = pool.acquire().await?;
        return Ok(match take_one(&mut conn, t).await? {
            Some(level) => RateOutcome::Taken(vec![level]),
            None => RateOutcome::Refused {
                index: 0,
                wait_us: wait_for(&mut conn, t).await?,
            },
        });
    }
    let mut tx = pool.begin().await?;
    let mut levels = Vec::with_capacity(takes.len());
    for (index, t) in takes.iter().enumerate() {
        match take_one(&mut tx, t).await? {
            Some(level) => levels.push(level),
            None => {
                let wait_us = wait_for(&mut tx, t).await?;
                tx.rollback().await?;
                return Ok(RateOutcome::Refused { index, wait_us });
            }
        }
    }
    tx.commit().await?;
    Ok(RateOutcome::Taken(levels))
}

/// Gives `amount` unused units back to a bucket (never above full: `max(tat, now)` caps it).
pub async fn give_back(
    pool: &AnyPool,
    scope: &str,
    kind: &str,
    limit: i64,
    amount: i64,
) -> Result<(), sqlx::Error> {
    let span = span_us(limit, amount);
    if span <= 0 {
        return Ok(());
    }
    sqlx::query("UPDATE rate_buckets SET tat_us = tat_us - $3 WHERE scope = $1 AND kind = $2")
        .bind(scope)
        .bind(kind)
        .bind(span)
        .execute(pool)
        .await?;
    Ok(())
}

/// Outcome of a budget reservation: what was spent or held before it, and whether it fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetCheck {
    pub committed_before: i64,
    pub held: bool,
}

async fn try_hold(
    pool: &AnyPool,
    hold_id: &str,
    customer_id: &str,
    period_start: i64,
    budget: i64,
    amount: i64,
) -> Result<Option<i64>, sqlx::Error> {
    let row = sqlx::query(&format!(
        "WITH spend AS ( \
             INSERT INTO customer_spend (customer_id, period_start, spent_nano_usd, held_nano_usd) \
             VALUES ($1, $2, 0, $3) \
             ON CONFLICT (customer_id, period_start) DO UPDATE \
             SET held_nano_usd = customer_spend.held_nano_usd + $3 \
             WHERE customer_spend.spent_nano_usd + customer_spend.held_nano_usd + $3 <= $4 \
             RETURNING spent_nano_usd + held_nano_usd AS committed), \
         hold AS ( \
             INSERT INTO budget_holds (id, customer_id, period_start, amount_nano_usd, expires_at) \
             SELECT $5, $1, $2, $3, {NOW_US} + $6 FROM spend) \
         SELECT committed FROM spend"
    ))
    .bind(customer_id)
    .bind(period_start)
    .bind(amount)
    .bind(budget)
    .bind(hold_id)
    .bind(HOLD_TTL_US)
    .fetch_optional(pool)
    .await?;
    row.map(|r| r.try_get::<i64, _>("committed")).transpose()
}

/// Deletes holds (`condition` on `budget_holds`, parameters from `$1`) and takes them off
/// their customers' `held_nano_usd`, in the caller's transaction. Returns how many went.
async fn drop_holds(
    conn: &mut AnyConnection,
    condition: &str,
    params: &[&str],
) -> Result<usize, sqlx::Error> {
    let sql = format!(
        "DELETE FROM budget_holds WHERE {condition} \
         RETURNING customer_id, period_start, amount_nano_usd"
    );
    let mut q = sqlx::query(&sql);
    for p in params {
        q = q.bind(*p);
    }
    let mut held: BTreeMap<(String, i64), i64> = BTreeMap::new();
    let rows = q.fetch_all(&mut *conn).await?;
    for row in &rows {
        *held
            .entry((row.try_get("customer_id")?, row.try_get("period_start")?))
            .or_default() += row.try_get::<i64, _>("amount_nano_usd")?;
    }
    let deltas: Vec<_> = held.into_iter().map(|((c, p), h)| (c, p, 0, -h)).collect();
    add_spend(conn, &deltas).await?;
    Ok(rows.len())
}

/// Adds `(customer, period_start, spent, held)` deltas to `customer_spend`.
async fn add_spend(
    conn: &mut AnyConnection,
    deltas: &[(String, i64, i64, i64)],
) -> Result<(), sqlx::Error> {
    for chunk in deltas.chunks(500) {
        let mut sql = String::from(
            "INSERT INTO customer_spend (customer_id, period_start, spent_nano_usd, held_nano_usd) VALUES ",
        );
        for i in 0..chunk.len() {
            if i > 0 {
                sql.push_str(", ");
            }
            let b = 4 * i;
            sql.push_str(&format!("(${}, ${}, ${}, ${})", b + 1, b + 2, b + 3, b + 4));
        }
        sql.push_str(
            " ON CONFLICT (customer_id, period_start) DO UPDATE \
             SET spent_nano_usd = customer_spend.spent_nano_usd + EXCLUDED.spent_nano_usd, \
                 held_nano_usd = customer_spend.held_nano_usd + EXCLUDED.held_nano_usd",
        );
        let mut q = sqlx::query(&sql);
        for (customer, period, spent, held) in chunk {
            q = q.bind(customer).bind(*period).bind(*spent).bind(*held);
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

/// Holds `amount` nano-USD of `customer_id`'s budget for period `period_start` under `hold_id`
/// (the request id) when `spent + held + amount <= budget`. The caller has checked
/// `amount <= budget`.
pub async fn hold_budget(
    pool: &AnyPool,
    hold_id: &str,
    customer_id: &str,
    period_start: i64,
    budget: i64,
    amount: i64,
) -> Result<BudgetCheck, sqlx::Error> {
    let held = |committed: i64| BudgetCheck {
        committed_before: committed - amount,
        held: true,
    };
    if let Some(committed) =
        try_hold(pool, hold_id, customer_id, period_start, budget, amount).await?
    {
        return Ok(held(committed));
    }
    // Refused: clear this customer's expired holds, if any, and try once more.
    let mut tx = pool.begin().await?;
    let expired = drop_holds(
        &mut tx,
        &format!("customer_id = $1 AND expires_at < {NOW_US}"),
        &[customer_id],
    )
    .await?;
    tx.commit().await?;
    if expired > 0 {
        if let Some(committed) =
            try_hold(pool, hold_id, customer_id, period_start, budget, amount).await?
        {
            return Ok(held(committed));
        }
    }
    let row = sqlx::query(
        "SELECT spent_nano_usd + held_nano_usd AS committed FROM customer_spend \
         WHERE customer_id = $1 AND period_start = $2",
    )
    .bind(customer_id)
    .bind(period_start)
    .fetch_optional(pool)
    .await?;
    Ok(BudgetCheck {
        committed_before: row
            .map(|r| r.try_get("committed"))
            .transpose()?
            .unwrap_or(0),
        held: false,
    })
}

/// Drops a hold whose request never reached a model (no record will follow).
pub async fn release_hold(pool: &AnyPool, hold_id: &str) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    drop_holds(&mut tx, "id = $1", &[hold_id]).await?;
    tx.commit().await?;
    Ok(())
}

/// Adds the cost of inserted records `(scope, started_at, cost)` to their month's
/// `customer_spend` row (SQLite keeps the table for the month totals alone).
pub(crate) async fn add_month_spend(
    conn: &mut AnyConnection,
    inserted: &[(String, i64, i64)],
) -> Result<(), sqlx::Error> {
    let mut spend: BTreeMap<(&str, i64), i64> = BTreeMap::new();
    for (customer, started_at, cost) in inserted {
        let (period_start, _) = crate::periods::month_bounds(*started_at);
        *spend.entry((customer.as_str(), period_start)).or_default() += cost;
    }
    let deltas: Vec<_> = spend
        .into_iter()
        .map(|((c, p), cost)| (c.to_string(), p, cost, 0))
        .collect();
    add_spend(conn, &deltas).await
}

/// Part of the ledger's insert transaction: adds the newly inserted records' costs to
/// `customer_spend` and drops the holds of every record in the batch (new or already there).
pub(crate) async fn settle_in_ledger(
    conn: &mut AnyConnection,
    inserted: &[(String, i64, i64)],
    ids: &[&str],
) -> Result<(), sqlx::Error> {
    add_month_spend(conn, inserted).await?;
    for chunk in ids.chunks(1000) {
        let params: Vec<String> = (1..=chunk.len()).map(|k| format!("${k}")).collect();
        drop_holds(conn, &format!("id IN ({})", params.join(", ")), chunk).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_bucket_admits_exactly_its_limit() {
        for limit in [1, 3, 7, 60, 999, 7000] {
            let span = span_us(limit, 1);
            assert!(span * limit <= WINDOW_US, "{limit}");
            assert!(span * (limit + 1) > WINDOW_US, "{limit}");
        }
    }

    #[test]
    fn remaining_counts_whole_units() {
        let l = RateLevel {
            limit: 3,
            tat_us: 1_000 + 40_000_000,
            now_us: 1_000,
        };
        assert_eq!(l.remaining(), 1);
        let full = RateLevel {
            limit: 3,
            tat_us: 0,
            now_us: 1_000,
        };
        assert_eq!(full.remaining(), 3);
    }
}

//! Service levels read from the ledger: per customer and service tier, how many requests, how
//! many failed (availability), and how their time to first token was distributed. Percentiles
//! come from a histogram of fixed TTFT buckets counted in SQL that SQLite and PostgreSQL run
//! alike (SQLite has no `percentile_cont`): a percentile is the upper bound of the bucket it
//! falls in (the largest TTFT seen, past the last bucket), never an interpolation. The count
//! under the operator's target is exact, whatever the buckets.

use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::Row;

use super::{kind_column, Store, StoreResult};
use crate::kinds::ServiceTier;

/// Upper bounds (inclusive, milliseconds) of the TTFT histogram's buckets.
pub const TTFT_BUCKETS_MS: [i64; 14] = [
    25, 50, 100, 150, 250, 400, 600, 1_000, 1_500, 2_500, 5_000, 10_000, 30_000, 60_000,
];

/// Which records a report covers: `started_at` in `[start, end)`.
#[derive(Debug, Clone, Default)]
pub struct SlaFilter {
    pub start: i64,
    pub end: i64,
    pub customer_id: Option<String>,
    pub model: Option<String>,
    /// TTFTs at or under it count as meeting the target.
    pub ttft_target_ms: i64,
}

/// One customer's requests at one tier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SlaRow {
    pub customer_id: String,
    pub service_tier: ServiceTier,
    pub requests: i64,
    /// Requests recorded `failed`.
    pub failed: i64,
    /// Requests with a TTFT (a first token reached the client).
    pub ttft_measured: i64,
    /// Of those, the ones whose TTFT was at or under the target.
    pub ttft_within_target: i64,
    /// Cumulative: `ttft_at_most[i]` requests had a TTFT ≤ `TTFT_BUCKETS_MS[i]`.
    pub ttft_at_most: Vec<i64>,
    pub ttft_max_ms: Option<i64>,
}

impl SlaRow {
    /// Share of requests not `failed` (1 with no requests).
    pub fn availability(&self) -> f64 {
        ratio(self.requests - self.failed, self.requests)
    }

    /// Share of measured TTFTs at or under the target (1 with none measured).
    pub fn within_target(&self) -> f64 {
        ratio(self.ttft_within_target, self.ttft_measured)
    }

    /// The TTFT that a share `q` of the measured requests stayed at or under: the upper bound
    /// of its histogram bucket, or the largest TTFT seen past the last bucket.
    pub fn ttft_quantile_ms(&self, q: f64) -> Option<i64> {
        if self.ttft_measured == 0 {
            return None;
        }
        // The rank of the q-th request, 1-based, in integers: ceil(q × n).
        let rank = ((q * self.ttft_measured as f64).ceil() as i64).clamp(1, self.ttft_measured);
        let bucket = self.ttft_at_most.iter().position(|&n| n >= rank);
        match bucket {
            Some(i) => TTFT_BUCKETS_MS
                .get(i)
                .copied()
                .map(|b| self.ttft_max_ms.map_or(b, |m| b.min(m))),
            None => self.ttft_max_ms,
        }
    }
}

fn ratio(part: i64, whole: i64) -> f64 {
    if whole == 0 {
        1.0
    } else {
        part as f64 / whole as f64
    }
}

fn sla_row(row: &AnyRow) -> StoreResult<SlaRow> {
    let count =
        |name: &str| -> StoreResult<i64> { Ok(row.try_get::<Option<i64>, _>(name)?.unwrap_or(0)) };
    Ok(SlaRow {
        customer_id: row.try_get("customer_id")?,
        service_tier: kind_column(row, "service_tier")?,
        requests: count("requests")?,
        failed: count("failed")?,
        ttft_measured: count("ttft_measured")?,
        ttft_within_target: count("ttft_within_target")?,
        ttft_at_most: (0..TTFT_BUCKETS_MS.len())
            .map(|i| count(&format!("le_{i}")))
            .collect::<StoreResult<_>>()?,
        ttft_max_ms: row.try_get("ttft_max_ms")?,
    })
}

impl Store {
    /// The service levels of the records in `filter`, one row per customer and tier.
    pub async fn sla(&self, filter: &SlaFilter) -> StoreResult<Vec<SlaRow>> {
        let mut sql = String::from(
            "SELECT customer_id, service_tier, CAST(COUNT(*) AS BIGINT) AS requests, \
             CAST(SUM(CASE WHEN status = 'failed' THEN 1 ELSE 0 END) AS BIGINT) AS failed, \
             CAST(COUNT(ttft_ms) AS BIGINT) AS ttft_measured, \
             CAST(SUM(CASE WHEN ttft_ms <= $3 THEN 1 ELSE 0 END) AS BIGINT) \
             AS ttft_within_target, CAST(MAX(ttft_ms) AS BIGINT) AS ttft_max_ms",
        );
        for (i, bound) in TTFT_BUCKETS_MS.iter().enumerate() {
            sql.push_str(&format!(
                ", CAST(SUM(CASE WHEN ttft_ms <= {bound} THEN 1 ELSE 0 END) AS BIGINT) AS le_{i}"
            ));
        }
        sql.push_str(" FROM usage_records WHERE started_at >= $1 AND started_at < $2");
        let mut next = 4;
        if filter.customer_id.is_some() {
            sql.push_str(&format!(" AND customer_id = ${next}"));
            next += 1;
        }
        if filter.model.is_some() {
            sql.push_str(&format!(" AND model = ${next}"));
        }
        sql.push_str(" GROUP BY customer_id, service_tier ORDER BY customer_id, service_tier");
        let mut q = sqlx::query(&sql)
            .bind(filter.start)
            .bind(filter.end)
            .bind(filter.ttft_target_ms);
        if let Some(c) = &filter.customer_id {
            q = q.bind(c);
        }
        if let Some(m) = &filter.model {
            q = q.bind(m);
        }
        let rows = q.fetch_all(self.pool()).await?;
        rows.iter().map(sla_row).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(ttfts: &[i64]) -> SlaRow {
        SlaRow {
            customer_id: "c".into(),
            service_tier: ServiceTier::Priority,
            requests: ttfts.len() as i64,
            failed: 0,
            ttft_measured: ttfts.len() as i64,
            ttft_within_target: 0,
            ttft_at_most: TTFT_BUCKETS_MS
                .iter()
                .map(|b| ttfts.iter().filter(|t| *t <= b).count() as i64)
                .collect(),
            ttft_max_ms: ttfts.iter().copied().max(),
        }
    }

    /// A percentile is its bucket's upper bound, capped by the largest TTFT seen, and the
    /// largest TTFT past the last bucket.
    #[test]
    fn percentiles_are_bucket_bounds() {
        let mut ttfts = vec![30; 98];
        ttfts.extend([700, 90_000]);
        let r = row(&ttfts);
        assert_eq!(r.ttft_quantile_ms(0.5), Some(50));
        assert_eq!(r.ttft_quantile_ms(0.98), Some(50));
        assert_eq!(r.ttft_quantile_ms(0.99), Some(1_000));
        assert_eq!(r.ttft_quantile_ms(1.0), Some(90_000));
        assert_eq!(row(&[7]).ttft_quantile_ms(0.99), Some(7));
        assert_eq!(row(&[]).ttft_quantile_ms(0.5), None);
    }
}

//! Rate limits (requests and tokens per minute, per key and per customer) and budgets (per
//! customer and UTC month): held in this process, or, when replicas share a PostgreSQL
//! database, kept there (`shared_limits`) and exact across replicas. While that database cannot
//! be reached, each replica enforces them on its own (degraded: up to N× across N replicas).
//!
//! Rate limits are token buckets that refill continuously (a limit of N per minute holds N and
//! refills N/60 per second). A request takes one request and reserves its maximum tokens
//! (prompt + `max_tokens`) up front; when it ends, the unused part of the token reservation is
//! given back.
//!
//! Budgets: a request reserves its maximum cost before it runs and settles on its actual cost
//! after. A request is refused when spent + reserved + its own maximum would pass the budget,
//! so concurrent requests can never overshoot (each one's actual cost is at most what it
//! reserved). The month's spending is read from the ledger the first time a customer is seen in
//! a month and then kept current in memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The buckets' clock: tokio's, so tests pause and advance it instead of waiting for a refill.
use tokio::time::Instant as BucketClock;

use crate::clock::Clock;
use crate::kinds::BudgetScope;
use crate::shared_limits::{self, RateOutcome, RateTake};
use crate::store::{Store, StoreError};

mod budget;

pub use budget::BudgetHold;
use budget::BudgetState;

/// Per-minute limits that apply to one request (key and customer levels).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    pub key_id: String,
    pub customer_id: String,
    pub key_rpm: Option<i64>,
    pub key_tpm: Option<i64>,
    pub customer_rpm: Option<i64>,
    pub customer_tpm: Option<i64>,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// A per-minute limit; retry after the given time.
    Rate {
        message: String,
        /// `requests` or `tokens`.
        unit: &'static str,
        retry_after: Duration,
    },
    /// The customer's budget for the period; retry when the period resets.
    Quota {
        message: String,
        retry_after: Duration,
    },
}

/// Why a budget could not be reserved: it refuses the request, or the ledger it is read from
/// cannot be reached (then nobody knows whether it would).
#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    #[error("the budget refuses the request")]
    Refused(Refusal),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<Refusal> for BudgetError {
    fn from(r: Refusal) -> Self {
        Self::Refused(r)
    }
}

/// What the `x-ratelimit-*` headers report: the tightest limit of each kind.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RateStatus {
    pub requests: Option<BucketStatus>,
    pub tokens: Option<BucketStatus>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketStatus {
    pub limit: i64,
    pub remaining: i64,
    /// Until the bucket is full again.
    pub reset: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Requests,
    Tokens,
}

#[derive(Debug)]
struct Bucket {
    limit: f64,
    level: f64,
    updated: BucketClock,
}

impl Bucket {
    fn refill(&mut self, limit: i64, now: BucketClock) {
        let limit = limit as f64;
        if (limit - self.limit).abs() > f64::EPSILON {
            // The limit changed: keep what was used.
            let used = self.limit - self.level;
            self.limit = limit;
            self.level = (limit - used).max(0.0);
        }
        let secs = now.saturating_duration_since(self.updated).as_secs_f64();
        self.level = (self.level + secs * self.limit / 60.0).min(self.limit);
        self.updated = now;
    }

    fn time_until(&self, amount: f64) -> Duration {
        if self.level >= amount || self.limit <= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64((amount - self.level) * 60.0 / self.limit)
    }

    fn status(&self) -> BucketStatus {
        BucketStatus {
            limit: self.limit as i64,
            remaining: self.level.floor().max(0.0) as i64,
            reset: self.time_until(self.limit),
        }
    }
}

/// Token reservation to settle when the request ends.
#[derive(Debug, Clone)]
pub struct TokenHold {
    limits: Limits,
    tokens: i64,
    /// Taken from the shared database's buckets.
    shared: bool,
}

/// Limiter state: in this process, or shared by every replica through the database.
#[derive(Clone, Default)]
pub struct Limiter {
    /// The buckets; with a shared store, a mirror of the database's last answer (for headers)
    /// and the fallback while the database is unreachable.
    buckets: Arc<Mutex<HashMap<(String, Kind), Bucket>>>,
    budgets: Arc<Mutex<HashMap<BudgetScope, BudgetState>>>,
    /// PostgreSQL shared with the other replicas (see `shared_limits`).
    shared: Option<Store>,
    /// Which budget month it is.
    clock: Clock,
}

fn scopes(limits: &Limits, kind: Kind) -> Vec<(String, i64, &'static str)> {
    let (key, customer) = match kind {
        Kind::Requests => (limits.key_rpm, limits.customer_rpm),
        Kind::Tokens => (limits.key_tpm, limits.customer_tpm),
    };
    let mut out = Vec::new();
    if let Some(l) = key {
        out.push((format!("key:{}", limits.key_id), l, "key"));
    }
    if let Some(l) = customer {
        out.push((format!("customer:{}", limits.customer_id), l, "customer"));
    }
    out
}

impl Kind {
    fn unit(self) -> &'static str {
        match self {
            Kind::Requests => "requests",
            Kind::Tokens => "tokens",
        }
    }
}

fn rate_refusal(level_name: &str, limit: i64, kind: Kind, wait: Duration) -> Refusal {
    let unit = kind.unit();
    Refusal::Rate {
        message: format!(
            "rate limit reached: {level_name} limit of {limit} {unit} per minute; retry in {:.1}s",
            wait.as_secs_f64()
        ),
        unit,
        retry_after: wait,
    }
}

/// A request bigger than a whole bucket can never pass.
fn check_fits(
    scopes: &[(String, i64, &'static str)],
    kind: Kind,
    amount: i64,
) -> Result<(), Refusal> {
    let unit = kind.unit();
    for (_, limit, level_name) in scopes {
        if amount > *limit {
            return Err(Refusal::Rate {
                message: format!(
                    "this request needs {amount} {unit}, more than the {level_name} limit of {limit} {unit} per minute; lower max_tokens or the prompt"
                ),
                unit,
                retry_after: Duration::from_secs(60),
            });
        }
    }
    Ok(())
}

/// Logs a database failure of the shared limits (at most every few seconds) before falling
/// back to this process's own accounting.
fn warn_fallback(e: &sqlx::Error) {
    static LAST: Mutex<Option<Instant>> = Mutex::new(None);
    let mut last = LAST
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if last.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
        *last = Some(Instant::now());
        tracing::warn!("shared limits unavailable ({e}); enforcing them in this replica alone until the database answers");
    }
}

impl Limiter {
    /// Limits and budgets kept in `store` (PostgreSQL), shared with every replica using it.
    pub fn shared(store: Store) -> Self {
        Self {
            shared: Some(store),
            ..Self::default()
        }
    }

    /// Budgets whose month is read from `clock` (tests move it across a month's end).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    fn take_local(&self, limits: &Limits, kind: Kind, amount: i64) -> Result<(), Refusal> {
        let now = BucketClock::now();
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let scopes = scopes(limits, kind);
        check_fits(&scopes, kind, amount)?;
        for (scope, limit, level_name) in &scopes {
            let b = buckets.entry((scope.clone(), kind)).or_insert(Bucket {
                limit: *limit as f64,
                level: *limit as f64,
                updated: now,
            });
            b.refill(*limit, now);
            if b.level < amount as f64 {
                return Err(rate_refusal(
                    level_name,
                    *limit,
                    kind,
                    b.time_until(amount as f64),
                ));
            }
        }
        for (scope, _, _) in &scopes {
            if let Some(b) = buckets.get_mut(&(scope.clone(), kind)) {
                b.level -= amount as f64;
            }
        }
        Ok(())
    }

    /// Takes from the shared buckets; `Ok(false)` when the database could not be asked.
    async fn take_shared(
        &self,
        store: &Store,
        limits: &Limits,
        kind: Kind,
        amount: i64,
    ) -> Result<bool, Refusal> {
        let scopes = scopes(limits, kind);
        if scopes.is_empty() {
            return Ok(true);
        }
        check_fits(&scopes, kind, amount)?;
        let takes: Vec<RateTake> = scopes
            .iter()
            .map(|(scope, limit, _)| RateTake {
                scope: scope.clone(),
                kind: kind.unit(),
                limit: *limit,
                amount,
            })
            .collect();
        if store.is_down() {
            return Ok(false);
        }
        let taken = shared_limits::take(store.pool(), &takes).await;
        store.observe(&taken);
        match taken {
            Ok(RateOutcome::Taken(levels)) => {
                let now = BucketClock::now();
                let mut buckets = self
                    .buckets
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                for ((scope, limit, _), level) in scopes.iter().zip(levels) {
                    buckets.insert(
                        (scope.clone(), kind),
                        Bucket {
                            limit: *limit as f64,
                            level: level.remaining() as f64,
                            updated: now,
                        },
                    );
                }
                Ok(true)
            }
            Ok(RateOutcome::Refused { index, wait_us }) => {
                let (_, limit, level_name) = &scopes[index];
                let wait = Duration::from_micros(wait_us.max(0) as u64);
                Err(rate_refusal(level_name, *limit, kind, wait))
            }
            Err(e) => {
                warn_fallback(&e);
                Ok(false)
            }
        }
    }

    async fn take(&self, limits: &Limits, kind: Kind, amount: i64) -> Result<bool, Refusal> {
        if let Some(store) = &self.shared {
            if self.take_shared(store, limits, kind, amount).await? {
                return Ok(true);
            }
        }
        self.take_local(limits, kind, amount)?;
        Ok(false)
    }

    /// Takes one request from the request buckets.
    pub async fn admit_request(&self, limits: &Limits) -> Result<(), Refusal> {
        self.take(limits, Kind::Requests, 1).await.map(|_| ())
    }

    /// Reserves `tokens` from the token buckets.
    pub async fn reserve_tokens(&self, limits: &Limits, tokens: i64) -> Result<TokenHold, Refusal> {
        let shared = self.take(limits, Kind::Tokens, tokens).await?;
        Ok(TokenHold {
            limits: limits.clone(),
            tokens,
            shared,
        })
    }

    /// Gives back the unused part of a token reservation.
    pub fn settle_tokens(&self, hold: &TokenHold, used: i64) {
        let unused = (hold.tokens - used).max(0);
        if unused == 0 {
            return;
        }
        let scopes = scopes(&hold.limits, Kind::Tokens);
        {
            let mut buckets = self
                .buckets
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for (scope, _, _) in &scopes {
                if let Some(b) = buckets.get_mut(&(scope.clone(), Kind::Tokens)) {
                    b.level = (b.level + unused as f64).min(b.limit);
                }
            }
        }
        if let (true, Some(store)) = (hold.shared, &self.shared) {
            // A settlement can happen in `Drop`, on any thread: the store runs it on its own
            // runtime and waits for it at shutdown.
            let store2 = store.clone();
            store.spawn_background(async move {
                let store = store2;
                for (scope, limit, _) in scopes {
                    let r = shared_limits::give_back(store.pool(), &scope, "tokens", limit, unused);
                    if let Err(e) = r.await {
                        tracing::warn!("cannot give {unused} unused tokens back to {scope}: {e}");
                    }
                }
            });
        }
    }
    /// The tightest request and token limits for the headers.
    pub fn status(&self, limits: &Limits) -> RateStatus {
        let now = BucketClock::now();
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut tightest = |kind: Kind| -> Option<BucketStatus> {
            let mut best: Option<BucketStatus> = None;
            for (scope, limit, _) in scopes(limits, kind) {
                let b = buckets.entry((scope, kind)).or_insert(Bucket {
                    limit: limit as f64,
                    level: limit as f64,
                    updated: now,
                });
                b.refill(limit, now);
                let s = b.status();
                if best.is_none_or(|x| s.remaining < x.remaining) {
                    best = Some(s);
                }
            }
            best
        };
        RateStatus {
            requests: tightest(Kind::Requests),
            tokens: tightest(Kind::Tokens),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn limits(rpm: Option<i64>, tpm: Option<i64>) -> Limits {
        Limits {
            key_id: "k".into(),
            customer_id: "c".into(),
            key_rpm: rpm,
            key_tpm: None,
            customer_rpm: None,
            customer_tpm: tpm,
        }
    }

    #[tokio::test]
    async fn request_bucket_refuses_past_the_limit() {
        let l = Limiter::default();
        let lim = limits(Some(3), None);
        for _ in 0..3 {
            l.admit_request(&lim).await.unwrap();
        }
        match l.admit_request(&lim).await {
            Err(Refusal::Rate { retry_after, .. }) => {
                // One request refills in 20 s at 3/min.
                assert!(
                    retry_after > Duration::from_secs(19) && retry_after <= Duration::from_secs(20)
                );
            }
            other => panic!("expected a rate refusal, got {other:?}"),
        }
        let s = l.status(&lim);
        assert_eq!(s.requests.unwrap().limit, 3);
        assert_eq!(s.requests.unwrap().remaining, 0);
        assert!(s.tokens.is_none());
    }

    /// Buckets refill at the limit per minute, continuously: measured on tokio's paused clock,
    /// not by waiting.
    #[tokio::test(start_paused = true)]
    async fn buckets_refill_at_the_limit_per_minute() {
        let l = Limiter::default();
        let lim = limits(Some(3), None);
        for _ in 0..3 {
            l.admit_request(&lim).await.unwrap();
        }
        assert!(l.admit_request(&lim).await.is_err());
        tokio::time::advance(Duration::from_secs(19)).await;
        assert!(
            l.admit_request(&lim).await.is_err(),
            "19 s refill less than one"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        l.admit_request(&lim).await.unwrap();
        assert!(
            l.admit_request(&lim).await.is_err(),
            "one, then empty again"
        );
        // Never past the limit, however long it rests.
        tokio::time::advance(Duration::from_secs(3_600)).await;
        assert_eq!(l.status(&lim).requests.unwrap().remaining, 3);
        let tokens = limits(None, Some(600));
        l.reserve_tokens(&tokens, 600).await.unwrap();
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(l.status(&tokens).tokens.unwrap().remaining, 300);
    }

    #[tokio::test]
    async fn token_reservations_are_settled_back() {
        let l = Limiter::default();
        let lim = limits(None, Some(1000));
        let hold = l.reserve_tokens(&lim, 800).await.unwrap();
        assert!(l.reserve_tokens(&lim, 300).await.is_err());
        l.settle_tokens(&hold, 100);
        let s = l.status(&lim).tokens.unwrap();
        assert!((899..=901).contains(&s.remaining), "{s:?}");
        assert!(l.reserve_tokens(&lim, 300).await.is_ok());
        // More than the whole limit can never pass.
        assert!(matches!(
            l.reserve_tokens(&lim, 1001).await,
            Err(Refusal::Rate { .. })
        ));
    }

    #[tokio::test]
    async fn key_budgets_hold_beside_the_customer_budget() {
        let l = Limiter::default();
        let now = Utc::now().timestamp_micros();
        // Customer budget 1000, key budget 500.
        let both =
            |amount| l.reserve_budgets(None, "r", ("c", Some(1000)), ("k", Some(500)), amount);
        let h = both(400).await.unwrap().unwrap();
        // The key's 100 left refuses 200, naming the key's budget, and gives the customer's
        // reservation back.
        let Err(BudgetError::Refused(Refusal::Quota { message, .. })) = both(200).await else {
            panic!("the key budget must refuse")
        };
        assert!(message.contains("monthly budget of key k"), "{message}");
        // Another key of the customer still has the customer's 600.
        let other = l
            .reserve_budgets(None, "r2", ("c", Some(1000)), ("k2", None), 600)
            .await
            .unwrap()
            .unwrap();
        l.settle_spend(Some(&other), "c", "k2", now, 600);
        // Settled at 350: the key has 150 left, the customer 1000 - 600 - 350 = 50.
        l.settle_spend(Some(&h), "c", "k", now, 350);
        let Err(BudgetError::Refused(Refusal::Quota { message, .. })) = both(60).await else {
            panic!("the customer budget must refuse")
        };
        assert!(message.contains("USD monthly budget is"), "{message}");
        assert!(both(50).await.is_ok());
        // A key budget alone (its customer has none).
        let only = |amount| l.reserve_budgets(None, "r3", ("d", None), ("kd", Some(100)), amount);
        let h = only(100).await.unwrap().unwrap();
        assert!(matches!(only(1).await, Err(BudgetError::Refused(_))));
        l.release_budget(&h);
        assert!(only(100).await.is_ok());
        assert!(l
            .reserve_budgets(None, "r4", ("e", None), ("ke", None), 5)
            .await
            .unwrap()
            .is_none());
    }

    /// A budget is per UTC month by the limiter's clock: a second before the month ends, the
    /// spent budget refuses and says to retry in that second; once the clock crosses into the
    /// next month the whole budget is there again, and a hold taken in the old month and settled
    /// in the new one counts in neither.
    #[tokio::test]
    async fn a_budget_starts_again_when_the_clock_crosses_into_the_next_month() {
        use chrono::TimeZone;
        let last_second = Utc
            .with_ymd_and_hms(2026, 11, 30, 23, 59, 59)
            .unwrap()
            .timestamp_micros();
        let clock = crate::clock::Clock::manual_at(last_second);
        let l = Limiter::default().with_clock(clock.clone());
        let both = |id: &'static str, amount| {
            l.reserve_budgets(None, id, ("c", Some(2000)), ("k", Some(800)), amount)
        };
        let spent = both("r1", 600).await.unwrap().unwrap();
        l.settle_spend(Some(&spent), "c", "k", last_second, 600);
        let late = both("r2", 200).await.unwrap().unwrap();
        let Err(BudgetError::Refused(Refusal::Quota {
            message,
            retry_after,
        })) = both("r3", 300).await
        else {
            panic!("the month's budget must refuse")
        };
        assert!(message.contains("monthly budget of key k"), "{message}");
        assert_eq!(
            retry_after,
            Duration::from_secs(1),
            "the month ends in a second"
        );

        clock.advance(Duration::from_secs(1));
        // December: settling November's hold changes nothing now.
        l.settle_spend(Some(&late), "c", "k", last_second, 200);
        let december = both("r4", 800).await.unwrap().unwrap();
        assert!(
            matches!(both("r5", 1).await, Err(BudgetError::Refused(_))),
            "the key's 800 is held"
        );
        l.release_budget(&december);
        let customer = l
            .reserve_budgets(None, "r6", ("c", Some(2000)), ("k2", None), 2000)
            .await
            .unwrap();
        assert!(customer.is_some(), "the customer's whole 2000");
    }

    #[tokio::test]
    async fn budget_never_overshoots_with_reservations() {
        let l = Limiter::default();
        let h1 = l.reserve_budget(None, "r", "c", 1000, 600).await.unwrap();
        assert!(matches!(
            l.reserve_budget(None, "r", "c", 1000, 600).await,
            Err(BudgetError::Refused(Refusal::Quota { .. }))
        ));
        l.settle_budget(&h1, 100);
        let h2 = l.reserve_budget(None, "r", "c", 1000, 600).await.unwrap();
        l.settle_budget(&h2, 600);
        // 700 spent: 300 left.
        assert!(l
            .reserve_budget(None, "r", "c", 1000, 301)
            .await
            .is_err_and(|e| matches!(e, BudgetError::Refused(_))));
        assert!(l.reserve_budget(None, "r", "c", 1000, 300).await.is_ok());
    }
}

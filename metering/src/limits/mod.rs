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
mod reservation;

pub use budget::BudgetHold;
use budget::BudgetState;
pub use reservation::{Claim, ReservationMeter};

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

/// A count of requests or tokens as a bucket level: exact, since per-minute limits and the
/// amounts taken stay far below 2^53.
fn as_level(count: i64) -> f64 {
    count as f64
}

/// A bucket level (within `[0, limit]`, an `i64` limit) back as a whole count.
fn as_count(level: f64) -> i64 {
    level as i64
}

#[derive(Debug)]
struct Bucket {
    limit: f64,
    level: f64,
    updated: BucketClock,
}

impl Bucket {
    fn refill(&mut self, limit: i64, now: BucketClock) {
        let limit = as_level(limit);
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
            limit: as_count(self.limit),
            remaining: as_count(self.level.floor().max(0.0)),
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
pub(crate) fn warn_fallback(e: &sqlx::Error) {
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
                limit: as_level(*limit),
                level: as_level(*limit),
                updated: now,
            });
            b.refill(*limit, now);
            if b.level < as_level(amount) {
                return Err(rate_refusal(
                    level_name,
                    *limit,
                    kind,
                    b.time_until(as_level(amount)),
                ));
            }
        }
        for (scope, _, _) in &scopes {
            if let Some(b) = buckets.get_mut(&(scope.clone(), kind)) {
                b.level -= as_level(amount);
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
                            limit: as_level(*limit),
                            level: as_level(level.remaining()),
                            updated: now,
                        },
                    );
                }
                Ok(true)
            }
            Ok(RateOutcome::Refused { index, wait_us }) => {
                let (_, limit, level_name) = &scopes[index];
                let wait = Duration::from_micros(u64::try_from(wait_us).unwrap_or(0));
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
                    b.level = (b.level + as_level(unused)).min(b.limit);
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
                    limit: as_level(limit),
                    level: as_level(limit),
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
mod tests;

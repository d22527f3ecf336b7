//! What a request may spend of its customer's reservation on a model: the reserved tokens per
//! minute, counted in fixed UTC minutes (a window that starts empty at each minute, exact in
//! integers, one map lookup under a short lock). A request that fits runs at `priority` and is
//! not billed per token; one that does not takes nothing from the reservation and runs at the
//! tier it asked for. The reservations come from the store (`Store::reservations`), replaced
//! whole when they change; time is an input, so tests need no clock.
//!
//! Replicas on one PostgreSQL database share the count ([`ReservationMeter::shared`]): a
//! reservation is then a bucket of the shared rate limits (`shared_limits`, scope
//! `reservation:<customer>/<model>`), which holds the reserved tokens per minute in a minute
//! that slides rather than starts at each UTC minute, exact across replicas. While the database
//! cannot be asked, each replica counts alone, as the rate limits do.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::shared_limits::{self, RateOutcome, RateTake};
use crate::store::{Reservation, Store};

const MINUTE_MICROS: i64 = 60_000_000;

/// One (customer, model)'s reservation and what this minute has used of it.
#[derive(Debug, Clone, Copy, Default)]
struct Window {
    /// Tokens per minute reserved now (the sum of the customer's active reservations).
    reserved: i64,
    /// The minute `used` counts (Unix minutes).
    minute: i64,
    used: i64,
}

/// The reserved capacity of every (customer, model), and the current minute's use of it.
#[derive(Debug, Default)]
pub struct ReservationMeter {
    // A std Mutex: a lookup and an addition, never held across an await.
    windows: Mutex<HashMap<(String, String), Window>>,
    /// PostgreSQL shared with the other replicas: the count is kept there.
    shared: Option<Store>,
}

/// What a request took of a reservation, and where it was counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    pub tokens: i64,
    /// In the shared database (else in this process).
    shared: bool,
}

/// The shared bucket of a customer's reservation on a model.
fn scope(customer_id: &str, model: &str) -> String {
    format!("reservation:{customer_id}/{model}")
}

impl ReservationMeter {
    pub fn new() -> Self {
        Self::default()
    }

    /// A meter whose count is kept in `store` (PostgreSQL), shared with every replica on it.
    pub fn shared(store: Store) -> Self {
        Self {
            shared: Some(store),
            ..Self::default()
        }
    }

    /// Takes `tokens` of the customer's reservation on `model` at `at` when they all fit (in
    /// the shared count when there is one and it answers, else in this process's).
    pub async fn claim(
        &self,
        customer_id: &str,
        model: &str,
        tokens: i64,
        at: i64,
    ) -> Option<Claim> {
        if let Some(store) = &self.shared {
            let limit = self.reserved(customer_id, model);
            if limit <= 0 || !(0..=limit).contains(&tokens) {
                return None;
            }
            let take = RateTake {
                scope: scope(customer_id, model),
                kind: "tokens",
                limit,
                amount: tokens,
            };
            match shared_limits::take(store.pool(), &[take]).await {
                Ok(RateOutcome::Taken(_)) => {
                    return Some(Claim {
                        tokens,
                        shared: true,
                    })
                }
                Ok(RateOutcome::Refused { .. }) => return None,
                Err(e) => super::warn_fallback(&e),
            }
        }
        self.take(customer_id, model, tokens, at).then_some(Claim {
            tokens,
            shared: false,
        })
    }

    /// Gives back what `claim` took but the request did not use (`used` of it).
    pub fn release(&self, customer_id: &str, model: &str, claim: Claim, used: i64, at: i64) {
        let (Some(store), true) = (&self.shared, claim.shared) else {
            self.settle(customer_id, model, claim.tokens, used, at);
            return;
        };
        let unused = (claim.tokens - used).max(0);
        let limit = self.reserved(customer_id, model);
        if unused == 0 || limit <= 0 {
            return;
        }
        let scope = scope(customer_id, model);
        let pool = store.pool().clone();
        // A release can happen in `Drop`, on any thread: the store runs it on its own runtime.
        store.spawn_background(async move {
            let r = shared_limits::give_back(&pool, &scope, "tokens", limit, unused).await;
            if let Err(e) = r {
                tracing::warn!("cannot give {unused} unused tokens back to {scope}: {e}");
            }
        });
    }

    /// Replaces the reservations with those active at `at` (micros) among `reservations`,
    /// keeping the current minute's use of the ones that stay.
    pub fn replace(&self, reservations: &[Reservation], at: i64) {
        let mut reserved: HashMap<(String, String), i64> = HashMap::new();
        for r in reservations.iter().filter(|r| r.active_at(at)) {
            let tpm = reserved
                .entry((r.customer_id.clone(), r.model.clone()))
                .or_default();
            *tpm = tpm.saturating_add(r.reserved_tokens_per_minute);
        }
        let mut windows = self.lock();
        windows.retain(|k, _| reserved.contains_key(k));
        for (k, tpm) in reserved {
            windows.entry(k).or_default().reserved = tpm;
        }
    }

    /// Takes `tokens` of the customer's reservation on `model` for the minute of `at` when they
    /// all fit; otherwise takes nothing and says no.
    pub fn take(&self, customer_id: &str, model: &str, tokens: i64, at: i64) -> bool {
        let minute = at.div_euclid(MINUTE_MICROS);
        let mut windows = self.lock();
        let Some(w) = windows.get_mut(&(customer_id.to_string(), model.to_string())) else {
            return false;
        };
        if w.minute != minute {
            w.minute = minute;
            w.used = 0;
        }
        if tokens < 0 || w.used.saturating_add(tokens) > w.reserved {
            return false;
        }
        w.used += tokens;
        true
    }

    /// Gives back what a request took (`taken`) but did not use (`used`), while its minute
    /// lasts: a request reserves its maximum and settles on its actual count.
    pub fn settle(&self, customer_id: &str, model: &str, taken: i64, used: i64, at: i64) {
        let minute = at.div_euclid(MINUTE_MICROS);
        let mut windows = self.lock();
        if let Some(w) = windows.get_mut(&(customer_id.to_string(), model.to_string())) {
            if w.minute == minute {
                w.used = (w.used - (taken - used).max(0)).max(0);
            }
        }
    }

    /// Tokens per minute reserved for the customer on `model` now (0: none).
    pub fn reserved(&self, customer_id: &str, model: &str) -> i64 {
        self.lock()
            .get(&(customer_id.to_string(), model.to_string()))
            .map_or(0, |w| w.reserved)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Window>> {
        // A poisoned lock only means another thread panicked mid-update of plain integers.
        self.windows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reservation(customer: &str, tpm: i64, starts_at: i64, ends_at: Option<i64>) -> Reservation {
        Reservation {
            id: format!("rsv_{customer}_{tpm}"),
            customer_id: customer.into(),
            model: "m".into(),
            reserved_tokens_per_minute: tpm,
            price_per_ktpm_month: rust_decimal::Decimal::ZERO,
            starts_at,
            ends_at,
            created_at: 0,
        }
    }

    const T0: i64 = 1_000 * MINUTE_MICROS;

    /// A minute holds exactly its reserved tokens; the next minute starts empty.
    #[test]
    fn a_minute_holds_exactly_the_reservation() {
        let meter = ReservationMeter::new();
        meter.replace(&[reservation("acme", 1_000, 0, None)], T0);
        assert!(meter.take("acme", "m", 600, T0));
        assert!(!meter.take("acme", "m", 401, T0 + 1), "601 + 400 > 1000");
        assert!(meter.take("acme", "m", 400, T0 + MINUTE_MICROS - 1));
        assert!(!meter.take("acme", "m", 1, T0 + MINUTE_MICROS - 1));
        assert!(meter.take("acme", "m", 1_000, T0 + MINUTE_MICROS));
        assert!(!meter.take("acme", "m", 1_001, T0 + 2 * MINUTE_MICROS));
        assert!(
            !meter.take("beta", "m", 1, T0),
            "no reservation, nothing fits"
        );
        assert!(!meter.take("acme", "other", 1, T0));
    }

    /// What a request took and did not use is given back within its minute, never after.
    #[test]
    fn unused_tokens_come_back_within_the_minute() {
        let meter = ReservationMeter::new();
        meter.replace(&[reservation("acme", 100, 0, None)], T0);
        assert!(meter.take("acme", "m", 100, T0));
        meter.settle("acme", "m", 100, 30, T0 + 5);
        assert!(meter.take("acme", "m", 70, T0 + 6));
        assert!(!meter.take("acme", "m", 1, T0 + 7));
        meter.settle("acme", "m", 70, 0, T0 + MINUTE_MICROS);
        assert!(meter.take("acme", "m", 100, T0 + MINUTE_MICROS));
    }

    /// Only reservations active at the moment count; a customer's several add up; replacing
    /// keeps this minute's use.
    #[test]
    fn active_reservations_add_up() {
        let meter = ReservationMeter::new();
        let held = [
            reservation("acme", 100, 0, None),
            reservation("acme", 50, 0, Some(T0 + MINUTE_MICROS)),
            reservation("acme", 1_000, T0 + 10 * MINUTE_MICROS, None),
        ];
        meter.replace(&held, T0);
        assert_eq!(meter.reserved("acme", "m"), 150);
        assert!(meter.take("acme", "m", 150, T0));
        meter.replace(&held, T0 + 1);
        assert!(
            !meter.take("acme", "m", 1, T0 + 2),
            "the minute's use is kept"
        );
        meter.replace(&held, T0 + MINUTE_MICROS);
        assert_eq!(meter.reserved("acme", "m"), 100);
        meter.replace(&[], T0);
        assert_eq!(meter.reserved("acme", "m"), 0);
    }
}

//! Per-customer caps on concurrent sequences of a model (`max_sequences_per_customer` in
//! models.toml): a request whose choices would take a customer over the cap is refused with 429
//! at once, before any work is queued. The slots are held by the request's accounting guard
//! and given back when it ends, however it ends.
//!
//! Also the caps on a customer's and a key's requests in flight at once
//! (`max_concurrent_requests`, set through the admin API like rpm/tpm): [`InFlightRequests`]
//! counts every billed request from admission until its accounting guard settles it, whatever
//! the model, and refuses one beyond either cap with 429 and `Retry-After` at once.
//!
//! Per process: with several gateway replicas each enforces the caps on what it serves.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::ApiError;

type Key = (String, String);

/// Sequences in flight per (customer, model).
#[derive(Debug, Default)]
pub struct InFlight {
    /// A std mutex: held for one map update, never across an `.await`.
    counts: Mutex<HashMap<Key, usize>>,
}

/// Slots taken by one request; given back on drop.
#[derive(Debug)]
pub struct Slots {
    owner: Arc<InFlight>,
    key: Key,
    n: usize,
}

impl InFlight {
    /// Takes `n` slots of `customer` on `model` if that stays within `limit`.
    pub fn acquire(
        self: &Arc<Self>,
        customer: &str,
        model: &str,
        n: usize,
        limit: u32,
    ) -> Result<Slots, ApiError> {
        let key = (customer.to_string(), model.to_string());
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let running = counts.get(&key).copied().unwrap_or(0);
        if running + n > limit as usize {
            return Err(ApiError::RateLimited {
                message: format!(
                    "customer `{customer}` has {running} sequences running on model `{model}`; this request needs {n} more and the limit is {limit}. Retry when one finishes."
                ),
                unit: "requests",
                retry_after_secs: 1,
            });
        }
        counts.insert(key.clone(), running + n);
        Ok(Slots {
            owner: self.clone(),
            key,
            n,
        })
    }

    /// Sequences `customer` has running on `model`.
    pub fn running(&self, customer: &str, model: &str) -> usize {
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts
            .get(&(customer.to_string(), model.to_string()))
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for Slots {
    fn drop(&mut self) {
        let mut counts = self.owner.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = counts.get_mut(&self.key) {
            *c = c.saturating_sub(self.n);
            if *c == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// How long a client refused for concurrency is told to wait: a slot frees when any of its
/// requests finishes, so soon.
pub const CONCURRENCY_RETRY_AFTER_SECS: u64 = 1;

/// What a request is counted against: its customer and its key, each with an optional cap.
#[derive(Debug, Clone, Copy)]
pub struct RequestCaps<'a> {
    pub customer: &'a str,
    pub customer_cap: Option<i64>,
    pub key: &'a str,
    pub key_cap: Option<i64>,
}

/// Requests in flight per customer and per key.
#[derive(Debug, Default)]
pub struct InFlightRequests {
    /// A std mutex: held for a lookup and two increments, never across an `.await`.
    counts: Mutex<HashMap<Subject, usize>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Subject {
    Customer(String),
    Key(String),
}

/// One request's place in the counts; given back on drop.
#[derive(Debug)]
pub struct RequestSlot {
    owner: Arc<InFlightRequests>,
    subjects: [Subject; 2],
}

impl InFlightRequests {
    /// Counts one more request of `caps.customer` with `caps.key`, unless that would exceed
    /// either cap (then nothing is counted).
    pub fn acquire(self: &Arc<Self>, caps: RequestCaps<'_>) -> Result<RequestSlot, ApiError> {
        let customer = Subject::Customer(caps.customer.to_string());
        let key = Subject::Key(caps.key.to_string());
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let refuse = |what: String, running: usize, cap: i64| {
            ApiError::RateLimited {
            message: format!(
                "{what} has {running} requests in flight and its limit is {cap} concurrent requests; retry when one finishes"
            ),
            unit: "requests",
            retry_after_secs: CONCURRENCY_RETRY_AFTER_SECS,
        }
        };
        for (subject, cap, what) in [
            (&key, caps.key_cap, format!("API key `{}`", caps.key)),
            (
                &customer,
                caps.customer_cap,
                format!("customer `{}`", caps.customer),
            ),
        ] {
            let running = counts.get(subject).copied().unwrap_or(0);
            if let Some(cap) = cap {
                if i64::try_from(running).is_ok_and(|r| r >= cap) {
                    return Err(refuse(what, running, cap));
                }
            }
        }
        for subject in [&customer, &key] {
            *counts.entry(subject.clone()).or_insert(0) += 1;
        }
        Ok(RequestSlot {
            owner: self.clone(),
            subjects: [customer, key],
        })
    }

    /// Requests in flight of `customer` (all its keys).
    pub fn customer_running(&self, customer: &str) -> usize {
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts
            .get(&Subject::Customer(customer.to_string()))
            .copied()
            .unwrap_or(0)
    }

    /// Requests in flight with `key`.
    pub fn key_running(&self, key: &str) -> usize {
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts
            .get(&Subject::Key(key.to_string()))
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for RequestSlot {
    fn drop(&mut self) {
        let mut counts = self.owner.counts.lock().unwrap_or_else(|p| p.into_inner());
        for subject in &self.subjects {
            if let Some(c) = counts.get_mut(subject) {
                *c = c.saturating_sub(1);
                if *c == 0 {
                    counts.remove(subject);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps<'a>(
        customer: &'a str,
        cc: Option<i64>,
        key: &'a str,
        kc: Option<i64>,
    ) -> RequestCaps<'a> {
        RequestCaps {
            customer,
            customer_cap: cc,
            key,
            key_cap: kc,
        }
    }

    #[test]
    fn request_caps_per_key_and_per_customer() {
        let f = Arc::new(InFlightRequests::default());
        // Key k1 may have 1 in flight; the customer 3 across its keys.
        let a = f.acquire(caps("c", Some(3), "k1", Some(1))).unwrap();
        let refused = f.acquire(caps("c", Some(3), "k1", Some(1))).unwrap_err();
        assert!(
            matches!(&refused, ApiError::RateLimited { message, retry_after_secs: 1, .. } if message.contains("API key `k1`")),
            "{refused:?}"
        );
        // A refusal counts nothing.
        assert_eq!((f.customer_running("c"), f.key_running("k1")), (1, 1));
        let b = f.acquire(caps("c", Some(3), "k2", None)).unwrap();
        let _c = f.acquire(caps("c", Some(3), "k2", None)).unwrap();
        let refused = f.acquire(caps("c", Some(3), "k3", None)).unwrap_err();
        assert!(
            matches!(&refused, ApiError::RateLimited { message, .. } if message.contains("customer `c`")),
            "{refused:?}"
        );
        // Other customers are counted apart; no cap means none.
        for _ in 0..10 {
            std::mem::forget(f.acquire(caps("d", None, "kd", None)).unwrap());
        }
        drop(a);
        assert_eq!((f.customer_running("c"), f.key_running("k1")), (2, 0));
        let _a2 = f.acquire(caps("c", Some(3), "k1", Some(1))).unwrap();
        drop(b);
        assert_eq!(f.customer_running("c"), 2);
        assert_eq!(f.key_running("k2"), 1);
    }

    #[test]
    fn caps_per_customer_and_model_and_gives_back_on_drop() {
        let f = Arc::new(InFlight::default());
        let a = f.acquire("c", "m", 2, 3).unwrap();
        let b = f.acquire("c", "m", 1, 3).unwrap();
        assert!(matches!(
            f.acquire("c", "m", 1, 3),
            Err(ApiError::RateLimited { .. })
        ));
        // Another customer, and another model, are counted apart.
        let _other = f.acquire("d", "m", 3, 3).unwrap();
        let _m2 = f.acquire("c", "m2", 3, 3).unwrap();
        drop(a);
        assert_eq!(f.running("c", "m"), 1);
        let _c = f.acquire("c", "m", 2, 3).unwrap();
        drop(b);
        assert_eq!(f.running("c", "m"), 2);
    }
}

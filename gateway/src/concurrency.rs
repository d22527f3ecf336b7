//! Per-customer caps on concurrent sequences of a model (`max_sequences_per_customer` in
//! models.toml): a request whose choices would take a customer over the cap is refused with 429
//! at once, before any work is queued. The slots are held by the request's accounting guard
//! and given back when it ends, however it ends.
//!
//! Per process: with several gateway replicas each enforces the cap on what it serves.

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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

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

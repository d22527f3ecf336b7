//! The ticket of a request that runs under an `Idempotency-Key`: it travels in the request's
//! `Caller` to the accounting guard, which reports how the request ended through it, and holds
//! the request's lease (`lease.rs`). A leaf, so that auth can carry it without depending on the
//! idempotency layer that issues it.

use std::sync::{Arc, OnceLock};

use tollgate_metering::kinds::Outcome;

use super::lease::Lease;

/// A request that runs under an idempotency key: the key for its usage record, and the
/// outcome its accounting settled with (only a completed request is kept for replay).
#[derive(Clone)]
pub struct Ticket {
    pub key: String,
    outcome: Arc<OnceLock<Outcome>>,
    pub(super) lease: Option<Arc<Lease>>,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket")
            .field("key", &self.key)
            .field("outcome", &self.outcome.get())
            .field("lost", &self.lost())
            .finish()
    }
}

impl Ticket {
    pub(super) fn new(key: String) -> Self {
        Self {
            key,
            outcome: Arc::default(),
            lease: None,
        }
    }

    /// Whether the request has lost its key to another (it is then not charged).
    pub(crate) fn lost(&self) -> bool {
        self.lease.as_ref().is_some_and(|l| l.is_lost())
    }

    /// Renews the lease before the request is charged: false when it has lost its key.
    pub(crate) async fn still_held(&self) -> bool {
        match &self.lease {
            Some(lease) => lease.renew().await,
            None => true,
        }
    }

    /// Called once by the accounting guard with how the request ended.
    pub(crate) fn settled(&self, outcome: Outcome) {
        let _ = self.outcome.set(outcome);
    }

    pub(super) fn completed(&self) -> bool {
        self.outcome.get() == Some(&Outcome::Completed)
    }
}

impl PartialEq for Ticket {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

impl Eq for Ticket {}

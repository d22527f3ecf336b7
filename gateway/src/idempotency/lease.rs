//! A running request's hold on its `Idempotency-Key`: the lease in `idempotency_keys`,
//! renewed while the request runs, and the moment the request learns it has lost it.
//!
//! A lease is lost when a renewal finds another request holding the key (this one's lease ran
//! out, by a stall or a partition, and a retry took the key over), or when the database cannot
//! be reached until the lease has run out by this gateway's clock (another replica may take the
//! key over from then on). A request that has lost its lease stops generating and is recorded
//! `superseded`, never charged: the request holding the key is the one charged. The ledger's
//! unique index on charged records per key is the last word when both reach it anyway.
//!
//! It owns the lease's state; the table is `tollgate_metering::requests::idempotency`.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tollgate_metering::store::{now_micros, Store};

/// The lease of one running request.
pub(crate) struct Lease {
    db: Store,
    customer_id: String,
    key: String,
    request_id: String,
    length: Duration,
    /// By this gateway's clock (Unix microseconds), until when the key is known to be held:
    /// the end of the last lease the database granted.
    held_until: AtomicI64,
    /// Set once, when the lease is lost.
    lost: watch::Sender<bool>,
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX / 4)
}

impl Lease {
    /// The lease a claim just granted (until `now + length`).
    pub(crate) fn new(
        db: Store,
        customer_id: String,
        key: String,
        request_id: String,
        length: Duration,
        granted_at: i64,
    ) -> Self {
        Self {
            db,
            customer_id,
            key,
            request_id,
            length,
            held_until: AtomicI64::new(granted_at + micros(length)),
            lost: watch::channel(false).0,
        }
    }

    /// How often the lease is renewed.
    pub(crate) fn renew_every(&self) -> Duration {
        self.length / 3
    }

    pub(crate) fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// Resolves once the lease is lost.
    pub(crate) async fn lost(&self) {
        let mut rx = self.lost.subscribe();
        let _ = rx.wait_for(|lost| *lost).await;
    }

    /// Renews the lease; false once it is lost (see the module documentation).
    pub(crate) async fn renew(&self) -> bool {
        if self.is_lost() {
            return false;
        }
        let until = now_micros() + micros(self.length);
        let renewed = self
            .db
            .renew_idempotency(&self.customer_id, &self.key, &self.request_id, until)
            .await;
        match renewed {
            Ok(true) => {
                self.held_until.fetch_max(until, Ordering::AcqRel);
                true
            }
            Ok(false) => {
                self.lose("another request took the key over after this one's lease ran out");
                false
            }
            Err(e) if now_micros() < self.held_until.load(Ordering::Acquire) => {
                tracing::warn!(request_id = %self.request_id, error = %e, "cannot renew an idempotency lease; it still holds");
                true
            }
            Err(e) => {
                tracing::warn!(request_id = %self.request_id, error = %e, "cannot renew an idempotency lease");
                self.lose("the database could not be reached for longer than the lease");
                false
            }
        }
    }

    fn lose(&self, why: &str) {
        if !self.lost.send_replace(true) {
            tracing::warn!(
                request_id = %self.request_id,
                customer_id = %self.customer_id,
                "idempotency lease lost ({why}): the request stops and is not charged"
            );
        }
    }
}

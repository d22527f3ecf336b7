//! The records requests appended to the spool themselves ([`super::SpoolSync::Every`]), on
//! their way to the database task: a list the requests push onto and the task takes whole.
//!
//! A push wakes the task only when the list was empty (a doorbell), and the task takes the
//! list only when a write is due, so under load a batch gathers without a thread wake-up per
//! record: one wake-up per database write instead of two per record (one for a spool thread
//! and one for the task, as when each record was a message). Two exceptions keep the
//! ledger's bound on what it holds in memory: a push rings when the list holds `bound`
//! records or more, and on every push once the task reads its backlog back from the spool
//! file (`eager`: then the records in memory are dropped at once, being in the file).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use tokio::sync::Notify;

use super::spool::Pending;

pub(super) struct Inbox {
    records: Mutex<Vec<Pending>>,
    /// Rung when a record lands in an empty list (and see the module documentation).
    bell: Notify,
    bound: usize,
    eager: AtomicBool,
}

impl Inbox {
    /// An inbox that rings when it holds `bound` records.
    pub(super) fn new(bound: usize) -> Self {
        Self {
            records: Mutex::default(),
            bell: Notify::new(),
            bound: bound.max(1),
            eager: AtomicBool::new(false),
        }
    }

    /// Adds a record; rings when it is the first since the last [`Inbox::take`], when the
    /// list is at its bound, and on every push while eager.
    pub(super) fn push(&self, record: Pending) {
        let n = {
            // A short section (a push), never held across an `.await`.
            let mut records = lock(&self.records);
            records.push(record);
            records.len()
        };
        if n == 1 || n >= self.bound || self.eager.load(Ordering::Relaxed) {
            self.bell.notify_one();
        }
    }

    /// Whether every push rings (the task is reading its backlog back from the spool file).
    pub(super) fn set_eager(&self, eager: bool) {
        self.eager.store(eager, Ordering::Relaxed);
    }

    /// Whether the records should be taken now rather than when the next write is due.
    pub(super) fn urgent(&self) -> bool {
        self.eager.load(Ordering::Relaxed) || self.len() >= self.bound
    }

    /// Everything pushed so far, in order.
    pub(super) fn take(&self) -> Vec<Pending> {
        std::mem::take(&mut *lock(&self.records))
    }

    pub(super) fn len(&self) -> usize {
        lock(&self.records).len()
    }

    /// Resolves once a record landed in the empty list (at once if one did since the last
    /// wait: the ring is kept).
    pub(super) async fn rung(&self) {
        self.bell.notified().await;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use super::*;
    use crate::store::UsageRecord;

    fn record(id: &str) -> Pending {
        (
            UsageRecord {
                id: id.into(),
                ..UsageRecord::default()
            },
            Some(0),
        )
    }

    /// Whether `rung` resolves at once (polled once, with no time involved).
    fn rings_now(inbox: &Inbox) -> bool {
        let mut rung = std::pin::pin!(inbox.rung());
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        rung.as_mut().poll(&mut cx).is_ready()
    }

    #[test]
    fn rings_once_per_batch_and_keeps_the_order() {
        let inbox = Inbox::new(3);
        assert!(!rings_now(&inbox));
        inbox.push(record("a"));
        inbox.push(record("b"));
        // The first push rang (kept until waited for); the second did not ring again.
        assert!(rings_now(&inbox));
        assert!(!rings_now(&inbox));
        let taken: Vec<String> = inbox.take().into_iter().map(|(r, _)| r.id).collect();
        assert_eq!(taken, ["a", "b"]);
        assert_eq!(inbox.len(), 0);
        // Empty again: the next push rings.
        inbox.push(record("c"));
        assert!(rings_now(&inbox));
        inbox.push(record("d"));
        assert!(!rings_now(&inbox) && !inbox.urgent());
        // At its bound it rings again, and so does every push while eager.
        inbox.push(record("e"));
        assert!(rings_now(&inbox) && inbox.urgent());
        inbox.take();
        inbox.set_eager(true);
        for id in ["f", "g"] {
            inbox.push(record(id));
            assert!(rings_now(&inbox) && inbox.urgent());
        }
    }
}

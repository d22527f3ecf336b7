//! The database task: inserts spooled records in batches, retrying with backoff while the
//! database is down, and empties the spool once everything in it is in the database.

use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::spool::{lock, Spool};
use super::{LedgerGauges, MAX_BATCH, RETRY_MAX, RETRY_MIN, WRITE_EVERY};
use crate::store::{Store, UsageRecord};

/// The database task: inserts spooled records, retrying while the database is down.
pub(super) struct DbWriter {
    pub(super) store: Store,
    pub(super) spool: Arc<Mutex<Spool>>,
    /// Records not yet known to be in the database, in spool order, each with whether it is
    /// in the spool file.
    pub(super) pending: Vec<(UsageRecord, bool)>,
    pub(super) gauges: LedgerGauges,
}

impl DbWriter {
    pub(super) async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Option<Vec<(UsageRecord, bool)>>>,
    ) {
        let mut delay = RETRY_MIN;
        let mut stopping = false;
        // When the next write may start: a batch is gathering, or the database failed and is
        // tried again then (new records do not postpone it).
        let mut next_write: Option<tokio::time::Instant> = None;
        self.gauges.pending.set(self.pending.len() as i64);
        loop {
            let due = next_write.is_none_or(|t| tokio::time::Instant::now() >= t);
            if (due || stopping) && !self.pending.is_empty() {
                if self.flush().await {
                    next_write = Some(tokio::time::Instant::now() + WRITE_EVERY);
                    delay = RETRY_MIN;
                } else {
                    next_write = Some(tokio::time::Instant::now() + delay);
                    delay = (delay * 2).min(RETRY_MAX);
                }
            } else if due {
                // Nothing gathered: the next record is written as soon as it arrives.
                next_write = None;
            }
            if stopping {
                break;
            }
            let received = match next_write {
                Some(t) => tokio::select! {
                    r = rx.recv() => r,
                    () = tokio::time::sleep_until(t) => continue,
                },
                None => rx.recv().await,
            };
            match received {
                Some(Some(records)) => self.pending.extend(records),
                Some(None) | None => stopping = true,
            }
            while let Ok(more) = rx.try_recv() {
                match more {
                    Some(records) => self.pending.extend(records),
                    None => stopping = true,
                }
            }
            self.gauges.pending.set(self.pending.len() as i64);
        }
        if !self.pending.is_empty() {
            tracing::warn!(
                records = self.pending.len(),
                "usage ledger: database unreachable at shutdown; records stay in the spool"
            );
        }
    }

    /// Writes pending records; true when none are left.
    pub(super) async fn flush(&mut self) -> bool {
        while !self.pending.is_empty() {
            let n = self.pending.len().min(MAX_BATCH);
            let batch: Vec<UsageRecord> =
                self.pending[..n].iter().map(|(r, _)| r.clone()).collect();
            match self.store.insert_records(&batch).await {
                Ok(inserted) => {
                    tracing::debug!(records = n, inserted, "usage records written");
                    let spooled = self.pending.drain(..n).filter(|(_, s)| *s).count();
                    self.gauges.pending.set(self.pending.len() as i64);
                    let mut s = lock(&self.spool);
                    let old = match s.written(spooled) {
                        Ok(old) => old,
                        Err(e) => {
                            tracing::error!("usage ledger spool truncate failed: {e}");
                            None
                        }
                    };
                    self.gauges.spooled.set(s.lines as i64);
                    drop(s);
                    // Frees the old file's blocks, outside the lock.
                    drop(old);
                }
                Err(e) => {
                    tracing::warn!(
                        records = self.pending.len(),
                        "usage ledger: database write failed, records stay spooled: {e}"
                    );
                    return false;
                }
            }
        }
        true
    }
}

//! The database task: inserts spooled records in batches, retrying with backoff while the
//! database is down, and empties the spool once everything in it is in the database.
//!
//! Records reach it in memory, each tagged with the generation of the spool file that holds
//! it. Up to a bound it keeps them so; past it (a long outage under load), or when a restart
//! finds records in the spool, it lets go of the spooled ones and reads the file back from
//! its start instead ("file mode"), inserting batch by batch (inserts skip ids already
//! present, so lines written before are harmless), until it has read to the end of a file
//! nothing was appended to since; then a fresh spool file starts and memory takes over again.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::inbox::Inbox;
use super::spool::{lock, read_lines, Pending, Spool};
use super::{gauge, LedgerGauges, MAX_BATCH, RETRY_MAX, RETRY_MIN, WRITE_EVERY};
use crate::store::{Store, UsageRecord};

/// Where reading the spool file back has got to.
#[derive(Debug, Default)]
struct FromFile {
    offset: u64,
    lines: usize,
}

/// The database task: inserts spooled records, retrying while the database is down.
pub(super) struct DbWriter {
    store: Store,
    spool: Arc<Mutex<Spool>>,
    /// Records the requests appended to the spool themselves, taken when a write is due.
    inbox: Arc<Inbox>,
    /// Records not yet known to be in the database, in arrival order. In file mode, only
    /// those the spool does not hold.
    pending: Vec<Pending>,
    /// File mode: the backlog is read back from the spool file.
    from_file: Option<FromFile>,
    max_in_memory: usize,
    in_memory: Arc<AtomicUsize>,
    gauges: LedgerGauges,
    /// When budget alerts whose step failed in an insert are next retried.
    next_alert_retry: tokio::time::Instant,
}

/// How often months whose alert step failed are looked for (a partial index lookup).
const ALERT_RETRY_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl DbWriter {
    /// With `replay`, the spool holds records from an earlier run: the task starts by reading
    /// them back.
    pub(super) fn new(
        store: Store,
        (spool, inbox): (Arc<Mutex<Spool>>, Arc<Inbox>),
        replay: bool,
        max_in_memory: usize,
        in_memory: Arc<AtomicUsize>,
        gauges: LedgerGauges,
    ) -> Self {
        inbox.set_eager(replay);
        Self {
            store,
            spool,
            inbox,
            pending: Vec::new(),
            from_file: replay.then(FromFile::default),
            max_in_memory,
            in_memory,
            gauges,
            next_alert_retry: tokio::time::Instant::now(),
        }
    }

    fn has_work(&self) -> bool {
        !self.pending.is_empty() || self.from_file.is_some()
    }

    /// Takes records handed on by the spool stage; past the bound, switches to file mode.
    fn accept(&mut self, records: Vec<Pending>) {
        if self.from_file.is_some() {
            // Spooled ones are in the file, ahead of or behind where reading has got to:
            // either way the file pass inserts them.
            self.pending
                .extend(records.into_iter().filter(|(_, g)| g.is_none()));
        } else {
            self.pending.extend(records);
            if self.pending.len() > self.max_in_memory {
                // Those of older files are in the database already (their file was read to
                // its end before it was replaced); the current file's are read back.
                self.pending.retain(|(_, g)| g.is_none());
                self.from_file = Some(FromFile::default());
                self.inbox.set_eager(true);
                tracing::warn!(
                    max_in_memory = self.max_in_memory,
                    "usage ledger: backlog past its bound in memory; reading it back from the spool when the database takes writes"
                );
            }
        }
        self.update_gauges();
    }

    fn update_gauges(&self) {
        self.in_memory.store(self.pending.len(), Ordering::Relaxed);
        let mut pending = self.pending.len() + self.inbox.len();
        if let Some(f) = &self.from_file {
            pending += lock(&self.spool).lines.saturating_sub(f.lines);
        }
        self.gauges.pending.set(gauge(pending));
    }

    pub(super) async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Option<Vec<Pending>>>) {
        let mut delay = RETRY_MIN;
        let mut stopping = false;
        // When the next write may start: a batch is gathering, or the database failed and is
        // tried again then (new records do not postpone it).
        let mut next_write: Option<tokio::time::Instant> = None;
        self.update_gauges();
        let inbox = self.inbox.clone();
        loop {
            let due = next_write.is_none_or(|t| tokio::time::Instant::now() >= t);
            if due || stopping {
                let appended = self.inbox.take();
                if !appended.is_empty() {
                    self.accept(appended);
                }
            }
            if (due || stopping) && self.has_work() {
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
                // Records arriving in the inbox meanwhile wait for the write that is due,
                // unless holding them would pass the bound on memory.
                Some(t) => tokio::select! {
                    r = rx.recv() => r,
                    () = tokio::time::sleep_until(t) => continue,
                    () = inbox.rung() => {
                        if self.inbox.urgent() {
                            self.accept(self.inbox.take());
                        }
                        continue;
                    }
                },
                None => tokio::select! {
                    r = rx.recv() => r,
                    () = inbox.rung() => continue,
                },
            };
            match received {
                Some(Some(records)) => self.accept(records),
                Some(None) | None => stopping = true,
            }
            while let Ok(more) = rx.try_recv() {
                match more {
                    Some(records) => self.accept(records),
                    None => stopping = true,
                }
            }
        }
        if self.has_work() {
            tracing::warn!(
                records = self.gauges.pending.get(),
                "usage ledger: database unreachable at shutdown; records stay in the spool"
            );
        }
    }

    /// Writes what is pending, in memory then in the file; true when it has caught up.
    pub(super) async fn flush(&mut self) -> bool {
        let caught_up = self.flush_memory().await && self.flush_file().await;
        if caught_up && tokio::time::Instant::now() >= self.next_alert_retry {
            self.next_alert_retry = tokio::time::Instant::now() + ALERT_RETRY_EVERY;
            if let Err(e) = self.store.catch_up_alerts().await {
                tracing::warn!("budget alerts: retrying a failed alert step failed: {e}");
            }
        }
        caught_up
    }

    async fn flush_memory(&mut self) -> bool {
        while !self.pending.is_empty() {
            let n = self.pending.len().min(MAX_BATCH);
            let batch: Vec<UsageRecord> =
                self.pending[..n].iter().map(|(r, _)| r.clone()).collect();
            match self.store.insert_records(&batch).await {
                Ok(inserted) => {
                    tracing::debug!(records = n, inserted, "usage records written");
                    let written: Vec<Option<u64>> =
                        self.pending.drain(..n).map(|(_, g)| g).collect();
                    let mut s = lock(&self.spool);
                    // Only lines of the current file count towards replacing it.
                    let current = s.generation;
                    let spooled = written.iter().filter(|g| **g == Some(current)).count();
                    let old = if self.from_file.is_some() {
                        None
                    } else {
                        s.written(spooled).unwrap_or_else(|e| {
                            tracing::error!("usage ledger spool truncate failed: {e}");
                            None
                        })
                    };
                    self.gauges.spooled.set(gauge(s.lines));
                    drop(s);
                    // Frees the old file's blocks, outside the lock.
                    drop(old);
                    self.update_gauges();
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

    /// File mode: inserts the spool file's records from where reading got to; at its end,
    /// when nothing was appended since, starts a fresh file and leaves file mode.
    async fn flush_file(&mut self) -> bool {
        while let Some(at) = &self.from_file {
            let (offset, path) = (at.offset, lock(&self.spool).path.clone());
            let read = match read_lines(&path, offset, MAX_BATCH) {
                Ok(read) => read,
                Err(e) => {
                    tracing::error!(spool = %path.display(), "usage ledger: cannot read the spool back: {e}");
                    return false;
                }
            };
            if read.lines == 0 {
                let mut s = lock(&self.spool);
                match s.restart_if_read_to(offset) {
                    Ok(Some(old)) => {
                        self.from_file = None;
                        self.inbox.set_eager(false);
                        self.gauges.spooled.set(gauge(s.lines));
                        drop(s);
                        drop(old);
                        tracing::info!("usage ledger: the spooled backlog is in the database");
                        self.update_gauges();
                        return true;
                    }
                    // A line is being appended: it is read at the next pass.
                    Ok(None) => return true,
                    Err(e) => {
                        tracing::error!("usage ledger: cannot start a new spool file: {e}");
                        return false;
                    }
                }
            }
            if !read.records.is_empty() {
                if let Err(e) = self.store.insert_records(&read.records).await {
                    tracing::warn!(
                        records = self.gauges.pending.get(),
                        "usage ledger: database write failed, records stay spooled: {e}"
                    );
                    return false;
                }
            }
            if let Some(at) = &mut self.from_file {
                at.offset = read.next;
                at.lines += read.lines;
            }
            self.update_gauges();
        }
        true
    }
}

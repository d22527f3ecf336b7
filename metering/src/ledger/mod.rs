//! The usage ledger writer: every record is written exactly once, off the request path, and
//! survives a crash or a database outage.
//!
//! Records flow through two stages, so the request path never waits for the database:
//! 1. each record is appended to the local spool file before its response completes. How far
//!    it must have gone is the operator's choice ([`SpoolSync`]):
//!    - [`SpoolSync::Always`]: the spool thread appends a batch of records (whatever arrived
//!      while the previous batch was synced: group commit) and `fdatasync`s it; only then are
//!      the requests waiting on [`Ledger::record`] released, so a completed response has its
//!      record on disk, even if the machine loses power;
//!    - [`SpoolSync::Every`]: the request appends its record itself (a `write` to the file, which
//!      the kernel then holds: it survives a crash of the gateway process) and a syncer thread
//!      `fdatasync`s the spool at that interval, so only a crash of the whole machine can lose
//!      the records of the last interval. This keeps the disk's flush latency off responses.
//!      The record then waits in the [`inbox`] for the database task, which is woken once per
//!      batch rather than once per record;
//! 2. the database task inserts spooled records in batches (idempotent on the record id), at
//!    most every [`WRITE_EVERY`]; once every spooled line is in the database, an empty spool
//!    file replaces the full one;
//! 3. while the database is unreachable, records stay pending (and spooled) and the database
//!    task retries with backoff; the gateway keeps serving. At most [`MAX_IN_MEMORY`] of them
//!    are held in memory: beyond that, and for what a restart finds in the spool, the task
//!    reads the records back from the spool file, in order, until it has caught up.
//!
//! At start the spool is replayed (a gateway killed with records not yet in the database loses
//! nothing); replays are harmless because inserts skip ids already present. A torn last line
//! (killed mid-append, never acknowledged) is ignored.
//!
//! Stage 1 is `spool`, stage 2 and 3 `db_writer`; this file is the [`Ledger`] handle requests
//! record through.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::IntGauge;
use tokio::sync::{mpsc, oneshot};

use crate::store::{Store, UsageRecord};

mod db_writer;
mod inbox;
mod spool;

use db_writer::DbWriter;
use inbox::Inbox;
use spool::{lock, lock_spool, spool_loop, Spool, Syncer};

/// Largest batch written at once.
const MAX_BATCH: usize = 1000;
/// Least time between two database writes: records are durable in the spool already, so the
/// writer lets a batch gather (one transaction, one commit sync, for everything that arrived
/// meanwhile) instead of writing a few records per transaction at a high rate.
const WRITE_EVERY: Duration = Duration::from_millis(50);
/// Records not yet in the database that the database task keeps in memory; beyond it (a long
/// outage under load) they are read back from the spool file when the database returns, so an
/// outage costs disk, not memory.
pub const MAX_IN_MEMORY: usize = 20_000;
/// Retry delays while the database is unreachable.
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// When spooled records reach the disk (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpoolSync {
    /// Responses wait for their record's `fdatasync` (group commit).
    Always,
    /// Responses wait for their record's `write`; the spool is `fdatasync`ed this often.
    Every(Duration),
}

impl std::str::FromStr for SpoolSync {
    type Err = String;

    /// `always`, or an interval in milliseconds (`10ms`, `10`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s == "always" {
            return Ok(Self::Always);
        }
        let ms = s.strip_suffix("ms").unwrap_or(s);
        match ms.parse::<u64>() {
            Ok(ms) if (1..=10_000).contains(&ms) => Ok(Self::Every(Duration::from_millis(ms))),
            _ => Err(format!(
                "spool sync `{s}` is neither `always` nor an interval of 1 to 10000 ms (`10ms`)"
            )),
        }
    }
}

impl Default for SpoolSync {
    fn default() -> Self {
        Self::Every(Duration::from_millis(10))
    }
}

enum Msg {
    Record {
        record: Box<UsageRecord>,
        durable: Option<oneshot::Sender<()>>,
    },
    /// Shutdown: write what is pending, then stop.
    Stop,
}

/// A count of records as a gauge's value.
fn gauge(count: usize) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

/// Gauges the writer keeps current.
#[derive(Clone)]
pub struct LedgerGauges {
    /// Records accepted but not yet in the database.
    pub pending: IntGauge,
    /// Records in the spool file.
    pub spooled: IntGauge,
}

/// A handle to the writer; cheap to clone.
#[derive(Clone)]
pub struct Ledger {
    tx: mpsc::UnboundedSender<Msg>,
    /// For records that arrive after [`Ledger::close`]: appended directly, replayed at the
    /// next start.
    spool: Arc<Mutex<Spool>>,
    /// Records the database task holds in memory, not yet in the database.
    in_memory: Arc<AtomicUsize>,
    /// Held for the process's life: one spool per process.
    _lock: Arc<File>,
    /// With [`SpoolSync::Every`]: what the syncer thread flushes.
    syncer: Option<Arc<Syncer>>,
    /// With [`SpoolSync::Every`]: the appended records, for the database task.
    inbox: Arc<Inbox>,
    gauges: LedgerGauges,
    writer: Arc<tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl Ledger {
    /// Opens the spool at `spool_path`, replays it, and starts the writer.
    pub fn start(
        store: Store,
        spool_path: &Path,
        sync: SpoolSync,
        gauges: LedgerGauges,
    ) -> anyhow::Result<Self> {
        Self::start_bounded(store, spool_path, sync, gauges, MAX_IN_MEMORY)
    }

    /// [`Ledger::start`] holding at most `max_in_memory` records not yet in the database in
    /// memory (those the spool does not have excepted): beyond it, the backlog is read back
    /// from the spool file.
    pub fn start_bounded(
        store: Store,
        spool_path: &Path,
        sync: SpoolSync,
        gauges: LedgerGauges,
        max_in_memory: usize,
    ) -> anyhow::Result<Self> {
        let lock = lock_spool(spool_path)?;
        let spool = Spool::open(spool_path).map_err(|e| {
            anyhow::anyhow!("cannot open the ledger spool {}: {e}", spool_path.display())
        })?;
        let replay = spool.lines;
        if replay > 0 {
            tracing::info!(records = replay, spool = %spool_path.display(), "replaying spooled usage records");
        }
        let spool = Arc::new(Mutex::new(spool));
        let syncer = match sync {
            SpoolSync::Always => None,
            SpoolSync::Every(interval) => {
                let syncer = Arc::new(Syncer {
                    spool: Arc::downgrade(&spool),
                    dirty: AtomicBool::new(false),
                });
                let weak = Arc::downgrade(&syncer);
                std::thread::Builder::new()
                    .name("ledger-sync".into())
                    .spawn(move || Syncer::run(&weak, interval))?;
                Some(syncer)
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let (db_tx, db_rx) = mpsc::unbounded_channel();
        let spooler = {
            let spool = spool.clone();
            let gauges = gauges.clone();
            std::thread::Builder::new()
                .name("ledger-spool".into())
                .spawn(move || spool_loop(rx, &spool, &db_tx, &gauges))?
        };
        let in_memory = Arc::new(AtomicUsize::new(0));
        let inbox = Arc::new(Inbox::new(max_in_memory));
        let writer = DbWriter::new(
            store,
            (spool.clone(), inbox.clone()),
            replay > 0,
            max_in_memory,
            in_memory.clone(),
            gauges.clone(),
        );
        let handle = tokio::spawn(async move {
            writer.run(db_rx).await;
            let _ = spooler.join();
        });
        Ok(Self {
            tx,
            spool,
            in_memory,
            _lock: Arc::new(lock),
            syncer,
            inbox,
            gauges,
            writer: Arc::new(tokio::sync::Mutex::new(Some(handle))),
        })
    }

    /// After `close`: the spool thread is gone, so append here (replayed at the next start).
    fn append_late(&self, record: UsageRecord) {
        let mut s = lock(&self.spool);
        match s.append(std::slice::from_ref(&record)) {
            Ok(_) => {
                tracing::warn!(id = %record.id, "usage record arrived after the ledger closed: spooled for the next start")
            }
            Err(e) => {
                tracing::error!(id = %record.id, "usage ledger is closed and the spool failed: record lost: {e}")
            }
        }
    }

    /// Hands a record to the ledger and waits until it is durable: in the spool, synced or
    /// written as [`SpoolSync`] says.
    pub async fn record(&self, record: UsageRecord) {
        if let Some(syncer) = &self.syncer {
            self.append_now(record, syncer);
            return;
        }
        let (done, durable) = oneshot::channel();
        let msg = Msg::Record {
            record: Box::new(record),
            durable: Some(done),
        };
        if let Err(mpsc::error::SendError(Msg::Record { record, .. })) = self.tx.send(msg) {
            self.append_late(*record);
            return;
        }
        let _ = durable.await;
    }

    /// [`SpoolSync::Every`]: appends the record to the spool here (the kernel holds it once
    /// `write` returns) and leaves it in the inbox of the database writer.
    fn append_now(&self, record: UsageRecord, syncer: &Syncer) {
        let mut line = Vec::with_capacity(512);
        let encoded = serde_json::to_writer(&mut line, &record);
        line.push(b'\n');
        // A short section (one `write` of one line), never held across an `.await`.
        let spooled = encoded.map_err(std::io::Error::from).and_then(|()| {
            let mut s = lock(&self.spool);
            let generation = s.append_bytes(&line, 1, false)?;
            self.gauges.spooled.set(gauge(s.lines));
            Ok(generation)
        });
        let spooled = match spooled {
            Ok(generation) => {
                syncer.dirty.store(true, Ordering::Release);
                Some(generation)
            }
            Err(e) => {
                // Without the spool the database write is the only copy; it is still tried.
                tracing::error!(id = %record.id, "usage ledger spool append failed: {e}");
                None
            }
        };
        if self.tx.is_closed() {
            // Closed: the spool already holds it for the next start.
            if spooled.is_some() {
                tracing::warn!(id = %record.id, "usage record arrived after the ledger closed: spooled for the next start");
            } else {
                tracing::error!(id = %record.id, "usage ledger is closed and the spool failed: record lost");
            }
            return;
        }
        self.gauges.pending.inc();
        self.inbox.push((record, spooled));
    }

    /// Hands a record to the ledger without waiting (for paths that cannot wait, such as a
    /// client that went away).
    pub fn record_nowait(&self, record: UsageRecord) {
        if let Some(syncer) = &self.syncer {
            self.append_now(record, syncer);
            return;
        }
        let msg = Msg::Record {
            record: Box::new(record),
            durable: None,
        };
        if let Err(mpsc::error::SendError(Msg::Record { record, .. })) = self.tx.send(msg) {
            self.append_late(*record);
        }
    }

    /// How many records not yet in the database are held in memory (at most the bound given
    /// at start, but for records the spool could not take).
    pub fn backlog_in_memory(&self) -> usize {
        self.in_memory.load(Ordering::Relaxed)
    }

    /// Stops accepting records and writes what is pending, for at most `timeout`; whatever is
    /// left stays in the spool for the next start.
    pub async fn close(&self, timeout: Duration) {
        let _ = self.tx.send(Msg::Stop);
        let handle = self.writer.lock().await.take();
        if let Some(handle) = handle {
            if tokio::time::timeout(timeout, handle).await.is_err() {
                tracing::warn!("usage ledger: records still pending at shutdown stay in the spool");
            }
        }
        if let Some(syncer) = &self.syncer {
            syncer.sync();
        }
    }
}

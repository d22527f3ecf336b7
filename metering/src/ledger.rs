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
//!      the records of the last interval. This keeps the disk's flush latency off responses;
//! 2. the database task inserts spooled records in batches (idempotent on the record id), at
//!    most every [`WRITE_EVERY`]; once every spooled line is in the database, an empty spool
//!    file replaces the full one;
//! 3. while the database is unreachable, records stay pending (and spooled) and the database
//!    task retries with backoff; the gateway keeps serving.
//!
//! At start the spool is replayed (a gateway killed with records not yet in the database loses
//! nothing); replays are harmless because inserts skip ids already present. A torn last line
//! (killed mid-append, never acknowledged) is ignored.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use prometheus::IntGauge;
use tokio::sync::{mpsc, oneshot};

use crate::store::{Store, UsageRecord};

/// Largest batch written at once.
const MAX_BATCH: usize = 1000;
/// Least time between two database writes: records are durable in the spool already, so the
/// writer lets a batch gather (one transaction, one commit sync, for everything that arrived
/// meanwhile) instead of writing a few records per transaction at a high rate.
const WRITE_EVERY: Duration = Duration::from_millis(50);
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
    /// Appended to the spool by the request itself ([`SpoolSync::Every`]); `spooled` is false
    /// when the append failed.
    Appended {
        record: Box<UsageRecord>,
        spooled: bool,
    },
    /// Shutdown: write what is pending, then stop.
    Stop,
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
    /// Held for the process's life: one spool per process.
    _lock: Arc<File>,
    /// With [`SpoolSync::Every`]: what the syncer thread flushes.
    syncer: Option<Arc<Syncer>>,
    writer: Arc<tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

/// The append-only spool file.
struct Spool {
    path: PathBuf,
    /// Shared with the syncer, which syncs outside the spool's lock.
    file: Arc<File>,
    /// Lines in the file.
    lines: usize,
    /// How many of them the database task has written (the file is truncated when all are).
    written: usize,
}

impl Spool {
    /// Opens the spool, returning the records it holds from an earlier run.
    fn open(path: &Path) -> std::io::Result<(Self, Vec<UsageRecord>)> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut records = Vec::new();
        if path.exists() {
            let reader = BufReader::new(File::open(path)?);
            for (n, line) in reader.lines().enumerate() {
                let line = line?;
                if line.trim().is_empty() {
                    continue;
                }
                match serde_json::from_str::<UsageRecord>(&line) {
                    Ok(r) => records.push(r),
                    // Only the last line can be torn (a crash mid-append); it was never
                    // acknowledged.
                    Err(e) => tracing::warn!(
                        spool = %path.display(),
                        line = n + 1,
                        "skipping an unreadable spool line: {e}"
                    ),
                }
            }
        }
        let file = Arc::new(OpenOptions::new().create(true).append(true).open(path)?);
        let lines = records.len();
        // Rewrite cleanly so a torn tail does not glue onto the next append.
        let mut spool = Self {
            path: path.to_path_buf(),
            file,
            lines,
            written: 0,
        };
        spool.rewrite(&records)?;
        Ok((spool, records))
    }

    fn rewrite(&mut self, records: &[UsageRecord]) -> std::io::Result<()> {
        let tmp = self.path.with_extension("spool.tmp");
        {
            let mut f = File::create(&tmp)?;
            for r in records {
                serde_json::to_writer(&mut f, r)?;
                f.write_all(b"\n")?;
            }
            f.sync_data()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        self.file = Arc::new(OpenOptions::new().append(true).open(&self.path)?);
        self.lines = records.len();
        Ok(())
    }

    /// Appends `records` and syncs.
    fn append(&mut self, records: &[UsageRecord]) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(records.len() * 512);
        for r in records {
            serde_json::to_writer(&mut buf, r)?;
            buf.push(b'\n');
        }
        self.append_bytes(&buf, records.len(), true)
    }

    /// Appends `lines` serialized lines.
    fn append_bytes(&mut self, buf: &[u8], lines: usize, sync: bool) -> std::io::Result<()> {
        let before = self.file.metadata()?.len();
        let written = (&*self.file).write_all(buf).and_then(|()| {
            if sync {
                self.file.sync_data()
            } else {
                Ok(())
            }
        });
        if let Err(e) = written {
            // Never leave a torn line for the next append to glue onto.
            let _ = self.file.set_len(before);
            return Err(e);
        }
        self.lines += lines;
        Ok(())
    }

    /// Notes that `n` more spooled records are in the database; once all of them are, starts
    /// an empty spool. Returns the old file's handle, to be dropped after the spool's lock is
    /// released.
    fn written(&mut self, n: usize) -> std::io::Result<Option<Arc<File>>> {
        self.written += n;
        if self.written < self.lines || self.lines == 0 {
            return Ok(None);
        }
        self.lines = 0;
        self.written = 0;
        // A fresh empty file renamed over the spool: two quick directory operations, where
        // truncating in place took milliseconds with every append waiting on the lock. The old
        // file's blocks are freed when its last handle closes, outside the lock. Nothing is
        // synced: should the swap be lost in a crash, the replay re-inserts records the
        // database already holds, which it skips.
        let tmp = self.path.with_extension("spool.new");
        let fresh = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&tmp)
            .and_then(|f| std::fs::rename(&tmp, &self.path).map(|()| f));
        match fresh {
            Ok(f) => {
                // Reopened in append mode, like the file it replaces.
                drop(f);
                let f = OpenOptions::new().append(true).open(&self.path)?;
                Ok(Some(std::mem::replace(&mut self.file, Arc::new(f))))
            }
            Err(e) => {
                tracing::warn!("cannot start a new spool file ({e}); truncating in place");
                let _ = std::fs::remove_file(&tmp);
                self.file.set_len(0)?;
                Ok(None)
            }
        }
    }
}

/// Flushes the spool for [`SpoolSync::Every`].
struct Syncer {
    spool: Weak<Mutex<Spool>>,
    /// Something was appended since the last sync.
    dirty: AtomicBool,
}

impl Syncer {
    /// Syncs the spool if anything was appended. The file's handle is taken under the spool's
    /// lock, the sync runs outside it, so appends never wait for the disk.
    fn sync(&self) {
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return;
        }
        let Some(spool) = self.spool.upgrade() else {
            return;
        };
        let file = lock(&spool).file.clone();
        if let Err(e) = file.sync_data() {
            self.dirty.store(true, Ordering::Release);
            tracing::error!("usage ledger spool sync failed: {e}");
        }
    }

    /// Syncs every `interval` until the ledger is gone.
    fn run(this: &Weak<Self>, interval: Duration) {
        loop {
            std::thread::sleep(interval);
            match this.upgrade() {
                Some(s) => s.sync(),
                None => break,
            }
        }
    }
}

impl Ledger {
    /// Opens the spool at `spool_path`, replays it, and starts the writer.
    pub fn start(
        store: Store,
        spool_path: &Path,
        sync: SpoolSync,
        gauges: LedgerGauges,
    ) -> anyhow::Result<Self> {
        let lock = lock_spool(spool_path)?;
        let (spool, replay) = Spool::open(spool_path).map_err(|e| {
            anyhow::anyhow!("cannot open the ledger spool {}: {e}", spool_path.display())
        })?;
        if !replay.is_empty() {
            tracing::info!(records = replay.len(), spool = %spool_path.display(), "replaying spooled usage records");
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
        let writer = DbWriter {
            store,
            spool: spool.clone(),
            pending: replay.into_iter().map(|r| (r, true)).collect(),
            gauges,
        };
        let handle = tokio::spawn(async move {
            writer.run(db_rx).await;
            let _ = spooler.join();
        });
        Ok(Self {
            tx,
            spool,
            _lock: Arc::new(lock),
            syncer,
            writer: Arc::new(tokio::sync::Mutex::new(Some(handle))),
        })
    }

    /// After `close`: the spool thread is gone, so append here (replayed at the next start).
    fn append_late(&self, record: UsageRecord) {
        let mut s = lock(&self.spool);
        match s.append(std::slice::from_ref(&record)) {
            Ok(()) => {
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
    /// `write` returns) and hands it on to the database writer.
    fn append_now(&self, record: UsageRecord, syncer: &Syncer) {
        let mut line = Vec::with_capacity(512);
        let encoded = serde_json::to_writer(&mut line, &record);
        line.push(b'\n');
        // A short section (one `write` of one line), never held across an `.await`.
        let spooled = encoded.map_err(std::io::Error::from).and_then(|()| {
            let mut s = lock(&self.spool);
            s.append_bytes(&line, 1, false)
        });
        let spooled = match spooled {
            Ok(()) => {
                syncer.dirty.store(true, Ordering::Release);
                true
            }
            Err(e) => {
                // Without the spool the database write is the only copy; it is still tried.
                tracing::error!(id = %record.id, "usage ledger spool append failed: {e}");
                false
            }
        };
        let msg = Msg::Appended {
            record: Box::new(record),
            spooled,
        };
        if let Err(mpsc::error::SendError(Msg::Appended { record, spooled })) = self.tx.send(msg) {
            // Closed: the spool already holds it for the next start.
            if spooled {
                tracing::warn!(id = %record.id, "usage record arrived after the ledger closed: spooled for the next start");
            } else {
                tracing::error!(id = %record.id, "usage ledger is closed and the spool failed: record lost");
            }
        }
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

fn lock(spool: &Mutex<Spool>) -> std::sync::MutexGuard<'_, Spool> {
    spool
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The spool thread: appends and syncs batches, releases their waiters, hands the records on.
fn spool_loop(
    mut rx: mpsc::UnboundedReceiver<Msg>,
    spool: &Mutex<Spool>,
    db: &mpsc::UnboundedSender<Option<Vec<(UsageRecord, bool)>>>,
    gauges: &LedgerGauges,
) {
    let mut stopping = false;
    while !stopping {
        let Some(first) = rx.blocking_recv() else {
            break;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        if batch.iter().any(|m| matches!(m, Msg::Stop)) {
            // Refuse new records (senders then append to the spool themselves) and take what
            // is already queued.
            stopping = true;
            rx.close();
            while let Ok(m) = rx.try_recv() {
                batch.push(m);
            }
        }
        let mut records = Vec::with_capacity(batch.len());
        let mut waiters = Vec::with_capacity(batch.len());
        let mut appended = Vec::new();
        for m in batch {
            match m {
                Msg::Record { record, durable } => {
                    records.push(*record);
                    waiters.extend(durable);
                }
                Msg::Appended { record, spooled } => appended.push((*record, spooled)),
                Msg::Stop => {}
            }
        }
        if !appended.is_empty() {
            gauges.spooled.set(lock(spool).lines as i64);
            let _ = db.send(Some(appended));
        }
        if !records.is_empty() {
            let mut s = lock(spool);
            let spooled = match s.append(&records) {
                Ok(()) => true,
                Err(e) => {
                    // Without the spool the database write is the only copy; it is still tried.
                    tracing::error!("usage ledger spool append failed: {e}");
                    false
                }
            };
            gauges.spooled.set(s.lines as i64);
            drop(s);
            for w in waiters {
                let _ = w.send(());
            }
            let _ = db.send(Some(records.into_iter().map(|r| (r, spooled)).collect()));
        }
    }
    let _ = db.send(None);
}

/// Takes an exclusive lock next to the spool, so two processes never share one spool (one
/// would truncate the other's records).
fn lock_spool(spool_path: &Path) -> anyhow::Result<File> {
    if let Some(dir) = spool_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    }
    let path = spool_path.with_extension("spool.lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(anyhow::anyhow!(
            "the ledger spool {} is in use by another process; give each gateway its own --spool",
            spool_path.display()
        )),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(anyhow::anyhow!("cannot lock {}: {e}", path.display()))
        }
    }
}

/// The database task: inserts spooled records, retrying while the database is down.
struct DbWriter {
    store: Store,
    spool: Arc<Mutex<Spool>>,
    /// Records not yet known to be in the database, in spool order, each with whether it is
    /// in the spool file.
    pending: Vec<(UsageRecord, bool)>,
    gauges: LedgerGauges,
}

impl DbWriter {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Option<Vec<(UsageRecord, bool)>>>) {
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
    async fn flush(&mut self) -> bool {
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

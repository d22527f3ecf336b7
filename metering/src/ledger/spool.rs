//! The spool: the local append-only file every record reaches before the database (replayed at
//! start), the thread that appends and syncs batches of records (`spool_loop`), the syncer of
//! [`super::SpoolSync::Every`], and the lock that keeps two processes off one spool.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::mpsc;

use super::{LedgerGauges, Msg, MAX_BATCH};
use crate::store::UsageRecord;

/// The append-only spool file.
pub(super) struct Spool {
    pub(super) path: PathBuf,
    /// Shared with the syncer, which syncs outside the spool's lock.
    pub(super) file: Arc<File>,
    /// Lines in the file.
    pub(super) lines: usize,
    /// How many of them the database task has written (the file is truncated when all are).
    pub(super) written: usize,
}

impl Spool {
    /// Opens the spool, returning the records it holds from an earlier run.
    pub(super) fn open(path: &Path) -> std::io::Result<(Self, Vec<UsageRecord>)> {
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

    pub(super) fn rewrite(&mut self, records: &[UsageRecord]) -> std::io::Result<()> {
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
    pub(super) fn append(&mut self, records: &[UsageRecord]) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(records.len() * 512);
        for r in records {
            serde_json::to_writer(&mut buf, r)?;
            buf.push(b'\n');
        }
        self.append_bytes(&buf, records.len(), true)
    }

    /// Appends `lines` serialized lines.
    pub(super) fn append_bytes(
        &mut self,
        buf: &[u8],
        lines: usize,
        sync: bool,
    ) -> std::io::Result<()> {
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
    pub(super) fn written(&mut self, n: usize) -> std::io::Result<Option<Arc<File>>> {
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
pub(super) struct Syncer {
    pub(super) spool: Weak<Mutex<Spool>>,
    /// Something was appended since the last sync.
    pub(super) dirty: AtomicBool,
}

impl Syncer {
    /// Syncs the spool if anything was appended. The file's handle is taken under the spool's
    /// lock, the sync runs outside it, so appends never wait for the disk.
    pub(super) fn sync(&self) {
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
    pub(super) fn run(this: &Weak<Self>, interval: Duration) {
        loop {
            std::thread::sleep(interval);
            match this.upgrade() {
                Some(s) => s.sync(),
                None => break,
            }
        }
    }
}

pub(super) fn lock(spool: &Mutex<Spool>) -> std::sync::MutexGuard<'_, Spool> {
    spool
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The spool thread: appends and syncs batches, releases their waiters, hands the records on.
pub(super) fn spool_loop(
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
pub(super) fn lock_spool(spool_path: &Path) -> anyhow::Result<File> {
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

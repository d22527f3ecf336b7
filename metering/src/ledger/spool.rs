//! The spool: the local append-only file every record reaches before the database (replayed at
//! start), the thread that appends and syncs batches of records (`spool_loop`), the syncer of
//! [`super::SpoolSync::Every`], and the lock that keeps two processes off one spool.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::mpsc;

use super::{gauge, LedgerGauges, Msg, MAX_BATCH};
use crate::store::UsageRecord;

/// A record not yet known to be in the database, with the generation of the spool file that
/// holds it (`None`: the spool could not take it, so memory is its only copy).
pub(super) type Pending = (UsageRecord, Option<u64>);

/// The append-only spool file.
pub(super) struct Spool {
    pub(super) path: PathBuf,
    /// Shared with the syncer, which syncs outside the spool's lock.
    pub(super) file: Arc<File>,
    /// Lines in the file.
    pub(super) lines: usize,
    /// Bytes in the file: only this process appends to it (it holds the spool's lock), so
    /// an append needs no `fstat` to know where a torn line would start.
    len: u64,
    /// How many of them the database task has written (the file is truncated when all are).
    pub(super) written: usize,
    /// Counts the files this spool has started: a record is tagged with the generation whose
    /// file holds it, so the database task knows which file a line it is told of is in.
    pub(super) generation: u64,
    /// The directory entry of the current file may not be on disk yet (its `fsync` after a
    /// rename failed): it is synced before the next sync of a record.
    dir_unsynced: bool,
}

/// The filesystem calls the spool's durability rests on, in one place so their order can be
/// checked: a file created or renamed is only on disk once its directory is `fsync`ed (as
/// SQLite and PostgreSQL do), so every rename is followed by a directory sync before a record
/// relies on the new file. Tests record the calls of their own thread.
mod fs_ops {
    use std::fs::File;
    use std::path::Path;

    #[cfg(test)]
    thread_local! {
        pub(super) static CALLS: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    #[cfg(test)]
    fn note(call: String) {
        CALLS.with(|c| c.borrow_mut().push(call));
    }

    #[cfg(not(test))]
    fn note(_call: String) {}

    use super::name_of as name;

    pub(super) fn rename(from: &Path, to: &Path) -> std::io::Result<()> {
        note(format!("rename {} {}", name(from), name(to)));
        std::fs::rename(from, to)
    }

    /// `fdatasync` of a spool file's data.
    pub(super) fn sync_data(file: &File, what: &str) -> std::io::Result<()> {
        note(format!("fdatasync {what}"));
        file.sync_data()
    }

    /// `fsync` of the directory holding `path`, so its entries (creations, renames) survive a
    /// power loss.
    pub(super) fn sync_dir(path: &Path) -> std::io::Result<()> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        note("fsync dir".to_string());
        File::open(dir)?.sync_all()
    }
}

/// Lines read from a spool file: the records, where the next read starts, and how many lines
/// were consumed (unreadable ones included).
pub(super) struct Read {
    pub(super) records: Vec<UsageRecord>,
    pub(super) next: u64,
    pub(super) lines: usize,
}

/// Reads up to `max` complete lines of the spool file at `path` from byte `offset`. A last
/// line without its newline is being appended (or was torn by a crash) and is left for the
/// next read.
pub(super) fn read_lines(path: &Path, offset: u64, max: usize) -> std::io::Result<Read> {
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    let mut reader = BufReader::new(file);
    let mut read = Read {
        records: Vec::new(),
        next: offset,
        lines: 0,
    };
    let mut line = Vec::new();
    while read.lines < max {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 || line.last() != Some(&b'\n') {
            break;
        }
        read.next += n as u64;
        read.lines += 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<UsageRecord>(&line) {
            Ok(r) => read.records.push(r),
            Err(e) => tracing::warn!(
                spool = %path.display(),
                offset = read.next - n as u64,
                "skipping an unreadable spool line: {e}"
            ),
        }
    }
    Ok(read)
}

impl Spool {
    /// Opens the spool; the records an earlier run left in it stay there, for the database
    /// task to read back (see [`read_lines`]) rather than all at once into memory.
    pub(super) fn open(path: &Path) -> std::io::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        // Rewritten line by line, keeping the readable ones, so a torn tail (a crash
        // mid-append, never acknowledged) does not glue onto the next append.
        let tmp = path.with_extension("spool.tmp");
        let mut lines = 0;
        {
            let mut out = std::io::BufWriter::new(File::create(&tmp)?);
            if path.exists() {
                let reader = BufReader::new(File::open(path)?);
                for (n, line) in reader.lines().enumerate() {
                    let line = line?;
                    if line.trim().is_empty() {
                        continue;
                    }
                    match serde_json::from_str::<serde::de::IgnoredAny>(&line) {
                        Ok(_) => {
                            out.write_all(line.as_bytes())?;
                            out.write_all(b"\n")?;
                            lines += 1;
                        }
                        Err(e) => tracing::warn!(
                            spool = %path.display(),
                            line = n + 1,
                            "skipping an unreadable spool line: {e}"
                        ),
                    }
                }
            }
            let out = out.into_inner().map_err(|e| e.into_error())?;
            fs_ops::sync_data(&out, &name_of(&tmp))?;
        }
        fs_ops::rename(&tmp, path)?;
        fs_ops::sync_dir(path)?;
        let file = OpenOptions::new().append(true).open(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            len: file.metadata()?.len(),
            file: Arc::new(file),
            lines,
            written: 0,
            generation: 0,
            dir_unsynced: false,
        })
    }

    /// Appends `records` and syncs; returns the generation of the file that holds them.
    pub(super) fn append(&mut self, records: &[UsageRecord]) -> std::io::Result<u64> {
        let mut buf = Vec::with_capacity(records.len() * 512);
        for r in records {
            serde_json::to_writer(&mut buf, r)?;
            buf.push(b'\n');
        }
        self.append_bytes(&buf, records.len(), true)
    }

    /// Appends `lines` serialized lines; returns the generation of the file that holds them.
    pub(super) fn append_bytes(
        &mut self,
        buf: &[u8],
        lines: usize,
        sync: bool,
    ) -> std::io::Result<u64> {
        if sync {
            // The records below are acknowledged as on disk: so must be the file's name.
            self.sync_dir_if_needed()?;
        }
        let before = self.len;
        let written = (&*self.file).write_all(buf).and_then(|()| {
            if sync {
                fs_ops::sync_data(&self.file, &name_of(&self.path))
            } else {
                Ok(())
            }
        });
        if let Err(e) = written {
            // Never leave a torn line for the next append to glue onto.
            let _ = self.file.set_len(before);
            return Err(e);
        }
        self.len = before + buf.len() as u64;
        self.lines += lines;
        Ok(self.generation)
    }

    /// Notes that `n` more spooled records are in the database; once all of them are, starts
    /// an empty spool. Returns the old file's handle, to be dropped after the spool's lock is
    /// released.
    pub(super) fn written(&mut self, n: usize) -> std::io::Result<Option<Arc<File>>> {
        self.written += n;
        if self.written < self.lines || self.lines == 0 {
            return Ok(None);
        }
        self.restart()
    }

    /// Starts an empty spool if the file ends at `offset` (everything in it was read back and
    /// is in the database); `Ok(None)` when lines were appended since.
    pub(super) fn restart_if_read_to(
        &mut self,
        offset: u64,
    ) -> std::io::Result<Option<Option<Arc<File>>>> {
        if self.file.metadata()?.len() != offset {
            return Ok(None);
        }
        self.restart().map(Some)
    }

    /// Replaces the file with an empty one (see [`Spool::written`]).
    fn restart(&mut self) -> std::io::Result<Option<Arc<File>>> {
        self.lines = 0;
        self.written = 0;
        self.len = 0;
        self.generation += 1;
        // A fresh empty file renamed over the spool: two quick directory operations, where
        // truncating in place took milliseconds with every append waiting on the lock. The old
        // file's blocks are freed when its last handle closes, outside the lock. The directory
        // is then synced: until it is, a power loss could bring back the old file (harmless:
        // its records are in the database) and lose the new one with records appended to it
        // since (not harmless), so no record is synced into the new file before that.
        let tmp = self.path.with_extension("spool.new");
        let fresh = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&tmp)
            .and_then(|f| fs_ops::rename(&tmp, &self.path).map(|()| f));
        match fresh {
            Ok(f) => {
                // Reopened in append mode, like the file it replaces.
                drop(f);
                let f = OpenOptions::new().append(true).open(&self.path)?;
                let old = std::mem::replace(&mut self.file, Arc::new(f));
                self.dir_unsynced = true;
                if let Err(e) = self.sync_dir_if_needed() {
                    tracing::error!("usage ledger: cannot sync the spool's directory (retried before the next record): {e}");
                }
                Ok(Some(old))
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

impl Spool {
    /// Syncs the spool's directory if a rename since the last sync is not known to be on disk.
    fn sync_dir_if_needed(&mut self) -> std::io::Result<()> {
        if self.dir_unsynced {
            fs_ops::sync_dir(&self.path)?;
            self.dir_unsynced = false;
        }
        Ok(())
    }
}

fn name_of(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
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
        let file = {
            let mut s = lock(&spool);
            if let Err(e) = s.sync_dir_if_needed() {
                self.dirty.store(true, Ordering::Release);
                tracing::error!("usage ledger spool directory sync failed: {e}");
                return;
            }
            s.file.clone()
        };
        if let Err(e) = fs_ops::sync_data(&file, "spool") {
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
    db: &mpsc::UnboundedSender<Option<Vec<Pending>>>,
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
        for m in batch {
            match m {
                Msg::Record { record, durable } => {
                    records.push(*record);
                    waiters.extend(durable);
                }
                Msg::Stop => {}
            }
        }
        if !records.is_empty() {
            let mut s = lock(spool);
            let spooled = match s.append(&records) {
                Ok(generation) => Some(generation),
                Err(e) => {
                    // Without the spool the database write is the only copy; it is still tried.
                    tracing::error!("usage ledger spool append failed: {e}");
                    None
                }
            };
            gauges.spooled.set(gauge(s.lines));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> UsageRecord {
        UsageRecord {
            id: id.into(),
            ..UsageRecord::default()
        }
    }

    /// `--spool-sync always` promises a record is on disk when its response completes: the
    /// file it is synced into must itself be on disk, so each rename that put a file in place
    /// is followed by a sync of the directory before a record is synced into that file.
    #[test]
    fn a_renamed_spool_file_is_on_disk_before_a_record_is_synced_into_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.spool");
        fs_ops::CALLS.with(|c| c.borrow_mut().clear());
        let mut spool = Spool::open(&path).unwrap();
        spool.append(&[record("a")]).unwrap();
        // Everything in the database: a fresh file replaces this one.
        assert!(spool.written(1).unwrap().is_some());
        spool.append(&[record("b")]).unwrap();
        let calls = fs_ops::CALLS.with(|c| c.take());
        assert_eq!(
            calls,
            [
                "fdatasync ledger.spool.tmp",
                "rename ledger.spool.tmp ledger.spool",
                "fsync dir",
                "fdatasync ledger.spool",
                "rename ledger.spool.new ledger.spool",
                "fsync dir",
                "fdatasync ledger.spool",
            ]
        );
        let read = read_lines(&path, 0, 10).unwrap();
        assert_eq!(read.records, [record("b")]);
    }
}

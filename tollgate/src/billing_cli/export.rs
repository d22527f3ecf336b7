//! `tollgate usage export`: records in ledger order, filtered like `GET /admin/v1/usage/records`,
//! to stdout, a file, or (for cron) a new file per run in a directory, following a cursor kept
//! in a file.
//!
//! What makes it safe from cron: the cursor moves only after the run's output is on disk (a
//! crash repeats records, never skips one); with `--output-dir` each run that finds records
//! writes a file of its own, named by the cursor range it covers, so a batch whose upload
//! failed is still there at the next run (the consumer deletes a file once it is delivered);
//! and a CSV header is written once per file, not once per run.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use tollgate_metering::billing::views::RecordView;
use tollgate_metering::billing::{record_cells, RECORD_COLUMNS};
use tollgate_metering::export_formats::{self, StripeMapping};
use tollgate_metering::store::{RecordFilter, Store, UsageRecord};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    Csv,
    Jsonl,
    /// One CloudEvents 1.0 JSON event per line (`id` = record id, `subject` = customer).
    Cloudevents,
    /// One Stripe billing meter event per line (`identifier` = record id).
    Stripe,
}

/// Records read per database round trip while exporting.
const EXPORT_PAGE: i64 = 5_000;

/// Where a run's records go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Stdout,
    /// One file: replaced by a one-off export, appended to by a cursor export.
    File(PathBuf),
    /// A new file per run that finds records, named by its cursor range.
    Dir(PathBuf),
}

/// One export run.
pub struct Export {
    pub format: ExportFormat,
    pub filter: RecordFilter,
    /// Only records with this tag (the cursor still passes the others).
    pub tag: Option<(String, String)>,
    pub stripe: StripeMapping,
    pub cursor_file: Option<PathBuf>,
    pub destination: Destination,
}

impl Export {
    fn line(&self, r: &UsageRecord) -> anyhow::Result<serde_json::Value> {
        Ok(match self.format {
            ExportFormat::Cloudevents => export_formats::cloudevent(r),
            ExportFormat::Stripe => export_formats::stripe_meter_event(r, &self.stripe)
                .map_err(|e| anyhow::anyhow!("{e}"))?,
            ExportFormat::Csv | ExportFormat::Jsonl => serde_json::to_value(RecordView::from(r))?,
        })
    }

    fn extension(&self) -> &'static str {
        match self.format {
            ExportFormat::Csv => "csv",
            _ => "jsonl",
        }
    }

    /// Copies the records after `start` to `w` page by page (the CSV header first when
    /// `header`): returns how many were written and the cursor reached.
    async fn copy(
        &self,
        store: &Store,
        start: i64,
        w: &mut dyn Write,
        header: bool,
    ) -> anyhow::Result<(usize, i64)> {
        let mut out = if self.format == ExportFormat::Csv {
            let mut csv = csv::Writer::from_writer(w);
            if header {
                csv.write_record(RECORD_COLUMNS)?;
            }
            Out::Csv(Box::new(csv))
        } else {
            Out::Lines(w)
        };
        let (mut count, mut cursor) = (0, start);
        loop {
            let page = store
                .records_page(&self.filter, cursor, EXPORT_PAGE)
                .await?;
            if let Some(last) = page.last {
                cursor = last;
            }
            let wanted = page.records.iter().filter(|r| {
                self.tag
                    .as_ref()
                    .is_none_or(|(k, v)| r.tags.get(k) == Some(v))
            });
            for r in wanted {
                count += 1;
                match &mut out {
                    Out::Csv(csv) => csv.write_record(record_cells(r))?,
                    Out::Lines(w) => {
                        serde_json::to_writer(&mut **w, &self.line(r)?)?;
                        w.write_all(b"\n")?;
                    }
                }
            }
            if !page.has_more {
                break;
            }
        }
        match out {
            Out::Csv(mut csv) => csv.flush()?,
            Out::Lines(w) => w.flush()?,
        }
        Ok((count, cursor))
    }

    /// Runs the export: returns how many records were written and the cursor reached.
    pub async fn run(&self, store: &Store) -> anyhow::Result<(usize, i64)> {
        let start = match &self.cursor_file {
            Some(p) => read_cursor(p)?,
            None => 0,
        };
        let (count, cursor) = match &self.destination {
            Destination::Stdout => {
                let mut out = std::io::BufWriter::new(std::io::stdout().lock());
                // Appended runs (`>> usage.csv`) carry the header once: on the first run.
                let header = self.cursor_file.is_none() || start == 0;
                self.copy(store, start, &mut out, header).await?
            }
            Destination::File(p) if self.cursor_file.is_some() => {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .with_context(|| format!("cannot open {}", p.display()))?;
                let empty = f.metadata()?.len() == 0;
                let mut out = std::io::BufWriter::new(&f);
                let done = self.copy(store, start, &mut out, empty).await?;
                drop(out);
                f.sync_all()?;
                done
            }
            Destination::File(p) => {
                let tmp = temporary(p);
                let done = self.copy(store, start, &mut create(&tmp)?, true).await;
                let done = done.inspect_err(|_| drop(std::fs::remove_file(&tmp)))?;
                finish(&tmp, p)?;
                done
            }
            Destination::Dir(dir) => {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
                let tmp = dir.join(format!(".usage-{}.tmp", std::process::id()));
                let done = self.copy(store, start, &mut create(&tmp)?, true).await;
                let (count, cursor) = done.inspect_err(|_| drop(std::fs::remove_file(&tmp)))?;
                if count == 0 {
                    std::fs::remove_file(&tmp)?;
                } else {
                    let name = format!(
                        "usage-{:016}-{:016}.{}",
                        start + 1,
                        cursor,
                        self.extension()
                    );
                    finish(&tmp, &dir.join(name))?;
                }
                (count, cursor)
            }
        };
        // Only after the output is on disk: a crash before this re-exports, never skips.
        if let Some(p) = &self.cursor_file {
            if cursor != start {
                write_cursor(p, cursor)?;
            }
        }
        Ok((count, cursor))
    }
}

enum Out<'a> {
    Csv(Box<csv::Writer<&'a mut dyn Write>>),
    Lines(&'a mut dyn Write),
}

/// The temporary file a whole file is written to before it is renamed into place.
fn temporary(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{}.tmp", name.unwrap_or_default()))
}

fn create(path: &Path) -> anyhow::Result<std::io::BufWriter<std::fs::File>> {
    Ok(std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("cannot write {}", path.display()))?,
    ))
}

/// Syncs `tmp`, renames it to `path` and syncs the directory (so the rename survives a power
/// loss).
fn finish(tmp: &Path, path: &Path) -> anyhow::Result<()> {
    std::fs::File::open(tmp)?.sync_all()?;
    std::fs::rename(tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => sync_dir(d),
        _ => sync_dir(Path::new(".")),
    }
}

fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync {}", dir.display()))?;
    Ok(())
}

fn read_cursor(path: &Path) -> anyhow::Result<i64> {
    match std::fs::read_to_string(path) {
        Ok(text) if text.trim().is_empty() => Ok(0),
        Ok(text) => tollgate_metering::store::parse_cursor(&text)
            .map_err(|e| anyhow::anyhow!("cursor file {}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Replaces the cursor file atomically (write, sync, rename, sync the directory).
fn write_cursor(path: &Path, cursor: i64) -> anyhow::Result<()> {
    let tmp = temporary(path);
    let mut f = create(&tmp)?;
    writeln!(f, "{cursor}")?;
    f.flush()?;
    drop(f);
    finish(&tmp, path)
}

/// `--from`/`--to` cannot be combined with a cursor: a record started inside a past window can
/// be written after the cursor passed it (a long stream, an outage); cursor exports follow the
/// ledger order alone so they never skip one.
pub fn check_cursor_window(cursor: bool, filter: &RecordFilter) -> anyhow::Result<()> {
    if cursor && (filter.start.is_some() || filter.end.is_some()) {
        bail!("--cursor-file exports everything after the cursor; it cannot be combined with --from/--to");
    }
    Ok(())
}

//! `tollgate usage`: reports (by customer, model, key, day), invoices, and incremental exports of
//! the records (CSV, JSONL, Stripe meter events) that follow a cursor kept in a file.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Subcommand;
use serde_json::json;
use tollgate_metering::billing::{self, parse_time, record_cells, record_json, RECORD_COLUMNS};
use tollgate_metering::export_formats::{self, StripeMapping};
use tollgate_metering::store::UsageFilter;

use super::{print, DbArgs};

enum Out {
    Csv(Box<csv::Writer<Box<dyn Write>>>),
    Jsonl(Box<dyn Write>),
}

/// Records read per database round trip while exporting.
const EXPORT_PAGE: i64 = 5_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    Csv,
    Jsonl,
    /// One CloudEvents 1.0 JSON event per line (`id` = record id, `subject` = customer).
    Cloudevents,
    /// One Stripe billing meter event per line (`identifier` = record id).
    Stripe,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    Json,
    Csv,
}

#[derive(Debug, Subcommand)]
pub enum UsageCommand {
    /// Export raw usage records, for a time range or incrementally from a saved cursor.
    ///
    /// With `--cursor-file`, only records after the saved cursor are written and the cursor is
    /// advanced after the output is complete, so a cron job can run this repeatedly without
    /// gaps or duplicates.
    Export {
        /// Records started at or after this time (RFC 3339 or YYYY-MM-DD).
        #[arg(long)]
        from: Option<String>,
        /// Records started before this time.
        #[arg(long)]
        to: Option<String>,
        #[arg(long, value_enum, default_value = "jsonl")]
        format: ExportFormat,
        /// Cursor state file (created when missing).
        #[arg(long)]
        cursor_file: Option<PathBuf>,
        /// Only records with this tag (`key:value`); the cursor still passes the others.
        #[arg(long)]
        tag: Option<String>,
        /// `--format stripe`: the meter events' `event_name`.
        #[arg(long, default_value = tollgate_metering::export_formats::STRIPE_EVENT_NAME)]
        stripe_event_name: String,
        /// `--format stripe`: the payload key holding the customer (the meter's
        /// `customer_mapping.event_payload_key`).
        #[arg(long, default_value = tollgate_metering::export_formats::STRIPE_CUSTOMER_KEY)]
        stripe_customer_key: String,
        /// `--format stripe`: a JSON object mapping Tollgate customer ids to Stripe customer ids;
        /// a record of a customer not in it stops the export (the cursor is not advanced).
        /// Without it, Tollgate customer ids are sent as they are.
        #[arg(long)]
        stripe_customer_map: Option<PathBuf>,
        /// Write here instead of stdout.
        #[arg(long, short)]
        output: Option<PathBuf>,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Aggregate usage (as `GET /admin/v1/usage`).
    Report {
        #[arg(long)]
        from: Option<String>,
        #[arg(long)]
        to: Option<String>,
        #[arg(long)]
        customer_id: Option<String>,
        #[arg(long)]
        model: Option<String>,
        /// Only records with this tag (`key:value`).
        #[arg(long)]
        tag: Option<String>,
        /// Comma-separated: customer, model, key, day, tag:KEY.
        #[arg(long, default_value = "")]
        group_by: String,
        #[arg(long, value_enum, default_value = "json")]
        format: ReportFormat,
        #[command(flatten)]
        db: DbArgs,
    },
    /// A customer's invoice for a month (as `GET /admin/v1/invoices/{id}`).
    Invoice {
        customer_id: String,
        /// YYYY-MM; the current month when absent.
        #[arg(long)]
        period: Option<String>,
        /// Only records with this tag (`key:value`).
        #[arg(long)]
        tag: Option<String>,
        /// `tag:KEY`: lines split by the value of this tag.
        #[arg(long)]
        group_by: Option<String>,
        #[command(flatten)]
        db: DbArgs,
    },
}

fn tag_arg(text: Option<&str>) -> anyhow::Result<Option<(String, String)>> {
    text.map(|t| billing::parse_tag_filter(t).map_err(|e| anyhow::anyhow!("--tag: {e}")))
        .transpose()
}

fn time_arg(text: Option<&str>, name: &str, default: i64) -> anyhow::Result<i64> {
    match text {
        Some(t) => parse_time(t).map_err(|e| anyhow::anyhow!("--{name}: {e}")),
        None => Ok(default),
    }
}

fn read_cursor(path: &Path) -> anyhow::Result<i64> {
    match std::fs::read_to_string(path) {
        Ok(text) if text.trim().is_empty() => Ok(0),
        Ok(text) => tollgate_gateway::api::admin::parse_cursor(&text)
            .map_err(|e| anyhow::anyhow!("cursor file {}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Replaces the cursor file atomically (write, sync, rename).
fn write_cursor(path: &Path, cursor: i64) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        writeln!(f, "{cursor}")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

pub async fn usage(cmd: UsageCommand) -> anyhow::Result<()> {
    match cmd {
        UsageCommand::Export {
            from,
            to,
            format,
            cursor_file,
            tag,
            stripe_event_name,
            stripe_customer_key,
            stripe_customer_map,
            output,
            db,
        } => {
            let tag = tag_arg(tag.as_deref())?;
            let mut stripe = StripeMapping::new();
            stripe.event_name = stripe_event_name;
            stripe.customer_key = stripe_customer_key;
            if let Some(p) = &stripe_customer_map {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read {}", p.display()))?;
                stripe.customers = serde_json::from_str(&text).with_context(|| {
                    format!("{}: not a JSON object of customer ids", p.display())
                })?;
            }
            if cursor_file.is_some() && (from.is_some() || to.is_some()) {
                // A record started inside a past window can be written after the cursor
                // passed it (a long stream, an outage); cursor exports follow the ledger order
                // alone so they never skip one.
                bail!("--cursor-file exports everything after the cursor; it cannot be combined with --from/--to");
            }
            let start = time_arg(from.as_deref(), "from", i64::MIN)?;
            let end = time_arg(to.as_deref(), "to", i64::MAX)?;
            let store = db.open().await?;
            let mut cursor = match &cursor_file {
                Some(p) => read_cursor(p)?,
                None => 0,
            };
            let sink: Box<dyn Write> = match &output {
                Some(p) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(p)
                        .with_context(|| format!("cannot create {}", p.display()))?,
                )),
                None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
            };
            let mut out = match format {
                ExportFormat::Csv => {
                    let mut w = csv::Writer::from_writer(sink);
                    w.write_record(RECORD_COLUMNS)?;
                    Out::Csv(Box::new(w))
                }
                ExportFormat::Jsonl | ExportFormat::Cloudevents | ExportFormat::Stripe => {
                    Out::Jsonl(sink)
                }
            };
            let mut count = 0usize;
            loop {
                let (records, last) = store
                    .records_between(start, end, cursor, EXPORT_PAGE)
                    .await?;
                let wanted = records
                    .iter()
                    .filter(|r| tag.as_ref().is_none_or(|(k, v)| r.tags.get(k) == Some(v)));
                for r in wanted {
                    count += 1;
                    match &mut out {
                        Out::Csv(w) => w.write_record(record_cells(r))?,
                        Out::Jsonl(w) => {
                            let line = match format {
                                ExportFormat::Cloudevents => export_formats::cloudevent(r),
                                ExportFormat::Stripe => {
                                    export_formats::stripe_meter_event(r, &stripe)
                                        .map_err(|e| anyhow::anyhow!("{e}"))?
                                }
                                _ => record_json(r),
                            };
                            serde_json::to_writer(&mut *w, &line)?;
                            w.write_all(b"\n")?;
                        }
                    }
                }
                match last {
                    Some(c) => cursor = c,
                    None => break,
                }
                if (records.len() as i64) < EXPORT_PAGE {
                    break;
                }
            }
            let mut sink = match out {
                Out::Csv(w) => w.into_inner().map_err(|e| e.into_error())?,
                Out::Jsonl(w) => w,
            };
            sink.flush()?;
            drop(sink);
            if let Some(p) = &output {
                std::fs::File::open(p)?.sync_all()?;
            }
            // Only after the output is complete: a crash before this re-exports, never skips.
            if let Some(p) = &cursor_file {
                write_cursor(p, cursor)?;
            }
            eprintln!("exported {count} records; cursor {cursor}");
            Ok(())
        }
        UsageCommand::Report {
            from,
            to,
            customer_id,
            model,
            tag,
            group_by,
            format,
            db,
        } => {
            let now = tollgate_metering::store::now_micros();
            let start = time_arg(
                from.as_deref(),
                "from",
                tollgate_metering::periods::month_bounds(now).0,
            )?;
            let end = time_arg(to.as_deref(), "to", now + 1)?;
            let groups = billing::parse_group_by(&group_by)
                .map_err(|e| anyhow::anyhow!("--group-by: {e}"))?;
            let filter = UsageFilter {
                start,
                end,
                customer_id,
                model,
                tag: tag_arg(tag.as_deref())?,
            };
            let rows = db.open().await?.aggregate(&filter, &groups, None).await?;
            let columns = billing::usage_columns(&groups);
            match format {
                ReportFormat::Json => print(&json!({
                    "object": "list",
                    "start": tollgate_metering::periods::rfc3339(start),
                    "end": tollgate_metering::periods::rfc3339(end),
                    "data": rows.iter().map(|r| billing::usage_row_json(r, &columns)).collect::<Vec<_>>(),
                })),
                ReportFormat::Csv => {
                    print!("{}", billing::usage_csv(&rows, &columns)?);
                    Ok(())
                }
            }
        }
        UsageCommand::Invoice {
            customer_id,
            period,
            tag,
            group_by,
            db,
        } => {
            let period = period.unwrap_or_else(billing::current_period);
            let group_tag = match group_by.as_deref() {
                None => None,
                Some(g) => match g.strip_prefix("tag:") {
                    Some(k) if !k.is_empty() => Some(k.to_string()),
                    _ => bail!("--group-by: invoices group by `tag:KEY` only, not `{g}`"),
                },
            };
            let tag = tag_arg(tag.as_deref())?;
            print(
                &billing::invoice_for(&db.open().await?, &customer_id, &period, tag, group_tag)
                    .await?,
            )
        }
    }
}

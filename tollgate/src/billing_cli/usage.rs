//! `tollgate usage`: reports (by customer, model, key, day), invoices, and incremental exports of
//! the records (CSV, JSONL, Stripe meter events) that follow a cursor kept in a file.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use tollgate_metering::billing::views::UsageReport;
use tollgate_metering::billing::{self, parse_time};
use tollgate_metering::export_formats::StripeMapping;
use tollgate_metering::kinds::Outcome;
use tollgate_metering::store::{RecordFilter, UsageFilter};

use super::export::{self, Destination, Export, ExportFormat};
use super::{print, DbArgs};

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
    /// advanced after the output is on disk, so a cron job can run this repeatedly without
    /// gaps. With `--output-dir`, each run that finds records writes a new file named by the
    /// cursor range it covers (`usage-FIRST-LAST.jsonl`): deliver each file, then delete it; a
    /// failed delivery leaves it for the next run.
    Export(ExportArgs),
    /// Aggregate usage (as `GET /admin/v1/usage`).
    Report {
        /// Records started at or after this time (RFC 3339 or YYYY-MM-DD; default: the start
        /// of this UTC month).
        #[arg(long)]
        from: Option<String>,
        /// Records started before this time (default: now).
        #[arg(long)]
        to: Option<String>,
        /// Only this customer's usage.
        #[arg(long)]
        customer_id: Option<String>,
        /// Only this model's usage.
        #[arg(long)]
        model: Option<String>,
        /// Only records with this tag (`key:value`).
        #[arg(long)]
        tag: Option<String>,
        /// Comma-separated: customer, model, key, day, service_tier, tag:KEY.
        #[arg(long, default_value = "")]
        group_by: String,
        /// Output format.
        #[arg(long, value_enum, default_value = "json")]
        format: ReportFormat,
        #[command(flatten)]
        db: DbArgs,
    },
    /// A customer's invoice for a month (as `GET /admin/v1/invoices/{id}`).
    Invoice {
        /// The customer to invoice.
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
        /// Output format (csv: one row per line, `base_model` and `adapter` last).
        #[arg(long, value_enum, default_value = "json")]
        format: ReportFormat,
        #[command(flatten)]
        db: DbArgs,
    },
}

fn tag_arg(text: Option<&str>) -> anyhow::Result<Option<(String, String)>> {
    text.map(|t| billing::parse_tag_filter(t).map_err(|e| anyhow::anyhow!("--tag: {e}")))
        .transpose()
}

/// The options of `tollgate usage export`.
#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// Records started at or after this time (RFC 3339 or YYYY-MM-DD).
    #[arg(long, visible_alias = "start")]
    from: Option<String>,
    /// Records started before this time (RFC 3339 or YYYY-MM-DD).
    #[arg(long, visible_alias = "end")]
    to: Option<String>,
    /// Only this customer's records.
    #[arg(long)]
    customer_id: Option<String>,
    /// Only this key's records.
    #[arg(long)]
    key_id: Option<String>,
    /// Only this model's records.
    #[arg(long)]
    model: Option<String>,
    /// Only records that ended so: completed, cancelled, failed.
    #[arg(long)]
    status: Option<String>,
    /// Output format.
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
    /// Write here instead of stdout: replaced by a one-off export, appended to (CSV header
    /// once) with `--cursor-file`.
    #[arg(long, short, conflicts_with = "output_dir")]
    output: Option<PathBuf>,
    /// Write each run's records to a new file in this directory, named by the cursor range
    /// it covers; a run with nothing new writes nothing.
    #[arg(long)]
    output_dir: Option<PathBuf>,
    #[command(flatten)]
    db: DbArgs,
}

fn time_arg(text: Option<&str>, name: &str, default: i64) -> anyhow::Result<i64> {
    match text {
        Some(t) => parse_time(t).map_err(|e| anyhow::anyhow!("--{name}: {e}")),
        None => Ok(default),
    }
}

/// `tollgate usage export`.
async fn export_records(args: ExportArgs) -> anyhow::Result<()> {
    let ExportArgs {
        from,
        to,
        customer_id,
        key_id,
        model,
        status,
        format,
        cursor_file,
        tag,
        stripe_event_name,
        stripe_customer_key,
        stripe_customer_map,
        output,
        output_dir,
        db,
    } = args;
    let mut stripe = StripeMapping::new();
    stripe.event_name = stripe_event_name;
    stripe.customer_key = stripe_customer_key;
    if let Some(p) = &stripe_customer_map {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
        stripe.customers = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a JSON object of customer ids", p.display()))?;
    }
    let status = status
        .map(|s| {
            s.parse::<Outcome>().map_err(|_| {
                anyhow::anyhow!(
                    "--status `{s}` is not a record status (e.g. completed, cancelled, failed)"
                )
            })
        })
        .transpose()?;
    let filter = RecordFilter {
        customer_id,
        key_id,
        model,
        status,
        start: from
            .as_deref()
            .map(|t| time_arg(Some(t), "from", 0))
            .transpose()?,
        end: to
            .as_deref()
            .map(|t| time_arg(Some(t), "to", 0))
            .transpose()?,
    };
    export::check_cursor_window(cursor_file.is_some(), &filter)?;
    let destination = match (output, output_dir) {
        (Some(p), _) => Destination::File(p),
        (None, Some(d)) => Destination::Dir(d),
        (None, None) => Destination::Stdout,
    };
    let job = Export {
        format,
        filter,
        tag: tag_arg(tag.as_deref())?,
        stripe,
        cursor_file,
        destination,
    };
    let (count, cursor) = job.run(&db.open().await?).await?;
    eprintln!("exported {count} records; cursor {cursor}");
    Ok(())
}

pub async fn usage(cmd: UsageCommand) -> anyhow::Result<()> {
    match cmd {
        UsageCommand::Export(args) => export_records(args).await,
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
                ReportFormat::Json => print(&UsageReport::new(start, end, &rows, &columns)),
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
            format,
            db,
        } => {
            let period = period.unwrap_or_else(billing::current_period);
            let group_tag = group_by
                .as_deref()
                .map(billing::parse_invoice_group)
                .transpose()
                .map_err(|e| anyhow::anyhow!("--group-by: {e}"))?;
            let tag = tag_arg(tag.as_deref())?;
            let invoice =
                billing::invoice_for(&db.open().await?, &customer_id, &period, tag, group_tag)
                    .await?;
            match format {
                ReportFormat::Json => print(&invoice),
                ReportFormat::Csv => {
                    print!("{}", invoice.csv()?);
                    Ok(())
                }
            }
        }
    }
}

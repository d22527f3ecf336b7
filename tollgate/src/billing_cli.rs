//! `tollgate customers|keys|usage`: the admin API's operations against the database directly,
//! for operators and billing jobs (cron). Output is JSON (or CSV/JSONL for exports) on stdout.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use tollgate_gateway::admin::{customer_json, issue_key, key_json, valid_id};
use tollgate_gateway::alerts;
use tollgate_metering::audit::Actor;
use tollgate_metering::billing::{self, parse_time, record_cells, record_json, RECORD_COLUMNS};
use tollgate_metering::export_formats::{self, StripeMapping};
use tollgate_metering::money::parse_usd;
use tollgate_metering::store::{CustomerFields, NewKey, Store, UsageFilter};

enum Out {
    Csv(Box<csv::Writer<Box<dyn Write>>>),
    Jsonl(Box<dyn Write>),
}

/// Records read per database round trip while exporting.
const EXPORT_PAGE: i64 = 5_000;

#[derive(Debug, Args)]
pub struct DbArgs {
    /// Ledger database URL (`sqlite://file`, a file path, or `postgres://...`).
    #[arg(long, env = "DATABASE_URL", default_value = "tollgate.db")]
    pub database: String,
}

impl DbArgs {
    async fn open(&self) -> anyhow::Result<Store> {
        Store::connect(&self.database)
            .await
            .with_context(|| format!("cannot open the database {}", crate::redact(&self.database)))
    }
}

#[derive(Debug, Subcommand)]
pub enum CustomersCommand {
    /// Create a customer.
    Create {
        id: String,
        #[arg(long)]
        name: Option<String>,
        /// Monthly budget in USD (decimal), e.g. 25.00.
        #[arg(long)]
        budget_usd: Option<String>,
        /// Requests per minute for the whole customer.
        #[arg(long)]
        rpm: Option<i64>,
        /// Tokens per minute for the whole customer.
        #[arg(long)]
        tpm: Option<i64>,
        /// Requests in flight at once across the customer's keys.
        #[arg(long)]
        max_concurrent_requests: Option<i64>,
        #[command(flatten)]
        db: DbArgs,
    },
    /// List customers.
    List {
        #[command(flatten)]
        db: DbArgs,
    },
    /// Show a customer.
    Get {
        id: String,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Change a customer; `none` clears a budget or limit.
    Update {
        id: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        budget_usd: Option<String>,
        #[arg(long)]
        rpm: Option<String>,
        #[arg(long)]
        tpm: Option<String>,
        #[arg(long)]
        max_concurrent_requests: Option<String>,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Show or change a customer's budget alerts: the webhook they are delivered to (its
    /// signing secret is printed once, when made) and the thresholds.
    Alerts {
        id: String,
        /// The webhook URL; `none` removes it.
        #[arg(long)]
        webhook_url: Option<String>,
        /// Fractions of the monthly budget (comma-separated), e.g. 0.5,0.8,1.
        #[arg(long, value_delimiter = ',')]
        thresholds: Option<Vec<String>>,
        /// Make a new signing secret (printed once).
        #[arg(long)]
        rotate_secret: bool,
        #[command(flatten)]
        db: DbArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Issue a key; its secret is printed once and never stored.
    Create {
        customer_id: String,
        #[arg(long, default_value = "")]
        name: String,
        /// Models the key may use (comma-separated); all when absent.
        #[arg(long, value_delimiter = ',')]
        models: Option<Vec<String>>,
        #[arg(long)]
        rpm: Option<i64>,
        #[arg(long)]
        tpm: Option<i64>,
        /// Requests in flight at once with this key.
        #[arg(long)]
        max_concurrent_requests: Option<i64>,
        /// RFC 3339 time or date after which the key stops working.
        #[arg(long)]
        expires_at: Option<String>,
        /// A default cost-allocation tag of the key's records, `key=value` (repeatable).
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// The key's own monthly budget in USD (besides its customer's).
        #[arg(long)]
        budget_usd: Option<String>,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Set (`--budget-usd 5`) or clear (`--budget-usd none`) a key's own monthly budget.
    Budget {
        key_id: String,
        #[arg(long)]
        budget_usd: String,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Replace a key's default tags (`--tag key=value`, repeatable; none clears them).
    Tag {
        key_id: String,
        #[arg(long = "tag")]
        tags: Vec<String>,
        #[command(flatten)]
        db: DbArgs,
    },
    /// List a customer's keys (without secrets).
    List {
        customer_id: String,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Revoke a key at once.
    Revoke {
        key_id: String,
        #[command(flatten)]
        db: DbArgs,
    },
}

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

fn print(value: &Value) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

fn limit_arg(text: Option<&str>, name: &str) -> anyhow::Result<Option<Option<i64>>> {
    match text {
        None => Ok(None),
        Some("none" | "null") => Ok(Some(None)),
        Some(t) => match t.parse::<i64>() {
            Ok(n) if n > 0 => Ok(Some(Some(n))),
            _ => bail!("--{name} must be a positive integer or `none`, got `{t}`"),
        },
    }
}

fn budget_arg(text: Option<&str>) -> anyhow::Result<Option<Option<i64>>> {
    match text {
        None => Ok(None),
        Some("none" | "null") => Ok(Some(None)),
        Some(t) => Ok(Some(Some(
            parse_usd(t).map_err(|e| anyhow::anyhow!("--budget-usd: {e}"))?,
        ))),
    }
}

pub async fn customers(cmd: CustomersCommand) -> anyhow::Result<()> {
    match cmd {
        CustomersCommand::Create {
            id,
            name,
            budget_usd,
            rpm,
            tpm,
            max_concurrent_requests,
            db,
        } => {
            if !valid_id(&id) {
                bail!(
                    "`{id}` is not a valid id: 1-64 characters of letters, digits, `-`, `_`, `.`"
                );
            }
            let positive = |v: Option<i64>, n: &str| match v {
                Some(x) if x <= 0 => bail!("--{n} must be positive"),
                _ => Ok(v),
            };
            let fields = CustomerFields {
                name: Some(name.unwrap_or_else(|| id.clone())),
                budget_nano_usd: budget_arg(budget_usd.as_deref())?,
                budget_period: None,
                rpm: Some(positive(rpm, "rpm")?),
                tpm: Some(positive(tpm, "tpm")?),
                max_concurrent_requests: Some(positive(
                    max_concurrent_requests,
                    "max-concurrent-requests",
                )?),
            };
            let c = db
                .open()
                .await?
                .create_customer(&id, fields, &Actor::cli_os_user())
                .await?;
            print(&customer_json(&c))
        }
        CustomersCommand::List { db } => {
            let list = db.open().await?.list_customers().await?;
            print(
                &json!({"object": "list", "data": list.iter().map(customer_json).collect::<Vec<_>>()}),
            )
        }
        CustomersCommand::Get { id, db } => {
            print(&customer_json(&db.open().await?.customer(&id).await?))
        }
        CustomersCommand::Update {
            id,
            name,
            budget_usd,
            rpm,
            tpm,
            max_concurrent_requests,
            db,
        } => {
            let fields = CustomerFields {
                name,
                budget_nano_usd: budget_arg(budget_usd.as_deref())?,
                budget_period: None,
                rpm: limit_arg(rpm.as_deref(), "rpm")?,
                tpm: limit_arg(tpm.as_deref(), "tpm")?,
                max_concurrent_requests: limit_arg(
                    max_concurrent_requests.as_deref(),
                    "max-concurrent-requests",
                )?,
            };
            let c = db
                .open()
                .await?
                .update_customer(&id, fields, &Actor::cli_os_user())
                .await?;
            print(&customer_json(&c))
        }
        CustomersCommand::Alerts {
            id,
            webhook_url,
            thresholds,
            rotate_secret,
            db,
        } => {
            let store = db.open().await?;
            let change = alerts::SettingsChange {
                webhook_url: webhook_url.map(|u| (u != "none").then_some(u)),
                thresholds,
                rotate_secret,
            };
            let (settings, secret) =
                alerts::update_settings(&store, &id, change, &Actor::cli_os_user()).await?;
            print(&alerts::settings_json(&settings, secret.as_deref()))
        }
    }
}

pub async fn keys(cmd: KeysCommand) -> anyhow::Result<()> {
    match cmd {
        KeysCommand::Create {
            customer_id,
            name,
            models,
            rpm,
            tpm,
            expires_at,
            tags,
            budget_usd,
            max_concurrent_requests,
            db,
        } => {
            let tags = tags_arg(&tags)?;
            let budget_nano_usd = budget_arg(budget_usd.as_deref())?.flatten();
            let expires_at = match expires_at {
                Some(t) => {
                    let at = parse_time(&t).map_err(|e| anyhow::anyhow!("--expires-at: {e}"))?;
                    if at <= tollgate_metering::store::now_micros() {
                        bail!("--expires-at {t} is in the past");
                    }
                    Some(at)
                }
                None => None,
            };
            if [rpm, tpm, max_concurrent_requests]
                .iter()
                .any(|v| v.is_some_and(|v| v <= 0))
            {
                bail!("--rpm, --tpm and --max-concurrent-requests must be positive");
            }
            let new = NewKey {
                name,
                models,
                rpm,
                tpm,
                expires_at,
                tags,
                budget_nano_usd,
                max_concurrent_requests,
            };
            let store = db.open().await?;
            let (key, secret) = issue_key(&store, &customer_id, new, &Actor::cli_os_user()).await?;
            let mut body = key_json(&key);
            body["key"] = json!(secret);
            print(&body)
        }
        KeysCommand::List { customer_id, db } => {
            let keys = db.open().await?.list_keys(&customer_id).await?;
            print(&json!({"object": "list", "data": keys.iter().map(key_json).collect::<Vec<_>>()}))
        }
        KeysCommand::Budget {
            key_id,
            budget_usd,
            db,
        } => {
            let budget = budget_arg(Some(&budget_usd))?.flatten();
            print(&key_json(
                &db.open()
                    .await?
                    .set_key_budget(&key_id, budget, &Actor::cli_os_user())
                    .await?,
            ))
        }
        KeysCommand::Tag { key_id, tags, db } => {
            let tags = tags_arg(&tags)?;
            print(&key_json(
                &db.open()
                    .await?
                    .set_key_tags(&key_id, &tags, &Actor::cli_os_user())
                    .await?,
            ))
        }
        KeysCommand::Revoke { key_id, db } => print(&key_json(
            &db.open()
                .await?
                .revoke_key(&key_id, &Actor::cli_os_user())
                .await?,
        )),
    }
}

/// `--tag key=value` arguments → tags within the limits of request `metadata`.
fn tags_arg(args: &[String]) -> anyhow::Result<tollgate_metering::tags::Tags> {
    let mut tags = tollgate_metering::tags::Tags::new();
    for a in args {
        let (k, v) =
            tollgate_metering::tags::parse_pair(a).map_err(|e| anyhow::anyhow!("--tag: {e}"))?;
        tags.insert(k, v);
    }
    tollgate_metering::tags::check(&tags, "tags")
        .map_err(|e| anyhow::anyhow!("--tag: {}", e.message))?;
    Ok(tags)
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
        Ok(text) => tollgate_gateway::admin::parse_cursor(&text)
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

#[derive(Debug, Subcommand)]
pub enum AdminTokensCommand {
    /// Issue an admin token; its secret is printed once and never stored.
    Create {
        /// Comma-separated: usage:read, customers:write, keys:write, admin.
        #[arg(long, value_delimiter = ',', required = true)]
        scopes: Vec<String>,
        #[arg(long, default_value = "")]
        name: String,
        #[command(flatten)]
        db: DbArgs,
    },
    /// List admin tokens (without secrets).
    List {
        #[command(flatten)]
        db: DbArgs,
    },
    /// Revoke an admin token at once.
    Revoke {
        id: String,
        #[command(flatten)]
        db: DbArgs,
    },
}

pub async fn admin_tokens(cmd: AdminTokensCommand) -> anyhow::Result<()> {
    use tollgate_gateway::admin_tokens::{issue, list, parse_scopes, revoke, AdminToken};
    match cmd {
        AdminTokensCommand::Create { scopes, name, db } => {
            let scopes = parse_scopes(scopes.iter().map(String::as_str))
                .map_err(|e| anyhow::anyhow!("--scopes: {e}"))?;
            let (token, secret) =
                issue(&db.open().await?, &name, &scopes, &Actor::cli_os_user()).await?;
            let mut body = token.json();
            body["token"] = json!(secret);
            print(&body)
        }
        AdminTokensCommand::List { db } => {
            let tokens = list(&db.open().await?).await?;
            print(
                &json!({"object": "list", "data": tokens.iter().map(AdminToken::json).collect::<Vec<_>>()}),
            )
        }
        AdminTokensCommand::Revoke { id, db } => print(
            &revoke(&db.open().await?, &id, &Actor::cli_os_user())
                .await?
                .json(),
        ),
    }
}

//! `tollgate customers|keys|reservations|usage` (and `customers adapters`, in `adapters`): the admin API's operations against the database directly,
//! for operators and billing jobs (cron). Output is JSON (or CSV/JSONL for exports) on stdout.
//! `usage` is in its own file, its exports in `export`.

use std::io::Write;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use limits::{LimitChanges, Limits, NewLimits};
use serde_json::json;
use tiers::TierArgs;
use tollgate_metering::alerts;
use tollgate_metering::audit::Actor;
use tollgate_metering::billing::parse_time;
use tollgate_metering::money::parse_usd;
use tollgate_metering::store::admin_tokens::{parse_scopes, AdminTokenList, CreatedAdminTokenView};
use tollgate_metering::store::{
    now_micros, valid_id, CustomerFields, KeyFields, NewKey, Store, MAX_SCHEDULING_WEIGHT,
};
use tollgate_metering::views::{CreatedKeyView, CustomerView, KeyView};

mod adapters;
mod export;
mod keys;
mod limits;
mod reservations;
mod tiers;
mod usage;

pub use adapters::AdaptersCommand;
pub use keys::{keys, KeysCommand};
pub use reservations::{reservations, ReservationsCommand};
pub use usage::{usage, UsageCommand};

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
    Create(CreateCustomer),
    /// List customers.
    List {
        #[command(flatten)]
        db: DbArgs,
    },
    /// Show a customer, with its spend this month.
    Get {
        /// The customer's id.
        id: String,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Change a customer; `none` clears a budget or limit.
    Update(UpdateCustomer),
    /// A customer's LoRA adapters: model ids `<base>:<name>` only its keys see.
    #[command(subcommand)]
    Adapters(AdaptersCommand),
    /// Show or change a customer's budget alerts: the webhook they are delivered to (its
    /// signing secret is printed once, when made) and the thresholds.
    Alerts {
        /// The customer's id.
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

#[derive(Debug, Args)]
pub struct UpdateCustomer {
    /// The customer's id.
    id: String,
    /// A new display name.
    #[arg(long)]
    name: Option<String>,
    /// Monthly budget in USD (decimal), or `none`.
    #[arg(long)]
    budget_usd: Option<String>,
    #[command(flatten)]
    limits: LimitChanges,
    /// Share of each model's engine when customers compete (1 to 100).
    #[arg(long, value_parser = clap::value_parser!(i64).range(1..=MAX_SCHEDULING_WEIGHT))]
    scheduling_weight: Option<i64>,
    #[command(flatten)]
    tiers: TierArgs,
    #[command(flatten)]
    db: DbArgs,
}

#[derive(Debug, Args)]
pub struct CreateCustomer {
    /// The customer's id (1-64 letters, digits, `-`, `_`, `.`).
    id: String,
    /// A display name (the id when absent).
    #[arg(long)]
    name: Option<String>,
    /// Monthly budget in USD (decimal), e.g. 25.00.
    #[arg(long)]
    budget_usd: Option<String>,
    #[command(flatten)]
    limits: NewLimits,
    /// Share of each model's engine when customers compete (1 to 100; default 1).
    #[arg(long, value_parser = clap::value_parser!(i64).range(1..=MAX_SCHEDULING_WEIGHT))]
    scheduling_weight: Option<i64>,
    #[command(flatten)]
    tiers: TierArgs,
    #[command(flatten)]
    db: DbArgs,
}

fn print(value: &impl serde::Serialize) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
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
        CustomersCommand::Create(args) => create_customer(args).await,
        CustomersCommand::List { db } => {
            let list = db.open().await?.list_customers().await?;
            print(
                &json!({"object": "list", "data": list.iter().map(CustomerView::from).collect::<Vec<_>>()}),
            )
        }
        CustomersCommand::Get { id, db } => {
            // As `GET /admin/v1/customers/{id}`: with the spend of the current month.
            let store = db.open().await?;
            let customer = store.customer(&id).await?;
            let (start, _) = tollgate_metering::periods::month_bounds(now_micros());
            let spent = store.spent_since(&id, start).await?;
            print(&CustomerView::from(&customer).with_spend(spent))
        }
        CustomersCommand::Update(args) => update_customer(args).await,
        CustomersCommand::Adapters(cmd) => adapters::adapters(cmd).await,
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
            print(&alerts::AlertSettingsView::new(
                &settings,
                secret.as_deref(),
            ))
        }
    }
}

async fn create_customer(args: CreateCustomer) -> anyhow::Result<()> {
    let id = args.id;
    if !valid_id(&id) {
        bail!("`{id}` is not a valid id: 1-64 characters of letters, digits, `-`, `_`, `.`");
    }
    let limits = args.limits.checked()?.map(Some);
    let name = Some(args.name.unwrap_or_else(|| id.clone()));
    let weight = args.scheduling_weight;
    let fields = customer_fields(name, args.budget_usd, limits, weight, &args.tiers)?;
    let store = args.db.open().await?;
    let c = store
        .create_customer(&id, fields, &Actor::cli_os_user())
        .await?;
    print(&CustomerView::from(&c))
}

async fn update_customer(args: UpdateCustomer) -> anyhow::Result<()> {
    let limits = args.limits.parsed()?;
    let weight = args.scheduling_weight;
    let fields = customer_fields(args.name, args.budget_usd, limits, weight, &args.tiers)?;
    let store = args.db.open().await?;
    let c = store
        .update_customer(&args.id, fields, &Actor::cli_os_user())
        .await?;
    print(&CustomerView::from(&c))
}

/// What `customers create` and `customers update` set, as the store takes it (`None`:
/// unchanged, `Some(None)`: cleared).
fn customer_fields(
    name: Option<String>,
    budget_usd: Option<String>,
    limits: Limits<Option<Option<i64>>>,
    scheduling_weight: Option<i64>,
    tiers: &TierArgs,
) -> anyhow::Result<CustomerFields> {
    Ok(CustomerFields {
        name,
        budget_nano_usd: budget_arg(budget_usd.as_deref())?,
        budget_period: None,
        rpm: limits.rpm,
        tpm: limits.tpm,
        max_concurrent_requests: limits.max_concurrent_requests,
        scheduling_weight,
        default_service_tier: tiers.default_tier()?,
        allow_priority: tiers.allow_priority(),
    })
}

#[derive(Debug, Subcommand)]
pub enum AdminTokensCommand {
    /// Issue an admin token; its secret is printed once and never stored.
    Create {
        /// Comma-separated: usage:read, customers:read, customers:write, keys:write, admin.
        #[arg(long, value_delimiter = ',', required = true)]
        scopes: Vec<String>,
        /// A name to recognise the token by.
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
        /// The admin token's id (`adm_...`).
        id: String,
        #[command(flatten)]
        db: DbArgs,
    },
}

pub async fn admin_tokens(cmd: AdminTokensCommand) -> anyhow::Result<()> {
    match cmd {
        AdminTokensCommand::Create { scopes, name, db } => {
            let scopes = parse_scopes(scopes.iter().map(String::as_str))
                .map_err(|e| anyhow::anyhow!("--scopes: {e}"))?;
            let (token, secret) = db
                .open()
                .await?
                .issue_admin_token(&name, &scopes, &Actor::cli_os_user())
                .await?;
            print(&CreatedAdminTokenView {
                token: token.view(),
                secret,
            })
        }
        AdminTokensCommand::List { db } => {
            print(&AdminTokenList::of(&db.open().await?.admin_tokens().await?))
        }
        AdminTokensCommand::Revoke { id, db } => print(
            &db.open()
                .await?
                .revoke_admin_token(&id, &Actor::cli_os_user())
                .await?
                .view(),
        ),
    }
}

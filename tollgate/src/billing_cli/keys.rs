//! `tollgate keys`: issue, list, update and revoke a customer's API keys against the
//! database, as the admin API does.

use super::*;

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Issue a key; its secret is printed once and never stored.
    Create(CreateKey),
    /// Set (`--budget-usd 5`) or clear (`--budget-usd none`) a key's own monthly budget.
    Budget {
        /// The key's id.
        key_id: String,
        /// Monthly budget in USD (decimal), or `none`.
        #[arg(long)]
        budget_usd: String,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Replace a key's default tags (`--tag key=value`, repeatable; none clears them).
    Tag {
        /// The key's id.
        key_id: String,
        /// A default tag, `key=value` (repeatable).
        #[arg(long = "tag")]
        tags: Vec<String>,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Change a key's limits, models or expiry (`none` clears one), as
    /// `PATCH /admin/v1/keys/{id}`. Requests see the change within the key cache's lifetime.
    Update(UpdateKey),
    /// Show a key (without its secret), with the customer it belongs to.
    Get {
        /// The key's id.
        key_id: String,
        #[command(flatten)]
        db: DbArgs,
    },
    /// List a customer's keys (without secrets).
    List {
        /// The customer's id.
        customer_id: String,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Revoke a key at once.
    Revoke {
        /// The key's id.
        key_id: String,
        #[command(flatten)]
        db: DbArgs,
    },
}

#[derive(Debug, Args)]
pub struct UpdateKey {
    /// The key's id.
    key_id: String,
    /// A new name.
    #[arg(long)]
    name: Option<String>,
    /// Models the key may use (comma-separated), or `none` for all.
    #[arg(long)]
    models: Option<String>,
    #[command(flatten)]
    limits: LimitChanges,
    /// RFC 3339 time or date after which the key stops working, or `none`.
    #[arg(long)]
    expires_at: Option<String>,
    #[command(flatten)]
    tiers: TierArgs,
    #[command(flatten)]
    db: DbArgs,
}

#[derive(Debug, Args)]
pub struct CreateKey {
    /// The customer the key belongs to.
    customer_id: String,
    /// A name to recognise the key by.
    #[arg(long, default_value = "")]
    name: String,
    /// Models the key may use (comma-separated); all when absent.
    #[arg(long, value_delimiter = ',')]
    models: Option<Vec<String>>,
    #[command(flatten)]
    limits: NewLimits,
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
    tiers: TierArgs,
    #[command(flatten)]
    db: DbArgs,
}

pub async fn keys(cmd: KeysCommand) -> anyhow::Result<()> {
    match cmd {
        KeysCommand::Create(args) => create_key(args).await,
        KeysCommand::Update(args) => update_key(args).await,
        KeysCommand::Get { key_id, db } => {
            print(&KeyView::from(&db.open().await?.key(&key_id).await?))
        }
        KeysCommand::List { customer_id, db } => {
            let keys = db.open().await?.list_keys(&customer_id).await?;
            print(
                &json!({"object": "list", "data": keys.iter().map(KeyView::from).collect::<Vec<_>>()}),
            )
        }
        KeysCommand::Budget {
            key_id,
            budget_usd,
            db,
        } => {
            let budget = budget_arg(Some(&budget_usd))?.flatten();
            print(&KeyView::from(
                &db.open()
                    .await?
                    .set_key_budget(&key_id, budget, &Actor::cli_os_user())
                    .await?,
            ))
        }
        KeysCommand::Tag { key_id, tags, db } => {
            let tags = tags_arg(&tags)?;
            print(&KeyView::from(
                &db.open()
                    .await?
                    .set_key_tags(&key_id, &tags, &Actor::cli_os_user())
                    .await?,
            ))
        }
        KeysCommand::Revoke { key_id, db } => print(&KeyView::from(
            &db.open()
                .await?
                .revoke_key(&key_id, &Actor::cli_os_user())
                .await?,
        )),
    }
}

async fn create_key(args: CreateKey) -> anyhow::Result<()> {
    let CreateKey {
        customer_id,
        name,
        models,
        limits,
        expires_at,
        tags,
        budget_usd,
        tiers,
        db,
    } = args;
    let tags = tags_arg(&tags)?;
    let budget_nano_usd = budget_arg(budget_usd.as_deref())?.flatten();
    let expires_at = expires_at.as_deref().map(future_time).transpose()?;
    let limits = limits.checked()?;
    let new = NewKey {
        name,
        models,
        rpm: limits.rpm,
        tpm: limits.tpm,
        expires_at,
        tags,
        budget_nano_usd,
        max_concurrent_requests: limits.max_concurrent_requests,
        default_service_tier: tiers.default_tier()?.flatten(),
        allow_priority: tiers.allow_priority(),
    };
    let store = db.open().await?;
    let (key, secret) = store
        .issue_key(&customer_id, new, &Actor::cli_os_user())
        .await?;
    print(&CreatedKeyView {
        key: KeyView::from(&key),
        secret,
    })
}

async fn update_key(args: UpdateKey) -> anyhow::Result<()> {
    let UpdateKey {
        key_id,
        name,
        models,
        limits,
        expires_at,
        tiers,
        db,
    } = args;
    let limits = limits.parsed()?;
    let fields = KeyFields {
        name,
        models: models.map(|m| match m.as_str() {
            "none" | "null" => None,
            list => Some(list.split(',').map(|s| s.trim().to_string()).collect()),
        }),
        rpm: limits.rpm,
        tpm: limits.tpm,
        max_concurrent_requests: limits.max_concurrent_requests,
        expires_at: expiry_arg(expires_at.as_deref())?,
        default_service_tier: tiers.default_tier()?,
        allow_priority: tiers.allow_priority(),
        ..KeyFields::default()
    };
    if fields.is_empty() {
        bail!("nothing to change: give --name, --models, --rpm, --tpm, --max-concurrent-requests, --expires-at, --default-service-tier or --allow-priority");
    }
    let store = db.open().await?;
    let key = store
        .set_key_fields(&key_id, fields, &Actor::cli_os_user())
        .await?;
    print(&KeyView::from(&key))
}

/// `--expires-at TIME|none`: a future time, or `none` (never expires); absent: unchanged.
fn expiry_arg(text: Option<&str>) -> anyhow::Result<Option<Option<i64>>> {
    match text {
        None => Ok(None),
        Some("none" | "null") => Ok(Some(None)),
        Some(t) => Ok(Some(Some(future_time(t)?))),
    }
}

/// `--expires-at TIME`: a time (RFC 3339 or a date) that has not passed.
fn future_time(text: &str) -> anyhow::Result<i64> {
    let at = parse_time(text).map_err(|e| anyhow::anyhow!("--expires-at: {e}"))?;
    if at <= now_micros() {
        bail!("--expires-at {text} is in the past");
    }
    Ok(at)
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

//! `tollgate customers adapters add|list|remove`: a customer's LoRA adapters against the
//! database directly, as the admin API's `/admin/v1/customers/{id}/adapters`. Adding one reads
//! models.toml for the base model and checks the adapter as the server would: a local
//! directory (only local paths are supported here), whose files load onto the base model
//! (the base model is loaded to check them). Running servers see the change within seconds.

use std::path::PathBuf;

use anyhow::{anyhow, Context};
use clap::Subcommand;
use serde_json::json;
use tollgate_gateway::config::{check_adapter_base, local_adapter_dir, BackendConfig, Config};
use tollgate_metering::audit::Actor;
use tollgate_metering::views::AdapterView;

use super::{print, DbArgs};

#[derive(Debug, Subcommand)]
pub enum AdaptersCommand {
    /// Register a LoRA adapter for a customer: the model id `<base-model>:<name>`, seen only
    /// by the customer's keys.
    Add {
        /// The customer's id.
        customer_id: String,
        /// A local model of the catalogue.
        #[arg(long)]
        base_model: String,
        /// The adapter's name (1-64 letters, digits, `-`, `_`, `.`).
        #[arg(long)]
        name: String,
        /// The PEFT adapter directory (absolute; adapter_config.json and
        /// adapter_model.safetensors).
        #[arg(long)]
        path: String,
        /// The model catalogue.
        #[arg(long, default_value = "models.toml", env = "TOLLGATE_CONFIG")]
        config: PathBuf,
        #[command(flatten)]
        db: DbArgs,
    },
    /// List a customer's adapters.
    List {
        /// The customer's id.
        customer_id: String,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Remove a customer's adapter (requests in flight finish).
    Remove {
        /// The customer's id.
        customer_id: String,
        /// The adapter's name.
        name: String,
        #[command(flatten)]
        db: DbArgs,
    },
}

pub async fn adapters(cmd: AdaptersCommand) -> anyhow::Result<()> {
    match cmd {
        AdaptersCommand::Add {
            customer_id,
            base_model,
            name,
            path,
            config,
            db,
        } => {
            let store = db.open().await?;
            // An unknown customer is refused before the base model is loaded.
            store.customer(&customer_id).await?;
            check_files(&config, &base_model, &name, &path).await?;
            let added = store
                .add_adapter(
                    &customer_id,
                    &name,
                    &base_model,
                    &path,
                    &Actor::cli_os_user(),
                )
                .await?;
            print(&AdapterView::from(&added))
        }
        AdaptersCommand::List { customer_id, db } => {
            let store = db.open().await?;
            store.customer(&customer_id).await?;
            let all = store.adapters(Some(&customer_id)).await?;
            let data: Vec<AdapterView> = all.iter().map(AdapterView::from).collect();
            print(&json!({"object": "list", "data": data}))
        }
        AdaptersCommand::Remove {
            customer_id,
            name,
            db,
        } => {
            let removed = db
                .open()
                .await?
                .remove_adapter(&customer_id, &name, &Actor::cli_os_user())
                .await?;
            print(&AdapterView::from(&removed))
        }
    }
}

/// The server's checks of a new adapter: `base` a local model of the catalogue at `config`,
/// `path` a local PEFT adapter directory whose files load onto it.
async fn check_files(
    config: &std::path::Path,
    base: &str,
    name: &str,
    path: &str,
) -> anyhow::Result<()> {
    let catalogue =
        Config::load(config).with_context(|| format!("cannot load {}", config.display()))?;
    let model = catalogue.models.get(base).cloned();
    check_adapter_base(base, model.as_ref()).map_err(|e| anyhow!(e))?;
    let dir = local_adapter_dir(path).map_err(|e| anyhow!(e))?;
    // Checked above: the catalogue has it.
    let Some(model) = model else {
        return Ok(());
    };
    let name = name.to_string();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let BackendConfig::Local(local) = &model.backend else {
            return Ok(());
        };
        let loaded = crate::models::load_local(&model, local, None)?;
        loaded
            .model
            .adapter_base()
            .load(&name, &dir)
            .map_err(|e| anyhow!("LoRA adapter `{name}` cannot be loaded: {e}"))?;
        Ok(())
    })
    .await
    .context("adapter checking task failed")?
}

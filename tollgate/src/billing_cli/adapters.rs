//! `tollgate customers adapters add|list|update|remove`: a customer's LoRA adapters against
//! the database directly, as the admin API's `/admin/v1/customers/{id}/adapters`. Adding one
//! reads models.toml for the base model and checks the adapter as the server would: its
//! price (`--price-*`, a model's `price` keys), a local directory (only local paths are
//! supported here) whose files load onto the base model (the base model is loaded to check
//! them). `update` changes its price, checked the same way. Running servers see the change
//! within seconds.

use std::path::PathBuf;

use anyhow::{anyhow, Context};
use clap::{Args, Subcommand};
use serde_json::json;
use tollgate_gateway::config::{
    adapter_prices, check_adapter_base, local_adapter_dir, BackendConfig, Config, ModelConfig,
};
use tollgate_metering::audit::Actor;
use tollgate_metering::money::PriceTable;
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
        #[command(flatten)]
        price: PriceArgs,
        /// The model catalogue.
        #[arg(long, default_value = "models.toml", env = "TOLLGATE_CONFIG")]
        config: PathBuf,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Change an adapter's price for requests admitted from now on (`--base-price`: its base
    /// model's again).
    Update {
        /// The customer's id.
        customer_id: String,
        /// The adapter's name.
        name: String,
        #[command(flatten)]
        price: PriceArgs,
        /// Bill it at its base model's prices again.
        #[arg(long, conflicts_with_all = ["input_per_mtok", "output_per_mtok", "price_json"])]
        base_price: bool,
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

/// An adapter's own price: the default unit prices as flags, or a whole price table (per-tier
/// prices included) as JSON. None given: the base model's prices.
#[derive(Debug, Args)]
pub struct PriceArgs {
    /// USD per million input tokens (with --price-output-per-mtok).
    #[arg(long = "price-input-per-mtok", requires = "output_per_mtok")]
    input_per_mtok: Option<String>,
    /// USD per million output tokens (with --price-input-per-mtok).
    #[arg(long = "price-output-per-mtok", requires = "input_per_mtok")]
    output_per_mtok: Option<String>,
    /// USD per million prompt tokens served from the prefix cache (default: the input price).
    #[arg(long = "price-cached-input-per-mtok", requires = "input_per_mtok")]
    cached_input_per_mtok: Option<String>,
    /// USD per million rejected prediction tokens (default: the output price).
    #[arg(
        long = "price-rejected-prediction-per-mtok",
        requires = "input_per_mtok"
    )]
    rejected_prediction_per_mtok: Option<String>,
    /// The whole price table as JSON, with a model's `price` keys in models.toml
    /// (`{"input_per_mtok":"0.2","output_per_mtok":"0.4","flex":{...}}`).
    #[arg(long = "price-json", conflicts_with = "input_per_mtok")]
    price_json: Option<String>,
}

impl PriceArgs {
    /// The price table the flags give, if any.
    fn table(self) -> anyhow::Result<Option<PriceTable>> {
        if let Some(text) = self.price_json {
            return serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| anyhow!("--price-json: {e}"));
        }
        let (Some(input_per_mtok), Some(output_per_mtok)) =
            (self.input_per_mtok, self.output_per_mtok)
        else {
            return Ok(None);
        };
        Ok(Some(PriceTable {
            input_per_mtok,
            output_per_mtok,
            cached_input_per_mtok: self.cached_input_per_mtok,
            rejected_prediction_per_mtok: self.rejected_prediction_per_mtok,
            flex: None,
            batch: None,
            priority: None,
            priority_multiplier: None,
            reserved_per_ktpm_month: None,
        }))
    }
}

pub async fn adapters(cmd: AdaptersCommand) -> anyhow::Result<()> {
    match cmd {
        AdaptersCommand::Add {
            customer_id,
            base_model,
            name,
            path,
            price,
            config,
            db,
        } => {
            let store = db.open().await?;
            // An unknown customer is refused before the base model is loaded.
            store.customer(&customer_id).await?;
            let price = price.table()?;
            let model = base_of(&config, &base_model, price.as_ref())?;
            check_files(model, &name, &path).await?;
            let added = store
                .add_adapter(
                    &customer_id,
                    &name,
                    &base_model,
                    &path,
                    price,
                    &Actor::cli_os_user(),
                )
                .await?;
            print(&AdapterView::from(&added))
        }
        AdaptersCommand::Update {
            customer_id,
            name,
            price,
            base_price,
            config,
            db,
        } => {
            let store = db.open().await?;
            let price = price.table()?;
            if price.is_none() && !base_price {
                return Err(anyhow!(
                    "nothing to change: give --price-input-per-mtok and --price-output-per-mtok, \
                     --price-json, or --base-price"
                ));
            }
            let all = store.adapters(Some(&customer_id)).await?;
            let Some(adapter) = all.iter().find(|a| a.name == name) else {
                return Err(anyhow!("customer `{customer_id}` has no adapter `{name}`"));
            };
            base_of(&config, &adapter.base_model, price.as_ref())?;
            let updated = store
                .set_adapter_price(&customer_id, &name, price, &Actor::cli_os_user())
                .await?;
            print(&AdapterView::from(&updated))
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

/// The server's checks of an adapter's base model and price: `base` a local model of the
/// catalogue at `config`, `price` valid on it. Returns the base model's configuration.
fn base_of(
    config: &std::path::Path,
    base: &str,
    price: Option<&PriceTable>,
) -> anyhow::Result<ModelConfig> {
    let catalogue =
        Config::load(config).with_context(|| format!("cannot load {}", config.display()))?;
    let model = catalogue.models.get(base).cloned();
    check_adapter_base(base, model.as_ref()).map_err(|e| anyhow!(e))?;
    let Some(model) = model else {
        return Err(anyhow!("unknown base model `{base}`"));
    };
    adapter_prices(&model, price).map_err(|e| anyhow!(e))?;
    Ok(model)
}

/// The server's check of a new adapter's files: `path` a local PEFT adapter directory whose
/// files load onto `model`.
async fn check_files(model: ModelConfig, name: &str, path: &str) -> anyhow::Result<()> {
    let dir = local_adapter_dir(path).map_err(|e| anyhow!(e))?;
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

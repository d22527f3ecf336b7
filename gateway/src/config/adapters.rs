//! LoRA adapters an operator registers on a local model or a pool of `tollgate worker`s
//! (`[[models."<id>".adapters]]`): each becomes a model id of its own, `<id>:<name>`, served by
//! the base model's engine (or a worker's) with the adapter applied, at the adapter's price
//! (the base model's when it sets none).
//!
//! It validates the table only; the adapter's files are read by the runtime (the worker's)
//! when the adapter is first used.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tollgate_metering::kinds::ServiceTier;
use tollgate_metering::money::{PriceTable, TierPrices};

use super::models::{validate_source, BackendConfig, ModelConfig, ModelSource, RawSource};
use super::prices::{field_of, only_tiers, validate_prices, RawPrice};
use super::ConfigError;

/// Why an http model cannot carry adapters.
const NOT_WORKERS: &str = "adapters need a local backend or a pool of `tollgate worker`s \
     (an http backend with forward_customer = true): a plain OpenAI-compatible server cannot \
     be told which adapter to apply";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdapter {
    name: String,
    /// A PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`) or a
    /// GGUF LoRA file; on a pool of workers it may be left out: the workers' own adapter of
    /// that name.
    source: Option<RawSource>,
    price: Option<RawPrice>,
    owned_by: Option<String>,
}

/// What makes a model id an adapter's: its base model and the adapter's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterConfig {
    /// The base model's id.
    pub base: String,
    /// The adapter's name (the part of the model id after `<base>:`).
    pub name: String,
    /// The PEFT adapter directory; `None` on a pool of workers: the workers' own adapter of
    /// this name (declared in their models.toml).
    pub path: Option<PathBuf>,
}

/// The model ids of `base`'s adapters: each runs on the base's backend, with the base's
/// context, limits and tiers, at its own price or the base's.
pub(super) fn validate_adapters(
    base: &ModelConfig,
    raw: Vec<RawAdapter>,
    base_dir: &Path,
) -> Result<Vec<ModelConfig>, ConfigError> {
    if raw.is_empty() {
        return Ok(Vec::new());
    }
    let err = |message: String| ConfigError::Model {
        model: base.id.clone(),
        message,
    };
    if !base.backend.runs_adapters() {
        return Err(err(NOT_WORKERS.into()));
    }
    let local = matches!(base.backend, BackendConfig::Local(_));
    let mut out: Vec<ModelConfig> = Vec::with_capacity(raw.len());
    for a in raw {
        let name = a.name;
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(err(format!(
                "adapter name `{name}`: use letters, digits, `-`, `_` and `.` only"
            )));
        }
        let id = format!("{}:{name}", base.id);
        if out.iter().any(|m| m.id == id) {
            return Err(err(format!("adapter `{name}` is listed twice")));
        }
        let adapter_err = |m: String| err(format!("adapter `{name}`: {m}"));
        let path = match a.source.map(|s| validate_source(s, base_dir)) {
            Some(Ok(ModelSource::Path(path))) => Some(path),
            Some(Ok(ModelSource::Hub { .. })) => {
                return Err(adapter_err(
                    "source must be a local directory (`source = { path = ... }`)".into(),
                ))
            }
            Some(Err(e)) => return Err(adapter_err(e)),
            None if local => return Err(adapter_err("needs a `source`".into())),
            None => None,
        };
        let prices = adapter_prices(base, a.price.as_ref()).map_err(|e| adapter_err(e.message))?;
        let owned_by = a.owned_by.unwrap_or_else(|| base.owned_by.clone());
        out.push(adapter_model(base, &name, path, prices, owned_by));
    }
    Ok(out)
}

/// The model id `<base>:<name>` of an adapter on `base` (a local model or a pool of workers):
/// served by the base's backend with the adapter applied, with the base's context, limits and tiers, at
/// `prices`. The operator's adapters (above) and customers' (`crate::catalogue`) alike.
pub fn adapter_model(
    base: &ModelConfig,
    name: &str,
    path: Option<PathBuf>,
    prices: TierPrices,
    owned_by: String,
) -> ModelConfig {
    ModelConfig {
        adapter: Some(AdapterConfig {
            base: base.id.clone(),
            name: name.to_string(),
            path,
        }),
        id: format!("{}:{name}", base.id),
        owned_by,
        prices,
        // Reservations are of a model's capacity, which its adapters share.
        reserved: None,
        // The base model's slot in the memory budget is what is loaded and pinned.
        pinned: false,
        ..base.clone()
    }
}

/// A price table refused: the key at fault (`price.flex.input_per_mtok`) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct PriceError {
    pub field: String,
    pub message: String,
}

/// An adapter's prices on `base`: `price` validated as a model's `price` in models.toml
/// (the same keys and defaults), sold at the tiers the base model is sold at; the base
/// model's prices when `price` is `None`. Reserved capacity is a model's, which its adapters
/// share, so `reserved_per_ktpm_month` is refused. The operator's adapters and customers'.
pub fn adapter_prices(
    base: &ModelConfig,
    price: Option<&PriceTable>,
) -> Result<TierPrices, PriceError> {
    let Some(p) = price else {
        return Ok(base.prices);
    };
    if p.reserved_per_ktpm_month.is_some() {
        return Err(PriceError {
            field: "price.reserved_per_ktpm_month".into(),
            message: "price.reserved_per_ktpm_month: an adapter shares its base model's \
                      reserved capacity; reservations are sold on the base model"
                .into(),
        });
    }
    let refused = |message: String| PriceError {
        field: field_of(&message),
        message,
    };
    let sold: Vec<ServiceTier> = base.prices.offered().map(|(t, _)| t).collect();
    only_tiers(validate_prices(p.clone()).map_err(refused)?, &sold).map_err(|message| PriceError {
        field: "price".into(),
        message,
    })
}

/// Whether `base` (its configuration, `None` when the catalogue has no such model) can carry
/// a customer's adapter: a local model of its own, or a pool of workers (which must be able
/// to read the adapter's path). The message names what is wrong.
pub fn check_adapter_base(base: &str, config: Option<&ModelConfig>) -> Result<(), String> {
    let Some(config) = config else {
        return Err(format!("unknown base_model `{base}`"));
    };
    if config.adapter.is_some() {
        return Err(format!(
            "base_model `{base}` is an adapter itself; name the model it is on"
        ));
    }
    if !config.backend.runs_adapters() {
        return Err(format!("base_model `{base}`: {NOT_WORKERS}"));
    }
    Ok(())
}

/// `path` as a local directory holding a PEFT adapter's two files (or a `.gguf` file: a GGUF
/// LoRA adapter), or why not. Only local paths are supported: this deployment reaches
/// neither S3 nor the Hugging Face Hub, and says so rather than pretend.
pub fn local_adapter_dir(path: &str) -> Result<PathBuf, String> {
    let only_local = "only local paths are supported on this deployment: copy the adapter to a \
                      directory on the servers and give its absolute path";
    if path.starts_with("s3://") {
        return Err(format!(
            "path `{path}`: this server cannot reach S3; {only_local}"
        ));
    }
    if path.starts_with("hf://") || path.contains("huggingface.co") {
        return Err(format!(
            "path `{path}`: this server cannot reach the Hugging Face Hub; {only_local}"
        ));
    }
    if path.contains("://") {
        return Err(format!("path `{path}` is a URL; {only_local}"));
    }
    let dir = Path::new(path);
    if !dir.is_absolute() {
        return Err(format!(
            "path `{path}` is not an absolute path (Hugging Face repo ids are not supported \
             here); {only_local}"
        ));
    }
    // A GGUF LoRA adapter (llama.cpp's layout) is one file; the runtime reads and checks it.
    if dir.is_file() && path.ends_with(".gguf") {
        return Ok(dir.to_path_buf());
    }
    if !dir.is_dir() {
        return Err(format!(
            "path `{path}` is not a directory (nor a `.gguf` file) on this server"
        ));
    }
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        if !dir.join(file).is_file() {
            return Err(format!(
                "path `{path}` holds no {file} (a PEFT adapter directory holds \
                 adapter_config.json and adapter_model.safetensors)"
            ));
        }
    }
    Ok(dir.to_path_buf())
}

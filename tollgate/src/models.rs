//! From `models.toml` entries to running backends: a `local` model joins the memory budget
//! (`crate::resident`), which loads it onto its device and starts its engine; an `http` model
//! becomes a pool of upstreams, counting what they
//! stream with the model's tokenizer when the entry has a `source`.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context;
use tollgate_gateway::backend::upstream::UpstreamPool;
use tollgate_gateway::backend::{AdapterBackend, AdapterRef, Backend, ModelInfo};
use tollgate_gateway::config::{
    self, BackendConfig, Config, KvCacheDtype, LocalBackendConfig, ModelConfig, ModelSource,
};
use tollgate_runtime::chat_template::ChatTemplate;
use tollgate_runtime::engine::EngineConfig;
use tollgate_runtime::loader::{self, LoadOptions, LoadedModel};
use tollgate_runtime::model::WeightForm;

use crate::local::LocalBackend;
use crate::resident::Residents;

/// The runtime's view of a model source.
pub fn runtime_source(source: &ModelSource) -> loader::ModelSource {
    match source {
        ModelSource::Path(path) => loader::ModelSource::Path(path.clone()),
        ModelSource::Hub {
            repo,
            revision,
            file,
        } => loader::ModelSource::Hub {
            repo: repo.clone(),
            revision: revision.clone(),
            file: file.clone(),
        },
    }
}

/// The runtime's form of the catalogue's weight form.
fn runtime_weights(weights: config::WeightForm) -> WeightForm {
    match weights {
        config::WeightForm::Auto => WeightForm::Auto,
        config::WeightForm::Native => WeightForm::Native,
        config::WeightForm::Q8_0 => WeightForm::Q8_0,
        config::WeightForm::F32 => WeightForm::F32,
        config::WeightForm::F16 => WeightForm::F16,
        config::WeightForm::Bf16 => WeightForm::Bf16,
    }
}

/// Loads one local model (blocking: reads and converts the weights).
pub fn load_local(
    model: &ModelConfig,
    local: &LocalBackendConfig,
    weights_override: Option<WeightForm>,
) -> anyhow::Result<LoadedModel> {
    let weights = weights_override.unwrap_or_else(|| runtime_weights(local.weights));
    let options = LoadOptions {
        device: local.device.to_string(),
        weights,
        context_length: model.context_length.map(|c| c as usize),
        kv_cache_f16: local.kv_cache_dtype == Some(KvCacheDtype::F16),
    };
    let Some(source) = &model.source else {
        anyhow::bail!("model `{}`: a local backend needs a `source`", model.id);
    };
    let started = std::time::Instant::now();
    let mut loaded = loader::load(&model.id, &runtime_source(source), &options)?;
    if let Some(path) = &local.chat_template {
        let source = std::fs::read_to_string(path).with_context(|| {
            format!(
                "model `{}`: cannot read chat_template {}",
                model.id,
                path.display()
            )
        })?;
        let bos = loaded.tokenizer.bos_token().map(|(_, t)| t);
        let eos = loaded.tokenizer.eos_token().map(|(_, t)| t);
        loaded.template = ChatTemplate::new(&source, bos, eos)
            .with_context(|| format!("model `{}`: {}", model.id, path.display()))?;
    }
    // A model declaring more positions (Llama 3.1: 128k) than one sequence's KV fits in the
    // budget serves the context that fits; longer requests are refused, never admitted.
    let declared = loaded.model.config().context_length;
    let served = loaded
        .model
        .fit_kv_budget(local.kv_cache_bytes)
        .map_err(|e| anyhow::anyhow!("model `{}`: {e}", model.id))?;
    if served < declared {
        tracing::warn!(
            model = %model.id,
            declared,
            served,
            kv_cache_bytes = local.kv_cache_bytes,
            "the KV budget holds fewer tokens than the model's context; serving the shorter context"
        );
    }
    tracing::info!(
        model = %model.id,
        device = %local.device,
        weights = ?loaded.model.weight_form(),
        context_length = loaded.model.config().context_length,
        seconds = started.elapsed().as_secs_f64(),
        "model loaded"
    );
    Ok(loaded)
}

pub fn engine_config(local: &LocalBackendConfig) -> EngineConfig {
    EngineConfig {
        max_queue: local.max_queue,
        max_batch_tokens: local.max_batch_tokens,
        max_step_sequences: local
            .max_step_sequences
            .unwrap_or(EngineConfig::default().max_step_sequences),
        interleave_passes: local
            .interleave_passes
            .unwrap_or(EngineConfig::default().interleave_passes),
        interleave_every: local
            .interleave_every
            .unwrap_or(EngineConfig::default().interleave_every),
        speculative_draft: local
            .speculative_draft
            .unwrap_or(EngineConfig::default().speculative_draft),
        speculative_max_batch: local
            .speculative_max_batch
            .unwrap_or(EngineConfig::default().speculative_max_batch),
        kv_cache_bytes: local.kv_cache_bytes,
        // Finished prompts' KV kept for reuse: an eighth of the KV budget.
        prefix_cache_bytes: local.kv_cache_bytes / 8,
        ..EngineConfig::default()
    }
}

/// An upstream model's tokenizer, counting what it streams.
struct Counter(Arc<tollgate_runtime::tokenizer::ModelTokenizer>);

impl tollgate_gateway::backend::TokenCounter for Counter {
    fn count(&self, text: &str) -> u32 {
        // A text the tokenizer cannot encode counts as one token per byte: never fewer.
        self.0.encode(text, false).map_or_else(
            |_| u32::try_from(text.len()).unwrap_or(u32::MAX),
            |ids| u32::try_from(ids.len()).unwrap_or(u32::MAX),
        )
    }
}

/// The context assumed for an upstream model whose `context_length` is not configured (the
/// upstream enforces its own; this only bounds reservations).
const DEFAULT_UPSTREAM_CONTEXT: u32 = 8192;

/// The backends of a catalogue, and the memory budget its local models share.
pub struct Backends {
    pub backends: HashMap<String, Arc<dyn Backend>>,
    pub residents: Arc<Residents>,
}

/// Starts a backend for every model in the catalogue. Local models load before this returns
/// when they are pinned, or while they fit in `[server] model_memory_bytes` (pinned first,
/// then the others in the catalogue's order: with the default budget, every model that fits
/// in the machine's memory, as before budgets existed); the rest load on their first request.
pub async fn start_backends(config: &Config) -> anyhow::Result<Backends> {
    let capacity = config
        .server
        .model_memory_bytes
        .unwrap_or_else(crate::resident::default_budget);
    tracing::info!(
        model_memory_bytes = capacity,
        "memory budget of the local models"
    );
    let residents = Residents::start(capacity, Arc::new(start_local));
    let mut order: Vec<&ModelConfig> = config.models.values().collect();
    // Pinned models first, adapters last (on their base models' backends).
    order.sort_by_key(|m| (m.adapter.is_some(), !m.pinned));
    let mut backends: HashMap<String, Arc<dyn Backend>> = HashMap::new();
    for model in order {
        let backend = build_backend(&residents, model, true, &backends).await?;
        backends.insert(model.id.clone(), backend);
    }
    Ok(Backends {
        backends,
        residents,
    })
}

/// Loads a local model and starts its engine (blocking).
fn start_local(model: &ModelConfig, local: &LocalBackendConfig) -> anyhow::Result<LocalBackend> {
    let loaded = load_local(model, local, None)?;
    LocalBackend::start(loaded, engine_config(local), model.owned_by.clone())
}

/// One model's backend: a local model in the budget of `residents` (loaded now when pinned,
/// or at `start` when it fits), a pool of upstreams, or an adapter's model id on its base
/// model's backend (in `built`).
pub async fn build_backend(
    residents: &Arc<Residents>,
    model: &ModelConfig,
    start: bool,
    built: &HashMap<String, Arc<dyn Backend>>,
) -> anyhow::Result<Arc<dyn Backend>> {
    if let Some(adapter) = &model.adapter {
        let base = built.get(&adapter.base).cloned().with_context(|| {
            format!(
                "adapter `{}`: base model `{}` has no backend",
                model.id, adapter.base
            )
        })?;
        let reference = AdapterRef {
            name: adapter.name.clone(),
            path: adapter.path.clone(),
        };
        return Ok(Arc::new(AdapterBackend::new(
            base,
            reference,
            model.id.clone(),
            model.owned_by.clone(),
        )));
    }
    let info = ModelInfo {
        id: model.id.clone(),
        context_length: model.context_length.unwrap_or(DEFAULT_UPSTREAM_CONTEXT),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        owned_by: model.owned_by.clone(),
    };
    Ok(match &model.backend {
        BackendConfig::Local(local) => residents.add(model, local, info, start).await?,
        BackendConfig::Http(http) => {
            let api_key = match &http.api_key_env {
                Some(var) => Some(std::env::var(var).with_context(|| {
                    format!("model `{}`: api_key_env `{var}` is not set", model.id)
                })?),
                None => None,
            };
            let mut pool =
                UpstreamPool::new(info, model.id.clone(), &http.urls, api_key, http.discover)
                    .map_err(|e| anyhow::anyhow!("model `{}`: {e}", model.id))?
                    .with_responses(http.responses)
                    .with_forwarded_customer(http.forward_customer)
                    .with_forwarded_service_tier(http.forward_service_tier)
                    .with_forwarded_prediction(http.forward_prediction)
                    .with_routing(http.routing);
            if let Some(source) = &model.source {
                // With a source, what the upstream streams is counted in the model's own
                // tokens when its usage is missing or short.
                let source = runtime_source(source);
                let tokenizer =
                    tokio::task::spawn_blocking(move || loader::load_tokenizer(&source))
                        .await
                        .context("tokenizer loading task failed")?
                        .map_err(|e| anyhow::anyhow!("model `{}`: {e}", model.id))?;
                pool = pool.with_token_counter(Arc::new(Counter(Arc::new(tokenizer))));
            }
            Arc::new(pool)
        }
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// The engine settings of the catalogue's one local model, `backend` its extra fields.
    fn engine_of(backend: &str) -> EngineConfig {
        let toml = format!(
            r#"
            [models.m]
            source = {{ path = "m.gguf" }}
            backend = {{ type = "local"{backend} }}
            price = {{ input_per_mtok = "0.05", output_per_mtok = "0.10" }}
            "#
        );
        let config = Config::from_toml_str(&toml, Path::new(".")).unwrap();
        let BackendConfig::Local(local) = &config.models["m"].backend else {
            panic!("a local backend");
        };
        engine_config(local)
    }

    #[test]
    fn speculation_reaches_the_engine_from_the_catalogue() {
        let default = EngineConfig::default();
        let unset = engine_of("");
        assert_eq!(unset.speculative_draft, default.speculative_draft);
        assert_eq!(unset.speculative_max_batch, default.speculative_max_batch);
        let off = engine_of(", speculative_draft = 0, speculative_max_batch = 1");
        assert_eq!((off.speculative_draft, off.speculative_max_batch), (0, 1));
    }
}

//! Finding a model's files and loading them: a local GGUF file, a local safetensors directory,
//! or either of them from a Hugging Face Hub repo (downloaded once into the Hub cache, with a
//! progress bar).
//!
//! Produces a [`LoadedModel`]: weights on the device in the chosen form, the tokenizer and the
//! chat template, all read from the model itself. Every error names the model.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file;
use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Repo, RepoType};

use crate::chat_template::ChatTemplate;
use crate::device::parse_device;
use crate::gguf;
use crate::model::{LlamaModel, WeightForm};
use crate::tokenizer::ModelTokenizer;
use crate::{Error, Result};

/// Where a model's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A `.gguf` file, or a directory with `config.json`, `tokenizer.json`,
    /// `tokenizer_config.json` and `*.safetensors`.
    Path(PathBuf),
    /// A Hub repo: `file` names a GGUF file in it; without `file` the repo is a safetensors one.
    Hub {
        repo: String,
        revision: String,
        file: Option<String>,
    },
}

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// `cpu` or `cuda:N`.
    pub device: String,
    pub weights: WeightForm,
    /// Limit the context below what the model declares.
    pub context_length: Option<usize>,
    /// Half-precision KV cache (`f16`) instead of the device's default: half the memory per
    /// cached token, and on the CPU half what attention reads per step.
    pub kv_cache_f16: bool,
}

impl LoadOptions {
    /// On the CPU in weight form `weights`, with the model's own context and the device's
    /// default KV cache.
    pub fn cpu(weights: WeightForm) -> Self {
        Self {
            device: "cpu".into(),
            weights,
            context_length: None,
            kv_cache_f16: false,
        }
    }
}

/// A model ready to serve.
pub struct LoadedModel {
    pub id: String,
    pub model: LlamaModel,
    pub tokenizer: Arc<ModelTokenizer>,
    pub template: ChatTemplate,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("id", &self.id)
            .field("weights", &self.model.weight_form())
            .finish_non_exhaustive()
    }
}

/// Loads model `id` from `source`. Errors are wrapped with the model id.
pub fn load(id: &str, source: &ModelSource, options: &LoadOptions) -> Result<LoadedModel> {
    load_inner(id, source, options).map_err(|e| match e {
        Error::Config(m) => Error::Config(format!("model `{id}`: {m}")),
        other => Error::Config(format!("model `{id}`: {other}")),
    })
}

fn load_inner(id: &str, source: &ModelSource, options: &LoadOptions) -> Result<LoadedModel> {
    let device = parse_device(&options.device)?;
    let local = resolve(source)?;
    // The tokenizer (for a 128k vocabulary, most of a second of building tables) is built on
    // its own thread while the weights load.
    let (model, tokenizer) = if local.is_dir() {
        std::thread::scope(|scope| {
            let tokenizer = scope.spawn(|| ModelTokenizer::from_dir(&local));
            let model = LlamaModel::from_safetensors(
                &local,
                &device,
                options.weights,
                options.context_length,
            );
            (model, join(tokenizer))
        })
    } else {
        let (file, content) = open_gguf(&local)?;
        std::thread::scope(|scope| {
            let tokenizer = scope.spawn(|| {
                let tokenizer = ModelTokenizer::from_gguf(&content);
                release_free_memory();
                tokenizer
            });
            let model = LlamaModel::from_gguf_file(
                &content,
                &file,
                &device,
                options.weights,
                options.context_length,
            );
            (model, join(tokenizer))
        })
    };
    // The tokenizer's error first: a vocabulary that cannot be served says so even when the
    // weights are bad too (as when the tokenizer was built first).
    let tokenizer = tokenizer?;
    let mut model = model?;
    if options.kv_cache_f16 {
        model.set_kv_dtype(candle_core::DType::F16)?;
    }
    let bos = tokenizer.bos_token().map(|(_, t)| t);
    let eos = tokenizer.eos_token().map(|(_, t)| t);
    let template = match tokenizer.chat_template() {
        Some(src) => ChatTemplate::new(src, bos, eos)?,
        None => {
            tracing::warn!(model = id, "the model has no chat template; using ChatML");
            ChatTemplate::chatml()?
        }
    };
    Ok(LoadedModel {
        id: id.to_string(),
        model,
        tokenizer: Arc::new(tokenizer),
        template,
    })
}

/// The result of a scoped thread; its panic (there is none outside bugs) as an error.
fn join<T>(handle: std::thread::ScopedJoinHandle<'_, Result<T>>) -> Result<T> {
    handle
        .join()
        .unwrap_or_else(|_| Err(Error::Config("the tokenizer thread panicked".into())))
}

/// The development model ([`crate::dev_model`]) on the CPU in its `auto` weight form, its
/// context cut to `context_length`: the engine tests' model.
pub fn load_dev_model(context_length: usize) -> Result<LoadedModel> {
    let options = LoadOptions {
        context_length: Some(context_length),
        ..LoadOptions::cpu(WeightForm::Auto)
    };
    let source = ModelSource::Path(crate::dev_model::require_dev_model()?);
    load("dev", &source, &options)
}

/// Only the tokenizer of the model at `source` (GGUF metadata, or `tokenizer.json` in a
/// safetensors directory), without loading its weights: for counting the tokens of a model
/// served elsewhere.
pub fn load_tokenizer(source: &ModelSource) -> Result<ModelTokenizer> {
    let local = resolve(source)?;
    if local.is_dir() {
        return ModelTokenizer::from_dir(&local);
    }
    let (_, content) = open_gguf(&local)?;
    ModelTokenizer::from_gguf(&content)
}

/// A GGUF file opened and its header read (checked as untrusted input by [`gguf`]).
fn open_gguf(path: &Path) -> Result<(std::fs::File, gguf_file::Content)> {
    let mut file = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let content = gguf::read_content(&mut file).map_err(|message| Error::Gguf {
        path: path.to_path_buf(),
        message,
    })?;
    Ok((file, content))
}

/// Turns a source into a local path, downloading from the Hub when needed.
pub fn resolve(source: &ModelSource) -> Result<PathBuf> {
    match source {
        ModelSource::Path(path) => {
            if path.exists() {
                Ok(path.clone())
            } else {
                Err(Error::Io {
                    path: path.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "no such file or directory (for the development model, run scripts/fetch-model.sh)",
                    ),
                })
            }
        }
        ModelSource::Hub {
            repo,
            revision,
            file,
        } => {
            // `from_env` honours HF_HOME (cache) and HF_ENDPOINT (mirror); HF_TOKEN for gated repos.
            let mut builder = ApiBuilder::from_env().with_progress(true);
            if let Ok(token) = std::env::var("HF_TOKEN") {
                builder = builder.with_token(Some(token));
            }
            hub_fetch(builder, repo, revision, file.as_deref())
        }
    }
}

fn hub_fetch(
    builder: ApiBuilder,
    repo: &str,
    revision: &str,
    file: Option<&str>,
) -> Result<PathBuf> {
    let hub_err = |message: String| Error::Hub {
        repo: repo.to_string(),
        message,
    };
    let api = builder
        .build()
        .map_err(|e| hub_err(format!("cannot set up the Hub client: {e}")))?;
    let handle = api.repo(Repo::with_revision(
        repo.to_string(),
        RepoType::Model,
        revision.to_string(),
    ));
    let get = |name: &str| -> Result<PathBuf> {
        tracing::info!(
            repo,
            revision,
            file = name,
            "fetching from the Hugging Face Hub"
        );
        handle.get(name).map_err(|e| {
            hub_err(format!(
                "cannot fetch `{name}` at revision `{revision}`: {e} (offline? set HF_HUB_OFFLINE=1 to use only the local cache, or point `source` at a local path)"
            ))
        })
    };
    if let Some(file) = file {
        return get(file);
    }
    // A safetensors repo: configuration, tokenizer and (possibly sharded) weights.
    let config = get("config.json")?;
    get("tokenizer.json")?;
    get("tokenizer_config.json")?;
    match get("model.safetensors.index.json") {
        Ok(index) => {
            for shard in shard_names(&index)? {
                get(&shard)?;
            }
        }
        Err(_) => {
            get("model.safetensors")?;
        }
    }
    config
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| hub_err("the Hub cache returned a path without a parent".into()))
}

fn shard_names(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|source| Error::Io {
        path: index.to_path_buf(),
        source,
    })?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Config(format!("{}: {e}", index.display())))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::Config(format!("{} has no weight_map", index.display())))?;
    let mut shards: Vec<String> = map
        .values()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    shards.sort();
    shards.dedup();
    Ok(shards)
}

/// Hands the allocator's free pages back to the system: building a 128k-token vocabulary
/// frees about 30 MB of temporary strings on its own thread's arena, which glibc would
/// otherwise keep resident while the weights load.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory; it is safe to call at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_path_names_the_file() {
        let err = resolve(&ModelSource::Path("/nonexistent/model.gguf".into())).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("/nonexistent/model.gguf"), "{msg}");
    }

    #[test]
    fn offline_hub_fails_with_the_repo_name() {
        // A closed local port stands in for an unreachable Hub: the test never touches the network.
        let cache = std::env::temp_dir().join(format!("tollgate-hub-{}", std::process::id()));
        let builder = ApiBuilder::new()
            .with_endpoint("http://127.0.0.1:9".into())
            .with_cache_dir(cache)
            .with_retries(0)
            .with_progress(false);
        let repo = "HuggingFaceTB/SmolLM2-135M-Instruct";
        let err = hub_fetch(builder, repo, "main", Some("model.gguf")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("HuggingFaceTB/SmolLM2-135M-Instruct"), "{msg}");
        assert!(msg.contains("model.gguf"), "{msg}");
    }
}

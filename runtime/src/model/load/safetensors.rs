//! Loading a Hugging Face Llama directory: `config.json` read into a [`LlamaConfig`] and the
//! `*.safetensors` files (sharded ones through `model.safetensors.index.json`) mapped and
//! converted into the chosen weight form.
//!
//! Safetensors keep the half-split RoPE layout, so the model uses that variant.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::{check_cpu_kernels, kv_dtype, resolve_form, validate};
use crate::model::embed::Embedding;
use crate::model::linear::Linear;
use crate::model::llama::{Block, LlamaModel};
use crate::model::{LlamaConfig, RopeScaling, WeightForm};
use crate::{Error, Result};

impl LlamaModel {
    /// Loads a Hugging Face Llama directory: `config.json` and `*.safetensors` (sharded ones
    /// through `model.safetensors.index.json`).
    pub fn from_safetensors(
        dir: &Path,
        device: &Device,
        form: WeightForm,
        context_override: Option<usize>,
    ) -> Result<Self> {
        check_cpu_kernels(device)?;
        let config_path = dir.join("config.json");
        let hf = HfConfig::read(&config_path)?;
        let config = hf.llama_config(&config_path, context_override)?;
        validate(&config)?;
        let files = safetensors_files(dir)?;
        // SAFETY-free: candle maps the files read-only; they must not change while loaded.
        let st = unsafe { MmapedSafetensors::multi(&files) }
            .map_err(|e| Error::Weights(format!("{}: {e}", dir.display())))?;
        let tensors = Tensors { st: &st, device };
        let resolved = resolve_form(form, device);
        let embed = tensors.load("model.embed_tokens.weight")?;
        let lm_head_weight = if hf.tie_word_embeddings.unwrap_or(false) {
            embed.clone()
        } else {
            tensors
                .load("lm_head.weight")
                .or_else(|_| Ok::<_, Error>(embed.clone()))?
        };
        let lm_head = Linear::from_dense(lm_head_weight, resolved, device)?;
        let blocks = (0..config.n_layers)
            .map(|i| tensors.block(i, resolved))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embed: Embedding::Dense(embed.to_dtype(DType::F32)?),
            norm: tensors.f32_of("model.norm.weight")?,
            config,
            blocks,
            lm_head,
            rope: OnceLock::new(),
            device: device.clone(),
            form: resolved,
            kv_dtype: kv_dtype(device),
        })
    }
}

/// The tensors of the mapped safetensors files, loaded onto one device.
struct Tensors<'a> {
    st: &'a MmapedSafetensors,
    device: &'a Device,
}

impl Tensors<'_> {
    fn load(&self, name: &str) -> Result<Tensor> {
        self.st
            .load(name, self.device)
            .map_err(|e| Error::Weights(format!("tensor `{name}`: {e}")))
    }

    fn f32_of(&self, name: &str) -> Result<Tensor> {
        Ok(self.load(name)?.to_dtype(DType::F32)?)
    }

    /// Layer `i`: its two norms and seven projections, in the chosen form.
    fn block(&self, i: usize, form: WeightForm) -> Result<Block> {
        let p = format!("model.layers.{i}");
        let linear = |name: &str| -> Result<Linear> {
            Linear::from_dense(self.load(&format!("{p}.{name}.weight"))?, form, self.device)
        };
        Ok(Block {
            attn_norm: self.f32_of(&format!("{p}.input_layernorm.weight"))?,
            wq: linear("self_attn.q_proj")?,
            wk: linear("self_attn.k_proj")?,
            wv: linear("self_attn.v_proj")?,
            wo: linear("self_attn.o_proj")?,
            ffn_norm: self.f32_of(&format!("{p}.post_attention_layernorm.weight"))?,
            w_gate: linear("mlp.gate_proj")?,
            w_up: linear("mlp.up_proj")?,
            w_down: linear("mlp.down_proj")?,
        })
    }
}

#[derive(Debug, Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    num_hidden_layers: usize,
    vocab_size: usize,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f32>,
    max_position_embeddings: usize,
    tie_word_embeddings: Option<bool>,
    head_dim: Option<usize>,
    rope_scaling: Option<serde_json::Value>,
}

impl HfConfig {
    fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// The model's configuration (before validation), read from `path`; the context is
    /// `context_override` when that is smaller than the model's. A model that is not a Llama
    /// is refused.
    fn llama_config(&self, path: &Path, context_override: Option<usize>) -> Result<LlamaConfig> {
        let is_llama = self.model_type.as_deref() == Some("llama")
            || self.architectures.iter().any(|a| a == "LlamaForCausalLM");
        if !is_llama {
            let name = self
                .architectures
                .first()
                .cloned()
                .or(self.model_type.clone())
                .unwrap_or_else(|| "unknown".into());
            return Err(Error::UnsupportedArchitecture(name));
        }
        let n_kv_heads = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        let head_dim = self
            .head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1));
        let rope_theta = self.rope_theta.unwrap_or(10_000.0);
        let rope_scaling = RopeScaling::from_hf(self.rope_scaling.as_ref(), head_dim, rope_theta)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        Ok(LlamaConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            n_layers: self.num_hidden_layers,
            n_heads: self.num_attention_heads,
            n_kv_heads,
            head_dim,
            ffn_size: self.intermediate_size,
            rope_theta,
            rms_eps: self.rms_norm_eps.unwrap_or(1e-5),
            context_length: context_override.map_or(self.max_position_embeddings, |c| {
                c.min(self.max_position_embeddings)
            }),
            rope_interleaved: false,
            rope_scaling,
        })
    }
}

fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|source| Error::Io {
            path: index.clone(),
            source,
        })?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Config(format!("{}: {e}", index.display())))?;
        let mut files: Vec<PathBuf> = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .map(|m| {
                m.values()
                    .filter_map(|v| v.as_str())
                    .map(|f| dir.join(f))
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files.dedup();
        if files.is_empty() {
            return Err(Error::Config(format!("{} lists no files", index.display())));
        }
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(Error::Weights(format!(
        "no model.safetensors or model.safetensors.index.json in {}",
        dir.display()
    )))
}

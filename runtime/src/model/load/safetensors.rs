//! Loading a Hugging Face Llama (or Mistral, Qwen 2, Phi-3) directory: `config.json` read into a [`LlamaConfig`] and the
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
use crate::model::llama::{Block, LlamaModel, QkvBias};
use crate::model::{Architecture, LlamaConfig, RopeScaling, WeightForm};
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
            .map(|i| tensors.block(i, &config, resolved))
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

    /// Layer `i`: its two norms and seven projections (split out of Phi-3's fused
    /// `qkv_proj` and `gate_up_proj`), and the Q/K/V biases it has (Qwen 2's), in the chosen
    /// form.
    fn block(&self, i: usize, config: &LlamaConfig, form: WeightForm) -> Result<Block> {
        let p = format!("model.layers.{i}");
        let dense = |w: Tensor| Linear::from_dense(w, form, self.device);
        let linear = |name: &str| dense(self.load(&format!("{p}.{name}.weight"))?);
        let q_dim = config.n_heads * config.head_dim;
        let kv_dim = config.n_kv_heads * config.head_dim;
        let (wq, wk, wv, qkv_bias) = if config.architecture == Architecture::Phi3 {
            let qkv = self.load(&format!("{p}.self_attn.qkv_proj.weight"))?;
            (
                dense(qkv.narrow(0, 0, q_dim)?)?,
                dense(qkv.narrow(0, q_dim, kv_dim)?)?,
                dense(qkv.narrow(0, q_dim + kv_dim, kv_dim)?)?,
                QkvBias::default(),
            )
        } else {
            let bias = |t: &str| {
                let name = format!("{p}.self_attn.{t}_proj.bias");
                self.st
                    .get(&name)
                    .is_ok()
                    .then(|| self.f32_of(&name))
                    .transpose()
            };
            (
                linear("self_attn.q_proj")?,
                linear("self_attn.k_proj")?,
                linear("self_attn.v_proj")?,
                QkvBias {
                    q: bias("q")?,
                    k: bias("k")?,
                    v: bias("v")?,
                },
            )
        };
        let (w_gate, w_up) = if config.architecture == Architecture::Phi3 {
            let gate_up = self.load(&format!("{p}.mlp.gate_up_proj.weight"))?;
            let ffn = config.ffn_size;
            (
                dense(gate_up.narrow(0, 0, ffn)?)?,
                dense(gate_up.narrow(0, ffn, ffn)?)?,
            )
        } else {
            (linear("mlp.gate_proj")?, linear("mlp.up_proj")?)
        };
        Ok(Block {
            attn_norm: self.f32_of(&format!("{p}.input_layernorm.weight"))?,
            wq,
            wk,
            wv,
            qkv_bias,
            wo: linear("self_attn.o_proj")?,
            ffn_norm: self.f32_of(&format!("{p}.post_attention_layernorm.weight"))?,
            w_gate,
            w_up,
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
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
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
    /// `context_override` when that is smaller than the model's. A model that is not a Llama,
    /// Mistral, Qwen 2 or Phi-3 is refused.
    fn llama_config(&self, path: &Path, context_override: Option<usize>) -> Result<LlamaConfig> {
        let architecture = self.architecture()?;
        // Qwen 2 slides its window over the layers from `max_window_layers` on only.
        if architecture == Architecture::Qwen2 && self.use_sliding_window == Some(true) {
            return Err(Error::Config(format!(
                "{}: Qwen 2's per-layer sliding window (`use_sliding_window`) is not supported",
                path.display()
            )));
        }
        let sliding_window = match architecture {
            Architecture::Qwen2 => None,
            Architecture::Llama | Architecture::Phi3 => self.sliding_window.filter(|&w| w > 0),
        };
        let n_kv_heads = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        let head_dim = self
            .head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1));
        let rope_theta = self.rope_theta.unwrap_or(10_000.0);
        let rope_scaling = RopeScaling::from_hf(self.rope_scaling.as_ref(), head_dim, rope_theta)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        Ok(LlamaConfig {
            architecture,
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
            sliding_window,
        })
    }

    /// `model_type` (or `architectures`): Llama and Mistral run as `llama`.
    fn architecture(&self) -> Result<Architecture> {
        let known = [
            ("llama", "LlamaForCausalLM", Architecture::Llama),
            ("mistral", "MistralForCausalLM", Architecture::Llama),
            ("qwen2", "Qwen2ForCausalLM", Architecture::Qwen2),
            ("phi3", "Phi3ForCausalLM", Architecture::Phi3),
        ];
        for (model_type, class, architecture) in known {
            if self.model_type.as_deref() == Some(model_type)
                || self.architectures.iter().any(|a| a == class)
            {
                return Ok(architecture);
            }
        }
        let name = self
            .architectures
            .first()
            .cloned()
            .or(self.model_type.clone())
            .unwrap_or_else(|| "unknown".into());
        Err(Error::UnsupportedArchitecture(name))
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

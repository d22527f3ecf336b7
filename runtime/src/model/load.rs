//! Loading Llama weights from a GGUF file or a Hugging Face safetensors directory into the
//! chosen weight form on the chosen device.
//!
//! GGUF stores Q/K rows permuted for interleaved RoPE and safetensors keep the half-split
//! layout, so each source picks its RoPE variant instead of permuting weights. A missing
//! tensor or key is an error naming it.

use std::io::{Read, Seek};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Content;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::linear::Linear;
use super::llama::{Block, LlamaModel};
use super::rope::rope_tables;
use super::{LlamaConfig, RopeScaling, WeightForm};
use crate::{Error, Result};

fn kv_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::F16
    }
}

impl LlamaModel {
    /// Loads a GGUF model (`general.architecture = "llama"`).
    pub fn from_gguf<R: Read + Seek>(
        content: &Content,
        reader: &mut R,
        device: &Device,
        form: WeightForm,
        context_override: Option<usize>,
    ) -> Result<Self> {
        check_cpu_kernels(device)?;
        let md = |key: &str| {
            content.metadata.get(key).ok_or_else(|| Error::Metadata {
                key: key.to_string(),
            })
        };
        let arch = md("general.architecture")?
            .to_string()
            .map_err(|_| Error::Metadata {
                key: "general.architecture".into(),
            })?
            .clone();
        if arch != "llama" {
            return Err(Error::UnsupportedArchitecture(arch));
        }
        let num = |key: &str| -> Result<usize> {
            let v = md(key)?;
            v.to_u32()
                .map(|n| n as usize)
                .or_else(|_| v.to_u64().map(|n| n as usize))
                .map_err(|_| Error::Metadata {
                    key: key.to_string(),
                })
        };
        let float =
            |key: &str| -> Option<f32> { content.metadata.get(key).and_then(|v| v.to_f32().ok()) };
        let hidden_size = num("llama.embedding_length")?;
        let n_heads = num("llama.attention.head_count")?;
        let n_kv_heads = num("llama.attention.head_count_kv").unwrap_or(n_heads);
        let head_dim = num("llama.rope.dimension_count").unwrap_or(hidden_size / n_heads.max(1));
        let embd_info = content
            .tensor_infos
            .get("token_embd.weight")
            .ok_or_else(|| Error::Weights("tensor `token_embd.weight` is missing".into()))?;
        let vocab_size = num("llama.vocab_size").unwrap_or(embd_info.shape.dims()[0]);
        let model_context = num("llama.context_length")?;
        let rope_theta = float("llama.rope.freq_base").unwrap_or(10_000.0);
        let rope_scaling = gguf_rope_scaling(content, reader, head_dim)?;
        let config = LlamaConfig {
            vocab_size,
            hidden_size,
            n_layers: num("llama.block_count")?,
            n_heads,
            n_kv_heads,
            head_dim,
            ffn_size: num("llama.feed_forward_length")?,
            rope_theta,
            rms_eps: f64::from(float("llama.attention.layer_norm_rms_epsilon").unwrap_or(1e-5)),
            context_length: context_override.map_or(model_context, |c| c.min(model_context)),
            rope_interleaved: true,
            rope_scaling,
        };
        validate(&config)?;

        let mut tensor = |name: &str| {
            if !content.tensor_infos.contains_key(name) {
                return Err(Error::Weights(format!("tensor `{name}` is missing")));
            }
            content
                .tensor(reader, name, device)
                .map_err(|e| Error::Weights(format!("tensor `{name}`: {e}")))
        };
        let resolved = resolve_form(form, device);
        let embed_q = tensor("token_embd.weight")?;
        let embed = embed_q.dequantize(device)?;
        let lm_head = if content.tensor_infos.contains_key("output.weight") {
            Linear::from_qtensor(tensor("output.weight")?, resolved, device)?
        } else {
            // Tied embeddings: the embedding matrix is the output projection.
            Linear::from_qtensor(embed_q, resolved, device)?
        };
        let norm = tensor("output_norm.weight")?.dequantize(device)?;
        let mut blocks = Vec::with_capacity(config.n_layers);
        for i in 0..config.n_layers {
            let mut linear = |name: &str| -> Result<Linear> {
                Linear::from_qtensor(tensor(&format!("blk.{i}.{name}.weight"))?, resolved, device)
            };
            let wq = linear("attn_q")?;
            let wk = linear("attn_k")?;
            let wv = linear("attn_v")?;
            let wo = linear("attn_output")?;
            let w_gate = linear("ffn_gate")?;
            let w_up = linear("ffn_up")?;
            let w_down = linear("ffn_down")?;
            blocks.push(Block {
                attn_norm: tensor(&format!("blk.{i}.attn_norm.weight"))?.dequantize(device)?,
                ffn_norm: tensor(&format!("blk.{i}.ffn_norm.weight"))?.dequantize(device)?,
                wq,
                wk,
                wv,
                wo,
                w_gate,
                w_up,
                w_down,
            });
        }
        let (cos, sin) = rope_tables(&config, device)?;
        Ok(Self {
            config,
            embed,
            blocks,
            norm,
            lm_head,
            cos,
            sin,
            device: device.clone(),
            form: resolved,
            kv_dtype: kv_dtype(device),
        })
    }

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
        let text = std::fs::read_to_string(&config_path).map_err(|source| Error::Io {
            path: config_path.clone(),
            source,
        })?;
        let hf: HfConfig = serde_json::from_str(&text)
            .map_err(|e| Error::Config(format!("{}: {e}", config_path.display())))?;
        let is_llama = hf.model_type.as_deref() == Some("llama")
            || hf.architectures.iter().any(|a| a == "LlamaForCausalLM");
        if !is_llama {
            let name = hf
                .architectures
                .first()
                .cloned()
                .or(hf.model_type.clone())
                .unwrap_or_else(|| "unknown".into());
            return Err(Error::UnsupportedArchitecture(name));
        }
        let n_kv_heads = hf.num_key_value_heads.unwrap_or(hf.num_attention_heads);
        let head_dim = hf
            .head_dim
            .unwrap_or(hf.hidden_size / hf.num_attention_heads.max(1));
        let rope_theta = hf.rope_theta.unwrap_or(10_000.0);
        let rope_scaling = RopeScaling::from_hf(hf.rope_scaling.as_ref(), head_dim, rope_theta)
            .map_err(|e| Error::Config(format!("{}: {e}", config_path.display())))?;
        let config = LlamaConfig {
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            n_layers: hf.num_hidden_layers,
            n_heads: hf.num_attention_heads,
            n_kv_heads,
            head_dim,
            ffn_size: hf.intermediate_size,
            rope_theta,
            rms_eps: hf.rms_norm_eps.unwrap_or(1e-5),
            context_length: context_override.map_or(hf.max_position_embeddings, |c| {
                c.min(hf.max_position_embeddings)
            }),
            rope_interleaved: false,
            rope_scaling,
        };
        validate(&config)?;
        let files = safetensors_files(dir)?;
        // SAFETY-free: candle maps the files read-only; they must not change while loaded.
        let st = unsafe { MmapedSafetensors::multi(&files) }
            .map_err(|e| Error::Weights(format!("{}: {e}", dir.display())))?;
        let load = |name: &str| -> Result<Tensor> {
            st.load(name, device)
                .map_err(|e| Error::Weights(format!("tensor `{name}`: {e}")))
        };
        let resolved = resolve_form(form, device);
        let embed = load("model.embed_tokens.weight")?;
        let lm_head_weight = if hf.tie_word_embeddings.unwrap_or(false) {
            embed.clone()
        } else {
            load("lm_head.weight").or_else(|_| Ok::<_, Error>(embed.clone()))?
        };
        let lm_head = Linear::from_dense(lm_head_weight, resolved, device)?;
        let f32_of = |name: &str| -> Result<Tensor> { Ok(load(name)?.to_dtype(DType::F32)?) };
        let mut blocks = Vec::with_capacity(config.n_layers);
        for i in 0..config.n_layers {
            let p = format!("model.layers.{i}");
            let linear = |name: &str| -> Result<Linear> {
                Linear::from_dense(load(&format!("{p}.{name}.weight"))?, resolved, device)
            };
            blocks.push(Block {
                attn_norm: f32_of(&format!("{p}.input_layernorm.weight"))?,
                wq: linear("self_attn.q_proj")?,
                wk: linear("self_attn.k_proj")?,
                wv: linear("self_attn.v_proj")?,
                wo: linear("self_attn.o_proj")?,
                ffn_norm: f32_of(&format!("{p}.post_attention_layernorm.weight"))?,
                w_gate: linear("mlp.gate_proj")?,
                w_up: linear("mlp.up_proj")?,
                w_down: linear("mlp.down_proj")?,
            });
        }
        let (cos, sin) = rope_tables(&config, device)?;
        Ok(Self {
            embed: embed.to_dtype(DType::F32)?,
            norm: f32_of("model.norm.weight")?,
            config,
            blocks,
            lm_head,
            cos,
            sin,
            device: device.clone(),
            form: resolved,
            kv_dtype: kv_dtype(device),
        })
    }
}

/// The RoPE scaling a GGUF file declares: `llama.rope.scaling.type` (`none` or `linear`, with
/// `llama.rope.scaling.factor`; older files: `llama.rope.scale_linear`) and the per-pair
/// frequency divisors of the tensor `rope_freqs.weight` (Llama 3.1+ conversions).
fn gguf_rope_scaling<R: Read + Seek>(
    content: &Content,
    reader: &mut R,
    head_dim: usize,
) -> Result<RopeScaling> {
    let md = |key: &str| content.metadata.get(key);
    let scaling_type = match md("llama.rope.scaling.type") {
        Some(v) => Some(v.to_string().map_err(|_| Error::Metadata {
            key: "llama.rope.scaling.type".into(),
        })?),
        None => None,
    };
    let factor = md("llama.rope.scaling.factor")
        .or_else(|| md("llama.rope.scale_linear"))
        .map(|v| {
            v.to_f32().map_err(|_| Error::Metadata {
                key: "llama.rope.scaling.factor".into(),
            })
        })
        .transpose()?;
    let divisors = if content.tensor_infos.contains_key("rope_freqs.weight") {
        let t = content
            .tensor(reader, "rope_freqs.weight", &Device::Cpu)
            .map_err(|e| Error::Weights(format!("tensor `rope_freqs.weight`: {e}")))?;
        Some(
            t.dequantize(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?,
        )
    } else {
        None
    };
    RopeScaling::from_gguf(scaling_type.map(String::as_str), factor, divisors, head_dim)
}

/// `Auto` stays `Auto` on CPU (block codes) and means f16 elsewhere.
fn resolve_form(form: WeightForm, device: &Device) -> WeightForm {
    match form {
        WeightForm::Auto if !device.is_cpu() => WeightForm::F16,
        other => other,
    }
}

fn validate(c: &LlamaConfig) -> Result<()> {
    let bad = |m: String| Err(Error::Config(m));
    if c.n_heads == 0 || c.n_kv_heads == 0 || !c.n_heads.is_multiple_of(c.n_kv_heads) {
        return bad(format!(
            "{} attention heads cannot share {} KV heads",
            c.n_heads, c.n_kv_heads
        ));
    }
    if c.head_dim == 0 || !c.head_dim.is_multiple_of(2) || c.n_heads * c.head_dim != c.hidden_size {
        return bad(format!(
            "head dim {} with {} heads does not match hidden size {}",
            c.head_dim, c.n_heads, c.hidden_size
        ));
    }
    if c.n_layers == 0 || c.vocab_size == 0 || c.context_length == 0 {
        return bad(format!(
            "degenerate model: {} layers, vocab {}, context {}",
            c.n_layers, c.vocab_size, c.context_length
        ));
    }
    Ok(())
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

/// Refuses a `TOLLGATE_CPU_KERNELS` setting this CPU cannot run before any kernel runs, and
/// says which path the CPU kernels take.
fn check_cpu_kernels(device: &Device) -> Result<()> {
    let kernels = super::CpuKernels::from_env()?;
    if device.is_cpu() {
        tracing::info!(%kernels, detected = %super::CpuKernels::detected(), "CPU kernels");
    }
    Ok(())
}

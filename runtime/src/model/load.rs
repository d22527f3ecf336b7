//! Loading Llama weights from a GGUF file or a Hugging Face safetensors directory into the
//! chosen weight form on the chosen device.
//!
//! GGUF stores Q/K rows permuted for interleaved RoPE and safetensors keep the half-split
//! layout, so each source picks its RoPE variant instead of permuting weights. A missing
//! tensor or key is an error naming it.

use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::quantized::gguf_file::{Content, TensorInfo};
use candle_core::quantized::GgmlDType;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use serde::Deserialize;

use super::embed::{packs, Embedding};
use super::linear::{qtensor_from_bytes, Linear};
use super::llama::{Block, LlamaModel};
use super::{LlamaConfig, RopeScaling, WeightForm};
use crate::{gguf, Error, Result};

fn kv_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::F16
    }
}

/// A tensor's bytes: mapped from the file (unmapped when dropped, so the pages leave the
/// process as soon as the weights are converted) or read into memory.
enum TensorBytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for TensorBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Self::Mapped(m) => m,
            Self::Owned(v) => v,
        }
    }
}

/// Where the bytes of a GGUF file's tensors come from; shared by the threads that convert
/// the blocks.
trait TensorSource: Sync {
    fn bytes(&self, range: Range<u64>) -> Result<TensorBytes>;
    /// Fills `buf` from the file at `offset` (inside a tensor's checked range).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    fn size(&self) -> Result<u64>;
}

/// Any reader: each tensor read into memory, one read at a time.
struct ReadSource<'a, R>(std::sync::Mutex<&'a mut R>);

impl<'a, R: Read + Seek> ReadSource<'a, R> {
    fn reader(&self) -> std::sync::MutexGuard<'_, &'a mut R> {
        // A panic while reading leaves only a seek position behind: every read seeks first.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl<R: Read + Seek + Send> TensorSource for ReadSource<'_, R> {
    fn bytes(&self, range: Range<u64>) -> Result<TensorBytes> {
        let len = usize::try_from(range.end - range.start)
            .map_err(|_| Error::Weights("a tensor is larger than memory".into()))?;
        let mut buf = vec![0u8; len];
        let mut reader = self.reader();
        reader
            .seek(SeekFrom::Start(range.start))
            .and_then(|_| reader.read_exact(&mut buf))
            .map_err(|e| Error::Weights(format!("reading tensor bytes {range:?}: {e}")))?;
        Ok(TensorBytes::Owned(buf))
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut reader = self.reader();
        reader
            .seek(SeekFrom::Start(offset))
            .and_then(|_| reader.read_exact(buf))
            .map_err(|e| Error::Weights(format!("reading tensor bytes at {offset}: {e}")))
    }

    fn size(&self) -> Result<u64> {
        self.reader()
            .seek(SeekFrom::End(0))
            .map_err(|e| Error::Weights(format!("cannot size the GGUF file: {e}")))
    }
}

/// A file: each tensor mapped on its own, read-only.
struct MapSource<'a>(&'a std::fs::File);

impl TensorSource for MapSource<'_> {
    fn bytes(&self, range: Range<u64>) -> Result<TensorBytes> {
        let len = usize::try_from(range.end - range.start)
            .map_err(|_| Error::Weights("a tensor is larger than memory".into()))?;
        if len == 0 {
            return Ok(TensorBytes::Owned(Vec::new()));
        }
        // SAFETY: a read-only private mapping of a range checked to be inside the file. The
        // file must not be truncated while the model loads (as for every mapped model file);
        // the mapping lives only until this tensor is converted.
        let map = unsafe {
            memmap2::MmapOptions::new()
                .offset(range.start)
                .len(len)
                .populate()
                .map(self.0)
        }
        .map_err(|e| Error::Weights(format!("cannot map tensor bytes {range:?}: {e}")))?;
        Ok(TensorBytes::Mapped(map))
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        self.0
            .read_exact_at(buf, offset)
            .map_err(|e| Error::Weights(format!("reading tensor bytes at {offset}: {e}")))
    }

    fn size(&self) -> Result<u64> {
        Ok(self
            .0
            .metadata()
            .map_err(|e| Error::Weights(format!("cannot size the GGUF file: {e}")))?
            .len())
    }
}

/// The tensors of a GGUF file, each checked against the shape the model expects before any
/// byte of it is read.
struct GgufTensors<'a, S> {
    content: &'a Content,
    source: S,
    file_size: u64,
}

impl<S: TensorSource> GgufTensors<'_, S> {
    fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.content
            .tensor_infos
            .get(name)
            .ok_or_else(|| Error::Weights(format!("tensor `{name}` is missing")))
    }

    /// The dtype and byte range of `name`, which must have dimensions `dims` (outermost
    /// first).
    fn range(&self, name: &str, dims: &[usize]) -> Result<(GgmlDType, Range<u64>)> {
        let info = self.info(name)?;
        if info.shape.dims() != dims {
            return Err(Error::Weights(format!(
                "tensor `{name}` has shape {:?}, the model's configuration needs {dims:?}",
                info.shape.dims()
            )));
        }
        let range = gguf::tensor_range(name, info, self.content.tensor_data_offset, self.file_size)
            .map_err(Error::Weights)?;
        Ok((info.ggml_dtype, range))
    }

    /// The dtype and bytes of `name`, which must have dimensions `dims` (outermost first).
    fn bytes(&self, name: &str, dims: &[usize]) -> Result<(GgmlDType, TensorBytes)> {
        let (dtype, range) = self.range(name, dims)?;
        Ok((dtype, self.source.bytes(range)?))
    }

    /// An f32 vector (norm weights, RoPE divisors).
    fn vector(&self, name: &str, len: usize, device: &Device) -> Result<Tensor> {
        let (dtype, bytes) = self.bytes(name, &[len])?;
        Ok(qtensor_from_bytes(dtype, &[len], &bytes, &Device::Cpu)?
            .dequantize(&Device::Cpu)?
            .to_device(device)?)
    }

    /// A projection `(out, inp)` in the chosen form.
    fn linear(
        &self,
        name: &str,
        shape: (usize, usize),
        form: WeightForm,
        device: &Device,
    ) -> Result<Linear> {
        let (dtype, range) = self.range(name, &[shape.0, shape.1])?;
        let context = |e: Error| Error::Weights(format!("tensor `{name}`: {e}"));
        // Rows straight from the file into the kernel's layout where the form allows.
        let len = usize::try_from(range.end - range.start)
            .map_err(|_| Error::Weights(format!("tensor `{name}` is larger than memory")))?;
        let row_bytes = len as u64 / shape.0.max(1) as u64;
        let read = |first_row: usize, buf: &mut [u8]| {
            self.source
                .read_at(range.start + first_row as u64 * row_bytes, buf)
        };
        if let Some(linear) =
            Linear::from_gguf_reader(dtype, shape, len, form, device, read).map_err(context)?
        {
            return Ok(linear);
        }
        let bytes = self.source.bytes(range)?;
        Linear::from_gguf_bytes(dtype, shape, &bytes, form, device).map_err(context)
    }
}

impl LlamaModel {
    /// Loads a GGUF model (`general.architecture = "llama"`), reading each tensor from
    /// `reader`.
    pub fn from_gguf<R: Read + Seek + Send>(
        content: &Content,
        reader: &mut R,
        device: &Device,
        form: WeightForm,
        context_override: Option<usize>,
    ) -> Result<Self> {
        let source = ReadSource(std::sync::Mutex::new(reader));
        Self::from_gguf_source(content, source, device, form, context_override)
    }

    /// Loads a GGUF model from its file, mapping each tensor's bytes only while it is
    /// converted: the weights are copied once, into the form they are served in, and the
    /// file's pages are not kept in the process.
    pub fn from_gguf_file(
        content: &Content,
        file: &std::fs::File,
        device: &Device,
        form: WeightForm,
        context_override: Option<usize>,
    ) -> Result<Self> {
        Self::from_gguf_source(content, MapSource(file), device, form, context_override)
    }

    fn from_gguf_source<S: TensorSource>(
        content: &Content,
        source: S,
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
        let vocab_size = match num("llama.vocab_size") {
            Ok(v) => v,
            Err(_) => match embd_info.shape.dims() {
                [vocab, _] => *vocab,
                dims => {
                    return Err(Error::Weights(format!(
                        "tensor `token_embd.weight` has shape {dims:?}, not (vocab, hidden)"
                    )))
                }
            },
        };
        let model_context = num("llama.context_length")?;
        let rope_theta = float("llama.rope.freq_base").unwrap_or(10_000.0);
        let file_size = source.size()?;
        let tensors = GgufTensors {
            content,
            source,
            file_size,
        };
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
            rope_scaling: RopeScaling::default(),
        };
        validate(&config)?;
        // Each block has 9 tensors: a count the file cannot back is refused before anything
        // is sized by it.
        if config.n_layers.saturating_mul(9) > content.tensor_infos.len() {
            return Err(Error::Weights(format!(
                "llama.block_count is {}, but the file has only {} tensors",
                config.n_layers,
                content.tensor_infos.len()
            )));
        }
        let rope_scaling = gguf_rope_scaling(content, &tensors, head_dim)?;
        let config = LlamaConfig {
            rope_scaling,
            ..config
        };
        let (vocab, hidden, ffn) = (config.vocab_size, config.hidden_size, config.ffn_size);
        let (q_dim, kv_dim) = (n_heads * head_dim, n_kv_heads * head_dim);
        let resolved = resolve_form(form, device);
        let tied = !content.tensor_infos.contains_key("output.weight");
        let head_and_embedding = || -> Result<(Linear, Embedding)> {
            if tied {
                // Tied embeddings: the embedding matrix is the output projection, and its
                // rows are looked up there.
                let head =
                    tensors.linear("token_embd.weight", (vocab, hidden), resolved, device)?;
                return Ok((head, Embedding::Tied));
            }
            let head = tensors.linear("output.weight", (vocab, hidden), resolved, device)?;
            let (dtype, bytes) = tensors.bytes("token_embd.weight", &[vocab, hidden])?;
            let embed = if device.is_cpu() && packs(dtype) {
                Embedding::Packed {
                    dtype,
                    hidden,
                    data: bytes.to_vec(),
                }
            } else {
                Embedding::Dense(
                    qtensor_from_bytes(dtype, &[vocab, hidden], &bytes, device)?
                        .dequantize(device)?,
                )
            };
            Ok((head, embed))
        };
        // The largest tensor first, alone (converting it beside the blocks kept both its
        // mapping and theirs resident: a higher peak, for no faster load).
        let (lm_head, embed) = head_and_embedding()?;
        let norm = tensors.vector("output_norm.weight", hidden, device)?;
        // The blocks are converted on every core (a 1B model loads about twice as fast on
        // two); each tensor is mapped only while it is converted.
        let block = |i: usize| -> Result<Block> {
            let linear = |name: &str, shape: (usize, usize)| -> Result<Linear> {
                tensors.linear(&format!("blk.{i}.{name}.weight"), shape, resolved, device)
            };
            Ok(Block {
                attn_norm: tensors.vector(&format!("blk.{i}.attn_norm.weight"), hidden, device)?,
                ffn_norm: tensors.vector(&format!("blk.{i}.ffn_norm.weight"), hidden, device)?,
                wq: linear("attn_q", (q_dim, hidden))?,
                wk: linear("attn_k", (kv_dim, hidden))?,
                wv: linear("attn_v", (kv_dim, hidden))?,
                wo: linear("attn_output", (hidden, q_dim))?,
                w_gate: linear("ffn_gate", (ffn, hidden))?,
                w_up: linear("ffn_up", (ffn, hidden))?,
                w_down: linear("ffn_down", (hidden, ffn))?,
            })
        };
        let blocks = (0..config.n_layers)
            .into_par_iter()
            .map(block)
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config,
            embed,
            blocks,
            norm,
            lm_head,
            rope: OnceLock::new(),
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
        Ok(Self {
            embed: Embedding::Dense(embed.to_dtype(DType::F32)?),
            norm: f32_of("model.norm.weight")?,
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

/// The RoPE scaling a GGUF file declares: `llama.rope.scaling.type` (`none` or `linear`, with
/// `llama.rope.scaling.factor`; older files: `llama.rope.scale_linear`) and the per-pair
/// frequency divisors of the tensor `rope_freqs.weight` (Llama 3.1+ conversions).
fn gguf_rope_scaling<S: TensorSource>(
    content: &Content,
    tensors: &GgufTensors<'_, S>,
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
        Some(
            tensors
                .vector("rope_freqs.weight", head_dim / 2, &Device::Cpu)?
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
    if c.head_dim == 0
        || !c.head_dim.is_multiple_of(2)
        || c.n_heads.checked_mul(c.head_dim) != Some(c.hidden_size)
    {
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

//! Loading a GGUF file: its metadata read into a [`LlamaConfig`] and its tensors, each
//! checked against the shape that configuration needs, converted into the chosen weight form.
//!
//! GGUF stores Q/K rows permuted for interleaved RoPE, so the model keeps the interleaved
//! variant instead of permuting weights back.

use std::io::{Read, Seek};
use std::ops::Range;
use std::sync::OnceLock;

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::source::{MapSource, ReadSource, TensorBytes, TensorSource};
use super::{check_cpu_kernels, kv_dtype, resolve_form, validate};
use crate::model::embed::{packs, Embedding};
use crate::model::linear::{qtensor_from_bytes, Linear};
use crate::model::llama::{Block, LlamaModel, QkvBias};
use crate::model::{Architecture, LlamaConfig, RopeScaling, WeightForm};
use crate::{gguf, Error, Result};

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
        self.linear_rows(name, shape, 0..shape.0, form, device)
    }

    /// Rows `rows` of the projection `name` of shape `(out, inp)`, as a projection of their
    /// own in the chosen form (one part of a fused matrix: GGUF rows are whole quantization
    /// blocks, so a row range is a byte range).
    fn linear_rows(
        &self,
        name: &str,
        shape: (usize, usize),
        rows: Range<usize>,
        form: WeightForm,
        device: &Device,
    ) -> Result<Linear> {
        let (dtype, full) = self.range(name, &[shape.0, shape.1])?;
        let context = |e: Error| Error::Weights(format!("tensor `{name}`: {e}"));
        let row_bytes = (full.end - full.start) / shape.0.max(1) as u64;
        let range =
            full.start + rows.start as u64 * row_bytes..full.start + rows.end as u64 * row_bytes;
        let shape = (rows.len(), shape.1);
        // Rows straight from the file into the kernel's layout where the form allows.
        let len = usize::try_from(range.end - range.start)
            .map_err(|_| Error::Weights(format!("tensor `{name}` is larger than memory")))?;
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

    fn has(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
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
        let config = Metadata(content).config(context_override)?;
        let file_size = source.size()?;
        let tensors = GgufTensors {
            content,
            source,
            file_size,
        };
        validate(&config)?;
        // Each block has at least 6 tensors (Phi-3's fused ones): a count the file cannot back
        // is refused before anything is sized by it.
        if config.n_layers.saturating_mul(6) > content.tensor_infos.len() {
            return Err(Error::Weights(format!(
                "{}.block_count is {}, but the file has only {} tensors",
                config.architecture,
                config.n_layers,
                content.tensor_infos.len()
            )));
        }
        tensors.refuse_unsupported(config.architecture)?;
        let rope_scaling = gguf_rope_scaling(content, &tensors, &config)?;
        let config = LlamaConfig {
            rope_scaling,
            ..config
        };
        let resolved = resolve_form(form, device);
        // The largest tensor first, alone (converting it beside the blocks kept both its
        // mapping and theirs resident: a higher peak, for no faster load).
        let (lm_head, embed) = tensors.head_and_embedding(&config, resolved, device)?;
        let norm = tensors.vector("output_norm.weight", config.hidden_size, device)?;
        // The blocks are converted on every core (a 1B model loads about twice as fast on
        // two); each tensor is mapped only while it is converted.
        let blocks = (0..config.n_layers)
            .into_par_iter()
            .map(|i| tensors.block(i, &config, resolved, device))
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
}

/// A GGUF file's metadata, each missing or mistyped key an error naming it.
struct Metadata<'a>(&'a Content);

impl Metadata<'_> {
    fn get(&self, key: &str) -> Result<&Value> {
        self.0.metadata.get(key).ok_or_else(|| Error::Metadata {
            key: key.to_string(),
        })
    }

    fn num(&self, key: &str) -> Result<usize> {
        let v = self.get(key)?;
        v.to_u32()
            .map(|n| n as usize)
            .or_else(|_| v.to_u64().map(|n| n as usize))
            .map_err(|_| Error::Metadata {
                key: key.to_string(),
            })
    }

    fn float(&self, key: &str) -> Option<f32> {
        self.0.metadata.get(key).and_then(|v| v.to_f32().ok())
    }

    /// The model's configuration (before validation, without RoPE scaling); the context is
    /// `context_override` when that is smaller than the model's. Keys are read under the
    /// architecture's prefix (`llama.`, `qwen2.`, `phi3.`).
    fn config(&self, context_override: Option<usize>) -> Result<LlamaConfig> {
        let name = self
            .get("general.architecture")?
            .to_string()
            .map_err(|_| Error::Metadata {
                key: "general.architecture".into(),
            })?;
        let architecture = Architecture::from_gguf(name)?;
        let key = |k: &str| format!("{architecture}.{k}");
        let hidden_size = self.num(&key("embedding_length"))?;
        let n_heads = self.num(&key("attention.head_count"))?;
        let n_kv_heads = self.num(&key("attention.head_count_kv")).unwrap_or(n_heads);
        let head_dim = self
            .num(&key("rope.dimension_count"))
            .unwrap_or(hidden_size / n_heads.max(1));
        let embd_info = self
            .0
            .tensor_infos
            .get("token_embd.weight")
            .ok_or_else(|| Error::Weights("tensor `token_embd.weight` is missing".into()))?;
        let vocab_size = match self.num(&key("vocab_size")) {
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
        let model_context = self.num(&key("context_length"))?;
        Ok(LlamaConfig {
            architecture,
            vocab_size,
            hidden_size,
            n_layers: self.num(&key("block_count"))?,
            n_heads,
            n_kv_heads,
            head_dim,
            ffn_size: self.num(&key("feed_forward_length"))?,
            rope_theta: self.float(&key("rope.freq_base")).unwrap_or(10_000.0),
            rms_eps: f64::from(
                self.float(&key("attention.layer_norm_rms_epsilon"))
                    .unwrap_or(1e-5),
            ),
            context_length: context_override.map_or(model_context, |c| c.min(model_context)),
            rope_interleaved: architecture.gguf_rope_interleaved(),
            rope_scaling: RopeScaling::default(),
            sliding_window: self.sliding_window(architecture)?,
        })
    }

    /// `<arch>.attention.sliding_window` when the file declares a window (0 means none, as
    /// llama.cpp's converter writes for Phi-4).
    fn sliding_window(&self, architecture: Architecture) -> Result<Option<usize>> {
        let key = format!("{architecture}.attention.sliding_window");
        if !self.0.metadata.contains_key(&key) {
            return Ok(None);
        }
        Ok(Some(self.num(&key)?).filter(|&w| w > 0))
    }
}

impl<S: TensorSource> GgufTensors<'_, S> {
    /// The output projection and the token embedding. Tied embeddings: the embedding matrix
    /// is the output projection, and its rows are looked up there.
    fn head_and_embedding(
        &self,
        config: &LlamaConfig,
        form: WeightForm,
        device: &Device,
    ) -> Result<(Linear, Embedding)> {
        let (vocab, hidden) = (config.vocab_size, config.hidden_size);
        if !self.content.tensor_infos.contains_key("output.weight") {
            let head = self.linear("token_embd.weight", (vocab, hidden), form, device)?;
            return Ok((head, Embedding::Tied));
        }
        let head = self.linear("output.weight", (vocab, hidden), form, device)?;
        let (dtype, bytes) = self.bytes("token_embd.weight", &[vocab, hidden])?;
        let embed = if device.is_cpu() && packs(dtype) {
            Embedding::Packed {
                dtype,
                hidden,
                data: bytes.to_vec(),
            }
        } else {
            Embedding::Dense(
                qtensor_from_bytes(dtype, &[vocab, hidden], &bytes, device)?.dequantize(device)?,
            )
        };
        Ok((head, embed))
    }

    /// Block `i`: its two norms and seven projections (split out of the fused matrices
    /// `attn_qkv` and, for `phi3`, `ffn_up`), and the Q/K/V biases the file has.
    fn block(
        &self,
        i: usize,
        config: &LlamaConfig,
        form: WeightForm,
        device: &Device,
    ) -> Result<Block> {
        let (hidden, ffn) = (config.hidden_size, config.ffn_size);
        let q_dim = config.n_heads * config.head_dim;
        let kv_dim = config.n_kv_heads * config.head_dim;
        let name = |t: &str, kind: &str| format!("blk.{i}.{t}.{kind}");
        let linear = |t: &str, shape: (usize, usize)| -> Result<Linear> {
            self.linear(&name(t, "weight"), shape, form, device)
        };
        let bias = |t: &str, len: usize| -> Result<Option<Tensor>> {
            let n = name(t, "bias");
            self.has(&n)
                .then(|| self.vector(&n, len, device))
                .transpose()
        };
        // Q, K and V: rows `[0, q)`, `[q, q + kv)` and `[q + kv, q + 2kv)` of a fused matrix
        // (and of its bias), as llama.cpp reads them.
        let parts = [
            0..q_dim,
            q_dim..q_dim + kv_dim,
            q_dim + kv_dim..q_dim + 2 * kv_dim,
        ];
        let ((wq, wk, wv), qkv_bias) = if self.has(&name("attn_qkv", "weight")) {
            let fused = name("attn_qkv", "weight");
            let shape = (q_dim + 2 * kv_dim, hidden);
            let [q, k, v] = parts
                .clone()
                .map(|rows| self.linear_rows(&fused, shape, rows, form, device));
            let qkv_bias = match bias("attn_qkv", shape.0)? {
                Some(b) => {
                    let [q, k, v] = parts.map(|r| b.narrow(0, r.start, r.len()));
                    QkvBias {
                        q: Some(q?),
                        k: Some(k?),
                        v: Some(v?),
                    }
                }
                None => self.qkv_bias(i, [q_dim, kv_dim, kv_dim], device)?,
            };
            ((q?, k?, v?), qkv_bias)
        } else {
            let weights = (
                linear("attn_q", (q_dim, hidden))?,
                linear("attn_k", (kv_dim, hidden))?,
                linear("attn_v", (kv_dim, hidden))?,
            );
            (weights, self.qkv_bias(i, [q_dim, kv_dim, kv_dim], device)?)
        };
        // Phi-3 keeps gate and up in one matrix: the gate's rows first, then up's (llama.cpp's
        // `LLM_FFN_SWIGLU` takes silu of the first half times the second).
        let (w_gate, w_up) = if config.architecture == Architecture::Phi3 {
            let fused = name("ffn_up", "weight");
            let shape = (2 * ffn, hidden);
            (
                self.linear_rows(&fused, shape, 0..ffn, form, device)?,
                self.linear_rows(&fused, shape, ffn..2 * ffn, form, device)?,
            )
        } else {
            (
                linear("ffn_gate", (ffn, hidden))?,
                linear("ffn_up", (ffn, hidden))?,
            )
        };
        Ok(Block {
            attn_norm: self.vector(&name("attn_norm", "weight"), hidden, device)?,
            ffn_norm: self.vector(&name("ffn_norm", "weight"), hidden, device)?,
            wq,
            wk,
            wv,
            qkv_bias,
            wo: linear("attn_output", (hidden, q_dim))?,
            w_gate,
            w_up,
            w_down: linear("ffn_down", (hidden, ffn))?,
        })
    }

    /// The separate biases `blk.{i}.attn_q.bias`, `attn_k.bias`, `attn_v.bias` the file has.
    fn qkv_bias(&self, i: usize, lens: [usize; 3], device: &Device) -> Result<QkvBias> {
        let [q, k, v] = [
            ("attn_q", lens[0]),
            ("attn_k", lens[1]),
            ("attn_v", lens[2]),
        ]
        .map(|(t, len)| {
            let n = format!("blk.{i}.{t}.bias");
            self.has(&n)
                .then(|| self.vector(&n, len, device))
                .transpose()
        });
        Ok(QkvBias {
            q: q?,
            k: k?,
            v: v?,
        })
    }

    /// Refuses tensors the forward pass would otherwise ignore though they change its
    /// result: biases other than Q/K/V's, and Phi-3's LongRoPE factors (its 128k variants).
    fn refuse_unsupported(&self, architecture: Architecture) -> Result<()> {
        for name in self.content.tensor_infos.keys() {
            let supported_bias = [
                ".attn_q.bias",
                ".attn_k.bias",
                ".attn_v.bias",
                ".attn_qkv.bias",
            ]
            .iter()
            .any(|s| name.starts_with("blk.") && name.ends_with(s));
            if name.ends_with(".bias") && !supported_bias {
                return Err(Error::Weights(format!(
                    "tensor `{name}`: only Q/K/V biases are supported ({architecture} model)"
                )));
            }
            if name.starts_with("rope_factors_") || name.contains(".rope_factors_") {
                return Err(Error::Weights(format!(
                    "tensor `{name}`: LongRoPE scaling (Phi-3's 128k variants) is not supported"
                )));
            }
        }
        Ok(())
    }
}

/// The RoPE scaling a GGUF file declares: `<arch>.rope.scaling.type` (`none` or `linear`, with
/// `<arch>.rope.scaling.factor`; older files: `<arch>.rope.scale_linear`) and the per-pair
/// frequency divisors of the tensor `rope_freqs.weight` (Llama 3.1+ conversions).
fn gguf_rope_scaling<S: TensorSource>(
    content: &Content,
    tensors: &GgufTensors<'_, S>,
    config: &LlamaConfig,
) -> Result<RopeScaling> {
    let head_dim = config.head_dim;
    let arch = config.architecture;
    let md = |key: &str| content.metadata.get(&format!("{arch}.{key}"));
    let scaling_type = match md("rope.scaling.type") {
        Some(v) => Some(v.to_string().map_err(|_| Error::Metadata {
            key: format!("{arch}.rope.scaling.type"),
        })?),
        None => None,
    };
    let factor = md("rope.scaling.factor")
        .or_else(|| md("rope.scale_linear"))
        .map(|v| {
            v.to_f32().map_err(|_| Error::Metadata {
                key: format!("{arch}.rope.scaling.factor"),
            })
        })
        .transpose()?;
    // llama.cpp applies `rope_freqs.weight` to `llama` models only.
    let divisors =
        if arch == Architecture::Llama && content.tensor_infos.contains_key("rope_freqs.weight") {
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

//! Reading a GGUF LoRA adapter as llama.cpp's `convert_lora_to_gguf.py` writes it (and
//! llama.cpp's `--lora` reads it): `general.type = "adapter"`, `adapter.type = "lora"`,
//! `general.architecture` the base model's, `adapter.lora.alpha` (f32; absent or 0 means a scale
//! of 1, as in llama.cpp), and per targeted projection `blk.N.<tensor>.weight.lora_a`
//! `[rank, inputs]` and `.lora_b` `[outputs, rank]` (rows × columns), in any type candle
//! dequantizes (the converter writes f32, f16, bf16 or q8_0). Each pair is scaled by
//! `alpha / its own rank`.
//!
//! The converter permutes B's rows of `attn_q` and `attn_k` for a `llama` base exactly as it
//! permutes the base model's weights, so on a GGUF `llama` base they apply as they are; on a
//! base of Hugging Face's row order (safetensors) they are put back into that order.
//!
//! What Tollgate cannot apply is refused, naming the key or tensor: another kind of file or
//! adapter, another architecture or shape, activated LoRA (`adapter.alora.*`), norm vectors
//! (which llama.cpp ignores) and adapters on the embedding, the output or fused matrices.

use std::collections::BTreeMap;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};

use super::{next_id, reorder_head_rows, AdapterShape, LoraAdapter, LowRank, Target};
use crate::model::LlamaConfig;
use crate::{Error, Result};

fn bad(message: impl Into<String>) -> Error {
    Error::Adapter(message.into())
}

/// The string value of `key`, or `None` when absent; another type is an error.
fn string<'a>(content: &'a Content, key: &str) -> Result<Option<&'a str>> {
    match content.metadata.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(other) => Err(bad(format!(
            "{key} is {:?}, not a string",
            other.value_type()
        ))),
    }
}

/// The adapter's `alpha`, once the header says the file is a LoRA adapter for `config`'s
/// architecture.
fn check_header(content: &Content, config: &LlamaConfig) -> Result<f32> {
    match string(content, "general.type")? {
        Some("adapter") => {}
        Some(other) => {
            return Err(bad(format!(
                "general.type is `{other}`, not `adapter`: this GGUF file is not a LoRA adapter"
            )))
        }
        None => {
            return Err(bad(
                "the GGUF file has no general.type: it is not a LoRA adapter \
                 (llama.cpp's convert_lora_to_gguf.py writes `adapter`)",
            ))
        }
    }
    match string(content, "adapter.type")? {
        Some("lora") => {}
        other => {
            return Err(bad(format!(
                "adapter.type is {}, not `lora`",
                other.map_or("missing".into(), |t| format!("`{t}`"))
            )))
        }
    }
    let base = config.architecture.gguf_name();
    match string(content, "general.architecture")? {
        Some(arch) if arch == base => {}
        other => {
            return Err(bad(format!(
                "the adapter is for a {} model; the base model is `{base}`",
                other.map_or("(general.architecture missing)".into(), |a| format!(
                    "`{a}`"
                ))
            )))
        }
    }
    if let Some(key) = content
        .metadata
        .keys()
        .find(|k| k.starts_with("adapter.alora"))
    {
        return Err(bad(format!(
            "{key}: activated LoRA (applied from invocation tokens on) is not supported"
        )));
    }
    match content.metadata.get("adapter.lora.alpha") {
        None => Ok(0.0),
        Some(Value::F32(a)) if a.is_finite() => Ok(*a),
        Some(other) => Err(bad(format!(
            "adapter.lora.alpha is {other:?}, not a finite f32"
        ))),
    }
}

/// Which matrix of a pair a tensor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Half {
    A,
    B,
}

/// `(layer, target, half)` of a tensor named `blk.N.<tensor>.weight.lora_{a|b}`.
fn parse_name(name: &str, layers: usize) -> Result<(usize, Target, Half)> {
    let (base, half) = if let Some(base) = name.strip_suffix(".lora_a") {
        (base, Half::A)
    } else if let Some(base) = name.strip_suffix(".lora_b") {
        (base, Half::B)
    } else if name.ends_with("_norm.weight") {
        return Err(bad(format!(
            "tensor `{name}` replaces a norm vector of the base model, which Tollgate does \
             not apply (llama.cpp ignores it)"
        )));
    } else {
        return Err(bad(format!(
            "tensor `{name}` is neither `.lora_a` nor `.lora_b`"
        )));
    };
    let unsupported = || {
        bad(format!(
            "tensor `{name}`: `{base}` is not a projection adapters may change (supported: \
             blk.N.{{{}}}.weight)",
            Target::ALL.map(Target::gguf_name).join(",")
        ))
    };
    let parts: Vec<&str> = base.split('.').collect();
    let ["blk", layer, module, "weight"] = parts[..] else {
        return Err(unsupported());
    };
    let layer: usize = layer.parse().map_err(|_| unsupported())?;
    let target = Target::from_gguf(module).ok_or_else(unsupported)?;
    if layer >= layers {
        return Err(bad(format!(
            "tensor `{name}`: the base model has {layers} layers"
        )));
    }
    Ok((layer, target, half))
}

/// A tensor's `[rows, columns]` in the file (GGUF lists dimensions innermost first; candle
/// reverses them).
fn dims(content: &Content, name: &str) -> Result<(usize, usize)> {
    match content.tensor_infos[name].shape.dims() {
        &[rows, cols] => Ok((rows, cols)),
        other => Err(bad(format!(
            "tensor `{name}` has shape {other:?}, not a matrix"
        ))),
    }
}

/// `(A, B)`'s shapes checked against `target`'s projection: their rank.
fn check_pair(
    content: &Content,
    (a, b): (&str, &str),
    target: Target,
    shape: &AdapterShape,
) -> Result<usize> {
    let (inputs, outputs) = target.dims(shape);
    let ((rank, a_cols), (b_rows, b_rank)) = (dims(content, a)?, dims(content, b)?);
    let wrong = |n: &str, got: (usize, usize), want: (usize, usize)| {
        bad(format!(
            "tensor `{n}` is [{}, {}]; the base model's {} needs [{}, {}]",
            got.0,
            got.1,
            target.gguf_name(),
            want.0,
            want.1
        ))
    };
    if rank == 0 {
        return Err(bad(format!("tensor `{a}` has rank 0")));
    }
    if a_cols != inputs {
        return Err(wrong(a, (rank, a_cols), (rank, inputs)));
    }
    if b_rows != outputs || b_rank != rank {
        return Err(wrong(b, (b_rows, b_rank), (outputs, rank)));
    }
    Ok(rank)
}

impl LoraAdapter {
    /// Reads the GGUF LoRA file `path` for a base model of `config` on `device`.
    pub(super) fn load_gguf(
        name: &str,
        path: &Path,
        config: &LlamaConfig,
        device: &Device,
    ) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut reader = BufReader::new(file);
        let named = |m: String| bad(format!("`{name}` ({}): {m}", path.display()));
        let content = crate::gguf::read_content(&mut reader).map_err(|p| {
            named(format!(
                "not a GGUF file ({p}); an adapter is a GGUF LoRA file or a PEFT directory"
            ))
        })?;
        Self::from_gguf(name, &content, &mut reader, config, device).map_err(|e| match e {
            Error::Adapter(m) => named(m),
            other => other,
        })
    }

    fn from_gguf<R: std::io::Read + std::io::Seek>(
        name: &str,
        content: &Content,
        reader: &mut R,
        config: &LlamaConfig,
        device: &Device,
    ) -> Result<Self> {
        let alpha = check_header(content, config)?;
        let shape = AdapterShape::of(config);
        let mut halves: BTreeMap<(usize, Target), [Option<&str>; 2]> = BTreeMap::new();
        for tensor in content.tensor_infos.keys() {
            let (layer, target, half) = parse_name(tensor, shape.layers)?;
            halves.entry((layer, target)).or_default()[half as usize] = Some(tensor.as_str());
        }
        if halves.is_empty() {
            return Err(bad("the file holds no LoRA tensors"));
        }
        // llama.cpp's converter interleaves a `llama` adapter's Q/K rows; the base may not.
        let adapter_interleaved = config.architecture.gguf_rope_interleaved();
        let mut layers: Vec<[Option<LowRank>; 7]> =
            (0..shape.layers).map(|_| Default::default()).collect();
        let (mut bytes, mut largest) = (0, 0);
        for ((layer, target), [a, b]) in halves {
            let missing = |h: &str| {
                bad(format!(
                    "blk.{layer}.{}.weight.lora_{h} is missing (its pair is in the file)",
                    target.gguf_name()
                ))
            };
            let (a, b) = (
                a.ok_or_else(|| missing("a"))?,
                b.ok_or_else(|| missing("b"))?,
            );
            let rank = check_pair(content, (a, b), target, &shape)?;
            let read = |r: &mut R, n: &str| -> Result<Tensor> {
                let q = content.tensor(r, n, &Device::Cpu)?;
                Ok(q.dequantize(&Device::Cpu)?)
            };
            let (a, mut b) = (read(reader, a)?, read(reader, b)?);
            let heads = match target {
                Target::Q => Some(shape.n_heads),
                Target::K => Some(shape.n_kv_heads),
                _ => None,
            };
            if let Some(heads) = heads.filter(|_| adapter_interleaved != shape.rope_interleaved) {
                b = reorder_head_rows(&b, heads, shape.rope_interleaved)?;
            }
            // llama.cpp: `alpha / rank`, or 1 when the file's alpha is 0 (or absent).
            let scale = if alpha == 0.0 {
                1.0
            } else {
                alpha / rank as f32
            };
            let pair = LowRank::new(&a, &b, scale, device)?;
            bytes += pair.bytes();
            largest = largest.max(rank);
            layers[layer][target as usize] = Some(pair);
        }
        Ok(Self {
            id: next_id(),
            name: name.to_string(),
            rank: largest,
            scale: if alpha == 0.0 {
                1.0
            } else {
                alpha / largest as f32
            },
            shape,
            layers,
            bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_lora_names_parse_and_others_are_refused() {
        assert_eq!(
            parse_name("blk.1.attn_k.weight.lora_b", 2).unwrap(),
            (1, Target::K, Half::B)
        );
        assert_eq!(
            parse_name("blk.0.ffn_down.weight.lora_a", 2).unwrap(),
            (0, Target::Down, Half::A)
        );
        for (name, says) in [
            ("blk.0.attn_norm.weight", "norm vector"),
            ("blk.0.attn_q.weight", "neither"),
            ("token_embd.weight.lora_a", "not a projection"),
            ("output.weight.lora_b", "not a projection"),
            ("blk.0.attn_qkv.weight.lora_a", "not a projection"),
            ("blk.x.attn_q.weight.lora_a", "not a projection"),
            ("blk.2.attn_q.weight.lora_a", "has 2 layers"),
        ] {
            let err = parse_name(name, 2).unwrap_err().to_string();
            assert!(err.contains(name) && err.contains(says), "{err}");
        }
    }
}

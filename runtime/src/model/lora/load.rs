//! Reading a PEFT LoRA adapter: `adapter_config.json` (`r`, `lora_alpha`, `target_modules`,
//! and the options that would change the arithmetic, refused) and
//! `adapter_model.safetensors` (read with the `safetensors` crate, through candle), checked
//! against the base model tensor by tensor: every error names the tensor or key at fault.
//!
//! PEFT writes Hugging Face's layout; a GGUF `llama` file stores Q and K rows permuted for
//! interleaved RoPE, so B's rows of `q_proj` and `k_proj` are permuted the same way here
//! (as llama.cpp's adapter converter does).
//!
//! [`LoraAdapter::load`] also takes a GGUF LoRA file (`super::gguf`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use candle_core::{Device, Tensor};
use serde::Deserialize;

use super::{next_id, reorder_head_rows, AdapterShape, LoraAdapter, LowRank, Target};
use crate::model::LlamaConfig;
use crate::{Error, Result};

/// The keys of `adapter_config.json` Tollgate reads; the others (dropout, task type, the base
/// model's name, ...) do not change inference and are ignored.
#[derive(Debug, Deserialize)]
struct PeftConfig {
    #[serde(default)]
    peft_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    target_modules: serde_json::Value,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    modules_to_save: Option<serde_json::Value>,
    #[serde(default)]
    rank_pattern: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    alpha_pattern: Option<serde_json::Map<String, serde_json::Value>>,
}

fn bad(message: impl Into<String>) -> Error {
    Error::Adapter(message.into())
}

impl PeftConfig {
    fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|e| bad(format!("{}: {e}", path.display())))
    }

    /// The targets, refusing options whose arithmetic Tollgate does not run.
    fn targets(&self) -> Result<BTreeSet<Target>> {
        if let Some(t) = &self.peft_type {
            if t != "LORA" {
                return Err(bad(format!("peft_type `{t}` is not LORA")));
            }
        }
        if self.r == 0 {
            return Err(bad("r is 0"));
        }
        let refused = [
            (self.use_dora, "use_dora (DoRA)"),
            (self.fan_in_fan_out, "fan_in_fan_out"),
            (
                self.bias.as_deref().is_some_and(|b| b != "none"),
                "bias other than `none`",
            ),
            (is_set(self.modules_to_save.as_ref()), "modules_to_save"),
            (
                self.rank_pattern.as_ref().is_some_and(|m| !m.is_empty()),
                "rank_pattern",
            ),
            (
                self.alpha_pattern.as_ref().is_some_and(|m| !m.is_empty()),
                "alpha_pattern",
            ),
        ];
        if let Some((_, what)) = refused.iter().find(|(on, _)| *on) {
            return Err(bad(format!("{what} is not supported")));
        }
        let names: Vec<&str> = match &self.target_modules {
            serde_json::Value::Array(items) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .ok_or_else(|| bad("target_modules holds a non-string"))
                })
                .collect::<Result<_>>()?,
            other => {
                return Err(bad(format!(
                    "target_modules must be a list of module names, not {other}"
                )))
            }
        };
        names
            .into_iter()
            .map(|n| {
                Target::from_peft(n).ok_or_else(|| {
                    bad(format!(
                        "unknown target module `{n}` (supported: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"
                    ))
                })
            })
            .collect()
    }

    fn scale(&self) -> f32 {
        let r = self.r as f64;
        let div = if self.use_rslora { r.sqrt() } else { r };
        (self.lora_alpha / div) as f32
    }
}

fn is_set(v: Option<&serde_json::Value>) -> bool {
    match v {
        None | Some(serde_json::Value::Null) => false,
        Some(serde_json::Value::Array(a)) => !a.is_empty(),
        Some(_) => true,
    }
}

/// A tensor and its name in the file.
type Named = (String, Tensor);

/// Which matrix of a pair a tensor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Half {
    A,
    B,
}

/// `(layer, target, half)` of a PEFT tensor name
/// (`base_model.model.model.layers.{N}.{self_attn|mlp}.{module}.lora_{A|B}.weight`).
fn parse_name(name: &str) -> Result<(usize, Target, Half)> {
    let unknown = || {
        bad(format!(
            "tensor `{name}` is not a LoRA weight of a Llama block"
        ))
    };
    let rest = name
        .strip_prefix("base_model.model.model.layers.")
        .ok_or_else(unknown)?;
    let parts: Vec<&str> = rest.split('.').collect();
    let [layer, parent, module, half, "weight"] = parts[..] else {
        return Err(unknown());
    };
    let layer: usize = layer.parse().map_err(|_| unknown())?;
    let target = Target::from_peft(module)
        .ok_or_else(|| bad(format!("tensor `{name}`: unknown target module `{module}`")))?;
    if target.parent() != parent {
        return Err(unknown());
    }
    let half = match half {
        "lora_A" => Half::A,
        "lora_B" => Half::B,
        _ => return Err(unknown()),
    };
    Ok((layer, target, half))
}

impl LoraAdapter {
    /// Reads the adapter at `path` for a base model of `config` on `device`, named `name`: a
    /// PEFT adapter directory, or a GGUF LoRA file as llama.cpp's converter writes it.
    pub fn load(name: &str, path: &Path, config: &LlamaConfig, device: &Device) -> Result<Self> {
        if path.is_file() {
            return Self::load_gguf(name, path, config, device);
        }
        let dir = path;
        let peft = PeftConfig::read(&dir.join("adapter_config.json"))?;
        let file = dir.join("adapter_model.safetensors");
        if !file.is_file() {
            return Err(Error::Io {
                path: file,
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        let tensors = candle_core::safetensors::load(&file, &Device::Cpu)
            .map_err(|e| bad(format!("{}: {e}", file.display())))?;
        Self::from_tensors(name, &peft, tensors, config, device).map_err(|e| match e {
            Error::Adapter(m) => Error::Adapter(format!("`{name}` ({}): {m}", dir.display())),
            other => other,
        })
    }

    fn from_tensors(
        name: &str,
        peft: &PeftConfig,
        tensors: std::collections::HashMap<String, Tensor>,
        config: &LlamaConfig,
        device: &Device,
    ) -> Result<Self> {
        let targets = peft.targets()?;
        let shape = AdapterShape::of(config);
        let mut halves: BTreeMap<(usize, Target), [Option<Named>; 2]> = BTreeMap::new();
        for (tensor_name, t) in tensors {
            let (layer, target, half) = parse_name(&tensor_name)?;
            if !targets.contains(&target) {
                return Err(bad(format!(
                    "tensor `{tensor_name}`: `{}` is not in target_modules",
                    target.peft_name()
                )));
            }
            if layer >= shape.layers {
                return Err(bad(format!(
                    "tensor `{tensor_name}`: the base model has {} layers",
                    shape.layers
                )));
            }
            halves.entry((layer, target)).or_default()[half as usize] = Some((tensor_name, t));
        }
        if let Some(missing) = targets
            .iter()
            .find(|t| !halves.keys().any(|(_, k)| k == *t))
        {
            return Err(bad(format!(
                "target_modules lists `{}` but the file has no weights for it",
                missing.peft_name()
            )));
        }
        let mut layers: Vec<[Option<LowRank>; 7]> =
            (0..shape.layers).map(|_| Default::default()).collect();
        let mut bytes = 0;
        for ((layer, target), [a, b]) in halves {
            let missing = |h: &str| {
                bad(format!(
                    "layer {layer} {}: lora_{h}.weight is missing",
                    target.peft_name()
                ))
            };
            let (a, b) = (
                a.ok_or_else(|| missing("A"))?,
                b.ok_or_else(|| missing("B"))?,
            );
            let pair = low_rank(a, b, target, peft, &shape, device)?;
            bytes += pair.bytes();
            layers[layer][target as usize] = Some(pair);
        }
        Ok(Self {
            id: next_id(),
            name: name.to_string(),
            rank: peft.r,
            scale: peft.scale(),
            shape,
            layers,
            bytes,
        })
    }
}

/// One projection's pair, checked against `r` and the projection's size: `A` as is and
/// `scale · Bᵀ` (B's rows permuted first for a GGUF `llama` model's Q and K), f32 on `device`.
fn low_rank(
    (a_name, a): (String, Tensor),
    (b_name, b): (String, Tensor),
    target: Target,
    peft: &PeftConfig,
    shape: &AdapterShape,
    device: &Device,
) -> Result<LowRank> {
    let (inputs, outputs) = target.dims(shape);
    let dims2 = |n: &str, t: &Tensor| {
        t.dims2().map_err(|_| {
            bad(format!(
                "tensor `{n}` has shape {:?}, not a matrix",
                t.dims()
            ))
        })
    };
    let ((ar, ac), (br, bc)) = (dims2(&a_name, &a)?, dims2(&b_name, &b)?);
    for (n, rank) in [(&a_name, ar), (&b_name, bc)] {
        if rank != peft.r {
            return Err(bad(format!(
                "tensor `{n}` has rank {rank} but adapter_config.json says r = {}",
                peft.r
            )));
        }
    }
    let wrong = |n: &str, dims: (usize, usize), want: (usize, usize)| {
        bad(format!(
            "tensor `{n}` is [{}, {}]; the base model's {} needs [{}, {}]",
            dims.0,
            dims.1,
            target.peft_name(),
            want.0,
            want.1
        ))
    };
    if ac != inputs {
        return Err(wrong(&a_name, (ar, ac), (peft.r, inputs)));
    }
    if br != outputs {
        return Err(wrong(&b_name, (br, bc), (outputs, peft.r)));
    }
    let mut b = b;
    let heads = match target {
        Target::Q => Some(shape.n_heads),
        Target::K => Some(shape.n_kv_heads),
        _ => None,
    };
    if let (true, Some(heads)) = (shape.rope_interleaved, heads) {
        b = reorder_head_rows(&b, heads, true)?;
    }
    LowRank::new(&a, &b, peft.scale(), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_names_parse_and_others_are_refused() {
        assert_eq!(
            parse_name("base_model.model.model.layers.12.self_attn.k_proj.lora_B.weight").unwrap(),
            (12, Target::K, Half::B)
        );
        assert_eq!(
            parse_name("base_model.model.model.layers.0.mlp.down_proj.lora_A.weight").unwrap(),
            (0, Target::Down, Half::A)
        );
        for name in [
            "base_model.model.model.layers.0.mlp.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
            "base_model.model.model.layers.x.self_attn.q_proj.lora_A.weight",
            "base_model.model.lm_head.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector.weight",
        ] {
            let err = parse_name(name).unwrap_err().to_string();
            assert!(err.contains(name), "{err}");
        }
    }

    #[test]
    fn q_and_k_rows_go_into_gguf_order() {
        // One head of 4 rows (d/2 = 2): Hugging Face's halves [0 1 | 2 3] interleave as
        // [0 2 1 3].
        let w = Tensor::from_vec(vec![0f32, 1., 2., 3.], (4, 1), &Device::Cpu).unwrap();
        let p = reorder_head_rows(&w, 1, true).unwrap();
        assert_eq!(
            p.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [0., 2., 1., 3.]
        );
        // Two heads of 6 rows (d/2 = 3): [0 1 2 | 3 4 5] interleaves as [0 3 1 4 2 5], and
        // back (a GGUF adapter's rows on a base of Hugging Face's order).
        let w = Tensor::arange(0f32, 12., &Device::Cpu)
            .unwrap()
            .reshape((12, 1))
            .unwrap();
        let p = reorder_head_rows(&w, 2, true).unwrap();
        let rows = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(rows(&p), [0., 3., 1., 4., 2., 5., 6., 9., 7., 10., 8., 11.]);
        assert_eq!(rows(&reorder_head_rows(&p, 2, false).unwrap()), rows(&w));
    }
}

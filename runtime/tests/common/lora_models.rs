//! The tiny models and random LoRA adapters of `lora.rs`, built at test time: a Llama-shaped
//! GGUF file of f32 weights (synthetic, with a byte vocabulary), PEFT adapter directories
//! (`adapter_config.json` + `adapter_model.safetensors`) of random low-rank pairs, and the
//! base file with an adapter merged into its weights (`W' = W + scale · B·A`, B's Q/K rows in
//! GGUF's interleaved order as the runtime applies them), and the same adapters as GGUF LoRA
//! files in llama.cpp's layout (`lora_gguf.rs`, and `examples/lora_gguf.rs` for the script
//! that runs llama.cpp on them).
#![allow(
    dead_code,
    reason = "each test crate includes this module and uses only some helpers"
)]

use std::collections::HashMap;
use std::io::Cursor;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Content};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use serde_json::json;
use tollgate_runtime::model::{LlamaModel, LoraAdapter, LoraTarget as Target, SeqStep, WeightForm};
use tollgate_runtime::synth::{byte_vocab, gguf_bytes, LlamaShape};

use super::common::{argmax, max_abs_diff, random, transpose_head_rows};

pub const TEMPLATE: &str = "{% for m in messages %}{{ m['content'] }}{% endfor %}";
pub const HEADS: usize = 4;
pub const KV_HEADS: usize = 2;
pub const LAYERS: usize = 2;

/// The shape of a test model: `hidden` and `ffn` decide which kernels its projections run
/// (multiples of 32 take Tollgate's block codes under `auto`; others stay f32).
pub fn shape(hidden: usize, ffn: usize) -> LlamaShape {
    LlamaShape {
        vocab: 258,
        hidden,
        layers: LAYERS,
        heads: HEADS,
        kv_heads: KV_HEADS,
        ffn,
        context: 4096,
        rope_theta: 10_000.0,
        // Untied: with a tied output so small a model mostly repeats its input token.
        tied: false,
    }
}

/// The GGUF file of `shape`, f32 weights.
pub fn model_file(shape: &LlamaShape) -> Vec<u8> {
    let mut metadata = shape.metadata();
    metadata.extend(byte_vocab(&["<s>", "</s>"], 0, 1, TEMPLATE));
    gguf_bytes(&metadata, &shape.tensors(GgmlDType::F32)).unwrap()
}

pub fn load(bytes: &[u8], form: WeightForm) -> LlamaModel {
    let content = Content::read(&mut Cursor::new(bytes)).unwrap();
    LlamaModel::from_gguf(&content, &mut Cursor::new(bytes), &Device::Cpu, form, None).unwrap()
}

/// `steps` greedy tokens after `prompt` with `adapter` (never one of `banned`), and the
/// logits each was picked from.
pub fn greedy(
    model: &LlamaModel,
    adapter: Option<&LoraAdapter>,
    prompt: &[u32],
    steps: usize,
    banned: &[u32],
) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut cache = model.new_cache();
    let (mut tokens, mut rows) = (Vec::new(), Vec::new());
    let mut feed = prompt.to_vec();
    for _ in 0..steps {
        let mut row = model
            .forward(&mut [SeqStep {
                tokens: &feed,
                cache: &mut cache,
                logits: 1,
                adapter,
            }])
            .unwrap()
            .remove(0);
        for &b in banned {
            row[b as usize] = f32::NEG_INFINITY;
        }
        let token = argmax(&row);
        tokens.push(token);
        rows.push(row);
        feed = vec![token];
    }
    (tokens, rows)
}

pub fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| max_abs_diff(x, y))
        .fold(0.0, f32::max)
}

/// A PEFT module, its GGUF tensor name and `(inputs, outputs)` in a model of `shape`.
pub fn module(shape: &LlamaShape, peft: &str) -> (&'static str, usize, usize) {
    let (h, f) = (shape.hidden, shape.ffn);
    let hd = h / shape.heads;
    let (q, kv) = (shape.heads * hd, shape.kv_heads * hd);
    match peft {
        "q_proj" => ("attn_q", h, q),
        "k_proj" => ("attn_k", h, kv),
        "v_proj" => ("attn_v", h, kv),
        "o_proj" => ("attn_output", q, h),
        "gate_proj" => ("ffn_gate", h, f),
        "up_proj" => ("ffn_up", h, f),
        "down_proj" => ("ffn_down", f, h),
        other => panic!("no module {other}"),
    }
}

/// A random adapter: Hugging Face names and layout, f32.
pub struct Adapter {
    pub r: usize,
    pub alpha: f64,
    pub targets: Vec<&'static str>,
    pub tensors: HashMap<String, Tensor>,
}

pub fn tensor_name(layer: usize, peft: &str, half: &str) -> String {
    let parent = if ["gate_proj", "up_proj", "down_proj"].contains(&peft) {
        "mlp"
    } else {
        "self_attn"
    };
    format!("base_model.model.model.layers.{layer}.{parent}.{peft}.lora_{half}.weight")
}

/// Random pairs of rank `r` for `targets` in every layer (A in ±0.2, B in ±`b_scale`).
pub fn random_adapter(
    shape: &LlamaShape,
    r: usize,
    alpha: f64,
    targets: &[&'static str],
    b_scale: f32,
    seed: u32,
) -> Adapter {
    let mut tensors = HashMap::new();
    let mut seed = seed;
    for layer in 0..shape.layers {
        for &t in targets {
            let (_, inputs, outputs) = module(shape, t);
            seed += 2;
            tensors.insert(tensor_name(layer, t, "A"), random(r, inputs, 0.2, seed));
            tensors.insert(
                tensor_name(layer, t, "B"),
                random(outputs, r, b_scale, seed + 1),
            );
        }
    }
    Adapter {
        r,
        alpha,
        targets: targets.to_vec(),
        tensors,
    }
}

/// Writes `config` and `tensors` as a PEFT adapter directory.
pub fn write_adapter(dir: &Path, config: &serde_json::Value, tensors: &HashMap<String, Tensor>) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("adapter_config.json"),
        serde_json::to_string_pretty(config).unwrap(),
    )
    .unwrap();
    candle_core::safetensors::save(tensors, dir.join("adapter_model.safetensors")).unwrap();
}

/// PEFT's `adapter_config.json` of `adapter`.
pub fn peft_config(adapter: &Adapter) -> serde_json::Value {
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "tollgate/tiny",
        "r": adapter.r,
        "lora_alpha": adapter.alpha,
        "lora_dropout": 0.05,
        "target_modules": adapter.targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "modules_to_save": null,
        "use_rslora": false,
        "use_dora": false,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": true,
    })
}

/// The base file `base` with `adapter` merged into its f32 weights. With `permute`, B's rows of
/// Q and K go into GGUF's interleaved order first (what a correct merge does for a `llama`
/// file); without, they stay in Hugging Face's order (a control).
pub fn merged_file(base: &[u8], shape: &LlamaShape, adapter: &Adapter, permute: bool) -> Vec<u8> {
    let content = Content::read(&mut Cursor::new(base)).unwrap();
    let mut reader = Cursor::new(base);
    let scale = adapter.alpha / adapter.r as f64;
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let q = content.tensor(&mut reader, name, &Device::Cpu).unwrap();
        let mut w = q.dequantize(&Device::Cpu).unwrap();
        for (layer, &t) in
            (0..shape.layers).flat_map(|l| adapter.targets.iter().map(move |t| (l, t)))
        {
            let (gguf, _, _) = module(shape, t);
            if *name != format!("blk.{layer}.{gguf}.weight") {
                continue;
            }
            let a = &adapter.tensors[&tensor_name(layer, t, "A")];
            let mut b = adapter.tensors[&tensor_name(layer, t, "B")].clone();
            let heads = match t {
                "q_proj" => Some(shape.heads),
                "k_proj" => Some(shape.kv_heads),
                _ => None,
            };
            if let (true, Some(heads)) = (permute, heads) {
                b = transpose_head_rows(&b, heads, 2);
            }
            let delta = (b.matmul(a).unwrap() * scale).unwrap();
            w = (w + delta).unwrap();
        }
        tensors.push((name.clone(), QTensor::quantize(&w, GgmlDType::F32).unwrap()));
    }
    let mut keys: Vec<&String> = content.metadata.keys().collect();
    keys.sort();
    let md: Vec<(&str, &gguf_file::Value)> = keys
        .iter()
        .map(|k| (k.as_str(), &content.metadata[*k]))
        .collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut buf = Cursor::new(Vec::new());
    gguf_file::write(&mut buf, &md, &ts).unwrap();
    buf.into_inner()
}

/// `adapter` as the GGUF LoRA file llama.cpp's `convert_lora_to_gguf.py` writes for a `llama`
/// base of `shape` (`alpha` as `adapter.lora.alpha`): tensors `blk.N.<tensor>.weight.lora_a`
/// `[r, in]` and `.lora_b` `[out, r]` in `dtype`, B's Q/K rows permuted as the converter
/// permutes the base model's; `extra_metadata` and `extra_tensors` are added or replace
/// theirs (`None`: the tensor is left out), to make bad files.
pub fn gguf_adapter(
    shape: &LlamaShape,
    adapter: &Adapter,
    alpha: f32,
    dtype: GgmlDType,
    extra_metadata: &[(&str, gguf_file::Value)],
    extra_tensors: &[(&str, Option<&Tensor>)],
) -> Vec<u8> {
    use gguf_file::Value;
    let mut md: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("general.type", Value::String("adapter".into())),
        ("general.name", Value::String("tollgate tiny lora".into())),
        ("adapter.type", Value::String("lora".into())),
        ("adapter.lora.alpha", Value::F32(alpha)),
    ];
    for (k, v) in extra_metadata {
        md.retain(|(key, _)| key != k);
        md.push((*k, v.clone()));
    }
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for layer in 0..shape.layers {
        for &t in &adapter.targets {
            let (gguf, _, _) = module(shape, t);
            let a = &adapter.tensors[&tensor_name(layer, t, "A")];
            let mut b = adapter.tensors[&tensor_name(layer, t, "B")].clone();
            match t {
                "q_proj" => b = transpose_head_rows(&b, shape.heads, 2),
                "k_proj" => b = transpose_head_rows(&b, shape.kv_heads, 2),
                _ => {}
            }
            for (half, m) in [("a", a), ("b", &b)] {
                let name = format!("blk.{layer}.{gguf}.weight.lora_{half}");
                tensors.push((name, QTensor::quantize(m, dtype).unwrap()));
            }
        }
    }
    for (name, t) in extra_tensors {
        tensors.retain(|(n, _)| n.as_str() != *name);
        if let Some(t) = t {
            tensors.push((name.to_string(), QTensor::quantize(t, dtype).unwrap()));
        }
    }
    let md: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut buf = Cursor::new(Vec::new());
    gguf_file::write(&mut buf, &md, &ts).unwrap();
    buf.into_inner()
}

/// `adapter` with its matrices rounded to `dtype` and back to f32: what a file of that type
/// holds.
pub fn rounded(adapter: &Adapter, dtype: candle_core::DType) -> Adapter {
    Adapter {
        r: adapter.r,
        alpha: adapter.alpha,
        targets: adapter.targets.clone(),
        tensors: adapter
            .tensors
            .iter()
            .map(|(k, t)| {
                let t = t.to_dtype(dtype).unwrap();
                (k.clone(), t.to_dtype(candle_core::DType::F32).unwrap())
            })
            .collect(),
    }
}

/// The random adapters llama.cpp's `--lora` runs in `scripts/llama-cpp-greedy.py --lora` (on
/// the `llama` model of `arch_models.rs`, whose sizes are `shape(64, 128)`'s): name, adapter,
/// the GGUF file's alpha. Different ranks, alphas and targets.
pub fn llama_cpp_adapters() -> Vec<(&'static str, Adapter, f32)> {
    let shape = shape(64, 128);
    vec![
        (
            "all-r4",
            random_adapter(&shape, 4, 8.0, &Target::PEFT_NAMES, 0.2, 3100),
            8.0,
        ),
        (
            "qkd-r8",
            random_adapter(
                &shape,
                8,
                4.0,
                &["q_proj", "k_proj", "down_proj"],
                0.3,
                3300,
            ),
            4.0,
        ),
    ]
}

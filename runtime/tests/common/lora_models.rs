//! The tiny models and random LoRA adapters of `lora.rs`, built at test time: a Llama-shaped
//! GGUF file of f32 weights (synthetic, with a byte vocabulary), PEFT adapter directories
//! (`adapter_config.json` + `adapter_model.safetensors`) of random low-rank pairs, and the
//! base file with an adapter merged into its weights (`W' = W + scale · B·A`, B's Q/K rows in
//! GGUF's interleaved order as the runtime applies them).

use std::collections::HashMap;
use std::io::Cursor;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Content};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use serde_json::json;
use tollgate_runtime::model::{LlamaModel, WeightForm};
use tollgate_runtime::synth::{byte_vocab, gguf_bytes, LlamaShape};

use super::common::{random, transpose_head_rows};

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

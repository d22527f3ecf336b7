//! Tiny random models of the architectures next to Llama, built at test time: `qwen2` (Q/K/V
//! biases), `phi3` (fused Q/K/V and gate/up matrices) and a Mistral-style
//! `llama` with a sliding window. Each is a set of Hugging Face-named f32 weights (what
//! candle-transformers' reference models load) and the GGUF file llama.cpp's converter would
//! write from them (its tensor names, its row order, the vocabulary of llama.cpp's own test
//! vocabulary file of that family). A plain `llama` twin of the Mistral-style model (the same
//! weights, no window) is what llama.cpp runs for that family, since it ignores the window of
//! `llama` files. The same builder feeds the tests (`architectures.rs`) and the example that
//! writes the files for `scripts/llama-cpp-greedy.py`.

use std::collections::HashMap;
use std::io::Cursor;

use candle_core::quantized::gguf_file::{self, Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use tollgate_runtime::dev_model::require_llama_vocab;
use tollgate_runtime::synth::pseudo_random;

use super::common::{random, transpose_head_rows};

pub const HIDDEN: usize = 64;
pub const HEADS: usize = 4;
pub const KV_HEADS: usize = 2;
pub const HEAD_DIM: usize = HIDDEN / HEADS;
pub const FFN: usize = 128;
pub const LAYERS: usize = 2;
pub const CONTEXT: usize = 4096;
pub const EPS: f64 = 1e-6;
/// The Mistral-style model's window: shorter than the longer prompts, so it masks keys.
pub const WINDOW: usize = 24;
/// Greedy tokens generated after each prompt.
pub const GREEDY_STEPS: usize = 16;

/// Which model of this file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Qwen2,
    Phi3,
    /// `llama` without a window.
    Llama,
    /// The same weights with `llama.attention.sliding_window = WINDOW`.
    MistralSwa,
}

impl Kind {
    /// The models llama.cpp's outputs are recorded for.
    pub const LLAMA_CPP: [Kind; 3] = [Kind::Qwen2, Kind::Phi3, Kind::Llama];

    /// The name of the model in the fixture and of its file (`<name>.gguf`).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Qwen2 => "qwen2",
            Kind::Phi3 => "phi3",
            Kind::Llama => "llama",
            Kind::MistralSwa => "mistral-swa",
        }
    }

    fn arch(self) -> &'static str {
        match self {
            Kind::Qwen2 => "qwen2",
            Kind::Phi3 => "phi3",
            Kind::Llama | Kind::MistralSwa => "llama",
        }
    }

    /// llama.cpp's test vocabulary of the family.
    fn vocab(self) -> &'static str {
        match self {
            Kind::Qwen2 => "qwen2",
            Kind::Phi3 => "phi-3",
            Kind::Llama | Kind::MistralSwa => "llama-spm",
        }
    }

    pub fn theta(self) -> f32 {
        match self {
            Kind::Qwen2 => 1_000_000.0,
            Kind::Phi3 | Kind::Llama | Kind::MistralSwa => 10_000.0,
        }
    }

    /// Untied everywhere: with a tied output the residual stream of so small a model is
    /// dominated by the input token's own embedding, and greedy decoding repeats it, which
    /// would hide a wrong attention. (The tied path is the dev model's.)
    pub fn tied(self) -> bool {
        false
    }

    /// Seeds the weights: the Mistral-style model has the `llama` one's.
    fn family(self) -> u32 {
        match self {
            Kind::MistralSwa => Kind::Llama as u32,
            other => other as u32,
        }
    }
}

/// A built model.
pub struct ArchModel {
    pub kind: Kind,
    pub vocab_size: usize,
    /// Hugging Face names and layouts (half-split Q/K rows), f32.
    pub weights: HashMap<String, Tensor>,
    pub gguf: Vec<u8>,
}

/// The fixed prompts (token ids) every model is run on: short, past the window, long.
pub fn prompts(kind: Kind, vocab_size: usize) -> Vec<Vec<u32>> {
    // Ordinary tokens only (past the control tokens at the start of every vocabulary here,
    // below the specials some put at the end).
    let span = (vocab_size.min(32_000) - 300) as u32;
    [(5usize, 1u32), (40, 2), (130, 3)]
        .iter()
        .map(|&(len, seed)| {
            (0..len as u32)
                .map(|i| 300 + (i * 7919 + seed * 104_729 + kind.family() * 31) % span)
                .collect()
        })
        .collect()
}

/// FNV-1a (64-bit) of a file's bytes: the fixture names the exact file it was recorded on.
pub fn fingerprint(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

fn vector(len: usize, scale: f32, center: f32, seed: u32) -> Tensor {
    let v: Vec<f32> = pseudo_random(len, seed)
        .into_iter()
        .map(|x| center + scale * x)
        .collect();
    Tensor::from_vec(v, len, &Device::Cpu).unwrap()
}

/// The metadata and tensors of a GGUF file.
pub type GgufParts = (Vec<(String, Value)>, Vec<(String, QTensor)>);

/// Builds model `kind` (deterministic: the same bytes every time).
pub fn build(kind: Kind) -> ArchModel {
    let (model, (md, tensors)) = build_parts(kind);
    ArchModel {
        gguf: write(&md, &tensors),
        ..model
    }
}

/// Builds model `kind`, its GGUF file left in parts (for tests that alter it).
pub fn build_parts(kind: Kind) -> (ArchModel, GgufParts) {
    let path = require_llama_vocab(kind.vocab()).expect("llama.cpp vocabulary");
    let vocab = Content::read(&mut std::fs::File::open(&path).unwrap()).unwrap();
    let vocab_size = match &vocab.metadata["tokenizer.ggml.tokens"] {
        Value::Array(tokens) => tokens.len(),
        other => panic!("tokenizer.ggml.tokens is {other:?}"),
    };
    let weights = hf_weights(kind, vocab_size);
    let parts = gguf_parts(kind, &vocab, &weights, vocab_size);
    let model = ArchModel {
        kind,
        vocab_size,
        weights,
        gguf: Vec::new(),
    };
    (model, parts)
}

/// Random weights under Hugging Face's names for `kind` (scales as in the Llama 3 test:
/// attention scores and logits spread over several units).
fn hf_weights(kind: Kind, vocab_size: usize) -> HashMap<String, Tensor> {
    let mut w = HashMap::new();
    let mut seed = 100 * (kind.family() + 1);
    let mut next = || {
        seed += 1;
        seed
    };
    let (q_dim, kv_dim) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    w.insert(
        "model.embed_tokens.weight".into(),
        random(vocab_size, HIDDEN, 1.0, next()),
    );
    if !kind.tied() {
        w.insert(
            "lm_head.weight".into(),
            random(vocab_size, HIDDEN, 0.9, next()),
        );
    }
    w.insert("model.norm.weight".into(), vector(HIDDEN, 0.2, 1.0, next()));
    for i in 0..LAYERS {
        let p = format!("model.layers.{i}");
        let mut add = |name: &str, t: Tensor| {
            w.insert(format!("{p}.{name}"), t);
        };
        add("input_layernorm.weight", vector(HIDDEN, 0.2, 1.0, next()));
        add(
            "post_attention_layernorm.weight",
            vector(HIDDEN, 0.2, 1.0, next()),
        );
        let (q, k, v) = (
            random(q_dim, HIDDEN, 0.3, next()),
            random(kv_dim, HIDDEN, 0.3, next()),
            random(kv_dim, HIDDEN, 0.2, next()),
        );
        let (gate, up) = (
            random(FFN, HIDDEN, 0.2, next()),
            random(FFN, HIDDEN, 0.2, next()),
        );
        if kind == Kind::Phi3 {
            add(
                "self_attn.qkv_proj.weight",
                Tensor::cat(&[&q, &k, &v], 0).unwrap(),
            );
            add(
                "mlp.gate_up_proj.weight",
                Tensor::cat(&[&gate, &up], 0).unwrap(),
            );
        } else {
            add("self_attn.q_proj.weight", q);
            add("self_attn.k_proj.weight", k);
            add("self_attn.v_proj.weight", v);
            add("mlp.gate_proj.weight", gate);
            add("mlp.up_proj.weight", up);
        }
        if kind == Kind::Qwen2 {
            add("self_attn.q_proj.bias", vector(q_dim, 0.5, 0.0, next()));
            add("self_attn.k_proj.bias", vector(kv_dim, 0.5, 0.0, next()));
            add("self_attn.v_proj.bias", vector(kv_dim, 0.3, 0.0, next()));
        }
        add(
            "self_attn.o_proj.weight",
            random(HIDDEN, q_dim, 0.2, next()),
        );
        add("mlp.down_proj.weight", random(HIDDEN, FFN, 0.15, next()));
    }
    w
}

fn metadata(kind: Kind, vocab: &Content, vocab_size: usize) -> Vec<(String, Value)> {
    let a = kind.arch();
    let u = |n: usize| Value::U32(n as u32);
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
        (
            "general.name".into(),
            Value::String(format!("tollgate tiny {}", kind.name())),
        ),
        (format!("{a}.block_count"), u(LAYERS)),
        (format!("{a}.context_length"), u(CONTEXT)),
        (format!("{a}.embedding_length"), u(HIDDEN)),
        (format!("{a}.feed_forward_length"), u(FFN)),
        (format!("{a}.attention.head_count"), u(HEADS)),
        (format!("{a}.attention.head_count_kv"), u(KV_HEADS)),
        (format!("{a}.rope.freq_base"), Value::F32(kind.theta())),
        (format!("{a}.rope.dimension_count"), u(HEAD_DIM)),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(EPS as f32),
        ),
        (format!("{a}.vocab_size"), u(vocab_size)),
    ];
    match kind {
        // llama.cpp's converter writes 0 for Phi-3 models without a window (Phi-4).
        Kind::Phi3 => {
            md.push((format!("{a}.attention.sliding_window"), u(0)));
            md.push((
                format!("{a}.rope.scaling.original_context_length"),
                u(CONTEXT),
            ));
        }
        Kind::MistralSwa => md.push((format!("{a}.attention.sliding_window"), u(WINDOW))),
        Kind::Qwen2 | Kind::Llama => {}
    }
    // In key order: the file must be the same bytes in every process.
    let mut keys: Vec<&String> = vocab.metadata.keys().collect();
    keys.sort();
    for key in keys.into_iter().filter(|k| k.starts_with("tokenizer.")) {
        md.push((key.clone(), vocab.metadata[key].clone()));
    }
    md
}

/// The GGUF file llama.cpp's converter writes from `weights`: `llama` permutes Q/K rows for
/// its interleaved RoPE, `qwen2` and `phi3` keep Hugging Face's rows (half-split RoPE).
fn gguf_parts(
    kind: Kind,
    vocab: &Content,
    weights: &HashMap<String, Tensor>,
    vocab_size: usize,
) -> GgufParts {
    let md = metadata(kind, vocab, vocab_size);
    let q = |t: &Tensor| QTensor::quantize(t, GgmlDType::F32).unwrap();
    let mut tensors: Vec<(String, QTensor)> = vec![
        (
            "token_embd.weight".into(),
            q(&weights["model.embed_tokens.weight"]),
        ),
        (
            "output_norm.weight".into(),
            q(&weights["model.norm.weight"]),
        ),
    ];
    if !kind.tied() {
        tensors.push(("output.weight".into(), q(&weights["lm_head.weight"])));
    }
    for i in 0..LAYERS {
        let hf = |name: &str| &weights[&format!("model.layers.{i}.{name}")];
        let mut add = |name: &str, t: Tensor| tensors.push((format!("blk.{i}.{name}"), q(&t)));
        add("attn_norm.weight", hf("input_layernorm.weight").clone());
        add(
            "ffn_norm.weight",
            hf("post_attention_layernorm.weight").clone(),
        );
        add("attn_output.weight", hf("self_attn.o_proj.weight").clone());
        add("ffn_down.weight", hf("mlp.down_proj.weight").clone());
        match kind {
            Kind::Phi3 => {
                add("attn_qkv.weight", hf("self_attn.qkv_proj.weight").clone());
                add("ffn_up.weight", hf("mlp.gate_up_proj.weight").clone());
            }
            Kind::Qwen2 | Kind::Llama | Kind::MistralSwa => {
                let (mut wq, mut wk) = (
                    hf("self_attn.q_proj.weight").clone(),
                    hf("self_attn.k_proj.weight").clone(),
                );
                if kind.arch() == "llama" {
                    wq = transpose_head_rows(&wq, HEADS, 2);
                    wk = transpose_head_rows(&wk, KV_HEADS, 2);
                }
                add("attn_q.weight", wq);
                add("attn_k.weight", wk);
                add("attn_v.weight", hf("self_attn.v_proj.weight").clone());
                add("ffn_gate.weight", hf("mlp.gate_proj.weight").clone());
                add("ffn_up.weight", hf("mlp.up_proj.weight").clone());
            }
        }
        if kind == Kind::Qwen2 {
            for t in ["q", "k", "v"] {
                add(
                    &format!("attn_{t}.bias"),
                    hf(&format!("self_attn.{t}_proj.bias")).clone(),
                );
            }
        }
    }
    (md, tensors)
}

/// A GGUF file of `metadata` and `tensors`.
pub fn write(metadata: &[(String, Value)], tensors: &[(String, QTensor)]) -> Vec<u8> {
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut buf = Cursor::new(Vec::new());
    gguf_file::write(&mut buf, &md, &ts).unwrap();
    buf.into_inner()
}

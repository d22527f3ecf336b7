//! candle-transformers' models as references for the tiny models of `arch_models.rs`
//! (`qwen2`, `phi3`, and `mistral` for the `llama` ones, with or without the window), and
//! Tollgate's model run the same way, for `architectures.rs`.

use std::io::Cursor;

use candle_core::quantized::gguf_file::Content;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{mistral, phi3, qwen2};
use serde_json::json;
use tollgate_runtime::model::{LlamaModel, SeqStep, WeightForm};

use super::arch_models::{
    ArchModel, Kind, CONTEXT, EPS, FFN, GREEDY_STEPS, HEADS, HIDDEN, KV_HEADS, LAYERS, WINDOW,
};
use super::common::{argmax, TempDir};

/// A candle-transformers model of one of the kinds.
enum Model {
    Qwen2(qwen2::ModelForCausalLM),
    Phi3(phi3::Model),
    /// Run without its cache: candle's `mistral` applies its window only to the queries of a
    /// multi-token pass, so every step runs the whole sequence again.
    Mistral(mistral::Model),
}

fn config(kind: Kind, vocab_size: usize, window: Option<usize>) -> serde_json::Value {
    let mut c = json!({
        "vocab_size": vocab_size,
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": CONTEXT,
        "rms_norm_eps": EPS,
        "rope_theta": kind.theta(),
        "hidden_act": "silu",
        "tie_word_embeddings": kind.tied(),
    });
    match kind {
        Kind::Qwen2 => {
            c["sliding_window"] = json!(CONTEXT);
            c["max_window_layers"] = json!(LAYERS);
            c["use_sliding_window"] = json!(false);
        }
        // candle's `mistral` masks key `j` from query `i` when `j + window < i`: it sees one
        // key more than the window of Hugging Face and llama.cpp (`i - j < window`).
        Kind::Llama | Kind::MistralSwa => {
            c["sliding_window"] = json!(window.map(|w| w - 1));
        }
        Kind::Phi3 => {}
    }
    c
}

impl Model {
    /// The reference for `model`; for the `llama` kinds, `window` is the one it applies.
    fn new(model: &ArchModel, window: Option<usize>) -> Self {
        let mut weights = model.weights.clone();
        let cfg = config(model.kind, model.vocab_size, window);
        if model.kind == Kind::Phi3 {
            // candle's `phi3` loads every projection with a bias; Phi-3 has none.
            let zero = |n: usize| Tensor::zeros(n, DType::F32, &Device::Cpu).unwrap();
            for (name, t) in &model.weights {
                if let Some(p) = name.strip_suffix(".weight") {
                    if name.contains("proj") || name == "lm_head.weight" {
                        weights.insert(format!("{p}.bias"), zero(t.dim(0).unwrap()));
                    }
                }
            }
        }
        let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
        match model.kind {
            Kind::Qwen2 => Model::Qwen2(
                qwen2::ModelForCausalLM::new(&serde_json::from_value(cfg).unwrap(), vb).unwrap(),
            ),
            Kind::Phi3 => {
                Model::Phi3(phi3::Model::new(&serde_json::from_value(cfg).unwrap(), vb).unwrap())
            }
            Kind::Llama | Kind::MistralSwa => Model::Mistral(
                mistral::Model::new(&serde_json::from_value(cfg).unwrap(), vb).unwrap(),
            ),
        }
    }

    /// The logits after `new` tokens, following `seen` tokens already run.
    fn step(&mut self, seen: &[u32], new: &[u32]) -> Vec<f32> {
        let input = |t: &[u32]| Tensor::new(t, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let logits = match self {
            Model::Qwen2(m) => m.forward(&input(new), seen.len()),
            Model::Phi3(m) => m.forward(&input(new), seen.len()),
            Model::Mistral(m) => {
                m.clear_kv_cache();
                m.forward(&input(&[seen, new].concat()), 0)
            }
        };
        logits
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }
}

/// One prompt's run: the logits after the prompt and after each greedy token, and those
/// tokens.
pub struct Trace {
    pub logits: Vec<Vec<f32>>,
    pub greedy: Vec<u32>,
}

/// The reference's greedy run of `prompt` (for the `llama` kinds, with `window`).
pub fn reference(model: &ArchModel, window: Option<usize>, prompt: &[u32]) -> Trace {
    let mut m = Model::new(model, window);
    let mut seq = Vec::new();
    let mut logits = vec![m.step(&seq, prompt)];
    seq.extend_from_slice(prompt);
    let mut greedy = Vec::new();
    for _ in 0..GREEDY_STEPS {
        let next = argmax(logits.last().unwrap());
        greedy.push(next);
        logits.push(m.step(&seq, &[next]));
        seq.push(next);
    }
    Trace { logits, greedy }
}

/// Tollgate's model fed `prompt` then `forced` (one token a step): its logits before each
/// forced token and after the last.
pub fn forced(model: &LlamaModel, prompt: &[u32], forced: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache();
    let mut run = |tokens: &[u32]| {
        model
            .forward(&mut [SeqStep {
                tokens,
                cache: &mut cache,
                logits: 1,
                adapter: None,
            }])
            .unwrap()
            .remove(0)
    };
    let mut logits = vec![run(prompt)];
    for &t in forced {
        logits.push(run(&[t]));
    }
    logits
}

/// Tollgate's own greedy tokens after `prompt`, never one of `banned`.
pub fn greedy(model: &LlamaModel, prompt: &[u32], steps: usize, banned: &[u32]) -> Vec<u32> {
    let mut cache = model.new_cache();
    let mut tokens = prompt.to_vec();
    let mut out = Vec::new();
    let mut new = prompt.len();
    for _ in 0..steps {
        let logits = model
            .forward(&mut [SeqStep {
                tokens: &tokens[tokens.len() - new..],
                cache: &mut cache,
                logits: 1,
                adapter: None,
            }])
            .unwrap()
            .remove(0);
        let mut logits = logits;
        for &b in banned {
            logits[b as usize] = f32::NEG_INFINITY;
        }
        let next = argmax(&logits);
        out.push(next);
        tokens.push(next);
        new = 1;
    }
    out
}

pub fn load(gguf: &[u8], form: WeightForm) -> LlamaModel {
    let mut reader = Cursor::new(gguf);
    let content = Content::read(&mut reader).unwrap();
    LlamaModel::from_gguf(&content, &mut reader, &Device::Cpu, form, None).unwrap()
}

/// `model` as a Hugging Face directory (`config.json` with Hugging Face's meaning of
/// `sliding_window`, `model.safetensors`), loaded with f32 weights.
pub fn load_hf_dir(model: &ArchModel) -> LlamaModel {
    let kind = model.kind;
    let dir = TempDir::new("architectures", kind.name());
    let mut config = config(kind, model.vocab_size, None);
    let (model_type, class) = match kind {
        Kind::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
        Kind::Phi3 => ("phi3", "Phi3ForCausalLM"),
        Kind::Llama | Kind::MistralSwa => ("mistral", "MistralForCausalLM"),
    };
    config["model_type"] = json!(model_type);
    config["architectures"] = json!([class]);
    config["sliding_window"] = json!(window(kind));
    std::fs::write(dir.0.join("config.json"), config.to_string()).unwrap();
    candle_core::safetensors::save(&model.weights, dir.0.join("model.safetensors")).unwrap();
    LlamaModel::from_safetensors(&dir.0, &Device::Cpu, WeightForm::F32, None).unwrap()
}

/// The model's window as its GGUF declares it, for the reference.
pub fn window(kind: Kind) -> Option<usize> {
    (kind == Kind::MistralSwa).then_some(WINDOW)
}

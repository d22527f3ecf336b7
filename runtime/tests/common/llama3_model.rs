//! The Llama-3-shaped model of `llama3.rs`, built at test time (its Hugging Face directory and
//! GGUF files, with and without Llama 3.1's RoPE scaling), candle-transformers' `llama` as the
//! reference, and the comparison of the two; what is built and why is told in `llama3.rs`.

use std::collections::HashMap;
use std::io::Cursor;
use std::path::Path;
use std::sync::OnceLock;

use candle_core::quantized::gguf_file::{self, Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::llama as reference;
use serde_json::json;
use tollgate_runtime::dev_model::require_llama_vocab;
use tollgate_runtime::model::{KvCache, LlamaModel, SeqStep, WeightForm};
use tollgate_runtime::synth::pseudo_random;
use tollgate_runtime::tokenizer::ModelTokenizer;

use super::common::{argmax, max_abs_diff, random, transpose_head_rows, TempDir};

pub const HIDDEN: usize = 64;
pub const HEADS: usize = 4;
pub const KV_HEADS: usize = 1;
pub const HEAD_DIM: usize = HIDDEN / HEADS;
pub const FFN: usize = 128;
pub const LAYERS: usize = 2;
pub const THETA: f32 = 500_000.0;
pub const CONTEXT: usize = 131_072;
pub const EPS: f64 = 1e-5;
/// Llama 3.1's `rope_scaling`.
pub const FACTOR: f64 = 8.0;
pub const LOW_FREQ_FACTOR: f64 = 1.0;
pub const HIGH_FREQ_FACTOR: f64 = 4.0;
pub const ORIGINAL_CONTEXT: usize = 8192;

/// Prompt length: past `ORIGINAL_CONTEXT / LOW_FREQ_FACTOR` = 8192, the wavelength beyond which
/// every pair is slowed by the full factor.
pub const PROMPT_TOKENS: usize = 8448;
/// Prefill chunk (both implementations), as the engine chunks long prompts.
pub const CHUNK: usize = 512;
pub const GREEDY_STEPS: usize = 8;

/// Max abs logit difference allowed between Tollgate (F32 weights) and candle-transformers'
/// `llama` on the same f32 weights. The two run the same f32 arithmetic except the order of
/// some sums (Tollgate's grouped-query attention stacks the 4 query heads of a KV head as rows
/// of one matmul where candle repeats the KV head; GGUF's interleaved RoPE pairs other elements
/// than the half-split one, so q·k sums run in another order) and how the divisors are rounded
/// (this test computes the GGUF's in f64, candle blends frequencies in f32). Logits here
/// spread over several units (standard deviation about 4). Observed on the dev machine over the
/// 8448-token prompt (17 chunks) and 8 greedy steps: 2.6e-5 (safetensors) and 2.7e-5 (GGUF);
/// the same weights without the scaling differ by 13.3 and pick other greedy tokens. The bound
/// sits about 40x above the noise and four orders of magnitude below the defect.
pub const LOGIT_TOL: f32 = 1e-3;

/// RMS-norm weights around 1.
pub fn norm_weight(seed: u32) -> Tensor {
    let v: Vec<f32> = pseudo_random(HIDDEN, seed)
        .into_iter()
        .map(|x| 1.0 + 0.2 * x)
        .collect();
    Tensor::from_vec(v, HIDDEN, &Device::Cpu).unwrap()
}

/// The built model: its vocabulary file, Hugging Face weights and the files written from them.
pub struct Built {
    pub vocab_size: usize,
    /// Hugging Face names, f32, half-split Q/K rows.
    pub weights: HashMap<String, Tensor>,
    /// `config.json` + `model.safetensors` with Llama 3.1's scaling, and a twin without it.
    pub dir: TempDir,
    pub dir_unscaled: TempDir,
    pub gguf: Vec<u8>,
    pub gguf_unscaled: Vec<u8>,
}

pub fn config_json(vocab_size: usize, scaled: bool) -> serde_json::Value {
    let mut c = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "num_hidden_layers": LAYERS,
        "vocab_size": vocab_size,
        "rms_norm_eps": EPS,
        "rope_theta": THETA,
        "max_position_embeddings": CONTEXT,
        "tie_word_embeddings": false,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
    });
    if scaled {
        c["rope_scaling"] = json!({
            "rope_type": "llama3",
            "factor": FACTOR,
            "low_freq_factor": LOW_FREQ_FACTOR,
            "high_freq_factor": HIGH_FREQ_FACTOR,
            "original_max_position_embeddings": ORIGINAL_CONTEXT,
        });
    }
    c
}

/// The divisors llama.cpp's converter stores as `rope_freqs.weight` for Llama 3.1's scaling,
/// written here from its formula (f32 frequencies as the converter takes them; the band
/// arithmetic, which the converter runs on f32 tensors, in f64).
pub fn llama_cpp_rope_freqs() -> Vec<f32> {
    let low_wavelen = ORIGINAL_CONTEXT as f64 / LOW_FREQ_FACTOR;
    let high_wavelen = ORIGINAL_CONTEXT as f64 / HIGH_FREQ_FACTOR;
    (0..HEAD_DIM / 2)
        .map(|i| {
            let freq = 1.0 / THETA.powf((2 * i) as f32 / HEAD_DIM as f32);
            let wavelen = 2.0 * std::f64::consts::PI / f64::from(freq);
            let divisor = if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                FACTOR
            } else {
                let smooth = (ORIGINAL_CONTEXT as f64 / wavelen - LOW_FREQ_FACTOR)
                    / (HIGH_FREQ_FACTOR - LOW_FREQ_FACTOR);
                1.0 / ((1.0 - smooth) / FACTOR + smooth)
            };
            divisor as f32
        })
        .collect()
}

/// Hugging Face Q/K rows (per head: first halves, then second halves) in GGUF's order (pairs
/// interleaved), as llama.cpp's converter permutes them.
pub fn to_gguf_rows(w: &Tensor, heads: usize) -> Tensor {
    transpose_head_rows(w, heads, 2)
}

pub fn write_gguf(
    built_vocab: &Content,
    weights: &HashMap<String, Tensor>,
    scaled: bool,
) -> Vec<u8> {
    let vocab_size = weights["model.embed_tokens.weight"].dim(0).unwrap();
    let mut metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        (
            "general.name".into(),
            Value::String("llama3-shaped test".into()),
        ),
        ("llama.block_count".into(), Value::U32(LAYERS as u32)),
        ("llama.context_length".into(), Value::U32(CONTEXT as u32)),
        ("llama.embedding_length".into(), Value::U32(HIDDEN as u32)),
        ("llama.feed_forward_length".into(), Value::U32(FFN as u32)),
        (
            "llama.attention.head_count".into(),
            Value::U32(HEADS as u32),
        ),
        (
            "llama.attention.head_count_kv".into(),
            Value::U32(KV_HEADS as u32),
        ),
        ("llama.rope.freq_base".into(), Value::F32(THETA)),
        (
            "llama.rope.dimension_count".into(),
            Value::U32(HEAD_DIM as u32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(EPS as f32),
        ),
        ("llama.vocab_size".into(), Value::U32(vocab_size as u32)),
    ];
    for (key, value) in &built_vocab.metadata {
        if key.starts_with("tokenizer.") {
            metadata.push((key.clone(), value.clone()));
        }
    }
    let q = |t: &Tensor| QTensor::quantize(t, GgmlDType::F32).unwrap();
    let mut tensors: Vec<(String, QTensor)> = vec![
        (
            "token_embd.weight".into(),
            q(&weights["model.embed_tokens.weight"]),
        ),
        ("output.weight".into(), q(&weights["lm_head.weight"])),
        (
            "output_norm.weight".into(),
            q(&weights["model.norm.weight"]),
        ),
    ];
    if scaled {
        let freqs = Tensor::from_vec(llama_cpp_rope_freqs(), HEAD_DIM / 2, &Device::Cpu).unwrap();
        tensors.push(("rope_freqs.weight".into(), q(&freqs)));
    }
    for i in 0..LAYERS {
        let hf = |name: &str| &weights[&format!("model.layers.{i}.{name}.weight")];
        let mut add = |name: &str, t: Tensor| {
            tensors.push((format!("blk.{i}.{name}.weight"), q(&t)));
        };
        add("attn_norm", hf("input_layernorm").clone());
        add("ffn_norm", hf("post_attention_layernorm").clone());
        add("attn_q", to_gguf_rows(hf("self_attn.q_proj"), HEADS));
        add("attn_k", to_gguf_rows(hf("self_attn.k_proj"), KV_HEADS));
        add("attn_v", hf("self_attn.v_proj").clone());
        add("attn_output", hf("self_attn.o_proj").clone());
        add("ffn_gate", hf("mlp.gate_proj").clone());
        add("ffn_up", hf("mlp.up_proj").clone());
        add("ffn_down", hf("mlp.down_proj").clone());
    }
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut buf = Cursor::new(Vec::new());
    gguf_file::write(&mut buf, &md, &ts).unwrap();
    buf.into_inner()
}

pub fn write_dir(
    tag: &str,
    weights: &HashMap<String, Tensor>,
    vocab_size: usize,
    scaled: bool,
) -> TempDir {
    let dir = TempDir::new("llama3", tag);
    std::fs::write(
        dir.0.join("config.json"),
        serde_json::to_string_pretty(&config_json(vocab_size, scaled)).unwrap(),
    )
    .unwrap();
    candle_core::safetensors::save(weights, dir.0.join("model.safetensors")).unwrap();
    dir
}

pub fn build() -> &'static Built {
    static BUILT: OnceLock<Built> = OnceLock::new();
    BUILT.get_or_init(|| {
        let path = require_llama_vocab("llama-bpe").expect("llama-bpe vocabulary");
        let mut file = std::fs::File::open(&path).unwrap();
        let vocab = Content::read(&mut file).unwrap();
        let vocab_size = match &vocab.metadata["tokenizer.ggml.tokens"] {
            Value::Array(tokens) => tokens.len(),
            other => panic!("tokenizer.ggml.tokens is {other:?}"),
        };
        assert_eq!(
            vocab_size, 128_256,
            "the llama-bpe vocabulary has Llama 3's size"
        );
        let mut weights = HashMap::new();
        let mut seed = 1;
        let mut add = |name: String, t: Tensor| {
            weights.insert(name, t);
        };
        let mut next = || {
            seed += 1;
            seed
        };
        // Scales chosen so attention scores and logits spread over several units: positions
        // then change which keys a query attends to, and the top token is rarely a near-tie.
        add(
            "model.embed_tokens.weight".into(),
            random(vocab_size, HIDDEN, 1.0, next()),
        );
        add(
            "lm_head.weight".into(),
            random(vocab_size, HIDDEN, 0.9, next()),
        );
        add("model.norm.weight".into(), norm_weight(next()));
        for i in 0..LAYERS {
            let p = format!("model.layers.{i}");
            add(format!("{p}.input_layernorm.weight"), norm_weight(next()));
            add(
                format!("{p}.post_attention_layernorm.weight"),
                norm_weight(next()),
            );
            add(
                format!("{p}.self_attn.q_proj.weight"),
                random(HEADS * HEAD_DIM, HIDDEN, 0.3, next()),
            );
            add(
                format!("{p}.self_attn.k_proj.weight"),
                random(KV_HEADS * HEAD_DIM, HIDDEN, 0.3, next()),
            );
            add(
                format!("{p}.self_attn.v_proj.weight"),
                random(KV_HEADS * HEAD_DIM, HIDDEN, 0.2, next()),
            );
            add(
                format!("{p}.self_attn.o_proj.weight"),
                random(HIDDEN, HEADS * HEAD_DIM, 0.2, next()),
            );
            add(
                format!("{p}.mlp.gate_proj.weight"),
                random(FFN, HIDDEN, 0.2, next()),
            );
            add(
                format!("{p}.mlp.up_proj.weight"),
                random(FFN, HIDDEN, 0.2, next()),
            );
            add(
                format!("{p}.mlp.down_proj.weight"),
                random(HIDDEN, FFN, 0.15, next()),
            );
        }
        let dir = write_dir("scaled", &weights, vocab_size, true);
        let dir_unscaled = write_dir("unscaled", &weights, vocab_size, false);
        let gguf = write_gguf(&vocab, &weights, true);
        let gguf_unscaled = write_gguf(&vocab, &weights, false);
        Built {
            vocab_size,
            weights,
            dir,
            dir_unscaled,
            gguf,
            gguf_unscaled,
        }
    })
}

pub fn load_gguf(bytes: &[u8], form: WeightForm) -> LlamaModel {
    let mut reader = Cursor::new(bytes);
    let content = Content::read(&mut reader).unwrap();
    LlamaModel::from_gguf(&content, &mut reader, &Device::Cpu, form, None).unwrap()
}

pub fn load_dir(dir: &Path) -> LlamaModel {
    LlamaModel::from_safetensors(dir, &Device::Cpu, WeightForm::F32, None).unwrap()
}

/// The prompt: English text in the llama-bpe vocabulary, tokenized by the GGUF's own
/// tokenizer, repeated to `PROMPT_TOKENS` tokens (a repeated text makes attention's choice of
/// position matter: the same token occurs at many distances).
pub fn prompt(built: &Built) -> Vec<u32> {
    let content = Content::read(&mut Cursor::new(&built.gguf)).unwrap();
    let tokenizer = ModelTokenizer::from_gguf(&content).unwrap();
    let text = "The quick brown fox jumps over the lazy dog. Llama 3.1 extends its context \
                from 8,192 to 131,072 positions by slowing its low-frequency rotations; \
                \u{1f999} 1234567 tokens later, the fox is still jumping. ";
    let ids = tokenizer.encode(text, false).unwrap();
    assert!(ids.len() > 20, "{ids:?}");
    ids.iter().copied().cycle().take(PROMPT_TOKENS).collect()
}

/// candle-transformers' Llama with its cache and position.
pub struct Reference {
    model: reference::Llama,
    cache: reference::Cache,
    pos: usize,
}

impl Reference {
    fn new(built: &Built) -> Self {
        let cfg: reference::LlamaConfig =
            serde_json::from_value(config_json(built.vocab_size, true)).unwrap();
        let cfg = cfg.into_config(false);
        let vb = VarBuilder::from_tensors(built.weights.clone(), DType::F32, &Device::Cpu);
        Self {
            model: reference::Llama::load(vb, &cfg).unwrap(),
            cache: reference::Cache::new(true, DType::F32, &cfg, &Device::Cpu).unwrap(),
            pos: 0,
        }
    }

    /// Runs `tokens` in chunks; the logits after each chunk.
    fn run(&mut self, tokens: &[u32]) -> Vec<Vec<f32>> {
        tokens
            .chunks(CHUNK)
            .map(|chunk| {
                let input = Tensor::new(chunk, &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap();
                let logits = self
                    .model
                    .forward(&input, self.pos, &mut self.cache)
                    .unwrap();
                self.pos += chunk.len();
                logits.squeeze(0).unwrap().to_vec1::<f32>().unwrap()
            })
            .collect()
    }
}

/// Runs `tokens` through Tollgate's model in chunks; the logits after each chunk.
pub fn run(model: &LlamaModel, cache: &mut KvCache, tokens: &[u32]) -> Vec<Vec<f32>> {
    tokens
        .chunks(CHUNK)
        .map(|chunk| {
            let mut batch = [SeqStep {
                tokens: chunk,
                cache: &mut *cache,
                logits: 1,
                adapter: None,
            }];
            model.forward(&mut batch).unwrap().remove(0)
        })
        .collect()
}

/// Logits of a whole run: every chunk of the prompt, then `GREEDY_STEPS` greedy tokens.
pub struct Trace {
    pub logits: Vec<Vec<f32>>,
    pub greedy: Vec<u32>,
}

pub fn reference_trace(built: &Built, prompt: &[u32]) -> &'static Trace {
    static TRACE: OnceLock<Trace> = OnceLock::new();
    TRACE.get_or_init(|| {
        let mut r = Reference::new(built);
        let mut logits = r.run(prompt);
        let mut greedy = Vec::new();
        for _ in 0..GREEDY_STEPS {
            let next = argmax(logits.last().unwrap());
            greedy.push(next);
            logits.extend(r.run(&[next]));
        }
        Trace { logits, greedy }
    })
}

/// Tollgate's model fed the same tokens (the prompt, then the reference's greedy tokens);
/// returns its own greedy choices and the largest logit difference from the reference.
pub fn compare(model: &LlamaModel, prompt: &[u32], reference: &Trace) -> (Vec<u32>, f32) {
    let mut cache = model.new_cache();
    let mut logits = run(model, &mut cache, prompt);
    let mut greedy = Vec::new();
    for &next in &reference.greedy {
        greedy.push(argmax(logits.last().unwrap()));
        logits.extend(run(model, &mut cache, &[next]));
    }
    assert_eq!(logits.len(), reference.logits.len());
    let worst = logits
        .iter()
        .zip(&reference.logits)
        .map(|(a, b)| max_abs_diff(a, b))
        .fold(0.0, f32::max);
    (greedy, worst)
}

pub fn check(what: &str, model: &LlamaModel) {
    let built = build();
    let prompt = prompt(built);
    let reference = reference_trace(built, &prompt);
    let (greedy, worst) = compare(model, &prompt, reference);
    eprintln!(
        "{what}: max |logit diff| {worst:.3e} over {} steps",
        reference.logits.len()
    );
    assert!(
        worst <= LOGIT_TOL,
        "{what}: max |logit diff| {worst} > {LOGIT_TOL}"
    );
    assert_eq!(greedy, reference.greedy, "{what}: greedy tokens");
}

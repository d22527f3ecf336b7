//! What LoRA adapters cost the engine: 8 streams on the dev model each with an adapter of its
//! own (8 adapters in every step) against 8 streams of the base model, in the same process,
//! alternated round by round; and how long an adapter takes to load.
//!
//! Adapters of rank `--rank` (16) on all seven projections of every layer, random, written as
//! PEFT directories under the system's temporary directory, their matrices saved as `--dtype`
//! (`f32`; or `bf16`, `f16`: held so in memory too, half the bytes each step reads). Each run submits 8 greedy requests
//! at once (prompts unique to the run, so the prefix cache gives nothing) of `--tokens` (128)
//! tokens each with the end tokens banned, and times them from submission to the last token.
//! Prints one JSON object: each round's tok/s of both runs, their medians and ratio, and the
//! adapters' load times.
//!
//! `cargo run --release -p tollgate-runtime --example lora_bench [-- --rounds 3 --rank 16
//! --tokens 128 --dtype f32]` (run under `flock /tmp/tollgate-bench.lock`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use tollgate_runtime::engine::{Engine, EngineConfig, GenEvent, GenRequest};
use tollgate_runtime::loader::load_dev_model;
use tollgate_runtime::model::{AdapterBase, LlamaConfig, LoraAdapter, LoraTarget};
use tollgate_runtime::sampling::SamplingParams;
use tollgate_runtime::synth::pseudo_random;

const STREAMS: usize = 8;
const MODULES: [&str; 7] = LoraTarget::PEFT_NAMES;

fn arg(name: &str, default: usize) -> anyhow::Result<usize> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == name) {
        Some(i) => Ok(args
            .get(i + 1)
            .ok_or_else(|| anyhow::anyhow!("{name} needs a value"))?
            .parse()?),
        None => Ok(default),
    }
}

/// A random PEFT adapter of rank `r` on every projection of a model of `c`, in `dir`, its
/// matrices saved as `dtype`.
fn write_adapter(
    dir: &Path,
    c: &LlamaConfig,
    (r, dtype): (usize, DType),
    seed: u32,
) -> anyhow::Result<()> {
    let (h, q, kv, f) = (
        c.hidden_size,
        c.n_heads * c.head_dim,
        c.n_kv_heads * c.head_dim,
        c.ffn_size,
    );
    let mut tensors = HashMap::new();
    let mut seed = seed;
    for layer in 0..c.n_layers {
        for m in MODULES {
            let (inputs, outputs) = match m {
                "q_proj" => (h, q),
                "k_proj" | "v_proj" => (h, kv),
                "o_proj" => (q, h),
                "down_proj" => (f, h),
                _ => (h, f),
            };
            let parent = if ["gate_proj", "up_proj", "down_proj"].contains(&m) {
                "mlp"
            } else {
                "self_attn"
            };
            let name = format!("base_model.model.model.layers.{layer}.{parent}.{m}.lora_");
            for (half, rows, cols) in [("A", r, inputs), ("B", outputs, r)] {
                seed += 1;
                let v: Vec<f32> = pseudo_random(rows * cols, seed)
                    .into_iter()
                    .map(|x| x * 0.02)
                    .collect();
                tensors.insert(
                    format!("{name}{half}.weight"),
                    Tensor::from_vec(v, (rows, cols), &Device::Cpu)?.to_dtype(dtype)?,
                );
            }
        }
    }
    std::fs::create_dir_all(dir)?;
    let config = serde_json::json!({
        "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": MODULES,
        "bias": "none",
    });
    std::fs::write(dir.join("adapter_config.json"), config.to_string())?;
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors"))?;
    Ok(())
}

/// Tokens per second of `STREAMS` concurrent greedy requests of `tokens` tokens, the `i`th
/// with `adapters[i]` (none when `adapters` is empty).
fn run(
    engine: &Engine,
    adapters: &[Arc<LoraAdapter>],
    tokens: usize,
    tag: &str,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut streams = Vec::new();
    for i in 0..STREAMS {
        // Unique per run: the prefix cache gives nothing.
        let prompt: Vec<u32> = format!("Run {tag}, stream {i}: tell me a long story.")
            .bytes()
            .map(|b| u32::from(b) + 100)
            .collect();
        let mut request = GenRequest::new(
            prompt,
            tokens,
            SamplingParams {
                temperature: 0.0,
                logit_bias: vec![(0, -100.0), (2, -100.0)],
                ..SamplingParams::default()
            },
        );
        request.adapter = adapters.get(i).cloned();
        streams.push(engine.submit(request)?);
    }
    let mut generated = 0;
    for mut events in streams {
        while let Some(event) = events.blocking_recv() {
            match event {
                GenEvent::Finished {
                    completion_tokens, ..
                } => {
                    generated += completion_tokens;
                    break;
                }
                GenEvent::Failed { message } => anyhow::bail!("a stream failed: {message}"),
                _ => {}
            }
        }
    }
    Ok(generated as f64 / started.elapsed().as_secs_f64())
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

/// Loads the adapters in `dirs`; each one's load time in milliseconds.
fn load_all(
    base: &AdapterBase,
    dirs: &[PathBuf],
) -> anyhow::Result<(Vec<Arc<LoraAdapter>>, Vec<f64>)> {
    let mut adapters = Vec::new();
    let mut ms = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let t = Instant::now();
        adapters.push(Arc::new(base.load(&format!("a{i}"), dir)?));
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok((adapters, ms))
}

fn main() -> anyhow::Result<()> {
    let (rounds, rank, tokens) = (
        arg("--rounds", 3)?,
        arg("--rank", 16)?,
        arg("--tokens", 128)?,
    );
    let dtype = match std::env::args()
        .skip_while(|a| a != "--dtype")
        .nth(1)
        .as_deref()
    {
        None | Some("f32") => DType::F32,
        Some("bf16") => DType::BF16,
        Some("f16") => DType::F16,
        Some(other) => anyhow::bail!("--dtype {other}: f32, bf16 or f16"),
    };
    let loaded = load_dev_model(4096)?;
    let base = loaded.model.adapter_base();
    let config = loaded.model.config().clone();
    let root = std::env::temp_dir().join(format!("tollgate-lora-bench-{}", std::process::id()));
    let dirs: Vec<PathBuf> = (0..STREAMS).map(|i| root.join(format!("a{i}"))).collect();
    for (i, dir) in dirs.iter().enumerate() {
        write_adapter(dir, &config, (rank, dtype), 1000 * (i as u32 + 1))?;
    }
    let file_bytes = std::fs::metadata(dirs[0].join("adapter_model.safetensors"))?.len();
    let (adapters, load_ms) = load_all(&base, &dirs)?;
    let engine = Engine::start(loaded.model, loaded.tokenizer, EngineConfig::default())?;
    // Warm-up of both kinds.
    run(&engine, &[], 16, "warm-base")?;
    run(&engine, &adapters, 16, "warm-lora")?;
    let (mut plain, mut lora) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        plain.push(run(&engine, &[], tokens, &format!("base{round}"))?);
        lora.push(run(&engine, &adapters, tokens, &format!("lora{round}"))?);
        eprintln!(
            "round {round}: base {:.1} tok/s, 8 adapters {:.1} tok/s",
            plain[round], lora[round]
        );
    }
    std::fs::remove_dir_all(&root).ok();
    let out = serde_json::json!({
        "streams": STREAMS,
        "tokens_per_stream": tokens,
        "rank": rank,
        "adapter_dtype": format!("{dtype:?}").to_lowercase(),
        "targets": MODULES,
        "adapter_file_bytes": file_bytes,
        "adapter_memory_bytes": adapters[0].bytes(),
        "base_tok_s": plain,
        "adapters_tok_s": lora,
        "base_median": median(&plain),
        "adapters_median": median(&lora),
        "ratio": median(&lora) / median(&plain),
        "load_ms": load_ms,
        "load_ms_median": median(&load_ms),
        "kernels": tollgate_runtime::model::CpuKernels::selected().to_string(),
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

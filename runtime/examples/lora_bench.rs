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
//! adapters' load times; and `step`: the model's own decode step of the 8 sequences (no
//! engine, no scheduling), base and adapters alternating step by step for `--steps` (60)
//! steps, its median wall and CPU milliseconds and their ratios (on a shared machine the CPU
//! time is the steadier figure).
//!
//! `cargo run --release -p tollgate-runtime --example lora_bench [-- --rounds 3 --rank 16
//! --tokens 128 --dtype f32 --steps 60]` (run under `flock /tmp/tollgate-bench.lock`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use tollgate_runtime::engine::{Engine, EngineConfig, GenEvent, GenRequest};
use tollgate_runtime::loader::load_dev_model;
use tollgate_runtime::model::{
    AdapterBase, KvCache, LlamaConfig, LlamaModel, LoraAdapter, LoraTarget, SeqStep,
};
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

/// Milliseconds of wall and of CPU time (the process's, both threads) per decode step of
/// `STREAMS` sequences on `model` itself (no engine), base and adapters alternating step by
/// step over `steps` steps after a 20-token prompt each: medians `[base, adapters]` of each.
fn step_times(
    model: &LlamaModel,
    adapters: &[Arc<LoraAdapter>],
    steps: usize,
) -> anyhow::Result<([f64; 2], [f64; 2])> {
    let mut caches: [Vec<KvCache>; 2] =
        std::array::from_fn(|_| (0..STREAMS).map(|_| model.new_cache()).collect());
    let prompts: Vec<Vec<u32>> = (0..STREAMS)
        .map(|i| (0..20).map(|t| (100 + i * 37 + t * 3) as u32).collect())
        .collect();
    let next = vec![vec![300u32]; STREAMS];
    let (mut wall, mut cpu): ([Vec<f64>; 2], [Vec<f64>; 2]) = Default::default();
    for step in 0..=steps {
        for (k, caches) in caches.iter_mut().enumerate() {
            let feed = if step == 0 { &prompts } else { &next };
            let mut batch: Vec<SeqStep<'_>> = caches
                .iter_mut()
                .zip(feed)
                .zip(adapters)
                .map(|((cache, tokens), a)| SeqStep {
                    tokens,
                    cache,
                    logits: 1,
                    adapter: (k == 1).then_some(&**a),
                })
                .collect();
            let (t, c) = (Instant::now(), cpu_seconds());
            model.forward(&mut batch)?;
            if step > 0 {
                wall[k].push(t.elapsed().as_secs_f64() * 1e3);
                cpu[k].push((cpu_seconds() - c) * 1e3);
            }
        }
    }
    let medians = |v: &[Vec<f64>; 2]| [median(&v[0]), median(&v[1])];
    Ok((medians(&wall), medians(&cpu)))
}

/// User and system CPU seconds of the process so far.
fn cpu_seconds() -> f64 {
    // SAFETY: `rusage` is plain data (all zeroes is a valid value) that `getrusage` fills.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a `rusage` of our own.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
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
    let (step_ms, step_cpu_ms) = step_times(&loaded.model, &adapters, arg("--steps", 60)?)?;
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
        "step": {
            "steps": arg("--steps", 60)?,
            "base_ms": step_ms[0],
            "adapters_ms": step_ms[1],
            "ratio": step_ms[0] / step_ms[1],
            "base_cpu_ms": step_cpu_ms[0],
            "adapters_cpu_ms": step_cpu_ms[1],
            "cpu_ratio": step_cpu_ms[0] / step_cpu_ms[1],
        },
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

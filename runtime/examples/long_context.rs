//! Single-sequence speed at growing context: the time to prefill a prompt of N tokens and the
//! decode tok/s after it, on the engine (no HTTP), for N = 300, 1000 and 4000.
//!
//! `cargo run --release -p tollgate-runtime --example long_context [-- [--rounds N] [--tokens 300,1000,4000] [--kv-dtype f32|f16] [model.gguf]]`

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use candle_core::DType;
use tollgate_runtime::dev_model::require_dev_model;
use tollgate_runtime::engine::{Engine, EngineConfig, GenEvent, GenRequest};
use tollgate_runtime::loader::{load, LoadOptions, ModelSource};
use tollgate_runtime::model::WeightForm;
use tollgate_runtime::sampling::SamplingParams;

const DECODE_TOKENS: usize = 128;

/// The command line: rounds, prompt lengths, the KV cache's dtype and the model.
struct Args {
    rounds: usize,
    lengths: Vec<usize>,
    kv_dtype: DType,
    path: PathBuf,
}

impl Args {
    fn parse() -> anyhow::Result<Self> {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let (mut rounds, mut lengths, mut path) = (2, vec![300usize, 1000, 4000], None);
        let mut kv_dtype = DType::F32;
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--rounds" => rounds = it.next().context("--rounds N")?.parse()?,
                "--tokens" => {
                    lengths = it
                        .next()
                        .context("--tokens N,N")?
                        .split(',')
                        .map(str::parse)
                        .collect::<Result<_, _>>()?
                }
                "--kv-dtype" => {
                    kv_dtype = match it.next().map(String::as_str) {
                        Some("f32") => DType::F32,
                        Some("f16") => DType::F16,
                        other => anyhow::bail!("--kv-dtype f32|f16, not {other:?}"),
                    }
                }
                other => path = Some(PathBuf::from(other)),
            }
        }
        let path = match path {
            Some(p) => p,
            None => require_dev_model()?,
        };
        Ok(Self {
            rounds,
            lengths,
            kv_dtype,
            path,
        })
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse()?;
    let longest = args.lengths.iter().copied().max().unwrap_or(0);
    let loaded = load(
        "bench",
        &ModelSource::Path(args.path.clone()),
        &LoadOptions {
            context_length: Some(longest + DECODE_TOKENS + 8),
            ..LoadOptions::cpu(WeightForm::Auto)
        },
    )?;
    let tokenizer = loaded.tokenizer.clone();
    let mut model = loaded.model;
    model.set_kv_dtype(args.kv_dtype)?;
    let engine = Engine::start(
        model,
        tokenizer.clone(),
        EngineConfig {
            prefix_cache_bytes: 0,
            ..EngineConfig::default()
        },
    )?;
    // A text that tokenizes to about one token per word; cut to the exact length.
    let words = "the river ran past the old mill and the garden where the children played ";
    let text = words.repeat(longest / 10 + 20);
    let all = tokenizer.encode(&text, false)?;
    for round in 1..=args.rounds {
        for &n in &args.lengths {
            measure(&engine, &all[..n], round)?;
        }
    }
    Ok(())
}

/// Prefills `prompt` and decodes [`DECODE_TOKENS`] after it; prints both speeds.
fn measure(engine: &Engine, prompt: &[u32], round: usize) -> anyhow::Result<()> {
    let n = prompt.len();
    let started = Instant::now();
    let mut r = engine.submit(GenRequest::new(
        prompt.to_vec(),
        DECODE_TOKENS,
        SamplingParams {
            temperature: 1.0,
            seed: Some(round as u64),
            ..SamplingParams::default()
        },
    ))?;
    let (mut first, mut tokens) = (None, 0);
    while let Some(event) = r.blocking_recv() {
        match event {
            GenEvent::Admitted => {}
            GenEvent::Delta { .. } => {
                first.get_or_insert_with(Instant::now);
            }
            GenEvent::Finished {
                completion_tokens, ..
            } => {
                tokens = completion_tokens;
                break;
            }
            GenEvent::Failed { message } => anyhow::bail!("generation failed: {message}"),
        }
    }
    let end = Instant::now();
    let first = first.context("no token")?;
    println!(
        "round {round}, context {n}: prefill {:.2} s ({:.0} tok/s), decode {:.1} tok/s over {} tokens",
        (first - started).as_secs_f64(),
        n as f64 / (first - started).as_secs_f64(),
        (tokens.saturating_sub(1)) as f64 / (end - first).as_secs_f64(),
        tokens
    );
    Ok(())
}

//! The cost of constrained decoding on this machine: total decode tok/s of the engine with
//! 1 and 8 sequences generating JSON under a schema, against the same engine generating free
//! text, the time to compute one token mask in an engine step (p50/p99/max) along those JSON
//! outputs, and the time to compile a grammar (which computes its first mask).
//!
//! `cargo run --release -p tollgate-runtime --example structured [-- [--rounds N] [path/to/model.gguf]]`
//!
//! Both kinds of sequence sample at temperature 1 with fixed seeds and generate
//! [`MAX_TOKENS`] tokens unless they end first; tok/s counts the tokens each produced.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use tollgate_runtime::constraint::{ConstraintCompiler, Grammar};
use tollgate_runtime::dev_model::require_dev_model;
use tollgate_runtime::engine::{Engine, EngineConfig, GenConstraint, GenEvent, GenRequest};
use tollgate_runtime::loader::{load, LoadOptions, ModelSource};
use tollgate_runtime::model::WeightForm;
use tollgate_runtime::sampling::SamplingParams;

const MAX_TOKENS: usize = 128;

/// A schema whose documents are long enough to fill [`MAX_TOKENS`]: many bounded strings.
fn schema() -> serde_json::Value {
    serde_json::json!({
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 40},
            "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
            "genre": {"enum": ["drama", "comedy", "thriller", "documentary"]},
            "scenes": {
                "type": "array",
                "minItems": 30,
                "items": {
                    "type": "object",
                    "properties": {
                        "place": {"type": "string", "maxLength": 24},
                        "minutes": {"type": "integer", "minimum": 1, "maximum": 60}
                    },
                    "required": ["place", "minutes"],
                    "additionalProperties": false
                }
            }
        },
        "required": ["title", "year", "genre", "scenes"],
        "additionalProperties": false
    })
}

struct Run {
    tokens: usize,
    seconds: f64,
    outputs: Vec<Vec<u32>>,
}

/// `batch` sequences submitted together; returns the tokens they produced and the wall time.
fn run(
    engine: &Engine,
    tokenizer: &tollgate_runtime::tokenizer::ModelTokenizer,
    prompt: &[u32],
    batch: usize,
    constraint: impl Fn() -> anyhow::Result<Option<GenConstraint>>,
) -> anyhow::Result<Run> {
    let started = Instant::now();
    let mut receivers = Vec::new();
    for i in 0..batch {
        receivers.push(engine.submit(GenRequest {
            constraint: constraint()?,
            ..GenRequest::new(
                prompt.to_vec(),
                MAX_TOKENS,
                SamplingParams {
                    temperature: 1.0,
                    seed: Some(i as u64 + 1),
                    ..SamplingParams::default()
                },
            )
        })?);
    }
    let mut tokens = 0;
    let mut outputs = Vec::new();
    for mut r in receivers {
        let mut text = String::new();
        while let Some(event) = r.blocking_recv() {
            match event {
                GenEvent::Admitted => {}
                GenEvent::Delta { text: t, .. } => text.push_str(&t),
                GenEvent::Finished {
                    completion_tokens, ..
                } => {
                    tokens += completion_tokens;
                    break;
                }
                GenEvent::Failed { message } => anyhow::bail!("generation failed: {message}"),
            }
        }
        outputs.push(tokenizer.encode(&text, false)?);
    }
    Ok(Run {
        tokens,
        seconds: started.elapsed().as_secs_f64(),
        outputs,
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// The model named on the command line (or the dev model) and the rounds to run.
fn parse_args() -> anyhow::Result<(PathBuf, usize)> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut rounds = 2;
    let mut path: Option<PathBuf> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--rounds" => rounds = it.next().context("--rounds N")?.parse()?,
            other => path = Some(PathBuf::from(other)),
        }
    }
    let path = match path {
        Some(p) => p,
        None => require_dev_model()?,
    };
    Ok((path, rounds))
}

/// Times measured along the constrained outputs, in milliseconds (nodes: a count).
#[derive(Default)]
struct MaskTimes {
    masks: Vec<f64>,
    nodes_walked: Vec<f64>,
    compiles: Vec<f64>,
}

impl MaskTimes {
    /// Compiles the grammar again for each output and masks along its tokens. (Re-tokenized:
    /// the same text, maybe split differently, which the grammar accepts as well.)
    fn measure(
        &mut self,
        compiler: &ConstraintCompiler,
        grammar: &Grammar,
        outputs: &[Vec<u32>],
        vocab: usize,
    ) -> anyhow::Result<()> {
        for output in outputs {
            let started = Instant::now();
            let mut c = compiler.compile(grammar)?;
            self.compiles.push(started.elapsed().as_secs_f64() * 1e3);
            let mut logits = vec![0f32; vocab];
            for &t in output {
                let started = Instant::now();
                c.mask(&mut logits)?;
                self.masks.push(started.elapsed().as_secs_f64() * 1e3);
                self.nodes_walked.push(c.last_mask_nodes_walked() as f64);
                if c.commit(t).is_err() || c.is_finished() {
                    break;
                }
            }
        }
        Ok(())
    }

    fn print(mut self, vocab: usize) {
        let Self {
            masks,
            nodes_walked,
            compiles,
        } = &mut self;
        masks.sort_by(|a, b| a.total_cmp(b));
        println!(
            "token mask ({} masks, vocabulary {vocab}): p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
            masks.len(),
            percentile(masks, 0.5),
            percentile(masks, 0.99),
            masks.last().copied().unwrap_or(0.0)
        );
        compiles.sort_by(|a, b| a.total_cmp(b));
        println!(
            "grammar compile, with the first mask ({} compiles, on the request's thread, not in an engine step): p50 {:.3} ms, max {:.3} ms",
            compiles.len(),
            percentile(compiles, 0.5),
            compiles.last().copied().unwrap_or(0.0)
        );
        nodes_walked.sort_by(|a, b| a.total_cmp(b));
        println!(
            "token-trie nodes walked per mask (machine-independent): p50 {:.0}, p99 {:.0}, mean {:.0}",
            percentile(nodes_walked, 0.5),
            percentile(nodes_walked, 0.99),
            nodes_walked.iter().sum::<f64>() / nodes_walked.len().max(1) as f64
        );
    }
}

fn main() -> anyhow::Result<()> {
    let (path, rounds) = parse_args()?;
    let loaded = load(
        "bench",
        &ModelSource::Path(path),
        &LoadOptions {
            context_length: Some(2048),
            ..LoadOptions::cpu(WeightForm::Auto)
        },
    )?;
    let vocab = loaded.model.config().vocab_size;
    let tokenizer = loaded.tokenizer.clone();
    let compiler = Arc::new(ConstraintCompiler::new(tokenizer.clone(), vocab)?);
    let config = EngineConfig {
        prefix_cache_bytes: 0,
        ..EngineConfig::default()
    };
    let engine = Engine::start(loaded.model, tokenizer.clone(), config)?;
    let prompt = tokenizer.encode(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nDescribe a long film, scene by scene.<|im_end|>\n<|im_start|>assistant\n",
        false,
    )?;
    let grammar = Grammar::JsonSchema {
        schema: schema(),
        param: "schema".into(),
    };
    let mut times = MaskTimes::default();
    for round in 1..=rounds {
        for batch in [1usize, 8] {
            let free = run(&engine, &tokenizer, &prompt, batch, || Ok(None))?;
            let json = run(&engine, &tokenizer, &prompt, batch, || {
                Ok(Some(GenConstraint::Now(Box::new(
                    compiler.compile(&grammar)?,
                ))))
            })?;
            let (f, j) = (
                free.tokens as f64 / free.seconds,
                json.tokens as f64 / json.seconds,
            );
            println!(
                "round {round}, batch {batch}: unconstrained {f:.1} tok/s ({} tokens), constrained {j:.1} tok/s ({} tokens), ratio {:.3}",
                free.tokens,
                json.tokens,
                j / f
            );
            times.measure(&compiler, &grammar, &json.outputs, vocab)?;
        }
    }
    times.print(vocab);
    Ok(())
}

//! Speculative decoding on one engine with the development model, one stream, without a
//! gateway: tokens/s with drafts and without, on a request that copies a source file, on
//! prose (nothing to copy), and on the copy with the output as its prediction.
//!
//!     cargo run --release -p tollgate-bench --bin spec -- [--rounds 3] [--max-tokens 256] [--draft N]
//!         [--json PATH]
//!
//! Two engines (speculation on, with the engine's default draft length, and off) run each
//! workload in alternate order, `--rounds` times, one request at a time, greedy. Printed per
//! workload: tokens/s on and off (medians over the rounds, the request's whole time from
//! submission to its last token), their ratio, and the forward passes and accepted draft
//! tokens of one request. Outputs are checked equal (the exactness speculation promises).
//! `--json PATH` writes every round's figures with their provenance (commit, CPU, command).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail};
use clap::Parser;
use serde_json::{json, Value};
use tollgate_runtime::engine::{Engine, EngineConfig, GenEvent, GenRequest};
use tollgate_runtime::loader::load_dev_model;
use tollgate_runtime::sampling::SamplingParams;
use tollgate_runtime::tokenizer::ModelTokenizer;

/// spec: speculative decoding on and off, one stream
#[derive(Parser)]
#[command(name = "spec", version)]
struct Args {
    /// Times each workload runs on each engine
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Tokens each request generates at most (prose: exactly, the end tokens banned)
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Longest draft (the engine's default when not given)
    #[arg(long)]
    draft: Option<usize>,
    /// Write the raw figures here, with their provenance
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

/// The file the copy workload asks for again (this benchmark's own source).
const SOURCE: &str = include_str!("spec.rs");

/// One request's result: its text, tokens, seconds, passes and accepted draft tokens.
struct Run {
    text: String,
    tokens: usize,
    seconds: f64,
    steps: u64,
    accepted: u64,
}

fn run(engine: &Engine, request: &GenRequest) -> anyhow::Result<Run> {
    let stats = engine.stats();
    let (steps, accepted) = (
        stats.steps_total.load(Ordering::Relaxed),
        stats.accepted_draft_tokens_total.load(Ordering::Relaxed),
    );
    let started = Instant::now();
    let mut events = engine.submit(request.clone())?;
    let mut text = String::new();
    let tokens = loop {
        match events.blocking_recv() {
            Some(GenEvent::Delta { text: t, .. }) => text.push_str(&t),
            Some(GenEvent::Finished {
                completion_tokens, ..
            }) => break completion_tokens,
            Some(GenEvent::Failed { message }) => bail!("generation failed: {message}"),
            Some(GenEvent::Admitted) => {}
            None => return Err(anyhow!("the engine stopped")),
        }
    };
    Ok(Run {
        text,
        tokens,
        seconds: started.elapsed().as_secs_f64(),
        steps: stats.steps_total.load(Ordering::Relaxed) - steps,
        accepted: stats.accepted_draft_tokens_total.load(Ordering::Relaxed) - accepted,
    })
}

fn engine(draft: usize) -> anyhow::Result<(Engine, Arc<ModelTokenizer>)> {
    let loaded = load_dev_model(4096)?;
    let tokenizer = loaded.tokenizer.clone();
    let config = EngineConfig {
        speculative_draft: draft,
        ..EngineConfig::default()
    };
    Ok((
        Engine::start(loaded.model, loaded.tokenizer, config)?,
        tokenizer,
    ))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs `request` on both engines, alternating which goes first; prints the figures and
/// returns the last run with drafts and the figures as JSON.
fn compare(
    name: &str,
    on: &Engine,
    off: &Engine,
    request: &GenRequest,
    rounds: usize,
) -> anyhow::Result<(Run, Value)> {
    let (mut rate_on, mut rate_off) = (Vec::new(), Vec::new());
    let mut last = None;
    for round in 0..rounds {
        let order: [(&Engine, bool); 2] = if round % 2 == 0 {
            [(on, true), (off, false)]
        } else {
            [(off, false), (on, true)]
        };
        let mut texts = Vec::new();
        for (engine, speculating) in order {
            let r = run(engine, request)?;
            let rate = r.tokens as f64 / r.seconds;
            if speculating {
                rate_on.push(rate);
            } else {
                rate_off.push(rate);
            }
            texts.push(r.text.clone());
            if speculating {
                last = Some(r);
            }
        }
        if texts[0] != texts[1] {
            bail!("{name}: the outputs with and without drafts differ");
        }
    }
    let last = last.ok_or_else(|| anyhow!("no rounds"))?;
    let figures = json!({
        "workload": name,
        "tok_s_on": rate_on,
        "tok_s_off": rate_off,
        "tokens": last.tokens,
        "passes_on": last.steps,
        "accepted_draft_tokens": last.accepted,
    });
    let (a, b) = (median(rate_on), median(rate_off));
    println!(
        "{name:<22} on {a:>7.1} tok/s   off {b:>7.1} tok/s   ratio {:.2}   ({} tokens in {} passes, {} drafted tokens accepted)",
        a / b,
        last.tokens,
        last.steps,
        last.accepted
    );
    let mut figures = figures;
    figures["ratio_of_medians"] = json!(a / b);
    Ok((last, figures))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let draft = args
        .draft
        .unwrap_or(EngineConfig::default().speculative_draft);
    let (on, tokenizer) = engine(draft)?;
    let (off, _) = engine(0)?;
    let chat = |user: &str, answer: &str| -> anyhow::Result<Vec<u32>> {
        let text = format!("<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{answer}");
        Ok(tokenizer.encode(&text, false)?)
    };
    let greedy = |prompt: Vec<u32>| {
        GenRequest::new(
            prompt,
            args.max_tokens,
            SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            },
        )
    };
    let file: String = SOURCE.lines().take(60).collect::<Vec<_>>().join("\n");
    let copy = greedy(chat(&format!("Copy this code:\n{file}"), &file[..40])?);
    let mut prose = greedy(chat("Tell me a long story about a dragon.", "")?);
    prose.sampling.logit_bias = tokenizer
        .stop_token_ids()
        .iter()
        .map(|&t| (t, -100.0))
        .collect();
    let load = || {
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let load_before = load();
    println!(
        "speculative decoding, one stream, draft up to {draft} tokens, {} rounds, load average {load_before}",
        args.rounds,
    );
    let (copied, copy_figures) = compare("code copy", &on, &off, &copy, args.rounds)?;
    let (_, prose_figures) = compare("prose", &on, &off, &prose, args.rounds)?;
    let mut predicted = copy.clone();
    predicted.prediction = Some(tokenizer.encode(&copied.text, false)?);
    let (_, predicted_figures) =
        compare("code copy, predicted", &on, &off, &predicted, args.rounds)?;
    if let Some(path) = args.json {
        let result = json!({
            "provenance": tollgate_bench::provenance::provenance(),
            "draft": draft,
            "rounds": args.rounds,
            "max_tokens": args.max_tokens,
            "load_average_before": load_before,
            "load_average_after": load(),
            "workloads": [copy_figures, prose_figures, predicted_figures],
        });
        std::fs::write(&path, serde_json::to_string_pretty(&result)?)?;
    }
    Ok(())
}

//! Classes of service on one engine with the development model, without a gateway: what
//! `priority`, `default` and `flex` traffic get from the engine when they compete.
//!
//!     cargo run --release -p tollgate-bench --bin tiers -- [--duration 30] [--json PATH]
//!
//! Phases, `--duration` seconds each, on one engine (the dev model, the engine's defaults):
//! - idle: a `priority` tenant holding `--streams` streams alone, then a `default` tenant
//!   alone sending one request at a time: each one's time to first token (TTFT) without the
//!   others;
//! - saturated: one `default` tenant holding 2×`--streams` streams: the engine's tokens/s;
//! - flex only: the same with a `flex` tenant;
//! - mixed: a `priority` and a `flex` tenant holding `--streams` streams each, and a `default`
//!   tenant sending one request at a time;
//! - the mix again on an engine that preempts a sequence at every step (`preempt_every = 1`):
//!   what preemption costs.
//!
//! Every request asks for `--max-tokens` tokens with the end tokens banned, so each is as
//! long whatever the model writes. It prints the figures and the goals beside them
//! (priority TTFT p99 ≤ 1.5× idle, default TTFT p99 ≤ 2× idle, total tokens/s in the mix ≥
//! 0.9× saturated, flex taking ≥ 80% of what priority and default leave of the saturated
//! rate, flex alone ≥ 0.95× default alone, the mix preempted at every step ≥ 0.85× the mix);
//! `--json PATH` writes them with their provenance.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use clap::Parser;
use serde_json::json;
use tollgate_runtime::engine::{Engine, EngineConfig, GenEvent, GenRequest, ServiceClass, Tenancy};
use tollgate_runtime::loader::load_dev_model;
use tollgate_runtime::sampling::SamplingParams;
use tollgate_runtime::tokenizer::ModelTokenizer;

/// tiers: priority, default and flex traffic on one engine
#[derive(Parser)]
#[command(name = "tiers", version)]
struct Args {
    /// Seconds each phase runs
    #[arg(long, default_value_t = 30)]
    duration: u64,
    /// Streams the priority and the flex tenant each hold in the mix
    #[arg(long, default_value_t = 16)]
    streams: usize,
    /// Tokens each request generates (the end tokens banned)
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Write the figures as JSON to this file
    #[arg(long, value_name = "PATH")]
    json: Option<std::path::PathBuf>,
}

/// One tenant's load in a phase: `streams` loops of requests in `class` (1 stream: one
/// request at a time).
#[derive(Clone, Copy)]
struct Load {
    name: &'static str,
    class: ServiceClass,
    streams: usize,
}

/// What one tenant got in a phase.
#[derive(Default)]
struct Got {
    ttft_ms: Vec<f64>,
    tokens: usize,
}

struct Phase {
    seconds: f64,
    tenants: Vec<(Load, Got)>,
}

impl Phase {
    fn tok_per_s(&self) -> f64 {
        self.tenants.iter().map(|(_, g)| g.tokens).sum::<usize>() as f64 / self.seconds
    }

    fn got(&self, name: &str) -> anyhow::Result<&Got> {
        self.tenants
            .iter()
            .find(|(l, _)| l.name == name)
            .map(|(_, g)| g)
            .ok_or_else(|| anyhow!("no tenant {name} in the phase"))
    }
}

/// The `q` quantile (0..=1) of `values`, nearest rank.
fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

struct Bench {
    engine: Engine,
    tokenizer: Arc<ModelTokenizer>,
    max_tokens: usize,
}

impl Bench {
    /// An engine with `config` on the development model.
    fn start(config: EngineConfig, max_tokens: usize) -> anyhow::Result<Self> {
        let loaded = load_dev_model(2048).context("run scripts/fetch-model.sh")?;
        let tokenizer = loaded.tokenizer.clone();
        Ok(Self {
            engine: Engine::start(loaded.model, loaded.tokenizer, config)?,
            tokenizer,
            max_tokens,
        })
    }

    /// A request of `load`'s tenant, its question told apart by `n` (a shared system prompt,
    /// as a product's traffic has).
    fn request(&self, load: Load, n: usize) -> anyhow::Result<GenRequest> {
        let text = format!(
            "<|im_start|>system\nYou are a helpful assistant who writes long, detailed answers.<|im_end|>\n<|im_start|>user\nTell me story number {n} about a dragon called {}.<|im_end|>\n<|im_start|>assistant\n",
            load.name
        );
        let prompt_ids = self.tokenizer.encode(&text, false)?;
        let sampling = SamplingParams {
            temperature: 0.0,
            logit_bias: self
                .tokenizer
                .stop_token_ids()
                .iter()
                .map(|&t| (t, -100.0))
                .collect(),
            ..SamplingParams::default()
        };
        let mut request = GenRequest::new(prompt_ids, self.max_tokens, sampling);
        request.tenant = Some(Tenancy {
            name: Arc::from(load.name),
            weight: 1,
            class: load.class,
        });
        Ok(request)
    }

    /// One stream of `load` until `end`: request after request; the TTFT of each and the
    /// tokens that came before `end`.
    fn stream(&self, load: Load, stream: usize, end: Instant) -> anyhow::Result<Got> {
        let mut got = Got::default();
        let mut n = stream * 1_000_000;
        while Instant::now() < end {
            n += 1;
            let sent = Instant::now();
            let mut events = self.engine.submit(self.request(load, n)?)?;
            let mut first = true;
            while let Some(event) = events.blocking_recv() {
                match event {
                    GenEvent::Admitted => {}
                    GenEvent::Delta { .. } => {
                        let now = Instant::now();
                        if now > end {
                            break;
                        }
                        if first {
                            got.ttft_ms
                                .push(now.duration_since(sent).as_secs_f64() * 1e3);
                            first = false;
                        }
                        got.tokens += 1;
                    }
                    GenEvent::Finished { .. } => break,
                    GenEvent::Failed { message } => {
                        return Err(anyhow!("generation failed: {message}"))
                    }
                }
            }
        }
        Ok(got)
    }

    /// Runs `loads` together for `seconds`.
    fn phase(&self, loads: &[Load], seconds: u64) -> anyhow::Result<Phase> {
        let start = Instant::now();
        let end = start + Duration::from_secs(seconds);
        let tenants = thread::scope(|s| {
            let handles: Vec<_> = loads
                .iter()
                .map(|&load| {
                    let streams: Vec<_> = (0..load.streams)
                        .map(|i| s.spawn(move || self.stream(load, i, end)))
                        .collect();
                    (load, streams)
                })
                .collect();
            let mut tenants = Vec::new();
            for (load, streams) in handles {
                let mut got = Got::default();
                for h in streams {
                    let one = h.join().map_err(|_| anyhow!("a stream panicked"))??;
                    got.ttft_ms.extend(one.ttft_ms);
                    got.tokens += one.tokens;
                }
                tenants.push((load, got));
            }
            anyhow::Ok(tenants)
        })?;
        Ok(Phase {
            seconds: seconds as f64,
            tenants,
        })
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bench = Bench::start(EngineConfig::default(), args.max_tokens)?;
    let (d, k) = (args.duration, args.streams);
    let load = |name, class, streams| Load {
        name,
        class,
        streams,
    };
    let run = |what: &str, loads: &[Load]| {
        eprintln!("{what} ({d} s)...");
        bench.phase(loads, d)
    };
    // A warm-up, so the first phase does not pay for first touches.
    bench.phase(&[load("warm", ServiceClass::Default, 2)], 3)?;
    let idle_priority = run("idle: priority", &[load("p", ServiceClass::Priority, k)])?;
    let idle_default = run("idle: default", &[load("d", ServiceClass::Default, 1)])?;
    let saturated = run(
        "saturated: default",
        &[load("d", ServiceClass::Default, 2 * k)],
    )?;
    let flex_only = run("flex only", &[load("f", ServiceClass::Flex, 2 * k)])?;
    let mix = [
        load("p", ServiceClass::Priority, k),
        load("f", ServiceClass::Flex, k),
        load("d", ServiceClass::Default, 1),
    ];
    let mixed = run("mixed", &mix)?;
    // The same mix with a preemption forced at every step, on an engine of its own.
    let forced = Bench::start(
        EngineConfig {
            preempt_every: 1,
            ..EngineConfig::default()
        },
        args.max_tokens,
    )?;
    eprintln!("mixed, a preemption at every step ({d} s)...");
    forced.phase(&[load("warm", ServiceClass::Default, 2)], 3)?;
    let preempted = forced.phase(&mix, d)?;

    let ratios = ratios(
        &idle_priority,
        &idle_default,
        &saturated,
        &flex_only,
        &mixed,
        &preempted,
    )?;
    let phases = [
        ("idle_priority", "idle priority", &idle_priority),
        ("idle_default", "idle default", &idle_default),
        ("saturated_default", "saturated default", &saturated),
        ("flex_only", "flex only", &flex_only),
        ("mixed", "mixed", &mixed),
        ("mixed_preempted_every_step", "mixed, preempted", &preempted),
    ];
    print_table(&phases);
    print_goals(&ratios);
    if let Some(path) = args.json {
        let result = json!({
            "provenance": tollgate_bench::provenance::provenance(),
            "duration_s": d, "streams": k, "max_tokens": args.max_tokens,
            "phases": phases.iter().map(|(key, _, p)| (key.to_string(), phase_json(p))).collect::<serde_json::Map<_, _>>(),
            "ratios": ratios,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&result)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn p99(g: &Got) -> f64 {
    quantile(&g.ttft_ms, 0.99)
}

fn p50(g: &Got) -> f64 {
    quantile(&g.ttft_ms, 0.5)
}

/// The figures the goals are about.
fn ratios(
    idle_priority: &Phase,
    idle_default: &Phase,
    saturated: &Phase,
    flex_only: &Phase,
    mixed: &Phase,
    preempted: &Phase,
) -> anyhow::Result<serde_json::Value> {
    let (mix_p, mix_d, mix_f) = (mixed.got("p")?, mixed.got("d")?, mixed.got("f")?);
    let per_s = |g: &Got| g.tokens as f64 / mixed.seconds;
    Ok(json!({
        "priority_ttft_p99_over_idle": p99(mix_p) / p99(idle_priority.got("p")?),
        "default_ttft_p99_over_idle": p99(mix_d) / p99(idle_default.got("d")?),
        "mixed_total_over_saturated": mixed.tok_per_s() / saturated.tok_per_s(),
        "flex_share_of_what_others_leave":
            per_s(mix_f) / (saturated.tok_per_s() - per_s(mix_p) - per_s(mix_d)),
        "flex_only_over_default_only": flex_only.tok_per_s() / saturated.tok_per_s(),
        "preempted_every_step_over_mixed": preempted.tok_per_s() / mixed.tok_per_s(),
    }))
}

/// Each phase's rate, and each tenant's TTFT p50 / p99, requests and rate.
fn print_table(phases: &[(&str, &str, &Phase)]) {
    println!("phase                 tok/s    TTFT p50 / p99 (ms) by tenant");
    for (_, name, phase) in phases {
        let tenants: Vec<String> = phase
            .tenants
            .iter()
            .map(|(l, g)| {
                format!(
                    "{} {}×{}: {:.0} / {:.0} ({} req, {:.1} tok/s)",
                    l.name,
                    l.class,
                    l.streams,
                    p50(g),
                    p99(g),
                    g.ttft_ms.len(),
                    g.tokens as f64 / phase.seconds
                )
            })
            .collect();
        println!(
            "{name:<20} {:>7.1}   {}",
            phase.tok_per_s(),
            tenants.join("; ")
        );
    }
}

/// The goals of issue 31 beside the figures: `(label, figure, bound, whether at most)`.
const GOALS: [(&str, &str, f64, bool); 6] = [
    (
        "priority TTFT p99 / idle",
        "priority_ttft_p99_over_idle",
        1.5,
        true,
    ),
    (
        "default TTFT p99 / idle",
        "default_ttft_p99_over_idle",
        2.0,
        true,
    ),
    (
        "mixed tok/s / saturated",
        "mixed_total_over_saturated",
        0.9,
        false,
    ),
    (
        "flex share of what others leave",
        "flex_share_of_what_others_leave",
        0.8,
        false,
    ),
    (
        "flex only / default only tok/s",
        "flex_only_over_default_only",
        0.95,
        false,
    ),
    (
        "mixed, preempted every step / mixed",
        "preempted_every_step_over_mixed",
        0.85,
        false,
    ),
];

fn print_goals(ratios: &serde_json::Value) {
    for (label, key, bound, at_most) in GOALS {
        let value = ratios[key].as_f64().unwrap_or(f64::NAN);
        let met = if at_most {
            value <= bound
        } else {
            value >= bound
        };
        let sign = if at_most { "≤" } else { "≥" };
        println!(
            "{label:<32} {value:.2} (goal {sign} {bound}) {}",
            if met { "met" } else { "NOT met" }
        );
    }
}

fn phase_json(p: &Phase) -> serde_json::Value {
    json!({
        "tok_per_s": p.tok_per_s(),
        "tenants": p.tenants.iter().map(|(l, g)| json!({
            "tenant": l.name, "class": l.class.as_str(), "streams": l.streams,
            "requests": g.ttft_ms.len(), "tokens": g.tokens,
            "ttft_p50_ms": p50(g), "ttft_p99_ms": p99(g),
        })).collect::<Vec<_>>(),
    })
}

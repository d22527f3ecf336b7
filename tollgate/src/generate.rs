//! `tollgate generate`: one prompt through the real engine, printed as it streams, then the
//! measured prefill and decode speed. The quickest way to try a model and a weight form.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use tollgate_gateway::backend::{ChatMessage, Prompt};
use tollgate_gateway::config::{BackendConfig, Config};
use tollgate_runtime::engine::{Engine, GenEvent, GenRequest};
use tollgate_runtime::model::WeightForm;
use tollgate_runtime::sampling::SamplingParams;

use crate::local::LocalBackend;
use crate::models::{engine_config, load_local};

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// The model catalogue.
    #[arg(long, default_value = "models.toml", env = "TOLLGATE_CONFIG")]
    config: PathBuf,
    /// Model id from the catalogue (default: the first one).
    #[arg(long)]
    model: Option<String>,
    /// Weight form, overriding the catalogue: auto, native, q8_0, f32, f16, bf16.
    #[arg(long)]
    weights: Option<WeightForm>,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Sampling seed, for reproducible output.
    #[arg(long)]
    seed: Option<u64>,
    /// System message for chat prompts.
    #[arg(long)]
    system: Option<String>,
    /// Send the prompt as raw text (no chat template).
    #[arg(long)]
    raw: bool,
    /// The prompt.
    prompt: String,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let config = Config::load(&args.config)
        .with_context(|| format!("cannot load {}", args.config.display()))?;
    let model = match &args.model {
        Some(id) => config
            .models
            .get(id)
            .with_context(|| format!("model `{id}` is not in {}", args.config.display()))?,
        None => config
            .models
            .values()
            .next()
            .context("the catalogue has no models")?,
    };
    let BackendConfig::Local(local) = &model.backend else {
        anyhow::bail!("model `{}` is not a local model", model.id);
    };
    let loaded = load_local(model, local, args.weights)?;
    let prompt = if args.raw {
        Prompt::Text(args.prompt.clone())
    } else {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage::new("system", system.clone()));
        }
        messages.push(ChatMessage::new("user", args.prompt.clone()));
        Prompt::Chat(messages)
    };
    let prompt_ids = LocalBackend::tokenize(&loaded.tokenizer, &loaded.template, &prompt)?;
    let weights = loaded.model.weight_form();
    let engine = Engine::start(loaded.model, loaded.tokenizer, engine_config(local))?;
    let mut events = engine.submit(GenRequest::new(
        prompt_ids.clone(),
        args.max_tokens,
        SamplingParams {
            temperature: args.temperature,
            seed: args.seed,
            ..SamplingParams::default()
        },
    ))?;

    let started = Instant::now();
    let mut first_token = None;
    let mut stdout = std::io::stdout();
    while let Some(event) = events.blocking_recv() {
        match event {
            GenEvent::Admitted => {}
            GenEvent::Delta { text, .. } => {
                first_token.get_or_insert_with(|| started.elapsed());
                write!(stdout, "{text}")?;
                stdout.flush()?;
            }
            GenEvent::Finished {
                reason,
                prompt_tokens,
                completion_tokens,
                ..
            } => {
                let total = started.elapsed();
                let ttft = first_token.unwrap_or(total);
                let decode_secs = (total - ttft).as_secs_f64();
                println!();
                eprintln!(
                    "model {} weights {:?}: finish {:?}; prompt {} tokens, prefill {:.1} tok/s (time to first token {:.0} ms); {} tokens generated, decode {:.1} tok/s",
                    model.id,
                    weights,
                    reason,
                    prompt_tokens,
                    prompt_tokens as f64 / ttft.as_secs_f64().max(1e-9),
                    ttft.as_secs_f64() * 1e3,
                    completion_tokens,
                    completion_tokens.saturating_sub(1) as f64 / decode_secs.max(1e-9),
                );
                return Ok(());
            }
            GenEvent::Failed { message } => anyhow::bail!("generation failed: {message}"),
        }
    }
    anyhow::bail!("the engine stopped before finishing")
}

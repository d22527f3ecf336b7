//! The engine on the development model: a prompt that shares a prefix with a finished one
//! starts from the prefix cache, and its greedy output is the same as without the cache.
//!
//! Fails (never skips) when the dev model is missing: run `scripts/fetch-model.sh`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::Ordering;

use tollgate_runtime::dev_model::require_dev_model;
use tollgate_runtime::engine::{Engine, EngineConfig, GenEvent, GenRequest};
use tollgate_runtime::loader::{load, LoadOptions, ModelSource};
use tollgate_runtime::model::WeightForm;
use tollgate_runtime::sampling::SamplingParams;

fn engine(prefix_cache_bytes: usize) -> (Engine, tollgate_runtime::tokenizer::ModelTokenizer) {
    let source = ModelSource::Path(require_dev_model().expect("run scripts/fetch-model.sh"));
    let options = LoadOptions {
        device: "cpu".into(),
        weights: WeightForm::Auto,
        context_length: Some(2048),
    };
    let loaded = load("dev", &source, &options).unwrap();
    let tokenizer = (*loaded.tokenizer).clone();
    let config = EngineConfig {
        prefix_cache_bytes,
        ..EngineConfig::default()
    };
    (
        Engine::start(loaded.model, loaded.tokenizer, config).unwrap(),
        tokenizer,
    )
}

/// Greedy text of `prompt_ids`, `max_tokens` at most.
fn generate(engine: &Engine, prompt_ids: &[u32], max_tokens: usize) -> String {
    let mut events = engine
        .submit(GenRequest {
            prompt_ids: prompt_ids.to_vec(),
            max_tokens,
            sampling: SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            },
            stop: Vec::new(),
            progress: None,
        })
        .unwrap();
    let mut text = String::new();
    while let Some(event) = events.blocking_recv() {
        match event {
            GenEvent::Delta { text: t, .. } => text.push_str(&t),
            GenEvent::Finished { .. } => return text,
            GenEvent::Failed { message } => panic!("generation failed: {message}"),
        }
    }
    panic!("the engine stopped without finishing the sequence");
}

#[test]
fn shared_prefixes_come_from_the_cache_with_the_same_greedy_output() {
    let (cached, tokenizer) = engine(64 << 20);
    let (uncached, _) = engine(0);
    let system =
        "<|im_start|>system\nYou are a helpful assistant who answers in one sentence.<|im_end|>\n";
    let ask = |q: &str| -> Vec<u32> {
        let text = format!("{system}<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n");
        tokenizer.encode(&text, false).unwrap()
    };
    let first = ask("What is the capital of France?");
    let second = ask("What is the capital of Italy?");
    let shared = first
        .iter()
        .zip(&second)
        .take_while(|(a, b)| a == b)
        .count();
    assert!(shared > 10, "the prompts share {shared} tokens");

    let hits = || {
        cached
            .stats()
            .prefix_hit_tokens_total
            .load(Ordering::Relaxed)
    };
    assert_eq!(
        generate(&cached, &first, 16),
        generate(&uncached, &first, 16)
    );
    assert_eq!(hits(), 0, "nothing was cached before the first prompt");
    assert!(cached.stats().prefix_cache_bytes.load(Ordering::Relaxed) > 0);

    // The shared prefix (system prompt and the start of the user turn) is reused.
    let warm = generate(&cached, &second, 16);
    assert_eq!(hits(), shared as u64);
    assert_eq!(warm, generate(&uncached, &second, 16));

    // The same prompt again: all but the last token are reused.
    let again = generate(&cached, &first, 16);
    assert_eq!(hits(), (shared + first.len() - 1) as u64);
    assert_eq!(again, generate(&uncached, &first, 16));
    assert_eq!(
        uncached
            .stats()
            .prefix_hit_tokens_total
            .load(Ordering::Relaxed),
        0
    );
}

//! The engine on the development model with a failure injected into newcomers' passes (the
//! hook exists only in this crate's unit tests).
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::mpsc::UnboundedReceiver;

use super::{Engine, EngineConfig, GenEvent, GenRequest, Tenancy};
use crate::loader::load_dev_model;
use crate::sampling::SamplingParams;
use crate::tokenizer::ModelTokenizer;

/// A newcomer of this tenant fails in the pass that would start it between the layers of a
/// step.
pub(super) const FAILING_TENANT: &str = "test:failing-pass";

/// An engine on the development model, and its KV bytes per token.
fn engine() -> (Engine, Arc<ModelTokenizer>, usize) {
    let loaded = load_dev_model(2048).unwrap();
    let per_token = loaded.model.kv_bytes_per_token();
    let config = EngineConfig {
        prefix_cache_bytes: 0,
        interleave_passes: 4,
        ..EngineConfig::default()
    };
    let tokenizer = loaded.tokenizer.clone();
    let engine = Engine::start(loaded.model, loaded.tokenizer, config).unwrap();
    (engine, tokenizer, per_token)
}

/// Greedy; with `long`, the end tokens banned so the sequence runs to `max_tokens`.
fn request(
    tokenizer: &ModelTokenizer,
    tenant: &str,
    question: &str,
    max_tokens: usize,
    long: bool,
) -> GenRequest {
    let text = format!(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    );
    let logit_bias = if long {
        tokenizer
            .stop_token_ids()
            .iter()
            .map(|&t| (t, -100.0))
            .collect()
    } else {
        Vec::new()
    };
    GenRequest {
        tenant: Some(Tenancy {
            name: Arc::from(tenant),
            weight: 1,
        }),
        ..GenRequest::new(
            tokenizer.encode(&text, false).unwrap(),
            max_tokens,
            SamplingParams {
                temperature: 0.0,
                logit_bias,
                ..SamplingParams::default()
            },
        )
    }
}

/// A sequence's text, or its failure.
fn outcome(mut events: UnboundedReceiver<GenEvent>) -> Result<String, String> {
    let mut text = String::new();
    while let Some(event) = events.blocking_recv() {
        match event {
            GenEvent::Admitted => {}
            GenEvent::Delta { text: t, .. } => text.push_str(&t),
            GenEvent::Finished { .. } => return Ok(text),
            GenEvent::Failed { message } => return Err(message),
        }
    }
    panic!("the engine stopped without ending the sequence");
}

/// While customer A's streams decode, customers B and C arrive together; B's pass fails (an
/// injected failure). B alone gets `Failed`; C's output and A's are those they have without
/// B, and B's KV reservation is freed.
#[test]
fn a_failing_newcomer_fails_alone() {
    let (engine, tokenizer, per_token) = engine();
    let story = |t: &str| {
        request(
            &tokenizer,
            t,
            "Tell me a long story about a dragon.",
            256,
            true,
        )
    };
    let question = |t: &str| request(&tokenizer, t, "What is the capital of France?", 6, false);
    let a_alone: Vec<String> = (0..4)
        .map(|_| engine.submit(story("a")).unwrap())
        .collect::<Vec<_>>()
        .into_iter()
        .map(|e| outcome(e).unwrap())
        .collect();
    let c_alone = outcome(engine.submit(question("c")).unwrap()).unwrap();
    assert_eq!(
        engine
            .stats()
            .interleaved_steps_total
            .load(Ordering::Relaxed),
        0
    );

    let decoded = engine.stats().decode_tokens_total.load(Ordering::Relaxed);
    let a: Vec<_> = (0..4).map(|_| engine.submit(story("a")).unwrap()).collect();
    // A's four decode (256 tokens each, the end banned): B and C arrive during its steps.
    while engine.stats().decode_tokens_total.load(Ordering::Relaxed) < decoded + 4 {
        std::thread::yield_now();
    }
    let b = engine.submit(question(FAILING_TENANT)).unwrap();
    let c = engine.submit(question("c")).unwrap();
    let failure = outcome(b).expect_err("B's pass was made to fail");
    assert!(failure.contains("injected"), "{failure}");
    assert_eq!(outcome(c).unwrap(), c_alone, "C, beside B");
    for (i, events) in a.into_iter().enumerate() {
        assert_eq!(outcome(events).unwrap(), a_alone[i], "A's stream {i}");
    }
    assert!(
        engine
            .stats()
            .interleaved_steps_total
            .load(Ordering::Relaxed)
            >= 1
    );

    // Nothing of B's is still reserved: with one request of R running (published before its
    // step) or none (after), the reservation is R's or nothing.
    let mut r = question("r");
    r.max_tokens = 3;
    let need_r = (r.prompt_ids.len() + r.max_tokens) * per_token;
    outcome(engine.submit(r).unwrap()).unwrap();
    let reserved = engine.stats().kv_reserved_bytes.load(Ordering::Relaxed) as usize;
    assert!(
        reserved == 0 || reserved == need_r,
        "{reserved} bytes reserved after everything ended (R needs {need_r})"
    );
}

//! Speculative decoding on the development model: with drafts (from the prompt and output, or
//! from a prediction) every output is the one without them, token for token and logprob for
//! logprob, greedy and seeded, under a grammar, with stop strings, several per prompt and
//! several in a batch; and a request that copies its prompt takes fewer forward passes.
//! Run on every kernel path (`TOLLGATE_CPU_KERNELS=scalar|avx2|avx512`).
//!
//! Fails (never skips) when the dev model is missing: run `scripts/fetch-model.sh`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "an integration test crate: its helpers, outside `#[test]` fns, are not covered by clippy.toml's allow-*-in-tests"
)]

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tollgate_runtime::constraint::{ConstraintCompiler, Grammar};
use tollgate_runtime::engine::{
    Engine, EngineConfig, GenConstraint, GenEvent, GenRequest, StopReason,
};
use tollgate_runtime::loader::load_dev_model;
use tollgate_runtime::sampling::SamplingParams;
use tollgate_runtime::tokenizer::ModelTokenizer;

/// Text the model is asked to copy: code, which it repeats nearly verbatim.
const CODE: &str = "fn fibonacci(n: u64) -> u64 {
    let mut a = 0;
    let mut b = 1;
    for _ in 0..n {
        let next = a + b;
        a = b;
        b = next;
    }
    a
}

fn main() {
    for i in 0..10 {
        println!(\"fibonacci({}) = {}\", i, fibonacci(i));
    }
}";

/// An engine on the dev model, speculating with drafts of up to `draft` tokens (0: off).
fn engine(draft: usize) -> (Engine, Arc<ModelTokenizer>) {
    let loaded = load_dev_model(2048).unwrap();
    let tokenizer = loaded.tokenizer.clone();
    let config = EngineConfig {
        speculative_draft: draft,
        ..EngineConfig::default()
    };
    (
        Engine::start(loaded.model, loaded.tokenizer, config).unwrap(),
        tokenizer,
    )
}

fn chat(tokenizer: &ModelTokenizer, question: &str) -> Vec<u32> {
    let text = format!(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    );
    tokenizer.encode(&text, false).unwrap()
}

/// Asks for a copy of the code, the answer started with its first 40 characters (the dev
/// model then copies the rest verbatim).
fn copy_prompt(tokenizer: &ModelTokenizer) -> Vec<u32> {
    let text = format!(
        "<|im_start|>user\nCopy this code:\n{CODE}<|im_end|>\n<|im_start|>assistant\n{}",
        &CODE[..40]
    );
    tokenizer.encode(&text, false).unwrap()
}

/// Logprobs equal within float tolerance (both `-inf` for a banned token).
fn close(a: f32, b: f32) -> bool {
    a == b || (a - b).abs() < 1e-4
}

/// A token's text and logprob.
type Scored = (String, f32);

/// Everything a sequence streamed back.
#[derive(Debug, PartialEq)]
struct Output {
    text: String,
    /// Each token's text, its logprob and its alternatives'.
    tokens: Vec<(Scored, Vec<Scored>)>,
    reason: StopReason,
    completion_tokens: usize,
}

/// The predictions' counts of a sequence: accepted, rejected.
type Counts = (usize, usize);

fn collect(mut events: tokio::sync::mpsc::UnboundedReceiver<GenEvent>) -> (Output, Counts) {
    let (mut text, mut tokens) = (String::new(), Vec::new());
    while let Some(event) = events.blocking_recv() {
        match event {
            GenEvent::Admitted => {}
            GenEvent::Delta {
                text: t, logprobs, ..
            } => {
                text.push_str(&t);
                tokens.extend(logprobs.into_iter().map(|l| {
                    let top = l.top.into_iter().map(|t| (t.token, t.logprob)).collect();
                    ((l.chosen.token, l.chosen.logprob), top)
                }));
            }
            GenEvent::Finished {
                reason,
                completion_tokens,
                accepted_prediction_tokens,
                rejected_prediction_tokens,
                ..
            } => {
                let out = Output {
                    text,
                    tokens,
                    reason,
                    completion_tokens,
                };
                return (
                    out,
                    (accepted_prediction_tokens, rejected_prediction_tokens),
                );
            }
            GenEvent::Failed { message } => panic!("generation failed: {message}"),
        }
    }
    panic!("the engine stopped without finishing the sequence");
}

/// Submits `requests` together (one batch) and collects their outputs, in order.
fn run(engine: &Engine, requests: &[GenRequest]) -> Vec<(Output, Counts)> {
    let events: Vec<_> = requests
        .iter()
        .map(|r| engine.submit(r.clone()).unwrap())
        .collect();
    events.into_iter().map(collect).collect()
}

fn greedy(prompt: &[u32], max_tokens: usize) -> GenRequest {
    GenRequest::new(
        prompt.to_vec(),
        max_tokens,
        SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        },
    )
}

fn seeded(prompt: &[u32], max_tokens: usize, seed: u64) -> GenRequest {
    GenRequest::new(
        prompt.to_vec(),
        max_tokens,
        SamplingParams {
            temperature: 0.7,
            top_p: 0.95,
            seed: Some(seed),
            logprobs: Some(3),
            ..SamplingParams::default()
        },
    )
}

/// Asserts that two runs streamed the same text, tokens, ends and counts, with logprobs
/// equal within float tolerance.
fn assert_same(on: &[(Output, Counts)], off: &[(Output, Counts)], what: &str) {
    assert_eq!(on.len(), off.len());
    for (i, ((a, _), (b, _))) in on.iter().zip(off).enumerate() {
        assert_eq!(a.text, b.text, "{what}, sequence {i}: text");
        assert_eq!(
            (a.reason, a.completion_tokens),
            (b.reason, b.completion_tokens),
            "{what}, sequence {i}: end"
        );
        assert_eq!(
            a.tokens.len(),
            b.tokens.len(),
            "{what}, sequence {i}: logprobs"
        );
        for ((x, x_top), (y, y_top)) in a.tokens.iter().zip(&b.tokens) {
            assert_eq!(
                x_top.len(),
                y_top.len(),
                "{what}, sequence {i}: alternatives"
            );
            for (p, q) in std::iter::once(x)
                .chain(x_top)
                .zip(std::iter::once(y).chain(y_top))
            {
                assert!(
                    p.0 == q.0 && close(p.1, q.1),
                    "{what}, sequence {i}: {p:?} {q:?}"
                );
            }
        }
    }
}

fn steps(engine: &Engine) -> u64 {
    engine.stats().steps_total.load(Ordering::Relaxed)
}

/// A greedy copy of a code block alone: the same output, drafts accepted, fewer passes.
#[test]
fn a_copying_request_gives_the_same_output_in_fewer_passes() {
    let (on, tokenizer) = engine(8);
    let (off, _) = engine(0);
    let prompt = copy_prompt(&tokenizer);
    let requests = [greedy(&prompt, 160)];
    let with = run(&on, &requests);
    let without = run(&off, &requests);
    assert_same(&with, &without, "greedy copy");
    assert!(
        with[0].0.text.contains("a = b;"),
        "the model did not copy: {:?}",
        with[0].0.text
    );
    let accepted = on
        .stats()
        .accepted_draft_tokens_total
        .load(Ordering::Relaxed);
    let drafted = on.stats().draft_tokens_total.load(Ordering::Relaxed);
    assert!(
        accepted > 0 && accepted <= drafted,
        "{accepted} of {drafted} drafted"
    );
    assert_eq!(off.stats().draft_tokens_total.load(Ordering::Relaxed), 0);
    let (s_on, s_off) = (steps(&on), steps(&off));
    println!("steps with drafts {s_on}, without {s_off}; accepted {accepted} of {drafted}");
    assert!(s_on < s_off, "{s_on} steps with drafts, {s_off} without");
    // Every pass either samples a token or keeps drafted ones: the passes saved are the
    // accepted tokens.
    assert_eq!(s_off - s_on, accepted);
}

/// Greedy and seeded requests, two seeds per prompt (n > 1), logprobs, a stop string and a
/// grammar, all in one batch (at most `speculative_max_batch` decoding, then more).
#[test]
fn a_mixed_batch_gives_the_outputs_it_has_without_drafts() {
    let (on, tokenizer) = engine(8);
    let (off, _) = engine(0);
    let copy = copy_prompt(&tokenizer);
    let story = chat(
        &tokenizer,
        "Tell me a story about a dragon who counts to ten.",
    );
    let mut stopped = greedy(&copy, 160);
    stopped.stop = vec!["b = next".into()];
    let compiler = ConstraintCompiler::new(tokenizer.clone(), 49152).unwrap();
    let grammar = Grammar::JsonSchema {
        schema: serde_json::json!({
            "type": "object",
            "properties": {"name": {"type": "string"}, "lines": {"type": "array", "items": {"type": "string"}}},
            "required": ["name", "lines"]
        }),
        param: "schema".into(),
    };
    let json = GenRequest {
        constraint: Some(GenConstraint::Now(Box::new(
            compiler.compile(&grammar).unwrap(),
        ))),
        ..seeded(
            &chat(
                &tokenizer,
                &format!("Give this code's function name and its lines as JSON:\n{CODE}"),
            ),
            96,
            3,
        )
    };
    let small = [
        seeded(&copy, 96, 1),
        seeded(&copy, 96, 2),
        stopped.clone(),
        json.clone(),
    ];
    let with = run(&on, &small);
    let without = run(&off, &small);
    assert_same(&with, &without, "a batch of four");
    assert_eq!(with[2].0.reason, StopReason::Stop, "{:?}", with[2].0.text);
    assert!(with[2].0.completion_tokens < 160, "{:?}", with[2].0.text);
    assert!(
        with[3].0.reason == StopReason::Length
            || serde_json::from_str::<serde_json::Value>(&with[3].0.text).is_ok(),
        "{}",
        with[3].0.text
    );
    assert!(
        on.stats()
            .accepted_draft_tokens_total
            .load(Ordering::Relaxed)
            > 0
    );
    let large = [
        greedy(&copy, 64),
        greedy(&story, 64),
        seeded(&copy, 64, 4),
        seeded(&story, 64, 5),
        stopped,
        json,
    ];
    assert_same(&run(&on, &large), &run(&off, &large), "a batch of six");
}

/// A prediction of the output (the output without drafts, edited in two places) is drafted:
/// the output stays the same, and its tokens are counted accepted and rejected.
#[test]
fn a_prediction_is_verified_and_counted() {
    let (on, tokenizer) = engine(8);
    let (off, _) = engine(0);
    let prompt = copy_prompt(&tokenizer);
    let plain = run(&off, &[greedy(&prompt, 120)]);
    let text = plain[0]
        .0
        .text
        .replace("fibonacci", "fib")
        .replace("next", "sum");
    let mut predicted = greedy(&prompt, 120);
    predicted.prediction = Some(tokenizer.encode(&text, false).unwrap());
    let before = steps(&on);
    let with = run(&on, &[predicted.clone()]);
    assert_same(&with, &plain, "with a prediction");
    let (accepted, rejected) = with[0].1;
    println!(
        "prediction: {accepted} accepted, {rejected} rejected; {} steps",
        steps(&on) - before
    );
    assert!(
        accepted > 0 && rejected > 0,
        "{accepted} accepted, {rejected} rejected"
    );
    assert!(accepted <= with[0].0.completion_tokens);
    assert!(steps(&on) - before < steps(&off));
    // Without speculation the prediction is ignored, and nothing is counted.
    let ignored = run(&off, &[predicted]);
    assert_same(&ignored, &plain, "a prediction without speculation");
    assert_eq!(ignored[0].1, (0, 0));
}

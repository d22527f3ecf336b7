//! The engine on the development model: a prompt that shares a prefix with a finished one
//! starts from the prefix cache, and its greedy output is the same as without the cache; a
//! constrained sequence and an unconstrained one batched together each produce what they
//! produce alone, and the constrained one is valid JSON for its schema.
//!
//! Fails (never skips) when the dev model is missing: run `scripts/fetch-model.sh`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "an integration test crate: its helpers, outside `#[test]` fns, are not covered by clippy.toml's allow-*-in-tests"
)]

use std::sync::atomic::{AtomicUsize, Ordering};

use std::sync::Arc;
use tollgate_runtime::loader::load_dev_model;

use tollgate_runtime::constraint::{ConstraintCompiler, Grammar};
use tollgate_runtime::engine::{
    Engine, EngineConfig, GenConstraint, GenEvent, GenRequest, ServiceClass, Tenancy,
};
use tollgate_runtime::sampling::SamplingParams;

type Tokenizer = Arc<tollgate_runtime::tokenizer::ModelTokenizer>;

fn engine(prefix_cache_bytes: usize) -> (Engine, Tokenizer) {
    engine_with(EngineConfig {
        prefix_cache_bytes,
        ..EngineConfig::default()
    })
}

/// The dev model on an engine with `config`.
fn engine_with(config: EngineConfig) -> (Engine, Tokenizer) {
    let (engine, tokenizer, _) = engine_and_kv(config);
    (engine, tokenizer)
}

/// [`engine_with`], and the model's KV bytes per token.
fn engine_and_kv(config: EngineConfig) -> (Engine, Tokenizer, usize) {
    let loaded = load_dev_model(2048).unwrap();
    let tokenizer = loaded.tokenizer.clone();
    let per_token = loaded.model.kv_bytes_per_token();
    (
        Engine::start(loaded.model, loaded.tokenizer, config).unwrap(),
        tokenizer,
        per_token,
    )
}

/// `request` of `tenant`; with `long`, the end tokens banned so it runs to `max_tokens`.
fn tenant_request(
    tokenizer: &Tokenizer,
    tenant: &str,
    prompt_ids: &[u32],
    max_tokens: usize,
    long: bool,
) -> GenRequest {
    let mut r = request(prompt_ids, max_tokens, None);
    r.tenant = Some(Tenancy {
        name: Arc::from(tenant),
        weight: 1,
        class: ServiceClass::Default,
    });
    if long {
        r.sampling.logit_bias = tokenizer
            .stop_token_ids()
            .iter()
            .map(|&t| (t, -100.0))
            .collect();
    }
    r
}

fn request(prompt_ids: &[u32], max_tokens: usize, constraint: Option<GenConstraint>) -> GenRequest {
    GenRequest {
        constraint,
        ..GenRequest::new(
            prompt_ids.to_vec(),
            max_tokens,
            SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            },
        )
    }
}

/// Collects one sequence's text.
fn collect(mut events: tokio::sync::mpsc::UnboundedReceiver<GenEvent>) -> String {
    let mut text = String::new();
    let mut admitted = false;
    while let Some(event) = events.blocking_recv() {
        match event {
            GenEvent::Admitted => {
                assert!(!admitted, "admitted twice");
                admitted = true;
            }
            GenEvent::Delta { text: t, .. } => {
                assert!(admitted, "a token before the sequence was admitted");
                text.push_str(&t)
            }
            GenEvent::Finished { .. } => return text,
            GenEvent::Failed { message } => panic!("generation failed: {message}"),
        }
    }
    panic!("the engine stopped without finishing the sequence");
}

/// Greedy text of `prompt_ids`, `max_tokens` at most.
fn generate(engine: &Engine, prompt_ids: &[u32], max_tokens: usize) -> String {
    collect(
        engine
            .submit(request(prompt_ids, max_tokens, None))
            .unwrap(),
    )
}

fn chat(tokenizer: &Tokenizer, question: &str) -> Vec<u32> {
    let text = format!(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    );
    tokenizer.encode(&text, false).unwrap()
}

#[test]
fn constrained_and_unconstrained_sequences_batched_keep_their_alone_outputs() {
    let (engine, tokenizer) = engine(0);
    let compiler = ConstraintCompiler::new(tokenizer.clone(), 49152).unwrap();
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
        },
        "required": ["name", "age"],
        "additionalProperties": false,
    });
    let grammar = Grammar::JsonSchema {
        schema: schema.clone(),
        param: "schema".into(),
    };
    let constrained = || {
        Some(GenConstraint::Now(Box::new(
            compiler.compile(&grammar).unwrap(),
        )))
    };
    let person = chat(&tokenizer, "Describe a baker from Lyon.");
    let france = chat(&tokenizer, "What is the capital of France?");

    let json_alone = collect(engine.submit(request(&person, 60, constrained())).unwrap());
    let free_alone = generate(&engine, &france, 30);
    let free_on_person = generate(&engine, &person, 30);
    let value: serde_json::Value = serde_json::from_str(&json_alone).unwrap();
    assert!(
        value["name"].is_string() && value["age"].is_u64(),
        "{json_alone}"
    );
    assert!(
        serde_json::from_str::<serde_json::Value>(&free_on_person).is_err(),
        "unconstrained, the model does not write this JSON: {free_on_person}"
    );

    // Submitted together, they share every step's batch, beside a long stream (the end
    // tokens banned) still running when they are done, so each is batched whatever the
    // machine's speed.
    let background = engine
        .submit(tenant_request(&tokenizer, "bg", &france, 2000, true))
        .unwrap();
    let receivers: Vec<_> = (0..6)
        .map(|i| {
            let r = if i % 2 == 0 {
                request(&person, 60, constrained())
            } else {
                request(&france, 30, None)
            };
            engine.submit(r).unwrap()
        })
        .collect();
    for (i, events) in receivers.into_iter().enumerate() {
        let want = if i % 2 == 0 { &json_alone } else { &free_alone };
        assert_eq!(&collect(events), want, "sequence {i}");
    }
    still_running(background);
}

/// Asserts that the stream `events` has not ended yet (every event so far taken), then drops it,
/// which cancels it.
fn still_running(mut events: tokio::sync::mpsc::UnboundedReceiver<GenEvent>) {
    while let Ok(event) = events.try_recv() {
        assert!(
            !matches!(event, GenEvent::Finished { .. } | GenEvent::Failed { .. }),
            "the background stream ended before the batch: {event:?}"
        );
    }
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

/// A burst from one customer does not make another wait for it: with a batch of 4 and
/// customer A's 8 long sequences (4 running, 4 waiting), customer B's short request is admitted
/// at once, beside A's four, and finishes before any of A's. First come, first served queues B
/// behind all of A's (5 of them finish first); fair queue order alone, without admitting B
/// beyond the full batch, still makes it wait for a free slot (4 finish first).
#[test]
fn a_burst_from_one_tenant_does_not_queue_another() {
    let (engine, tokenizer) = engine_with(EngineConfig {
        max_running: 4,
        prefix_cache_bytes: 0,
        ..EngineConfig::default()
    });
    let prompt = chat(&tokenizer, "Tell me a long story about a dragon.");
    // A's sequences run their 400 tokens (the end tokens banned), whatever the machine's
    // speed: none can end before B's 4 tokens unless B queued behind them.
    let submit = |tenant: &str, max_tokens: usize| {
        let r = tenant_request(&tokenizer, tenant, &prompt, max_tokens, tenant == "a");
        engine.submit(r).unwrap()
    };
    let mut a: Vec<_> = (0..8).map(|_| submit("a", 400)).collect();
    // Wait until A fills the batch (the engine admits on its next loop).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while engine.stats().running.load(Ordering::Relaxed) < 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "A's burst never filled the batch"
        );
        std::thread::yield_now();
    }
    collect(submit("b", 4));
    // B is done: not one of A's sequences may have ended before it.
    let mut a_before_b = 0;
    for events in &mut a {
        while let Ok(event) = events.try_recv() {
            if matches!(event, GenEvent::Finished { .. } | GenEvent::Failed { .. }) {
                a_before_b += 1;
            }
        }
    }
    println!("A sequences finished before B: {a_before_b} of 8");
    assert_eq!(
        a_before_b, 0,
        "B waited for {a_before_b} of A's sequences: it was queued behind A's burst"
    );
    // Dropping A's receivers cancels its streams.
}

/// Runs one sequence; returns (prompt tokens, cached tokens in `Finished`, the shared counter).
fn cached_counts(engine: &Engine, prompt_ids: &[u32]) -> (usize, usize, usize) {
    let counter = Arc::new(AtomicUsize::new(usize::MAX));
    let mut req = request(prompt_ids, 4, None);
    req.cached = Some(counter.clone());
    let mut events = engine.submit(req).unwrap();
    while let Some(event) = events.blocking_recv() {
        match event {
            GenEvent::Admitted | GenEvent::Delta { .. } => {}
            GenEvent::Finished {
                prompt_tokens,
                cached_tokens,
                ..
            } => {
                return (
                    prompt_tokens,
                    cached_tokens,
                    counter.load(Ordering::Relaxed),
                )
            }
            GenEvent::Failed { message } => panic!("generation failed: {message}"),
        }
    }
    panic!("the engine stopped without finishing the sequence");
}

#[test]
fn each_sequence_reports_the_prompt_tokens_it_took_from_the_prefix_cache() {
    let (cache_on, tokenizer) = engine(64 << 20);
    let ids = |text: &str| tokenizer.encode(text, false).unwrap();
    let first =
        ids("<|im_start|>system\nYou count sheep carefully.<|im_end|>\n<|im_start|>user\nOne?");
    let second =
        ids("<|im_start|>system\nYou count sheep carefully.<|im_end|>\n<|im_start|>user\nTwo?");
    let shared = first
        .iter()
        .zip(&second)
        .take_while(|(a, b)| a == b)
        .count();
    assert!(shared >= 4, "the prompts share {shared} tokens");
    // Cold: nothing cached; the counter is set at admission, to 0.
    assert_eq!(cached_counts(&cache_on, &first), (first.len(), 0, 0));
    // The shared prefix comes from the cache, and both reports say how much.
    assert_eq!(
        cached_counts(&cache_on, &second),
        (second.len(), shared, shared)
    );
    // The same prompt again: all but its last token.
    let n = first.len();
    assert_eq!(cached_counts(&cache_on, &first), (n, n - 1, n - 1));
    // With the cache off, never.
    let (off, _) = engine(0);
    assert_eq!(cached_counts(&off, &first), (n, 0, 0));
    assert_eq!(cached_counts(&off, &first), (n, 0, 0));
}

/// While customer A's sequences decode, customer B (nothing running) gets its first token from
/// a pass of its own, run before one of the layers of A's step (the first, when B arrived
/// between steps) instead of joining or waiting for the step, and its output is the one it has
/// alone; a new request of A's, whose customer is already running, joins A's next step as
/// before.
#[test]
fn a_newcomer_starts_between_the_layers_of_another_customers_step() {
    newcomers_beside_another_customers_steps(ServiceClass::Default, 1, 6);
}

/// As above with passes rationed to one every 1,000 steps: B's first request starts in a pass,
/// the others join A's steps, and every output is the same.
#[test]
fn rationed_passes_leave_later_newcomers_to_join_the_step() {
    newcomers_beside_another_customers_steps(ServiceClass::Default, 1_000, 1);
}

/// Beside A's work that can wait (`batch`, `flex`), the ration does not hold: each of B's
/// (`default`) requests starts in a pass of its own, and A's outputs are the same.
#[test]
fn beside_work_that_can_wait_every_newcomer_starts_in_a_pass_whatever_the_ration() {
    newcomers_beside_another_customers_steps(ServiceClass::Batch, 1_000, 6);
    newcomers_beside_another_customers_steps(ServiceClass::Flex, 1_000, 6);
}

/// A holds eight long streams of `a_class` while B sends six requests one at a time, with a
/// pass at most every `every` steps: `passes` of B's requests start in a pass of their own.
fn newcomers_beside_another_customers_steps(a_class: ServiceClass, every: u64, passes: u64) {
    let (engine, tokenizer) = engine_with(EngineConfig {
        prefix_cache_bytes: 0,
        interleave_every: every,
        ..EngineConfig::default()
    });
    let question = chat(&tokenizer, "What is the capital of France?");
    let alone = generate(&engine, &question, 6);
    assert_eq!(
        engine
            .stats()
            .interleaved_steps_total
            .load(Ordering::Relaxed),
        0,
        "an idle engine has no step to interleave with"
    );
    let story = chat(&tokenizer, "Tell me a long story about a dragon.");
    // A's streams run their 400 tokens (the end tokens banned): they are running whenever
    // B's requests arrive.
    let submit = |tenant: &str, prompt: &[u32], max_tokens: usize| {
        let long = tenant == "a" && max_tokens == 400;
        let mut r = tenant_request(&tokenizer, tenant, prompt, max_tokens, long);
        if let (Some(tenancy), "a") = (r.tenant.as_mut(), tenant) {
            tenancy.class = a_class;
        }
        engine.submit(r).unwrap()
    };
    let interleaved = || {
        engine
            .stats()
            .interleaved_steps_total
            .load(Ordering::Relaxed)
    };
    // A's eight streams with no newcomer: what they must write beside B's requests too.
    let a_alone: Vec<String> = (0..8)
        .map(|_| submit("a", &story, 400))
        .collect::<Vec<_>>()
        .into_iter()
        .map(collect)
        .collect();
    assert_eq!(interleaved(), 0, "A alone started between layers");
    let a: Vec<_> = (0..8).map(|_| submit("a", &story, 400)).collect();
    let decoded = engine.stats().decode_tokens_total.load(Ordering::Relaxed);
    while engine.stats().decode_tokens_total.load(Ordering::Relaxed) < decoded + 8 {
        std::thread::yield_now();
    }
    // A's own new request: its customer runs sequences, so it joins at a step boundary.
    collect(submit("a", &question, 2));
    assert_eq!(interleaved(), 0, "A's request was started between layers");
    // B's requests, one at a time: as many as the ration allows start in a pass of their
    // own, the others join A's steps.
    let rounds = 6;
    for _ in 0..rounds {
        assert_eq!(collect(submit("b", &question, 6)), alone);
    }
    let started = interleaved();
    println!("B's requests started between layers: {started} of {rounds}");
    assert_eq!(
        started, passes,
        "{started} of {rounds} of B's requests started between the layers of A's steps"
    );
    // A's outputs are untouched by the passes run between the layers of its steps.
    for (i, events) in a.into_iter().enumerate() {
        assert_eq!(collect(events), a_alone[i], "A's stream {i}");
    }
}

/// A newcomer is not starved by the KV budget: with the budget full of customer A's sequences
/// and more of A's waiting, customer B (nothing running, so left to the intake between the
/// layers of A's steps) takes the first KV that A's sequences free, before any of A's waiting
/// requests: it is ahead of them in the fair order, and A's waiting requests, which join at
/// step boundaries, may not take its place there.
#[test]
fn a_newcomer_takes_the_first_kv_freed_before_the_waiting_requests_of_a_running_customer() {
    let config = EngineConfig {
        prefix_cache_bytes: 0,
        ..EngineConfig::default()
    };
    let (probe, tokenizer, per_token) = engine_and_kv(config.clone());
    drop(probe);
    let story = chat(&tokenizer, "Tell me a long story about a dragon.");
    // The budget holds two of A's long sequences: A's short one and a long one run, two more
    // long ones wait, and B (as long) does not fit beside them.
    let long = 300;
    let budget = 2 * (story.len() + long) * per_token;
    let (engine, _, _) = engine_and_kv(EngineConfig {
        kv_cache_bytes: budget,
        ..config
    });
    let submit = |tenant: &str, prompt: &[u32], max_tokens: usize| {
        let r = tenant_request(&tokenizer, tenant, prompt, max_tokens, true);
        engine.submit(r).unwrap()
    };
    let short = submit("a", &story, 8);
    let running = submit("a", &story, long);
    while engine.stats().running.load(Ordering::Relaxed) < 2 {
        std::thread::yield_now();
    }
    let mut waiting: Vec<_> = (0..2).map(|_| submit("a", &story, long)).collect();
    // B needs as much KV as one of A's long sequences: it fits once A's short one has freed
    // its KV (8 steps), while A's long one still runs (300 steps); then B's reservation keeps
    // A's waiting ones out until B ends.
    let mut b = submit("b", &story, long);
    loop {
        match b.blocking_recv() {
            Some(GenEvent::Delta { .. }) => break,
            Some(GenEvent::Admitted) => {}
            other => panic!("B: {other:?}"),
        }
    }
    for (i, events) in waiting.iter_mut().enumerate() {
        assert!(
            events.try_recv().is_err(),
            "A's waiting request {i} started before B"
        );
    }
    assert!(!collect(short).is_empty());
    drop((b, running, waiting));
}

/// Customers that came and went are forgotten by the engine's waiting queue: after 300
/// distinct customers, it keeps state for the customers with requests waiting and at most
/// `max_running` recently served ones, not for everyone ever seen.
#[test]
fn the_engine_forgets_customers_that_came_and_went() {
    let (engine, tokenizer) = engine_with(EngineConfig {
        prefix_cache_bytes: 0,
        max_running: 8,
        ..EngineConfig::default()
    });
    let question = chat(&tokenizer, "Hi?");
    let mut most = 0;
    for wave in 0..30 {
        let events: Vec<_> = (0..10)
            .map(|i| {
                let name = format!("customer-{wave}-{i}");
                let r = tenant_request(&tokenizer, &name, &question, 1, false);
                engine.submit(r).unwrap()
            })
            .collect();
        for e in events {
            collect(e);
        }
        most = most.max(engine.stats().tenants_tracked.load(Ordering::Relaxed));
    }
    println!("customers tracked at most: {most} of 300 seen");
    // 8 recently served, and at most the 10 of a wave waiting.
    assert!(most <= 8 + 10, "the queue kept {most} customers of 300");
}

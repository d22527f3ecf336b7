//! The engine on the development model: a failure injected into newcomers' passes (the hook
//! exists only in this crate's unit tests), and classes of service sharing the steps.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc::UnboundedReceiver;

use super::{Engine, EngineConfig, GenEvent, GenRequest, ServiceClass, Tenancy};
use crate::loader::load_dev_model;
use crate::sampling::SamplingParams;
use crate::tokenizer::ModelTokenizer;

/// A newcomer of this tenant fails in the pass that would start it between the layers of a
/// step.
pub(super) const FAILING_TENANT: &str = "test:failing-pass";

/// An engine on the development model, and its KV bytes per token.
fn engine() -> (Engine, Arc<ModelTokenizer>, usize) {
    engine_with(EngineConfig {
        prefix_cache_bytes: 0,
        interleave_passes: 4,
        ..EngineConfig::default()
    })
}

/// [`engine`] with `config`.
fn engine_with(config: EngineConfig) -> (Engine, Arc<ModelTokenizer>, usize) {
    let loaded = load_dev_model(2048).unwrap();
    let per_token = loaded.model.kv_bytes_per_token();
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
            class: ServiceClass::Default,
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

/// A long story of `tenant`, `max_tokens` long (the end tokens banned).
fn story(tokenizer: &ModelTokenizer, tenant: &str, max_tokens: usize) -> GenRequest {
    request(
        tokenizer,
        tenant,
        "Tell me a long story about a dragon.",
        max_tokens,
        true,
    )
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
    let story = |t: &str| story(&tokenizer, t, 256);
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

/// `request` in `class`, its tokens counted in `progress`.
fn in_class(
    mut request: GenRequest,
    class: ServiceClass,
    progress: &Arc<AtomicUsize>,
) -> GenRequest {
    if let Some(tenant) = &mut request.tenant {
        tenant.class = class;
    }
    request.progress = Some(progress.clone());
    request
}

/// `n` token counters, at 0.
fn counters(n: usize) -> Vec<Arc<AtomicUsize>> {
    (0..n).map(|_| Arc::new(AtomicUsize::new(0))).collect()
}

/// What each of `counters` says now.
fn made(counters: &[Arc<AtomicUsize>]) -> Vec<usize> {
    counters.iter().map(|c| c.load(Ordering::Relaxed)).collect()
}

/// Reads `events` until `n` more tokens came.
fn read_tokens(events: &mut UnboundedReceiver<GenEvent>, n: usize) {
    let mut seen = 0;
    while seen < n {
        match events.blocking_recv() {
            Some(GenEvent::Delta { .. }) => seen += 1,
            Some(GenEvent::Admitted) => {}
            other => panic!("the stream ended early: {other:?}"),
        }
    }
}

/// A batch of two full of flex streams; two priority streams arrive. They start at once
/// (beside the full batch) and take every step's slots: from their second token on, the flex
/// streams make no token while priority runs, keep their KV, and when priority is gone go on
/// to the very output they have alone.
#[test]
fn a_higher_class_takes_the_steps_and_a_paused_lower_one_goes_on_unchanged() {
    let (engine, tokenizer, _) = engine_with(EngineConfig {
        max_running: 2,
        max_step_sequences: 2,
        prefix_cache_bytes: 0,
        ..EngineConfig::default()
    });
    let story = |t: &str, max_tokens: usize| story(&tokenizer, t, max_tokens);
    let unseen = Arc::new(AtomicUsize::new(0));
    let flex_alone = outcome(
        engine
            .submit(in_class(story("f", 200), ServiceClass::Flex, &unseen))
            .unwrap(),
    )
    .unwrap();

    let counters = counters(2);
    let flex: Vec<_> = counters
        .iter()
        .map(|c| {
            engine
                .submit(in_class(story("f", 200), ServiceClass::Flex, c))
                .unwrap()
        })
        .collect();
    let made = || made(&counters);
    while made().contains(&0) {
        std::thread::yield_now();
    }
    // Priority streams of 1,000 tokens (the end banned): they run until dropped, whatever the
    // machine's speed.
    let mut priority: Vec<_> = (0..2)
        .map(|_| {
            let r = in_class(story("p", 1000), ServiceClass::Priority, &unseen);
            engine.submit(r).unwrap()
        })
        .collect();
    for events in &mut priority {
        read_tokens(events, 2);
    }
    let paused_at = made();
    assert!(
        paused_at.iter().all(|&n| n < 200),
        "the flex streams ended ({paused_at:?} tokens) before priority ran: it waited for them"
    );
    for events in &mut priority {
        read_tokens(events, 16);
    }
    assert_eq!(
        made(),
        paused_at,
        "flex made tokens while priority held the steps"
    );
    drop(priority);
    for events in flex {
        assert_eq!(
            outcome(events).unwrap(),
            flex_alone,
            "a paused flex stream went on"
        );
    }
}

/// The KV memory fits a priority stream and one flex stream, and two flex streams run (one
/// greedy, one sampled with a seed) when the priority stream arrives: it starts at once, the
/// flex stream admitted last gives its KV back (a preemption), and when priority is gone that
/// one comes back, is fed its prompt and its tokens again, and both flex streams end with the
/// very output they have alone.
#[test]
fn a_preempted_sequence_comes_back_to_the_output_it_has_alone() {
    // The dev model's KV bytes per token, from an engine of its own.
    let (_, tokenizer, per_token) = engine();
    let story = |t: &str, max_tokens: usize| story(&tokenizer, t, max_tokens);
    let sampled = |mut r: GenRequest| {
        r.sampling.temperature = 0.8;
        r.sampling.seed = Some(7);
        r
    };
    let need = |r: &GenRequest| (r.prompt_ids.len() + r.max_tokens) * per_token;
    let (engine, _, _) = engine_with(EngineConfig {
        kv_cache_bytes: need(&story("p", 1000)) + need(&story("f", 200)),
        prefix_cache_bytes: 0,
        ..EngineConfig::default()
    });
    let unseen = Arc::new(AtomicUsize::new(0));
    let flex = |r: GenRequest, counter: &Arc<AtomicUsize>| {
        engine
            .submit(in_class(r, ServiceClass::Flex, counter))
            .unwrap()
    };
    let alone = [
        outcome(flex(story("f", 200), &unseen)).unwrap(),
        outcome(flex(sampled(story("f", 200)), &unseen)).unwrap(),
    ];

    let counters = counters(2);
    let streams = [
        flex(story("f", 200), &counters[0]),
        flex(sampled(story("f", 200)), &counters[1]),
    ];
    let made = || made(&counters);
    while made().contains(&0) {
        std::thread::yield_now();
    }
    // A priority stream of 1,000 tokens (the end banned): it runs until dropped.
    let mut priority = engine
        .submit(in_class(story("p", 1000), ServiceClass::Priority, &unseen))
        .unwrap();
    read_tokens(&mut priority, 2);
    let preemptions = || engine.stats().preemptions_total.load(Ordering::Relaxed);
    assert_eq!(preemptions(), 1, "one flex stream gave its KV back");
    let at = made();
    assert!(
        at.iter().all(|&n| n < 200),
        "the flex streams ended ({at:?} tokens) before priority started"
    );
    read_tokens(&mut priority, 16);
    let later = made();
    assert!(
        at.iter().zip(&later).any(|(a, b)| a == b),
        "both flex streams made tokens ({at:?} then {later:?}): none was preempted"
    );
    drop(priority);
    for (i, events) in streams.into_iter().enumerate() {
        assert_eq!(outcome(events).unwrap(), alone[i], "flex stream {i}");
    }
    assert_eq!(preemptions(), 1);
    assert_eq!(engine.stats().preempted.load(Ordering::Relaxed), 0);
}

/// With a preemption forced at every step, three streams (greedy, seeded sampling, a stop
/// string) take turns losing their caches and being fed again, from the prefix cache (which
/// keeps a preempted sequence's KV while it has room) and without it: each ends with the very
/// output it has alone.
#[test]
fn preempted_at_every_step_each_stream_keeps_its_alone_output() {
    for prefix_cache_bytes in [64 << 20, 0] {
        let (engine, tokenizer, _) = engine_with(EngineConfig {
            prefix_cache_bytes,
            ..EngineConfig::default()
        });
        let (forced, _, _) = engine_with(EngineConfig {
            prefix_cache_bytes,
            preempt_every: 1,
            ..EngineConfig::default()
        });
        let requests = || {
            let story = |t: &str| story(&tokenizer, t, 48);
            let mut sampled = story("s");
            sampled.sampling.temperature = 0.8;
            sampled.sampling.seed = Some(11);
            let mut stopped = story("t");
            stopped.stop = vec!["dragon".into()];
            [story("g"), sampled, stopped]
        };
        let run = |engine: &Engine| -> Vec<String> {
            let streams: Vec<_> = requests()
                .into_iter()
                .map(|r| engine.submit(r).unwrap())
                .collect();
            streams.into_iter().map(|e| outcome(e).unwrap()).collect()
        };
        let alone: Vec<String> = requests()
            .into_iter()
            .map(|r| outcome(engine.submit(r).unwrap()).unwrap())
            .collect();
        assert_eq!(
            run(&forced),
            alone,
            "prefix cache of {prefix_cache_bytes} bytes"
        );
        let preemptions = forced.stats().preemptions_total.load(Ordering::Relaxed);
        assert!(preemptions >= 20, "{preemptions} preemptions");
    }
}

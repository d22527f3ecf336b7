//! LoRA adapters applied per sequence (`runtime/src/model/lora`), on tiny random models and
//! random adapters built at test time (`common/lora_models.rs`):
//! - an adapter's greedy output is the output of the base model with the adapter merged into
//!   its f32 weights (a second file), on the candle path (`f32` weights) and on the host path
//!   (`auto` weights of sizes no kernel takes stay f32 there);
//! - sequences with adapter X, adapter Y and none, in one batch, each get exactly (bit for
//!   bit) the logits they get alone, on the host path's kernels and on the candle path; in the
//!   engine too, where the prefix cache never hands one adapter's KV to another;
//! - a malformed adapter is refused with an error naming what is wrong.
//!
//! Run it on every kernel path: `TOLLGATE_CPU_KERNELS=avx512|avx2|scalar`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "an integration test crate: its helpers, outside `#[test]` fns, are not covered by clippy.toml's allow-*-in-tests"
)]

use std::collections::HashMap;
use std::io::Cursor;
use std::sync::Arc;

use candle_core::quantized::gguf_file::Content;
use candle_core::{Device, Tensor};
use serde_json::json;
use tollgate_runtime::engine::{Engine, EngineConfig, GenEvent, GenRequest};
use tollgate_runtime::model::{LlamaModel, LoraAdapter, LoraTarget, SeqStep, WeightForm};
use tollgate_runtime::sampling::SamplingParams;
use tollgate_runtime::tokenizer::ModelTokenizer;

mod common;
#[path = "common/lora_models.rs"]
mod lora_models;

use common::{argmax, max_abs_diff, random, TempDir};
use lora_models::{
    greedy, load, max_diff, merged_file, model_file, peft_config, random_adapter, shape,
    tensor_name, write_adapter, Adapter,
};

/// Max abs logit difference between a model with an adapter and the same model with the
/// adapter merged into its weights: the same f32 products, summed in another order.
/// Observed: 2.9e-6 (candle path) and 4.3e-6 (host path); Q and K's B rows left in Hugging
/// Face's order instead give 9.0.
const MERGE_TOL: f32 = 1e-3;

/// On the candle path with f32 weights a batched row is not the same bit for bit as alone
/// even without adapters (candle's f32 matmul sums differently for another number of rows;
/// observed 4.8e-6 with no adapter at all), so there the batch is held to `runtime/tests/
/// batching.rs`'s tolerance; the host path, the engine's default, is held to identity.
const CANDLE_BATCH_TOL: f32 = 1e-4;

const ALL: [&str; 7] = LoraTarget::PEFT_NAMES;

fn prompt(text: &str) -> Vec<u32> {
    text.bytes().map(u32::from).collect()
}

/// Loads `adapter` onto `model` (written to a directory under `tmp`).
fn loaded(tmp: &TempDir, name: &str, adapter: &Adapter, model: &LlamaModel) -> LoraAdapter {
    let dir = tmp.0.join(name);
    write_adapter(&dir, &peft_config(adapter), &adapter.tensors);
    LoraAdapter::load(name, &dir, model.config(), &Device::Cpu).unwrap()
}

#[test]
fn an_adapter_gives_what_its_merged_weights_give() {
    // 48 and 80 are not multiples of 32: no kernel takes them, so `auto` keeps f32 weights on
    // the host path and the merge is exact up to summation order.
    let shape = shape(48, 80);
    let base = model_file(&shape);
    let adapter = random_adapter(&shape, 4, 8.0, &ALL, 0.2, 500);
    let merged = merged_file(&base, &shape, &adapter, true);
    let unpermuted = merged_file(&base, &shape, &adapter, false);
    let tmp = TempDir::new("lora-merge", "a");
    let p = prompt("The adapter speaks.");
    for (form, host) in [(WeightForm::F32, false), (WeightForm::Auto, true)] {
        let model = load(&base, form);
        assert_eq!(model.uses_host_path(), host, "{form}: the path under test");
        let lora = loaded(&tmp, &format!("all-{form}"), &adapter, &model);
        let (with, with_rows) = greedy(&model, Some(&lora), &p, 24, &[]);
        let (want, want_rows) = greedy(&load(&merged, form), None, &p, 24, &[]);
        let diff = max_diff(&with_rows, &want_rows);
        println!("{form}: adapter vs merged weights: max logit diff {diff:e}");
        assert!(diff < MERGE_TOL, "{form}: {diff}");
        assert_eq!(with, want, "{form}: greedy tokens");
        // Controls: the adapter changes the output, and so does B's row order in Q and K.
        let (plain, plain_rows) = greedy(&model, None, &p, 24, &[]);
        assert_ne!(plain, with, "{form}: the adapter changed nothing");
        assert!(max_diff(&plain_rows, &with_rows) > 0.5);
        let (_, wrong_rows) = greedy(&load(&unpermuted, form), None, &p, 24, &[]);
        let wrong = max_diff(&wrong_rows, &with_rows);
        println!("{form}: against Q/K rows merged unpermuted: max logit diff {wrong}");
        assert!(wrong > 100.0 * MERGE_TOL, "{form}: {wrong}");
    }
}

/// The sequences of the batch test: adapter (by index into the adapters, `None`: the base
/// model) and prompt.
fn mixed() -> Vec<(Option<usize>, Vec<u32>)> {
    vec![
        (Some(0), prompt("Hello")),
        (None, prompt("A longer prompt, prefilled.")),
        (Some(1), prompt("Third one")),
        (Some(0), prompt("A longer prompt, prefilled.")),
    ]
}

#[test]
#[expect(
    clippy::needless_range_loop,
    reason = "the step indexes every sequence's own run alone"
)]
fn adapters_mixed_in_one_batch_give_what_each_gives_alone() {
    // 64 and 128: the block-code kernels on the SIMD paths (`auto`), candle's elsewhere.
    let shape = shape(64, 128);
    let base = model_file(&shape);
    let x = random_adapter(&shape, 4, 8.0, &ALL, 0.2, 700);
    let y = random_adapter(
        &shape,
        8,
        16.0,
        &["q_proj", "v_proj", "down_proj"],
        0.1,
        900,
    );
    let tmp = TempDir::new("lora-mixed", "a");
    let steps = 12;
    for form in [WeightForm::Auto, WeightForm::F32] {
        let model = load(&base, form);
        let adapters = [
            loaded(&tmp, &format!("x-{form}"), &x, &model),
            loaded(&tmp, &format!("y-{form}"), &y, &model),
        ];
        let seqs = mixed();
        let alone: Vec<Vec<Vec<f32>>> = seqs
            .iter()
            .map(|(a, p)| greedy(&model, a.map(|i| &adapters[i]), p, steps, &[]).1)
            .collect();
        assert!(
            max_diff(&alone[1], &alone[3]) > 0.5,
            "{form}: adapter X changed nothing"
        );
        let mut caches: Vec<_> = seqs.iter().map(|_| model.new_cache()).collect();
        let mut feeds: Vec<Vec<u32>> = seqs.iter().map(|(_, p)| p.clone()).collect();
        for step in 0..steps {
            let mut batch: Vec<SeqStep<'_>> = caches
                .iter_mut()
                .zip(&feeds)
                .zip(&seqs)
                .map(|((cache, feed), (a, _))| SeqStep {
                    tokens: feed,
                    cache,
                    logits: 1,
                    adapter: a.map(|i| &adapters[i]),
                })
                .collect();
            let rows = model.forward(&mut batch).unwrap();
            drop(batch);
            for (s, row) in rows.iter().enumerate() {
                let diff = max_abs_diff(row, &alone[s][step]);
                let same = if model.uses_host_path() {
                    *row == alone[s][step]
                } else {
                    diff < CANDLE_BATCH_TOL
                };
                assert!(
                    same,
                    "{form}: sequence {s} step {step}: batched logits differ from alone by {diff}"
                );
                // The sequences follow their own tokens alone (a near-tie may not flip).
                feeds[s] = vec![argmax(&alone[s][step])];
            }
        }
    }
}

fn tokenizer(bytes: &[u8]) -> Arc<ModelTokenizer> {
    let content = Content::read(&mut Cursor::new(bytes)).unwrap();
    Arc::new(ModelTokenizer::from_gguf(&content).unwrap())
}

/// A greedy request (end tokens banned: every run makes `max_tokens`) with `adapter`.
fn request(prompt: &[u32], adapter: Option<&Arc<LoraAdapter>>) -> GenRequest {
    GenRequest {
        adapter: adapter.cloned(),
        ..GenRequest::new(
            prompt.to_vec(),
            16,
            SamplingParams {
                temperature: 0.0,
                logit_bias: vec![(256, -100.0), (257, -100.0)],
                ..SamplingParams::default()
            },
        )
    }
}

/// The text of a finished sequence and its prompt tokens taken from the prefix cache.
fn finish(mut events: tokio::sync::mpsc::UnboundedReceiver<GenEvent>) -> (String, usize) {
    let mut text = String::new();
    while let Some(event) = events.blocking_recv() {
        match event {
            GenEvent::Delta { text: t, .. } => text.push_str(&t),
            GenEvent::Finished { cached_tokens, .. } => return (text, cached_tokens),
            GenEvent::Failed { message } => panic!("sequence failed: {message}"),
            GenEvent::Admitted => {}
        }
    }
    panic!("the stream ended without Finished")
}

fn run(engine: &Engine, prompt: &[u32], adapter: Option<&Arc<LoraAdapter>>) -> (String, usize) {
    finish(engine.submit(request(prompt, adapter)).unwrap())
}

#[test]
fn the_engine_batches_adapters_and_keys_its_prefix_cache_by_adapter() {
    let shape = shape(64, 128);
    let base = model_file(&shape);
    let tmp = TempDir::new("lora-engine", "a");
    let model = load(&base, WeightForm::Auto);
    let x = Arc::new(loaded(
        &tmp,
        "x",
        &random_adapter(&shape, 4, 8.0, &ALL, 0.2, 1100),
        &model,
    ));
    let y = Arc::new(loaded(
        &tmp,
        "y",
        &random_adapter(&shape, 8, 8.0, &ALL, 0.2, 1300),
        &model,
    ));
    let fresh = || {
        Engine::start(
            load(&base, WeightForm::Auto),
            tokenizer(&base),
            EngineConfig::default(),
        )
        .unwrap()
    };
    let p = prompt("A system prompt that several requests share, then a question?");
    let alone: Vec<String> = [None, Some(&x), Some(&y)]
        .into_iter()
        .map(|a| run(&fresh(), &p, a).0)
        .collect();
    assert_ne!(alone[0], alone[1], "adapter X changed nothing");
    assert_ne!(alone[1], alone[2], "adapters X and Y answer alike");

    // The base model's prompt is cached first: X must not start from its KV.
    let engine = fresh();
    assert_eq!(run(&engine, &p, None), (alone[0].clone(), 0));
    let (text, cached) = run(&engine, &p, Some(&x));
    assert_eq!(cached, 0, "X reused KV computed without it");
    assert_eq!(text, alone[1]);
    // Each adapter's own entry is reused, and gives the same output.
    let (text, cached) = run(&engine, &p, Some(&x));
    assert!(cached > 0, "X's own cached prompt was not reused");
    assert_eq!(text, alone[1]);
    assert!(
        run(&engine, &p, Some(&y)).1 == 0,
        "Y reused another adapter's KV"
    );
    let (text, cached) = run(&engine, &p, None);
    assert!(cached > 0);
    assert_eq!(text, alone[0]);

    // All three at once, in the same steps.
    let subs: Vec<_> = [None, Some(&x), Some(&y)]
        .into_iter()
        .map(|a| engine.submit(request(&p, a)).unwrap())
        .collect();
    let together: Vec<String> = subs.into_iter().map(|e| finish(e).0).collect();
    assert_eq!(together, alone);
}

/// One malformed adapter: what is changed from a good one, and what the error must say.
struct Bad {
    what: &'static str,
    config: serde_json::Value,
    tensors: HashMap<String, Tensor>,
    says: &'static str,
}

fn bad_cases(good: &Adapter) -> Vec<Bad> {
    let config = peft_config(good);
    let with = |name: String, t: Tensor| {
        let mut ts = good.tensors.clone();
        ts.insert(name, t);
        ts
    };
    let without = |name: String| {
        let mut ts = good.tensors.clone();
        ts.remove(&name);
        ts
    };
    let mut unknown = config.clone();
    unknown["target_modules"] = json!(["q_proj", "v_proj", "lm_head"]);
    let mut rank = config.clone();
    rank["r"] = json!(8);
    let mut narrow = config.clone();
    narrow["target_modules"] = json!(["q_proj"]);
    let mut dora = config.clone();
    dora["use_dora"] = json!(true);
    vec![
        Bad {
            what: "A of the wrong width",
            config: config.clone(),
            tensors: with(tensor_name(0, "q_proj", "A"), random(4, 47, 0.1, 1)),
            says: "tensor `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` is [4, 47]; the base model's q_proj needs [4, 48]",
        },
        Bad {
            what: "B of the wrong height",
            config: config.clone(),
            tensors: with(tensor_name(1, "v_proj", "B"), random(48, 4, 0.1, 1)),
            says: "v_proj.lora_B.weight` is [48, 4]; the base model's v_proj needs [24, 4]",
        },
        Bad {
            what: "an unknown module in target_modules",
            config: unknown,
            tensors: good.tensors.clone(),
            says: "unknown target module `lm_head`",
        },
        Bad {
            what: "a tensor of an unknown module",
            config: config.clone(),
            tensors: with(
                "base_model.model.model.layers.0.mlp.foo_proj.lora_A.weight".into(),
                random(4, 48, 0.1, 1),
            ),
            says: "unknown target module `foo_proj`",
        },
        Bad {
            what: "rank unlike r",
            config: rank,
            tensors: good.tensors.clone(),
            says: "has rank 4 but adapter_config.json says r = 8",
        },
        Bad {
            what: "a module outside target_modules",
            config: narrow,
            tensors: good.tensors.clone(),
            says: "`v_proj` is not in target_modules",
        },
        Bad {
            what: "B missing",
            config: config.clone(),
            tensors: without(tensor_name(1, "q_proj", "B")),
            says: "layer 1 q_proj: lora_B.weight is missing",
        },
        Bad {
            what: "a layer the model lacks",
            config: config.clone(),
            tensors: with(tensor_name(2, "q_proj", "A"), random(4, 48, 0.1, 1)),
            says: "the base model has 2 layers",
        },
        Bad {
            what: "DoRA",
            config: dora,
            tensors: good.tensors.clone(),
            says: "use_dora (DoRA) is not supported",
        },
    ]
}

#[test]
fn malformed_adapters_are_refused_naming_the_problem() {
    let shape = shape(48, 80);
    let model = load(&model_file(&shape), WeightForm::F32);
    let good = random_adapter(&shape, 4, 8.0, &["q_proj", "v_proj"], 0.2, 40);
    let tmp = TempDir::new("lora-bad", "a");
    // The good one loads (so each case fails for its own change).
    let ok = loaded(&tmp, "good", &good, &model);
    assert_eq!(ok.targets().len(), 2);
    for (i, case) in bad_cases(&good).into_iter().enumerate() {
        let dir = tmp.0.join(format!("bad{i}"));
        write_adapter(&dir, &case.config, &case.tensors);
        let err = LoraAdapter::load("bad", &dir, model.config(), &Device::Cpu)
            .expect_err(case.what)
            .to_string();
        assert!(err.contains(case.says), "{}: {err}", case.what);
        assert!(
            err.contains("`bad`"),
            "{}: the error names the adapter: {err}",
            case.what
        );
    }
    // No weights file.
    let dir = tmp.0.join("empty");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("adapter_config.json"),
        peft_config(&good).to_string(),
    )
    .unwrap();
    let err = LoraAdapter::load("empty", &dir, model.config(), &Device::Cpu).unwrap_err();
    assert!(
        err.to_string().contains("adapter_model.safetensors"),
        "{err}"
    );
    // An adapter of one model is refused by a model of another shape: by its forward pass,
    // and by its engine before the request joins a step.
    let other_file = model_file(&lora_models::shape(64, 128));
    let other = load(&other_file, WeightForm::F32);
    let mut cache = other.new_cache();
    let err = other
        .forward(&mut [SeqStep {
            tokens: &[1, 2, 3],
            cache: &mut cache,
            logits: 1,
            adapter: Some(&ok),
        }])
        .unwrap_err();
    assert!(err.to_string().contains("another shape"), "{err}");
    let engine = Engine::start(other, tokenizer(&other_file), EngineConfig::default()).unwrap();
    let err = engine
        .submit(request(&[1, 2, 3], Some(&Arc::new(ok))))
        .unwrap_err();
    assert!(err.to_string().contains("another shape"), "{err}");
}

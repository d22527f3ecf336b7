//! A ragged batch equals its sequences run alone, and chunked prefill equals one prefill, on
//! the development model (SmolLM2-135M-Instruct Q4_1), on the candle path and on the host
//! forward pass (`Q8_0` weights). They fail (never skip) when the dev model is missing: run
//! `scripts/fetch-model.sh`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "an integration test crate: its helpers, outside `#[test]` fns, are not covered by clippy.toml's allow-*-in-tests"
)]

use tollgate_runtime::model::{SeqStep, WeightForm};

mod common;
use common::{argmax, load, max_abs_diff, prompt, step};

/// Max abs logit difference allowed between the same sequence run alone and inside a ragged
/// batch / in prefill chunks. Observed: 0 (bit-identical) for both on the dev machine: each row
/// of a quantized matmul is computed independently, and the attention of a sequence only
/// sees its own rows.
const BATCH_TOL: f32 = 1e-4;

#[test]
fn ragged_batch_matches_sequences_alone() {
    ragged_batch_matches_sequences_alone_in(WeightForm::Native);
}

/// Q8_0 runs the host forward pass (own attention over the host KV cache, int8 kernel).
#[test]
fn ragged_batch_matches_sequences_alone_on_the_host_path() {
    ragged_batch_matches_sequences_alone_in(WeightForm::Q8_0);
}

fn ragged_batch_matches_sequences_alone_in(form: WeightForm) {
    let model = load(form);
    let a_prompt = prompt(20, 1);
    let b_prompt = prompt(5, 2);
    let c_prompt = prompt(12, 3);
    let (b_next, c_next) = (4242u32, 31_337u32);

    // Alone.
    let a_alone = step(&model, &mut model.new_cache(), &a_prompt);
    let mut b_cache = model.new_cache();
    step(&model, &mut b_cache, &b_prompt);
    let b_alone = step(&model, &mut b_cache, &[b_next]);
    let mut c_cache = model.new_cache();
    step(&model, &mut c_cache, &c_prompt);
    let c_alone = step(&model, &mut c_cache, &[c_next]);

    // Together: B and C prefilled earlier (each on its own), then one ragged step in which A
    // prefills 20 tokens while B decodes at position 5 and C at position 12.
    let mut a_cache = model.new_cache();
    let mut b_cache = model.new_cache();
    let mut c_cache = model.new_cache();
    step(&model, &mut b_cache, &b_prompt);
    step(&model, &mut c_cache, &c_prompt);
    let out = model
        .forward(&mut [
            SeqStep {
                tokens: &a_prompt,
                cache: &mut a_cache,
                logits: 1,
                adapter: None,
            },
            SeqStep {
                tokens: &[b_next],
                cache: &mut b_cache,
                logits: 1,
                adapter: None,
            },
            SeqStep {
                tokens: &[c_next],
                cache: &mut c_cache,
                logits: 1,
                adapter: None,
            },
        ])
        .unwrap();
    assert_eq!(out.len(), 3);
    assert_eq!((a_cache.len(), b_cache.len(), c_cache.len()), (20, 6, 13));
    for (name, batched, alone) in [
        ("A", &out[0], &a_alone),
        ("B", &out[1], &b_alone),
        ("C", &out[2], &c_alone),
    ] {
        let d = max_abs_diff(batched, alone);
        println!("{form}: ragged batch, sequence {name}: max |diff| = {d:e}");
        assert!(
            d < BATCH_TOL,
            "sequence {name}: batched vs alone max |diff| {d} >= {BATCH_TOL}"
        );
        assert_eq!(
            argmax(batched),
            argmax(alone),
            "sequence {name}: argmax differs"
        );
    }
}

#[test]
fn chunked_prefill_matches_single_prefill() {
    chunked_prefill_matches_single_prefill_in(WeightForm::Native);
}

#[test]
fn chunked_prefill_matches_single_prefill_on_the_host_path() {
    chunked_prefill_matches_single_prefill_in(WeightForm::Q8_0);
}

fn chunked_prefill_matches_single_prefill_in(form: WeightForm) {
    let model = load(form);
    let tokens = prompt(40, 4);
    let whole = step(&model, &mut model.new_cache(), &tokens);

    let mut cache = model.new_cache();
    for (range, last) in [(0..16, false), (16..32, false), (32..40, true)] {
        let out = model
            .forward(&mut [SeqStep {
                tokens: &tokens[range.clone()],
                cache: &mut cache,
                logits: usize::from(last),
                adapter: None,
            }])
            .unwrap();
        assert_eq!(cache.len(), range.end);
        if !last {
            assert!(out.is_empty(), "logits returned without asking");
            continue;
        }
        assert_eq!(out.len(), 1);
        let d = max_abs_diff(&out[0], &whole);
        println!("{form}: chunked prefill 16+16+8 vs 40: max |diff| = {d:e}");
        assert!(
            d < BATCH_TOL,
            "chunked vs single prefill max |diff| {d} >= {BATCH_TOL}"
        );
        assert_eq!(argmax(&out[0]), argmax(&whole));
    }
    assert_eq!(cache.len(), 40);
}

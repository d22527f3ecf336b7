//! GGUF LoRA adapters (`runtime/src/model/lora/gguf.rs`), as llama.cpp's converter writes
//! them, on tiny random models and random adapters built at test time
//! (`common/lora_models.rs`):
//! - a GGUF adapter's greedy output is the output of the base model with the adapter merged
//!   into its f32 weights, on the candle path (`f32`) and the host path (`auto`), for f32, f16
//!   and bf16 files, and the same adapter as a PEFT directory gives the very same logits;
//! - on the tiny `llama` model of `architectures.rs`, Tollgate's greedy tokens (f32 weights)
//!   with each adapter equal llama.cpp's `--lora` on the same files, recorded in
//!   `fixtures/llama_cpp_lora_greedy.json` by `scripts/llama-cpp-greedy.py --lora` (each
//!   file's fingerprint there must match the file built here); the same adapter on the model
//!   loaded from safetensors (Hugging Face's Q/K row order) gives the same tokens;
//! - a GGUF file that is not a LoRA adapter, or one Tollgate cannot apply, is refused with an
//!   error naming the adapter and the problem.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "an integration test crate: its helpers, outside `#[test]` fns, are not covered by clippy.toml's allow-*-in-tests"
)]

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use tollgate_runtime::model::{LlamaModel, LoraAdapter, LoraTarget, WeightForm};
use tollgate_runtime::synth::LlamaShape;

#[path = "common/arch_models.rs"]
#[allow(dead_code, reason = "this test uses the `llama` model only")]
mod arch_models;
#[path = "common/arch_reference.rs"]
#[allow(dead_code, reason = "this test uses the loaders only")]
mod arch_reference;
mod common;
#[path = "common/lora_models.rs"]
mod lora_models;

use arch_models::{fingerprint, Kind};
use common::{random, TempDir};
use lora_models::{
    gguf_adapter, greedy, llama_cpp_adapters, load, max_diff, merged_file, model_file, peft_config,
    random_adapter, rounded, shape, write_adapter, Adapter,
};

/// As `lora.rs`'s: an adapter against its merged weights, the same f32 products summed in
/// another order.
const MERGE_TOL: f32 = 1e-3;

const ALL: [&str; 7] = LoraTarget::PEFT_NAMES;

/// Writes `bytes` as `<name>.gguf` under `tmp` and loads it onto `model`.
fn load_gguf(tmp: &TempDir, name: &str, bytes: &[u8], model: &LlamaModel) -> LoraAdapter {
    try_gguf(tmp, name, bytes, model).unwrap()
}

fn try_gguf(
    tmp: &TempDir,
    name: &str,
    bytes: &[u8],
    model: &LlamaModel,
) -> tollgate_runtime::Result<LoraAdapter> {
    let path = tmp.0.join(format!("{name}.gguf"));
    std::fs::write(&path, bytes).unwrap();
    LoraAdapter::load(name, &path, model.config(), &Device::Cpu)
}

fn prompt(text: &str) -> Vec<u32> {
    text.bytes().map(u32::from).collect()
}

#[test]
fn a_gguf_adapter_gives_what_its_merged_weights_and_its_peft_twin_give() {
    // As in `lora.rs`: 48 and 80 keep f32 weights on the host path under `auto`.
    let shape = shape(48, 80);
    let base = model_file(&shape);
    let adapter = random_adapter(&shape, 4, 8.0, &ALL, 0.2, 500);
    let tmp = TempDir::new("lora-gguf-merge", "a");
    let p = prompt("The adapter speaks.");
    for (dtype, held_as) in [
        (GgmlDType::F32, DType::F32),
        (GgmlDType::F16, DType::F16),
        (GgmlDType::BF16, DType::BF16),
    ] {
        // What the file holds: for f16 and bf16, the adapter rounded.
        let held = rounded(&adapter, held_as);
        let merged = merged_file(&base, &shape, &held, true);
        let file = gguf_adapter(&shape, &adapter, 8.0, dtype, &[], &[]);
        for (form, host) in [(WeightForm::F32, false), (WeightForm::Auto, true)] {
            let model = load(&base, form);
            assert_eq!(model.uses_host_path(), host, "{form}: the path under test");
            let lora = load_gguf(&tmp, &format!("{dtype:?}-{form}"), &file, &model);
            assert_eq!((lora.rank(), lora.scale()), (4, 2.0));
            let (with, with_rows) = greedy(&model, Some(&lora), &p, 24, &[]);
            let (want, want_rows) = greedy(&load(&merged, form), None, &p, 24, &[]);
            let diff = max_diff(&with_rows, &want_rows);
            println!("{dtype:?} {form}: GGUF adapter vs merged weights: max logit diff {diff:e}");
            assert!(diff < MERGE_TOL, "{dtype:?} {form}: {diff}");
            assert_eq!(with, want, "{dtype:?} {form}: greedy tokens");
            let (plain, plain_rows) = greedy(&model, None, &p, 24, &[]);
            assert_ne!(plain, with, "{form}: the adapter changed nothing");
            assert!(max_diff(&plain_rows, &with_rows) > 0.5);
            // The same (rounded) adapter as PEFT files: the very same logits.
            let dir = tmp.0.join(format!("peft-{dtype:?}-{form}"));
            write_adapter(&dir, &peft_config(&held), &held.tensors);
            let peft = LoraAdapter::load("peft", &dir, model.config(), &Device::Cpu).unwrap();
            let (_, peft_rows) = greedy(&model, Some(&peft), &p, 24, &[]);
            assert!(
                peft_rows == with_rows,
                "{dtype:?} {form}: PEFT and GGUF differ"
            );
        }
    }
}

#[test]
fn alpha_zero_means_scale_one_as_in_llama_cpp() {
    let shape = shape(48, 80);
    let base = model_file(&shape);
    let model = load(&base, WeightForm::F32);
    let tmp = TempDir::new("lora-gguf-alpha", "a");
    let adapter = random_adapter(&shape, 4, 4.0, &["q_proj", "v_proj"], 0.3, 900);
    let p = prompt("Alpha zero.");
    let no_alpha = gguf_adapter(&shape, &adapter, 0.0, GgmlDType::F32, &[], &[]);
    let zero = load_gguf(&tmp, "zero", &no_alpha, &model);
    assert_eq!(zero.scale(), 1.0);
    // PEFT's alpha = r is a scale of 1 too.
    let dir = tmp.0.join("peft");
    write_adapter(&dir, &peft_config(&adapter), &adapter.tensors);
    let peft = LoraAdapter::load("peft", &dir, model.config(), &Device::Cpu).unwrap();
    assert!(greedy(&model, Some(&zero), &p, 8, &[]).1 == greedy(&model, Some(&peft), &p, 8, &[]).1);
}

/// One recorded run: prompt and greedy tokens.
type Run = (Vec<u32>, Vec<u32>);

/// The recorded llama.cpp runs: base and adapter fingerprints, banned end tokens, and per
/// adapter its runs (prompt, tokens).
struct Recorded {
    base: String,
    banned: Vec<u32>,
    adapters: Vec<(String, String, Vec<Run>)>,
}

fn recorded() -> Recorded {
    let text = include_str!("fixtures/llama_cpp_lora_greedy.json");
    let f: serde_json::Value = serde_json::from_str(text).unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect()
    };
    let adapters = f["adapters"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, a)| {
            let runs = a["runs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| (ids(&r["prompt"]), ids(&r["tokens"])))
                .collect();
            (
                name.clone(),
                a["fingerprint"].as_str().unwrap().into(),
                runs,
            )
        })
        .collect();
    Recorded {
        base: f["base"]["fingerprint"].as_str().unwrap().into(),
        banned: ids(&f["banned_end_tokens"]),
        adapters,
    }
}

/// f32 weights, each adapter: greedy tokens identical to llama.cpp's `--lora` on every prompt,
/// and the adapter changes them (so the comparison is of the adapter's arithmetic).
#[test]
fn greedy_tokens_with_a_gguf_lora_match_llama_cpp() {
    let cpp = recorded();
    let model = arch_models::build(Kind::Llama);
    assert_eq!(
        cpp.base,
        fingerprint(&model.gguf),
        "the base file differs from the one llama.cpp ran (rerun scripts/llama-cpp-greedy.py --lora)"
    );
    let tollgate = arch_reference::load(&model.gguf, WeightForm::F32);
    let from_hf = arch_reference::load_hf_dir(&model);
    assert!(!from_hf.config().rope_interleaved);
    let shape = shape(arch_models::HIDDEN, arch_models::FFN);
    let tmp = TempDir::new("lora-gguf-cpp", "a");
    let built = llama_cpp_adapters();
    assert_eq!(built.len(), cpp.adapters.len());
    for (name, adapter, alpha) in &built {
        let (_, print, runs) = cpp
            .adapters
            .iter()
            .find(|(n, _, _)| n == name)
            .unwrap_or_else(|| panic!("{name}: not in the fixture"));
        let bytes = gguf_adapter(&shape, adapter, *alpha, GgmlDType::F32, &[], &[]);
        assert_eq!(
            &fingerprint(&bytes),
            print,
            "{name}: not the file llama.cpp ran"
        );
        let lora = load_gguf(&tmp, name, &bytes, &tollgate);
        let hf_lora = load_gguf(&tmp, &format!("{name}-hf"), &bytes, &from_hf);
        let mut changed = false;
        for (prompt, tokens) in runs {
            let (ours, _) = greedy(&tollgate, Some(&lora), prompt, tokens.len(), &cpp.banned);
            assert_eq!(
                &ours,
                tokens,
                "{name}: after {} prompt tokens",
                prompt.len()
            );
            let (hf, _) = greedy(&from_hf, Some(&hf_lora), prompt, tokens.len(), &cpp.banned);
            assert_eq!(&hf, tokens, "{name} on the safetensors base");
            let (plain, _) = greedy(&tollgate, None, prompt, tokens.len(), &cpp.banned);
            changed |= &plain != tokens;
        }
        assert!(changed, "{name}: the adapter changed no tokens");
    }
}

/// One malformed GGUF adapter: the file, and what the error must say.
struct Bad {
    what: &'static str,
    file: Vec<u8>,
    says: &'static str,
}

fn bad_cases(shape: &LlamaShape, good: &Adapter, base: &[u8]) -> Vec<Bad> {
    let f = |md: &[(&str, Value)], ts: &[(&str, Option<&Tensor>)]| {
        gguf_adapter(shape, good, 8.0, GgmlDType::F32, md, ts)
    };
    let s = |v: &str| Value::String(v.into());
    let (wide, short, rank8) = (
        random(4, 47, 0.1, 1),
        random(24, 4, 0.1, 1),
        random(48, 8, 0.1, 1),
    );
    let (norm, a) = (random(1, 48, 0.1, 1), random(4, 48, 0.1, 1));
    let tokens = Value::Array(vec![Value::U32(5)]);
    vec![
        Bad {
            what: "a model file",
            file: base.to_vec(),
            says: "no general.type: it is not a LoRA adapter",
        },
        Bad {
            what: "general.type model",
            file: f(&[("general.type", s("model"))], &[]),
            says: "general.type is `model`, not `adapter`",
        },
        Bad {
            what: "a control vector",
            file: f(&[("adapter.type", s("control_vector"))], &[]),
            says: "adapter.type is `control_vector`, not `lora`",
        },
        Bad {
            what: "another architecture",
            file: f(&[("general.architecture", s("qwen2"))], &[]),
            says: "the adapter is for a `qwen2` model; the base model is `llama`",
        },
        Bad {
            what: "activated LoRA",
            file: f(&[("adapter.alora.invocation_tokens", tokens)], &[]),
            says: "adapter.alora.invocation_tokens: activated LoRA",
        },
        Bad {
            what: "alpha of another type",
            file: f(&[("adapter.lora.alpha", s("8"))], &[]),
            says: "adapter.lora.alpha is",
        },
        Bad {
            what: "A of the wrong width",
            file: f(&[], &[("blk.0.attn_q.weight.lora_a", Some(&wide))]),
            says: "tensor `blk.0.attn_q.weight.lora_a` is [4, 47]; the base model's attn_q needs [4, 48]",
        },
        Bad {
            what: "B of the wrong height",
            file: f(&[], &[("blk.1.attn_q.weight.lora_b", Some(&short))]),
            says: "tensor `blk.1.attn_q.weight.lora_b` is [24, 4]; the base model's attn_q needs [48, 4]",
        },
        Bad {
            what: "B of another rank than A",
            file: f(&[], &[("blk.1.attn_q.weight.lora_b", Some(&rank8))]),
            says: "is [48, 8]; the base model's attn_q needs [48, 4]",
        },
        Bad {
            what: "B missing",
            file: f(&[], &[("blk.1.attn_q.weight.lora_b", None)]),
            says: "blk.1.attn_q.weight.lora_b is missing",
        },
        Bad {
            what: "a norm vector",
            file: f(&[], &[("blk.0.attn_norm.weight", Some(&norm))]),
            says: "`blk.0.attn_norm.weight` replaces a norm vector",
        },
        Bad {
            what: "the embedding",
            file: f(&[], &[("token_embd.weight.lora_a", Some(&a))]),
            says: "`token_embd.weight` is not a projection adapters may change",
        },
        Bad {
            what: "a layer the model lacks",
            file: f(&[], &[("blk.2.attn_q.weight.lora_a", Some(&a))]),
            says: "the base model has 2 layers",
        },
        Bad {
            what: "no tensors",
            file: f(
                &[],
                &[
                    ("blk.0.attn_q.weight.lora_a", None),
                    ("blk.0.attn_q.weight.lora_b", None),
                    ("blk.1.attn_q.weight.lora_a", None),
                    ("blk.1.attn_q.weight.lora_b", None),
                ],
            ),
            says: "holds no LoRA tensors",
        },
        Bad {
            what: "not a GGUF file",
            file: b"{\"r\": 4}".to_vec(),
            says: "not a GGUF file",
        },
    ]
}

#[test]
fn malformed_gguf_adapters_are_refused_naming_the_problem() {
    let shape = shape(48, 80);
    let base = model_file(&shape);
    let model = load(&base, WeightForm::F32);
    let good = random_adapter(&shape, 4, 8.0, &["q_proj"], 0.2, 40);
    let tmp = TempDir::new("lora-gguf-bad", "a");
    // The good one loads (so each case fails for its own change).
    let ok = gguf_adapter(&shape, &good, 8.0, GgmlDType::F32, &[], &[]);
    assert_eq!(
        load_gguf(&tmp, "good", &ok, &model).targets(),
        [LoraTarget::Q]
    );
    for case in bad_cases(&shape, &good, &base) {
        let err = try_gguf(&tmp, "bad", &case.file, &model)
            .expect_err(case.what)
            .to_string();
        assert!(err.contains(case.says), "{}: {err}", case.what);
        assert!(
            err.contains("`bad`"),
            "{}: the error names the adapter: {err}",
            case.what
        );
    }
    // A model of another shape refuses it at load.
    let other = load(&model_file(&lora_models::shape(64, 128)), WeightForm::F32);
    let err = try_gguf(&tmp, "other", &ok, &other)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("the base model's attn_q needs [4, 64]"),
        "{err}"
    );
}

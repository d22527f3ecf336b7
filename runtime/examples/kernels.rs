//! Kernel and forward-pass speed on this machine, to tell the runtime's own overhead from
//! candle's kernels:
//!
//! 1. GFLOP/s of one `(rows, 576) x (576, 1536)` projection (the dev model's FFN shape) for
//!    each weight form and several row counts;
//! 2. batch-1 decode tok/s of Tollgate's forward pass against candle-transformers'
//!    `quantized_llama` on the same GGUF with native weights, then per weight form the total
//!    decode tok/s of 1, 4, 8 and 16 sequences stepping together and the prefill tok/s of a
//!    256-token prompt.
//!
//! `cargo run --release -p tollgate-runtime --example kernels [-- [--quick] [path/to/model.gguf]]`
//! (`--quick`: only Tollgate's int8 forms, Q8_0 and Auto).

use std::fs::File;
use std::io::BufReader;
use std::time::Instant;

use anyhow::Context;
use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use tollgate_runtime::dev_model::require_dev_model;
use tollgate_runtime::model::{KvCache, LlamaModel, SeqStep, WeightForm};

const DECODE_STEPS: usize = 32;
/// KV lengths at which decode speed is measured.
const CONTEXTS: [usize; 4] = [16, 128, 512, 2048];
/// Sequences decoding together.
const BATCHES: [usize; 4] = [1, 4, 8, 16];
/// Prompt tokens for the prefill figure.
const PREFILL: usize = 256;

/// Runs `prompt` into `cache` in chunks of 256 tokens.
fn prefill(model: &LlamaModel, prompt: &[u32], cache: &mut KvCache) -> anyhow::Result<()> {
    for chunk in prompt.chunks(256) {
        model.forward(&mut [SeqStep {
            tokens: chunk,
            cache: &mut *cache,
            logits: 1,
            adapter: None,
        }])?;
    }
    Ok(())
}

fn time<F: FnMut() -> anyhow::Result<()>>(mut f: F) -> anyhow::Result<f64> {
    f()?;
    let mut iters = 0u32;
    let started = Instant::now();
    while iters < 5 || started.elapsed().as_secs_f64() < 0.5 {
        f()?;
        iters += 1;
    }
    Ok(started.elapsed().as_secs_f64() / f64::from(iters))
}

fn projections() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let (out, inp) = (1536, 576);
    let w = Tensor::randn(0f32, 0.02, (out, inp), &dev)?;
    let forms: Vec<(&str, Box<dyn Module>)> = vec![
        (
            "q4_1",
            Box::new(QMatMul::from_qtensor(QTensor::quantize(
                &w,
                GgmlDType::Q4_1,
            )?)?),
        ),
        (
            "q4_0",
            Box::new(QMatMul::from_qtensor(QTensor::quantize(
                &w,
                GgmlDType::Q4_0,
            )?)?),
        ),
        (
            "q8_0",
            Box::new(QMatMul::from_qtensor(QTensor::quantize(
                &w,
                GgmlDType::Q8_0,
            )?)?),
        ),
        ("f32", Box::new(Dense(w.t()?.contiguous()?.t()?))),
        ("f16", Box::new(Dense(w.to_dtype(DType::F16)?))),
        ("bf16", Box::new(Dense(w.to_dtype(DType::BF16)?))),
    ];
    println!("projection (rows, {inp}) x ({inp}, {out}), GFLOP/s");
    print!("{:>6}", "rows");
    for (name, _) in &forms {
        print!("{name:>8}");
    }
    println!();
    for rows in [1usize, 4, 16, 64, 256] {
        let x = Tensor::randn(0f32, 1.0, (rows, inp), &dev)?;
        print!("{rows:>6}");
        for (_, m) in &forms {
            let secs = time(|| {
                m.forward(&x)?;
                Ok(())
            })?;
            print!("{:>8.1}", 2.0 * (rows * inp * out) as f64 / secs / 1e9);
        }
        println!();
    }
    Ok(())
}

struct Dense(Tensor);

impl Module for Dense {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.to_dtype(self.0.dtype())?
            .matmul(&self.0.t()?)?
            .to_dtype(DType::F32)
    }
}

/// Reads a GGUF file's metadata, leaving the reader at its tensors.
fn open(path: &std::path::Path) -> anyhow::Result<(Content, BufReader<File>)> {
    let mut file = BufReader::new(File::open(path)?);
    let content = Content::read(&mut file)?;
    Ok((content, file))
}

fn decode(path: &std::path::Path, quick: bool) -> anyhow::Result<()> {
    let dev = Device::Cpu;
    if !quick {
        reference_decode(path, &dev)?;
    }
    let forms: &[WeightForm] = if quick {
        &[WeightForm::Q8_0, WeightForm::Auto]
    } else {
        &[
            WeightForm::Native,
            WeightForm::Q8_0,
            WeightForm::F32,
            WeightForm::Auto,
        ]
    };
    for &form in forms {
        let (content, mut file) = open(path)?;
        let model = LlamaModel::from_gguf(&content, &mut file, &dev, form, None)?;
        decode_at_contexts(&model, form)?;
        if form == WeightForm::Native {
            continue;
        }
        batched_decode(&model, form)?;
        let prompt: Vec<u32> = (0..PREFILL as u32).map(|i| 100 + i).collect();
        let mut cache = model.new_cache();
        let started = Instant::now();
        prefill(&model, &prompt, &mut cache)?;
        let tps = PREFILL as f64 / started.elapsed().as_secs_f64();
        println!("tollgate {form:?} prefill of {PREFILL} tokens: {tps:.1} tok/s");
    }
    Ok(())
}

/// Batch-1 decode tok/s of candle-transformers' `quantized_llama` with native weights.
fn reference_decode(path: &std::path::Path, dev: &Device) -> anyhow::Result<()> {
    let prompt: Vec<u32> = (100..116).collect();
    let (content, mut file) = open(path)?;
    let mut reference = ModelWeights::from_gguf(content, &mut file, dev)?;
    let input = Tensor::new(prompt.as_slice(), dev)?.unsqueeze(0)?;
    reference.forward(&input, 0)?;
    let started = Instant::now();
    for i in 0..DECODE_STEPS {
        let input = Tensor::new(&[200u32 + i as u32], dev)?.unsqueeze(0)?;
        reference.forward(&input, prompt.len() + i)?;
    }
    let reference_tps = DECODE_STEPS as f64 / started.elapsed().as_secs_f64();
    println!("quantized_llama native decode: {reference_tps:.1} tok/s");
    Ok(())
}

/// Batch-1 decode tok/s after each of [`CONTEXTS`] tokens.
fn decode_at_contexts(model: &LlamaModel, form: WeightForm) -> anyhow::Result<()> {
    print!("tollgate {form:?} decode tok/s at KV length");
    for context in CONTEXTS {
        let prompt: Vec<u32> = (0..context as u32).map(|i| 100 + i % 1000).collect();
        let mut cache = model.new_cache();
        prefill(model, &prompt, &mut cache)?;
        let started = Instant::now();
        for i in 0..DECODE_STEPS {
            model.forward(&mut [SeqStep {
                tokens: &[200 + i as u32],
                cache: &mut cache,
                logits: 1,
                adapter: None,
            }])?;
        }
        let tps = DECODE_STEPS as f64 / started.elapsed().as_secs_f64();
        print!("  {context}: {tps:.1}");
    }
    println!();
    Ok(())
}

/// Continuous batching's steady state: B sequences, each 64 tokens in, one decode token each
/// per step; total tok/s for each of [`BATCHES`].
fn batched_decode(model: &LlamaModel, form: WeightForm) -> anyhow::Result<()> {
    print!("tollgate {form:?} batched decode, total tok/s at batch");
    for batch in BATCHES {
        let mut caches: Vec<_> = (0..batch).map(|_| model.new_cache()).collect();
        for (s, cache) in caches.iter_mut().enumerate() {
            let prompt: Vec<u32> = (0..64).map(|i| 100 + s as u32 * 64 + i).collect();
            prefill(model, &prompt, cache)?;
        }
        let tokens: Vec<[u32; 1]> = (0..batch).map(|s| [300 + s as u32]).collect();
        let started = Instant::now();
        for _ in 0..DECODE_STEPS {
            let mut steps: Vec<SeqStep> = caches
                .iter_mut()
                .zip(&tokens)
                .map(|(cache, t)| SeqStep {
                    tokens: t,
                    cache,
                    logits: 1,
                    adapter: None,
                })
                .collect();
            model.forward(&mut steps)?;
        }
        let tps = (DECODE_STEPS * batch) as f64 / started.elapsed().as_secs_f64();
        print!("  {batch}: {tps:.1}");
    }
    println!();
    Ok(())
}

fn main() -> anyhow::Result<()> {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // SAFETY: single-threaded at this point.
        unsafe { std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0") };
    }
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    args.retain(|a| a != "--quick");
    let path = match args.first() {
        Some(p) => p.into(),
        None => require_dev_model().context("run scripts/fetch-model.sh")?,
    };
    if !quick {
        projections()?;
    }
    decode(&path, quick)
}

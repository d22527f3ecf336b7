//! Kernel and forward-pass speed on this machine, to tell the runtime's own overhead from
//! candle's kernels:
//!
//! 1. GFLOP/s of one `(rows, 576) x (576, 1536)` projection (the dev model's FFN shape) for
//!    each weight form and several row counts;
//! 2. batch-1 decode tok/s of Tollgate's forward pass against candle-transformers'
//!    `quantized_llama` on the same GGUF with native weights.
//!
//! `cargo run --release -p tollgate-runtime --example kernels [-- path/to/model.gguf]`

use std::fs::File;
use std::io::BufReader;
use std::time::Instant;

use anyhow::Context;
use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use tollgate_runtime::dev_model::require_dev_model;
use tollgate_runtime::model::{LlamaModel, SeqStep, WeightForm};

const DECODE_STEPS: usize = 32;
/// KV lengths at which decode speed is measured.
const CONTEXTS: [usize; 4] = [16, 128, 512, 2048];

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

fn decode(path: &std::path::Path) -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let open = || -> anyhow::Result<(Content, BufReader<File>)> {
        let mut file = BufReader::new(File::open(path)?);
        let content = Content::read(&mut file)?;
        Ok((content, file))
    };
    let prompt: Vec<u32> = (100..116).collect();

    let (content, mut file) = open()?;
    let mut reference = ModelWeights::from_gguf(content, &mut file, &dev)?;
    let input = Tensor::new(prompt.as_slice(), &dev)?.unsqueeze(0)?;
    reference.forward(&input, 0)?;
    let started = Instant::now();
    for i in 0..DECODE_STEPS {
        let input = Tensor::new(&[200u32 + i as u32], &dev)?.unsqueeze(0)?;
        reference.forward(&input, prompt.len() + i)?;
    }
    let reference_tps = DECODE_STEPS as f64 / started.elapsed().as_secs_f64();
    println!("quantized_llama native decode: {reference_tps:.1} tok/s");

    for form in [
        WeightForm::Native,
        WeightForm::Q8_0,
        WeightForm::F32,
        WeightForm::Auto,
    ] {
        let (content, mut file) = open()?;
        let model = LlamaModel::from_gguf(&content, &mut file, &dev, form, None)?;
        print!("tollgate {form:?} decode tok/s at KV length");
        for context in CONTEXTS {
            let prompt: Vec<u32> = (0..context as u32).map(|i| 100 + i % 1000).collect();
            let mut cache = model.new_cache();
            for chunk in prompt.chunks(256) {
                model.forward(&mut [SeqStep {
                    tokens: chunk,
                    cache: &mut cache,
                    want_logits: true,
                }])?;
            }
            let started = Instant::now();
            for i in 0..DECODE_STEPS {
                model.forward(&mut [SeqStep {
                    tokens: &[200 + i as u32],
                    cache: &mut cache,
                    want_logits: true,
                }])?;
            }
            let tps = DECODE_STEPS as f64 / started.elapsed().as_secs_f64();
            print!("  {context}: {tps:.1}");
        }
        println!();
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // SAFETY: single-threaded at this point.
        unsafe { std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0") };
    }
    let path = match std::env::args_os().nth(1) {
        Some(p) => p.into(),
        None => require_dev_model().context("run scripts/fetch-model.sh")?,
    };
    projections()?;
    decode(&path)
}

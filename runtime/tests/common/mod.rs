//! Helpers shared by the model tests (each test crate uses a part of them).
#![allow(
    dead_code,
    reason = "each test crate includes this module and uses only some helpers"
)]

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Content;
use candle_core::{Device, Tensor};
use tollgate_runtime::dev_model::require_dev_model;
use tollgate_runtime::model::{KvCache, LlamaModel, SeqStep, WeightForm};

/// The development model's file; the test fails (never skips) without it.
pub fn model_path() -> PathBuf {
    require_dev_model().expect("dev model (run scripts/fetch-model.sh)")
}

/// A GGUF file's header, and the reader positioned after it.
pub fn open(path: &Path) -> (Content, BufReader<File>) {
    let mut file = BufReader::new(File::open(path).unwrap());
    let content = Content::read(&mut file).unwrap();
    (content, file)
}

/// The development model with its weights in `form`.
pub fn load(form: WeightForm) -> LlamaModel {
    let (content, mut file) = open(&model_path());
    LlamaModel::from_gguf(&content, &mut file, &Device::Cpu, form, None).unwrap()
}

/// A fresh directory under the system's temporary one, removed when the test ends, passed or
/// failed.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// `tollgate-{test}-{pid}-{tag}`, emptied if a crashed run left it.
    pub fn new(test: &str, tag: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("tollgate-{test}-{}-{tag}", std::process::id()));
        std::fs::remove_dir_all(&path).ok();
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

/// `len` fixed token ids: `<|im_start|>` (1), then a deterministic spread over 3..49000.
pub fn prompt(len: usize, seed: u32) -> Vec<u32> {
    let mut ids = vec![1u32];
    ids.extend((1..len as u32).map(|i| 3 + (i * 7919 + seed * 104_729 + 17) % (49_000 - 3)));
    ids
}

/// The index of the largest value (the first, on a tie).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "logit vectors differ in length");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Runs one sequence step alone and returns its last-token logits (finite, one per token of
/// the vocabulary).
pub fn step(model: &LlamaModel, cache: &mut KvCache, tokens: &[u32]) -> Vec<f32> {
    let mut out = model
        .forward(&mut [SeqStep {
            tokens,
            cache,
            logits: 1,
            adapter: None,
        }])
        .unwrap();
    assert_eq!(out.len(), 1);
    let logits = out.pop().unwrap();
    assert_eq!(logits.len(), model.config().vocab_size);
    assert!(logits.iter().all(|x| x.is_finite()), "non-finite logits");
    logits
}

/// A `(rows, cols)` matrix of pseudo-random values in `[-scale, scale)`.
pub fn random(rows: usize, cols: usize, scale: f32, seed: u32) -> Tensor {
    let v: Vec<f32> = tollgate_runtime::synth::pseudo_random(rows * cols, seed)
        .into_iter()
        .map(|x| x * scale)
        .collect();
    Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
}

/// `w (rows, cols)` with each of the `heads` heads' rows seen as a grid of `a` rows of
/// `rows / heads / a` and the grid transposed. With `a = 2` that is llama.cpp's permutation of
/// Hugging Face's Q/K rows (per head: the first halves, then the second halves) into GGUF's
/// interleaved pairs; with `a = head_dim / 2`, its inverse.
pub fn transpose_head_rows(w: &Tensor, heads: usize, a: usize) -> Tensor {
    let (rows, cols) = w.dims2().unwrap();
    w.reshape((heads, a, rows / heads / a, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((rows, cols))
        .unwrap()
}

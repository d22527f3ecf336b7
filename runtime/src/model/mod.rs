//! Tollgate's own Llama forward pass: one call runs a ragged batch of sequences, each with its
//! own KV cache and position, some prefilling many tokens and others decoding one. Every
//! matmul runs once over all the step's tokens (that is what makes batching pay); attention runs
//! per sequence over its own cache.
//!
//! Submodules: `cpu` (which SIMD path the kernels run), `linear` (weight forms and their matmuls), `q8` (the int8 kernel), `codes` (the block-code kernel of `auto`), `kv_cache`,
//! `llama` (the forward pass, candle ops), `host` (the CPU forward pass on plain buffers),
//! `load` (GGUF and safetensors), `rope` (RoPE frequencies, their scaling and tables).

mod codes;
pub mod cpu;
mod embed;
mod host;
mod kv_cache;
mod linear;
mod llama;
mod load;
mod q8;
mod rope;

use std::str::FromStr;

pub use cpu::CpuKernels;
pub use kv_cache::KvCache;
pub use llama::{BetweenLayers, LlamaModel, SeqStep};
pub use rope::{Llama3Scaling, RopeScaling};

use crate::Error;

/// Test data for the kernels.
#[cfg(test)]
use crate::synth::pseudo_random;

/// candle's own dequantization of `q`, row-major: what the kernels' readings of the same bytes
/// are checked against.
#[cfg(test)]
fn dequantized(q: &candle_core::quantized::QTensor) -> Vec<f32> {
    let t = q.dequantize(&candle_core::Device::Cpu).unwrap();
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// The form weights take on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightForm {
    /// CPU: Tollgate's kernels on the file's own values where it can (Q4_0/Q4_1 block codes,
    /// Q8_0 int8), other weights as 7-bit block codes. CUDA: f16.
    Auto,
    /// Keep the file's own form (its quantization, or its dtype for safetensors).
    Native,
    /// Re-quantize to Q8_0 (candle's fast CPU kernel).
    Q8_0,
    F32,
    F16,
    Bf16,
}

impl FromStr for WeightForm {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "auto" => Self::Auto,
            "native" => Self::Native,
            "q8_0" | "q8" => Self::Q8_0,
            "f32" => Self::F32,
            "f16" => Self::F16,
            "bf16" => Self::Bf16,
            other => {
                return Err(Error::Config(format!(
                    "unknown weight form `{other}` (valid: auto, native, q8_0, f32, f16, bf16)"
                )))
            }
        })
    }
}

impl std::fmt::Display for WeightForm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Native => "native",
            Self::Q8_0 => "q8_0",
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        })
    }
}

/// Hyper-parameters of a Llama-architecture model.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn_size: usize,
    pub rope_theta: f32,
    pub rms_eps: f64,
    pub context_length: usize,
    /// GGUF permutes Q/K for interleaved RoPE; Hugging Face weights use the half-split form.
    pub rope_interleaved: bool,
    /// Context-extension scaling of the RoPE frequencies (Llama 3.1's, linear).
    pub rope_scaling: RopeScaling,
}

//! Tollgate's own Llama forward pass (also Qwen 2's and Phi-3's, [`Architecture`], and
//! Mistral's sliding window): one call runs a ragged batch of sequences, each with its
//! own KV cache and position, some prefilling many tokens and others decoding one. Every
//! matmul runs once over all the step's tokens (that is what makes batching pay); attention runs
//! per sequence over its own cache.
//!
//! Submodules: `cpu` (which SIMD path the kernels run), `linear` (weight forms and their matmuls), `q8` (the int8 kernel), `codes` (the block-code kernel of `auto`), `kv_cache`,
//! `llama` (the forward pass, candle ops), `host` (the CPU forward pass on plain buffers),
//! `load` (GGUF and safetensors), `rope` (RoPE frequencies, their scaling and tables),
//! `lora` (LoRA adapters, applied per sequence in a batch).

mod codes;
pub mod cpu;
mod embed;
mod host;
mod kv_cache;
mod linear;
mod llama;
mod load;
mod lora;
mod q8;
mod rope;

use std::str::FromStr;

pub use cpu::CpuKernels;
pub use kv_cache::KvCache;
pub use llama::{BetweenLayers, LlamaModel, SeqStep};
pub use lora::{AdapterBase, LoraAdapter, Target as LoraTarget};
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

/// The GGUF architectures the forward pass serves: Llama's block with at most these
/// differences, each taken from the file (`general.architecture`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `llama` (Llama 1–3, SmolLM, Mistral): interleaved RoPE pairs (GGUF permutes Q/K rows).
    Llama,
    /// `qwen2` (Qwen 2 and 2.5): biases on Q, K and V; half-split RoPE.
    Qwen2,
    /// `phi3` (Phi-3, Phi-4): Q/K/V fused in one matrix, gate and up fused in `ffn_up`;
    /// half-split RoPE.
    Phi3,
}

impl Architecture {
    /// The architecture named `name` in a GGUF file (also its metadata keys' prefix).
    pub fn from_gguf(name: &str) -> Result<Self, Error> {
        Ok(match name {
            "llama" => Self::Llama,
            "qwen2" => Self::Qwen2,
            "phi3" => Self::Phi3,
            other => return Err(Error::UnsupportedArchitecture(other.to_string())),
        })
    }

    pub fn gguf_name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Phi3 => "phi3",
        }
    }

    /// Whether RoPE rotates interleaved pairs `(2i, 2i+1)` (llama.cpp's `NORM` type: `llama`
    /// GGUFs store Q/K rows permuted for it) rather than halves `(i, i + d/2)` (`NEOX`).
    pub fn gguf_rope_interleaved(self) -> bool {
        matches!(self, Self::Llama)
    }
}

impl std::fmt::Display for Architecture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.gguf_name())
    }
}

/// Hyper-parameters of a Llama-architecture model (and of the architectures next to it,
/// [`Architecture`]).
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub architecture: Architecture,
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
    /// Mistral-style sliding-window attention: a query at position `p` sees the keys at
    /// positions `p - window + 1 ..= p` only (`None`: every earlier key).
    pub sliding_window: Option<usize>,
}

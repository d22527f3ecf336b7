//! Loading Llama weights from a GGUF file or a Hugging Face safetensors directory into the
//! chosen weight form on the chosen device.
//!
//! GGUF stores Q/K rows permuted for interleaved RoPE and safetensors keep the half-split
//! layout, so each source picks its RoPE variant instead of permuting weights. A missing
//! tensor or key is an error naming it.
//!
//! The two sources live apart (`gguf.rs`, `safetensors.rs`, the GGUF byte sources in
//! `source.rs`); this module holds what both share: the form and KV dtype a device gets, the
//! configuration checks and the CPU kernel check.

use candle_core::{DType, Device};

use super::{LlamaConfig, WeightForm};
use crate::{Error, Result};

mod gguf;
mod safetensors;
mod source;

fn kv_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::F16
    }
}

/// `Auto` stays `Auto` on CPU (block codes) and means f16 elsewhere.
fn resolve_form(form: WeightForm, device: &Device) -> WeightForm {
    match form {
        WeightForm::Auto if !device.is_cpu() => WeightForm::F16,
        other => other,
    }
}

fn validate(c: &LlamaConfig) -> Result<()> {
    let bad = |m: String| Err(Error::Config(m));
    if c.n_heads == 0 || c.n_kv_heads == 0 || !c.n_heads.is_multiple_of(c.n_kv_heads) {
        return bad(format!(
            "{} attention heads cannot share {} KV heads",
            c.n_heads, c.n_kv_heads
        ));
    }
    if c.head_dim == 0
        || !c.head_dim.is_multiple_of(2)
        || c.n_heads.checked_mul(c.head_dim) != Some(c.hidden_size)
    {
        return bad(format!(
            "head dim {} with {} heads does not match hidden size {}",
            c.head_dim, c.n_heads, c.hidden_size
        ));
    }
    if c.n_layers == 0 || c.vocab_size == 0 || c.context_length == 0 {
        return bad(format!(
            "degenerate model: {} layers, vocab {}, context {}",
            c.n_layers, c.vocab_size, c.context_length
        ));
    }
    Ok(())
}

/// Refuses a `TOLLGATE_CPU_KERNELS` setting this CPU cannot run before any kernel runs, and
/// says which path the CPU kernels take.
fn check_cpu_kernels(device: &Device) -> Result<()> {
    let kernels = super::CpuKernels::from_env()?;
    if device.is_cpu() {
        tracing::info!(%kernels, detected = %super::CpuKernels::detected(), "CPU kernels");
    }
    Ok(())
}

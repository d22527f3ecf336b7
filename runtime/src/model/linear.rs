//! Linear layers in the weight form chosen at load time, and their matmuls.
//!
//! candle's quantized CPU kernels are fast for a few rows but do not get faster with more rows,
//! while dense f32/f16 matmuls do. The `Dual` form keeps both a Q8_0 and an f32 copy and picks
//! per call by the number of rows: decode steps with a few sequences use Q8_0, prefill and large
//! batches use f32.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use super::WeightForm;
use crate::Result;

/// Rows at and above which the `Dual` form uses its dense copy. Measured on the dev machine
/// (FACTS.md): Q8_0 leads at 1–4 rows, f32 overtakes by 16.
pub(crate) const DENSE_FROM_ROWS: usize = 12;

/// A weight matrix `(out, in)` applied to activations `(rows, in)`.
#[derive(Debug)]
pub(crate) enum Linear {
    Quant(QMatMul),
    Dense(Tensor),
    Dual { quant: QMatMul, dense: Tensor },
}

fn q8_0(dense_f32: &Tensor) -> Result<Option<QMatMul>> {
    let cols = dense_f32.dim(1)?;
    if cols % GgmlDType::Q8_0.block_size() != 0 {
        return Ok(None);
    }
    Ok(Some(QMatMul::from_qtensor(QTensor::quantize(
        dense_f32,
        GgmlDType::Q8_0,
    )?)?))
}

impl Linear {
    /// From a GGUF tensor.
    pub(crate) fn from_qtensor(q: QTensor, form: WeightForm, device: &Device) -> Result<Self> {
        Ok(match form {
            WeightForm::Native => Self::Quant(QMatMul::from_qtensor(q)?),
            WeightForm::Q8_0 if q.dtype() == GgmlDType::Q8_0 => {
                Self::Quant(QMatMul::from_qtensor(q)?)
            }
            _ => Self::from_dense(q.dequantize(device)?, form, device)?,
        })
    }

    /// From a dense tensor (safetensors, or a dequantized GGUF tensor).
    pub(crate) fn from_dense(w: Tensor, form: WeightForm, device: &Device) -> Result<Self> {
        let dense =
            |dtype: DType| -> Result<Self> { Ok(Self::Dense(w.to_dtype(dtype)?.contiguous()?)) };
        match form {
            WeightForm::Native => Ok(Self::Dense(w.contiguous()?)),
            WeightForm::F32 => dense(DType::F32),
            WeightForm::F16 => dense(DType::F16),
            WeightForm::Bf16 => dense(DType::BF16),
            WeightForm::Q8_0 => match q8_0(&w.to_dtype(DType::F32)?)? {
                Some(q) => Ok(Self::Quant(q)),
                None => dense(DType::F32),
            },
            WeightForm::Auto if device.is_cpu() => {
                let w = w.to_dtype(DType::F32)?.contiguous()?;
                Ok(match q8_0(&w)? {
                    Some(quant) => Self::Dual { quant, dense: w },
                    None => Self::Dense(w),
                })
            }
            WeightForm::Auto => dense(DType::F16),
        }
    }

    /// `(rows, in)` f32 → `(rows, out)` f32.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Quant(q) => q.forward(x)?,
            Self::Dense(w) => dense_forward(w, x)?,
            Self::Dual { quant, dense } => {
                if x.dim(0)? >= DENSE_FROM_ROWS {
                    dense_forward(dense, x)?
                } else {
                    quant.forward(x)?
                }
            }
        })
    }
}

fn dense_forward(w: &Tensor, x: &Tensor) -> candle_core::Result<Tensor> {
    if w.dtype() == x.dtype() {
        return x.matmul(&w.t()?);
    }
    x.to_dtype(w.dtype())?.matmul(&w.t()?)?.to_dtype(x.dtype())
}

//! Linear layers in the weight form chosen at load time, and their matmuls.
//!
//! Q8_0 weights on a CPU with AVX2 run Tollgate's own int8 kernel ([`super::q8`]), the `auto`
//! form its block-code kernel ([`super::codes`]: Q4_0/Q4_1 kept as stored, other weights as
//! 7-bit codes); elsewhere candle's quantized matmul. The `Dual` form keeps the codes and an
//! f32 copy: decode steps and batches run the codes, long prompt chunks f32 gemm.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use super::codes::{self, CodeMatrix};
use super::q8::{self, Q8Matrix, BLOCK};
use super::WeightForm;
use crate::{Error, Result};

/// Rows of one sequence's step at and above which the `Dual` form uses its dense copy: every
/// prompt chunk (the engine never runs a one-token chunk of a longer prompt), while decode
/// steps run the codes. So a prompt token's arithmetic never depends on how its prompt was
/// chunked or whether its prefix came from the prefix cache.
pub(crate) const DENSE_FROM_ROWS: usize = 2;

/// A weight matrix `(out, in)` applied to activations `(rows, in)`.
#[derive(Debug)]
pub(crate) enum Linear {
    Quant(Quantized),
    Dense(Tensor),
    Dual { quant: Quantized, dense: Tensor },
}

/// A quantized weight matrix and the kernel that runs it.
#[derive(Debug)]
pub(crate) enum Quantized {
    /// candle's kernels: any GGML type, any device.
    Candle(QMatMul),
    /// Tollgate's int8 kernel (CPU with AVX2).
    Int8(Q8Matrix),
    /// Tollgate's block-code kernel (CPU with AVX2).
    Codes(CodeMatrix),
}

/// A host kernel's matrix, borrowed.
#[derive(Clone, Copy)]
enum HostMatrix<'a> {
    Int8(&'a Q8Matrix),
    Codes(&'a CodeMatrix),
}

impl Quantized {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Candle(q) => q.forward(x)?,
            Self::Int8(_) | Self::Codes(_) => {
                let (rows, _) = x.dims2()?;
                let data = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
                let (y, out) = match self {
                    Self::Int8(m) => (m.matmul(&data, rows), m.out_features()),
                    Self::Codes(m) => (m.matmul(&data, rows), m.out_features()),
                    Self::Candle(_) => unreachable!("matched above"),
                };
                Tensor::from_vec(y, (rows, out), x.device())?
            }
        })
    }
}

/// Q8_0 weights from f32 `(out, in)`: Tollgate's kernel where it applies, else candle's.
/// `None` when `in` is not a multiple of the block size.
fn q8_0(dense_f32: &Tensor) -> Result<Option<Quantized>> {
    let (out, cols) = dense_f32.dims2()?;
    if cols % BLOCK != 0 || cols % GgmlDType::Q8_0.block_size() != 0 {
        return Ok(None);
    }
    if dense_f32.device().is_cpu() && Q8Matrix::is_fast_for(cols) {
        let data = dense_f32.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        return Ok(Some(Quantized::Int8(Q8Matrix::quantize(&data, out, cols))));
    }
    Ok(Some(Quantized::Candle(QMatMul::from_qtensor(
        QTensor::quantize(dense_f32, GgmlDType::Q8_0)?,
    )?)))
}

/// The `auto` form's pair on the CPU: block codes (or f32 alone where the kernel does not
/// apply) and the f32 copy.
fn dual(codes: Option<CodeMatrix>, dense_f32: Tensor) -> Result<Linear> {
    let dense = dense_f32.to_dtype(DType::F32)?.contiguous()?;
    let (out, cols) = dense.dims2()?;
    let codes = match codes {
        Some(c) => Some(c),
        None if CodeMatrix::is_fast_for(cols) => {
            let data = dense.flatten_all()?.to_vec1::<f32>()?;
            Some(CodeMatrix::quantize(&data, out, cols))
        }
        None => None,
    };
    Ok(match codes {
        Some(c) => Linear::Dual {
            quant: Quantized::Codes(c),
            dense,
        },
        None => match q8_0(&dense)? {
            Some(quant) => Linear::Dual { quant, dense },
            None => Linear::Dense(dense),
        },
    })
}

impl Linear {
    /// From a GGUF tensor.
    pub(crate) fn from_qtensor(q: QTensor, form: WeightForm, device: &Device) -> Result<Self> {
        Ok(match form {
            WeightForm::Native => Self::Quant(Quantized::Candle(QMatMul::from_qtensor(q)?)),
            WeightForm::Auto if device.is_cpu() => {
                let codes = match CodeMatrix::from_q4(&q)? {
                    Some(c) if CodeMatrix::is_fast_for(c.in_features()) => Some(c),
                    _ => None,
                };
                dual(codes, q.dequantize(device)?)?
            }
            WeightForm::Q8_0 if q.dtype() == GgmlDType::Q8_0 && !device.is_cpu() => {
                Self::Quant(Quantized::Candle(QMatMul::from_qtensor(q)?))
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
            WeightForm::Auto if device.is_cpu() => dual(None, w),
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

impl Linear {
    /// The host kernel's matrix, unless `dense` asks a `Dual` layer for its dense copy.
    fn host_unless(&self, dense: bool) -> Option<HostMatrix<'_>> {
        let quant = match self {
            Self::Quant(q) => q,
            Self::Dual { quant, .. } if !dense => quant,
            _ => return None,
        };
        match quant {
            Quantized::Int8(m) => Some(HostMatrix::Int8(m)),
            Quantized::Codes(m) => Some(HostMatrix::Codes(m)),
            Quantized::Candle(_) => None,
        }
    }

    /// Whether [`Linear::forward_host_as`] suits this layer: CPU weights (the host path hands
    /// activations over as CPU buffers).
    pub(crate) fn is_host(&self) -> bool {
        match self {
            Self::Quant(Quantized::Int8(_) | Quantized::Codes(_)) => true,
            Self::Quant(Quantized::Candle(_)) => false,
            Self::Dense(w) | Self::Dual { dense: w, .. } => w.device().is_cpu(),
        }
    }

    /// Host buffers: `x (rows, in)` f32 → `(rows, out)` f32, row-major. The int8 kernel runs
    /// directly on the buffers; other forms go through a CPU tensor. `dense` picks a `Dual`
    /// layer's copy (the caller decides, so a row's arithmetic does not depend on how many
    /// other rows share the step).
    pub(crate) fn forward_host_as(&self, x: &[f32], rows: usize, dense: bool) -> Result<Vec<f32>> {
        match self.host_unless(dense) {
            Some(HostMatrix::Int8(m)) => return Ok(m.matmul(x, rows)),
            Some(HostMatrix::Codes(m)) => return Ok(m.matmul(x, rows)),
            None => {}
        }
        let cols = x.len() / rows.max(1);
        let t = Tensor::from_slice(x, (rows, cols), &Device::Cpu)?;
        let out = match self {
            Self::Dual { dense: w, .. } => dense_forward(w, &t)?,
            other => other.forward(&t)?,
        };
        Ok(out.flatten_all()?.to_vec1::<f32>()?)
    }

    /// [`Linear::forward_host_as`] of several layers on the same input (Q/K/V, gate/up): one
    /// activation quantization and one parallel dispatch when all run the same host kernel.
    pub(crate) fn forward_host_many_as<const N: usize>(
        layers: [&Linear; N],
        x: &[f32],
        rows: usize,
        dense: bool,
    ) -> Result<[Vec<f32>; N]> {
        let host: Option<Vec<HostMatrix>> = layers.iter().map(|l| l.host_unless(dense)).collect();
        let int8: Option<Vec<&Q8Matrix>> = host
            .iter()
            .flatten()
            .map(|m| match m {
                HostMatrix::Int8(m) => Some(*m),
                HostMatrix::Codes(_) => None,
            })
            .collect();
        let codes: Option<Vec<&CodeMatrix>> = host
            .iter()
            .flatten()
            .map(|m| match m {
                HostMatrix::Codes(m) => Some(*m),
                HostMatrix::Int8(_) => None,
            })
            .collect();
        let outs = match (host.is_some(), int8, codes) {
            (true, Some(mats), _) => q8::matmul_many(&mats, x, rows),
            (true, _, Some(mats)) => codes::matmul_many(&mats, x, rows),
            _ => layers
                .iter()
                .map(|l| l.forward_host_as(x, rows, dense))
                .collect::<Result<Vec<_>>>()?,
        };
        outs.try_into()
            .map_err(|_| Error::Weights("fused projection lost an output".into()))
    }
}

fn dense_forward(w: &Tensor, x: &Tensor) -> candle_core::Result<Tensor> {
    if w.dtype() == x.dtype() {
        return x.matmul(&w.t()?);
    }
    x.to_dtype(w.dtype())?.matmul(&w.t()?)?.to_dtype(x.dtype())
}

//! Linear layers in the weight form chosen at load time, and their matmuls.
//!
//! Q8_0 weights on a CPU with AVX2 run Tollgate's own int8 kernel ([`super::q8`]), the `auto`
//! form its block-code kernel ([`super::codes`]: Q4_0/Q4_1 kept as stored, other weights as
//! 7-bit codes, Q8_0 tensors on the int8 kernel), which outruns f32 gemm from one row to whole prompt chunks (so every row of
//! every step runs the same arithmetic); elsewhere candle's quantized matmul.

use candle_core::quantized::k_quants::{BlockQ4_0, BlockQ4_1, BlockQ8_0, GgmlType};
use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor, QuantizedType};
use candle_core::{DType, Device, Module, Tensor};

use super::codes::{self, CodeMatrix};
use super::q8::{self, Q8Matrix, BLOCK};
use super::WeightForm;
use crate::{Error, Result};

/// A weight matrix `(out, in)` applied to activations `(rows, in)`.
#[derive(Debug)]
pub(crate) enum Linear {
    Quant(Quantized),
    Dense(Tensor),
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

impl<'a> HostMatrix<'a> {
    fn int8(self) -> Option<&'a Q8Matrix> {
        match self {
            Self::Int8(m) => Some(m),
            Self::Codes(_) => None,
        }
    }

    fn codes(self) -> Option<&'a CodeMatrix> {
        match self {
            Self::Codes(m) => Some(m),
            Self::Int8(_) => None,
        }
    }
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

/// The `auto` form of dense weights on the CPU: 7-bit block codes, else Q8_0, else f32 where
/// no kernel applies.
fn auto_cpu(w: Tensor) -> Result<Linear> {
    let (out, cols) = w.dims2()?;
    let w = w.to_dtype(DType::F32)?.contiguous()?;
    if CodeMatrix::is_fast_for(cols) {
        let data = w.flatten_all()?.to_vec1::<f32>()?;
        return Ok(Linear::Quant(Quantized::Codes(CodeMatrix::quantize(
            &data, out, cols,
        ))));
    }
    Ok(match q8_0(&w)? {
        Some(quant) => Linear::Quant(quant),
        None => Linear::Dense(w),
    })
}

/// Bytes of one row of `hidden` values in `dtype` (`hidden` a multiple of its block): the
/// stride of a GGUF matrix's rows, for the output projection's and the embedding's lookups.
pub(crate) fn row_bytes(dtype: GgmlDType, hidden: usize) -> usize {
    hidden / dtype.block_size() * dtype.type_size()
}

/// A GGUF tensor's bytes as a candle tensor (one copy, on the CPU; then moved to `device`).
pub(crate) fn qtensor_from_bytes(
    dtype: GgmlDType,
    dims: &[usize],
    data: &[u8],
    device: &Device,
) -> Result<QTensor> {
    Ok(candle_core::quantized::ggml_file::qtensor_from_ggml(
        dtype,
        data,
        dims.to_vec(),
        device,
    )?)
}

/// A GGUF tensor of `bytes` bytes read by `read` straight into candle's own storage (CPU), for
/// the types served natively; `None` for the others. One copy, where going through the
/// file's mapped bytes holds them beside candle's copy while it is made.
fn qtensor_from_reader(
    dtype: GgmlDType,
    dims: &[usize],
    bytes: usize,
    read: impl FnOnce(&mut [u8]) -> Result<()>,
) -> Result<Option<QTensor>> {
    fn blocks<T: GgmlType + 'static>(
        bytes: usize,
        read: impl FnOnce(&mut [u8]) -> Result<()>,
    ) -> Result<Box<dyn QuantizedType>> {
        let size = std::mem::size_of::<T>();
        if !bytes.is_multiple_of(size) {
            return Err(Error::Weights(format!(
                "{bytes} bytes are not whole {:?} blocks",
                T::DTYPE
            )));
        }
        let mut v = vec![T::zeros(); bytes / size];
        // SAFETY: `T` is one of GGML's block types or a float: `repr(C)` plain data with no
        // padding, valid for every bit pattern (candle reads them from files the same way);
        // the slice covers exactly the vector's initialized elements.
        let raw = unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), bytes) };
        read(raw)?;
        Ok(Box::new(v))
    }
    let storage = match dtype {
        GgmlDType::Q4_0 => blocks::<BlockQ4_0>(bytes, read)?,
        GgmlDType::Q4_1 => blocks::<BlockQ4_1>(bytes, read)?,
        GgmlDType::Q8_0 => blocks::<BlockQ8_0>(bytes, read)?,
        GgmlDType::F16 => blocks::<half::f16>(bytes, read)?,
        GgmlDType::F32 => blocks::<f32>(bytes, read)?,
        _ => return Ok(None),
    };
    Ok(Some(QTensor::new(QStorage::Cpu(storage), dims)?))
}

impl Linear {
    /// From a GGUF tensor's bytes, `(out, inp)` of `dtype` (sizes checked by the caller), for
    /// what [`Linear::from_gguf_reader`] does not take. The `auto` form on the CPU reads Q8_0
    /// values straight from the bytes, with no intermediate copy.
    pub(crate) fn from_gguf_bytes(
        dtype: GgmlDType,
        (out, inp): (usize, usize),
        data: &[u8],
        form: WeightForm,
        device: &Device,
    ) -> Result<Self> {
        if form == WeightForm::Auto && device.is_cpu() {
            // Q8_0 (often the embedding and output projection) keeps its 8-bit values on the
            // int8 kernel rather than losing a bit to 7-bit codes.
            if dtype == GgmlDType::Q8_0 && Q8Matrix::is_fast_for(inp) {
                if let Some(m) = Q8Matrix::from_q8_0_bytes(data, out, inp)? {
                    return Ok(Self::Quant(Quantized::Int8(m)));
                }
            }
        }
        Self::from_qtensor(
            qtensor_from_bytes(dtype, &[out, inp], data, device)?,
            form,
            device,
        )
    }

    /// From a GGUF tensor of `bytes` bytes read from the file through `read(first_row, buf)`
    /// (whole rows from `first_row` on) into the form's own memory, on the CPU: Q4_0/Q4_1
    /// under `auto` a few rows at a time into the kernel's layout, `native` straight into
    /// candle's storage. `None` for the others, which convert the whole tensor's bytes
    /// ([`Linear::from_gguf_bytes`]).
    pub(crate) fn from_gguf_reader(
        dtype: GgmlDType,
        (out, inp): (usize, usize),
        bytes: usize,
        form: WeightForm,
        device: &Device,
        mut read: impl FnMut(usize, &mut [u8]) -> Result<()>,
    ) -> Result<Option<Self>> {
        if !device.is_cpu() {
            return Ok(None);
        }
        match form {
            WeightForm::Auto if CodeMatrix::is_fast_for(inp) => {
                Ok(CodeMatrix::from_q4_reader(dtype, out, inp, read)?
                    .map(|c| Self::Quant(Quantized::Codes(c))))
            }
            WeightForm::Native => {
                let q = qtensor_from_reader(dtype, &[out, inp], bytes, |buf| read(0, buf))?;
                Ok(match q {
                    Some(q) => Some(Self::Quant(Quantized::Candle(QMatMul::from_qtensor(q)?))),
                    None => None,
                })
            }
            _ => Ok(None),
        }
    }

    /// Weight row `j` (the output feature `j`, `in` values) as f32, into `out`: a tied
    /// embedding's lookup.
    pub(crate) fn row_into(&self, j: usize, out: &mut [f32]) -> Result<()> {
        let rows = match self {
            Self::Quant(Quantized::Int8(m)) => m.out_features(),
            Self::Quant(Quantized::Codes(m)) => m.out_features(),
            Self::Quant(Quantized::Candle(QMatMul::QTensor(q))) => q.shape().dims2()?.0,
            Self::Quant(Quantized::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)))
            | Self::Dense(t) => t.dim(0)?,
        };
        if j >= rows {
            return Err(Error::Weights(format!("token {j} has no embedding row")));
        }
        match self {
            Self::Quant(Quantized::Int8(m)) => m.row_into(j, out),
            Self::Quant(Quantized::Codes(m)) => m.row_into(j, out),
            Self::Quant(Quantized::Candle(QMatMul::QTensor(q))) => {
                let data = q.data()?;
                let size = row_bytes(q.dtype(), out.len());
                let row = data
                    .get(j * size..(j + 1) * size)
                    .ok_or_else(|| Error::Weights(format!("token {j} has no embedding row")))?;
                let t = qtensor_from_bytes(q.dtype(), &[1, out.len()], row, &Device::Cpu)?;
                let v = t
                    .dequantize(&Device::Cpu)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                out.copy_from_slice(&v);
            }
            Self::Quant(Quantized::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)))
            | Self::Dense(t) => {
                let v = t
                    .get(j)?
                    .to_dtype(DType::F32)?
                    .to_device(&Device::Cpu)?
                    .to_vec1::<f32>()?;
                out.copy_from_slice(&v);
            }
        }
        Ok(())
    }

    /// From a GGUF tensor.
    pub(crate) fn from_qtensor(q: QTensor, form: WeightForm, device: &Device) -> Result<Self> {
        Ok(match form {
            WeightForm::Native => Self::Quant(Quantized::Candle(QMatMul::from_qtensor(q)?)),
            WeightForm::Auto if device.is_cpu() => {
                let codes = match CodeMatrix::from_q4(&q)? {
                    Some(c) if CodeMatrix::is_fast_for(c.in_features()) => Some(c),
                    _ => None,
                };
                match codes {
                    Some(c) => Self::Quant(Quantized::Codes(c)),
                    // Q8_0 (often the embedding and output projection) keeps its 8-bit values
                    // on the int8 kernel rather than losing a bit to 7-bit codes.
                    None if q.dtype() == GgmlDType::Q8_0 => {
                        let w = q.dequantize(device)?;
                        match q8_0(&w)? {
                            Some(quant) => Self::Quant(quant),
                            None => auto_cpu(w)?,
                        }
                    }
                    None => auto_cpu(q.dequantize(device)?)?,
                }
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
            WeightForm::Auto if device.is_cpu() => auto_cpu(w),
            WeightForm::Auto => dense(DType::F16),
        }
    }

    /// `(rows, in)` f32 → `(rows, out)` f32.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Quant(q) => q.forward(x)?,
            Self::Dense(w) => dense_forward(w, x)?,
        })
    }
}

impl Linear {
    /// The host kernel's matrix, if this layer runs one.
    fn host_matrix(&self) -> Option<HostMatrix<'_>> {
        match self {
            Self::Quant(Quantized::Int8(m)) => Some(HostMatrix::Int8(m)),
            Self::Quant(Quantized::Codes(m)) => Some(HostMatrix::Codes(m)),
            _ => None,
        }
    }

    /// Whether [`Linear::forward_host`] suits this layer: CPU weights (the host path hands
    /// activations over as CPU buffers).
    pub(crate) fn is_host(&self) -> bool {
        match self {
            Self::Quant(Quantized::Int8(_) | Quantized::Codes(_)) => true,
            Self::Quant(Quantized::Candle(_)) => false,
            Self::Dense(w) => w.device().is_cpu(),
        }
    }

    /// Host buffers: `x (rows, in)` f32 → `(rows, out)` f32, row-major. The host kernels run
    /// directly on the buffers; other forms go through a CPU tensor.
    pub(crate) fn forward_host(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        match self.host_matrix() {
            Some(HostMatrix::Int8(m)) => return Ok(m.matmul(x, rows)),
            Some(HostMatrix::Codes(m)) => return Ok(m.matmul(x, rows)),
            None => {}
        }
        let cols = x.len() / rows.max(1);
        let t = Tensor::from_slice(x, (rows, cols), &Device::Cpu)?;
        Ok(self.forward(&t)?.flatten_all()?.to_vec1::<f32>()?)
    }

    /// [`Linear::forward_host`] of several layers on the same input (Q/K/V, gate/up): one
    /// activation quantization and one parallel dispatch when all run the same host kernel.
    pub(crate) fn forward_host_many<const N: usize>(
        layers: [&Linear; N],
        x: &[f32],
        rows: usize,
    ) -> Result<[Vec<f32>; N]> {
        let matrices: Vec<Option<HostMatrix>> = layers.iter().map(|l| l.host_matrix()).collect();
        let int8: Option<Vec<&Q8Matrix>> = matrices.iter().map(|&m| m?.int8()).collect();
        let codes: Option<Vec<&CodeMatrix>> = matrices.iter().map(|&m| m?.codes()).collect();
        let outs = match (int8, codes) {
            (Some(mats), _) => q8::matmul_many(&mats, x, rows),
            (_, Some(mats)) => codes::matmul_many(&mats, x, rows),
            _ => layers
                .iter()
                .map(|l| l.forward_host(x, rows))
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

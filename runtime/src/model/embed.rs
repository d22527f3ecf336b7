//! The token embedding: the rows of the step's tokens as f32, from the form the weights take.
//!
//! A GGUF embedding stays in the file's own form (Q8_0 or Q4_0 keep a quarter or an eighth of
//! an f32 table's memory: 128k × 2048 Llama-3.2 rows are 1 GB in f32), and only the looked-up
//! rows are dequantized. A tied embedding (no `output.weight`) is read from the output
//! projection's own matrix, so the table is held once. It owns the lookup, not the weights'
//! loading ([`super::load`]) or the output projection's matmul ([`super::linear`]).

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use half::{bf16, f16};

use super::linear::{row_bytes, Linear};
use crate::{Error, Result};

/// Where a model's embedding rows come from.
#[derive(Debug)]
pub(crate) enum Embedding {
    /// A `(vocab, hidden)` f32 table on the model's device.
    Dense(Tensor),
    /// The file's bytes of a `(vocab, hidden)` table, rows dequantized on lookup (CPU).
    Packed {
        dtype: GgmlDType,
        hidden: usize,
        data: Vec<u8>,
    },
    /// The rows of the output projection (tied embeddings).
    Tied,
}

/// Whether [`dequantize_row`] reads `dtype`.
pub(crate) fn packs(dtype: GgmlDType) -> bool {
    matches!(
        dtype,
        GgmlDType::F32
            | GgmlDType::F16
            | GgmlDType::BF16
            | GgmlDType::Q4_0
            | GgmlDType::Q4_1
            | GgmlDType::Q8_0
    )
}

/// GGML's dequantization of one row's bytes into `out`.
fn dequantize_row(dtype: GgmlDType, src: &[u8], out: &mut [f32]) -> Result<()> {
    let half = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
    match dtype {
        GgmlDType::F32 => {
            for (v, b) in out.iter_mut().zip(src.chunks_exact(4)) {
                *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlDType::F16 => {
            for (v, b) in out.iter_mut().zip(src.chunks_exact(2)) {
                *v = half(b);
            }
        }
        GgmlDType::BF16 => {
            for (v, b) in out.iter_mut().zip(src.chunks_exact(2)) {
                *v = bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        GgmlDType::Q8_0 => {
            for (dst, b) in out.chunks_exact_mut(32).zip(src.chunks_exact(34)) {
                let d = half(b);
                for (v, &q) in dst.iter_mut().zip(&b[2..]) {
                    *v = f32::from(q as i8) * d;
                }
            }
        }
        GgmlDType::Q4_0 | GgmlDType::Q4_1 => {
            let (size, has_min) = if dtype == GgmlDType::Q4_0 {
                (18, false)
            } else {
                (20, true)
            };
            for (dst, b) in out.chunks_exact_mut(32).zip(src.chunks_exact(size)) {
                let d = half(b);
                let (m, qs) = if has_min {
                    (half(&b[2..]), &b[4..])
                } else {
                    (0.0, &b[2..])
                };
                let offset = if has_min { 0 } else { 8 };
                for (k, &byte) in qs.iter().enumerate() {
                    let (lo, hi) = (i32::from(byte & 0x0f), i32::from(byte >> 4));
                    dst[k] = (lo - offset) as f32 * d + m;
                    dst[k + 16] = (hi - offset) as f32 * d + m;
                }
            }
        }
        other => {
            return Err(Error::Weights(format!(
                "cannot look up embedding rows of type {other:?}"
            )))
        }
    }
    Ok(())
}

impl Embedding {
    /// The rows of `ids`, `(ids.len(), hidden)` row-major f32. Ids are checked against the
    /// vocabulary by the caller; one past the table is still an error here, not a panic.
    pub(crate) fn rows_host(&self, ids: &[u32], hidden: usize, head: &Linear) -> Result<Vec<f32>> {
        let mut x = vec![0f32; ids.len() * hidden];
        let missing = |id: usize| Error::Weights(format!("token {id} has no embedding row"));
        match self {
            Self::Dense(t) => {
                if let Some(&bad) = ids.iter().find(|&&id| id as usize >= t.dim(0).unwrap_or(0)) {
                    return Err(missing(bad as usize));
                }
                let index = Tensor::from_slice(ids, ids.len(), t.device())?;
                x = t.index_select(&index, 0)?.flatten_all()?.to_vec1::<f32>()?;
            }
            Self::Packed {
                dtype,
                hidden: h,
                data,
            } => {
                let size = row_bytes(*dtype, *h);
                for (row, &id) in x.chunks_exact_mut(hidden).zip(ids) {
                    let id = id as usize;
                    let src = data
                        .get(id * size..(id + 1) * size)
                        .ok_or_else(|| missing(id))?;
                    dequantize_row(*dtype, src, row)?;
                }
            }
            Self::Tied => {
                for (row, &id) in x.chunks_exact_mut(hidden).zip(ids) {
                    head.row_into(id as usize, row)?;
                }
            }
        }
        Ok(x)
    }

    /// The rows of `ids` as a `(ids.len(), hidden)` f32 tensor on `device`.
    pub(crate) fn rows(
        &self,
        ids: &[u32],
        hidden: usize,
        head: &Linear,
        device: &Device,
    ) -> Result<Tensor> {
        if let Self::Dense(t) = self {
            let ids = Tensor::from_slice(ids, ids.len(), device)?;
            return Ok(t.index_select(&ids, 0)?);
        }
        let rows = self.rows_host(ids, hidden, head)?;
        Ok(Tensor::from_vec(rows, (ids.len(), hidden), device)?)
    }

    /// Bytes the table holds of its own (nothing when tied).
    pub(crate) fn own_bytes(&self) -> usize {
        match self {
            Self::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Self::Packed { data, .. } => data.len(),
            Self::Tied => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::QTensor;

    use super::*;

    /// Every packed type's rows are candle's own dequantization of the same tensor.
    #[test]
    fn packed_rows_are_candles_dequantization() {
        let (vocab, hidden) = (7, 64);
        let w = super::super::pseudo_random(vocab * hidden, 9);
        let t = Tensor::from_slice(&w, (vocab, hidden), &Device::Cpu).unwrap();
        let head = Linear::Dense(t.clone());
        for dtype in [
            GgmlDType::F32,
            GgmlDType::F16,
            GgmlDType::BF16,
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q8_0,
        ] {
            assert!(packs(dtype));
            let q = QTensor::quantize(&t, dtype).unwrap();
            let want = super::super::dequantized(&q);
            let e = Embedding::Packed {
                dtype,
                hidden,
                data: q.data().unwrap().into_owned(),
            };
            let ids = [3u32, 0, 6, 3];
            let got = e.rows_host(&ids, hidden, &head).unwrap();
            for (row, &id) in got.chunks_exact(hidden).zip(&ids) {
                let id = id as usize;
                assert_eq!(row, &want[id * hidden..(id + 1) * hidden], "{dtype:?}");
            }
            assert!(e.rows_host(&[7], hidden, &head).is_err());
        }
        assert!(!packs(GgmlDType::Q4K));
    }
}

//! Keeping GGUF's Q4_0 and Q4_1 tensors as they are: their scales, offsets and nibbles copied
//! into the panel layout of a [`CodeMatrix`], whole or a few panels of rows at a time, never
//! re-quantized. Quantizing other weights and the kernels live in the parent module.

use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;

use super::{CodeMatrix, BLOCK, GROUP, PACKED_BLOCK, PANEL, PANEL_GROUP};
use crate::{Error, Result};

impl CodeMatrix {
    /// The codes of a GGUF Q4_0 or Q4_1 tensor `(out, inp)` exactly as stored; `None` for
    /// other types.
    pub(crate) fn from_q4(q: &QTensor) -> Result<Option<Self>> {
        let (out, inp) = q.shape().dims2()?;
        Self::from_q4_bytes(q.dtype(), &q.data()?, out, inp)
    }

    /// [`CodeMatrix::from_q4`] from the tensor's bytes as the file stores them.
    pub(crate) fn from_q4_bytes(
        dtype: GgmlDType,
        data: &[u8],
        out: usize,
        inp: usize,
    ) -> Result<Option<Self>> {
        let Some(row_bytes) = Self::q4_row_bytes(dtype, inp) else {
            return Ok(None);
        };
        if Some(data.len()) != out.checked_mul(row_bytes) {
            return Err(Error::Weights(format!(
                "{dtype:?} tensor ({out}, {inp}) holds {} bytes, expected {}",
                data.len(),
                out.saturating_mul(row_bytes)
            )));
        }
        let mut mat = Self::zeroed(out, inp, true, dtype == GgmlDType::Q4_1);
        mat.fill_q4_rows(0, data);
        Ok(Some(mat))
    }

    /// [`CodeMatrix::from_q4`] reading the tensor's bytes a few panels of rows at a time:
    /// `read(first_row, buf)` fills `buf` with whole rows as the file stores them. The file's
    /// bytes never sit in memory beside the matrix (for a 128k-token output projection, that
    /// was a transient 150 MB).
    pub(crate) fn from_q4_reader(
        dtype: GgmlDType,
        out: usize,
        inp: usize,
        mut read: impl FnMut(usize, &mut [u8]) -> Result<()>,
    ) -> Result<Option<Self>> {
        /// Panels of rows per read.
        const PANELS_PER_READ: usize = 8;
        let Some(row_bytes) = Self::q4_row_bytes(dtype, inp) else {
            return Ok(None);
        };
        let mut mat = Self::zeroed(out, inp, true, dtype == GgmlDType::Q4_1);
        let rows_per_read = PANEL * PANELS_PER_READ;
        let mut buf = vec![0u8; rows_per_read.min(out) * row_bytes];
        for first in (0..out).step_by(rows_per_read) {
            let rows = rows_per_read.min(out - first);
            let chunk = &mut buf[..rows * row_bytes];
            read(first, chunk)?;
            mat.fill_q4_rows(first, chunk);
        }
        Ok(Some(mat))
    }

    /// Bytes of one row of a Q4_0 or Q4_1 tensor with `inp` inputs; `None` for other types
    /// and widths that are not whole blocks.
    fn q4_row_bytes(dtype: GgmlDType, inp: usize) -> Option<usize> {
        let block_bytes = match dtype {
            GgmlDType::Q4_0 => 2 + BLOCK / 2,
            GgmlDType::Q4_1 => 4 + BLOCK / 2,
            _ => return None,
        };
        inp.is_multiple_of(BLOCK)
            .then_some(inp / BLOCK * block_bytes)
    }

    /// Stores GGUF Q4 rows `first..` (whole rows, as the file stores them) in a matrix made
    /// by `zeroed(.., true, offsets)`.
    fn fill_q4_rows(&mut self, first: usize, data: &[u8]) {
        let nb = self.inp / BLOCK;
        let has_min = self.offsets;
        let block_bytes = if has_min { 4 } else { 2 } + BLOCK / 2;
        let per_block = Self::half_scales_per_block(has_min);
        for (r, row) in data.chunks_exact(nb * block_bytes).enumerate() {
            let j = first + r;
            let (p, c) = (j / PANEL, j % PANEL);
            for (b, block) in row.chunks_exact(block_bytes).enumerate() {
                let at = (p * nb + b) * per_block + c;
                self.dm16[at] = f16::from_le_bytes([block[0], block[1]]);
                let qs = if has_min {
                    self.dm16[at + PANEL] = f16::from_le_bytes([block[2], block[3]]);
                    &block[4..]
                } else {
                    &block[2..]
                };
                // GGML packs code `k` in the low nibble of byte `k` and code `k + 16` in its
                // high nibble: bytes `4g..4g + 4` are lane `c` of group pair `g` as they stand.
                let base = (p * nb + b) * PACKED_BLOCK + c * GROUP;
                for (g, four) in qs.chunks_exact(GROUP).enumerate() {
                    self.codes[base + g * PANEL_GROUP..][..GROUP].copy_from_slice(four);
                }
            }
        }
    }
}

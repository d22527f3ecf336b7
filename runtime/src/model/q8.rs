//! Tollgate's own int8 matmul for CPU decode and small batches.
//!
//! candle's quantized CPU matmul runs one `vec_dot` per (activation row, weight row) and stays
//! at ≈ 13–25 GFLOP/s whatever the number of rows (measured on the dev model). This kernel keeps weights as
//! Q8_0-style blocks (32 int8 values and one f32 scale), quantizes the activations the same
//! way, and computes tiles of up to [`ROW_TILE`] activation rows against each weight row, so a
//! weight block is loaded once per tile instead of once per row, with int8 dot products
//! (AVX-512 VNNI where present, AVX2 otherwise; see [`super::cpu`]). Output features are split
//! across threads.
//!
//! Numerics: the same as candle's Q8_0 × Q8_0 path (block scales `amax / 127`, round to
//! nearest), except that scales are kept in f32 instead of f16. Every path sums the same
//! integer products into the same 8 lanes and adds the lanes in the same order, so all paths
//! give bit-identical results.

use rayon::prelude::*;

use half::f16;

use super::cpu::CpuKernels;
use crate::{Error, Result};

/// Values per quantization block.
pub(crate) const BLOCK: usize = 32;
/// Activation rows computed together against one weight row (each row's arithmetic is the
/// same whatever tile it falls in; 8 accumulators fit the AVX2 and AVX-512 registers).
const ROW_TILE: usize = 8;
/// Output features per parallel work item.
const FEATURES_PER_TASK: usize = 64;

/// A weight matrix `(out, in)` in int8 blocks.
#[derive(Debug)]
pub(crate) struct Q8Matrix {
    out: usize,
    inp: usize,
    /// `out * inp` quantized values, row-major.
    qs: Vec<i8>,
    /// `out * inp / BLOCK` scales.
    scales: Vec<f32>,
}

/// Activations `(rows, in)` quantized per block.
struct Q8Rows {
    qs: Vec<i8>,
    scales: Vec<f32>,
}

/// Quantizes one block: returns its scale and writes 32 values.
fn quantize_block(x: &[f32], out: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    for (q, v) in out.iter_mut().zip(x) {
        *q = round_to_i8(v * inv);
    }
    d
}

/// `x.round().clamp(-127.0, 127.0) as i8` (halves away from zero, NaN to 0), bit for bit,
/// without `round`: x86-64's baseline has no rounding instruction, so `round` is a call to
/// the C library's `roundf` per value, which made quantizing the activations of a few rows
/// cost a tenth of a pass. Clamping first changes nothing (every value past ±127 rounds to
/// ±127 or beyond); then truncation, and the fraction `c - trunc(c)`, which is exact.
#[inline(always)]
pub(crate) fn round_to_i8(x: f32) -> i8 {
    let c = x.clamp(-127.0, 127.0);
    let t = c as i32;
    let frac = c - t as f32;
    (t + i32::from(frac >= 0.5) - i32::from(frac <= -0.5)) as i8
}

fn quantize_rows(x: &[f32], rows: usize, inp: usize) -> Q8Rows {
    let nb = inp / BLOCK;
    let mut qs = vec![0i8; rows * inp];
    let mut scales = vec![0f32; rows * nb];
    for ((xb, qb), d) in x
        .chunks_exact(BLOCK)
        .zip(qs.chunks_exact_mut(BLOCK))
        .zip(scales.iter_mut())
    {
        *d = quantize_block(xb, qb);
    }
    Q8Rows { qs, scales }
}

/// `x (rows, inp)` times several matrices of the same `inp` (a fused Q/K/V or gate/up
/// projection): the activations are quantized once and every matrix's output features are
/// split across threads in one parallel dispatch. Returns one `(rows, out_i)` row-major
/// output per matrix.
pub(crate) fn matmul_many(mats: &[&Q8Matrix], x: &[f32], rows: usize) -> Vec<Vec<f32>> {
    matmul_many_on(CpuKernels::selected(), mats, x, rows)
}

/// [`matmul_many`] on the given kernel path (which the CPU must have).
fn matmul_many_on(
    kernels: CpuKernels,
    mats: &[&Q8Matrix],
    x: &[f32],
    rows: usize,
) -> Vec<Vec<f32>> {
    assert!(
        kernels.is_available(),
        "{kernels} kernels on a CPU without them"
    );
    let Some(inp) = mats.first().map(|m| m.inp) else {
        return Vec::new();
    };
    debug_assert!(mats.iter().all(|m| m.inp == inp));
    debug_assert_eq!(x.len(), rows * inp);
    let xq = quantize_rows(x, rows, inp);
    // Computed feature-major (`(out, rows)`) so threads own disjoint chunks, then transposed.
    let mut by_feature: Vec<Vec<f32>> = mats.iter().map(|m| vec![0f32; m.out * rows]).collect();
    let mut tasks: Vec<(&Q8Matrix, usize, &mut [f32])> = Vec::new();
    for (m, buf) in mats.iter().zip(by_feature.iter_mut()) {
        for (task, chunk) in buf.chunks_mut(FEATURES_PER_TASK * rows).enumerate() {
            tasks.push((m, task * FEATURES_PER_TASK, chunk));
        }
    }
    tasks.into_par_iter().for_each(|(m, first, chunk)| {
        for (k, dst) in chunk.chunks_exact_mut(rows).enumerate() {
            m.row_dots(kernels, first + k, &xq, rows, dst);
        }
    });
    if rows == 1 {
        return by_feature;
    }
    by_feature
        .iter()
        .zip(mats)
        .map(|(f, m)| {
            let mut y = vec![0f32; rows * m.out];
            for (j, col) in f.chunks_exact(rows).enumerate() {
                for (r, v) in col.iter().enumerate() {
                    y[r * m.out + j] = *v;
                }
            }
            y
        })
        .collect()
}

impl Q8Matrix {
    /// Whether the fast kernel applies to a `(out, inp)` matrix on this CPU: `inp` must be a
    /// multiple of the block size, and the selected kernels SIMD. (On the scalar path a
    /// portable loop would run; it is correct but slower than candle's kernels, so callers
    /// keep candle there.)
    pub(crate) fn is_fast_for(inp: usize) -> bool {
        inp.is_multiple_of(BLOCK) && CpuKernels::selected().has_avx2()
    }

    /// Quantizes row-major f32 weights `(out, inp)`.
    pub(crate) fn quantize(w: &[f32], out: usize, inp: usize) -> Self {
        debug_assert_eq!(w.len(), out * inp);
        let q = quantize_rows(w, out, inp);
        Self {
            out,
            inp,
            qs: q.qs,
            scales: q.scales,
        }
    }

    /// A GGUF Q8_0 tensor `(out, inp)` as stored (blocks of an f16 scale and 32 int8 values):
    /// the same values, with the scales widened to f32. `None` when `inp` is not a multiple
    /// of the block size.
    pub(crate) fn from_q8_0_bytes(data: &[u8], out: usize, inp: usize) -> Result<Option<Self>> {
        const BLOCK_BYTES: usize = 2 + BLOCK;
        if !inp.is_multiple_of(BLOCK) {
            return Ok(None);
        }
        let blocks = out
            .checked_mul(inp / BLOCK)
            .filter(|b| b.checked_mul(BLOCK_BYTES) == Some(data.len()))
            .ok_or_else(|| {
                Error::Weights(format!(
                    "Q8_0 tensor ({out}, {inp}) holds {} bytes, expected {}",
                    data.len(),
                    out.saturating_mul(inp / BLOCK).saturating_mul(BLOCK_BYTES)
                ))
            })?;
        let mut qs = Vec::with_capacity(blocks * BLOCK);
        let mut scales = Vec::with_capacity(blocks);
        for block in data.chunks_exact(BLOCK_BYTES) {
            scales.push(f16::from_le_bytes([block[0], block[1]]).to_f32());
            qs.extend(block[2..].iter().map(|&b| b as i8));
        }
        Ok(Some(Self {
            out,
            inp,
            qs,
            scales,
        }))
    }

    /// Weight row `j` as f32 (`q · d`, GGML's dequantization), into `out` (`inp` values): a
    /// tied embedding's lookup.
    pub(crate) fn row_into(&self, j: usize, out: &mut [f32]) {
        let nb = self.inp / BLOCK;
        let qs = &self.qs[j * self.inp..(j + 1) * self.inp];
        for ((dst, src), &d) in out
            .chunks_exact_mut(BLOCK)
            .zip(qs.chunks_exact(BLOCK))
            .zip(&self.scales[j * nb..(j + 1) * nb])
        {
            for (v, &q) in dst.iter_mut().zip(src) {
                *v = f32::from(q) * d;
            }
        }
    }

    pub(crate) fn out_features(&self) -> usize {
        self.out
    }

    /// `x (rows, inp)` → `(rows, out)`, row-major.
    pub(crate) fn matmul(&self, x: &[f32], rows: usize) -> Vec<f32> {
        matmul_many(&[self], x, rows).pop().unwrap_or_default()
    }

    /// Dot products of weight row `j` with every activation row, into `dst[r]`.
    fn row_dots(&self, kernels: CpuKernels, j: usize, xq: &Q8Rows, rows: usize, dst: &mut [f32]) {
        let (inp, nb) = (self.inp, self.inp / BLOCK);
        let w = &self.qs[j * inp..(j + 1) * inp];
        let wd = &self.scales[j * nb..(j + 1) * nb];
        let mut r = 0;
        while r < rows {
            let tile = (rows - r).min(ROW_TILE);
            let xs = &xq.qs[r * inp..(r + tile) * inp];
            let xd = &xq.scales[r * nb..(r + tile) * nb];
            let out = &mut dst[r..r + tile];
            match kernels {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the CPU has the path's features (asserted by `matmul_many_on`); slices are
                // `tile * inp` long with `inp` a multiple of BLOCK.
                CpuKernels::Avx512 => unsafe { x86::tile_vnni(w, wd, xs, xd, inp, tile, out) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                CpuKernels::Avx2 => unsafe { x86::tile_avx2(w, wd, xs, xd, inp, tile, out) },
                _ => tile_scalar(w, wd, xs, xd, inp, tile, out),
            }
            r += tile;
        }
    }
}

/// Lanes of the SIMD accumulators, which the portable loop mirrors.
const LANES: usize = 8;

/// The portable loop, with the SIMD paths' arithmetic: lane `l` of a block sums the integer
/// products `4l..4l+4`, is scaled and accumulated with a fused multiply-add, and the lanes are
/// added pairwise at the end as the SIMD horizontal sum does.
fn tile_scalar(
    w: &[i8],
    wd: &[f32],
    xs: &[i8],
    xd: &[f32],
    inp: usize,
    tile: usize,
    out: &mut [f32],
) {
    let nb = inp / BLOCK;
    for (t, o) in out.iter_mut().enumerate().take(tile) {
        let x = &xs[t * inp..(t + 1) * inp];
        let d = &xd[t * nb..(t + 1) * nb];
        let mut acc = [0f32; LANES];
        for b in 0..nb {
            let scale = wd[b] * d[b];
            let wb = w[b * BLOCK..(b + 1) * BLOCK].chunks_exact(BLOCK / LANES);
            let xb = x[b * BLOCK..(b + 1) * BLOCK].chunks_exact(BLOCK / LANES);
            for ((a, wl), xl) in acc.iter_mut().zip(wb).zip(xb) {
                let s: i32 = wl
                    .iter()
                    .zip(xl)
                    .map(|(&p, &q)| i32::from(p) * i32::from(q))
                    .sum();
                *a = (s as f32).mul_add(scale, *a);
            }
        }
        *o = hsum_lanes(&acc);
    }
}

/// `Σ v` in the order of the SIMD horizontal sum: halves, then pairs, then the last two.
fn hsum_lanes(v: &[f32; LANES]) -> f32 {
    let q = [v[0] + v[4], v[1] + v[5], v[2] + v[6], v[3] + v[7]];
    (q[0] + q[2]) + (q[1] + q[3])
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{BLOCK, ROW_TILE};

    /// Horizontal sum of 8 f32 lanes.
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// `tile` activation rows against one weight row, int8 dot products by VNNI.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA, AVX-512 VNNI and VL; `w` is `inp` long, `xs` is `tile * inp`,
    /// `wd` is `inp / BLOCK`, `xd` is `tile * inp / BLOCK`, `out` is `tile`, `tile <= ROW_TILE`.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512vnni")]
    pub(super) unsafe fn tile_vnni(
        w: &[i8],
        wd: &[f32],
        xs: &[i8],
        xd: &[f32],
        inp: usize,
        tile: usize,
        out: &mut [f32],
    ) {
        let nb = inp / BLOCK;
        let mut acc = [_mm256_setzero_ps(); ROW_TILE];
        for b in 0..nb {
            // SAFETY: in bounds by the function's contract; unaligned loads.
            let wv = unsafe { _mm256_loadu_si256(w.as_ptr().add(b * BLOCK).cast()) };
            // u8 |w| times i8 x·sign(w) is w·x, which VNNI's unsigned×signed product needs.
            let aw = _mm256_sign_epi8(wv, wv);
            let d = wd[b];
            for t in 0..tile {
                // SAFETY: as above.
                let xv = unsafe { _mm256_loadu_si256(xs.as_ptr().add(t * inp + b * BLOCK).cast()) };
                let sx = _mm256_sign_epi8(xv, wv);
                let dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), aw, sx);
                let scale = _mm256_set1_ps(d * xd[t * nb + b]);
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[t]);
            }
        }
        for t in 0..tile {
            out[t] = hsum(acc[t]);
        }
    }

    /// As [`tile_vnni`] with AVX2 only: the u8×i8 products are summed in i16 pairs (no
    /// saturation: |w|, |x| ≤ 127) and then in i32.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; the slice contract of [`tile_vnni`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile_avx2(
        w: &[i8],
        wd: &[f32],
        xs: &[i8],
        xd: &[f32],
        inp: usize,
        tile: usize,
        out: &mut [f32],
    ) {
        let nb = inp / BLOCK;
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); ROW_TILE];
        for b in 0..nb {
            // SAFETY: in bounds by the function's contract; unaligned loads.
            let wv = unsafe { _mm256_loadu_si256(w.as_ptr().add(b * BLOCK).cast()) };
            let aw = _mm256_sign_epi8(wv, wv);
            let d = wd[b];
            for t in 0..tile {
                // SAFETY: as above.
                let xv = unsafe { _mm256_loadu_si256(xs.as_ptr().add(t * inp + b * BLOCK).cast()) };
                let sx = _mm256_sign_epi8(xv, wv);
                let pairs = _mm256_maddubs_epi16(aw, sx);
                let dot = _mm256_madd_epi16(pairs, ones);
                let scale = _mm256_set1_ps(d * xd[t * nb + b]);
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[t]);
            }
        }
        for t in 0..tile {
            out[t] = hsum(acc[t]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::pseudo_random;
    use super::*;

    /// Every kernel path this CPU has gives bit for bit the portable loop's result, for row
    /// counts that exercise full and partial tiles, and the result is close to the f32 product.
    #[test]
    fn kernels_agree_with_the_portable_loop_and_f32() {
        let (out, inp) = (130, 96);
        let w = pseudo_random(out * inp, 1);
        let m = Q8Matrix::quantize(&w, out, inp);
        for kernels in CpuKernels::available() {
            println!("q8 kernels: {kernels}");
            for rows in [1, 3, 4, 5, 8, 9, 17] {
                let x = pseudo_random(rows * inp, rows as u32 + 7);
                let y = matmul_many_on(kernels, &[&m], &x, rows).pop().unwrap();
                let xq = quantize_rows(&x, rows, inp);
                for r in 0..rows {
                    for j in 0..out {
                        let mut scalar = [0f32];
                        tile_scalar(
                            &m.qs[j * inp..(j + 1) * inp],
                            &m.scales[j * 3..(j + 1) * 3],
                            &xq.qs[r * inp..(r + 1) * inp],
                            &xq.scales[r * 3..(r + 1) * 3],
                            inp,
                            1,
                            &mut scalar,
                        );
                        let got = y[r * out + j];
                        assert_eq!(
                            got.to_bits(),
                            scalar[0].to_bits(),
                            "{kernels}: rows {rows} r {r} j {j}: {got} vs {}",
                            scalar[0]
                        );
                        let exact: f32 = (0..inp).map(|k| w[j * inp + k] * x[r * inp + k]).sum();
                        // Two 8-bit quantizations: error well under 2% of the row norms' product.
                        assert!((got - exact).abs() < 0.1, "{got} vs exact {exact}");
                    }
                }
            }
        }
    }

    /// A Q8_0 tensor keeps its stored values: its rows are candle's dequantization exactly,
    /// and a wrong byte count is an error, not a panic.
    #[test]
    fn q8_0_tensors_are_read_exactly() {
        use candle_core::quantized::{GgmlDType, QTensor};
        use candle_core::{Device, Tensor};
        let (out, inp) = (40, 96);
        let w = pseudo_random(out * inp, 5);
        let t = Tensor::from_slice(&w, (out, inp), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
        let deq = super::super::dequantized(&q);
        let data = q.data().unwrap();
        let m = Q8Matrix::from_q8_0_bytes(&data, out, inp).unwrap().unwrap();
        let mut row = vec![0f32; inp];
        for j in 0..out {
            m.row_into(j, &mut row);
            assert_eq!(row, deq[j * inp..(j + 1) * inp], "row {j}");
        }
        assert!(Q8Matrix::from_q8_0_bytes(&data[1..], out, inp).is_err());
        assert!(Q8Matrix::from_q8_0_bytes(&data, usize::MAX, inp).is_err());
        assert!(Q8Matrix::from_q8_0_bytes(&data, out, 33).unwrap().is_none());
    }

    /// The rounding without `roundf` is `round` then the clamp, bit for bit: on a sweep of
    /// every 4099th bit pattern (both signs, NaNs and infinities included), on the halves and
    /// their neighbours, and around the clamp.
    #[test]
    fn round_to_i8_is_round_then_clamp() {
        let reference = |x: f32| x.round().clamp(-127.0, 127.0) as i8;
        let mut values: Vec<f32> = (0..=u32::MAX).step_by(4099).map(f32::from_bits).collect();
        for k in -130..=130 {
            let half = k as f32 + 0.5;
            for x in [half, k as f32, -half] {
                values.extend([
                    x,
                    f32::from_bits(x.to_bits().wrapping_add(1)),
                    f32::from_bits(x.to_bits().wrapping_sub(1)),
                ]);
            }
        }
        values.extend([
            0.0,
            -0.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.499_999_97,
        ]);
        for x in values {
            assert_eq!(round_to_i8(x), reference(x), "{x:e} ({:#x})", x.to_bits());
        }
    }

    #[test]
    fn zero_blocks_quantize_to_zero() {
        let mut q = [1i8; BLOCK];
        assert_eq!(quantize_block(&[0.0; BLOCK], &mut q), 0.0);
        assert!(q.iter().all(|&v| v == 0));
    }
}

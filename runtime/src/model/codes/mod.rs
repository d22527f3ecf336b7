//! Tollgate's CPU matmul for the `auto` weight form: unsigned block codes, packed so batched
//! decode and prefill get faster per token as rows are added.
//!
//! A weight is `d·q + m` with an unsigned code `q` and a scale `d` and offset `m` per block of
//! 32 inputs of one output feature. GGUF's Q4_0 and Q4_1 tensors are exactly this with 4-bit
//! codes (Q4_0's offset is `-8d`), so their weights are kept as they are, not re-quantized;
//! other sources are quantized to 7-bit codes over each block's `[min, max]`. Activations are
//! quantized per block to signed 8 bits with a scale and the scaled sum of their codes (as
//! GGML's Q8_1), so a block's product is `d·dx·Σ q·qx + m·(dx·Σ qx)`.
//!
//! Codes are packed in panels of [`PANEL`] output features whose bytes are interleaved
//! [`GROUP`] at a time: one 256-bit load holds four consecutive codes of each of 8 features,
//! and one `vpmaddubsw` against four broadcast activation bytes advances 8 dot products at
//! once: no horizontal sums, sign tricks or float work inside a block. Codes of at most 7 bits
//! times activations of at most 127 never saturate its 16-bit pair sums; 4-bit codes can even
//! sum a whole block in 16 bits (8 × 2 × 15 × 127 < 2^15) before widening. Tiles of up to
//! [`ROW_TILE`] activation rows share every code load, and panels are split across threads.
//!
//! 4-bit codes take half a byte each, paired as GGML pairs them (the low nibbles hold a
//! block's first 16 codes, the high nibbles its last 16), so loading copies the file's bytes
//! 4 at a time into the panel layout and the kernel unpacks one load into two groups with a
//! mask and a shift. Scales and Q4_1's offsets stay the f16 values the file stores, Q4_0's
//! offset `-8d` is computed where it is used: a Q4 matrix is exactly as large as its tensor.
//!
//! With AVX-512 VNNI one 512-bit load holds a whole group of the panel (4 codes of each of the
//! 16 features) and one `vpdpbusd` per row adds the four u8×i8 products of every feature
//! straight into 32-bit lanes.
//!
//! Every activation row goes through the same operations in the same order whatever tile it
//! falls in, so a row's result does not depend on the other rows of the call; the integer dot
//! products are exact on every path and the float operations are the same, so the portable,
//! AVX2 and AVX-512 paths agree bit for bit.
//!
//! Q4 tensors are copied into the panel layout in `q4.rs`; the AVX2 and AVX-512 tiles are in
//! `x86.rs`.

use half::f16;
use rayon::prelude::*;

use super::cpu::CpuKernels;
use super::q8::round_to_i8;

/// Inputs per quantization block.
pub(crate) const BLOCK: usize = 32;
/// Output features per panel.
const PANEL: usize = 16;
/// Consecutive codes of one feature per 32-bit lane.
const GROUP: usize = 4;
/// Groups per block.
const GROUPS: usize = BLOCK / GROUP;
/// Code bytes of one block of one panel (7-bit codes).
const PANEL_BLOCK: usize = PANEL * BLOCK;
/// Code bytes of one block of one panel (4-bit codes, two per byte).
const PACKED_BLOCK: usize = PANEL_BLOCK / 2;
/// Code bytes of one group of one panel.
const PANEL_GROUP: usize = PANEL * GROUP;
/// Activation rows computed together against each code load: AVX-512 has the registers for
/// 8 rows' accumulators (a verify pass of a draft is often 5 to 9 rows), the other paths for 4.
/// A row's arithmetic is the same whatever tile it falls in.
const ROW_TILE: usize = 4;
const ROW_TILE_AVX512: usize = 8;
/// Panels per parallel work item.
const PANELS_PER_TASK: usize = 4;
/// Largest code of re-quantized weights (7 bits: pair sums of `vpmaddubsw` cannot saturate).
const MAX_CODE: u8 = 127;

/// A weight matrix `(out, in)` as unsigned block codes, packed in panels.
#[derive(Debug)]
pub(crate) struct CodeMatrix {
    out: usize,
    inp: usize,
    /// Every code is at most 15 (4 bits): codes are packed two per byte, scales and offsets
    /// are f16, and a block's pair sums fit 16 bits.
    small: bool,
    /// `panels × blocks × GROUPS × PANEL × GROUP` codes; features past `out` are zero. When
    /// `small`, groups `g` and `g + GROUPS / 2` share bytes (low and high nibble).
    codes: Vec<u8>,
    /// 7-bit codes: `panels × blocks × PANEL` scales and offsets (empty when `small`).
    d: Vec<f32>,
    m: Vec<f32>,
    /// 4-bit codes: per panel and block, `PANEL` scales, then `PANEL` offsets if `offsets`
    /// (empty otherwise).
    dm16: Vec<f16>,
    /// Whether `dm16` holds offsets; without them a block's offset is `-8d` (Q4_0).
    offsets: bool,
}

/// Activations `(rows, in)` quantized per block: codes, scales `dx` and `dx · Σ codes`.
struct Q8Rows {
    qs: Vec<i8>,
    d: Vec<f32>,
    sums: Vec<f32>,
}

fn quantize_rows(x: &[f32]) -> Q8Rows {
    let blocks = x.len() / BLOCK;
    let mut rows = Q8Rows {
        qs: vec![0; x.len()],
        d: vec![0.0; blocks],
        sums: vec![0.0; blocks],
    };
    for (b, (xb, qb)) in x
        .chunks_exact(BLOCK)
        .zip(rows.qs.chunks_exact_mut(BLOCK))
        .enumerate()
    {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in qb.iter_mut().zip(xb) {
            *q = round_to_i8(v * inv);
            sum += i32::from(*q);
        }
        rows.d[b] = d;
        rows.sums[b] = d * sum as f32;
    }
    rows
}

/// `x (rows, inp)` times several matrices of the same `inp` (a fused Q/K/V or gate/up
/// projection): the activations are quantized once and every matrix's panels are split
/// across threads in one parallel dispatch. Returns one `(rows, out_i)` row-major output per
/// matrix.
pub(crate) fn matmul_many(mats: &[&CodeMatrix], x: &[f32], rows: usize) -> Vec<Vec<f32>> {
    matmul_many_on(CpuKernels::selected(), mats, x, rows)
}

/// [`matmul_many`] on the given kernel path (which the CPU must have).
fn matmul_many_on(
    kernels: CpuKernels,
    mats: &[&CodeMatrix],
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
    let xq = quantize_rows(x);
    // Computed panel-major (`(panels, rows, PANEL)`) so threads own disjoint chunks; for one
    // row that is already the row-major output.
    let mut by_panel: Vec<Vec<f32>> = mats
        .iter()
        .map(|m| vec![0f32; m.panels() * rows * PANEL])
        .collect();
    let mut tasks: Vec<(&CodeMatrix, usize, &mut [f32])> = Vec::new();
    for (m, buf) in mats.iter().zip(by_panel.iter_mut()) {
        for (task, chunk) in buf.chunks_mut(PANELS_PER_TASK * rows * PANEL).enumerate() {
            tasks.push((m, task * PANELS_PER_TASK, chunk));
        }
    }
    tasks.into_par_iter().for_each(|(m, first, chunk)| {
        for (k, dst) in chunk.chunks_exact_mut(rows * PANEL).enumerate() {
            m.panel_rows(kernels, first + k, &xq, rows, dst);
        }
    });
    by_panel
        .into_iter()
        .zip(mats)
        .map(|(buf, m)| {
            if rows == 1 {
                let mut y = buf;
                y.truncate(m.out);
                return y;
            }
            let mut y = vec![0f32; rows * m.out];
            for (p, panel) in buf.chunks_exact(rows * PANEL).enumerate() {
                let width = PANEL.min(m.out - p * PANEL);
                for (r, src) in panel.chunks_exact(PANEL).enumerate() {
                    y[r * m.out + p * PANEL..][..width].copy_from_slice(&src[..width]);
                }
            }
            y
        })
        .collect()
}

impl CodeMatrix {
    /// Whether the kernel applies to a matrix with `inp` inputs on the selected kernel path
    /// (on the scalar path a portable loop would run, slower than candle's kernels, so callers
    /// keep candle there).
    pub(crate) fn is_fast_for(inp: usize) -> bool {
        inp.is_multiple_of(BLOCK) && CpuKernels::selected().has_avx2()
    }

    /// An empty matrix of `out × inp` (zero codes) to fill block by block: 7-bit codes, or
    /// 4-bit ones (`small`) with or without stored offsets.
    fn zeroed(out: usize, inp: usize, small: bool, offsets: bool) -> Self {
        let (nb, panels) = (inp / BLOCK, out.div_ceil(PANEL));
        let (scales, half_scales) = if small {
            (0, panels * nb * Self::half_scales_per_block(offsets))
        } else {
            (panels * nb * PANEL, 0)
        };
        Self {
            out,
            inp,
            small,
            codes: vec![0; panels * nb * Self::block_bytes(small)],
            d: vec![0.0; scales],
            m: vec![0.0; scales],
            dm16: vec![f16::ZERO; half_scales],
            offsets,
        }
    }

    /// f16 values per panel and block of 4-bit codes.
    fn half_scales_per_block(offsets: bool) -> usize {
        if offsets {
            2 * PANEL
        } else {
            PANEL
        }
    }

    /// Code bytes of one block of one panel.
    fn block_bytes(small: bool) -> usize {
        if small {
            PACKED_BLOCK
        } else {
            PANEL_BLOCK
        }
    }

    /// Where code `k` of feature `c` of one panel's block is: byte offset in the block, and
    /// the shift of its nibble when `small`.
    fn code_at(small: bool, c: usize, k: usize) -> (usize, u32) {
        let (g, lane) = (k / GROUP, c * GROUP + k % GROUP);
        if small {
            let pairs = GROUPS / 2;
            ((g % pairs) * PANEL_GROUP + lane, 4 * (g / pairs) as u32)
        } else {
            (g * PANEL_GROUP + lane, 0)
        }
    }

    /// Stores feature `j`'s block `b` of 7-bit codes: codes, scale and offset.
    fn set_block(&mut self, j: usize, b: usize, codes: &[u8; BLOCK], d: f32, m: f32) {
        debug_assert!(!self.small);
        let nb = self.inp / BLOCK;
        let (p, c) = (j / PANEL, j % PANEL);
        let at = (p * nb + b) * PANEL + c;
        self.d[at] = d;
        self.m[at] = m;
        let base = (p * nb + b) * PANEL_BLOCK;
        for (k, &q) in codes.iter().enumerate() {
            self.codes[base + Self::code_at(false, c, k).0] = q;
        }
    }

    /// Feature `j`'s block `b`: codes, scale and offset.
    fn block(&self, j: usize, b: usize) -> ([u8; BLOCK], f32, f32) {
        let nb = self.inp / BLOCK;
        let (p, c) = (j / PANEL, j % PANEL);
        let (d, m) = if self.small {
            let at = (p * nb + b) * Self::half_scales_per_block(self.offsets) + c;
            let d = self.dm16[at].to_f32();
            let m = if self.offsets {
                self.dm16[at + PANEL].to_f32()
            } else {
                -8.0 * d
            };
            (d, m)
        } else {
            let at = (p * nb + b) * PANEL + c;
            (self.d[at], self.m[at])
        };
        let base = (p * nb + b) * Self::block_bytes(self.small);
        let mut codes = [0u8; BLOCK];
        for (k, q) in codes.iter_mut().enumerate() {
            let (at, shift) = Self::code_at(self.small, c, k);
            *q = (self.codes[base + at] >> shift) & if self.small { 0x0f } else { 0xff };
        }
        (codes, d, m)
    }

    /// Quantizes row-major f32 weights `(out, inp)` to 7-bit codes per block.
    pub(crate) fn quantize(w: &[f32], out: usize, inp: usize) -> Self {
        debug_assert_eq!(w.len(), out * inp);
        let mut mat = Self::zeroed(out, inp, false, true);
        let mut codes = [0u8; BLOCK];
        for (j, row) in w.chunks_exact(inp).enumerate() {
            for (b, xb) in row.chunks_exact(BLOCK).enumerate() {
                let (min, max) = xb
                    .iter()
                    .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                        (lo.min(v), hi.max(v))
                    });
                let d = (max - min) / f32::from(MAX_CODE);
                let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
                for (q, &v) in codes.iter_mut().zip(xb) {
                    *q = ((v - min) * inv).round().clamp(0.0, f32::from(MAX_CODE)) as u8;
                }
                mat.set_block(j, b, &codes, d, min);
            }
        }
        mat
    }

    /// Weight row `j` (output feature `j`) as f32 `d·q + m`, into `out` (`inp` values): a
    /// tied embedding's lookup. Exactly GGML's dequantization for Q4_0/Q4_1 codes.
    pub(crate) fn row_into(&self, j: usize, out: &mut [f32]) {
        let nb = self.inp / BLOCK;
        for (b, dst) in out.chunks_exact_mut(BLOCK).enumerate().take(nb) {
            let (codes, d, m) = self.block(j, b);
            for (v, &q) in dst.iter_mut().zip(&codes) {
                *v = d * f32::from(q) + m;
            }
        }
    }

    pub(crate) fn out_features(&self) -> usize {
        self.out
    }

    pub(crate) fn in_features(&self) -> usize {
        self.inp
    }

    fn panels(&self) -> usize {
        self.out.div_ceil(PANEL)
    }

    /// `x (rows, inp)` → `(rows, out)`, row-major.
    pub(crate) fn matmul(&self, x: &[f32], rows: usize) -> Vec<f32> {
        matmul_many(&[self], x, rows).pop().unwrap_or_default()
    }

    /// Panel `p` against every activation row, into `dst (rows, PANEL)`.
    fn panel_rows(&self, kernels: CpuKernels, p: usize, xq: &Q8Rows, rows: usize, dst: &mut [f32]) {
        let (inp, nb) = (self.inp, self.inp / BLOCK);
        let bytes = nb * Self::block_bytes(self.small);
        let scales = if self.small { 0 } else { nb * PANEL };
        let half_scales = if self.small {
            nb * Self::half_scales_per_block(self.offsets)
        } else {
            0
        };
        let panel = Panel {
            codes: &self.codes[p * bytes..(p + 1) * bytes],
            d: &self.d[p * scales..(p + 1) * scales],
            m: &self.m[p * scales..(p + 1) * scales],
            dm16: &self.dm16[p * half_scales..(p + 1) * half_scales],
            offsets: self.offsets,
            blocks: nb,
        };
        let most = if kernels == CpuKernels::Avx512 {
            ROW_TILE_AVX512
        } else {
            ROW_TILE
        };
        let mut r = 0;
        while r < rows {
            let tile = (rows - r).min(most);
            let x = Tile {
                qs: &xq.qs[r * inp..(r + tile) * inp],
                d: &xq.d[r * nb..(r + tile) * nb],
                sums: &xq.sums[r * nb..(r + tile) * nb],
            };
            let out = &mut dst[r * PANEL..(r + tile) * PANEL];
            // Every path's tiles of 1 to 8 rows are instantiated; only AVX-512 gets more than 4.
            macro_rules! run {
                ($kernel:ident, $small:expr) => {
                    match tile {
                        1 => $kernel::<1, $small>(&panel, &x, out),
                        2 => $kernel::<2, $small>(&panel, &x, out),
                        3 => $kernel::<3, $small>(&panel, &x, out),
                        4 => $kernel::<ROW_TILE, $small>(&panel, &x, out),
                        5 => $kernel::<5, $small>(&panel, &x, out),
                        6 => $kernel::<6, $small>(&panel, &x, out),
                        7 => $kernel::<7, $small>(&panel, &x, out),
                        _ => $kernel::<ROW_TILE_AVX512, $small>(&panel, &x, out),
                    }
                };
            }
            match (kernels, self.small) {
                (CpuKernels::Avx512, true) => run!(tile_avx512, true),
                (CpuKernels::Avx512, false) => run!(tile_avx512, false),
                (CpuKernels::Avx2, true) => run!(tile_avx2, true),
                (CpuKernels::Avx2, false) => run!(tile_avx2, false),
                (CpuKernels::Scalar, true) => run!(tile_portable, true),
                (CpuKernels::Scalar, false) => run!(tile_portable, false),
            }
            r += tile;
        }
    }
}

/// One panel of a [`CodeMatrix`].
struct Panel<'a> {
    codes: &'a [u8],
    /// 7-bit codes' scales and offsets, `blocks × PANEL` each.
    d: &'a [f32],
    m: &'a [f32],
    /// 4-bit codes' scales and, if `offsets`, offsets: per block `PANEL` of each.
    dm16: &'a [f16],
    offsets: bool,
    blocks: usize,
}

impl Panel<'_> {
    /// Block `b`'s scales and offsets as f32.
    fn scales<const SMALL: bool>(&self, b: usize) -> ([f32; PANEL], [f32; PANEL]) {
        let (mut d, mut m) = ([0f32; PANEL], [0f32; PANEL]);
        if SMALL {
            let stride = self.half_scales();
            let dm = &self.dm16[b * stride..(b + 1) * stride];
            for c in 0..PANEL {
                d[c] = dm[c].to_f32();
                m[c] = if self.offsets {
                    dm[PANEL + c].to_f32()
                } else {
                    -8.0 * d[c]
                };
            }
        } else {
            d.copy_from_slice(&self.d[b * PANEL..(b + 1) * PANEL]);
            m.copy_from_slice(&self.m[b * PANEL..(b + 1) * PANEL]);
        }
        (d, m)
    }

    /// f16 values per block of 4-bit codes.
    fn half_scales(&self) -> usize {
        CodeMatrix::half_scales_per_block(self.offsets)
    }

    /// Group `g` of block `b`: `PANEL × GROUP` codes.
    fn group<const SMALL: bool>(&self, b: usize, g: usize) -> [u8; PANEL_GROUP] {
        let mut codes = [0u8; PANEL_GROUP];
        if SMALL {
            let pairs = GROUPS / 2;
            let at = b * PACKED_BLOCK + (g % pairs) * PANEL_GROUP;
            let shift = 4 * (g / pairs);
            for (q, &byte) in codes.iter_mut().zip(&self.codes[at..at + PANEL_GROUP]) {
                *q = (byte >> shift) & 0x0f;
            }
        } else {
            let at = b * PANEL_BLOCK + g * PANEL_GROUP;
            codes.copy_from_slice(&self.codes[at..at + PANEL_GROUP]);
        }
        codes
    }
}

/// Up to [`ROW_TILE`] quantized activation rows.
struct Tile<'a> {
    qs: &'a [i8],
    d: &'a [f32],
    sums: &'a [f32],
}

/// `TILE` activation rows against a panel into `out (TILE, PANEL)`: the reference the SIMD
/// kernel agrees with bit for bit (the integer dot products are exact either way; the float
/// operations are the same, in the same order).
fn tile_portable<const TILE: usize, const SMALL: bool>(panel: &Panel, x: &Tile, out: &mut [f32]) {
    let (nb, inp) = (panel.blocks, panel.blocks * BLOCK);
    let mut acc = [[0f32; PANEL]; TILE];
    for b in 0..nb {
        let (d, m) = panel.scales::<SMALL>(b);
        let groups: [[u8; PANEL_GROUP]; GROUPS] =
            std::array::from_fn(|g| panel.group::<SMALL>(b, g));
        for (t, acc) in acc.iter_mut().enumerate() {
            let xb = &x.qs[t * inp + b * BLOCK..][..BLOCK];
            let mut dot = [0i32; PANEL];
            for (xg, cg) in xb.chunks_exact(GROUP).zip(&groups) {
                for (s, cc) in dot.iter_mut().zip(cg.chunks_exact(GROUP)) {
                    for (&xv, &cv) in xg.iter().zip(cc) {
                        *s += i32::from(xv) * i32::from(cv);
                    }
                }
            }
            let (dx, sx) = (x.d[t * nb + b], x.sums[t * nb + b]);
            for (((a, &s), &d), &m) in acc.iter_mut().zip(&dot).zip(&d).zip(&m) {
                *a = (s as f32).mul_add(d * dx, *a);
                *a = m.mul_add(sx, *a);
            }
        }
    }
    for (o, a) in out.chunks_exact_mut(PANEL).zip(&acc) {
        o.copy_from_slice(a);
    }
}

/// Asserts the slice lengths a SIMD tile kernel reads.
fn check_tile<const TILE: usize, const SMALL: bool>(panel: &Panel, x: &Tile, out: &[f32]) {
    let nb = panel.blocks;
    assert!(x.qs.len() >= TILE * nb * BLOCK && x.d.len() >= TILE * nb);
    assert!(x.sums.len() >= TILE * nb && out.len() >= TILE * PANEL);
    if SMALL {
        assert!(panel.codes.len() >= nb * PACKED_BLOCK);
        assert!(panel.dm16.len() >= nb * panel.half_scales());
    } else {
        assert!(panel.codes.len() >= nb * PANEL_BLOCK);
        assert!(panel.d.len() >= nb * PANEL && panel.m.len() >= nb * PANEL);
    }
}

#[cfg(target_arch = "x86_64")]
fn tile_avx2<const TILE: usize, const SMALL: bool>(panel: &Panel, x: &Tile, out: &mut [f32]) {
    check_tile::<TILE, SMALL>(panel, x, out);
    // SAFETY: `matmul_many_on` asserted that the CPU has the AVX2 path; the slice lengths the
    // kernel reads are checked above.
    unsafe { x86::tile_avx2::<TILE, SMALL>(panel, x, out) }
}

#[cfg(target_arch = "x86_64")]
fn tile_avx512<const TILE: usize, const SMALL: bool>(panel: &Panel, x: &Tile, out: &mut [f32]) {
    check_tile::<TILE, SMALL>(panel, x, out);
    // SAFETY: `matmul_many_on` asserted that the CPU has the AVX-512 path; the slice lengths the
    // kernel reads are checked above.
    unsafe { x86::tile_avx512::<TILE, SMALL>(panel, x, out) }
}

#[cfg(not(target_arch = "x86_64"))]
fn tile_avx2<const TILE: usize, const SMALL: bool>(panel: &Panel, x: &Tile, out: &mut [f32]) {
    tile_portable::<TILE, SMALL>(panel, x, out)
}

#[cfg(not(target_arch = "x86_64"))]
fn tile_avx512<const TILE: usize, const SMALL: bool>(panel: &Panel, x: &Tile, out: &mut [f32]) {
    tile_portable::<TILE, SMALL>(panel, x, out)
}

#[cfg(target_arch = "x86_64")]
mod x86;

mod q4;

#[cfg(test)]
mod tests;

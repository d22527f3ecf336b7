//! Small vector helpers written so that LLVM vectorizes them (independent lane
//! accumulators, no branches), compiled for AVX2 + FMA where the CPU has them.

/// Lanes of the independent accumulators.
const LANES: usize = 8;

use super::super::cpu::CpuKernels;

/// `fn name(args)` runs `imp` on the selected kernel path; `fn on(kernels, args)` on a
/// given one (the tests run each path this CPU has). The AVX2 build is the same Rust code
/// (Rust never fuses or reorders float operations), so the paths agree bit for bit.
macro_rules! dispatch {
    ($(#[$m:meta])* fn $name:ident / $on:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $imp:ident;) => {
        $(#[$m])*
        pub(crate) fn $name($($arg: $ty),*) -> $ret {
            $on(CpuKernels::selected(), $($arg),*)
        }

        $(#[$m])*
        pub(crate) fn $on(kernels: CpuKernels, $($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                if kernels.has_avx2() {
                    assert!(kernels.is_available(), "{kernels} kernels on a CPU without them");
                    #[target_feature(enable = "avx2,fma")]
                    fn fast($($arg: $ty),*) -> $ret {
                        $imp($($arg),*)
                    }
                    // SAFETY: the CPU has AVX2 and FMA (asserted above).
                    return unsafe { fast($($arg),*) };
                }
            }
            let _ = kernels;
            $imp($($arg),*)
        }
    };
}

dispatch! {
    /// `Σ a[i]·b[i]`.
    #[cfg(test)]
    fn dot / dot_on(a: &[f32], b: &[f32]) -> f32 = dot_imp;
}
dispatch! {
    /// `Σ x[i]²`.
    fn sum_squares / sum_squares_on(x: &[f32]) -> f32 = sum_squares_imp;
}
dispatch! {
    /// `x[i] = exp(x[i] - max)` in place; returns the sum.
    #[cfg(test)]
    fn exp_sub_sum / exp_sub_sum_on(x: &mut [f32], max: f32) -> f32 = exp_sub_sum_imp;
}
dispatch! {
    /// See [`super::AttnShape::attend_partial`]; `scratch` holds a chunk's scores
    /// (`group * CHUNK_KEYS`).
    #[allow(clippy::too_many_arguments)]
    fn attend_partial / attend_partial_on(
        shape: super::AttnShape,
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        kv_head: usize,
        range: std::ops::Range<usize>,
        scratch: &mut [f32],
        part: &mut [f32]
    ) -> () = attend_partial_imp;
}
dispatch! {
    /// One chunk of `n` keys of [`attend_partial`]: `keys`/`values` start at the chunk's
    /// first row of the KV head, rows `stride` apart; `scores` holds `group *
    /// CHUNK_KEYS`. Only the `_on` form is called (the half-precision path passes its
    /// kernels on to it).
    #[allow(clippy::too_many_arguments, dead_code)]
    fn attend_chunk / attend_chunk_on(
        shape: super::AttnShape,
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        stride: usize,
        n: usize,
        scores: &mut [f32],
        part: &mut [f32]
    ) -> () = attend_chunk_imp;
}

/// [`attend_partial`] over half-precision keys and values (IEEE bits): each chunk's rows
/// of the KV head are widened exactly into `scratch` (after the scores: `group *
/// CHUNK_KEYS + 2 * CHUNK_KEYS * head_dim`) and attended as `f32` rows, so the result is
/// what `f32` rows holding the same values give, on every path.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_partial_f16_on(
    kernels: CpuKernels,
    shape: super::AttnShape,
    q: &[f32],
    keys: &[u16],
    values: &[u16],
    kv_head: usize,
    range: std::ops::Range<usize>,
    scratch: &mut [f32],
    part: &mut [f32],
) {
    let hd = shape.head_dim;
    let group = shape.n_heads / shape.n_kv_heads;
    let stride = shape.n_kv_heads * hd;
    let col = kv_head * hd;
    let (scores, rows) = scratch.split_at_mut(group * super::CHUNK_KEYS);
    let (krows, vrows) = rows.split_at_mut(super::CHUNK_KEYS * hd);
    start_partial(group, part);
    let mut from = range.start;
    while from < range.end {
        let n = (range.end - from).min(super::CHUNK_KEYS);
        let (k, v) = (&mut krows[..n * hd], &mut vrows[..n * hd]);
        widen_f16_on(kernels, &keys[from * stride + col..], stride, hd, k);
        widen_f16_on(kernels, &values[from * stride + col..], stride, hd, v);
        attend_chunk_on(kernels, shape, q, k, v, hd, n, scores, part);
        from += n;
    }
}

/// Rows of `cols` half-precision values, `stride` apart in `src`, widened into `dst`
/// (`rows * cols`): with F16C's conversion where the path has it (part of both SIMD
/// paths), else [`f16_to_f32`]; both are exact.
pub(crate) fn widen_f16_on(
    kernels: CpuKernels,
    src: &[u16],
    stride: usize,
    cols: usize,
    dst: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if kernels.has_avx2() {
            assert!(
                kernels.is_available(),
                "{kernels} kernels on a CPU without them"
            );
            for (r, out) in dst.chunks_exact_mut(cols).enumerate() {
                let row = &src[r * stride..][..cols];
                // SAFETY: the CPU has F16C (asserted above: both SIMD paths need it).
                unsafe { x86::widen_f16_row(row, out) };
            }
            return;
        }
    }
    let _ = kernels;
    for (r, out) in dst.chunks_exact_mut(cols).enumerate() {
        let row = &src[r * stride..][..cols];
        for (o, &h) in out.iter_mut().zip(row) {
            *o = f16_to_f32(h);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// `out[i] = f16_to_f32(row[i])`, eight at a time with `vcvtph2ps`.
    ///
    /// # Safety
    /// The CPU has F16C.
    #[target_feature(enable = "avx,f16c")]
    pub(super) unsafe fn widen_f16_row(row: &[u16], out: &mut [f32]) {
        let n = row.len().min(out.len());
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: `i + 8 <= n` keeps both the 16-byte load and the 32-byte store in
            // bounds; unaligned accesses are allowed.
            unsafe {
                let h = _mm_loadu_si128(row.as_ptr().add(i).cast());
                _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            }
            i += 8;
        }
        for j in i..n {
            out[j] = super::f16_to_f32(row[j]);
        }
    }
}

/// IEEE half-precision bits to `f32`, exactly: normal numbers rebias the exponent,
/// infinities and NaNs keep an all-ones one, subnormals are their 10-bit mantissa times
/// 2^-24 (exact in f32).
#[inline(always)]
pub(crate) fn f16_to_f32(h: u16) -> f32 {
    let h = u32::from(h);
    let sign = (h & 0x8000) << 16;
    let em = h & 0x7fff;
    // (127 - 15) << 23: the exponent bias difference.
    let normal = (em << 13) + 0x3800_0000;
    let inf_nan = normal + 0x3800_0000;
    let subnormal = (em as f32 * (1.0 / 16_777_216.0)).to_bits();
    let bits = if em >= 0x7c00 {
        inf_nan
    } else if em < 0x0400 {
        subnormal
    } else {
        normal
    };
    f32::from_bits(bits | sign)
}

/// An empty partial result: per query head max `-inf`, sum 0, output 0.
#[inline(always)]
fn start_partial(group: usize, part: &mut [f32]) {
    let (m, rest) = part.split_at_mut(group);
    m.fill(f32::NEG_INFINITY);
    rest.fill(0.0);
}

/// Online softmax over the range in chunks: per query head a running max `m`, a sum of
/// exponentials `l` and an unnormalized output `o`, rescaled when the max grows. Rows are
/// read where they lie in the cache (one KV head's `hd` values of each token): copying
/// them out first cost more than the products themselves.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn attend_partial_imp(
    shape: super::AttnShape,
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    kv_head: usize,
    range: std::ops::Range<usize>,
    scratch: &mut [f32],
    part: &mut [f32],
) {
    let hd = shape.head_dim;
    let group = shape.n_heads / shape.n_kv_heads;
    let stride = shape.n_kv_heads * hd;
    let col = kv_head * hd;
    start_partial(group, part);
    let mut from = range.start;
    while from < range.end {
        let n = (range.end - from).min(super::CHUNK_KEYS);
        let at = from * stride + col;
        attend_chunk_imp(
            shape,
            q,
            &keys[at..],
            &values[at..],
            stride,
            n,
            scratch,
            part,
        );
        from += n;
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn attend_chunk_imp(
    shape: super::AttnShape,
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    stride: usize,
    n: usize,
    scores: &mut [f32],
    part: &mut [f32],
) {
    let hd = shape.head_dim;
    let group = shape.n_heads / shape.n_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let (m, rest) = part.split_at_mut(group);
    let (l, o) = rest.split_at_mut(group);
    for j in 0..n {
        let k = &keys[j * stride..][..hd];
        for (g, qh) in q.chunks_exact(hd).enumerate() {
            scores[g * super::CHUNK_KEYS + j] = dot_imp(qh, k) * scale;
        }
    }
    for g in 0..group {
        let s = &mut scores[g * super::CHUNK_KEYS..][..n];
        let chunk_max = s.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
        let new_max = m[g].max(chunk_max);
        let rescale = exp(m[g] - new_max);
        l[g] = l[g] * rescale + exp_sub_sum_imp(s, new_max);
        o[g * hd..(g + 1) * hd]
            .iter_mut()
            .for_each(|v| *v *= rescale);
        m[g] = new_max;
    }
    for (g, og) in o.chunks_exact_mut(hd).enumerate() {
        let w = &scores[g * super::CHUNK_KEYS..][..n];
        weighted_sum(og, w, values, stride);
    }
}

#[inline(always)]
fn dot_imp(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn sum_squares_imp(x: &[f32]) -> f32 {
    dot_imp(x, x)
}

/// Values summed in registers at a time by [`weighted_sum`] (4 AVX2 registers).
const SUM_BLOCK: usize = 32;

/// `o[i] += w[j] · rows[j·stride + i]` for each row `j` in order: per element the same
/// sequence of operations as one `o += w[j]·row` pass per row, but each [`SUM_BLOCK`] of
/// `o` stays in registers across the rows instead of going through memory once per row.
#[inline(always)]
fn weighted_sum(o: &mut [f32], w: &[f32], rows: &[f32], stride: usize) {
    let mut blocks = o.chunks_exact_mut(SUM_BLOCK);
    let mut at = 0;
    for block in &mut blocks {
        let mut acc = [0f32; SUM_BLOCK];
        acc.copy_from_slice(block);
        for (j, &wj) in w.iter().enumerate() {
            let row = &rows[j * stride + at..][..SUM_BLOCK];
            for i in 0..SUM_BLOCK {
                acc[i] += wj * row[i];
            }
        }
        block.copy_from_slice(&acc);
        at += SUM_BLOCK;
    }
    let rest = blocks.into_remainder();
    for (j, &wj) in w.iter().enumerate() {
        let row = &rows[j * stride + at..][..rest.len()];
        for (o, &v) in rest.iter_mut().zip(row) {
            *o += wj * v;
        }
    }
}

#[inline(always)]
fn exp_sub_sum_imp(x: &mut [f32], max: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            c[l] = exp(c[l] - max);
            acc[l] += c[l];
        }
    }
    let mut tail = 0.0;
    for v in chunks.into_remainder() {
        *v = exp(*v - max);
        tail += *v;
    }
    acc.iter().sum::<f32>() + tail
}

/// `e^x` to about 2 ulp for `x` in `[-87, 88]` (clamped outside; `-inf` gives a tiny
/// positive number rather than 0, which softmax tolerates), branch-free so loops over it
/// vectorize: `x = n·ln2 + r`, a degree-6 polynomial for `e^r`, `2^n` from the exponent
/// bits.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5·2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let scale = f32::from_bits((((n as i32) + 127) as u32) << 23);
    p * scale
}

//! Small vector helpers written so that LLVM vectorizes them (independent lane
//! accumulators, no branches), compiled for AVX2 + FMA or AVX-512 where the CPU has them.

/// Lanes of the independent accumulators.
const LANES: usize = 8;

use super::super::cpu::CpuKernels;

/// `fn name(args)` runs `imp` on the selected kernel path; `fn on(kernels, args)` on a
/// given one (the tests run each path this CPU has). The AVX2 and AVX-512 builds are the
/// same Rust code (Rust never fuses or reorders float operations), so the paths agree bit for
/// bit. `= imp / simd_imp` runs `simd_imp` on the SIMD paths instead (both compiled with
/// F16C), for code that may use F16C's conversions.
macro_rules! dispatch {
    ($(#[$m:meta])* fn $name:ident / $on:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $imp:ident;) => {
        dispatch! { $(#[$m])* fn $name / $on($($arg: $ty),*) -> $ret = $imp / $imp; }
    };
    ($(#[$m:meta])* fn $name:ident / $on:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $imp:ident / $simd:ident;) => {
        $(#[$m])*
        pub(crate) fn $name($($arg: $ty),*) -> $ret {
            $on(CpuKernels::selected(), $($arg),*)
        }

        $(#[$m])*
        pub(crate) fn $on(kernels: CpuKernels, $($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                /// `$simd` compiled with `$features`, run when `$when`; the kernel path
                /// needs every one of them, so `is_available` asserts the CPU has them.
                macro_rules! path {
                    ($when:expr, $features:literal) => {
                        if $when {
                            assert!(kernels.is_available(), "{kernels} kernels on a CPU without them");
                            $(#[$m])*
                            #[target_feature(enable = $features)]
                            fn run($($arg: $ty),*) -> $ret {
                                $simd($($arg),*)
                            }
                            // SAFETY: the CPU has the features (asserted above).
                            return unsafe { run($($arg),*) };
                        }
                    };
                }
                path!(kernels == CpuKernels::Avx512, "avx512f,avx512bw,avx512vl,avx2,fma,f16c");
                path!(kernels.has_avx2(), "avx2,fma,f16c");
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
    /// See [`super::AttnShape::attend_partial`]: one KV head's keys (in blocks) and values
    /// (token-major) in `f32`; `scores` holds a chunk's scores (`group * CHUNK_KEYS`).
    #[allow(
    clippy::too_many_arguments,
    reason = "a kernel's operands, passed as scalars and slices so it inlines into each target feature"
)]
    fn attend_partial / attend_partial_on(
        shape: super::AttnShape,
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        range: std::ops::Range<usize>,
        scores: &mut [f32],
        part: &mut [f32]
    ) -> () = attend_partial_imp;
}
dispatch! {
    /// [`attend_partial`] over half-precision keys and values (IEEE bits), widened exactly
    /// as they are read (with F16C's conversion on both SIMD paths, else [`f16_to_f32`]): the
    /// result is what `f32` rows holding the same values give, on every path.
    #[allow(
    clippy::too_many_arguments,
    reason = "a kernel's operands, passed as scalars and slices so it inlines into each target feature"
)]
    fn attend_partial_f16 / attend_partial_f16_on(
        shape: super::AttnShape,
        q: &[f32],
        keys: &[u16],
        values: &[u16],
        range: std::ops::Range<usize>,
        scores: &mut [f32],
        part: &mut [f32]
    ) -> () = attend_partial_imp / attend_partial_f16c;
}

dispatch! {
    /// One row's LoRA update: `t = A·x` (`a (rank, x.len())`), then `y += Σ_j t_j · bt_j`
    /// (`bt (rank, y.len())`, scaled), summed in `delta` first. `t.len()` is the rank.
    fn lora_row / lora_row_on(
        x: &[f32],
        a: &[f32],
        bt: &[f32],
        t: &mut [f32],
        delta: &mut [f32],
        y: &mut [f32]
    ) -> () = lora_row_imp;
}

/// [`attend_partial_imp`] over half-precision rows widened with F16C: only called from code
/// compiled with it (the SIMD paths of [`attend_partial_f16_on`]).
#[cfg(target_arch = "x86_64")]
#[allow(
    clippy::too_many_arguments,
    reason = "a kernel's operands, passed as scalars and slices so it inlines into each target feature"
)]
#[inline(always)]
fn attend_partial_f16c(
    shape: super::AttnShape,
    q: &[f32],
    keys: &[u16],
    values: &[u16],
    range: std::ops::Range<usize>,
    scores: &mut [f32],
    part: &mut [f32],
) {
    let (keys, values) = (x86::F16c::cast(keys), x86::F16c::cast(values));
    attend_partial_imp(shape, q, keys, values, range, scores, part)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Half-precision bits that only code compiled with F16C reads: they widen with
    /// `vcvtph2ps`, exactly as [`super::f16_to_f32`].
    #[derive(Clone, Copy)]
    #[repr(transparent)]
    pub(super) struct F16c(u16);

    impl F16c {
        pub(super) fn cast(bits: &[u16]) -> &[F16c] {
            // SAFETY: `F16c` is a `repr(transparent)` `u16`: same size, alignment and
            // validity.
            unsafe { std::slice::from_raw_parts(bits.as_ptr().cast(), bits.len()) }
        }
    }

    impl super::KvElem for F16c {
        #[inline(always)]
        fn widen(self) -> f32 {
            super::f16_to_f32(self.0)
        }

        #[inline(always)]
        fn widen_n<const N: usize>(src: &[Self]) -> [f32; N] {
            let src = &src[..N];
            let mut out = [0f32; N];
            let mut i = 0;
            while i + 8 <= N {
                // SAFETY: `i + 8 <= N` keeps the 16-byte load and the 32-byte store in
                // bounds (unaligned accesses are allowed); only code compiled for F16C, on a
                // CPU that has it, holds `F16c` values.
                unsafe {
                    let h = _mm_loadu_si128(src.as_ptr().add(i).cast());
                    _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
                }
                i += 8;
            }
            for j in i..N {
                out[j] = src[j].widen();
            }
            out
        }
    }
}

/// An element of the host KV cache, widened to `f32` exactly.
pub(crate) trait KvElem: Copy {
    fn widen(self) -> f32;

    /// `N` consecutive elements widened.
    #[inline(always)]
    fn widen_n<const N: usize>(src: &[Self]) -> [f32; N] {
        let src = &src[..N];
        std::array::from_fn(|i| src[i].widen())
    }
}

impl KvElem for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl KvElem for u16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f16_to_f32(self)
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
/// exponentials `l` and an unnormalized output `o`, rescaled when the max grows. Keys and
/// values are read (and widened) where they lie in the cache.
#[allow(
    clippy::too_many_arguments,
    reason = "a kernel's operands, passed as scalars and slices so it inlines into each target feature"
)]
#[inline(always)]
fn attend_partial_imp<E: KvElem>(
    shape: super::AttnShape,
    q: &[f32],
    keys: &[E],
    values: &[E],
    range: std::ops::Range<usize>,
    scores: &mut [f32],
    part: &mut [f32],
) {
    let hd = shape.head_dim;
    let group = shape.n_heads / shape.n_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    start_partial(group, part);
    let (m, rest) = part.split_at_mut(group);
    let (l, o) = rest.split_at_mut(group);
    let mut from = range.start;
    while from < range.end {
        let n = (range.end - from).min(super::CHUNK_KEYS);
        let mut h = 0;
        while h < group {
            let c = (group - h).min(HEADS_AT_ONCE);
            let (q, s) = (&q[h * hd..], &mut scores[h * super::CHUNK_KEYS..]);
            match c {
                1 => score_keys::<E, 1>(q, hd, keys, from, n, scale, s),
                2 => score_keys::<E, 2>(q, hd, keys, from, n, scale, s),
                3 => score_keys::<E, 3>(q, hd, keys, from, n, scale, s),
                _ => score_keys::<E, HEADS_AT_ONCE>(q, hd, keys, from, n, scale, s),
            }
            h += c;
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
        let rows = &values[from * hd..][..n * hd];
        let mut h = 0;
        while h < group {
            let c = (group - h).min(HEADS_AT_ONCE);
            let (o, w) = (&mut o[h * hd..], &scores[h * super::CHUNK_KEYS..]);
            match c {
                1 => sum_values::<E, 1, 32>(o, hd, w, rows, n),
                2 => sum_values::<E, 2, 32>(o, hd, w, rows, n),
                3 => sum_values::<E, 3, 32>(o, hd, w, rows, n),
                _ => sum_values::<E, HEADS_AT_ONCE, 16>(o, hd, w, rows, n),
            }
            h += c;
        }
        from += n;
    }
}

/// Query heads scored or summed together: their accumulators stay in registers.
const HEADS_AT_ONCE: usize = 4;

/// Scores of `G` query heads (`q`, `G * hd`) against keys `from..from + n` of one KV head's
/// blocks: row `g` of `scores` (`CHUNK_KEYS` apart) gets `(Σ_d q_g[d]·k[d]) · scale` per key,
/// summed in `d` order. A block's keys are one vector lane each, so no sum crosses lanes and
/// the vector width never changes the arithmetic.
#[inline(always)]
fn score_keys<E: KvElem, const G: usize>(
    q: &[f32],
    hd: usize,
    keys: &[E],
    from: usize,
    n: usize,
    scale: f32,
    scores: &mut [f32],
) {
    const B: usize = super::KEY_BLOCK;
    let q: [&[f32]; G] = std::array::from_fn(|g| &q[g * hd..][..hd]);
    let mut j = 0;
    while j < n {
        let (block, slot) = ((from + j) / B, (from + j) % B);
        let take = (B - slot).min(n - j);
        let block = &keys[block * B * hd..][..hd * B];
        let mut acc = [[0f32; B]; G];
        for (d, k) in block.chunks_exact(B).enumerate() {
            let k: [f32; B] = E::widen_n(k);
            for g in 0..G {
                let qd = q[g][d];
                for s in 0..B {
                    acc[g][s] += qd * k[s];
                }
            }
        }
        for g in 0..G {
            let row = &mut scores[g * super::CHUNK_KEYS + j..][..take];
            for (out, &a) in row.iter_mut().zip(&acc[g][slot..]) {
                *out = a * scale;
            }
        }
        j += take;
    }
}

/// `o_g[i] += w_g[j] · v_j[i]` for `G` heads (`o`, `G * hd`; weights `CHUNK_KEYS` apart)
/// over `n` value rows of `hd`, in row order per element; `W` elements of every head stay
/// in registers across the rows.
#[inline(always)]
fn sum_values<E: KvElem, const G: usize, const W: usize>(
    o: &mut [f32],
    hd: usize,
    w: &[f32],
    rows: &[E],
    n: usize,
) {
    let w: [&[f32]; G] = std::array::from_fn(|g| &w[g * super::CHUNK_KEYS..][..n]);
    let mut at = 0;
    while at + W <= hd {
        let mut acc = [[0f32; W]; G];
        for g in 0..G {
            acc[g].copy_from_slice(&o[g * hd + at..][..W]);
        }
        for j in 0..n {
            let row: [f32; W] = E::widen_n(&rows[j * hd + at..]);
            for g in 0..G {
                let wj = w[g][j];
                for i in 0..W {
                    acc[g][i] += wj * row[i];
                }
            }
        }
        for g in 0..G {
            o[g * hd + at..][..W].copy_from_slice(&acc[g]);
        }
        at += W;
    }
    for g in 0..G {
        let og = &mut o[g * hd + at..g * hd + hd];
        for (j, &wj) in w[g].iter().enumerate() {
            let row = &rows[j * hd + at..][..og.len()];
            for (o, &v) in og.iter_mut().zip(row) {
                *o += wj * v.widen();
            }
        }
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
fn lora_row_imp(x: &[f32], a: &[f32], bt: &[f32], t: &mut [f32], delta: &mut [f32], y: &mut [f32]) {
    let (inp, out) = (x.len(), y.len());
    for (tj, aj) in t.iter_mut().zip(a.chunks_exact(inp)) {
        *tj = dot_imp(x, aj);
    }
    delta.fill(0.0);
    for (&tj, bj) in t.iter().zip(bt.chunks_exact(out)) {
        for (d, &b) in delta.iter_mut().zip(bj) {
            *d += tj * b;
        }
    }
    for (v, &d) in y.iter_mut().zip(delta.iter()) {
        *v += d;
    }
}

#[inline(always)]
fn sum_squares_imp(x: &[f32]) -> f32 {
    dot_imp(x, x)
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

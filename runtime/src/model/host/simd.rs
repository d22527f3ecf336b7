//! Small vector helpers written so that LLVM vectorizes them (independent lane
//! accumulators, no branches), compiled for AVX2 + FMA or AVX-512 where the CPU has them.

/// Lanes of the independent accumulators.
const LANES: usize = 8;

use super::super::cpu::CpuKernels;

/// `fn name(args)` runs `imp` on the selected kernel path; `fn on(kernels, args)` on a
/// given one (the tests run each path this CPU has). The AVX2 and AVX-512 builds are the
/// same Rust code (Rust never fuses or reorders float operations), so the paths agree bit for
/// bit. `= imp / simd_imp` runs `simd_imp` on the SIMD paths instead (both compiled with
/// F16C), for code that may use F16C's conversions; `= imp / simd_imp / wide_imp` runs
/// `wide_imp` on AVX-512 (more accumulators: 32 vector registers rather than 16).
macro_rules! dispatch {
    ($(#[$m:meta])* fn $name:ident / $on:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $imp:ident;) => {
        dispatch! { $(#[$m])* fn $name / $on($($arg: $ty),*) -> $ret = $imp / $imp; }
    };
    ($(#[$m:meta])* fn $name:ident / $on:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $imp:ident / $simd:ident;) => {
        dispatch! { $(#[$m])* fn $name / $on($($arg: $ty),*) -> $ret = $imp / $simd / $simd; }
    };
    ($(#[$m:meta])* fn $name:ident / $on:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $imp:ident / $simd:ident / $wide:expr;) => {
        $(#[$m])*
        pub(crate) fn $name($($arg: $ty),*) -> $ret {
            $on(CpuKernels::selected(), $($arg),*)
        }

        $(#[$m])*
        pub(crate) fn $on(kernels: CpuKernels, $($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                /// `$run` compiled with `$features`, run when `$when`; the kernel path
                /// needs every one of them, so `is_available` asserts the CPU has them.
                macro_rules! path {
                    ($when:expr, $features:literal, $run:expr) => {
                        if $when {
                            assert!(kernels.is_available(), "{kernels} kernels on a CPU without them");
                            $(#[$m])*
                            #[target_feature(enable = $features)]
                            fn run($($arg: $ty),*) -> $ret {
                                $run($($arg),*)
                            }
                            // SAFETY: the CPU has the features (asserted above).
                            return unsafe { run($($arg),*) };
                        }
                    };
                }
                path!(kernels == CpuKernels::Avx512, "avx512f,avx512bw,avx512vl,avx2,fma,f16c", $wide);
                path!(kernels.has_avx2(), "avx2,fma,f16c", $simd);
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
mod attend;
pub(crate) use attend::*;
mod lora;
pub(crate) use lora::*;
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

/// An element of the host KV cache or of a LoRA pair, widened to `f32` exactly.
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

/// bfloat16 is the top half of an `f32`: widened by a shift (what `half` does, written so
/// that it vectorizes).
impl KvElem for half::bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }

    #[inline(always)]
    fn widen_n<const N: usize>(src: &[Self]) -> [f32; N] {
        let mut out = [0f32; N];
        for (o, s) in out.iter_mut().zip(&src[..N]) {
            *o = s.widen();
        }
        out
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

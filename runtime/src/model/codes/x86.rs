//! The AVX2 and AVX-512 tiles of the block-code kernel (bit for bit the portable tile).

use std::arch::x86_64::*;

use super::{Panel, Tile, BLOCK, GROUP, GROUPS, PACKED_BLOCK, PANEL, PANEL_BLOCK, PANEL_GROUP};

/// The four activation codes at `at` as one `i32` (to broadcast against a code group).
///
/// # Safety
/// `at + 4 <= x.qs.len()`.
#[inline(always)]
unsafe fn activations(x: &Tile, at: usize) -> i32 {
    // SAFETY: in bounds by the contract; unaligned.
    unsafe { std::ptr::read_unaligned(x.qs.as_ptr().add(at).cast::<i32>()) }
}

/// [`super::tile_portable`] with AVX2, one half-panel of 8 features at a time: per block
/// and group, one 32-byte code load serves all `TILE` rows, each adding
/// `vpmaddubsw(codes, broadcast 4 activation bytes)`, widened to 32 bits per group
/// (or, for 4-bit codes, once per block). 4-bit codes come two groups per load: the low
/// nibbles, then the high ones.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; the panel holds `blocks` blocks and the tile `TILE`
/// rows of `blocks * BLOCK` values; `out` is `TILE * PANEL` long.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn tile_avx2<const TILE: usize, const SMALL: bool>(
    panel: &Panel,
    x: &Tile,
    out: &mut [f32],
) {
    let (nb, inp) = (panel.blocks, panel.blocks * BLOCK);
    let ones = _mm256_set1_epi16(1);
    let low = _mm256_set1_epi8(0x0f);
    for half in 0..2 {
        let mut acc = [_mm256_setzero_ps(); TILE];
        for b in 0..nb {
            // SAFETY (all loads and stores below): in bounds by the function's contract;
            // unaligned.
            let mut dot = [_mm256_setzero_si256(); TILE];
            macro_rules! group {
                ($g:expr, $codes:expr) => {{
                    let cv = $codes;
                    for (t, dot) in dot.iter_mut().enumerate() {
                        let xg = unsafe { activations(x, t * inp + b * BLOCK + $g * GROUP) };
                        let pairs = _mm256_maddubs_epi16(cv, _mm256_set1_epi32(xg));
                        *dot = if SMALL {
                            _mm256_add_epi16(*dot, pairs)
                        } else {
                            _mm256_add_epi32(*dot, _mm256_madd_epi16(pairs, ones))
                        };
                    }
                }};
            }
            if SMALL {
                let codes = unsafe { panel.codes.as_ptr().add(b * PACKED_BLOCK + half * 32) };
                for pair in 0..GROUPS / 2 {
                    let pv = unsafe { _mm256_loadu_si256(codes.add(pair * PANEL_GROUP).cast()) };
                    group!(pair, _mm256_and_si256(pv, low));
                    group!(
                        pair + GROUPS / 2,
                        _mm256_and_si256(_mm256_srli_epi16::<4>(pv), low)
                    );
                }
            } else {
                let codes = unsafe { panel.codes.as_ptr().add(b * PANEL_BLOCK + half * 32) };
                for g in 0..GROUPS {
                    group!(g, unsafe {
                        _mm256_loadu_si256(codes.add(g * PANEL_GROUP).cast())
                    });
                }
            }
            let (d, m) = unsafe { half_scales_avx2::<SMALL>(panel, b, half) };
            for (t, (acc, &dot)) in acc.iter_mut().zip(&dot).enumerate() {
                let dot = if SMALL {
                    _mm256_madd_epi16(dot, ones)
                } else {
                    dot
                };
                let (dx, sx) = unsafe {
                    (
                        *x.d.get_unchecked(t * nb + b),
                        *x.sums.get_unchecked(t * nb + b),
                    )
                };
                let scale = _mm256_mul_ps(d, _mm256_set1_ps(dx));
                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, *acc);
                *acc = _mm256_fmadd_ps(m, _mm256_set1_ps(sx), *acc);
            }
        }
        for (t, acc) in acc.iter().enumerate() {
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(t * PANEL + half * 8), *acc) };
        }
    }
}

/// The scales `d` and offsets `m` of block `b` of the 8 features of half-panel `half`.
///
/// # Safety
/// The CPU has AVX2 and F16C; the panel holds block `b`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn half_scales_avx2<const SMALL: bool>(
    panel: &Panel,
    b: usize,
    half: usize,
) -> (__m256, __m256) {
    // SAFETY (all loads below): in bounds by the function's contract; unaligned.
    if SMALL {
        let dm = unsafe { panel.dm16.as_ptr().add(b * panel.half_scales() + half * 8) };
        let d = unsafe { _mm256_cvtph_ps(_mm_loadu_si128(dm.cast())) };
        let m = if panel.offsets {
            unsafe { _mm256_cvtph_ps(_mm_loadu_si128(dm.add(PANEL).cast())) }
        } else {
            _mm256_mul_ps(d, _mm256_set1_ps(-8.0))
        };
        (d, m)
    } else {
        unsafe {
            (
                _mm256_loadu_ps(panel.d.as_ptr().add(b * PANEL + half * 8)),
                _mm256_loadu_ps(panel.m.as_ptr().add(b * PANEL + half * 8)),
            )
        }
    }
}

/// [`super::tile_portable`] with AVX-512 VNNI: per block and group, one 64-byte load holds
/// 4 codes of each of the panel's 16 features (4-bit codes: two groups, low and high
/// nibbles), and one `vpdpbusd` per row adds the four u8 code × i8 activation products of
/// every feature into its 32-bit lane.
///
/// # Safety
/// The CPU has AVX-512 F, BW, VL and VNNI, AVX2, FMA and F16C; the slice contract of
/// [`tile_avx2`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn tile_avx512<const TILE: usize, const SMALL: bool>(
    panel: &Panel,
    x: &Tile,
    out: &mut [f32],
) {
    let (nb, inp) = (panel.blocks, panel.blocks * BLOCK);
    let low = _mm512_set1_epi8(0x0f);
    let mut acc = [_mm512_setzero_ps(); TILE];
    for b in 0..nb {
        // SAFETY (all loads and stores below): in bounds by the function's contract;
        // unaligned.
        let mut dot = [_mm512_setzero_si512(); TILE];
        macro_rules! group {
            ($g:expr, $codes:expr) => {{
                let cv = $codes;
                for (t, dot) in dot.iter_mut().enumerate() {
                    let xg = unsafe { activations(x, t * inp + b * BLOCK + $g * GROUP) };
                    *dot = _mm512_dpbusd_epi32(*dot, cv, _mm512_set1_epi32(xg));
                }
            }};
        }
        let (d, m) = if SMALL {
            let codes = unsafe { panel.codes.as_ptr().add(b * PACKED_BLOCK) };
            for pair in 0..GROUPS / 2 {
                let pv = unsafe { _mm512_loadu_si512(codes.add(pair * PANEL_GROUP).cast()) };
                group!(pair, _mm512_and_si512(pv, low));
                group!(
                    pair + GROUPS / 2,
                    _mm512_and_si512(_mm512_srli_epi16::<4>(pv), low)
                );
            }
            let dm = unsafe { panel.dm16.as_ptr().add(b * panel.half_scales()) };
            let d = unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(dm.cast())) };
            let m = if panel.offsets {
                unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(dm.add(PANEL).cast())) }
            } else {
                _mm512_mul_ps(d, _mm512_set1_ps(-8.0))
            };
            (d, m)
        } else {
            let codes = unsafe { panel.codes.as_ptr().add(b * PANEL_BLOCK) };
            for g in 0..GROUPS {
                group!(g, unsafe {
                    _mm512_loadu_si512(codes.add(g * PANEL_GROUP).cast())
                });
            }
            unsafe {
                (
                    _mm512_loadu_ps(panel.d.as_ptr().add(b * PANEL)),
                    _mm512_loadu_ps(panel.m.as_ptr().add(b * PANEL)),
                )
            }
        };
        for (t, (acc, &dot)) in acc.iter_mut().zip(&dot).enumerate() {
            let (dx, sx) = unsafe {
                (
                    *x.d.get_unchecked(t * nb + b),
                    *x.sums.get_unchecked(t * nb + b),
                )
            };
            let scale = _mm512_mul_ps(d, _mm512_set1_ps(dx));
            *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, *acc);
            *acc = _mm512_fmadd_ps(m, _mm512_set1_ps(sx), *acc);
        }
    }
    for (t, acc) in acc.iter().enumerate() {
        unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(t * PANEL), *acc) };
    }
}

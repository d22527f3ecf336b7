//! The LoRA kernel of the host path: one row's update `delta = B·(scale·A·x)` of one
//! projection, with `A` and `Bᵀ` held in `f32`, `f16` or `bf16` (widened exactly as they are
//! read, so a half-precision pair gives what `f32` matrices holding the same values give).
//! Several rows of `A` and several chunks of the output are summed at once in independent
//! accumulators (the products are memory-bound, and one accumulator would be latency-bound);
//! every output element is still `Σ_j t_j·b_j` in `j` order from 0 and every `t_j` one dot in
//! the same lane order, on every kernel path and whatever else shares the step.

use super::{CpuKernels, KvElem};

/// Lanes of each accumulator (one AVX-512 register, two AVX2 ones).
const W: usize = 16;
/// Rows of `A` dotted with `x` at once.
const A_ROWS: usize = 4;
/// Chunks of `W` outputs summed at once.
const B_CHUNKS: usize = 4;

dispatch! {
    /// `t = scale·(A·x)` (`a (t.len(), x.len())`), then `delta = Σ_j t_j·bt_j`
    /// (`bt (t.len(), delta.len())`): one row's update, before it is added to the
    /// projection's output.
    fn lora_delta_f32 / lora_delta_f32_on(
        x: &[f32],
        a: &[f32],
        bt: &[f32],
        scale: f32,
        t: &mut [f32],
        delta: &mut [f32]
    ) -> () = lora_delta_imp;
}
dispatch! {
    /// [`lora_delta_f32`] with `A` and `Bᵀ` in bfloat16 (widened exactly: a shift).
    fn lora_delta_bf16 / lora_delta_bf16_on(
        x: &[f32],
        a: &[half::bf16],
        bt: &[half::bf16],
        scale: f32,
        t: &mut [f32],
        delta: &mut [f32]
    ) -> () = lora_delta_imp;
}
dispatch! {
    /// [`lora_delta_f32`] with `A` and `Bᵀ` as IEEE half-precision bits (widened with F16C's
    /// conversion on the SIMD paths, else [`f16_to_f32`](super::f16_to_f32)).
    fn lora_delta_f16 / lora_delta_f16_on(
        x: &[f32],
        a: &[u16],
        bt: &[u16],
        scale: f32,
        t: &mut [f32],
        delta: &mut [f32]
    ) -> () = lora_delta_imp / lora_delta_f16c;
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn lora_delta_f16c(x: &[f32], a: &[u16], bt: &[u16], scale: f32, t: &mut [f32], d: &mut [f32]) {
    let (a, bt) = (super::x86::F16c::cast(a), super::x86::F16c::cast(bt));
    lora_delta_imp(x, a, bt, scale, t, d)
}

#[inline(always)]
fn lora_delta_imp<E: KvElem>(
    x: &[f32],
    a: &[E],
    bt: &[E],
    scale: f32,
    t: &mut [f32],
    delta: &mut [f32],
) {
    let (inp, out, rank) = (x.len(), delta.len(), t.len());
    debug_assert_eq!((a.len(), bt.len()), (rank * inp, rank * out));
    let mut j = 0;
    while j + A_ROWS <= rank {
        let sums = dot_rows::<E, A_ROWS>(x, &a[j * inp..(j + A_ROWS) * inp]);
        for (tj, s) in t[j..j + A_ROWS].iter_mut().zip(sums) {
            *tj = s * scale;
        }
        j += A_ROWS;
    }
    for (tj, row) in t[j..].iter_mut().zip(a[j * inp..].chunks_exact(inp)) {
        *tj = dot_rows::<E, 1>(x, row)[0] * scale;
    }
    let mut o = 0;
    while o + B_CHUNKS * W <= out {
        expand::<E, B_CHUNKS>(t, bt, out, o, delta);
        o += B_CHUNKS * W;
    }
    while o + W <= out {
        expand::<E, 1>(t, bt, out, o, delta);
        o += W;
    }
    for (k, d) in delta.iter_mut().enumerate().skip(o) {
        let mut acc = 0f32;
        for (&tj, row) in t.iter().zip(bt.chunks_exact(out)) {
            acc += tj * row[k].widen();
        }
        *d = acc;
    }
}

/// The dots of `x` with the `R` rows of `a (R, x.len())`: per row, `W` lane sums over the
/// whole chunks, added up in lane order, then the tail in order. (No `array::from_fn` in the
/// loop: LLVM may leave it a call, and a call spills every accumulator to the stack.)
#[inline(always)]
fn dot_rows<E: KvElem, const R: usize>(x: &[f32], a: &[E]) -> [f32; R] {
    let inp = x.len();
    let whole = inp / W * W;
    let mut acc = [[0f32; W]; R];
    for (c, xv) in x[..whole].chunks_exact(W).enumerate() {
        for (r, acc) in acc.iter_mut().enumerate() {
            let av = E::widen_n::<W>(&a[r * inp + c * W..]);
            for l in 0..W {
                acc[l] += av[l] * xv[l];
            }
        }
    }
    let mut sums = [0f32; R];
    for (r, (sum, acc)) in sums.iter_mut().zip(&acc).enumerate() {
        let row = &a[r * inp..(r + 1) * inp];
        let tail: f32 = (whole..inp).map(|i| row[i].widen() * x[i]).sum();
        *sum = acc.iter().sum::<f32>() + tail;
    }
    sums
}

/// `delta[o..o + C·W] = Σ_j t_j · bt[j][o..o + C·W]` (`bt` rows of `out`).
#[inline(always)]
fn expand<E: KvElem, const C: usize>(t: &[f32], bt: &[E], out: usize, o: usize, delta: &mut [f32]) {
    let mut acc = [[0f32; W]; C];
    for (j, &tj) in t.iter().enumerate() {
        let row = &bt[j * out + o..];
        for (c, acc) in acc.iter_mut().enumerate() {
            let b = E::widen_n::<W>(&row[c * W..]);
            for l in 0..W {
                acc[l] += tj * b[l];
            }
        }
    }
    for (c, acc) in acc.iter().enumerate() {
        delta[o + c * W..o + (c + 1) * W].copy_from_slice(acc);
    }
}

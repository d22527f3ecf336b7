//! The CPU forward pass on plain `f32` buffers, for the weight forms that run Tollgate's own
//! kernels (Q8_0: int8; Auto on CPU: block codes).
//!
//! candle spends more time per small op (allocation, dispatch, layout checks; every f32
//! matmul even re-reads `/proc/cpuinfo` to count threads) than decoding a 135M model spends in
//! arithmetic, so this path does RMSNorm, RoPE, attention over the host KV cache, SwiGLU and
//! the residual adds itself, in reused buffers. Projections go through
//! [`Linear::forward_host`]; every row runs the same kernel whatever else shares the step, so
//! batching never changes a sequence's arithmetic. Q/K/V and gate/up run as one fused matmul
//! each.
//!
//! It does not own the matmul kernels ([`super::q8`], [`super::codes`]), loading, or the candle path
//! ([`super::llama`]) used on other devices and for other weight forms.

use candle_core::{Storage, StorageRef, Tensor};
use rayon::prelude::*;

use super::linear::Linear;
use super::llama::{LlamaModel, SeqStep};
use crate::{Error, Result};

/// The `f32` contents of a contiguous CPU tensor, borrowed.
struct HostView<'a> {
    guard: StorageRef<'a>,
    start: usize,
    end: usize,
}

impl<'a> HostView<'a> {
    fn new(t: &'a Tensor) -> Result<Self> {
        let (guard, layout) = t.storage_and_layout();
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| Error::Weights("host path: a weight tensor is not contiguous".into()))?;
        Ok(Self { guard, start, end })
    }

    fn slice(&self) -> Result<&[f32]> {
        match &*self.guard {
            Storage::Cpu(cpu) => Ok(&cpu.as_slice::<f32>()?[self.start..self.end]),
            _ => Err(Error::Weights(
                "host path: a weight tensor is not on the CPU".into(),
            )),
        }
    }
}

/// Attention work (query-key products) below which one thread does a layer's attention.
const PARALLEL_ATTENTION_WORK: usize = 1 << 15;

impl LlamaModel {
    /// Whether this model runs [`LlamaModel::forward_host`]: CPU, and every projection takes
    /// host buffers.
    pub(crate) fn uses_host_path(&self) -> bool {
        self.device.is_cpu()
            && matches!(self.form, super::WeightForm::Q8_0 | super::WeightForm::Auto)
            && self.lm_head.is_host()
            && self.blocks.iter().all(|b| {
                [&b.wq, &b.wk, &b.wv, &b.wo, &b.w_gate, &b.w_up, &b.w_down]
                    .iter()
                    .all(|l| l.is_host())
            })
    }

    /// One step on the host. `ids`/`positions` are the step's tokens in batch order and
    /// `spans` each sequence's `(first row, rows)`; the caches have room for the tokens.
    pub(crate) fn forward_host(
        &self,
        batch: &mut [SeqStep<'_>],
        ids: &[u32],
        positions: &[usize],
        spans: &[(usize, usize)],
    ) -> Result<Vec<Vec<f32>>> {
        let cfg = &self.config;
        let (hidden, nh, nkv, hd) = (cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        let (q_dim, kv_dim) = (nh * hd, nkv * hd);
        // The query heads sharing a KV head are adjacent: `group_dim` values per KV head.
        let group_dim = q_dim / nkv;
        let total = ids.len();
        let eps = cfg.rms_eps as f32;

        let mut x = self.embed.rows_host(ids, hidden, &self.lm_head)?;
        let (cos, sin) = self.rope_tables()?;
        let (cos, sin) = (HostView::new(&cos)?, HostView::new(&sin)?);
        let rope = Rope {
            cos: cos.slice()?,
            sin: sin.slice()?,
            half: hd / 2,
            interleaved: cfg.rope_interleaved,
        };
        // Token `t` belongs to sequence `seq_of[t]`, at index `t - spans[seq].0` of its step.
        let seq_of: Vec<usize> = spans
            .iter()
            .enumerate()
            .flat_map(|(s, &(_, len))| std::iter::repeat_n(s, len))
            .collect();

        let mut h = vec![0f32; total * hidden];
        let mut att = vec![0f32; total * q_dim];
        for (layer, block) in self.blocks.iter().enumerate() {
            let attn_norm = HostView::new(&block.attn_norm)?;
            rms_norm(&x, attn_norm.slice()?, eps, &mut h);
            let [mut q, mut k, v] =
                Linear::forward_host_many([&block.wq, &block.wk, &block.wv], &h, total)?;
            rope.apply(&mut q, nh, hd, positions);
            rope.apply(&mut k, nkv, hd, positions);
            for (step, &(start, len)) in batch.iter_mut().zip(spans) {
                let rows = start * kv_dim..(start + len) * kv_dim;
                step.cache.append_host(layer, &k[rows.clone()], &v[rows])?;
            }
            let kv: Vec<(&[f32], &[f32])> = batch
                .iter()
                .map(|s| s.cache.host_layer(layer))
                .collect::<Result<_>>()?;
            let shape = AttnShape {
                n_heads: nh,
                n_kv_heads: nkv,
                head_dim: hd,
            };
            let task = |(c, out): (usize, &mut [f32])| {
                let (t, kv_head) = (c / nkv, c % nkv);
                let s = seq_of[t];
                let (start, len) = spans[s];
                let (keys, values) = kv[s];
                // Keys visible to this token: the cache before the step plus the step's
                // tokens up to and including itself.
                let visible = keys.len() / kv_dim - len + (t - start) + 1;
                let q = &q[t * q_dim + kv_head * group_dim..][..group_dim];
                shape.attend_group(q, keys, values, kv_head, visible, out);
            };
            let work: usize = spans
                .iter()
                .zip(&kv)
                .map(|(&(_, len), (keys, _))| len * keys.len() / kv_dim)
                .sum::<usize>()
                * q_dim;
            if work < PARALLEL_ATTENTION_WORK {
                att.chunks_exact_mut(group_dim).enumerate().for_each(task);
            } else {
                att.par_chunks_exact_mut(group_dim)
                    .enumerate()
                    .for_each(task);
            }
            let o = block.wo.forward_host(&att, total)?;
            add_assign(&mut x, &o);
            let ffn_norm = HostView::new(&block.ffn_norm)?;
            rms_norm(&x, ffn_norm.slice()?, eps, &mut h);
            let [mut gate, up] =
                Linear::forward_host_many([&block.w_gate, &block.w_up], &h, total)?;
            silu_mul(&mut gate, &up);
            let down = block.w_down.forward_host(&gate, total)?;
            add_assign(&mut x, &down);
        }
        for (step, &(_, len)) in batch.iter_mut().zip(spans) {
            step.cache.advance(len);
        }

        let wanted: Vec<usize> = batch
            .iter()
            .zip(spans)
            .filter(|(step, _)| step.want_logits)
            .map(|(_, &(start, len))| start + len - 1)
            .collect();
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let mut last = Vec::with_capacity(wanted.len() * hidden);
        for &t in &wanted {
            last.extend_from_slice(&x[t * hidden..(t + 1) * hidden]);
        }
        let norm = HostView::new(&self.norm)?;
        let mut normed = vec![0f32; last.len()];
        rms_norm(&last, norm.slice()?, eps, &mut normed);
        // One logits row per sequence.
        let logits = self.lm_head.forward_host(&normed, wanted.len())?;
        let vocab = logits.len() / wanted.len();
        Ok(logits.chunks_exact(vocab).map(<[f32]>::to_vec).collect())
    }
}

/// Row-wise RMSNorm of `x (rows, w.len())` into `out`, as candle's `rms_norm` (f32 sums).
pub(crate) fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let dim = w.len();
    for (xr, or) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let sum2 = simd::sum_squares(xr);
        let inv = 1.0 / (sum2 / dim as f32 + eps).sqrt();
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
            *o = v * inv * g;
        }
    }
}

fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// `gate = silu(gate) * up`.
pub(crate) fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + simd::exp(-*g)) * u;
    }
}

/// RoPE tables `(context, half)` and the layout of rotated pairs.
pub(crate) struct Rope<'a> {
    pub cos: &'a [f32],
    pub sin: &'a [f32],
    pub half: usize,
    /// Pairs `(2i, 2i+1)` (GGUF) rather than `(i, i + half)` (Hugging Face).
    pub interleaved: bool,
}

impl Rope<'_> {
    /// Rotates `x (tokens, heads * 2 * half)` in place, token `t` at `positions[t]`.
    pub(crate) fn apply(&self, x: &mut [f32], heads: usize, head_dim: usize, positions: &[usize]) {
        let half = self.half;
        for (row, &pos) in x.chunks_exact_mut(heads * head_dim).zip(positions) {
            let cos = &self.cos[pos * half..(pos + 1) * half];
            let sin = &self.sin[pos * half..(pos + 1) * half];
            for head in row.chunks_exact_mut(head_dim) {
                if self.interleaved {
                    for ((pair, &c), &s) in head.chunks_exact_mut(2).zip(cos).zip(sin) {
                        let (a, b) = (pair[0], pair[1]);
                        pair[0] = a * c - b * s;
                        pair[1] = a * s + b * c;
                    }
                } else {
                    let (lo, hi) = head.split_at_mut(half);
                    for (((a, b), &c), &s) in lo.iter_mut().zip(hi.iter_mut()).zip(cos).zip(sin) {
                        let (x0, x1) = (*a, *b);
                        *a = x0 * c - x1 * s;
                        *b = x0 * s + x1 * c;
                    }
                }
            }
        }
    }
}

/// Head counts of grouped-query attention.
#[derive(Clone, Copy)]
pub(crate) struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl AttnShape {
    /// Softmax attention of the query heads that share KV head `kv_head`, `q (group *
    /// head_dim)`, over the first `visible` tokens of token-major `keys`/`values` `(tokens,
    /// n_kv_heads * head_dim)`, into `out (group * head_dim)`. Each key and value row is
    /// read once for the whole group.
    pub(crate) fn attend_group(
        &self,
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        kv_head: usize,
        visible: usize,
        out: &mut [f32],
    ) {
        let mut scores = vec![0f32; (self.n_heads / self.n_kv_heads) * visible];
        simd::attend_group(*self, q, keys, values, kv_head, visible, &mut scores, out);
    }
}

/// Small vector helpers written so that LLVM vectorizes them (independent lane
/// accumulators, no branches), compiled for AVX2 + FMA where the CPU has them.
mod simd {
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
        /// See [`super::AttnShape::attend_group`]; `scores` is `group * visible` scratch.
        #[allow(clippy::too_many_arguments)]
        fn attend_group / attend_group_on(
            shape: super::AttnShape,
            q: &[f32],
            keys: &[f32],
            values: &[f32],
            kv_head: usize,
            visible: usize,
            scores: &mut [f32],
            out: &mut [f32]
        ) -> () = attend_group_imp;
    }

    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn attend_group_imp(
        shape: super::AttnShape,
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        kv_head: usize,
        visible: usize,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let hd = shape.head_dim;
        let group = shape.n_heads / shape.n_kv_heads;
        let stride = shape.n_kv_heads * hd;
        let scale = 1.0 / (hd as f32).sqrt();
        let cols = kv_head * hd..(kv_head + 1) * hd;
        for (j, k) in keys.chunks_exact(stride).take(visible).enumerate() {
            let k = &k[cols.clone()];
            for (g, qh) in q.chunks_exact(hd).enumerate() {
                scores[g * visible + j] = dot_imp(qh, k) * scale;
            }
        }
        for s in scores.chunks_exact_mut(visible) {
            let max = s.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let inv = 1.0 / exp_sub_sum_imp(s, max);
            s.iter_mut().for_each(|v| *v *= inv);
        }
        out.fill(0.0);
        for (j, v) in values.chunks_exact(stride).take(visible).enumerate() {
            let v = &v[cols.clone()];
            for (g, o) in out.chunks_exact_mut(hd).enumerate().take(group) {
                axpy_imp(o, scores[g * visible + j], v);
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
    fn sum_squares_imp(x: &[f32]) -> f32 {
        dot_imp(x, x)
    }

    #[inline(always)]
    fn axpy_imp(y: &mut [f32], a: f32, x: &[f32]) {
        for (o, &v) in y.iter_mut().zip(x) {
            *o += a * v;
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
}

#[cfg(test)]
mod tests {
    use super::super::pseudo_random;
    use super::*;

    #[test]
    fn exp_is_close_to_std() {
        for i in -8700..=8800 {
            let x = i as f32 * 0.01;
            let (got, want) = (simd::exp(x), x.exp());
            assert!(
                (got - want).abs() <= 4.0 * f32::EPSILON * want,
                "exp({x}) = {got}, std {want}"
            );
        }
        assert!(simd::exp(f32::NEG_INFINITY) < 1e-37);
    }

    /// Every kernel path this CPU has gives the portable build's results bit for bit.
    #[test]
    fn vector_helpers_agree_on_every_kernel_path() {
        use super::super::cpu::CpuKernels;
        let shape = AttnShape {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 16,
        };
        for kernels in CpuKernels::available() {
            for n in [1, 7, 8, 64, 67] {
                let a = pseudo_random(n, 1);
                let b = pseudo_random(n, 2);
                let bits = |x: f32| x.to_bits();
                assert_eq!(
                    bits(simd::dot_on(kernels, &a, &b)),
                    bits(simd::dot_on(CpuKernels::Scalar, &a, &b)),
                    "{kernels}: dot of {n}"
                );
                assert_eq!(
                    bits(simd::sum_squares_on(kernels, &a)),
                    bits(simd::sum_squares_on(CpuKernels::Scalar, &a)),
                    "{kernels}: sum_squares of {n}"
                );
                let (mut e1, mut e2) = (a.clone(), a.clone());
                let s1 = simd::exp_sub_sum_on(kernels, &mut e1, 0.5);
                let s2 = simd::exp_sub_sum_on(CpuKernels::Scalar, &mut e2, 0.5);
                assert_eq!(
                    (bits(s1), &e1),
                    (bits(s2), &e2),
                    "{kernels}: exp_sub_sum of {n}"
                );
                // One KV head's group of query heads over `n` cached positions.
                let q = pseudo_random(2 * 16, 3);
                let (keys, values) = (pseudo_random(n * 2 * 16, 4), pseudo_random(n * 2 * 16, 5));
                let mut outs = Vec::new();
                for k in [kernels, CpuKernels::Scalar] {
                    let (mut scores, mut out) = (vec![0f32; 2 * n], vec![0f32; 2 * 16]);
                    simd::attend_group_on(
                        k,
                        shape,
                        &q,
                        &keys,
                        &values,
                        1,
                        n,
                        &mut scores,
                        &mut out,
                    );
                    outs.push(out);
                }
                assert_eq!(outs[0], outs[1], "{kernels}: attend_group over {n}");
            }
        }
    }

    #[test]
    fn vector_helpers_match_plain_loops() {
        for n in [1, 7, 8, 64, 67] {
            let a = pseudo_random(n, 1);
            let b = pseudo_random(n, 2);
            let dot: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((simd::dot(&a, &b) - dot).abs() < 1e-5);
            let mut e = a.clone();
            let max = a.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let sum = simd::exp_sub_sum(&mut e, max);
            let want: Vec<f32> = a.iter().map(|v| (v - max).exp()).collect();
            assert!((sum - want.iter().sum::<f32>()).abs() < 1e-5);
            for (g, w) in e.iter().zip(&want) {
                assert!((g - w).abs() < 1e-6);
            }
        }
    }

    /// RMSNorm, RoPE (both layouts) and SiLU·up against candle's ops on the same data.
    #[test]
    fn small_ops_match_candle() -> candle_core::Result<()> {
        use candle_core::{Device, Tensor};
        let dev = Device::Cpu;
        let (rows, heads, hd) = (3, 2, 8);
        let dim = heads * hd;
        let x = pseudo_random(rows * dim, 3);
        let w = pseudo_random(dim, 4);
        let mut out = vec![0f32; x.len()];
        rms_norm(&x, &w, 1e-5, &mut out);
        let xt = Tensor::from_slice(&x, (rows, dim), &dev)?;
        let want = candle_nn::ops::rms_norm(&xt, &Tensor::from_slice(&w, dim, &dev)?, 1e-5)?;
        let want = want.flatten_all()?.to_vec1::<f32>()?;
        for (g, w) in out.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "rms_norm {g} vs {w}");
        }

        let positions = [0usize, 5, 2];
        let half = hd / 2;
        let cos: Vec<f32> = (0..8 * half).map(|i| (i as f32 * 0.37).cos()).collect();
        let sin: Vec<f32> = (0..8 * half).map(|i| (i as f32 * 0.37).sin()).collect();
        for interleaved in [true, false] {
            let mut got = x.clone();
            Rope {
                cos: &cos,
                sin: &sin,
                half,
                interleaved,
            }
            .apply(&mut got, heads, hd, &positions);
            let pos = Tensor::from_slice(&[0u32, 5, 2], 3, &dev)?;
            let c = Tensor::from_slice(&cos, (8, half), &dev)?.index_select(&pos, 0)?;
            let s = Tensor::from_slice(&sin, (8, half), &dev)?.index_select(&pos, 0)?;
            let t = xt
                .reshape((rows, heads, hd))?
                .transpose(0, 1)?
                .contiguous()?
                .unsqueeze(0)?;
            let r = if interleaved {
                candle_nn::rotary_emb::rope_i(&t, &c, &s)?
            } else {
                candle_nn::rotary_emb::rope(&t, &c, &s)?
            };
            let want = r
                .squeeze(0)?
                .transpose(0, 1)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-5, "rope {interleaved}: {g} vs {w}");
            }
        }

        let mut gate = x.clone();
        let up = pseudo_random(x.len(), 5);
        silu_mul(&mut gate, &up);
        let want = (candle_nn::ops::silu(&xt)? * Tensor::from_slice(&up, (rows, dim), &dev)?)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for (g, w) in gate.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "silu_mul {g} vs {w}");
        }
        Ok(())
    }

    /// Grouped-query attention of one head against a plain softmax(q·K/√d)·V.
    #[test]
    fn attention_matches_plain_softmax() {
        let shape = AttnShape {
            n_heads: 6,
            n_kv_heads: 2,
            head_dim: 16,
        };
        let tokens = 37;
        let stride = 2 * 16;
        let keys = pseudo_random(tokens * stride, 6);
        let values = pseudo_random(tokens * stride, 7);
        let q_all = pseudo_random(6 * 16, 8);
        for (kvh, visible) in [(0, 1), (1, 20), (0, 37), (1, 9)] {
            let mut out = vec![1f32; 3 * 16];
            shape.attend_group(
                &q_all[kvh * 48..(kvh + 1) * 48],
                &keys,
                &values,
                kvh,
                visible,
                &mut out,
            );
            for g in 0..3 {
                let head = kvh * 3 + g;
                let q = &q_all[head * 16..(head + 1) * 16];
                let scores: Vec<f32> = (0..visible)
                    .map(|j| {
                        (0..16)
                            .map(|i| q[i] * keys[j * stride + kvh * 16 + i])
                            .sum::<f32>()
                            / 4.0
                    })
                    .collect();
                let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
                let e: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f32 = e.iter().sum();
                let want: Vec<f32> = (0..16)
                    .map(|i| {
                        (0..visible)
                            .map(|j| e[j] / sum * values[j * stride + kvh * 16 + i])
                            .sum()
                    })
                    .collect();
                for (o, w) in out[g * 16..(g + 1) * 16].iter().zip(&want) {
                    assert!(
                        (o - w).abs() < 1e-5,
                        "head {head} visible {visible}: {o} vs {w}"
                    );
                }
            }
        }
    }
}

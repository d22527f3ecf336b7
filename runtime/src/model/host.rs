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

use super::kv_cache::HostLayer;
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

        let shape = AttnShape {
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hd,
        };
        // Keys visible to each token: the cache before the step plus the step's tokens up to
        // and including itself (the same in every layer).
        let visible: Vec<usize> = (0..total)
            .map(|t| {
                let s = seq_of[t];
                batch[s].cache.len() + (t - spans[s].0) + 1
            })
            .collect();
        let plan = shape.plan(&visible);
        let mut partials = vec![0f32; plan.splits.len() * plan.part_len];

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
            let kv: Vec<HostLayer<'_>> = batch
                .iter()
                .map(|s| s.cache.host_layer(layer))
                .collect::<Result<_>>()?;
            let task = |(i, part): (usize, &mut [f32])| {
                let split = &plan.splits[i];
                let q = &q[split.token * q_dim + split.kv_head * group_dim..][..group_dim];
                let kv = kv[seq_of[split.token]];
                shape.attend_partial(q, kv, split.kv_head, split.keys.clone(), part);
            };
            if plan.work < PARALLEL_ATTENTION_WORK {
                partials
                    .chunks_exact_mut(plan.part_len)
                    .enumerate()
                    .for_each(task);
            } else {
                partials
                    .par_chunks_exact_mut(plan.part_len)
                    .enumerate()
                    .for_each(task);
            }
            shape.merge(&plan, &partials, &mut att);
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

/// Keys a split covers at most: a token's attention over a longer context is cut into splits
/// that run as separate tasks (their partial softmaxes merged afterwards), so a long context
/// spreads over the threads even for one sequence. It depends on the token's own number of
/// visible keys only, never on what else shares the step, so batching does not change a
/// sequence's arithmetic.
const SPLIT_KEYS: usize = 512;

/// Keys scored at a time inside a split (the chunk's scores stay in L1 and its keys are
/// still there when their values are summed).
const CHUNK_KEYS: usize = 64;

/// One attention task: the query heads of `kv_head` at token `token` over keys `keys`.
pub(crate) struct Split {
    pub token: usize,
    pub kv_head: usize,
    pub keys: std::ops::Range<usize>,
}

/// The attention tasks of one step, the same in every layer.
pub(crate) struct AttnPlan {
    pub splits: Vec<Split>,
    /// `f32`s of one split's partial result: per query head of the group its running max,
    /// its sum of exponentials, and its unnormalized output.
    pub part_len: usize,
    /// Query-key products per layer (decides whether to use the thread pool).
    pub work: usize,
}

impl AttnShape {
    fn group(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    /// The tasks for tokens that see `visible[t]` keys each: per token and KV head, one split
    /// per [`SPLIT_KEYS`] keys, in token, head, key order.
    pub(crate) fn plan(&self, visible: &[usize]) -> AttnPlan {
        let mut splits = Vec::new();
        for (token, &n) in visible.iter().enumerate() {
            for kv_head in 0..self.n_kv_heads {
                let mut from = 0;
                while from < n {
                    let to = (from + SPLIT_KEYS).min(n);
                    splits.push(Split {
                        token,
                        kv_head,
                        keys: from..to,
                    });
                    from = to;
                }
            }
        }
        AttnPlan {
            splits,
            part_len: self.group() * (self.head_dim + 2),
            work: visible.iter().sum::<usize>() * self.n_heads * self.head_dim,
        }
    }

    /// Partial softmax attention of the query heads that share KV head `kv_head`, `q (group *
    /// head_dim)`, over keys `range` of a layer's token-major keys and values `(tokens,
    /// n_kv_heads * head_dim)`, into `part` ([`AttnPlan::part_len`]). Each key row is read once
    /// for the whole group; each head's output sums its chunk of value rows in registers.
    /// Half-precision rows are widened exactly, so they give what `f32` rows holding the same
    /// values give.
    pub(crate) fn attend_partial(
        &self,
        q: &[f32],
        kv: HostLayer<'_>,
        kv_head: usize,
        range: std::ops::Range<usize>,
        part: &mut [f32],
    ) {
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let s = match kv {
                HostLayer::F32(..) => CHUNK_KEYS * self.group(),
                HostLayer::F16(..) => CHUNK_KEYS * (self.group() + 2 * self.head_dim),
            };
            scratch.resize(s, 0.0);
            let s = &mut scratch[..];
            match kv {
                HostLayer::F32(k, v) => {
                    simd::attend_partial(*self, q, k, v, kv_head, range, s, part)
                }
                HostLayer::F16(k, v) => {
                    let kernels = super::cpu::CpuKernels::selected();
                    simd::attend_partial_f16_on(kernels, *self, q, k, v, kv_head, range, s, part)
                }
            }
        });
    }

    /// Merges each token and KV head's splits into `out (tokens, n_heads * head_dim)`, in
    /// split order.
    pub(crate) fn merge(&self, plan: &AttnPlan, partials: &[f32], out: &mut [f32]) {
        let (group, hd) = (self.group(), self.head_dim);
        let mut i = 0;
        for (c, out) in out.chunks_exact_mut(group * hd).enumerate() {
            let (token, kv_head) = (c / self.n_kv_heads, c % self.n_kv_heads);
            let first = i;
            while i < plan.splits.len()
                && plan.splits[i].token == token
                && plan.splits[i].kv_head == kv_head
            {
                i += 1;
            }
            let parts = &partials[first * plan.part_len..i * plan.part_len];
            for g in 0..group {
                let max = parts
                    .chunks_exact(plan.part_len)
                    .fold(f32::NEG_INFINITY, |m, p| m.max(p[g]));
                let o = &mut out[g * hd..(g + 1) * hd];
                o.fill(0.0);
                let mut sum = 0.0;
                for p in parts.chunks_exact(plan.part_len) {
                    let w = simd::exp(p[g] - max);
                    sum += w * p[group + g];
                    let po = &p[2 * group + g * hd..2 * group + (g + 1) * hd];
                    for (o, &v) in o.iter_mut().zip(po) {
                        *o += w * v;
                    }
                }
                let inv = 1.0 / sum;
                o.iter_mut().for_each(|v| *v *= inv);
            }
        }
    }
}

thread_local! {
    /// The scores of one chunk of keys: per attention thread.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
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
                let keys = pseudo_random(n * 2 * 16, 4);
                let values = pseudo_random(n * 2 * 16, 5);
                let mut outs = Vec::new();
                for k in [kernels, CpuKernels::Scalar] {
                    let mut scratch = vec![0f32; CHUNK_KEYS * 2];
                    let mut part = vec![0f32; 2 * (16 + 2)];
                    simd::attend_partial_on(
                        k,
                        shape,
                        &q,
                        &keys,
                        &values,
                        1,
                        0..n,
                        &mut scratch,
                        &mut part,
                    );
                    outs.push(part);
                }
                assert_eq!(outs[0], outs[1], "{kernels}: attend_partial over {n}");
                // The same rows in half precision: every path agrees, and with `f32` rows
                // holding the rounded values.
                let half = |x: &[f32]| -> Vec<u16> {
                    x.iter()
                        .map(|&v| half::f16::from_f32(v).to_bits())
                        .collect()
                };
                let (keys16, values16) = (half(&keys), half(&values));
                let widened = |x: &[u16]| -> Vec<f32> {
                    x.iter()
                        .map(|&b| half::f16::from_bits(b).to_f32())
                        .collect()
                };
                let (keys_w, values_w) = (widened(&keys16), widened(&values16));
                let mut outs = Vec::new();
                for k in [kernels, CpuKernels::Scalar] {
                    let mut scratch = vec![0f32; CHUNK_KEYS * (2 + 2 * 16)];
                    let mut part = vec![0f32; 2 * (16 + 2)];
                    simd::attend_partial_f16_on(
                        k,
                        shape,
                        &q,
                        &keys16,
                        &values16,
                        1,
                        0..n,
                        &mut scratch,
                        &mut part,
                    );
                    outs.push(part);
                }
                let mut scratch = vec![0f32; CHUNK_KEYS * 2];
                let mut part = vec![0f32; 2 * (16 + 2)];
                simd::attend_partial_on(
                    CpuKernels::Scalar,
                    shape,
                    &q,
                    &keys_w,
                    &values_w,
                    1,
                    0..n,
                    &mut scratch,
                    &mut part,
                );
                assert_eq!(outs[0], outs[1], "{kernels}: f16 attend_partial over {n}");
                assert_eq!(
                    outs[0], part,
                    "{kernels}: f16 attend_partial over {n} vs f32"
                );
            }
        }
    }

    /// [`AttnShape::attend_partial`] written plainly (each key row scored for every head,
    /// then each value row added to every head's output): the kernels reorder loops and
    /// keep sums in registers, never the arithmetic, so they match it bit for bit.
    #[allow(clippy::needless_range_loop)]
    fn plain_partial(
        shape: AttnShape,
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        kv_head: usize,
        range: std::ops::Range<usize>,
    ) -> Vec<f32> {
        use super::super::cpu::CpuKernels::Scalar;
        let (hd, group) = (shape.head_dim, shape.group());
        let stride = shape.n_kv_heads * hd;
        let scale = 1.0 / (hd as f32).sqrt();
        let (mut m, mut l) = (vec![f32::NEG_INFINITY; group], vec![0f32; group]);
        let mut o = vec![0f32; group * hd];
        let mut from = range.start;
        while from < range.end {
            let n = (range.end - from).min(CHUNK_KEYS);
            let row = |src: &[f32], j: usize| -> Vec<f32> {
                src[(from + j) * stride + kv_head * hd..][..hd].to_vec()
            };
            let mut scores = vec![vec![0f32; n]; group];
            for j in 0..n {
                for g in 0..group {
                    scores[g][j] = simd::dot_on(Scalar, &q[g * hd..][..hd], &row(keys, j)) * scale;
                }
            }
            for g in 0..group {
                let new_max = scores[g].iter().fold(m[g], |a, &v| a.max(v));
                let rescale = simd::exp(m[g] - new_max);
                l[g] = l[g] * rescale + simd::exp_sub_sum_on(Scalar, &mut scores[g], new_max);
                o[g * hd..(g + 1) * hd]
                    .iter_mut()
                    .for_each(|v| *v *= rescale);
                m[g] = new_max;
            }
            for j in 0..n {
                let v = row(values, j);
                for g in 0..group {
                    for (o, &v) in o[g * hd..(g + 1) * hd].iter_mut().zip(&v) {
                        *o += scores[g][j] * v;
                    }
                }
            }
            from += n;
        }
        [m, l, o].concat()
    }

    /// Every kernel path matches [`plain_partial`] bit for bit, at head sizes that do and do
    /// not fill whole register blocks.
    #[test]
    fn attention_kernels_match_the_plain_loops_exactly() {
        use super::super::cpu::CpuKernels;
        for head_dim in [16, 40, 64] {
            let shape = AttnShape {
                n_heads: 6,
                n_kv_heads: 2,
                head_dim,
            };
            let n = CHUNK_KEYS * 2 + 9;
            let q = pseudo_random(3 * head_dim, 11);
            let keys = pseudo_random(n * 2 * head_dim, 12);
            let values = pseudo_random(n * 2 * head_dim, 13);
            for range in [0..n, 5..CHUNK_KEYS + 3, n - 1..n] {
                let want = plain_partial(shape, &q, &keys, &values, 1, range.clone());
                for kernels in CpuKernels::available() {
                    let mut scratch = vec![0f32; CHUNK_KEYS * 3];
                    let mut part = vec![0f32; 3 * (head_dim + 2)];
                    simd::attend_partial_on(
                        kernels,
                        shape,
                        &q,
                        &keys,
                        &values,
                        1,
                        range.clone(),
                        &mut scratch,
                        &mut part,
                    );
                    assert_eq!(part, want, "{kernels}: head_dim {head_dim}, keys {range:?}");
                }
            }
        }
    }

    /// Every half-precision value widens as `half` widens it (NaNs stay NaN), on every path.
    #[test]
    fn f16_widening_is_exact() {
        use super::super::cpu::CpuKernels;
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let want: Vec<f32> = all
            .iter()
            .map(|&b| half::f16::from_bits(b).to_f32())
            .collect();
        let same = |got: f32, want: f32| {
            got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan())
        };
        for (&bits, &w) in all.iter().zip(&want) {
            assert!(same(simd::f16_to_f32(bits), w), "{bits:#06x}");
        }
        for kernels in CpuKernels::available() {
            // Rows of 13 (not a multiple of 8) from a stride of 16.
            let mut got = vec![0f32; all.len() / 16 * 13];
            simd::widen_f16_on(kernels, &all, 16, 13, &mut got);
            for (r, row) in got.chunks_exact(13).enumerate() {
                for (c, &g) in row.iter().enumerate() {
                    assert!(same(g, want[r * 16 + c]), "{kernels}: {:#06x}", r * 16 + c);
                }
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

    /// Grouped-query attention against a plain softmax(q·K/√d)·V, for contexts within one chunk, across chunks, and across splits (merged).
    #[test]
    fn attention_matches_plain_softmax() {
        let shape = AttnShape {
            n_heads: 6,
            n_kv_heads: 2,
            head_dim: 16,
        };
        let tokens = SPLIT_KEYS * 2 + 77;
        let stride = 2 * 16;
        let keys = pseudo_random(tokens * stride, 6);
        let values = pseudo_random(tokens * stride, 7);
        let (kf, vf) = (&keys, &values);
        // Four tokens, each seeing its own number of keys (one chunk, several, several
        // splits); their queries for all heads.
        let visible = [1, 20, CHUNK_KEYS * 3 + 5, tokens];
        let q_all = pseudo_random(visible.len() * 6 * 16, 8);
        let plan = shape.plan(&visible);
        assert_eq!(
            plan.splits.len(),
            2 * (1 + 1 + 1 + 3),
            "splits per token and head"
        );
        let mut partials = vec![0f32; plan.splits.len() * plan.part_len];
        for (split, part) in plan
            .splits
            .iter()
            .zip(partials.chunks_exact_mut(plan.part_len))
        {
            let q = &q_all[split.token * 96 + split.kv_head * 48..][..48];
            let kv = HostLayer::F32(&keys, &values);
            shape.attend_partial(q, kv, split.kv_head, split.keys.clone(), part);
        }
        let mut out = vec![1f32; visible.len() * 96];
        shape.merge(&plan, &partials, &mut out);
        for (t, &n) in visible.iter().enumerate() {
            for head in 0..6 {
                let kvh = head / 3;
                let q = &q_all[t * 96 + head * 16..][..16];
                let scores: Vec<f32> = (0..n)
                    .map(|j| {
                        (0..16)
                            .map(|i| q[i] * kf[j * stride + kvh * 16 + i])
                            .sum::<f32>()
                            / 4.0
                    })
                    .collect();
                let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
                let e: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f32 = e.iter().sum();
                let got = &out[t * 96 + head * 16..][..16];
                for (i, o) in got.iter().enumerate() {
                    let want: f32 = (0..n)
                        .map(|j| e[j] / sum * vf[j * stride + kvh * 16 + i])
                        .sum();
                    assert!(
                        (o - want).abs() < 1e-5,
                        "token {t} head {head} visible {n}: {o} vs {want}"
                    );
                }
            }
        }
    }
}

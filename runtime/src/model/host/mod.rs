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

#[cfg(test)]
use super::kv_cache::HeadKv;
use super::kv_cache::{HostLayer, KEY_BLOCK};
use super::linear::Linear;
use super::llama::{BetweenLayers, Block, LlamaModel, SeqStep};
use super::lora::{StepLora, Target};
use super::LlamaConfig;
use crate::{Error, Result};
#[cfg(test)]
use attention::SPLIT_KEYS;
use attention::{AttnPlan, AttnShape, CHUNK_KEYS};

/// The contents of a contiguous CPU tensor, borrowed.
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
        self.typed()
    }

    /// The contents as `T` (the tensor's dtype).
    fn typed<T: candle_core::WithDType>(&self) -> Result<&[T]> {
        match &*self.guard {
            Storage::Cpu(cpu) => Ok(&cpu.as_slice::<T>()?[self.start..self.end]),
            _ => Err(Error::Weights(
                "host path: a weight tensor is not on the CPU".into(),
            )),
        }
    }
}

impl LlamaModel {
    /// Whether this model runs the host path (`forward_host`): CPU, and every projection
    /// takes host buffers; else candle's ops.
    pub fn uses_host_path(&self) -> bool {
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
        between_layers: &mut BetweenLayers<'_>,
    ) -> Result<Vec<Vec<f32>>> {
        let cfg = &self.config;
        let mut x = self.embed.rows_host(ids, cfg.hidden_size, &self.lm_head)?;
        let (cos, sin) = self.rope_tables()?;
        let (cos, sin) = (HostView::new(&cos)?, HostView::new(&sin)?);
        let rope = Rope {
            cos: cos.slice()?,
            sin: sin.slice()?,
            half: cfg.head_dim / 2,
            interleaved: cfg.rope_interleaved,
        };
        let lora = StepLora::new(batch, spans, cfg, None)?;
        let mut pass = HostPass::new(cfg, batch, ids.len(), positions, spans, rope);
        for (layer, block) in self.blocks.iter().enumerate() {
            between_layers(self)?;
            pass.attention((layer, block), batch, &mut x, &lora)?;
            pass.feed_forward((layer, block), &mut x, &lora)?;
        }
        for (step, &(_, len)) in batch.iter_mut().zip(spans) {
            step.cache.advance(len);
        }
        self.logits_host(batch, spans, &x)
    }

    /// The logits rows the sequences want ([`SeqStep::logits`]), from their rows of `x
    /// (tokens, hidden)`.
    fn logits_host(
        &self,
        batch: &[SeqStep<'_>],
        spans: &[(usize, usize)],
        x: &[f32],
    ) -> Result<Vec<Vec<f32>>> {
        let hidden = self.config.hidden_size;
        let wanted: Vec<usize> = super::llama::logit_rows(batch, spans).collect();
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let mut last = Vec::with_capacity(wanted.len() * hidden);
        for &t in &wanted {
            last.extend_from_slice(&x[t * hidden..(t + 1) * hidden]);
        }
        let norm = HostView::new(&self.norm)?;
        let mut normed = vec![0f32; last.len()];
        rms_norm(
            &last,
            norm.slice()?,
            self.config.rms_eps as f32,
            &mut normed,
        );
        // One logits row per wanted position.
        let logits = self.lm_head.forward_host(&normed, wanted.len())?;
        let vocab = logits.len() / wanted.len();
        Ok(logits.chunks_exact(vocab).map(<[f32]>::to_vec).collect())
    }
}

/// What the layers of one host step share: the step's layout, its attention tasks and the
/// buffers every layer reuses.
struct HostPass<'a> {
    rope: Rope<'a>,
    positions: &'a [usize],
    spans: &'a [(usize, usize)],
    /// Token `t` belongs to sequence `seq_of[t]`, at index `t - spans[seq].0` of its step.
    seq_of: Vec<usize>,
    shape: AttnShape,
    plan: AttnPlan,
    eps: f32,
    /// Tokens in the step.
    total: usize,
    /// Normed activations `(total, hidden)`.
    h: Vec<f32>,
    /// Attention output `(total, n_heads * head_dim)`.
    att: Vec<f32>,
    /// The attention splits' partial results.
    partials: Vec<f32>,
}

impl<'a> HostPass<'a> {
    fn new(
        cfg: &LlamaConfig,
        batch: &[SeqStep<'_>],
        total: usize,
        positions: &'a [usize],
        spans: &'a [(usize, usize)],
        rope: Rope<'a>,
    ) -> Self {
        let seq_of: Vec<usize> = spans
            .iter()
            .enumerate()
            .flat_map(|(s, &(_, len))| std::iter::repeat_n(s, len))
            .collect();
        let shape = AttnShape {
            n_heads: cfg.n_heads,
            n_kv_heads: cfg.n_kv_heads,
            head_dim: cfg.head_dim,
        };
        // Keys visible to each token: the cache before the step plus the step's tokens up to
        // and including itself (the same in every layer).
        let visible: Vec<usize> = (0..total)
            .map(|t| {
                let s = seq_of[t];
                batch[s].cache.len() + (t - spans[s].0) + 1
            })
            .collect();
        let window = cfg.sliding_window;
        let rows = shape.task_rows(&visible, window, rayon::current_num_threads());
        let plan = shape.plan(spans, &visible, window, rows);
        let partials = vec![0f32; plan.len];
        Self {
            rope,
            positions,
            spans,
            seq_of,
            shape,
            plan,
            eps: cfg.rms_eps as f32,
            total,
            h: vec![0f32; total * cfg.hidden_size],
            att: vec![0f32; total * cfg.n_heads * cfg.head_dim],
            partials,
        }
    }

    /// `x += wo · attention(rope(q), rope(k), v)` of layer `layer`, the step's keys and
    /// values appended to each sequence's cache first; each projection with its sequences'
    /// LoRA updates.
    fn attention(
        &mut self,
        (layer, block): (usize, &Block),
        batch: &mut [SeqStep<'_>],
        x: &mut [f32],
        lora: &StepLora<'_>,
    ) -> Result<()> {
        let AttnShape {
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hd,
        } = self.shape;
        let kv_dim = nkv * hd;
        let attn_norm = HostView::new(&block.attn_norm)?;
        rms_norm(x, attn_norm.slice()?, self.eps, &mut self.h);
        let (qkv, deltas) = rayon::join(
            || Linear::forward_host_many([&block.wq, &block.wk, &block.wv], &self.h, self.total),
            || lora.deltas_host(layer, &[Target::Q, Target::K, Target::V], &self.h),
        );
        let [mut q, mut k, mut v] = qkv?;
        for (y, d) in [&mut q, &mut k, &mut v].into_iter().zip(deltas?) {
            d.add_to(y);
        }
        for (y, bias) in [&mut q, &mut k, &mut v]
            .into_iter()
            .zip(block.qkv_bias.all())
        {
            if let Some(bias) = bias {
                let bias = HostView::new(bias)?;
                add_bias(y, bias.slice()?);
            }
        }
        self.rope.apply(&mut q, nh, hd, self.positions);
        self.rope.apply(&mut k, nkv, hd, self.positions);
        for (step, &(start, len)) in batch.iter_mut().zip(self.spans) {
            let rows = start * kv_dim..(start + len) * kv_dim;
            step.cache.append_host(layer, &k[rows.clone()], &v[rows])?;
        }
        let kv: Vec<HostLayer<'_>> = batch
            .iter()
            .map(|s| s.cache.host_layer(layer))
            .collect::<Result<_>>()?;
        let seq_of = &self.seq_of;
        let kv_of = |t: usize| kv[seq_of[t]];
        let (plan, shape) = (&self.plan, self.shape);
        shape.attend_all(plan, &q, kv_of, &mut self.partials);
        shape.merge(plan, &self.partials, &mut self.att);
        let (o, deltas) = rayon::join(
            || block.wo.forward_host(&self.att, self.total),
            || lora.deltas_host(layer, &[Target::O], &self.att),
        );
        let mut o = o?;
        deltas?.iter().for_each(|d| d.add_to(&mut o));
        add_assign(x, &o);
        Ok(())
    }

    /// `x += w_down · (silu(w_gate · norm(x)) * w_up · norm(x))`, each projection with its
    /// sequences' LoRA updates.
    fn feed_forward(
        &mut self,
        (layer, block): (usize, &Block),
        x: &mut [f32],
        lora: &StepLora<'_>,
    ) -> Result<()> {
        let ffn_norm = HostView::new(&block.ffn_norm)?;
        rms_norm(x, ffn_norm.slice()?, self.eps, &mut self.h);
        let (gate_up, deltas) = rayon::join(
            || Linear::forward_host_many([&block.w_gate, &block.w_up], &self.h, self.total),
            || lora.deltas_host(layer, &[Target::Gate, Target::Up], &self.h),
        );
        let [mut gate, mut up] = gate_up?;
        for (y, d) in [&mut gate, &mut up].into_iter().zip(deltas?) {
            d.add_to(y);
        }
        silu_mul(&mut gate, &up);
        let (down, deltas) = rayon::join(
            || block.w_down.forward_host(&gate, self.total),
            || lora.deltas_host(layer, &[Target::Down], &gate),
        );
        let mut down = down?;
        deltas?.iter().for_each(|d| d.add_to(&mut down));
        add_assign(x, &down);
        Ok(())
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

/// Adds `bias` to every row of `y (rows, bias.len())`.
fn add_bias(y: &mut [f32], bias: &[f32]) {
    for row in y.chunks_exact_mut(bias.len()) {
        add_assign(row, bias);
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

mod attention;
mod lora;
mod simd;

#[cfg(test)]
mod tests;

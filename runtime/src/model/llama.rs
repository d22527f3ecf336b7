//! The Llama forward pass over a ragged batch.
//!
//! All tokens of a step (a decode token per generating sequence, prompt chunks of prefilling
//! ones) form one `(tokens, hidden)` activation, so every projection is one matmul. RoPE is
//! applied once with each token's own position. Attention then runs per sequence against its
//! own cache, grouped-query style without copying KV heads: the query heads that share a KV head
//! are stacked as rows of one matmul.

use candle_core::{DType, Device, Tensor};
use candle_nn::ops::{rms_norm, silu, softmax_last_dim};
use candle_nn::rotary_emb::{rope, rope_i};

use std::sync::OnceLock;

use super::embed::Embedding;
use super::kv_cache::KvCache;
use super::linear::Linear;
use super::lora::{LoraAdapter, StepLora, Target};
use super::rope::rope_tables;
use super::{LlamaConfig, WeightForm};
use crate::{Error, Result};

/// One transformer block.
#[derive(Debug)]
pub(crate) struct Block {
    pub attn_norm: Tensor,
    pub wq: Linear,
    pub wk: Linear,
    pub wv: Linear,
    /// Biases added to the Q, K and V projections (Qwen 2's), f32 vectors.
    pub qkv_bias: QkvBias,
    pub wo: Linear,
    pub ffn_norm: Tensor,
    pub w_gate: Linear,
    pub w_up: Linear,
    pub w_down: Linear,
}

/// The optional biases of a block's Q, K and V projections.
#[derive(Debug, Default)]
pub(crate) struct QkvBias {
    pub q: Option<Tensor>,
    pub k: Option<Tensor>,
    pub v: Option<Tensor>,
}

impl QkvBias {
    pub(crate) fn all(&self) -> [Option<&Tensor>; 3] {
        [self.q.as_ref(), self.k.as_ref(), self.v.as_ref()]
    }
}

/// A loaded Llama-architecture model.
#[derive(Debug)]
pub struct LlamaModel {
    pub(crate) config: LlamaConfig,
    /// The token embedding (its own table, or the output projection's rows when tied).
    pub(crate) embed: Embedding,
    pub(crate) blocks: Vec<Block>,
    pub(crate) norm: Tensor,
    pub(crate) lm_head: Linear,
    /// `(context, head_dim / 2)` RoPE cos and sin tables, built at the first step for the
    /// context then served (a 128k declared context costs nothing until it is served).
    pub(crate) rope: OnceLock<std::result::Result<(Tensor, Tensor), String>>,
    pub(crate) device: Device,
    pub(crate) form: WeightForm,
    pub(crate) kv_dtype: DType,
}

/// A step's token ids, their positions, and each entry's `(first row, rows)`.
type StepLayout = (Vec<u32>, Vec<u32>, Vec<(usize, usize)>);

/// What [`LlamaModel::forward_between`] calls before each layer of a step.
pub type BetweenLayers<'a> = dyn FnMut(&LlamaModel) -> Result<()> + Send + 'a;

/// One sequence's part of a step.
pub struct SeqStep<'a> {
    /// Tokens to append at positions `cache.len()..`.
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    /// Return logits for the last `logits` of `tokens` (0: none; 1: the next token's, as in
    /// decode; more: also those of earlier positions, to verify a draft).
    pub logits: usize,
    /// The LoRA adapter its tokens run with (`None`: the base model alone).
    pub adapter: Option<&'a LoraAdapter>,
}

impl LlamaModel {
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The RoPE `(cos, sin)` tables of the context served, built on first use.
    pub(crate) fn rope_tables(&self) -> Result<(Tensor, Tensor)> {
        self.rope
            .get_or_init(|| rope_tables(&self.config, &self.device).map_err(|e| e.to_string()))
            .clone()
            .map_err(Error::Weights)
    }

    /// Bytes of the embedding table held apart from the output projection (0 when tied).
    pub fn embedding_bytes(&self) -> usize {
        self.embed.own_bytes()
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The resolved weight form (never `Auto` on CUDA; `Auto` on CPU means block codes).
    pub fn weight_form(&self) -> WeightForm {
        self.form
    }

    /// The element type of new KV caches.
    pub fn kv_dtype(&self) -> DType {
        self.kv_dtype
    }

    /// Sets the element type of the KV caches made from now on: `F32` or `F16` (on the CPU
    /// path half precision halves what attention reads per cached token, at the cost of
    /// rounding keys and values, which can flip a near-tie in greedy output; `F32` stays the
    /// CPU default so outputs match the reference).
    pub fn set_kv_dtype(&mut self, dtype: DType) -> Result<()> {
        if !matches!(dtype, DType::F32 | DType::F16) {
            return Err(Error::Config(format!(
                "KV cache dtype {dtype:?}: only f32 and f16 are supported"
            )));
        }
        self.kv_dtype = dtype;
        Ok(())
    }

    /// An empty cache for a new sequence.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(
            self.config.n_layers,
            self.config.n_kv_heads,
            self.config.head_dim,
            self.kv_dtype,
            self.device.clone(),
            self.uses_host_path(),
        )
    }

    /// Lowers the context to `tokens` (nothing when it is already that short) and rebuilds the
    /// RoPE tables for it. A model declaring 128k positions serves only as many as its KV budget
    /// holds: the context it reports is then one a single request can actually use.
    pub fn limit_context(&mut self, tokens: usize) -> Result<()> {
        if tokens == 0 {
            return Err(Error::Config("cannot limit the context to 0 tokens".into()));
        }
        if tokens < self.config.context_length {
            self.config.context_length = tokens;
            self.rope = OnceLock::new();
        }
        Ok(())
    }

    /// Limits the context to the tokens one sequence's KV cache can hold within `bytes` (the
    /// engine's KV budget) and returns the context served.
    pub fn fit_kv_budget(&mut self, bytes: usize) -> Result<usize> {
        let per_token = self.kv_bytes_per_token().max(1);
        let fits = bytes / per_token;
        if fits == 0 {
            return Err(Error::Config(format!(
                "a KV budget of {bytes} bytes holds no token (one takes {per_token} bytes)"
            )));
        }
        self.limit_context(fits)?;
        Ok(self.config.context_length)
    }

    /// KV-cache bytes one token takes.
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.config.n_layers
            * self.config.n_kv_heads
            * self.config.head_dim
            * self.kv_dtype.size_in_bytes()
    }

    /// Runs one step. Returns the logits (f32, on the CPU) of the last `logits` tokens of every
    /// entry, in batch order and position order within an entry. A row is the same bit for bit
    /// whatever else the step holds (on the CPU paths), so a token's logits do not depend on
    /// being decoded alone or verified among others.
    pub fn forward(&self, batch: &mut [SeqStep<'_>]) -> Result<Vec<Vec<f32>>> {
        self.forward_between(batch, &mut |_| Ok(()))
    }

    /// [`forward`](Self::forward), calling `between_layers` before each layer (the first
    /// included). The call may run other steps of this model on other sequences (their caches are not in
    /// `batch`): the engine starts a newcomer's prompt there instead of making it wait for
    /// the whole step in flight. An error from it ends this step with that error.
    pub fn forward_between(
        &self,
        batch: &mut [SeqStep<'_>],
        between_layers: &mut BetweenLayers<'_>,
    ) -> Result<Vec<Vec<f32>>> {
        let cfg = &self.config;
        let (ids, positions, spans) = self.layout(batch)?;
        let total = ids.len();
        if total == 0 {
            return Ok(Vec::new());
        }
        if self.uses_host_path() {
            let positions: Vec<usize> = positions.iter().map(|&p| p as usize).collect();
            // Run the whole step on a worker of rayon's pool: its parallel matmuls then start
            // on the current worker and wake at most the others, instead of every matmul
            // waking the whole pool and then this thread (≈ 150 matmuls per step).
            return rayon::scope(|_| {
                self.forward_host(batch, &ids, &positions, &spans, between_layers)
            });
        }
        let positions = Tensor::from_vec(positions, total, &self.device)?;
        let (cos, sin) = self.rope_tables()?;
        let cos = cos.index_select(&positions, 0)?;
        let sin = sin.index_select(&positions, 0)?;
        let mut x = self
            .embed
            .rows(&ids, cfg.hidden_size, &self.lm_head, &self.device)?;
        let lora = StepLora::new(batch, &spans, cfg, Some(&self.device))?;
        // A projection and its sequences' LoRA updates.
        let linear = |layer: usize, target: Target, w: &Linear, x: &Tensor| -> Result<Tensor> {
            lora.apply(layer, target, x, w.forward(x)?)
        };
        for (layer, block) in self.blocks.iter().enumerate() {
            between_layers(self)?;
            let h = rms_norm(&x, &block.attn_norm, cfg.rms_eps as f32)?;
            let attn = self.attention((layer, block), (&h, &cos, &sin), batch, &spans, &lora)?;
            x = (x + linear(layer, Target::O, &block.wo, &attn)?)?;
            let h = rms_norm(&x, &block.ffn_norm, cfg.rms_eps as f32)?;
            let gate = silu(&linear(layer, Target::Gate, &block.w_gate, &h)?)?;
            let up = linear(layer, Target::Up, &block.w_up, &h)?;
            x = (x + linear(layer, Target::Down, &block.w_down, &(gate * up)?)?)?;
        }
        for (step, &(_, len)) in batch.iter_mut().zip(&spans) {
            step.cache.advance(len);
        }
        let rows: Vec<u32> = logit_rows(batch, &spans).map(|t| t as u32).collect();
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let n = rows.len();
        let last = x.index_select(&Tensor::from_vec(rows, n, &self.device)?, 0)?;
        let last = rms_norm(&last, &self.norm, cfg.rms_eps as f32)?;
        let logits = self.lm_head.forward(&last)?;
        Ok(logits.to_dtype(DType::F32)?.to_vec2::<f32>()?)
    }

    /// The step's token ids, their positions and each entry's `(first row, rows)`, every
    /// entry checked (tokens, logits asked, context, vocabulary) and its cache given room.
    fn layout(&self, batch: &mut [SeqStep<'_>]) -> Result<StepLayout> {
        let cfg = &self.config;
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut spans = Vec::with_capacity(batch.len());
        for step in batch.iter_mut() {
            let start = step.cache.len();
            if step.tokens.is_empty() {
                return Err(Error::Weights("a sequence step has no tokens".into()));
            }
            if step.logits > step.tokens.len() {
                return Err(Error::Weights(format!(
                    "a sequence step asks for {} logit rows of {} tokens",
                    step.logits,
                    step.tokens.len()
                )));
            }
            if start + step.tokens.len() > cfg.context_length {
                return Err(Error::ContextOverflow {
                    prompt_tokens: start,
                    max_tokens: step.tokens.len(),
                    context_length: cfg.context_length,
                });
            }
            if let Some(&bad) = step.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                return Err(Error::Tokenizer(format!(
                    "token id {bad} is outside the vocabulary of {}",
                    cfg.vocab_size
                )));
            }
            step.cache.reserve(step.tokens.len())?;
            spans.push((ids.len(), step.tokens.len()));
            ids.extend_from_slice(step.tokens);
            positions.extend((start..start + step.tokens.len()).map(|p| p as u32));
        }
        Ok((ids, positions, spans))
    }

    /// The step's Q, K (rotated, `(heads, tokens, head_dim)`) and V (`(kv_heads, tokens,
    /// head_dim)`) of layer `layer`, each projection with its sequences' LoRA updates.
    fn qkv(
        &self,
        (layer, block): (usize, &Block),
        (h, cos, sin): (&Tensor, &Tensor, &Tensor),
        lora: &StepLora<'_>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let cfg = &self.config;
        let total = h.dim(0)?;
        let hd = cfg.head_dim;
        let rotate = |t: Tensor, heads: usize| -> Result<Tensor> {
            // (tokens, heads*hd) -> (1, heads, tokens, hd), rotated at each token's position.
            let t = t
                .reshape((total, heads, hd))?
                .transpose(0, 1)?
                .contiguous()?
                .unsqueeze(0)?;
            let r = if cfg.rope_interleaved {
                rope_i(&t, cos, sin)?
            } else {
                rope(&t, cos, sin)?
            };
            Ok(r.squeeze(0)?)
        };
        let [bq, bk, bv] = block.qkv_bias.all();
        let project = |w: &Linear, target: Target, bias: Option<&Tensor>| -> Result<Tensor> {
            let y = lora.apply(layer, target, h, w.forward(h)?)?;
            Ok(match bias {
                Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
                None => y,
            })
        };
        let q = rotate(project(&block.wq, Target::Q, bq)?, cfg.n_heads)?;
        let k = rotate(project(&block.wk, Target::K, bk)?, cfg.n_kv_heads)?;
        let v = project(&block.wv, Target::V, bv)?
            .reshape((total, cfg.n_kv_heads, hd))?
            .transpose(0, 1)?
            .contiguous()?;
        Ok((q, k, v))
    }

    /// Self-attention of one layer for every sequence of the step (`h` normed, RoPE's `cos`
    /// and `sin` at each token's position); returns `(tokens, hidden)`.
    fn attention(
        &self,
        (layer, block): (usize, &Block),
        (h, cos, sin): (&Tensor, &Tensor, &Tensor),
        batch: &mut [SeqStep<'_>],
        spans: &[(usize, usize)],
        lora: &StepLora<'_>,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let total = h.dim(0)?;
        let (nh, nkv, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        let group = nh / nkv;
        let (q, k, v) = self.qkv((layer, block), (h, cos, sin), lora)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut outputs = Vec::with_capacity(batch.len());
        for (step, &(start, len)) in batch.iter_mut().zip(spans) {
            let ks = k.narrow(1, start, len)?.contiguous()?;
            let vs = v.narrow(1, start, len)?.contiguous()?;
            let (keys, values) = step.cache.append(layer, &ks, &vs)?;
            let keys = keys.to_dtype(DType::F32)?;
            let values = values.to_dtype(DType::F32)?;
            let past = keys.dim(1)? - len;
            if len > 1 && self.device.is_cpu() {
                // Token by token, each over exactly the keys it sees: the same matmul shapes
                // (so the same sums in the same order) as when it is decoded alone. A batched
                // row must give the decoded row's keys and logits bit for bit (a preempted
                // sequence's tokens fed again, speculative drafts verified in one pass).
                for i in 0..len {
                    let seen = past + i + 1;
                    let first = first_visible(seen, cfg.sliding_window);
                    let qs = q
                        .narrow(1, start + i, 1)?
                        .contiguous()?
                        .reshape((nkv, group, hd))?;
                    let (keys, values) = (
                        keys.narrow(1, first, seen - first)?,
                        values.narrow(1, first, seen - first)?,
                    );
                    let att = softmax_last_dim(&(qs.matmul(&keys.t()?)? * scale)?)?;
                    outputs.push(att.matmul(&values)?.reshape((nh, 1, hd))?);
                }
                continue;
            }
            // Query heads sharing a KV head become rows of one matmul: (nkv, group*len, hd).
            let qs = q
                .narrow(1, start, len)?
                .contiguous()?
                .reshape((nkv, group * len, hd))?;
            let mut att = (qs.matmul(&keys.t()?)? * scale)?;
            if len > 1 || first_visible(past + 1, cfg.sliding_window) > 0 {
                let mask = causal_mask(group, len, past, cfg.sliding_window, &self.device)?;
                att = att.broadcast_add(&mask)?;
            }
            let att = softmax_last_dim(&att)?;
            let y = att.matmul(&values)?.reshape((nh, len, hd))?;
            outputs.push(y);
        }
        let y = Tensor::cat(&outputs, 1)?;
        Ok(y.transpose(0, 1)?.reshape((total, nh * hd))?)
    }
}

/// The rows of a step's `(tokens, hidden)` activations whose logits its entries want, in
/// order: each entry's last `logits` of its span `(first row, rows)`.
pub(crate) fn logit_rows<'a>(
    batch: &'a [SeqStep<'_>],
    spans: &'a [(usize, usize)],
) -> impl Iterator<Item = usize> + 'a {
    batch
        .iter()
        .zip(spans)
        .flat_map(|(step, &(start, len))| start + len - step.logits..start + len)
}

/// The first key a query sees when it sees `seen` keys (itself the last): 0, or the start of
/// its sliding window.
pub(crate) fn first_visible(seen: usize, window: Option<usize>) -> usize {
    window.map_or(0, |w| seen.saturating_sub(w))
}

/// `(group*len, past+len)` additive mask: row `g*len + i` is query `i`, which sees keys up to
/// `past + i` (from the start of its window, when there is one).
fn causal_mask(
    group: usize,
    len: usize,
    past: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let width = past + len;
    let mut mask = Vec::with_capacity(group * len * width);
    for _ in 0..group {
        for i in 0..len {
            let first = first_visible(past + i + 1, window);
            mask.extend((0..width).map(|j| {
                if j <= past + i && j >= first {
                    0f32
                } else {
                    f32::NEG_INFINITY
                }
            }));
        }
    }
    Ok(Tensor::from_vec(mask, (group * len, width), device)?)
}

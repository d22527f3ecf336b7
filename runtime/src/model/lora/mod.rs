//! LoRA adapters on a loaded base model, applied per sequence within one batch (Punica and
//! S-LoRA style): every targeted projection computes `y = W·x` for all the step's rows once,
//! then `y += scale · B·(A·x)` for the rows of the sequences using each adapter, grouped by
//! adapter. A sequence without an adapter runs the base model's arithmetic unchanged, and a
//! sequence's rows get the same arithmetic whatever else shares the step (each row's low-rank
//! product is computed on its own), so mixing adapters in a batch never changes an output.
//!
//! Adapters are read from PEFT's files (`load`) or from a GGUF LoRA file as llama.cpp writes it
//! (`gguf`); the low-rank products run in f32 (from pairs held in f32, or in bf16/f16 when
//! that holds their values exactly), on the host
//! buffers of the CPU path (`super::host`) or as candle ops (`super::llama`, any device). It
//! does not own the base model's projections, nor which adapters are resident (its caller's).

mod gguf;
mod load;

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, Tensor};

use super::llama::SeqStep;
use super::LlamaConfig;
use crate::{Error, Result};

/// The projections of a Llama block an adapter may target, by PEFT's module names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Target {
    pub const ALL: [Target; 7] = [
        Self::Q,
        Self::K,
        Self::V,
        Self::O,
        Self::Gate,
        Self::Up,
        Self::Down,
    ];

    /// PEFT's module names of [`Target::ALL`], in order.
    pub const PEFT_NAMES: [&'static str; 7] = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ];

    /// The module's name in PEFT's `target_modules` and tensor names.
    pub fn peft_name(self) -> &'static str {
        Self::PEFT_NAMES[self as usize]
    }

    /// The base model's GGUF tensor (`blk.N.<name>.weight`) it changes.
    pub fn gguf_name(self) -> &'static str {
        [
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        ][self as usize]
    }

    fn from_gguf(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.gguf_name() == name)
    }

    /// The block's submodule holding it (`self_attn` or `mlp`).
    fn parent(self) -> &'static str {
        match self {
            Self::Q | Self::K | Self::V | Self::O => "self_attn",
            Self::Gate | Self::Up | Self::Down => "mlp",
        }
    }

    pub fn from_peft(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.peft_name() == name)
    }

    /// `(inputs, outputs)` of the projection in a model of `shape`.
    fn dims(self, shape: &AdapterShape) -> (usize, usize) {
        let (h, q, kv, f) = (shape.hidden, shape.q_dim, shape.kv_dim, shape.ffn);
        match self {
            Self::Q => (h, q),
            Self::K | Self::V => (h, kv),
            Self::O => (q, h),
            Self::Gate | Self::Up => (h, f),
            Self::Down => (f, h),
        }
    }
}

/// What an adapter was loaded for: the base model's sizes and Q/K row order. An adapter is
/// applied only to a model of the same shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AdapterShape {
    layers: usize,
    hidden: usize,
    q_dim: usize,
    kv_dim: usize,
    ffn: usize,
    n_heads: usize,
    n_kv_heads: usize,
    /// Q/K rows permuted for interleaved RoPE (GGUF `llama`): B's rows are permuted alike.
    rope_interleaved: bool,
}

impl AdapterShape {
    fn of(c: &LlamaConfig) -> Self {
        Self {
            layers: c.n_layers,
            hidden: c.hidden_size,
            q_dim: c.n_heads * c.head_dim,
            kv_dim: c.n_kv_heads * c.head_dim,
            ffn: c.ffn_size,
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            rope_interleaved: c.rope_interleaved,
        }
    }
}

/// One targeted projection's low-rank pair on the model's device. On the CPU a pair whose
/// values all fit bfloat16 (or else f16) exactly, as those of a half-precision file do, is held
/// in that type: half the memory the host kernels read every step, and the same values.
/// Elsewhere, and for values only `f32` holds, `f32`.
#[derive(Debug)]
pub(crate) struct LowRank {
    /// `A`, `(rank, inputs)`.
    pub a: Tensor,
    /// `Bᵀ`, `(rank, outputs)`: a row's update is `Σ_j scale·(A_j·x) · bt_j`.
    pub bt: Tensor,
    /// `lora_alpha / r` (or llama.cpp's rule for a GGUF file).
    pub scale: f32,
}

impl LowRank {
    /// The pair of `a (rank, inputs)` and `b (outputs, rank)` (any float dtype, on the CPU;
    /// B's rows already in the base model's order) scaled by `scale`, on `device`.
    fn new(a: &Tensor, b: &Tensor, scale: f32, device: &Device) -> Result<Self> {
        let a = a.to_dtype(DType::F32)?.contiguous()?;
        let bt = b.to_dtype(DType::F32)?.t()?.contiguous()?;
        let dtype = if device.is_cpu() {
            held_as(&[&a, &bt])?
        } else {
            DType::F32
        };
        Ok(Self {
            a: a.to_dtype(dtype)?.to_device(device)?,
            bt: bt.to_dtype(dtype)?.to_device(device)?,
            scale,
        })
    }

    /// Memory its two matrices take.
    fn bytes(&self) -> usize {
        (self.a.elem_count() + self.bt.elem_count()) * self.a.dtype().size_in_bytes()
    }
}

/// The narrowest of bfloat16, f16 and f32 that holds every value of `ts` (f32 CPU tensors)
/// exactly.
fn held_as(ts: &[&Tensor]) -> Result<DType> {
    let mut values = Vec::new();
    for t in ts {
        values.push(t.flatten_all()?.to_vec1::<f32>()?);
    }
    let all = |fits: fn(f32) -> bool| values.iter().all(|v| v.iter().all(|&x| fits(x)));
    Ok(if all(|x| half::bf16::from_f32(x).to_f32() == x) {
        DType::BF16
    } else if all(|x| half::f16::from_f32(x).to_f32() == x) {
        DType::F16
    } else {
        DType::F32
    })
}

/// `w`'s rows (Q or K of `heads` heads) moved between Hugging Face's order (per head, the
/// first elements of the RoPE pairs, then the second ones) and GGUF `llama`'s interleaved
/// pairs: with `interleave`, row `a·d/2 + i` of a head becomes row `2i + a`, as llama.cpp's
/// converters permute Q/K weights and LoRA B matrices; without, the reverse.
fn reorder_head_rows(w: &Tensor, heads: usize, interleave: bool) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let half = rows / heads / 2;
    let grid = if interleave {
        (heads, 2, half, cols)
    } else {
        (heads, half, 2, cols)
    };
    Ok(w.reshape(grid)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// A LoRA adapter loaded onto a base model's shape.
pub struct LoraAdapter {
    /// Unique in the process (a reload of the same files gets a new one): what the prefix
    /// cache keys a prompt's KV by.
    id: u64,
    name: String,
    rank: usize,
    scale: f32,
    shape: AdapterShape,
    /// Per layer, per [`Target`] (in [`Target::ALL`]'s order), its pair when targeted.
    layers: Vec<[Option<LowRank>; 7]>,
    bytes: usize,
}

impl std::fmt::Debug for LoraAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoraAdapter")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("rank", &self.rank)
            .field("scale", &self.scale)
            .finish_non_exhaustive()
    }
}

fn next_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl LoraAdapter {
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    /// `lora_alpha / r` (or `/ √r` with rsLoRA; for a GGUF adapter whose pairs differ in rank,
    /// its largest rank's: each pair is scaled by its own rank).
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// Memory its weights take.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The projections it changes in at least one layer.
    pub fn targets(&self) -> Vec<Target> {
        Target::ALL
            .into_iter()
            .enumerate()
            .filter(|&(i, _)| self.layers.iter().any(|l| l[i].is_some()))
            .map(|(_, t)| t)
            .collect()
    }

    pub(crate) fn pair(&self, layer: usize, target: Target) -> Option<&LowRank> {
        self.layers.get(layer)?[target as usize].as_ref()
    }

    /// Refuses a model of another shape than the one it was loaded for.
    pub(crate) fn check_fits(&self, config: &LlamaConfig) -> Result<()> {
        if self.shape != AdapterShape::of(config) {
            return Err(Error::Adapter(format!(
                "`{}` was loaded for a model of another shape",
                self.name
            )));
        }
        Ok(())
    }
}

/// What adapters are loaded onto once the model has moved into its engine: the base model's
/// shape and device.
#[derive(Debug, Clone)]
pub struct AdapterBase {
    config: LlamaConfig,
    device: Device,
}

impl AdapterBase {
    /// [`LoraAdapter::load`] for this base model.
    pub fn load(&self, name: &str, path: &std::path::Path) -> Result<LoraAdapter> {
        LoraAdapter::load(name, path, &self.config, &self.device)
    }
}

impl super::LlamaModel {
    /// What loads adapters for this model.
    pub fn adapter_base(&self) -> AdapterBase {
        AdapterBase {
            config: self.config.clone(),
            device: self.device.clone(),
        }
    }
}

/// One adapter of a step and the rows of the sequences using it.
pub(crate) struct Group<'a> {
    pub adapter: &'a LoraAdapter,
    pub rows: Vec<Range<usize>>,
    /// The rows as an index tensor on the model's device (the candle path's gathers).
    index: Option<Tensor>,
}

/// The adapters of one step's sequences, grouped: empty when no sequence uses one.
pub(crate) struct StepLora<'a> {
    pub groups: Vec<Group<'a>>,
    /// Per row of the step, its group (`None`: the base model alone).
    pub group_of: Vec<Option<usize>>,
}

impl<'a> StepLora<'a> {
    /// The groups of `batch`, whose sequences' rows are `spans` (`(first row, rows)`);
    /// `device` is the model's when the candle path runs (index tensors built once for the
    /// step), `None` on the host path. Every adapter must fit `config`.
    pub(crate) fn new(
        batch: &[SeqStep<'a>],
        spans: &[(usize, usize)],
        config: &LlamaConfig,
        device: Option<&Device>,
    ) -> Result<Self> {
        let total = spans.last().map_or(0, |&(s, l)| s + l);
        let mut groups: Vec<Group<'a>> = Vec::new();
        let mut group_of = vec![None; total];
        for (step, &(start, len)) in batch.iter().zip(spans) {
            let Some(adapter) = step.adapter else {
                continue;
            };
            let g = match groups.iter().position(|g| g.adapter.id == adapter.id) {
                Some(g) => g,
                None => {
                    adapter.check_fits(config)?;
                    groups.push(Group {
                        adapter,
                        rows: Vec::new(),
                        index: None,
                    });
                    groups.len() - 1
                }
            };
            groups[g].rows.push(start..start + len);
            group_of[start..start + len].fill(Some(g));
        }
        if let Some(device) = device {
            for g in &mut groups {
                let rows: Vec<u32> = g
                    .rows
                    .iter()
                    .flat_map(|r| r.clone())
                    .map(|r| r as u32)
                    .collect();
                let n = rows.len();
                g.index = Some(Tensor::from_vec(rows, n, device)?);
            }
        }
        Ok(Self { groups, group_of })
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// `y + scale · B·(A·x)` on the rows of each group whose adapter targets `target` in
    /// `layer` (candle ops, f32): `x (rows, in)`, `y (rows, out)`.
    pub(crate) fn apply(
        &self,
        layer: usize,
        target: Target,
        x: &Tensor,
        y: Tensor,
    ) -> Result<Tensor> {
        let mut y = y;
        for g in &self.groups {
            let (Some(pair), Some(index)) = (g.adapter.pair(layer, target), &g.index) else {
                continue;
            };
            let xs = x.index_select(index, 0)?;
            let (a, bt) = (pair.a.to_dtype(DType::F32)?, pair.bt.to_dtype(DType::F32)?);
            let delta = (xs.matmul(&a.t()?)? * f64::from(pair.scale))?.matmul(&bt)?;
            y = y.index_add(index, &delta.to_dtype(y.dtype())?, 0)?;
        }
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pair is held narrower only when that keeps every value: bf16 first, then f16; any
    /// value only f32 holds keeps the pair in f32 (never rounded), and the scale stays apart.
    #[test]
    fn pairs_are_held_narrow_only_when_exact() {
        let cpu = &Device::Cpu;
        let t = |v: &[f32]| Tensor::from_slice(v, (1, v.len()), cpu).unwrap();
        let both = t(&[1.0, -0.5, 0.0]);
        let wide = t(&[2f32.powi(-100), 2f32.powi(100)]);
        let fine = t(&[1.0 + 2f32.powi(-10), 2f32.powi(-20)]);
        let f32 = t(&[1.0, 1.0 + 2f32.powi(-12)]);
        assert_eq!(held_as(&[&both]).unwrap(), DType::BF16);
        assert_eq!(held_as(&[&both, &wide]).unwrap(), DType::BF16);
        assert_eq!(held_as(&[&both, &fine]).unwrap(), DType::F16);
        assert_eq!(held_as(&[&wide, &fine]).unwrap(), DType::F32);
        assert_eq!(held_as(&[&both, &f32]).unwrap(), DType::F32);
        assert_eq!(held_as(&[&t(&[f32::NAN])]).unwrap(), DType::F32);
        // `a (1, 2)`, `b (3, 1)`: held as bf16 with the scale beside, Bᵀ `(1, 3)`.
        let pair = LowRank::new(
            &t(&[0.25, -2.0]),
            &Tensor::from_slice(&[1.0f32, 0.5, 4.0], (3, 1), cpu).unwrap(),
            0.3,
            cpu,
        )
        .unwrap();
        assert_eq!(
            (pair.a.dtype(), pair.bt.dims2().unwrap()),
            (DType::BF16, (1, 3))
        );
        assert_eq!((pair.scale, pair.bytes()), (0.3, 10));
        let kept = LowRank::new(&f32, &t(&[1.0]).t().unwrap(), 1.0, cpu).unwrap();
        assert_eq!(kept.a.dtype(), DType::F32);
        assert_eq!(
            kept.a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [1.0, 1.0 + 2f32.powi(-12)]
        );
    }
}

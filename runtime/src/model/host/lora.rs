//! The host path's LoRA updates ([`crate::model::lora`]): for each row of a step whose
//! sequence uses an adapter targeting the projection, `B·(scale·A·x)` computed on its own
//! (the same arithmetic whatever else shares the step) from the pair as it is held (f32, bf16
//! or f16; [`simd::lora_delta_f32`] and its twins), then added to the row's output.

use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use super::{simd, HostView};
use crate::model::lora::{LowRank, StepLora, Target};
use crate::{Error, Result};

/// Multiply-adds of a projection's LoRA rows above which they run on the thread pool.
const PARALLEL_LORA_WORK: usize = 1 << 17;

thread_local! {
    /// A row's `scale·A·x`: per thread.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A pair's `A` and `Bᵀ` on the host, in the type they are held in.
#[derive(Clone, Copy)]
enum HostPair<'a> {
    F32(&'a [f32], &'a [f32]),
    Bf16(&'a [half::bf16], &'a [half::bf16]),
    F16(&'a [u16], &'a [u16]),
}

impl<'a> HostPair<'a> {
    fn new(views: &'a (HostView<'a>, HostView<'a>), dtype: candle_core::DType) -> Result<Self> {
        use candle_core::DType;
        let (a, bt) = views;
        Ok(match dtype {
            DType::F32 => Self::F32(a.slice()?, bt.slice()?),
            DType::BF16 => Self::Bf16(a.typed()?, bt.typed()?),
            DType::F16 => Self::F16(
                a.typed::<half::f16>()?.reinterpret_cast(),
                bt.typed::<half::f16>()?.reinterpret_cast(),
            ),
            other => {
                return Err(Error::Weights(format!(
                    "host path: a LoRA pair held as {other:?}"
                )))
            }
        })
    }

    /// Elements of `A` and of `Bᵀ`.
    fn lens(&self) -> (usize, usize) {
        match self {
            Self::F32(a, bt) => (a.len(), bt.len()),
            Self::Bf16(a, bt) => (a.len(), bt.len()),
            Self::F16(a, bt) => (a.len(), bt.len()),
        }
    }

    /// Its rank, for inputs of `inp`.
    fn rank(&self, inp: usize) -> usize {
        self.lens().0 / inp.max(1)
    }

    /// `delta = B·(scale·A·x)`; `t` holds `A·x` (the rank).
    fn delta(&self, x: &[f32], scale: f32, t: &mut [f32], delta: &mut [f32]) {
        match *self {
            Self::F32(a, bt) => simd::lora_delta_f32(x, a, bt, scale, t, delta),
            Self::Bf16(a, bt) => simd::lora_delta_bf16(x, a, bt, scale, t, delta),
            Self::F16(a, bt) => simd::lora_delta_f16(x, a, bt, scale, t, delta),
        }
    }
}

/// The updates of one projection's rows, to add to its output ([`Deltas::add_to`]).
pub(crate) struct Deltas {
    out: usize,
    /// `(rows, out)`; a row without an update stays zero and is not added.
    values: Vec<f32>,
    updated: Vec<bool>,
}

impl Deltas {
    /// `y (rows, out) += ` the updated rows: after the projection, as `y + B·(scale·A·x)`.
    pub(crate) fn add_to(&self, y: &mut [f32]) {
        for ((yr, dr), _) in y
            .chunks_exact_mut(self.out)
            .zip(self.values.chunks_exact(self.out))
            .zip(&self.updated)
            .filter(|(_, &u)| u)
        {
            for (v, &d) in yr.iter_mut().zip(dr) {
                *v += d;
            }
        }
    }
}

/// One row's update of one projection: the pair, its scale, the row's input and where its
/// update goes.
type Task<'p, 'x> = (HostPair<'p>, f32, &'x [f32], &'x mut [f32]);

impl StepLora<'_> {
    /// The updates `B·(scale·A·x)` of `targets` in `layer` for
    /// the rows of each group whose adapter targets it; `x (rows, in)` is the projections'
    /// input. Meant to run beside the projections themselves (`rayon::join`): the products
    /// are memory-bound and the projections compute-bound, so the two overlap.
    pub(crate) fn deltas_host(
        &self,
        layer: usize,
        targets: &[Target],
        x: &[f32],
    ) -> Result<Vec<Deltas>> {
        let rows = self.group_of.len();
        let mut deltas: Vec<Deltas> = targets
            .iter()
            .map(|_| Deltas {
                out: 1,
                values: Vec::new(),
                updated: vec![false; rows],
            })
            .collect();
        if self.is_empty() || rows == 0 {
            return Ok(deltas);
        }
        let inp = x.len() / rows;
        let found: Vec<Option<&LowRank>> = targets
            .iter()
            .flat_map(|&target| self.groups.iter().map(move |g| (g, target)))
            .map(|(g, target)| g.adapter.pair(layer, target))
            .collect();
        let views = found
            .iter()
            .map(|p| {
                p.map(|p| Ok::<_, Error>((HostView::new(&p.a)?, HostView::new(&p.bt)?)))
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        let mut pairs: Vec<Option<(HostPair<'_>, f32)>> = Vec::new();
        for (v, p) in views.iter().zip(&found) {
            pairs.push(match (v, p) {
                (Some(v), Some(p)) => Some((HostPair::new(v, p.a.dtype())?, p.scale)),
                _ => None,
            });
        }
        let groups = self.groups.len();
        let mut tasks: Vec<Task<'_, '_>> = Vec::new();
        for (k, d) in deltas.iter_mut().enumerate() {
            let of_target = &pairs[k * groups..(k + 1) * groups];
            let Some((any, _)) = of_target.iter().flatten().next() else {
                continue;
            };
            d.out = any.lens().1 / any.rank(inp).max(1);
            d.values = vec![0f32; rows * d.out];
            let rows_of = d.values.chunks_exact_mut(d.out).zip(x.chunks_exact(inp));
            for (((dr, xr), g), updated) in rows_of.zip(&self.group_of).zip(&mut d.updated) {
                if let Some((pair, scale)) = g.and_then(|g| of_target[g]) {
                    *updated = true;
                    tasks.push((pair, scale, xr, dr));
                }
            }
        }
        let work: usize = tasks
            .iter()
            .map(|(p, _, xr, dr)| p.rank(inp) * (xr.len() + dr.len()))
            .sum();
        let run = |(pair, scale, xr, dr): Task<'_, '_>| {
            let rank = pair.rank(inp);
            SCRATCH.with(|s| {
                let mut t = s.borrow_mut();
                t.resize(rank, 0.0);
                pair.delta(xr, scale, &mut t, dr);
            });
        };
        if work < PARALLEL_LORA_WORK {
            tasks.into_iter().for_each(run);
        } else {
            tasks.into_par_iter().for_each(run);
        }
        Ok(deltas)
    }
}

//! The host path's LoRA updates ([`crate::model::lora`]): for each row of a step whose
//! sequence uses an adapter targeting the projection, `y += scale · B·(A·x)` on the row's own
//! buffers, one row at a time (the same arithmetic whatever else shares the step).

use rayon::prelude::*;

use super::{simd, HostView};
use crate::model::lora::{StepLora, Target};
use crate::Result;

/// Multiply-adds of a projection's LoRA rows above which they run on the thread pool.
const PARALLEL_LORA_WORK: usize = 1 << 17;

thread_local! {
    /// A row's `A·x` and its update before it is added: per thread.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl StepLora<'_> {
    /// `y (rows, out) += scale · B·(A·x)` for the rows of each group whose adapter targets
    /// `target` in `layer`; `x (rows, in)` is the projection's input.
    pub(crate) fn apply_host(
        &self,
        layer: usize,
        target: Target,
        x: &[f32],
        y: &mut [f32],
    ) -> Result<()> {
        let rows = self.group_of.len();
        if self.is_empty() || rows == 0 {
            return Ok(());
        }
        let (inp, out) = (x.len() / rows, y.len() / rows);
        let mut views: Vec<Option<(HostView<'_>, HostView<'_>)>> = Vec::new();
        for g in &self.groups {
            views.push(match g.adapter.pair(layer, target) {
                Some(p) => Some((HostView::new(&p.a)?, HostView::new(&p.bt)?)),
                None => None,
            });
        }
        let mut pairs: Vec<Option<(&[f32], &[f32])>> = Vec::new();
        for v in &views {
            pairs.push(match v {
                Some((a, bt)) => Some((a.slice()?, bt.slice()?)),
                None => None,
            });
        }
        let mut work = 0;
        for (g, group) in self.groups.iter().enumerate() {
            if let Some((a, _)) = pairs[g] {
                let n: usize = group.rows.iter().map(|r| r.len()).sum();
                work += n * (a.len() / inp.max(1)) * (inp + out);
            }
        }
        if work == 0 {
            return Ok(());
        }
        let task = |((yr, xr), g): ((&mut [f32], &[f32]), &Option<usize>)| {
            let Some((a, bt)) = g.and_then(|g| pairs[g]) else {
                return;
            };
            let rank = a.len() / inp;
            SCRATCH.with(|s| {
                let mut s = s.borrow_mut();
                s.resize(rank + out, 0.0);
                let (t, delta) = s.split_at_mut(rank);
                simd::lora_row(xr, a, bt, t, delta, yr);
            });
        };
        if work < PARALLEL_LORA_WORK {
            y.chunks_exact_mut(out)
                .zip(x.chunks_exact(inp))
                .zip(&self.group_of)
                .for_each(task);
        } else {
            y.par_chunks_exact_mut(out)
                .zip(x.par_chunks_exact(inp))
                .zip(&self.group_of)
                .for_each(task);
        }
        Ok(())
    }
}

//! Attention on the host path: the step's tasks (per sequence, KV head and split of the
//! cache, the rows of a sequence together), each task's partial softmax over its keys, and the
//! merge of a token's splits.
//!
//! Rows of one sequence in a step (a draft being verified, a prefill chunk) share a task, so
//! each chunk of keys and values is read once for all of them; every score and output is the
//! same sum in the same order as when each row runs alone, so grouping never changes a bit.
//! The arithmetic itself is in [`super::simd`].

use rayon::prelude::*;

use super::super::kv_cache::HostLayer;
use super::simd;

/// Attention work (query-key products) below which one thread does a layer's attention.
const PARALLEL_ATTENTION_WORK: usize = 1 << 15;

/// Head counts of grouped-query attention.
#[derive(Clone, Copy, Debug)]
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
pub(crate) const SPLIT_KEYS: usize = 512;

/// Keys scored at a time inside a split (the chunk's scores stay in L1 and its keys are
/// still there when their values are summed).
pub(crate) const CHUNK_KEYS: usize = 64;

/// Rows of one sequence that one attention task takes at most: a draft being verified or a
/// prefill chunk reads each chunk of keys and values once for all of them (their scores stay
/// in L1: `TASK_ROWS * group * CHUNK_KEYS` values).
const TASK_ROWS: usize = 16;

/// One attention task: the query heads of `kv_head` at `rows` consecutive tokens of one
/// sequence from `token`, over one split of their keys: from `from` to the split's end or
/// the row's last visible key, whichever comes first. A row's split is the one a task of its
/// own would have (rows share a task only when their splits start at the same keys), so its
/// arithmetic does not depend on the rows beside it.
pub(crate) struct Task {
    pub token: usize,
    pub rows: usize,
    pub kv_head: usize,
    pub from: usize,
}

/// Where one token and KV head's partial result over one split lies in the step's partials:
/// its query heads' running maxima from `m`, sums of exponentials from `l`, unnormalized
/// outputs from `o` (`head_dim` apart).
pub(crate) struct Part {
    pub token: usize,
    pub kv_head: usize,
    pub m: usize,
    pub l: usize,
    pub o: usize,
}

/// The attention tasks of one step, the same in every layer.
pub(crate) struct AttnPlan {
    /// In the order their results lie in the partials, one after the other: per task `rows *
    /// group` maxima, as many sums, then their outputs.
    pub tasks: Vec<Task>,
    /// Every token and KV head's parts, in token, KV head, key order.
    pub parts: Vec<Part>,
    /// Keys visible to each token of the step.
    pub visible: Vec<usize>,
    /// `f32`s of the partials.
    pub len: usize,
    /// Query-key products per layer (decides whether to use the thread pool).
    pub work: usize,
}

impl AttnShape {
    pub(crate) fn group(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    /// Rows per task for tokens that see `visible[t]` keys: [`TASK_ROWS`] when one thread
    /// does a layer's attention, else few enough that the tasks still spread over `threads`
    /// threads (the results are the same either way).
    pub(crate) fn task_rows(
        &self,
        visible: &[usize],
        window: Option<usize>,
        threads: usize,
    ) -> usize {
        let (mut work, mut splits) = (0, 0);
        for &n in visible {
            let keys = n - super::super::llama::first_visible(n, window);
            work += keys * self.n_heads * self.head_dim;
            splits += keys.div_ceil(SPLIT_KEYS) * self.n_kv_heads;
        }
        if work < PARALLEL_ATTENTION_WORK {
            TASK_ROWS
        } else {
            (splits / threads.max(1)).clamp(1, TASK_ROWS)
        }
    }

    /// The tasks for the sequences of `spans` (`(first token, tokens)`) whose tokens see
    /// `visible[t]` keys each (the last `window` of them, when attention slides): per token
    /// and KV head one split per [`SPLIT_KEYS`] keys, the splits of up to `task_rows`
    /// consecutive tokens of a sequence that start at the same key in one task.
    pub(crate) fn plan(
        &self,
        spans: &[(usize, usize)],
        visible: &[usize],
        window: Option<usize>,
        task_rows: usize,
    ) -> AttnPlan {
        let first = |t: usize| super::super::llama::first_visible(visible[t], window);
        let mut plan = AttnPlan {
            tasks: Vec::new(),
            parts: Vec::new(),
            visible: visible.to_vec(),
            len: 0,
            work: 0,
        };
        for &(start, len) in spans {
            let mut t = start;
            while t < start + len {
                // Rows that see one key more than the row before and start at the same key.
                let rows = (1..task_rows.clamp(1, TASK_ROWS))
                    .take_while(|&r| {
                        let u = t + r;
                        u < start + len && visible[u] == visible[u - 1] + 1 && first(u) == first(t)
                    })
                    .count()
                    + 1;
                for kv_head in 0..self.n_kv_heads {
                    self.add_splits(&mut plan, t, rows, kv_head, first(t));
                }
                t += rows;
            }
        }
        plan.work = (0..visible.len())
            .map(|t| visible[t] - first(t))
            .sum::<usize>()
            * self.n_heads
            * self.head_dim;
        // Stable: each token and head's parts stay in key order.
        plan.parts.sort_by_key(|p| (p.token, p.kv_head));
        plan
    }

    /// The tasks of tokens `token..token + rows` and `kv_head`, one per split from `first`
    /// (each with the rows that see keys past its start).
    fn add_splits(
        &self,
        plan: &mut AttnPlan,
        token: usize,
        rows: usize,
        kv_head: usize,
        first: usize,
    ) {
        let (group, hd) = (self.group(), self.head_dim);
        let mut from = first;
        while from < plan.visible[token + rows - 1] {
            let skip = (0..rows)
                .take_while(|&r| plan.visible[token + r] <= from)
                .count();
            let (token, rows) = (token + skip, rows - skip);
            let heads = rows * group;
            let at = plan.len;
            plan.parts.extend((0..rows).map(|r| Part {
                token: token + r,
                kv_head,
                m: at + r * group,
                l: at + heads + r * group,
                o: at + 2 * heads + r * group * hd,
            }));
            plan.tasks.push(Task {
                token,
                rows,
                kv_head,
                from,
            });
            plan.len += heads * (hd + 2);
            from += SPLIT_KEYS;
        }
    }

    /// Runs the tasks of `plan` (on the thread pool when there is enough work) for the queries
    /// `q (tokens, n_heads * head_dim)` over the layer caches `kv(token)`, into `partials`.
    pub(crate) fn attend_all<'a>(
        &self,
        plan: &AttnPlan,
        q: &[f32],
        kv: impl Fn(usize) -> HostLayer<'a> + Sync,
        partials: &mut [f32],
    ) {
        let (q_dim, group_dim) = (self.n_heads * self.head_dim, self.group() * self.head_dim);
        let mut outs = Vec::with_capacity(plan.tasks.len());
        let mut rest = partials;
        for task in &plan.tasks {
            let (out, tail) = std::mem::take(&mut rest)
                .split_at_mut(task.rows * self.group() * (self.head_dim + 2));
            outs.push(out);
            rest = tail;
        }
        let run = |(task, part): (&Task, &mut [f32])| {
            let q = &q[task.token * q_dim + task.kv_head * group_dim..];
            self.attend(q, q_dim, kv(task.token), task, &plan.visible, part);
        };
        if plan.work < PARALLEL_ATTENTION_WORK {
            plan.tasks.iter().zip(outs).for_each(run);
        } else {
            plan.tasks.par_iter().zip(outs).for_each(run);
        }
    }

    /// Partial softmax attention of `task` (the query heads that share its KV head, row `r`'s
    /// at `q[r * q_stride..]`) over its keys of a layer's cache (keys in blocks of
    /// [`KEY_BLOCK`](super::KEY_BLOCK), values token-major), into `part` (laid out as
    /// [`AttnPlan::tasks`] says). Each key block is read once for all the task's
    /// heads, one lane per key; the outputs sum each chunk of value rows in registers.
    /// Half-precision rows are widened exactly, so they give what `f32` rows holding the same
    /// values give.
    pub(crate) fn attend(
        &self,
        q: &[f32],
        q_stride: usize,
        kv: HostLayer<'_>,
        task: &Task,
        visible: &[usize],
        part: &mut [f32],
    ) {
        let mut ends = [0; TASK_ROWS];
        let ends = &mut ends[..task.rows];
        for (end, &n) in ends.iter_mut().zip(&visible[task.token..]) {
            *end = n.min(task.from + SPLIT_KEYS);
        }
        let (from, ends) = (task.from, &*ends);
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            scratch.resize(CHUNK_KEYS * task.rows * self.group(), 0.0);
            let s = &mut scratch[..];
            match kv {
                HostLayer::F32(heads) => {
                    let h = &heads[task.kv_head];
                    simd::attend_rows(*self, q, q_stride, &h.keys, &h.values, from, ends, s, part)
                }
                HostLayer::F16(heads) => {
                    let h = &heads[task.kv_head];
                    simd::attend_rows_f16(
                        *self, q, q_stride, &h.keys, &h.values, from, ends, s, part,
                    )
                }
            }
        });
    }

    /// Merges each token and KV head's parts into `out (tokens, n_heads * head_dim)`, in
    /// key order.
    pub(crate) fn merge(&self, plan: &AttnPlan, partials: &[f32], out: &mut [f32]) {
        let (group, hd) = (self.group(), self.head_dim);
        let mut i = 0;
        for (c, out) in out.chunks_exact_mut(group * hd).enumerate() {
            let (token, kv_head) = (c / self.n_kv_heads, c % self.n_kv_heads);
            let first = i;
            while i < plan.parts.len()
                && plan.parts[i].token == token
                && plan.parts[i].kv_head == kv_head
            {
                i += 1;
            }
            let parts = &plan.parts[first..i];
            for g in 0..group {
                let max = parts
                    .iter()
                    .fold(f32::NEG_INFINITY, |m, p| m.max(partials[p.m + g]));
                let o = &mut out[g * hd..(g + 1) * hd];
                o.fill(0.0);
                let mut sum = 0.0;
                for p in parts {
                    let w = simd::exp(partials[p.m + g] - max);
                    sum += w * partials[p.l + g];
                    let po = &partials[p.o + g * hd..][..hd];
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

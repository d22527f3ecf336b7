//! The attention kernel of the host path: one task's query heads (one KV head's group at one
//! or more rows of a sequence) over a range of that KV head's cached keys and values, as an
//! online softmax in chunks. Plain loops LLVM vectorizes, like the rest of [`super`],
//! compiled per kernel path by its `dispatch!`.

use super::{exp, exp_sub_sum_imp, CpuKernels, KvElem};

dispatch! {
    /// See [`super::super::AttnShape::attend`]: the query heads of one KV head at
    /// `ends.len()` rows of a sequence (row `r`'s heads at `q[r * q_stride..]`, `head_dim`
    /// apart) over that KV head's keys (in blocks) and values (token-major) in `f32`, row `r`
    /// over keys `from..ends[r]`; `scores` holds a chunk's scores (`rows * group *
    /// CHUNK_KEYS`). AVX-512 runs the wider tiles.
    #[allow(
    clippy::too_many_arguments,
    reason = "a kernel's operands, passed as scalars and slices so it inlines into each target feature"
)]
    fn attend_rows / attend_rows_on(
        shape: super::super::AttnShape,
        q: &[f32],
        q_stride: usize,
        keys: &[f32],
        values: &[f32],
        from: usize,
        ends: &[usize],
        scores: &mut [f32],
        part: &mut [f32]
    ) -> () = attend_rows_imp / attend_rows_imp / attend_rows_tiled::<_, true>;
}
dispatch! {
    /// [`attend_rows`] over half-precision keys and values (IEEE bits), widened exactly as
    /// they are read (with F16C's conversion on both SIMD paths, else
    /// [`f16_to_f32`](super::f16_to_f32)): the result is what `f32` rows holding the same
    /// values give, on every path.
    #[allow(
    clippy::too_many_arguments,
    reason = "a kernel's operands, passed as scalars and slices so it inlines into each target feature"
)]
    fn attend_rows_f16 / attend_rows_f16_on(
        shape: super::super::AttnShape,
        q: &[f32],
        q_stride: usize,
        keys: &[u16],
        values: &[u16],
        from: usize,
        ends: &[usize],
        scores: &mut [f32],
        part: &mut [f32]
    ) -> () = attend_rows_imp / attend_rows_f16c / attend_rows_f16c_tiled::<true>;
}

/// One token's attention over keys `range` as a task of its own: [`attend_rows_on`] with one
/// row (the tests' reference for the kernels).
#[cfg(test)]
#[allow(clippy::too_many_arguments, reason = "the kernel's operands")]
pub(crate) fn attend_partial_on(
    kernels: CpuKernels,
    shape: super::super::AttnShape,
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    range: std::ops::Range<usize>,
    scores: &mut [f32],
    part: &mut [f32],
) {
    let (from, ends) = (range.start, &[range.end]);
    attend_rows_on(kernels, shape, q, 0, keys, values, from, ends, scores, part)
}

/// [`attend_partial_on`] over half-precision keys and values.
#[cfg(test)]
#[allow(clippy::too_many_arguments, reason = "the kernel's operands")]
pub(crate) fn attend_partial_f16_on(
    kernels: CpuKernels,
    shape: super::super::AttnShape,
    q: &[f32],
    keys: &[u16],
    values: &[u16],
    range: std::ops::Range<usize>,
    scores: &mut [f32],
    part: &mut [f32],
) {
    let (from, ends) = (range.start, &[range.end]);
    attend_rows_f16_on(kernels, shape, q, 0, keys, values, from, ends, scores, part)
}

/// [`attend_rows_imp`] over half-precision rows widened with F16C: only called from code
/// compiled with it (the SIMD paths of [`attend_rows_f16_on`]).
#[cfg(target_arch = "x86_64")]
#[allow(
    clippy::too_many_arguments,
    reason = "a kernel's operands, passed as scalars and slices so it inlines into each target feature"
)]
#[inline(always)]
fn attend_rows_f16c(
    shape: super::super::AttnShape,
    q: &[f32],
    q_stride: usize,
    keys: &[u16],
    values: &[u16],
    from: usize,
    ends: &[usize],
    scores: &mut [f32],
    part: &mut [f32],
) {
    attend_rows_f16c_tiled::<false>(shape, q, q_stride, keys, values, from, ends, scores, part)
}

/// [`attend_rows_imp`]'s tiles (`WIDE` on AVX-512) over half-precision rows widened with
/// F16C.
#[cfg(target_arch = "x86_64")]
#[allow(
    clippy::too_many_arguments,
    reason = "a kernel's operands, passed as scalars and slices so it inlines into each target feature"
)]
#[inline(always)]
fn attend_rows_f16c_tiled<const WIDE: bool>(
    shape: super::super::AttnShape,
    q: &[f32],
    q_stride: usize,
    keys: &[u16],
    values: &[u16],
    from: usize,
    ends: &[usize],
    scores: &mut [f32],
    part: &mut [f32],
) {
    let (keys, values) = (super::x86::F16c::cast(keys), super::x86::F16c::cast(values));
    attend_rows_tiled::<_, WIDE>(shape, q, q_stride, keys, values, from, ends, scores, part)
}

/// An empty partial result: per query head max `-inf`, sum 0, output 0.
#[inline(always)]
fn start_partial(group: usize, part: &mut [f32]) {
    let (m, rest) = part.split_at_mut(group);
    m.fill(f32::NEG_INFINITY);
    rest.fill(0.0);
}

/// Online softmax in chunks of [`super::super::CHUNK_KEYS`] keys from `from`, per query head a
/// running max `m`, a sum of exponentials `l` and an unnormalized output `o`, rescaled when the
/// max grows; `part` holds `[m; heads]`, `[l; heads]`, `[o; heads * head_dim]` for the `heads =
/// rows * group` query heads, row by row. Each chunk of keys is scored for every row that sees
/// any of it (a row's scores past its end are computed and ignored: every score is the same
/// sum whichever heads share the pass), then each row takes its own keys of the chunk: its
/// softmax and values see exactly the chunks a task of its own would, in the same order.
/// Keys and values are read (and widened) where they lie in the cache.
#[allow(
    clippy::too_many_arguments,
    reason = "a kernel's operands, passed as scalars and slices so it inlines into each target feature"
)]
#[inline(always)]
fn attend_rows_imp<E: KvElem>(
    shape: super::super::AttnShape,
    q: &[f32],
    q_stride: usize,
    keys: &[E],
    values: &[E],
    from: usize,
    ends: &[usize],
    scores: &mut [f32],
    part: &mut [f32],
) {
    attend_rows_tiled::<E, false>(shape, q, q_stride, keys, values, from, ends, scores, part)
}

/// The attention of [`attend_rows_imp`], its values summed 16 elements of four heads at a time
/// or (`WIDE`) 32: the tiles only decide which sums are in registers together, never the
/// order of any sum.
#[allow(
    clippy::too_many_arguments,
    reason = "a kernel's operands, passed as scalars and slices so it inlines into each target feature"
)]
#[inline(always)]
fn attend_rows_tiled<E: KvElem, const WIDE: bool>(
    shape: super::super::AttnShape,
    q: &[f32],
    q_stride: usize,
    keys: &[E],
    values: &[E],
    from: usize,
    ends: &[usize],
    scores: &mut [f32],
    part: &mut [f32],
) {
    const C: usize = super::super::CHUNK_KEYS;
    let hd = shape.head_dim;
    let group = shape.n_heads / shape.n_kv_heads;
    let heads = ends.len() * group;
    let scale = 1.0 / (hd as f32).sqrt();
    start_partial(heads, part);
    let (m, rest) = part.split_at_mut(heads);
    let (l, o) = rest.split_at_mut(heads);
    let q = Queries {
        q,
        stride: q_stride,
        group,
        hd,
    };
    let end = ends.iter().copied().max().unwrap_or(from);
    let mut at = from;
    while at < end {
        // Keys of this chunk that row `r` sees; the rows that see any.
        let seen = |r: usize| ends[r].saturating_sub(at).min(C);
        let first = (0..ends.len()).find(|&r| seen(r) > 0).unwrap_or(0);
        let last = (0..ends.len()).rfind(|&r| seen(r) > 0).unwrap_or(0);
        let n = (first..=last).map(seen).max().unwrap_or(0);
        score_heads(
            q,
            keys,
            at,
            n,
            scale,
            scores,
            first * group..(last + 1) * group,
        );
        for r in first..=last {
            let n = seen(r);
            if n == 0 {
                continue;
            }
            for h in r * group..(r + 1) * group {
                let s = &mut scores[h * C..][..n];
                let chunk_max = s.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
                let new_max = m[h].max(chunk_max);
                let rescale = exp(m[h] - new_max);
                l[h] = l[h] * rescale + exp_sub_sum_imp(s, new_max);
                o[h * hd..(h + 1) * hd]
                    .iter_mut()
                    .for_each(|v| *v *= rescale);
                m[h] = new_max;
            }
        }
        // Values, for runs of rows that see the same keys of the chunk.
        let mut r = first;
        while r <= last {
            let n = seen(r);
            let to = (r + 1..=last).find(|&t| seen(t) != n).unwrap_or(last + 1);
            if n > 0 {
                let heads = r * group..to * group;
                sum_heads::<E, WIDE>(o, hd, scores, &values[at * hd..][..n * hd], n, heads);
            }
            r = to;
        }
        at += C;
    }
}

/// The query heads of a task: head `h` is head `h % group` of row `h / group`, rows
/// `stride` apart.
#[derive(Clone, Copy)]
struct Queries<'a> {
    q: &'a [f32],
    stride: usize,
    group: usize,
    hd: usize,
}

impl<'a> Queries<'a> {
    /// Heads `h..h + G`.
    #[inline(always)]
    fn heads<const G: usize>(self, h: usize) -> [&'a [f32]; G] {
        std::array::from_fn(|i| {
            let h = h + i;
            &self.q[h / self.group * self.stride + h % self.group * self.hd..][..self.hd]
        })
    }
}

/// [`score_keys`] of query heads `heads` against keys `from..from + n` into their rows of
/// `scores` ([`super::super::CHUNK_KEYS`] apart), a few heads at a time.
#[inline(always)]
fn score_heads<E: KvElem>(
    q: Queries<'_>,
    keys: &[E],
    from: usize,
    n: usize,
    scale: f32,
    scores: &mut [f32],
    heads: std::ops::Range<usize>,
) {
    let mut h = heads.start;
    while h < heads.end {
        let c = (heads.end - h).min(HEADS_AT_ONCE);
        let s = &mut scores[h * super::super::CHUNK_KEYS..];
        match c {
            1 => score_keys::<E, 1>(q.heads(h), q.hd, keys, from, n, scale, s),
            2 => score_keys::<E, 2>(q.heads(h), q.hd, keys, from, n, scale, s),
            3 => score_keys::<E, 3>(q.heads(h), q.hd, keys, from, n, scale, s),
            _ => score_keys::<E, HEADS_AT_ONCE>(q.heads(h), q.hd, keys, from, n, scale, s),
        }
        h += c;
    }
}

/// [`sum_values`] of query heads `heads` (outputs `hd` apart in `o`, weights
/// [`super::super::CHUNK_KEYS`] apart in `scores`) over the `n` value rows `rows`, a few heads at a
/// time.
#[inline(always)]
fn sum_heads<E: KvElem, const WIDE: bool>(
    o: &mut [f32],
    hd: usize,
    scores: &[f32],
    rows: &[E],
    n: usize,
    heads: std::ops::Range<usize>,
) {
    let mut h = heads.start;
    while h < heads.end {
        let c = (heads.end - h).min(HEADS_AT_ONCE);
        let (o, w) = (&mut o[h * hd..], &scores[h * super::super::CHUNK_KEYS..]);
        match c {
            1 => sum_values::<E, 1, 32>(o, hd, w, rows, n),
            2 => sum_values::<E, 2, 32>(o, hd, w, rows, n),
            3 => sum_values::<E, 3, 32>(o, hd, w, rows, n),
            _ if WIDE => sum_values::<E, HEADS_AT_ONCE, 32>(o, hd, w, rows, n),
            _ => sum_values::<E, HEADS_AT_ONCE, 16>(o, hd, w, rows, n),
        }
        h += c;
    }
}

/// Query heads scored or summed together: their accumulators stay in registers.
const HEADS_AT_ONCE: usize = 4;

/// Scores of `G` query heads (`q`, `hd` each) against keys `from..from + n` of one KV head's
/// blocks: row `g` of `scores` (`CHUNK_KEYS` apart) gets `(Σ_d q_g[d]·k[d]) · scale` per key,
/// summed in `d` order. A block's keys are one vector lane each, so no sum crosses lanes and
/// the vector width never changes the arithmetic.
#[inline(always)]
fn score_keys<E: KvElem, const G: usize>(
    q: [&[f32]; G],
    hd: usize,
    keys: &[E],
    from: usize,
    n: usize,
    scale: f32,
    scores: &mut [f32],
) {
    const B: usize = super::super::KEY_BLOCK;
    let q: [&[f32]; G] = std::array::from_fn(|g| &q[g][..hd]);
    let mut j = 0;
    while j < n {
        let (block, slot) = ((from + j) / B, (from + j) % B);
        let take = (B - slot).min(n - j);
        let block = &keys[block * B * hd..][..hd * B];
        let mut acc = [[0f32; B]; G];
        for (d, k) in block.chunks_exact(B).enumerate() {
            let k: [f32; B] = E::widen_n(k);
            for g in 0..G {
                let qd = q[g][d];
                for s in 0..B {
                    acc[g][s] += qd * k[s];
                }
            }
        }
        for g in 0..G {
            let row = &mut scores[g * super::super::CHUNK_KEYS + j..][..take];
            for (out, &a) in row.iter_mut().zip(&acc[g][slot..]) {
                *out = a * scale;
            }
        }
        j += take;
    }
}

/// `o_g[i] += w_g[j] · v_j[i]` for `G` heads (`o`, `G * hd`; weights `CHUNK_KEYS` apart)
/// over `n` value rows of `hd`, in row order per element; `W` elements of every head stay
/// in registers across the rows.
#[inline(always)]
fn sum_values<E: KvElem, const G: usize, const W: usize>(
    o: &mut [f32],
    hd: usize,
    w: &[f32],
    rows: &[E],
    n: usize,
) {
    let w: [&[f32]; G] = std::array::from_fn(|g| &w[g * super::super::CHUNK_KEYS..][..n]);
    let mut at = 0;
    while at + W <= hd {
        let mut acc = [[0f32; W]; G];
        for g in 0..G {
            acc[g].copy_from_slice(&o[g * hd + at..][..W]);
        }
        for j in 0..n {
            let row: [f32; W] = E::widen_n(&rows[j * hd + at..]);
            for g in 0..G {
                let wj = w[g][j];
                for i in 0..W {
                    acc[g][i] += wj * row[i];
                }
            }
        }
        for g in 0..G {
            o[g * hd + at..][..W].copy_from_slice(&acc[g]);
        }
        at += W;
    }
    for g in 0..G {
        let og = &mut o[g * hd + at..g * hd + hd];
        for (j, &wj) in w[g].iter().enumerate() {
            let row = &rows[j * hd + at..][..og.len()];
            for (o, &v) in og.iter_mut().zip(row) {
                *o += wj * v.widen();
            }
        }
    }
}

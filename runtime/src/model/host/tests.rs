//! The host path's vector helpers and attention against plain reference loops.

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
        }
    }
}

/// One KV head's keys `(tokens, hd)` in the cache's blocked layout (see [`HeadKv`]).
fn blocked(keys: &[f32], hd: usize) -> Vec<f32> {
    let tokens = keys.len() / hd;
    let mut out = vec![0f32; tokens.div_ceil(KEY_BLOCK) * KEY_BLOCK * hd];
    for (t, row) in keys.chunks_exact(hd).enumerate() {
        let at = t / KEY_BLOCK * KEY_BLOCK * hd + t % KEY_BLOCK;
        for (d, &x) in row.iter().enumerate() {
            out[at + d * KEY_BLOCK] = x;
        }
    }
    out
}

fn to_half(x: &[f32]) -> Vec<u16> {
    x.iter()
        .map(|&v| half::f16::from_f32(v).to_bits())
        .collect()
}

fn from_half(x: &[u16]) -> Vec<f32> {
    x.iter()
        .map(|&b| half::f16::from_bits(b).to_f32())
        .collect()
}

/// [`AttnShape::attend_partial`] written plainly over one KV head's token-major keys and
/// values `(tokens, hd)` (each key scored for every head in `d` order, then each value row
/// added to every head's output): the kernels reorder loops and keep sums in registers,
/// never the arithmetic, so they match it bit for bit.
#[allow(
    clippy::needless_range_loop,
    reason = "the reference is written index by index, as the formula reads"
)]
fn plain_partial(
    shape: AttnShape,
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    range: std::ops::Range<usize>,
) -> Vec<f32> {
    use super::super::cpu::CpuKernels::Scalar;
    let (hd, group) = (shape.head_dim, shape.group());
    let scale = 1.0 / (hd as f32).sqrt();
    let (mut m, mut l) = (vec![f32::NEG_INFINITY; group], vec![0f32; group]);
    let mut o = vec![0f32; group * hd];
    let mut from = range.start;
    while from < range.end {
        let n = (range.end - from).min(CHUNK_KEYS);
        let row = |src: &[f32], j: usize| -> Vec<f32> { src[(from + j) * hd..][..hd].to_vec() };
        let mut scores = vec![vec![0f32; n]; group];
        for j in 0..n {
            let k = row(keys, j);
            for g in 0..group {
                let qg = &q[g * hd..][..hd];
                let dot = (0..hd).fold(0f32, |a, d| a + qg[d] * k[d]);
                scores[g][j] = dot * scale;
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

/// Every kernel path matches [`plain_partial`] bit for bit, in `f32` and in half precision
/// (against `f32` rows holding the rounded values), at group sizes that fill the heads'
/// registers and do not, head sizes that do and do not fill whole register blocks, and
/// ranges that start and end inside a key block.
#[test]
fn attention_kernels_match_the_plain_loops_exactly() {
    use super::super::cpu::CpuKernels;
    for (n_heads, head_dim) in [(2, 16), (6, 40), (6, 64), (10, 64), (16, 24)] {
        let shape = AttnShape {
            n_heads,
            n_kv_heads: 2,
            head_dim,
        };
        let group = shape.group();
        let n = CHUNK_KEYS * 2 + 9;
        let q = pseudo_random(group * head_dim, 11);
        let mut keys = pseudo_random(n * head_dim, 12);
        // Some subnormal halves among the keys.
        keys.iter_mut().step_by(7).for_each(|k| *k *= 1e-6);
        let values = pseudo_random(n * head_dim, 13);
        let (k16, v16) = (to_half(&keys), to_half(&values));
        let (kb, kb16) = (blocked(&keys, head_dim), to_half(&blocked(&keys, head_dim)));
        let (kw, vw) = (from_half(&k16), from_half(&v16));
        for range in [0..n, 5..CHUNK_KEYS + 3, 17..18, n - 1..n] {
            let want = plain_partial(shape, &q, &keys, &values, range.clone());
            let want16 = plain_partial(shape, &q, &kw, &vw, range.clone());
            for kernels in CpuKernels::available() {
                let mut scores = vec![0f32; CHUNK_KEYS * group];
                let mut part = vec![0f32; group * (head_dim + 2)];
                let r = range.clone();
                simd::attend_partial_on(
                    kernels,
                    shape,
                    &q,
                    &kb,
                    &values,
                    r,
                    &mut scores,
                    &mut part,
                );
                assert_eq!(part, want, "{kernels}: {shape:?}, keys {range:?}");
                let r = range.clone();
                simd::attend_partial_f16_on(
                    kernels,
                    shape,
                    &q,
                    &kb16,
                    &v16,
                    r,
                    &mut scores,
                    &mut part,
                );
                assert_eq!(part, want16, "{kernels}: f16 {shape:?}, keys {range:?}");
            }
        }
    }
}

/// Every half-precision value widens as `half` widens it (NaNs stay NaN).
#[test]
fn f16_widening_is_exact() {
    let all: Vec<u16> = (0..=u16::MAX).collect();
    let same =
        |got: f32, want: f32| got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan());
    for (&bits, &w) in all.iter().zip(&from_half(&all)) {
        assert!(same(simd::f16_to_f32(bits), w), "{bits:#06x}");
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
    attention_matches_plain_softmax_in(None);
}

/// The same over a sliding window of 100 keys: splits start inside a key block, and tokens
/// with fewer keys than the window see them all.
#[test]
fn windowed_attention_matches_plain_softmax() {
    attention_matches_plain_softmax_in(Some(100));
}

/// A layer's cache for token-major keys and values `(tokens, n_kv * hd)`: per KV head, keys
/// in blocks and values token-major.
fn cache_heads(keys: &[f32], values: &[f32], n_kv: usize, hd: usize) -> Vec<HeadKv<f32>> {
    (0..n_kv)
        .map(|h| {
            let of_head = |x: &[f32]| -> Vec<f32> {
                x.chunks_exact(n_kv * hd)
                    .flat_map(|row| row[h * hd..][..hd].to_vec())
                    .collect()
            };
            HeadKv {
                keys: blocked(&of_head(keys), hd),
                values: of_head(values),
            }
        })
        .collect()
}

fn attention_matches_plain_softmax_in(window: Option<usize>) {
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
    let heads = cache_heads(&keys, &values, 2, 16);
    // Four sequences of one token, each seeing its own number of keys (one chunk, several,
    // several splits), then two of nine tokens (a draft being verified): one across the
    // second split's start, one within a chunk; their queries for all heads.
    let mut visible = vec![1, 20, CHUNK_KEYS * 3 + 5, tokens];
    visible.extend(SPLIT_KEYS * 2 - 4..SPLIT_KEYS * 2 + 5);
    visible.extend(5..14);
    let spans = [(0, 1), (1, 1), (2, 1), (3, 1), (4, 9), (13, 9)];
    let q_all = pseudo_random(visible.len() * 6 * 16, 8);
    let plan = shape.plan(&spans, &visible, window, 16);
    // Without a window, the nine rows share each split's task (the last split has the four
    // rows that reach it); with one, the rows past the window start at different keys and
    // run alone.
    let (tasks, parts) = match window {
        None => (
            2 * (1 + 1 + 1 + 3 + 3 + 1),
            2 * (1 + 1 + 1 + 3 + (5 * 2 + 4 * 3) + 9),
        ),
        Some(_) => (2 * (4 + 9 + 1), 2 * (4 + 9 + 9)),
    };
    assert_eq!(
        (plan.tasks.len(), plan.parts.len()),
        (tasks, parts),
        "tasks and splits per token and head"
    );
    let mut partials = vec![0f32; plan.len];
    shape.attend_all(&plan, &q_all, |_| HostLayer::F32(&heads), &mut partials);
    let mut out = vec![1f32; visible.len() * 96];
    shape.merge(&plan, &partials, &mut out);
    for (t, &n) in visible.iter().enumerate() {
        for head in 0..6 {
            let kvh = head / 3;
            let q = &q_all[t * 96 + head * 16..][..16];
            let first = window.map_or(0, |w| n.saturating_sub(w));
            let scores: Vec<f32> = (first..n)
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
                let want: f32 = (first..n)
                    .map(|j| e[j - first] / sum * vf[j * stride + kvh * 16 + i])
                    .sum();
                assert!(
                    (o - want).abs() < 1e-5,
                    "token {t} head {head} visible {n}: {o} vs {want}"
                );
            }
        }
    }
}

/// A task of several rows gives each row, bit for bit, what a task of that row alone gives,
/// on every kernel path, in `f32` and half precision: for row counts below, at and past a
/// register group of heads, contexts that end inside a key block or a chunk and on their
/// edges, splits that start at 0, inside a block (a sliding window) and at a split's start,
/// rows whose ends rise (a sequence's rows) or fall, and groups of one to eight heads.
#[test]
fn grouped_rows_match_rows_alone_exactly() {
    use super::super::cpu::CpuKernels;
    for (n_heads, n_kv_heads, head_dim) in [(9, 3, 64), (6, 2, 40), (16, 2, 24), (2, 2, 16)] {
        let shape = AttnShape {
            n_heads,
            n_kv_heads,
            head_dim,
        };
        let (group, hd) = (shape.group(), head_dim);
        let total = SPLIT_KEYS + 200;
        let keys = pseudo_random(total * hd, 21);
        let values = pseudo_random(total * hd, 22);
        let (kb, kb16, v16) = (
            blocked(&keys, hd),
            to_half(&blocked(&keys, hd)),
            to_half(&values),
        );
        for rows in [1, 2, 3, 5, 9, 16] {
            // Rows `q_stride` apart, as in a step's queries (KV head 1's slice of each).
            let q_stride = n_heads * hd + 8;
            let q_all = pseudo_random(rows * q_stride, 23);
            let q = &q_all[group * hd..];
            for (from, context) in [
                (0, 0),
                (0, 15),
                (0, 16),
                (0, 63),
                (0, 100),
                (7, 170),
                (SPLIT_KEYS, 180),
            ] {
                for rising in [true, false] {
                    let ends: Vec<usize> = (0..rows)
                        .map(|r| from + context + 1 + if rising { r } else { rows - 1 - r })
                        .collect();
                    let heads = rows * group;
                    let mut scores = vec![0f32; CHUNK_KEYS * heads];
                    for kernels in CpuKernels::available() {
                        let mut grouped = vec![0f32; heads * (hd + 2)];
                        let mut grouped16 = grouped.clone();
                        simd::attend_rows_on(
                            kernels,
                            shape,
                            q,
                            q_stride,
                            &kb,
                            &values,
                            from,
                            &ends,
                            &mut scores,
                            &mut grouped,
                        );
                        simd::attend_rows_f16_on(
                            kernels,
                            shape,
                            q,
                            q_stride,
                            &kb16,
                            &v16,
                            from,
                            &ends,
                            &mut scores,
                            &mut grouped16,
                        );
                        for (r, &end) in ends.iter().enumerate() {
                            let qr = &q[r * q_stride..];
                            let mut alone = vec![0f32; group * (hd + 2)];
                            let mut alone16 = alone.clone();
                            simd::attend_rows_on(
                                kernels,
                                shape,
                                qr,
                                0,
                                &kb,
                                &values,
                                from,
                                &[end],
                                &mut scores,
                                &mut alone,
                            );
                            simd::attend_rows_f16_on(
                                kernels,
                                shape,
                                qr,
                                0,
                                &kb16,
                                &v16,
                                from,
                                &[end],
                                &mut scores,
                                &mut alone16,
                            );
                            let of_row = |p: &[f32]| -> Vec<f32> {
                                let at = |base: usize, w: usize| {
                                    p[base + r * group * w..][..group * w].to_vec()
                                };
                                [at(0, 1), at(heads, 1), at(2 * heads, hd)].concat()
                            };
                            let what = format!(
                                "{kernels}: {shape:?}, row {r} of {rows}, keys {from}..{end}"
                            );
                            assert_eq!(of_row(&grouped), alone, "{what}");
                            assert_eq!(of_row(&grouped16), alone16, "f16 {what}");
                        }
                    }
                }
            }
        }
    }
}

/// A step's attention with the rows of each sequence sharing tasks gives, bit for bit, what
/// it gives with every row a task of its own: sequences of one to seventeen rows (past a
/// task's rows), after contexts that are and are not multiples of a key block, a chunk and
/// a split, with and without a sliding window.
#[test]
fn grouped_attention_is_the_per_row_attention_bit_for_bit() {
    let shape = AttnShape {
        n_heads: 9,
        n_kv_heads: 3,
        head_dim: 64,
    };
    let (n_kv, hd) = (3, 64);
    let tokens = SPLIT_KEYS * 2 + 100;
    let keys = pseudo_random(tokens * n_kv * hd, 31);
    let values = pseudo_random(tokens * n_kv * hd, 32);
    let heads = cache_heads(&keys, &values, n_kv, hd);
    // (rows, keys before the step) per sequence; the step's rows follow each other.
    let seqs = [
        (9, 700),
        (1, 33),
        (4, 16),
        (17, 500),
        (9, 1020),
        (2, 0),
        (9, tokens - 13),
    ];
    let mut visible = Vec::new();
    let mut spans = Vec::new();
    for &(rows, context) in &seqs {
        spans.push((visible.len(), rows));
        visible.extend((1..=rows).map(|r| context + r));
    }
    let q = pseudo_random(visible.len() * 9 * hd, 33);
    for window in [None, Some(100), Some(600)] {
        let run = |task_rows: usize| {
            let plan = shape.plan(&spans, &visible, window, task_rows);
            let mut partials = vec![0f32; plan.len];
            shape.attend_all(&plan, &q, |_| HostLayer::F32(&heads), &mut partials);
            let mut out = vec![0f32; visible.len() * 9 * hd];
            shape.merge(&plan, &partials, &mut out);
            (plan.tasks.len(), out)
        };
        let (alone_tasks, alone) = run(1);
        for task_rows in [2, 4, 16] {
            let (tasks, grouped) = run(task_rows);
            assert!(window.is_some() || tasks < alone_tasks, "rows share tasks");
            assert_eq!(
                grouped, alone,
                "{task_rows} rows per task, window {window:?}"
            );
        }
    }
}

/// Tasks take every row of a sequence when one thread does the attention, and fewer when
/// they must spread over the threads.
#[test]
fn task_rows_follow_the_threads() {
    let shape = AttnShape {
        n_heads: 9,
        n_kv_heads: 3,
        head_dim: 64,
    };
    let small: Vec<usize> = (1..=9).collect();
    assert_eq!(shape.task_rows(&small, None, 16), 16, "one thread's work");
    // Nine rows after 700 keys: two splits per row and KV head, 54 in all.
    let verify: Vec<usize> = (701..=709).collect();
    assert_eq!(shape.task_rows(&verify, None, 2), 16);
    assert_eq!(shape.task_rows(&verify, None, 16), 3);
    assert_eq!(shape.task_rows(&verify, None, 64), 1);
}

/// The LoRA kernel on every kernel path gives the portable build's update bit for bit, and
/// a pair held in bf16 or f16 gives exactly what `f32` matrices holding the same values give;
/// against a plain f64 loop it is close. Widths cover whole 4-chunk blocks, single chunks and
/// tails; ranks whole groups of four rows and a remainder.
#[test]
fn lora_kernel_agrees_on_every_path_and_weight_type() {
    use super::super::cpu::CpuKernels;
    use half::{bf16, f16};
    for (inp, out, rank) in [(64, 64, 4), (80, 100, 7), (576, 1536, 16), (7, 3, 1)] {
        let x = pseudo_random(inp, 3);
        let a = pseudo_random(rank * inp, 4);
        let bt = pseudo_random(rank * out, 5);
        let scale = 1.5;
        let run = |kernels: CpuKernels, a: &[f32], bt: &[f32]| {
            let (mut t, mut d) = (vec![0f32; rank], vec![0f32; out]);
            simd::lora_delta_f32_on(kernels, &x, a, bt, scale, &mut t, &mut d);
            d
        };
        let want = run(CpuKernels::Scalar, &a, &bt);
        for (o, w) in want.iter().enumerate() {
            let exact: f64 = (0..rank)
                .map(|j| {
                    let t: f64 = (0..inp)
                        .map(|i| f64::from(a[j * inp + i]) * f64::from(x[i]))
                        .sum();
                    t * f64::from(scale) * f64::from(bt[j * out + o])
                })
                .sum();
            assert!(
                (f64::from(*w) - exact).abs() < 1e-4,
                "{inp}x{out} r{rank}: {w} vs {exact}"
            );
        }
        // The same values in half precision: rounded once, then held as bf16 / f16 bits.
        let (ab, bb): (Vec<bf16>, Vec<bf16>) = (
            a.iter().map(|&v| bf16::from_f32(v)).collect(),
            bt.iter().map(|&v| bf16::from_f32(v)).collect(),
        );
        let (ah, bh): (Vec<u16>, Vec<u16>) = (
            a.iter().map(|&v| f16::from_f32(v).to_bits()).collect(),
            bt.iter().map(|&v| f16::from_f32(v).to_bits()).collect(),
        );
        let widen_b = |v: &[bf16]| v.iter().map(|b| b.to_f32()).collect::<Vec<f32>>();
        let want_b = run(CpuKernels::Scalar, &widen_b(&ab), &widen_b(&bb));
        let want_h = run(CpuKernels::Scalar, &from_half(&ah), &from_half(&bh));
        for kernels in CpuKernels::available() {
            assert_eq!(
                run(kernels, &a, &bt),
                want,
                "{kernels}: f32 {inp}x{out} r{rank}"
            );
            let (mut t, mut d) = (vec![0f32; rank], vec![0f32; out]);
            simd::lora_delta_bf16_on(kernels, &x, &ab, &bb, scale, &mut t, &mut d);
            assert_eq!(d, want_b, "{kernels}: bf16 {inp}x{out} r{rank}");
            simd::lora_delta_f16_on(kernels, &x, &ah, &bh, scale, &mut t, &mut d);
            assert_eq!(d, want_h, "{kernels}: f16 {inp}x{out} r{rank}");
        }
    }
}

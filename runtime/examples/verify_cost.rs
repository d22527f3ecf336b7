//! What a forward pass of one sequence costs by the number of positions it feeds: the cost of
//! verifying a draft of `rows - 1` tokens, against a plain decode pass (`rows` = 1).
//!
//! The dev model, a cache of `--context` tokens, then passes of `rows` tokens that are cut
//! from the cache again after each pass. Two figures per row count: the pass with a logits row
//! for every position (what verification needs), and with only the last position's logits
//! (the difference is the output projection's cost for the extra rows). Median milliseconds
//! over `--passes` passes, and the cost relative to one row; then the mean CPU time of a
//! pass (every thread's, from `CLOCK_PROCESS_CPUTIME_ID`: with `RAYON_NUM_THREADS=1` the
//! single-threaded cost, which other work on the machine disturbs far less than wall time).
//!
//! `cargo run --release -p tollgate-runtime --example verify_cost [-- --context 700 --passes 60
//! --rows N]`
//! (`TOLLGATE_CPU_KERNELS` picks the kernel path.)

use std::time::Instant;

use tollgate_runtime::loader::load_dev_model;
use tollgate_runtime::model::{KvCache, LlamaModel, SeqStep};

/// Row counts measured.
const ROWS: [usize; 7] = [1, 2, 3, 4, 8, 9, 16];

fn arg(name: &str, default: usize) -> anyhow::Result<usize> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == name) {
        Some(i) => Ok(args
            .get(i + 1)
            .ok_or_else(|| anyhow::anyhow!("{name} needs a value"))?
            .parse()?),
        None => Ok(default),
    }
}

/// CPU seconds the process has used (every thread).
fn cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write; the clock id is a constant the kernel knows.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Median wall seconds and mean CPU seconds (every thread) of `passes` passes of `rows`
/// tokens after the cache's first `context`.
fn pass_cost(
    model: &LlamaModel,
    cache: &mut KvCache,
    context: usize,
    rows: usize,
    logits: usize,
    passes: usize,
) -> anyhow::Result<(f64, f64)> {
    let tokens: Vec<u32> = (0..rows as u32).map(|i| 300 + i).collect();
    let mut times = Vec::with_capacity(passes);
    let mut cpu = 0.0;
    for _ in 0..passes + 2 {
        let (started, cpu_started) = (Instant::now(), cpu_seconds());
        model.forward(&mut [SeqStep {
            tokens: &tokens,
            cache: &mut *cache,
            logits,
            adapter: None,
        }])?;
        times.push(started.elapsed().as_secs_f64());
        cpu += cpu_seconds() - cpu_started;
        cache.truncate(context);
        // The first two warm the caches.
        if times.len() == 2 {
            cpu = 0.0;
        }
    }
    let mut times = times.split_off(2);
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], cpu / passes as f64))
}

fn main() -> anyhow::Result<()> {
    let context = arg("--context", 700)?;
    let passes = arg("--passes", 60)?;
    let model = load_dev_model((context + 64).max(4096))?.model;
    let mut cache = model.new_cache();
    let prompt: Vec<u32> = (0..context as u32).map(|i| 100 + i % 1000).collect();
    for chunk in prompt.chunks(256) {
        model.forward(&mut [SeqStep {
            tokens: chunk,
            cache: &mut cache,
            logits: 1,
            adapter: None,
        }])?;
    }
    println!(
        "pass cost after {context} tokens, median of {passes} passes, kernels {}",
        tollgate_runtime::model::CpuKernels::selected()
    );
    println!(
        "{:>5} {:>12} {:>8} {:>14} {:>8} {:>12} {:>10} {:>10}",
        "rows", "all logits", "vs 1", "last logits", "vs 1", "ms per row", "cpu all", "cpu last"
    );
    // `--rows N`: that row count only (to profile it, or one not in `ROWS`).
    let only = arg("--rows", 0)?;
    let rows_measured = if only == 0 { ROWS.to_vec() } else { vec![only] };
    let mut one = None;
    for rows in rows_measured {
        let (all, cpu_all) = pass_cost(&model, &mut cache, context, rows, rows, passes)?;
        let (last, cpu_last) = pass_cost(&model, &mut cache, context, rows, 1, passes)?;
        let base = *one.get_or_insert(all);
        println!(
            "{rows:>5} {:>9.2} ms {:>7.2}x {:>11.2} ms {:>7.2}x {:>9.2} ms {:>7.2} ms {:>7.2} ms",
            all * 1e3,
            all / base,
            last * 1e3,
            last / base,
            all * 1e3 / rows as f64,
            cpu_all * 1e3,
            cpu_last * 1e3
        );
    }
    Ok(())
}

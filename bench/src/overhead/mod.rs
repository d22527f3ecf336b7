//! Gateway overhead benchmark: the latency `tollgate serve` adds in front of an
//! OpenAI-compatible upstream, and the highest request rate it sustains without errors, with
//! metering on (every request authenticated against the database and recorded in the ledger).
//!
//! Setup, all on loopback:
//! - the fake upstream of `tollgate-testkit` (the one the gateway's integration tests use), in
//!   this process on its own thread and runtime: it answers `POST /v1/chat/completions` at once
//!   with a fixed six-token reply (a JSON `chat.completion`, or `chat.completion.chunk` events
//!   with a final usage chunk and `data: [DONE]` when asked to stream, as the gateway always
//!   does) and `GET /health`;
//! - the real gateway as a child process (`--binary`, by default the `tollgate` next to this
//!   benchmark in the target directory), with a temporary SQLite ledger, the upstream as an
//!   `http` model, and a customer key issued through the admin API. `--metering off` runs it
//!   with `--no-database` and a static key instead, to measure what metering costs.
//!
//! For each rate, an open-loop load of small chat completions (non-streamed, or streamed with
//! `--stream`, read to the end): requests leave at fixed intervals whatever the responses do, and
//! latency runs from each request's scheduled send time to the end of its response, so a stall
//! shows in the latencies instead of slowing the load (no coordinated omission). The same load
//! runs first directly against the upstream, then through the gateway, each after a warm-up.
//!
//! Printed per rate and path: requests sent, answered 200, errors, achieved rate (successes over
//! the time from the first scheduled send to the last response), latency p50/p99/p99.9/max, the
//! CPU the gateway process used per request, the mean time a request waited for its durable
//! ledger write (the gateway's own `tollgate_metering_duration_seconds{phase="record"}`), and the
//! CPU other processes on the machine used meanwhile (a shared machine skews the figures). The
//! `added` row is the gateway's latency minus the direct latency at each percentile (a difference
//! of percentiles, not the percentile of per-request differences).
//!
//! A rate is sustained when no request failed and at least 95% of it was achieved. After the
//! listed rates, unless `--no-search`, the rate keeps rising by `--step` until the gateway no
//! longer sustains it (or the direct path does not: then the load generator or the upstream is
//! the limit), then the gap between the last sustained and the first failed rate is halved
//! `--refine` times. The highest sustained rate is the highest below the first failure. At the
//! end the ledger is read back through the admin API: it must hold one record per request the
//! gateway answered.
//!
//! The load generator, the upstream and the gateway share the machine's cores: on a small
//! machine the direct baseline is measured under the same conditions, but the gateway's own CPU
//! competes with the load generator's, so the added latency includes some of that contention.
//!
//! With `--baseline OLDER`, the whole benchmark (the listed rates, no search) runs `--rounds`
//! times for each binary, alternating which goes first, and the medians of the gateway's CPU
//! per request and added latency are printed with their ratio, today's over the older one's
//! ([`compare`]): the way to tell a change in the gateway's cost on a machine whose speed
//! drifts.
//!
//! With `--idle-connections N` and `--slow-streams M`, after the listed rates the benchmark
//! holds N idle keep-alive connections and M slow streams open to the gateway, reports its
//! memory per connection and per stream, and runs the rates again with them open and after
//! closing them ([`conns`]).
//!
//! With `--postgres URL`, the ledger and the limits are on PostgreSQL; `--replicas N` then
//! runs the benchmark with one gateway and again with N sharing the database ([`replicas`]).
//!
//! The code: [`options`] (the command line), [`gateway`] (the child process and its metrics),
//! [`cpu`] (CPU accounting from /proc), [`load`] (the open-loop load generator), [`report`] (the
//! table), [`run`] (the benchmark itself), [`conns`], [`held`] and [`trickle`] (held
//! connections, their client side and the slow upstream).

use std::time::Duration;

use tollgate_testkit::Reply;

pub mod compare;
pub mod conns;
pub mod cpu;
pub mod gateway;
pub mod held;
pub mod load;
pub mod options;
pub mod replicas;
pub mod report;
pub mod run;
pub mod trickle;

pub use options::Options;
pub use run::run;

/// The model id the gateway serves from the upstream.
pub const MODEL: &str = "bench-echo";
const UPSTREAM_KEY_ENV: &str = "TOLLGATE_BENCH_UPSTREAM_KEY";
const UPSTREAM_KEY: &str = "bench-upstream-secret";
const ADMIN_TOKEN: &str = "bench-admin-token";
/// The client key with `--metering off` (no database, so no issued keys).
const STATIC_KEY: &str = "tg-bench-static-key";
const CUSTOMER: &str = "bench";
/// The prompt tokens the upstream reports.
const PROMPT_TOKENS: u64 = 9;
/// A request slower than this is an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The share of the target rate that must be achieved for it to count as sustained: the
/// definition of "sustained", so that a rate the load generator cannot keep up is not counted.
const SUSTAIN_SHARE: f64 = 0.95;
/// Pause between runs, after the ledger has caught up.
const SETTLE: Duration = Duration::from_millis(500);

/// The upstream's reply: six tokens, one per piece, with the usage an upstream reports.
pub fn reply() -> Reply {
    Reply::pieces(["Hello", " from", " the", " bench", " upstream", "."])
        .with_counted_usage(PROMPT_TOKENS)
}

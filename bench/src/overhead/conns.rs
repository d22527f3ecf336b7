//! `--idle-connections N` and `--slow-streams M`: the gateway under many open connections.
//!
//! After the listed rates (the runs "without"), N keep-alive connections are opened to the
//! gateway, each making one request and then held idle, then M streamed requests to a second
//! model the slow upstream serves ([`super::trickle`], one piece every 100 ms), held for the
//! whole measurement. The gateway's resident memory (`VmRSS` in /proc/PID/status) is read
//! before, with the idle connections, and with the streams too: the differences divided by N
//! and M are the memory per connection and per stream. With them open the listed rates run
//! again (both paths, as always), then every idle connection must answer a second request and
//! every stream, once its upstream is released, must end with `data: [DONE]` having carried
//! every piece the upstream sent; anything else is an error of the run. After they are closed,
//! the listed rates run a third time, so the figures "with" stand between two "without".
//!
//! What it changes in the gateway, as an operator expecting that many connections would: the
//! `[server]` section raises `max_connections` and `max_inflight_requests` by N + M and M, and
//! `header_read_timeout_secs` (an idle keep-alive connection is otherwise closed after 30 s)
//! to an hour. The benchmark raises its own open-file limit too.
//!
//! The client side runs on a thread of its own ([`super::held`]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use bytes::Bytes;
use serde_json::{json, Value};

use super::held::{open_idle, recheck_idle, slow_stream, Endpoint, Errors, Side, StreamEnd};
use super::load::request_body;
use super::replicas::point_json;
use super::report::{cell, diff, table};
use super::run::{Bench, RatePoint};
use super::trickle::{SlowUpstream, PIECE_EVERY};
use super::{Options, SETTLE, UPSTREAM_KEY_ENV};

/// The model the slow upstream serves.
pub const SLOW_MODEL: &str = "bench-slow";
/// How long the streams may take to read their first piece, and to end once released.
const STREAM_WAIT: Duration = Duration::from_secs(60);
/// An idle keep-alive connection is closed after `header_read_timeout_secs`; the benchmark
/// holds them longer than the default 30 s.
const HEADER_READ_TIMEOUT_SECS: u64 = 3600;

/// Whether the options ask for held connections or streams.
pub fn enabled(opts: &Options) -> bool {
    opts.idle_connections > 0 || opts.slow_streams > 0
}

/// The gateway's settings for them, and the slow model (appended to its `models.toml`).
pub fn gateway_config(opts: &Options, slow: Option<SocketAddr>) -> String {
    if !enabled(opts) {
        return String::new();
    }
    let defaults = tollgate_gateway::config::ServerConfig::default();
    let (n, m) = (opts.idle_connections, opts.slow_streams);
    let mut out = format!(
        "[server]\nmax_connections = {}\nmax_inflight_requests = {}\nheader_read_timeout_secs = {}\n",
        defaults.max_connections + n + m,
        defaults.max_inflight_requests + m,
        HEADER_READ_TIMEOUT_SECS,
    );
    if let Some(addr) = slow {
        out.push_str(&format!(
            "[models.\"{SLOW_MODEL}\"]\n\
             backend = {{ type = \"http\", urls = [\"http://{addr}\"], api_key_env = \"{UPSTREAM_KEY_ENV}\" }}\n\
             price = {{ input_per_mtok = \"0.15\", output_per_mtok = \"0.60\" }}\n"
        ));
    }
    out
}

/// The slow upstream, when `--slow-streams` asks for one.
pub fn slow_upstream(opts: &Options) -> anyhow::Result<Option<SlowUpstream>> {
    if opts.slow_streams == 0 {
        return Ok(None);
    }
    Ok(Some(
        SlowUpstream::start().context("cannot start the slow upstream")?,
    ))
}

/// Raises this process's open-file limit to what the held connections need, or says why not.
fn raise_own_limit(opts: &Options) -> anyhow::Result<u64> {
    let limit = rlimit::increase_nofile_limit(u64::MAX).context("raising the open-file limit")?;
    // Each held connection and stream is a socket here; the load needs its own.
    let need = (opts.idle_connections + opts.slow_streams + 4096) as u64;
    ensure!(
        limit >= need,
        "the open-file limit is {limit}, {need} needed: raise the hard limit (ulimit -Hn)"
    );
    Ok(limit)
}

/// The resident memory of process `pid` in KiB (`VmRSS`), if /proc has it.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The request a slow stream makes.
fn slow_body() -> Bytes {
    let body = json!({
        "model": SLOW_MODEL,
        "messages": [{"role": "user", "content": "Count slowly."}],
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    Bytes::from(body.to_string())
}

/// The held phase's figures.
pub struct Held {
    idle: usize,
    streams: usize,
    open_file_limit: u64,
    /// The gateway's RSS at each step, in KiB.
    rss: Vec<(&'static str, Option<u64>)>,
    errors: Errors,
    idle_answered: u64,
    streams_ended: u64,
    pieces_read: u64,
    pieces_sent: u64,
    longest_gap: Duration,
    held_for: Duration,
    with: Vec<RatePoint>,
    after: Vec<RatePoint>,
}

impl Bench {
    /// With `--idle-connections` or `--slow-streams`: the held phase.
    pub(super) async fn held(
        &mut self,
        slow: Option<&SlowUpstream>,
    ) -> anyhow::Result<Option<Held>> {
        if !enabled(&self.opts) {
            return Ok(None);
        }
        self.hold(slow).await.map(Some)
    }

    /// Opens the held connections and streams, measures the listed rates with them open,
    /// checks and closes them, and measures the rates again.
    async fn hold(&mut self, slow: Option<&SlowUpstream>) -> anyhow::Result<Held> {
        let opts = self.opts.clone();
        let open_file_limit = raise_own_limit(&opts)?;
        let side = Side::start("held-connections")?;
        let pid = self.gateway.pid();
        let to = endpoint(&self.via.url, &self.via.auth)?;
        let body = request_body(false);
        self.settle().await?;
        let mut rss = vec![("before", rss_kib(pid))];
        let began = Instant::now();
        let hits = self.upstream_hits.load(Ordering::Relaxed);
        let n = opts.idle_connections;
        let (idle, mut errors) = side.spawn(open_idle(to.clone(), body.clone(), n)).await?;
        self.count(n, idle.len());
        self.upstream_via_gateway += self.upstream_hits.load(Ordering::Relaxed) - hits;
        self.settle().await?;
        rss.push(("with the idle connections", rss_kib(pid)));
        let started = Arc::new(AtomicU64::new(0));
        let streams: Vec<_> = (0..opts.slow_streams)
            .map(|_| side.spawn(slow_stream(to.clone(), slow_body(), started.clone())))
            .collect();
        let deadline = Instant::now() + STREAM_WAIT;
        while (started.load(Ordering::Relaxed) as usize)
            < streams.iter().filter(|s| !s.is_finished()).count()
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(SETTLE).await;
        rss.push(("with the slow streams too", rss_kib(pid)));
        let mut with = Vec::new();
        for &rate in &opts.rates {
            with.push(self.rate_point(rate).await?);
        }
        rss.push(("at the end of the runs", rss_kib(pid)));
        let held_for = began.elapsed();
        let open = idle.len();
        let hits = self.upstream_hits.load(Ordering::Relaxed);
        let (idle_answered, e) = side.spawn(recheck_idle(to, body, idle)).await?;
        self.count(open, idle_answered as usize);
        errors.merge(e);
        self.upstream_via_gateway += self.upstream_hits.load(Ordering::Relaxed) - hits;
        if let Some(slow) = slow {
            slow.release();
        }
        let ends = finish_streams(streams, &mut errors).await;
        self.count(opts.slow_streams, ends.len());
        drop(side);
        self.settle().await?;
        rss.push(("after closing them", rss_kib(pid)));
        let mut after = Vec::new();
        for &rate in &opts.rates {
            after.push(self.rate_point(rate).await?);
        }
        let pieces_read = ends.iter().map(|e| e.pieces).sum();
        let pieces_sent = slow.map_or(0, SlowUpstream::pieces);
        if pieces_read != pieces_sent && errors.count() == 0 {
            errors.add(format!(
                "the slow upstream sent {pieces_sent} pieces, the streams read {pieces_read}"
            ));
        }
        Ok(Held {
            idle: n,
            streams: opts.slow_streams,
            open_file_limit,
            rss,
            errors,
            idle_answered,
            streams_ended: ends.len() as u64,
            pieces_read,
            pieces_sent,
            longest_gap: ends.iter().map(|e| e.longest_gap).max().unwrap_or_default(),
            held_for,
            with,
            after,
        })
    }

    /// `sent` requests through the gateway, `ok` of them answered in full.
    fn count(&mut self, sent: usize, ok: usize) {
        self.gateway_sent += sent as u64;
        self.gateway_ok += ok as u64;
        self.gateway_errors += sent.saturating_sub(ok) as u64;
    }

    /// Until the ledger has caught up, and a moment more.
    async fn settle(&self) -> anyhow::Result<()> {
        self.wait_ledgers().await?;
        tokio::time::sleep(SETTLE).await;
        Ok(())
    }
}

/// Waits for every released stream to end: what the ones that ended well read.
async fn finish_streams(
    streams: Vec<tokio::task::JoinHandle<Result<StreamEnd, String>>>,
    errors: &mut Errors,
) -> Vec<StreamEnd> {
    let deadline = tokio::time::Instant::now() + STREAM_WAIT;
    let mut ends = Vec::with_capacity(streams.len());
    for s in streams {
        match tokio::time::timeout_at(deadline, s).await {
            Ok(Ok(Ok(end))) => ends.push(end),
            Ok(Ok(Err(e))) => errors.add(format!("a slow stream: {e}")),
            Ok(Err(e)) => errors.add(format!("a slow stream's task: {e}")),
            Err(_) => errors.add("a slow stream did not end after its upstream's release".into()),
        }
    }
    ends
}

/// The gateway's address and path from its completions URL (`http://ADDR/PATH`).
fn endpoint(url: &str, auth: &str) -> anyhow::Result<Endpoint> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("not an http:// URL: {url}"))?;
    let (addr, path) = rest.split_once('/').context("no path")?;
    Ok(Endpoint {
        addr: addr.parse().with_context(|| format!("address `{addr}`"))?,
        path: format!("/{path}"),
        auth: auth.to_string(),
    })
}

fn mib(kib: Option<u64>) -> String {
    cell(kib.map(|k| k as f64 / 1024.0), 1) + " MiB"
}

/// The added latency at `q` of the point at `rate`, if there is one.
fn added(points: &[RatePoint], rate: f64, q: f64) -> Option<f64> {
    let p = points.iter().find(|p| p.gateway.rate == rate)?;
    diff(p.gateway.quantile_ms(q), p.direct.quantile_ms(q))
}

impl Held {
    pub fn error_count(&self) -> u64 {
        self.errors.count()
    }

    /// KiB per idle connection and per stream: the RSS steps divided by their counts.
    fn per_item(&self) -> (Option<f64>, Option<f64>) {
        let step = |i: usize, n: usize| {
            let (a, b) = (self.rss.get(i)?.1?, self.rss.get(i + 1)?.1?);
            (n > 0).then(|| (b as f64 - a as f64) / n as f64)
        };
        (step(0, self.idle), step(1, self.streams))
    }

    /// The printed section; `without` are the runs before the connections were opened.
    pub fn text(&self, without: &[RatePoint]) -> String {
        let (per_conn, per_stream) = self.per_item();
        let mut out = format!(
            "\nheld: {} idle keep-alive connections (one request each, then idle) and {} slow \
             streams (one piece every {} ms), held {:.1} s; the gateway ran with \
             max_connections +{}, max_inflight_requests +{}, header_read_timeout_secs {}; \
             the benchmark's open-file limit {}\n",
            self.idle,
            self.streams,
            PIECE_EVERY.as_millis(),
            self.held_for.as_secs_f64(),
            self.idle + self.streams,
            self.streams,
            HEADER_READ_TIMEOUT_SECS,
            self.open_file_limit,
        );
        let steps: Vec<String> = self
            .rss
            .iter()
            .map(|(what, k)| format!("{what} {}", mib(*k)))
            .collect();
        out.push_str(&format!("gateway RSS: {}\n", steps.join(", ")));
        out.push_str(&format!(
            "memory per idle connection {} KiB, per slow stream {} KiB\n",
            cell(per_conn, 1),
            cell(per_stream, 1)
        ));
        out.push_str(&format!(
            "idle connections answering a second request at the end: {}/{}; streams ended with \
             [DONE]: {}/{}, pieces read {} of {} sent, longest gap between two pieces {:.0} ms\n",
            self.idle_answered,
            self.idle,
            self.streams_ended,
            self.streams,
            self.pieces_read,
            self.pieces_sent,
            self.longest_gap.as_secs_f64() * 1e3
        ));
        out.push_str(&format!("held errors: {}\n", self.error_count()));
        for (message, n) in self.errors.sorted().iter().take(5) {
            out.push_str(&format!("    {n} × {message}\n"));
        }
        out.push_str("\nwith them open:\n");
        out.push_str(&table(&self.with));
        out.push_str("\nafter closing them:\n");
        out.push_str(&table(&self.after));
        out.push_str(
            "\nadded latency (ms)   without   with them open   after closing   with ÷ without\n",
        );
        for p in &self.with {
            let rate = p.gateway.rate;
            for (name, q) in [("p50", 0.50), ("p99", 0.99)] {
                let (a, b, c) = (
                    added(without, rate, q),
                    added(&self.with, rate, q),
                    added(&self.after, rate, q),
                );
                let ratio = match (a, b) {
                    (Some(a), Some(b)) if a > 0.0 => Some(b / a),
                    _ => None,
                };
                out.push_str(&format!(
                    "{rate:>7.0}/s {name}      {:>9}   {:>14}   {:>13}   {:>14}\n",
                    cell(a, 3),
                    cell(b, 3),
                    cell(c, 3),
                    cell(ratio, 2)
                ));
            }
        }
        out
    }

    pub fn to_json(&self) -> Value {
        let (per_conn, per_stream) = self.per_item();
        json!({
            "idle_connections": self.idle,
            "slow_streams": self.streams,
            "piece_every_ms": PIECE_EVERY.as_millis() as u64,
            "held_secs": self.held_for.as_secs_f64(),
            "gateway_settings": {
                "max_connections_added": self.idle + self.streams,
                "max_inflight_requests_added": self.streams,
                "header_read_timeout_secs": HEADER_READ_TIMEOUT_SECS,
            },
            "bench_open_file_limit": self.open_file_limit,
            "gateway_rss_kib": self.rss.iter().map(|(what, k)| json!({"at": what, "kib": k})).collect::<Vec<_>>(),
            "kib_per_idle_connection": per_conn,
            "kib_per_slow_stream": per_stream,
            "idle_answered_second_request": self.idle_answered,
            "streams_ended_with_done": self.streams_ended,
            "pieces_read": self.pieces_read,
            "pieces_sent": self.pieces_sent,
            "longest_gap_between_pieces_ms": self.longest_gap.as_secs_f64() * 1e3,
            "errors": self.error_count(),
            "error_kinds": self.errors.sorted().iter().map(|(m, n)| json!({"message": m, "count": n})).collect::<Vec<_>>(),
            "with_them_open": self.with.iter().map(point_json).collect::<Vec<_>>(),
            "after_closing_them": self.after.iter().map(point_json).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_endpoint_comes_from_the_url() {
        let e = endpoint("http://127.0.0.1:9/v1/chat/completions", "Bearer k").unwrap();
        assert_eq!(e.addr.port(), 9);
        assert_eq!(e.path, "/v1/chat/completions");
        assert!(endpoint("https://x/y", "").is_err());
    }

    #[test]
    fn the_gateway_config_grows_with_the_held_connections() {
        use clap::Parser;
        let o = Options::try_parse_from(["overhead"]).unwrap();
        assert_eq!(gateway_config(&o, None), "");
        let o = Options::try_parse_from([
            "overhead",
            "--idle-connections",
            "10",
            "--slow-streams",
            "2",
        ])
        .unwrap();
        let text = gateway_config(&o, Some("127.0.0.1:5".parse().unwrap()));
        let d = tollgate_gateway::config::ServerConfig::default();
        assert!(text.contains(&format!("max_connections = {}\n", d.max_connections + 12)));
        assert!(text.contains(&format!(
            "max_inflight_requests = {}\n",
            d.max_inflight_requests + 2
        )));
        assert!(text.contains("[models.\"bench-slow\"]") && text.contains("127.0.0.1:5"));
    }

    #[test]
    fn this_process_has_an_rss() {
        assert!(rss_kib(std::process::id()).is_some_and(|k| k > 0));
    }
}

//! Gateway overhead benchmark: the latency `tollgate serve` adds in front of an
//! OpenAI-compatible upstream, and the highest request rate it sustains without errors, with
//! metering on (every request authenticated against the database and recorded in the ledger).
//!
//!     CARGO_TARGET_DIR=... cargo build --release --bin tollgate
//!     cargo run --release -p tollgate-gateway --example overhead_bench -- \
//!         [--rates 250,500,1000,2000] [--duration 10] [--warmup 2] [--no-search] \
//!         [--stream] [--metering on|off] [--gateway-log info] [--json FILE] \
//!         [--binary PATH] [--dir DIR]
//!
//! Setup, all on loopback:
//! - a minimal OpenAI-compatible upstream in this process, on its own thread and runtime: it
//!   answers `POST /v1/chat/completions` at once with a fixed six-token reply (a JSON
//!   `chat.completion`, or `chat.completion.chunk` events with a final usage chunk and
//!   `data: [DONE]` when asked to stream, as the gateway always does) and `GET /health`;
//! - the real gateway as a child process (`--binary`, by default the `tollgate` next to this
//!   example's target directory), with a temporary SQLite ledger, the upstream as an `http`
//!   model, and a customer key issued through the admin API. `--metering off` runs it with
//!   `--no-database` and a static key instead, to measure what metering costs.
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
//! `--refine` times. The highest sustained rate is the highest below the first failure. At the end the ledger is read back through the admin API: it must hold one record
//! per request the gateway answered.
//!
//! The load generator, the upstream and the gateway share the machine's cores: on a small
//! machine the direct baseline is measured under the same conditions, but the gateway's own CPU
//! competes with the load generator's, so the added latency includes some of that contention.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use serde_json::{json, Value};

/// The model id the gateway serves from the upstream.
const MODEL: &str = "bench-echo";
const UPSTREAM_KEY_ENV: &str = "TOLLGATE_BENCH_UPSTREAM_KEY";
const UPSTREAM_KEY: &str = "bench-upstream-secret";
const ADMIN_TOKEN: &str = "bench-admin-token";
/// The client key with `--metering off` (no database, so no issued keys).
const STATIC_KEY: &str = "tg-bench-static-key";
const CUSTOMER: &str = "bench";
/// The upstream's reply, one token per piece.
const REPLY: [&str; 6] = ["Hello", " from", " the", " bench", " upstream", "."];
/// The prompt tokens the upstream reports.
const PROMPT_TOKENS: u64 = 9;
/// A request slower than this is an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The share of the target rate that must be achieved for it to count as sustained.
const SUSTAIN_SHARE: f64 = 0.95;
/// Pause between runs, after the ledger has caught up.
const SETTLE: Duration = Duration::from_millis(500);
/// Linux's USER_HZ: the unit of CPU times in /proc.
const TICKS_PER_SEC: f64 = 100.0;

const USAGE: &str = "\
overhead_bench: the latency the Tollgate gateway adds in front of an OpenAI-compatible upstream

options:
  --rates R1,R2,...    request rates per second, ascending (default 250,500,1000,2000)
  --duration SECS      measured seconds per rate and path (default 10)
  --warmup SECS        unmeasured seconds before each run (default 2)
  --no-search          only the listed rates (default: keep raising the rate until it breaks)
  --step FACTOR        rate multiplier while searching (default 1.25)
  --refine N           then halve the gap between the last good and the first bad rate N
                       times (default 2)
  --max-rate R         stop searching here (default 50000)
  --stream             streamed requests, timed to the end of the stream (default: non-streamed)
  --metering on|off    off: --no-database and a static key (default on)
  --gateway-log LEVEL  RUST_LOG for the gateway (default info, its own default)
  --json FILE          also write the results as JSON
  --binary PATH        the tollgate binary (default: next to this example's target directory)
  --dir DIR            where the temporary ledger and config go (default: the system temp dir)
  --raw DIR            also write every measured request as CSV, one file per run:
                       scheduled send (ms from the run's start), latency (ms), ok
";

#[derive(Debug, Clone)]
struct Options {
    rates: Vec<f64>,
    duration: Duration,
    warmup: Duration,
    search: bool,
    step: f64,
    refine: u32,
    max_rate: f64,
    stream: bool,
    metering: bool,
    gateway_log: String,
    json: Option<PathBuf>,
    binary: PathBuf,
    dir: Option<PathBuf>,
    raw: Option<PathBuf>,
}

impl Options {
    fn parse() -> anyhow::Result<Self> {
        // target/release/examples/overhead_bench → target/release/tollgate
        let exe = std::env::current_exe().context("cannot find this executable")?;
        let binary = exe
            .parent()
            .and_then(Path::parent)
            .map(|d| d.join("tollgate"))
            .unwrap_or_else(|| PathBuf::from("tollgate"));
        let mut o = Self {
            rates: vec![250.0, 500.0, 1000.0, 2000.0],
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(2),
            search: true,
            step: 1.25,
            refine: 2,
            max_rate: 50_000.0,
            stream: false,
            metering: true,
            gateway_log: "info".into(),
            json: None,
            binary,
            dir: None,
            raw: None,
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let (name, inline) = match arg.split_once('=') {
                Some((n, v)) => (n.to_string(), Some(v.to_string())),
                None => (arg.clone(), None),
            };
            let mut value = || {
                inline
                    .clone()
                    .or_else(|| args.next())
                    .with_context(|| format!("{name} needs a value"))
            };
            match name.as_str() {
                "--rates" => {
                    let mut rates = value()?
                        .split(',')
                        .map(|r| r.trim().parse::<f64>())
                        .collect::<Result<Vec<_>, _>>()
                        .context("--rates: comma-separated numbers")?;
                    ensure!(
                        !rates.is_empty() && rates.iter().all(|r| *r > 0.0),
                        "--rates must be positive"
                    );
                    rates.sort_by(f64::total_cmp);
                    o.rates = rates;
                }
                "--duration" => o.duration = seconds(&name, &value()?)?,
                "--warmup" => o.warmup = seconds(&name, &value()?)?,
                "--no-search" => o.search = false,
                "--step" => {
                    o.step = value()?.parse().context("--step: a number")?;
                    ensure!(o.step > 1.0, "--step must be above 1");
                }
                "--refine" => o.refine = value()?.parse().context("--refine: a count")?,
                "--max-rate" => o.max_rate = value()?.parse().context("--max-rate: a number")?,
                "--stream" => o.stream = true,
                "--metering" => {
                    o.metering = match value()?.as_str() {
                        "on" => true,
                        "off" => false,
                        other => bail!("--metering on|off, not `{other}`"),
                    }
                }
                "--gateway-log" => o.gateway_log = value()?,
                "--json" => o.json = Some(value()?.into()),
                "--binary" => o.binary = value()?.into(),
                "--dir" => o.dir = Some(value()?.into()),
                "--raw" => o.raw = Some(value()?.into()),
                "-h" | "--help" => {
                    print!("{USAGE}");
                    std::process::exit(0);
                }
                other => bail!("unknown argument `{other}`\n\n{USAGE}"),
            }
        }
        Ok(o)
    }
}

fn seconds(name: &str, text: &str) -> anyhow::Result<Duration> {
    let s: f64 = text
        .parse()
        .with_context(|| format!("{name}: seconds, not `{text}`"))?;
    ensure!(s.is_finite() && s >= 0.0, "{name} must be zero or more");
    Ok(Duration::from_secs_f64(s))
}

// ---- the upstream ---------------------------------------------------------------------------

/// Requests the upstream has seen, to check the gateway makes exactly one attempt per request.
#[derive(Default)]
struct UpstreamCounters {
    chat: AtomicU64,
}

struct UpstreamState {
    /// The `Authorization` header the gateway must send.
    auth: String,
    counters: Arc<UpstreamCounters>,
}

#[derive(serde::Deserialize)]
struct ChatBody {
    model: String,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    messages: Vec<serde::de::IgnoredAny>,
}

#[derive(serde::Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Serves the upstream on its own thread and single-threaded runtime, so the load generator's
/// tasks never delay its answers in the queue of a shared runtime.
fn start_upstream(counters: Arc<UpstreamCounters>) -> anyhow::Result<SocketAddr> {
    let listener = StdListener::bind("127.0.0.1:0").context("upstream: cannot bind")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let state = Arc::new(UpstreamState {
        auth: format!("Bearer {UPSTREAM_KEY}"),
        counters,
    });
    let app = Router::new()
        .route("/v1/chat/completions", post(upstream_chat))
        .route(
            "/health",
            get(|| async { axum::Json(json!({"status": "ok"})) }),
        )
        .with_state(state);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("upstream".into())
        .spawn(move || {
            runtime.block_on(async move {
                let served = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => {
                        let l = l.tap_io(|tcp| {
                            let _ = tcp.set_nodelay(true);
                        });
                        axum::serve(l, app).await
                    }
                    Err(e) => Err(e),
                };
                if let Err(e) = served {
                    eprintln!("the upstream stopped: {e}");
                }
            });
        })?;
    Ok(addr)
}

fn upstream_error(status: StatusCode, message: &str) -> Response {
    let body = json!({"error": {"message": message, "type": "invalid_request_error"}});
    (status, axum::Json(body)).into_response()
}

async fn upstream_chat(
    State(s): State<Arc<UpstreamState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    s.counters.chat.fetch_add(1, Ordering::Relaxed);
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if auth != Some(s.auth.as_str()) {
        return upstream_error(StatusCode::UNAUTHORIZED, "incorrect upstream key");
    }
    let request: ChatBody = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return upstream_error(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    if request.messages.is_empty() {
        return upstream_error(StatusCode::BAD_REQUEST, "`messages` is empty");
    }
    if request.stream {
        let include_usage = request.stream_options.is_some_and(|o| o.include_usage);
        (
            [(header::CONTENT_TYPE, "text/event-stream")],
            sse_reply(&request.model, include_usage),
        )
            .into_response()
    } else {
        (
            [(header::CONTENT_TYPE, "application/json")],
            json_reply(&request.model),
        )
            .into_response()
    }
}

fn usage_json() -> Value {
    let completion = REPLY.len() as u64;
    json!({
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": completion,
        "total_tokens": PROMPT_TOKENS + completion,
    })
}

fn json_reply(model: &str) -> String {
    json!({
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": REPLY.concat()},
            "finish_reason": "stop",
        }],
        "usage": usage_json(),
    })
    .to_string()
}

/// The whole stream at once: a role chunk, one chunk per token, the finish, the usage.
fn sse_reply(model: &str, include_usage: bool) -> String {
    let chunk = |choices: Value, usage: Value| {
        json!({
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": model,
            "choices": choices,
            "usage": usage,
        })
    };
    let mut events = vec![chunk(
        json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]),
        Value::Null,
    )];
    for piece in REPLY {
        events.push(chunk(
            json!([{"index": 0, "delta": {"content": piece}, "finish_reason": null}]),
            Value::Null,
        ));
    }
    events.push(chunk(
        json!([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
        Value::Null,
    ));
    if include_usage {
        events.push(chunk(json!([]), usage_json()));
    }
    let mut out = String::with_capacity(2048);
    for e in &events {
        let _ = write!(out, "data: {e}\n\n");
    }
    out.push_str("data: [DONE]\n\n");
    out
}

// ---- the gateway ----------------------------------------------------------------------------

/// The gateway child process; killed when dropped (also on a panic), before the temporary
/// directory it writes in goes away.
struct Gateway {
    child: Child,
    base: String,
    log: PathBuf,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gateway {
    fn start(opts: &Options, dir: &Path, upstream: SocketAddr) -> anyhow::Result<Self> {
        ensure!(
            opts.binary.exists(),
            "{} not found: build it with `cargo build --release --bin tollgate` (same \
             CARGO_TARGET_DIR), or pass --binary",
            opts.binary.display()
        );
        let config = dir.join("models.toml");
        std::fs::write(
            &config,
            format!(
                "[models.\"{MODEL}\"]\n\
                 source = {{ path = \"unused-by-http-models\" }}\n\
                 backend = {{ type = \"http\", urls = [\"http://{upstream}\"], api_key_env = \"{UPSTREAM_KEY_ENV}\" }}\n\
                 price = {{ input_per_mtok = \"0.15\", output_per_mtok = \"0.60\" }}\n"
            ),
        )?;
        // A free port for the gateway (released just before it binds it).
        let addr = StdListener::bind("127.0.0.1:0")?.local_addr()?;
        let log = dir.join("gateway.log");
        let mut cmd = Command::new(&opts.binary);
        cmd.arg("serve")
            .arg("--config")
            .arg(&config)
            .arg("--listen")
            .arg(addr.to_string());
        if opts.metering {
            cmd.arg("--database").arg(dir.join("ledger.db"));
            cmd.env("TOLLGATE_ADMIN_TOKEN", ADMIN_TOKEN);
            cmd.env_remove("TOLLGATE_API_KEYS");
        } else {
            cmd.arg("--no-database");
            cmd.env("TOLLGATE_API_KEYS", STATIC_KEY);
            cmd.env_remove("TOLLGATE_ADMIN_TOKEN");
        }
        let child = cmd
            .env(UPSTREAM_KEY_ENV, UPSTREAM_KEY)
            .env("RUST_LOG", &opts.gateway_log)
            .env("NO_COLOR", "1")
            .env_remove("TOLLGATE_SPOOL")
            .env_remove("DATABASE_URL")
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("cannot start {}", opts.binary.display()))?;
        Ok(Self {
            child,
            base: format!("http://{addr}"),
            log,
        })
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    async fn wait_ready(&mut self, client: &reqwest::Client) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("the gateway exited ({status}):\n{}", self.log_tail());
            }
            let health = client.get(format!("{}/health", self.base)).send().await;
            if matches!(health, Ok(r) if r.status().is_success()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the gateway did not answer /health:\n{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A customer and a key issued through the admin API: requests with it are looked up in
    /// the database and metered.
    async fn issue_key(&self, client: &reqwest::Client) -> anyhow::Result<String> {
        let admin = format!("Bearer {ADMIN_TOKEN}");
        let r = client
            .post(format!("{}/admin/v1/customers", self.base))
            .header(header::AUTHORIZATION, &admin)
            .json(&json!({"id": CUSTOMER, "name": "Overhead benchmark"}))
            .send()
            .await?;
        ensure!(
            r.status().is_success(),
            "creating the customer: {}",
            r.text().await?
        );
        let r = client
            .post(format!("{}/admin/v1/customers/{CUSTOMER}/keys", self.base))
            .header(header::AUTHORIZATION, &admin)
            .json(&json!({"name": "overhead-bench"}))
            .send()
            .await?;
        ensure!(
            r.status().is_success(),
            "creating the key: {}",
            r.text().await?
        );
        let body: Value = r.json().await?;
        body["key"]
            .as_str()
            .map(str::to_string)
            .context("the key response has no `key`")
    }

    /// The gateway's Prometheus text.
    async fn metrics(&self, client: &reqwest::Client) -> anyhow::Result<String> {
        Ok(client
            .get(format!("{}/metrics", self.base))
            .send()
            .await?
            .text()
            .await?)
    }

    /// Waits until the ledger has written every record it accepted to the database, so a run
    /// does not pay for the previous run's backlog.
    async fn wait_ledger(&self, client: &reqwest::Client) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let text = self.metrics(client).await?;
            match metric(&text, "tollgate_ledger_pending_records") {
                Some(p) if p > 0.0 && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                _ => return Ok(()),
            }
        }
    }

    /// Usage records in the ledger: (all, completed). Reads every record page by page.
    async fn count_records(&self, client: &reqwest::Client) -> anyhow::Result<(u64, u64)> {
        let (mut all, mut completed) = (0, 0);
        let mut after = String::new();
        loop {
            let page: Value = client
                .get(format!("{}/admin/v1/usage/records", self.base))
                .query(&[("limit", "10000"), ("after", after.as_str())])
                .header(header::AUTHORIZATION, format!("Bearer {ADMIN_TOKEN}"))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            let data = page["data"].as_array().context("records: no `data`")?;
            all += data.len() as u64;
            completed += data.iter().filter(|r| r["status"] == "completed").count() as u64;
            match page["next_cursor"].as_str() {
                Some(c) if page["has_more"] == true => after = c.to_string(),
                _ => return Ok((all, completed)),
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// The value of an unlabelled metric, or of the first series whose name and labels start with
/// `series`.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let rest = l.strip_prefix(series)?;
        let value = rest.rsplit(' ').next()?;
        value.parse().ok()
    })
}

/// The metering phases the gateway times (`tollgate_metering_duration_seconds{phase}`).
const PHASES: [&str; 3] = ["auth", "admit", "record"];

/// One phase's histogram as scraped: sum, count, and cumulative bucket counts by upper bound.
#[derive(Debug, Clone, Default)]
struct PhaseHistogram {
    sum: f64,
    count: f64,
    buckets: Vec<(f64, f64)>,
}

impl PhaseHistogram {
    fn scrape(text: &str, phase: &str) -> Self {
        let name = "tollgate_metering_duration_seconds";
        let get = |suffix: &str| {
            metric(text, &format!("{name}_{suffix}{{phase=\"{phase}\"}}")).unwrap_or(0.0)
        };
        let prefix = format!("{name}_bucket{{");
        let buckets = text
            .lines()
            .filter_map(|l| l.strip_prefix(prefix.as_str()))
            .filter(|l| l.contains(&format!("phase=\"{phase}\"")))
            .filter_map(|l| {
                let le = l.split("le=\"").nth(1)?.split('"').next()?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, l.rsplit(' ').next()?.parse().ok()?))
            })
            .collect();
        Self {
            sum: get("sum"),
            count: get("count"),
            buckets,
        }
    }

    /// What was observed between two scrapes.
    fn since(&self, before: &Self) -> Self {
        let buckets = self
            .buckets
            .iter()
            .map(|&(le, n)| {
                let old = before
                    .buckets
                    .iter()
                    .find(|b| b.0 == le)
                    .map_or(0.0, |b| b.1);
                (le, n - old)
            })
            .collect();
        Self {
            sum: self.sum - before.sum,
            count: self.count - before.count,
            buckets,
        }
    }

    fn mean_ms(&self) -> Option<f64> {
        (self.count > 0.0).then(|| self.sum / self.count * 1e3)
    }

    /// The upper bound of the bucket holding the `q` quantile, in milliseconds.
    fn quantile_bound_ms(&self, q: f64) -> Option<f64> {
        if self.count <= 0.0 {
            return None;
        }
        self.buckets
            .iter()
            .find(|(_, n)| *n >= q * self.count)
            .map(|(le, _)| le * 1e3)
    }
}

/// Every phase's histogram from one scrape of `/metrics`.
fn phases(text: &str) -> Vec<PhaseHistogram> {
    PHASES
        .iter()
        .map(|p| PhaseHistogram::scrape(text, p))
        .collect()
}

// ---- CPU accounting -------------------------------------------------------------------------

/// CPU seconds (user + system, all threads) of a process, from /proc (Linux).
fn process_cpu(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS_PER_SEC)
}

/// CPU seconds the machine's processes ran (user and system time, as processes are charged),
/// and the CPU seconds the hypervisor stole. Interrupt and softirq time are left out: loopback
/// traffic is mostly processed there and charged to no process, so it would look like other
/// processes' work.
fn machine_busy() -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<f64> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let busy: f64 = v.iter().take(3).sum();
    Some((busy / TICKS_PER_SEC, v.get(7)? / TICKS_PER_SEC))
}

#[derive(Clone, Copy)]
struct CpuSnapshot {
    at: Instant,
    gateway: Option<f64>,
    own: Option<f64>,
    machine: Option<(f64, f64)>,
}

impl CpuSnapshot {
    fn take(gateway_pid: u32) -> Self {
        Self {
            at: Instant::now(),
            gateway: process_cpu(&gateway_pid.to_string()),
            own: process_cpu("self"),
            machine: machine_busy(),
        }
    }
}

/// CPU used between two snapshots.
#[derive(Debug, Clone, Copy, Default)]
struct CpuUse {
    /// Gateway CPU seconds.
    gateway: Option<f64>,
    /// CPU seconds of every other process, as a share of one core (100% = one core busy).
    others_pct: Option<f64>,
    /// CPU time the hypervisor took from this machine, likewise.
    steal_pct: Option<f64>,
    /// CPU of this process (load generator and upstream), likewise.
    bench_pct: Option<f64>,
}

fn cpu_between(a: CpuSnapshot, b: CpuSnapshot) -> CpuUse {
    let d = |x: Option<f64>, y: Option<f64>| Some(y? - x?);
    let gateway = d(a.gateway, b.gateway);
    let others = (|| {
        let busy = d(a.machine.map(|m| m.0), b.machine.map(|m| m.0))?;
        let own = d(a.own, b.own)?;
        Some((busy - own - gateway?).max(0.0))
    })();
    let steal = d(a.machine.map(|m| m.1), b.machine.map(|m| m.1));
    let wall = (b.at - a.at).as_secs_f64();
    CpuUse {
        gateway,
        others_pct: others.map(|o| 100.0 * o / wall),
        steal_pct: steal.map(|s| 100.0 * s / wall),
        bench_pct: d(a.own, b.own).map(|o| 100.0 * o / wall),
    }
}

// ---- the load generator ---------------------------------------------------------------------

/// Where one path's requests go.
struct Target {
    url: String,
    auth: String,
    body: Bytes,
    stream: bool,
}

fn request_body(stream: bool) -> Bytes {
    let mut body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
        "max_tokens": 16,
    });
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    Bytes::from(body.to_string())
}

/// One request, timed from its scheduled send time to the end of its response.
async fn one_request(
    client: &reqwest::Client,
    target: &Target,
    scheduled: Instant,
) -> Result<Duration, String> {
    let response = client
        .post(&target.url)
        .header(header::AUTHORIZATION, &target.auth)
        .header(header::CONTENT_TYPE, "application/json")
        .body(target.body.clone())
        .send()
        .await
        .map_err(|e| error_chain(&e))?;
    let status = response.status();
    let body = response.bytes().await.map_err(|e| error_chain(&e))?;
    let latency = scheduled.elapsed();
    if !status.is_success() {
        let text = String::from_utf8_lossy(&body);
        return Err(format!(
            "HTTP {status}: {}",
            text.chars().take(200).collect::<String>()
        ));
    }
    if target.stream {
        // A stream that fails midway still has status 200: it ends with an error event.
        if !body.ends_with(b"data: [DONE]\n\n") {
            return Err("the stream did not end with [DONE]".into());
        }
        if body.windows(8).any(|w| w == b"\"error\":") {
            return Err("the stream carried an error event".into());
        }
    }
    Ok(latency)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let _ = write!(text, ": {s}");
        source = s.source();
    }
    text
}

/// One measured run of one path at one rate.
#[derive(Debug, Default)]
struct Run {
    rate: f64,
    sent: u64,
    ok: u64,
    /// Error messages and how often each occurred.
    errors: Vec<(String, u64)>,
    /// Successful requests' latencies, sorted.
    latencies: Vec<Duration>,
    /// Every request in send order: scheduled send (from the run's start), latency, success.
    samples: Vec<(Duration, Duration, bool)>,
    /// From the first scheduled send to the last response.
    span: Duration,
    /// How late the pacer sent its latest request (the load generator falling behind).
    pacer_late_max: Duration,
    cpu: CpuUse,
    /// The metering phases' histograms over the run, in [`PHASES`] order (gateway runs
    /// with metering only).
    phases: Vec<PhaseHistogram>,
}

impl Run {
    fn error_count(&self) -> u64 {
        self.errors.iter().map(|(_, n)| n).sum()
    }

    fn achieved(&self) -> f64 {
        self.ok as f64 / self.span.as_secs_f64().max(1e-9)
    }

    fn sustained(&self) -> bool {
        self.error_count() == 0 && self.achieved() >= SUSTAIN_SHARE * self.rate
    }

    /// The `q` quantile in milliseconds (nearest rank).
    fn quantile_ms(&self, q: f64) -> Option<f64> {
        let n = self.latencies.len();
        if n == 0 {
            return None;
        }
        let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
        Some(self.latencies[rank - 1].as_secs_f64() * 1e3)
    }

    fn max_ms(&self) -> Option<f64> {
        self.latencies.last().map(|d| d.as_secs_f64() * 1e3)
    }

    /// Mean wait for the durable ledger write, per request that waited.
    fn record_wait_ms(&self) -> Option<f64> {
        self.phases.get(2)?.mean_ms()
    }

    fn gateway_cpu_us_per_request(&self) -> Option<f64> {
        let cpu = self.cpu.gateway?;
        (self.sent > 0).then(|| cpu * 1e6 / self.sent as f64)
    }

    fn to_json(&self) -> Value {
        json!({
            "rate": self.rate,
            "sent": self.sent,
            "ok": self.ok,
            "errors": self.error_count(),
            "error_kinds": self.errors.iter().map(|(m, n)| json!({"message": m, "count": n})).collect::<Vec<_>>(),
            "achieved_per_sec": self.achieved(),
            "sustained": self.sustained(),
            "p50_ms": self.quantile_ms(0.50),
            "p99_ms": self.quantile_ms(0.99),
            "p999_ms": self.quantile_ms(0.999),
            "max_ms": self.max_ms(),
            "pacer_late_max_ms": self.pacer_late_max.as_secs_f64() * 1e3,
            "gateway_cpu_us_per_request": self.gateway_cpu_us_per_request(),
            "others_cpu_pct": self.cpu.others_pct,
            "steal_cpu_pct": self.cpu.steal_pct,
            "bench_cpu_pct": self.cpu.bench_pct,
            "record_wait_mean_ms": self.record_wait_ms(),
            "metering_phases": PHASES.iter().zip(&self.phases).map(|(name, h)| json!({
                "phase": name,
                "count": h.count,
                "mean_ms": h.mean_ms(),
                "p99_bucket_bound_ms": h.quantile_bound_ms(0.99),
            })).collect::<Vec<_>>(),
        })
    }
}

/// Sends `rate` requests per second for `duration`, open loop: a pacer thread releases each
/// request at its scheduled time onto this (single-threaded) runtime, whatever the earlier
/// requests are doing.
async fn run_load(
    client: &reqwest::Client,
    target: &Arc<Target>,
    rate: f64,
    duration: Duration,
) -> anyhow::Result<Run> {
    let n = (rate * duration.as_secs_f64()).round().max(1.0) as u64;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let handle = tokio::runtime::Handle::current();
    let start = Instant::now() + Duration::from_millis(10);
    let pacer = {
        let (client, target) = (client.clone(), target.clone());
        tokio::task::spawn_blocking(move || {
            let mut late_max = Duration::ZERO;
            for i in 0..n {
                let at = start + Duration::from_secs_f64(i as f64 / rate);
                let now = Instant::now();
                if at > now {
                    std::thread::sleep(at - now);
                }
                late_max = late_max.max(at.elapsed());
                let (client, target, tx) = (client.clone(), target.clone(), tx.clone());
                handle.spawn(async move {
                    let outcome = one_request(&client, &target, at).await;
                    let _ = tx.send((at, Instant::now(), outcome));
                });
            }
            late_max
        })
    };
    let mut run = Run {
        rate,
        sent: n,
        ..Run::default()
    };
    let mut errors: HashMap<String, u64> = HashMap::new();
    let mut last = start;
    // Ends once the pacer and every request have dropped their senders.
    while let Some((at, done, outcome)) = rx.recv().await {
        last = last.max(done);
        let offset = at - start;
        match outcome {
            Ok(latency) => {
                run.ok += 1;
                run.latencies.push(latency);
                run.samples.push((offset, latency, true));
            }
            Err(e) => {
                *errors.entry(e).or_default() += 1;
                run.samples.push((offset, done - at, false));
            }
        }
    }
    run.samples.sort_unstable_by_key(|s| s.0);
    run.pacer_late_max = pacer.await?;
    run.latencies.sort_unstable();
    run.span = last.saturating_duration_since(start);
    run.errors = errors.into_iter().collect();
    run.errors.sort_by_key(|e| std::cmp::Reverse(e.1));
    Ok(run)
}

// ---- the benchmark --------------------------------------------------------------------------

struct Bench {
    opts: Options,
    client: reqwest::Client,
    gateway: Gateway,
    direct: Arc<Target>,
    via: Arc<Target>,
    counters: Arc<UpstreamCounters>,
    /// Requests sent through the gateway, answered 200, and failed, warm-ups included.
    gateway_sent: u64,
    gateway_ok: u64,
    gateway_errors: u64,
    /// Upstream requests made by the gateway.
    upstream_via_gateway: u64,
}

/// One rate: both paths.
struct RatePoint {
    direct: Run,
    gateway: Run,
}

impl Bench {
    /// A warm-up (opens the connections), then a measured run of one path.
    async fn measure(&mut self, rate: f64, through_gateway: bool) -> anyhow::Result<Run> {
        let target = if through_gateway {
            self.via.clone()
        } else {
            self.direct.clone()
        };
        if self.opts.metering {
            self.gateway.wait_ledger(&self.client).await?;
        }
        tokio::time::sleep(SETTLE).await;
        let upstream_before = self.counters.chat.load(Ordering::Relaxed);
        if !self.opts.warmup.is_zero() {
            let warm = run_load(&self.client, &target, rate, self.opts.warmup).await?;
            if through_gateway {
                self.gateway_sent += warm.sent;
                self.gateway_ok += warm.ok;
                self.gateway_errors += warm.error_count();
            }
        }
        let phases_before = phases(&self.gateway.metrics(&self.client).await?);
        let before = CpuSnapshot::take(self.gateway.pid());
        let mut run = run_load(&self.client, &target, rate, self.opts.duration).await?;
        let after = CpuSnapshot::take(self.gateway.pid());
        run.cpu = cpu_between(before, after);
        if through_gateway {
            self.gateway_sent += run.sent;
            self.gateway_ok += run.ok;
            self.gateway_errors += run.error_count();
            self.upstream_via_gateway +=
                self.counters.chat.load(Ordering::Relaxed) - upstream_before;
            let phases_after = phases(&self.gateway.metrics(&self.client).await?);
            run.phases = phases_after
                .iter()
                .zip(&phases_before)
                .map(|(a, b)| a.since(b))
                .collect();
        }
        if let Some(dir) = &self.opts.raw {
            let path = dir.join(format!(
                "{}-{:.0}.csv",
                if through_gateway { "gateway" } else { "direct" },
                rate
            ));
            write_raw(&path, &run).with_context(|| format!("cannot write {}", path.display()))?;
        }
        Ok(run)
    }

    async fn rate_point(&mut self, rate: f64) -> anyhow::Result<RatePoint> {
        let direct = self.measure(rate, false).await?;
        let gateway = self.measure(rate, true).await?;
        eprintln!(
            "  {rate:>7.0}/s  direct p99 {}  gateway p99 {}  errors {}  {}",
            ms(direct.quantile_ms(0.99)),
            ms(gateway.quantile_ms(0.99)),
            gateway.error_count(),
            if gateway.sustained() {
                "sustained"
            } else {
                "NOT sustained"
            }
        );
        for (message, count) in gateway.errors.iter().take(3) {
            eprintln!("      {count} × {message}");
        }
        Ok(RatePoint { direct, gateway })
    }

    /// Measures `rate` for the search and keeps the point: whether the gateway sustained it,
    /// or `None` when the direct path did not (then the load generator or the upstream is the
    /// limit, not the gateway).
    async fn probe(
        &mut self,
        rate: f64,
        points: &mut Vec<RatePoint>,
    ) -> anyhow::Result<Option<bool>> {
        let p = self.rate_point(rate).await?;
        let outcome = p.direct.sustained().then(|| p.gateway.sustained());
        points.push(p);
        Ok(outcome)
    }

    /// One request on each path, checked in full.
    async fn check(&self) -> anyhow::Result<()> {
        for (name, target) in [("upstream", &self.direct), ("gateway", &self.via)] {
            let response = self
                .client
                .post(&target.url)
                .header(header::AUTHORIZATION, &target.auth)
                .header(header::CONTENT_TYPE, "application/json")
                .body(target.body.clone())
                .send()
                .await?;
            let status = response.status();
            let text = response.text().await?;
            ensure!(status.is_success(), "{name}: HTTP {status}: {text}");
            let (content, usage) = if target.stream {
                let mut content = String::new();
                let mut usage = Value::Null;
                for data in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
                    if data == "[DONE]" {
                        break;
                    }
                    let chunk: Value = serde_json::from_str(data)?;
                    if let Some(piece) = chunk["choices"][0]["delta"]["content"].as_str() {
                        content.push_str(piece);
                    }
                    if chunk["usage"].is_object() {
                        usage = chunk["usage"].clone();
                    }
                }
                (content, usage)
            } else {
                let v: Value = serde_json::from_str(&text)?;
                let content = v["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                (content, v["usage"].clone())
            };
            ensure!(
                content == REPLY.concat(),
                "{name}: unexpected reply `{content}` in {text}"
            );
            ensure!(
                usage == usage_json(),
                "{name}: unexpected usage {usage} in {text}"
            );
        }
        Ok(())
    }
}

fn write_raw(path: &Path, run: &Run) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut out = String::from("scheduled_ms,latency_ms,ok\n");
    for (at, latency, ok) in &run.samples {
        let _ = writeln!(
            out,
            "{:.3},{:.3},{}",
            at.as_secs_f64() * 1e3,
            latency.as_secs_f64() * 1e3,
            u8::from(*ok)
        );
    }
    std::fs::write(path, out)
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.3} ms"))
}

fn cell(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.decimals$}"))
}

fn diff(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(a? - b?)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "-".into())
}

/// One table row: the cells right-aligned under the header's widths, the path left-aligned.
fn row(out: &mut String, cells: &[String]) {
    const WIDTHS: [usize; 15] = [7, 8, 6, 6, 6, 10, 8, 8, 8, 8, 9, 7, 7, 6, 6];
    for (i, (c, w)) in cells.iter().zip(WIDTHS).enumerate() {
        let sep = if i == 0 { "" } else { " " };
        let _ = if i == 1 {
            write!(out, "{sep}{c:<w$}")
        } else {
            write!(out, "{sep}{c:>w$}")
        };
    }
    let _ = writeln!(out);
}

fn table(points: &[RatePoint]) -> String {
    let mut out = String::new();
    let head = |cells: [&str; 15]| cells.map(str::to_string);
    row(
        &mut out,
        &head([
            "rate/s",
            "path",
            "sent",
            "ok",
            "errors",
            "achieved/s",
            "p50",
            "p99",
            "p99.9",
            "max",
            "sustained",
            "gw CPU",
            "ledger",
            "others",
            "steal",
        ]),
    );
    row(
        &mut out,
        &head([
            "", "", "", "", "", "", "ms", "ms", "ms", "ms", "", "µs/req", "wait ms", "CPU %",
            "CPU %",
        ]),
    );
    for p in points {
        for (name, r) in [("direct", &p.direct), ("gateway", &p.gateway)] {
            let gateway_cpu = if name == "gateway" {
                cell(r.gateway_cpu_us_per_request(), 0)
            } else {
                String::new()
            };
            row(
                &mut out,
                &[
                    format!("{:.0}", r.rate),
                    name.to_string(),
                    r.sent.to_string(),
                    r.ok.to_string(),
                    r.error_count().to_string(),
                    format!("{:.1}", r.achieved()),
                    cell(r.quantile_ms(0.50), 3),
                    cell(r.quantile_ms(0.99), 3),
                    cell(r.quantile_ms(0.999), 3),
                    cell(r.max_ms(), 3),
                    (if r.sustained() { "yes" } else { "NO" }).to_string(),
                    gateway_cpu,
                    cell(r.record_wait_ms(), 3),
                    cell(r.cpu.others_pct, 0),
                    cell(r.cpu.steal_pct, 0),
                ],
            );
        }
        let (g, d) = (&p.gateway, &p.direct);
        let added = |q| cell(diff(g.quantile_ms(q), d.quantile_ms(q)), 3);
        let blank = String::new;
        row(
            &mut out,
            &[
                format!("{:.0}", g.rate),
                "added".into(),
                blank(),
                blank(),
                blank(),
                blank(),
                added(0.50),
                added(0.99),
                added(0.999),
            ],
        );
    }
    if points.iter().any(|p| !p.gateway.phases.is_empty()) {
        out.push_str(
            "\nmetering phases through the gateway (mean ms / the bucket bound under which 99% fall):\n",
        );
        for p in points.iter().filter(|p| !p.gateway.phases.is_empty()) {
            let _ = write!(out, "{:>7.0}", p.gateway.rate);
            for (name, h) in PHASES.iter().zip(&p.gateway.phases) {
                let _ = write!(
                    out,
                    "  {name} {} / p99 ≤ {}",
                    cell(h.mean_ms(), 3),
                    cell(h.quantile_bound_ms(0.99), 3)
                );
            }
            out.push('\n');
        }
    }
    out
}

async fn bench(opts: Options) -> anyhow::Result<()> {
    let tmp = match &opts.dir {
        Some(d) => tempfile::Builder::new()
            .prefix("overhead-bench-")
            .tempdir_in(d)?,
        None => tempfile::Builder::new()
            .prefix("overhead-bench-")
            .tempdir()?,
    };
    let counters = Arc::new(UpstreamCounters::default());
    let upstream = start_upstream(counters.clone())?;
    let mut gateway = Gateway::start(&opts, tmp.path(), upstream)?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(usize::MAX)
        .pool_idle_timeout(Duration::from_secs(300))
        .timeout(REQUEST_TIMEOUT)
        .tcp_nodelay(true)
        .build()?;
    gateway.wait_ready(&client).await?;
    let key = if opts.metering {
        gateway.issue_key(&client).await?
    } else {
        STATIC_KEY.to_string()
    };
    let body = request_body(opts.stream);
    let direct = Arc::new(Target {
        url: format!("http://{upstream}/v1/chat/completions"),
        auth: format!("Bearer {UPSTREAM_KEY}"),
        body: body.clone(),
        stream: opts.stream,
    });
    let via = Arc::new(Target {
        url: format!("{}/v1/chat/completions", gateway.base),
        auth: format!("Bearer {key}"),
        body,
        stream: opts.stream,
    });
    let mut b = Bench {
        opts: opts.clone(),
        client,
        gateway,
        direct,
        via,
        counters,
        gateway_sent: 0,
        gateway_ok: 0,
        gateway_errors: 0,
        upstream_via_gateway: 0,
    };
    b.check().await?;
    b.gateway_sent += 1;
    b.gateway_ok += 1;
    b.upstream_via_gateway += 1;

    let mode = if opts.stream {
        "streamed"
    } else {
        "non-streamed"
    };
    let metering = if opts.metering {
        "metering on (SQLite ledger, database key lookups)"
    } else {
        "metering off (--no-database, static key)"
    };
    let header = format!(
        "gateway overhead: {mode} chat completions ({} tokens), {metering}, gateway RUST_LOG={}, \
         {} s per run after {} s warm-up, {} CPUs",
        REPLY.len(),
        opts.gateway_log,
        opts.duration.as_secs_f64(),
        opts.warmup.as_secs_f64(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    eprintln!("{header}");
    let load_before = loadavg();
    eprintln!("load average before: {load_before}");

    let mut points = Vec::new();
    for &rate in &opts.rates {
        points.push(b.rate_point(rate).await?);
    }
    let all_sustained = points.iter().all(|p| p.gateway.sustained());
    if opts.search && all_sustained {
        // Up by `step` until the gateway breaks...
        let mut good = opts.rates.last().copied().unwrap_or(1000.0);
        let mut bad = None;
        loop {
            // Round to a multiple of 250 per second above 1,000.
            let mut rate = good * opts.step;
            if rate > 1000.0 {
                rate = (rate / 250.0).round() * 250.0;
            }
            if rate > opts.max_rate {
                break;
            }
            match b.probe(rate, &mut points).await? {
                None => break,
                Some(false) => {
                    bad = Some(rate);
                    break;
                }
                Some(true) => good = rate,
            }
        }
        // ...then halve the gap between the last good and the first bad rate.
        if let Some(mut bad) = bad {
            for _ in 0..opts.refine {
                let rate = ((good + bad) / 2.0 / 50.0).round() * 50.0;
                if rate <= good || rate >= bad {
                    break;
                }
                match b.probe(rate, &mut points).await? {
                    None => break,
                    Some(true) => good = rate,
                    Some(false) => bad = rate,
                }
            }
        }
        points.sort_by(|a, b| a.gateway.rate.total_cmp(&b.gateway.rate));
    }
    let load_after = loadavg();

    // Metering: one record per request the gateway answered.
    let mut metering_json = Value::Null;
    let mut metering_line = String::from("metering: off");
    if opts.metering {
        b.gateway.wait_ledger(&b.client).await?;
        let (records, completed) = b.gateway.count_records(&b.client).await?;
        // Without errors: one completed record per request. A request that failed or timed out
        // may have a record of another status, or none (refused before reaching the model).
        let ok = if b.gateway_errors == 0 {
            records == b.gateway_sent && completed == b.gateway_ok
        } else {
            completed >= b.gateway_ok
        };
        metering_line = format!(
            "metering: {records} usage records in the ledger ({completed} completed) for {} \
             requests sent through the gateway ({} answered 200, {} errors, warm-ups and the \
             initial check included); the upstream saw {} requests from the gateway: {}",
            b.gateway_sent,
            b.gateway_ok,
            b.gateway_errors,
            b.upstream_via_gateway,
            if ok { "OK" } else { "MISMATCH" }
        );
        metering_json = json!({
            "records": records,
            "completed_records": completed,
            "gateway_requests": b.gateway_sent,
            "gateway_ok": b.gateway_ok,
            "gateway_errors": b.gateway_errors,
            "upstream_requests_via_gateway": b.upstream_via_gateway,
            "ok": ok,
        });
    }

    let best = |f: fn(&RatePoint) -> &Run| {
        points
            .iter()
            .map(f)
            .take_while(|r| r.sustained())
            .map(|r| r.rate)
            .last()
    };
    let best_gateway = best(|p| &p.gateway);
    let best_direct = best(|p| &p.direct);
    let at_1000 = points
        .iter()
        .find(|p| (p.gateway.rate - 1000.0).abs() < 0.5);
    let goal = at_1000.map(|p| {
        let added = diff(p.gateway.quantile_ms(0.99), p.direct.quantile_ms(0.99));
        let met = p.gateway.sustained() && added.is_some_and(|a| a < 1.0);
        (added, met)
    });

    println!("{header}");
    println!("load average before {load_before}, after {load_after}");
    println!();
    print!("{}", table(&points));
    println!();
    println!(
        "added = gateway − direct at each percentile. sustained = no errors and ≥ {:.0}% of the \
         rate achieved. gw CPU = gateway process CPU per request; ledger wait = mean time a \
         request waited for its durable ledger write; others = CPU used by other processes, \
         steal = CPU the hypervisor took (100% = one core).",
        SUSTAIN_SHARE * 100.0
    );
    let all_direct = points.iter().all(|p| p.direct.sustained());
    let all_gateway = points.iter().all(|p| p.gateway.sustained());
    let rate_text = |r: Option<f64>, all: bool| match r {
        None => "none".to_string(),
        Some(r) if all => format!("{r:.0}/s or more (the highest rate tried)"),
        Some(r) => format!("{r:.0}/s"),
    };
    println!(
        "highest rate sustained without errors: through the gateway {}; direct {}{}",
        rate_text(best_gateway, all_gateway),
        rate_text(best_direct, all_direct),
        if all_direct {
            ""
        } else {
            " (the direct path broke too: the load generator or the upstream is the limit there)"
        }
    );
    match goal {
        Some((added, met)) => println!(
            "goal p99 added < 1 ms at 1000/s: {} (added p99 {})",
            if met { "MET" } else { "NOT MET" },
            ms(added)
        ),
        None => println!("goal p99 added < 1 ms at 1000/s: not measured (no 1000/s rate)"),
    }
    println!("{metering_line}");

    if let Some(path) = &opts.json {
        let out = json!({
            "mode": mode,
            "metering": opts.metering,
            "gateway_log": opts.gateway_log,
            "duration_secs": opts.duration.as_secs_f64(),
            "warmup_secs": opts.warmup.as_secs_f64(),
            "load_average_before": load_before,
            "load_average_after": load_after,
            "rates": points.iter().map(|p| json!({
                "rate": p.gateway.rate,
                "direct": p.direct.to_json(),
                "gateway": p.gateway.to_json(),
                "added_p50_ms": diff(p.gateway.quantile_ms(0.50), p.direct.quantile_ms(0.50)),
                "added_p99_ms": diff(p.gateway.quantile_ms(0.99), p.direct.quantile_ms(0.99)),
                "added_p999_ms": diff(p.gateway.quantile_ms(0.999), p.direct.quantile_ms(0.999)),
            })).collect::<Vec<_>>(),
            "highest_sustained_gateway": best_gateway,
            "highest_sustained_direct": best_direct,
            "metering_check": metering_json,
        });
        std::fs::write(path, serde_json::to_string_pretty(&out)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if metering_json["ok"] == false {
        bail!("the ledger does not hold one record per gateway request");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let opts = Options::parse()?;
    // The load generator's own runtime: one thread, so it takes at most one core from the
    // gateway and the upstream.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(bench(opts))
}

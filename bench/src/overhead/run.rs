//! The benchmark: both paths at each rate, the search for the highest sustained rate, the
//! ledger check, and the printed results.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use reqwest::header;
use serde_json::{json, Value};
use tollgate_testkit::{Behaviour, FakeUpstream, Running};

use super::conns::{self, Held};
use super::cpu::{cpu_between, CpuSnapshot};
use super::gateway::{phases, Gateway, PhaseHistogram};
use super::load::{request_body, run_load, Run, Target};
use super::report::{diff, loadavg, ms, table, write_raw};
use super::{reply, Options, REQUEST_TIMEOUT, SETTLE, STATIC_KEY, SUSTAIN_SHARE, UPSTREAM_KEY};

pub(super) struct Bench {
    pub(super) opts: Options,
    pub(super) client: reqwest::Client,
    pub(super) gateway: Gateway,
    /// More gateways sharing its PostgreSQL ledger (`--replicas`).
    pub(super) replicas: Vec<Gateway>,
    direct: Arc<Target>,
    pub(super) via: Arc<Target>,
    /// Chat requests the upstream received, to check the gateway makes one attempt per
    /// request.
    pub(super) upstream_hits: Arc<AtomicU64>,
    /// Requests sent through the gateway, answered 200, and failed, warm-ups included.
    pub(super) gateway_sent: u64,
    pub(super) gateway_ok: u64,
    pub(super) gateway_errors: u64,
    /// Upstream requests made by the gateway.
    pub(super) upstream_via_gateway: u64,
}

/// One rate: both paths.
pub struct RatePoint {
    pub direct: Run,
    pub gateway: Run,
}

impl Bench {
    /// A warm-up (opens the connections), then a measured run of one path.
    async fn measure(&mut self, rate: f64, through_gateway: bool) -> anyhow::Result<Run> {
        let target = if through_gateway {
            self.via.clone()
        } else {
            self.direct.clone()
        };
        self.wait_ledgers().await?;
        tokio::time::sleep(SETTLE).await;
        let upstream_before = self.upstream_hits.load(Ordering::Relaxed);
        if !self.opts.warmup.is_zero() {
            let warm = run_load(&self.client, &target, rate, self.opts.warmup).await?;
            if through_gateway {
                self.gateway_sent += warm.sent;
                self.gateway_ok += warm.ok;
                self.gateway_errors += warm.error_count();
            }
        }
        // A scrape the gateway refuses (past its capacity) is an error of the run, which then
        // is not sustained: the report says where the gateway broke and why.
        let phases_before = self.scrape().await;
        let before = CpuSnapshot::take(&self.pids());
        let mut run = run_load(&self.client, &target, rate, self.opts.duration).await?;
        let after = CpuSnapshot::take(&self.pids());
        run.cpu = cpu_between(before, after);
        if through_gateway {
            self.gateway_sent += run.sent;
            self.gateway_ok += run.ok;
            self.gateway_errors += run.error_count();
            self.upstream_via_gateway +=
                self.upstream_hits.load(Ordering::Relaxed) - upstream_before;
            match (phases_before, self.scrape().await) {
                (Ok(before), Ok(after)) => {
                    run.phases = after.iter().zip(&before).map(|(a, b)| a.since(b)).collect();
                }
                (Err(e), _) | (_, Err(e)) => run.errors.push((e, 1)),
            }
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

    /// The metering phases' histograms from one scrape of `/metrics`, or why there are none.
    async fn scrape(&self) -> Result<Vec<PhaseHistogram>, String> {
        match self.gateway.metrics(&self.client).await {
            Ok(text) => Ok(phases(&text)),
            Err(e) => Err(format!("scrape of /metrics failed: {e:#}")),
        }
    }

    pub(super) async fn rate_point(&mut self, rate: f64) -> anyhow::Result<RatePoint> {
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
        let expected = reply();
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
                content == expected.text(),
                "{name}: unexpected reply `{content}` in {text}"
            );
            ensure!(
                expected.usage.as_ref().map(token_counts) == Some(token_counts(&usage)),
                "{name}: unexpected usage {usage} in {text}"
            );
        }
        Ok(())
    }
}

/// Where and why the gateway broke: the first rate it did not sustain, what it achieved there
/// and its most frequent errors (503s it shed past its capacity, refused connections, timeouts,
/// a refused scrape).
pub(super) fn broke_line(run: &Run) -> String {
    let mut errors = run.errors.clone();
    errors.sort_by_key(|e| std::cmp::Reverse(e.1));
    let why: Vec<String> = errors
        .iter()
        .take(3)
        .map(|(message, n)| format!("{n} × {message}"))
        .collect();
    format!(
        "the gateway broke at {:.0}/s: {:.0}/s answered 200, {} errors{}{}",
        run.rate,
        run.achieved(),
        run.error_count(),
        if why.is_empty() { "" } else { ": " },
        why.join("; ")
    )
}

/// The token counts of a `usage` object, without the details the gateway adds
/// (`prompt_tokens_details`).
fn token_counts(usage: &Value) -> [&Value; 3] {
    ["prompt_tokens", "completion_tokens", "total_tokens"].map(|k| &usage[k])
}

/// Runs the benchmark and prints its results; an error when the ledger does not hold one record
/// per request the gateway answered. With `--baseline`, runs the two binaries alternately
/// instead ([`super::compare`]).
pub async fn run(opts: Options) -> anyhow::Result<()> {
    let binary = match &opts.binary {
        Some(b) => b.clone(),
        None => default_binary()?,
    };
    if let Some(baseline) = opts.baseline.clone() {
        return super::compare::compare(&opts, &binary, &baseline).await;
    }
    if opts.replicas > 1 {
        return super::replicas::run(&opts, &binary).await;
    }
    let header = header(&opts);
    let (points, metering, (load_before, load_after), held) =
        measure_binary(&opts, &binary).await?;
    let results = Results {
        header,
        load_before,
        load_after,
        best_gateway: best(&points, |p| &p.gateway),
        best_direct: best(&points, |p| &p.direct),
        points,
        metering,
        held,
    };
    results.print();
    if let Some(path) = &opts.json {
        let out = results.to_json(&opts);
        std::fs::write(path, serde_json::to_string_pretty(&out)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if results.metering.as_ref().is_some_and(|m| !m.ok) {
        bail!("the ledger does not hold one record per gateway request");
    }
    if let Some(n) = results
        .held
        .as_ref()
        .map(Held::error_count)
        .filter(|&n| n > 0)
    {
        bail!("{n} held connections or streams failed");
    }
    Ok(())
}

/// The rates of `opts` through a gateway started from `binary`, with the ledger check, the
/// load averages before and after, and (`--idle-connections`, `--slow-streams`) the held phase.
pub(super) async fn measure_binary(opts: &Options, binary: &Path) -> anyhow::Result<Measured> {
    // Dropped in reverse order: the gateway, then the upstream, then the directory.
    let tmp = match &opts.dir {
        Some(d) => tempfile::Builder::new()
            .prefix("overhead-bench-")
            .tempdir_in(d)?,
        None => tempfile::Builder::new()
            .prefix("overhead-bench-")
            .tempdir()?,
    };
    let upstream = FakeUpstream::new(Behaviour::Answers(reply()))
        .with_api_key(UPSTREAM_KEY)
        .spawn_thread()
        .context("cannot start the upstream")?;
    let slow = conns::slow_upstream(opts)?;
    let extra = conns::gateway_config(opts, slow.as_ref().map(|s| s.addr));
    let mut b = Bench::start(opts, binary, tmp.path(), &upstream, &extra).await?;
    b.add_replicas(binary, tmp.path(), &upstream, &extra)
        .await?;
    b.check().await?;
    b.gateway_sent += 1;
    b.gateway_ok += 1;
    b.upstream_via_gateway += 1;
    eprintln!("{}", header(opts));
    eprintln!("binary: {}", binary.display());
    let load_before = loadavg();
    eprintln!("load average before: {load_before}");
    let points = b.sweep().await?;
    let held = b.held(slow.as_ref()).await?;
    let load_after = loadavg();
    let metering = if opts.metering() {
        // A ledger that cannot be read is a failed check, reported with the rates measured.
        Some(b.metering_check().await.unwrap_or_else(|e| MeteringCheck {
            ok: false,
            line: format!("metering: the ledger could not be read: {e:#}"),
            json: json!({"ok": false, "error": format!("{e:#}")}),
        }))
    } else {
        None
    };
    Ok((points, metering, (load_before, load_after), held))
}

/// The points, the ledger check, the load averages before and after, and the held phase.
type Measured = (
    Vec<RatePoint>,
    Option<MeteringCheck>,
    (String, String),
    Option<Held>,
);

impl Bench {
    /// Starts `binary` in front of `upstream` (its files in `dir`), waits until it is ready
    /// and issues the key the runs use.
    async fn start(
        opts: &Options,
        binary: &Path,
        dir: &Path,
        upstream: &Running,
        extra_config: &str,
    ) -> anyhow::Result<Self> {
        let mut gateway = Gateway::start(opts, binary, dir, upstream.addr, extra_config)?;
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(usize::MAX)
            .pool_idle_timeout(Duration::from_secs(300))
            .timeout(REQUEST_TIMEOUT)
            .tcp_nodelay(true)
            .build()?;
        gateway.wait_ready(&client).await?;
        let key = if opts.metering() {
            gateway.issue_key(&client, opts.postgres.is_some()).await?
        } else {
            STATIC_KEY.to_string()
        };
        let body = request_body(opts.stream);
        let direct = Arc::new(Target {
            url: format!("{}/v1/chat/completions", upstream.base_url()),
            auth: format!("Bearer {UPSTREAM_KEY}"),
            body: body.clone(),
            stream: opts.stream,
            others: Vec::new(),
        });
        let via = Arc::new(Target {
            url: format!("{}/v1/chat/completions", gateway.base),
            auth: format!("Bearer {key}"),
            body,
            stream: opts.stream,
            others: Vec::new(),
        });
        Ok(Self {
            opts: opts.clone(),
            client,
            gateway,
            replicas: Vec::new(),
            direct,
            via,
            upstream_hits: upstream.hit_counter(),
            gateway_sent: 0,
            gateway_ok: 0,
            gateway_errors: 0,
            upstream_via_gateway: 0,
        })
    }

    /// Every rate asked for, then (with the search on, and when the gateway sustained them
    /// all) the search for the highest rate it sustains; the points in rate order.
    async fn sweep(&mut self) -> anyhow::Result<Vec<RatePoint>> {
        let mut points = Vec::new();
        for &rate in &self.opts.rates.clone() {
            points.push(self.rate_point(rate).await?);
        }
        let all_sustained = points.iter().all(|p| p.gateway.sustained());
        if self.opts.search() && all_sustained {
            self.search(&mut points).await?;
            points.sort_by(|a, b| a.gateway.rate.total_cmp(&b.gateway.rate));
        }
        Ok(points)
    }

    /// Up by `step` from the last rate until the gateway breaks, then halves the gap between
    /// the last good and the first bad rate.
    async fn search(&mut self, points: &mut Vec<RatePoint>) -> anyhow::Result<()> {
        let opts = self.opts.clone();
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
            match self.probe(rate, points).await? {
                None => break,
                Some(false) => {
                    bad = Some(rate);
                    break;
                }
                Some(true) => good = rate,
            }
        }
        if let Some(mut bad) = bad {
            for _ in 0..opts.refine {
                let rate = ((good + bad) / 2.0 / 50.0).round() * 50.0;
                if rate <= good || rate >= bad {
                    break;
                }
                match self.probe(rate, points).await? {
                    None => break,
                    Some(true) => good = rate,
                    Some(false) => bad = rate,
                }
            }
        }
        Ok(())
    }

    /// Metering: one record per request the gateway answered.
    async fn metering_check(&mut self) -> anyhow::Result<MeteringCheck> {
        self.wait_ledgers().await?;
        let (records, completed) = self.gateway.count_records(&self.client).await?;
        // Without errors: one completed record per request. A request that failed or timed out
        // may have a record of another status, or none (refused before reaching the model).
        let ok = if self.gateway_errors == 0 {
            records == self.gateway_sent && completed == self.gateway_ok
        } else {
            completed >= self.gateway_ok
        };
        let line = format!(
            "metering: {records} usage records in the ledger ({completed} completed) for {} \
             requests sent through the gateway ({} answered 200, {} errors, warm-ups and the \
             initial check included); the upstream saw {} requests from the gateway: {}",
            self.gateway_sent,
            self.gateway_ok,
            self.gateway_errors,
            self.upstream_via_gateway,
            if ok { "OK" } else { "MISMATCH" }
        );
        let json = json!({
            "records": records,
            "completed_records": completed,
            "gateway_requests": self.gateway_sent,
            "gateway_ok": self.gateway_ok,
            "gateway_errors": self.gateway_errors,
            "upstream_requests_via_gateway": self.upstream_via_gateway,
            "ok": ok,
        });
        Ok(MeteringCheck { ok, line, json })
    }
}

/// Whether the ledger holds one record per request the gateway answered, as a line and as
/// JSON.
pub(super) struct MeteringCheck {
    pub(super) ok: bool,
    pub(super) line: String,
    pub(super) json: Value,
}

/// What the benchmark prints and writes.
struct Results {
    header: String,
    load_before: String,
    load_after: String,
    points: Vec<RatePoint>,
    best_gateway: Option<f64>,
    best_direct: Option<f64>,
    /// `None` with metering off.
    metering: Option<MeteringCheck>,
    /// With `--idle-connections` or `--slow-streams`.
    held: Option<Held>,
}

/// `streamed` or `non-streamed`.
pub(super) fn mode(opts: &Options) -> &'static str {
    if opts.stream {
        "streamed"
    } else {
        "non-streamed"
    }
}

/// The line that says what was measured, and how.
pub(super) fn header(opts: &Options) -> String {
    let metering = if opts.metering() {
        super::replicas::metering_text(opts)
    } else {
        "metering off (--no-database, static key)".into()
    };
    format!(
        "gateway overhead: {} chat completions ({} tokens), {metering}, gateway RUST_LOG={}, \
         {} s per run after {} s warm-up, {} CPUs",
        mode(opts),
        reply().pieces.len(),
        opts.gateway_log,
        opts.duration.as_secs_f64(),
        opts.warmup.as_secs_f64(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    )
}

/// The highest rate of the sustained run of points from the lowest rate up.
pub(super) fn best(points: &[RatePoint], f: fn(&RatePoint) -> &Run) -> Option<f64> {
    points
        .iter()
        .map(f)
        .take_while(|r| r.sustained())
        .map(|r| r.rate)
        .last()
}

impl Results {
    fn print(&self) {
        let points = &self.points;
        println!("{}", self.header);
        println!(
            "load average before {}, after {}",
            self.load_before, self.load_after
        );
        println!();
        print!("{}", table(points));
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
            rate_text(self.best_gateway, all_gateway),
            rate_text(self.best_direct, all_direct),
            if all_direct {
                ""
            } else {
                " (the direct path broke too: the load generator or the upstream is the limit there)"
            }
        );
        if let Some(broke) = points.iter().find(|p| !p.gateway.sustained()) {
            println!("{}", broke_line(&broke.gateway));
        }
        match &self.metering {
            Some(m) => println!("{}", m.line),
            None => println!("metering: off"),
        }
        if let Some(h) = &self.held {
            print!("{}", h.text(points));
        }
    }

    fn to_json(&self, opts: &Options) -> Value {
        json!({
            "mode": mode(opts),
            "metering": opts.metering(),
            "gateway_log": opts.gateway_log,
            "duration_secs": opts.duration.as_secs_f64(),
            "warmup_secs": opts.warmup.as_secs_f64(),
            "load_average_before": self.load_before,
            "load_average_after": self.load_after,
            "rates": self.points.iter().map(|p| json!({
                "rate": p.gateway.rate,
                "direct": p.direct.to_json(),
                "gateway": p.gateway.to_json(),
                "added_p50_ms": diff(p.gateway.quantile_ms(0.50), p.direct.quantile_ms(0.50)),
                "added_p99_ms": diff(p.gateway.quantile_ms(0.99), p.direct.quantile_ms(0.99)),
                "added_p999_ms": diff(p.gateway.quantile_ms(0.999), p.direct.quantile_ms(0.999)),
            })).collect::<Vec<_>>(),
            "highest_sustained_gateway": self.best_gateway,
            "highest_sustained_direct": self.best_direct,
            "broke": self.points.iter().find(|p| !p.gateway.sustained()).map(|p| broke_line(&p.gateway)),
            "metering_check": self.metering.as_ref().map_or(Value::Null, |m| m.json.clone()),
            "held": self.held.as_ref().map_or(Value::Null, Held::to_json),
            "provenance": crate::provenance::provenance(),
        })
    }
}

/// The `tollgate` binary next to this benchmark's executable: both are built into the same
/// `target/<profile>/`.
fn default_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find this executable")?;
    Ok(exe
        .parent()
        .map_or_else(|| PathBuf::from("tollgate"), |d| d.join("tollgate")))
}

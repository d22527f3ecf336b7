//! The benchmark: both paths at each rate, the search for the highest sustained rate, the
//! ledger check, and the printed results.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use reqwest::header;
use serde_json::{json, Value};
use tollgate_testkit::{Behaviour, FakeUpstream};

use super::cpu::{cpu_between, CpuSnapshot};
use super::gateway::{phases, Gateway};
use super::load::{request_body, run_load, Run, Target};
use super::report::{diff, loadavg, ms, table, write_raw};
use super::{reply, Options, REQUEST_TIMEOUT, SETTLE, STATIC_KEY, SUSTAIN_SHARE, UPSTREAM_KEY};

struct Bench {
    opts: Options,
    client: reqwest::Client,
    gateway: Gateway,
    direct: Arc<Target>,
    via: Arc<Target>,
    /// Chat requests the upstream received, to check the gateway makes one attempt per
    /// request.
    upstream_hits: Arc<AtomicU64>,
    /// Requests sent through the gateway, answered 200, and failed, warm-ups included.
    gateway_sent: u64,
    gateway_ok: u64,
    gateway_errors: u64,
    /// Upstream requests made by the gateway.
    upstream_via_gateway: u64,
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
        if self.opts.metering() {
            self.gateway.wait_ledger(&self.client).await?;
        }
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
                self.upstream_hits.load(Ordering::Relaxed) - upstream_before;
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

/// The token counts of a `usage` object, without the details the gateway adds
/// (`prompt_tokens_details`).
fn token_counts(usage: &Value) -> [&Value; 3] {
    ["prompt_tokens", "completion_tokens", "total_tokens"].map(|k| &usage[k])
}

/// Runs the benchmark and prints its results; an error when the ledger does not hold one record
/// per request the gateway answered.
pub async fn run(opts: Options) -> anyhow::Result<()> {
    let binary = match &opts.binary {
        Some(b) => b.clone(),
        None => default_binary()?,
    };
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
    let mut gateway = Gateway::start(&opts, &binary, tmp.path(), upstream.addr)?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(usize::MAX)
        .pool_idle_timeout(Duration::from_secs(300))
        .timeout(REQUEST_TIMEOUT)
        .tcp_nodelay(true)
        .build()?;
    gateway.wait_ready(&client).await?;
    let key = if opts.metering() {
        gateway.issue_key(&client).await?
    } else {
        STATIC_KEY.to_string()
    };
    let body = request_body(opts.stream);
    let direct = Arc::new(Target {
        url: format!("{}/v1/chat/completions", upstream.base_url()),
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
        upstream_hits: upstream.hit_counter(),
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
    let metering = if opts.metering() {
        "metering on (SQLite ledger, database key lookups)"
    } else {
        "metering off (--no-database, static key)"
    };
    let header = format!(
        "gateway overhead: {mode} chat completions ({} tokens), {metering}, gateway RUST_LOG={}, \
         {} s per run after {} s warm-up, {} CPUs",
        reply().pieces.len(),
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
    if opts.search() && all_sustained {
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
    if opts.metering() {
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
    println!("{metering_line}");

    if let Some(path) = &opts.json {
        let out = json!({
            "mode": mode,
            "metering": opts.metering(),
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

/// The `tollgate` binary next to this benchmark's executable: both are built into the same
/// `target/<profile>/`.
fn default_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find this executable")?;
    Ok(exe
        .parent()
        .map_or_else(|| PathBuf::from("tollgate"), |d| d.join("tollgate")))
}

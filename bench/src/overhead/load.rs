//! The open-loop load generator: requests leave on schedule whatever the responses do, and each
//! is timed from its scheduled send, so a stall shows in the latencies (no coordinated
//! omission).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::header;
use serde_json::{json, Value};

use super::cpu::CpuUse;
use super::gateway::{PhaseHistogram, PHASES};
use super::{MODEL, SUSTAIN_SHARE};

/// Where one path's requests go.
pub struct Target {
    pub url: String,
    /// The same URL on other replicas: requests go to `url` and these in turn.
    pub others: Vec<String>,
    /// The `Authorization` header.
    pub auth: String,
    pub body: Bytes,
    pub stream: bool,
}

impl Target {
    /// The URL of the `n`th request: `url` and `others` in turn.
    pub fn url_for(&self, n: u64) -> &str {
        let turn = (n % (self.others.len() as u64 + 1)) as usize;
        turn.checked_sub(1)
            .and_then(|i| self.others.get(i))
            .unwrap_or(&self.url)
    }
}

/// A small chat completion: non-streamed, or streamed with a final usage chunk.
pub fn request_body(stream: bool) -> Bytes {
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
    n: u64,
    scheduled: Instant,
) -> Result<Duration, String> {
    let response = client
        .post(target.url_for(n))
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
pub struct Run {
    pub rate: f64,
    pub sent: u64,
    pub ok: u64,
    /// Error messages and how often each occurred.
    pub errors: Vec<(String, u64)>,
    /// Successful requests' latencies, sorted.
    pub latencies: Vec<Duration>,
    /// Every request in send order: scheduled send (from the run's start), latency, success.
    pub samples: Vec<(Duration, Duration, bool)>,
    /// From the first scheduled send to the last response.
    pub span: Duration,
    /// How late the pacer sent its latest request (the load generator falling behind).
    pub pacer_late_max: Duration,
    pub cpu: CpuUse,
    /// The metering phases' histograms over the run, in [`PHASES`] order (gateway runs
    /// with metering only).
    pub phases: Vec<PhaseHistogram>,
}

impl Run {
    pub fn error_count(&self) -> u64 {
        self.errors.iter().map(|(_, n)| n).sum()
    }

    pub fn achieved(&self) -> f64 {
        self.ok as f64 / self.span.as_secs_f64().max(1e-9)
    }

    pub fn sustained(&self) -> bool {
        self.error_count() == 0 && self.achieved() >= SUSTAIN_SHARE * self.rate
    }

    /// The `q` quantile in milliseconds (nearest rank).
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        let n = self.latencies.len();
        if n == 0 {
            return None;
        }
        let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
        Some(self.latencies[rank - 1].as_secs_f64() * 1e3)
    }

    pub fn max_ms(&self) -> Option<f64> {
        self.latencies.last().map(|d| d.as_secs_f64() * 1e3)
    }

    /// Mean wait for the durable ledger write, per request that waited.
    pub fn record_wait_ms(&self) -> Option<f64> {
        self.phases.get(2)?.mean_ms()
    }

    pub fn gateway_cpu_us_per_request(&self) -> Option<f64> {
        let cpu = self.cpu.gateway?;
        (self.sent > 0).then(|| cpu * 1e6 / self.sent as f64)
    }

    pub fn to_json(&self) -> Value {
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
pub async fn run_load(
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
                    let outcome = one_request(&client, &target, i, at).await;
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

//! The gateway under test, as a child process, and what the benchmark reads from its
//! `/metrics`.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use reqwest::header;
use serde_json::{json, Value};

use super::{Options, ADMIN_TOKEN, CUSTOMER, MODEL, STATIC_KEY, UPSTREAM_KEY, UPSTREAM_KEY_ENV};

/// The gateway child process; killed when dropped (also on a panic), before the temporary
/// directory it writes in goes away.
pub struct Gateway {
    child: Child,
    /// `http://ADDR`.
    pub base: String,
    log: PathBuf,
    /// The customer of the issued key: unique on a shared PostgreSQL ledger, whose records the
    /// ledger check counts.
    customer: String,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gateway {
    /// Starts `binary` serving the upstream at `upstream` as the model [`MODEL`], its files in
    /// `dir`; `extra_config` is appended to its `models.toml`.
    pub fn start(
        opts: &Options,
        binary: &Path,
        dir: &Path,
        upstream: SocketAddr,
        extra_config: &str,
    ) -> anyhow::Result<Self> {
        ensure!(
            binary.exists(),
            "{} not found: build it with `cargo build --release --bin tollgate` (same \
             CARGO_TARGET_DIR), or pass --binary",
            binary.display()
        );
        // No `source`: with one, the gateway would load the model's tokenizer from it to count
        // what streamed by; the upstream reports its usage, and the benchmark has no model.
        let config = dir.join("models.toml");
        std::fs::write(
            &config,
            format!(
                "[models.\"{MODEL}\"]\n\
                 backend = {{ type = \"http\", urls = [\"http://{upstream}\"], api_key_env = \"{UPSTREAM_KEY_ENV}\" }}\n\
                 price = {{ input_per_mtok = \"0.15\", output_per_mtok = \"0.60\" }}\n\
                 {extra_config}"
            ),
        )?;
        // A free port for the gateway (released just before it binds it).
        let addr = StdListener::bind("127.0.0.1:0")?.local_addr()?;
        let log = dir.join("gateway.log");
        let mut cmd = Command::new(binary);
        cmd.arg("serve")
            .arg("--config")
            .arg(&config)
            .arg("--listen")
            .arg(addr.to_string());
        if let Some(url) = opts.postgres.as_ref().filter(|_| opts.metering()) {
            cmd.arg("--database").arg(url);
        }
        if opts.metering() {
            if opts.postgres.is_none() {
                cmd.arg("--database").arg(dir.join("ledger.db"));
            }
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
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let customer = match &opts.postgres {
            Some(_) => format!("{CUSTOMER}-{}", chrono::Utc::now().timestamp_micros()),
            None => CUSTOMER.to_string(),
        };
        Ok(Self {
            child,
            base: format!("http://{addr}"),
            log,
            customer,
        })
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    pub async fn wait_ready(&mut self, client: &reqwest::Client) -> anyhow::Result<()> {
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
    pub async fn issue_key(
        &self,
        client: &reqwest::Client,
        shared_limits: bool,
    ) -> anyhow::Result<String> {
        // POST `body` to the admin API's `path`, for `what`: the successful response.
        let admin_post = |path: String, body: Value, what: &'static str| async move {
            let r = client
                .post(format!("{}/admin/v1{path}", self.base))
                .header(header::AUTHORIZATION, format!("Bearer {ADMIN_TOKEN}"))
                .json(&body)
                .send()
                .await?;
            ensure!(r.status().is_success(), "{what}: {}", r.text().await?);
            anyhow::Ok(r)
        };
        let customer = json!({"id": self.customer, "name": "Overhead benchmark"});
        admin_post("/customers".into(), customer, "creating the customer").await?;
        // On PostgreSQL, limits the load never reaches, so each request takes its share of the
        // limits shared by the replicas.
        let key = if shared_limits {
            json!({"name": "overhead-bench", "rpm": 100_000_000, "tpm": 100_000_000_000u64})
        } else {
            json!({"name": "overhead-bench"})
        };
        let path = format!("/customers/{}/keys", self.customer);
        let body: Value = admin_post(path, key, "creating the key")
            .await?
            .json()
            .await?;
        body["key"]
            .as_str()
            .map(str::to_string)
            .context("the key response has no `key`")
    }

    /// The gateway's Prometheus text.
    pub async fn metrics(&self, client: &reqwest::Client) -> anyhow::Result<String> {
        metrics_at(client, &self.base).await
    }

    /// Waits until the ledger has written every record it accepted to the database, so a run
    /// does not pay for the previous run's backlog.
    pub async fn wait_ledger(&self, client: &reqwest::Client) -> anyhow::Result<()> {
        wait_ledger_at(client, &self.base, LEDGER_WAIT).await
    }

    /// Usage records in the ledger: (all, completed). Reads every record page by page.
    pub async fn count_records(&self, client: &reqwest::Client) -> anyhow::Result<(u64, u64)> {
        let (mut all, mut completed) = (0, 0);
        let mut after = String::new();
        loop {
            let page: Value = client
                .get(format!("{}/admin/v1/usage/records", self.base))
                .query(&[
                    ("limit", "10000"),
                    ("after", after.as_str()),
                    ("customer_id", self.customer.as_str()),
                ])
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

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// How long the ledger may take to catch up (and a gateway past its capacity to answer its
/// `/metrics` again).
const LEDGER_WAIT: Duration = Duration::from_secs(120);

/// The Prometheus text of the gateway at `base`.
async fn metrics_at(client: &reqwest::Client, base: &str) -> anyhow::Result<String> {
    Ok(client
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?)
}

/// Waits, for at most `within`, until the gateway at `base` has no ledger record pending. A
/// scrape that fails is tried again: after a run past its capacity the gateway may refuse or
/// reset connections for a while (its connection cap is full of the load's connections), and
/// the benchmark must still read its ledger and report where it broke.
async fn wait_ledger_at(
    client: &reqwest::Client,
    base: &str,
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        match metrics_at(client, base).await {
            Ok(text) => match metric(&text, "tollgate_ledger_pending_records") {
                Some(p) if p > 0.0 && Instant::now() < deadline => {}
                _ => return Ok(()),
            },
            Err(e) if Instant::now() >= deadline => {
                return Err(e.context("the gateway's /metrics did not answer"))
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The value of an unlabelled metric, or of the first series whose name and labels start with
/// `series`.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let rest = l.strip_prefix(series)?;
        let value = rest.rsplit(' ').next()?;
        value.parse().ok()
    })
}

/// The metering phases the gateway times (`tollgate_metering_duration_seconds{phase}`).
pub const PHASES: [&str; 3] = ["auth", "admit", "record"];

/// One phase's histogram as scraped: sum, count, and cumulative bucket counts by upper bound.
#[derive(Debug, Clone, Default)]
pub struct PhaseHistogram {
    pub sum: f64,
    pub count: f64,
    pub buckets: Vec<(f64, f64)>,
}

impl PhaseHistogram {
    pub fn scrape(text: &str, phase: &str) -> Self {
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
    pub fn since(&self, before: &Self) -> Self {
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

    pub fn mean_ms(&self) -> Option<f64> {
        (self.count > 0.0).then(|| self.sum / self.count * 1e3)
    }

    /// The upper bound of the bucket holding the `q` quantile, in milliseconds.
    pub fn quantile_bound_ms(&self, q: f64) -> Option<f64> {
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
pub fn phases(text: &str) -> Vec<PhaseHistogram> {
    PHASES
        .iter()
        .map(|p| PhaseHistogram::scrape(text, p))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
# HELP tollgate_ledger_pending_records pending
tollgate_ledger_pending_records 3
tollgate_metering_duration_seconds_bucket{phase=\"record\",le=\"0.001\"} 90
tollgate_metering_duration_seconds_bucket{phase=\"record\",le=\"0.01\"} 100
tollgate_metering_duration_seconds_bucket{phase=\"record\",le=\"+Inf\"} 100
tollgate_metering_duration_seconds_sum{phase=\"record\"} 0.05
tollgate_metering_duration_seconds_count{phase=\"record\"} 100
";

    /// A gateway that resets its first two scrapes (as one past its connection cap does),
    /// then answers: the ledger wait tries again instead of failing the benchmark.
    #[tokio::test]
    async fn the_ledger_wait_outlasts_refused_scrapes() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let server = std::thread::spawn(move || {
            for (n, conn) in listener.incoming().enumerate() {
                let mut conn = conn.unwrap();
                if n < 2 {
                    // Closed at once, as a connection over the cap is.
                    drop(conn);
                    continue;
                }
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf);
                let body = "tollgate_ledger_pending_records 0\n";
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                return;
            }
        });
        let client = reqwest::Client::new();
        wait_ledger_at(&client, &base, Duration::from_secs(30))
            .await
            .unwrap();
        server.join().unwrap();
    }

    #[test]
    fn reads_a_metric_and_a_phase_histogram() {
        assert_eq!(metric(TEXT, "tollgate_ledger_pending_records"), Some(3.0));
        assert_eq!(metric(TEXT, "tollgate_missing"), None);
        let h = PhaseHistogram::scrape(TEXT, "record");
        assert_eq!((h.sum, h.count, h.buckets.len()), (0.05, 100.0, 3));
        assert_eq!(h.mean_ms(), Some(0.5));
        assert_eq!(h.quantile_bound_ms(0.5), Some(1.0));
        assert_eq!(h.quantile_bound_ms(0.99), Some(10.0));
        let none = h.since(&h);
        assert_eq!((none.count, none.mean_ms()), (0.0, None));
    }
}

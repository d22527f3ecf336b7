//! Benchmark of the metering path, without a model or a gateway: ledger throughput and the
//! latency metering adds to a request.
//!
//!     cargo run --release -p tollgate-bench --bin metering -- [DATABASE_URL]
//!
//! DATABASE_URL defaults to a temporary SQLite file; pass `$(scripts/postgres.sh reset)` for
//! PostgreSQL. Prints:
//! - ledger throughput: records/s from 64 concurrent producers through [`Ledger::record`]
//!   (spool append + fdatasync, then batched inserts) until all are in the database, and raw
//!   batched inserts (`Store::insert_records`, 500 per batch);
//! - metering latency per request, p50/p99 over sequential requests: key lookup in the
//!   database, rate limits, budget reservation and settlement, and the durable record (the
//!   path a request takes besides the model), each phase and in total.
//!
//! With `--month-records N` it measures instead what a budgeted customer's month costs the
//! ledger: batched inserts (`Store::insert_records`, 1,000 per batch, the ledger's batch) for
//! a customer with an empty month and one with N records already in the month (alternate
//! rounds, after the fill, so both find the table as large), and
//! their ratio (`--json PATH` writes the figures as JSON).

use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use clap::Parser;
use prometheus::IntGauge;
use tollgate_gateway::auth::AuthConfig;
use tollgate_metering::audit::Actor;
use tollgate_metering::ledger::{Ledger, LedgerGauges};
use tollgate_metering::limits::{BudgetError, Limiter};
use tollgate_metering::secrets::{digest, hex};
use tollgate_metering::store::{now_micros, CustomerFields, DbKind, NewKey, Store, UsageRecord};

const THROUGHPUT_RECORDS: usize = 20_000;
const PRODUCERS: usize = 64;
const LATENCY_REQUESTS: usize = 2_000;

/// metering: ledger throughput and the latency of the metering path, without a model
#[derive(Parser)]
#[command(name = "metering", version)]
struct Args {
    /// The ledger database (a SQLite path or a postgres:// URL; default: a temporary SQLite
    /// file). Records are added with a per-run prefix, so a database can be reused.
    #[arg(value_name = "DATABASE_URL")]
    database: Option<String>,
    /// Measure ledger inserts with this many records already in the month against an empty
    /// month (and nothing else)
    #[arg(long, value_name = "N")]
    month_records: Option<usize>,
    /// With --month-records: write the figures as JSON to this file
    #[arg(long, value_name = "PATH")]
    json: Option<std::path::PathBuf>,
}

fn record(id: String, started_at: i64) -> UsageRecord {
    record_of("bench", id, started_at)
}

fn record_of(customer: &str, id: String, started_at: i64) -> UsageRecord {
    UsageRecord {
        id,
        customer_id: customer.into(),
        key_id: "key_bench".into(),
        model: "smollm2-135m".into(),
        endpoint: tollgate_metering::kinds::Endpoint::ChatCompletions,
        stream: true,
        status: tollgate_metering::kinds::Outcome::Completed,
        finish_reason: Some(tollgate_metering::kinds::FinishReason::Stop),
        input_tokens: 27,
        output_tokens: 64,
        started_at,
        finished_at: started_at + 900_000,
        ttft_ms: Some(40),
        input_price_per_mtok: rust_decimal::Decimal::new(5, 2),
        output_price_per_mtok: rust_decimal::Decimal::new(10, 2),
        cost_nano_usd: 7_750,
        ..UsageRecord::default()
    }
}

/// The `q` quantile of sorted durations in milliseconds (the nearest of the ranks), 0 when
/// there are none.
fn pct(sorted: &[Duration], q: f64) -> f64 {
    let i = (sorted.len().saturating_sub(1) as f64 * q).round() as usize;
    sorted.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tmp = tempfile::tempdir()?;
    let url = args
        .database
        .unwrap_or_else(|| tmp.path().join("bench.db").display().to_string());
    let store = Store::connect(&url).await?;
    println!("database: {:?}", store.kind());
    if let Some(n) = args.month_records {
        return month(&store, n, args.json.as_deref()).await;
    }
    let secret = create_customer_and_key(&store).await?;
    let gauges = LedgerGauges {
        pending: IntGauge::new("pending", "pending")?,
        spooled: IntGauge::new("spooled", "spooled")?,
    };
    let ledger = Ledger::start(
        store.clone(),
        &tmp.path().join("bench.spool"),
        tollgate_metering::ledger::SpoolSync::default(),
        gauges.clone(),
    )?;
    let run = uuid_prefix();
    throughput(&store, &ledger, &gauges, &run).await?;
    latency(&store, &ledger, secret, &run).await?;
    ledger.close(Duration::from_secs(30)).await;
    Ok(())
}

/// The customer `bench` (limits and budget far above what the benchmark uses) and its key;
/// the key's secret.
async fn create_customer_and_key(store: &Store) -> anyhow::Result<&'static str> {
    store
        .create_customer(
            "bench",
            CustomerFields {
                name: Some("bench".into()),
                budget_nano_usd: Some(Some(i64::MAX / 4)),
                rpm: Some(Some(1_000_000)),
                tpm: Some(Some(1_000_000_000)),
                ..CustomerFields::default()
            },
            &Actor::system(),
        )
        .await?;
    let secret = "tg-bench-secret";
    store
        .create_key(
            "bench",
            "key_bench",
            &hex(&digest(secret)),
            "tg-bench",
            NewKey::default(),
            &Actor::system(),
        )
        .await?;
    Ok(secret)
}

/// Throughput through the ledger from [`PRODUCERS`] concurrent producers, then of raw batched
/// inserts.
async fn throughput(
    store: &Store,
    ledger: &Ledger,
    gauges: &LedgerGauges,
    run: &str,
) -> anyhow::Result<()> {
    let t = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..PRODUCERS {
        let ledger = ledger.clone();
        let run = run.to_string();
        tasks.push(tokio::spawn(async move {
            for i in (p..THROUGHPUT_RECORDS).step_by(PRODUCERS) {
                ledger
                    .record(record(format!("{run}-t{i}"), now_micros()))
                    .await;
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    let durable = t.elapsed();
    while gauges.pending.get() > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stored = t.elapsed();
    println!(
        "ledger: {THROUGHPUT_RECORDS} records from {PRODUCERS} producers: durable (spooled) at {:.0} records/s, in the database at {:.0} records/s",
        THROUGHPUT_RECORDS as f64 / durable.as_secs_f64(),
        THROUGHPUT_RECORDS as f64 / stored.as_secs_f64()
    );
    let batch: Vec<UsageRecord> = (0..THROUGHPUT_RECORDS)
        .map(|i| record(format!("{run}-b{i}"), now_micros()))
        .collect();
    let t = Instant::now();
    for chunk in batch.chunks(500) {
        store.insert_records(chunk).await?;
    }
    println!(
        "store: batched inserts of 500: {:.0} records/s",
        THROUGHPUT_RECORDS as f64 / t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Latency of the metering path per request: key lookup, limits and budget, durable record.
async fn latency(store: &Store, ledger: &Ledger, secret: &str, run: &str) -> anyhow::Result<()> {
    let auth = AuthConfig::default();
    // On PostgreSQL the limits and budgets are the ones replicas share, kept in the database.
    let limiter = match store.kind() {
        DbKind::Postgres => Limiter::shared(store.clone()),
        DbKind::Sqlite => Limiter::default(),
    };
    let (mut lookup, mut limits, mut recording, mut total) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..LATENCY_REQUESTS {
        let t0 = Instant::now();
        let caller = auth
            .resolve(Some(store), secret)
            .await
            .context("the key was not accepted")?;
        let t1 = Instant::now();
        let id = format!("{run}-l{i}");
        limiter
            .admit_request(&caller.limits)
            .await
            .map_err(|r| anyhow!("refused by the request rate limit: {r:?}"))?;
        let tokens = limiter
            .reserve_tokens(&caller.limits, 27 + 64)
            .await
            .map_err(|r| anyhow!("refused by the token rate limit: {r:?}"))?;
        let budget = limiter
            .reserve_budget(Some(store), &id, &caller.customer_id, i64::MAX / 4, 7_750)
            .await
            .map_err(|e| match e {
                BudgetError::Refused(r) => anyhow!("refused by the budget: {r:?}"),
                BudgetError::Store(e) => e.into(),
            })?;
        limiter.settle_tokens(&tokens, 91);
        limiter.settle_budget(&budget, 7_750);
        let t2 = Instant::now();
        ledger.record(record(id, now_micros())).await;
        let t3 = Instant::now();
        lookup.push(t1 - t0);
        limits.push(t2 - t1);
        recording.push(t3 - t2);
        total.push(t3 - t0);
    }
    for (name, v) in [
        ("key lookup", &mut lookup),
        ("limits+budget", &mut limits),
        ("durable record", &mut recording),
        ("metering total", &mut total),
    ] {
        v.sort();
        println!(
            "{name:>15}: p50 {:.3} ms  p99 {:.3} ms",
            pct(v, 0.5),
            pct(v, 0.99)
        );
    }
    Ok(())
}

/// A per-run prefix, so runs against the same database do not collide.
fn uuid_prefix() -> String {
    format!("bench{}", now_micros())
}

/// Records per measured round, rounds per measure, records per batch.
const MONTH_ROUND: usize = 10_000;
const MONTH_ROUNDS: usize = 5;
const MONTH_BATCH: usize = 1_000;

/// Inserts `count` records of `customer` in batches; records per second.
async fn insert_rate(
    store: &Store,
    customer: &str,
    prefix: &str,
    count: usize,
) -> anyhow::Result<f64> {
    let now = now_micros();
    let records: Vec<UsageRecord> = (0..count)
        .map(|i| record_of(customer, format!("{prefix}-{i}"), now))
        .collect();
    let t = Instant::now();
    for chunk in records.chunks(MONTH_BATCH) {
        store.insert_records(chunk).await?;
    }
    Ok(count as f64 / t.elapsed().as_secs_f64())
}

fn median(rounds: &[f64]) -> f64 {
    let mut sorted = rounds.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
}

/// Ledger inserts for a budgeted customer with an empty month, then with `n` records already
/// in the month.
async fn month(store: &Store, n: usize, json: Option<&std::path::Path>) -> anyhow::Result<()> {
    let run = uuid_prefix();
    let (empty, full) = (format!("{run}-empty"), format!("{run}-full"));
    for id in [&empty, &full] {
        store
            .create_customer(
                id,
                CustomerFields {
                    name: Some(id.clone()),
                    // Budgeted, so every insert runs the budget alert step.
                    budget_nano_usd: Some(Some(i64::MAX / 4)),
                    ..CustomerFields::default()
                },
                &Actor::system(),
            )
            .await?;
    }
    // The month filled without the alert step in the way (the customer unbudgeted meanwhile).
    store
        .execute_raw(&format!(
            "UPDATE customers SET budget_nano_usd = NULL WHERE id = '{full}'"
        ))
        .await?;
    let t = Instant::now();
    let fill = insert_rate(store, &full, &format!("{run}-fill"), n).await?;
    println!(
        "filled the month with {n} records in {:.1} s ({fill:.0} records/s)",
        t.elapsed().as_secs_f64()
    );
    store
        .execute_raw(&format!(
            "UPDATE customers SET budget_nano_usd = {} WHERE id = '{full}'",
            i64::MAX / 4
        ))
        .await?;
    // Rounds alternate between the two customers, on the same table (day 1 of a month finds
    // the earlier months' records there too), so what differs is the month alone.
    let (mut empty_rounds, mut full_rounds) = (Vec::new(), Vec::new());
    for r in 0..MONTH_ROUNDS {
        empty_rounds.push(insert_rate(store, &empty, &format!("{run}-e{r}"), MONTH_ROUND).await?);
        full_rounds.push(insert_rate(store, &full, &format!("{run}-f{r}"), MONTH_ROUND).await?);
    }
    let (empty_rate, full_rate) = (median(&empty_rounds), median(&full_rounds));
    println!("empty month: {empty_rate:.0} records/s (rounds {empty_rounds:.0?})");
    println!("month with {n} records: {full_rate:.0} records/s (rounds {full_rounds:.0?})");
    let ratio = full_rate / empty_rate;
    println!("ratio {ratio:.3}");
    if let Some(path) = json {
        let figures = serde_json::json!({
            "benchmark": "metering --month-records",
            "database": format!("{:?}", store.kind()),
            "month_records": n,
            "records_per_round": MONTH_ROUND,
            "batch": MONTH_BATCH,
            "empty_month_records_per_s": empty_rate,
            "empty_month_rounds": empty_rounds,
            "full_month_records_per_s": full_rate,
            "full_month_rounds": full_rounds,
            "ratio": ratio,
            "provenance": tollgate_bench::provenance::provenance(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&figures)? + "\n")?;
    }
    Ok(())
}

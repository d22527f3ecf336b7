//! The ledger database and writer against a real SQLite file (PostgreSQL: `store_postgres.rs`):
//! the store contract, the ledger's rules, its spool and its writer.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "an integration test crate: its helpers, outside `#[test]` fns, are not covered by clippy.toml's allow-*-in-tests"
)]

use std::time::Duration;

use prometheus::IntGauge;
use tollgate_metering::ledger::{Ledger, LedgerGauges, SpoolSync};
use tollgate_metering::store::Store;

#[path = "common/adapters_contract.rs"]
mod adapters_contract;
#[path = "common/batch_runs_contract.rs"]
mod batch_runs_contract;
#[path = "common/batches_contract.rs"]
mod batches_contract;
#[path = "common/store_contract.rs"]
mod contract;
#[path = "common/files_contract.rs"]
mod files_contract;
use contract::{exercise, record};

fn gauges() -> LedgerGauges {
    LedgerGauges {
        pending: IntGauge::new("p", "p").unwrap(),
        spooled: IntGauge::new("s", "s").unwrap(),
    }
}

/// Both durability modes: synced before each response, and written before it and synced on a
/// timer.
const MODES: [SpoolSync; 2] = [
    SpoolSync::Always,
    SpoolSync::Every(Duration::from_millis(10)),
];

async fn sqlite() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::connect(dir.path().join("ledger.db").to_str().unwrap())
        .await
        .unwrap();
    (dir, store)
}

#[tokio::test]
async fn sqlite_store_contract() {
    let (_dir, store) = sqlite().await;
    exercise(&store).await;
}

#[path = "common/money_contract.rs"]
mod money;

#[tokio::test]
async fn sqlite_invoices_have_a_line_per_tier() {
    let (_dir, store) = sqlite().await;
    money::tiers_on_invoices(&store).await;
}

#[tokio::test]
async fn sqlite_reservations_are_never_oversold() {
    let (_dir, store) = sqlite().await;
    money::reservations(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_concurrent_reservations_never_oversell() {
    let (_dir, store) = sqlite().await;
    money::concurrent_reservations_never_oversell(&store).await;
}

#[tokio::test]
async fn sqlite_sla_report() {
    let (_dir, store) = sqlite().await;
    money::sla_report(&store).await;
}

#[tokio::test]
async fn sqlite_batches() {
    let (_dir, store) = sqlite().await;
    batches_contract::exercise(&store).await;
}

#[tokio::test]
async fn sqlite_batch_runs() {
    let (_dir, store) = sqlite().await;
    batch_runs_contract::exercise(&store).await;
}

#[tokio::test]
async fn sqlite_files() {
    let (_dir, store) = sqlite().await;
    files_contract::exercise(&store).await;
}

#[tokio::test]
async fn sqlite_customer_adapters() {
    let (_dir, store) = sqlite().await;
    adapters_contract::exercise(&store).await;
}

#[tokio::test]
async fn sqlite_alerts_and_idempotency() {
    let (_dir, store) = sqlite().await;
    contract::alerts_and_idempotency(&store).await;
}

#[tokio::test]
async fn a_missing_sqlite_file_is_created_however_it_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    for (url, file) in [
        (path("bare.db"), path("bare.db")),
        (format!("sqlite://{}", path("url.db")), path("url.db")),
        (format!("sqlite:{}", path("short.db")), path("short.db")),
        (
            format!("sqlite://{}?cache=shared", path("query.db")),
            path("query.db"),
        ),
    ] {
        assert!(!std::path::Path::new(&file).exists());
        let store = Store::connect(&url).await.unwrap();
        store
            .insert_records(&[record("r1", "c", "m", 1, 5)])
            .await
            .unwrap();
        store.close().await;
        assert!(std::path::Path::new(&file).exists(), "{url} created {file}");
    }
    // A URL that asks for an existing file keeps its mode.
    let ro = format!("sqlite://{}?mode=ro", path("missing.db"));
    assert!(Store::connect(&ro).await.is_err());
    assert_eq!(
        tollgate_metering::store::normalize_url("sqlite::memory:"),
        "sqlite::memory:"
    );
}

#[tokio::test]
async fn ledger_writes_each_record_once_and_empties_its_spool() {
    for sync in MODES {
        writes_each_record_once(sync).await;
    }
}

async fn writes_each_record_once(sync: SpoolSync) {
    let (dir, store) = sqlite().await;
    let spool = dir.path().join("ledger.spool");
    let ledger = Ledger::start(store.clone(), &spool, sync, gauges()).unwrap();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let ledger = ledger.clone();
        tasks.push(tokio::spawn(async move {
            let r = record(&format!("id{i}"), "acme", "m1", 1_000 + i, 1);
            if i % 4 == 0 {
                ledger.record_nowait(r);
            } else {
                ledger.record(r).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    ledger.close(Duration::from_secs(10)).await;
    let (records, _) = store.records_after(0, 1_000).await.unwrap();
    assert_eq!(records.len(), 200, "{sync:?}");
    assert_eq!(
        std::fs::metadata(&spool).unwrap().len(),
        0,
        "spool truncated ({sync:?})"
    );
}

#[tokio::test]
async fn spool_is_replayed_at_start_idempotently() {
    let (dir, store) = sqlite().await;
    let spool = dir.path().join("ledger.spool");
    // What a gateway killed before its database write leaves behind, torn last line included.
    let mut text = String::new();
    for i in 0..3 {
        text.push_str(
            &serde_json::to_string(&record(&format!("s{i}"), "acme", "m1", i, 10)).unwrap(),
        );
        text.push('\n');
    }
    text.push_str("{\"id\":\"torn");
    std::fs::write(&spool, &text).unwrap();
    // One of them reached the database before the crash.
    store
        .insert_records(&[record("s1", "acme", "m1", 1, 10)])
        .await
        .unwrap();
    let ledger = Ledger::start(store.clone(), &spool, SpoolSync::default(), gauges()).unwrap();
    ledger.close(Duration::from_secs(10)).await;
    drop(ledger);
    let (records, _) = store.records_after(0, 100).await.unwrap();
    let mut ids: Vec<String> = records.into_iter().map(|r| r.id).collect();
    ids.sort();
    assert_eq!(ids, ["s0", "s1", "s2"]);
    assert_eq!(std::fs::metadata(&spool).unwrap().len(), 0);
    // A second replay of the same spool adds nothing.
    std::fs::write(&spool, &text).unwrap();
    let ledger = Ledger::start(store.clone(), &spool, SpoolSync::Always, gauges()).unwrap();
    ledger.close(Duration::from_secs(10)).await;
    assert_eq!(store.records_after(0, 100).await.unwrap().0.len(), 3);
}

#[tokio::test]
async fn records_wait_in_the_spool_while_the_database_is_down() {
    for sync in MODES {
        wait_in_the_spool(sync).await;
    }
}

async fn wait_in_the_spool(sync: SpoolSync) {
    let (dir, store) = sqlite().await;
    let spool = dir.path().join("ledger.spool");
    let g = gauges();
    ledger_table(&store, false).await;
    let ledger = Ledger::start(store.clone(), &spool, sync, g.clone()).unwrap();
    for i in 0..5 {
        ledger
            .record(record(&format!("d{i}"), "acme", "m1", i, 1))
            .await;
    }
    // Acknowledged records are in the spool file although the database refused them.
    let lines = std::fs::read_to_string(&spool).unwrap().lines().count();
    assert_eq!(lines, 5, "{sync:?}");
    wait_for("5 spooled", || g.spooled.get() == 5).await;
    ledger_table(&store, true).await;
    wait_for("nothing pending", || g.pending.get() == 0).await;
    ledger.close(Duration::from_secs(10)).await;
    assert_eq!(store.records_after(0, 100).await.unwrap().0.len(), 5);
    assert_eq!(std::fs::metadata(&spool).unwrap().len(), 0);
}

/// A long outage under load costs disk, not memory: past its bound the backlog is left in the
/// spool and read back from it when the database returns, every record once; records arriving
/// while it is read back are not lost either.
#[tokio::test]
async fn an_outage_keeps_a_bounded_backlog_in_memory_and_the_rest_in_the_spool() {
    for sync in MODES {
        bounded_backlog(sync).await;
    }
}

async fn bounded_backlog(sync: SpoolSync) {
    let (dir, store) = sqlite().await;
    let spool = dir.path().join("ledger.spool");
    let g = gauges();
    ledger_table(&store, false).await;
    let ledger = Ledger::start_bounded(store.clone(), &spool, sync, g.clone(), 10).unwrap();
    let mut most = 0;
    for i in 0..60 {
        ledger
            .record(record(&format!("b{i}"), "acme", "m1", i, 1))
            .await;
        tokio::task::yield_now().await;
        most = most.max(ledger.backlog_in_memory());
    }
    // Pending counts a record from its append on; the writer then takes it (with `Every`,
    // when its write is due or its inbox is at the bound) and keeps only what the spool
    // does not hold: nothing, here.
    wait_for("60 pending, all in the spool only", || {
        most = most.max(ledger.backlog_in_memory());
        g.pending.get() == 60 && ledger.backlog_in_memory() == 0
    })
    .await;
    assert!(most <= 11, "{most} records held in memory ({sync:?})");
    assert_eq!(std::fs::read_to_string(&spool).unwrap().lines().count(), 60);
    ledger_table(&store, true).await;
    for i in 60..80 {
        ledger
            .record(record(&format!("b{i}"), "acme", "m1", i, 1))
            .await;
    }
    wait_for("nothing pending", || g.pending.get() == 0).await;
    // Back in memory once caught up.
    ledger.record(record("after", "acme", "m1", 99, 1)).await;
    ledger.close(Duration::from_secs(10)).await;
    let (records, _) = store.records_after(0, 1_000).await.unwrap();
    assert_eq!(records.len(), 81, "{sync:?}: each record once");
    assert_eq!(std::fs::metadata(&spool).unwrap().len(), 0, "{sync:?}");
}

#[tokio::test]
async fn one_spool_per_process_and_late_records_wait_in_it() {
    for sync in MODES {
        late_records_wait(sync).await;
    }
}

async fn late_records_wait(sync: SpoolSync) {
    let (dir, store) = sqlite().await;
    let spool = dir.path().join("ledger.spool");
    let ledger = Ledger::start(store.clone(), &spool, sync, gauges()).unwrap();
    let second = Ledger::start(store.clone(), &spool, sync, gauges());
    assert!(second
        .err()
        .unwrap()
        .to_string()
        .contains("in use by another process"));
    ledger.close(Duration::from_secs(10)).await;
    // A request that finishes after shutdown began still leaves its record, in the spool.
    ledger.record(record("late", "acme", "m1", 1, 1)).await;
    drop(ledger);
    assert!(store.records_after(0, 10).await.unwrap().0.is_empty());
    let again = Ledger::start(store.clone(), &spool, sync, gauges()).unwrap();
    again.close(Duration::from_secs(10)).await;
    assert_eq!(store.records_after(0, 10).await.unwrap().0[0].id, "late");
}

/// Takes the ledger's table away (a database that refuses writes) or brings it back.
async fn ledger_table(store: &Store, present: bool) {
    let sql = if present {
        "ALTER TABLE usage_records_away RENAME TO usage_records"
    } else {
        "ALTER TABLE usage_records RENAME TO usage_records_away"
    };
    sqlx_exec(store, sql).await;
}

/// Polls `done` until it holds, failing the test after 20 s.
async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn sqlx_exec(store: &Store, sql: &str) {
    store.execute_raw(sql).await.unwrap();
}

/// Database work started in the background, even from a thread outside the runtime (a
/// settlement in `Drop`), runs on the store's runtime, and closing the store waits for it
/// instead of cutting it off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_work_runs_from_any_thread_and_close_waits_for_it() {
    let (_dir, store) = sqlite().await;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (s, d) = (store.clone(), done.clone());
    std::thread::spawn(move || {
        s.spawn_background(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            d.store(true, std::sync::atomic::Ordering::SeqCst);
        })
    })
    .join()
    .unwrap();
    store.close().await;
    assert!(done.load(std::sync::atomic::Ordering::SeqCst));
}

#[path = "common/ledger_rules.rs"]
mod ledger_rules;

#[tokio::test]
async fn the_sqlite_ledger_charges_a_key_once() {
    let (_dir, store) = sqlite().await;
    ledger_rules::ledger_charges_a_key_once(&store).await;
}

#[tokio::test]
async fn on_sqlite_a_failing_alert_step_does_not_hold_the_records() {
    let (_dir, store) = sqlite().await;
    ledger_rules::a_failing_alert_step_does_not_hold_the_records(&store).await;
}

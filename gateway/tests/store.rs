//! The ledger database and writer against a real SQLite file (PostgreSQL: `store_postgres.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use prometheus::IntGauge;
use tollgate_gateway::ledger::{Ledger, LedgerGauges};
use tollgate_gateway::store::Store;

#[path = "common/store_contract.rs"]
mod contract;
use contract::{exercise, record};

fn gauges() -> LedgerGauges {
    LedgerGauges {
        pending: IntGauge::new("p", "p").unwrap(),
        spooled: IntGauge::new("s", "s").unwrap(),
    }
}

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

#[tokio::test]
async fn ledger_writes_each_record_once_and_empties_its_spool() {
    let (dir, store) = sqlite().await;
    let spool = dir.path().join("ledger.spool");
    let ledger = Ledger::start(store.clone(), &spool, gauges()).unwrap();
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
    assert_eq!(records.len(), 200);
    assert_eq!(
        std::fs::metadata(&spool).unwrap().len(),
        0,
        "spool truncated"
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
    let ledger = Ledger::start(store.clone(), &spool, gauges()).unwrap();
    ledger.close(Duration::from_secs(10)).await;
    drop(ledger);
    let (records, _) = store.records_after(0, 100).await.unwrap();
    let mut ids: Vec<String> = records.into_iter().map(|r| r.id).collect();
    ids.sort();
    assert_eq!(ids, ["s0", "s1", "s2"]);
    assert_eq!(std::fs::metadata(&spool).unwrap().len(), 0);
    // A second replay of the same spool adds nothing.
    std::fs::write(&spool, &text).unwrap();
    let ledger = Ledger::start(store.clone(), &spool, gauges()).unwrap();
    ledger.close(Duration::from_secs(10)).await;
    assert_eq!(store.records_after(0, 100).await.unwrap().0.len(), 3);
}

#[tokio::test]
async fn records_wait_in_the_spool_while_the_database_is_down() {
    let (dir, store) = sqlite().await;
    let spool = dir.path().join("ledger.spool");
    let g = gauges();
    // A database that refuses writes: the ledger table is renamed away, then restored.
    sqlx_exec(
        &store,
        "ALTER TABLE usage_records RENAME TO usage_records_away",
    )
    .await;
    let ledger = Ledger::start(store.clone(), &spool, g.clone()).unwrap();
    for i in 0..5 {
        ledger
            .record(record(&format!("d{i}"), "acme", "m1", i, 1))
            .await;
    }
    // Acknowledged records are on disk although the database refused them.
    let lines = std::fs::read_to_string(&spool).unwrap().lines().count();
    assert_eq!(lines, 5);
    assert_eq!(g.spooled.get(), 5);
    sqlx_exec(
        &store,
        "ALTER TABLE usage_records_away RENAME TO usage_records",
    )
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while g.pending.get() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "records never reached the database"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ledger.close(Duration::from_secs(10)).await;
    assert_eq!(store.records_after(0, 100).await.unwrap().0.len(), 5);
    assert_eq!(std::fs::metadata(&spool).unwrap().len(), 0);
}

#[tokio::test]
async fn one_spool_per_process_and_late_records_wait_in_it() {
    let (dir, store) = sqlite().await;
    let spool = dir.path().join("ledger.spool");
    let ledger = Ledger::start(store.clone(), &spool, gauges()).unwrap();
    let second = Ledger::start(store.clone(), &spool, gauges());
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
    let again = Ledger::start(store.clone(), &spool, gauges()).unwrap();
    again.close(Duration::from_secs(10)).await;
    assert_eq!(store.records_after(0, 10).await.unwrap().0[0].id, "late");
}

async fn sqlx_exec(store: &Store, sql: &str) {
    store.execute_raw(sql).await.unwrap();
}

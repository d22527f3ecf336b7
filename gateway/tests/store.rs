//! The ledger database and writer against real databases: SQLite (a temporary file) always,
//! PostgreSQL when `TOLLGATE_TEST_POSTGRES_URL` names an empty database (`scripts/test.sh`
//! starts one and runs the ignored tests with it).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use prometheus::IntGauge;
use tollgate_gateway::ledger::{Ledger, LedgerGauges};
use tollgate_gateway::store::{
    CustomerFields, GroupBy, NewKey, Store, StoreError, UsageFilter, UsageRecord,
};

const DAY: i64 = 86_400_000_000;

fn record(id: &str, customer: &str, model: &str, started_at: i64, cost: i64) -> UsageRecord {
    UsageRecord {
        id: id.into(),
        customer_id: customer.into(),
        key_id: format!("key_{customer}"),
        model: model.into(),
        endpoint: "/v1/chat/completions".into(),
        stream: id.len().is_multiple_of(2),
        status: "completed".into(),
        finish_reason: Some("stop".into()),
        input_tokens: 10,
        output_tokens: 5,
        started_at,
        finished_at: started_at + 1_000,
        ttft_ms: Some(7),
        input_price_per_mtok: "0.05".into(),
        output_price_per_mtok: "0.10".into(),
        cost_nano_usd: cost,
    }
}

fn gauges() -> LedgerGauges {
    LedgerGauges {
        pending: IntGauge::new("p", "p").unwrap(),
        spooled: IntGauge::new("s", "s").unwrap(),
    }
}

/// Everything the gateway and the CLI ask of a store, on an empty database.
async fn exercise(store: &Store) {
    // Customers.
    let fields = CustomerFields {
        name: Some("Acme".into()),
        budget_nano_usd: Some(Some(5_000)),
        rpm: Some(Some(60)),
        ..CustomerFields::default()
    };
    let acme = store.create_customer("acme", fields.clone()).await.unwrap();
    assert_eq!(acme.budget_nano_usd, Some(5_000));
    assert_eq!(acme.budget_period, "monthly");
    assert!(matches!(
        store.create_customer("acme", fields).await,
        Err(StoreError::Conflict(_))
    ));
    store.ensure_customer("beta", "Beta").await.unwrap();
    store.ensure_customer("beta", "ignored").await.unwrap();
    let patched = store
        .update_customer(
            "acme",
            CustomerFields {
                budget_nano_usd: Some(None),
                tpm: Some(Some(1_000)),
                ..CustomerFields::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (patched.budget_nano_usd, patched.rpm, patched.tpm),
        (None, Some(60), Some(1_000))
    );
    let ids: Vec<String> = store
        .list_customers()
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(ids, ["acme", "beta"]);
    assert!(matches!(
        store.customer("nobody").await,
        Err(StoreError::NotFound(_))
    ));

    // Keys.
    let new = NewKey {
        name: "prod".into(),
        models: Some(vec!["m1".into()]),
        rpm: Some(5),
        ..NewKey::default()
    };
    store
        .create_key("acme", "key_a", "hash_a", "tg-aaaaaa", new)
        .await
        .unwrap();
    assert!(store
        .create_key("nobody", "key_x", "hash_x", "tg-x", NewKey::default())
        .await
        .is_err());
    let (key, stored, customer) = store.find_key("hash_a").await.unwrap().unwrap();
    assert_eq!(
        (key.id.as_str(), stored.as_str(), customer.id.as_str()),
        ("key_a", "hash_a", "acme")
    );
    assert_eq!(key.models, Some(vec!["m1".to_string()]));
    assert!(store.find_key("hash_b").await.unwrap().is_none());
    let revoked = store.revoke_key("key_a").await.unwrap();
    let again = store.revoke_key("key_a").await.unwrap();
    assert!(revoked.revoked_at.is_some());
    assert_eq!(
        revoked.revoked_at, again.revoked_at,
        "the first revocation time stays"
    );
    assert_eq!(store.list_keys("acme").await.unwrap().len(), 1);

    // Ledger: inserts are idempotent on the id and keep their order.
    let t0 = 20_000 * DAY;
    let batch: Vec<UsageRecord> = (0..450)
        .map(|i| {
            let customer = if i % 3 == 0 { "beta" } else { "acme" };
            let model = if i % 2 == 0 { "m1" } else { "m2" };
            record(
                &format!("r{i:04}"),
                customer,
                model,
                t0 + i * DAY / 100,
                1_000 + i,
            )
        })
        .collect();
    assert_eq!(store.insert_records(&batch).await.unwrap(), 450);
    assert_eq!(store.insert_records(&batch[100..300]).await.unwrap(), 0);
    let mut cursor = 0;
    let mut seen = Vec::new();
    loop {
        let (page, next) = store.records_after(cursor, 100).await.unwrap();
        seen.extend(page.into_iter().map(|r| r.id));
        match next {
            Some(c) => cursor = c,
            None => break,
        }
    }
    let expected: Vec<String> = batch.iter().map(|r| r.id.clone()).collect();
    assert_eq!(
        seen, expected,
        "the cursor walks every record once, in order"
    );
    let (round, _) = store.records_after(0, 1).await.unwrap();
    assert_eq!(round[0], batch[0], "a record reads back as written");

    // Aggregates equal the sums of their records.
    let all = UsageFilter {
        start: t0,
        end: t0 + 10 * DAY,
        ..UsageFilter::default()
    };
    let rows = store
        .aggregate(&all, &[GroupBy::Customer, GroupBy::Model], None)
        .await
        .unwrap();
    assert_eq!(rows.len(), 4);
    for row in &rows {
        let mine: Vec<&UsageRecord> = batch
            .iter()
            .filter(|r| Some(&r.customer_id) == row.customer_id.as_ref())
            .filter(|r| Some(&r.model) == row.model.as_ref())
            .collect();
        assert_eq!(row.requests, mine.len() as i64);
        assert_eq!(row.input_tokens, 10 * mine.len() as i64);
        assert_eq!(
            row.cost_nano_usd,
            mine.iter().map(|r| r.cost_nano_usd).sum::<i64>()
        );
    }
    let days = store.aggregate(&all, &[GroupBy::Day], None).await.unwrap();
    assert_eq!(days.len(), 5, "450 records 1/100 day apart span 5 days");
    assert_eq!(days[0].bucket_start, Some(t0));
    assert_eq!(days.iter().map(|d| d.requests).sum::<i64>(), 450);
    let invoice = store
        .aggregate(
            &UsageFilter {
                customer_id: Some("beta".into()),
                model: Some("m1".into()),
                ..all.clone()
            },
            &[GroupBy::Model, GroupBy::Prices],
            None,
        )
        .await
        .unwrap();
    assert_eq!(invoice.len(), 1);
    assert_eq!(invoice[0].input_price_per_mtok.as_deref(), Some("0.05"));
    assert_eq!(
        invoice[0].requests,
        batch
            .iter()
            .filter(|r| r.customer_id == "beta" && r.model == "m1")
            .count() as i64
    );
    let hours = store
        .aggregate(&all, &[GroupBy::Key], Some((t0, DAY / 24)))
        .await
        .unwrap();
    assert_eq!(hours.iter().map(|h| h.requests).sum::<i64>(), 450);
    assert!(hours
        .iter()
        .all(|h| (h.bucket_start.unwrap() - t0) % (DAY / 24) == 0));
    let spent = store.spent_since("acme", t0 + 2 * DAY).await.unwrap();
    assert_eq!(
        spent,
        batch
            .iter()
            .filter(|r| r.customer_id == "acme" && r.started_at >= t0 + 2 * DAY)
            .map(|r| r.cost_nano_usd)
            .sum::<i64>()
    );
    let (between, _) = store
        .records_between(t0 + DAY, t0 + 2 * DAY, 0, 1_000)
        .await
        .unwrap();
    assert_eq!(between.len(), 100);
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
#[ignore = "needs TOLLGATE_TEST_POSTGRES_URL (an empty database); scripts/test.sh provides it"]
async fn postgres_store_contract() {
    let url = std::env::var("TOLLGATE_TEST_POSTGRES_URL")
        .expect("TOLLGATE_TEST_POSTGRES_URL must name an empty PostgreSQL database");
    let store = Store::connect(&url).await.unwrap();
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

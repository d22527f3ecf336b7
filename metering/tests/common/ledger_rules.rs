//! Ledger rules checked on SQLite and PostgreSQL alike: one charge per Idempotency-Key
//! whatever reaches the ledger, and a budget alert step that fails without holding the
//! records back.

use tollgate_metering::audit::Actor;
use tollgate_metering::kinds::Outcome;
use tollgate_metering::store::{CustomerFields, DbKind, Store, UsageRecord};

fn record(id: &str, customer: &str, key: Option<&str>, status: Outcome) -> UsageRecord {
    let now = tollgate_metering::store::now_micros();
    UsageRecord {
        id: id.into(),
        customer_id: customer.into(),
        key_id: "key_1".into(),
        model: "m".into(),
        status,
        input_tokens: 3,
        output_tokens: 2,
        started_at: now,
        finished_at: now,
        input_price_per_mtok: "1".parse().unwrap(),
        output_price_per_mtok: "2".parse().unwrap(),
        cost_nano_usd: if status.is_charged() { 7_000 } else { 0 },
        idempotency_key: key.map(str::to_string),
        ..UsageRecord::default()
    }
}

/// A second charged record of a key, in a later batch, in the same batch, or replayed from a
/// spool, is kept as `superseded` (tokens, no cost) and never fails the batch; the database
/// itself refuses a second charged row.
pub async fn ledger_charges_a_key_once(store: &Store) {
    use Outcome::*;
    let r = record;
    assert_eq!(
        store
            .insert_records(&[r("once-a", "c1", Some("k1"), Completed)])
            .await
            .unwrap(),
        1
    );
    let batch = [
        r("once-b", "c1", Some("k1"), Completed),
        r("once-c", "c1", Some("k1"), Cancelled),
        r("once-d", "c1", Some("k2"), Completed),
        r("once-e", "c1", Some("k2"), Completed),
        r("once-f", "c1", Some("k2"), Failed),
        r("once-g", "c2", Some("k1"), Completed),
        r("once-h", "c1", None, Completed),
        r("once-i", "c1", None, Completed),
    ];
    assert_eq!(store.insert_records(&batch).await.unwrap(), 8);
    // Replays (a spool read back): nothing new, nothing failed.
    assert_eq!(store.insert_records(&batch).await.unwrap(), 0);
    assert_eq!(
        store
            .insert_records(&[r("once-a", "c1", Some("k1"), Completed)])
            .await
            .unwrap(),
        0
    );
    let (records, _) = store.records_after(0, 1000).await.unwrap();
    let got: Vec<(&str, &str, i64, i64)> = records
        .iter()
        .filter(|r| r.id.starts_with("once-"))
        .map(|r| {
            (
                r.id.as_str(),
                r.status.as_str(),
                r.cost_nano_usd,
                r.output_tokens,
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("once-a", "completed", 7_000, 2),
            ("once-b", "superseded", 0, 2),
            ("once-c", "superseded", 0, 2),
            ("once-d", "completed", 7_000, 2),
            ("once-e", "superseded", 0, 2),
            ("once-f", "failed", 0, 2),
            ("once-g", "completed", 7_000, 2),
            ("once-h", "completed", 7_000, 2),
            ("once-i", "completed", 7_000, 2),
        ]
    );
    // The rule is the database's: a second charged row of a key is refused.
    let err = store
        .execute_raw(
            "INSERT INTO usage_records (id, customer_id, key_id, model, endpoint, stream, status, \
             input_tokens, output_tokens, started_at, finished_at, input_price_per_mtok, \
             output_price_per_mtok, cost_nano_usd, idempotency_key) VALUES ('once-z', 'c1', \
             'key_1', 'm', '/v1/chat/completions', 0, 'completed', 3, 2, 1, 1, '1', '2', 7000, \
             'k1')",
        )
        .await;
    assert!(err.is_err(), "a second charged row of a key is refused");
}

/// An alert step that fails (a trigger refusing outbox rows) lets the records commit: the
/// insert returns at once with them in the ledger, and the alert is made by the retry once
/// the step works again.
pub async fn a_failing_alert_step_does_not_hold_the_records(store: &Store) {
    store
        .create_customer(
            "alerted-fail",
            CustomerFields {
                name: Some("alerted".into()),
                budget_nano_usd: Some(Some(10_000)),
                ..CustomerFields::default()
            },
            &Actor::system(),
        )
        .await
        .unwrap();
    let (inject, heal): (&[&str], &[&str]) = match store.kind() {
        DbKind::Sqlite => (
            &["CREATE TRIGGER fail_alerts BEFORE INSERT ON budget_alerts \
               BEGIN SELECT RAISE(ABORT, 'injected alert failure'); END"],
            &["DROP TRIGGER fail_alerts"],
        ),
        DbKind::Postgres => (
            &[
                "CREATE FUNCTION fail_alerts() RETURNS trigger LANGUAGE plpgsql AS \
                 'BEGIN RAISE EXCEPTION ''injected alert failure''; END'",
                "CREATE TRIGGER fail_alerts BEFORE INSERT ON budget_alerts \
                 FOR EACH ROW EXECUTE FUNCTION fail_alerts()",
            ],
            &[
                "DROP TRIGGER fail_alerts ON budget_alerts",
                "DROP FUNCTION fail_alerts()",
            ],
        ),
    };
    for sql in inject {
        store.execute_raw(sql).await.unwrap();
    }
    // 7,000 of 10,000: past the 0.5 threshold.
    let inserted = store
        .insert_records(&[record("alert-1", "alerted-fail", None, Outcome::Completed)])
        .await
        .expect("the records commit although the alert step fails");
    assert_eq!(inserted, 1);
    let (records, _) = store.records_after(0, 1000).await.unwrap();
    assert!(records.iter().any(|r| r.id == "alert-1"));
    assert!(store
        .list_alerts(Some("alerted-fail"), 10)
        .await
        .unwrap()
        .is_empty());
    // Still failing: the retry fails too, and the records stay.
    assert!(store.catch_up_alerts().await.is_err());
    for sql in heal {
        store.execute_raw(sql).await.unwrap();
    }
    assert_eq!(store.catch_up_alerts().await.unwrap(), 1);
    let alerts = store.list_alerts(Some("alerted-fail"), 10).await.unwrap();
    let got: Vec<(&str, i64)> = alerts
        .iter()
        .map(|a| (a.threshold.as_str(), a.spent_nano_usd))
        .collect();
    assert_eq!(got, [("0.5", 7_000)]);
    // Caught up: nothing more to retry.
    assert_eq!(store.catch_up_alerts().await.unwrap(), 0);
}

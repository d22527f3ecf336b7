//! The store contract on a real PostgreSQL server. Built only with the `postgres-tests`
//! feature; `scripts/test.sh` starts a throwaway server (scripts/postgres.sh) and runs
//! `cargo test -p tollgate-metering --features postgres-tests --test store_postgres` with
//! `TOLLGATE_TEST_POSTGRES_URL` naming its empty database. Also the limits and budgets that
//! replicas share through PostgreSQL.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "an integration test crate: its helpers, outside `#[test]` fns, are not covered by clippy.toml's allow-*-in-tests"
)]

use std::time::{Duration, Instant};

use tollgate_metering::limits::{BudgetError, Limiter, Limits, Refusal};
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

#[tokio::test]
async fn postgres_store_contract() {
    let store = Store::connect(&test_url()).await.unwrap();
    contract::exercise(&store).await;
}

#[tokio::test]
async fn postgres_batches() {
    let store = fresh_database("tollgate_batches_contract").await;
    batches_contract::exercise(&store).await;
}

#[tokio::test]
async fn postgres_batch_runs() {
    let store = fresh_database("tollgate_batch_runs_contract").await;
    batch_runs_contract::exercise(&store).await;
}

#[tokio::test]
async fn postgres_files() {
    let store = fresh_database("tollgate_files_contract").await;
    files_contract::exercise(&store).await;
}

#[tokio::test]
async fn postgres_customer_adapters() {
    let store = fresh_database("tollgate_adapters_contract").await;
    adapters_contract::exercise(&store).await;
}

#[tokio::test]
async fn postgres_alerts_and_idempotency() {
    let store = fresh_database("tollgate_alerts_contract").await;
    contract::alerts_and_idempotency(&store).await;
}

#[path = "common/money_contract.rs"]
mod money;

#[tokio::test]
async fn postgres_invoices_have_a_line_per_tier() {
    let store = fresh_database("tollgate_tiers_contract").await;
    money::tiers_on_invoices(&store).await;
}

#[tokio::test]
async fn postgres_reservations_are_never_oversold() {
    let store = fresh_database("tollgate_reservations_contract").await;
    money::reservations(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_concurrent_reservations_never_oversell() {
    let store = fresh_database("tollgate_reservations_race").await;
    money::concurrent_reservations_never_oversell(&store).await;
}

/// Two replicas on one database count one reservation together: what one took, the other
/// cannot take again, and what one gives back the other can. (60 tokens per minute refill one
/// token a second: the margins below outlast any pause of a slow machine by far.)
#[tokio::test]
async fn postgres_replicas_share_a_reservation() {
    use tollgate_metering::limits::ReservationMeter;
    let a = fresh_database("tollgate_reservation_meter").await;
    let b = Store::connect(&database_url("tollgate_reservation_meter"))
        .await
        .unwrap();
    let reservation = tollgate_metering::store::Reservation {
        id: "rsv_1".into(),
        customer_id: "acme".into(),
        model: "m".into(),
        reserved_tokens_per_minute: 60,
        price_per_ktpm_month: rust_decimal::Decimal::ZERO,
        starts_at: 0,
        ends_at: None,
        created_at: 0,
    };
    let now = tollgate_metering::store::now_micros();
    let (meter_a, meter_b) = (
        ReservationMeter::shared(a.clone()),
        ReservationMeter::shared(b.clone()),
    );
    meter_a.replace(std::slice::from_ref(&reservation), now);
    meter_b.replace(std::slice::from_ref(&reservation), now);
    let taken = meter_a
        .claim("acme", "m", 40, now)
        .await
        .expect("40 of 60 fit");
    assert!(
        meter_b.claim("acme", "m", 30, now).await.is_none(),
        "40 taken on the other replica: 30 more do not fit in 60"
    );
    assert!(meter_b.claim("acme", "m", 20, now).await.is_some());
    assert!(meter_b.claim("acme", "m", 30, now).await.is_none());
    meter_a.release("acme", "m", taken, 5, now);
    a.close().await; // waits for the release to reach the database
    assert!(
        meter_b.claim("acme", "m", 30, now).await.is_some(),
        "35 unused tokens came back"
    );
    assert!(meter_b.claim("acme", "m", 30, now).await.is_none());
}

#[tokio::test]
async fn postgres_sla_report() {
    let store = fresh_database("tollgate_sla_contract").await;
    money::sla_report(&store).await;
}

/// The database the run was given: `TOLLGATE_TEST_POSTGRES_URL`.
fn test_url() -> String {
    std::env::var("TOLLGATE_TEST_POSTGRES_URL")
        .expect("TOLLGATE_TEST_POSTGRES_URL must name an empty PostgreSQL database")
}

/// The URL of the database `name` on the same server.
fn database_url(name: &str) -> String {
    let url = test_url();
    let (base, _) = url
        .rsplit_once('/')
        .expect("URL ends with the database name");
    format!("{base}/{name}")
}

/// A second, empty database on the same server (each test wants its own).
async fn fresh_database(name: &str) -> Store {
    let admin = Store::connect(&test_url()).await.unwrap();
    admin
        .execute_raw(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
        .unwrap();
    admin
        .execute_raw(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    admin.close().await;
    Store::connect(&database_url(name)).await.unwrap()
}

/// What concurrent reservations got: their holds, and the messages of their quota refusals (any
/// other refusal fails the test).
async fn holds_and_quota_refusals<T>(
    tasks: Vec<tokio::task::JoinHandle<Result<T, Refusal>>>,
) -> (Vec<T>, Vec<String>) {
    let (mut holds, mut refused) = (Vec::new(), Vec::new());
    for t in tasks {
        match t.await.unwrap() {
            Ok(h) => holds.push(h),
            Err(Refusal::Quota { message, .. }) => refused.push(message),
            Err(other) => panic!("unexpected refusal {other:?}"),
        }
    }
    (holds, refused)
}

fn key_limits(rpm: Option<i64>, tpm: Option<i64>) -> Limits {
    Limits {
        key_id: "key_a".into(),
        customer_id: "acme".into(),
        key_rpm: rpm,
        key_tpm: None,
        customer_rpm: None,
        customer_tpm: tpm,
    }
}

/// Two replicas (two limiters on two connection pools) share one set of limits and budgets:
/// exact across them, not twice the limit.
#[tokio::test]
async fn replicas_share_exact_limits_and_budgets() {
    let a_store = fresh_database("tollgate_shared_limits").await;
    let b_store = Store::connect(&database_url("tollgate_shared_limits"))
        .await
        .unwrap();
    let (a, b) = (
        Limiter::shared(a_store.clone()),
        Limiter::shared(b_store.clone()),
    );
    // Half the requests on each replica: its limiter and its store.
    let replica = |first: bool| {
        if first {
            (a.clone(), a_store.clone())
        } else {
            (b.clone(), b_store.clone())
        }
    };

    // Requests: 7 per minute across both replicas, taken concurrently.
    let lim = key_limits(Some(7), None);
    let mut tasks = Vec::new();
    for i in 0..20 {
        let (l, lim) = (if i % 2 == 0 { a.clone() } else { b.clone() }, lim.clone());
        tasks.push(tokio::spawn(async move { l.admit_request(&lim).await }));
    }
    let mut admitted = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => admitted += 1,
            Err(Refusal::Rate {
                unit, retry_after, ..
            }) => {
                assert_eq!(unit, "requests");
                assert!(retry_after <= Duration::from_secs(9), "{retry_after:?}");
            }
            Err(other) => panic!("unexpected refusal {other:?}"),
        }
    }
    assert_eq!(admitted, 7);
    assert_eq!(b.status(&lim).requests.unwrap().limit, 7);

    // Tokens: a reservation on one replica counts on the other; unused tokens come back.
    let lim = key_limits(None, Some(1000));
    let hold = a.reserve_tokens(&lim, 800).await.unwrap();
    assert!(b.reserve_tokens(&lim, 300).await.is_err());
    a.settle_tokens(&hold, 100); // gives 700 back, in the background
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match b.reserve_tokens(&lim, 300).await {
            Ok(_) => break,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("unused tokens never came back: {e:?}"),
        }
    }
    assert!(b.reserve_tokens(&lim, 1001).await.is_err());

    // Budgets: 40 concurrent requests of at most 100 against 1,000, half on each replica.
    let mut tasks = Vec::new();
    for i in 0..40 {
        let (l, store) = replica(i % 2 == 0);
        tasks.push(tokio::spawn(async move {
            l.reserve_budget(Some(&store), &format!("req-{i}"), "acme", 1000, 100)
                .await
                .answered()
                .map(|hold| (i, hold))
        }));
    }
    let (holds, _) = holds_and_quota_refusals(tasks).await;
    assert_eq!(holds.len(), 10);
    assert!(b
        .reserve_budget(Some(&b_store), "one-more", "acme", 1000, 1)
        .await
        .answered()
        .is_err());

    // Records reaching the ledger release their holds and count their actual cost: 10 × 30
    // spent, so 700 are free again. A record written twice counts once.
    let now = tollgate_metering::store::now_micros();
    let records: Vec<_> = holds
        .iter()
        .map(|(i, _)| contract::record(&format!("req-{i}"), "acme", "m", now, 30))
        .collect();
    assert_eq!(a_store.insert_records(&records).await.unwrap(), 10);
    assert_eq!(b_store.insert_records(&records).await.unwrap(), 0);
    let h = b
        .reserve_budget(Some(&b_store), "after", "acme", 1000, 700)
        .await
        .answered()
        .expect("700 of 1,000 are free once the records are in");
    assert!(a
        .reserve_budget(Some(&a_store), "after-2", "acme", 1000, 1)
        .await
        .answered()
        .is_err());
    // A request that never reached a model gives its hold back whole.
    b.release_budget(&h);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match a
            .reserve_budget(Some(&a_store), "after-3", "acme", 1000, 700)
            .await
            .answered()
        {
            Ok(_) => break,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("the released hold still counts: {e:?}"),
        }
    }

    // A replica that vanished with its spool leaves holds behind; once expired they no longer
    // refuse anyone.
    a.reserve_budget(Some(&a_store), "ghost-1", "ghost", 1000, 1000)
        .await
        .answered()
        .expect("the whole budget");
    assert!(b
        .reserve_budget(Some(&b_store), "ghost-2", "ghost", 1000, 1)
        .await
        .answered()
        .is_err());
    a_store
        .execute_raw("UPDATE budget_holds SET expires_at = 0 WHERE id = 'ghost-1'")
        .await
        .unwrap();
    b.reserve_budget(Some(&b_store), "ghost-2", "ghost", 1000, 1000)
        .await
        .answered()
        .expect("the expired hold was cleared");

    // A key's own budget: 20 concurrent requests of at most 100 against the key's 500, under
    // a customer budget of 10,000, half on each replica: exactly 5 hold.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let (l, store) = replica(i % 2 == 0);
        tasks.push(tokio::spawn(async move {
            l.reserve_budgets(
                Some(&store),
                &format!("kreq-{i}"),
                ("keyco", Some(10_000)),
                ("key_keyco", Some(500)),
                100,
            )
            .await
            .answered()
            .map(|hold| (i, hold))
        }));
    }
    let (key_holds, refused) = holds_and_quota_refusals(tasks).await;
    for message in refused {
        assert!(message.contains("budget of key key_keyco"), "{message}");
    }
    assert_eq!(key_holds.len(), 5);
    // Their records (at 40 each) release both holds: the key has 300 free, the customer all
    // but 200.
    let records: Vec<_> = key_holds
        .iter()
        .map(|(i, _)| contract::record(&format!("kreq-{i}"), "keyco", "m", now, 40))
        .map(|mut r| {
            r.key_id = "key_keyco".into();
            r
        })
        .collect();
    assert_eq!(b_store.insert_records(&records).await.unwrap(), 5);
    let key_only = |l: &Limiter, store: Store, id: &str, amount| {
        let (l, id) = (l.clone(), id.to_string());
        async move {
            l.reserve_budgets(
                Some(&store),
                &id,
                ("keyco", Some(10_000)),
                ("key_keyco", Some(500)),
                amount,
            )
            .await
            .answered()
        }
    };
    assert!(key_only(&a, a_store.clone(), "k-301", 301).await.is_err());
    assert!(key_only(&a, a_store.clone(), "k-300", 300).await.is_ok());
    assert!(key_only(&b, b_store.clone(), "k-1", 1).await.is_err());
    a_store.close().await;
    b_store.close().await;
}

#[path = "common/ledger_rules.rs"]
mod ledger_rules;

#[tokio::test]
async fn postgres_ledger_charges_a_key_once() {
    let store = fresh_database("tollgate_charge_once").await;
    ledger_rules::ledger_charges_a_key_once(&store).await;
}

#[tokio::test]
async fn postgres_a_failing_alert_step_does_not_hold_the_records() {
    let store = fresh_database("tollgate_alert_failure").await;
    ledger_rules::a_failing_alert_step_does_not_hold_the_records(&store).await;
}

/// A budget's answer, the database having answered (a store error fails the test).
trait Answered<T> {
    fn answered(self) -> Result<T, Refusal>;
}

impl<T> Answered<T> for Result<T, BudgetError> {
    fn answered(self) -> Result<T, Refusal> {
        self.map_err(|e| match e {
            BudgetError::Refused(r) => r,
            BudgetError::Store(e) => panic!("the store failed: {e}"),
        })
    }
}

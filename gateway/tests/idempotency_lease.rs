//! One charge per Idempotency-Key, whatever happens to the first run (SQLite; the PostgreSQL
//! cases are in `store_postgres.rs`): a run that lost its lease to a retry is stopped, recorded
//! `superseded` and not charged, its client gets a clear error. That the ledger itself charges
//! a key once, and the budget alert step that fails without holding the records back, are the
//! store's (`metering/tests/store.rs`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "an integration test crate: its helpers, outside `#[test]` fns, are not covered by clippy.toml's allow-*-in-tests"
)]

use std::sync::Arc;

use serde_json::Value;
use tollgate_metering::store::Store;

#[path = "common/gateways.rs"]
mod gateways;
#[path = "common/serve.rs"]
mod serve;

use gateways::{assert_one_charge, chat, post_keyed, wait_records, GatedBackend, Gateway};

/// A lease of an hour: it is renewed every 20 minutes, so during a test it lapses only when
/// the test lapses it, as a gateway that stalled past its lease would find it.
const LONG_LEASE: &str = "[server]\nidempotency_lease_ms = 3600000\nshutdown_timeout_secs = 30\n";

/// A gateway with the long lease metering into SQLite in `dir`, in front of a gated backend.
async fn sqlite_gateway(dir: &tempfile::TempDir) -> (Store, Arc<GatedBackend>, Gateway) {
    let store = Store::connect(dir.path().join("l.db").to_str().unwrap())
        .await
        .unwrap();
    let backend = Arc::new(GatedBackend::default());
    let spool = dir.path().join("s");
    let g = Gateway::start(LONG_LEASE, backend.clone(), store.clone(), &spool).await;
    (store, backend, g)
}

async fn lapse_the_lease(store: &Store) {
    store
        .execute_raw("UPDATE idempotency_keys SET lease_until = 0")
        .await
        .unwrap();
}

async fn expect_superseded_error(response: reqwest::Response) {
    assert_eq!(response.status(), 409);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["error"]["code"], "idempotency_key_in_progress",
        "{body}"
    );
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("not charged"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_run_that_stalls_past_its_lease_is_not_charged_when_the_retry_completes() {
    let dir = tempfile::tempdir().unwrap();
    let (store, backend, g) = sqlite_gateway(&dir).await;
    let body = chat("hi", false);
    let first = tokio::spawn({
        let (addr, body) = (g.addr, body.clone());
        async move { post_keyed(addr, &body, "job-1").await }
    });
    backend.wait_started(1).await;
    // The first run stalls past its lease; the retry takes the key over and completes.
    lapse_the_lease(&store).await;
    let retry = post_keyed(g.addr, &body, "job-1").await;
    assert_eq!(retry.status(), 200);
    let retry_id = retry.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    let answer: Value = retry.json().await.unwrap();
    assert_eq!(answer["choices"][0]["message"]["content"], "Hello world");
    // Then the first one finishes: its client is told, and it is not charged.
    backend.release();
    expect_superseded_error(first.await.unwrap()).await;
    // A repeat gets the retry's answer.
    let again = post_keyed(g.addr, &body, "job-1").await;
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let replayed: Value = again.json().await.unwrap();
    assert_eq!(replayed, answer);
    assert_eq!(backend.started(), 2);
    let records = wait_records(&store, "job-1", 2).await;
    assert_one_charge(&records, 2);
    assert!(records
        .iter()
        .any(|r| r.id == retry_id && r.status.is_charged()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_first_run_that_lost_its_key_ends_with_an_error_and_is_not_charged() {
    let dir = tempfile::tempdir().unwrap();
    let (store, backend, g) = sqlite_gateway(&dir).await;
    let body = chat("hi", true);
    let first = post_keyed(g.addr, &body, "job-2").await;
    assert_eq!(first.status(), 200);
    backend.wait_started(1).await;
    lapse_the_lease(&store).await;
    let retry = post_keyed(g.addr, &body, "job-2").await;
    assert_eq!(retry.status(), 200);
    let retry_text = retry.text().await.unwrap();
    assert!(retry_text.contains(" world") && retry_text.ends_with("data: [DONE]\n\n"));
    assert!(!retry_text.contains("\"error\""));
    backend.release();
    let first_text = first.text().await.unwrap();
    let events: Vec<&str> = first_text.split("\n\n").filter(|e| !e.is_empty()).collect();
    let n = events.len();
    assert!(n >= 2, "{first_text}");
    assert_eq!(events[n - 1], "data: [DONE]");
    let error: Value = serde_json::from_str(events[n - 2].strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(
        error["error"]["code"], "idempotency_key_in_progress",
        "{first_text}"
    );
    assert_one_charge(&wait_records(&store, "job-2", 2).await, 2);
    g.stop().await;
}

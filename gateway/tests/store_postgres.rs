//! Gateways sharing one PostgreSQL server: the Idempotency-Key lease across replicas, and
//! the alert settings the gateway writes. Built only with the `postgres-tests` feature;
//! `scripts/test.sh` starts a throwaway server (scripts/postgres.sh) and runs
//! `cargo test -p tollgate-gateway --features postgres-tests --test store_postgres` with
//! `TOLLGATE_TEST_POSTGRES_URL` naming its empty database. The store contract itself, and the
//! limits and budgets replicas share, are tested next to the store
//! (`metering/tests/store_postgres.rs`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "an integration test crate: its helpers, outside `#[test]` fns, are not covered by clippy.toml's allow-*-in-tests"
)]

use std::time::Duration;

use tollgate_metering::store::Store;

#[path = "common/alert_settings.rs"]
mod alert_settings;

/// The database the run was given: `TOLLGATE_TEST_POSTGRES_URL`.
fn test_url() -> String {
    std::env::var("TOLLGATE_TEST_POSTGRES_URL")
        .expect("TOLLGATE_TEST_POSTGRES_URL must name an empty PostgreSQL database")
}

/// A second, empty database on the same server (each test wants its own).
async fn fresh_database(name: &str) -> Store {
    let admin = Store::connect(&test_url()).await.unwrap();
    for sql in [
        format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        format!("CREATE DATABASE {name}"),
    ] {
        admin.execute_raw(&sql).await.unwrap();
    }
    admin.close().await;
    Store::connect(&database_url(name)).await.unwrap()
}

#[tokio::test]
async fn postgres_alert_settings() {
    let store = fresh_database("tollgate_alert_settings").await;
    alert_settings::issue_a_secret_and_keep_the_thresholds(&store).await;
}

#[path = "common/gateways.rs"]
mod gateways;
#[path = "common/serve.rs"]
mod serve;
/// `postgres://user@host:port/db` with `host:port` replaced.
fn with_address(url: &str, addr: std::net::SocketAddr) -> (String, std::net::SocketAddr) {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (auth_host, path) = rest.split_once('/').unwrap();
    let (user, host) = match auth_host.rsplit_once('@') {
        Some((u, h)) => (format!("{u}@"), h),
        None => (String::new(), auth_host),
    };
    let upstream: std::net::SocketAddr = host
        .replace("localhost", "127.0.0.1")
        .parse()
        .expect("the test URL names host:port");
    (format!("{scheme}://{user}{addr}/{path}"), upstream)
}

/// The URL of the database `name` on the same server.
fn database_url(name: &str) -> String {
    let url = test_url();
    let (base, _) = url.rsplit_once('/').unwrap();
    format!("{base}/{name}")
}

/// Issue 29 (b): a replica cut off from the database for longer than its lease stops the run
/// (its client gets an error), the retry on a replica that reaches the database runs, and the
/// key is charged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_replica_cut_off_past_its_lease_stops_its_run_and_the_key_is_charged_once() {
    use gateways::*;
    let store = fresh_database("tollgate_lease_cut").await;
    let db_url = database_url("tollgate_lease_cut");
    let (_, upstream) = with_address(&db_url, "127.0.0.1:1".parse().unwrap());
    let proxy = Proxy::start(upstream).await;
    let (proxied, _) = with_address(&db_url, proxy.addr);
    let cut_off = Store::connect(&proxied).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let backend = std::sync::Arc::new(GatedBackend::default());
    let server = "[server]\nidempotency_lease_ms = 1000\nshutdown_timeout_secs = 30\n";
    let g1 = Gateway::start(server, backend.clone(), cut_off, &dir.path().join("1")).await;
    let g2 = Gateway::start(
        server,
        backend.clone(),
        store.clone(),
        &dir.path().join("2"),
    )
    .await;
    let body = chat("hi", true);
    let first = post_keyed(g1.addr, &body, "job-cut").await;
    assert_eq!(first.status(), 200);
    backend.wait_started(1).await;
    proxy.cut();
    // Its sequence waits for a word that never comes: only losing the lease ends it.
    let text = tokio::time::timeout(Duration::from_secs(60), first.text())
        .await
        .expect("the run that lost its lease stops")
        .unwrap();
    assert!(
        text.ends_with("data: [DONE]\n\n") && text.contains("idempotency_key_in_progress"),
        "{text}"
    );
    // The retry, on the replica that reaches the database, once the lease the database holds
    // has run out (a renewal may have reached it as the cut began).
    let answer = loop {
        let retry = post_keyed(g2.addr, &body, "job-cut").await;
        if retry.status() == 409 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        assert_eq!(retry.status(), 200);
        break retry.text().await.unwrap();
    };
    assert!(
        answer.contains(" world") && !answer.contains("\"error\""),
        "{answer}"
    );
    assert_eq!(backend.started(), 2);
    proxy.restore();
    // The stopped run's record reaches the database once the replica is back.
    assert_one_charge(&wait_records(&store, "job-cut", 2).await, 2);
    g1.stop().await;
    g2.stop().await;
}

/// Issue 29 (c): the same key sent to two replicas at once runs once and is charged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_the_same_key_on_two_replicas_at_once_runs_once() {
    use gateways::*;
    let store = fresh_database("tollgate_lease_race").await;
    let other = Store::connect(&database_url("tollgate_lease_race"))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let backend = std::sync::Arc::new(GatedBackend::default());
    let server = "[server]\nshutdown_timeout_secs = 30\n";
    let g1 = Gateway::start(
        server,
        backend.clone(),
        store.clone(),
        &dir.path().join("1"),
    )
    .await;
    let g2 = Gateway::start(server, backend.clone(), other, &dir.path().join("2")).await;
    let body = chat("hi", false);
    let send = |addr| {
        let body = body.clone();
        tokio::spawn(async move { post_keyed(addr, &body, "job-race").await })
    };
    let (mut a, mut b) = (send(g1.addr), send(g2.addr));
    backend.wait_started(1).await;
    // The run waits for the test's word: the response that comes first is the other one's.
    let (refused, running) = tokio::select! {
        r = &mut a => (r.unwrap(), b),
        r = &mut b => (r.unwrap(), a),
    };
    assert_eq!(refused.status(), 409);
    let error: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(error["error"]["code"], "idempotency_key_in_progress");
    backend.release();
    let done = running.await.unwrap();
    assert_eq!(done.status(), 200);
    assert_eq!(backend.started(), 1, "one run");
    wait_records(&store, "job-race", 1).await;
    g1.stop().await;
    g2.stop().await;
    // The refused request never ran: it has no record to come.
    let records = records_of_key(&store, "job-race").await;
    assert_eq!(records.len(), 1, "{records:#?}");
    assert!(records[0].status.is_charged());
}

//! Lifecycle: cancellation on disconnect, shutdown, the ledger's outcomes, loading, and the
//! operators' own port.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tollgate_gateway::auth::AuthConfig;
use tollgate_gateway::backend::Backend;
use tollgate_gateway::config::Config;
use tollgate_gateway::AppState;
use tollgate_metering::store::Store;

use super::scripted::*;
use super::serve::{wait_records_where, FAKE_MODEL};

#[tokio::test]
async fn client_disconnect_cancels_the_sequence() {
    let s = default_server().await;
    let r = post_streamed(s.addr, "endless").await;
    let mut stream = r.bytes_stream();
    for _ in 0..3 {
        stream.next().await.unwrap().unwrap();
    }
    assert_eq!(s.backend.dropped.load(Ordering::SeqCst), 0);
    drop(stream);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while s.backend.dropped.load(Ordering::SeqCst) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the backend stream was not dropped"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The server keeps serving.
    let r = post(s.addr, "/v1/chat/completions", &chat("hi")).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn shutdown_lets_in_flight_streams_finish() {
    let mut s = default_server().await;
    let r = post_streamed(s.addr, "slow").await;
    assert_eq!(r.status(), 200);
    s.shutdown.take().unwrap().send(()).unwrap();
    let text = r.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert_eq!(
        sse_data(&text)
            .iter()
            .filter(|e| e.contains("\"content\":\"s\""))
            .count(),
        5
    );
    s.done.await.unwrap().unwrap();
    // New connections are refused once the server is down.
    assert!(reqwest::Client::new()
        .get(format!("http://{}/health", s.addr))
        .send()
        .await
        .is_err());
}

#[tokio::test]
async fn shutdown_timeout_drops_endless_streams() {
    let mut s = start("[server]\nshutdown_timeout_secs = 1\n").await;
    let r = post_streamed(s.addr, "endless").await;
    s.shutdown.take().unwrap().send(()).unwrap();
    let started = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(10), s.done)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(900));
    drop(r);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while s.backend.dropped.load(Ordering::SeqCst) == 0 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn ledger_records_completed_failed_and_cancelled_but_not_unstarted() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::connect(dir.path().join("l.db").to_str().unwrap())
        .await
        .unwrap();
    let spool = dir.path().join("l.spool");
    let mut s = start_with(
        "[server]\nshutdown_timeout_secs = 5\n",
        Some((store.clone(), &spool)),
    )
    .await;
    // Completed: 3 prompt + 2 output tokens at 1 and 2 USD per million = 7,000 nano-USD.
    let ok = post(s.addr, "/v1/chat/completions", &chat("hi")).await;
    assert_eq!(ok.status(), 200);
    let ok_id = ok.headers()["x-request-id"].to_str().unwrap().to_string();
    // Failed after one token: recorded, not charged.
    let failed = post(s.addr, "/v1/chat/completions", &chat("fail-mid")).await;
    assert_eq!(failed.status(), 500);
    let failed_id = failed.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    // Never started (overloaded): no record.
    let overloaded = post(s.addr, "/v1/chat/completions", &chat("overload")).await;
    assert_eq!(overloaded.status(), 503);
    // Cancelled mid-stream: billed for the tokens generated before the engine stopped.
    let r = post_streamed(s.addr, "endless").await;
    let cancelled_id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let mut stream = r.bytes_stream();
    for _ in 0..3 {
        stream.next().await.unwrap().unwrap();
    }
    drop(stream);

    wait_records_where(&store, 3, |_| true).await;
    // A graceful shutdown writes every record still pending before it returns, so what the
    // ledger holds after it is all there will ever be: no fourth record (the unstarted one).
    s.shutdown.take().unwrap().send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), &mut s.done)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let (records, _) = store.records_after(0, 100).await.unwrap();
    assert_eq!(records.len(), 3, "exactly three records");
    let by_id = |id: &str| records.iter().find(|r| r.id == id).unwrap().clone();
    let ok = by_id(&ok_id);
    assert_eq!(
        (
            ok.status.as_str(),
            ok.input_tokens,
            ok.output_tokens,
            ok.cost_nano_usd
        ),
        ("completed", 3, 2, 7_000)
    );
    assert_eq!(ok.finish_reason.map(|f| f.as_str()), Some("stop"));
    assert_eq!((ok.customer_id.as_str(), ok.stream), ("default", false));
    assert_eq!(
        (
            ok.input_price_per_mtok.to_string(),
            ok.output_price_per_mtok.to_string()
        ),
        ("1".to_string(), "2".to_string())
    );
    let failed = by_id(&failed_id);
    assert_eq!(
        (
            failed.status.as_str(),
            failed.output_tokens,
            failed.cost_nano_usd
        ),
        ("failed", 1, 0)
    );
    let cancelled = by_id(&cancelled_id);
    assert_eq!(cancelled.status.as_str(), "cancelled");
    assert!(cancelled.stream && cancelled.output_tokens >= 1);
    assert_eq!(
        cancelled.cost_nano_usd,
        3_000 + 2_000 * cancelled.output_tokens
    );
}

/// While the models load, the port answers 503 (`/health` says `loading`, the API an OpenAI
/// error with `Retry-After`); then the same socket is handed over for serving.
#[tokio::test]
async fn answers_503_while_loading_then_hands_over_the_socket() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (finish, loaded) = oneshot::channel::<u32>();
    let task = tokio::spawn(tollgate_gateway::answer_while_loading(
        listener,
        async { Ok(loaded.await?) },
        std::future::pending(),
    ));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let health = || async {
        client
            .get(format!("http://{addr}/health"))
            .send()
            .await
            .unwrap()
    };
    let r = health().await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "loading");
    let r = client
        .post(format!("http://{addr}/v1/chat/completions"))
        .json(&json!({"model": MODEL, "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "5");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "service_unavailable", "{body}");

    finish.send(7).unwrap();
    let (listener, loaded) = task.await.unwrap().unwrap().expect("loaded");
    assert_eq!(loaded, 7);
    assert_eq!(listener.local_addr().unwrap(), addr);
    let app = axum::Router::new().route("/health", axum::routing::get(|| async { "ready" }));
    tokio::spawn(async move { axum::serve(listener, app).await });
    let r = health().await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "ready");
}

/// A shutdown signal during loading ends it without serving.
#[tokio::test]
async fn shutdown_while_loading_returns_none() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let loaded = tollgate_gateway::answer_while_loading(
        listener,
        std::future::pending::<anyhow::Result<()>>(),
        async {},
    )
    .await
    .unwrap();
    assert!(loaded.is_none());
}

/// With a listener of their own, the admin API and the metrics leave the public port; both
/// ports answer `/health`, and both stop on the shutdown signal.
#[tokio::test]
async fn operator_endpoints_can_have_their_own_port() {
    let config = Config::from_toml_str(
        &format!("[server]\nshutdown_timeout_secs = 5\n{FAKE_MODEL}"),
        Path::new("."),
    )
    .unwrap();
    let mut backends: HashMap<String, Arc<dyn Backend>> = HashMap::new();
    backends.insert(
        MODEL.into(),
        Arc::new(Shared(Arc::new(FakeBackend::default()))),
    );
    let state = AppState::new(config, backends, AuthConfig::from_keys([KEY]))
        .unwrap()
        .with_admin_token(Some("admin-secret".into()));
    let public = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let operator = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (public_addr, operator_addr) =
        (public.local_addr().unwrap(), operator.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let done = tokio::spawn(tollgate_gateway::run_split(
        public,
        Some(operator),
        state,
        async move {
            let _ = stopped.await;
        },
    ));
    let client = reqwest::Client::new();
    let admin_get = |addr: SocketAddr, path: &'static str| {
        client
            .get(format!("http://{addr}{path}"))
            .bearer_auth("admin-secret")
            .send()
    };
    let status = |addr: SocketAddr, path: &'static str| {
        let response = admin_get(addr, path);
        async move { response.await.unwrap().status() }
    };
    let chat_status = |addr: SocketAddr| async move {
        post(addr, "/v1/chat/completions", &chat("hi"))
            .await
            .status()
    };
    assert_eq!(status(public_addr, "/metrics").await, 404);
    assert_eq!(status(public_addr, "/admin/v1/customers").await, 404);
    assert_eq!(status(public_addr, "/health").await, 200);
    assert_eq!(chat_status(public_addr).await, 200);
    let metrics = admin_get(operator_addr, "/metrics").await.unwrap();
    assert_eq!(metrics.status(), 200);
    assert!(metrics
        .text()
        .await
        .unwrap()
        .contains("tollgate_requests_total"));
    assert_eq!(status(operator_addr, "/health").await, 200);
    // The admin API is there (without a database it says so), and not the OpenAI API.
    assert_ne!(status(operator_addr, "/admin/v1/customers").await, 404);
    assert_eq!(chat_status(operator_addr).await, 404);

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), done)
        .await
        .expect("both servers stop")
        .unwrap()
        .unwrap();
    assert!(client
        .get(format!("http://{operator_addr}/health"))
        .send()
        .await
        .is_err());
}

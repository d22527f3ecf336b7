//! Gateways metering into a real store, in front of a scripted backend whose first sequence
//! waits for the test's word: for the idempotency lease tests (one gateway on SQLite; two
//! replicas on PostgreSQL, one of them behind a proxy the test can cut).

#![allow(
    dead_code,
    reason = "each test crate includes this module and uses only some of it"
)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::{oneshot, watch, Notify};
use tollgate_gateway::auth::AuthConfig;
use tollgate_gateway::backend::{
    Backend, BackendError, EventStream, FinishReason, GenerateEvent, GenerateRequest, ModelInfo,
    Prepared, Start, Usage,
};
use tollgate_gateway::config::Config;
use tollgate_gateway::AppState;
use tollgate_metering::store::{Store, UsageRecord};

use crate::serve::{
    fake_model_info, records_where, serve, wait_records_where, with_default_billing, Serving,
    FAKE_MODEL,
};

pub const KEY: &str = "test-key";
pub const MODEL: &str = "fake";

/// Every sequence: 3 prompt tokens, then "Hello" and " world" (2 output tokens, 7,000
/// nano-USD at the fake model's prices). The first sequence started waits between its two
/// tokens until [`GatedBackend::release`].
pub struct GatedBackend {
    started: watch::Sender<usize>,
    gate_taken: AtomicBool,
    gate: Arc<Notify>,
    /// Sequences dropped before their end (stopped).
    pub stopped: Arc<AtomicUsize>,
}

impl Default for GatedBackend {
    fn default() -> Self {
        Self {
            started: watch::channel(0).0,
            gate_taken: AtomicBool::new(false),
            gate: Arc::new(Notify::new()),
            stopped: Arc::default(),
        }
    }
}

impl GatedBackend {
    pub fn started(&self) -> usize {
        *self.started.borrow()
    }

    /// Resolves once `n` sequences have started.
    pub async fn wait_started(&self, n: usize) {
        let mut rx = self.started.subscribe();
        let _ = rx.wait_for(|s| *s >= n).await;
    }

    /// Lets the first sequence go on.
    pub fn release(&self) {
        self.gate.notify_one();
    }
}

struct Shared(Arc<GatedBackend>);

struct Ended(bool, Arc<AtomicUsize>);

impl Drop for Ended {
    fn drop(&mut self) {
        if !self.0 {
            self.1.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[async_trait::async_trait]
impl Backend for Shared {
    fn info(&self) -> ModelInfo {
        fake_model_info()
    }

    async fn prepare(&self, _request: GenerateRequest) -> Result<Prepared, BackendError> {
        let backend = self.0.clone();
        let start: Start = Box::new(move || {
            let gated = !backend.gate_taken.swap(true, Ordering::SeqCst);
            let gate = backend.gate.clone();
            let stopped = backend.stopped.clone();
            backend.started.send_modify(|n| *n += 1);
            let stream = async_stream::stream! {
                let mut ended = Ended(false, stopped);
                yield Ok(GenerateEvent::Started { prompt_tokens: 3 });
                yield Ok(GenerateEvent::Delta { text: "Hello".into(), logprobs: vec![], completion_tokens: 1 });
                if gated {
                    gate.notified().await;
                }
                yield Ok(GenerateEvent::Delta { text: " world".into(), logprobs: vec![], completion_tokens: 2 });
                ended.0 = true;
                yield Ok(GenerateEvent::Finished {
                    reason: FinishReason::Stop,
                    usage: Usage { prompt_tokens: 3, completion_tokens: 2, ..Default::default() },
                });
            };
            let stream: EventStream = Box::pin(stream);
            Ok(stream)
        });
        Ok(Prepared {
            prompt_tokens: 3,
            max_tokens: 16,
            start,
            progress: None,
            cached: None,
        })
    }
}

/// A gateway on an ephemeral port.
pub struct Gateway {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Gateway {
    /// `server` is the catalogue's `[server]` table (e.g. with `idempotency_lease_ms`).
    pub async fn start(
        server: &str,
        backend: Arc<GatedBackend>,
        store: Store,
        spool: &Path,
    ) -> Self {
        let config =
            Config::from_toml_str(&format!("{server}{FAKE_MODEL}"), Path::new(".")).unwrap();
        let mut backends: HashMap<String, Arc<dyn Backend>> = HashMap::new();
        backends.insert(MODEL.into(), Arc::new(Shared(backend)));
        let state = AppState::new(config, backends, AuthConfig::from_keys([KEY])).unwrap();
        let state = with_default_billing(state, store, spool).await;
        let Serving {
            addr,
            shutdown,
            done,
        } = serve(state).await;
        Self {
            addr,
            shutdown,
            done,
        }
    }

    /// Graceful shutdown: every record it holds is written (or left in its spool when its
    /// database cannot be reached).
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(120), &mut self.done)
            .await
            .expect("the gateway stops")
            .unwrap()
            .unwrap();
    }
}

pub fn chat(content: &str, stream: bool) -> Value {
    json!({"model": MODEL, "stream": stream, "messages": [{"role": "user", "content": content}]})
}

pub async fn post_keyed(addr: SocketAddr, body: &Value, key: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("http://{addr}/v1/chat/completions"))
        .bearer_auth(KEY)
        .header("Idempotency-Key", key)
        .json(body)
        .send()
        .await
        .unwrap()
}

fn of_key(key: &str) -> impl Fn(&UsageRecord) -> bool + '_ {
    move |r| r.idempotency_key.as_deref() == Some(key)
}

/// The records of `key`, in ledger order.
pub async fn records_of_key(store: &Store, key: &str) -> Vec<UsageRecord> {
    records_where(store, of_key(key)).await
}

/// The records of `key` once there are `n` of them (the ledger writes in the background).
pub async fn wait_records(store: &Store, key: &str, n: usize) -> Vec<UsageRecord> {
    wait_records_where(store, n, of_key(key)).await
}

/// Asserts one charged record and the others superseded (tokens kept, nothing charged).
pub fn assert_one_charge(records: &[UsageRecord], expected: usize) {
    assert_eq!(records.len(), expected, "records: {records:#?}");
    let charged: Vec<_> = records.iter().filter(|r| r.status.is_charged()).collect();
    assert_eq!(charged.len(), 1, "one charged record: {records:#?}");
    assert_eq!(charged[0].cost_nano_usd, 7_000);
    for r in records.iter().filter(|r| !r.status.is_charged()) {
        assert_eq!(r.status.as_str(), "superseded", "{r:#?}");
        assert_eq!((r.cost_nano_usd, r.input_tokens), (0, 3), "{r:#?}");
        assert!(r.output_tokens >= 1, "its tokens are kept: {r:#?}");
    }
}

/// A TCP proxy to the database that the test can cut (every connection dropped, new ones
/// refused) and restore: a gateway cut off from the database while another reaches it.
pub struct Proxy {
    pub addr: SocketAddr,
    open: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (o, c) = (open.clone(), conns.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !o.load(Ordering::SeqCst) {
                    continue;
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
                c.lock().unwrap().push(task.abort_handle());
            }
        });
        Self { addr, open, conns }
    }

    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

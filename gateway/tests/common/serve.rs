//! A gateway serving an `AppState` on an ephemeral port until the test stops it, and the fake
//! model's catalogue entry that the gateway tests share (its backend is replaced by each
//! test's own).

#![allow(
    dead_code,
    reason = "each test crate includes this module and uses only some of it"
)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tollgate_gateway::backend::ModelInfo;
use tollgate_gateway::AppState;
use tollgate_metering::store::{Store, UsageRecord};

/// The catalogue entry of the fake model (`fake`, priced 1 and 2 USD per million tokens).
pub const FAKE_MODEL: &str = r#"
[models.fake]
source = { path = "unused.gguf" }
backend = { type = "http", urls = ["http://127.0.0.1:9"] }
price = { input_per_mtok = "1", output_per_mtok = "2" }
"#;

/// A scripted answer: 3 prompt tokens, then `text` as one token, then the end.
pub fn answering(text: String) -> tollgate_gateway::backend::Prepared {
    use tollgate_gateway::backend::{FinishReason, GenerateEvent, Start, Usage};
    let start: Start = Box::new(move || {
        Ok(Box::pin(async_stream::stream! {
            yield Ok(GenerateEvent::Started { prompt_tokens: 3 });
            yield Ok(GenerateEvent::Delta { text, logprobs: vec![], completion_tokens: 1 });
            yield Ok(GenerateEvent::Finished {
                reason: FinishReason::Stop,
                usage: Usage { prompt_tokens: 3, completion_tokens: 1, ..Default::default() },
            });
        }))
    });
    tollgate_gateway::backend::Prepared {
        prompt_tokens: 3,
        max_tokens: 8,
        start,
        progress: None,
        cached: None,
    }
}

/// What the fake model's backends say of it.
pub fn fake_model_info() -> ModelInfo {
    model_info("fake")
}

/// What a scripted model `id` says of itself.
pub fn model_info(id: &str) -> ModelInfo {
    ModelInfo {
        id: id.into(),
        context_length: 64,
        created: 1_700_000_000,
        owned_by: "tests".into(),
    }
}

/// A running gateway.
pub struct Serving {
    pub addr: SocketAddr,
    /// Starts the graceful shutdown (taken once).
    pub shutdown: Option<oneshot::Sender<()>>,
    /// `run`'s end, after the shutdown.
    pub done: JoinHandle<anyhow::Result<()>>,
}

/// `state` served by `tollgate_gateway::run` on `127.0.0.1:0`.
pub async fn serve(state: AppState) -> Serving {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel();
    let done = tokio::spawn(tollgate_gateway::run(listener, state, async move {
        let _ = rx.await;
    }));
    Serving {
        addr,
        shutdown: Some(tx),
        done,
    }
}

/// `state` metering into `store` (spool at `spool`, default sync) for the customer `default`,
/// whom static keys bill.
pub async fn with_default_billing(state: AppState, store: Store, spool: &Path) -> AppState {
    store.ensure_customer("default", "Default").await.unwrap();
    state
        .with_billing(
            store,
            spool,
            tollgate_metering::ledger::SpoolSync::default(),
        )
        .unwrap()
}

/// The ledger's records that `keep` selects, in ledger order.
pub async fn records_where(store: &Store, keep: impl Fn(&UsageRecord) -> bool) -> Vec<UsageRecord> {
    let (records, _) = store.records_after(0, 10_000).await.unwrap();
    records.into_iter().filter(|r| keep(r)).collect()
}

/// The records `keep` selects once there are `n` of them (the ledger writes in the
/// background); the test fails after 300 s.
pub async fn wait_records_where(
    store: &Store,
    n: usize,
    keep: impl Fn(&UsageRecord) -> bool,
) -> Vec<UsageRecord> {
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    loop {
        let records = records_where(store, &keep).await;
        if records.len() >= n {
            return records;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of {n} records: {records:#?}",
            records.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

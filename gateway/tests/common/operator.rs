//! The operator tests' server: a gateway with the scripted model `fake` (and `fake2`) that
//! answers "Hello", a real SQLite ledger, the admin token [`ADMIN`]; records to write into it,
//! and the console's sign-in.

#![allow(
    dead_code,
    reason = "each test crate includes this module and uses only some of it"
)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::sync::oneshot;
use tollgate_gateway::auth::AuthConfig;
use tollgate_gateway::backend::{Backend, BackendError, GenerateRequest, ModelInfo, Prepared};
use tollgate_gateway::config::Config;
use tollgate_gateway::AppState;
use tollgate_metering::kinds::Outcome;
use tollgate_metering::store::{Store, UsageRecord};

use super::serve::serve;

pub const ADMIN: &str = "operator-admin";

pub const MODELS: &str = r#"
[models.fake]
source = { path = "unused.gguf" }
backend = { type = "http", urls = ["http://127.0.0.1:9"] }
price = { input_per_mtok = "1", output_per_mtok = "2", reserved_per_ktpm_month = "10" }
capacity_tpm = 1000

[models.fake2]
source = { path = "unused.gguf" }
backend = { type = "http", urls = ["http://127.0.0.1:9"] }
price = { input_per_mtok = "1", output_per_mtok = "2" }
"#;

/// Answers "Hello" to everything.
struct Hello(&'static str);

#[async_trait::async_trait]
impl Backend for Hello {
    fn info(&self) -> ModelInfo {
        super::serve::model_info(self.0)
    }

    async fn prepare(&self, _request: GenerateRequest) -> Result<Prepared, BackendError> {
        Ok(super::serve::answering("Hello".into()))
    }
}

pub struct Server {
    pub addr: SocketAddr,
    pub store: Store,
    pub http: reqwest::Client,
    _dir: tempfile::TempDir,
    /// Held: the server runs until the test drops it.
    _stop: Option<oneshot::Sender<()>>,
}

impl Server {
    /// [`MODELS`], each answering "Hello".
    pub async fn start() -> Self {
        let mut backends: HashMap<String, Arc<dyn Backend>> = HashMap::new();
        backends.insert("fake".into(), Arc::new(Hello("fake")));
        backends.insert("fake2".into(), Arc::new(Hello("fake2")));
        Self::start_with(MODELS, backends).await
    }

    /// The catalogue `models` served by `backends`.
    pub async fn start_with(models: &str, backends: HashMap<String, Arc<dyn Backend>>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::connect(dir.path().join("l.db").to_str().unwrap())
            .await
            .unwrap();
        let config = Config::from_toml_str(models, Path::new(".")).unwrap();
        let state = AppState::new(config, backends, AuthConfig::from_keys(["static-key"]))
            .unwrap()
            .with_billing(
                store.clone(),
                &dir.path().join("l.spool"),
                tollgate_metering::ledger::SpoolSync::default(),
            )
            .unwrap()
            .with_admin_token(Some(ADMIN.into()));
        let serving = serve(state).await;
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        Self {
            addr: serving.addr,
            store,
            http,
            _dir: dir,
            _stop: serving.shutdown,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// An admin call with `token`: the status and the JSON body (`null` when not JSON).
    pub async fn call_as(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .request(method.parse().unwrap(), self.url(path))
            .bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call_as(ADMIN, method, path, body).await
    }

    pub async fn get(&self, path: &str) -> Value {
        let (status, body) = self.call("GET", path, None).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    pub async fn chat(&self, key: &str, model: &str) -> u16 {
        self.http
            .post(self.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }
}

pub fn record(
    id: &str,
    customer: &str,
    key: &str,
    model: &str,
    status: Outcome,
    started_at: i64,
) -> UsageRecord {
    UsageRecord {
        id: id.into(),
        customer_id: customer.into(),
        key_id: key.into(),
        model: model.into(),
        status,
        input_tokens: 10,
        cached_input_tokens: 4,
        output_tokens: 5,
        started_at,
        finished_at: started_at + 1_000,
        input_price_per_mtok: "1".parse().unwrap(),
        output_price_per_mtok: "2".parse().unwrap(),
        cost_nano_usd: 20_000,
        ..UsageRecord::default()
    }
}

/// Signs in at `/console/login`: the status, and the session cookie when one was set.
pub async fn sign_in(s: &Server, token: &str) -> (u16, Option<String>, String) {
    let response = s
        .http
        .post(s.url("/console/login"))
        .form(&[("token", token)])
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let cookie = response
        .headers()
        .get("set-cookie")
        .map(|c| c.to_str().unwrap().split(';').next().unwrap().to_string());
    (status, cookie, response.text().await.unwrap())
}

/// The console's customer list, asked for with the session `cookie`.
pub async fn customers_page(s: &Server, cookie: &str) -> reqwest::Response {
    console_page(s, "/console/customers", cookie).await
}

/// A console page, asked for with the session `cookie`.
pub async fn console_page(s: &Server, path: &str, cookie: &str) -> reqwest::Response {
    s.http
        .get(s.url(path))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap()
}

//! Customers' LoRA adapters over real sockets (issue 34, item 3): registered through the admin
//! API (checked first: a bad adapter is a 400 naming the problem, remote sources are refused),
//! listed, scoped, audited and removed; usable and listed only by the owner's keys (anyone
//! else gets the 404 of an unknown model); the operator's adapters stay everyone's; the
//! record names the base model and the adapter. The base model's backend is scripted: it
//! answers with the name of the adapter a request carries, and refuses adapter files whose
//! directory is named `broken` as the engine would.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "an integration test crate: its helpers, outside `#[test]` fns, are not covered by clippy.toml's allow-*-in-tests"
)]

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{json, Value};
use tollgate_gateway::backend::{
    AdapterBackend, AdapterRef, Backend, BackendError, GenerateRequest, ModelInfo, Prepared,
};

#[path = "common/operator.rs"]
mod operator;
#[path = "common/serve.rs"]
mod serve;

const MODELS: &str = r#"
[models.base]
source = { path = "unused.gguf" }
backend = { type = "local" }
price = { input_per_mtok = "1", output_per_mtok = "2" }

[[models.base.adapters]]
name = "op"
source = { path = "/nonexistent/op" }

[models.up]
source = { path = "unused.gguf" }
backend = { type = "http", urls = ["http://127.0.0.1:9"] }
price = { input_per_mtok = "1", output_per_mtok = "2" }
"#;

/// Says which adapter ran ("adapter pirate", or "base" without one); adapter files in a
/// directory named `broken` do not fit the model.
struct Echo(&'static str);

#[async_trait::async_trait]
impl Backend for Echo {
    fn info(&self) -> ModelInfo {
        serve::model_info(self.0)
    }

    async fn prepare(&self, request: GenerateRequest) -> Result<Prepared, BackendError> {
        let text = match &request.adapter {
            Some(a) if a.path.as_ref().is_some_and(|p| p.ends_with("broken")) => {
                return Err(BackendError::Adapter(format!(
                "LoRA adapter `{}` cannot be loaded: lora_A of q_proj has 7 columns, the model 64",
                a.name
            )))
            }
            Some(a) => format!("adapter {}", a.name),
            None => "base".to_string(),
        };
        Ok(serve::answering(text))
    }
}

/// The operator tests' server on [`MODELS`], and adapter directories: `pirate` (its two
/// files, empty: the scripted engine reads nothing), `broken` and `empty` (no files).
struct Server {
    s: operator::Server,
    adapters: tempfile::TempDir,
}

impl std::ops::Deref for Server {
    type Target = operator::Server;

    fn deref(&self) -> &operator::Server {
        &self.s
    }
}

impl Server {
    async fn start() -> Self {
        let base: Arc<dyn Backend> = Arc::new(Echo("base"));
        let op = AdapterRef {
            name: "op".into(),
            path: Some("/nonexistent/op".into()),
        };
        let mut backends: HashMap<String, Arc<dyn Backend>> = HashMap::new();
        let adapter = AdapterBackend::new(base.clone(), op, "base:op".into(), "ops".into());
        backends.insert("base:op".into(), Arc::new(adapter));
        backends.insert("base".into(), base);
        backends.insert("up".into(), Arc::new(Echo("up")));
        let s = operator::Server::start_with(MODELS, backends).await;
        let adapters = tempfile::tempdir().unwrap();
        for sub in ["pirate", "broken", "empty"] {
            std::fs::create_dir(adapters.path().join(sub)).unwrap();
        }
        for sub in ["pirate", "broken"] {
            for file in ["adapter_config.json", "adapter_model.safetensors"] {
                std::fs::write(adapters.path().join(sub).join(file), b"{}").unwrap();
            }
        }
        Self { s, adapters }
    }

    fn dir(&self, sub: &str) -> String {
        self.adapters.path().join(sub).to_str().unwrap().to_string()
    }

    /// A customer and one key of it; returns the key's secret.
    async fn customer_with_key(&self, id: &str) -> String {
        let (status, body) = self
            .call("POST", "/admin/v1/customers", Some(json!({"id": id})))
            .await;
        assert_eq!(status, 201, "{body}");
        let path = format!("/admin/v1/customers/{id}/keys");
        let (status, key) = self.call("POST", &path, Some(json!({"name": "k"}))).await;
        assert_eq!(status, 201, "{key}");
        key["key"].as_str().unwrap().to_string()
    }

    /// A chat request's status and answer text (or error body).
    async fn chat(&self, key: &str, model: &str) -> (u16, Value) {
        let body = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
        self.call_as(key, "POST", "/v1/chat/completions", Some(body))
            .await
    }

    async fn model_ids(&self, key: &str) -> Vec<String> {
        let (status, list) = self.call_as(key, "GET", "/v1/models", None).await;
        assert_eq!(status, 200, "{list}");
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect()
    }

    async fn add(&self, customer: &str, body: Value) -> (u16, Value) {
        let path = format!("/admin/v1/customers/{customer}/adapters");
        self.call("POST", &path, Some(body)).await
    }
}

/// The owner's keys see and use the adapter; another customer's get the 404 of an unknown
/// model, in the list, in `GET /v1/models/{id}` and on a request; removal ends it.
#[tokio::test]
async fn a_customers_adapter_is_its_owners_alone() {
    let s = Server::start().await;
    let acme = s.customer_with_key("acme").await;
    let other = s.customer_with_key("other").await;
    let body = json!({"base_model": "base", "name": "pirate", "path": s.dir("pirate")});
    let (status, added) = s.add("acme", body).await;
    assert_eq!(status, 201, "{added}");
    assert_eq!(added["id"], "base:pirate");
    assert_eq!(added["object"], "adapter");
    let (status, list) = s
        .call("GET", "/admin/v1/customers/acme/adapters", None)
        .await;
    assert_eq!(
        (status, list["data"][0]["id"].clone()),
        (200, json!("base:pirate"))
    );

    let (status, answer) = s.chat(&acme, "base:pirate").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["choices"][0]["message"]["content"], "adapter pirate");
    assert!(s
        .model_ids(&acme)
        .await
        .contains(&"base:pirate".to_string()));
    let (status, _) = s
        .call_as(&acme, "GET", "/v1/models/base:pirate", None)
        .await;
    assert_eq!(status, 200);

    // To another customer it does not exist: the same answer as a made-up id.
    let (status, refused) = s.chat(&other, "base:pirate").await;
    let (_, unknown) = s.chat(&other, "base:nothing").await;
    assert_eq!(status, 404, "{refused}");
    assert_eq!(refused["error"]["code"], "model_not_found");
    assert_eq!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .replace("pirate", "nothing"),
        unknown["error"]["message"]
    );
    assert!(!s
        .model_ids(&other)
        .await
        .contains(&"base:pirate".to_string()));
    let (status, _) = s
        .call_as(&other, "GET", "/v1/models/base:pirate", None)
        .await;
    assert_eq!(status, 404);
    // The operator's adapter is everyone's.
    for key in [&acme, &other] {
        assert!(s.model_ids(key).await.contains(&"base:op".to_string()));
        let (status, answer) = s.chat(key, "base:op").await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["choices"][0]["message"]["content"], "adapter op");
    }

    // The records name the base model and the adapter beside the model id requested.
    let records = serve::wait_records_where(&s.store, 2, |r| r.customer_id == "acme").await;
    let pirate = records.iter().find(|r| r.model == "base:pirate").unwrap();
    assert_eq!(pirate.base_model.as_deref(), Some("base"));
    assert_eq!(pirate.adapter.as_deref(), Some("pirate"));
    let op = records.iter().find(|r| r.model == "base:op").unwrap();
    assert_eq!(
        (op.base_model.as_deref(), op.adapter.as_deref()),
        (Some("base"), Some("op"))
    );
    let (_, page) = s
        .call(
            "GET",
            "/admin/v1/usage/records?customer_id=acme&model=base:pirate",
            None,
        )
        .await;
    assert_eq!(page["data"][0]["adapter"], "pirate");
    assert_eq!(page["data"][0]["base_model"], "base");

    let (status, removed) = s
        .call("DELETE", "/admin/v1/customers/acme/adapters/pirate", None)
        .await;
    assert_eq!(status, 200, "{removed}");
    let (status, _) = s.chat(&acme, "base:pirate").await;
    assert_eq!(status, 404);
    assert!(!s
        .model_ids(&acme)
        .await
        .contains(&"base:pirate".to_string()));
    let (status, _) = s
        .call("DELETE", "/admin/v1/customers/acme/adapters/pirate", None)
        .await;
    assert_eq!(status, 404);

    let (_, audit) = s.call("GET", "/admin/v1/audit?limit=100", None).await;
    let actions: Vec<&str> = audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["target"]["type"] == "adapter")
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["adapter.added", "adapter.removed"], "{audit}");
}

/// Each bad registration is a 400 (or 404/409) naming the problem; nothing is stored.
#[tokio::test]
async fn a_bad_adapter_is_refused_with_the_reason() {
    let s = Server::start().await;
    s.customer_with_key("acme").await;
    let with = |base: &str, name: &str, path: &str| json!({"base_model": base, "name": name, "path": path});
    let pirate = s.dir("pirate");
    let cases = [
        (
            with("base", "x", "s3://bucket/adapters/x"),
            "path",
            "only local paths are supported",
        ),
        (
            with("base", "x", "HuggingFaceH4/some-lora"),
            "path",
            "only local paths are supported",
        ),
        (with("base", "x", "hf://org/repo"), "path", "Hugging Face"),
        (
            with("base", "x", "/nonexistent/dir"),
            "path",
            "not a directory",
        ),
        (
            with("base", "x", &s.dir("empty")),
            "path",
            "adapter_config.json",
        ),
        (
            with("base", "x", &s.dir("broken")),
            "path",
            "lora_A of q_proj has 7 columns",
        ),
        (
            with("nope", "x", &pirate),
            "base_model",
            "unknown base_model `nope`",
        ),
        (
            with("up", "x", &pirate),
            "base_model",
            "a plain OpenAI-compatible server",
        ),
        (
            with("base:op", "x", &pirate),
            "base_model",
            "is an adapter itself",
        ),
        (with("base", "a:b", &pirate), "name", "adapter name `a:b`"),
    ];
    for (body, param, says) in cases {
        let (status, error) = s.add("acme", body.clone()).await;
        assert_eq!(status, 400, "{body}: {error}");
        assert_eq!(error["error"]["param"], param, "{body}: {error}");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{body}: {message}");
    }
    let (status, _) = s
        .add("acme", json!({"base_model": "base", "name": "x"}))
        .await;
    assert_eq!(status, 400);
    let (status, _) = s.add("nobody", with("base", "x", &pirate)).await;
    assert_eq!(status, 404);
    // The operator's adapter's id is taken.
    let (status, error) = s.add("acme", with("base", "op", &pirate)).await;
    assert_eq!(status, 409, "{error}");
    assert!(s.store.adapters(None).await.unwrap().is_empty());
    let (status, _) = s.add("acme", with("base", "x", &pirate)).await;
    assert_eq!(status, 201);
    let (status, _) = s.add("acme", with("base", "x", &pirate)).await;
    assert_eq!(status, 409);
}

/// Listing needs a read scope of customers, adding and removing `customers:write`.
#[tokio::test]
async fn adapters_are_scoped() {
    let s = Server::start().await;
    s.customer_with_key("acme").await;
    let issue = |scopes: Value| {
        let s = &s;
        async move {
            let (status, token) = s
                .call(
                    "POST",
                    "/admin/v1/admin_tokens",
                    Some(json!({"scopes": scopes})),
                )
                .await;
            assert_eq!(status, 201, "{token}");
            token["token"].as_str().unwrap().to_string()
        }
    };
    let reader = issue(json!(["customers:read"])).await;
    let writer = issue(json!(["customers:write"])).await;
    let path = "/admin/v1/customers/acme/adapters";
    let body = json!({"base_model": "base", "name": "pirate", "path": s.dir("pirate")});
    let (status, _) = s.call_as(&reader, "POST", path, Some(body.clone())).await;
    assert_eq!(status, 403);
    let (status, _) = s.call_as(&writer, "POST", path, Some(body)).await;
    assert_eq!(status, 201);
    let (status, list) = s.call_as(&reader, "GET", path, None).await;
    assert_eq!((status, list["data"].as_array().unwrap().len()), (200, 1));
    let one = format!("{path}/pirate");
    let (status, _) = s.call_as(&reader, "DELETE", &one, None).await;
    assert_eq!(status, 403);
    let (status, _) = s.call_as(&writer, "DELETE", &one, None).await;
    assert_eq!(status, 200);
}

//! Customers' LoRA adapters over real sockets (issue 34, item 3): registered through the admin
//! API (checked first: a bad adapter is a 400 naming the problem, remote sources are refused),
//! listed, scoped, audited, repriced and removed; usable and listed only by the owner's keys
//! (anyone else gets the 404 of an unknown model); the operator's adapters stay everyone's;
//! the record names the base model and the adapter, and is billed at the adapter's own price
//! (the one in force when it was admitted) or the base model's; invoice lines carry both. The base model's backend is scripted: it
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
use tollgate_metering::store::UsageRecord;

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
    let price = json!({"price": {"input_per_mtok": "3", "output_per_mtok": "4"}});
    let (status, _) = s.call_as(&reader, "PATCH", &one, Some(price.clone())).await;
    assert_eq!(status, 403);
    let (status, _) = s.call_as(&writer, "PATCH", &one, Some(price)).await;
    assert_eq!(status, 200);
    let (status, _) = s.call_as(&reader, "DELETE", &one, None).await;
    assert_eq!(status, 403);
    let (status, _) = s.call_as(&writer, "DELETE", &one, None).await;
    assert_eq!(status, 200);
}

/// One chat request of `key` to `model`; the record it left (the `n`th of the customer's).
async fn billed(s: &Server, key: &str, customer: &str, model: &str, n: usize) -> UsageRecord {
    let (status, answer) = s.chat(key, model).await;
    assert_eq!(status, 200, "{answer}");
    let records = serve::wait_records_where(&s.store, n, |r| r.customer_id == customer).await;
    records[n - 1].clone()
}

/// A customer's adapter with a price of its own is billed at it; a PATCH changes it for the
/// requests admitted after (the records before keep theirs), `null` puts the base model's
/// back; each change is audited; the invoice's lines name the base model and the adapter, in
/// JSON and CSV.
#[tokio::test]
async fn a_customers_adapter_is_billed_at_its_own_price() {
    let s = Server::start().await;
    let acme = s.customer_with_key("acme").await;
    let own = json!({"input_per_mtok": "10", "output_per_mtok": "20",
                     "flex": {"input_per_mtok": "5", "output_per_mtok": "6"}});
    let body =
        json!({"base_model": "base", "name": "pirate", "path": s.dir("pirate"), "price": own});
    let (status, added) = s.add("acme", body).await;
    assert_eq!(status, 201, "{added}");
    assert_eq!(added["price"], own);
    let (_, list) = s
        .call("GET", "/admin/v1/customers/acme/adapters", None)
        .await;
    assert_eq!(list["data"][0]["price"], own);

    let dec = |v: &str| v.parse::<rust_decimal::Decimal>().unwrap();
    let prices = |r: &UsageRecord| (r.input_price_per_mtok, r.output_price_per_mtok);
    let first = billed(&s, &acme, "acme", "base:pirate", 1).await;
    assert_eq!(prices(&first), (dec("10"), dec("20")));
    let expected = (first.input_tokens * 10 + first.output_tokens * 20) * 1000;
    assert_eq!(first.cost_nano_usd, expected, "{first:?}");

    let one = "/admin/v1/customers/acme/adapters/pirate";
    let cheaper = json!({"input_per_mtok": "3", "output_per_mtok": "4"});
    let (status, patched) = s.call("PATCH", one, Some(json!({"price": cheaper}))).await;
    assert_eq!((status, &patched["price"]), (200, &cheaper), "{patched}");
    let second = billed(&s, &acme, "acme", "base:pirate", 2).await;
    assert_eq!(prices(&second), (dec("3"), dec("4")));
    let (status, patched) = s.call("PATCH", one, Some(json!({"price": null}))).await;
    assert_eq!(
        (status, &patched["price"]),
        (200, &Value::Null),
        "{patched}"
    );
    let third = billed(&s, &acme, "acme", "base:pirate", 3).await;
    assert_eq!(prices(&third), (dec("1"), dec("2")));
    let base = billed(&s, &acme, "acme", "base", 4).await;
    // The records already written keep the price they were billed at.
    let kept = serve::records_where(&s.store, |r| r.id == first.id).await;
    assert_eq!(prices(&kept[0]), (dec("10"), dec("20")));

    let (_, audit) = s.call("GET", "/admin/v1/audit?limit=100", None).await;
    let updates: Vec<&Value> = audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "adapter.updated")
        .collect();
    assert_eq!(updates.len(), 2, "{audit}");
    assert_eq!(updates[0]["changes"]["price"]["from"], own, "{audit}");
    assert_eq!(updates[0]["changes"]["price"]["to"], cheaper, "{audit}");

    let (status, invoice) = s.call("GET", "/admin/v1/invoices/acme", None).await;
    assert_eq!(status, 200, "{invoice}");
    let lines = invoice["line_items"].as_array().unwrap();
    assert_eq!(lines.len(), 4, "{invoice}");
    for line in lines {
        let adapter = line["model"] == "base:pirate";
        assert_eq!(
            line["base_model"],
            if adapter { json!("base") } else { Value::Null }
        );
        assert_eq!(
            line["adapter"],
            if adapter {
                json!("pirate")
            } else {
                Value::Null
            }
        );
    }
    let total: i64 = [&first, &second, &third, &base]
        .iter()
        .map(|r| r.cost_nano_usd)
        .sum();
    assert_eq!(
        invoice["total_usd"],
        tollgate_metering::money::format_usd(total)
    );
    let csv = s
        .http
        .get(s.url("/admin/v1/invoices/acme?format=csv"))
        .bearer_auth(operator::ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(csv.status(), 200);
    let text = csv.text().await.unwrap();
    let rows: Vec<&str> = text.lines().collect();
    assert!(
        rows[0].ends_with(",amount_usd,base_model,adapter"),
        "{text}"
    );
    assert_eq!(rows.len(), 5, "{text}");
    for row in &rows[1..] {
        let adapter = row.contains("base:pirate");
        assert_eq!(row.ends_with(",base,pirate"), adapter, "{text}");
        assert_eq!(row.ends_with(",,"), !adapter, "{text}");
    }
}

/// A bad price is a 400 naming the key at fault, at registration and on a PATCH; nothing is
/// stored or changed.
#[tokio::test]
async fn a_bad_adapter_price_is_refused_naming_the_field() {
    let s = Server::start().await;
    s.customer_with_key("acme").await;
    let good = json!({"input_per_mtok": "1", "output_per_mtok": "2"});
    let cases = [
        (
            json!({"input_per_mtok": "x", "output_per_mtok": "2"}),
            "price.input_per_mtok",
        ),
        (
            json!({"input_per_mtok": "1", "output_per_mtok": "-2"}),
            "price.output_per_mtok",
        ),
        (
            json!({"input_per_mtok": "1", "output_per_mtok": "2", "flex": {"input_per_mtok": "1", "output_per_mtok": "y"}}),
            "price.flex.output_per_mtok",
        ),
        (
            json!({"input_per_mtok": "1", "output_per_mtok": "2", "priority_multiplier": "z"}),
            "price.priority_multiplier",
        ),
        (
            json!({"input_per_mtok": "1", "output_per_mtok": "2", "reserved_per_ktpm_month": "5"}),
            "price.reserved_per_ktpm_month",
        ),
        (
            json!({"input_per_mtok": "1", "output_per_mtok": "2", "typo": "1"}),
            "price.typo",
        ),
        (json!({"input_per_mtok": "1"}), "price"),
    ];
    for (price, field) in &cases {
        let body =
            json!({"base_model": "base", "name": "p", "path": s.dir("pirate"), "price": price});
        let (status, error) = s.add("acme", body).await;
        assert_eq!(status, 400, "{price}: {error}");
        assert_eq!(error["error"]["param"], *field, "{price}: {error}");
    }
    assert!(s.store.adapters(None).await.unwrap().is_empty());

    let body = json!({"base_model": "base", "name": "p", "path": s.dir("pirate"), "price": good});
    assert_eq!(s.add("acme", body).await.0, 201);
    let one = "/admin/v1/customers/acme/adapters/p";
    for (price, field) in &cases {
        let (status, error) = s.call("PATCH", one, Some(json!({"price": price}))).await;
        assert_eq!(status, 400, "{price}: {error}");
        assert_eq!(error["error"]["param"], *field, "{price}: {error}");
    }
    let (status, error) = s.call("PATCH", one, Some(json!({}))).await;
    assert_eq!(
        (status, &error["error"]["param"]),
        (400, &json!("price")),
        "{error}"
    );
    let (status, _) = s
        .call(
            "PATCH",
            "/admin/v1/customers/acme/adapters/none",
            Some(json!({"price": null})),
        )
        .await;
    assert_eq!(status, 404);
    assert_eq!(
        s.store.adapters(None).await.unwrap()[0]
            .price
            .as_ref()
            .unwrap()
            .input_per_mtok,
        "1"
    );
}

//! The operator's surface over real sockets (issue 29, items 7 and 8): the records API's
//! filters and pages, the audit log's last page, unknown query parameters, reading and changing
//! a key, the `customers:read` scope, one name for cached tokens, RFC 3339 in the audit log,
//! the console's sign-in with issued admin tokens, and (issue 31) service tiers on invoices,
//! reports and the Usage API, reservations and the SLA report. The backend is scripted; the ledger is a
//! real SQLite database the tests write records into.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "an integration test crate: its helpers, outside `#[test]` fns, are not covered by clippy.toml's allow-*-in-tests"
)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::sync::oneshot;
use tollgate_gateway::auth::AuthConfig;
use tollgate_gateway::backend::{
    Backend, BackendError, FinishReason, GenerateEvent, GenerateRequest, ModelInfo, Prepared,
    Start, Usage,
};
use tollgate_gateway::config::Config;
use tollgate_gateway::AppState;
use tollgate_metering::kinds::{Outcome, ServiceTier};
use tollgate_metering::store::{now_micros, Store, UsageRecord};

#[path = "common/serve.rs"]
mod serve;

use serve::serve;

const ADMIN: &str = "operator-admin";

const MODELS: &str = r#"
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
        ModelInfo {
            id: self.0.into(),
            context_length: 64,
            created: 1_700_000_000,
            owned_by: "tests".into(),
        }
    }

    async fn prepare(&self, _request: GenerateRequest) -> Result<Prepared, BackendError> {
        let start: Start = Box::new(|| {
            Ok(Box::pin(async_stream::stream! {
                yield Ok(GenerateEvent::Started { prompt_tokens: 3 });
                yield Ok(GenerateEvent::Delta { text: "Hello".into(), logprobs: vec![], completion_tokens: 1 });
                yield Ok(GenerateEvent::Finished {
                    reason: FinishReason::Stop,
                    usage: Usage { prompt_tokens: 3, completion_tokens: 1, ..Default::default() },
                });
            }))
        });
        Ok(Prepared {
            prompt_tokens: 3,
            max_tokens: 8,
            start,
            progress: None,
            cached: None,
        })
    }
}

struct Server {
    addr: SocketAddr,
    store: Store,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
    /// Held: the server runs until the test drops it.
    _stop: Option<oneshot::Sender<()>>,
}

impl Server {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::connect(dir.path().join("l.db").to_str().unwrap())
            .await
            .unwrap();
        let config = Config::from_toml_str(MODELS, Path::new(".")).unwrap();
        let mut backends: HashMap<String, Arc<dyn Backend>> = HashMap::new();
        backends.insert("fake".into(), Arc::new(Hello("fake")));
        backends.insert("fake2".into(), Arc::new(Hello("fake2")));
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

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// An admin call with `token`: the status and the JSON body (`null` when not JSON).
    async fn call_as(
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

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call_as(ADMIN, method, path, body).await
    }

    async fn get(&self, path: &str) -> Value {
        let (status, body) = self.call("GET", path, None).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    async fn chat(&self, key: &str, model: &str) -> u16 {
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

fn record(
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

/// Four records: r1 (a, ka, fake, completed), r2 (b, kb, fake, failed), r3 (a, ka, fake2,
/// cancelled), r4 (a, ka2, fake, completed), started a second apart in this order.
async fn four_records(store: &Store) -> i64 {
    for c in ["a", "b"] {
        store.ensure_customer(c, c).await.unwrap();
    }
    let t0 = now_micros() - 60_000_000;
    let s = 1_000_000;
    store
        .insert_records(&[
            record("r1", "a", "ka", "fake", Outcome::Completed, t0),
            record("r2", "b", "kb", "fake", Outcome::Failed, t0 + s),
            record("r3", "a", "ka", "fake2", Outcome::Cancelled, t0 + 2 * s),
            record("r4", "a", "ka2", "fake", Outcome::Completed, t0 + 3 * s),
        ])
        .await
        .unwrap();
    t0
}

fn ids(page: &Value) -> Vec<String> {
    page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect()
}

/// Follows the cursor from the start; returns the ids and each page's `has_more`.
async fn walk(s: &Server, query: &str) -> (Vec<String>, Vec<bool>) {
    let (mut all, mut more) = (Vec::new(), Vec::new());
    let mut after = String::new();
    loop {
        let page = s
            .get(&format!("/admin/v1/usage/records?{query}&after={after}"))
            .await;
        all.extend(ids(&page));
        let has_more = page["has_more"].as_bool().unwrap();
        more.push(has_more);
        if !has_more {
            return (all, more);
        }
        after = page["next_cursor"].as_str().unwrap().to_string();
        assert!(more.len() < 10, "the pages end");
    }
}

#[tokio::test]
async fn a_full_last_page_says_there_is_no_more() {
    let s = Server::start().await;
    four_records(&s.store).await;
    let (all, more) = walk(&s, "limit=2").await;
    assert_eq!(all, ["r1", "r2", "r3", "r4"]);
    assert_eq!(
        more,
        [true, false],
        "two pages of two; the second is the last"
    );
    // The last page's cursor still continues once records arrive.
    let last = s.get("/admin/v1/usage/records?limit=2&after=0").await;
    let next = s
        .get(&format!(
            "/admin/v1/usage/records?limit=2&after={}",
            last["next_cursor"].as_str().unwrap()
        ))
        .await;
    let tail = s
        .get(&format!(
            "/admin/v1/usage/records?limit=2&after={}",
            next["next_cursor"].as_str().unwrap()
        ))
        .await;
    assert!(ids(&tail).is_empty() && tail["has_more"] == false && tail["next_cursor"].is_null());

    // The audit log alike: a page of exactly what there is says no more.
    for c in ["c1", "c2", "c3"] {
        let (status, _) = s
            .call("POST", "/admin/v1/customers", Some(json!({"id": c})))
            .await;
        assert_eq!(status, 201);
    }
    let everything = s.get("/admin/v1/audit?limit=1000").await;
    let n = everything["data"].as_array().unwrap().len();
    assert!(n >= 3);
    let page = s.get(&format!("/admin/v1/audit?limit={n}")).await;
    assert_eq!(page["data"].as_array().unwrap().len(), n);
    assert_eq!(page["has_more"], false, "{page}");
    let page = s.get(&format!("/admin/v1/audit?limit={}", n - 1)).await;
    assert_eq!(page["has_more"], true);
}

#[tokio::test]
async fn the_records_api_filters_like_the_console() {
    let s = Server::start().await;
    let t0 = four_records(&s.store).await;
    let time = |micros: i64| tollgate_metering::periods::rfc3339(micros);
    let cases = [
        ("customer_id=a", vec!["r1", "r3", "r4"]),
        ("customer_id=b", vec!["r2"]),
        ("key_id=ka", vec!["r1", "r3"]),
        ("model=fake2", vec!["r3"]),
        ("status=failed", vec!["r2"]),
        ("status=completed&customer_id=a", vec!["r1", "r4"]),
        ("customer_id=a&model=fake", vec!["r1", "r4"]),
        (
            &*format!(
                "start={}&end={}",
                time(t0 + 1_000_000),
                time(t0 + 3_000_000)
            ),
            vec!["r2", "r3"],
        ),
        (&*format!("start={}", time(t0 + 3_000_000)), vec!["r4"]),
        ("customer_id=nobody", vec![]),
    ];
    for (query, expected) in cases {
        let page = s.get(&format!("/admin/v1/usage/records?{query}")).await;
        assert_eq!(ids(&page), expected, "{query}");
        assert_eq!(page["has_more"], false, "{query}");
    }
    // The cursor works under a filter, page by page.
    let (all, more) = walk(&s, "customer_id=a&limit=1").await;
    assert_eq!(all, ["r1", "r3", "r4"]);
    assert_eq!(more, [true, true, false]);
    let (all, _) = walk(&s, "customer_id=a&limit=2").await;
    assert_eq!(all, ["r1", "r3", "r4"]);

    for (query, param) in [
        ("status=done", "status"),
        ("start=yesterday", "start"),
        ("customer_id=", "customer_id"),
        ("bogus=1", "bogus"),
        ("customer=a", "customer"),
    ] {
        let (status, body) = s
            .call("GET", &format!("/admin/v1/usage/records?{query}"), None)
            .await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["error"]["param"], param, "{query}: {body}");
    }
    let (status, body) = s
        .call(
            "GET",
            &format!(
                "/admin/v1/usage/records?start={}&end={}",
                time(t0 + 2),
                time(t0 + 1)
            ),
            None,
        )
        .await;
    assert_eq!(
        (status, body["error"]["param"].clone()),
        (400, json!("end"))
    );
}

#[tokio::test]
async fn unknown_query_parameters_are_refused_on_every_admin_list_route() {
    let s = Server::start().await;
    s.store.ensure_customer("a", "a").await.unwrap();
    for path in [
        "/admin/v1/customers?bogus=1",
        "/admin/v1/customers/a?bogus=1",
        "/admin/v1/customers/a/keys?bogus=1",
        "/admin/v1/alerts?bogus=1",
        "/admin/v1/admin_tokens?bogus=1",
        "/admin/v1/audit?bogus=1",
        "/admin/v1/usage?bogus=1",
        "/admin/v1/usage/records?bogus=1",
        "/admin/v1/invoices/a?bogus=1",
    ] {
        let (status, body) = s.call("GET", path, None).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["error"]["param"], "bogus", "{path}: {body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains("bogus"),
            "{path}: {body}"
        );
    }
    // The parameters a route takes are still taken.
    for path in [
        "/admin/v1/alerts?customer_id=a&limit=5",
        "/admin/v1/audit?limit=5",
        "/admin/v1/usage?group_by=customer",
        "/admin/v1/invoices/a?period=2026-11",
    ] {
        s.get(path).await;
    }
}

#[tokio::test]
async fn a_key_can_be_read_and_changed_after_creation() {
    let s = Server::start().await;
    let (status, _) = s
        .call("POST", "/admin/v1/customers", Some(json!({"id": "acme"})))
        .await;
    assert_eq!(status, 201);
    let (status, created) = s
        .call(
            "POST",
            "/admin/v1/customers/acme/keys",
            Some(json!({"name": "prod"})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let (id, secret) = (
        created["id"].as_str().unwrap().to_string(),
        created["key"].as_str().unwrap().to_string(),
    );
    // Who owns a key id.
    let key = s.get(&format!("/admin/v1/keys/{id}")).await;
    assert_eq!(key["customer_id"], "acme");
    assert_eq!(key["id"], id.as_str());
    assert!(key.get("key").is_none(), "never the secret");
    let (status, _) = s.call("GET", "/admin/v1/keys/key_nope", None).await;
    assert_eq!(status, 404);

    // The gateway has the key in its cache.
    assert_eq!(s.chat(&secret, "fake").await, 200);
    let expires = "2999-01-01T00:00:00Z";
    let (status, changed) = s
        .call(
            "PATCH",
            &format!("/admin/v1/keys/{id}"),
            Some(
                json!({"rpm": 100, "tpm": 5000, "max_concurrent_requests": 3,
                        "models": ["fake2"], "expires_at": expires}),
            ),
        )
        .await;
    assert_eq!(status, 200, "{changed}");
    assert_eq!(changed["rpm"], 100);
    assert_eq!(changed["tpm"], 5000);
    assert_eq!(changed["max_concurrent_requests"], 3);
    assert_eq!(changed["models"], json!(["fake2"]));
    assert_eq!(changed["expires_at"], "2999-01-01T00:00:00.000000Z");
    assert_eq!(s.get(&format!("/admin/v1/keys/{id}")).await, changed);
    // Requests see the change at once: the key may no longer use `fake`.
    assert_eq!(s.chat(&secret, "fake").await, 403);
    assert_eq!(s.chat(&secret, "fake2").await, 200);

    // `null` clears; absent fields stay.
    let (status, cleared) = s
        .call(
            "PATCH",
            &format!("/admin/v1/keys/{id}"),
            Some(json!({"models": null, "expires_at": null, "rpm": null})),
        )
        .await;
    assert_eq!(status, 200, "{cleared}");
    assert!(
        cleared["models"].is_null() && cleared["expires_at"].is_null() && cleared["rpm"].is_null()
    );
    assert_eq!(cleared["tpm"], 5000);
    assert_eq!(s.chat(&secret, "fake").await, 200);
    let (status, _) = s
        .call(
            "PATCH",
            &format!("/admin/v1/keys/{id}"),
            Some(json!({"rpm": 1})),
        )
        .await;
    assert_eq!(status, 200);
    // Three requests were made with the key this minute: over rpm 1 at once.
    assert_eq!(s.chat(&secret, "fake").await, 429, "rpm 1 applies at once");

    for (body, param) in [
        (json!({"models": ["nope"]}), "models"),
        (json!({"expires_at": "2001-01-01T00:00:00Z"}), "expires_at"),
        (json!({"rpm": 0}), "rpm"),
        (json!({"key_prefix": "x"}), "key_prefix"),
    ] {
        let (status, answer) = s
            .call("PATCH", &format!("/admin/v1/keys/{id}"), Some(body.clone()))
            .await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["error"]["param"], param, "{body}: {answer}");
    }

    // The change is audited, its times in RFC 3339.
    let audit = s.get("/admin/v1/audit?limit=1000").await;
    let change = find_row(&audit, |e| {
        e["action"] == "key.updated" && e["changes"].get("expires_at").is_some()
    });
    assert_eq!(
        change["changes"]["expires_at"]["to"],
        "2999-01-01T00:00:00.000000Z"
    );
    assert_eq!(change["changes"]["max_concurrent_requests"]["to"], 3);
}

/// An RFC 3339 time as the API writes it.
fn is_rfc3339(v: &Value) -> bool {
    v.as_str()
        .is_some_and(|t| chrono::DateTime::parse_from_rfc3339(t).is_ok())
}

/// The first row of a list response's `data` that `pick` selects.
fn find_row(list: &Value, pick: impl Fn(&Value) -> bool) -> Value {
    let rows = list["data"].as_array().unwrap();
    rows.iter().find(|r| pick(r)).cloned().unwrap()
}

#[tokio::test]
async fn customers_read_scope_and_rfc3339_in_admin_token_revocations() {
    let s = Server::start().await;
    s.store.ensure_customer("acme", "Acme").await.unwrap();
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
            token
        }
    };
    let reader = issue(json!(["customers:read"])).await;
    assert_eq!(reader["scopes"], json!(["customers:read"]));
    let reader_secret = reader["token"].as_str().unwrap();
    for path in ["/admin/v1/customers", "/admin/v1/customers/acme"] {
        let (status, body) = s.call_as(reader_secret, "GET", path, None).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    let (status, body) = s
        .call_as(
            reader_secret,
            "POST",
            "/admin/v1/customers",
            Some(json!({"id": "x"})),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    let (status, _) = s
        .call_as(reader_secret, "GET", "/admin/v1/customers/acme/keys", None)
        .await;
    assert_eq!(status, 403);
    // The customer list with a token of other scopes.
    let list_with = |scopes: Value| {
        let (s, issue) = (&s, &issue);
        async move {
            let token = issue(scopes).await;
            let secret = token["token"].as_str().unwrap();
            s.call_as(secret, "GET", "/admin/v1/customers", None).await
        }
    };
    // customers:write implies it.
    let (status, _) = list_with(json!(["customers:write"])).await;
    assert_eq!(status, 200);
    // usage:read does not.
    let (status, body) = list_with(json!(["usage:read"])).await;
    assert_eq!(status, 403);
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("customers:read") && message.contains("customers:write"),
        "{message}"
    );

    // A revocation's audit entry has its time in RFC 3339, as key changes do.
    let id = reader["id"].as_str().unwrap();
    let (status, _) = s
        .call("DELETE", &format!("/admin/v1/admin_tokens/{id}"), None)
        .await;
    assert_eq!(status, 200);
    let audit = s.get("/admin/v1/audit?limit=1000").await;
    let revoked = find_row(&audit, |e| e["action"] == "admin_token.revoked");
    assert!(is_rfc3339(&revoked["changes"]["revoked_at"]), "{revoked}");
}

#[tokio::test]
async fn cached_tokens_have_one_name_and_a_csv_column() {
    let s = Server::start().await;
    four_records(&s.store).await;
    let report = s.get("/admin/v1/usage?group_by=customer").await;
    let a = find_row(&report, |r| r["customer_id"] == "a");
    assert_eq!(a["cached_input_tokens"], 12, "{a}");
    // The old name stays beside it, deprecated (tests/python/test_billing.py reads it).
    assert_eq!(a["input_cached_tokens"], 12, "{a}");
    let records = s.get("/admin/v1/usage/records?customer_id=a").await;
    assert!(records["data"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["cached_input_tokens"] == 4));

    let csv = s
        .http
        .get(s.url("/admin/v1/usage?group_by=customer&format=csv"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let column = header
        .iter()
        .position(|c| *c == "cached_input_tokens")
        .unwrap_or_else(|| panic!("no cached column in {header:?}"));
    let row_a: Vec<&str> = lines
        .find(|l| l.starts_with("a,"))
        .unwrap()
        .split(',')
        .collect();
    assert_eq!(row_a[column], "12");
}

/// Signs in at `/console/login`: the status, and the session cookie when one was set.
async fn sign_in(s: &Server, token: &str) -> (u16, Option<String>, String) {
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
async fn customers_page(s: &Server, cookie: &str) -> reqwest::Response {
    console_page(s, "/console/customers", cookie).await
}

/// A console page, asked for with the session `cookie`.
async fn console_page(s: &Server, path: &str, cookie: &str) -> reqwest::Response {
    s.http
        .get(s.url(path))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn issued_admin_tokens_sign_in_to_the_console() {
    let s = Server::start().await;
    let (status, admin) = s
        .call(
            "POST",
            "/admin/v1/admin_tokens",
            Some(json!({"name": "ops", "scopes": ["admin"]})),
        )
        .await;
    assert_eq!(status, 201);
    let (status, cookie, _) = sign_in(&s, admin["token"].as_str().unwrap()).await;
    assert_eq!(status, 303, "an issued admin token signs in");
    let cookie = cookie.unwrap();
    let page = customers_page(&s, &cookie).await;
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    let id = admin["id"].as_str().unwrap();
    assert!(
        html.contains(id) && html.contains("(admin)"),
        "the screen says who and what"
    );

    // A narrower token is told what its scopes allow.
    let (_, reader) = s
        .call(
            "POST",
            "/admin/v1/admin_tokens",
            Some(json!({"scopes": ["usage:read"]})),
        )
        .await;
    let (status, none, html) = sign_in(&s, reader["token"].as_str().unwrap()).await;
    assert_eq!(status, 403);
    assert!(none.is_none());
    assert!(
        html.contains("usage:read") && html.contains("admin"),
        "{html}"
    );
    let (status, _, html) = sign_in(&s, "tga-wrong").await;
    assert_eq!(status, 401);
    assert!(html.contains("Wrong admin token."));
    // The bootstrap token still signs in.
    assert_eq!(sign_in(&s, ADMIN).await.0, 303);

    // Revoking the token ends its sessions.
    let (status, _) = s
        .call("DELETE", &format!("/admin/v1/admin_tokens/{id}"), None)
        .await;
    assert_eq!(status, 200);
    let page = customers_page(&s, &cookie).await;
    assert_eq!(page.status(), 303, "back to the sign-in page");
}

/// A GET on the public listener with client key `key`: the JSON body.
async fn get_json(s: &Server, path: &str, key: &str) -> Value {
    let response = s.http.get(s.url(path)).bearer_auth(key).send().await;
    response.unwrap().json().await.unwrap()
}

/// Two string fields of each object.
fn pairs<'a>(rows: &'a [Value], a: &str, b: &str) -> Vec<(&'a str, &'a str)> {
    rows.iter()
        .map(|r| (r[a].as_str().unwrap(), r[b].as_str().unwrap()))
        .collect()
}

/// Records at two tiers: the invoice has a line per tier (and the reservation's line) adding up
/// to its total; the usage report, the Usage API and the SLA report show the tiers; a
/// reservation past the model's capacity is refused with 409, one of a model without a
/// capacity with 400; the console shows the reservation and the service levels.
#[tokio::test]
async fn tiers_reservations_and_service_levels_through_the_admin_api() {
    let s = Server::start().await;
    s.store.ensure_customer("rc", "RC").await.unwrap();
    let reserve = |model: &str, tpm: i64| json!({"model": model, "reserved_tokens_per_minute": tpm, "starts_at": "2026-11-01"});
    let path = "/admin/v1/customers/rc/reservations";
    let (status, held) = s.call("POST", path, Some(reserve("fake", 600))).await;
    assert_eq!(status, 201, "{held}");
    assert_eq!(held["object"], "reservation");
    let (status, body) = s.call("POST", path, Some(reserve("fake", 401))).await;
    assert_eq!(status, 409, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("400"));
    let (status, body) = s.call("POST", path, Some(reserve("fake2", 1))).await;
    assert_eq!((status, &body["error"]["param"]), (400, &json!("model")));
    let (status, _) = s.call("POST", path, Some(reserve("nope", 1))).await;
    assert_eq!(status, 400);
    assert_eq!(s.get(path).await["data"].as_array().unwrap().len(), 1);
    let (status, body) = s
        .call(
            "POST",
            path,
            Some(json!({"model": "fake", "reserved_tokens_per_minute": 1, "size": 2})),
        )
        .await;
    assert_eq!(
        (status, &body["error"]["param"]),
        (400, &json!("size")),
        "{body}"
    );
    let doc = get_json(&s, "/openapi.json", "static-key").await;
    let schema = &doc["components"]["schemas"]["CreateReservation"];
    assert_eq!(
        schema["required"],
        json!(["model", "reserved_tokens_per_minute"]),
        "{schema}"
    );
    let id = held["id"].as_str().unwrap();
    assert_eq!(s.get(&format!("/admin/v1/reservations/{id}")).await, held);

    let t0 = tollgate_metering::billing::parse_time("2026-11-02").unwrap();
    let mut records = Vec::new();
    for (i, (tier, cost, ttft)) in [
        (ServiceTier::Default, 20_000, 300),
        (ServiceTier::Flex, 10_000, 900),
        (ServiceTier::Priority, 30_001, 2_000),
    ]
    .into_iter()
    .enumerate()
    {
        for customer in ["rc", "default"] {
            let mut r = record(
                &format!("t{i}-{customer}"),
                customer,
                "k",
                "fake",
                Outcome::Completed,
                t0 + i as i64,
            );
            r.service_tier = tier;
            r.cost_nano_usd = cost;
            r.cached_input_tokens = 0;
            r.ttft_ms = Some(ttft);
            records.push(r);
        }
    }
    s.store.insert_records(&records).await.unwrap();

    let invoice = s.get("/admin/v1/invoices/rc?period=2026-11").await;
    let lines = invoice["line_items"].as_array().unwrap();
    assert_eq!(
        pairs(lines, "kind", "service_tier"),
        [
            ("tokens", "default"),
            ("tokens", "flex"),
            ("tokens", "priority"),
            ("reservation", "reserved")
        ]
    );
    let nanos = |v: &Value| tollgate_metering::money::parse_usd(v.as_str().unwrap()).unwrap();
    let sum: i64 = lines.iter().map(|l| nanos(&l["amount_usd"])).sum();
    assert_eq!(sum, nanos(&invoice["total_usd"]), "{invoice}");
    // 600 TPM all November at $10 per 1,000 TPM-month: $6.
    assert_eq!(lines[3]["amount_usd"], "6.000000000");
    assert_eq!(sum, 60_001 + 6_000_000_000);

    let report = s
        .get("/admin/v1/usage?group_by=service_tier&customer_id=rc&start=2026-11-01&end=2026-12-01")
        .await;
    assert_eq!(
        pairs(
            report["data"].as_array().unwrap(),
            "service_tier",
            "cost_usd"
        ),
        [
            ("default", "0.000020000"),
            ("flex", "0.000010000"),
            ("priority", "0.000030001")
        ]
    );

    // The customer's own Usage API (the static key is the `default` customer's).
    let usage_path = format!(
        "/v1/organization/usage/completions?start_time={}&group_by=service_tier",
        t0 / 1_000_000 - 3_600
    );
    let usage = get_json(&s, &usage_path, "static-key").await;
    let mut served: Vec<&str> = usage["data"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|b| b["results"].as_array().unwrap())
        .map(|r| r["service_tier"].as_str().unwrap())
        .collect();
    served.sort_unstable();
    assert_eq!(served, ["default", "flex", "priority"], "{usage}");

    let sla = s.get("/admin/v1/sla?month=2026-11&customer_id=rc").await;
    assert_eq!(sla["priority_ttft_target_ms"], 1000);
    let rows = sla["data"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(
        (
            &rows[2]["service_tier"],
            &rows[2]["ttft_within_target"],
            &rows[2]["availability"]
        ),
        (&json!("priority"), &json!(0), &json!(1.0))
    );
    assert_eq!(
        rows[1]["ttft_within_target"], 1,
        "flex: 900 ms is within 1000"
    );

    let (_, cookie, _) = sign_in(&s, ADMIN).await;
    let cookie = cookie.unwrap();
    let page = |path: String| {
        let request = s.http.get(s.url(&path)).header("cookie", &cookie);
        async move { request.send().await.unwrap().text().await.unwrap() }
    };
    let html = page("/console/customers/rc".into()).await;
    assert!(html.contains(&format!("reservation-{id}")), "{html}");
    let html = page("/console/sla?month=2026-11".into()).await;
    assert!(
        html.contains("id=\"sla\"") && html.contains("priority"),
        "{html}"
    );
    let html = page("/console/invoices?customer_id=rc&period=2026-11".into()).await;
    assert!(
        html.contains("kTPM-month") && html.contains("flex"),
        "{html}"
    );

    // Ending it now: it ended after it began, and the model's capacity is free again.
    let (status, ended) = s
        .call("DELETE", &format!("/admin/v1/reservations/{id}"), None)
        .await;
    assert_eq!(status, 200);
    assert!(ended["ends_at"].is_string(), "{ended}");
    let now = json!({"model": "fake", "reserved_tokens_per_minute": 1000});
    assert_eq!(s.call("POST", path, Some(now)).await.0, 201);
}

#[tokio::test]
async fn the_console_sets_a_customers_service_tier_settings() {
    let s = Server::start().await;
    let customer = Some(json!({"id": "tiered"}));
    assert_eq!(s.call("POST", "/admin/v1/customers", customer).await.0, 201);
    let (_, cookie, _) = sign_in(&s, ADMIN).await;
    let cookie = cookie.unwrap();
    let page = console_page(&s, "/console/customers/tiered", &cookie).await;
    let page = page.text().await.unwrap();
    assert!(page.contains(r#"name="default_service_tier""#), "{page}");
    let csrf = page
        .split(r#"name="csrf" value=""#)
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap();
    let form = [
        ("csrf", csrf),
        ("name", "Tiered"),
        ("default_service_tier", "flex"),
        ("allow_priority", "on"),
    ];
    let saved = s.http.post(s.url("/console/customers/tiered"));
    let saved = saved.header("cookie", &cookie).form(&form).send().await;
    assert_eq!(saved.unwrap().status(), 303);
    let (_, c) = s.call("GET", "/admin/v1/customers/tiered", None).await;
    let settings = (&c["default_service_tier"], &c["allow_priority"]);
    assert_eq!(settings, (&json!("flex"), &json!(true)));
}

//! The operator's surface over real sockets (issue 29, items 7 and 8): the records API's
//! filters and pages, the audit log's last page, unknown query parameters, reading and changing
//! a key, the `customers:read` scope, one name for cached tokens, RFC 3339 in the audit log,
//! and the console's sign-in with issued admin tokens. The backend is scripted; the ledger is a
//! real SQLite database the tests write records into (`common/operator.rs`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "an integration test crate: its helpers, outside `#[test]` fns, are not covered by clippy.toml's allow-*-in-tests"
)]

use serde_json::{json, Value};
use tollgate_metering::kinds::Outcome;
use tollgate_metering::store::{now_micros, Store};

#[path = "common/operator.rs"]
mod operator;
#[path = "common/serve.rs"]
mod serve;

use operator::{customers_page, record, sign_in, Server, ADMIN};

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

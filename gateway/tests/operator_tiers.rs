//! Service tiers and reserved capacity as the operator sees them (issue 31) over real sockets:
//! tiers on invoices, reports and the Usage API, reservations, the SLA report, and a
//! customer's tier settings in the console. The backend is scripted; the ledger is a real
//! SQLite database the tests write records into (`common/operator.rs`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "an integration test crate: its helpers, outside `#[test]` fns, are not covered by clippy.toml's allow-*-in-tests"
)]

use serde_json::{json, Value};
use tollgate_metering::kinds::{Outcome, ServiceTier};

#[path = "common/operator.rs"]
mod operator;
#[path = "common/serve.rs"]
mod serve;

use operator::{console_page, record, sign_in, Server, ADMIN};

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

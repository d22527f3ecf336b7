//! The store contract shared by the SQLite tests (`store.rs`) and the PostgreSQL ones
//! (`store_postgres.rs`): everything the gateway and the CLI ask of a store.

#![allow(
    dead_code,
    reason = "the SQLite and the PostgreSQL test crates include this module; not every helper is used by both"
)]

use tollgate_metering::audit::Actor;
use tollgate_metering::kinds::UsageSource;
use tollgate_metering::store::{
    CustomerFields, GroupBy, NewKey, Store, StoreError, UsageFilter, UsageRecord,
};

const DAY: i64 = 86_400_000_000;

pub fn record(id: &str, customer: &str, model: &str, started_at: i64, cost: i64) -> UsageRecord {
    UsageRecord {
        id: id.into(),
        customer_id: customer.into(),
        key_id: format!("key_{customer}"),
        model: model.into(),
        endpoint: tollgate_metering::kinds::Endpoint::ChatCompletions,
        stream: id.len().is_multiple_of(2),
        status: tollgate_metering::kinds::Outcome::Completed,
        finish_reason: Some(tollgate_metering::kinds::FinishReason::Stop),
        input_tokens: 10,
        output_tokens: 5,
        started_at,
        finished_at: started_at + 1_000,
        ttft_ms: Some(7),
        input_price_per_mtok: "0.05".parse().unwrap(),
        output_price_per_mtok: "0.10".parse().unwrap(),
        cost_nano_usd: cost,
        ..UsageRecord::default()
    }
}

/// Everything the gateway and the CLI ask of a store, on an empty database.
pub async fn exercise(store: &Store) {
    let actor = Actor::cli("contract");
    // Customers.
    let fields = CustomerFields {
        name: Some("Acme".into()),
        budget_nano_usd: Some(Some(5_000)),
        rpm: Some(Some(60)),
        ..CustomerFields::default()
    };
    let acme = store
        .create_customer("acme", fields.clone(), &actor)
        .await
        .unwrap();
    assert_eq!(acme.budget_nano_usd, Some(5_000));
    assert_eq!(acme.budget_period.as_str(), "monthly");
    assert!(matches!(
        store.create_customer("acme", fields, &actor).await,
        Err(StoreError::Conflict(_))
    ));
    store.ensure_customer("beta", "Beta").await.unwrap();
    store.ensure_customer("beta", "ignored").await.unwrap();
    let patched = store
        .update_customer(
            "acme",
            CustomerFields {
                budget_nano_usd: Some(None),
                tpm: Some(Some(1_000)),
                ..CustomerFields::default()
            },
            &actor,
        )
        .await
        .unwrap();
    assert_eq!(
        (patched.budget_nano_usd, patched.rpm, patched.tpm),
        (None, Some(60), Some(1_000))
    );
    let ids: Vec<String> = store
        .list_customers()
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(ids, ["acme", "beta"]);
    assert!(matches!(
        store.customer("nobody").await,
        Err(StoreError::NotFound(_))
    ));

    // Keys.
    let new = NewKey {
        name: "prod".into(),
        models: Some(vec!["m1".into()]),
        rpm: Some(5),
        ..NewKey::default()
    };
    store
        .create_key("acme", "key_a", "hash_a", "tg-aaaaaa", new, &actor)
        .await
        .unwrap();
    assert!(store
        .create_key(
            "nobody",
            "key_x",
            "hash_x",
            "tg-x",
            NewKey::default(),
            &actor,
        )
        .await
        .is_err());
    let (key, stored, customer) = store.find_key("hash_a").await.unwrap().unwrap();
    assert_eq!(
        (key.id.as_str(), stored.as_str(), customer.id.as_str()),
        ("key_a", "hash_a", "acme")
    );
    assert_eq!(key.models, Some(vec!["m1".to_string()]));
    assert!(store.find_key("hash_b").await.unwrap().is_none());
    let revoked = store.revoke_key("key_a", &actor).await.unwrap();
    let again = store.revoke_key("key_a", &actor).await.unwrap();
    assert!(revoked.revoked_at.is_some());
    assert_eq!(
        revoked.revoked_at, again.revoked_at,
        "the first revocation time stays"
    );
    assert_eq!(store.list_keys("acme").await.unwrap().len(), 1);

    // Audit: each change once, in order, by its actor; refused changes and a second
    // revocation leave nothing; no digest or prefix of a secret.
    let entries = store.audit_after(0, 100).await.unwrap();
    let seen: Vec<(&str, &str, &str)> = entries
        .iter()
        .map(|e| (e.action.as_str(), e.target_id.as_str(), e.actor.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            ("customer.created", "acme", "cli user contract"),
            ("customer.created", "beta", "tollgate"),
            ("customer.updated", "acme", "cli user contract"),
            ("key.created", "key_a", "cli user contract"),
            ("key.revoked", "key_a", "cli user contract"),
        ]
    );
    assert_eq!(
        entries[2].changes,
        serde_json::json!({
            "budget_usd": {"from": "0.000005000", "to": null},
            "tpm": {"from": null, "to": 1000},
        })
    );
    assert_eq!(entries[3].changes["rpm"], 5);
    assert_eq!(
        entries[4].changes["revoked_at"]["from"],
        serde_json::Value::Null
    );
    for e in &entries {
        let text = serde_json::to_string(&e.view()).unwrap();
        assert!(
            !text.contains("hash_a") && !text.contains("tg-aaaaaa"),
            "{text}"
        );
    }
    let page = store.audit_after(entries[1].seq, 2).await.unwrap();
    assert_eq!(page, entries[2..4]);
    let newest = store.audit_before(None, 2).await.unwrap();
    assert_eq!(
        (newest[0].seq, newest[1].seq),
        (entries[4].seq, entries[3].seq)
    );
    let older = store.audit_before(Some(entries[1].seq), 10).await.unwrap();
    assert_eq!(older, entries[..1]);

    // Ledger: inserts are idempotent on the id and keep their order.
    let t0 = 20_000 * DAY;
    let batch: Vec<UsageRecord> = (0..450)
        .map(|i| {
            let customer = if i % 3 == 0 { "beta" } else { "acme" };
            let model = if i % 2 == 0 { "m1" } else { "m2" };
            let mut r = record(
                &format!("r{i:04}"),
                customer,
                model,
                t0 + i * DAY / 100,
                1_000 + i,
            );
            // Cached prompt tokens, their price and part of the cost, and the counts' source
            // read back and add up like the other columns.
            r.cached_input_tokens = i % 5;
            r.cached_input_price_per_mtok = Some("0.02".parse().unwrap());
            r.cached_cost_nano_usd = 20 * (i % 5);
            // So do a prediction's tokens, their price and their part of the cost.
            r.prediction = tollgate_metering::store::PredictionTokens {
                accepted: i % 4,
                rejected: i % 6,
                price_per_mtok: Some("0.30".parse().unwrap()),
                cost_nano_usd: 300 * (i % 6),
            };
            r.usage_source = Some(if i % 7 == 0 {
                UsageSource::Observed
            } else {
                UsageSource::Engine
            });
            // Tags: a project on most, a quote in a key, none on every tenth.
            if i % 10 != 0 {
                r.tags.insert("project".into(), format!("p{}", i % 3));
                r.tags.insert("we\"ird key".into(), "x".into());
            }
            r
        })
        .collect();
    assert_eq!(store.insert_records(&batch).await.unwrap(), 450);
    assert_eq!(store.insert_records(&batch[100..300]).await.unwrap(), 0);
    let mut cursor = 0;
    let mut seen = Vec::new();
    loop {
        let (page, next) = store.records_after(cursor, 100).await.unwrap();
        seen.extend(page.into_iter().map(|r| r.id));
        match next {
            Some(c) => cursor = c,
            None => break,
        }
    }
    let expected: Vec<String> = batch.iter().map(|r| r.id.clone()).collect();
    assert_eq!(
        seen, expected,
        "the cursor walks every record once, in order"
    );
    let (round, _) = store.records_after(0, 1).await.unwrap();
    assert_eq!(round[0], batch[0], "a record reads back as written");

    // Aggregates equal the sums of their records.
    let all = UsageFilter {
        start: t0,
        end: t0 + 10 * DAY,
        ..UsageFilter::default()
    };
    let rows = store
        .aggregate(&all, &[GroupBy::Customer, GroupBy::Model], None)
        .await
        .unwrap();
    assert_eq!(rows.len(), 4);
    for row in &rows {
        let mine: Vec<&UsageRecord> = batch
            .iter()
            .filter(|r| Some(&r.customer_id) == row.customer_id.as_ref())
            .filter(|r| Some(&r.model) == row.model.as_ref())
            .collect();
        assert_eq!(row.requests, mine.len() as i64);
        assert_eq!(row.input_tokens, 10 * mine.len() as i64);
        assert_eq!(
            row.cost_nano_usd,
            mine.iter().map(|r| r.cost_nano_usd).sum::<i64>()
        );
        assert_eq!(
            row.cached_input_tokens,
            mine.iter().map(|r| r.cached_input_tokens).sum::<i64>()
        );
        assert_eq!(
            row.cached_cost_nano_usd,
            mine.iter().map(|r| r.cached_cost_nano_usd).sum::<i64>()
        );
        let sum = |f: fn(&UsageRecord) -> i64| mine.iter().map(|r| f(r)).sum::<i64>();
        assert_eq!(
            (
                row.prediction.accepted,
                row.prediction.rejected,
                row.prediction.cost_nano_usd
            ),
            (
                sum(|r| r.prediction.accepted),
                sum(|r| r.prediction.rejected),
                sum(|r| r.prediction.cost_nano_usd)
            )
        );
    }
    let days = store.aggregate(&all, &[GroupBy::Day], None).await.unwrap();
    assert_eq!(days.len(), 5, "450 records 1/100 day apart span 5 days");
    assert_eq!(days[0].bucket_start, Some(t0));
    assert_eq!(days.iter().map(|d| d.requests).sum::<i64>(), 450);
    let invoice = store
        .aggregate(
            &UsageFilter {
                customer_id: Some("beta".into()),
                model: Some("m1".into()),
                ..all.clone()
            },
            &[GroupBy::Model, GroupBy::Prices],
            None,
        )
        .await
        .unwrap();
    assert_eq!(invoice.len(), 1);
    assert_eq!(invoice[0].input_price_per_mtok.as_deref(), Some("0.05"));
    assert_eq!(
        invoice[0].cached_input_price_per_mtok.as_deref(),
        Some("0.02")
    );
    assert_eq!(
        invoice[0].prediction.price_per_mtok,
        Some("0.30".parse().unwrap())
    );
    assert_eq!(
        invoice[0].requests,
        batch
            .iter()
            .filter(|r| r.customer_id == "beta" && r.model == "m1")
            .count() as i64
    );
    // By tag: one group per value and one for records without it; a filter picks one value.
    let by_tag = store
        .aggregate(&all, &[GroupBy::Tag("project".into())], None)
        .await
        .unwrap();
    let mut expected_tags: std::collections::BTreeMap<Option<String>, (i64, i64)> =
        Default::default();
    for r in &batch {
        let e = expected_tags
            .entry(r.tags.get("project").cloned())
            .or_default();
        e.0 += 1;
        e.1 += r.cost_nano_usd;
    }
    let got: std::collections::BTreeMap<Option<String>, (i64, i64)> = by_tag
        .iter()
        .map(|row| (row.tag_value.clone(), (row.requests, row.cost_nano_usd)))
        .collect();
    assert_eq!(got, expected_tags);
    // The records carrying the tag `key` = `value`, in one row.
    let tagged = |key: &str, value: &str| {
        let filter = UsageFilter {
            tag: Some((key.into(), value.into())),
            ..all.clone()
        };
        async move { store.aggregate(&filter, &[], None).await.unwrap() }
    };
    let p1 = tagged("project", "p1").await;
    assert_eq!(p1[0].requests, expected_tags[&Some("p1".to_string())].0);
    let weird = tagged("we\"ird key", "x").await;
    assert_eq!(weird[0].requests, 450 - 45);
    let hours = store
        .aggregate(&all, &[GroupBy::Key], Some((t0, DAY / 24)))
        .await
        .unwrap();
    assert_eq!(hours.iter().map(|h| h.requests).sum::<i64>(), 450);
    assert!(hours
        .iter()
        .all(|h| (h.bucket_start.unwrap() - t0) % (DAY / 24) == 0));
    let spent = store.spent_since("acme", t0 + 2 * DAY).await.unwrap();
    assert_eq!(
        spent,
        batch
            .iter()
            .filter(|r| r.customer_id == "acme" && r.started_at >= t0 + 2 * DAY)
            .map(|r| r.cost_nano_usd)
            .sum::<i64>()
    );
    let (between, _) = store
        .records_between(t0 + DAY, t0 + 2 * DAY, 0, 1_000)
        .await
        .unwrap();
    assert_eq!(between.len(), 100);
}

/// Budget alerts and idempotency keys, on an empty database: the outbox rows the ledger's
/// insert adds (once per threshold and month, replays included), and the key claims.
///
/// The settings are written as the gateway's `alerts::update_settings` leaves them (a webhook,
/// its secret, sorted thresholds); that the gateway does is its own test
/// (`gateway/tests/common/alert_settings.rs`).
pub async fn alerts_and_idempotency(store: &Store) {
    use tollgate_metering::alerts::AlertSettings;
    use tollgate_metering::requests::idempotency::{Claim, ClaimArgs, Stored};

    let fields = CustomerFields {
        budget_nano_usd: Some(Some(1_000)),
        ..CustomerFields::default()
    };
    store
        .create_customer("alerted", fields, &Actor::cli("contract"))
        .await
        .unwrap();
    let settings = AlertSettings {
        customer_id: "alerted".into(),
        webhook_url: Some("http://127.0.0.1:9/hook".into()),
        webhook_secret: Some("whsec_contract".into()),
        thresholds: vec!["0.5".into(), "0.9".into()],
    };
    store
        .set_alert_settings(&settings, true, &Actor::cli("contract"))
        .await
        .unwrap();
    let now = tollgate_metering::store::now_micros();
    let r = |i: usize, cost| record(&format!("alert-{i}"), "alerted", "m", now + i as i64, cost);
    // 499 of 1000: nothing; 500: the half; replayed: nothing new; 950: the 0.9.
    store.insert_records(&[r(0, 499)]).await.unwrap();
    assert!(store
        .list_alerts(Some("alerted"), 10)
        .await
        .unwrap()
        .is_empty());
    store.insert_records(&[r(1, 1)]).await.unwrap();
    store.insert_records(&[r(0, 499), r(1, 1)]).await.unwrap();
    let listed = store.list_alerts(Some("alerted"), 10).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (
            listed[0].threshold.as_str(),
            listed[0].spent_nano_usd,
            listed[0].status.as_str()
        ),
        ("0.5", 500, "pending")
    );
    store.insert_records(&[r(2, 450)]).await.unwrap();
    let listed = store.list_alerts(Some("alerted"), 10).await.unwrap();
    let thresholds: Vec<&str> = listed.iter().map(|a| a.threshold.as_str()).collect();
    assert_eq!(thresholds, ["0.5", "0.9"]);
    // A customer without a budget gets no alerts.
    store
        .create_customer(
            "unbudgeted",
            CustomerFields::default(),
            &Actor::cli("contract"),
        )
        .await
        .unwrap();
    store
        .insert_records(&[record("free-1", "unbudgeted", "m", now, 10_000)])
        .await
        .unwrap();
    assert!(store
        .list_alerts(Some("unbudgeted"), 10)
        .await
        .unwrap()
        .is_empty());

    // Idempotency keys: one runs, a repeat waits, another body is refused, a finished one
    // replays, a released one runs again.
    let args = |request_id: &'static str, hash: &'static str, now: i64| ClaimArgs {
        customer_id: "alerted",
        key: "k1",
        request_hash: hash,
        request_id,
        now,
        expires_at: now + 1_000_000,
        lease_until: now + 100,
    };
    let claim = |request_id, hash, at| {
        let args = args(request_id, hash, at);
        async move { store.claim_idempotency(&args).await.unwrap() }
    };
    assert_eq!(claim("r1", "h", now).await, Claim::Run);
    assert_eq!(claim("r2", "h", now).await, Claim::InProgress);
    assert_eq!(claim("r2", "other", now).await, Claim::Mismatch);
    // A lease that ran out (its gateway died) is taken over.
    assert_eq!(claim("r3", "h", now + 200).await, Claim::Run);
    let stored = Stored {
        status: 200,
        content_type: Some("application/json".into()),
        body: "{\"ok\":true}".into(),
        request_id: "r3".into(),
    };
    // The first holder cannot finish what it no longer holds.
    store
        .finish_idempotency("alerted", "k1", "r1", &stored)
        .await
        .unwrap();
    assert_eq!(claim("r4", "h", now + 250).await, Claim::InProgress);
    store
        .finish_idempotency("alerted", "k1", "r3", &stored)
        .await
        .unwrap();
    assert_eq!(claim("r5", "h", now + 250).await, Claim::Replay(stored));
    let k2 = |request_id: &'static str| ClaimArgs {
        key: "k2",
        ..args(request_id, "h", now)
    };
    assert_eq!(
        store.claim_idempotency(&k2("r6")).await.unwrap(),
        Claim::Run
    );
    store
        .release_idempotency("alerted", "k2", "r6")
        .await
        .unwrap();
    assert_eq!(
        store.claim_idempotency(&k2("r7")).await.unwrap(),
        Claim::Run
    );
    // Past the window the key is forgotten.
    assert_eq!(claim("r8", "other", now + 2_000_000).await, Claim::Run);
}

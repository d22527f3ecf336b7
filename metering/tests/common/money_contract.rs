//! What the store owes service tiers and reserved capacity, on SQLite (`store.rs`) and
//! PostgreSQL (`store_postgres.rs`) alike: invoice lines per tier that add up to the total, a
//! reservation never oversold even by concurrent creations, its prorated invoice line, and the
//! SLA report's counts. Each function wants a database of its own.

#![allow(
    dead_code,
    reason = "the SQLite and the PostgreSQL test crates include this module; not every helper is used by both"
)]

use tollgate_metering::audit::Actor;
use tollgate_metering::billing::{invoice, parse_period};
use tollgate_metering::kinds::{Outcome, ServiceTier};
use tollgate_metering::money::parse_usd;
use tollgate_metering::store::{
    CustomerFields, GroupBy, NewReservation, SlaFilter, Store, StoreError, UsageFilter,
};

use super::contract::record;

const DAY: i64 = 86_400_000_000;

async fn customer(store: &Store, id: &str) {
    store
        .create_customer(id, CustomerFields::default(), &Actor::cli("contract"))
        .await
        .unwrap();
}

/// An invoice's line items and its total, in nano-USD; every line's amount sums to the total.
async fn invoice_lines(store: &Store, customer: &str, period: &str) -> Vec<serde_json::Value> {
    let inv = serde_json::to_value(invoice(store, customer, period).await.unwrap()).unwrap();
    let lines = inv["line_items"].as_array().unwrap().clone();
    let sum: i64 = lines
        .iter()
        .map(|l| parse_usd(l["amount_usd"].as_str().unwrap()).unwrap())
        .sum();
    assert_eq!(
        sum,
        parse_usd(inv["total_usd"].as_str().unwrap()).unwrap(),
        "the lines add up to the total to the nano-USD: {inv}"
    );
    lines
}

/// Records at two tiers: two invoice lines, one per tier, that add up to the total and to
/// the records; the usage report groups by tier.
pub async fn tiers_on_invoices(store: &Store) {
    customer(store, "tiers").await;
    let (start, _) = parse_period("2026-11").unwrap();
    let mut records = Vec::new();
    for (i, (tier, cost)) in [
        (ServiceTier::Default, 1_001),
        (ServiceTier::Flex, 333),
        (ServiceTier::Default, 2_502),
        (ServiceTier::Flex, 167),
        (ServiceTier::Priority, 0),
    ]
    .into_iter()
    .enumerate()
    {
        let mut r = record(&format!("tier-{i}"), "tiers", "m", start + i as i64, cost);
        r.service_tier = tier;
        records.push(r);
    }
    // A priority record of another model, outside the month: on neither line.
    let mut late = record("tier-late", "tiers", "m", start + 40 * DAY, 9_999);
    late.service_tier = ServiceTier::Priority;
    records.push(late);
    store.insert_records(&records).await.unwrap();
    let back = store.records_after(0, 10).await.unwrap().0;
    assert_eq!(
        back[1].service_tier,
        ServiceTier::Flex,
        "stored and read back"
    );

    let lines = invoice_lines(store, "tiers", "2026-11").await;
    let tiers: Vec<(&str, &str, i64)> = lines
        .iter()
        .map(|l| {
            (
                l["service_tier"].as_str().unwrap(),
                l["amount_usd"].as_str().unwrap(),
                l["requests"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        tiers,
        [
            ("default", "0.000003503", 2),
            ("flex", "0.000000500", 2),
            ("priority", "0.000000000", 1)
        ]
    );
    let rows = store
        .aggregate(
            &UsageFilter {
                start,
                end: start + 30 * DAY,
                ..UsageFilter::default()
            },
            &[GroupBy::ServiceTier],
            None,
        )
        .await
        .unwrap();
    let by_tier: Vec<(Option<ServiceTier>, i64)> = rows
        .iter()
        .map(|r| (r.service_tier, r.cost_nano_usd))
        .collect();
    assert_eq!(
        by_tier,
        [
            (Some(ServiceTier::Default), 3_503),
            (Some(ServiceTier::Flex), 500),
            (Some(ServiceTier::Priority), 0)
        ]
    );
}

fn new_reservation(customer: &str, model: &str, tpm: i64, starts_at: i64) -> NewReservation {
    NewReservation {
        customer_id: customer.into(),
        model: model.into(),
        reserved_tokens_per_minute: tpm,
        price_per_ktpm_month: "12.50".parse().unwrap(),
        span: (starts_at, None),
    }
}

/// A model's reservations never pass its capacity at any moment; ending one frees it; each
/// bills a prorated line.
pub async fn reservations(store: &Store) {
    let actor = Actor::cli("contract");
    customer(store, "rsv").await;
    let (start, end) = parse_period("2026-11").unwrap();
    let actor = &actor;
    let create =
        |n: NewReservation| async move { store.create_reservation(&n, 1_000, actor).await };
    let a = create(new_reservation("rsv", "m", 600, start))
        .await
        .unwrap();
    assert!(a.id.starts_with("rsv_"));
    match create(new_reservation("rsv", "m", 401, start + DAY)).await {
        Err(StoreError::Conflict(m)) => assert!(m.contains("400"), "{m}"),
        other => panic!("oversold: {other:?}"),
    }
    // Exactly the capacity; another model's capacity is its own.
    let b = create(new_reservation("rsv", "m", 400, start + 10 * DAY))
        .await
        .unwrap();
    create(new_reservation("rsv", "other", 1_000, start))
        .await
        .unwrap();
    // Ending the first frees its share from then on, not before.
    let a = store
        .end_reservation(&a.id, start + 20 * DAY, actor)
        .await
        .unwrap();
    assert_eq!(a.ends_at, Some(start + 20 * DAY));
    assert!(matches!(
        create(new_reservation("rsv", "m", 600, start + 19 * DAY)).await,
        Err(StoreError::Conflict(_))
    ));
    let mut c = new_reservation("rsv", "m", 600, start + 20 * DAY);
    c.span.1 = Some(start + 25 * DAY);
    create(c).await.unwrap();
    assert!(matches!(
        create(new_reservation("nobody", "m", 1, end)).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        create(new_reservation("rsv", "m", 0, end)).await,
        Err(StoreError::Invalid(_))
    ));
    assert_eq!(
        store
            .reservations(Some("rsv"), Some("m"))
            .await
            .unwrap()
            .len(),
        3
    );
    assert_eq!(store.reservation(&b.id).await.unwrap(), b);

    // November has 30 days: a = 20 days × 600 TPM, b = 20 days × 400, c = 5 days × 600,
    // other = 30 days × 1000; at $12.50 per 1,000 TPM per month.
    let lines = invoice_lines(store, "rsv", "2026-11").await;
    let amounts: Vec<(&str, &str, &str)> = lines
        .iter()
        .map(|l| {
            assert_eq!(l["kind"], "reservation");
            assert_eq!(l["service_tier"], "reserved");
            (
                l["model"].as_str().unwrap(),
                l["days_active"].as_str().unwrap(),
                l["amount_usd"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        amounts,
        [
            ("m", "20", "5.000000000"),
            ("m", "20", "3.333333333"),
            ("m", "5", "1.250000000"),
            ("other", "30", "12.500000000"),
        ]
    );
}

/// Concurrent creations on one model: as many pass as fit, never more (the check and the
/// insert are one serialized transaction).
pub async fn concurrent_reservations_never_oversell(store: &Store) {
    customer(store, "race").await;
    let (start, _) = parse_period("2026-11").unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                let n = new_reservation("race", "hot", 300, start);
                store
                    .create_reservation(&n, 1_000, &Actor::cli("race"))
                    .await
            })
        })
        .collect();
    let (mut made, mut refused) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => made += 1,
            Err(StoreError::Conflict(_)) => refused += 1,
            Err(e) => panic!("neither created nor refused for capacity: {e}"),
        }
    }
    assert_eq!(
        (made, refused),
        (3, 5),
        "3 × 300 fit in 1000, a 4th would not"
    );
    let held: i64 = store
        .reservations(None, Some("hot"))
        .await
        .unwrap()
        .iter()
        .map(|r| r.reserved_tokens_per_minute)
        .sum();
    assert_eq!(held, 900);
}

/// The SLA report's counts per customer and tier: failures, TTFTs under the target, and the
/// histogram's percentiles.
pub async fn sla_report(store: &Store) {
    let (start, end) = parse_period("2026-11").unwrap();
    let mut records = Vec::new();
    for i in 0..100i64 {
        let mut r = record(&format!("sla-{i}"), "fast", "m", start + i, 1);
        r.service_tier = ServiceTier::Priority;
        r.ttft_ms = Some(if i < 95 { 80 } else { 1_200 + i });
        records.push(r);
    }
    for i in 0..4i64 {
        let mut r = record(&format!("sla-d{i}"), "fast", "other", start + i, 1);
        if i == 0 {
            r.status = Outcome::Failed;
            r.ttft_ms = None;
        }
        records.push(r);
    }
    store.insert_records(&records).await.unwrap();
    let filter = SlaFilter {
        start,
        end,
        ttft_target_ms: 1_000,
        ..SlaFilter::default()
    };
    let rows = store.sla(&filter).await.unwrap();
    assert_eq!(rows.len(), 2);
    let (default, priority) = (&rows[0], &rows[1]);
    assert_eq!(
        (
            priority.service_tier,
            priority.requests,
            priority.ttft_within_target
        ),
        (ServiceTier::Priority, 100, 95)
    );
    assert_eq!(priority.within_target(), 0.95);
    assert_eq!(
        priority.ttft_quantile_ms(0.5),
        Some(100),
        "its bucket's bound"
    );
    assert_eq!(
        priority.ttft_quantile_ms(0.99),
        Some(1_299),
        "its bucket's bound (1500), capped by the largest seen"
    );
    assert_eq!(priority.ttft_max_ms, Some(1_299));
    assert_eq!(
        (
            default.service_tier,
            default.requests,
            default.failed,
            default.ttft_measured
        ),
        (ServiceTier::Default, 4, 1, 3)
    );
    assert_eq!(default.availability(), 0.75);
    let only_model = store
        .sla(&SlaFilter {
            model: Some("other".into()),
            customer_id: Some("fast".into()),
            ..filter
        })
        .await
        .unwrap();
    assert_eq!(only_model.len(), 1);
    assert_eq!(only_model[0].requests, 4);
}

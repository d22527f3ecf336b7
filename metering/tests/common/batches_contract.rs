//! The `batches` and `batch_lines` tables' contract, on SQLite (`store.rs`) and PostgreSQL
//! (`store_postgres.rs`): ownership, pages, the start with its lines, failure, cancellation.

#![allow(
    dead_code,
    reason = "the SQLite and the PostgreSQL test crates include this module; not every helper is used by both"
)]

use tollgate_metering::kinds::{BatchStatus, Endpoint};
use tollgate_metering::store::{BatchLine, BatchRow, ListOrder, Store, StoreError};

pub fn batch(id: &str, customer: &str) -> BatchRow {
    let metadata = Some(r#"{"job":"nightly"}"#.to_string());
    BatchRow::validating(
        id.into(),
        (customer, "key_1"),
        Endpoint::ChatCompletions,
        "file-1".into(),
        metadata,
    )
    .window("24h", 100, 86_400)
}

pub fn lines(n: i64) -> Vec<BatchLine> {
    (1..=n)
        .map(|line| BatchLine {
            line,
            custom_id: format!("req-{line}"),
            body: format!(r#"{{"n":{line}}}"#),
            model: if line % 2 == 0 { "m-even" } else { "m-odd" }.into(),
        })
        .collect()
}

pub async fn exercise(store: &Store) {
    for (id, customer) in [
        ("batch_1", "acme"),
        ("batch_2", "acme"),
        ("batch_3", "acme"),
        ("batch_9", "beta"),
    ] {
        store.insert_batch(&batch(id, customer)).await.unwrap();
    }
    assert_eq!(
        store.batch("batch_1", "acme").await.unwrap(),
        Some(batch("batch_1", "acme"))
    );
    assert_eq!(store.batch("batch_1", "beta").await.unwrap(), None);
    let (page, more) = store
        .batches("acme", None, 2, ListOrder::Desc)
        .await
        .unwrap();
    let ids: Vec<&str> = page.iter().map(|b| b.id.as_str()).collect();
    assert_eq!((ids, more), (vec!["batch_3", "batch_2"], true));
    let (page, more) = store
        .batches("acme", Some("batch_2"), 2, ListOrder::Desc)
        .await
        .unwrap();
    assert_eq!(
        (page.len(), page[0].id.as_str(), more),
        (1, "batch_1", false)
    );

    // Started: lines written (more than one INSERT's worth), in_progress with its total.
    assert!(store
        .start_batch("batch_1", &lines(1_201), 110)
        .await
        .unwrap());
    let started = store.batch("batch_1", "acme").await.unwrap().unwrap();
    assert_eq!(
        (started.status, started.total, started.times.in_progress_at),
        (BatchStatus::InProgress, 1_201, Some(110))
    );
    let stored = store.batch_lines("batch_1").await.unwrap();
    assert_eq!(stored.len(), 1_201);
    assert_eq!(
        stored[1_200],
        (lines(1_201)[1_200].clone(), "queued".to_string())
    );
    // Only a validating batch starts or fails.
    assert!(!store.start_batch("batch_1", &lines(1), 111).await.unwrap());
    store.fail_batch("batch_1", "[]", 111).await.unwrap();
    assert_eq!(
        store
            .batch("batch_1", "acme")
            .await
            .unwrap()
            .unwrap()
            .status,
        BatchStatus::InProgress
    );

    // Failed validation keeps its errors; it cannot be cancelled.
    store
        .fail_batch("batch_2", r#"[{"line":3}]"#, 120)
        .await
        .unwrap();
    let failed = store.batch("batch_2", "acme").await.unwrap().unwrap();
    // Only the batch that did fail has its `batch.failed` event.
    let events = store.webhook_events("acme", 100).await.unwrap();
    let ended: Vec<(&str, &str)> = events
        .iter()
        .map(|(_, kind, object, _)| (kind.as_str(), object.as_str()))
        .collect();
    assert_eq!(ended, [("batch.failed", "batch_2")]);
    assert_eq!(
        (
            failed.status,
            failed.times.failed_at,
            failed.errors.as_deref()
        ),
        (BatchStatus::Failed, Some(120), Some(r#"[{"line":3}]"#))
    );
    assert!(matches!(
        store.cancel_batch("batch_2", "acme", 130).await,
        Err(StoreError::Conflict(_))
    ));

    // Cancelled in progress: its queued lines at once, the batch `cancelling` until a runner
    // ends it (with the files of what ran).
    assert_eq!(
        store.cancel_batch("batch_1", "beta", 130).await.unwrap(),
        None
    );
    let cancelled = store
        .cancel_batch("batch_1", "acme", 130)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            cancelled.status,
            cancelled.times.cancelling_at,
            cancelled.times.cancelled_at
        ),
        (BatchStatus::Cancelling, Some(130), None)
    );
    assert!(store
        .batch_lines("batch_1")
        .await
        .unwrap()
        .iter()
        .all(|(_, state)| state == "cancelled"));
    // A validating batch cancelled never starts.
    store
        .cancel_batch("batch_3", "acme", 140)
        .await
        .unwrap()
        .unwrap();
    assert!(!store.start_batch("batch_3", &lines(2), 141).await.unwrap());
    assert!(store.batch_lines("batch_3").await.unwrap().is_empty());
}

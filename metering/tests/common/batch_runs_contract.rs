//! Running batch lines, on SQLite (`store.rs`) and PostgreSQL (`store_postgres.rs`): claims
//! under a lease, a lapsed lease claimed again, a result stored once, lines past the window
//! expired, a batch ended once with its counts and tokens, and claims that run at the same
//! time never take the same line.

#![allow(
    dead_code,
    reason = "the SQLite and the PostgreSQL test crates include this module; not every helper is used by both"
)]

use std::collections::HashSet;

use tollgate_metering::kinds::{BatchStatus, LineState};
use tollgate_metering::store::{BatchUsage, LineResult, Store};

use crate::batches_contract::{batch, lines};

fn result(state: LineState, tokens: i64) -> LineResult {
    LineResult {
        state,
        result: format!(r#"{{"state":"{state}"}}"#),
        usage: BatchUsage {
            input_tokens: tokens,
            output_tokens: 2 * tokens,
            cached_tokens: 0,
        },
    }
}

/// A started batch `id` of `n` lines, created at 100 and due at 100 + 86,400.
async fn started(store: &Store, id: &str, n: i64) {
    store.insert_batch(&batch(id, "acme")).await.unwrap();
    assert!(store.start_batch(id, &lines(n), 100).await.unwrap());
}

pub async fn exercise(store: &Store) {
    assert!(!store.batches_under_way().await.unwrap());
    started(store, "batch_r1", 5).await;
    assert!(store.batches_under_way().await.unwrap());
    // Claimed in order, under the lease, at most as many as asked.
    let first = store.claim_batch_lines(200, 260, 3).await.unwrap();
    let numbers: Vec<i64> = first.iter().map(|l| l.line).collect();
    assert_eq!(numbers, vec![1, 2, 3]);
    assert_eq!(
        (
            first[1].custom_id.as_str(),
            first[1].model.as_str(),
            first[1].attempts
        ),
        ("req-2", "m-even", 1)
    );
    let counts = store.batch_line_counts().await.unwrap();
    assert!(
        counts.contains(&("m-odd".into(), LineState::Running, 2)),
        "{counts:?}"
    );
    assert!(
        counts.contains(&("m-odd".into(), LineState::Queued, 1)),
        "{counts:?}"
    );
    // Held lines are not claimed again before their lease lapses.
    let rest = store.claim_batch_lines(201, 261, 10).await.unwrap();
    assert_eq!(rest.iter().map(|l| l.line).collect::<Vec<_>>(), vec![4, 5]);
    assert!(store
        .claim_batch_lines(202, 262, 10)
        .await
        .unwrap()
        .is_empty());

    // A result is stored once: a second run of the line keeps the first.
    assert!(store
        .finish_batch_line("batch_r1", 1, &result(LineState::Completed, 10))
        .await
        .unwrap());
    assert!(!store
        .finish_batch_line("batch_r1", 1, &result(LineState::Failed, 99))
        .await
        .unwrap());
    let b = store.batch("batch_r1", "acme").await.unwrap().unwrap();
    assert_eq!((b.completed, b.failed), (1, 0));

    // Line 2's lease is renewed; line 3's lapses and it is claimed again (a second attempt).
    assert!(store.renew_batch_line("batch_r1", 2, 400).await.unwrap());
    assert!(!store.renew_batch_line("batch_r1", 1, 400).await.unwrap());
    let again = store.claim_batch_lines(300, 360, 10).await.unwrap();
    assert_eq!(
        again
            .iter()
            .map(|l| (l.line, l.attempts))
            .collect::<Vec<_>>(),
        vec![(3, 2), (4, 2), (5, 2)]
    );
    // Line 3's engine failed it: put back as its first retry, claimed again (under a new
    // request id, the runner's business) once its short lease lapses, and not before.
    assert!(again.iter().all(|l| l.retries == 0));
    assert!(store.retry_batch_line("batch_r1", 3, 330).await.unwrap());
    assert!(!store.retry_batch_line("batch_r1", 1, 330).await.unwrap());
    assert!(store
        .claim_batch_lines(320, 380, 10)
        .await
        .unwrap()
        .is_empty());
    let retried = store.claim_batch_lines(340, 400, 10).await.unwrap();
    assert_eq!(
        retried
            .iter()
            .map(|l| (l.line, l.attempts, l.retries))
            .collect::<Vec<_>>(),
        vec![(3, 3, 1)]
    );
    // Not done while lines run: nothing to end.
    assert!(store.batches_to_end(300).await.unwrap().is_empty());
    assert!(store
        .claim_batch_end("batch_r1", 300, 360)
        .await
        .unwrap()
        .is_none());
    for (line, state) in [
        (2, LineState::Completed),
        (3, LineState::Failed),
        (4, LineState::Completed),
        (5, LineState::Completed),
    ] {
        assert!(store
            .finish_batch_line("batch_r1", line, &result(state, line))
            .await
            .unwrap());
    }
    // Ended once: one runner claims the end, its lease keeps the others off.
    assert_eq!(store.batches_to_end(301).await.unwrap(), vec!["batch_r1"]);
    let ending = store
        .claim_batch_end("batch_r1", 301, 361)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (ending.status, ending.times.finalizing_at),
        (BatchStatus::Finalizing, Some(301))
    );
    assert!(store
        .claim_batch_end("batch_r1", 302, 362)
        .await
        .unwrap()
        .is_none());
    assert!(store.batches_to_end(302).await.unwrap().is_empty());
    let outcomes = store.batch_outcomes("batch_r1", 0, 2).await.unwrap();
    assert_eq!(
        outcomes
            .iter()
            .map(|o| (o.line, o.state))
            .collect::<Vec<_>>(),
        vec![(1, LineState::Completed), (2, LineState::Completed)]
    );
    assert_eq!(
        outcomes[0].result.as_deref(),
        Some(r#"{"state":"completed"}"#)
    );
    assert_eq!(
        store.batch_outcomes("batch_r1", 4, 10).await.unwrap().len(),
        1
    );
    assert_eq!(
        store
            .end_batch("batch_r1", (Some("file-out"), Some("file-err")), 310)
            .await
            .unwrap(),
        Some(BatchStatus::Completed)
    );
    assert_eq!(
        store
            .end_batch("batch_r1", (None, None), 311)
            .await
            .unwrap(),
        None
    );
    // The end is one webhook event, added with it (no webhook: kept, never sent).
    let events: Vec<_> = store
        .webhook_events("acme", 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|(_, _, object, _)| object == "batch_r1")
        .map(|(_, kind, _, status)| (kind, status.as_str()))
        .collect();
    assert_eq!(events, [("batch.completed".to_string(), "no_webhook")]);
    let done = store.batch("batch_r1", "acme").await.unwrap().unwrap();
    assert_eq!(
        (
            done.status,
            done.times.completed_at,
            done.output_file_id.as_deref(),
            done.error_file_id.as_deref(),
            (done.total, done.completed, done.failed),
            done.usage
        ),
        (
            BatchStatus::Completed,
            Some(310),
            Some("file-out"),
            Some("file-err"),
            (5, 4, 1),
            // Line 1 kept its first result (10 tokens), not the second run's.
            BatchUsage {
                input_tokens: 10 + 2 + 3 + 4 + 5,
                output_tokens: 2 * (10 + 2 + 3 + 4 + 5),
                cached_tokens: 0
            }
        )
    );

    expiry_and_cancel(store).await;
    concurrent_claims(store).await;
}

/// Lines not run within the window expire (unbilled) and the batch ends `expired`; a cancelled
/// batch's running line finishes and it ends `cancelled`.
async fn expiry_and_cancel(store: &Store) {
    started(store, "batch_r2", 3).await;
    let due = 100 + 86_400;
    let held = store
        .claim_batch_lines(due - 10, due + 50, 1)
        .await
        .unwrap();
    assert_eq!(held[0].line, 1);
    // Past the window nothing more is claimed; the queued lines expire, the held one runs on.
    assert!(store
        .claim_batch_lines(due, due + 60, 10)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(store.expire_batch_lines(due).await.unwrap(), 2);
    assert!(store.batches_to_end(due).await.unwrap().is_empty());
    assert!(store
        .finish_batch_line("batch_r2", 1, &result(LineState::Completed, 1))
        .await
        .unwrap());
    assert!(store
        .claim_batch_end("batch_r2", due + 1, due + 61)
        .await
        .unwrap()
        .is_some());
    assert_eq!(
        store
            .end_batch("batch_r2", (Some("f"), Some("e")), due + 2)
            .await
            .unwrap(),
        Some(BatchStatus::Expired)
    );
    let b = store.batch("batch_r2", "acme").await.unwrap().unwrap();
    assert_eq!(
        (b.status, b.times.expired_at, b.completed, b.failed),
        (BatchStatus::Expired, Some(due + 2), 1, 2)
    );

    started(store, "batch_r3", 3).await;
    let held = store.claim_batch_lines(500, 560, 1).await.unwrap();
    assert_eq!(held[0].batch_id, "batch_r3");
    let cancelling = store
        .cancel_batch("batch_r3", "acme", 501)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(cancelling.status, BatchStatus::Cancelling);
    assert!(store
        .claim_batch_lines(502, 562, 10)
        .await
        .unwrap()
        .is_empty());
    assert!(store.batches_to_end(502).await.unwrap().is_empty());
    assert!(store
        .finish_batch_line("batch_r3", 1, &result(LineState::Completed, 1))
        .await
        .unwrap());
    // Its files are written while it stays `cancelling`.
    let ending = store
        .claim_batch_end("batch_r3", 503, 563)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ending.status, BatchStatus::Cancelling);
    assert!(store
        .claim_batch_end("batch_r3", 504, 564)
        .await
        .unwrap()
        .is_none());
    assert_eq!(
        store
            .end_batch("batch_r3", (Some("f"), Some("e")), 505)
            .await
            .unwrap(),
        Some(BatchStatus::Cancelled)
    );
    let outcomes = store.batch_outcomes("batch_r3", 0, 10).await.unwrap();
    assert_eq!(
        outcomes.iter().map(|o| o.state).collect::<Vec<_>>(),
        vec![
            LineState::Completed,
            LineState::Cancelled,
            LineState::Cancelled
        ]
    );
}

/// Claims at the same time (several connections) share the lines out: none is taken twice.
async fn concurrent_claims(store: &Store) {
    started(store, "batch_r4", 200).await;
    let claims = (0..8).map(|_| {
        let store = store.clone();
        tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let got = store.claim_batch_lines(1_000, 1_060, 7).await.unwrap();
                if got.is_empty() {
                    return mine;
                }
                mine.extend(got.into_iter().map(|l| (l.batch_id, l.line)));
            }
        })
    });
    let mut seen = HashSet::new();
    let mut total = 0;
    for claim in claims.collect::<Vec<_>>() {
        for line in claim.await.unwrap() {
            total += 1;
            assert!(seen.insert(line.clone()), "{line:?} claimed twice");
        }
    }
    assert_eq!((total, seen.len()), (200, 200));
}

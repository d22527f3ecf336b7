//! The batch runner: runs the lines of the Batch API's batches (the objects are
//! `api/batches`', the rows metering's `store/batches.rs` and `store/batch_runs.rs`). Every
//! replica (and the embedded server) runs one. It claims queued lines in the ledger database
//! under a lease, at most `[server] batch_concurrency` in flight here, and runs each through
//! the handler of its batch's endpoint as the key that created the batch, at the `batch` tier
//! ([`line`]); so a line is admitted, routed to any engine serving its model, limited and
//! billed exactly as the direct request. A line's request id (its usage record's id) derives
//! from its batch and `custom_id`, so a line run again after its replica died is billed once
//! (the ledger ignores a second record of an id), and its result is stored once (only a line
//! still `running` takes one). A line refused for now (the engines' queues full, a rate
//! limit) ran nowhere and is billed nothing: it runs again a little later. A line the engine
//! failed (a worker died under it) has an uncharged record and runs again, up to
//! [`line::MAX_RETRIES`] times, each retry under a request id of its own. A batch whose lines
//! are all done is ended: its output and error
//! files are written and it is `completed`, `expired` or `cancelled` ([`end`]).
//!
//! Lines run as tasks of [`AppState::tasks`]: at shutdown the runner stops claiming and the
//! lines in flight finish within the shutdown timeout; a line cut off is run again later.

mod end;
mod line;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tollgate_metering::kinds::LineState;
use tollgate_metering::store::{ClaimedLine, Store};

use crate::files::{unix_now, FileStorage};
use crate::AppState;

/// How long a line refused for now (queues full, a rate limit) waits before it runs again.
const RETRY_AFTER_SECS: i64 = 2;

/// How often the runner looks for work when there is none (a finished line wakes it at once).
const POLL: Duration = Duration::from_millis(500);

/// Runs batch lines until `stop`: then it claims no more (lines in flight finish as tasks of
/// `state.tasks`).
pub async fn run(state: AppState, stop: CancellationToken) {
    let (Some(store), Some(files)) = (state.store.clone(), state.files.clone()) else {
        return;
    };
    let runner = Runner {
        slots: Arc::new(Semaphore::new(state.config.server.batch_concurrency)),
        done: Arc::new(Notify::new()),
        lease: i64::try_from(state.config.server.batch_lease.as_secs()).unwrap_or(60),
        state,
        store,
        files,
    };
    loop {
        if let Err(e) = runner.pass().await {
            tracing::warn!("batch runner: {e}");
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = runner.done.notified() => {}
            () = tokio::time::sleep(POLL) => {}
        }
    }
}

struct Runner {
    state: AppState,
    store: Store,
    files: FileStorage,
    /// Lines in flight here, at most `batch_concurrency`.
    slots: Arc<Semaphore>,
    /// Woken when a line ends: a slot is free and its batch may be done.
    done: Arc<Notify>,
    /// Seconds a claim lasts unless renewed.
    lease: i64,
}

impl Runner {
    /// One pass: expires lines past their window, ends the batches that are done, refreshes
    /// the metrics and claims lines for the free slots.
    async fn pass(&self) -> anyhow::Result<()> {
        if !self.store.batches_under_way().await? {
            return self.observe().await;
        }
        let now = unix_now();
        self.store.expire_batch_lines(now).await?;
        for id in self.store.batches_to_end(now).await? {
            if let Err(e) = end::end(&self.store, &self.files, &id, self.lease).await {
                tracing::error!(batch = %id, "cannot end the batch: {e}");
            }
        }
        self.observe().await?;
        let free = self.slots.available_permits();
        if free == 0 {
            return Ok(());
        }
        let claimed = self
            .store
            .claim_batch_lines(
                now,
                now + self.lease,
                u32::try_from(free).unwrap_or(u32::MAX),
            )
            .await?;
        for claimed in claimed {
            let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                // Not reached (the claim took at most the free slots); the lease lapses and
                // another pass takes the line again.
                break;
            };
            let (state, store, done) = (self.state.clone(), self.store.clone(), self.done.clone());
            let lease = self.lease;
            self.state.tasks.spawn(async move {
                run_claimed(&state, &store, &claimed, lease).await;
                drop(slot);
                done.notify_one();
            });
        }
        Ok(())
    }

    /// The lines queued and running now, over every replica, by model.
    async fn observe(&self) -> anyhow::Result<()> {
        let counts = self.store.batch_line_counts().await?;
        let gauge = &self.state.metrics.batch_lines;
        gauge.reset();
        let catalogue = self.state.catalogue.current();
        for state in [LineState::Queued, LineState::Running] {
            for model in catalogue.models.keys() {
                gauge.with_label_values(&[model, state.as_str()]).set(0.0);
            }
        }
        for (model, state, n) in counts {
            #[expect(
                clippy::cast_precision_loss,
                reason = "a count of lines, far below 2^52"
            )]
            gauge
                .with_label_values(&[&model, state.as_str()])
                .set(n as f64);
        }
        Ok(())
    }
}

/// Runs `run` to its end, calling `renew` with the new end of the lease (`lease` seconds from
/// now) every `every`; `None` (and `run` dropped, which stops its generation) as soon as
/// `renew` says the claim is lost.
pub(crate) async fn under_lease<T, R: Future<Output = bool>>(
    run: impl Future<Output = T>,
    lease: i64,
    every: Duration,
    mut renew: impl FnMut(i64) -> R,
) -> Option<T> {
    tokio::pin!(run);
    loop {
        tokio::select! {
            ran = &mut run => return Some(ran),
            () = tokio::time::sleep(every) => {
                if !renew(unix_now() + lease).await {
                    return None;
                }
            }
        }
    }
}

/// Runs one claimed line, renewing its lease while it runs, and stores its result.
async fn run_claimed(state: &AppState, store: &Store, claimed: &ClaimedLine, lease: i64) {
    let renew_every = Duration::from_secs(u64::try_from(lease / 3).unwrap_or(1).max(1));
    let renew = |until| async move {
        if let Err(e) = store
            .renew_batch_line(&claimed.batch_id, claimed.line, until)
            .await
        {
            tracing::warn!(batch = %claimed.batch_id, line = claimed.line, "cannot renew the line's lease: {e}");
        }
        // A line keeps running whatever the renewal says: only a line still `running` takes
        // its result.
        true
    };
    let Some(ran) = under_lease(line::run(state, store, claimed), lease, renew_every, renew).await
    else {
        return;
    };
    let result = match ran {
        line::Ran::Done(result) => result,
        line::Ran::Later => {
            // Still `running` under a short lease: claimed again once it lapses.
            let until = unix_now() + RETRY_AFTER_SECS;
            if let Err(e) = store
                .renew_batch_line(&claimed.batch_id, claimed.line, until)
                .await
            {
                tracing::warn!(batch = %claimed.batch_id, line = claimed.line, "cannot put the line back: {e}");
            }
            return;
        }
        line::Ran::Again => {
            let until = unix_now() + RETRY_AFTER_SECS;
            if let Err(e) = store
                .retry_batch_line(&claimed.batch_id, claimed.line, until)
                .await
            {
                tracing::warn!(batch = %claimed.batch_id, line = claimed.line, "cannot put the line back: {e}");
            }
            return;
        }
    };
    match store
        .finish_batch_line(&claimed.batch_id, claimed.line, &result)
        .await
    {
        Ok(true) => state
            .metrics
            .batch_lines_finished
            .with_label_values(&[&claimed.model, result.state.as_str()])
            .inc(),
        Ok(false) => tracing::info!(
            batch = %claimed.batch_id,
            line = claimed.line,
            "the line was ended by another run of it; this result is dropped"
        ),
        // Its lease lapses and it runs again; its record is the same one, billed once.
        Err(e) => tracing::error!(
            batch = %claimed.batch_id,
            line = claimed.line,
            "cannot store the line's result: {e}"
        ),
    }
}

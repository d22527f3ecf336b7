//! The state every handler shares ([`AppState`]): configuration, backends, the store, ledger
//! and limiter, and the bookkeeping of requests in flight. Built once at start.
//!
//! An [`AppState`] is one `Arc` to its [`SharedState`]: the router clones the state of every
//! layer and handler on a request's route for each request, and a clone of the whole struct
//! (twenty-odd handles) was a few percent of the gateway's instructions per request. Changing
//! a field (at start, and in tests) copies the struct first when other clones share it, so a
//! clone never sees a change made through another.

use std::collections::HashMap;
use std::sync::Arc;

use crate::api::admin_tokens::failures::FailedAuth;
use crate::auth::AuthConfig;
use crate::backend::Backend;
use crate::catalogue::Catalogue;
use crate::config::Config;
use crate::files::FileStorage;
use crate::server::metrics::Metrics;
use crate::sessions::Sessions;
use crate::{alerts, concurrency};
use tollgate_metering::ledger::{Ledger, LedgerGauges};
use tollgate_metering::limits::{Limiter, ReservationMeter};
use tollgate_metering::store::Store;

/// Shared by every handler: reads its fields through `Deref`.
#[derive(Clone)]
pub struct AppState(Arc<SharedState>);

impl std::ops::Deref for AppState {
    type Target = SharedState;

    fn deref(&self) -> &SharedState {
        &self.0
    }
}

impl std::ops::DerefMut for AppState {
    /// Copy on write: the fields of this clone alone.
    fn deref_mut(&mut self) -> &mut SharedState {
        Arc::make_mut(&mut self.0)
    }
}

/// What an [`AppState`] holds.
#[derive(Clone)]
pub struct SharedState {
    /// The configuration read at start: its `[server]` settings hold until a restart; its
    /// models are the catalogue at start only (read [`AppState::catalogue`] for the models in
    /// force).
    pub config: Arc<Config>,
    /// The models in force, their prices and backends (replaced by a reload).
    pub catalogue: Catalogue,
    pub auth: AuthConfig,
    /// Behind an `Arc`: the metrics are many handles.
    pub metrics: Arc<Metrics>,
    /// Customers, keys and the ledger; `None` runs without metering (static keys only).
    pub store: Option<Store>,
    pub ledger: Option<Ledger>,
    pub limiter: Limiter,
    /// `TOLLGATE_ADMIN_TOKEN`; the admin API is off without it.
    pub admin_token: Option<Arc<str>>,
    /// Sequences and requests in flight, for the concurrency caps.
    pub inflight: InFlightCounts,
    /// Signed-in console sessions.
    pub console: Arc<Sessions>,
    /// Work that outlives its request (idempotent requests run to completion without their
    /// client); drained at shutdown.
    pub tasks: tokio_util::task::TaskTracker,
    /// Background work (alert delivery), stopped at the end of shutdown.
    pub background: Background,
    /// Failed admin authentications per client address.
    pub admin_failures: Arc<FailedAuth>,
    /// Where the Files API keeps file bytes; `None` without a ledger database.
    pub files: Option<FileStorage>,
    /// The customers' reserved capacity and this minute's use of it (per process).
    pub reservations: Arc<ReservationMeter>,
}

/// How often the reservations and the customers' adapters are read again from the database: a
/// reservation made or ended, or an adapter added or removed, through another replica or the
/// CLI, or a reservation that starts or ends, counts within this.
pub const RESERVATIONS_REFRESH: std::time::Duration = std::time::Duration::from_secs(5);

/// What is in flight, for the concurrency caps.
#[derive(Clone, Default)]
pub struct InFlightCounts {
    /// Sequences per customer and model, for `max_sequences_per_customer`.
    pub sequences: Arc<concurrency::InFlight>,
    /// Requests per customer and per key, for `max_concurrent_requests`.
    pub requests: Arc<concurrency::InFlightRequests>,
}

/// Work that outlives requests and is stopped at the end of shutdown.
#[derive(Clone, Default)]
pub struct Background {
    /// Cancelled at the end of shutdown: stops the work.
    pub stop: tokio_util::sync::CancellationToken,
    /// The work, waited for (within a bound) once cancelled.
    pub tasks: tokio_util::task::TaskTracker,
}

impl AppState {
    pub fn new(
        config: Config,
        backends: HashMap<String, Arc<dyn Backend>>,
        auth: AuthConfig,
    ) -> anyhow::Result<Self> {
        Ok(Self(Arc::new(SharedState {
            catalogue: Catalogue::new(config.models.clone(), backends),
            config: Arc::new(config),
            auth,
            metrics: Arc::new(Metrics::new()?),
            store: None,
            ledger: None,
            limiter: Limiter::default(),
            admin_token: None,
            inflight: InFlightCounts::default(),
            console: Arc::default(),
            tasks: tokio_util::task::TaskTracker::new(),
            background: Background::default(),
            admin_failures: Arc::default(),
            files: None,
            reservations: Arc::default(),
        })))
    }

    /// Meters every request into `store`, through a ledger spooled at `spool_path` and synced
    /// as `sync` says. On
    /// PostgreSQL the rate limits and budgets are shared with every replica on that database.
    pub fn with_billing(
        mut self,
        store: Store,
        spool_path: &std::path::Path,
        sync: tollgate_metering::ledger::SpoolSync,
    ) -> anyhow::Result<Self> {
        let gauges = LedgerGauges {
            pending: self.metrics.ledger_pending.clone(),
            spooled: self.metrics.ledger_spooled.clone(),
        };
        self.ledger = Some(Ledger::start(store.clone(), spool_path, sync, gauges)?);
        // Budget alerts: delivered from the outbox until shutdown.
        let deliverer = alerts::Deliverer::new(store.clone(), alerts::DeliveryConfig::default())?;
        self.background
            .tasks
            .spawn(deliverer.run(self.background.stop.clone()));
        if store.kind() == tollgate_metering::store::DbKind::Postgres {
            // Replicas share the database: limits, budgets and the use of reservations are kept
            // there, exact across them.
            self.limiter = Limiter::shared(store.clone());
            self.reservations = Arc::new(ReservationMeter::shared(store.clone()));
        }
        self.background.tasks.spawn(refresh_reservations(
            store.clone(),
            self.reservations.clone(),
            self.background.stop.clone(),
        ));
        self.background.tasks.spawn(refresh_adapters(
            store.clone(),
            self.catalogue.clone(),
            self.background.stop.clone(),
        ));
        self.store = Some(store);
        Ok(self)
    }

    /// Reads the reservations again now (after one was made or ended here).
    pub async fn reload_reservations(&self) {
        if let Some(store) = &self.store {
            load_reservations(store, &self.reservations).await;
        }
    }

    /// Reads the customers' adapters again now (at start, and after one was added or removed
    /// here).
    pub async fn reload_adapters(&self) {
        if let Some(store) = &self.store {
            load_adapters(store, &self.catalogue).await;
        }
    }

    /// Keeps Files API bytes in `files` (needs [`AppState::with_billing`] first: the files'
    /// rows are in the ledger database), and sweeps expired files every `sweep_every`.
    pub fn with_files(mut self, files: FileStorage, sweep_every: std::time::Duration) -> Self {
        if let Some(store) = &self.store {
            self.background.tasks.spawn(files.clone().sweep(
                store.clone(),
                sweep_every,
                self.background.stop.clone(),
            ));
            self.files = Some(files);
        }
        self
    }

    /// Enables the admin API with this bearer token (ignored when empty).
    pub fn with_admin_token(mut self, token: Option<String>) -> Self {
        self.admin_token = token.filter(|t| !t.is_empty()).map(Arc::from);
        self
    }
}

/// The reservations active now, from `store` into `meter`, every [`RESERVATIONS_REFRESH`]
/// until `stop`.
async fn refresh_reservations(
    store: Store,
    meter: Arc<ReservationMeter>,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        load_reservations(&store, &meter).await;
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(RESERVATIONS_REFRESH) => {}
        }
    }
}

/// The customers' adapters from `store` into `catalogue`, every [`RESERVATIONS_REFRESH`]
/// until `stop`: one added or removed through another replica or the CLI counts within it.
async fn refresh_adapters(
    store: Store,
    catalogue: crate::catalogue::Catalogue,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        load_adapters(&store, &catalogue).await;
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(RESERVATIONS_REFRESH) => {}
        }
    }
}

/// One read of the customers' adapters into `catalogue`; a failed read keeps the last ones
/// (logged).
async fn load_adapters(store: &Store, catalogue: &crate::catalogue::Catalogue) {
    match store.adapters(None).await {
        Ok(all) => catalogue.set_owned(all),
        Err(e) => tracing::warn!("cannot read the customers' adapters: {e}"),
    }
}

/// One read of the reservations into `meter`; a failed read keeps the last ones (logged).
async fn load_reservations(store: &Store, meter: &ReservationMeter) {
    match store.reservations(None, None).await {
        Ok(all) => meter.replace(&all, tollgate_metering::store::now_micros()),
        Err(e) => tracing::warn!("cannot read the reservations: {e}"),
    }
}

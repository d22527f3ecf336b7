//! Composes the gateway and the runtime into the single `tollgate` process: the embedded mode
//! where every `local` model of `models.toml` runs in an in-process engine behind the gateway.
//!
//! `main.rs` only parses the command line; tests call [`serve`] on an ephemeral port.

pub mod billing_cli;
pub mod generate;
pub mod local;
pub mod models;
pub mod reload;
pub mod resident;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::FutureExt;
use tollgate_gateway::auth::DEFAULT_CUSTOMER;
use tollgate_metering::store::Store;

use tollgate_gateway::config::Config;

/// Where usage is metered.
#[derive(Debug, Clone, Default)]
pub struct Metering {
    /// Ledger database URL (`sqlite://…`, a file path, or `postgres://…`); `None` serves
    /// without metering (static keys only).
    pub database: Option<String>,
    /// The local append-only spool; defaults to the SQLite file's path + `.spool`, or
    /// `tollgate-ledger.spool` in the working directory for PostgreSQL.
    pub spool: Option<PathBuf>,
    /// When spooled records reach the disk (`--spool-sync`).
    pub spool_sync: tollgate_metering::ledger::SpoolSync,
    /// Where the Files API keeps bytes (`--files-url`: `s3://bucket/prefix` or a directory);
    /// defaults to [`default_files_dir`].
    pub files_url: Option<String>,
    /// `TOLLGATE_ADMIN_TOKEN`: enables the admin API.
    pub admin_token: Option<String>,
    /// The models.toml the server was started from: read again on `SIGHUP` and
    /// `POST /admin/v1/models/reload` (`None`: the catalogue cannot be reloaded).
    pub catalogue: Option<PathBuf>,
}

/// How often expired files are deleted.
const FILE_SWEEP: std::time::Duration = std::time::Duration::from_secs(60);

/// The spool path for a database URL when none is given.
pub fn default_spool(database: &str) -> PathBuf {
    beside_ledger(database, "spool", "tollgate-ledger.spool")
}

/// The directory of the Files API's bytes when no `--files-url` is given: next to the SQLite
/// file, or `tollgate-files` in the working directory for PostgreSQL.
pub fn default_files_dir(database: &str) -> PathBuf {
    beside_ledger(database, "files", "tollgate-files")
}

/// The SQLite file's path + `.suffix`, or `fallback` (PostgreSQL, in-memory SQLite).
fn beside_ledger(database: &str, suffix: &str, fallback: &str) -> PathBuf {
    let url = tollgate_metering::store::normalize_url(database);
    match url.strip_prefix("sqlite://") {
        Some(rest) => {
            let file = rest.split('?').next().unwrap_or(rest);
            if file.is_empty() || file.contains(":memory:") {
                PathBuf::from(fallback)
            } else {
                PathBuf::from(format!("{file}.{suffix}"))
            }
        }
        None => PathBuf::from(fallback),
    }
}

/// Loads every model, then serves the gateway on `listener` until `shutdown` resolves and the
/// in-flight requests have drained; then writes the ledger's pending records.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: Config,
    metering: Metering,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_split(listener, None, config, metering, shutdown).await
}

/// [`serve`], with the admin API and metrics on `operator` (not on the public listener) when
/// it is given.
pub async fn serve_split(
    listener: tokio::net::TcpListener,
    operator: Option<tokio::net::TcpListener>,
    config: Config,
    metering: Metering,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let shutdown = shutdown.shared();
    let hangups = reload::listen_for_hangups();
    // The port answers 503 while the database is reached and the models load.
    let loading = async {
        let store = match &metering.database {
            Some(url) => {
                let store = connect(url).await?;
                store
                    .ensure_customer(DEFAULT_CUSTOMER, "Default customer (static keys)")
                    .await?;
                Some(store)
            }
            None => None,
        };
        Ok((store, models::start_backends(&config).await?))
    };
    let Some((listener, (store, backends))) =
        tollgate_gateway::answer_while_loading(listener, loading, shutdown.clone()).await?
    else {
        tracing::info!("shut down while loading");
        return Ok(());
    };
    let auth = tollgate_gateway::auth::AuthConfig::from_env()
        .with_key_cache(tollgate_gateway::auth::KeyCache::of(&config.server));
    let models::Backends {
        backends,
        residents,
    } = backends;
    let mut state = tollgate_gateway::AppState::new(config, backends, auth)?
        .with_admin_token(metering.admin_token.clone());
    if let Some(path) = &metering.catalogue {
        let reload = reload::FileReload {
            path: path.clone(),
            residents,
            worker: None,
        };
        state.catalogue = state.catalogue.clone().with_reloader(Arc::new(reload));
    }
    if let (Some(store), Some(url)) = (store, &metering.database) {
        let spool = metering.spool.clone().unwrap_or_else(|| default_spool(url));
        tracing::info!(database = %redact(url), spool = %spool.display(), sync = ?metering.spool_sync, "metering usage");
        state = state.with_billing(store, &spool, metering.spool_sync)?;
        // The customers' adapters are served from the first request on.
        state.reload_adapters().await;
        let files = match &metering.files_url {
            Some(files_url) => tollgate_gateway::files::FileStorage::from_url(files_url)?,
            None => tollgate_gateway::files::FileStorage::local(&default_files_dir(url))?,
        };
        state = state.with_files(files, FILE_SWEEP);
    } else {
        tracing::warn!("no --database: requests are served but not metered");
    }
    reload::reload_on_sighup(&state, hangups);
    let ledger = state.ledger.clone();
    let store = state.store.clone();
    let result = tollgate_gateway::run_split(listener, operator, state, shutdown).await;
    if let Some(ledger) = ledger {
        ledger.close(Duration::from_secs(10)).await;
    }
    if let Some(store) = store {
        store.close().await;
    }
    result
}

/// Opens the ledger database. A database that cannot be reached (PostgreSQL down, or not up
/// yet in a fresh deployment) is tried again with backoff, so a gateway started during an
/// outage comes up when the database does instead of exiting; other errors end the start.
async fn connect(url: &str) -> anyhow::Result<Store> {
    let mut delay = Duration::from_millis(500);
    loop {
        match Store::connect(url).await {
            Ok(store) => return Ok(store),
            Err(e) if e.is_unreachable() => {
                tracing::warn!(
                    database = %redact(url),
                    "cannot reach the ledger database, trying again in {delay:?}: {e}"
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot open the ledger database {}", redact(url)))
            }
        }
    }
}

/// `tollgate worker`: one local model's engine behind the OpenAI API, for gateways to route
/// to. Clients (gateways) authenticate with the shared internal `token`; nothing is metered
/// here (the gateway meters what the worker reports). With the file it came from
/// (`catalogue`), `SIGHUP` reads it again and puts the model's new serving in force (the old
/// engine finishes its requests, then unloads); with `admin_token`, `GET /admin/v1/models` and
/// `POST /admin/v1/models/reload` answer too.
pub async fn worker(
    listener: tokio::net::TcpListener,
    config: Config,
    model: reload::WorkerModel,
    token: &str,
    operator: WorkerOperator,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let config = model.narrow(config)?;
    if token.is_empty() {
        anyhow::bail!("set TOLLGATE_WORKER_TOKEN: the token gateways present to this worker");
    }
    let hangups = reload::listen_for_hangups();
    let shutdown = shutdown.shared();
    let loading = models::start_backends(&config);
    let Some((listener, backends)) =
        tollgate_gateway::answer_while_loading(listener, loading, shutdown.clone()).await?
    else {
        tracing::info!("shut down while loading");
        return Ok(());
    };
    // Gateways hold the token, and forward each request's customer (`forward_customer`).
    let auth = tollgate_gateway::auth::AuthConfig::from_keys([token]).trusting_forwarded_customer();
    let mut state = tollgate_gateway::AppState::new(config, backends.backends, auth)?
        .with_admin_token(operator.admin_token);
    if let Some(path) = operator.catalogue {
        let reload = reload::FileReload {
            path,
            residents: backends.residents,
            worker: Some(model),
        };
        state.catalogue = state.catalogue.clone().with_reloader(Arc::new(reload));
    }
    reload::reload_on_sighup(&state, hangups);
    tollgate_gateway::run(listener, state, shutdown).await
}

/// A worker's operator side: the file `SIGHUP` reloads from, and the admin API's token.
#[derive(Debug, Clone, Default)]
pub struct WorkerOperator {
    pub catalogue: Option<PathBuf>,
    pub admin_token: Option<String>,
}

/// A database URL without its password, for logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

//! Composes the gateway and the runtime into the single `tollgate` process: the embedded mode
//! where every `local` model of `models.toml` runs in an in-process engine behind the gateway.
//!
//! `main.rs` only parses the command line; tests call [`serve`] on an ephemeral port.

pub mod generate;
pub mod local;
pub mod models;

use std::future::Future;

use tollgate_gateway::config::Config;

/// Loads every model, then serves the gateway on `listener` until `shutdown` resolves and the
/// in-flight requests have drained.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: Config,
    database: Option<String>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    if let Some(url) = database {
        tracing::warn!(url = %url, "--database is accepted, but the usage ledger is not built yet: nothing is recorded");
    }
    let backends = models::start_backends(&config).await?;
    let auth = tollgate_gateway::auth::AuthConfig::from_env();
    let state = tollgate_gateway::AppState::new(config, backends, auth)?;
    tollgate_gateway::run(listener, state, shutdown).await
}

//! Serving a router until shutdown: [`run`] / [`run_split`] (the public listener, optionally a
//! separate operators' one), the drain after the signal, and [`answer_while_loading`] for the
//! time the models take to load.

use std::future::{Future, IntoFuture};
use std::time::Duration;

use axum::http::HeaderValue;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::error::ApiError;
use crate::server::listener;
use crate::server::router::{app, operator_app, public_app};
use crate::AppState;

/// Runs `loading` (loading models: seconds to minutes) while answering on `listener`, so that
/// probes and clients get an answer instead of a connection that hangs: `GET /health` is 503
/// `{"status":"loading"}`, anything else a 503 OpenAI error with `Retry-After`. Then hands the
/// same socket back for [`run`]; connections that arrive in between wait in its backlog.
/// Returns `None` when `shutdown` resolves first.
pub async fn answer_while_loading<T>(
    listener: tokio::net::TcpListener,
    loading: impl Future<Output = anyhow::Result<T>>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<Option<(tokio::net::TcpListener, T)>> {
    let socket = listener.into_std()?;
    let answering = tokio::net::TcpListener::from_std(socket.try_clone()?)?;
    let (loaded_tx, loaded_rx) = tokio::sync::oneshot::channel::<()>();
    let app = Router::new()
        .route(
            "/health",
            get(|| async {
                (
                    axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    axum::Json(serde_json::json!({"status": "loading"})),
                )
            }),
        )
        .fallback(|| async {
            let mut response =
                ApiError::Unavailable("the models are still loading; retry shortly".into())
                    .into_response();
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                HeaderValue::from(LOADING_RETRY_AFTER_SECS),
            );
            response
        });
    let server = tokio::spawn(
        axum::serve(answering, app)
            .with_graceful_shutdown(async move {
                let _ = loaded_rx.await;
            })
            .into_future(),
    );
    tracing::info!(
        "loading; {} answers 503 until the models are ready",
        socket.local_addr()?
    );
    let result = tokio::select! {
        r = loading => Some(r),
        () = shutdown => None,
    };
    let _ = loaded_tx.send(());
    server.await??;
    match result {
        Some(loaded) => Ok(Some((tokio::net::TcpListener::from_std(socket)?, loaded?))),
        None => Ok(None),
    }
}

/// `Retry-After` while the models load.
const LOADING_RETRY_AFTER_SECS: u64 = 5;

/// Serves [`app`] on `listener` until `shutdown` resolves, then drains in-flight requests for
/// up to the configured shutdown timeout.
pub async fn run(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    run_split(listener, None, state, shutdown).await
}

/// [`run`], with the operator endpoints (`/admin`, `/metrics`) on `operator` instead of the
/// public listener when it is given (`--admin-listen`: keep them off the public network).
///
/// Shutdown phases: (1) the signal resolves and the listener closes; (2) open connections and
/// streams drain; (3) after the timeout whatever is left is dropped (which cancels its
/// generation); (4) detached requests finish, within the timeout; (5) background work stops.
pub async fn run_split(
    listener: tokio::net::TcpListener,
    operator: Option<tokio::net::TcpListener>,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    let timeout = state.config.server.shutdown_timeout;
    let tasks = state.tasks.clone();
    let background = state.background.clone();
    let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<()>();
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let limits = listener::ConnLimits {
        header_read_timeout: state.config.server.header_read_timeout,
        max_connections: state.config.server.max_connections,
    };
    let refused = state.metrics.connections_refused.clone();
    let batches_stop = start_runners(&state);
    log_exposure(&state, operator.is_some(), addr);
    let (public, operator_server) = match operator {
        Some(operator) => {
            tracing::info!("admin API and metrics on {}", operator.local_addr()?);
            let refused = refused.clone();
            let server = listener::serve(
                operator,
                operator_app(state.clone()),
                limits,
                move || refused.inc(),
                async move {
                    let _ = stop_rx.wait_for(|stop| *stop).await;
                },
            );
            (public_app(state), Some(tokio::spawn(server)))
        }
        None => (app(state), None),
    };
    tracing::info!("listening on {addr}");
    let server = listener::serve(
        listener,
        public,
        limits,
        move || refused.inc(),
        async move {
            shutdown.await;
            batches_stop.cancel();
            let _ = stop_tx.send(true);
            let _ = signalled_tx.send(());
        },
    );
    let mut server = tokio::spawn(server);
    let result = drain(&mut server, signalled_rx, timeout).await;
    finish(&tasks, &background, timeout).await;
    if let Some(operator_server) = operator_server {
        // Its requests are short; whatever is left when the public side is done is dropped.
        if tokio::time::timeout(Duration::from_secs(1), operator_server)
            .await
            .is_err()
        {
            tracing::debug!("operator endpoints: requests dropped at shutdown");
        }
    }
    result
}

/// Says at start which operator endpoints are off, and which share the public listener.
fn log_exposure(state: &AppState, operator_listener: bool, addr: std::net::SocketAddr) {
    if state.admin_token.is_none() {
        tracing::info!(
            "admin API and console disabled (TOLLGATE_ADMIN_TOKEN is not set): /admin and /console answer 404"
        );
    }
    if !operator_listener {
        tracing::warn!(
            "/metrics{} on the public listener {addr}: use --admin-listen to keep them off the public network",
            if state.admin_token.is_some() {
                ", the admin API and the console are"
            } else {
                " is"
            }
        );
    }
}

/// Shutdown phases (4) and (5), once the listener has drained.
async fn finish(
    tasks: &tokio_util::task::TaskTracker,
    background: &crate::state::Background,
    timeout: Duration,
) {
    // (4) Requests detached from their clients (idempotent ones) finish, within the timeout.
    tasks.close();
    if tokio::time::timeout(timeout, tasks.wait()).await.is_err() {
        tracing::warn!("shutdown timeout: dropping detached requests");
    }
    // (5) Background work stops (undelivered alerts stay in the outbox for the next start),
    // and is waited for: a delivery under way finishes (its HTTP call is bounded) rather than
    // being cut off by the end of the process.
    background.stop.cancel();
    background.tasks.close();
    if tokio::time::timeout(BACKGROUND_STOP, background.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("shutdown: background work did not stop in time; dropped");
    }
}

/// Starts the batch runner and the background responses' runner: they claim work until the
/// token they return is cancelled at the shutdown signal (what they have in flight is
/// `state.tasks`, drained in phase 4).
fn start_runners(state: &AppState) -> tokio_util::sync::CancellationToken {
    let stop = tokio_util::sync::CancellationToken::new();
    let tasks = &state.background.tasks;
    tasks.spawn(crate::batches::run(state.clone(), stop.clone()));
    tasks.spawn(crate::api::responses::background::run(
        state.clone(),
        stop.clone(),
    ));
    stop
}

/// How long stopped background work may take to finish at shutdown.
const BACKGROUND_STOP: Duration = Duration::from_secs(5);

/// Waits for `server` to stop by itself, or after the shutdown signal for up to `timeout`.
async fn drain(
    server: &mut tokio::task::JoinHandle<std::io::Result<()>>,
    signalled_rx: tokio::sync::oneshot::Receiver<()>,
    timeout: Duration,
) -> anyhow::Result<()> {
    tokio::select! {
        result = &mut *server => return Ok(result??),
        _ = signalled_rx => {}
    }
    match tokio::time::timeout(timeout, &mut *server).await {
        Ok(result) => result??,
        Err(_) => {
            tracing::warn!(
                seconds = timeout.as_secs(),
                "shutdown timeout: dropping in-flight requests"
            );
            server.abort();
        }
    }
    tracing::info!("server stopped");
    Ok(())
}

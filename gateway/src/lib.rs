//! Tollgate's OpenAI-compatible gateway: HTTP API, validation, authentication, metrics and
//! graceful shutdown. It reaches models only through [`backend::Backend`] and never touches
//! candle; the `tollgate` binary supplies the backends.
//!
//! [`app`] builds the router from an [`AppState`]; [`run`] serves it on a listener until a
//! shutdown signal, then drains in-flight requests.

pub mod admin;
pub mod admin_tokens;
pub mod alerts;
pub mod audit;
pub mod auth;
pub mod backend;
pub mod concurrency;
pub mod config;
pub mod console;
pub mod error;
pub mod idempotency;
pub mod openai;
pub mod openapi;
mod responses;
mod routes;
pub mod server;
mod usage_api;

use std::collections::HashMap;
use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::auth::AuthConfig;
use crate::backend::Backend;
use crate::config::Config;
use crate::error::ApiError;
use crate::server::metrics::Metrics;
use crate::server::{listener, telemetry};
use tollgate_metering::ledger::{Ledger, LedgerGauges};
use tollgate_metering::limits::Limiter;
use tollgate_metering::store::Store;

/// Per-request id (UUID v7), set by the request-id middleware and sent as `x-request-id`,
/// with the moment the request reached the gateway (for the overhead histogram).
#[derive(Debug, Clone)]
pub struct RequestId(pub String, pub Instant);

/// The model a response was for, set by handlers for the metrics middleware.
#[derive(Debug, Clone)]
pub struct ModelLabel(pub String);

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub backends: Arc<HashMap<String, Arc<dyn Backend>>>,
    pub auth: AuthConfig,
    /// Behind an `Arc`: the state is cloned several times per request, the metrics are many
    /// handles.
    pub metrics: Arc<Metrics>,
    /// Customers, keys and the ledger; `None` runs without metering (static keys only).
    pub store: Option<Store>,
    pub ledger: Option<Ledger>,
    pub limiter: Limiter,
    /// `TOLLGATE_ADMIN_TOKEN`; the admin API is off without it.
    pub admin_token: Option<Arc<str>>,
    /// Sequences in flight per customer and model, for `max_sequences_per_customer`.
    pub inflight: Arc<concurrency::InFlight>,
    /// Signed-in console sessions.
    pub console: Arc<console::Sessions>,
    /// Work that outlives its request (idempotent requests run to completion without their
    /// client); drained at shutdown.
    pub tasks: tokio_util::task::TaskTracker,
    /// Cancelled at the end of shutdown: stops background work (alert delivery).
    pub background: tokio_util::sync::CancellationToken,
    /// Requests in flight per customer and per key, for `max_concurrent_requests`.
    pub inflight_requests: Arc<concurrency::InFlightRequests>,
    /// Failed admin authentications per client address.
    pub admin_failures: Arc<admin_tokens::FailedAuth>,
}

impl AppState {
    pub fn new(
        config: Config,
        backends: HashMap<String, Arc<dyn Backend>>,
        auth: AuthConfig,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            config: Arc::new(config),
            backends: Arc::new(backends),
            auth,
            metrics: Arc::new(Metrics::new()?),
            store: None,
            ledger: None,
            limiter: Limiter::default(),
            admin_token: None,
            inflight: Arc::default(),
            console: Arc::default(),
            tasks: tokio_util::task::TaskTracker::new(),
            background: tokio_util::sync::CancellationToken::new(),
            inflight_requests: Arc::default(),
            admin_failures: Arc::default(),
        })
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
        tokio::spawn(deliverer.run(self.background.clone()));
        if store.kind() == tollgate_metering::store::DbKind::Postgres {
            // Replicas share the database: limits and budgets are kept there, exact across them.
            self.limiter = Limiter::shared(store.clone());
        }
        self.store = Some(store);
        Ok(self)
    }

    /// Enables the admin API with this bearer token (ignored when empty).
    pub fn with_admin_token(mut self, token: Option<String>) -> Self {
        self.admin_token = token.filter(|t| !t.is_empty()).map(Arc::from);
        self
    }
}

/// The body limit in force, in every request's extensions, for the 413 message.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BodyLimit(pub usize);

/// The router: `/v1` (authenticated), `/health`, `/metrics`, and `/admin` with an admin token.
pub fn app(state: AppState) -> Router {
    let router = v1(&state).merge(operator_routes(&state));
    finish(router, state)
}

/// The public router when the operator endpoints have a listener of their own: `/v1` and
/// `/health`.
pub fn public_app(state: AppState) -> Router {
    let router = v1(&state)
        .route("/health", get(routes::health))
        .route("/openapi.json", get(openapi::openapi_json));
    finish(router, state)
}

/// The operators' router: `/admin` (with an admin token), `/metrics` and `/health`.
pub fn operator_app(state: AppState) -> Router {
    let router = operator_routes(&state);
    finish(router, state)
}

/// `/admin` (with an admin token), `/metrics` and `/health`.
fn operator_routes(state: &AppState) -> Router<AppState> {
    let mut router = Router::new()
        .route("/health", get(routes::health))
        .route("/metrics", get(routes::metrics))
        .route("/openapi.json", get(openapi::openapi_json));
    if state.admin_token.is_some() {
        router = router
            .merge(admin::router(state.clone()))
            .merge(console::router(state.clone()));
    }
    router
}

/// The OpenAI API, behind the key check.
fn v1(state: &AppState) -> Router<AppState> {
    Router::new()
        .route("/v1/chat/completions", post(routes::chat_completions))
        .route("/v1/completions", post(routes::completions))
        .route("/v1/responses", post(responses::create))
        // Inside the key check (set below): it needs the customer.
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            idempotency::layer,
        ))
        .route(
            "/v1/responses/{id}",
            get(responses::get).delete(responses::delete),
        )
        .route(
            "/v1/responses/{id}/input_items",
            get(responses::input_items),
        )
        .route("/v1/models", get(routes::list_models))
        .route("/v1/models/{id}", get(routes::get_model))
        .route(
            "/v1/organization/usage/completions",
            get(usage_api::completions_usage),
        )
        .route("/v1/organization/costs", get(usage_api::costs))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_key,
        ))
}

/// Fallbacks, body limit, metrics and request ids around `router`.
fn finish(router: Router<AppState>, state: AppState) -> Router {
    let limit = state.config.server.max_body_bytes;
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::Extension(BodyLimit(limit)))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(middleware::from_fn(request_id))
        .with_state(state)
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::RouteNotFound {
        method: method.to_string(),
        path: uri.path().to_string(),
    }
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    let mut r = ApiError::invalid(
        format!("method {method} is not allowed on {}", uri.path()),
        None,
    )
    .into_response();
    *r.status_mut() = axum::http::StatusCode::METHOD_NOT_ALLOWED;
    r
}

/// Gives every request a UUID v7 and every response its `x-request-id`.
async fn request_id(mut request: Request, next: Next) -> Response {
    let id = uuid::Uuid::now_v7().to_string();
    request
        .extensions_mut()
        .insert(RequestId(id.clone(), Instant::now()));
    let mut response = next.run(request).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", v);
    }
    response
}

/// Request counts and durations by route template, model and status, plus a log line.
async fn observe(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method = request.method().clone();
    let started = Instant::now();
    let span = telemetry::span(|| {
        let span = tracing::info_span!(
            "request",
            otel.name = %format!("{method} {route}"),
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            http.request.method = %method,
            http.route = %route,
            http.response.status_code = tracing::field::Empty,
            gen_ai.operation.name = tracing::field::Empty,
            gen_ai.provider.name = "tollgate",
            gen_ai.request.model = tracing::field::Empty,
            gen_ai.request.max_tokens = tracing::field::Empty,
            gen_ai.usage.input_tokens = tracing::field::Empty,
            gen_ai.usage.output_tokens = tracing::field::Empty,
            tollgate.request_id = tracing::field::Empty,
            tollgate.customer_id = tracing::field::Empty,
        );
        telemetry::accept_parent(&span, request.headers());
        if let Some(id) = request.extensions().get::<RequestId>() {
            span.record("tollgate.request_id", id.0.as_str());
        }
        span
    });
    let response = tracing::Instrument::instrument(next.run(request), span.clone()).await;
    let model = response
        .extensions()
        .get::<ModelLabel>()
        .map(|m| m.0.as_str())
        .filter(|m| state.backends.contains_key(*m))
        .unwrap_or("none")
        .to_string();
    let status = response.status();
    span.record("http.response.status_code", i64::from(status.as_u16()));
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    state
        .metrics
        .requests
        .with_label_values(&[route.as_str(), model.as_str(), status.as_str()])
        .inc();
    state
        .metrics
        .request_duration
        .with_label_values(&[route.as_str(), model.as_str()])
        .observe(started.elapsed().as_secs_f64());
    tracing::debug!(%method, %route, status = status.as_u16(), ms = started.elapsed().as_millis() as u64, "request");
    response
}

/// Serves until `shutdown` resolves, then stops accepting and lets in-flight requests finish
/// for at most the configured shutdown timeout.
///
/// Shutdown phases: (1) the signal resolves and the listener closes; (2) open connections and
/// streams drain; (3) after the timeout whatever is left is dropped (which cancels its
/// generation) and this returns.
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
            let _ = stop_tx.send(true);
            let _ = signalled_tx.send(());
        },
    );
    let mut server = tokio::spawn(server);
    let result = drain(&mut server, signalled_rx, timeout).await;
    // (4) Requests detached from their clients (idempotent ones) finish, within the timeout.
    tasks.close();
    if tokio::time::timeout(timeout, tasks.wait()).await.is_err() {
        tracing::warn!("shutdown timeout: dropping detached requests");
    }
    // (5) Background work stops (undelivered alerts stay in the outbox for the next start).
    background.cancel();
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

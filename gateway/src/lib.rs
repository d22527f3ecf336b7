//! Tollgate's OpenAI-compatible gateway: HTTP API, validation, authentication, metrics and
//! graceful shutdown. It reaches models only through [`backend::Backend`] and never touches
//! candle; the `tollgate` binary supplies the backends.
//!
//! A request's path through the modules: [`server`] (listener, router, middleware) →
//! [`auth`] (the key) → [`api`] (the endpoint: validation, admission, the accounting guard) →
//! [`backend`] (the model). [`app`] builds the router from an [`AppState`]; [`run`] serves it
//! on a listener until a shutdown signal, then drains in-flight requests.

pub mod alerts;
pub mod api;
pub mod auth;
pub mod backend;
pub mod batches;
pub mod catalogue;
pub mod clock;
pub mod concurrency;
pub mod config;
pub mod console;
pub mod error;
pub mod files;
pub mod idempotency;
pub mod openapi;
pub mod server;
pub mod sessions;
mod state;

pub use server::middleware::{ModelLabel, RequestId};
pub use server::router::{app, operator_app, public_app};
pub use server::run::{answer_while_loading, run, run_split};
pub use state::{AppState, Background, InFlightCounts, SharedState};

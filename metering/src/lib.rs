//! Tollgate's metering: what a request cost and who may spend more. Usage records and the
//! repositories for customers and keys ([`store`], SQLite or PostgreSQL through sqlx `Any`,
//! with the migrations), exact money ([`money`]), billing months ([`periods`]), the spooled
//! ledger that writes records ([`ledger`]), the webhook outboxes ([`outbox`]), rate limits and
//! budgets ([`limits`], [`shared_limits`]), and the reports the admin API and CLI print
//! ([`billing`], [`export_formats`]). Request state that is not money (stored responses,
//! idempotency keys) lives apart, in [`requests`].
//!
//! It depends on no HTTP crate, so billing cannot reach for a request or a status code: its
//! errors ([`store::StoreError`], [`limits::Refusal`]) are mapped to responses by the gateway.

pub mod accounts;
pub mod alerts;
pub mod audit;
pub mod billing;
pub mod clock;
pub mod console_queries;
pub mod db;
pub mod export_formats;
pub mod kinds;
pub mod ledger;
pub mod limits;
pub mod money;
pub mod outbox;
pub mod periods;
pub mod requests;
pub mod secrets;
pub mod shared_limits;
pub mod store;
pub mod tags;
pub mod views;

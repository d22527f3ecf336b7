//! The gateway's HTTP contract, driven over real sockets against a scripted backend
//! (`scripted.rs`, whose behaviour is chosen by the last message's text): error statuses and
//! shapes, the exact SSE sequence, mid-stream failures, the models, health and metrics routes
//! (`contract.rs`); cancellation on disconnect, graceful shutdown, the ledger's outcomes, the
//! loading port and the operators' own port (`lifecycle.rs`). (The real model is exercised by
//! the workspace's end-to-end tests; here every backend behaviour can be forced.)

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "an integration test crate: its helpers, outside `#[test]` fns, are not covered by clippy.toml's allow-*-in-tests"
)]

#[path = "../common/serve.rs"]
mod serve;

mod contract;
mod lifecycle;
mod scripted;

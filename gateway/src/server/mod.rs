//! Serving: the accept loop and its connection limits (`listener`), the Prometheus metrics
//! (`metrics`) and OpenTelemetry traces (`telemetry`). The router, its middleware and the
//! run/shutdown phases are in the crate root.

pub mod listener;
pub mod metrics;
pub mod telemetry;

//! Serving: the accept loop and its connection limits (`listener`), the routers (`router`), the
//! request-id and metrics middleware (`middleware`), running until shutdown and draining
//! (`run`), the Prometheus metrics (`metrics`) and OpenTelemetry traces (`telemetry`).

pub mod listener;
pub mod metrics;
pub(crate) mod middleware;
mod oversize;
pub(crate) mod router;
pub(crate) mod run;
mod shed;
pub mod telemetry;

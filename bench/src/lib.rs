//! Tollgate's benchmarks, as binaries of this crate (`src/bin/`):
//!
//! - `overhead`: the latency the gateway adds in front of an OpenAI-compatible upstream, and the
//!   highest request rate it sustains, with metering on or off ([`overhead`]);
//! - `metering`: ledger throughput and the latency of the metering path, without a gateway.
//!
//! They print what they measure and compare only within one run (the gateway against the direct
//! path to the same upstream): figures from another machine or another moment are not a
//! reference for this one. The Python load generators next to this crate (`bench/load.py`,
//! `bench/soak.py`) drive a running `tollgate serve` with a model instead.

pub mod overhead;
pub mod provenance;

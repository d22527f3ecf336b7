//! Test support shared by the gateway's integration tests (`gateway/tests/`) and the benchmarks
//! (`bench/`). It lives in its own crate, not in the gateway, so that nothing of it is compiled
//! into the server, and so that the tests and the benchmarks stand the gateway in front of the
//! same upstream: a change to what the upstream sends shows in both.

pub mod upstream;

pub use upstream::{Behaviour, FakeUpstream, Reply, Running};

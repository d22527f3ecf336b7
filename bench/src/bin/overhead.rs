//! The latency the gateway adds in front of an OpenAI-compatible upstream, and the highest rate
//! it sustains; see [`tollgate_bench::overhead`].
//!
//!     cargo build --release --bin tollgate
//!     cargo run --release -p tollgate-bench --bin overhead -- \
//!         [--rates 250,500,1000,2000] [--duration 10] [--warmup 2] [--no-search] \
//!         [--stream] [--metering on|off] [--gateway-log info] [--json FILE] \
//!         [--binary PATH] [--baseline OLDER_PATH [--rounds N]] [--dir DIR] [--raw DIR] \
//!         [--idle-connections N] [--slow-streams M]

use tollgate_bench::overhead::{run, Options};

fn main() -> anyhow::Result<()> {
    let opts = Options::from_args();
    // The load generator's own runtime: one thread, so it takes at most one core from the
    // gateway and the upstream (which has a thread of its own).
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run(opts))
}

//! Giving an unloaded model's memory back to the system. Its engine thread frees the weights
//! when the last handle goes, but glibc keeps freed memory in its arenas for later
//! allocations: with nothing loaded, a server that had loaded a 1.3 GB model kept 1.27 GB of
//! it (bench/coldload.py). Once the engines' threads have ended, `malloc_trim` returns the
//! free pages; it runs on a short-lived thread of its own, off the async threads.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::local::LocalBackend;

/// How long an unloaded engine may take to finish what it was doing and end its thread; past
/// this its memory is left to the allocator.
const STOP_WAIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(10);

/// Lets go of unloaded `engines` and, once their threads have ended (other handles, such as a
/// finishing request's, may still hold them a moment), returns the freed memory.
pub fn give_back(engines: impl IntoIterator<Item = Arc<LocalBackend>>) {
    let engines: Vec<Arc<LocalBackend>> = engines.into_iter().collect();
    if engines.is_empty() {
        return;
    }
    let stats: Vec<_> = engines.iter().map(|e| e.engine().stats_handle()).collect();
    drop(engines);
    let spawned = std::thread::Builder::new()
        .name("tollgate-reclaim".into())
        .spawn(move || {
            let started = Instant::now();
            while !stats.iter().all(|s| s.stopped.load(Ordering::Acquire)) {
                if started.elapsed() > STOP_WAIT {
                    tracing::warn!("an unloaded engine is still running; its memory stays");
                    return;
                }
                std::thread::sleep(POLL);
            }
            trim();
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the thread that returns unloaded memory: {e}");
    }
}

/// Returns the allocator's free pages to the system.
fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists (under its locks).
    unsafe {
        libc::malloc_trim(0);
    }
}

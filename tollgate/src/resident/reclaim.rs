//! Giving an unloaded model's memory back to the system. Its engine thread frees the weights
//! when the last handle goes, but glibc keeps freed memory in its arenas for later
//! allocations: with nothing loaded, a server that had loaded a 1.3 GB model kept 1.27 GB of
//! it (bench/coldload.py). Once the engines' threads have ended, `malloc_trim` returns the
//! free pages, all of them as the process has one malloc arena ([`limit_arenas`]); it runs on
//! a short-lived thread of its own, off the async threads.

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

/// One malloc arena for every thread of the process (set first thing in `main`, before any
/// thread exists; `MALLOC_ARENA_MAX`, when set, still wins), so that [`trim`] can return
/// everything an unloaded model freed. A model's tensors come from the arena of the thread
/// that loaded it, and after a first unload raised glibc's dynamic mmap threshold they lie in
/// that arena's heap rather than in mappings of their own. `malloc_trim` releases the free
/// pages of every arena's free lists and the free top of the main arena, but not the free top
/// of another arena's heap, which shrinks only past the (risen) trim threshold: with two
/// arenas, an unloaded model whose loading thread drew the second one stayed resident (40-50
/// MB of the 98 MB dev model, in about half the runs of three loads). One arena also keeps
/// RSS flat for the reason two were set: glibc gives each thread that allocates under
/// contention an arena of its own and keeps what they free (a soak saw the gateway's RSS step
/// up by several MB at each burst and stay there).
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only changes an allocator setting; called before any thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

/// Returns the allocator's free pages to the system.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists (under its locks).
    unsafe {
        libc::malloc_trim(0);
    }
}

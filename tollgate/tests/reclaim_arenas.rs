//! Memory an unloaded model frees on another thread goes back to the system at the trim,
//! whichever thread allocated it: the allocator policy `main` sets
//! ([`reclaim::limit_arenas`]) and the trim the unloading runs ([`reclaim::trim`]).
//!
//! A model's tensors are allocated on a loading thread and freed on its engine's. After the
//! first unload has freed the big mmapped tensors, glibc's dynamic mmap threshold has risen,
//! so the next loads' tensors come from the heap of the loading thread's arena. `malloc_trim`
//! returns the free pages of the main arena (its top included) but never the free top of
//! another arena's heap, and that heap only shrinks by itself past the trim threshold, which
//! has risen too: with two arenas, a load whose thread drew the second one stayed resident
//! after its unload (`tests/python/test_catalogue_drain.py`, intermittently, 40-50 MB of the
//! dev model).
//!
//! Here the first thread to allocate after `main` plays the loading thread: with a second
//! arena allowed it is the one that creates it, so the check does not depend on timing. No
//! test harness (its threads would draw the arenas first): `main` is the test, run in a child
//! process with `MALLOC_ARENA_MAX` removed, so the policy under test is the process's own.

#![allow(
    clippy::expect_used,
    reason = "a test without the harness, which clippy does not see as one: a failure panics"
)]

use std::hint::black_box;
use std::process::Command;

use tollgate::resident::reclaim;

/// Set in the child process that runs the check.
const CHILD: &str = "TOLLGATE_RECLAIM_ARENAS_CHILD";

/// What the loading thread allocates: tensors of 1 MiB, a model of 48 MiB.
const TENSOR: usize = 1 << 20;
const TENSORS: usize = 48;

/// RSS the trim may leave above what it was before the load.
const SLACK: usize = 8 << 20;

fn rss_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS");
    let kb: usize = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in kB");
    kb << 10
}

/// A buffer of `len` bytes, every page touched (resident).
fn touched(len: usize) -> Vec<u8> {
    black_box(vec![1u8; len])
}

fn check() {
    reclaim::limit_arenas();
    // A first model's biggest tensor, mmapped and freed: the mmap threshold rises to its size.
    drop(touched(30 << 20));
    let before = rss_bytes();
    std::thread::spawn(|| {
        let model: Vec<Vec<u8>> = (0..TENSORS).map(|_| touched(TENSOR)).collect();
        drop(black_box(model));
    })
    .join()
    .expect("the loading thread");
    reclaim::trim();
    let after = rss_bytes();
    println!(
        "RSS {} MiB before a {} MiB load on another thread, {} MiB after it was freed and trimmed",
        before >> 20,
        (TENSOR * TENSORS) >> 20,
        after >> 20
    );
    assert!(
        after < before + SLACK,
        "the freed model stayed resident: RSS {} MiB after the trim, {} MiB before the load",
        after >> 20,
        before >> 20
    );
}

fn main() {
    if !cfg!(all(target_os = "linux", target_env = "gnu")) {
        println!("reclaim_arenas: glibc only, nothing to check here");
        return;
    }
    if std::env::var_os(CHILD).is_some() {
        check();
        return;
    }
    let exe = std::env::current_exe().expect("the test's own path");
    let out = Command::new(exe)
        .env(CHILD, "1")
        .env_remove("MALLOC_ARENA_MAX")
        .output()
        .expect("the child process");
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the check failed: {}", out.status);
    println!("test reclaim_arenas::an_unloaded_models_memory_goes_back ... ok");
}

//! The limit on failed admin authentications per client address (fixed windows), which the
//! admin middleware checks before it looks a token up.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failed admin authentications allowed per client address and window.
pub const MAX_FAILURES: u32 = 10;
/// The window: an address that failed [`MAX_FAILURES`] times is refused until its window ends.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Addresses tracked at most; beyond it, expired windows are dropped first.
const MAX_TRACKED: usize = 10_000;

/// Failed admin authentications per client address, in fixed windows.
#[derive(Debug, Default)]
pub struct FailedAuth {
    /// A std mutex: held for one map update, never across an `.await`.
    windows: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl FailedAuth {
    /// `Err(seconds to wait)` while `ip` is over the limit.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), u64> {
        let windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        match windows.get(&ip) {
            Some((start, n)) if *n >= MAX_FAILURES => {
                let left = FAILURE_WINDOW.saturating_sub(now.saturating_duration_since(*start));
                if left.is_zero() {
                    Ok(())
                } else {
                    Err(left.as_secs().max(1))
                }
            }
            _ => Ok(()),
        }
    }

    pub fn record_failure(&self, ip: IpAddr, now: Instant) {
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if windows.len() >= MAX_TRACKED {
            windows.retain(|_, (start, _)| now.saturating_duration_since(*start) < FAILURE_WINDOW);
        }
        let entry = windows.entry(ip).or_insert((now, 0));
        if now.saturating_duration_since(entry.0) >= FAILURE_WINDOW {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_limited_per_address_for_a_window() {
        let f = FailedAuth::default();
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..MAX_FAILURES {
            assert!(f.check(a, t0).is_ok());
            f.record_failure(a, t0);
        }
        assert_eq!(f.check(a, t0), Err(60));
        assert_eq!(f.check(a, t0 + Duration::from_secs(45)), Err(15));
        // Another address is not affected.
        assert!(f.check(b, t0).is_ok());
        // The window ends.
        assert!(f.check(a, t0 + FAILURE_WINDOW).is_ok());
        f.record_failure(a, t0 + FAILURE_WINDOW);
        assert!(f.check(a, t0 + FAILURE_WINDOW).is_ok());
    }
}

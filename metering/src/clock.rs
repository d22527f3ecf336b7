//! Time the tests control: a [`Clock`] is the system's clocks, or a manual one that moves only
//! when told to. It reads two times that move together: an [`Instant`] for lifetimes (the
//! gateway's key cache) and the wall clock in Unix microseconds for calendar periods (a
//! budget's month). So a cache's lifetime or a budget's month boundary is checked by advancing
//! the clock rather than by sleeping through it or waiting for the month to turn.
//!
//! The rate buckets are not on it: they run on tokio's clock, which tests pause and advance.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Default)]
pub struct Clock {
    /// `None`: the system's clocks.
    manual: Option<Arc<Manual>>,
}

/// A manual clock: where it started, and how far it has been moved since.
#[derive(Debug)]
struct Manual {
    instant: Instant,
    micros: i64,
    moved: Mutex<Duration>,
}

impl Clock {
    /// A clock that stands still until [`Clock::advance`] moves it, starting now.
    pub fn manual() -> Self {
        Self::manual_at(chrono::Utc::now().timestamp_micros())
    }

    /// A manual clock whose wall time starts at `micros` (Unix microseconds): a test puts it
    /// just before a month ends.
    pub fn manual_at(micros: i64) -> Self {
        Self {
            manual: Some(Arc::new(Manual {
                instant: Instant::now(),
                micros,
                moved: Mutex::new(Duration::ZERO),
            })),
        }
    }

    /// Now, for measuring lifetimes.
    pub fn now(&self) -> Instant {
        match &self.manual {
            Some(m) => m.instant + m.moved(),
            None => Instant::now(),
        }
    }

    /// Now on the wall clock, in Unix microseconds (as the ledger stores time).
    pub fn now_micros(&self) -> i64 {
        match &self.manual {
            Some(m) => m
                .micros
                .saturating_add(i64::try_from(m.moved().as_micros()).unwrap_or(i64::MAX)),
            None => chrono::Utc::now().timestamp_micros(),
        }
    }

    /// Moves a manual clock forward (the system clock moves by itself: a no-op there).
    pub fn advance(&self, by: Duration) {
        if let Some(m) = &self.manual {
            *m.moved
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) += by;
        }
    }
}

impl Manual {
    fn moved(&self) -> Duration {
        *self
            .moved
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.manual.is_some() {
            "Clock(manual)"
        } else {
            "Clock(system)"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_advanced() {
        let clock = Clock::manual_at(1_000_000);
        let start = clock.now();
        std::thread::yield_now();
        assert_eq!(clock.now(), start);
        assert_eq!(clock.now_micros(), 1_000_000);
        clock.advance(Duration::from_secs(3));
        assert_eq!(clock.now() - start, Duration::from_secs(3));
        assert_eq!(clock.now_micros(), 4_000_000);
        let system = Clock::default();
        let before = system.now();
        system.advance(Duration::from_secs(3600));
        assert!(system.now() - before < Duration::from_secs(3600));
    }
}

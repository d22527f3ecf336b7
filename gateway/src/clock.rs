//! Time the tests control: a [`Clock`] is the system's monotonic clock, or a manual one that
//! moves only when told to, so a cache's lifetimes are checked by advancing it rather than by
//! sleeping through them.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Default)]
pub struct Clock {
    /// `None`: the system's clock.
    manual: Option<Arc<Mutex<Instant>>>,
}

impl Clock {
    /// A clock that stands still until [`Clock::advance`] moves it.
    pub fn manual() -> Self {
        Self {
            manual: Some(Arc::new(Mutex::new(Instant::now()))),
        }
    }

    pub fn now(&self) -> Instant {
        match &self.manual {
            Some(t) => *t.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
            None => Instant::now(),
        }
    }

    /// Moves a manual clock forward (the system clock moves by itself: a no-op there).
    pub fn advance(&self, by: Duration) {
        if let Some(t) = &self.manual {
            *t.lock().unwrap_or_else(std::sync::PoisonError::into_inner) += by;
        }
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
        let clock = Clock::manual();
        let start = clock.now();
        std::thread::yield_now();
        assert_eq!(clock.now(), start);
        clock.advance(Duration::from_secs(3));
        assert_eq!(clock.now() - start, Duration::from_secs(3));
        let system = Clock::default();
        let before = system.now();
        system.advance(Duration::from_secs(3600));
        assert!(system.now() - before < Duration::from_secs(3600));
    }
}

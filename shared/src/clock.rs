//! The time, as a dependency: services ask a [`Clock`] for `now` so tests
//! can move it ([`ManualClock`]) instead of sleeping.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};

/// Where a service reads the time. Shared as `Arc<dyn Clock>`.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> DateTime<Utc>;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// The system clock as an `Arc<dyn Clock>`.
pub fn system() -> Arc<dyn Clock> {
    Arc::new(SystemClock)
}

/// A clock that moves only when told to; clones share the same time.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<Mutex<DateTime<Utc>>>,
}

impl ManualClock {
    pub fn new(start: DateTime<Utc>) -> ManualClock {
        ManualClock {
            now: Arc::new(Mutex::new(start)),
        }
    }

    /// Moves the time forward by `by`.
    pub fn advance(&self, by: std::time::Duration) {
        let by = chrono::Duration::from_std(by).unwrap_or(chrono::Duration::MAX);
        let mut now = self.now.lock().unwrap_or_else(|p| p.into_inner());
        *now = now
            .checked_add_signed(by)
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
    }

    /// Sets the time to `at` (backwards too).
    pub fn set(&self, at: DateTime<Utc>) {
        *self.now.lock().unwrap_or_else(|p| p.into_inner()) = at;
    }

    /// This clock as an `Arc<dyn Clock>` (sharing its time).
    pub fn shared(&self) -> Arc<dyn Clock> {
        Arc::new(self.clone())
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.now.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use std::time::Duration;

    #[test]
    fn manual_clock_moves_only_when_told_and_clones_share_it() {
        let start = Utc.timestamp_opt(1_700_000_000, 0).single().expect("valid");
        let c = ManualClock::new(start);
        let shared = c.shared();
        assert_eq!(shared.now(), start);
        c.advance(Duration::from_secs(90));
        assert_eq!(shared.now(), start + chrono::Duration::seconds(90));
        c.set(start);
        assert_eq!(shared.now(), start);
    }

    #[test]
    fn system_clock_is_now() {
        let before = Utc::now();
        let n = system().now();
        assert!(n >= before);
    }
}

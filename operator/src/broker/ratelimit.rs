//! The per-ApiKey issuance cap (`guardrails.maxIssuancesPerMinute`): a sliding one-minute
//! window per ApiKey, kept in this replica's memory. With N broker replicas behind a Service a
//! key can get up to N times the cap; the cap bounds runaway clients and billing abuse, not a
//! precise quota.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
pub struct IssuanceCap {
    windows: Mutex<HashMap<String, VecDeque<Instant>>>,
}

impl IssuanceCap {
    /// Records an issuance for `key` at `now` if fewer than `per_minute` happened in the last
    /// minute; otherwise returns how long until one more is allowed.
    pub fn try_acquire(&self, key: &str, per_minute: u32, now: Instant) -> Result<(), Duration> {
        let Ok(mut windows) = self.windows.lock() else {
            // Fail closed.
            return Err(WINDOW);
        };
        // Forget idle keys so the map stays as small as the set of active ApiKeys.
        if windows.len() > 1024 {
            windows.retain(|_, w| w.back().is_some_and(|t| now.duration_since(*t) < WINDOW));
        }
        let window = windows.entry(key.to_owned()).or_default();
        while window
            .front()
            .is_some_and(|t| now.duration_since(*t) >= WINDOW)
        {
            window.pop_front();
        }
        if window.len() >= per_minute as usize {
            let oldest = window.front().copied().unwrap_or(now);
            return Err(WINDOW.saturating_sub(now.duration_since(oldest)));
        }
        window.push_back(now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_the_cap_per_minute_then_says_when_to_retry() {
        let cap = IssuanceCap::default();
        let t0 = Instant::now();
        assert!(cap.try_acquire("ns/a", 2, t0).is_ok());
        assert!(
            cap.try_acquire("ns/a", 2, t0 + Duration::from_secs(10))
                .is_ok()
        );
        assert_eq!(
            cap.try_acquire("ns/a", 2, t0 + Duration::from_secs(20)),
            Err(Duration::from_secs(40))
        );
        // Other keys are independent.
        assert!(
            cap.try_acquire("ns/b", 2, t0 + Duration::from_secs(20))
                .is_ok()
        );
        // The first issuance leaves the window after a minute.
        assert!(
            cap.try_acquire("ns/a", 2, t0 + Duration::from_secs(60))
                .is_ok()
        );
    }
}

//! Per-ApiKey call budgets: requests per minute and per day, in fixed windows, counted in this
//! replica. Bounded by the number of ApiKeys (one entry each).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const MINUTE: Duration = Duration::from_secs(60);
const DAY: Duration = Duration::from_secs(24 * 3600);

/// A budget that is used up: which window, its limit, and when it opens again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exhausted {
    pub window: &'static str,
    pub limit: u64,
    pub retry_after: Duration,
}

#[derive(Debug)]
struct Windows {
    minute: (Instant, u64),
    day: (Instant, u64),
}

/// The counters of every ApiKey seen.
#[derive(Debug, Default)]
pub struct Budgets {
    windows: Mutex<HashMap<String, Windows>>,
}

impl Budgets {
    /// Counts one call of `key` if both windows have room.
    pub fn try_acquire(
        &self,
        key: &str,
        per_minute: u32,
        per_day: u64,
        now: Instant,
    ) -> Result<(), Exhausted> {
        let mut windows = self
            .windows
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let w = windows.entry(key.to_owned()).or_insert(Windows {
            minute: (now, 0),
            day: (now, 0),
        });
        for (window, span) in [(&mut w.minute, MINUTE), (&mut w.day, DAY)] {
            if now.duration_since(window.0) >= span {
                *window = (now, 0);
            }
        }
        let checks = [
            ("minute", u64::from(per_minute), w.minute, MINUTE),
            ("day", per_day, w.day, DAY),
        ];
        for (window, limit, (start, used), span) in checks {
            if used >= limit {
                return Err(Exhausted {
                    window,
                    limit,
                    retry_after: (start + span).saturating_duration_since(now),
                });
            }
        }
        w.minute.1 += 1;
        w.day.1 += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_count_per_key_and_reopen_with_their_window() {
        let b = Budgets::default();
        let t0 = Instant::now();
        for _ in 0..3 {
            b.try_acquire("team-a/k", 3, 100, t0).unwrap();
        }
        let e = b.try_acquire("team-a/k", 3, 100, t0).unwrap_err();
        assert_eq!((e.window, e.limit, e.retry_after), ("minute", 3, MINUTE));
        b.try_acquire("team-b/k", 3, 100, t0).unwrap();
        b.try_acquire("team-a/k", 3, 100, t0 + MINUTE).unwrap();
        let day = Budgets::default();
        day.try_acquire("k", 10, 1, t0).unwrap();
        let e = day.try_acquire("k", 10, 1, t0 + MINUTE * 2).unwrap_err();
        assert_eq!(e.window, "day");
        assert_eq!(e.retry_after, DAY - MINUTE * 2);
    }
}

//! When to fetch next: refresh delays and retry backoff. Pure: the caller passes the clock
//! readings and a uniform random number in `[0, 1)`, so every case is testable exactly.

use std::time::Duration;

/// Refreshes start up to this fraction earlier than scheduled, so that pods started together
/// (a rollout) do not refresh together.
const REFRESH_JITTER: f64 = 0.1;
/// Never refresh sooner than this after a success, whatever the broker says: a broker (or a
/// clock) gone wrong must not turn the sidecar into a busy loop.
const MIN_REFRESH: Duration = Duration::from_secs(1);

/// How to back off after failures: `base * 2^attempt`, capped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

/// After failures that may pass by themselves (broker or provider down, rate cap, network):
/// retry soon, so that credentials are fresh again shortly after the broker returns.
pub const TRANSIENT: Backoff = Backoff {
    base: Duration::from_secs(1),
    cap: Duration::from_secs(60),
};

/// After the broker withdrew access (revoked, ApiKey deleted, pod no longer allowed): nothing
/// will change without a human, so ask rarely, but keep asking so that an un-revoked key works
/// again without restarting the pod.
pub const WITHDRAWN: Backoff = Backoff {
    base: Duration::from_secs(30),
    cap: Duration::from_secs(600),
};

/// Delay before retry number `attempt` (0 for the first retry): "equal jitter", half of the
/// exponential delay fixed and half random, so retries spread out but never collapse to zero.
pub fn backoff(policy: Backoff, attempt: u32, unit: f64) -> Duration {
    let exp = policy
        .base
        .saturating_mul(2u32.saturating_pow(attempt.min(31)))
        .min(policy.cap);
    let half = exp / 2;
    half + half.mul_f64(unit.clamp(0.0, 1.0))
}

/// Delay until the next refresh after a success: `fraction` of the remaining lifetime, or the
/// broker's `refresh_at` when that is sooner, started up to 10 % earlier at random; at least one
/// second, and never after expiry.
///
/// `lifetime` is the time from now until expiry, `broker_says` the time until the broker's
/// `refreshAt` (both by the local clock; `None` when already past or not sent).
pub fn refresh_in(
    lifetime: Duration,
    broker_says: Option<Duration>,
    fraction: f64,
    unit: f64,
) -> Duration {
    let ours = lifetime.mul_f64(fraction.clamp(0.0, 1.0));
    let planned = broker_says.map_or(ours, |b| b.min(ours));
    let jittered = planned.mul_f64(1.0 - REFRESH_JITTER * unit.clamp(0.0, 1.0));
    jittered.max(MIN_REFRESH).min(lifetime.max(MIN_REFRESH))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn refresh_is_at_two_thirds_without_jitter_and_up_to_ten_percent_earlier_with() {
        let lifetime = S(900);
        assert_eq!(refresh_in(lifetime, None, 2.0 / 3.0, 0.0), S(600));
        assert_eq!(refresh_in(lifetime, None, 2.0 / 3.0, 1.0), S(540));
        let mid = refresh_in(lifetime, None, 2.0 / 3.0, 0.5);
        assert!(mid > S(540) && mid < S(600), "{mid:?}");
    }

    #[test]
    fn the_broker_wins_when_it_asks_earlier_and_the_fraction_when_it_is_smaller() {
        assert_eq!(refresh_in(S(900), Some(S(300)), 2.0 / 3.0, 0.0), S(300));
        assert_eq!(refresh_in(S(900), Some(S(600)), 0.01, 0.0), S(9));
    }

    #[test]
    fn refresh_is_never_a_busy_loop_nor_after_expiry() {
        assert_eq!(refresh_in(S(0), None, 2.0 / 3.0, 0.0), MIN_REFRESH);
        assert_eq!(refresh_in(S(900), Some(S(0)), 2.0 / 3.0, 0.0), MIN_REFRESH);
        assert_eq!(refresh_in(S(10), None, 5.0, 0.0), S(10));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_half_of_it_random() {
        assert_eq!(backoff(TRANSIENT, 0, 0.0), Duration::from_millis(500));
        assert_eq!(backoff(TRANSIENT, 0, 1.0), S(1));
        assert_eq!(backoff(TRANSIENT, 3, 0.0), S(4));
        assert_eq!(backoff(TRANSIENT, 3, 1.0), S(8));
        assert_eq!(backoff(TRANSIENT, 6, 1.0), S(60));
        assert_eq!(backoff(TRANSIENT, 1000, 0.0), S(30));
        assert_eq!(backoff(WITHDRAWN, 0, 0.0), S(15));
        assert_eq!(backoff(WITHDRAWN, 40, 1.0), S(600));
    }

    #[test]
    fn out_of_range_randomness_is_clamped() {
        assert_eq!(backoff(TRANSIENT, 0, 7.0), S(1));
        assert_eq!(refresh_in(S(900), None, 2.0 / 3.0, -1.0), S(600));
    }
}

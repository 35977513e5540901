//! Anomaly rules over what the broker sees, opted in per ApiKey or KeyProvider
//! (`spec.anomalies`): refusal spikes, issuance bursts, and a pod's token presented after the
//! pod is gone. Counted per ApiKey in the current minute on this replica; each rule fires at
//! most once per ApiKey and minute. The decision is pure; the broker acts on it (metric, Event,
//! audit record, and revocation when the policy says so).

use std::collections::HashMap;
use std::sync::Mutex;

use crate::crd::{AnomalyAction, AnomalyPolicy};

/// The rules, as named in metrics, Events, audit records and `keybroker.dev/revoked-by`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rule {
    RefusalSpike,
    IssuanceBurst,
    TokenAfterPodGone,
}

impl Rule {
    pub fn name(self) -> &'static str {
        match self {
            Rule::RefusalSpike => "RefusalSpike",
            Rule::IssuanceBurst => "IssuanceBurst",
            Rule::TokenAfterPodGone => "TokenAfterPodGone",
        }
    }

    fn bit(self) -> u8 {
        match self {
            Rule::RefusalSpike => 1,
            Rule::IssuanceBurst => 2,
            Rule::TokenAfterPodGone => 4,
        }
    }
}

/// What the broker saw for one ApiKey.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    Issued,
    Refused,
    /// Refused because the token's pod is gone.
    RefusedPodGone,
}

/// A rule that fired, with what it counted and what to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Firing {
    pub rule: Rule,
    pub action: AnomalyAction,
    /// What was counted this minute (or 1 for a token after its pod).
    pub count: u32,
    /// The threshold passed (0 for a rule without one).
    pub threshold: u32,
}

impl Firing {
    /// The Event's and audit record's note.
    pub fn note(&self) -> String {
        let what = match self.rule {
            Rule::RefusalSpike => format!(
                "{} refused exchanges within a minute, above the policy's {}",
                self.count, self.threshold
            ),
            Rule::IssuanceBurst => format!(
                "{} credentials issued within a minute, above the policy's {}",
                self.count, self.threshold
            ),
            Rule::TokenAfterPodGone => {
                "a pod's token was presented after the pod was gone (a token copied out of a pod?)"
                    .to_owned()
            }
        };
        match self.action {
            AnomalyAction::Revoke => format!(
                "anomaly {}: {what}; the ApiKey was revoked (set spec.revoked: false to restore it)",
                self.rule.name()
            ),
            AnomalyAction::Alert => format!("anomaly {}: {what}", self.rule.name()),
        }
    }
}

#[derive(Debug, Default)]
struct Window {
    minute: i64,
    refusals: u32,
    issuances: u32,
    /// Rules fired this minute ([`Rule::bit`]).
    fired: u8,
}

/// Counts per ApiKey (`namespace/name`); only ApiKeys with a policy are counted, and windows of
/// past minutes are dropped as the map grows, so memory follows the ApiKeys that opted in.
#[derive(Debug, Default)]
pub struct Watch {
    windows: Mutex<HashMap<(String, String), Window>>,
}

/// Windows kept before the stale ones are swept.
const SWEEP_ABOVE: usize = 4096;

impl Watch {
    /// Counts `seen` for ApiKey `namespace/name` under `policy` at `now` (Unix seconds); the
    /// rules that fire now.
    pub fn observe(
        &self,
        (namespace, name): (&str, &str),
        seen: Seen,
        policy: &AnomalyPolicy,
        now: i64,
    ) -> Vec<Firing> {
        let minute = now.div_euclid(60);
        let action = policy.action.unwrap_or_default();
        let Ok(mut windows) = self.windows.lock() else {
            return Vec::new();
        };
        if windows.len() > SWEEP_ABOVE {
            windows.retain(|_, w| w.minute == minute);
        }
        let window = windows
            .entry((namespace.to_owned(), name.to_owned()))
            .or_default();
        if window.minute != minute {
            *window = Window {
                minute,
                ..Window::default()
            };
        }
        let mut fired = Vec::new();
        let mut fire = |window: &mut Window, rule: Rule, count: u32, threshold: u32| {
            if window.fired & rule.bit() == 0 {
                window.fired |= rule.bit();
                fired.push(Firing {
                    rule,
                    action,
                    count,
                    threshold,
                });
            }
        };
        match seen {
            Seen::Issued => {
                window.issuances = window.issuances.saturating_add(1);
                if let Some(limit) = policy.issuances_per_minute
                    && window.issuances > limit
                {
                    let count = window.issuances;
                    fire(window, Rule::IssuanceBurst, count, limit);
                }
            }
            Seen::Refused | Seen::RefusedPodGone => {
                window.refusals = window.refusals.saturating_add(1);
                if let Some(limit) = policy.refusals_per_minute
                    && window.refusals > limit
                {
                    let count = window.refusals;
                    fire(window, Rule::RefusalSpike, count, limit);
                }
                if seen == Seen::RefusedPodGone && policy.token_after_pod_gone {
                    fire(window, Rule::TokenAfterPodGone, 1, 0);
                }
            }
        }
        fired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: (&str, &str) = ("team-a", "uploader");

    fn policy(refusals: Option<u32>, issuances: Option<u32>, pod_gone: bool) -> AnomalyPolicy {
        AnomalyPolicy {
            refusals_per_minute: refusals,
            issuances_per_minute: issuances,
            token_after_pod_gone: pod_gone,
            action: Some(AnomalyAction::Revoke),
        }
    }

    #[test]
    fn a_rule_fires_above_its_threshold_once_per_minute() {
        let watch = Watch::default();
        let p = policy(Some(3), None, false);
        for _ in 0..3 {
            assert!(watch.observe(KEY, Seen::Refused, &p, 600).is_empty());
        }
        let fired = watch.observe(KEY, Seen::Refused, &p, 601);
        assert_eq!(fired.len(), 1);
        assert_eq!((fired[0].rule, fired[0].count), (Rule::RefusalSpike, 4));
        assert!(fired[0].note().contains("revoked"), "{}", fired[0].note());
        assert!(watch.observe(KEY, Seen::Refused, &p, 602).is_empty());
        // Another ApiKey counts on its own; the next minute starts over.
        assert!(
            watch
                .observe(("team-b", "uploader"), Seen::Refused, &p, 602)
                .is_empty()
        );
        for _ in 0..3 {
            assert!(watch.observe(KEY, Seen::Refused, &p, 660).is_empty());
        }
        assert_eq!(watch.observe(KEY, Seen::Refused, &p, 661).len(), 1);
    }

    #[test]
    fn bursts_and_tokens_after_the_pod_fire_only_when_asked_for() {
        let watch = Watch::default();
        let off = AnomalyPolicy::default();
        for _ in 0..100 {
            assert!(watch.observe(KEY, Seen::Issued, &off, 0).is_empty());
            assert!(watch.observe(KEY, Seen::RefusedPodGone, &off, 0).is_empty());
        }
        let watch = Watch::default();
        let on = policy(None, Some(2), true);
        assert!(watch.observe(KEY, Seen::Issued, &on, 0).is_empty());
        assert!(watch.observe(KEY, Seen::Issued, &on, 0).is_empty());
        assert_eq!(
            watch.observe(KEY, Seen::Issued, &on, 0)[0].rule,
            Rule::IssuanceBurst
        );
        let fired = watch.observe(KEY, Seen::RefusedPodGone, &on, 0);
        assert_eq!(fired[0].rule, Rule::TokenAfterPodGone);
        assert_eq!(fired[0].action, AnomalyAction::Revoke);
    }

    #[test]
    fn memory_follows_the_current_minute() {
        let watch = Watch::default();
        let p = policy(Some(1), None, false);
        for i in 0..(SWEEP_ABOVE + 10) {
            watch.observe(("ns", &format!("k{i}")), Seen::Refused, &p, 0);
        }
        watch.observe(("ns", "late"), Seen::Refused, &p, 120);
        assert!(watch.windows.lock().unwrap().len() <= 2);
    }
}

//! Per-ApiKey counts that hold across replicas: the gateway's call budgets (requests per minute
//! and per day) and the broker's issuance cap (`maxIssuancesPerMinute`). Each replica leases a
//! slice of what is left in the current windows from a shared ConfigMap (one per ApiKey and
//! count, in the operator's namespace) with an optimistic write (the resourceVersion must not
//! have moved), then spends the slice locally. Windows are aligned to
//! the clock (the minute, the UTC day), so every replica agrees where one ends. A replica writes
//! on top of the ConfigMap as it last wrote it and reads it only after a conflict: uncontended,
//! a lease is one write.
//!
//! Never more calls than the budget pass, whatever the number of replicas: a slice is leased
//! before it is spent, and a lease that lost a race is retried on the new state. A slice left
//! unspent when its window ends is lost (at most one slice per replica per window), so small
//! budgets lease one call at a time and are exact.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use sha2::{Digest, Sha256};
use tracing::warn;

const MINUTE: i64 = 60;
const DAY: i64 = 24 * 3600;
/// Lease attempts before the call is refused as unavailable; after a lost race a replica waits
/// a little (growing, jittered), so two replicas leasing in lockstep drift apart.
const ATTEMPTS: u32 = 32;

/// A budget that is used up: which window, its limit, and when it opens again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exhausted {
    pub window: &'static str,
    pub limit: u64,
    pub retry_after: Duration,
}

/// Why a call could not be counted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BudgetError {
    Exhausted(Exhausted),
    /// The shared counters could not be read or written (logged).
    Unavailable,
}

/// What the shared ConfigMap records for one ApiKey: the windows' starts (unix s) and the calls
/// leased in them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub minute: i64,
    pub minute_used: u64,
    pub day: i64,
    pub day_used: u64,
}

impl Usage {
    fn parse(data: Option<&BTreeMap<String, String>>) -> Self {
        let get = |k: &str| {
            data.and_then(|d| d.get(k))
                .and_then(|v| v.parse::<i64>().ok())
                .unwrap_or(0)
        };
        Self {
            minute: get("minute"),
            minute_used: u64::try_from(get("minuteUsed")).unwrap_or(0),
            day: get("day"),
            day_used: u64::try_from(get("dayUsed")).unwrap_or(0),
        }
    }

    fn data(&self) -> BTreeMap<String, String> {
        [
            ("minute", self.minute.to_string()),
            ("minuteUsed", self.minute_used.to_string()),
            ("day", self.day.to_string()),
            ("dayUsed", self.day_used.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// The usage at `now`: windows that ended start again from zero.
    pub fn at(self, now: i64) -> Self {
        let (minute, day) = (now - now.rem_euclid(MINUTE), now - now.rem_euclid(DAY));
        Self {
            minute,
            minute_used: if self.minute == minute {
                self.minute_used
            } else {
                0
            },
            day,
            day_used: if self.day == day { self.day_used } else { 0 },
        }
    }
}

/// How many calls to lease at once for a budget of `per_minute`: one for small budgets (exact),
/// up to a fiftieth of the minute's budget for large ones (fewer writes).
pub fn slice_size(per_minute: u32) -> u64 {
    u64::from(per_minute / 50).max(1)
}

/// Pure: the slice to lease from `usage` (already at `now`), or which window is used up.
pub fn lease(usage: &Usage, per_minute: u32, per_day: u64, now: i64) -> Result<u64, Exhausted> {
    let free_minute = u64::from(per_minute).saturating_sub(usage.minute_used);
    let free_day = per_day.saturating_sub(usage.day_used);
    let secs = |t: i64| Duration::from_secs(u64::try_from(t - now).unwrap_or(0).max(1));
    if free_day == 0 {
        return Err(Exhausted {
            window: "day",
            limit: per_day,
            retry_after: secs(usage.day + DAY),
        });
    }
    if free_minute == 0 {
        return Err(Exhausted {
            window: "minute",
            limit: u64::from(per_minute),
            retry_after: secs(usage.minute + MINUTE),
        });
    }
    Ok(slice_size(per_minute).min(free_minute).min(free_day))
}

/// What this replica holds of one ApiKey's budget.
#[derive(Debug, Default)]
struct Slice {
    /// The minute and day windows the slice was leased in.
    minute: i64,
    day: i64,
    remaining: u64,
    /// The shared ConfigMap as this replica last wrote it: the next lease writes on top of it
    /// without reading first, and reads only when another replica wrote meanwhile (409).
    last: Option<ConfigMap>,
}

/// What is counted: each has ConfigMaps of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counted {
    /// Calls through the gateway (`spec.budget`).
    Calls,
    /// Credentials or sessions the broker issued (`guardrails.maxIssuancesPerMinute`).
    Issuances,
}

impl Counted {
    fn label(self) -> &'static str {
        match self {
            Counted::Calls => "calls",
            Counted::Issuances => "issuances",
        }
    }
}

/// One count of every ApiKey this replica served.
#[derive(Debug)]
pub struct Budgets {
    maps: Api<ConfigMap>,
    counted: Counted,
    slices: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Slice>>>>,
}

impl Budgets {
    /// Counts of `counted` shared through ConfigMaps in `namespace`.
    pub fn new(kube: kube::Client, namespace: &str, counted: Counted) -> Self {
        Self {
            maps: Api::namespaced(kube, namespace),
            counted,
            slices: Mutex::default(),
        }
    }

    /// Counts one call of ApiKey `namespace/name` at `now` (unix s) if the budget has room.
    pub async fn try_acquire(
        &self,
        namespace: &str,
        name: &str,
        per_minute: u32,
        per_day: u64,
        now: i64,
    ) -> Result<(), BudgetError> {
        let id = format!("{namespace}/{name}");
        let slice = {
            let mut slices = self
                .slices
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            Arc::clone(slices.entry(id.clone()).or_default())
        };
        let mut slice = slice.lock().await;
        let current = Usage::default().at(now);
        if slice.minute == current.minute && slice.day == current.day && slice.remaining > 0 {
            slice.remaining -= 1;
            return Ok(());
        }
        let last = slice.last.take();
        let (leased, written) = self
            .lease(namespace, name, per_minute, per_day, now, last)
            .await?;
        *slice = Slice {
            minute: current.minute,
            day: current.day,
            remaining: leased - 1,
            last: written,
        };
        Ok(())
    }

    /// Leases a slice from the shared ConfigMap, creating it on first use: the slice, and the
    /// ConfigMap as written. `last` is the ConfigMap as this replica last wrote it, if it did.
    async fn lease(
        &self,
        namespace: &str,
        name: &str,
        per_minute: u32,
        per_day: u64,
        now: i64,
        mut last: Option<ConfigMap>,
    ) -> Result<(u64, Option<ConfigMap>), BudgetError> {
        let object = object_name(self.counted, namespace, name);
        let unavailable = |e: kube::Error| {
            warn!(api_key = name, namespace, error = %e, "the shared budget could not be read or written");
            BudgetError::Unavailable
        };
        let mut wait = false;
        for attempt in 0..ATTEMPTS {
            if std::mem::take(&mut wait) && attempt > 0 {
                let mut jitter = [0u8; 1];
                let _ = aws_lc_rs::rand::fill(&mut jitter);
                let ms = u64::from(attempt.min(10)) + u64::from(jitter[0] % 8);
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            let cached = last.is_some();
            let existing = match last.take() {
                Some(map) => Some(map),
                None => self.maps.get_opt(&object).await.map_err(unavailable)?,
            };
            let usage = Usage::parse(existing.as_ref().and_then(|m| m.data.as_ref())).at(now);
            let n = lease(&usage, per_minute, per_day, now).map_err(BudgetError::Exhausted)?;
            let next = Usage {
                minute_used: usage.minute_used + n,
                day_used: usage.day_used + n,
                ..usage
            };
            let written = match existing {
                Some(mut map) => {
                    // The resourceVersion read stays in the object: the write fails with a
                    // conflict if another replica leased meanwhile.
                    map.data = Some(next.data());
                    self.maps
                        .replace(&object, &PostParams::default(), &map)
                        .await
                }
                None => {
                    let map = ConfigMap {
                        metadata: ObjectMeta {
                            name: Some(object.clone()),
                            labels: Some(
                                [
                                    ("app.kubernetes.io/managed-by", "keybroker"),
                                    ("keybroker.dev/budget-of", "apikey"),
                                    (COUNTS_LABEL, self.counted.label()),
                                ]
                                .into_iter()
                                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                                .collect(),
                            ),
                            annotations: Some(
                                [(APIKEY_ANNOTATION.to_owned(), format!("{namespace}/{name}"))]
                                    .into(),
                            ),
                            ..ObjectMeta::default()
                        },
                        data: Some(next.data()),
                        ..ConfigMap::default()
                    };
                    self.maps.create(&PostParams::default(), &map).await
                }
            };
            match written {
                Ok(map) => return Ok((n, Some(map))),
                // What this replica wrote last is out of date (another replica leased, or the
                // map was deleted): read it at once.
                Err(kube::Error::Api(e)) if cached && matches!(e.code, 404 | 409) => continue,
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    wait = true;
                    continue;
                }
                Err(e) => return Err(unavailable(e)),
            }
        }
        warn!(
            api_key = name,
            namespace, "the shared budget stayed contended; refusing the call"
        );
        Err(BudgetError::Unavailable)
    }
}

/// Label selector of every count's ConfigMap.
pub const SELECTOR: &str = "keybroker.dev/budget-of=apikey";
const APIKEY_ANNOTATION: &str = "keybroker.dev/apikey";
const COUNTS_LABEL: &str = "keybroker.dev/counts";

/// A count's ConfigMap, read: what it counts, for which ApiKey (`namespace`, `name`), and the
/// usage it records. `None` for a ConfigMap that is not one.
pub fn read(map: &ConfigMap) -> Option<(Counted, String, String, Usage)> {
    let counted = match map.metadata.labels.as_ref()?.get(COUNTS_LABEL)?.as_str() {
        "calls" => Counted::Calls,
        "issuances" => Counted::Issuances,
        _ => return None,
    };
    let (namespace, name) = map
        .metadata
        .annotations
        .as_ref()?
        .get(APIKEY_ANNOTATION)?
        .split_once('/')?;
    Some((
        counted,
        namespace.to_owned(),
        name.to_owned(),
        Usage::parse(map.data.as_ref()),
    ))
}

/// The ConfigMap of `counted` for ApiKey `namespace/name`: a hash, so any name fits and none
/// collide.
pub fn object_name(counted: Counted, namespace: &str, name: &str) -> String {
    let digest = Sha256::digest(format!("{namespace}/{name}").as_bytes());
    let hex: String = digest.iter().take(10).map(|b| format!("{b:02x}")).collect();
    match counted {
        Counted::Calls => format!("keybroker-budget-{hex}"),
        Counted::Issuances => format!("keybroker-issuances-{hex}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_align_to_the_clock_and_reset_when_they_end() {
        let t = 1_800_000_030; // 30 s into a minute
        let u = Usage {
            minute: t - 30,
            minute_used: 5,
            day: t - t.rem_euclid(DAY),
            day_used: 50,
        };
        assert_eq!(u.at(t), u);
        let later = u.at(t + 40);
        assert_eq!(
            (later.minute, later.minute_used, later.day_used),
            (t + 30, 0, 50)
        );
        let tomorrow = u.at(u.day + DAY + 1);
        assert_eq!((tomorrow.minute_used, tomorrow.day_used), (0, 0));
    }

    #[test]
    fn leases_never_exceed_what_is_left_and_say_when_it_reopens() {
        let now = 1_800_000_030;
        let fresh = Usage::default().at(now);
        assert_eq!(
            lease(&fresh, 20, 1000, now),
            Ok(1),
            "small budgets: one at a time"
        );
        assert_eq!(lease(&fresh, 600, 1000, now), Ok(12));
        let nearly = Usage {
            minute_used: 595,
            ..fresh
        };
        assert_eq!(lease(&nearly, 600, 1000, now), Ok(5));
        let full = Usage {
            minute_used: 600,
            ..fresh
        };
        let e = lease(&full, 600, 1000, now).unwrap_err();
        assert_eq!(
            (e.window, e.limit, e.retry_after),
            ("minute", 600, Duration::from_secs(30))
        );
        let day = Usage {
            day_used: 1000,
            ..fresh
        };
        assert_eq!(lease(&day, 600, 1000, now).unwrap_err().window, "day");
    }

    #[test]
    fn counters_round_trip_through_the_config_map() {
        let u = Usage {
            minute: 60,
            minute_used: 3,
            day: 0,
            day_used: 9,
        };
        assert_eq!(Usage::parse(Some(&u.data())), u);
        assert_eq!(Usage::parse(None), Usage::default());
        let calls = |ns, name| object_name(Counted::Calls, ns, name);
        assert_eq!(calls("team-a", "k"), calls("team-a", "k"));
        assert_ne!(calls("team-a", "k"), calls("team-b", "k"));
        assert_ne!(
            calls("team-a", "k"),
            object_name(Counted::Issuances, "team-a", "k")
        );
        let longest = "x".repeat(253);
        assert!(object_name(Counted::Issuances, &longest, &longest).len() <= 63);
    }
}

//! Each ApiKey's usage today in its status (`status.usage`), from the counts its broker and
//! gateway replicas share (see [`crate::budget`]).
//!
//! A loop of its own rather than a trigger of the ApiKey reconciler: the counts move with every
//! lease, and the reconciler is what revokes at the provider, so it must not be slowed or
//! debounced by them. Every [`PERIOD`] the loop writes `status.usage` of each ApiKey whose
//! counts moved, and only that field, under a field manager of its own ([`FIELD_MANAGER`]), so
//! the reconciler's server-side applies leave it alone: at most one write per ApiKey per
//! period, none while nothing changes. Counts of ApiKeys that are gone are deleted once their
//! day is over (not sooner: deleting and re-creating an ApiKey must not reset its day).

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tracing::{debug, warn};

use crate::budget::{self, Counted};
use crate::crd::{ApiKey, ApiKeyUsage};
use crate::metrics::Metrics;

/// The field manager of `status.usage`.
pub const FIELD_MANAGER: &str = "keybroker-usage";
/// How often usage is published.
const PERIOD: Duration = Duration::from_secs(10);
const DAY: i64 = 24 * 3600;

/// Pure: each ApiKey's usage at `now` (unix s) from the counts' ConfigMaps, keyed by
/// `(namespace, name)`, and the day each count was last written in.
pub fn usage_at<M: Borrow<ConfigMap>>(
    maps: &[M],
    now: i64,
) -> BTreeMap<(String, String), (ApiKeyUsage, i64)> {
    let today = now - now.rem_euclid(DAY);
    let mut all: BTreeMap<(String, String), (ApiKeyUsage, i64)> = BTreeMap::new();
    for map in maps {
        let Some((counted, namespace, name, recorded)) = budget::read(map.borrow()) else {
            continue;
        };
        let used = recorded.at(now).day_used;
        let entry = all.entry((namespace, name)).or_insert_with(|| {
            (
                ApiKeyUsage {
                    day: day_name(today),
                    ..ApiKeyUsage::default()
                },
                recorded.day,
            )
        });
        entry.1 = entry.1.max(recorded.day);
        match counted {
            Counted::Calls => entry.0.calls = Some(used),
            Counted::Issuances => entry.0.issuances = Some(used),
        }
    }
    all
}

/// `2026-12-02` for the day starting at `start` (unix s).
fn day_name(start: i64) -> String {
    Timestamp::from_second(start)
        .map(|t| t.to_string().chars().take(10).collect())
        .unwrap_or_default()
}

/// Publishes usage until dropped. `scope`: the only namespace whose ApiKeys this controller
/// sees (`None`: all), so that counts of another scope are never taken for orphans.
pub async fn run(
    client: Client,
    counts_namespace: String,
    keys: Store<DeserializeGuard<ApiKey>>,
    scope: Option<String>,
    metrics: std::sync::Arc<Metrics>,
) {
    let maps_api: Api<ConfigMap> = Api::namespaced(client.clone(), &counts_namespace);
    let (maps, writer) = reflector::store();
    let reflector = reflector::reflector(
        writer,
        watcher(
            maps_api.clone(),
            watcher::Config::default().labels(budget::SELECTOR),
        ),
    )
    .default_backoff()
    .modify(|map: &mut ConfigMap| map.managed_fields_mut().clear())
    .touched_objects()
    .for_each(|_| async {});
    let publish = async {
        if keys.wait_until_ready().await.is_err() || maps.wait_until_ready().await.is_err() {
            return;
        }
        let mut tick = tokio::time::interval(PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = Timestamp::now().as_second();
            let today = now - now.rem_euclid(DAY);
            for ((namespace, name), (usage, last_day)) in usage_at(&maps.state(), now) {
                let in_scope = scope.as_deref().is_none_or(|s| s == namespace);
                match keys.get(&ObjectRef::new(&name).within(&namespace)) {
                    Some(guard) => {
                        let Ok(key) = &guard.0 else { continue };
                        if key.status.as_ref().and_then(|s| s.usage.as_ref()) == Some(&usage) {
                            continue;
                        }
                        if write(&client, &namespace, &name, &usage).await {
                            metrics.status_write("ApiKey");
                        }
                    }
                    None if in_scope && last_day < today => {
                        forget(&maps_api, &namespace, &name).await;
                    }
                    None => {}
                }
            }
        }
    };
    tokio::join!(reflector, publish);
}

/// Applies `status.usage` of ApiKey `namespace/name`, and only it: whether it was written.
async fn write(client: &Client, namespace: &str, name: &str, usage: &ApiKeyUsage) -> bool {
    let patch = serde_json::json!({
        "apiVersion": "keybroker.dev/v1alpha1",
        "kind": "ApiKey",
        "status": {"usage": usage},
    });
    match Api::<ApiKey>::namespaced(client.clone(), namespace)
        .patch_status(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
    {
        Ok(_) => true,
        // Deleted since the cache saw it.
        Err(kube::Error::Api(e)) if e.code == 404 => false,
        Err(e) => {
            warn!(api_key = name, namespace, error = %e, "writing the usage of an ApiKey");
            false
        }
    }
}

/// Deletes the counts of ApiKey `namespace/name`, which is gone.
async fn forget(maps: &Api<ConfigMap>, namespace: &str, name: &str) {
    for counted in [Counted::Calls, Counted::Issuances] {
        let object = budget::object_name(counted, namespace, name);
        match maps.delete(&object, &DeleteParams::default()).await {
            Ok(_) => debug!(
                api_key = name,
                namespace, "deleted the counts of a gone ApiKey"
            ),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => {
                warn!(api_key = name, namespace, error = %e, "deleting the counts of a gone ApiKey")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(yaml: &str) -> ConfigMap {
        yaml_serde::from_str(yaml).unwrap()
    }

    #[test]
    fn usage_is_todays_per_apikey_from_both_counts() {
        let now: i64 = 1_800_000_030; // 2027-01-15T08:00:30Z
        let today = now - now.rem_euclid(DAY);
        let calls = counts(&format!(
            r#"
metadata:
  name: keybroker-budget-0
  labels: {{keybroker.dev/budget-of: apikey, keybroker.dev/counts: calls}}
  annotations: {{keybroker.dev/apikey: team-a/docs}}
data: {{minute: "{}", minuteUsed: "4", day: "{today}", dayUsed: "41"}}
"#,
            now - 30
        ));
        let issuances = counts(&format!(
            r#"
metadata:
  name: keybroker-issuances-0
  labels: {{keybroker.dev/budget-of: apikey, keybroker.dev/counts: issuances}}
  annotations: {{keybroker.dev/apikey: team-a/docs}}
data: {{minute: "0", minuteUsed: "1", day: "{today}", dayUsed: "3"}}
"#
        ));
        let yesterday = counts(&format!(
            r#"
metadata:
  name: keybroker-budget-1
  labels: {{keybroker.dev/budget-of: apikey, keybroker.dev/counts: calls}}
  annotations: {{keybroker.dev/apikey: team-b/old}}
data: {{minute: "0", minuteUsed: "9", day: "{}", dayUsed: "900"}}
"#,
            today - DAY
        ));
        let stranger = counts("metadata: {name: other, labels: {app: x}}\ndata: {dayUsed: \"5\"}");
        let all = usage_at(&[calls, issuances, yesterday, stranger], now);
        assert_eq!(all.len(), 2);
        let docs = &all[&("team-a".to_owned(), "docs".to_owned())];
        assert_eq!(
            docs,
            &(
                ApiKeyUsage {
                    day: "2027-01-15".into(),
                    calls: Some(41),
                    issuances: Some(3),
                },
                today
            )
        );
        let old = &all[&("team-b".to_owned(), "old".to_owned())];
        assert_eq!(
            (old.0.calls, old.1),
            (Some(0), today - DAY),
            "a past day counts nothing today"
        );
    }
}

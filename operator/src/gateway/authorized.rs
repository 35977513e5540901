//! The gateway's memo of authorizations.
//!
//! Authorizing a call runs the broker's whole check: the pod's spec read back through JSON for
//! the webhook's injection check, the ApiKey's policy compiled and hashed into its grant, the
//! gateway scope compiled. That cost more than the rest of a call. Every input of that work is
//! an object from the caches, and any change to one of them gives it a new resourceVersion, so
//! a memo keyed by the objects' versions answers exactly what authorizing again would: a
//! revocation, a pod change, a narrowed guardrail or a relabelled namespace is a miss on the
//! very next call. Only grants are kept; refusals are worked out each time. What varies per
//! call, the caller's address ([`sent_by`]), is checked outside the memo.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::ResourceExt;

use crate::crd::{ApiKey, KeyProvider};
use crate::providers::gateway::scope::GatewayScope;
use crate::providers::gateway::session::Claims;

/// More distinct (pod, ApiKey) pairs than this in use at once empty the memo: the cost is one
/// authorization per pair again, never a wrong answer.
const MAX_ENTRIES: usize = 4096;

/// Everything one authorization depended on.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub(super) struct Inputs {
    namespace: String,
    api_key: String,
    pod: String,
    pod_uid: String,
    service_account: String,
    key_version: String,
    pod_version: String,
    provider: String,
    provider_version: String,
    namespace_version: String,
}

impl Inputs {
    /// The inputs of authorizing `claims` against these objects; `None` when one of them is
    /// missing or has no resourceVersion (then nothing is memoized).
    pub(super) fn of(
        claims: &Claims,
        key: Option<&ApiKey>,
        pod: Option<&Pod>,
        provider: Option<&KeyProvider>,
        namespace: Option<&Namespace>,
    ) -> Option<Self> {
        let (key, pod, provider) = (key?, pod?, provider?);
        Some(Self {
            namespace: claims.namespace.clone(),
            api_key: claims.api_key.clone(),
            pod: claims.pod.clone(),
            pod_uid: claims.pod_uid.clone(),
            service_account: claims.service_account.clone(),
            key_version: key.resource_version()?,
            pod_version: pod.resource_version()?,
            provider: provider.name_any(),
            provider_version: provider.resource_version()?,
            // A namespace missing from the cache authorizes with no labels, like any other
            // missing one.
            namespace_version: namespace
                .and_then(|n| n.resource_version())
                .unwrap_or_default(),
        })
    }
}

/// A grant, as the gateway uses it.
#[derive(Debug)]
pub(super) struct Authorization {
    pub provider: Arc<KeyProvider>,
    pub scope: GatewayScope,
    pub grant: String,
}

/// The memo itself.
#[derive(Debug, Default)]
pub(super) struct Authorizations {
    entries: Mutex<HashMap<Inputs, Arc<Authorization>>>,
}

impl Authorizations {
    pub(super) fn get(&self, inputs: &Inputs) -> Option<Arc<Authorization>> {
        self.entries.lock().ok()?.get(inputs).cloned()
    }

    pub(super) fn insert(&self, inputs: Inputs, authorization: Arc<Authorization>) {
        if let Ok(mut entries) = self.entries.lock() {
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
            entries.insert(inputs, authorization);
        }
    }
}

/// Whether `client` is one of the pod's addresses: a session works only from the pod it was
/// issued to, so one copied out of a pod buys nothing elsewhere. Checked on every call, memo or
/// not. A pod that has finished holds no address any more (another pod may get it); one that
/// has none yet is let through (the kubelet reports the address as the pod starts).
pub(super) fn sent_by(pod: &Pod, client: &str) -> bool {
    let Some(status) = pod.status.as_ref() else {
        return true;
    };
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return false;
    }
    let addresses: Vec<std::net::IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .map(|p| p.ip.as_str())
        .chain(status.pod_ip.as_deref())
        .filter_map(|ip| ip.parse().ok())
        .collect();
    if addresses.is_empty() {
        return true;
    }
    client
        .parse::<std::net::IpAddr>()
        .is_ok_and(|c| addresses.contains(&c.to_canonical()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> Claims {
        Claims {
            namespace: "team-a".into(),
            api_key: "echo".into(),
            pod: "app-1".into(),
            pod_uid: "uid-1".into(),
            service_account: "app".into(),
            grant: "g1".into(),
            exp: 0,
        }
    }

    /// The four objects at resourceVersion `v` each.
    fn objects(v: [&str; 4]) -> (ApiKey, Pod, KeyProvider, Namespace) {
        let key = format!(
            "{{metadata: {{name: echo, namespace: team-a, resourceVersion: '{}'}}, spec: {{providerRef: {{name: p}}, serviceAccountNames: [app], scope: {{actions: [GET], resources: [/x]}}}}}}",
            v[0]
        );
        let pod = format!("{{metadata: {{name: app-1, resourceVersion: '{}'}}}}", v[1]);
        let provider = format!(
            "{{metadata: {{name: p, resourceVersion: '{}'}}, spec: {{gateway: {{upstream: 'https://u', keySecretRef: {{name: k, namespace: s}}, presentation: {{header: {{name: X}}}}}}, namespaceSelector: {{}}, guardrails: {{allowedActions: [GET], allowedResources: [/x]}}}}}}",
            v[2]
        );
        let namespace = format!(
            "{{metadata: {{name: team-a, resourceVersion: '{}'}}}}",
            v[3]
        );
        (
            yaml_serde::from_str(&key).unwrap(),
            yaml_serde::from_str(&pod).unwrap(),
            yaml_serde::from_str(&provider).unwrap(),
            yaml_serde::from_str(&namespace).unwrap(),
        )
    }

    fn inputs(claims: &Claims, v: [&str; 4]) -> Option<Inputs> {
        let (key, pod, provider, namespace) = objects(v);
        Inputs::of(
            claims,
            Some(&key),
            Some(&pod),
            Some(&provider),
            Some(&namespace),
        )
    }

    #[test]
    fn any_changed_object_or_identity_is_a_miss() {
        let claims = claims();
        let base = inputs(&claims, ["1", "1", "1", "1"]).expect("all versioned");
        assert_eq!(inputs(&claims, ["1", "1", "1", "1"]), Some(base.clone()));
        for changed in [
            ["2", "1", "1", "1"],
            ["1", "2", "1", "1"],
            ["1", "1", "2", "1"],
            ["1", "1", "1", "2"],
        ] {
            assert_ne!(inputs(&claims, changed), Some(base.clone()), "{changed:?}");
        }
        let mut other_pod = claims.clone();
        other_pod.pod_uid = "uid-2".into();
        let mut other_account = claims.clone();
        other_account.service_account = "other".into();
        for other in [other_pod, other_account] {
            assert_ne!(inputs(&other, ["1", "1", "1", "1"]), Some(base.clone()));
        }
        let (_, pod, provider, _) = objects(["1", "1", "1", "1"]);
        assert!(Inputs::of(&claims, None, Some(&pod), Some(&provider), None).is_none());
    }

    #[test]
    fn a_full_memo_starts_over() {
        let memo = Authorizations::default();
        let (_, _, provider, _) = objects(["1", "1", "1", "1"]);
        let provider = Arc::new(provider);
        let scope = crate::providers::gateway::scope::compile(
            &objects(["1", "1", "1", "1"]).0.spec,
            &provider.spec.guardrails,
            "team-a",
        )
        .expect("within the guardrails")
        .1;
        let mut claims = claims();
        for i in 0..=MAX_ENTRIES {
            claims.pod = format!("app-{i}");
            let inputs = inputs(&claims, ["1", "1", "1", "1"]).unwrap();
            memo.insert(
                inputs,
                Arc::new(Authorization {
                    provider: Arc::clone(&provider),
                    scope: scope.clone(),
                    grant: "g1".into(),
                }),
            );
        }
        assert_eq!(memo.entries.lock().unwrap().len(), 1);
        assert!(
            memo.get(&inputs(&claims, ["1", "1", "1", "1"]).unwrap())
                .is_some()
        );
    }

    fn pod_with(status: &str) -> Pod {
        yaml_serde::from_str(&format!("{{metadata: {{name: app}}, status: {status}}}")).unwrap()
    }

    #[test]
    fn a_session_works_only_from_its_pods_addresses() {
        let dual = pod_with("{podIP: 10.244.0.7, podIPs: [{ip: 10.244.0.7}, {ip: 'fd00::7'}]}");
        for from in ["10.244.0.7", "::ffff:10.244.0.7", "fd00::7"] {
            assert!(sent_by(&dual, from), "{from}");
        }
        for from in ["10.244.0.8", "127.0.0.1", "fd00::8", "", "not an address"] {
            assert!(!sent_by(&dual, from), "{from}");
        }
        let finished =
            pod_with("{phase: Succeeded, podIP: 10.244.0.7, podIPs: [{ip: 10.244.0.7}]}");
        assert!(
            !sent_by(&finished, "10.244.0.7"),
            "a finished pod's address"
        );
        // No address yet (nothing in it runs), or no status at all.
        assert!(sent_by(&pod_with("{}"), "10.244.0.8"));
        assert!(sent_by(
            &yaml_serde::from_str::<Pod>("{metadata: {name: app}}").unwrap(),
            "10.244.0.8"
        ));
    }
}

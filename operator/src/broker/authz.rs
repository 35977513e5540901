//! Whether a verified pod identity may have credentials for an ApiKey. Pure: the caller looks
//! the objects up; this decides, and every refusal has its own reason.
//!
//! The scope is compiled here again from the ApiKey's spec and the provider's guardrails, not
//! read from `status`: status is written by whoever may write `apikeys/status`, and the broker
//! must not trust anything a tenant can change to widen its own scope.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::core::{Selector, SelectorExt};

use crate::crd::{ApiKey, KeyProvider};
use crate::webhook::inject::{self, PodView};

/// Pod label that opts a pod in (also the webhook's objectSelector).
pub const INJECT_LABEL: &str = "keybroker.dev/inject";
/// Pod annotation listing the ApiKeys a pod uses, comma-separated.
pub const APIKEYS_ANNOTATION: &str = "keybroker.dev/apikeys";

/// Who presented the token, as the apiserver's TokenReview verified it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodIdentity {
    pub namespace: String,
    pub service_account: String,
    pub pod_name: String,
    pub pod_uid: String,
}

/// What the broker may mint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// Identifies these rights (see [`crate::revocation::grant_id`]).
    pub id: String,
    pub session_policy: String,
    pub scope_hash: String,
    pub ttl: Duration,
    pub provider: String,
}

/// Why an exchange is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    #[error(
        "ApiKey {namespace}/{name} does not exist (ApiKeys are looked up in the pod's own namespace)"
    )]
    ApiKeyNotFound { namespace: String, name: String },
    #[error("ApiKey {name} is revoked (spec.revoked is true)")]
    ApiKeyRevoked { name: String },
    #[error("ApiKey {name} is not within its provider's guardrails: {detail}")]
    ApiKeyNotReady { name: String, detail: String },
    #[error("service account {service_account} is not in ApiKey {name}'s serviceAccountNames")]
    ServiceAccountNotAllowed {
        name: String,
        service_account: String,
    },
    #[error("pod {pod} no longer exists (or was replaced); tokens are bound to one pod")]
    PodGone { pod: String },
    #[error(
        "pod {pod} is not opted in: it needs the label {INJECT_LABEL}=true and ApiKey {name} in its {APIKEYS_ANNOTATION} annotation"
    )]
    PodNotOptedIn { pod: String, name: String },
    #[error("pod {pod} does not carry keybroker's injection: {detail}")]
    PodNotInjected { pod: String, detail: String },
}

impl Denial {
    pub fn reason(&self) -> &'static str {
        match self {
            Denial::ApiKeyNotFound { .. } => "ApiKeyNotFound",
            Denial::ApiKeyRevoked { .. } => "ApiKeyRevoked",
            Denial::ApiKeyNotReady { .. } => "ApiKeyNotReady",
            Denial::ServiceAccountNotAllowed { .. } => "ServiceAccountNotAllowed",
            Denial::PodGone { .. } => "PodGone",
            Denial::PodNotOptedIn { .. } => "PodNotOptedIn",
            Denial::PodNotInjected { .. } => "PodNotInjected",
        }
    }
}

/// The ApiKey names in a pod's `keybroker.dev/apikeys` annotation (comma-separated, blanks
/// ignored). The webhook and the broker read the annotation the same way.
pub fn listed_api_keys(annotation: &str) -> impl Iterator<Item = &str> {
    annotation
        .split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
}

/// Decides an exchange of `identity` for ApiKey `name`, given the live objects. `sidecar_image`
/// is keybroker's sidecar image: the pod must carry the injection whole, with the token only in
/// a sidecar of that image (labels and annotations can be added to a pod the webhook never
/// saw, and images changed or ephemeral containers added after it did).
pub fn authorize(
    identity: &PodIdentity,
    name: &str,
    key: Option<&ApiKey>,
    pod: Option<&Pod>,
    provider: Option<&KeyProvider>,
    namespace_labels: &BTreeMap<String, String>,
    sidecar_image: &str,
) -> Result<Grant, Denial> {
    let Some(key) = key else {
        return Err(Denial::ApiKeyNotFound {
            namespace: identity.namespace.clone(),
            name: name.to_owned(),
        });
    };
    if key.spec.revoked {
        return Err(Denial::ApiKeyRevoked {
            name: name.to_owned(),
        });
    }
    if !key
        .spec
        .service_account_names
        .contains(&identity.service_account)
    {
        return Err(Denial::ServiceAccountNotAllowed {
            name: name.to_owned(),
            service_account: identity.service_account.clone(),
        });
    }
    let full_pod = pod
        .filter(|p| p.metadata.uid.as_deref() == Some(identity.pod_uid.as_str()))
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .ok_or_else(|| Denial::PodGone {
            pod: identity.pod_name.clone(),
        })?;
    let pod = &full_pod.metadata;
    let opted_in = pod
        .labels
        .as_ref()
        .and_then(|l| l.get(INJECT_LABEL))
        .map(String::as_str)
        == Some("true");
    let lists_key = pod
        .annotations
        .as_ref()
        .and_then(|a| a.get(APIKEYS_ANNOTATION))
        .is_some_and(|list| listed_api_keys(list).any(|k| k == name));
    if !opted_in || !lists_key {
        return Err(Denial::PodNotOptedIn {
            pod: identity.pod_name.clone(),
            name: name.to_owned(),
        });
    }
    let not_injected = |detail: String| Denial::PodNotInjected {
        pod: identity.pod_name.clone(),
        detail,
    };
    let view: PodView = serde_json::to_value(full_pod)
        .and_then(serde_json::from_value)
        .map_err(|e| not_injected(format!("its spec could not be read: {e}")))?;
    inject::verify_injected(&view, sidecar_image)
        .map_err(|denial| not_injected(denial.to_string()))?;
    let not_ready = |detail: String| Denial::ApiKeyNotReady {
        name: name.to_owned(),
        detail,
    };
    let provider = provider.ok_or_else(|| {
        not_ready(format!(
            "KeyProvider {:?} does not exist",
            key.spec.provider_ref.name
        ))
    })?;
    let selected = Selector::try_from(provider.spec.namespace_selector.clone())
        .map(|s| s.matches(namespace_labels))
        .unwrap_or(false);
    if !selected {
        return Err(not_ready(format!(
            "KeyProvider {:?} does not serve namespace {:?}",
            provider.name_any(),
            identity.namespace
        )));
    }
    let compiled = crate::providers::compile(&key.spec, provider, &identity.namespace)
        .map_err(|refusal| not_ready(refusal.to_string()))?;
    Ok(Grant {
        id: crate::revocation::grant_id(
            key.uid().as_deref().unwrap_or_default(),
            provider.uid().as_deref().unwrap_or_default(),
            &compiled.session_policy,
            compiled.ttl,
            &key.spec.service_account_names,
        ),
        session_policy: compiled.session_policy,
        scope_hash: compiled.scope_hash,
        ttl: compiled.ttl,
        provider: provider.name_any(),
    })
}

/// An STS RoleSessionName (`[\w+=,.@-]`, at most 64 characters) that names the pod.
pub fn role_session_name(identity: &PodIdentity) -> String {
    let raw = format!("{}.{}", identity.namespace, identity.pod_name);
    let cleaned: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_+=,.@-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if cleaned.len() < 2 {
        "keybroker".into()
    } else {
        cleaned
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;

    const KEY: &str = r#"
apiVersion: keybroker.dev/v1alpha1
kind: ApiKey
metadata: {name: uploader, namespace: team-a}
spec:
  providerRef: {name: s3}
  serviceAccountNames: [uploader]
  scope: {actions: ["s3:PutObject"], resources: ["arn:aws:s3:::corp-data/team-a/*"]}
  ttl: 15m
"#;
    const PROVIDER: &str = r#"
apiVersion: keybroker.dev/v1alpha1
kind: KeyProvider
metadata: {name: s3}
spec:
  aws: {roleArn: "arn:aws:iam::000000000000:role/x", region: us-east-1}
  namespaceSelector: {}
  guardrails:
    allowedActions: ["s3:PutObject"]
    allowedResources: ["arn:aws:s3:::corp-data/{namespace}/*"]
"#;
    const POD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: app-1
  namespace: team-a
  uid: uid-1
  labels: {keybroker.dev/inject: "true"}
  annotations: {keybroker.dev/apikeys: "other, uploader"}
spec: {serviceAccountName: uploader, containers: [{name: app, image: x}]}
"#;

    fn identity() -> PodIdentity {
        PodIdentity {
            namespace: "team-a".into(),
            service_account: "uploader".into(),
            pod_name: "app-1".into(),
            pod_uid: "uid-1".into(),
        }
    }

    const SIDECAR_IMAGE: &str = "registry.example/keybroker-sidecar:1.0";

    /// `pod` (YAML) as the webhook stored it: injected when opted in.
    fn injected(pod: &str) -> serde_json::Value {
        let pod: serde_json::Value = yaml_serde::from_str(pod).unwrap();
        let facts = inject::KeyFacts {
            service_account_names: vec!["uploader".into()],
            ready: true,
            ..Default::default()
        };
        let keys = BTreeMap::from([("other".into(), facts.clone()), ("uploader".into(), facts)]);
        let settings = inject::Settings {
            image: SIDECAR_IMAGE.into(),
            ..Default::default()
        };
        inject::admitted(&pod, "team-a", &keys, &settings).unwrap()
    }

    fn decide_stored(
        key: Option<&str>,
        pod: Option<serde_json::Value>,
        id: &PodIdentity,
    ) -> Result<Grant, Denial> {
        let key: Option<ApiKey> = key.map(|k| yaml_serde::from_str(k).unwrap());
        let pod: Option<Pod> = pod.map(|p| serde_json::from_value(p).unwrap());
        let provider: KeyProvider = yaml_serde::from_str(PROVIDER).unwrap();
        authorize(
            id,
            "uploader",
            key.as_ref(),
            pod.as_ref(),
            Some(&provider),
            &BTreeMap::new(),
            SIDECAR_IMAGE,
        )
    }

    /// Decides for `pod` (YAML, before admission) stored as the webhook injected it.
    fn decide(key: Option<&str>, pod: Option<&str>, id: &PodIdentity) -> Result<Grant, Denial> {
        decide_stored(key, pod.map(injected), id)
    }

    #[test]
    fn an_opted_in_pod_of_an_allowed_account_gets_the_compiled_scope() {
        let grant = decide(Some(KEY), Some(POD), &identity()).unwrap();
        assert!(grant.session_policy.contains("corp-data/team-a/*"));
        assert_eq!(grant.ttl, Duration::from_secs(900));
    }

    #[test]
    fn every_refusal_has_its_reason() {
        let id = identity();
        let reason = |r: Result<Grant, Denial>| r.unwrap_err().reason();
        assert_eq!(reason(decide(None, Some(POD), &id)), "ApiKeyNotFound");
        assert_eq!(
            reason(decide(
                Some(&KEY.replace("ttl: 15m", "ttl: 15m\n  revoked: true")),
                Some(POD),
                &id
            )),
            "ApiKeyRevoked"
        );
        let other_sa = PodIdentity {
            service_account: "intruder".into(),
            ..id.clone()
        };
        assert_eq!(
            reason(decide(Some(KEY), Some(POD), &other_sa)),
            "ServiceAccountNotAllowed"
        );
        assert_eq!(reason(decide(Some(KEY), None, &id)), "PodGone");
        let replaced = PodIdentity {
            pod_uid: "uid-0".into(),
            ..id.clone()
        };
        assert_eq!(reason(decide(Some(KEY), Some(POD), &replaced)), "PodGone");
        assert_eq!(
            reason(decide(
                Some(KEY),
                Some(&POD.replace("\"true\"", "\"false\"")),
                &id
            )),
            "PodNotOptedIn"
        );
        assert_eq!(
            reason(decide(
                Some(KEY),
                Some(&POD.replace("other, uploader", "other")),
                &id
            )),
            "PodNotOptedIn"
        );
        let wide = KEY.replace("corp-data/team-a/*", "corp-data/*");
        assert_eq!(
            reason(decide(Some(&wide), Some(POD), &id)),
            "ApiKeyNotReady"
        );
    }

    /// What a pod can become after admission: labels and annotations added to a pod the
    /// webhook never injected, a container image changed, an ephemeral container added.
    #[test]
    fn a_pod_changed_after_admission_around_the_injection_is_refused() {
        let id = identity();
        let reason = |pod: serde_json::Value| decide_stored(Some(KEY), Some(pod), &id);
        let raw: serde_json::Value = yaml_serde::from_str(POD).unwrap();
        let refused = reason(raw.clone()).unwrap_err();
        assert_eq!(refused.reason(), "PodNotInjected");
        assert!(refused.to_string().contains("delete the pod"), "{refused}");

        // The pod's own sidecar look-alike, with a token volume for the keybroker audience.
        let mut own = injected(POD);
        own["spec"]["initContainers"][0]["image"] = "registry.example/mine:1.0".into();
        assert_eq!(reason(own).unwrap_err().reason(), "PodNotInjected");

        // A later tag or a digest of keybroker's image is keybroker's image.
        for image in [
            "registry.example/keybroker-sidecar:1.1",
            "registry.example/keybroker-sidecar@sha256:0123",
        ] {
            let mut upgraded = injected(POD);
            upgraded["spec"]["initContainers"][0]["image"] = image.into();
            assert!(reason(upgraded).is_ok(), "{image}");
        }

        let mut debugged = injected(POD);
        debugged["spec"]["ephemeralContainers"] = serde_json::json!([{
            "name": "debugger", "image": "busybox",
            "volumeMounts": [{"name": "keybroker-token", "mountPath": "/t"}],
        }]);
        let refused = reason(debugged).unwrap_err();
        assert_eq!(refused.reason(), "PodNotInjected");
        assert!(refused.to_string().contains("debugger"), "{refused}");

        let mut harmless = injected(POD);
        harmless["spec"]["ephemeralContainers"] =
            serde_json::json!([{"name": "debugger", "image": "busybox"}]);
        assert!(reason(harmless).is_ok());
    }

    #[test]
    fn a_tampered_status_cannot_widen_the_scope() {
        let tampered = format!(
            "{KEY}status:\n  sessionPolicy: '{{\"Statement\":[{{\"Effect\":\"Allow\",\"Action\":\"*\",\"Resource\":\"*\"}}]}}'\n"
        );
        let grant = decide(Some(&tampered), Some(POD), &identity()).unwrap();
        assert!(
            !grant.session_policy.contains("\"*\""),
            "{}",
            grant.session_policy
        );
    }

    #[test]
    fn session_names_fit_sts_rules() {
        let mut id = identity();
        id.pod_name = format!("{}/x y", "p".repeat(100));
        let name = role_session_name(&id);
        assert!(name.len() <= 64);
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c)),
            "{name}"
        );
        assert!(name.starts_with("team-a.ppp"));
    }
}

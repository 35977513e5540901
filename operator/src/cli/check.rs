//! `kubectl keybroker check`: whether a pod (created or not yet) would be injected and would get
//! credentials for each ApiKey it names, decided by the webhook's and the broker's own pure
//! logic ([`inject::decide`], [`authz::authorize`]) over the objects read from the cluster.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use serde::Serialize;

use crate::broker::authz::{self, APIKEYS_ANNOTATION, INJECT_LABEL, PodIdentity};
use crate::broker::minted_under_recorded_grant;
use crate::crd::{ApiKey, KeyProvider};
use crate::webhook::inject::{self, Decision, PodView, Settings};
use crate::webhook::key_facts;

/// The uid a pod not created yet is checked under.
const UNCREATED_UID: &str = "not-created-yet";

/// What the webhook would do with the pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Injection {
    /// `Injected` (the sidecar would be added), `AlreadyInjected`, `NotOptedIn`, or the reason
    /// the webhook denies the pod.
    pub outcome: String,
    pub message: String,
}

/// What the broker would answer the pod's sidecar for one ApiKey.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyCheck {
    pub api_key: String,
    /// `Issued`, or the reason of the refusal (as in the broker's refusals and audit records).
    pub outcome: String,
    pub message: String,
}

/// The whole answer for one pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub namespace: String,
    pub pod: String,
    pub injection: Injection,
    pub api_keys: Vec<KeyCheck>,
}

impl Report {
    /// Whether the pod would run with credentials for every ApiKey it names.
    pub fn ok(&self) -> bool {
        matches!(
            self.injection.outcome.as_str(),
            "Injected" | "AlreadyInjected"
        ) && self.api_keys.iter().all(|k| k.outcome == "Issued")
    }
}

/// What the cluster holds that the decision depends on.
#[derive(Clone, Debug, Default)]
pub struct Facts {
    /// The namespace's ApiKeys, by name.
    pub keys: BTreeMap<String, ApiKey>,
    /// KeyProviders, by name.
    pub providers: BTreeMap<String, KeyProvider>,
    pub namespace_labels: BTreeMap<String, String>,
}

/// Checks `pod` in `namespace`. A pod without a uid is one not created yet: it is first
/// mutated as the webhook would, then authorized as the broker would once it runs.
pub fn check(pod: &Pod, namespace: &str, facts: &Facts, settings: &Settings) -> Report {
    let name = pod
        .metadata
        .name
        .clone()
        .or_else(|| pod.metadata.generate_name.as_ref().map(|g| format!("{g}*")))
        .unwrap_or_default();
    let report = |outcome: &str, message: String, api_keys| Report {
        namespace: namespace.to_owned(),
        pod: name.clone(),
        injection: Injection {
            outcome: outcome.to_owned(),
            message,
        },
        api_keys,
    };
    let view: PodView = match serde_json::to_value(pod).and_then(serde_json::from_value) {
        Ok(view) => view,
        Err(e) => {
            return report(
                "Unreadable",
                format!("the pod could not be read: {e}"),
                vec![],
            );
        }
    };
    if !inject::opted_in(&view) {
        return report(
            "NotOptedIn",
            format!(
                "the pod has no label {INJECT_LABEL}=true, so it gets no sidecar: add it and the annotation {APIKEYS_ANNOTATION}: <ApiKey name>"
            ),
            vec![],
        );
    }
    let already = inject::claims_injection(&view);
    // As in the webhook: a pod that carries the injection is judged by it alone.
    let names = match inject::requested_api_keys(&view, namespace) {
        Ok(names) => names,
        Err(_) if already => Vec::new(),
        Err(denial) => return report(denial.reason(), denial.to_string(), vec![]),
    };
    let known: BTreeMap<String, inject::KeyFacts> = names
        .iter()
        .filter_map(|n| {
            let key = facts.keys.get(n)?;
            let provider = facts.providers.get(&key.spec.provider_ref.name);
            Some((n.clone(), key_facts(key, provider)))
        })
        .collect();
    let mut running = pod.clone();
    let injection = match inject::decide(&view, namespace, &known, settings) {
        Decision::Deny(denial) => return report(denial.reason(), denial.to_string(), vec![]),
        Decision::Unchanged if already => Injection {
            outcome: "AlreadyInjected".into(),
            message: "the pod carries keybroker's sidecar".into(),
        },
        Decision::Unchanged => Injection {
            outcome: "NotOptedIn".into(),
            message: "the webhook would leave the pod unchanged".into(),
        },
        Decision::Inject { patch, warnings } => {
            match mutated(pod, &patch) {
                Ok(pod) => running = pod,
                Err(e) => return report("Unreadable", e, vec![]),
            }
            let mut message = "the webhook would add keybroker's sidecar".to_owned();
            for warning in warnings {
                message.push_str("; warning: ");
                message.push_str(&warning);
            }
            Injection {
                outcome: "Injected".into(),
                message,
            }
        }
    };
    if running.metadata.uid.is_none() {
        running.metadata.uid = Some(UNCREATED_UID.into());
        running.metadata.name = Some(name.clone());
    }
    let identity = PodIdentity {
        namespace: namespace.to_owned(),
        service_account: running
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
        pod_name: name.clone(),
        pod_uid: running.uid().unwrap_or_default(),
    };
    let api_keys = names
        .iter()
        .map(|n| key_check(&identity, n, &running, facts, settings))
        .collect();
    report(&injection.outcome, injection.message, api_keys)
}

fn key_check(
    identity: &PodIdentity,
    name: &str,
    pod: &Pod,
    facts: &Facts,
    settings: &Settings,
) -> KeyCheck {
    let key = facts.keys.get(name);
    let provider = key.and_then(|k| facts.providers.get(&k.spec.provider_ref.name));
    let checked = authz::authorize(
        identity,
        name,
        key,
        Some(pod),
        provider,
        &facts.namespace_labels,
        &settings.image,
    )
    .map_err(|denial| (denial.reason().to_owned(), denial.to_string()))
    .and_then(
        |grant| match key.map(|k| minted_under_recorded_grant(k, &grant)) {
            Some(Err(pending)) => Err((pending.reason().to_owned(), pending.to_string())),
            _ => Ok(grant),
        },
    );
    let (outcome, message) = match checked {
        Err(refusal) => refusal,
        Ok(grant) => (
            "Issued".to_owned(),
            format!(
                "credentials from KeyProvider {} for {}s (scope {})",
                grant.provider,
                grant.ttl.as_secs(),
                grant.scope_hash
            ),
        ),
    };
    KeyCheck {
        api_key: name.to_owned(),
        outcome,
        message,
    }
}

/// `pod` with the webhook's JSON patch applied.
fn mutated(pod: &Pod, patch: &[u8]) -> Result<Pod, String> {
    let unreadable = |e: &dyn std::fmt::Display| format!("the webhook's patch did not apply: {e}");
    let patch: json_patch::Patch = serde_json::from_slice(patch).map_err(|e| unreadable(&e))?;
    let mut value = serde_json::to_value(pod).map_err(|e| unreadable(&e))?;
    json_patch::patch(&mut value, &patch).map_err(|e| unreadable(&e))?;
    serde_json::from_value(value).map_err(|e| unreadable(&e))
}

/// The report as the table `kubectl keybroker check` prints.
pub fn render(report: &Report) -> String {
    let mut out = format!(
        "pod {}/{}: {}: {}\n",
        report.namespace, report.pod, report.injection.outcome, report.injection.message
    );
    for key in &report.api_keys {
        out.push_str(&format!(
            "  ApiKey {}: {}: {}\n",
            key.api_key, key.outcome, key.message
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    const KEY: &str = r#"
apiVersion: keybroker.dev/v1alpha1
kind: ApiKey
metadata: {name: uploader, namespace: team-a, uid: key-uid}
spec:
  providerRef: {name: s3}
  serviceAccountNames: [uploader]
  scope: {actions: ["s3:PutObject"], resources: ["arn:aws:s3:::corp-data/team-a/*"]}
  ttl: 15m
"#;
    const PROVIDER: &str = r#"
apiVersion: keybroker.dev/v1alpha1
kind: KeyProvider
metadata: {name: s3, uid: provider-uid}
spec:
  aws: {roleArn: "arn:aws:iam::000000000000:role/x", region: us-east-1}
  namespaceSelector: {}
  guardrails:
    allowedActions: ["s3:PutObject"]
    allowedResources: ["arn:aws:s3:::corp-data/{namespace}/*"]
"#;
    /// A pod not created yet: no uid, not injected.
    const POD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: app-1
  labels: {keybroker.dev/inject: "true"}
  annotations: {keybroker.dev/apikeys: uploader}
spec: {serviceAccountName: uploader, containers: [{name: app, image: app}]}
"#;

    fn ready(key: &mut ApiKey, grant: Option<String>) {
        key.status = Some(crate::crd::ApiKeyStatus {
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: "True".into(),
                reason: "Ready".into(),
                message: String::new(),
                last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
                observed_generation: None,
            }],
            grant,
            ..Default::default()
        });
    }

    fn facts(key: ApiKey) -> Facts {
        let provider: KeyProvider = yaml_serde::from_str(PROVIDER).unwrap();
        Facts {
            keys: [(key.name_any(), key)].into(),
            providers: [(provider.name_any(), provider)].into(),
            namespace_labels: BTreeMap::new(),
        }
    }

    fn run(pod: &str, key: ApiKey) -> Report {
        let pod: Pod = yaml_serde::from_str(pod).unwrap();
        check(&pod, "team-a", &facts(key), &Settings::default())
    }

    #[test]
    fn a_new_pod_is_injected_then_issued_once_the_grant_is_recorded() {
        let mut key: ApiKey = yaml_serde::from_str(KEY).unwrap();
        // The controller still holds the rights from before a change: the broker would refuse.
        ready(&mut key, Some("rights-before-the-change".into()));
        let pending = run(POD, key.clone());
        assert_eq!(pending.injection.outcome, "Injected", "{pending:?}");
        assert_eq!(pending.api_keys[0].outcome, "GrantPending", "{pending:?}");
        assert!(!pending.ok());
        // Nothing recorded yet (a new ApiKey): the broker mints, and check agrees.
        let mut new = key.clone();
        ready(&mut new, None);
        assert!(run(POD, new).ok());

        // The grant the broker would compute is the one the controller records.
        let pod: Pod = yaml_serde::from_str(POD).unwrap();
        let f = facts(key.clone());
        let view: PodView = serde_json::from_value(serde_json::to_value(&pod).unwrap()).unwrap();
        let Decision::Inject { patch, .. } = inject::decide(
            &view,
            "team-a",
            &[(
                "uploader".to_owned(),
                key_facts(&key, f.providers.get("s3")),
            )]
            .into(),
            &Settings::default(),
        ) else {
            panic!("not injected")
        };
        let mut running = mutated(&pod, &patch).unwrap();
        running.metadata.uid = Some(UNCREATED_UID.into());
        let identity = PodIdentity {
            namespace: "team-a".into(),
            service_account: "uploader".into(),
            pod_name: "app-1".into(),
            pod_uid: UNCREATED_UID.into(),
        };
        let grant = authz::authorize(
            &identity,
            "uploader",
            Some(&key),
            Some(&running),
            f.providers.get("s3"),
            &BTreeMap::new(),
            &Settings::default().image,
        )
        .unwrap();
        ready(&mut key, Some(grant.id));
        let issued = run(POD, key);
        assert!(issued.ok(), "{issued:?}");
        assert!(render(&issued).contains("ApiKey uploader: Issued"));
    }

    #[test]
    fn refusals_name_the_reason_the_webhook_or_broker_gives() {
        let mut key: ApiKey = yaml_serde::from_str(KEY).unwrap();
        ready(&mut key, None);

        let other_account = POD.replace("serviceAccountName: uploader", "serviceAccountName: web");
        let denied = run(&other_account, key.clone());
        assert_eq!(
            denied.injection.outcome, "ServiceAccountNotAllowed",
            "{denied:?}"
        );
        assert!(denied.injection.message.contains("web"), "{denied:?}");

        let not_opted_in = POD.replace("keybroker.dev/inject: \"true\"", "app: x");
        let report = run(&not_opted_in, key.clone());
        assert_eq!(report.injection.outcome, "NotOptedIn");
        assert!(report.injection.message.contains(INJECT_LABEL));

        let unknown = POD.replace("apikeys: uploader", "apikeys: nope");
        assert_eq!(
            run(&unknown, key.clone()).injection.outcome,
            "UnknownApiKey"
        );

        key.spec.revoked = true;
        let revoked = run(POD, key);
        assert_eq!(revoked.api_keys[0].outcome, "ApiKeyRevoked", "{revoked:?}");
        assert!(!revoked.ok());
    }

    /// An ApiKey and KeyProvider that give the webhook exactly `facts` (none for an ApiKey of
    /// an unknown provider).
    fn objects(name: &str, facts: &inject::KeyFacts) -> (ApiKey, Option<KeyProvider>) {
        let provider_name = format!("p-{name}");
        let kind = if let Some(gateway) = &facts.gateway {
            let mut app_env = serde_json::json!({ "name": gateway.env_name });
            if !gateway.path_suffix.is_empty() {
                app_env["pathSuffix"] = gateway.path_suffix.clone().into();
            }
            Some(serde_json::json!({ "gateway": {
                "upstream": "https://upstream.example",
                "keySecretRef": { "namespace": "platform", "name": "key" },
                "presentation": { "header": { "name": "Authorization", "prefix": "Bearer " } },
                "appEnv": app_env,
            }}))
        } else if facts.token_env.is_some() {
            Some(serde_json::json!({ "oauth2": {
                "issuer": "https://idp.example/realms/corp",
                "clientSecretRef": { "namespace": "platform", "name": "client" },
            }}))
        } else {
            facts.region.as_ref().map(|region| {
                serde_json::json!({ "aws": {
                    "roleArn": "arn:aws:iam::000000000000:role/x", "region": region,
                }})
            })
        };
        let provider = kind.map(|mut spec| {
            spec["namespaceSelector"] = serde_json::json!({});
            spec["guardrails"] =
                serde_json::json!({ "allowedActions": ["*"], "allowedResources": ["*"] });
            serde_json::from_value::<KeyProvider>(serde_json::json!({
                "apiVersion": "keybroker.dev/v1alpha1", "kind": "KeyProvider",
                "metadata": { "name": provider_name }, "spec": spec,
            }))
            .unwrap()
        });
        let mut key: ApiKey = serde_json::from_value(serde_json::json!({
            "apiVersion": "keybroker.dev/v1alpha1", "kind": "ApiKey",
            "metadata": { "name": name, "namespace": "team-a" },
            "spec": {
                "providerRef": { "name": provider_name },
                "serviceAccountNames": facts.service_account_names,
                "scope": { "actions": ["s3:PutObject"], "resources": ["*"] },
                "revoked": facts.revoked,
            },
        }))
        .unwrap();
        if facts.ready {
            ready(&mut key, None);
        }
        (key, provider)
    }

    /// `check` decides like the webhook on every case of the webhook's fixture table: the
    /// objects rebuilt from each case give the webhook the case's facts, and the injection
    /// outcome is the webhook's decision.
    #[test]
    fn check_agrees_with_the_webhook_on_every_fixture() {
        #[derive(serde::Deserialize)]
        struct Case {
            keys: BTreeMap<String, inject::KeyFacts>,
            pod: serde_json::Value,
        }
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/webhook/fixtures");
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "yaml") {
                continue;
            }
            let case: Case =
                yaml_serde::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let mut facts = Facts::default();
            for (name, expected) in &case.keys {
                let (key, provider) = objects(name, expected);
                assert_eq!(
                    key_facts(&key, provider.as_ref()),
                    *expected,
                    "{path:?}: {name}"
                );
                if let Some(provider) = provider {
                    facts.providers.insert(provider.name_any(), provider);
                }
                facts.keys.insert(name.clone(), key);
            }
            let view: PodView = serde_json::from_value(case.pod.clone()).unwrap();
            let webhook = match inject::decide(&view, "team-a", &case.keys, &Settings::default()) {
                Decision::Deny(denial) => denial.reason().to_owned(),
                Decision::Inject { .. } => "Injected".to_owned(),
                Decision::Unchanged if inject::claims_injection(&view) => {
                    "AlreadyInjected".to_owned()
                }
                Decision::Unchanged => "NotOptedIn".to_owned(),
            };
            let pod: Pod = serde_json::from_value(case.pod).unwrap();
            let report = check(&pod, "team-a", &facts, &Settings::default());
            assert_eq!(report.injection.outcome, webhook, "{path:?}: {report:?}");
            checked += 1;
        }
        assert!(checked >= 35, "fixtures went missing: {checked}");
    }
}

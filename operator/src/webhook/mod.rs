//! The webhook role: a mutating admission webhook that injects the credential sidecar into
//! opted-in pods. [`inject`] decides; this module reads the AdmissionReview, looks the named
//! ApiKeys up (watch cache, live read on a miss so a just-created ApiKey is never refused) and
//! writes the AdmissionReview answer. Every input, however malformed, gets an answer.

pub mod certs;
pub mod inject;
pub mod server;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource};
use serde_json::Value;
use tracing::{info, warn};

use crate::crd::{ApiKey, KeyProvider};
use crate::metrics::Metrics;
use crate::status::ready_condition;
use inject::{Decision, KeyFacts, Settings};

/// A live read of an ApiKey missing from the cache must answer within this; the apiserver
/// gives the whole webhook call 10 s at most.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);

/// The admission logic with its caches.
pub struct Webhook {
    client: kube::Client,
    keys: Store<ApiKey>,
    providers: Store<KeyProvider>,
    settings: Settings,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook").finish_non_exhaustive()
    }
}

impl Webhook {
    /// Starts the ApiKey and KeyProvider caches and returns once they are filled.
    pub async fn start(client: kube::Client, settings: Settings, metrics: Arc<Metrics>) -> Arc<Self> {
        let keys = cache(Api::<ApiKey>::all(client.clone()));
        let providers = cache(Api::<KeyProvider>::all(client.clone()));
        let _ = tokio::join!(keys.wait_until_ready(), providers.wait_until_ready());
        Arc::new(Self {
            client,
            keys,
            providers,
            settings,
            metrics,
        })
    }

    /// Answers one AdmissionReview body with an AdmissionReview body.
    pub async fn review(&self, body: &[u8]) -> Vec<u8> {
        let started = Instant::now();
        let (response, decision) = match serde_json::from_slice::<AdmissionReview<Pod>>(body)
            .map_err(|e| e.to_string())
            .and_then(|review| {
                let request: Result<AdmissionRequest<Pod>, _> = review.try_into();
                request.map_err(|e| e.to_string())
            })
        {
            Ok(request) => self.admit(&request).await,
            Err(e) => (malformed(body, &e), "invalid"),
        };
        self.metrics.admission(decision, started.elapsed());
        serde_json::to_vec(&response.into_review()).unwrap_or_default()
    }

    async fn admit(&self, request: &AdmissionRequest<Pod>) -> (AdmissionResponse, &'static str) {
        let response = AdmissionResponse::from(request);
        let (Some(pod), Operation::Create) = (&request.object, &request.operation) else {
            return (response, "unchanged");
        };
        if !inject::opted_in(pod) || inject::already_injected(pod) {
            return (response, "unchanged");
        }
        let namespace = request
            .namespace
            .clone()
            .or_else(|| pod.metadata.namespace.clone())
            .unwrap_or_default();
        let names = match inject::requested_api_keys(pod, &namespace) {
            Ok(names) => names,
            Err(denial) => return self.denied(response, pod, &namespace, &denial.to_string(), denial.reason()),
        };
        let mut keys = BTreeMap::new();
        for name in names {
            match self.key_facts(&namespace, &name).await {
                Ok(Some(facts)) => {
                    keys.insert(name, facts);
                }
                Ok(None) => {}
                Err(message) => return self.denied(response, pod, &namespace, &message, "LookupFailed"),
            }
        }
        match inject::decide(pod, &namespace, &keys, &self.settings) {
            Decision::Unchanged => (response, "unchanged"),
            Decision::Deny(denial) => self.denied(response, pod, &namespace, &denial.to_string(), denial.reason()),
            Decision::Inject { patch, warnings } => {
                let patch = serde_json::from_value::<json_patch::Patch>(patch)
                    .map_err(|e| e.to_string())
                    .and_then(|p| response.clone().with_patch(p).map_err(|e| e.to_string()));
                match patch {
                    Ok(mut response) => {
                        if !warnings.is_empty() {
                            response.warnings = Some(warnings);
                        }
                        (response, "injected")
                    }
                    Err(e) => self.denied(response, pod, &namespace, &format!("keybroker could not build the patch: {e}"), "Internal"),
                }
            }
        }
    }

    fn denied(
        &self,
        response: AdmissionResponse,
        pod: &Pod,
        namespace: &str,
        message: &str,
        reason: &'static str,
    ) -> (AdmissionResponse, &'static str) {
        let pod_name = pod
            .metadata
            .name
            .as_deref()
            .or(pod.metadata.generate_name.as_deref())
            .unwrap_or_default();
        info!(namespace, pod = pod_name, reason, message, "admission denied");
        (response.deny(format!("keybroker: {message}")), "denied")
    }

    /// What is known of ApiKey `name`: from the cache, else a live read (the cache may lag a
    /// just-created ApiKey by a few milliseconds). `Ok(None)`: it does not exist.
    async fn key_facts(&self, namespace: &str, name: &str) -> Result<Option<KeyFacts>, String> {
        let cached = self.keys.get(&ObjectRef::new(name).within(namespace));
        let key = match cached {
            Some(key) => Some(key),
            None => {
                let api = Api::<ApiKey>::namespaced(self.client.clone(), namespace);
                match tokio::time::timeout(LOOKUP_TIMEOUT, api.get_opt(name)).await {
                    Ok(Ok(key)) => key.map(Arc::new),
                    Ok(Err(e)) => {
                        warn!(namespace, name, error = %e, "reading an ApiKey failed");
                        return Err(format!("could not read ApiKey {name} ({e}); retry"));
                    }
                    Err(_) => return Err(format!("reading ApiKey {name} timed out; retry")),
                }
            }
        };
        Ok(key.map(|key| self.facts(&key)))
    }

    fn facts(&self, key: &ApiKey) -> KeyFacts {
        let ready = ready_condition(key.status.as_ref()).is_some_and(|c| c.status == "True");
        let region = self
            .providers
            .get(&ObjectRef::new(&key.spec.provider_ref.name))
            .map(|p| p.spec.aws.region.clone());
        KeyFacts {
            service_account_names: key.spec.service_account_names.clone(),
            ready,
            revoked: key.spec.revoked,
            region,
        }
    }
}

/// The answer to a body that is not an AdmissionReview of a Pod: a denial, with the request's
/// uid when it can be found so the apiserver shows the message.
fn malformed(body: &[u8], error: &str) -> AdmissionResponse {
    let mut response =
        AdmissionResponse::invalid(format!("keybroker: not an AdmissionReview of a Pod: {error}"));
    response.uid = request_uid(body).unwrap_or_default();
    response
}

/// The `request.uid` of a (possibly malformed or truncated) AdmissionReview body.
pub fn request_uid(body: &[u8]) -> Option<String> {
    if let Ok(value) = serde_json::from_slice::<Value>(body) {
        return value["request"]["uid"].as_str().map(str::to_owned);
    }
    // Truncated: the apiserver writes the uid first in `request`, so look for it near the start.
    let text = String::from_utf8_lossy(&body[..body.len().min(4096)]);
    let after = &text[text.find("\"uid\"")? + 5..];
    let value = after.trim_start().strip_prefix(':')?.trim_start().strip_prefix('"')?;
    let uid = &value[..value.find('"')?];
    (uid.len() <= 128 && uid.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')).then(|| uid.to_owned())
}

/// A denial review for a body too large to read (the apiserver never sends one: its own
/// request limit is 3 MiB).
pub fn too_large(limit: usize) -> Vec<u8> {
    let review: AdmissionReview<DynamicObject> = AdmissionResponse::invalid(format!(
        "keybroker: the AdmissionReview is larger than {limit} bytes"
    ))
    .into_review();
    serde_json::to_vec(&review).unwrap_or_default()
}

fn cache<K>(api: Api<K>) -> Store<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    tokio::spawn(
        watcher(api, watcher::Config::default())
            .default_backoff()
            .modify(|obj| obj.meta_mut().managed_fields = None)
            .reflect(writer)
            .for_each(|_| std::future::ready(())),
    );
    store
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_uid_is_found_in_whole_and_truncated_bodies() {
        let body = br#"{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1","request":{"uid":"0c9a8d74-9cb7-44dd","kind":{}}}"#;
        assert_eq!(request_uid(body).as_deref(), Some("0c9a8d74-9cb7-44dd"));
        let truncated = &body[..body.len() - 12];
        assert!(serde_json::from_slice::<Value>(truncated).is_err());
        assert_eq!(request_uid(truncated).as_deref(), Some("0c9a8d74-9cb7-44dd"));
        assert_eq!(request_uid(b"\xff\xfe garbage"), None);
        assert_eq!(request_uid(br#"{"request":{"uid":"a\"b"}}"#[..20].as_ref()), None);
        assert_eq!(request_uid(br#"{"uid": "x y z"#), None);
    }

    #[test]
    fn malformed_bodies_get_a_denial_with_their_uid() {
        let body = br#"{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1","request":{"uid":"abc","object":{"spec":7}}}"#;
        let response = malformed(body, "bad object");
        assert!(!response.allowed);
        assert_eq!(response.uid, "abc");
        assert!(response.result.message.contains("bad object"));
    }
}

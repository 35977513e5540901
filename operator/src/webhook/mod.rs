//! The webhook role: a mutating admission webhook that injects the credential sidecar into
//! opted-in pods. [`inject`] decides; this module reads the AdmissionReview, looks the named
//! ApiKeys up and writes the AdmissionReview answer. Every input, however malformed, gets an
//! answer, and no input costs more than a bounded amount of work:
//!
//! - the annotation is parsed in linear time and capped at [`inject::MAX_API_KEYS`] names;
//! - ApiKeys come from the watch cache; a miss (an ApiKey created a moment before its pod) gets
//!   one live read per review, bounded by [`LOOKUP_TIMEOUT`]; further misses are unknown;
//! - a body that is not an AdmissionReview is never parsed into a JSON tree: its uid is found
//!   by a pass that skips everything else unallocated.

pub mod certs;
pub mod inject;
pub mod server;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::crd::{ApiKey, KeyProvider};
use crate::metrics::Metrics;
use crate::providers::{self, Kind};
use crate::status::ready_condition;
use crate::watch_cache;
use inject::{Decision, GatewayFacts, KeyFacts, PodView, Settings};

/// A live read of an ApiKey missing from the cache must answer within this, well inside the
/// apiserver's own timeout for the whole webhook call.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

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
    pub async fn start(
        client: kube::Client,
        settings: Settings,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        // Nothing waits on changes here; admissions read whatever the caches hold.
        let changed = Arc::new(Notify::new());
        let keys = watch_cache(
            Api::<ApiKey>::all(client.clone()),
            watcher::Config::default(),
            &changed,
        );
        let providers = watch_cache(
            Api::<KeyProvider>::all(client.clone()),
            watcher::Config::default(),
            &changed,
        );
        let _ = tokio::join!(keys.wait_until_ready(), providers.wait_until_ready());
        Arc::new(Self {
            client,
            keys,
            providers,
            settings,
            metrics,
        })
    }

    /// Counts a review refused for want of a slot.
    pub fn busy(&self) {
        self.metrics
            .admissions
            .get_or_create(&crate::metrics::DecisionLabels { decision: "busy" })
            .inc();
    }

    /// Answers one AdmissionReview body with an AdmissionReview body.
    pub async fn review(&self, body: &[u8]) -> Vec<u8> {
        let started = Instant::now();
        let (answer, decision) = match serde_json::from_slice::<ReviewIn>(body) {
            Ok(ReviewIn {
                request: Some(request),
            }) => self.admit(request).await,
            Ok(ReviewIn { request: None }) => (
                Answer::deny(
                    String::new(),
                    "keybroker: the AdmissionReview has no request".into(),
                ),
                "invalid",
            ),
            Err(e) => (malformed(body, &e.to_string()), "invalid"),
        };
        self.metrics.admission(decision, started.elapsed());
        answer.into_review()
    }

    async fn admit(&self, request: RequestIn) -> (Answer, &'static str) {
        let allow = Answer::allow(request.uid.clone());
        let (Some(pod), "Pod") = (&request.object, request.kind.kind.as_str()) else {
            return (allow, "unchanged");
        };
        if !inject::opted_in(pod) {
            return (allow, "unchanged");
        }
        let namespace = request
            .namespace
            .clone()
            .or_else(|| pod.metadata.namespace.clone())
            .unwrap_or_default();
        let deny = |message: String, reason: &'static str| {
            let name = pod
                .metadata
                .name
                .as_deref()
                .or(pod.metadata.generate_name.as_deref())
                .unwrap_or_default();
            info!(namespace, pod = name, reason, message, "admission denied");
            (
                Answer::deny(request.uid.clone(), format!("keybroker: {message}")),
                "denied",
            )
        };
        match request.operation.as_str() {
            "CREATE" => {}
            // A running pod (an update of its spec, labels or annotations, or an ephemeral
            // container added) must still carry the injection whole; the broker checks the
            // same before every exchange, so this only makes the refusal visible early.
            "UPDATE" => {
                let image = &self.settings.image;
                // Only an update that breaks the injection is refused: a pod being deleted, or
                // one that was already refused before this update, stays updatable (its
                // finalizers, its labels), and the broker refuses it either way.
                let already_broken = request.old_object.as_ref().is_some_and(|old| {
                    inject::opted_in(old) && inject::verify_injected(old, image).is_err()
                });
                if pod.metadata.deletion_timestamp.is_some() || already_broken {
                    return (allow, "unchanged");
                }
                return match inject::verify_injected(pod, image) {
                    Ok(()) => (allow, "unchanged"),
                    Err(denial) => deny(denial.to_string(), denial.reason()),
                };
            }
            _ => return (allow, "unchanged"),
        }
        if inject::claims_injection(pod) {
            // Re-invocation, or a pod that only looks injected: no lookups needed.
            return match inject::decide(pod, &namespace, &BTreeMap::new(), &self.settings) {
                Decision::Deny(denial) => deny(denial.to_string(), denial.reason()),
                _ => (allow, "unchanged"),
            };
        }
        let names = match inject::requested_api_keys(pod, &namespace) {
            Ok(names) => names,
            Err(denial) => return deny(denial.to_string(), denial.reason()),
        };
        let mut keys = BTreeMap::new();
        let mut live_read_left = true;
        for name in names {
            let facts = match self.cached_key(&namespace, &name) {
                Some(key) => Some(self.facts(&key, &mut live_read_left).await),
                // One live read per review: a pod naming many unknown ApiKeys (or ApiKeys of
                // unknown providers) costs no more.
                None if live_read_left => {
                    live_read_left = false;
                    match self.live_facts(&namespace, &name).await {
                        Ok(facts) => facts,
                        Err(message) => return deny(message, "LookupFailed"),
                    }
                }
                None => None,
            };
            match facts {
                Some(facts) => {
                    keys.insert(name, facts);
                }
                // The first unknown name is the denial; the rest need no lookup.
                None => break,
            }
        }
        match inject::decide(pod, &namespace, &keys, &self.settings) {
            Decision::Unchanged => (allow, "unchanged"),
            Decision::Deny(denial) => deny(denial.to_string(), denial.reason()),
            Decision::Inject { patch, warnings } => {
                let answer = Answer {
                    patch: Some(base64::engine::general_purpose::STANDARD.encode(patch)),
                    patch_type: Some("JSONPatch"),
                    warnings,
                    ..allow
                };
                (answer, "injected")
            }
        }
    }

    /// ApiKey `name` as the watch cache knows it.
    fn cached_key(&self, namespace: &str, name: &str) -> Option<ApiKey> {
        self.keys
            .get(&ObjectRef::new(name).within(namespace))
            .map(|key| (*key).clone())
    }

    /// A live read of KeyProvider `name`; `None` when it does not exist or cannot be read now.
    async fn live_provider(&self, name: &str) -> Option<KeyProvider> {
        let api = Api::<KeyProvider>::all(self.client.clone());
        match tokio::time::timeout(LOOKUP_TIMEOUT, api.get_opt(name)).await {
            Ok(Ok(provider)) => provider,
            Ok(Err(e)) => {
                warn!(name, error = %e, "reading a KeyProvider failed");
                None
            }
            Err(_) => {
                warn!(name, "reading a KeyProvider timed out");
                None
            }
        }
    }

    /// A live read of ApiKey `name` (the cache may lag a just-created ApiKey by a few
    /// milliseconds). `Ok(None)`: it does not exist.
    async fn live_facts(&self, namespace: &str, name: &str) -> Result<Option<KeyFacts>, String> {
        let api = Api::<ApiKey>::namespaced(self.client.clone(), namespace);
        match tokio::time::timeout(LOOKUP_TIMEOUT, api.get_opt(name)).await {
            // The read of the ApiKey was this review's live read.
            Ok(Ok(Some(key))) => Ok(Some(self.facts(&key, &mut false).await)),
            Ok(Ok(None)) => Ok(None),
            Ok(Err(e)) => {
                // The apiserver's text stays in the log; the pod's owner gets what to do.
                warn!(namespace, name, error = %e, "reading an ApiKey failed");
                Err(format!(
                    "could not read ApiKey {name} from the Kubernetes API; retry, or ask the cluster's operators to check the keybroker operator's log"
                ))
            }
            Err(_) => Err(format!("reading ApiKey {name} timed out; retry")),
        }
    }

    /// What the pod's mutation needs of `key`; reads its KeyProvider live if the cache lacks it
    /// and `live_read_left` (then spent).
    async fn facts(&self, key: &ApiKey, live_read_left: &mut bool) -> KeyFacts {
        let name = &key.spec.provider_ref.name;
        let provider = match self.providers.get(&ObjectRef::new(name)) {
            Some(provider) => Some(provider),
            // The cache may lag a KeyProvider created just before the pod; without it a gateway
            // ApiKey would be injected without its app env, for good.
            None if std::mem::take(live_read_left) => self.live_provider(name).await.map(Arc::new),
            None => None,
        };
        key_facts(key, provider.as_deref())
    }
}

/// What the pod's mutation needs of `key`, given its KeyProvider if known (pure: `kubectl
/// keybroker check` decides with it too).
pub fn key_facts(key: &ApiKey, provider: Option<&KeyProvider>) -> KeyFacts {
    let ready = ready_condition(key.status.as_ref()).is_some_and(|c| c.status == "True");
    let kind = provider.and_then(|p| providers::kind(p).ok());
    let region = match kind {
        Some(Kind::Aws(aws)) => Some(aws.region.clone()),
        _ => None,
    };
    let gateway = match kind {
        Some(Kind::Gateway(gateway)) => Some(GatewayFacts {
            env_name: gateway
                .app_env
                .as_ref()
                .map(|e| e.name.clone())
                .unwrap_or_else(|| inject::default_gateway_env(&key.name_any())),
            path_suffix: gateway
                .app_env
                .as_ref()
                .and_then(|e| e.path_suffix.clone())
                .unwrap_or_default(),
        }),
        _ => None,
    };
    let token_env = match kind {
        Some(Kind::OAuth2(_)) => Some(inject::default_token_env(&key.name_any())),
        _ => None,
    };
    KeyFacts {
        service_account_names: key.spec.service_account_names.clone(),
        ready,
        revoked: key.spec.revoked,
        region,
        gateway,
        token_env,
    }
}

/// The answer to a body that is not an AdmissionReview of a Pod: a denial, with the request's
/// uid when it can be found so the apiserver shows the message.
fn malformed(body: &[u8], error: &str) -> Answer {
    // A parse error can quote the input; a few hundred characters say where it went wrong.
    let error = match error.char_indices().nth(300) {
        Some((end, _)) => format!("{}...", &error[..end]),
        None => error.to_owned(),
    };
    Answer::deny(
        request_uid(body).unwrap_or_default(),
        format!("keybroker: not an AdmissionReview of a Pod: {error}"),
    )
}

/// The `request.uid` of a (possibly malformed or truncated) AdmissionReview body. A whole body
/// is walked once with everything but the uid skipped unallocated; a truncated one is searched
/// near its start (the apiserver writes the uid first in `request`).
pub fn request_uid(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct UidOnly {
        #[serde(default)]
        request: Option<UidRequest>,
    }
    #[derive(Deserialize)]
    struct UidRequest {
        #[serde(default)]
        uid: Option<String>,
    }
    if let Ok(UidOnly { request }) = serde_json::from_slice::<UidOnly>(body) {
        return request.and_then(|r| r.uid).filter(|uid| plausible_uid(uid));
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(4096)]);
    let after = &text[text.find("\"uid\"")? + 5..];
    let value = after
        .trim_start()
        .strip_prefix(':')?
        .trim_start()
        .strip_prefix('"')?;
    let uid = &value[..value.find('"')?];
    plausible_uid(uid).then(|| uid.to_owned())
}

/// Kubernetes uids are UUIDs; anything else is not echoed back.
fn plausible_uid(uid: &str) -> bool {
    uid.len() <= 128 && uid.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// A denial review for a body too large to read (the apiserver never sends one: its own
/// request limit is 3 MiB).
pub fn too_large(limit: usize) -> Vec<u8> {
    Answer::deny(
        String::new(),
        format!("keybroker: the AdmissionReview is larger than {limit} bytes"),
    )
    .into_review()
}

/// A denial review for a body that could not be read (timeout, broken connection).
pub fn unreadable(error: &str) -> Vec<u8> {
    Answer::deny(String::new(), format!("keybroker: {error}")).into_review()
}

/// The request half of an AdmissionReview (admission.k8s.io/v1), with the pod read as a
/// [`PodView`].
#[derive(Debug, Deserialize)]
struct ReviewIn {
    request: Option<RequestIn>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RequestIn {
    uid: String,
    kind: KindIn,
    #[serde(default)]
    namespace: Option<String>,
    operation: String,
    #[serde(default)]
    object: Option<PodView>,
    #[serde(default)]
    old_object: Option<PodView>,
}

#[derive(Debug, Deserialize)]
struct KindIn {
    kind: String,
}

/// The response half of an AdmissionReview.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Answer {
    uid: String,
    allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<StatusOut>,
    /// Base64 of the RFC 6902 patch.
    #[serde(skip_serializing_if = "Option::is_none")]
    patch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    warnings: Vec<String>,
}

#[derive(Debug, Serialize)]
struct StatusOut {
    code: u16,
    message: String,
}

impl Answer {
    fn allow(uid: String) -> Self {
        Self {
            uid,
            allowed: true,
            status: None,
            patch: None,
            patch_type: None,
            warnings: Vec::new(),
        }
    }

    fn deny(uid: String, message: String) -> Self {
        Self {
            allowed: false,
            status: Some(StatusOut { code: 403, message }),
            ..Self::allow(uid)
        }
    }

    /// The whole AdmissionReview answering with this response.
    fn into_review(self) -> Vec<u8> {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct ReviewOut<'a> {
            api_version: &'static str,
            kind: &'static str,
            response: &'a Answer,
        }
        serde_json::to_vec(&ReviewOut {
            api_version: "admission.k8s.io/v1",
            kind: "AdmissionReview",
            response: &self,
        })
        .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    #[test]
    fn the_uid_is_found_in_whole_and_truncated_bodies() {
        let body = br#"{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1","request":{"uid":"0c9a8d74-9cb7-44dd","kind":{}}}"#;
        assert_eq!(request_uid(body).as_deref(), Some("0c9a8d74-9cb7-44dd"));
        let truncated = &body[..body.len() - 12];
        assert!(serde_json::from_slice::<Value>(truncated).is_err());
        assert_eq!(
            request_uid(truncated).as_deref(),
            Some("0c9a8d74-9cb7-44dd")
        );
        assert_eq!(request_uid(b"\xff\xfe garbage"), None);
        assert_eq!(
            request_uid(br#"{"request":{"uid":"a\"b"}}"#[..20].as_ref()),
            None
        );
        assert_eq!(request_uid(br#"{"uid": "x y z"#), None);
    }

    #[test]
    fn malformed_bodies_get_a_denial_with_their_uid() {
        let body = br#"{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1","request":{"uid":"abc","object":{"spec":7}}}"#;
        let answer = malformed(body, "bad object");
        assert!(!answer.allowed);
        assert_eq!(answer.uid, "abc");
        let review: Value = serde_json::from_slice(&answer.into_review()).unwrap();
        assert_eq!(review["kind"], "AdmissionReview");
        assert_eq!(review["response"]["uid"], "abc");
        assert!(
            review["response"]["status"]["message"]
                .as_str()
                .unwrap()
                .contains("bad object")
        );
    }
}

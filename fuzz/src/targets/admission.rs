//! AdmissionReview bytes → the webhook's decision and JSON patch.
//!
//! The webhook's review path is pure apart from the ApiKey lookups, so this target runs the same
//! steps with the lookups answered from the input: the envelope as `Webhook::review` reads it,
//! the pod as a [`PodView`], [`inject::requested_api_keys`] and [`inject::decide`], and
//! [`webhook::request_uid`] for bodies that do not parse. What the ApiKeys are is taken from an
//! extra top-level `keys` member (a map of name → [`KeyFacts`], which the webhook ignores as an
//! unknown field), or else derived from each name's hash, so the fuzzer reaches every branch
//! either by editing the facts or by renaming keys.
//!
//! Oracles, for every pod the apiserver could have sent (it parses as a full `Pod`):
//! an injection patch applies, the patched object is still a valid `Pod`, it carries the sidecar
//! as the first init container, and a second admission of it (reinvocation) changes nothing.

use std::collections::BTreeMap;
use std::path::Path;

use k8s_openapi::api::core::v1::Pod;
use keybroker_operator::webhook::{self, inject};
use serde::Deserialize;
use serde_json::{Value, json};

use inject::{Decision, GatewayFacts, KeyFacts, PodView, Settings};

use crate::Target;

pub const TARGET: Target = Target {
    name: "admission",
    about: "AdmissionReview bytes -> decision and JSON patch (webhook)",
    run,
    seeds,
    dictionary: &[
        "\"keybroker.dev/inject\":\"true\"",
        "\"keybroker.dev/apikeys\":",
        "\"keybroker.dev/injected\":",
        "\"keybroker.dev/skip-containers\":",
        "\"keybroker-sidecar\"",
        "\"keybroker-credentials\"",
        "\"keybroker-token\"",
        "\"/var/run/keybroker\"",
        "\"initContainers\":",
        "\"containers\":",
        "\"volumeMounts\":",
        "\"volumes\":",
        "\"env\":",
        "\"AWS_REGION\"",
        "\"AWS_ACCESS_KEY_ID\"",
        "\"hostNetwork\":true",
        "\"os\":{\"name\":\"windows\"}",
        "\"serviceAccountName\":",
        "\"securityContext\":{\"runAsUser\":1000,\"fsGroup\":2000}",
        "\"ports\":[{\"containerPort\":9911}]",
        "\"operation\":\"CREATE\"",
        "\"kind\":{\"kind\":\"Pod\"}",
        "\"uid\":",
        "\"keys\":",
        "\"serviceAccountNames\":[\"default\"]",
        "\"ready\":true",
        "\"revoked\":true",
        "\"region\":\"eu-west-1\"",
        "uploader,reader",
        "other/uploader",
    ],
    // The webhook's own body limit (above the apiserver's 3 MiB request limit) is far more than
    // any mutation needs to reach every branch; this keeps each input cheap to mutate.
    max_len: 256 * 1024,
};

/// The namespace of the seeds' requests.
const NAMESPACE: &str = "team-a";

/// The AdmissionReview envelope, as `operator::webhook` reads it (same fields and defaults).
#[derive(Debug, Deserialize)]
struct ReviewIn {
    request: Option<RequestIn>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RequestIn {
    #[allow(dead_code)]
    uid: String,
    kind: KindIn,
    #[serde(default)]
    namespace: Option<String>,
    operation: String,
    #[serde(default)]
    object: Option<PodView>,
}

#[derive(Debug, Deserialize)]
struct KindIn {
    kind: String,
}

fn settings() -> Settings {
    Settings {
        broker_ca: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
        ..Settings::default()
    }
}

fn run(body: &[u8]) {
    let request = match serde_json::from_slice::<ReviewIn>(body) {
        Ok(ReviewIn {
            request: Some(request),
        }) => request,
        Ok(ReviewIn { request: None }) => return,
        Err(_) => {
            // What the webhook does with a body it cannot read: find the uid to answer with.
            if let Some(uid) = webhook::request_uid(body) {
                assert!(!uid.contains('"'), "request_uid returned a quoted uid");
            }
            return;
        }
    };
    let (Some(pod), "CREATE", "Pod") = (
        &request.object,
        request.operation.as_str(),
        request.kind.kind.as_str(),
    ) else {
        return;
    };
    if !inject::opted_in(pod) {
        assert_eq!(
            inject::decide(pod, "ns", &BTreeMap::new(), &settings()),
            Decision::Unchanged,
            "a pod that is not opted in must pass unchanged"
        );
        return;
    }
    if inject::claims_injection(pod) {
        // Injected already (unchanged) or only pretending to be (denied): never patched again.
        assert!(
            !matches!(
                inject::decide(pod, "ns", &BTreeMap::new(), &settings()),
                Decision::Inject { .. }
            ),
            "a pod that claims to be injected was patched"
        );
        return;
    }
    let namespace = request
        .namespace
        .clone()
        .or_else(|| pod.metadata.namespace.clone())
        .unwrap_or_default();
    // The facts and the object the patch applies to. A body the webhook reads may still fail
    // as a tree (invalid UTF-8 or lone surrogates in a field the webhook skips); the apiserver
    // never sends one, so there is nothing to apply a patch to.
    let tree = serde_json::from_slice::<Value>(body).unwrap_or(Value::Null);
    let names = match inject::requested_api_keys(pod, &namespace) {
        Ok(names) => names,
        Err(denial) => {
            assert!(!denial.to_string().is_empty() && !denial.reason().is_empty());
            return;
        }
    };
    assert!(!names.is_empty(), "requested_api_keys gave no names");
    let keys = key_facts(&tree, &names, pod);
    let settings = settings();
    match inject::decide(pod, &namespace, &keys, &settings) {
        Decision::Unchanged => panic!("an opted-in pod that names ApiKeys passed unchanged"),
        Decision::Deny(denial) => {
            assert!(!denial.to_string().is_empty() && !denial.reason().is_empty());
        }
        Decision::Inject { patch, .. } => {
            check_patch(&tree["request"]["object"], &patch, &namespace, &keys);
        }
    }
}

/// What the lookups would have answered: the input's own `keys`, else facts derived from each
/// name (most exist; some are not Ready, revoked, without a region or without the pod's
/// service account).
fn key_facts(tree: &Value, names: &[String], pod: &PodView) -> BTreeMap<String, KeyFacts> {
    if let Ok(keys) = BTreeMap::<String, KeyFacts>::deserialize(&tree["keys"]) {
        return keys;
    }
    let service_account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone().or(s.service_account.clone()))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".into());
    names
        .iter()
        .filter_map(|name| {
            let h = fnv(name.as_bytes());
            (h & 7 != 0)
                .then(|| KeyFacts {
                    service_account_names: if h & 0x38 != 0 {
                        vec![service_account.clone()]
                    } else {
                        vec!["someone-else".into()]
                    },
                    ready: h & 0x40 != 0,
                    revoked: h & 0x180 == 0,
                    region: (h & 0x200 != 0).then(|| "eu-west-1".into()),
                    gateway: (h & 0x400 != 0).then(|| GatewayFacts {
                        env_name: "UPSTREAM_BASE_URL".into(),
                        path_suffix: if h & 0x800 != 0 {
                            "/v1".into()
                        } else {
                            String::new()
                        },
                    }),
                    token_env: (h & 0x1000 != 0).then(|| "UPSTREAM_TOKEN_FILE".into()),
                })
                .map(|facts| (name.clone(), facts))
        })
        .collect()
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The patch must turn any pod the apiserver could send into an injected, valid pod that a
/// second admission leaves alone.
fn check_patch(object: &Value, patch: &[u8], namespace: &str, keys: &BTreeMap<String, KeyFacts>) {
    let ops: json_patch::Patch = match serde_json::from_slice(patch) {
        Ok(ops) => ops,
        Err(e) => panic!("the webhook wrote a patch that is not RFC 6902: {e}"),
    };
    // The apiserver decodes, defaults and re-encodes the pod before admission: it is always a
    // valid Pod and always has a `spec` object (possibly without containers). Anything else
    // cannot reach the webhook, so there is nothing a patch must apply to.
    if !object["spec"].is_object() || Pod::deserialize(object).is_err() {
        return;
    }
    let mut patched = object.clone();
    if let Err(e) = json_patch::patch(&mut patched, &ops) {
        panic!("the patch does not apply to the pod it was made for: {e}");
    }
    if let Err(e) = Pod::deserialize(&patched) {
        panic!("the patched pod is not a valid Pod: {e}");
    }
    let first_init = &patched["spec"]["initContainers"][0];
    assert_eq!(
        first_init["name"],
        inject::SIDECAR_NAME,
        "the sidecar is not the first init container"
    );
    assert_eq!(
        first_init["restartPolicy"], "Always",
        "the sidecar is not a native sidecar"
    );
    let view = match PodView::deserialize(&patched) {
        Ok(view) => view,
        Err(e) => panic!("the patched pod no longer reads as a PodView: {e}"),
    };
    assert!(
        inject::claims_injection(&view),
        "the patched pod does not read as injected"
    );
    assert_eq!(
        inject::decide(&view, namespace, keys, &settings()),
        Decision::Unchanged,
        "a second admission of the patched pod changed it again"
    );
}

/// The webhook's fixture table (every case a pod and what is known of its ApiKeys), each as an
/// AdmissionReview, plus a few malformed and truncated bodies.
fn seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../operator/src/webhook/fixtures");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    paths.sort();
    for path in paths
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
    {
        let Ok(text) = std::fs::read_to_string(path) else {
            continue;
        };
        let Ok(case) = yaml_serde::from_str::<Value>(&text) else {
            continue;
        };
        seeds.push(review(&case["pod"], Some(&case["keys"])));
    }
    let minimal = json!({
        "metadata": {
            "name": "app",
            "labels": {"keybroker.dev/inject": "true"},
            "annotations": {"keybroker.dev/apikeys": "uploader, reader"}
        },
        "spec": {"containers": [{"name": "app", "image": "app:1"}]}
    });
    let whole = review(&minimal, None);
    seeds.push(whole.clone());
    seeds.push(whole[..whole.len() / 2].to_vec());
    seeds.push(br#"{"request":{"uid":"0c9a8d74","kind":{"kind":"Pod"},"operation":"CREATE","object":{"spec":7}}}"#.to_vec());
    seeds.push(br#"{"kind":"AdmissionReview"}"#.to_vec());
    seeds
}

fn review(pod: &Value, keys: Option<&Value>) -> Vec<u8> {
    let mut review = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": NAMESPACE,
            "operation": "CREATE",
            "object": pod,
        }
    });
    if let Some(keys) = keys {
        review["keys"] = keys.clone();
    }
    serde_json::to_vec(&review).unwrap_or_default()
}

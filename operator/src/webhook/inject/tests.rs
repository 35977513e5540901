//! The fixture table: every `fixtures/<case>.yaml` (ApiKeys known + a Pod) goes through
//! [`decide`]; the result must equal `fixtures/expected/<case>.yaml` (the patched pod, or the
//! denial) and, for every injected pod, the properties below must hold on the patched pod.
//! `KEYBROKER_BLESS=1 cargo test -p keybroker-operator --lib inject` rewrites the expected
//! files; review their diff.

use std::path::{Path, PathBuf};

use super::*;

const NAMESPACE: &str = "team-a";

#[derive(serde::Deserialize)]
struct Case {
    keys: BTreeMap<String, KeyFacts>,
    pod: Value,
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/webhook/fixtures")
}

/// The outcome as it is stored in `expected/`.
fn outcome(decision: &Decision, original: &Value) -> Value {
    match decision {
        Decision::Unchanged => json!({"unchanged": true}),
        Decision::Deny(denial) => {
            json!({"denied": denial.reason(), "message": denial.to_string()})
        }
        Decision::Inject { patch, warnings } => {
            let mut pod = original.clone();
            let patch: json_patch::Patch = serde_json::from_slice(patch).unwrap();
            json_patch::patch(&mut pod, &patch).unwrap();
            json!({"warnings": warnings, "pod": pod})
        }
    }
}

#[test]
fn fixture_table() {
    let bless = std::env::var_os("KEYBROKER_BLESS").is_some();
    let mut cases: Vec<PathBuf> = std::fs::read_dir(fixtures())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    cases.sort();
    assert!(cases.len() >= 35, "fixtures went missing: {cases:?}");
    let mut failures = Vec::new();
    for path in cases {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let case: Case = yaml_serde::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let pod: PodView = serde_json::from_value(case.pod.clone()).unwrap();
        let decision = decide(&pod, NAMESPACE, &case.keys, &Settings::default());
        let got = outcome(&decision, &case.pod);
        if let Decision::Inject { .. } = &decision {
            assert_injected_properly(&name, &pod, &case.pod, &got["pod"]);
        }
        let expected_path = fixtures().join("expected").join(&name);
        if bless {
            std::fs::create_dir_all(expected_path.parent().unwrap()).unwrap();
            std::fs::write(&expected_path, yaml_serde::to_string(&got).unwrap()).unwrap();
            continue;
        }
        let expected: Value = std::fs::read_to_string(&expected_path)
            .ok()
            .and_then(|s| yaml_serde::from_str(&s).ok())
            .unwrap_or(Value::Null);
        if expected != got {
            failures.push(format!(
                "{name}: got\n{}",
                yaml_serde::to_string(&got).unwrap()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "outcomes differ from fixtures/expected (KEYBROKER_BLESS=1 rewrites them):\n{}",
        failures.join("\n")
    );
}

fn by_name<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
    list.as_array()?.iter().find(|c| c["name"] == name)
}

/// What must hold for any injected pod, whatever the fixture.
fn assert_injected_properly(
    case: &str,
    original: &PodView,
    original_json: &Value,
    patched: &Value,
) {
    let spec = &patched["spec"];
    // The patched pod is a valid Pod (k8s-openapi's full schema) ...
    serde_json::from_value::<k8s_openapi::api::core::v1::Pod>(patched.clone())
        .unwrap_or_else(|e| panic!("{case}: the patched pod is not a Pod: {e}"));
    let result: PodView = serde_json::from_value(patched.clone()).unwrap();
    let before = &original_json["spec"];

    // The sidecar is the first init container, a native sidecar, hardened.
    let sidecar = &spec["initContainers"][0];
    assert_eq!(sidecar["name"], SIDECAR_NAME, "{case}");
    assert_eq!(sidecar["restartPolicy"], "Always", "{case}");
    assert_eq!(
        sidecar["startupProbe"]["httpGet"]["path"], "/startupz",
        "{case}"
    );
    let security = &sidecar["securityContext"];
    assert_eq!(security["runAsNonRoot"], true, "{case}");
    assert_eq!(security["readOnlyRootFilesystem"], true, "{case}");
    assert_eq!(security["allowPrivilegeEscalation"], false, "{case}");
    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]), "{case}");
    assert_eq!(
        security["seccompProfile"]["type"], "RuntimeDefault",
        "{case}"
    );
    assert!(
        sidecar["resources"]["requests"]["memory"].is_string(),
        "{case}"
    );

    // Everything that was there is still there, unchanged and in order.
    // Init containers keep their order after the sidecar; like app containers, they only gain
    // the credentials mount and env (checked below).
    let init_after: Vec<Value> = spec["initContainers"].as_array().unwrap()[1..].to_vec();
    let init_before: Vec<Value> = before["initContainers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        init_after.len(),
        init_before.len(),
        "{case}: init containers went missing"
    );
    let volumes = spec["volumes"].as_array().unwrap();
    let volumes_before = before["volumes"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        volumes[..volumes_before.len()],
        volumes_before[..],
        "{case}: volumes changed"
    );
    let emptydir = by_name(&spec["volumes"], CREDENTIALS_VOLUME).unwrap();
    assert_eq!(emptydir["emptyDir"]["medium"], "Memory", "{case}");
    assert!(emptydir["emptyDir"]["sizeLimit"].is_string(), "{case}");
    let token = &by_name(&spec["volumes"], TOKEN_VOLUME).unwrap()["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(token["audience"], "keybroker", "{case}");
    assert!(
        token["expirationSeconds"].as_i64().unwrap() <= 3600 * 24,
        "{case}"
    );

    let skipped = skipped_containers(original);
    let containers = spec["containers"].as_array().unwrap();
    assert_eq!(
        containers.len(),
        before["containers"].as_array().unwrap().len(),
        "{case}"
    );
    let app_before = before["containers"].as_array().unwrap();
    let (sidecars_after, regular_after): (Vec<_>, Vec<_>) = init_after
        .iter()
        .zip(&init_before)
        .partition(|(_, before)| before["restartPolicy"] == "Always");
    for (after, before) in sidecars_after {
        assert_eq!(after, before, "{case}: a native sidecar of the pod changed");
    }
    let pairs = containers.iter().zip(app_before).chain(regular_after);
    for (after, before) in pairs {
        let name = after["name"].as_str().unwrap();
        // Only volumeMounts and env grow, and only by appending.
        let strip = |c: &Value| {
            let mut c = c.clone();
            c.as_object_mut().unwrap().remove("volumeMounts");
            c.as_object_mut().unwrap().remove("env");
            c
        };
        assert_eq!(
            strip(after),
            strip(before),
            "{case}: container {name} changed"
        );
        for list in ["volumeMounts", "env"] {
            let before = before[list].as_array().cloned().unwrap_or_default();
            let after = after[list].as_array().cloned().unwrap_or_default();
            assert_eq!(
                after[..before.len()],
                before[..],
                "{case}: {name}.{list} changed"
            );
        }
        let env_names: Vec<&str> = after["env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["name"].as_str())
            .collect();
        let unique: BTreeSet<&str> = env_names.iter().copied().collect();
        assert_eq!(
            unique.len(),
            env_names.len(),
            "{case}: {name} has an env name twice"
        );
        let mount = by_name(&after["volumeMounts"], CREDENTIALS_VOLUME);
        if skipped.contains(name) {
            assert!(mount.is_none(), "{case}: skipped {name} got the mount");
            assert!(
                !unique.contains("AWS_CONTAINER_CREDENTIALS_FULL_URI")
                    || before["env"]
                        .to_string()
                        .contains("AWS_CONTAINER_CREDENTIALS_FULL_URI"),
                "{case}"
            );
        } else {
            let mount =
                mount.unwrap_or_else(|| panic!("{case}: {name} lacks the credentials mount"));
            assert_eq!(mount["mountPath"], CREDENTIALS_DIR, "{case}");
            assert_eq!(mount["readOnly"], true, "{case}");
            assert!(
                unique.contains("AWS_CONTAINER_CREDENTIALS_FULL_URI"),
                "{case}: {name}"
            );
        }
        assert!(
            by_name(&after["volumeMounts"], TOKEN_VOLUME).is_none(),
            "{case}: the token reached {name}"
        );
    }
    // No other volume carries a token for the broker.
    for volume in spec["volumes"].as_array().unwrap() {
        if volume["name"] != TOKEN_VOLUME {
            assert!(
                !volume.to_string().contains("\"audience\":\"keybroker\""),
                "{case}: volume {} holds a keybroker token",
                volume["name"]
            );
        }
    }
    // The token is the sidecar's alone.
    for init in &spec["initContainers"].as_array().unwrap()[1..] {
        assert!(
            by_name(&init["volumeMounts"], TOKEN_VOLUME).is_none(),
            "{case}"
        );
    }
    // A second admission of the result changes nothing (reinvocation, copied specs).
    let keys = BTreeMap::new();
    assert_eq!(
        decide(&result, NAMESPACE, &keys, &Settings::default()),
        Decision::Unchanged,
        "{case}"
    );
}

#[test]
fn api_key_names_are_checked() {
    assert!(is_dns_subdomain("uploader"));
    assert!(is_dns_subdomain("a.b-c.1"));
    for bad in ["", "Upper", "-x", "x-", "a..b", "a_b", &"a".repeat(254)] {
        assert!(!is_dns_subdomain(bad), "{bad:?}");
    }
}

#[test]
fn annotation_keys_escape_as_json_pointers() {
    assert_eq!(escape("keybroker.dev/injected"), "keybroker.dev~1injected");
    assert_eq!(escape("a~b"), "a~0b");
}

#[test]
fn huge_annotations_are_refused_without_quadratic_work() {
    let pod = |annotation: String| PodView {
        metadata: MetaView {
            annotations: Some(BTreeMap::from([(
                APIKEYS_ANNOTATION.to_owned(),
                annotation,
            )])),
            ..MetaView::default()
        },
        ..PodView::default()
    };
    let distinct = (0..50_000).map(|i| format!("key-{i}")).collect::<Vec<_>>();
    assert_eq!(
        requested_api_keys(&pod(distinct.join(",")), NAMESPACE),
        Err(Denial::TooManyApiKeys)
    );
    // 50,000 copies of one name are one name.
    let same = vec!["uploader"; 50_000].join(", ");
    assert_eq!(
        requested_api_keys(&pod(same), NAMESPACE),
        Ok(vec!["uploader".to_owned()])
    );
    // A denial quotes a bad name only in part.
    let long = format!("{}/x", "a".repeat(10_000));
    let Err(Denial::CrossNamespace { reference, .. }) = requested_api_keys(&pod(long), NAMESPACE)
    else {
        panic!("a reference to another namespace was not refused");
    };
    assert!(reference.len() < 100, "{}", reference.len());
}

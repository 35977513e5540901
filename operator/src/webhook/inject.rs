//! The pod mutation, as a pure function: a Pod, what the webhook knows of the ApiKeys it names,
//! and the injection settings in; a JSON patch, "already injected" or a denial out.
//!
//! The patch only adds: it never replaces or removes anything the pod already has, so existing
//! init containers, native sidecars, volumes, probes, env and securityContexts survive exactly.
//! Denial rule (SPEC §4): anything that would give a pod that can never get credentials is
//! denied with what to change (unknown ApiKey, service account not allowed, a reference to
//! another namespace, hostNetwork, Windows, a clash with what keybroker adds); anything that
//! may fix itself later (ApiKey not Ready yet, revoked) is admitted with a warning, because a
//! Deployment's pods would otherwise need a new rollout once the ApiKey becomes Ready.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, HTTPGetAction, Probe, ResourceRequirements,
    SeccompProfile, SecurityContext, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::broker::authz::{APIKEYS_ANNOTATION, INJECT_LABEL, listed_api_keys};

/// Set on injected pods (value: the sidecar image); its presence makes re-invocation a no-op.
pub const INJECTED_ANNOTATION: &str = "keybroker.dev/injected";
/// Comma-separated names of containers that get neither the credentials mount nor the env.
pub const SKIP_CONTAINERS_ANNOTATION: &str = "keybroker.dev/skip-containers";
pub const SIDECAR_NAME: &str = "keybroker-sidecar";
pub const CREDENTIALS_VOLUME: &str = "keybroker-credentials";
pub const TOKEN_VOLUME: &str = "keybroker-token";
/// Where the credentials appear, in the sidecar (read-write) and the app containers (read-only).
pub const CREDENTIALS_DIR: &str = "/var/run/keybroker";
/// Where the projected token appears, in the sidecar only.
pub const TOKEN_DIR: &str = "/var/run/secrets/keybroker";
/// The sidecar's user when the app's is unknown (the distroless "nonroot" user).
pub const SIDECAR_UID: i64 = 65532;

/// How the sidecar is injected; from the operator's flags.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub image: String,
    pub image_pull_policy: String,
    /// The broker's HTTPS URL as pods reach it.
    pub broker_url: String,
    /// PEM CA bundle the sidecar verifies the broker with.
    pub broker_ca: String,
    /// Lifetime of the projected token; the kubelet rotates it at 80 %.
    pub token_expiration_seconds: i64,
    /// `sizeLimit` of the memory-backed credentials volume.
    pub volume_size_limit: String,
    pub cpu_request: String,
    pub memory_request: String,
    pub memory_limit: String,
    /// Loopback port of the sidecar's AWS container-credentials endpoint.
    pub credentials_port: u16,
    /// Port of the sidecar's /startupz, /livez and /metrics (probed by the kubelet).
    pub health_port: u16,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            image: "ghcr.io/keybroker/keybroker-sidecar:latest".into(),
            image_pull_policy: "IfNotPresent".into(),
            broker_url: "https://keybroker-broker.keybroker-system.svc:8443".into(),
            broker_ca: String::new(),
            token_expiration_seconds: 3600,
            volume_size_limit: "1Mi".into(),
            cpu_request: "5m".into(),
            memory_request: "16Mi".into(),
            memory_limit: "32Mi".into(),
            credentials_port: 9911,
            health_port: 9912,
        }
    }
}

/// The parts of a Pod the decision reads. Admission reviews are parsed into this rather than
/// into a full `Pod`: everything else is skipped unparsed, which keeps a 50-container review
/// cheap, and the patch only ever adds, so nothing unread can be lost.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PodView {
    pub metadata: MetaView,
    pub spec: Option<SpecView>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct MetaView {
    pub name: Option<String>,
    pub generate_name: Option<String>,
    pub namespace: Option<String>,
    pub labels: Option<BTreeMap<String, String>>,
    pub annotations: Option<BTreeMap<String, String>>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SpecView {
    pub host_network: Option<bool>,
    pub os: Option<Named>,
    pub node_selector: Option<BTreeMap<String, String>>,
    pub service_account_name: Option<String>,
    /// The deprecated alias of `serviceAccountName`.
    pub service_account: Option<String>,
    pub security_context: Option<SecurityView>,
    pub volumes: Option<Vec<Named>>,
    pub init_containers: Option<Vec<ContainerView>>,
    pub containers: Vec<ContainerView>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ContainerView {
    pub name: String,
    pub env: Option<Vec<Named>>,
    pub volume_mounts: Option<Vec<MountView>>,
    pub ports: Option<Vec<PortView>>,
    pub security_context: Option<SecurityView>,
}

/// Any list entry (or object) of which only the name matters.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Named {
    pub name: String,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct MountView {
    pub name: String,
    pub mount_path: String,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PortView {
    pub container_port: i32,
}

/// The fields of a pod or container securityContext that decide file access.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SecurityView {
    pub run_as_user: Option<i64>,
    pub fs_group: Option<i64>,
}

/// What the webhook knows of one ApiKey a pod names.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyFacts {
    pub service_account_names: Vec<String>,
    pub ready: bool,
    pub revoked: bool,
    /// The region of the ApiKey's provider, for `AWS_REGION`.
    pub region: Option<String>,
}

/// The outcome of admitting one pod.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Admit with this RFC 6902 patch (JSON text of an array of operations) and these warnings.
    Inject {
        patch: Vec<u8>,
        warnings: Vec<String>,
    },
    /// Admit unchanged: the pod is not opted in, or was injected already.
    Unchanged,
    Deny(Denial),
}

/// Why a pod is refused; each message says what to change.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    #[error(
        "the pod has the label {INJECT_LABEL}=true but no ApiKeys: add the annotation {APIKEYS_ANNOTATION}: <ApiKey name>[,<name>...], or remove the label"
    )]
    NoApiKeys,
    #[error(
        "{APIKEYS_ANNOTATION} lists \"{reference}\", but a pod can only use ApiKeys of its own namespace {namespace}: create the ApiKey in {namespace} and list it by name"
    )]
    CrossNamespace {
        reference: String,
        namespace: String,
    },
    #[error(
        "{APIKEYS_ANNOTATION} lists \"{name}\", which is not a valid ApiKey name: use lowercase letters, digits, '-' and '.', at most 253 characters"
    )]
    InvalidName { name: String },
    #[error(
        "ApiKey \"{name}\" does not exist in namespace {namespace}: create it first (kubectl get apikeys -n {namespace}) or fix the {APIKEYS_ANNOTATION} annotation"
    )]
    UnknownApiKey { name: String, namespace: String },
    #[error(
        "ApiKey \"{name}\" does not allow service account \"{service_account}\" (its spec.serviceAccountNames: {allowed}): add it there, or run the pod as one of those"
    )]
    ServiceAccountNotAllowed {
        name: String,
        service_account: String,
        allowed: String,
    },
    #[error(
        "pods with hostNetwork: true cannot use keybroker: the sidecar's loopback credentials endpoint would be reachable from the whole node; remove hostNetwork or the {INJECT_LABEL} label"
    )]
    HostNetwork,
    #[error(
        "Windows pods cannot use keybroker: the sidecar is a Linux container; remove the {INJECT_LABEL} label"
    )]
    Windows,
    #[error("{0}")]
    Conflict(String),
}

impl Denial {
    /// A stable name for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoApiKeys => "NoApiKeys",
            Self::CrossNamespace { .. } => "CrossNamespace",
            Self::InvalidName { .. } => "InvalidName",
            Self::UnknownApiKey { .. } => "UnknownApiKey",
            Self::ServiceAccountNotAllowed { .. } => "ServiceAccountNotAllowed",
            Self::HostNetwork => "HostNetwork",
            Self::Windows => "Windows",
            Self::Conflict(_) => "Conflict",
        }
    }
}

/// True when the pod carries the opt-in label.
pub fn opted_in(pod: &PodView) -> bool {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(INJECT_LABEL))
        .is_some_and(|v| v == "true")
}

/// True when keybroker already injected this pod (its annotation, or its sidecar by name).
pub fn already_injected(pod: &PodView) -> bool {
    let annotated = pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(INJECTED_ANNOTATION));
    let has_sidecar = pod.spec.as_ref().is_some_and(|s| {
        s.init_containers
            .iter()
            .flatten()
            .any(|c| c.name == SIDECAR_NAME)
    });
    annotated || has_sidecar
}

/// The ApiKeys the pod asks for, in order, without duplicates; a denial when the annotation is
/// missing, names another namespace or is not a name.
pub fn requested_api_keys(pod: &PodView, namespace: &str) -> Result<Vec<String>, Denial> {
    let annotation = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(APIKEYS_ANNOTATION))
        .map(String::as_str)
        .unwrap_or_default();
    let mut names: Vec<String> = Vec::new();
    for name in listed_api_keys(annotation) {
        if name.contains('/') {
            return Err(Denial::CrossNamespace {
                reference: name.to_owned(),
                namespace: namespace.to_owned(),
            });
        }
        if !is_dns_subdomain(name) {
            return Err(Denial::InvalidName {
                name: name.to_owned(),
            });
        }
        if !names.iter().any(|n| n == name) {
            names.push(name.to_owned());
        }
    }
    if names.is_empty() {
        return Err(Denial::NoApiKeys);
    }
    Ok(names)
}

/// Decides the admission of `pod` in `namespace`. `keys` holds what is known of each ApiKey
/// the pod names; a name missing from it does not exist.
pub fn decide(
    pod: &PodView,
    namespace: &str,
    keys: &BTreeMap<String, KeyFacts>,
    settings: &Settings,
) -> Decision {
    if !opted_in(pod) || already_injected(pod) {
        return Decision::Unchanged;
    }
    match plan(pod, namespace, keys, settings) {
        Ok((patch, warnings)) => Decision::Inject { patch, warnings },
        Err(denial) => Decision::Deny(denial),
    }
}

fn plan(
    pod: &PodView,
    namespace: &str,
    keys: &BTreeMap<String, KeyFacts>,
    settings: &Settings,
) -> Result<(Vec<u8>, Vec<String>), Denial> {
    let empty = SpecView::default();
    let spec = pod.spec.as_ref().unwrap_or(&empty);
    if spec.host_network == Some(true) {
        return Err(Denial::HostNetwork);
    }
    if is_windows(spec) {
        return Err(Denial::Windows);
    }
    let names = requested_api_keys(pod, namespace)?;
    let service_account = spec
        .service_account_name
        .as_deref()
        .or(spec.service_account.as_deref())
        .filter(|s| !s.is_empty())
        .unwrap_or("default");
    let mut warnings = Vec::new();
    for name in &names {
        let facts = keys.get(name).ok_or_else(|| Denial::UnknownApiKey {
            name: name.clone(),
            namespace: namespace.to_owned(),
        })?;
        if !facts
            .service_account_names
            .iter()
            .any(|s| s == service_account)
        {
            return Err(Denial::ServiceAccountNotAllowed {
                name: name.clone(),
                service_account: service_account.to_owned(),
                allowed: facts.service_account_names.join(", "),
            });
        }
        if facts.revoked {
            warnings.push(format!(
                "ApiKey {name} is revoked (spec.revoked: true): this pod will not start until it is un-revoked"
            ));
        } else if !facts.ready {
            warnings.push(format!(
                "ApiKey {name} is not Ready: this pod waits for credentials until it is; see kubectl describe apikey {name} -n {namespace}"
            ));
        }
    }
    check_conflicts(spec, settings)?;

    let skipped = skipped_containers(pod);
    let access = file_access(pod, spec, &skipped);
    warnings.extend(access.warning.clone());

    let mut patch = PatchWriter::default();
    match &pod.metadata.annotations {
        None => patch.add(
            "/metadata/annotations",
            &BTreeMap::from([(INJECTED_ANNOTATION, &settings.image)]),
        ),
        Some(_) => patch.add(
            &format!("/metadata/annotations/{}", escape(INJECTED_ANNOTATION)),
            &settings.image,
        ),
    }
    let volumes = volumes(settings);
    match &spec.volumes {
        None => patch.add("/spec/volumes", &volumes),
        Some(_) => volumes.iter().for_each(|v| patch.add("/spec/volumes/-", v)),
    }
    let sidecar = sidecar(&names, &access, settings);
    match &spec.init_containers {
        // First, so regular init containers (and everything after them) start with credentials.
        None => patch.add("/spec/initContainers", &[&sidecar]),
        Some(_) => patch.add("/spec/initContainers/0", &sidecar),
    }
    // Built once, written into every container's ops (a 50-container pod stays cheap).
    let mount = to_json(&VolumeMount {
        name: CREDENTIALS_VOLUME.into(),
        mount_path: CREDENTIALS_DIR.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    });
    let region = keys.get(&names[0]).and_then(|k| k.region.as_deref());
    let env: Vec<(&str, Value)> = app_env(&names[0], region, settings)
        .into_iter()
        .map(|(name, value)| (name, json!({"name": name, "value": value})))
        .collect();
    let mut path = String::new();
    for (index, container) in spec.containers.iter().enumerate() {
        if skipped.contains(container.name.as_str()) {
            continue;
        }
        let at = |path: &mut String, rest: &str| {
            path.clear();
            path.push_str("/spec/containers/");
            path.push_str(&index.to_string());
            path.push_str(rest);
        };
        match &container.volume_mounts {
            None => {
                at(&mut path, "/volumeMounts");
                patch.add(&path, &[&mount]);
            }
            Some(_) => {
                at(&mut path, "/volumeMounts/-");
                patch.add(&path, &mount);
            }
        }
        // A region the user chose (under either name) is kept whole, never half-overridden.
        let user_region =
            sets_env(container, "AWS_REGION") || sets_env(container, "AWS_DEFAULT_REGION");
        let missing: Vec<&Value> = env
            .iter()
            .filter(|(name, _)| !sets_env(container, name))
            .filter(|(name, _)| !(user_region && name.ends_with("REGION")))
            .map(|(_, value)| value)
            .collect();
        match (&container.env, missing.is_empty()) {
            (_, true) => {}
            (None, false) => {
                at(&mut path, "/env");
                patch.add(&path, &missing);
            }
            (Some(_), false) => {
                at(&mut path, "/env/-");
                missing.iter().for_each(|value| patch.add(&path, value));
            }
        }
        if sets_env(container, "AWS_ACCESS_KEY_ID") {
            warnings.push(format!(
                "container {} sets AWS_ACCESS_KEY_ID, which AWS SDKs prefer over keybroker's credentials; remove it",
                container.name
            ));
        }
    }
    if spec
        .containers
        .iter()
        .all(|c| skipped.contains(c.name.as_str()))
    {
        warnings.push(format!(
            "{SKIP_CONTAINERS_ANNOTATION} skips every container: only the sidecar sees the credentials"
        ));
    }
    Ok((patch.finish(), warnings))
}

/// Writes RFC 6902 `add` operations straight into JSON text, without building a tree first.
#[derive(Default)]
struct PatchWriter {
    out: Vec<u8>,
}

#[derive(serde::Serialize)]
struct AddOp<'a, T: serde::Serialize + ?Sized> {
    op: &'static str,
    path: &'a str,
    value: &'a T,
}

impl PatchWriter {
    fn add<T: serde::Serialize + ?Sized>(&mut self, path: &str, value: &T) {
        self.out.push(if self.out.is_empty() { b'[' } else { b',' });
        // Writing these types (string keys only) into memory cannot fail.
        let _ = serde_json::to_writer(
            &mut self.out,
            &AddOp {
                op: "add",
                path,
                value,
            },
        );
    }

    fn finish(mut self) -> Vec<u8> {
        if self.out.is_empty() {
            self.out.push(b'[');
        }
        self.out.push(b']');
        self.out
    }
}

/// The env that points AWS SDKs at the sidecar's container-credentials endpoint for the first
/// ApiKey (SDKs refresh from it by themselves), and at the provider's region.
fn app_env(first: &str, region: Option<&str>, settings: &Settings) -> Vec<(&'static str, String)> {
    let mut env = vec![
        (
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            format!(
                "http://127.0.0.1:{}/v1/credentials/{first}",
                settings.credentials_port
            ),
        ),
        (
            "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
            format!("{CREDENTIALS_DIR}/.auth-token"),
        ),
    ];
    if let Some(region) = region {
        env.push(("AWS_REGION", region.to_owned()));
        env.push(("AWS_DEFAULT_REGION", region.to_owned()));
    }
    env
}

fn sets_env(container: &ContainerView, name: &str) -> bool {
    container.env.iter().flatten().any(|e| e.name == name)
}

/// How the credential files are made readable by the app and nobody else.
#[derive(Clone, Debug, PartialEq)]
struct FileAccess {
    /// The sidecar's user; `None` keeps [`SIDECAR_UID`].
    run_as_user: Option<i64>,
    mode: &'static str,
    warning: Option<String>,
}

/// With a pod `fsGroup` the volume is group-owned by it: mode 0440 reaches the app through the
/// group. Without one, when every app container runs as the same non-root user, the sidecar
/// runs as that user and writes 0400. Otherwise the app's identity is unknown, so the files are
/// 0444: still private to this pod (no other pod or node user can reach an emptyDir), with a
/// warning saying how to tighten it.
fn file_access(pod: &PodView, spec: &SpecView, skipped: &BTreeSet<&str>) -> FileAccess {
    let pod_context = spec.security_context.as_ref();
    if pod_context.and_then(|c| c.fs_group).is_some() {
        return FileAccess {
            run_as_user: None,
            mode: "0440",
            warning: None,
        };
    }
    let users: BTreeSet<Option<i64>> = spec
        .containers
        .iter()
        .filter(|c| !skipped.contains(c.name.as_str()))
        .map(|c| {
            c.security_context
                .as_ref()
                .and_then(|s| s.run_as_user)
                .or(pod_context.and_then(|s| s.run_as_user))
        })
        .collect();
    match users.into_iter().collect::<Vec<_>>().as_slice() {
        [Some(0)] => FileAccess {
            run_as_user: None,
            mode: "0440",
            warning: None,
        },
        [Some(uid)] => FileAccess {
            run_as_user: Some(*uid),
            mode: "0400",
            warning: None,
        },
        _ => FileAccess {
            run_as_user: None,
            mode: "0444",
            warning: Some(format!(
                "pod {}: set spec.securityContext.fsGroup (or one runAsUser for all containers) so only the app can read the credentials; until then every container of the pod can",
                pod.metadata
                    .name
                    .as_deref()
                    .or(pod.metadata.generate_name.as_deref())
                    .unwrap_or_default()
            )),
        },
    }
}

fn skipped_containers(pod: &PodView) -> BTreeSet<&str> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(SKIP_CONTAINERS_ANNOTATION))
        .map(|list| {
            list.split(',')
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

fn is_windows(spec: &SpecView) -> bool {
    let os = spec.os.as_ref().is_some_and(|os| os.name == "windows");
    let selected = spec
        .node_selector
        .as_ref()
        .and_then(|s| s.get("kubernetes.io/os"))
        .is_some_and(|os| os == "windows");
    os || selected
}

/// Refuses pods where what keybroker adds would collide with what the pod has.
fn check_conflicts(spec: &SpecView, settings: &Settings) -> Result<(), Denial> {
    for volume in spec.volumes.iter().flatten() {
        if volume.name == CREDENTIALS_VOLUME || volume.name == TOKEN_VOLUME {
            return Err(Denial::Conflict(format!(
                "the pod already has a volume named {}, a name keybroker reserves; rename it",
                volume.name
            )));
        }
    }
    let containers = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten());
    for container in containers {
        for mount in container.volume_mounts.iter().flatten() {
            let path = mount.mount_path.trim_end_matches('/');
            if path == CREDENTIALS_DIR || path.starts_with(&format!("{CREDENTIALS_DIR}/")) {
                return Err(Denial::Conflict(format!(
                    "container {} already mounts volume {} at {}, where keybroker mounts the credentials; move it, or list the container in {SKIP_CONTAINERS_ANNOTATION}",
                    container.name, mount.name, mount.mount_path
                )));
            }
        }
        for port in container.ports.iter().flatten() {
            let port = port.container_port;
            if port == i32::from(settings.credentials_port)
                || port == i32::from(settings.health_port)
            {
                return Err(Denial::Conflict(format!(
                    "container {} uses port {port}, which the keybroker sidecar needs in the pod's network namespace; use another port",
                    container.name
                )));
            }
        }
    }
    Ok(())
}

fn volumes(settings: &Settings) -> Vec<Value> {
    vec![
        json!({
            "name": CREDENTIALS_VOLUME,
            "emptyDir": {"medium": "Memory", "sizeLimit": settings.volume_size_limit},
        }),
        json!({
            "name": TOKEN_VOLUME,
            "projected": {"sources": [{"serviceAccountToken": {
                "audience": keybroker_sidecar::wire::AUDIENCE,
                "expirationSeconds": settings.token_expiration_seconds,
                "path": "token",
            }}]},
        }),
    ]
}

/// The native sidecar: an init container with `restartPolicy: Always` whose startupProbe
/// passes once the first credentials are written, so app containers start with them in place.
fn sidecar(names: &[String], access: &FileAccess, settings: &Settings) -> Container {
    let env = [
        ("KEYBROKER_BROKER_URL", settings.broker_url.clone()),
        ("KEYBROKER_BROKER_CA", settings.broker_ca.clone()),
        ("KEYBROKER_API_KEYS", names.join(",")),
        ("KEYBROKER_TOKEN_FILE", format!("{TOKEN_DIR}/token")),
        ("KEYBROKER_OUTPUT_DIR", CREDENTIALS_DIR.to_owned()),
        ("KEYBROKER_FILE_MODE", access.mode.to_owned()),
        (
            "KEYBROKER_CREDENTIALS_ADDR",
            format!("127.0.0.1:{}", settings.credentials_port),
        ),
        (
            "KEYBROKER_HEALTH_ADDR",
            format!("0.0.0.0:{}", settings.health_port),
        ),
    ];
    let probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::Int(i32::from(settings.health_port)),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(1),
        ..Probe::default()
    };
    let quantity = |q: &str| Quantity(q.to_owned());
    Container {
        name: SIDECAR_NAME.into(),
        image: Some(settings.image.clone()),
        image_pull_policy: Some(settings.image_pull_policy.clone()),
        restart_policy: Some("Always".into()),
        env: Some(
            env.into_iter()
                .map(|(name, value)| EnvVar {
                    name: name.into(),
                    value: Some(value),
                    value_from: None,
                })
                .collect(),
        ),
        ports: Some(vec![ContainerPort {
            name: Some("kb-health".into()),
            container_port: i32::from(settings.health_port),
            ..ContainerPort::default()
        }]),
        // Up to five minutes for the first credentials (a new ApiKey may still be reconciling).
        startup_probe: Some(probe("/startupz", 1, 300)),
        liveness_probe: Some(probe("/livez", 10, 3)),
        volume_mounts: Some(vec![
            VolumeMount {
                name: CREDENTIALS_VOLUME.into(),
                mount_path: CREDENTIALS_DIR.into(),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: TOKEN_VOLUME.into(),
                mount_path: TOKEN_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
        ]),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_owned(), quantity(&settings.cpu_request)),
                ("memory".to_owned(), quantity(&settings.memory_request)),
            ])),
            limits: Some(BTreeMap::from([(
                "memory".to_owned(),
                quantity(&settings.memory_limit),
            )])),
            ..ResourceRequirements::default()
        }),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(access.run_as_user.unwrap_or(SIDECAR_UID)),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    }
}

/// Escapes one JSON-pointer token (RFC 6901).
fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

fn to_json<T: serde::Serialize>(value: &T) -> Value {
    // Serializing k8s-openapi types into a Value cannot fail (string keys, no non-finite floats).
    serde_json::to_value(value).unwrap_or(Value::Null)
}

fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && label.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && label
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        })
}

#[cfg(test)]
mod tests {
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
        assert!(cases.len() >= 19, "fixtures went missing: {cases:?}");
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
        let init_after: Vec<&Value> = spec["initContainers"].as_array().unwrap()[1..]
            .iter()
            .collect();
        let init_before: Vec<&Value> = before["initContainers"]
            .as_array()
            .map(|a| a.iter().collect())
            .unwrap_or_default();
        assert_eq!(init_after, init_before, "{case}: init containers changed");
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
        for (after, before) in containers
            .iter()
            .zip(before["containers"].as_array().unwrap())
        {
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
}

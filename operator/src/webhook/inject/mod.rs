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

mod checks;
mod patch;
mod sidecar;
mod view;

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::VolumeMount;
use keybroker_contract::ports;
use serde_json::{Value, json};

use crate::broker::authz::{APIKEYS_ANNOTATION, INJECT_LABEL, listed_api_keys};
pub use checks::claims_injection;
use patch::{PatchWriter, escape, to_json};
pub use view::*;

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
    /// Loopback port where the sidecar serves gateway ApiKeys (`/<apikey>/...`).
    pub gateway_port: u16,
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
            credentials_port: ports::CREDENTIALS,
            health_port: ports::HEALTH,
            gateway_port: ports::GATEWAY,
        }
    }
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
    /// For an ApiKey of a gateway provider: the env var that points apps at the sidecar's
    /// local gateway URL, and the path after the ApiKey's prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewayFacts>,
    /// For an ApiKey of an oauth2 provider: the env var set to the path of its token file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_env: Option<String>,
}

impl KeyFacts {
    /// Whether the ApiKey is one of AWS credentials (the default while its provider is unknown).
    fn is_aws(&self) -> bool {
        self.gateway.is_none() && self.token_env.is_none()
    }
}

/// How apps find a gateway ApiKey.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayFacts {
    pub env_name: String,
    #[serde(default)]
    pub path_suffix: String,
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
        "{APIKEYS_ANNOTATION} lists more than {MAX_API_KEYS} ApiKeys: a pod may use at most {MAX_API_KEYS}; list fewer (one ApiKey may cover several resources)"
    )]
    TooManyApiKeys,
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
    #[error(
        "the pod was not injected by keybroker when it was created (the {INJECT_LABEL} label came later, or the webhook did not run): keybroker adds its sidecar only at creation; delete the pod so that its controller creates it again with the label"
    )]
    NotInjectedAtCreation,
    #[error("{0}")]
    Conflict(String),
    /// The reload annotation names no loopback URL; the message says what it must be.
    #[error("{0}")]
    InvalidReloadUrl(String),
}

impl Denial {
    /// A stable name for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoApiKeys => "NoApiKeys",
            Self::CrossNamespace { .. } => "CrossNamespace",
            Self::InvalidName { .. } => "InvalidName",
            Self::TooManyApiKeys => "TooManyApiKeys",
            Self::UnknownApiKey { .. } => "UnknownApiKey",
            Self::ServiceAccountNotAllowed { .. } => "ServiceAccountNotAllowed",
            Self::HostNetwork => "HostNetwork",
            Self::Windows => "Windows",
            Self::NotInjectedAtCreation => "NotInjectedAtCreation",
            Self::Conflict(_) => "Conflict",
            Self::InvalidReloadUrl(_) => "InvalidReloadUrl",
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

/// The most ApiKeys one pod may name. Each one is a sidecar task, a broker exchange per refresh
/// and a directory in the pod; a pod that needs more should share a wider ApiKey.
pub const MAX_API_KEYS: usize = 16;

/// The ApiKeys the pod asks for, in order, without duplicates; a denial when the annotation is
/// missing, names another namespace, is not a name, or names more than [`MAX_API_KEYS`].
/// Linear in the annotation's length, and it stops at the first name past the cap, so an
/// annotation of 50,000 names costs no more than one of 17.
pub fn requested_api_keys(pod: &PodView, namespace: &str) -> Result<Vec<String>, Denial> {
    let annotation = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(APIKEYS_ANNOTATION))
        .map(String::as_str)
        .unwrap_or_default();
    let mut names: Vec<String> = Vec::new();
    let mut seen: std::collections::HashSet<&str> = std::collections::HashSet::new();
    for name in listed_api_keys(annotation) {
        if name.contains('/') {
            return Err(Denial::CrossNamespace {
                reference: truncated(name),
                namespace: namespace.to_owned(),
            });
        }
        if !is_dns_subdomain(name) {
            return Err(Denial::InvalidName {
                name: truncated(name),
            });
        }
        if seen.insert(name) {
            if names.len() == MAX_API_KEYS {
                return Err(Denial::TooManyApiKeys);
            }
            names.push(name.to_owned());
        }
    }
    if names.is_empty() {
        return Err(Denial::NoApiKeys);
    }
    Ok(names)
}

/// A name quoted in a denial, cut so a hostile annotation cannot make the message huge.
fn truncated(name: &str) -> String {
    const MAX: usize = 64;
    match name.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}...", &name[..end]),
        None => name.to_owned(),
    }
}

/// `pod` as the apiserver stores it after this webhook: patched when injected, as it came
/// otherwise. The harness stores pods through it where no webhook is registered.
pub fn admitted(
    pod: &Value,
    namespace: &str,
    keys: &BTreeMap<String, KeyFacts>,
    settings: &Settings,
) -> Result<Value, Denial> {
    let view: PodView = serde_json::from_value(pod.clone())
        .map_err(|e| Denial::Conflict(format!("the object is not a pod: {e}")))?;
    match decide(&view, namespace, keys, settings) {
        Decision::Unchanged => Ok(pod.clone()),
        Decision::Deny(denial) => Err(denial),
        Decision::Inject { patch, .. } => {
            let mut patched = pod.clone();
            serde_json::from_slice::<json_patch::Patch>(&patch)
                .map_err(|e| e.to_string())
                .and_then(|patch| {
                    json_patch::patch(&mut patched, &patch).map_err(|e| e.to_string())
                })
                .map_err(|e| Denial::Conflict(format!("the patch does not apply: {e}")))?;
            Ok(patched)
        }
    }
}

/// Whether `pod` carries keybroker's injection whole (see [`checks::check_injected`]) with a
/// sidecar from the repository of `sidecar_image`, and none of the pod-level refusals of a
/// fresh pod apply. What a re-invocation and an UPDATE check, and what the broker checks before
/// every exchange: labels and annotations can be added after creation, images changed and
/// ephemeral containers added, all without the webhook's CREATE checks.
pub fn verify_injected(pod: &PodView, sidecar_image: &str) -> Result<(), Denial> {
    if !claims_injection(pod) {
        return Err(Denial::NotInjectedAtCreation);
    }
    let empty = SpecView::default();
    let spec = pod.spec.as_ref().unwrap_or(&empty);
    if spec.host_network == Some(true) {
        return Err(Denial::HostNetwork);
    }
    if is_windows(spec) {
        return Err(Denial::Windows);
    }
    checks::check_injected(pod, sidecar_image)
}

/// Decides the admission of `pod` in `namespace`. `keys` holds what is known of each ApiKey
/// the pod names; a name missing from it does not exist.
pub fn decide(
    pod: &PodView,
    namespace: &str,
    keys: &BTreeMap<String, KeyFacts>,
    settings: &Settings,
) -> Decision {
    if !opted_in(pod) {
        return Decision::Unchanged;
    }
    if claims_injection(pod) {
        // A re-invocation is a no-op; a pod that only looks injected is refused.
        return match verify_injected(pod, &settings.image) {
            Ok(()) => Decision::Unchanged,
            Err(denial) => Decision::Deny(denial),
        };
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
    let reload_url = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(keybroker_contract::reload::ANNOTATION));
    if let Some(url) = reload_url {
        keybroker_contract::reload::parse(url).map_err(Denial::InvalidReloadUrl)?;
    }
    let skipped = skipped_containers(pod);
    checks::check_conflicts(spec, &skipped, settings)?;

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
    let volumes = sidecar::volumes(settings);
    match &spec.volumes {
        None => patch.add("/spec/volumes", &volumes),
        Some(_) => volumes.iter().for_each(|v| patch.add("/spec/volumes/-", v)),
    }
    let has_gateway = names
        .iter()
        .any(|n| keys.get(n.as_str()).is_some_and(|k| k.gateway.is_some()));
    let sidecar = sidecar::sidecar(&names, &access, settings, has_gateway, reload_url);
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
    // AWS SDKs follow one container-credentials endpoint: the first ApiKey of an aws provider.
    let first_aws = names
        .iter()
        .find(|n| keys.get(n.as_str()).is_none_or(KeyFacts::is_aws));
    let region = first_aws
        .and_then(|n| keys.get(n.as_str()))
        .and_then(|k| k.region.as_deref());
    let env: Vec<(String, Value)> = app_env(first_aws.map(String::as_str), region, keys, settings)
        .into_iter()
        .map(|(name, value)| {
            let entry = json!({"name": name, "value": value});
            (name, entry)
        })
        .collect();
    // App containers, and regular init containers too: they run after the sidecar has
    // written the first credentials (index + 1: the sidecar was inserted before them). The
    // pod's own native sidecars are left as they are.
    let targets = spec
        .containers
        .iter()
        .enumerate()
        .map(|(index, c)| ("/spec/containers/", index, c))
        .chain(
            spec.init_containers
                .iter()
                .flatten()
                .enumerate()
                .filter(|(_, c)| is_regular_init(c))
                .map(|(index, c)| ("/spec/initContainers/", index + 1, c)),
        );
    let mut path = String::new();
    for (list, index, container) in targets {
        if skipped.contains(container.name.as_str()) {
            continue;
        }
        let at = |path: &mut String, rest: &str| {
            path.clear();
            path.push_str(list);
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
        // A region the user chose (under either name, or possibly through envFrom, which the
        // webhook cannot read) is kept whole, never half-overridden: env beats envFrom.
        let env_from = container.env_from.as_ref().is_some_and(|e| !e.is_empty());
        let user_region = sets_env(container, "AWS_REGION")
            || sets_env(container, "AWS_DEFAULT_REGION")
            || env_from;
        if env_from && region.is_some() {
            warnings.push(format!(
                "container {} takes env from envFrom, which keybroker cannot read: AWS_REGION and AWS_DEFAULT_REGION are left to it; set them there or in env if its SDK needs a region",
                container.name
            ));
        }
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

/// The env that points AWS SDKs at the sidecar's container-credentials endpoint for the first
/// aws ApiKey (SDKs refresh from it by themselves) and at its provider's region, apps at the
/// sidecar's local gateway URL of every gateway ApiKey, and at the token file of every oauth2
/// ApiKey.
fn app_env(
    first_aws: Option<&str>,
    region: Option<&str>,
    keys: &BTreeMap<String, KeyFacts>,
    settings: &Settings,
) -> Vec<(String, String)> {
    let mut env = Vec::new();
    if let Some(first) = first_aws {
        env.push((
            "AWS_CONTAINER_CREDENTIALS_FULL_URI".to_owned(),
            format!(
                "http://127.0.0.1:{}{}{first}",
                settings.credentials_port,
                keybroker_contract::paths::CREDENTIALS_PREFIX
            ),
        ));
        env.push((
            "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE".to_owned(),
            format!(
                "{CREDENTIALS_DIR}/{}",
                keybroker_contract::files::AUTH_TOKEN
            ),
        ));
        if let Some(region) = region {
            env.push(("AWS_REGION".to_owned(), region.to_owned()));
            env.push(("AWS_DEFAULT_REGION".to_owned(), region.to_owned()));
        }
    }
    for (name, facts) in keys {
        if let Some(gateway) = &facts.gateway {
            env.push((
                gateway.env_name.clone(),
                format!(
                    "http://127.0.0.1:{}/{name}{}",
                    settings.gateway_port, gateway.path_suffix
                ),
            ));
        }
        if let Some(token_env) = &facts.token_env {
            env.push((
                token_env.clone(),
                format!(
                    "{CREDENTIALS_DIR}/{name}/{}",
                    keybroker_contract::files::TOKEN
                ),
            ));
        }
    }
    env
}

/// The env name for an oauth2 ApiKey's token file: `KEYBROKER_<NAME>_TOKEN_FILE`.
pub fn default_token_env(api_key: &str) -> String {
    format!("KEYBROKER_{}_TOKEN_FILE", env_part(api_key))
}

/// The default env name for a gateway ApiKey's local URL: `KEYBROKER_<NAME>_URL`.
pub fn default_gateway_env(api_key: &str) -> String {
    format!("KEYBROKER_{}_URL", env_part(api_key))
}

/// An ApiKey name as part of an env name: upper case, `_` for anything else.
fn env_part(api_key: &str) -> String {
    api_key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// An init container that runs to completion (not a native sidecar).
fn is_regular_init(container: &ContainerView) -> bool {
    container.restart_policy.as_deref() != Some("Always")
}

fn sets_env(container: &ContainerView, name: &str) -> bool {
    container.env.iter().flatten().any(|e| e.name == name)
}

/// How the credential files are made readable by the app and nobody else.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct FileAccess {
    /// The sidecar's user; `None` keeps [`SIDECAR_UID`].
    pub(super) run_as_user: Option<i64>,
    pub(super) mode: &'static str,
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
        .chain(
            spec.init_containers
                .iter()
                .flatten()
                .filter(|c| is_regular_init(c)),
        )
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
mod tests;

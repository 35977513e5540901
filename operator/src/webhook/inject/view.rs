//! The parts of a Pod the admission decision reads, deserialized straight from the
//! AdmissionReview so the rest of a large pod is skipped unparsed.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde::de::IgnoredAny;

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
    /// Set once the pod is being deleted.
    pub deletion_timestamp: Option<IgnoredAny>,
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
    pub volumes: Option<Vec<VolumeView>>,
    pub init_containers: Option<Vec<ContainerView>>,
    pub containers: Vec<ContainerView>,
    /// Added to running pods through the `ephemeralcontainers` subresource (`kubectl debug`),
    /// so only ever seen on UPDATE and by the broker.
    pub ephemeral_containers: Option<Vec<ContainerView>>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ContainerView {
    pub name: String,
    pub image: Option<String>,
    /// `Always` on native sidecars.
    pub restart_policy: Option<String>,
    pub env: Option<Vec<Named>>,
    /// Its sources are not read (ConfigMaps and Secrets the webhook cannot see), only whether
    /// there are any.
    pub env_from: Option<Vec<IgnoredAny>>,
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
    pub read_only: Option<bool>,
}

/// A pod volume: its name, and for projected volumes the service-account tokens they carry.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct VolumeView {
    pub name: String,
    pub empty_dir: Option<IgnoredAny>,
    pub projected: Option<ProjectedView>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ProjectedView {
    pub sources: Option<Vec<ProjectionView>>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ProjectionView {
    pub service_account_token: Option<TokenProjectionView>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TokenProjectionView {
    /// Empty means the apiserver's own audience.
    pub audience: Option<String>,
}

impl VolumeView {
    /// The audiences of the service-account tokens this volume projects.
    pub fn token_audiences(&self) -> impl Iterator<Item = &str> {
        self.projected
            .iter()
            .flat_map(|p| p.sources.iter().flatten())
            .filter_map(|s| s.service_account_token.as_ref())
            .map(|t| t.audience.as_deref().unwrap_or_default())
    }
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

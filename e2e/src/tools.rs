//! Where the real component binaries are. `e2e/tools/build.sh` builds and caches them; this
//! module asks the same script for their paths, so the cache layout is defined in one place.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot run {script}: {source}")]
    Run {
        script: PathBuf,
        source: std::io::Error,
    },
    #[error("the test components are not built; run `make tools` first:\n{0}")]
    Missing(String),
    #[error("{script} --locate did not name {binary}")]
    NotNamed { script: PathBuf, binary: String },
}

/// Paths of the component binaries of one pinned tool set.
#[derive(Clone, Debug)]
pub struct Tools {
    pub etcd: PathBuf,
    pub kube_apiserver: PathBuf,
    pub kube_controller_manager: PathBuf,
    pub kubectl: PathBuf,
    pub minio: PathBuf,
    pub minio_iam: PathBuf,
    pub helm: PathBuf,
}

/// Paths of what the e2e node runs (`e2e/tools/build.sh` builds them, or installs the Debian
/// packages they come from).
#[derive(Clone, Debug)]
pub struct NodeTools {
    pub kubelet: PathBuf,
    pub kube_proxy: PathBuf,
    pub kube_scheduler: PathBuf,
    pub containerd: PathBuf,
    pub containerd_shim: PathBuf,
    pub ctr: PathBuf,
    /// The directory holding the CNI plugins (bridge, host-local, loopback, portmap).
    pub cni_bin: PathBuf,
    pub coredns: PathBuf,
    pub crane: PathBuf,
    pub pause_image: PathBuf,
    pub busybox_image: PathBuf,
    pub runc: PathBuf,
}

/// Paths of the real upstream servers the gateway tests talk to.
#[derive(Clone, Debug)]
pub struct UpstreamTools {
    pub go_httpbin: PathBuf,
    pub gitea: PathBuf,
    /// Gitea's `STATIC_ROOT_PATH`: its `options/` (locales) and `templates/`, copied from the
    /// module source, since the binary is built without the `bindata` tag.
    pub gitea_static: PathBuf,
}

/// Paths of Keycloak, the OAuth2 provider tests' authorization server.
#[derive(Clone, Debug)]
pub struct KeycloakTools {
    /// The unpacked distribution, built for dev mode (`bin/kc.sh`, `lib/`).
    pub home: PathBuf,
    /// What `kc.sh` runs as `$JAVA`: java with a parent-death signal of its own.
    pub java: PathBuf,
    /// A Java runtime >= 21.
    pub java_home: PathBuf,
}

/// What `build.sh --locate` printed: every path it knows, and its complaints about the rest.
struct Located {
    script: PathBuf,
    paths: HashMap<String, PathBuf>,
    complaints: String,
}

impl Located {
    fn run() -> Result<Self, Error> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/build.sh");
        let out = Command::new("bash")
            .arg(&script)
            .arg("--locate")
            .output()
            .map_err(|source| Error::Run {
                script: script.clone(),
                source,
            })?;
        let paths = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| line.split_once('='))
            .map(|(k, v)| (k.to_owned(), PathBuf::from(v)))
            .collect();
        Ok(Self {
            script,
            paths,
            complaints: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }

    fn get(&self, binary: &str) -> Result<PathBuf, Error> {
        match self.paths.get(&format!("KEYBROKER_BIN_{binary}")) {
            Some(path) => Ok(path.clone()),
            None if !self.complaints.is_empty() => Err(Error::Missing(self.complaints.clone())),
            None => Err(Error::NotNamed {
                script: self.script.clone(),
                binary: binary.to_owned(),
            }),
        }
    }
}

impl NodeTools {
    /// Locates the node's binaries and images (without building anything).
    pub fn locate() -> Result<Self, Error> {
        let found = Located::run()?;
        let get = |binary: &str| found.get(binary);
        let bridge = get("BRIDGE")?;
        Ok(Self {
            kubelet: get("KUBELET")?,
            kube_proxy: get("KUBE_PROXY")?,
            kube_scheduler: get("KUBE_SCHEDULER")?,
            containerd: get("CONTAINERD")?,
            containerd_shim: get("CONTAINERD_SHIM_RUNC_V2")?,
            ctr: get("CTR")?,
            cni_bin: bridge.parent().map(Path::to_owned).unwrap_or_default(),
            coredns: get("COREDNS")?,
            crane: get("CRANE")?,
            pause_image: get("PAUSE_OCI_TAR")?,
            busybox_image: get("BUSYBOX_OCI_TAR")?,
            runc: get("RUNC")?,
        })
    }
}

impl Tools {
    /// Locates the cached binaries of the control plane (without building anything); the
    /// node's are located by [`NodeTools::locate`].
    pub fn locate() -> Result<Self, Error> {
        let found = Located::run()?;
        let get = |binary: &str| found.get(binary);
        Ok(Self {
            etcd: get("ETCD")?,
            kube_apiserver: get("KUBE_APISERVER")?,
            kube_controller_manager: get("KUBE_CONTROLLER_MANAGER")?,
            kubectl: get("KUBECTL")?,
            minio: get("MINIO")?,
            minio_iam: get("MINIO_IAM")?,
            helm: get("HELM")?,
        })
    }
}

impl UpstreamTools {
    /// Locates go-httpbin and Gitea (without building anything).
    pub fn locate() -> Result<Self, Error> {
        let found = Located::run()?;
        let get = |binary: &str| found.get(binary);
        Ok(Self {
            go_httpbin: get("GO_HTTPBIN")?,
            gitea: get("GITEA")?,
            gitea_static: get("GITEA_STATIC")?,
        })
    }
}

impl KeycloakTools {
    /// Locates Keycloak and its Java runtime (without building anything).
    pub fn locate() -> Result<Self, Error> {
        let found = Located::run()?;
        Ok(Self {
            home: found.get("KEYCLOAK")?,
            java: found.get("KEYCLOAK_JAVA")?,
            java_home: found.get("KEYCLOAK_JAVA_HOME")?,
        })
    }
}

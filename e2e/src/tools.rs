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

impl Tools {
    /// Locates the cached binaries (without building anything).
    pub fn locate() -> Result<Self, Error> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/build.sh");
        let out = Command::new("bash")
            .arg(&script)
            .arg("--locate")
            .output()
            .map_err(|source| Error::Run {
                script: script.clone(),
                source,
            })?;
        if !out.status.success() {
            return Err(Error::Missing(
                String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            ));
        }
        let paths: HashMap<String, PathBuf> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| line.split_once('='))
            .map(|(k, v)| (k.to_owned(), PathBuf::from(v)))
            .collect();
        let get = |binary: &str| {
            paths
                .get(&format!("KEYBROKER_BIN_{binary}"))
                .cloned()
                .ok_or_else(|| Error::NotNamed {
                    script: script.clone(),
                    binary: binary.to_owned(),
                })
        };
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

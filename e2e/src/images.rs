//! Images for the e2e node, without a registry or a container engine.
//!
//! `e2e/tools/images/build-images.sh` writes the base images (pause, busybox) as OCI archives
//! with crane; this module imports archives into the node's containerd under the names pods
//! use (with `imagePullPolicy: Never` or `IfNotPresent` nothing is ever pulled).

use std::path::Path;
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("running {ctr}: {source}")]
    Run { ctr: String, source: std::io::Error },
    #[error("importing {archive} as {name} failed ({status}): {stderr}")]
    Import {
        archive: String,
        name: String,
        status: String,
        stderr: String,
    },
}

/// Imports the OCI archive `archive` into the `k8s.io` namespace of the containerd serving on
/// `socket`, naming its index `name`.
pub fn import(ctr: &Path, socket: &Path, archive: &Path, name: &str) -> Result<(), Error> {
    let out = Command::new(ctr)
        .arg("--address")
        .arg(socket)
        .args([
            "--namespace",
            "k8s.io",
            "images",
            "import",
            "--index-name",
            name,
        ])
        .arg(archive)
        .output()
        .map_err(|source| Error::Run {
            ctr: ctr.display().to_string(),
            source,
        })?;
    if !out.status.success() {
        return Err(Error::Import {
            archive: archive.display().to_string(),
            name: name.to_owned(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

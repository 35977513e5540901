//! Running `keybroker-sidecar` the way the kubelet would, for the e2e tests and the benchmark:
//! the binary and a real AWS SDK workload (boto3 from PyPI). The broker it talks to is a
//! [`crate::server_thread::ServerThread`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, ensure};
use k8s_openapi::api::core::v1::Container;
use keybroker_operator::webhook::inject;
use tokio::sync::OnceCell;

/// The boto3 release the tests run (a pinned version keeps the cached venv reusable).
pub const BOTO3_VERSION: &str = "1.44.5";

/// The `keybroker-sidecar` binary to run: `KEYBROKER_SIDECAR_BIN` when set (e.g. the static
/// musl build), else [`crate::binaries::cargo_bin`].
pub async fn binary() -> anyhow::Result<PathBuf> {
    static BINARY: OnceCell<Result<PathBuf, String>> = OnceCell::const_new();
    BINARY
        .get_or_init(|| async {
            if let Some(bin) = std::env::var_os("KEYBROKER_SIDECAR_BIN") {
                let bin = PathBuf::from(bin);
                return match bin.exists() {
                    true => Ok(bin),
                    false => Err(format!(
                        "KEYBROKER_SIDECAR_BIN={} does not exist",
                        bin.display()
                    )),
                };
            }
            crate::binaries::cargo_bin("keybroker-sidecar", "keybroker-sidecar")
                .await
                .map_err(|e| format!("{e:#}"))
        })
        .await
        .clone()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// What the kubelet provides a pod's sidecar, on this machine: the credentials volume as a
/// directory on tmpfs (`/dev/shm`, like the memory-backed emptyDir; the run directory where
/// there is none), the token volume as a directory, and the pod's loopback ports as free ones.
/// The credentials directory is removed when dropped.
#[derive(Debug)]
pub struct HostPod {
    pub out: PathBuf,
    pub token_dir: PathBuf,
    pub credentials: SocketAddr,
    pub health: SocketAddr,
    remove_out: bool,
}

impl HostPod {
    pub fn new(run_dir: &Path, pod: &str) -> anyhow::Result<Self> {
        Self::with_ports(run_dir, pod, free_addr()?, free_addr()?)
    }

    /// [`HostPod::new`] on given loopback ports: with many pods, ports picked free one by one
    /// can be taken by someone's outgoing connection before the sidecar binds them.
    pub fn with_ports(
        run_dir: &Path,
        pod: &str,
        credentials: SocketAddr,
        health: SocketAddr,
    ) -> anyhow::Result<Self> {
        let shm = Path::new("/dev/shm");
        let base = match shm.is_dir() {
            true => shm.to_owned(),
            false => run_dir.to_owned(),
        };
        let out = base.join(format!("keybroker-{}-{pod}", std::process::id()));
        let token_dir = run_dir.join(format!("token-{pod}"));
        std::fs::create_dir_all(&out)?;
        std::fs::create_dir_all(&token_dir)?;
        Ok(Self {
            out,
            token_dir,
            credentials,
            health,
            remove_out: true,
        })
    }

    /// The token file the sidecar reads (the kubelet's projection of the token volume).
    pub fn token_file(&self) -> PathBuf {
        self.token_dir.join("token")
    }

    /// The sidecar container's environment with the pod's mount paths and loopback ports
    /// mapped to this machine's (variables set from fields are left out).
    pub fn env(&self, container: &Container) -> Vec<(String, String)> {
        let settings = inject::Settings::default();
        let credentials_port = format!("127.0.0.1:{}", self.credentials.port());
        let map = |value: &str| {
            value
                .replace(inject::TOKEN_DIR, &self.token_dir.display().to_string())
                .replace(inject::CREDENTIALS_DIR, &self.out.display().to_string())
                .replace(
                    &format!("127.0.0.1:{}", settings.credentials_port),
                    &credentials_port,
                )
                .replace(
                    &format!("0.0.0.0:{}", settings.health_port),
                    &self.health.to_string(),
                )
        };
        container
            .env
            .iter()
            .flatten()
            .filter_map(|e| Some((e.name.clone(), map(e.value.as_deref()?))))
            .collect()
    }
}

impl Drop for HostPod {
    fn drop(&mut self) {
        if self.remove_out {
            let _ = std::fs::remove_dir_all(&self.out);
        }
    }
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// A Python interpreter with boto3 installed: a venv under `~/.cache/keybroker/`, created (from
/// PyPI) on first use and reused afterwards. Built in a temporary directory and renamed into
/// place, so concurrent test processes never use a half-installed one.
pub fn python_with_boto3() -> anyhow::Result<PathBuf> {
    // Tests of one binary run in parallel threads and share the staging directory's name.
    static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _building = BUILDING.lock().unwrap_or_else(|p| p.into_inner());
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let cache = Path::new(&home).join(".cache/keybroker");
    let venv = cache.join(format!("venv-boto3-{BOTO3_VERSION}"));
    let python = venv.join("bin/python");
    let works = |python: &Path| {
        Command::new(python)
            .args(["-c", "import boto3"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if works(&python) {
        return Ok(python);
    }
    std::fs::create_dir_all(&cache)?;
    let staging = cache.join(format!(
        "venv-boto3-{BOTO3_VERSION}.tmp-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&staging);
    let run = |cmd: &mut Command, what: &str| -> anyhow::Result<()> {
        let out = cmd.output().with_context(|| format!("running {what}"))?;
        ensure!(
            out.status.success(),
            "{what} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    run(
        Command::new("python3").args(["-m", "venv"]).arg(&staging),
        "python3 -m venv",
    )?;
    run(
        Command::new(staging.join("bin/pip")).args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            &format!("boto3=={BOTO3_VERSION}"),
        ]),
        "pip install boto3",
    )?;
    // A venv's scripts name its own path, so it is renamed as a whole and used by its python
    // binary only (the interpreter finds its site-packages relative to itself).
    match std::fs::rename(&staging, &venv) {
        Ok(()) => {}
        // Another process won the race: use its venv.
        Err(_) if works(&python) => {
            let _ = std::fs::remove_dir_all(&staging);
        }
        Err(e) => return Err(e).context("moving the venv into place"),
    }
    ensure!(
        works(&python),
        "{} cannot import boto3 after installing it",
        python.display()
    );
    Ok(python)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_maps_mount_paths_and_loopback_ports() {
        let node = HostPod {
            out: "/dev/shm/kb".into(),
            token_dir: "/tmp/kb/token".into(),
            credentials: "127.0.0.1:40001".parse().unwrap(),
            health: "127.0.0.1:40002".parse().unwrap(),
            remove_out: false,
        };
        let container: Container = serde_json::from_value(serde_json::json!({
            "name": "keybroker-sidecar",
            "env": [
                {"name": "KEYBROKER_TOKEN_FILE", "value": "/var/run/secrets/keybroker/token"},
                {"name": "KEYBROKER_OUTPUT_DIR", "value": "/var/run/keybroker"},
                {"name": "KEYBROKER_CREDENTIALS_ADDR", "value": "127.0.0.1:9911"},
                {"name": "KEYBROKER_HEALTH_ADDR", "value": "0.0.0.0:9912"},
                {"name": "AWS_CONTAINER_CREDENTIALS_FULL_URI", "value": "http://127.0.0.1:9911/v1/credentials/a"},
                {"name": "FROM_FIELD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "KEPT", "value": "as is"},
            ]
        }))
        .unwrap();
        assert_eq!(
            node.env(&container),
            [
                ("KEYBROKER_TOKEN_FILE", "/tmp/kb/token/token"),
                ("KEYBROKER_OUTPUT_DIR", "/dev/shm/kb"),
                ("KEYBROKER_CREDENTIALS_ADDR", "127.0.0.1:40001"),
                ("KEYBROKER_HEALTH_ADDR", "127.0.0.1:40002"),
                (
                    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                    "http://127.0.0.1:40001/v1/credentials/a"
                ),
                ("KEPT", "as is"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
    }
}

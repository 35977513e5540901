//! Running `keybroker-sidecar` the way the kubelet would, for the e2e tests and the benchmark:
//! the binary and a real AWS SDK workload (boto3 from PyPI). The broker it talks to is a
//! [`crate::server_thread::ServerThread`].

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, ensure};
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

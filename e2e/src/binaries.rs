//! keybroker's own binaries, built by cargo for the tests and the demo.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail, ensure};

/// Builds binary `bin` of `package` for the profile and target directory of the running
/// executable and returns its path.
///
/// Why: `CARGO_BIN_EXE_*` exists only for a package's own tests, and a path like
/// `target/debug/keybroker-sidecar` alone may be missing or stale (built before the last
/// edit) — cargo's own fingerprinting makes this a no-op when it is up to date and a rebuild
/// when it is not, whatever command started the tests.
pub async fn cargo_bin(package: &str, bin: &str) -> anyhow::Result<PathBuf> {
    let (package, bin) = (package.to_owned(), bin.to_owned());
    tokio::task::spawn_blocking(move || build(&package, &bin)).await?
}

fn build(package: &str, bin: &str) -> anyhow::Result<PathBuf> {
    // <target>/<profile dir>/deps/<test binary>, or <target>/<profile dir>/<binary>.
    let exe = std::env::current_exe()?;
    let mut profile_dir = exe.parent().context("the executable has no directory")?;
    if profile_dir.file_name().is_some_and(|n| n == "deps") {
        profile_dir = profile_dir.parent().context("no profile directory")?;
    }
    let target_dir = profile_dir.parent().context("no target directory")?;
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev",
        Some(other) => other,
        None => bail!("cannot tell the profile from {}", exe.display()),
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let out = Command::new(cargo)
        .args(["build", "--locked", "--quiet", "-p", package, "--bin", bin])
        .arg("--profile")
        .arg(profile)
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(target_dir)
        .output()
        .with_context(|| format!("running cargo build -p {package}"))?;
    ensure!(
        out.status.success(),
        "cargo build -p {package} --bin {bin} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = profile_dir.join(bin);
    ensure!(path.exists(), "{} was not built", path.display());
    Ok(path)
}

//! The launcher leaves nothing behind: not when its process is killed outright (as a timed-out
//! test is), and not after `up` / `down`. Each test starts its own control plane beside any
//! other, which also proves that two runs coexist.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, ensure};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use keybroker_e2e::{eventually, process::pids_with_marker, run_dir};

const LAUNCHER: &str = env!("CARGO_BIN_EXE_keybroker-cluster");

#[tokio::test]
async fn killed_launcher_leaves_no_process_behind() -> anyhow::Result<()> {
    let dir = run_dir()?;
    let marker = dir.display().to_string();
    let mut launcher = Command::new(LAUNCHER)
        .args(["run", "--no-minio", "--dir"])
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = launcher.stdout.take().context("no stdout")?;
    let ready = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|line| line == "ready")
    });
    let ready = tokio::time::timeout(Duration::from_secs(120), ready)
        .await
        .context("launcher not ready after 120 s")??;
    ensure!(ready, "launcher exited before it was ready");
    let running = pids_with_marker(&marker);
    ensure!(
        running.len() >= 3,
        "expected etcd, kube-apiserver and kube-controller-manager, found pids {running:?}"
    );

    kill(
        Pid::from_raw(i32::try_from(launcher.id())?),
        Signal::SIGKILL,
    )?;
    launcher.wait()?;
    eventually(
        "the components to die with the launcher",
        Duration::from_secs(15),
        || async { pids_with_marker(&marker).is_empty().then_some(()) },
    )
    .await?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[tokio::test]
async fn up_then_down_leaves_nothing() -> anyhow::Result<()> {
    let dir = run_dir()?.join("cluster");
    let marker = dir.display().to_string();
    let up = Command::new(LAUNCHER)
        .args(["up", "--no-minio", "--dir"])
        .arg(&dir)
        .output()?;
    ensure!(
        up.status.success(),
        "up failed: {}",
        String::from_utf8_lossy(&up.stderr)
    );
    let summary = String::from_utf8_lossy(&up.stdout);
    let kubeconfig = dir.join("kubeconfig");
    ensure!(
        summary.contains(&format!("export KUBECONFIG={}", kubeconfig.display())),
        "summary does not say where the kubeconfig is:\n{summary}"
    );
    ensure!(
        !pids_with_marker(&marker).is_empty(),
        "nothing running after up"
    );

    // The kubeconfig `up` wrote works for a user.
    list_namespaces(&kubeconfig).await?;

    let down = Command::new(LAUNCHER)
        .args(["down", "--dir"])
        .arg(&dir)
        .output()?;
    ensure!(
        down.status.success(),
        "down failed: {}",
        String::from_utf8_lossy(&down.stderr)
    );
    ensure!(
        pids_with_marker(&marker).is_empty(),
        "processes left after down: {:?}",
        pids_with_marker(&marker)
    );
    ensure!(!dir.exists(), "{} still exists after down", dir.display());
    Ok(())
}

async fn list_namespaces(kubeconfig: &Path) -> anyhow::Result<()> {
    let config = kube::Config::from_custom_kubeconfig(
        Kubeconfig::read_from(kubeconfig)?,
        &KubeConfigOptions::default(),
    )
    .await?;
    let client = kube::Client::try_from(config)?;
    let namespaces = Api::<Namespace>::all(client)
        .list(&ListParams::default())
        .await?;
    ensure!(!namespaces.items.is_empty(), "no namespaces");
    Ok(())
}

//! keybroker's own images on the real node: the operator and sidecar images built from the
//! static musl binaries of `make release-static` and the boto3 app image, written by
//! `e2e/tools/keybroker-images.sh` and imported into the node's containerd, run as pods with
//! the user and entrypoint the images declare.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, LogParams, PostParams};
use serde_json::json;

use keybroker_e2e::{Cluster, Lifetime, Options, eventually, run_dir};

const OPERATOR_IMAGE: &str = "keybroker.local/keybroker-operator:dev";
const SIDECAR_IMAGE: &str = "keybroker.local/keybroker-sidecar:dev";
const APP_IMAGE: &str = "keybroker.local/app-boto3:1";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs the image script on `dist/`'s binaries and returns the directory of the archives.
fn build_images() -> anyhow::Result<PathBuf> {
    let root = workspace();
    let dist = root.join("dist");
    for bin in ["keybroker-operator", "keybroker-sidecar"] {
        ensure!(
            dist.join(bin).is_file(),
            "{} is missing: run 'make release-static' first",
            dist.join(bin).display()
        );
    }
    let locate = Command::new("bash")
        .arg(root.join("e2e/tools/build.sh"))
        .arg("--locate")
        .output()
        .context("running e2e/tools/build.sh --locate")?;
    let crane = String::from_utf8_lossy(&locate.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("KEYBROKER_BIN_CRANE=").map(str::to_owned))
        .context("build.sh --locate names no crane: run 'make tools'")?;
    let cache = match std::env::var_os("KEYBROKER_TOOLS_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?)
            .join(".cache/keybroker/tools"),
    };
    let started = Instant::now();
    let out = Command::new("bash")
        .arg(root.join("e2e/tools/keybroker-images.sh"))
        .arg(&cache)
        .arg(&crane)
        .arg(dist.join("keybroker-operator"))
        .arg(dist.join("keybroker-sidecar"))
        .output()
        .context("running e2e/tools/keybroker-images.sh")?;
    ensure!(
        out.status.success(),
        "keybroker-images.sh failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    eprintln!(
        "measured: images ready in {:?} ({})",
        started.elapsed(),
        dir.display()
    );
    Ok(dir)
}

fn container(name: &str, image: &str, args: &[&str]) -> serde_json::Value {
    json!({
        "name": name,
        "image": image,
        "imagePullPolicy": "Never",
        "args": args,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    })
}

// Needs the static release binaries (a 10-minute musl build on 2 cores), so it is not part of
// `make test` yet: `make images-test` builds them and runs it.
#[tokio::test]
#[ignore = "needs `make release-static`; run with `make images-test`"]
async fn operator_sidecar_and_app_images_run_on_the_node_as_their_declared_users()
-> anyhow::Result<()> {
    let images = build_images()?;
    let cluster = Cluster::start_with_node(Options {
        dir: run_dir()?,
        lifetime: Lifetime::TiedToProcess,
        with_minio: false,
    })
    .await
    .context("starting the control plane and node")?;
    let node = cluster.node().context("the cluster has no node")?;
    for (archive, name) in [
        ("operator.oci.tar", OPERATOR_IMAGE),
        ("sidecar.oci.tar", SIDECAR_IMAGE),
        ("app.oci.tar", APP_IMAGE),
    ] {
        node.import_image(&images.join(archive), name)?;
    }

    let client = cluster.client().await?;
    let pods: Api<Pod> = Api::namespaced(client, "default");
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": "images" },
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                container("operator", OPERATOR_IMAGE, &["--version"]),
                container("sidecar", SIDECAR_IMAGE, &["--version"]),
                container("app", APP_IMAGE, &["-c",
                    "import os, boto3, botocore.session; \
                     botocore.session.get_session().get_service_model('s3'); \
                     print('uid', os.getuid(), 'boto3', boto3.__version__)"]),
            ],
        },
    }))?;
    pods.create(&PostParams::default(), &pod).await?;
    let done = eventually("pod images to finish", Duration::from_secs(120), || async {
        let p = pods.get("images").await.ok()?;
        let phase = p.status.as_ref()?.phase.clone()?;
        matches!(phase.as_str(), "Succeeded" | "Failed").then_some((phase, p))
    })
    .await?;
    ensure!(
        done.0 == "Succeeded",
        "pod images is {}: {:?}",
        done.0,
        done.1.status.and_then(|s| s.container_statuses)
    );
    let logs = |c: &'static str| {
        let pods = pods.clone();
        async move {
            pods.logs(
                "images",
                &LogParams {
                    container: Some(c.into()),
                    ..LogParams::default()
                },
            )
            .await
            .with_context(|| format!("logs of {c}"))
        }
    };
    let operator = logs("operator").await?;
    ensure!(
        operator.starts_with("keybroker-operator "),
        "operator: {operator}"
    );
    let sidecar = logs("sidecar").await?;
    ensure!(
        sidecar.starts_with("keybroker-sidecar "),
        "sidecar: {sidecar}"
    );
    let app = logs("app").await?;
    ensure!(app.starts_with("uid 1000 boto3 "), "app: {app}");
    Ok(())
}

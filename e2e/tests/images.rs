//! keybroker's own images on the real node: the operator and sidecar images built from the
//! static musl binaries of `make release-static` and the boto3 app image, written by
//! `e2e/tools/keybroker-images.sh` and imported into the node's containerd, run as pods with
//! the user and entrypoint the images declare. The operator and sidecar images are held to the
//! `Dockerfile`'s stages of the same names, which the release images are built from.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, LogParams, PostParams};
use serde_json::json;

use keybroker_e2e::dockerfile::{self, Stage};
use keybroker_e2e::images::OciImage;
use keybroker_e2e::install::{APP_IMAGE, Images, OPERATOR_IMAGE, SIDECAR_IMAGE};
use keybroker_e2e::{Cluster, Lifetime, Options, eventually, run_dir};

fn container(name: &str, image: &str, args: &[&str]) -> serde_json::Value {
    json!({
        "name": name,
        "image": image,
        "imagePullPolicy": "Never",
        "args": args,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        // No runAsUser: the kubelet refuses to start an image whose own user is root.
        "securityContext": { "runAsNonRoot": true },
    })
}

fn workspace() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The `Dockerfile`'s stage `name` (operator or sidecar).
fn release_stage(name: &str) -> anyhow::Result<Stage> {
    let text = std::fs::read_to_string(workspace().join("Dockerfile"))?;
    dockerfile::stage(&text, name).with_context(|| format!("reading the Dockerfile's {name} stage"))
}

// keybroker-images.sh only imitates the release images; this keeps the two from drifting apart.
#[tokio::test]
async fn the_operator_and_sidecar_images_are_what_the_dockerfile_declares() -> anyhow::Result<()> {
    let images = tokio::task::spawn_blocking(Images::build).await??;
    let mut differences = Vec::new();
    for name in ["operator", "sidecar"] {
        let stage = release_stage(name)?;
        let binary = format!("keybroker-{name}");
        let bytes = std::fs::read(workspace().join("dist").join(&binary))?;
        let image = OciImage::read(&images.archive(&format!("{name}.oci.tar")))?;
        differences.extend(
            stage
                .differences(&image, &binary, &bytes)
                .into_iter()
                .map(|d| format!("{name}: {d}")),
        );
    }
    ensure!(
        differences.is_empty(),
        "e2e/tools/keybroker-images.sh no longer builds what the Dockerfile declares:\n  {}",
        differences.join("\n  ")
    );
    Ok(())
}

/// The uid and gid of a `USER uid:gid`.
fn ids(user: &str) -> anyhow::Result<(i64, i64)> {
    user.split_once(':')
        .and_then(|(u, g)| Some((u.parse().ok()?, g.parse().ok()?)))
        .with_context(|| format!("USER {user} is not numeric uid:gid"))
}

// Needs the static release binaries: `make e2e` builds them first (`make release-static`).
#[tokio::test]
async fn operator_sidecar_and_app_images_run_on_the_node_as_their_declared_users()
-> anyhow::Result<()> {
    let images = tokio::task::spawn_blocking(Images::build).await??;
    let cluster = Cluster::start_with_node(Options {
        dir: run_dir()?,
        lifetime: Lifetime::TiedToProcess,
        with_minio: false,
    })
    .await
    .context("starting the control plane and node")?;
    images.import(cluster.node().context("the cluster has no node")?)?;

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
                    "import os, subprocess, boto3, botocore.session; \
                     botocore.session.get_session().get_service_model('s3'); \
                     aws = subprocess.run(['aws', '--version'], capture_output=True, text=True); \
                     sh = subprocess.run(['sh', '-c', 'echo $HOME'], capture_output=True, text=True); \
                     print('uid', os.getuid(), 'boto3', boto3.__version__, 'home', sh.stdout.strip(), aws.stdout.strip() or aws.stderr.strip())"]),
            ],
        },
    }))?;
    pods.create(&PostParams::default(), &pod).await?;
    let done = eventually("pod images to finish", Duration::from_secs(120), || async {
        let p = pods.get("images").await.ok()?;
        let status = p.status.as_ref()?;
        // runAsNonRoot refusing an image: the container waits for good.
        let refused = status.container_statuses.iter().flatten().any(|c| {
            c.state
                .as_ref()
                .and_then(|s| s.waiting.as_ref())
                .and_then(|w| w.reason.as_deref())
                == Some("CreateContainerConfigError")
        });
        let phase = status.phase.clone()?;
        (refused || matches!(phase.as_str(), "Succeeded" | "Failed")).then_some((phase, p))
    })
    .await?;
    ensure!(
        done.0 == "Succeeded",
        "pod images is {}: {:?}",
        done.0,
        done.1.status.and_then(|s| s.container_statuses)
    );
    // The uid and gid the runtime started each process with (containerStatuses[].user).
    let statuses = done
        .1
        .status
        .and_then(|s| s.container_statuses)
        .unwrap_or_default();
    let ran_as = |c: &str| {
        statuses
            .iter()
            .find(|s| s.name == c)
            .and_then(|s| s.user.as_ref()?.linux.as_ref())
            .map(|l| (l.uid, l.gid))
    };
    for name in ["operator", "sidecar"] {
        let declared = ids(&release_stage(name)?.user)?;
        ensure!(
            declared.0 != 0,
            "the Dockerfile's {name} stage runs as root"
        );
        ensure!(
            ran_as(name) == Some(declared),
            "{name} ran as (uid, gid) {:?}, the Dockerfile declares {declared:?}",
            ran_as(name)
        );
    }
    ensure!(
        ran_as("app") == Some((1000, 1000)),
        "app ran as {:?}",
        ran_as("app")
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
    ensure!(
        app.starts_with("uid 1000 boto3 1.44.5 home /home aws-cli/1."),
        "app: {app}"
    );
    Ok(())
}

//! keybroker's own images on the real node: the operator and sidecar images built from the
//! static musl binaries of `make release-static` and the boto3 app image, written by
//! `e2e/tools/keybroker-images.sh` and imported into the node's containerd, run as pods with
//! the user and entrypoint the images declare.

use std::time::Duration;

use anyhow::{Context, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, LogParams, PostParams};
use serde_json::json;

use keybroker_e2e::install::{APP_IMAGE, Images, OPERATOR_IMAGE, SIDECAR_IMAGE};
use keybroker_e2e::{Cluster, Lifetime, Options, eventually, run_dir};

fn container(name: &str, image: &str, args: &[&str]) -> serde_json::Value {
    json!({
        "name": name,
        "image": image,
        "imagePullPolicy": "Never",
        "args": args,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    })
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
    ensure!(
        app.starts_with("uid 1000 boto3 1.44.5 home /home aws-cli/1."),
        "app: {app}"
    );
    Ok(())
}

//! keybroker installed on the e2e node the way a platform team installs it: its images imported
//! into the node's containerd, `helm install` of `charts/keybroker` with them, both operator
//! replicas Ready through `/readyz`, the webhook's CA bundle published. MinIO is published in
//! the cluster as `minio.minio.svc:9000` (the endpoint `examples/` names): a selector-less
//! Service whose EndpointSlice names the node's address, so pods and the operator reach it by
//! name through cluster DNS and kube-proxy, as they would reach an in-cluster MinIO.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch, PatchParams};

use tokio::sync::OnceCell;

use crate::cluster::{Cluster, Options};
use crate::node::Node;
use crate::process::Lifetime;
use crate::tools::{NodeTools, Tools};
use crate::{eventually, fixtures, run_dir};

/// What the images are imported as; pods use them with `imagePullPolicy: Never`.
pub const OPERATOR_IMAGE: &str = "keybroker.local/keybroker-operator:dev";
pub const SIDECAR_IMAGE: &str = "keybroker.local/keybroker-sidecar:dev";
/// Python with boto3 and the AWS CLI (`e2e/tools/keybroker-images.sh`), user 1000.
pub const APP_IMAGE: &str = "keybroker.local/app-boto3:1";
/// The chart's release namespace and name.
pub const NAMESPACE: &str = "keybroker-system";
pub const RELEASE: &str = "keybroker";
/// MinIO inside the cluster: the endpoint the examples name (TLS, with the harness's CA).
pub const MINIO_URL: &str = "https://minio.minio.svc:9000";
/// The ConfigMap (key `ca.crt`) with MinIO's CA that apps mount for `AWS_CA_BUNDLE`.
pub const MINIO_CA_CONFIGMAP: &str = "minio-ca";
const FIELD_MANAGER: &str = "keybroker-e2e";
/// The image `examples/` name for their apps, replaced by [`APP_IMAGE`] (the AWS CLI and boto3
/// on Debian's Python): nothing can be pulled here.
pub const EXAMPLE_IMAGE: &str = "public.ecr.aws/aws-cli/aws-cli:2.27.0";

/// An `examples/` file edited for this cluster, as a platform team edits it for its own: the
/// apps' image is the local one, and the MinIO KeyProvider gets MinIO's CA as `caBundle`.
pub fn localize_example(text: &str, minio_ca: &str) -> String {
    let endpoint_line = format!("    endpoint: {MINIO_URL}\n");
    let with_ca = format!(
        "{endpoint_line}    caBundle: |\n{}",
        minio_ca
            .lines()
            .map(|l| format!("      {l}\n"))
            .collect::<String>()
    );
    text.replace(EXAMPLE_IMAGE, APP_IMAGE)
        .replace(&endpoint_line, &with_ca)
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The OCI archives of the operator, sidecar and app images.
#[derive(Clone, Debug)]
pub struct Images {
    dir: PathBuf,
}

impl Images {
    /// Writes the archives from `dist/`'s static binaries (`make release-static`) with
    /// `e2e/tools/keybroker-images.sh`, or finds them cached under the same inputs.
    pub fn build() -> anyhow::Result<Self> {
        // Tests of one binary share the script's staging; one build at a time per process
        // (the script itself locks against other processes).
        static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _building = BUILDING.lock().unwrap_or_else(|p| p.into_inner());
        let root = workspace();
        let dist = root.join("dist");
        for bin in ["keybroker-operator", "keybroker-sidecar"] {
            ensure!(
                dist.join(bin).is_file(),
                "{} is missing: run 'make release-static' first",
                dist.join(bin).display()
            );
        }
        let crane = NodeTools::locate()?.crane;
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
        Ok(Self { dir })
    }

    /// The archive `file` of the three (`operator.oci.tar`, `sidecar.oci.tar`, `app.oci.tar`).
    pub fn archive(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Imports the three images into the node's containerd.
    pub fn import(&self, node: &Node) -> anyhow::Result<()> {
        for (archive, name) in [
            ("operator.oci.tar", OPERATOR_IMAGE),
            ("sidecar.oci.tar", SIDECAR_IMAGE),
            ("app.oci.tar", APP_IMAGE),
        ] {
            node.import_image(&self.dir.join(archive), name)
                .with_context(|| format!("importing {name}"))?;
        }
        Ok(())
    }
}

/// `helm install` of the chart with the local images and `values` (`key=value`, as `--set`);
/// returns helm's output.
pub async fn helm_install(cluster: &Cluster, values: &[String]) -> anyhow::Result<String> {
    let tools = Tools::locate()?;
    let mut cmd = tokio::process::Command::new(&tools.helm);
    cmd.args(["install", RELEASE])
        .arg(workspace().join("charts/keybroker"))
        .args(["--namespace", NAMESPACE, "--create-namespace"])
        .arg(format!("--kubeconfig={}", cluster.kubeconfig.display()));
    for (key, value) in [
        ("image.operator.repository", repository(OPERATOR_IMAGE)),
        ("image.operator.tag", tag(OPERATOR_IMAGE)),
        ("image.sidecar.repository", repository(SIDECAR_IMAGE)),
        ("image.sidecar.tag", tag(SIDECAR_IMAGE)),
        // Nothing can be pulled here: the images are in the node's containerd.
        ("image.pullPolicy", "Never"),
    ] {
        cmd.arg(format!("--set={key}={value}"));
    }
    for value in values {
        cmd.arg(format!("--set={value}"));
    }
    let out = cmd
        .env("NO_PROXY", "127.0.0.1,localhost")
        .kill_on_drop(true)
        .output()
        .await
        .context("running helm install")?;
    ensure!(
        out.status.success(),
        "helm install failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn repository(image: &str) -> &str {
    image.rsplit_once(':').map_or(image, |(r, _)| r)
}

fn tag(image: &str) -> &str {
    image.rsplit_once(':').map_or("", |(_, t)| t)
}

/// Waits until the chart's Deployment has all its replicas updated and Ready (their
/// readinessProbe is `/readyz`) and the webhook configuration carries its CA bundle.
pub async fn wait_ready(client: &kube::Client, timeout: Duration) -> anyhow::Result<()> {
    let deployments = Api::<Deployment>::namespaced(client.clone(), NAMESPACE);
    eventually(
        "the operator Deployment's replicas to be Ready",
        timeout,
        || async {
            let d = deployments.get(RELEASE).await.ok()?;
            let want = d.spec.as_ref()?.replicas?;
            let status = d.status?;
            (status.observed_generation == d.metadata.generation
                && status.updated_replicas == Some(want)
                && status.ready_replicas == Some(want)
                && status.replicas == Some(want))
            .then_some(())
        },
    )
    .await?;
    let configs = Api::<MutatingWebhookConfiguration>::all(client.clone());
    eventually("the webhook's CA bundle", timeout, || async {
        let config = configs.get(RELEASE).await.ok()?;
        config
            .webhooks?
            .iter()
            .all(|w| w.client_config.ca_bundle.is_some())
            .then_some(())
    })
    .await
}

/// Publishes the cluster's MinIO as Service `minio/minio` port 9000 (see the module docs).
pub async fn publish_minio(cluster: &Cluster, client: &kube::Client) -> anyhow::Result<()> {
    let minio = cluster.minio.as_ref().context("the cluster has no MinIO")?;
    let authority = minio
        .endpoint
        .strip_prefix("https://")
        .context("MinIO's endpoint is not https:// (a cluster with a node serves TLS)")?;
    let addr: std::net::SocketAddr = authority.parse().context("MinIO's endpoint")?;
    publish_node_server(client, "minio", 9000, addr).await
}

/// Service `<name>.<name>.svc:<port>` for a server of the harness at `addr` on the node's
/// address: a selector-less Service whose EndpointSlice names `addr`, so pods and the
/// in-cluster operator reach it by name through cluster DNS and kube-proxy.
pub async fn publish_node_server(
    client: &kube::Client,
    name: &str,
    port: u16,
    addr: std::net::SocketAddr,
) -> anyhow::Result<()> {
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))?;
    Api::<Namespace>::all(client.clone())
        .patch(name, &apply, &Patch::Apply(&ns))
        .await?;
    let service: Service = serde_json::from_value(serde_json::json!({
        "metadata": { "name": name, "namespace": name },
        "spec": { "ports": [{ "name": "main", "port": port, "targetPort": addr.port(), "protocol": "TCP" }] },
    }))?;
    Api::<Service>::namespaced(client.clone(), name)
        .patch(name, &apply, &Patch::Apply(&service))
        .await?;
    let slice_name = format!("{name}-node");
    let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": slice_name,
            "namespace": name,
            "labels": { "kubernetes.io/service-name": name },
        },
        "addressType": "IPv4",
        "endpoints": [{ "addresses": [addr.ip().to_string()], "conditions": { "ready": true } }],
        "ports": [{ "name": "main", "port": addr.port(), "protocol": "TCP" }],
    }))?;
    Api::<EndpointSlice>::namespaced(client.clone(), name)
        .patch(&slice_name, &apply, &Patch::Apply(&slice))
        .await?;
    Ok(())
}

/// Everything above in order: images imported, MinIO published, the chart installed with
/// `values`, both replicas Ready. Returns helm's output.
pub async fn install(
    cluster: &Cluster,
    images: &Images,
    values: &[String],
) -> anyhow::Result<String> {
    let node = cluster.node().context("the cluster has no node")?;
    images.import(node)?;
    let client = cluster.client().await?;
    publish_minio(cluster, &client).await?;
    let helm = helm_install(cluster, values).await?;
    wait_ready(&client, Duration::from_secs(120)).await?;
    Ok(helm)
}

/// The cluster shared by all tests of this test binary: control plane, MinIO and a node, with
/// keybroker installed ([`install`]). Started on first use; a failed start is reported to every
/// test.
pub async fn shared() -> anyhow::Result<&'static Cluster> {
    static CLUSTER: OnceCell<Result<Cluster, String>> = OnceCell::const_new();
    let started = CLUSTER
        .get_or_init(|| async {
            let booted = async {
                let images = tokio::task::spawn_blocking(Images::build).await??;
                let cluster = Cluster::start_with_node(Options {
                    dir: run_dir()?,
                    lifetime: Lifetime::TiedToProcess,
                    with_minio: true,
                })
                .await?;
                let begun = Instant::now();
                install(&cluster, &images, &helm_test_values()).await?;
                eprintln!(
                    "measured: images imported, helm install to both replicas Ready in {:?}",
                    begun.elapsed()
                );
                anyhow::Ok(cluster)
            };
            booted.await.map_err(|e| format!("{e:#}"))
        })
        .await;
    started
        .as_ref()
        .map_err(|e| anyhow::anyhow!("starting the cluster with keybroker installed: {e}"))
}

/// The namespace the chart's `helm test` pod runs in (the release namespace is never injected).
pub const HELM_TEST_NAMESPACE: &str = "keybroker-helm-test";

/// The chart's `helm test` set up for this cluster: a pod of the app image in
/// [`HELM_TEST_NAMESPACE`] writing to MinIO through the provider [`uploader_tenant`] makes there.
fn helm_test_values() -> Vec<String> {
    vec![
        "test.enabled=true".into(),
        format!("test.namespace={HELM_TEST_NAMESPACE}"),
        format!("test.keyProvider={HELM_TEST_NAMESPACE}-s3"),
        format!("test.image={APP_IMAGE}"),
        format!("test.s3.bucket={}", fixtures::BUCKET),
        format!("test.s3.prefix={HELM_TEST_NAMESPACE}/helm-test/"),
        format!("test.s3.endpointUrl={MINIO_URL}"),
        format!("test.caConfigMap={MINIO_CA_CONFIGMAP}"),
    ]
}

/// The object the analytics Job of `examples/` reads.
pub const EXAMPLE_SUMMARY: &str = "team-a/invoices/2026/summary.csv";

/// What `examples/` expect of the platform team before they are applied: a MinIO user for the
/// broker in Secret `broker-keys` of the release namespace, the buckets `corp-data` and
/// `photos`, and the analytics Job's [`EXAMPLE_SUMMARY`].
pub async fn prepare_examples(cluster: &Cluster, client: &kube::Client) -> anyhow::Result<()> {
    let minio = cluster.minio.as_ref().context("the examples need MinIO")?;
    let keys = minio.create_s3_user("keybroker-broker")?;
    fixtures::secret(
        client,
        NAMESPACE,
        "broker-keys",
        &keys.access_key_id,
        &keys.secret_access_key,
    )
    .await?;
    let root = minio.root_client();
    for bucket in ["corp-data", "photos"] {
        root.create_bucket()
            .bucket(bucket)
            .send()
            .await
            .with_context(|| format!("creating bucket {bucket}"))?;
    }
    root.put_object()
        .bucket("corp-data")
        .key(EXAMPLE_SUMMARY)
        .body(b"month,total\n2026-11,1234.50\n".to_vec().into())
        .send()
        .await
        .context("uploading the analytics Job's summary.csv")?;
    Ok(())
}

/// ConfigMap [`MINIO_CA_CONFIGMAP`] in `ns`: MinIO's CA, for apps (`AWS_CA_BUNDLE`).
pub async fn publish_minio_ca(
    cluster: &Cluster,
    client: &kube::Client,
    ns: &str,
) -> anyhow::Result<()> {
    let pem = cluster
        .minio
        .as_ref()
        .and_then(crate::minio::Minio::ca_pem)
        .context("MinIO has no CA (it serves TLS only with a node)")?;
    let config_map: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": { "name": MINIO_CA_CONFIGMAP, "namespace": ns },
        "data": { "ca.crt": pem },
    }))?;
    Api::<ConfigMap>::namespaced(client.clone(), ns)
        .patch(
            MINIO_CA_CONFIGMAP,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&config_map),
        )
        .await?;
    Ok(())
}

/// A tenant whose provider reaches MinIO by its in-cluster name (trusting its CA) and whose
/// broker keys are in the release namespace (the only one the chart's operator reads Secrets
/// in), with ApiKey `uploader` (PutObject under `corp-data/<ns>/reports/*`), service account
/// `uploader`, and MinIO's CA for apps in ConfigMap [`MINIO_CA_CONFIGMAP`].
pub async fn uploader_tenant(
    cluster: &Cluster,
    client: &kube::Client,
    ns: &str,
) -> anyhow::Result<()> {
    publish_minio_ca(cluster, client, ns).await?;
    let provider = fixtures::tenant_with(
        cluster,
        client,
        ns,
        MINIO_URL,
        (NAMESPACE, &format!("broker-keys-{ns}")),
    )
    .await?;
    fixtures::apikey(
        client,
        ns,
        "uploader",
        &provider,
        &["s3:PutObject"],
        &[fixtures::object_arn(ns, "reports/*")],
        Some("15m"),
    )
    .await?;
    fixtures::service_account(client, ns, "uploader").await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn examples_get_the_local_image_and_minios_ca() {
        let ca = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let example =
            std::fs::read_to_string(workspace().join("examples/10-keyprovider-minio.yaml"))
                .unwrap();
        let local: serde_json::Value =
            yaml_serde::from_str(&localize_example(&example, ca)).unwrap();
        assert_eq!(local["spec"]["aws"]["caBundle"], ca);
        assert_eq!(local["spec"]["aws"]["endpoint"], MINIO_URL);
        let job =
            std::fs::read_to_string(workspace().join("examples/22-analytics-job.yaml")).unwrap();
        let local = localize_example(&job, ca);
        assert!(
            local.contains(APP_IMAGE) && !local.contains(EXAMPLE_IMAGE),
            "{local}"
        );
    }

    #[test]
    fn image_names_split_into_repository_and_tag() {
        assert_eq!(
            repository(OPERATOR_IMAGE),
            "keybroker.local/keybroker-operator"
        );
        assert_eq!(tag(OPERATOR_IMAGE), "dev");
    }
}

//! keybroker on real pods: the chart installed with `helm install` on the e2e node (kubelet,
//! containerd, runc), the webhook called by the apiserver through the chart's Service, and
//! apps in the boto3 image using what the injected sidecar hands them. One control plane, node
//! and installation per test binary; each test in its own tenant namespace.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, LogParams, PostParams};
use serde_json::json;

use keybroker_e2e::install::{self, APP_IMAGE, MINIO_URL};
use keybroker_e2e::{Cluster, eventually, fixtures, in_namespace};

async fn cluster() -> anyhow::Result<&'static Cluster> {
    install::shared().await
}

/// The app: an unmodified boto3 program. It reports what it found at start, uploads inside and
/// outside its scope through the container-credentials endpoint and through the files, then
/// keeps one client (credentials cached) uploading every 100 ms and prints every change of
/// outcome, and of the files' presence, with the time. It prints every reload notification
/// POSTed to 127.0.0.1:8099 (for pods annotated with `keybroker.dev/reload-url`).
const APP: &str = r#"
import http.server, json, os, sys, threading, time
import boto3, botocore
from botocore.config import Config

class Reload(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
        print("reload", body["apiKey"], "at", time.time(), flush=True)
        self.send_response(204)
        self.end_headers()
    def log_message(self, *args):
        pass
threading.Thread(target=http.server.HTTPServer(("127.0.0.1", 8099), Reload).serve_forever, daemon=True).start()

ns = os.environ["NS"]
files = "/var/run/keybroker/uploader/credentials"
print("start credentials", os.path.exists(files), flush=True)
print("start token-visible", os.path.exists("/var/run/secrets/keybroker"), flush=True)
cfg = Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5)

def put(s3, key):
    try:
        s3.put_object(Bucket="corp-data", Key=key, Body=b"from a real pod")
        return "ok"
    except botocore.exceptions.ClientError as e:
        return e.response["Error"]["Code"]
    except botocore.exceptions.BotoCoreError as e:
        return type(e).__name__

endpoint = boto3.client("s3", config=cfg)
print("endpoint inside", put(endpoint, ns + "/reports/endpoint.csv"), flush=True)
print("endpoint outside", put(endpoint, ns + "/payroll/endpoint.csv"), flush=True)
os.environ.pop("AWS_CONTAINER_CREDENTIALS_FULL_URI")
os.environ["AWS_SHARED_CREDENTIALS_FILE"] = files
from_files = boto3.session.Session().client("s3", config=cfg)
print("files inside", put(from_files, ns + "/reports/files.csv"), flush=True)
print("files outside", put(from_files, ns + "/payroll/files.csv"), flush=True)

last = None
present = True
while True:
    outcome = put(from_files, ns + "/reports/loop.csv")
    if outcome != last:
        print("loop put", outcome, "at", time.time(), flush=True)
        last = outcome
    if present != os.path.exists(files):
        present = not present
        print("loop files", present, "at", time.time(), flush=True)
    time.sleep(0.1)
"#;

fn app_deployment(ns: &str, name: &str, security: serde_json::Value) -> anyhow::Result<Deployment> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": name, "namespace": ns },
        "spec": {
            "replicas": 1,
            "selector": { "matchLabels": { "app": name } },
            "template": {
                "metadata": {
                    "labels": { "app": name, "keybroker.dev/inject": "true" },
                    "annotations": { "keybroker.dev/apikeys": "uploader" },
                },
                "spec": {
                    "serviceAccountName": "uploader",
                    "terminationGracePeriodSeconds": 5,
                    "securityContext": security,
                    "containers": [{
                        "name": "app",
                        "image": APP_IMAGE,
                        "imagePullPolicy": "Never",
                        "args": ["-u", "-c", APP],
                        "env": [
                            { "name": "AWS_ENDPOINT_URL_S3", "value": MINIO_URL },
                            { "name": "AWS_CA_BUNDLE", "value": "/etc/minio-ca/ca.crt" },
                            { "name": "NS", "valueFrom": { "fieldRef": { "fieldPath": "metadata.namespace" } } },
                        ],
                        "volumeMounts": [{ "name": "minio-ca", "mountPath": "/etc/minio-ca", "readOnly": true }],
                    }],
                    "volumes": [{ "name": "minio-ca", "configMap": { "name": install::MINIO_CA_CONFIGMAP } }],
                },
            },
        },
    }))?)
}

/// The app's pod security: non-root, its group owning the credential files.
fn non_root() -> serde_json::Value {
    json!({ "runAsNonRoot": true, "runAsUser": 1000, "fsGroup": 1000 })
}

/// An uploader tenant in `ns` and the app's running pod (with `annotations` on its template),
/// once its loop (credentials cached) has uploaded.
async fn uploading_pod(
    cluster: &Cluster,
    client: &kube::Client,
    ns: &str,
    annotations: &[(&str, &str)],
) -> anyhow::Result<Pod> {
    install::uploader_tenant(cluster, client, ns).await?;
    let mut deployment = app_deployment(ns, "app", non_root())?;
    deployment
        .spec
        .as_mut()
        .and_then(|s| s.template.metadata.as_mut())
        .and_then(|m| m.annotations.as_mut())
        .context("annotations")?
        .extend(
            annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
    let pod = running_pod(client, &deployment).await?;
    ensure!(
        app_line(client, &pod, "loop put").await?.starts_with("ok "),
        "the app's loop never uploaded"
    );
    Ok(pod)
}

/// Creates the Deployment and waits until its pod's app container runs; returns the pod.
async fn running_pod(client: &kube::Client, deployment: &Deployment) -> anyhow::Result<Pod> {
    let ns = deployment
        .metadata
        .namespace
        .as_deref()
        .context("namespace")?;
    let name = deployment.metadata.name.as_deref().context("name")?;
    Api::<Deployment>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), deployment)
        .await?;
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    let created = std::time::Instant::now();
    let running = eventually(
        &format!("deployment {name}'s app container to run"),
        Duration::from_secs(90),
        || async {
            let list = pods
                .list(&ListParams::default().labels(&format!("app={name}")))
                .await
                .ok()?;
            list.items.into_iter().find(|p| {
                p.status
                    .as_ref()
                    .and_then(|s| s.container_statuses.as_ref())
                    .is_some_and(|cs| {
                        cs.iter().any(|c| {
                            c.name == "app" && c.state.as_ref().is_some_and(|s| s.running.is_some())
                        })
                    })
            })
        },
    )
    .await;
    let pod = match running {
        Ok(pod) => pod,
        Err(e) => {
            // The sidecar's own log says why its startupProbe never passed.
            let mut sidecar_logs = String::new();
            let list = pods
                .list(&ListParams::default().labels(&format!("app={name}")))
                .await?;
            for p in &list.items {
                let log = logs(client, p, "keybroker-sidecar")
                    .await
                    .unwrap_or_default();
                sidecar_logs.push_str(&log);
            }
            return Err(e.context(format!("the sidecar's log:\n{sidecar_logs}")));
        }
    };
    eprintln!(
        "measured: deployment {name}: create to app container running {:?}",
        created.elapsed()
    );
    Ok(pod)
}

async fn logs(client: &kube::Client, pod: &Pod, container: &str) -> anyhow::Result<String> {
    let ns = pod.metadata.namespace.as_deref().context("namespace")?;
    let name = pod.metadata.name.as_deref().context("name")?;
    Api::<Pod>::namespaced(client.clone(), ns)
        .logs(
            name,
            &LogParams {
                container: Some(container.into()),
                ..LogParams::default()
            },
        )
        .await
        .with_context(|| format!("logs of {name}/{container}"))
}

/// Waits until the app's log has a line starting with `prefix`; returns that line's rest.
async fn app_line(client: &kube::Client, pod: &Pod, prefix: &str) -> anyhow::Result<String> {
    app_line_where(client, pod, prefix, |_| true).await
}

/// [`app_line`] for the first such line whose rest satisfies `wanted`.
async fn app_line_where(
    client: &kube::Client,
    pod: &Pod,
    prefix: &str,
    wanted: impl Fn(&str) -> bool,
) -> anyhow::Result<String> {
    eventually(
        &format!("the app to print '{prefix}'"),
        Duration::from_secs(60),
        || async {
            let log = logs(client, pod, "app").await.ok()?;
            log.lines()
                .filter_map(|l| l.strip_prefix(prefix).map(|r| r.trim().to_owned()))
                .find(|r| wanted(r))
        },
    )
    .await
}

/// Seconds since the epoch of a line `... at <float>`.
fn at(line: &str) -> Option<f64> {
    line.rsplit_once(" at ")?.1.trim().parse().ok()
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[tokio::test]
async fn an_injected_pod_gets_credentials_before_its_app_starts_and_uses_them_in_scope_only()
-> anyhow::Result<()> {
    let cluster = cluster().await?;
    in_namespace(cluster, "pods", |client, ns| async move {
        install::uploader_tenant(cluster, &client, &ns).await?;
        let deployment = app_deployment(&ns, "app", non_root())?;
        let pod = running_pod(&client, &deployment).await?;

        // The sidecar is a native sidecar that started first; the app started after its
        // startupProbe passed, so the files were already there.
        let status = pod.status.as_ref().context("status")?;
        let sidecar = status
            .init_container_statuses
            .iter()
            .flatten()
            .find(|c| c.name == "keybroker-sidecar")
            .context("no keybroker-sidecar init container status")?;
        ensure!(
            sidecar.started == Some(true),
            "sidecar not started: {sidecar:?}"
        );
        let app = status
            .container_statuses
            .iter()
            .flatten()
            .find(|c| c.name == "app")
            .context("no app status")?;
        let sidecar_at = sidecar
            .state
            .as_ref()
            .and_then(|s| s.running.as_ref())
            .and_then(|r| r.started_at.clone());
        let app_at = app
            .state
            .as_ref()
            .and_then(|s| s.running.as_ref())
            .and_then(|r| r.started_at.clone());
        ensure!(
            sidecar_at.is_some() && sidecar_at <= app_at,
            "the sidecar started at {sidecar_at:?}, the app at {app_at:?}"
        );
        ensure!(app_line(&client, &pod, "start credentials").await? == "True");
        ensure!(app_line(&client, &pod, "start token-visible").await? == "False");

        for (what, want) in [
            ("endpoint inside", "ok"),
            ("endpoint outside", "AccessDenied"),
            ("files inside", "ok"),
            ("files outside", "AccessDenied"),
        ] {
            let got = app_line(&client, &pod, what).await?;
            ensure!(got == want, "{what}: {got}, want {want}");
        }
        Ok(())
    })
    .await
}

/// The memory volume as the node has it, read in the node's mount namespace.
fn on_node(cluster: &Cluster, script: &str) -> anyhow::Result<String> {
    let node = cluster.node().context("no node")?;
    Ok(node.sandbox().run(true, "sh", &["-c", script])?)
}

fn volume_dir(cluster: &Cluster, pod: &Pod) -> anyhow::Result<String> {
    let node = cluster.node().context("no node")?;
    let uid = pod.metadata.uid.as_deref().context("uid")?;
    Ok(format!(
        "{}/kubelet/pods/{uid}/volumes/kubernetes.io~empty-dir/keybroker-credentials",
        node.dir().display()
    ))
}

/// The sidecar image's user (the Dockerfile's `USER`), which writes the files unless the
/// webhook runs it as the app's user.
const SIDECAR_UID: &str = "65532";

#[tokio::test]
async fn credential_files_are_owned_as_documented_and_readable_by_the_app_only()
-> anyhow::Result<()> {
    let cluster = cluster().await?;
    in_namespace(cluster, "files", |client, ns| async move {
        install::uploader_tenant(cluster, &client, &ns).await?;
        // With an fsGroup: the sidecar's own user's, group-owned by the fsGroup, 0440. With one
        // runAsUser and no fsGroup: the sidecar runs as the app's user, 0400. With neither (each
        // container as its image's user): the sidecar's, 0444, still inside the pod's volume
        // (no other user on the node reads it: the volume's directory is closed to them).
        for (name, security, mode, owner, group) in [
            ("fsgroup", json!({ "runAsNonRoot": true, "runAsUser": 1000, "fsGroup": 1000 }), "440", Some(SIDECAR_UID), Some("1000")),
            ("user", json!({ "runAsNonRoot": true, "runAsUser": 1000 }), "400", Some("1000"), None),
            ("images", json!({ "runAsNonRoot": true }), "444", Some(SIDECAR_UID), None),
        ] {
            let pod = running_pod(&client, &app_deployment(&ns, name, security)?).await?;
            ensure!(app_line(&client, &pod, "files inside").await? == "ok", "{name}: the app cannot use its files");
            let dir = volume_dir(cluster, &pod)?;
            let stat = on_node(
                cluster,
                &format!("stat -L -c '%a %u %g' {dir}/uploader/credentials {dir}/uploader/credentials.json"),
            )?;
            for line in stat.lines() {
                let fields: Vec<&str> = line.split_whitespace().collect();
                ensure!(fields.first() == Some(&mode), "{name}: mode {line}, want {mode}");
                if let Some(owner) = owner {
                    ensure!(fields.get(1) == Some(&owner), "{name}: owner {line}, want {owner}");
                }
                if let Some(g) = group {
                    ensure!(fields.get(2) == Some(&g), "{name}: group {line}, want {g}");
                }
            }
            // The volume's size is the webhook's sizeLimit (1Mi).
            let size = on_node(cluster, &format!("stat -f -c '%b %S' {dir}"))?;
            let bytes: u64 = size.split_whitespace().filter_map(|n| n.parse::<u64>().ok()).product();
            ensure!(bytes == 1024 * 1024, "{name}: the credentials volume holds {bytes} bytes, not 1Mi ({size})");
            ensure!(
                on_node(cluster, &format!("stat -c %T -f {dir}"))?.trim() == "tmpfs",
                "{name}: the credentials volume is not memory-backed"
            );
            // Another user on the node (here uid 1001, not in the pod's groups) cannot read them.
            let other = on_node(
                cluster,
                &format!("setpriv --reuid=1001 --regid=1001 --clear-groups cat {dir}/uploader/credentials 2>&1 || echo refused"),
            )?;
            ensure!(other.trim_end().ends_with("refused") && !other.contains("aws_secret_access_key"), "{name}: uid 1001 read the credentials: {other}");
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_revocation_empties_the_running_pod_and_its_cached_client_is_refused()
-> anyhow::Result<()> {
    let cluster = cluster().await?;
    in_namespace(cluster, "revoke", |client, ns| async move {
        let pod = uploading_pod(cluster, &client, &ns, &[]).await?;
        let revoked = now();
        fixtures::revoke(&client, &ns, "uploader").await?;
        // MinIO revoked the session itself: the client that cached the keys is refused.
        let refused = app_line_where(&client, &pod, "loop put", |r| {
            r.starts_with("InvalidAccessKeyId ") || r.starts_with("AccessDenied ")
        })
        .await?;
        let gone = app_line(&client, &pod, "loop files False").await?;
        let refused_after = at(&refused).context("no time")? - revoked;
        let gone_after = at(&format!("x {gone}")).context("no time")? - revoked;
        eprintln!(
            "measured: in a real pod, from spec.revoked: true to the files gone {:.0} ms, to the app's cached client refused {:.0} ms",
            gone_after * 1000.0,
            refused_after * 1000.0
        );
        ensure!(gone_after < 5.0 && refused_after < 5.0, "revocation took {gone_after:.1} s / {refused_after:.1} s");
        Ok(())
    })
    .await
}

/// Replays a token against the broker from a pod, as a tenant who kept it would: python's
/// urllib with the broker's CA; prints the HTTP status and the refusal's reason.
const REPLAY: &str = r#"
import json, os, ssl, sys, urllib.request, urllib.error
ctx = ssl.create_default_context(cadata=os.environ["CA"])
req = urllib.request.Request(os.environ["URL"] + "/v1/exchange", data=json.dumps({"apiKey": "uploader"}).encode(),
    headers={"Authorization": "Bearer " + os.environ["TOKEN"], "Content-Type": "application/json"})
try:
    with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
        print("status", r.status, flush=True)
except urllib.error.HTTPError as e:
    print("status", e.code, json.loads(e.read() or b"{}").get("reason", ""), flush=True)
"#;

/// Runs [`REPLAY`] with a pod's `token` in a pod of its own named `name`: what it printed.
async fn replay(
    client: &kube::Client,
    ns: &str,
    name: &str,
    ca: &str,
    url: &str,
    token: &str,
) -> anyhow::Result<String> {
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name },
        "spec": {
            "restartPolicy": "Never",
            "containers": [{
                "name": "replay",
                "image": APP_IMAGE,
                "imagePullPolicy": "Never",
                "args": ["-c", REPLAY],
                "env": [
                    { "name": "CA", "value": ca },
                    { "name": "URL", "value": url },
                    { "name": "TOKEN", "value": token.trim() },
                ],
            }],
        },
    }))?;
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    pods.create(&PostParams::default(), &pod).await?;
    eventually(
        &format!("the replay pod {name} to finish"),
        Duration::from_secs(60),
        || async {
            let p = pods.get(name).await.ok()?;
            let phase = p.status.as_ref()?.phase.clone()?;
            if phase != "Succeeded" && phase != "Failed" {
                return None;
            }
            logs(client, &p, "replay").await.ok()
        },
    )
    .await
}

#[tokio::test]
async fn a_deleted_pods_sidecar_removes_the_files_and_its_token_is_refused_afterwards()
-> anyhow::Result<()> {
    let cluster = cluster().await?;
    in_namespace(cluster, "delete", |client, ns| async move {
        install::uploader_tenant(cluster, &client, &ns).await?;
        let pod = running_pod(&client, &app_deployment(&ns, "app", non_root())?).await?;
        ensure!(app_line(&client, &pod, "files inside").await? == "ok");
        let name = pod.metadata.name.clone().context("name")?;
        let uid = pod.metadata.uid.clone().context("uid")?;
        let dir = volume_dir(cluster, &pod)?;
        let node = cluster.node().context("no node")?;
        let token = on_node(
            cluster,
            &format!(
                "cat {}/kubelet/pods/{uid}/volumes/kubernetes.io~projected/keybroker-token/token",
                node.dir().display()
            ),
        )?;
        ensure!(
            token.split('.').count() == 3,
            "not a token: {} bytes",
            token.len()
        );
        let sidecar = fixtures::injected_sidecar(&pod).context("no sidecar")?;
        let env = |n: &str| {
            sidecar
                .env
                .iter()
                .flatten()
                .find(|e| e.name == n)
                .and_then(|e| e.value.clone())
        };
        let ca = env("KEYBROKER_BROKER_CA").context("the sidecar has no KEYBROKER_BROKER_CA")?;
        let url = env("KEYBROKER_BROKER_URL").context("the sidecar has no KEYBROKER_BROKER_URL")?;

        // While the pod runs, its files are there and its token buys credentials from anywhere
        // in the cluster (the replay pod): what the deletion must end.
        on_node(cluster, &format!("test -s {dir}/uploader/credentials"))
            .context("the running pod has no credentials file")?;
        let pods = Api::<Pod>::namespaced(client.clone(), &ns);
        let out = replay(&client, &ns, "replay-before", &ca, &url, &token).await?;
        ensure!(
            out.starts_with("status 200"),
            "the live pod's token was refused: {out}"
        );

        // Stop the Deployment from replacing it, then delete the pod: the kubelet sends SIGTERM
        // to the app, then to the sidecar, which removes the files before the volume goes.
        Api::<Deployment>::namespaced(client.clone(), &ns)
            .delete("app", &DeleteParams::orphan())
            .await?;
        pods.delete(&name, &DeleteParams::default()).await?;
        // Polled fast: between the sidecar's exit and the volume's teardown there is a moment.
        let mut files_removed_by_sidecar = false;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            // The volume still mounted and the ApiKey's directory gone: the sidecar did it.
            if let Ok(out) = on_node(
                cluster,
                &format!("mountpoint -q {dir} && ! test -e {dir}/uploader && echo removed"),
            ) {
                files_removed_by_sidecar |= out.trim() == "removed";
            }
            if pods.get_opt(&name).await?.is_none() {
                break;
            }
            ensure!(
                std::time::Instant::now() < deadline,
                "pod {name} still exists 60 s after its deletion"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ensure!(
            files_removed_by_sidecar,
            "the files were never seen removed while the volume existed"
        );

        let out = replay(&client, &ns, "replay-after", &ca, &url, &token).await?;
        ensure!(
            out.starts_with("status 401 TokenRejected") || out.starts_with("status 403 PodGone"),
            "the deleted pod's token was not refused as it should be: {out}"
        );
        Ok(())
    })
    .await
}

/// The app of a gateway ApiKey: plain `urllib` on the base URL the webhook set (the sidecar on
/// loopback), never a key. It prints what the upstream echoed of `Authorization`, a call outside
/// the ApiKey's scope, then calls every 100 ms on one kept-alive process and prints every change
/// of outcome with the time.
const GATEWAY_APP: &str = r#"
import json, os, time, urllib.request, urllib.error
base = os.environ["ECHO_BASE_URL"]
ns = os.environ["NS"]

def get(path):
    try:
        with urllib.request.urlopen(base + path, timeout=5) as r:
            return str(r.status), r.read().decode()
    except urllib.error.HTTPError as e:
        return str(e.code), e.read().decode()
    except Exception as e:
        return type(e).__name__, ""

status, body = get("/headers")
echoed = json.loads(body).get("headers", {}).get("Authorization", []) if status == "200" else body
print("inside", status, json.dumps(echoed), flush=True)
status, body = get("/status/200")
print("outside", status, body.replace("\n", " "), flush=True)
last = None
while True:
    status, _ = get("/anything/" + ns + "/loop")
    if status != last:
        print("loop", status, "at", time.time(), flush=True)
        last = status
    time.sleep(0.1)
"#;

#[tokio::test]
async fn a_gateway_apikey_reaches_its_upstream_through_the_charts_gateway_without_the_key()
-> anyhow::Result<()> {
    use keybroker_e2e::httpbin::{self, Httpbin};
    use keybroker_operator::crd::{AppEnv, KeyProvider};
    let cluster = cluster().await?;
    // An upstream outside the cluster, reached by name: TLS with a CA of its own.
    let upstream = Httpbin::start_on_node(cluster, &["httpbin.httpbin.svc"]).await?;
    let admin = cluster.client().await?;
    install::publish_node_server(&admin, "httpbin", 443, upstream.addr()).await?;
    in_namespace(cluster, "gateway", |client, ns| async move {
        let key = format!("sk-live-{}", rand::distr::SampleString::sample_string(&rand::distr::Alphanumeric, &mut rand::rng(), 24));
        let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
            "metadata": { "name": format!("httpbin-key-{ns}"), "namespace": install::NAMESPACE },
            "stringData": { "key": key },
        }))?;
        Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), install::NAMESPACE)
            .create(&PostParams::default(), &secret)
            .await?;
        let provider_name = format!("httpbin-{ns}");
        let mut provider = httpbin::provider(&provider_name, install::NAMESPACE, "https://httpbin.httpbin.svc");
        if let Some(gateway) = provider.spec.gateway.as_mut() {
            gateway.key_secret_ref.name = format!("httpbin-key-{ns}");
            gateway.ca_bundle = upstream.ca_pem().map(str::to_owned);
            gateway.app_env = Some(AppEnv { name: "ECHO_BASE_URL".into(), path_suffix: None });
            gateway.timeout = Some("5s".into());
        }
        Api::<KeyProvider>::all(client.clone())
            .create(&PostParams::default(), &provider)
            .await?;
        Api::<keybroker_operator::crd::ApiKey>::namespaced(client.clone(), &ns)
            .create(&PostParams::default(), &httpbin::apikey("echo", &provider_name, None))
            .await?;
        fixtures::service_account(&client, &ns, "app").await?;
        fixtures::recorded_grant(&client, &ns, "echo", None).await?;

        let deployment: Deployment = serde_json::from_value(json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": { "name": "app", "namespace": ns },
            "spec": {
                "replicas": 1,
                "selector": { "matchLabels": { "app": "app" } },
                "template": {
                    "metadata": {
                        "labels": { "app": "app", "keybroker.dev/inject": "true" },
                        "annotations": { "keybroker.dev/apikeys": "echo" },
                    },
                    "spec": {
                        "serviceAccountName": "app",
                        "terminationGracePeriodSeconds": 5,
                        "securityContext": { "runAsNonRoot": true, "runAsUser": 1000 },
                        "containers": [{
                            "name": "app",
                            "image": APP_IMAGE,
                            "imagePullPolicy": "Never",
                            "args": ["-u", "-c", GATEWAY_APP],
                            "env": [{ "name": "NS", "valueFrom": { "fieldRef": { "fieldPath": "metadata.namespace" } } }],
                        }],
                    },
                },
            },
        }))?;
        let pod = running_pod(&client, &deployment).await?;

        // The gateway added the key at the upstream, which echoed it; the app got it redacted.
        let inside = app_line(&client, &pod, "inside").await?;
        ensure!(
            inside == r#"200 ["Bearer [redacted by keybroker]"]"#,
            "the call in scope: {inside} (upstream log:\n{})",
            upstream.log_tail(10)
        );
        let outside = app_line(&client, &pod, "outside").await?;
        ensure!(
            outside.starts_with("403 ") && outside.contains("scope"),
            "a path outside the scope was not refused with a reason: {outside}"
        );
        ensure!(app_line(&client, &pod, "loop").await?.starts_with("200 "), "the app's loop never got through");

        // Revoked: the next call of the running app, on the session its sidecar holds, is refused.
        let revoked = now();
        fixtures::revoke(&client, &ns, "echo").await?;
        let refused = app_line_where(&client, &pod, "loop", |r| !r.starts_with("200 ")).await?;
        // The gateway refuses the revoked session, or the sidecar, having dropped it, answers
        // AccessWithdrawn: either way final, never a "try again".
        ensure!(
            refused.starts_with("401 ") || refused.starts_with("403 "),
            "after the revocation the app's call gave {refused}"
        );
        eprintln!(
            "measured: in a real pod, from spec.revoked: true to the gateway refusing the app's call {:.0} ms",
            (at(&refused).context("no time")? - revoked) * 1000.0
        );

        // The key is nowhere the app, the pod or the tenant can read.
        let stored = Api::<Pod>::namespaced(client.clone(), &ns)
            .get(pod.metadata.name.as_deref().context("name")?)
            .await?;
        let mut seen = serde_json::to_string(&stored)?;
        for container in ["app", "keybroker-sidecar"] {
            seen.push_str(&logs(&client, &pod, container).await?);
        }
        seen.push_str(&serde_json::to_string(
            &Api::<keybroker_operator::crd::ApiKey>::namespaced(client.clone(), &ns).get("echo").await?,
        )?);
        ensure!(!seen.contains(&key), "the upstream's key is visible to the tenant");
        Ok(())
    })
    .await
}

mod cli;
mod helm_test;
mod monitoring;

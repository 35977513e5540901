//! `make demo`, narrated: a local control plane and MinIO, the Helm chart installed, the operator
//! running with the chart ServiceAccount's own identity, the examples applied, a Deployment's
//! pod injected, its sidecar run the way the kubelet would, and boto3 uploading inside its
//! scope, denied outside it, and cut off by a revocation.
//!
//! The e2e test `demo` runs this same code and checks the [`Report`], so the demo cannot rot.
//!
//! What stands in for a node (there is no kubelet, kube-proxy or cluster DNS here): the
//! operator is the chart Deployment's command line run as a local process, with the chart's
//! broker Secret as files and a TokenRequest token of the chart ServiceAccount as its
//! kubeconfig; the apiserver (with `--enable-aggregator-routing`) calls it through the chart's
//! own webhook configuration and Service, resolved by an EndpointSlice naming this machine's
//! address as a Ready pod would be named; the sidecar gets the stored pod's own environment, a
//! pod-bound token file and a tmpfs directory.

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, PostParams};
use tokio::process::Command;

use crate::cluster::Cluster;
use crate::process::{Component, Lifetime};
use crate::tools::Tools;
use crate::{binaries, eventually, fixtures, https, sidecar};
use keybroker_operator::crd::{ApiKey, KeyProvider};

/// The release namespace and name the demo installs the chart as.
pub const NAMESPACE: &str = "keybroker-system";
const RELEASE: &str = "keybroker";
/// The chart's ServiceAccount, as the apiserver names its user.
pub const IDENTITY: &str = "system:serviceaccount:keybroker-system:keybroker";
const TEAM: &str = "team-a";
const APIKEY: &str = "invoice-uploader";
/// The endpoint line of examples/10-keyprovider-minio.yaml, replaced by the demo's MinIO.
const EXAMPLE_ENDPOINT: &str = "http://minio.minio.svc:9000";

/// What happened, for the e2e test to check.
#[derive(Debug)]
pub struct Report {
    /// `kubectl auth can-i --list` as the chart ServiceAccount, in its namespace.
    pub can_i: String,
    /// Whether the apiserver called the webhook through the chart's own Service (else by URL).
    pub webhook_by_service: bool,
    /// Pods kube-controller-manager created for the examples, and how many have the sidecar.
    pub pods: usize,
    pub injected: usize,
    /// Reason of the over-guardrail ApiKey's Ready=False.
    pub greedy_reason: String,
    /// boto3's PutObject outcomes: inside the scope, outside it, after the revocation.
    pub inside: String,
    pub outside: String,
    pub after_revocation: String,
    /// From `spec.revoked: true` to the files gone, and to the broker refusing (with its reason).
    pub files_gone: Duration,
    pub broker_refused: Duration,
    pub refusal_reason: String,
    /// Operator log lines about API calls RBAC refused (the chart's RBAC must make this empty).
    pub forbidden: Vec<String>,
}

/// Prints numbered steps with the elapsed time.
#[derive(Debug)]
pub struct Narrator {
    started: Instant,
}

impl Default for Narrator {
    fn default() -> Self {
        Self {
            started: Instant::now(),
        }
    }
}

impl Narrator {
    pub fn step(&self, text: &str) {
        println!(
            "\n[{:>5.1}s] ▶ {text}",
            self.started.elapsed().as_secs_f64()
        );
    }

    pub fn say(&self, text: &str) {
        for line in text.lines() {
            println!("          {line}");
        }
    }

    /// Runs `work`, printing a progress line every 5 s while it lasts.
    pub async fn progress<T>(&self, what: &str, work: impl Future<Output = T>) -> T {
        let started = Instant::now();
        let mut work = std::pin::pin!(work);
        loop {
            tokio::select! {
                out = &mut work => return out,
                () = tokio::time::sleep(Duration::from_secs(5)) => {
                    self.say(&format!("… {what} ({:.0}s)", started.elapsed().as_secs_f64()));
                }
            }
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

/// Removes a directory when dropped (also on failure and Ctrl-C).
#[derive(Debug)]
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the whole demo; everything it started is stopped and deleted when it returns or when
/// the future is dropped (Ctrl-C).
pub async fn run(n: &Narrator) -> anyhow::Result<Report> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    n.step("Building keybroker-operator and keybroker-sidecar, and a Python venv with boto3");
    let (operator_bin, sidecar_bin, python) = n
        .progress("building", async {
            let operator = binaries::cargo_bin("keybroker-operator", "keybroker-operator").await?;
            let sidecar = sidecar::binary().await?;
            let python = tokio::task::spawn_blocking(sidecar::python_with_boto3).await??;
            anyhow::Ok((operator, sidecar, python))
        })
        .await?;
    let tools = Tools::locate()?;

    n.step("Starting a control plane (etcd, kube-apiserver, kube-controller-manager) and MinIO");
    let dir = TempDir(crate::run_dir()?);
    let cluster = n
        .progress(
            "starting",
            Cluster::start(crate::Options {
                dir: dir.0.join("cluster"),
                lifetime: Lifetime::TiedToProcess,
                with_minio: true,
            }),
        )
        .await?;
    let admin = cluster.client().await?;
    let minio = cluster.minio.as_ref().context("no MinIO")?;
    n.say(&format!(
        "apiserver {}, MinIO {}",
        cluster.server, minio.endpoint
    ));

    let broker_addr = free_addr()?;
    // The apiserver reaches the webhook through the chart's Service, resolved by an
    // EndpointSlice whose address may not be loopback: this machine's own address.
    let webhook_addr = match host_ip() {
        Some(ip) => SocketAddr::new(ip, TcpListener::bind((ip, 0))?.local_addr()?.port()),
        None => free_addr()?,
    };
    n.step("helm install keybroker charts/keybroker (CRDs, RBAC, Deployment, Services, webhook)");
    let kubeconfig = cluster.kubeconfig.display().to_string();
    let helm = run_tool(
        Command::new(&tools.helm)
            .args(["install", RELEASE])
            .arg(repo.join("charts/keybroker"))
            .args(["--namespace", NAMESPACE, "--create-namespace"])
            .arg(format!("--kubeconfig={kubeconfig}"))
            // No cluster DNS here: sidecars reach the broker on this machine.
            .arg(format!("--set=broker.url=https://{broker_addr}"))
            .arg("--set=broker.extraIPs={127.0.0.1}"),
    )
    .await?;
    n.say(helm.lines().take(6).collect::<Vec<_>>().join("\n").as_str());

    n.step(&format!(
        "Running the operator as {IDENTITY} (a TokenRequest token, not an admin)"
    ));
    let operator = start_operator(
        n,
        &cluster,
        &admin,
        &operator_bin,
        &dir.0,
        broker_addr,
        webhook_addr,
    )
    .await?;
    let sa_kubeconfig = dir.0.join("operator/kubeconfig");
    let can_i = run_tool(
        Command::new(&tools.kubectl)
            .arg(format!("--kubeconfig={}", sa_kubeconfig.display()))
            .args(["auth", "can-i", "--list", "--namespace", NAMESPACE]),
    )
    .await?;
    n.say("Everything it may do (kubectl auth can-i --list):");
    n.say(&can_i);

    n.step("Applying examples/: tenants, KeyProviders, ApiKeys, two Deployments and a Job");
    let keys = minio.create_s3_user("keybroker-broker")?;
    fixtures::secret(
        &admin,
        NAMESPACE,
        "broker-keys",
        &keys.access_key_id,
        &keys.secret_access_key,
    )
    .await?;
    let root = fixtures::s3_client(
        &minio.endpoint,
        &minio.root.access_key_id,
        &minio.root.secret_access_key,
        None,
    );
    for bucket in ["corp-data", "photos"] {
        root.create_bucket()
            .bucket(bucket)
            .send()
            .await
            .with_context(|| format!("creating bucket {bucket}"))?;
    }
    n.say("MinIO user keybroker-broker in Secret keybroker-system/broker-keys; buckets corp-data, photos");
    let applied = apply_examples(&tools, &cluster, &repo.join("examples"), &minio.endpoint).await?;
    n.say(&applied);

    n.step("Waiting for the controller: KeyProvider corp-s3 and the ApiKeys");
    let apikeys = Api::<ApiKey>::namespaced(admin.clone(), TEAM);
    n.progress("reconciling", async {
        ready(&Api::<KeyProvider>::all(admin.clone()), "corp-s3", "True").await?;
        for key in [APIKEY, "photo-uploads", "analytics-readonly"] {
            ready(&apikeys, key, "True").await?;
        }
        anyhow::Ok(())
    })
    .await?;
    let greedy = ready(
        &Api::<ApiKey>::namespaced(admin.clone(), "team-b"),
        "greedy",
        "False",
    )
    .await?;
    n.say("corp-s3 Ready; invoice-uploader, photo-uploads, analytics-readonly Ready");
    n.say(&format!(
        "team-b/greedy refused: {} — {}",
        greedy.0, greedy.1
    ));

    n.step("kube-controller-manager creates the pods; the webhook injects the sidecar");
    let pods_api = Api::<Pod>::namespaced(admin.clone(), TEAM);
    let pods = n
        .progress(
            "waiting for 4 pods",
            eventually("the examples' 4 pods", Duration::from_secs(60), || async {
                let list = pods_api.list(&ListParams::default()).await.ok()?;
                (list.items.len() >= 4).then_some(list.items)
            }),
        )
        .await?;
    let injected = pods
        .iter()
        .filter(|p| fixtures::injected_sidecar(p).is_some())
        .count();
    for pod in &pods {
        n.say(&format!(
            "pod {:<40} init containers {:?}",
            pod.metadata.name.as_deref().unwrap_or("?"),
            pod.spec
                .iter()
                .flat_map(|s| s.init_containers.iter().flatten())
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
        ));
    }
    let pod = pods
        .iter()
        .find(|p| {
            p.metadata
                .labels
                .as_ref()
                .is_some_and(|l| l.get("app").map(String::as_str) == Some("report-uploader"))
        })
        .context("no report-uploader pod")?;
    let pod_name = pod.metadata.name.clone().unwrap_or_default();

    n.step(&format!(
        "Running pod {pod_name}'s sidecar as the kubelet would: its env, a pod-bound token, a tmpfs volume"
    ));
    let node = sidecar::HostPod::new(&dir.0, &pod_name)?;
    let sidecar_container =
        fixtures::injected_sidecar(pod).context("the report-uploader pod has no sidecar")?;
    let token = fixtures::token(
        &admin,
        TEAM,
        "report-uploader",
        keybroker_sidecar::wire::AUDIENCE,
        Some(&pod_name),
    )
    .await?;
    std::fs::write(node.token_file(), &token)?;
    let env = node.env(sidecar_container);
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut sidecar_process = Component::spawn(
        "keybroker-sidecar",
        &sidecar_bin,
        &[],
        &env_refs,
        &dir.0.join("sidecar.log"),
        Lifetime::TiedToProcess,
    )?;
    let startup = format!("http://{}/startupz", node.health);
    n.progress(
        "waiting for the startupProbe",
        sidecar_process.wait_ready("GET /startupz", Duration::from_secs(30), || {
            http_ok(&startup)
        }),
    )
    .await?;
    let files: Vec<String> = std::fs::read_dir(node.out.join(APIKEY))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    n.say(&format!(
        "startupProbe passed; {}/{APIKEY}/ holds {files:?}",
        node.out.display()
    ));

    n.step("boto3 in the app container (only the injected env: no keys, no code change)");
    let app = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .context("no app container")?;
    let app_env = node.env(app);
    let boto3 = Boto3 {
        python: &python,
        env: &app_env,
        endpoint: &minio.endpoint,
        home: &dir.0,
    };
    let inside = boto3
        .put(&format!("corp-data/{TEAM}/invoices/2026/demo.csv"))
        .await?;
    let outside = boto3
        .put(&format!("corp-data/{TEAM}/payroll/demo.csv"))
        .await?;
    n.say(&format!(
        "PUT corp-data/{TEAM}/invoices/2026/demo.csv → {inside}   (inside the scope)"
    ));
    n.say(&format!(
        "PUT corp-data/{TEAM}/payroll/demo.csv       → {outside}   (outside: MinIO enforces the session policy)"
    ));

    n.step(&format!(
        "Revocation drill: kubectl patch apikey {APIKEY} spec.revoked=true"
    ));
    // The sidecar's revocation long-poll is open once its first credentials are in place.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ca = dir.0.join("operator/tls/ca.crt");
    let broker = https::Client::new(broker_addr, &ca)?;
    let revoked_at = Instant::now();
    fixtures::revoke(&admin, TEAM, APIKEY).await?;
    let files_gone = async {
        loop {
            if std::fs::symlink_metadata(node.out.join(APIKEY)).is_err() {
                return revoked_at.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let body = serde_json::json!({ "apiKey": APIKEY })
        .to_string()
        .into_bytes();
    let refused = async {
        loop {
            if let Ok(reply) = broker
                .send("POST", "/v1/exchange", Some(&token), body.clone())
                .await
                && reply.status.as_u16() == 403
            {
                let reason = reply
                    .json::<serde_json::Value>()
                    .ok()
                    .and_then(|v| v["reason"].as_str().map(str::to_owned))
                    .unwrap_or_default();
                return (revoked_at.elapsed(), reason);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let (files_gone, (broker_refused, refusal_reason)) = tokio::time::timeout(
        Duration::from_secs(20),
        futures::future::join(files_gone, refused),
    )
    .await
    .context("still not revoked 20 s after spec.revoked: true")?;
    let after_revocation = boto3
        .put(&format!("corp-data/{TEAM}/invoices/2026/late.csv"))
        .await?;
    n.say(&format!(
        "credentials files gone after {} ms; broker refuses after {} ms ({refusal_reason})",
        files_gone.as_millis(),
        broker_refused.as_millis()
    ));
    n.say(&format!("boto3 PUT now → {after_revocation}"));

    // An RBAC gap shows as a 403 in the operator's log even where no scenario notices it.
    let forbidden: Vec<String> = std::fs::read_to_string(operator.log_path())?
        .lines()
        .filter(|l| l.contains("is forbidden: User"))
        .map(str::to_owned)
        .collect();
    n.say(&format!(
        "operator log: {} API calls refused by RBAC",
        forbidden.len()
    ));

    n.step("Tearing down: sidecar, operator, control plane, MinIO, temporary files");
    drop(sidecar_process);
    drop(operator);
    drop(cluster);
    drop(node);
    drop(dir);
    n.say(&format!("done in {:.0}s", n.elapsed().as_secs_f64()));
    Ok(Report {
        webhook_by_service: !webhook_addr.ip().is_loopback(),
        can_i,
        pods: pods.len(),
        injected,
        greedy_reason: greedy.0,
        inside,
        outside,
        after_revocation,
        files_gone,
        broker_refused,
        refusal_reason,
        forbidden,
    })
}

/// Starts the chart Deployment's own command line as a local process authenticated as the
/// chart ServiceAccount, after pointing the chart's webhook configuration at it.
async fn start_operator(
    n: &Narrator,
    cluster: &Cluster,
    admin: &kube::Client,
    binary: &Path,
    dir: &Path,
    broker_addr: SocketAddr,
    webhook_addr: SocketAddr,
) -> anyhow::Result<Component> {
    let home = dir.join("operator");
    let tls = home.join("tls");
    std::fs::create_dir_all(&tls)?;
    // The Secret volume, as the kubelet would mount it.
    let secret = Api::<Secret>::namespaced(admin.clone(), NAMESPACE)
        .get(&format!("{RELEASE}-broker-tls"))
        .await?;
    for (key, value) in secret.data.iter().flatten() {
        std::fs::write(tls.join(key), &value.0)?;
    }
    // The projected service-account token, as its kubeconfig.
    let token = fixtures::token(admin, NAMESPACE, RELEASE, &cluster.server, None).await?;
    let kubeconfig = home.join("kubeconfig");
    write_token_kubeconfig(&kubeconfig, &cluster.server, &cluster.ca_cert, &token)?;

    let deployment = Api::<Deployment>::namespaced(admin.clone(), NAMESPACE)
        .get(RELEASE)
        .await?;
    let mut args: Vec<String> = deployment
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|s| s.containers.into_iter().next())
        .and_then(|c| c.args)
        .context("the chart's Deployment has no args")?;
    let metrics = free_addr()?;
    args.extend([
        format!("--metrics-addr={metrics}"),
        format!("--broker-addr={broker_addr}"),
        format!("--webhook-addr={webhook_addr}"),
        format!("--tls-cert-file={}", tls.join("tls.crt").display()),
        format!("--tls-key-file={}", tls.join("tls.key").display()),
        format!("--broker-ca-file={}", tls.join("ca.crt").display()),
    ]);
    n.say(&format!(
        "args from the chart's Deployment: {}",
        args[..4].join(" ")
    ));

    let configs = Api::<MutatingWebhookConfiguration>::all(admin.clone());
    if webhook_addr.ip().is_loopback() {
        // No address but loopback, which an EndpointSlice may not name: the apiserver calls
        // the webhook by URL instead of through the chart's Service.
        let url = format!("https://{webhook_addr}/mutate");
        let mut config = configs.get(RELEASE).await?;
        let webhook = config
            .webhooks
            .iter_mut()
            .flatten()
            .find(|w| w.name == "inject.keybroker.dev")
            .context("the chart's webhook configuration has no inject.keybroker.dev")?;
        webhook.client_config = WebhookClientConfig {
            url: Some(url.clone()),
            ..WebhookClientConfig::default()
        };
        configs
            .replace(RELEASE, &PostParams::default(), &config)
            .await?;
        args.push("--webhook-hosts=127.0.0.1".into());
        n.say(&format!(
            "webhook {RELEASE}: clientConfig.url={url} (no non-loopback address here)"
        ));
    } else {
        // What the endpoint controllers would publish for a Ready operator pod.
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": format!("{RELEASE}-webhook-demo"),
                "labels": {"kubernetes.io/service-name": format!("{RELEASE}-webhook")},
            },
            "addressType": if webhook_addr.is_ipv4() { "IPv4" } else { "IPv6" },
            "endpoints": [{"addresses": [webhook_addr.ip().to_string()], "conditions": {"ready": true}}],
            "ports": [{"name": "https", "port": webhook_addr.port(), "protocol": "TCP"}],
        }))?;
        Api::<EndpointSlice>::namespaced(admin.clone(), NAMESPACE)
            .create(&PostParams::default(), &slice)
            .await?;
        n.say(&format!(
            "webhook: the chart's own configuration and Service {RELEASE}-webhook, with an EndpointSlice for {webhook_addr} in place of a pod"
        ));
    }

    let kubeconfig_path = kubeconfig.display().to_string();
    let mut operator = Component::spawn(
        "keybroker-operator",
        binary,
        &args,
        &[
            ("KUBECONFIG", kubeconfig_path.as_str()),
            ("POD_NAMESPACE", NAMESPACE),
            ("POD_NAME", "keybroker-demo-0"),
            ("RUST_LOG", "info"),
        ],
        &dir.join("operator.log"),
        Lifetime::TiedToProcess,
    )?;
    let readyz = format!("http://{metrics}/readyz");
    operator
        .wait_ready("GET /readyz", Duration::from_secs(60), || http_ok(&readyz))
        .await?;
    n.progress(
        "waiting for the webhook's CA bundle",
        eventually("the caBundle", Duration::from_secs(30), || async {
            let config = configs.get(RELEASE).await.ok()?;
            config
                .webhooks?
                .first()?
                .client_config
                .ca_bundle
                .as_ref()
                .map(drop)
        }),
    )
    .await?;
    n.say(&format!(
        "controller, webhook and broker up (log: {}); caBundle published",
        operator.log_path().display()
    ));
    Ok(operator)
}

/// Applies every file in `examples/` with kubectl (the MinIO endpoint substituted), so the
/// apiserver validates them against the CRDs.
async fn apply_examples(
    tools: &Tools,
    cluster: &Cluster,
    dir: &Path,
    endpoint: &str,
) -> anyhow::Result<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut out = String::new();
    for file in files {
        let text = std::fs::read_to_string(&file)?.replace(EXAMPLE_ENDPOINT, endpoint);
        let mut cmd = Command::new(&tools.kubectl);
        cmd.arg(format!("--kubeconfig={}", cluster.kubeconfig.display()))
            .args(["apply", "-f", "-"]);
        out.push_str(
            &run_tool_with_input(&mut cmd, &text)
                .await
                .with_context(|| format!("kubectl apply -f {}", file.display()))?,
        );
    }
    Ok(out.trim_end().to_owned())
}

/// Waits until `name`'s Ready condition has `status`; returns its reason and message.
async fn ready<K>(api: &Api<K>, name: &str, status: &str) -> anyhow::Result<(String, String)>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    eventually(
        &format!("{name} Ready={status}"),
        Duration::from_secs(60),
        || async {
            let object = serde_json::to_value(api.get(name).await.ok()?).ok()?;
            object["status"]["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["type"] == "Ready" && c["status"] == status)
                .map(|c| {
                    (
                        c["reason"].as_str().unwrap_or_default().to_owned(),
                        c["message"].as_str().unwrap_or_default().to_owned(),
                    )
                })
        },
    )
    .await
}

/// boto3 run as the app container: its injected env only, plus MinIO's endpoint.
struct Boto3<'a> {
    python: &'a Path,
    env: &'a [(String, String)],
    endpoint: &'a str,
    home: &'a Path,
}

const BOTO3_PUT: &str = r#"
import sys
import boto3, botocore
bucket, key = sys.argv[1].split("/", 1)
try:
    s3 = boto3.client("s3", config=botocore.config.Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))
    s3.put_object(Bucket=bucket, Key=key, Body=b"made by make demo")
    print("ok")
except botocore.exceptions.ClientError as e:
    print(e.response["Error"]["Code"])
except botocore.exceptions.BotoCoreError as e:
    print(type(e).__name__)
"#;

impl Boto3<'_> {
    /// PutObject `bucket/key`: "ok", the S3 error code, or the SDK's error type.
    async fn put(&self, object: &str) -> anyhow::Result<String> {
        let out = Command::new(self.python)
            .args(["-c", BOTO3_PUT, object])
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", self.home)
            .env("NO_PROXY", "127.0.0.1,localhost")
            .env("AWS_ENDPOINT_URL_S3", self.endpoint)
            .env("AWS_CONFIG_FILE", self.home.join("no-aws-config"))
            .env(
                "AWS_SHARED_CREDENTIALS_FILE",
                self.home.join("no-credentials"),
            )
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .kill_on_drop(true)
            .output()
            .await?;
        ensure!(
            out.status.success(),
            "boto3 failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

/// A kubeconfig that authenticates with a bearer token.
fn write_token_kubeconfig(path: &Path, server: &str, ca: &Path, token: &str) -> anyhow::Result<()> {
    let config = serde_json::json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "demo", "cluster": {"server": server, "certificate-authority": ca}}],
        "users": [{"name": "keybroker", "user": {"token": token}}],
        "contexts": [{"name": "keybroker", "context": {"cluster": "demo", "user": "keybroker", "namespace": NAMESPACE}}],
        "current-context": "keybroker",
    });
    std::fs::write(path, config.to_string())?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// This machine's address on its default route (no packet is sent), if it has one.
fn host_ip() -> Option<std::net::IpAddr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.1:9").ok()?;
    Some(socket.local_addr().ok()?.ip()).filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

async fn http_ok(url: &str) -> bool {
    let Ok(uri) = url.parse::<hyper::Uri>() else {
        return false;
    };
    let Some(authority) = uri.authority().map(|a| a.to_string()) else {
        return false;
    };
    let Ok(tcp) = tokio::net::TcpStream::connect(&authority).await else {
        return false;
    };
    let Ok((mut sender, conn)) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await
    else {
        return false;
    };
    tokio::spawn(conn);
    let Ok(request) = hyper::Request::get(uri.path())
        .header("host", authority)
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())
    else {
        return false;
    };
    sender
        .send_request(request)
        .await
        .is_ok_and(|r| r.status() == 200)
}

async fn run_tool(cmd: &mut Command) -> anyhow::Result<String> {
    run_tool_with_input(cmd, "").await
}

/// Runs a tool to completion (killed if the demo is interrupted); its stdout, or an error with
/// its stderr.
async fn run_tool_with_input(cmd: &mut Command, input: &str) -> anyhow::Result<String> {
    use tokio::io::AsyncWriteExt;
    let mut child = cmd
        .env("NO_PROXY", "127.0.0.1,localhost")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    stdin.write_all(input.as_bytes()).await?;
    drop(stdin);
    let out = child.wait_with_output().await?;
    ensure!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

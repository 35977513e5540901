//! `make demo`, narrated, on a real one-node cluster: a control plane, MinIO and a node
//! (kubelet, containerd, runc, kube-proxy, kube-scheduler, CoreDNS); keybroker's images
//! imported into the node; `helm install` of the chart (two operator replicas, the webhook
//! called through its Service); the examples applied, their pods scheduled and run with the
//! sidecar; the report-uploader's own log showing its uploads, a call outside its scope denied,
//! and a revocation that empties the pod and makes MinIO refuse a copy of the credentials taken
//! before it.
//!
//! The e2e test `demo` runs this same code and checks the [`Report`], so the demo cannot rot.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, LogParams};
use tokio::process::Command;

use crate::cluster::Cluster;
use crate::install::{self, APP_IMAGE, EXAMPLE_IMAGE, Images, NAMESPACE, RELEASE};
use crate::process::Lifetime;
use crate::tools::Tools;
use crate::{eventually, fixtures, sidecar};
use keybroker_operator::crd::{ApiKey, KeyProvider};

/// The chart's ServiceAccount, as the apiserver names its user.
pub const IDENTITY: &str = "system:serviceaccount:keybroker-system:keybroker";
const TEAM: &str = "team-a";
const APIKEY: &str = "invoice-uploader";

/// What happened, for the e2e test to check.
#[derive(Debug)]
pub struct Report {
    /// `kubectl auth can-i --list` as the chart ServiceAccount, in its namespace.
    pub can_i: String,
    /// Operator pods Ready, and the Lease's holder (one of them).
    pub operators_ready: usize,
    pub lease_holder: String,
    /// Pods kube-controller-manager created for the examples, how many have the sidecar, and
    /// how many of the Deployments' pods are Running.
    pub pods: usize,
    pub injected: usize,
    pub running: usize,
    /// Whether the analytics Job's pod ended Completed, and what it printed.
    pub job_completed: bool,
    pub job_output: String,
    /// Reason of the over-guardrail ApiKey's Ready=False.
    pub greedy_reason: String,
    /// The report-uploader app's own upload line (inside its scope).
    pub inside: String,
    /// The app's own log line for its write outside the scope.
    pub outside: String,
    /// The app's log line after the revocation, and a boto3 client holding a copy of the
    /// credentials taken before it: before and after.
    pub after_revocation: String,
    pub copy_before: String,
    pub copy_after: String,
    /// From `spec.revoked: true` to the files gone in the pod, and to the copy refused by MinIO.
    pub files_gone: Duration,
    pub copy_refused: Duration,
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
    n.step("Images: keybroker-operator and keybroker-sidecar from dist/ (make release-static), an app image (AWS CLI + boto3), as OCI archives written by crane");
    let (images, python) = n
        .progress("building", async {
            let images = tokio::task::spawn_blocking(Images::build).await??;
            let python = tokio::task::spawn_blocking(sidecar::python_with_boto3).await??;
            anyhow::Ok((images, python))
        })
        .await?;
    let tools = Tools::locate()?;

    n.step("Starting a control plane, MinIO and a node (kubelet, containerd, runc, kube-proxy, kube-scheduler, CoreDNS)");
    let dir = TempDir(crate::run_dir()?);
    let cluster = n
        .progress(
            "starting",
            Cluster::start_with_node(crate::Options {
                dir: dir.0.join("cluster"),
                lifetime: Lifetime::TiedToProcess,
                with_minio: true,
            }),
        )
        .await?;
    let admin = cluster.client().await?;
    let kubectl = Kubectl {
        program: &tools.kubectl,
        kubeconfig: &cluster.kubeconfig,
    };
    n.say(&kubectl.run(&["get", "nodes", "-o", "wide"]).await?);

    n.step("helm install keybroker charts/keybroker (local images, imagePullPolicy Never)");
    let helm = n
        .progress(
            "installing; waiting for both replicas' /readyz",
            install::install(&cluster, &images, &[]),
        )
        .await?;
    n.say(helm.lines().take(6).collect::<Vec<_>>().join("\n").as_str());
    n.say(
        &kubectl
            .run(&["get", "pods", "-n", NAMESPACE, "-o", "wide"])
            .await?,
    );
    let operators = Api::<Pod>::namespaced(admin.clone(), NAMESPACE)
        .list(&ListParams::default().labels("app.kubernetes.io/name=keybroker"))
        .await?
        .items;
    let operators_ready = operators.iter().filter(|p| pod_ready(p)).count();
    let lease_holder = Api::<Lease>::namespaced(admin.clone(), NAMESPACE)
        .get("keybroker-controller")
        .await
        .ok()
        .and_then(|l| l.spec?.holder_identity)
        .unwrap_or_default();
    n.say(&format!(
        "MinIO is Service minio.minio.svc:9000 ({}); the controller Lease is held by {lease_holder}",
        cluster.minio.as_ref().map_or("", |m| m.endpoint.as_str())
    ));

    let sa_kubeconfig = dir.0.join("operator-kubeconfig");
    let token = fixtures::token(&admin, NAMESPACE, RELEASE, &cluster.server, None).await?;
    write_token_kubeconfig(&sa_kubeconfig, &cluster.server, &cluster.ca_cert, &token)?;
    let can_i = Kubectl {
        program: &tools.kubectl,
        kubeconfig: &sa_kubeconfig,
    }
    .run(&["auth", "can-i", "--list", "--namespace", NAMESPACE])
    .await?;
    n.say(&format!(
        "Everything {IDENTITY} may do (kubectl auth can-i --list):"
    ));
    n.say(&can_i);

    n.step("Applying examples/: tenants, KeyProviders, ApiKeys, two Deployments and a Job");
    let minio = cluster.minio.as_ref().context("no MinIO")?;
    install::prepare_examples(&cluster, &admin).await?;
    n.say(&format!(
        "MinIO user keybroker-broker in Secret {NAMESPACE}/broker-keys; buckets corp-data, photos; corp-data/{}",
        install::EXAMPLE_SUMMARY
    ));
    n.say(&format!(
        "{EXAMPLE_IMAGE} → {APP_IMAGE} (nothing is pulled here); corp-s3 gets caBundle: MinIO's CA"
    ));
    let minio_ca = minio.ca_pem().context("MinIO has no CA")?;
    let files = example_files(&repo.join("examples"))?;
    let (namespaces, rest) = files.split_first().context("examples/ is empty")?;
    let mut applied = apply_examples(&kubectl, std::slice::from_ref(namespaces), &minio_ca).await?;
    install::publish_minio_ca(&cluster, &admin, TEAM).await?;
    applied.push('\n');
    applied.push_str(&apply_examples(&kubectl, rest, &minio_ca).await?);
    n.say(&applied);
    n.say(&format!(
        "ConfigMap {TEAM}/{} holds MinIO's CA for the apps (AWS_CA_BUNDLE)",
        install::MINIO_CA_CONFIGMAP
    ));

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

    n.step("The pods: injected by the webhook, scheduled, the sidecar started before each app");
    let pods_api = Api::<Pod>::namespaced(admin.clone(), TEAM);
    let jobs = Api::<Job>::namespaced(admin.clone(), TEAM);
    let pods = n
        .progress(
            "waiting for 3 Running pods and the Job",
            eventually(
                "the examples' Deployments Running and the Job complete",
                Duration::from_secs(120),
                || async {
                    let list = pods_api.list(&ListParams::default()).await.ok()?;
                    let running = list.items.iter().filter(|p| app_running(p)).count();
                    let done = jobs
                        .get("monthly-report")
                        .await
                        .ok()?
                        .status?
                        .succeeded
                        .unwrap_or(0);
                    (running >= 3 && done >= 1).then_some(list.items)
                },
            ),
        )
        .await?;
    n.say(
        &kubectl
            .run(&["get", "pods", "-n", TEAM, "-o", "wide"])
            .await?,
    );
    let injected = pods
        .iter()
        .filter(|p| fixtures::injected_sidecar(p).is_some())
        .count();
    let running = pods.iter().filter(|p| app_running(p)).count();
    let job_pod = pods
        .iter()
        .find(|p| label(p, "job-name") == Some("monthly-report"))
        .context("no monthly-report pod")?;
    // The Job succeeded (above); its pod ends Completed, as `kubectl get pods` shows it.
    let job_completed =
        job_pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded");
    let job_output = pod_logs(&pods_api, job_pod, "report").await?;
    n.say(&format!(
        "Job monthly-report Completed; its pod printed: {}",
        job_output.trim()
    ));

    let pod = pods
        .iter()
        .find(|p| label(p, "app") == Some("report-uploader"))
        .context("no report-uploader pod")?;
    let pod_name = pod.metadata.name.clone().unwrap_or_default();
    n.step(&format!(
        "kubectl logs {pod_name} -c app: the AWS CLI, no keys, no code change"
    ));
    let inside = eventually(
        "the report-uploader's first upload",
        Duration::from_secs(60),
        || async {
            let log = pod_logs(&pods_api, pod, "app").await.ok()?;
            log.lines()
                .find(|l| l.starts_with("upload:"))
                .map(str::to_owned)
        },
    )
    .await?;
    n.say(&inside);
    // The app's own first lines: its write outside the scope, denied by MinIO.
    let outside = eventually(
        "the report-uploader's write outside its scope",
        Duration::from_secs(60),
        || async {
            let log = pod_logs(&pods_api, pod, "app").await.ok()?;
            let mut lines = log
                .lines()
                .skip_while(|l| !l.starts_with("outside the scope"));
            lines.next()?;
            lines.next().map(str::to_owned)
        },
    )
    .await?;
    n.say(&format!("outside the scope (payroll/): {}", outside.trim()));

    n.step(&format!(
        "Revocation drill: kubectl patch apikey {APIKEY} spec.revoked=true"
    ));
    // A copy of the credentials, as someone who read the files before the revocation holds it.
    let copied = kubectl
        .run(&[
            "exec",
            "-n",
            TEAM,
            &pod_name,
            "-c",
            "app",
            "--",
            "cat",
            &format!("/var/run/keybroker/{APIKEY}/credentials"),
        ])
        .await?;
    let mut copy_env = shared_credentials_env(&copied)?;
    if let Some(ca) = &minio.ca {
        copy_env.push(("AWS_CA_BUNDLE".into(), ca.display().to_string()));
    }
    let copy = Boto3 {
        python: &python,
        env: &copy_env,
        endpoint: &minio.endpoint,
        home: &dir.0,
    };
    let copy_before = copy
        .put(&format!("corp-data/{TEAM}/invoices/2026/copy.csv"))
        .await?;
    n.say(&format!(
        "a boto3 client outside the cluster holding a copy of the pod's credentials: PUT → {copy_before}"
    ));
    let volume = format!(
        "{}/kubelet/pods/{}/volumes/kubernetes.io~empty-dir/keybroker-credentials/{APIKEY}",
        cluster.node().context("no node")?.dir().display(),
        pod.metadata.uid.as_deref().unwrap_or_default()
    );
    let node = cluster.node().context("no node")?;
    let revoked_at = Instant::now();
    fixtures::revoke(&admin, TEAM, APIKEY).await?;
    let files_gone = async {
        loop {
            let gone = node
                .sandbox()
                .run(
                    true,
                    "sh",
                    &["-c", &format!("test -e {volume} || echo gone")],
                )
                .is_ok_and(|out| out.trim() == "gone");
            if gone {
                return revoked_at.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let refused = async {
        loop {
            let outcome = copy
                .put(&format!("corp-data/{TEAM}/invoices/2026/copy.csv"))
                .await
                .unwrap_or_default();
            if outcome != "ok" && !outcome.is_empty() {
                return (revoked_at.elapsed(), outcome);
            }
        }
    };
    let (files_gone, (copy_refused, copy_after)) = tokio::time::timeout(
        Duration::from_secs(20),
        futures::future::join(files_gone, refused),
    )
    .await
    .context("still not revoked 20 s after spec.revoked: true")?;
    n.say(&format!(
        "credentials files gone from the pod's volume after {} ms; the copy refused by MinIO after {} ms ({copy_after})",
        files_gone.as_millis(),
        copy_refused.as_millis()
    ));
    let uploads_before = pod_logs(&pods_api, pod, "app").await?.lines().count();
    let after_revocation = n
        .progress(
            "waiting for the app's next upload",
            eventually(
                "the app's first line after the revocation",
                Duration::from_secs(40),
                || async {
                    let log = pod_logs(&pods_api, pod, "app").await.ok()?;
                    log.lines()
                        .skip(uploads_before)
                        .find(|l| !l.trim().is_empty())
                        .map(str::to_owned)
                },
            ),
        )
        .await?;
    n.say(&format!(
        "kubectl logs {pod_name} -c app: {after_revocation}"
    ));
    let sidecar_log = pod_logs(
        &pods_api,
        pod,
        keybroker_operator::webhook::inject::SIDECAR_NAME,
    )
    .await?;
    if let Some(line) = sidecar_log.lines().find(|l| l.contains("withdrew access")) {
        n.say(&format!(
            "kubectl logs {pod_name} -c {}: {line}",
            keybroker_operator::webhook::inject::SIDECAR_NAME
        ));
    }

    // An RBAC gap shows as a 403 in the operator's log even where no scenario notices it.
    let operator_pods = Api::<Pod>::namespaced(admin.clone(), NAMESPACE);
    let mut forbidden = Vec::new();
    for p in &operators {
        let log = pod_logs(&operator_pods, p, "operator")
            .await
            .unwrap_or_default();
        forbidden.extend(
            log.lines()
                .filter(|l| l.contains("is forbidden: User"))
                .map(str::to_owned),
        );
    }
    n.say(&format!(
        "operator logs (both replicas): {} API calls refused by RBAC",
        forbidden.len()
    ));

    n.step("Tearing down: the node and its pods, the control plane, MinIO, temporary files");
    drop(cluster);
    drop(dir);
    n.say(&format!("done in {:.0}s", n.elapsed().as_secs_f64()));
    Ok(Report {
        can_i,
        operators_ready,
        lease_holder,
        pods: pods.len(),
        injected,
        running,
        job_completed,
        job_output,
        greedy_reason: greedy.0,
        inside,
        outside: outside.trim().to_owned(),
        after_revocation,
        copy_before,
        copy_after,
        files_gone,
        copy_refused,
        forbidden,
    })
}

fn label<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata.labels.as_ref()?.get(key).map(String::as_str)
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The pod's app container (its first container) is running.
fn app_running(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.first())
        .and_then(|c| c.state.as_ref())
        .is_some_and(|s| s.running.is_some())
}

async fn pod_logs(api: &Api<Pod>, pod: &Pod, container: &str) -> anyhow::Result<String> {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    api.logs(
        name,
        &LogParams {
            container: Some(container.into()),
            ..LogParams::default()
        },
    )
    .await
    .with_context(|| format!("kubectl logs {name} -c {container}"))
}

/// The env of a client using a copy of an AWS shared-credentials file.
fn shared_credentials_env(ini: &str) -> anyhow::Result<Vec<(String, String)>> {
    let value = |key: &str| {
        ini.lines()
            .filter_map(|l| l.split_once('='))
            .find(|(k, _)| k.trim() == key)
            .map(|(_, v)| v.trim().to_owned())
            .with_context(|| format!("the credentials file has no {key}"))
    };
    Ok(vec![
        ("AWS_ACCESS_KEY_ID".into(), value("aws_access_key_id")?),
        (
            "AWS_SECRET_ACCESS_KEY".into(),
            value("aws_secret_access_key")?,
        ),
        ("AWS_SESSION_TOKEN".into(), value("aws_session_token")?),
        ("AWS_REGION".into(), "us-east-1".into()),
    ])
}

/// kubectl with one kubeconfig.
struct Kubectl<'a> {
    program: &'a Path,
    kubeconfig: &'a Path,
}

impl Kubectl<'_> {
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(self.program);
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(args);
        cmd
    }

    /// Its stdout, or an error with its output.
    async fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        run_tool_with_input(&mut self.command(args), "").await
    }
}

/// The files of `examples/`, in order.
pub fn example_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    Ok(files)
}

/// Applies `files` with kubectl, so the apiserver validates them against the CRDs and the
/// webhook injects their pods, edited for this cluster ([`install::localize_example`]).
async fn apply_examples(
    kubectl: &Kubectl<'_>,
    files: &[PathBuf],
    minio_ca: &str,
) -> anyhow::Result<String> {
    let mut out = String::new();
    for file in files {
        let text = install::localize_example(&std::fs::read_to_string(file)?, minio_ca);
        out.push_str(
            &run_tool_with_input(&mut kubectl.command(&["apply", "-f", "-"]), &text)
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

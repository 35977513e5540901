//! The sidecar run the way the kubelet would run it, against the real apiserver, the broker and
//! MinIO, with boto3 (from PyPI) as the app: credentials through the shared-credentials file
//! and through the container endpoint, allowed inside the scope and denied outside; a real
//! refresh; a token rotated under it; the broker stopped and restarted; revocation; SIGTERM.
//!
//! How it mirrors the kubelet: the pod goes through the webhook's mutation (the pure function
//! the webhook serves) and is stored in the apiserver; the sidecar runs with the env of the
//! stored pod's injected sidecar container and boto3 with the env of its app container, the
//! volume paths mapped to the test's directories as the kubelet mounts them. The token is a real
//! pod-bound TokenRequest token (audience `keybroker`) in a file that is replaced by rename as
//! the kubelet rotates it, and the output directory is a plain temporary directory: a tmpfs
//! mount would need a private mount namespace that boto3 then could not see, and the sidecar
//! treats both alike.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use kube::Client;
use kube::api::Api;
use nix::sys::signal::Signal;

use keybroker_contract::wire::AUDIENCE;
use keybroker_e2e::process::Component;
use keybroker_e2e::server_thread::ServerThread;
use keybroker_e2e::sidecar::{binary, python_with_boto3};
use keybroker_e2e::{Cluster, Lifetime, eventually, fixtures, in_namespace, pki, shared_with_crds};
use keybroker_operator::tls::ReloadingCert;
use keybroker_operator::webhook::inject;

/// Refresh after 1 % of the 15-minute lifetime (about 9 s), so refreshes happen in the test.
const REFRESH_FRACTION: &str = "0.01";

/// Everything one test's sidecar needs around it.
struct Pod {
    /// The stored (injected) pod's sidecar env and app env, volume paths mapped to the test's.
    sidecar_env: Vec<(String, String)>,
    app_env: Vec<(String, String)>,
    broker_addr: std::net::SocketAddr,
    dir: PathBuf,
    out: PathBuf,
    token_file: PathBuf,
    ca_file: PathBuf,
    tls: Arc<rustls::ServerConfig>,
    credentials_port: u16,
    health_port: u16,
}

/// The uploader tenant (ApiKey `uploader`: PutObject under `corp-data/<ns>/reports/*`, pod
/// `app` opted in), a broker certificate, and a pod-bound token in a file.
async fn pod(cluster: &Cluster, client: &Client, ns: &str) -> anyhow::Result<Pod> {
    fixtures::uploader_key(cluster, client, ns).await?;

    let dir = keybroker_e2e::run_dir()?;
    let ca = pki::Ca::create(&dir, "broker-test-ca")?;
    let serving = ca.issue_server(&dir, "broker", &["127.0.0.1"])?;
    let tls = Arc::new(ReloadingCert::new(&serving.cert, &serving.key)?.server_config());
    let broker_addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let (credentials_port, health_port) = (free_port()?, free_port()?);

    // The pod as its owner writes it, injected by the webhook's own mutation, then stored.
    let written = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "app", "labels": {"keybroker.dev/inject": "true"},
                     "annotations": {"keybroker.dev/apikeys": "uploader"}},
        "spec": {"serviceAccountName": "uploader", "securityContext": {"fsGroup": 2000},
                 "containers": [{"name": "app", "image": "registry.invalid/app:1"}]},
    });
    let settings = inject::Settings {
        broker_url: format!("https://{broker_addr}"),
        broker_ca: std::fs::read_to_string(&ca.cert)?,
        credentials_port,
        health_port,
        ..fixtures::inject_settings()
    };
    let injected = fixtures::as_injected(written, ns, &settings)?;
    let stored = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), ns)
        .create(&Default::default(), &injected)
        .await?;

    let token_file = dir.join("token");
    rotate_token(
        &token_file,
        &fixtures::token(client, ns, "uploader", AUDIENCE, Some("app")).await?,
    )?;
    let out = dir.join("keybroker");
    std::fs::create_dir(&out)?;
    // The kubelet's mounts: the credentials volume at `out`, the token volume at `dir`.
    let mount = |value: &str| {
        value
            .replace(
                &format!("{}/token", inject::TOKEN_DIR),
                &token_file.display().to_string(),
            )
            .replace(inject::CREDENTIALS_DIR, &out.display().to_string())
    };
    let sidecar = fixtures::injected_sidecar(&stored).context("the stored pod has no sidecar")?;
    let app = stored
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .context("stored pod without containers")?;
    let env_of = |container: &k8s_openapi::api::core::v1::Container| -> Vec<(String, String)> {
        container
            .env
            .iter()
            .flatten()
            .map(|e| {
                (
                    e.name.clone(),
                    mount(e.value.as_deref().unwrap_or_default()),
                )
            })
            .collect()
    };
    Ok(Pod {
        sidecar_env: env_of(sidecar),
        app_env: env_of(app),
        broker_addr,
        out,
        token_file,
        ca_file: ca.cert.clone(),
        tls,
        credentials_port,
        health_port,
        dir,
    })
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Replaces the token file in one rename, as the kubelet's atomic writer does.
fn rotate_token(path: &Path, token: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, token)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Starts the sidecar with the webhook's environment; `ca_inline` passes the CA as PEM text
/// (`KEYBROKER_BROKER_CA`) instead of a file.
async fn start_sidecar(
    pod: &Pod,
    broker: &ServerThread,
    ca_inline: bool,
) -> anyhow::Result<Component> {
    let mut env: Vec<(&str, String)> = pod
        .sidecar_env
        .iter()
        .filter(|(name, _)| ca_inline || name != "KEYBROKER_BROKER_CA")
        .map(|(name, value)| (name.as_str(), value.clone()))
        .collect();
    ensure!(
        env.contains(&("KEYBROKER_BROKER_URL", format!("https://{}", broker.addr))),
        "the injected broker URL is not the broker's: {env:?}"
    );
    // Test-only: refresh within the test, and debug logs to search for secrets.
    env.push(("KEYBROKER_REFRESH_FRACTION", REFRESH_FRACTION.into()));
    env.push(("KEYBROKER_LOG_LEVEL", "debug".into()));
    if !ca_inline {
        env.push((
            "KEYBROKER_BROKER_CA_FILE",
            pod.ca_file.display().to_string(),
        ));
    }
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut sidecar = Component::spawn(
        "keybroker-sidecar",
        &binary().await?,
        &[],
        &env,
        &pod.dir.join("sidecar.log"),
        Lifetime::TiedToProcess,
    )?;
    let startup = format!("http://127.0.0.1:{}/startupz", pod.health_port);
    sidecar
        .wait_ready("GET /startupz", Duration::from_secs(30), || async {
            get(&startup, None)
                .await
                .is_ok_and(|(status, _)| status == 200)
        })
        .await?;
    Ok(sidecar)
}

/// A plain-HTTP GET on loopback: status and body.
async fn get(url: &str, authorization: Option<&str>) -> anyhow::Result<(u16, String)> {
    use http_body_util::{BodyExt, Empty};
    let uri: hyper::Uri = url.parse()?;
    let addr = format!(
        "{}:{}",
        uri.host().context("host")?,
        uri.port_u16().context("port")?
    );
    let tcp = tokio::net::TcpStream::connect(&addr).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let mut req = hyper::Request::get(uri.path()).header("host", addr);
    if let Some(auth) = authorization {
        req = req.header("authorization", auth);
    }
    let response = sender
        .send_request(req.body(Empty::<hyper::body::Bytes>::new())?)
        .await?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The credentials in `<out>/uploader/credentials.json`, if present.
fn on_disk(out: &Path) -> Option<serde_json::Value> {
    serde_json::from_slice(&std::fs::read(out.join("uploader/credentials.json")).ok()?).ok()
}

/// Adds the secret parts of the credentials on disk to `secrets` (to look for them in logs).
fn remember(secrets: &mut Vec<String>, out: &Path) {
    if let Some(c) = on_disk(out) {
        for field in ["SecretAccessKey", "SessionToken"] {
            if let Some(s) = c[field].as_str() {
                secrets.push(s.to_owned());
            }
        }
    }
}

fn key_id(out: &Path) -> Option<String> {
    on_disk(out).and_then(|c| c["AccessKeyId"].as_str().map(str::to_owned))
}

async fn metrics(pod: &Pod) -> String {
    get(
        &format!("http://127.0.0.1:{}/metrics", pod.health_port),
        None,
    )
    .await
    .map(|(_, body)| body)
    .unwrap_or_default()
}

/// What boto3 did: which credential provider it used, the key id, and each PUT's outcome.
#[derive(Debug, serde::Deserialize)]
struct Boto3 {
    method: String,
    access_key_id: String,
    inside: String,
    outside: String,
}

const BOTO3_SCRIPT: &str = r#"
import json, sys
import boto3, botocore
from botocore.config import Config
endpoint, inside, outside = sys.argv[1:4]
session = boto3.session.Session(region_name="us-east-1")
creds = session.get_credentials()
s3 = session.client("s3", endpoint_url=endpoint,
                    config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))
def put(key):
    try:
        s3.put_object(Bucket="corp-data", Key=key, Body=b"keybroker e2e via boto3")
        return "ok"
    except botocore.exceptions.ClientError as e:
        return e.response["Error"]["Code"]
print(json.dumps({"method": creds.method, "access_key_id": creds.get_frozen_credentials().access_key,
                  "inside": put(inside), "outside": put(outside)}))
"#;

/// Runs boto3 as the app would: no AWS settings but what the webhook injects for `via`.
async fn boto3(
    cluster: &Cluster,
    pod: &Pod,
    ns: &str,
    via_endpoint: bool,
) -> anyhow::Result<Boto3> {
    let python = tokio::task::spawn_blocking(python_with_boto3).await??;
    let minio = cluster.minio.as_ref().context("no MinIO")?;
    let mut cmd = tokio::process::Command::new(python);
    cmd.args(["-c", BOTO3_SCRIPT, &minio.endpoint])
        .arg(format!("{ns}/reports/boto3.csv"))
        .arg(format!("{ns}/elsewhere/boto3.csv"))
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", &pod.dir)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .env("AWS_CONFIG_FILE", pod.dir.join("no-aws-config"))
        .env("AWS_EC2_METADATA_DISABLED", "true");
    if via_endpoint {
        // Exactly the env the webhook gave the app container.
        cmd.envs(pod.app_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env(
                "AWS_SHARED_CREDENTIALS_FILE",
                pod.dir.join("no-credentials"),
            );
    } else {
        cmd.env(
            "AWS_SHARED_CREDENTIALS_FILE",
            pod.out.join("uploader/credentials"),
        );
    }
    let out = cmd.output().await?;
    ensure!(
        out.status.success(),
        "boto3 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

#[tokio::test]
async fn boto3_works_through_refreshes_a_token_rotation_a_broker_outage_and_loses_access_on_revocation()
-> anyhow::Result<()> {
    let cluster = shared_with_crds().await?;
    in_namespace(cluster, "sc-life", |client, ns| async move {
        let cluster = keybroker_e2e::shared().await?;
        let pod = pod(cluster, &client, &ns).await?;
        let mut broker =
            ServerThread::broker(&cluster.kubeconfig, pod.broker_addr, Arc::clone(&pod.tls))
                .await?;
        let sidecar = start_sidecar(&pod, &broker, true).await?;
        let mut secrets: Vec<String> = vec![std::fs::read_to_string(&pod.token_file)?];
        remember(&mut secrets, &pod.out);

        // Files: the set is complete, readable by owner and group only.
        for file in ["credentials", "credentials.json", "expiration"] {
            let mode = std::fs::metadata(pod.out.join("uploader").join(file))?
                .permissions()
                .mode();
            ensure!(mode & 0o777 == 0o440, "{file} has mode {:o}", mode & 0o777);
        }
        let dir_mode = std::fs::metadata(pod.out.join("uploader"))?
            .permissions()
            .mode();
        ensure!(
            dir_mode & 0o777 == 0o750,
            "directory mode {:o}",
            dir_mode & 0o777
        );
        let auth_mode = std::fs::metadata(pod.out.join(".auth-token"))?
            .permissions()
            .mode();
        ensure!(
            auth_mode & 0o777 == 0o440,
            ".auth-token mode {:o}",
            auth_mode & 0o777
        );

        // The real workload, both ways: inside the scope allowed, outside denied.
        let first = key_id(&pod.out).context("no credentials.json")?;
        let via_file = boto3(cluster, &pod, &ns, false).await?;
        let via_endpoint = boto3(cluster, &pod, &ns, true).await?;
        for (run, method) in [
            (&via_file, "shared-credentials-file"),
            (&via_endpoint, "container-role"),
        ] {
            ensure!(run.method == method, "{run:?}");
            ensure!(run.inside == "ok", "PUT inside the scope: {run:?}");
            ensure!(
                run.outside == "AccessDenied",
                "PUT outside the scope: {run:?}"
            );
        }
        ensure!(!via_file.access_key_id.is_empty() && !via_endpoint.access_key_id.is_empty());
        // The endpoint wants the token.
        let url = format!(
            "http://127.0.0.1:{}/v1/credentials/uploader",
            pod.credentials_port
        );
        ensure!(get(&url, None).await?.0 == 401);
        ensure!(get(&url, Some("wrong")).await?.0 == 401);

        // A real refresh, through the broker.
        let refreshed = eventually("a refresh", Duration::from_secs(30), || async {
            key_id(&pod.out).filter(|id| *id != first)
        })
        .await?;
        remember(&mut secrets, &pod.out);

        // The kubelet rotates the token: the sidecar reads the new one. A broken token first
        // (refused with 401: the credentials in place stay), then a valid one.
        rotate_token(&pod.token_file, "not-a-token")?;
        eventually(
            "a TokenRejected failure",
            Duration::from_secs(30),
            || async {
                metrics(&pod)
                    .await
                    .contains("reason=\"TokenRejected\"")
                    .then_some(())
            },
        )
        .await?;
        let kept = key_id(&pod.out).context("credentials removed after a 401")?;
        let token = fixtures::token(&client, &ns, "uploader", AUDIENCE, Some("app")).await?;
        secrets.push(token.clone());
        rotate_token(&pod.token_file, &token)?;
        let rotated = eventually(
            "a refresh with the rotated token",
            Duration::from_secs(30),
            || async { key_id(&pod.out).filter(|id| *id != kept) },
        )
        .await?;
        remember(&mut secrets, &pod.out);
        ensure!(rotated != refreshed);

        // The broker goes away during a refresh: the credentials in place stay (file and
        // endpoint), then fresh ones arrive once it is back on the same address.
        let addr = broker.addr;
        broker.stop();
        let before_outage = key_id(&pod.out).context("no credentials")?;
        eventually(
            "a BrokerUnreachable failure",
            Duration::from_secs(30),
            || async {
                metrics(&pod)
                    .await
                    .contains("reason=\"BrokerUnreachable\"")
                    .then_some(())
            },
        )
        .await?;
        ensure!(
            key_id(&pod.out).as_deref() == Some(before_outage.as_str()),
            "credentials changed or vanished while the broker was down"
        );
        let token_file = std::fs::read_to_string(pod.out.join(".auth-token"))?;
        let (status, body) = get(&url, Some(&token_file)).await?;
        ensure!(
            status == 200 && body.contains(&before_outage),
            "endpoint during the outage: {status}"
        );
        let mut broker =
            ServerThread::broker(&cluster.kubeconfig, addr, Arc::clone(&pod.tls)).await?;
        eventually(
            "fresh credentials after the broker returned",
            Duration::from_secs(60),
            || async { key_id(&pod.out).filter(|id| *id != before_outage) },
        )
        .await?;
        remember(&mut secrets, &pod.out);
        let after = boto3(cluster, &pod, &ns, true).await?;
        ensure!(
            after.inside == "ok" && after.outside == "AccessDenied",
            "{after:?}"
        );

        // A change that keeps the pod entitled (a longer TTL): MinIO revokes the held
        // credentials, and the broker's poll tells the sidecar to fetch new ones at once.
        let _controller = fixtures::Controller::start(&client, &ns);
        let first = fixtures::recorded_grant(&client, &ns, "uploader", None).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let held = key_id(&pod.out).context("no credentials")?;
        let changed_at = Instant::now();
        Api::<keybroker_operator::crd::ApiKey>::namespaced(client.clone(), &ns)
            .patch(
                "uploader",
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(serde_json::json!({"spec": {"ttl": "20m"}})),
            )
            .await?;
        fixtures::recorded_grant(&client, &ns, "uploader", Some(&first)).await?;
        eventually(
            "credentials of the new grant in the files",
            Duration::from_secs(10),
            || async { key_id(&pod.out).filter(|id| *id != held) },
        )
        .await?;
        eprintln!(
            "new credentials in the files {:?} after the change",
            changed_at.elapsed()
        );
        let log = std::fs::read_to_string(sidecar.log_path())?;
        ensure!(
            log.contains("the ApiKey's rights changed: fetching new credentials now"),
            "the sidecar was not told to renew"
        );
        remember(&mut secrets, &pod.out);
        let renewed = boto3(cluster, &pod, &ns, false).await?;
        ensure!(
            renewed.inside == "ok" && renewed.outside == "AccessDenied",
            "{renewed:?}"
        );

        // Revocation: the files are gone within a second (a product requirement). The fresh
        // credentials woke the revocation poller; give its long-poll a moment to arrive.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let revoked_at = Instant::now();
        fixtures::revoke(&client, &ns, "uploader").await?;
        let gone = loop {
            // The visible name goes first, then every generation behind it.
            if std::fs::symlink_metadata(pod.out.join("uploader")).is_err()
                && !pod.out.join("..keybroker/uploader").exists()
            {
                break revoked_at.elapsed();
            }
            ensure!(
                revoked_at.elapsed() < Duration::from_secs(10),
                "credentials still there 10 s after revocation"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        eprintln!("credentials removed {gone:?} after the revocation was applied");
        ensure!(
            gone < Duration::from_secs(1),
            "files gone only after {gone:?}"
        );
        ensure!(get(&url, Some(&token_file)).await?.0 == 404);
        ensure!(metrics(&pod).await.contains(
            "keybroker_sidecar_credentials_removed_total{apikey=\"uploader\",cause=\"revoked\"} 1"
        ));
        broker.stop();

        // Logs are JSON and hold no secret: not the SA tokens, not a secret key or session token.
        let log = std::fs::read_to_string(sidecar.log_path())?;
        ensure!(
            log.lines().count() > 3,
            "suspiciously few log lines:\n{log}"
        );
        for line in log.lines() {
            ensure!(
                serde_json::from_str::<serde_json::Value>(line).is_ok(),
                "not JSON: {line}"
            );
        }
        ensure!(
            secrets.len() >= 8,
            "collected only {} secrets",
            secrets.len()
        );
        for secret in &secrets {
            ensure!(
                !log.contains(secret.as_str()),
                "a secret appears in the sidecar's log"
            );
        }
        drop(sidecar);
        std::fs::remove_dir_all(&pod.dir).ok();
        Ok(())
    })
    .await
}

#[tokio::test]
async fn sigterm_removes_the_credentials_and_exits_zero() -> anyhow::Result<()> {
    let cluster = shared_with_crds().await?;
    in_namespace(cluster, "sc-term", |client, ns| async move {
        let cluster = keybroker_e2e::shared().await?;
        let pod = pod(cluster, &client, &ns).await?;
        let broker =
            ServerThread::broker(&cluster.kubeconfig, pod.broker_addr, Arc::clone(&pod.tls))
                .await?;
        let mut sidecar = start_sidecar(&pod, &broker, false).await?;
        ensure!(pod.out.join("uploader/credentials").exists());
        sidecar.signal(Signal::SIGTERM);
        let status = sidecar
            .wait_exit(Duration::from_secs(5))
            .context("still running 5 s after SIGTERM")?;
        ensure!(status.success(), "exited with {status}");
        let left: Vec<_> = std::fs::read_dir(&pod.out)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        ensure!(left.is_empty(), "left behind after SIGTERM: {left:?}");
        std::fs::remove_dir_all(&pod.dir).ok();
        Ok(())
    })
    .await
}

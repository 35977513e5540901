//! `revocation`: the revocation drill. The release operator (controller and broker, as one
//! process) serves `--sidecars` real sidecar processes, spread over `--revocations` ApiKeys,
//! against MinIO; every sidecar holds credentials and waits on its revocation long-poll. The
//! ApiKeys are then revoked one after another. For each revocation: the time from the patch to
//! MinIO refusing the credentials a client already holds (one S3 client built before the
//! revocation and reused, as an SDK caches credentials), and to the files being gone in every
//! sidecar of that ApiKey. Also the operator's RSS and CPU while the sidecars wait. The floor
//! is the time for MinIO itself to refuse the same kind of credentials after a direct call of
//! its `revoke-tokens` endpoint, measured in the same run.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use futures::StreamExt;
use kube::api::{Api, Patch, PatchParams};

use keybroker_e2e::process::Component;
use keybroker_e2e::sidecar::HostPod;
use keybroker_e2e::{Lifetime, fixtures, pki};
use keybroker_operator::crd::{ApiKey, KeyProvider};

use super::*;

/// How long a revocation may take before the drill calls it failed.
const GIVE_UP: Duration = Duration::from_secs(20);

/// One sidecar run as the kubelet would run it for an opted-in pod.
struct RunningSidecar {
    key: usize,
    pod: HostPod,
    _process: Component,
}

impl RunningSidecar {
    fn credentials_file(&self) -> PathBuf {
        self.pod
            .out
            .join(api_key_name(self.key))
            .join(keybroker_contract::files::CREDENTIALS_JSON)
    }
}

fn api_key_name(k: usize) -> String {
    format!("key-{k:03}")
}

pub(crate) async fn revocation(
    sidecars: usize,
    revocations: usize,
    operator: &Path,
    sidecar: &Path,
) -> anyhow::Result<()> {
    ensure!(
        revocations > 0 && sidecars >= revocations && sidecars <= 6000,
        "--sidecars must be at least --revocations (> 0), and at most 6,000 (ports 20000-31999)"
    );
    let operator = std::path::absolute(operator)?;
    let sidecar_bin = std::path::absolute(sidecar)?;
    for bin in [&operator, &sidecar_bin] {
        ensure!(bin.exists(), "{} missing: run `make bench`", bin.display());
    }
    let (dir, cluster, client) = start_cluster().await?;
    let ns = "drill";
    create_namespace(&client, ns).await?;
    create_namespace(&client, "keybroker-system").await?;
    let provider = fixtures::tenant(&cluster, &client, ns).await?;
    Api::<KeyProvider>::all(client.clone())
        .patch(
            &provider,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({
                "spec": {"guardrails": {"maxIssuancesPerMinute": 100000}}
            })),
        )
        .await?;
    fixtures::service_account(&client, ns, "uploader").await?;
    for k in 0..revocations {
        fixtures::apikey(
            &client,
            ns,
            &api_key_name(k),
            &provider,
            &["s3:PutObject"],
            &[fixtures::object_arn(ns, &format!("k{k}/*"))],
            Some("15m"),
        )
        .await?;
    }

    let ca = pki::Ca::create(&dir, "drill-ca")?;
    let serving = ca.issue_server(&dir, "broker", &["127.0.0.1"])?;
    let broker_addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let mut operator_process = Component::spawn(
        "keybroker-operator",
        &operator,
        &[
            "--roles=controller,broker".into(),
            format!("--broker-addr={broker_addr}"),
            "--metrics-addr=127.0.0.1:0".into(),
            "--namespace=keybroker-system".into(),
            format!("--sidecar-image={}", fixtures::SIDECAR_IMAGE),
            format!("--tls-cert-file={}", serving.cert.display()),
            format!("--tls-key-file={}", serving.key.display()),
        ],
        &[
            (
                "KUBECONFIG",
                cluster.kubeconfig.to_str().context("kubeconfig path")?,
            ),
            ("RUST_LOG", "warn"),
        ],
        &dir.join("operator.log"),
        Lifetime::TiedToProcess,
    )?;
    eprintln!("waiting for {revocations} grants...");
    for k in 0..revocations {
        fixtures::recorded_grant(&client, ns, &api_key_name(k), None).await?;
    }

    // The pods, as the webhook stores them, and their sidecars.
    let settings = keybroker_operator::webhook::inject::Settings {
        broker_url: format!("https://{broker_addr}"),
        broker_ca: std::fs::read_to_string(&ca.cert)?,
        ..fixtures::inject_settings()
    };
    eprintln!("starting {sidecars} sidecars...");
    let started = Instant::now();
    let sidecar_dir = dir.join("sidecars");
    std::fs::create_dir_all(&sidecar_dir)?;
    let running: Vec<RunningSidecar> = futures::stream::iter(0..sidecars)
        .map(|j| {
            let (client, settings, sidecar_dir, sidecar_bin) = (
                client.clone(),
                settings.clone(),
                sidecar_dir.clone(),
                sidecar_bin.clone(),
            );
            async move {
                let key = j % revocations;
                let name = format!("p-{j:04}");
                let written = serde_json::json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": name, "labels": {"keybroker.dev/inject": "true"},
                                 "annotations": {"keybroker.dev/apikeys": api_key_name(key)}},
                    "spec": {"serviceAccountName": "uploader",
                             "containers": [{"name": "app", "image": "registry.invalid/app:1"}]},
                });
                let stored = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), ns)
                    .create(
                        &Default::default(),
                        &fixtures::as_injected(written, ns, &settings)?,
                    )
                    .await?;
                let container =
                    fixtures::injected_sidecar(&stored).context("the stored pod has no sidecar")?;
                // Below Linux's ephemeral range (32768-60999), so that no outgoing connection
                // takes a sidecar's port between choosing and binding it.
                let port = |n: usize| -> anyhow::Result<std::net::SocketAddr> {
                    Ok(format!("127.0.0.1:{}", 20_000 + 2 * j + n).parse()?)
                };
                let pod = HostPod::with_ports(&sidecar_dir, &name, port(0)?, port(1)?)?;
                let token = fixtures::token(
                    &client,
                    ns,
                    "uploader",
                    keybroker_contract::wire::AUDIENCE,
                    Some(&name),
                )
                .await?;
                std::fs::write(pod.token_file(), token)?;
                let env = pod.env(container);
                let env: Vec<(&str, &str)> =
                    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                let process = Component::spawn(
                    "keybroker-sidecar",
                    &sidecar_bin,
                    &[],
                    &env,
                    &sidecar_dir.join(format!("{name}.log")),
                    Lifetime::TiedToProcess,
                )?;
                anyhow::Ok(RunningSidecar {
                    key,
                    pod,
                    _process: process,
                })
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    let deadline = Instant::now() + Duration::from_secs(300);
    while running.iter().any(|s| !s.credentials_file().exists()) {
        ensure!(
            Instant::now() < deadline,
            "not every sidecar had credentials within 300 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let start_up = started.elapsed();

    // The operator while every sidecar waits on its long-poll.
    let pid = operator_process.pid();
    let idle = Duration::from_secs(10);
    let (ticks_before, at) = (cpu_ticks(pid)?, Instant::now());
    tokio::time::sleep(idle).await;
    let cpu_percent =
        (cpu_ticks(pid)? - ticks_before) as f64 / USER_HZ / at.elapsed().as_secs_f64() * 100.0;
    let rss_waiting_mib = rss_kib(pid)? as f64 / 1024.0;

    let minio = cluster.minio.as_ref().context("no MinIO")?;
    let floor =
        direct_revocation_floor(&cluster, &client, &provider, ns, revocations.min(20)).await?;
    let mut to_refused = Vec::with_capacity(revocations);
    let mut to_files_gone = Vec::with_capacity(revocations);
    let keys = Api::<ApiKey>::namespaced(client.clone(), ns);
    for k in 0..revocations {
        let holder = running
            .iter()
            .find(|s| s.key == k)
            .context("no sidecar for a key")?;
        let cached = s3_client_from(&minio.endpoint, &holder.credentials_file())?;
        let object = format!("{ns}/k{k}/drill");
        ensure!(
            fixtures::put_object(&cached, &object).await.is_none(),
            "the credentials of {} did not work before the revocation",
            api_key_name(k)
        );
        let patched = Instant::now();
        keys.patch(
            &api_key_name(k),
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"revoked": true}})),
        )
        .await?;
        let refused = async {
            while fixtures::put_object(&cached, &object).await.is_none() {
                ensure!(
                    patched.elapsed() < GIVE_UP,
                    "still accepted after {GIVE_UP:?}"
                );
            }
            anyhow::Ok(patched.elapsed())
        };
        let files_gone = async {
            let files: Vec<PathBuf> = running
                .iter()
                .filter(|s| s.key == k)
                .map(RunningSidecar::credentials_file)
                .collect();
            while files.iter().any(|f| f.exists()) {
                ensure!(
                    patched.elapsed() < GIVE_UP,
                    "files still there after {GIVE_UP:?}"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            anyhow::Ok(patched.elapsed())
        };
        let (refused, files_gone) = tokio::try_join!(refused, files_gone)?;
        to_refused.push(refused);
        to_files_gone.push(files_gone);
    }
    let rss_after_mib = rss_kib(pid)? as f64 / 1024.0;

    println!();
    println!(
        "revocation drill: {sidecars} sidecars on {revocations} ApiKeys, all with credentials {:.1} s after start; {revocations} revocations one after another",
        start_up.as_secs_f64()
    );
    println!();
    println!(
        "| {:<52} | {:>5} | {:>8} | {:>8} | {:>8} | {:>8} |",
        "from the patch (or the direct call) to", "n", "p50 ms", "p99 ms", "max ms", "target"
    );
    println!(
        "|{:-<54}|{:->7}|{:->10}|{:->10}|{:->10}|{:->10}|",
        "", "", "", "", "", ""
    );
    for (what, samples, target) in [
        (
            "the cached client refused by MinIO (keybroker)",
            &mut to_refused,
            "< 1000",
        ),
        (
            "the files gone in every sidecar of the ApiKey",
            &mut to_files_gone,
            "< 1000",
        ),
        (
            "refused after a direct revoke-tokens call (floor)",
            &mut floor.clone(),
            "",
        ),
    ] {
        samples.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let pick = |q: f64| ms(samples[((samples.len() - 1) as f64 * q).round() as usize]);
        println!(
            "| {:<52} | {:>5} | {:>8.0} | {:>8.0} | {:>8.0} | {:>8} |",
            what,
            samples.len(),
            pick(0.50),
            pick(0.99),
            pick(1.0),
            target
        );
    }
    println!();
    println!(
        "operator (controller + broker) while {sidecars} sidecars wait on their long-polls: RSS {rss_waiting_mib:.0} MiB, CPU {cpu_percent:.1}% of one core over {} s; RSS after the drill {rss_after_mib:.0} MiB",
        idle.as_secs()
    );
    drop(running);
    operator_process.stop(Duration::from_secs(5));
    drop(cluster);
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}

/// An S3 client holding the credentials in `credentials.json` (the `credential_process`
/// format), built once: it keeps them whatever happens to the file.
fn s3_client_from(endpoint: &str, file: &Path) -> anyhow::Result<aws_sdk_s3::Client> {
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(file)?)?;
    let field = |name: &str| {
        json[name]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("no {name} in {}", file.display()))
    };
    Ok(fixtures::s3_client(
        endpoint,
        &field("AccessKeyId")?,
        &field("SecretAccessKey")?,
        Some(&field("SessionToken")?),
    ))
}

/// The floor: MinIO's own time to refuse a session after the provider seam's revoke call made
/// directly (no controller, no watch): a session minted through the same seam with its tag,
/// the call, then PUTs with the cached session until refused; `n` times.
async fn direct_revocation_floor(
    cluster: &Cluster,
    client: &Client,
    provider: &str,
    ns: &str,
    n: usize,
) -> anyhow::Result<Vec<Duration>> {
    use keybroker_operator::providers::aws::{mint, revoke, sts_client};
    use keybroker_operator::revocation::revoke_tag;
    let minio = cluster.minio.as_ref().context("no MinIO")?;
    let kp = Api::<KeyProvider>::all(client.clone())
        .get(provider)
        .await?;
    let aws = kp.spec.aws.context("the provider is not of kind aws")?;
    let sts = sts_client(client, &aws)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let policy = format!(
        r#"{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow","Action":["s3:PutObject"],"Resource":["{}"]}}]}}"#,
        fixtures::object_arn(ns, "floor/*")
    );
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let grant = format!("floor{i}");
        let tag = revoke_tag(ns, "floor", &grant);
        let minted = mint::assume_role(
            &sts,
            &aws,
            mint::Request {
                session_name: "bench.floor".into(),
                session_policy: &policy,
                ttl: Duration::from_secs(900),
                revoke_tag: &tag,
                source_identity: "floor",
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        let creds = &minted.credentials;
        let cached = fixtures::s3_client(
            &minio.endpoint,
            &creds.access_key_id,
            &creds.secret_access_key,
            Some(&creds.session_token),
        );
        let object = format!("{ns}/floor/{i}");
        ensure!(
            fixtures::put_object(&cached, &object).await.is_none(),
            "the floor's session did not work"
        );
        let called = Instant::now();
        revoke::revoke(client, &aws, ns, "floor", &grant)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        while fixtures::put_object(&cached, &object).await.is_none() {
            ensure!(
                called.elapsed() < GIVE_UP,
                "the floor's session still accepted"
            );
        }
        samples.push(called.elapsed());
    }
    Ok(samples)
}

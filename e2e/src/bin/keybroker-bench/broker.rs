//! `broker`: token exchanges through the release operator's broker vs. direct AssumeRole.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};

use keybroker_e2e::{Lifetime, process::Component};
use keybroker_operator::crd::ApiKey;

use super::*;

pub(crate) async fn broker(requests: usize, operator: &PathBuf) -> anyhow::Result<()> {
    use keybroker_e2e::fixtures;
    let operator = std::path::absolute(operator)?;
    ensure!(
        operator.exists(),
        "{} missing: run `cargo build --release -p keybroker-operator`",
        operator.display()
    );
    let (dir, cluster, client) = start_cluster().await?;
    let ns = "bench";
    create_namespace(&client, ns).await?;
    fixtures::uploader(&cluster, &client, ns).await?;
    let provider = format!("{ns}-s3");
    Api::<keybroker_operator::crd::KeyProvider>::all(client.clone())
        .patch(
            &provider,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({
                "spec": {"guardrails": {"maxIssuancesPerMinute": 100000}}
            })),
        )
        .await?;
    let token = fixtures::token(
        &client,
        ns,
        "uploader",
        keybroker_contract::wire::AUDIENCE,
        Some("app"),
    )
    .await?;

    let (mut component, addr, client_https) = spawn_broker(&dir, &cluster, &operator)?;
    let body = first_exchange(&mut component, &client_https, &token, "uploader").await?;

    // Direct AssumeRole with the same session policy, as the floor.
    let minio = cluster.minio.as_ref().context("no MinIO")?;
    let secret = Api::<Secret>::namespaced(client.clone(), ns)
        .get("broker-keys")
        .await?;
    let field = |k: &str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(k))
            .map(|v| String::from_utf8_lossy(&v.0).into_owned())
            .unwrap_or_default()
    };
    let sts = aws_sdk_sts::Client::from_conf(
        aws_sdk_sts::Config::builder()
            .behavior_version(aws_sdk_sts::config::BehaviorVersion::latest())
            .region(aws_sdk_sts::config::Region::new("us-east-1"))
            .endpoint_url(&minio.endpoint)
            .credentials_provider(aws_sdk_sts::config::Credentials::new(
                field("AWS_ACCESS_KEY_ID"),
                field("AWS_SECRET_ACCESS_KEY"),
                None,
                None,
                "bench",
            ))
            .build(),
    );
    let key: ApiKey = Api::namespaced(client.clone(), ns).get("uploader").await?;
    let kp = Api::<keybroker_operator::crd::KeyProvider>::all(client.clone())
        .get(&provider)
        .await?;
    let policy = keybroker_operator::policy::compile(&key.spec, &kp.spec.guardrails, ns)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .session_policy;

    load_table_header();
    let mut summary = Vec::new();
    for level in LEVELS {
        let (sts_for_load, policy_for_load) = (sts.clone(), policy.clone());
        let direct = load(level, requests, move |_| {
            let (sts, policy) = (sts_for_load.clone(), policy_for_load.clone());
            async move {
                sts.assume_role()
                    .role_arn("arn:aws:iam::000000000000:role/keybroker-e2e")
                    .role_session_name("bench.direct")
                    .policy(policy)
                    .duration_seconds(900)
                    .send()
                    .await
                    .map(drop)
                    .map_err(|e| anyhow::anyhow!("{e}"))
            }
        })
        .await?;
        let brokered = brokered_load(level, requests, &client_https, &token, &body).await?;
        load_table_row("direct AssumeRole", level, requests, &direct);
        load_table_row("broker exchange (TLS)", level, requests, &brokered);
        summary.push((
            level,
            brokered.p50_ms - direct.p50_ms,
            brokered.rate / direct.rate,
        ));
    }
    println!();
    for (level, overhead, ratio) in summary {
        println!(
            "concurrency {level:>2}: broker overhead p50 {overhead:.2} ms (target < 1 ms), throughput {:.0}% of direct STS (target >= 90%)",
            ratio * 100.0
        );
    }
    // Exchanges one after another (a sidecar's pace is far slower), alone and under the attack
    // tests' hostile load against the same broker.
    println!();
    let pid = component.pid();
    let one_by_one = |n: usize| {
        let (client_https, token, body) = (client_https.clone(), token.clone(), body.clone());
        async move {
            let mut conn = client_https.connect().await?;
            let mut samples = Vec::with_capacity(n);
            let started = Instant::now();
            for _ in 0..n {
                let at = Instant::now();
                let reply = conn
                    .send("POST", "/v1/exchange", Some(&token), body.clone())
                    .await?;
                ensure!(reply.status == 200, "exchange failed: {}", reply.status);
                samples.push(at.elapsed());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let (p50, p99) = keybroker_e2e::attack::percentiles(&mut samples);
            anyhow::Ok((n as f64 / started.elapsed().as_secs_f64(), p50, p99))
        }
    };
    let quiet = one_by_one(300).await?;
    let quiet_rss = rss_kib(pid)? / 1024;
    let attack = hostile::on_broker(addr, &client_https, &token).await;
    let attacked = one_by_one(300).await?;
    let attacked_rss = rss_kib(pid)? / 1024;
    let what = attack.what.clone();
    drop(attack);
    println!(
        "| {:<44} | {:>8} | {:>8} | {:>8} | {:>8} |",
        "exchanges one by one (20 ms apart)", "req/s", "p50 ms", "p99 ms", "RSS MiB"
    );
    println!(
        "|{:-<46}|{:->10}|{:->10}|{:->10}|{:->10}|",
        "", "", "", "", ""
    );
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    for (when, (rate, p50, p99), rss) in [
        ("alone".to_owned(), quiet, quiet_rss),
        (format!("under attack ({what})"), attacked, attacked_rss),
    ] {
        println!(
            "| {:<44} | {:>8.0} | {:>8.2} | {:>8.2} | {:>8} |",
            when,
            rate,
            ms(p50),
            ms(p99),
            rss
        );
    }
    println!("(target under attack: p99 < 100 ms)");
    component.stop(Duration::from_secs(5));
    drop(cluster);
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}

/// The release operator as the broker alone (`--roles=broker`), serving TLS on a free port of
/// 127.0.0.1 with a certificate of a fresh CA; the process, its address, and a client trusting
/// that CA.
pub(crate) fn spawn_broker(
    dir: &std::path::Path,
    cluster: &Cluster,
    operator: &std::path::Path,
) -> anyhow::Result<(
    Component,
    std::net::SocketAddr,
    keybroker_e2e::https::Client,
)> {
    use keybroker_e2e::{fixtures, https, pki};
    let ca = pki::Ca::create(dir, "bench-ca")?;
    let serving = ca.issue_server(dir, "broker", &["127.0.0.1"])?;
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let component = Component::spawn(
        "keybroker-operator",
        operator,
        &[
            "--roles=broker".into(),
            // Issuance counts go to ConfigMaps of the operator's namespace.
            "--namespace=default".into(),
            format!("--broker-addr={addr}"),
            "--metrics-addr=127.0.0.1:0".into(),
            // The image the stored pods' sidecar runs: the broker serves only injected pods.
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
        &dir.join("broker.log"),
        Lifetime::TiedToProcess,
    )?;
    Ok((component, addr, https::Client::new(addr, &ca.cert)?))
}

/// `requests` exchanges of ApiKey `body` with pod `token` on `level` workers, each its own
/// connection from its own address (the broker caps exchanges in flight per client, as for
/// pods).
/// Waits until the broker answers an exchange of `token` for ApiKey `api_key`; returns the
/// request body, for [`brokered_load`].
pub(crate) async fn first_exchange(
    component: &mut Component,
    client_https: &keybroker_e2e::https::Client,
    token: &str,
    api_key: &str,
) -> anyhow::Result<Vec<u8>> {
    let body = serde_json::to_vec(&keybroker_contract::wire::ExchangeRequest {
        api_key: api_key.into(),
    })?;
    component
        .wait_ready("the first exchange", Duration::from_secs(60), || async {
            client_https
                .send("POST", "/v1/exchange", Some(token), body.clone())
                .await
                .is_ok_and(|r| r.status == 200)
        })
        .await?;
    Ok(body)
}

pub(crate) async fn brokered_load(
    level: usize,
    requests: usize,
    client_https: &keybroker_e2e::https::Client,
    token: &str,
    body: &[u8],
) -> anyhow::Result<LoadResult> {
    let connections = futures::future::try_join_all((0..level).map(|worker| {
        let client =
            client_https.from_source(std::net::IpAddr::from([127, 0, 1, 1 + worker as u8]));
        async move { client.connect().await }
    }))
    .await?;
    let connections: Vec<_> = connections
        .into_iter()
        .map(tokio::sync::Mutex::new)
        .collect();
    let connections = std::sync::Arc::new(connections);
    let (token, body) = (token.to_owned(), body.to_vec());
    load(level, requests, move |worker| {
        let (connections, token, body) = (
            std::sync::Arc::clone(&connections),
            token.clone(),
            body.clone(),
        );
        async move {
            let mut conn = connections[worker].lock().await;
            let reply = conn
                .send("POST", "/v1/exchange", Some(&token), body)
                .await?;
            ensure!(
                reply.status == 200,
                "exchange failed: {} {}",
                reply.status,
                String::from_utf8_lossy(&reply.body)
            );
            Ok(())
        }
    })
    .await
}

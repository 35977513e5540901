//! `controller`: ApiKeys reconciled by the release operator vs. a plain client writing the same
//! statuses (the floor).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use futures::{StreamExt, TryStreamExt};
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};

use keybroker_e2e::{Cluster, Lifetime, process::Component};
use keybroker_operator::crd::ApiKey;

use super::*;

pub(crate) async fn controller(
    keys: usize,
    namespaces: usize,
    rss_keys: usize,
    operator: &PathBuf,
) -> anyhow::Result<()> {
    let operator = std::path::absolute(operator)?;
    ensure!(
        operator.exists(),
        "{} missing: run `cargo build --release -p keybroker-operator`",
        operator.display()
    );
    let (dir, cluster, client) = start_cluster().await?;
    let minio = cluster.minio.as_ref().context("no MinIO")?;
    let broker = minio.create_s3_user("broker-bench")?;
    create_namespace(&client, "keybroker-system").await?;
    keybroker_e2e::fixtures::secret(
        &client,
        "keybroker-system",
        "broker-keys",
        &broker.access_key_id,
        &broker.secret_access_key,
    )
    .await?;
    Api::<keybroker_operator::crd::KeyProvider>::all(client.clone())
        .patch("bench", &PatchParams::apply("bench"), &Patch::Apply(serde_json::json!({
            "apiVersion": "keybroker.dev/v1alpha1", "kind": "KeyProvider",
            "metadata": {"name": "bench"},
            "spec": {
                "aws": {"roleArn": "arn:aws:iam::000000000000:role/bench", "region": "us-east-1",
                        "endpoint": minio.endpoint, "credentialsSecretRef": {"namespace": "keybroker-system", "name": "broker-keys"}},
                "namespaceSelector": {"matchLabels": {"keybroker.dev/tenant": "true"}},
                "guardrails": {"allowedActions": ["s3:GetObject", "s3:PutObject"],
                               "allowedResources": ["arn:aws:s3:::corp-data/{namespace}/*"], "maxTTL": "1h"}
            }
        })))
        .await?;

    // Floor: a plain client creates the keys and writes the statuses the controller would.
    let floor_ns: Vec<String> = (0..namespaces).map(|i| format!("floor-{i:02}")).collect();
    for ns in &floor_ns {
        create_namespace(&client, ns).await?;
    }
    let floor_writes_before = status_writes(&cluster, "floor-");
    let started = Instant::now();
    run_concurrently(spread(keys, &floor_ns), |(ns, name)| {
        let client = client.clone();
        async move {
            create_key(&client, &ns, &name).await?;
            write_ready_status(&client, &ns, &name).await
        }
    })
    .await?;
    let floor_time = started.elapsed();
    let floor_writes = status_writes(&cluster, "floor-") - floor_writes_before;

    // The controller, as a process with its own memory.
    let mut component = Component::spawn(
        "keybroker-operator",
        &operator,
        &[
            "--roles=controller".into(),
            "--metrics-addr=127.0.0.1:0".into(),
            "--namespace=keybroker-system".into(),
            "--log-format=json".into(),
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
    let pid = component.pid();
    let op_ns: Vec<String> = (0..namespaces).map(|i| format!("team-{i:02}")).collect();
    for ns in &op_ns {
        create_namespace(&client, ns).await?;
    }
    let writes_before = status_writes(&cluster, "team-");
    let started = Instant::now();
    run_concurrently(spread(keys, &op_ns), |(ns, name)| {
        let client = client.clone();
        async move { create_key(&client, &ns, &name).await }
    })
    .await?;
    let all = Api::<ApiKey>::all(client.clone());
    component
        .wait_ready("all ApiKeys Ready", Duration::from_secs(600), || async {
            ready_count(&all, "team-").await >= keys
        })
        .await?;
    let controller_time = started.elapsed();
    // Let stragglers (events, re-reconciles) finish before counting writes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let controller_writes = status_writes(&cluster, "team-") - writes_before;
    let rss_small = (rss_kib(pid)?, peak_rss_kib(pid)?);

    let mut rows = vec![
        Row::new("plain client (floor)", keys, floor_time, floor_writes, None),
        Row::new(
            "keybroker-operator",
            keys,
            controller_time,
            controller_writes,
            Some(rss_small),
        ),
    ];
    if rss_keys > keys {
        eprintln!("growing to {rss_keys} ApiKeys for the memory round...");
        let extra = rss_keys - keys;
        let started = Instant::now();
        run_concurrently(
            spread(extra, &op_ns)
                .into_iter()
                .map(|(ns, name)| (ns, format!("{name}-big")))
                .collect(),
            |(ns, name)| {
                let client = client.clone();
                async move { create_key(&client, &ns, &name).await }
            },
        )
        .await?;
        component
            .wait_ready("all ApiKeys Ready", Duration::from_secs(1200), || async {
                ready_count(&all, "team-").await >= rss_keys
            })
            .await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let writes = status_writes(&cluster, "team-") - writes_before;
        rows.push(Row::new(
            "keybroker-operator (+ memory round)",
            extra,
            started.elapsed(),
            writes - controller_writes,
            Some((rss_kib(pid)?, peak_rss_kib(pid)?)),
        ));
    }
    component.stop(Duration::from_secs(5));
    print_table(&rows, floor_time, controller_time);
    drop(cluster);
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}

struct Row {
    what: &'static str,
    keys: usize,
    time: Duration,
    writes: usize,
    rss_kib: Option<(u64, u64)>,
}

impl Row {
    fn new(
        what: &'static str,
        keys: usize,
        time: Duration,
        writes: usize,
        rss_kib: Option<(u64, u64)>,
    ) -> Self {
        Self {
            what,
            keys,
            time,
            writes,
            rss_kib,
        }
    }
}

fn print_table(rows: &[Row], floor: Duration, controller: Duration) {
    println!();
    println!(
        "| {:<36} | {:>7} | {:>12} | {:>10} | {:>14} | {:>14} |",
        "run", "ApiKeys", "all Ready s", "keys/s", "writes/ApiKey", "RSS/peak MiB"
    );
    println!(
        "|{:-<38}|{:->9}|{:->14}|{:->12}|{:->16}|{:->16}|",
        "", "", "", "", "", ""
    );
    for r in rows {
        let secs = r.time.as_secs_f64();
        println!(
            "| {:<36} | {:>7} | {:>12.2} | {:>10.0} | {:>14.2} | {:>14} |",
            r.what,
            r.keys,
            secs,
            r.keys as f64 / secs.max(f64::EPSILON),
            r.writes as f64 / r.keys as f64,
            r.rss_kib
                .map(|(now, peak)| format!(
                    "{:.1}/{:.1}",
                    now as f64 / 1024.0,
                    peak as f64 / 1024.0
                ))
                .unwrap_or_else(|| "-".into()),
        );
    }
    println!();
    println!(
        "controller time / floor time: {:.2}x (target: at most 1.5x)",
        controller.as_secs_f64() / floor.as_secs_f64().max(f64::EPSILON)
    );
}

/// `(namespace, name)` for `n` keys spread round-robin over `namespaces`.
fn spread(n: usize, namespaces: &[String]) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            (
                namespaces[i % namespaces.len()].clone(),
                format!("key-{i:05}"),
            )
        })
        .collect()
}

async fn run_concurrently<F, Fut>(items: Vec<(String, String)>, f: F) -> anyhow::Result<()>
where
    F: Fn((String, String)) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    futures::stream::iter(items.into_iter().map(f))
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await
        .map(drop)
}

async fn create_key(client: &Client, ns: &str, name: &str) -> anyhow::Result<()> {
    let key: ApiKey = serde_json::from_value(serde_json::json!({
        "apiVersion": "keybroker.dev/v1alpha1", "kind": "ApiKey",
        "metadata": {"name": name},
        "spec": {
            "providerRef": {"name": "bench"},
            "serviceAccountNames": ["app"],
            "scope": {"actions": ["s3:PutObject"], "resources": [format!("arn:aws:s3:::corp-data/{ns}/{name}/*")]},
            "ttl": "15m"
        }
    }))?;
    Api::<ApiKey>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &key)
        .await?;
    Ok(())
}

/// The status write the controller would make, done directly (the floor).
async fn write_ready_status(client: &Client, ns: &str, name: &str) -> anyhow::Result<()> {
    let key: ApiKey = Api::namespaced(client.clone(), ns).get(name).await?;
    let provider = Api::<keybroker_operator::crd::KeyProvider>::all(client.clone())
        .get("bench")
        .await?;
    let compiled = keybroker_operator::policy::compile(&key.spec, &provider.spec.guardrails, ns)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let verdict = keybroker_operator::status::Verdict::Ready(compiled);
    let status = keybroker_operator::status::desired_status(
        None,
        &verdict,
        None,
        key.metadata.generation,
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()),
    );
    Api::<ApiKey>::namespaced(client.clone(), ns)
        .patch_status(
            name,
            &PatchParams::apply("floor").force(),
            &Patch::Apply(serde_json::json!({
                "apiVersion": "keybroker.dev/v1alpha1", "kind": "ApiKey", "status": status
            })),
        )
        .await?;
    Ok(())
}

/// Ready ApiKeys in namespaces starting with `ns_prefix`. Sleeps first, so that polling (a full
/// list) stays at two per second and does not load the apiserver it measures.
async fn ready_count(api: &Api<ApiKey>, ns_prefix: &str) -> usize {
    tokio::time::sleep(Duration::from_millis(400)).await;
    let Ok(list) = api.list(&ListParams::default()).await else {
        return 0;
    };
    list.items
        .iter()
        .filter(|k| {
            k.metadata
                .namespace
                .as_deref()
                .is_some_and(|n| n.starts_with(ns_prefix))
        })
        .filter(|k| {
            keybroker_operator::status::ready_condition(k.status.as_ref())
                .is_some_and(|c| c.status == "True")
        })
        .count()
}

/// Status writes to ApiKeys in namespaces starting with `ns_prefix`, from the audit log.
fn status_writes(cluster: &Cluster, ns_prefix: &str) -> usize {
    cluster
        .audit_events(|e| {
            let o = &e["objectRef"];
            o["resource"] == "apikeys"
                && o["subresource"] == "status"
                && o["namespace"]
                    .as_str()
                    .is_some_and(|n| n.starts_with(ns_prefix))
        })
        .len()
}

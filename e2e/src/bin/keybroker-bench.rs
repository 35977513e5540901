//! `keybroker-bench`: load benchmarks against a real control plane, printed as tables.
//!
//! `controller`: N ApiKeys across 20 namespaces, reconciled by the release `keybroker-operator`
//! binary, against a floor where a plain client creates the same objects and writes the same
//! statuses itself. Reports time until all are Ready, API writes per ApiKey (from the
//! apiserver's audit log) and the operator's peak RSS; then grows to a larger count for RSS.
//!
//! `broker`: exchanges through the broker vs. direct AssumeRole, at several concurrencies.
//!
//! `sidecar`: the release sidecar against an in-process broker: time from start to the first
//! credentials on disk minus the broker's own exchange latency, steady-state RSS, CPU and
//! wake-ups over an idle window, binary size.
//!
//! `webhook`: AdmissionReviews (1- and 50-container pods) through the webhook vs. a minimal
//! hyper+rustls server answering a fixed response, at several concurrencies and at 1,000 req/s.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use clap::{Parser, Subcommand};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};

use keybroker_e2e::{Cluster, Lifetime, Options, install_crds, process::Component, run_dir};
use keybroker_operator::crd::ApiKey;

#[derive(Debug, Parser)]
#[command(about = "Benchmarks of keybroker against a real control plane")]
struct Args {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// ApiKeys reconciled by the controller vs. a plain client writing the same statuses.
    Controller {
        /// ApiKeys in the timed round (spread over --namespaces).
        #[arg(long, default_value_t = 1000)]
        keys: usize,
        #[arg(long, default_value_t = 20)]
        namespaces: usize,
        /// Total ApiKeys for the memory round (0 skips it).
        #[arg(long, default_value_t = 10_000)]
        rss_keys: usize,
        /// The operator binary (built with `cargo build --release`).
        #[arg(long, default_value = "target/release/keybroker-operator")]
        operator: PathBuf,
    },
    /// Token exchanges through the broker vs. the same number of direct AssumeRole calls.
    Broker {
        /// Requests per concurrency level.
        #[arg(long, default_value_t = 2000)]
        requests: usize,
        /// The operator binary (built with `cargo build --release`).
        #[arg(long, default_value = "target/release/keybroker-operator")]
        operator: PathBuf,
    },
    /// AdmissionReviews through the webhook vs. a minimal hyper+rustls server (the floor).
    Webhook {
        /// Requests per body size and concurrency level.
        #[arg(long, default_value_t = 4000)]
        requests: usize,
        /// The operator binary (built with `cargo build --release`).
        #[arg(long, default_value = "target/release/keybroker-operator")]
        operator: PathBuf,
    },
    /// The sidecar: start-up time, steady-state memory and idle CPU, binary size.
    Sidecar {
        /// The sidecar binary (`make sidecar-static` builds the static one).
        #[arg(long, default_value = "target/release/keybroker-sidecar")]
        sidecar: PathBuf,
        /// Length of the idle window for CPU and wake-ups (600 = the issue's 10 minutes).
        #[arg(long, default_value_t = 600)]
        idle_seconds: u64,
        /// Sidecar starts (and broker exchanges) timed for the start-up figure.
        #[arg(long, default_value_t = 15)]
        starts: usize,
    },
    /// The floor of the webhook benchmark: answers every POST with a fixed AdmissionReview.
    #[command(hide = true)]
    FloorServer {
        #[arg(long)]
        addr: std::net::SocketAddr,
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
}

/// Concurrent requests of the load generator (and of the floor's status writes).
const CONCURRENCY: usize = 16;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Args::parse().bench {
        Bench::Controller {
            keys,
            namespaces,
            rss_keys,
            operator,
        } => controller(keys, namespaces, rss_keys, &operator).await,
        Bench::Broker { requests, operator } => broker(requests, &operator).await,
        Bench::Sidecar {
            sidecar,
            idle_seconds,
            starts,
        } => sidecar_bench(&sidecar, idle_seconds, starts).await,
        Bench::Webhook { requests, operator } => webhook(requests, &operator).await,
        Bench::FloorServer { addr, cert, key } => floor_server(addr, &cert, &key).await,
    }
}

async fn controller(
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

/// A fresh control plane and MinIO with keybroker's CRDs, in its own run directory.
async fn start_cluster() -> anyhow::Result<(PathBuf, Cluster, Client)> {
    eprintln!("starting the control plane and MinIO...");
    let dir = run_dir()?;
    let cluster = Cluster::start(Options {
        dir: dir.clone(),
        lifetime: Lifetime::TiedToProcess,
        with_minio: true,
    })
    .await?;
    let client = cluster.client().await?;
    install_crds(&client).await?;
    Ok((dir, cluster, client))
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

async fn create_namespace(client: &Client, name: &str) -> anyhow::Result<()> {
    Api::<Namespace>::all(client.clone())
        .patch(
            name,
            &PatchParams::apply("bench"),
            &Patch::Apply(serde_json::json!({
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": name, "labels": {"keybroker.dev/tenant": "true"}}
            })),
        )
        .await?;
    Ok(())
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

/// Peak resident set (VmHWM) of `pid`, in KiB.
fn peak_rss_kib(pid: u32) -> anyhow::Result<u64> {
    proc_status_kib(pid, "VmHWM:")
}

/// Current resident set (VmRSS) of `pid`, in KiB.
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    proc_status_kib(pid, "VmRSS:")
}

fn proc_status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// Concurrency levels of the broker benchmark.
const LEVELS: [usize; 3] = [1, 16, 64];

async fn broker(requests: usize, operator: &PathBuf) -> anyhow::Result<()> {
    use keybroker_e2e::{fixtures, https, pki};
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
        keybroker_sidecar::wire::AUDIENCE,
        Some("app"),
    )
    .await?;

    let ca = pki::Ca::create(&dir, "bench-ca")?;
    let serving = ca.issue_server(&dir, "broker", &["127.0.0.1"])?;
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let mut component = Component::spawn(
        "keybroker-operator",
        &operator,
        &[
            "--roles=broker".into(),
            format!("--broker-addr={addr}"),
            "--metrics-addr=127.0.0.1:0".into(),
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
    let client_https = https::Client::new(addr, &ca.cert)?;
    let body = serde_json::to_vec(&serde_json::json!({"apiKey": "uploader"}))?;
    component
        .wait_ready("the first exchange", Duration::from_secs(60), || async {
            client_https
                .send("POST", "/v1/exchange", Some(&token), body.clone())
                .await
                .is_ok_and(|r| r.status == 200)
        })
        .await?;

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

    println!();
    println!(
        "| {:<22} | {:>5} | {:>9} | {:>10} | {:>10} | {:>10} |",
        "path", "conc.", "requests", "req/s", "p50 ms", "p99 ms"
    );
    println!(
        "|{:-<24}|{:->7}|{:->11}|{:->12}|{:->12}|{:->12}|",
        "", "", "", "", "", ""
    );
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
        let brokered = {
            let connections =
                futures::future::try_join_all((0..level).map(|_| client_https.connect())).await?;
            let connections: Vec<_> = connections
                .into_iter()
                .map(tokio::sync::Mutex::new)
                .collect();
            let connections = std::sync::Arc::new(connections);
            let (token, body) = (token.clone(), body.clone());
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
            .await?
        };
        for (path, r) in [
            ("direct AssumeRole", &direct),
            ("broker exchange (TLS)", &brokered),
        ] {
            println!(
                "| {:<22} | {:>5} | {:>9} | {:>10.0} | {:>10.2} | {:>10.2} |",
                path, level, requests, r.rate, r.p50_ms, r.p99_ms
            );
        }
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
    component.stop(Duration::from_secs(5));
    drop(cluster);
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}

struct LoadResult {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Runs `total` calls of `call(worker)` on `workers` concurrent workers; latency percentiles
/// and throughput.
async fn load<F, Fut>(workers: usize, total: usize, call: F) -> anyhow::Result<LoadResult>
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let per_worker = total.div_ceil(workers);
    let started = Instant::now();
    let tasks = (0..workers).map(|w| {
        let call = call.clone();
        tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per_worker);
            for _ in 0..per_worker {
                let t = Instant::now();
                call(w).await?;
                latencies.push(t.elapsed());
            }
            anyhow::Ok(latencies)
        })
    });
    let mut latencies: Vec<Duration> = Vec::with_capacity(total);
    for task in futures::future::join_all(tasks).await {
        latencies.extend(task??);
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)].as_secs_f64()
            * 1000.0
    };
    Ok(LoadResult {
        rate: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
    })
}

/// An AdmissionReview of a pod with `containers` realistic containers (env, ports, probes,
/// resources, mounts), opted in for ApiKey `uploader`.
fn admission_review(containers: usize) -> Vec<u8> {
    let container = |i: usize| {
        serde_json::json!({
            "name": format!("c{i}"),
            "image": format!("registry.example.com/team/service-{i}:1.4.2"),
            "imagePullPolicy": "IfNotPresent",
            "args": ["--port=8080", "--log-level=info"],
            "env": (0..8).map(|e| serde_json::json!({"name": format!("SETTING_{e}"), "value": format!("value-{e}")})).collect::<Vec<_>>(),
            "ports": [{"name": "http", "containerPort": 8080 + i, "protocol": "TCP"}],
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
            "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080 + i}, "periodSeconds": 5},
            "livenessProbe": {"tcpSocket": {"port": 8080 + i}, "periodSeconds": 10},
            "volumeMounts": [
                {"name": "config", "mountPath": "/etc/service"},
                {"name": "kube-api-access-x1", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true},
            ],
            "securityContext": {"runAsNonRoot": true, "readOnlyRootFilesystem": true},
            "terminationMessagePath": "/dev/termination-log",
            "terminationMessagePolicy": "File",
        })
    };
    let pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "generateName": "uploader-7d9f8b6c5-", "namespace": "bench",
            "labels": {"app": "uploader", "pod-template-hash": "7d9f8b6c5", "keybroker.dev/inject": "true"},
            "annotations": {"keybroker.dev/apikeys": "uploader"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "uploader-7d9f8b6c5", "uid": "6f1c1f4e-3c1d-4a8e-9d64-2f1f5b9c9a11", "controller": true, "blockOwnerDeletion": true}],
        },
        "spec": {
            "serviceAccountName": "uploader",
            "securityContext": {"fsGroup": 2000},
            "volumes": [
                {"name": "config", "configMap": {"name": "service-config"}},
                {"name": "kube-api-access-x1", "projected": {"sources": [{"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}}]}},
            ],
            "containers": (0..containers).map(container).collect::<Vec<_>>(),
            "restartPolicy": "Always", "dnsPolicy": "ClusterFirst", "schedulerName": "default-scheduler",
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}],
        },
    });
    serde_json::to_vec(&serde_json::json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "bench", "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller", "groups": ["system:serviceaccounts", "system:authenticated"]},
            "object": pod, "oldObject": null, "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }))
    .unwrap_or_default()
}

/// The floor: hyper + rustls answering a fixed, small AdmissionReview (allowed, no patch).
async fn floor_server(
    addr: std::net::SocketAddr,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<()> {
    use http_body_util::BodyExt;
    let tls = keybroker_operator::tls::ReloadingCert::new(cert, key)?.server_config();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let fixed = hyper::body::Bytes::from_static(
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{"uid":"705ab4f5-6393-11e8-b7cc-42010a800002","allowed":true}}"#,
    );
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let (acceptor, fixed) = (acceptor.clone(), fixed.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let fixed = fixed.clone();
                    async move {
                        // Read the body as any server must, then answer.
                        let _ = req.into_body().collect().await;
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(fixed),
                        ))
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
        });
    }
}

async fn webhook(requests: usize, operator: &PathBuf) -> anyhow::Result<()> {
    use keybroker_e2e::{fixtures, https, pki};
    let operator = std::path::absolute(operator)?;
    ensure!(
        operator.exists(),
        "{} missing: run `cargo build --release -p keybroker-operator`",
        operator.display()
    );
    let (dir, cluster, client) = start_cluster().await?;
    let ns = "bench";
    create_namespace(&client, ns).await?;
    fixtures::uploader_key(&cluster, &client, ns).await?;

    let ca = pki::Ca::create(&dir, "bench-ca")?;
    let serving = ca.issue_server(&dir, "webhook", &["127.0.0.1"])?;
    let webhook_addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let floor_addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let kubeconfig = cluster
        .kubeconfig
        .to_str()
        .context("kubeconfig path")?
        .to_owned();
    let mut operator = Component::spawn(
        "keybroker-operator",
        &operator,
        &[
            "--roles=webhook".into(),
            format!("--webhook-addr={webhook_addr}"),
            "--metrics-addr=127.0.0.1:0".into(),
            format!("--webhook-cert-file={}", serving.cert.display()),
            format!("--webhook-key-file={}", serving.key.display()),
            format!("--broker-ca-file={}", ca.cert.display()),
        ],
        &[("KUBECONFIG", &kubeconfig), ("RUST_LOG", "warn")],
        &dir.join("webhook.log"),
        Lifetime::TiedToProcess,
    )?;
    let mut floor = Component::spawn(
        "floor-server",
        &std::env::current_exe()?,
        &[
            "floor-server".into(),
            format!("--addr={floor_addr}"),
            format!("--cert={}", serving.cert.display()),
            format!("--key={}", serving.key.display()),
        ],
        &[],
        &dir.join("floor.log"),
        Lifetime::TiedToProcess,
    )?;
    let webhook_https = https::Client::new(webhook_addr, &ca.cert)?;
    let floor_https = https::Client::new(floor_addr, &ca.cert)?;
    let small = admission_review(1);
    let large = admission_review(50);
    operator
        .wait_ready("the first injection", Duration::from_secs(60), || async {
            webhook_https
                .send("POST", "/mutate", None, small.clone())
                .await
                .is_ok_and(|r| r.status == 200 && r.body.windows(5).any(|w| w == b"patch"))
        })
        .await?;
    floor
        .wait_ready("the floor server", Duration::from_secs(10), || async {
            floor_https
                .send("POST", "/mutate", None, small.clone())
                .await
                .is_ok()
        })
        .await?;

    println!();
    println!(
        "| {:<18} | {:>6} | {:>5} | {:>8} | {:>10} | {:>8} | {:>8} |",
        "server", "pod", "conc.", "requests", "req/s", "p50 ms", "p99 ms"
    );
    println!(
        "|{:-<20}|{:->8}|{:->7}|{:->10}|{:->12}|{:->10}|{:->10}|",
        "", "", "", "", "", "", ""
    );
    let mut summary = Vec::new();
    for (pod, body) in [("1 ctr", &small), ("50 ctr", &large)] {
        for level in LEVELS {
            let floor_result = closed_loop(&floor_https, level, requests, body).await?;
            let webhook_result = closed_loop(&webhook_https, level, requests, body).await?;
            for (server, r) in [
                ("floor (fixed)", &floor_result),
                ("keybroker webhook", &webhook_result),
            ] {
                println!(
                    "| {:<18} | {:>6} | {:>5} | {:>8} | {:>10.0} | {:>8.3} | {:>8.3} |",
                    server, pod, level, requests, r.rate, r.p50_ms, r.p99_ms
                );
            }
            summary.push((pod, level, webhook_result.rate / floor_result.rate));
        }
    }
    println!();
    for (pod, level, ratio) in summary {
        println!(
            "{pod:>6}, concurrency {level:>2}: webhook throughput {:.0}% of the floor (target >= 80%)",
            ratio * 100.0
        );
    }
    for (pod, body) in [("1 ctr", &small), ("50 ctr", &large)] {
        let paced = open_loop(&webhook_https, 1000.0, Duration::from_secs(5), body).await?;
        println!(
            "{pod:>6} at a steady 1,000 req/s: {:.0} req/s served, p50 {:.3} ms, p99 {:.3} ms (target p99 < 2 ms)",
            paced.rate, paced.p50_ms, paced.p99_ms
        );
    }
    operator.stop(Duration::from_secs(5));
    floor.stop(Duration::from_secs(5));
    drop(cluster);
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}

/// `total` AdmissionReviews on `workers` kept-alive connections, each sent as soon as the
/// previous answer arrived.
async fn closed_loop(
    https: &keybroker_e2e::https::Client,
    workers: usize,
    total: usize,
    body: &[u8],
) -> anyhow::Result<LoadResult> {
    let connections = futures::future::try_join_all((0..workers).map(|_| https.connect())).await?;
    let connections = std::sync::Arc::new(
        connections
            .into_iter()
            .map(tokio::sync::Mutex::new)
            .collect::<Vec<_>>(),
    );
    let body = body.to_vec();
    load(workers, total, move |worker| {
        let (connections, body) = (std::sync::Arc::clone(&connections), body.clone());
        async move {
            let reply = connections[worker]
                .lock()
                .await
                .send("POST", "/mutate", None, body)
                .await?;
            ensure!(reply.status == 200, "{}", reply.status);
            Ok(())
        }
    })
    .await
}

/// Requests at a fixed `rate` for `duration` (open loop: the schedule does not wait for slow
/// answers), spread over 16 connections; latency measured from the scheduled send time.
async fn open_loop(
    https: &keybroker_e2e::https::Client,
    rate: f64,
    duration: Duration,
    body: &[u8],
) -> anyhow::Result<LoadResult> {
    const CONNECTIONS: usize = 16;
    let per_connection = rate / CONNECTIONS as f64;
    let count = (per_connection * duration.as_secs_f64()) as usize;
    let started = Instant::now();
    let tasks = futures::future::try_join_all((0..CONNECTIONS).map(|_| https.connect()))
        .await?
        .into_iter()
        .enumerate()
        .map(|(i, mut conn)| {
            let body = body.to_vec();
            tokio::spawn(async move {
                let period = Duration::from_secs_f64(1.0 / per_connection);
                // Stagger the connections over one period.
                let first = started + period.mul_f64(i as f64 / CONNECTIONS as f64);
                let mut latencies = Vec::with_capacity(count);
                let mut previous_done = started;
                for n in 0..count {
                    let due = first + period * n as u32;
                    tokio::time::sleep_until(due.into()).await;
                    // A request held back by a slow previous answer counts from when it was due
                    // (no coordinated omission); one the timer woke late (tokio's 1 ms tick)
                    // counts from when it was sent, since that lateness is the generator's.
                    let sent = if previous_done > due {
                        due
                    } else {
                        Instant::now()
                    };
                    let reply = conn.send("POST", "/mutate", None, body.clone()).await?;
                    ensure!(reply.status == 200, "{}", reply.status);
                    previous_done = Instant::now();
                    latencies.push(previous_done - sent);
                }
                anyhow::Ok(latencies)
            })
        })
        .collect::<Vec<_>>();
    let mut latencies = Vec::new();
    for task in futures::future::join_all(tasks).await {
        latencies.extend(task??);
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)].as_secs_f64()
            * 1000.0
    };
    Ok(LoadResult {
        rate: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
    })
}

/// What Vault Agent sidecars are observed to use (steady state), for comparison.
const VAULT_AGENT_RSS_MIB: &str = "13-20";
/// Linux reports process CPU time in USER_HZ ticks, fixed at 100 per second for user space.
const USER_HZ: f64 = 100.0;

async fn sidecar_bench(sidecar: &PathBuf, idle_seconds: u64, starts: usize) -> anyhow::Result<()> {
    use std::sync::Arc;

    use keybroker_e2e::server_thread::ServerThread;
    use keybroker_e2e::{fixtures, https, pki};

    let sidecar = std::path::absolute(sidecar)?;
    ensure!(
        sidecar.exists(),
        "{} missing: run `make sidecar-static` or `cargo build --release -p keybroker-sidecar`",
        sidecar.display()
    );
    ensure!(starts > 0, "--starts must be at least 1");
    let (dir, cluster, client) = start_cluster().await?;
    let ns = "bench";
    create_namespace(&client, ns).await?;
    fixtures::uploader(&cluster, &client, ns).await?;
    let token = fixtures::token(
        &client,
        ns,
        "uploader",
        keybroker_sidecar::wire::AUDIENCE,
        Some("app"),
    )
    .await?;
    let token_file = dir.join("token");
    std::fs::write(&token_file, &token)?;
    let ca = pki::Ca::create(&dir, "bench-broker-ca")?;
    let serving = ca.issue_server(&dir, "broker", &["127.0.0.1"])?;
    let tls =
        keybroker_operator::tls::ReloadingCert::new(&serving.cert, &serving.key)?.server_config();
    let broker =
        ServerThread::broker(&cluster.kubeconfig, "127.0.0.1:0".parse()?, Arc::new(tls)).await?;

    // The broker's own latency, measured as the sidecar meets it: a new TLS connection and one
    // exchange.
    let https = https::Client::new(broker.addr, &ca.cert)?;
    let body = serde_json::to_vec(&serde_json::json!({"apiKey": "uploader"}))?;
    let mut exchange_ms = Vec::with_capacity(starts);
    for _ in 0..starts {
        let t = Instant::now();
        let reply = https
            .send("POST", "/v1/exchange", Some(&token), body.clone())
            .await?;
        ensure!(reply.status == 200, "exchange failed: {}", reply.status);
        exchange_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }

    let spawn = |out: &std::path::Path, log: &std::path::Path| {
        let free = |()| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.to_string())
        };
        let (credentials_addr, health_addr) = (free(())?, free(())?);
        let env = [
            ("KEYBROKER_BROKER_URL", format!("https://{}", broker.addr)),
            ("KEYBROKER_BROKER_CA_FILE", ca.cert.display().to_string()),
            ("KEYBROKER_TOKEN_FILE", token_file.display().to_string()),
            ("KEYBROKER_API_KEYS", "uploader".to_owned()),
            ("KEYBROKER_OUTPUT_DIR", out.display().to_string()),
            ("KEYBROKER_CREDENTIALS_ADDR", credentials_addr),
            ("KEYBROKER_HEALTH_ADDR", health_addr),
            ("KEYBROKER_LOG_LEVEL", "warn".to_owned()),
        ];
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        anyhow::Ok(Component::spawn(
            "keybroker-sidecar",
            &sidecar,
            &[],
            &env,
            log,
            Lifetime::TiedToProcess,
        )?)
    };

    // Start to first credentials, polled every 0.2 ms.
    let mut start_ms = Vec::with_capacity(starts);
    for i in 0..starts {
        let out = dir.join(format!("start-{i}"));
        std::fs::create_dir_all(&out)?;
        let started = Instant::now();
        let mut component = spawn(&out, &dir.join(format!("start-{i}.log")))?;
        let credentials = out.join("uploader/credentials");
        while !credentials.exists() {
            ensure!(
                started.elapsed() < Duration::from_secs(30),
                "no credentials 30 s after start; log:\n{}",
                component.log_tail(20)
            );
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        start_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        component.stop(Duration::from_secs(5));
    }

    // Steady state: default refresh schedule, nothing asked of it.
    let out = dir.join("steady");
    std::fs::create_dir_all(&out)?;
    let mut component = spawn(&out, &dir.join("steady.log"))?;
    let pid = component.pid();
    component
        .wait_ready("first credentials", Duration::from_secs(30), || async {
            out.join("uploader/credentials").exists()
        })
        .await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_start = rss_kib(pid)?;
    let (cpu_before, switches_before) = (cpu_ticks(pid)?, context_switches(pid)?);
    eprintln!("sidecar idle for {idle_seconds} s...");
    tokio::time::sleep(Duration::from_secs(idle_seconds)).await;
    let (cpu_after, switches_after) = (cpu_ticks(pid)?, context_switches(pid)?);
    let (rss_end, rss_peak) = (rss_kib(pid)?, peak_rss_kib(pid)?);
    component.stop(Duration::from_secs(5));
    let binary_size = std::fs::metadata(&sidecar)?.len();

    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (start, exchange) = (median(&mut start_ms), median(&mut exchange_ms));
    let cpu_s = (cpu_after - cpu_before) as f64 / USER_HZ;
    let minutes = idle_seconds as f64 / 60.0;
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!();
    println!("sidecar: {}", sidecar.display());
    println!(
        "| {:<46} | {:>16} | {:>26} |",
        "metric", "keybroker-sidecar", "reference"
    );
    println!("|{:-<48}|{:->18}|{:->28}|", "", "", "");
    let row = |metric: &str, value: String, reference: &str| {
        println!("| {metric:<46} | {value:>16} | {reference:>26} |");
    };
    row(
        "steady-state RSS, MiB (after 5 s / after idle)",
        format!("{:.1} / {:.1}", mib(rss_start), mib(rss_end)),
        &format!("Vault Agent: {VAULT_AGENT_RSS_MIB} MiB"),
    );
    row(
        "peak RSS (VmHWM), MiB",
        format!("{:.1}", mib(rss_peak)),
        "target < 10 MiB",
    );
    row(
        &format!("CPU over {idle_seconds} s idle, s (% of a core)"),
        format!("{cpu_s:.2} ({:.4} %)", cpu_s / idle_seconds as f64 * 100.0),
        "10 ms resolution",
    );
    row(
        "CPU per idle minute, ms",
        format!("{:.1}", cpu_s * 1000.0 / minutes),
        "",
    );
    row(
        "context switches per idle minute",
        format!("{:.1}", (switches_after - switches_before) as f64 / minutes),
        "1 long-poll / 55 s",
    );
    row(
        &format!("start -> first credentials, median of {starts}, ms"),
        format!("{start:.1}"),
        "",
    );
    row(
        "broker exchange alone (new TLS conn), median, ms",
        format!("{exchange:.1}"),
        "",
    );
    row(
        "start overhead (difference), ms",
        format!("{:.1}", start - exchange),
        "",
    );
    row(
        "binary size, MiB",
        format!("{:.2}", binary_size as f64 / 1024.0 / 1024.0),
        "",
    );
    println!();
    drop(broker);
    drop(cluster);
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}

/// User + system CPU time of `pid`, in USER_HZ ticks.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("odd /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> anyhow::Result<u64> {
        Ok(fields.get(i).context("short /proc stat")?.parse()?)
    };
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after the command name.
    Ok(field(11)? + field(12)?)
}

/// Voluntary + involuntary context switches of `pid`'s threads so far: how often it woke up.
fn context_switches(pid: u32) -> anyhow::Result<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let status = std::fs::read_to_string(task?.path().join("status"))?;
        for line in status.lines() {
            if let Some(n) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                total += n.trim().parse::<u64>()?;
            }
        }
    }
    Ok(total)
}

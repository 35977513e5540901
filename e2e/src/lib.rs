//! Test harness for keybroker: builds nothing itself (see `e2e/tools/build.sh`), starts a real
//! control plane and MinIO from the cached binaries, and gives each test its own namespace.
//!
//! Tests share one control plane per test binary ([`shared`]) and isolate themselves with
//! [`in_namespace`], which dumps the namespace and the component logs when the test fails.

pub mod attack;
pub mod binaries;
pub mod boto3;
pub mod cgroups;
pub mod cluster;
pub mod demo;
pub mod dns;
pub mod dockerfile;
pub mod fixtures;
pub mod gateway_rig;
pub mod gitea;
pub mod httpbin;
pub mod https;
pub mod images;
pub mod install;
pub mod keycloak;
pub mod logs;
pub mod minio;
pub mod netns;
pub mod node;
pub mod node_config;
pub mod pki;
pub mod process;
mod reaper;
pub mod server_thread;
pub mod sidecar;
pub mod tools;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, Namespace, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use rand::distr::{Alphanumeric, SampleString};
use tokio::sync::OnceCell;

pub use cluster::{Cluster, Options};
pub use process::Lifetime;

/// Prefix of every harness working directory under the system temp dir.
const RUN_DIR_PREFIX: &str = "keybroker-e2e-";

/// A fresh working directory `<tmp>/keybroker-e2e-<pid>-<n>`, after removing those left by
/// test processes that no longer exist (their components died with them).
pub fn run_dir() -> std::io::Result<PathBuf> {
    reaper::ensure_started();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let tmp = std::env::temp_dir();
    if let Ok(entries) = std::fs::read_dir(&tmp) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|n| n.strip_prefix(RUN_DIR_PREFIX))
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok())
            else {
                continue;
            };
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let dir = tmp.join(format!(
        "{RUN_DIR_PREFIX}{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Waits until at least `room` is left of the current clock minute: per-minute counts
/// (budgets, the issuance cap) use windows aligned to the clock, so a test that spends one and
/// expects a refusal must not straddle a minute's end.
pub async fn with_room_in_this_minute(room: Duration) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let into = Duration::from_millis(u64::try_from(now.as_millis() % 60_000).unwrap_or(0));
    let left = Duration::from_secs(60).saturating_sub(into);
    if left < room {
        tokio::time::sleep(left + Duration::from_millis(50)).await;
    }
}

/// The control plane shared by all tests of this test binary, started on first use. Its
/// components die with the test process; a failed start is reported to every test.
pub async fn shared() -> anyhow::Result<&'static Cluster> {
    static SHARED: OnceCell<Result<Cluster, String>> = OnceCell::const_new();
    let started = SHARED
        .get_or_init(|| async {
            let dir = run_dir().map_err(|e| format!("creating the run directory: {e}"))?;
            Cluster::start(Options {
                dir,
                lifetime: Lifetime::TiedToProcess,
                with_minio: true,
            })
            .await
            .map_err(|e| format!("starting the shared control plane: {e}"))
        })
        .await;
    started.as_ref().map_err(|e| anyhow::anyhow!("{e}"))
}

/// [`shared`] with keybroker's CRDs installed, capturing in-process logs (see [`logs`]).
pub async fn shared_with_crds() -> anyhow::Result<&'static Cluster> {
    static CRDS: OnceCell<()> = OnceCell::const_new();
    logs::capture();
    let cluster = shared().await?;
    CRDS.get_or_try_init(|| async { install_crds(&cluster.client().await?).await })
        .await?;
    Ok(cluster)
}

/// Runs `body` in a new namespace `<prefix>-<random>`. When `body` fails or panics, prints the
/// namespace's pods and events and the component log tails, then deletes the namespace either way.
pub async fn in_namespace<F, Fut>(cluster: &Cluster, prefix: &str, body: F) -> anyhow::Result<()>
where
    F: FnOnce(kube::Client, String) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let client = cluster.client().await?;
    let name = format!(
        "{prefix}-{}",
        Alphanumeric
            .sample_string(&mut rand::rng(), 5)
            .to_lowercase()
    );
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))?;
    namespaces.create(&PostParams::default(), &ns).await?;

    let outcome = tokio::spawn(body(client.clone(), name.clone())).await;
    let failed = !matches!(outcome, Ok(Ok(())));
    if failed {
        eprintln!("{}", dump_namespace(&client, &name).await);
        eprintln!("{}", cluster.log_tails(20));
    }
    let _ = namespaces.delete(&name, &DeleteParams::background()).await;
    match outcome {
        Ok(result) => result,
        Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
        Err(join) => Err(anyhow::anyhow!("test body was cancelled: {join}")),
    }
}

/// Applies the committed CRDs in `crds/` (what users apply) and waits until the apiserver
/// serves them.
pub async fn install_crds(client: &kube::Client) -> anyhow::Result<()> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{Patch, PatchParams};
    use kube::runtime::wait::{await_condition, conditions};

    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut files: Vec<_> = std::fs::read_dir(&dir)?.collect::<Result<_, _>>()?;
    files.sort_by_key(|f| f.path());
    for file in files {
        let crd: CustomResourceDefinition =
            yaml_serde::from_str(&std::fs::read_to_string(file.path())?)?;
        let name = crd.metadata.name.clone().unwrap_or_default();
        api.patch(
            &name,
            &PatchParams::apply("keybroker-e2e").force(),
            &Patch::Apply(&crd),
        )
        .await
        .map_err(|e| anyhow::anyhow!("applying {}: {e}", file.path().display()))?;
        tokio::time::timeout(
            Duration::from_secs(30),
            await_condition(api.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .map_err(|_| anyhow::anyhow!("CRD {name} not established after 30 s"))??;
    }
    Ok(())
}

/// Polls `probe` every 200 ms until it yields a value; fails after `timeout` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return Ok(value);
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A readable summary of a namespace's pods and events, for failure reports.
pub async fn dump_namespace(client: &kube::Client, namespace: &str) -> String {
    let mut out = format!("=== namespace {namespace} ===\n");
    match Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await
    {
        Ok(pods) => {
            for pod in pods {
                let status = pod.status.as_ref();
                out.push_str(&format!(
                    "pod {} phase={} containers={:?}\n",
                    pod.metadata.name.as_deref().unwrap_or("?"),
                    status.and_then(|s| s.phase.as_deref()).unwrap_or("?"),
                    pod.spec
                        .as_ref()
                        .map(|s| s
                            .containers
                            .iter()
                            .map(|c| c.name.clone())
                            .collect::<Vec<_>>())
                        .unwrap_or_default(),
                ));
            }
        }
        Err(e) => out.push_str(&format!("(listing pods failed: {e})\n")),
    }
    match Api::<Event>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await
    {
        Ok(events) => {
            for ev in events {
                out.push_str(&format!(
                    "event {} {}/{}: {} {}\n",
                    ev.type_.as_deref().unwrap_or("?"),
                    ev.involved_object.kind.as_deref().unwrap_or("?"),
                    ev.involved_object.name.as_deref().unwrap_or("?"),
                    ev.reason.as_deref().unwrap_or("?"),
                    ev.message.as_deref().unwrap_or(""),
                ));
            }
        }
        Err(e) => out.push_str(&format!("(listing events failed: {e})\n")),
    }
    out
}

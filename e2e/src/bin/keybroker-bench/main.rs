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
//! `gateway`: calls of a gateway ApiKey, app → release sidecar → gateway → go-httpbin, against
//! the app calling go-httpbin directly: small and 1 MiB bodies, p50/p99 and throughput; the
//! sidecar's RSS and its memory per idle keep-alive connection.
//!
//! `oauth2`: tokens of an oauth2 ApiKey through the broker vs. the same RFC 8693 exchange sent
//! to Keycloak directly, at several concurrencies, with the CPU per token of each process.
//!
//! `webhook`: AdmissionReviews (1- and 50-container pods) through the webhook vs. a minimal
//! hyper+rustls server answering a fixed response, at several concurrencies and at 1,000 req/s.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use k8s_openapi::api::core::v1::Namespace;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};

use keybroker_e2e::{Cluster, Lifetime, Options, install_crds, run_dir};

mod broker;
mod controller;
mod gateway;
mod hostile;
mod oauth2;
mod relay;
mod revocation;
mod sidecar;
mod webhook;

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
    /// Tokens of an oauth2 ApiKey through the broker vs. the same exchange sent to Keycloak
    /// directly.
    Oauth2 {
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
        /// Length of the idle window for CPU and wake-ups (600 = the 10 minutes).
        #[arg(long, default_value_t = 600)]
        idle_seconds: u64,
        /// Sidecar starts (and broker exchanges) timed for the start-up figure.
        #[arg(long, default_value_t = 15)]
        starts: usize,
    },
    /// Gateway calls through the sidecar and the gateway vs. straight to the upstream.
    Gateway {
        /// The sidecar binary (`make sidecar-static` builds the static one).
        #[arg(long, default_value = "target/release/keybroker-sidecar")]
        sidecar: PathBuf,
    },
    /// The revocation drill: sidecars connected to the broker, ApiKeys revoked one by one; time
    /// to the provider refusing a cached credential and to the files gone.
    Revocation {
        /// Sidecar processes (spread evenly over the ApiKeys).
        #[arg(long, default_value_t = 1000)]
        sidecars: usize,
        /// ApiKeys, each revoked once.
        #[arg(long, default_value_t = 100)]
        revocations: usize,
        /// The operator binary (built with `cargo build --release`).
        #[arg(long, default_value = "target/release/keybroker-operator")]
        operator: PathBuf,
        /// The sidecar binary (`make sidecar-static` builds the static one).
        #[arg(long, default_value = "target/release/keybroker-sidecar")]
        sidecar: PathBuf,
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

/// Concurrency levels of the broker and webhook benchmarks.
const LEVELS: [usize; 3] = [1, 16, 64];

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
        } => controller::controller(keys, namespaces, rss_keys, &operator).await,
        Bench::Broker { requests, operator } => broker::broker(requests, &operator).await,
        Bench::Sidecar {
            sidecar,
            idle_seconds,
            starts,
        } => sidecar::sidecar_bench(&sidecar, idle_seconds, starts).await,
        Bench::Oauth2 { requests, operator } => oauth2::oauth2(requests, &operator).await,
        Bench::Webhook { requests, operator } => webhook::webhook(requests, &operator).await,
        Bench::Gateway { sidecar } => gateway::gateway(&sidecar).await,
        Bench::Revocation {
            sidecars,
            revocations,
            operator,
            sidecar,
        } => revocation::revocation(sidecars, revocations, &operator, &sidecar).await,
        Bench::FloorServer { addr, cert, key } => webhook::floor_server(addr, &cert, &key).await,
    }
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

/// The header of a table of [`load`] results.
fn load_table_header() {
    println!();
    println!(
        "| {:<24} | {:>5} | {:>9} | {:>10} | {:>10} | {:>10} |",
        "path", "conc.", "requests", "req/s", "p50 ms", "p99 ms"
    );
    println!(
        "|{:-<26}|{:->7}|{:->11}|{:->12}|{:->12}|{:->12}|",
        "", "", "", "", "", ""
    );
}

/// One row of a table of [`load`] results.
fn load_table_row(path: &str, level: usize, requests: usize, r: &LoadResult) {
    println!(
        "| {:<24} | {:>5} | {:>9} | {:>10.0} | {:>10.2} | {:>10.2} |",
        path, level, requests, r.rate, r.p50_ms, r.p99_ms
    );
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

/// Linux reports process CPU time in USER_HZ ticks, fixed at 100 per second for user space.
const USER_HZ: f64 = 100.0;

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

//! `gateway`: app → sidecar → gateway → go-httpbin against the app calling go-httpbin
//! directly, in one run: small and 1 MiB bodies at several concurrencies (p50/p99 and
//! throughput), the sidecar's RSS with the proxy active, and its memory per idle keep-alive
//! connection from the app.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, ensure};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use tokio::sync::Mutex;

use keybroker_e2e::gateway_rig;
use keybroker_e2e::httpbin::{self, Httpbin};
use keybroker_operator::crd::Budget;

use super::*;

/// Calls per concurrency level: small bodies, 1 MiB bodies.
const SMALL_CALLS: usize = 2000;
const LARGE_CALLS: usize = 120;
const LARGE_BODY: usize = 1024 * 1024;
/// Idle keep-alive connections opened to the sidecar for the per-connection memory figure.
const IDLE_CONNECTIONS: usize = 200;

pub(crate) async fn gateway(sidecar: &Path) -> anyhow::Result<()> {
    let sidecar = std::path::absolute(sidecar)?;
    ensure!(
        sidecar.exists(),
        "{} missing: run `make sidecar-static`",
        sidecar.display()
    );
    let (dir, cluster, client) = start_cluster().await?;
    let ns = "bench-gw";
    create_namespace(&client, ns).await?;
    let upstream = Httpbin::start_in(
        &dir.join("httpbin"),
        httpbin::Options {
            max_body_size: 4 * LARGE_BODY as u64,
            ..httpbin::Options::default()
        },
    )
    .await?;
    let mut provider = httpbin::provider("bench-gw", ns, upstream.url());
    provider.spec.guardrails.allowed_actions = vec!["GET".into(), "POST".into()];
    provider.spec.guardrails.max_request_bytes = Some(2 * LARGE_BODY as u64);
    provider.spec.guardrails.max_requests_per_minute = Some(1_000_000);
    provider.spec.guardrails.max_requests_per_day = Some(1_000_000_000);
    if let Some(gateway) = provider.spec.gateway.as_mut() {
        gateway.timeout = Some("30s".into());
    }
    let mut key = httpbin::apikey("echo", "bench-gw", None);
    key.spec.scope.actions = vec!["GET".into(), "POST".into()];
    key.spec.budget = Some(Budget {
        requests_per_minute: Some(1_000_000),
        requests_per_day: Some(1_000_000_000),
    });
    let rig = gateway_rig::start(
        &cluster,
        &sidecar,
        &client,
        ns,
        (httpbin::KEY_SECRET, "bench-upstream-key"),
        provider,
        vec![key],
    )
    .await?;

    let direct = Target {
        port: upstream.addr().port(),
        prefix: String::new(),
    };
    let through = Target {
        port: rig.local_port,
        prefix: "/echo".into(),
    };
    // Warm both paths (connections, the gateway's caches and budget lease).
    for target in [&direct, &through] {
        let conn = target.connect().await?;
        for _ in 0..50 {
            target.call(&conn, ns, &Bytes::new()).await?;
        }
    }

    let large = Bytes::from(vec![b'x'; LARGE_BODY]);
    let pids = Pids {
        upstream: upstream.pid(),
        sidecar: rig.sidecar.pid(),
    };
    println!();
    println!(
        "| body | concurrency | direct p50 ms | direct p99 ms | direct calls/s | gateway p50 ms | gateway p99 ms | gateway calls/s | added p50 ms | throughput vs direct |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut peak_rss = 0;
    let mut cpu_rows = Vec::new();
    for (label, body, calls) in [
        ("small", Bytes::new(), SMALL_CALLS),
        ("1 MiB", large, LARGE_CALLS),
    ] {
        for &workers in &LEVELS {
            let before = pids.cpu()?;
            let floor = run(&direct, ns, workers, calls, &body).await?;
            let between = pids.cpu()?;
            let measured = run(&through, ns, workers, calls, &body).await?;
            let after = pids.cpu()?;
            cpu_rows.push((label, workers, calls, between - before, after - between));
            peak_rss = peak_rss.max(rss_kib(rig.sidecar.pid())?);
            println!(
                "| {label} | {workers} | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} | {:.0} | {:.2} | {:.0} % |",
                floor.p50_ms,
                floor.p99_ms,
                floor.rate,
                measured.p50_ms,
                measured.p99_ms,
                measured.rate,
                measured.p50_ms - floor.p50_ms,
                100.0 * measured.rate / floor.rate,
            );
        }
    }

    // CPU per call: what bounds the throughput once the two cores are busy. The ceiling is the
    // throughput the gateway path could reach if it used the cores as well as the direct path:
    // direct CPU per call over gateway CPU per call.
    println!();
    println!(
        "| body | concurrency | direct CPU µs/call (client, upstream) | gateway CPU µs/call (client + gateway, sidecar, upstream) | ceiling vs direct |"
    );
    println!("|---|---|---|---|---|");
    for (label, workers, calls, direct, through) in cpu_rows {
        let per_call = |ticks: u64| ticks as f64 / USER_HZ * 1e6 / calls as f64;
        println!(
            "| {label} | {workers} | {:.0} ({:.0}, {:.0}) | {:.0} ({:.0}, {:.0}, {:.0}) | {:.0} % |",
            per_call(direct.total()),
            per_call(direct.bench),
            per_call(direct.upstream),
            per_call(through.total()),
            per_call(through.bench),
            per_call(through.sidecar),
            per_call(through.upstream),
            100.0 * direct.total() as f64 / through.total().max(1) as f64,
        );
    }

    // Idle keep-alive connections from the app: what each one costs the sidecar.
    let before = rss_kib(rig.sidecar.pid())?;
    let mut idle = Vec::with_capacity(IDLE_CONNECTIONS);
    for _ in 0..IDLE_CONNECTIONS {
        let conn = through.connect().await?;
        through.call(&conn, ns, &Bytes::new()).await?;
        idle.push(conn);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(rig.sidecar.pid())?;
    let peak = peak_rss_kib(rig.sidecar.pid())?;
    drop(idle);
    println!();
    println!("| sidecar memory | KiB |");
    println!("|---|---|");
    println!("| RSS, highest seen between the rounds | {peak_rss} |");
    println!("| peak RSS (VmHWM) over the whole run | {peak} |");
    println!(
        "| per idle keep-alive connection from the app ({IDLE_CONNECTIONS} open) | {:.1} |",
        after.saturating_sub(before) as f64 / IDLE_CONNECTIONS as f64
    );
    println!();
    println!(
        "Targets: added p50 under 1 ms, throughput at least 80 % of direct, sidecar RSS under 8 MiB (8192 KiB). The direct column is the floor: the same client on keep-alive connections to go-httpbin."
    );
    drop(rig);
    drop(cluster);
    Ok(())
}

/// The processes a call costs CPU in: this one (the load generator, and the gateway and
/// broker on their own runtimes), the sidecar and go-httpbin.
struct Pids {
    upstream: u32,
    sidecar: u32,
}

/// CPU time (USER_HZ ticks) used so far, per process.
#[derive(Clone, Copy)]
struct Cpu {
    bench: u64,
    sidecar: u64,
    upstream: u64,
}

impl Pids {
    fn cpu(&self) -> anyhow::Result<Cpu> {
        Ok(Cpu {
            bench: cpu_ticks(std::process::id())?,
            sidecar: cpu_ticks(self.sidecar)?,
            upstream: cpu_ticks(self.upstream)?,
        })
    }
}

impl Cpu {
    fn total(self) -> u64 {
        self.bench + self.sidecar + self.upstream
    }
}

impl std::ops::Sub for Cpu {
    type Output = Cpu;
    fn sub(self, earlier: Cpu) -> Cpu {
        Cpu {
            bench: self.bench.saturating_sub(earlier.bench),
            sidecar: self.sidecar.saturating_sub(earlier.sidecar),
            upstream: self.upstream.saturating_sub(earlier.upstream),
        }
    }
}

/// Where the app's calls go: go-httpbin itself, or the sidecar's local gateway for ApiKey
/// `echo`.
struct Target {
    port: u16,
    prefix: String,
}

impl Target {
    async fn connect(&self) -> anyhow::Result<Mutex<SendRequest<Full<Bytes>>>> {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await?;
        tcp.set_nodelay(true)?;
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        Ok(Mutex::new(sender))
    }

    /// GET without a body, POST with one; go-httpbin echoes what it got.
    async fn call(
        &self,
        conn: &Mutex<SendRequest<Full<Bytes>>>,
        ns: &str,
        body: &Bytes,
    ) -> anyhow::Result<()> {
        let method = if body.is_empty() { "GET" } else { "POST" };
        let request = hyper::Request::builder()
            .method(method)
            .uri(format!("{}/anything/{ns}/bench", self.prefix))
            .header("host", format!("127.0.0.1:{}", self.port))
            .body(Full::new(body.clone()))?;
        let mut sender = conn.lock().await;
        sender.ready().await?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let read = response.into_body().collect().await?.to_bytes();
        ensure!(
            status.is_success(),
            "{status}: {}",
            String::from_utf8_lossy(&read[..read.len().min(300)])
        );
        Ok(())
    }
}

/// `calls` calls on `workers` keep-alive connections, one per worker.
async fn run(
    target: &Target,
    ns: &str,
    workers: usize,
    calls: usize,
    body: &Bytes,
) -> anyhow::Result<LoadResult> {
    let mut conns = Vec::with_capacity(workers);
    for _ in 0..workers {
        conns.push(target.connect().await?);
    }
    let shared = Arc::new((
        conns,
        Target {
            port: target.port,
            prefix: target.prefix.clone(),
        },
        ns.to_owned(),
        body.clone(),
    ));
    load(workers, calls, move |w| {
        let shared = Arc::clone(&shared);
        async move {
            let (conns, target, ns, body) = &*shared;
            target
                .call(&conns[w], ns, body)
                .await
                .with_context(|| format!("a call on port {}", target.port))
        }
    })
    .await
}

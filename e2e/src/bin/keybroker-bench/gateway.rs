//! `gateway`: app → sidecar → gateway → go-httpbin against the app calling go-httpbin
//! directly and against two byte relays in the sidecar's and the gateway's places (`relay`), in
//! one run: small and 1 MiB bodies at several concurrencies (p50/p99, throughput and CPU per
//! call), the sidecar's RSS with the proxy active, and its memory per idle keep-alive
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
use crate::relay;

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
    let relays = relay::start(&dir.join("relays"), upstream.addr()).await?;
    let relayed = Target {
        port: relays.port,
        prefix: String::new(),
    };
    // Warm every path (connections, the gateway's caches and budget lease).
    for target in [&direct, &relayed, &through] {
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
        "| body | concurrency | direct p50 ms | direct p99 ms | direct calls/s | relays p50 ms | relays calls/s | gateway p50 ms | gateway p99 ms | gateway calls/s | added p50 ms | gateway vs direct | relays vs direct | gateway vs relays | sidecar peak RSS KiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut peak_rss = 0;
    let mut cpu_rows = Vec::new();
    for (label, body, calls) in [
        ("small", Bytes::new(), SMALL_CALLS),
        ("1 MiB", large, LARGE_CALLS),
    ] {
        for &workers in &LEVELS {
            let before = pids.cpu()?;
            let floor = run(&direct, ns, workers, calls, &body).await?;
            let direct_done = pids.cpu()?;
            let hops = run(&relayed, ns, workers, calls, &body).await?;
            let relays_done = pids.cpu()?;
            reset_peak_rss(rig.sidecar.pid())?;
            let measured = run(&through, ns, workers, calls, &body).await?;
            let after = pids.cpu()?;
            let round_peak = peak_rss_kib(rig.sidecar.pid())?;
            cpu_rows.push(CpuRow {
                label,
                workers,
                calls,
                direct: direct_done - before,
                relays: relays_done - direct_done,
                gateway: after - relays_done,
            });
            peak_rss = peak_rss.max(round_peak);
            println!(
                "| {label} | {workers} | {:.2} | {:.2} | {:.0} | {:.2} | {:.0} | {:.2} | {:.2} | {:.0} | {:.2} | {:.0} % | {:.0} % | {:.0} % | {round_peak} |",
                floor.p50_ms,
                floor.p99_ms,
                floor.rate,
                hops.p50_ms,
                hops.rate,
                measured.p50_ms,
                measured.p99_ms,
                measured.rate,
                measured.p50_ms - floor.p50_ms,
                100.0 * measured.rate / floor.rate,
                100.0 * hops.rate / floor.rate,
                100.0 * measured.rate / hops.rate,
            );
        }
    }

    // CPU per call: what bounds the throughput once the two cores are busy. The ceiling is the
    // throughput the gateway path could reach if it used the cores as well as the direct path:
    // direct CPU per call over gateway CPU per call. The relays' ceiling is the same for two
    // hops that do nothing but copy bytes.
    println!();
    println!(
        "| body | concurrency | direct CPU µs/call (client, upstream) | relays CPU µs/call (client + relays, upstream) | gateway CPU µs/call (client + gateway, sidecar, upstream) | relays ceiling vs direct | gateway ceiling vs direct |"
    );
    println!("|---|---|---|---|---|---|---|");
    for row in cpu_rows {
        let per_call = |ticks: u64| ticks as f64 / USER_HZ * 1e6 / row.calls as f64;
        let ceiling = |cpu: Cpu| 100.0 * row.direct.total() as f64 / cpu.total().max(1) as f64;
        println!(
            "| {} | {} | {:.0} ({:.0}, {:.0}) | {:.0} ({:.0}, {:.0}) | {:.0} ({:.0}, {:.0}, {:.0}) | {:.0} % | {:.0} % |",
            row.label,
            row.workers,
            per_call(row.direct.total()),
            per_call(row.direct.bench),
            per_call(row.direct.upstream),
            per_call(row.relays.total()),
            per_call(row.relays.bench),
            per_call(row.relays.upstream),
            per_call(row.gateway.total()),
            per_call(row.gateway.bench),
            per_call(row.gateway.sidecar),
            per_call(row.gateway.upstream),
            ceiling(row.relays),
            ceiling(row.gateway),
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
    drop(idle);
    println!();
    println!("| sidecar memory | KiB |");
    println!("|---|---|");
    println!("| peak RSS (VmHWM) of the busiest round | {peak_rss} |");
    println!("| RSS with {IDLE_CONNECTIONS} idle keep-alive connections open | {after} |");
    println!(
        "| per idle keep-alive connection from the app ({IDLE_CONNECTIONS} open) | {:.1} |",
        after.saturating_sub(before) as f64 / IDLE_CONNECTIONS as f64
    );
    println!();
    println!(
        "Targets: added p50 under 1 ms, throughput at least 80 % of direct, sidecar RSS under 8 MiB (8192 KiB). The direct column is the floor: the same client on keep-alive connections to go-httpbin. The relays are the floor of two hops: byte copies in the sidecar's and the gateway's places, TLS between them, nothing checked."
    );
    drop(relays);
    drop(rig);
    drop(cluster);
    Ok(())
}

/// Starts `pid`'s peak resident set (VmHWM) afresh from its current RSS, so that each round
/// reports its own peak.
fn reset_peak_rss(pid: u32) -> anyhow::Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .with_context(|| format!("resetting the peak RSS of process {pid} (needs root)"))
}

/// The CPU one round's three paths used.
struct CpuRow {
    label: &'static str,
    workers: usize,
    calls: usize,
    direct: Cpu,
    relays: Cpu,
    gateway: Cpu,
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

//! `sidecar`: the release sidecar's start-up time, steady-state memory, idle CPU and size.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::ensure;

use keybroker_e2e::{Lifetime, process::Component};

use super::*;

/// What Vault Agent sidecars are observed to use (steady state), for comparison.
const VAULT_AGENT_RSS_MIB: &str = "13-20";

pub(crate) async fn sidecar_bench(
    sidecar: &PathBuf,
    idle_seconds: u64,
    starts: usize,
) -> anyhow::Result<()> {
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
        keybroker_contract::wire::AUDIENCE,
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

//! A replica sent SIGTERM during a stream of admissions and exchanges: no request fails.
//!
//! What it proves: the operator's one shutdown path (readiness 503 first, the servers still
//! accepting for `--shutdown-delay`, then a drain of what is in flight and of idle keep-alive
//! connections, a non-leader exiting too) loses nothing when a replica is rolled, as a
//! Deployment update or a node drain does many times a day. Two real `keybroker-operator`
//! processes (controller, webhook and broker roles, the default 5 s delay) serve a namespace;
//! the real apiserver calls their webhook through a Service whose EndpointSlices name this
//! machine's address, and sidecar-like clients exchange tokens over kept-alive connections.
//!
//! The test plays the kubelet and the endpoint controllers: it polls each replica's `/readyz`
//! and marks a replica not ready in its EndpointSlice once it answers anything but 200; its
//! exchange clients choose among ready replicas only when they open a connection, as a client
//! behind kube-proxy does, and keep using a connection until the server closes it. A request
//! refused because its kept-alive connection was already closed may go again (to the other
//! replica), which is what any HTTP client does; a request that went out and got no complete
//! answer, or anything but 200 (a pod create refused), is a failure.
//!
//! Why each check: "503 before the replica stopped accepting, and it kept accepting until the
//! EndpointSlice had dropped it" is the reason for the delay (a controller role stopping at the
//! signal once cut it short: connections were refused 45 ms after SIGTERM); "every answer after
//! the 503 says `Connection: close`" is what moves busy kept-alive clients (the apiserver above
//! all) off the replica before it closes their connections, a close that otherwise races their
//! next request (`Post ...: EOF` or `broken pipe` in about half the runs), so this check makes
//! that failure deterministic; "exited 0 within a bound" keeps a rollout from waiting out
//! `terminationGracePeriodSeconds` and ending in SIGKILL; "zero failures" covers the whole drain
//! (a SIGKILL instead fails it with reset exchanges and refused admissions); "the other replica
//! kept answering" rules out a stream that succeeded by stalling. Counts and latencies are
//! printed, not asserted tightly.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use nix::sys::signal::Signal;

use keybroker_contract::wire::{AUDIENCE, ExchangeRequest};
use keybroker_e2e::attack::percentiles;
use keybroker_e2e::https::{self, SendError};
use keybroker_e2e::{binaries, eventually, fixtures, in_namespace, pki, shared, shared_with_crds};

mod replica;

use replica::*;

const SERVICE: &str = "keybroker-webhook";
const LEASE: &str = "keybroker-controller";
/// The operator's default `--shutdown-delay`, which the replicas run with.
const SHUTDOWN_DELAY: Duration = Duration::from_secs(5);
/// How long the SIGTERMed replica may take to exit: the delay, the drain (at most 20 s) and
/// slack for a loaded machine. A pod's default terminationGracePeriodSeconds is 30 s.
const EXIT_BOUND: Duration = Duration::from_secs(30);
const EXCHANGE_WORKERS: usize = 4;
const ADMISSION_WORKERS: usize = 2;
/// How often the test's "kubelet" probes each replica's readiness.
const PROBE_PERIOD: Duration = Duration::from_millis(100);

/// What the test saw, in time since the stream started.
#[derive(Debug, Default)]
struct Timeline {
    /// The victim's first /readyz answer other than 200, and its status.
    first_unready: Option<(Duration, Option<u16>)>,
    /// When the victim's EndpointSlice said not ready (after the apiserver accepted the write).
    removed: Option<Duration>,
    /// First refused connection to the victim's broker and webhook ports.
    broker_refused: Option<Duration>,
    webhook_refused: Option<Duration>,
    /// The victim's admissions counter when the stream started, at SIGTERM and at its last
    /// scrape.
    admissions_at_start: Option<u64>,
    admissions_at_signal: Option<u64>,
    admissions_last: Option<u64>,
}

/// A successful exchange.
#[derive(Debug)]
struct Exchanged {
    replica: usize,
    /// When this attempt went out and when its answer was complete.
    sent: Duration,
    done: Duration,
    /// Since the first attempt of this exchange.
    latency: Duration,
    /// The answer said `Connection: close`.
    closes: bool,
}

/// Outcomes of the two streams.
#[derive(Debug, Default)]
struct Tally {
    exchanges: Vec<Exchanged>,
    /// Successful admissions: (completed at, latency).
    admissions: Vec<(Duration, Duration)>,
    /// Requests sent again because their connection was closed before they went out.
    resent: usize,
    /// Connections refused or failed before any request went out (tried elsewhere).
    connect_failures: usize,
    failures: Vec<String>,
}

#[tokio::test]
async fn a_sigtermed_replica_loses_no_admission_and_no_exchange() -> anyhow::Result<()> {
    let cluster = shared_with_crds().await?;
    in_namespace(cluster, "sigterm", |client, ns| async move {
        let cluster = shared().await?;
        let host = host_ip().context(
            "this machine has no non-loopback address, which an EndpointSlice must name",
        )?;
        fixtures::uploader_key(cluster, &client, &ns).await?;
        // The stream issues far more than the default 60 credentials a minute.
        Api::<keybroker_operator::crd::KeyProvider>::all(client.clone())
            .patch(
                &format!("{ns}-s3"),
                &PatchParams::default(),
                &Patch::Merge(
                    serde_json::json!({"spec": {"guardrails": {"maxIssuancesPerMinute": 100000}}}),
                ),
            )
            .await?;

        // One certificate pair for both replicas, as one Secret mounted in every pod would be.
        let dir = keybroker_e2e::run_dir()?;
        let ca = pki::Ca::create(&dir, "sigterm-ca")?;
        let broker_cert = ca.issue_server(&dir, "broker", &["127.0.0.1"])?;
        let webhook_cert = ca.issue_server(&dir, "webhook", &[&format!("{SERVICE}.{ns}.svc")])?;
        let binary = binaries::cargo_bin("keybroker-operator", "keybroker-operator").await?;

        let mut replicas = Vec::new();
        for name in ["replica-a", "replica-b"] {
            replicas.push(
                start_replica(
                    name,
                    &binary,
                    cluster,
                    &ns,
                    &dir,
                    host,
                    &ca.cert,
                    &broker_cert,
                    &webhook_cert,
                )
                .await?,
            );
        }
        let config = format!("keybroker-{ns}");
        let victim = non_leader(&client, &ns, &replicas).await?;
        register(&client, &ns, &config, &replicas, victim, &ca.cert).await?;
        let outcome = scenario(&client, &ns, &mut replicas, victim).await;
        let _ = Api::<MutatingWebhookConfiguration>::all(client.clone())
            .delete(&config, &DeleteParams::default())
            .await;
        if outcome.is_err() {
            for r in &replicas {
                // The audit lines of the exchanges would hide everything else.
                let log = std::fs::read_to_string(r.process.log_path()).unwrap_or_default();
                let lines: Vec<&str> = log
                    .lines()
                    .filter(|l| !l.contains("keybroker::audit"))
                    .collect();
                eprintln!(
                    "=== {} ({}, without audit lines) ===\n{}",
                    r.name,
                    r.process.log_path().display(),
                    lines[lines.len().saturating_sub(40)..].join("\n")
                );
            }
        }
        outcome
    })
    .await
}

async fn scenario(
    client: &Client,
    ns: &str,
    replicas: &mut [Replica],
    victim: usize,
) -> anyhow::Result<()> {
    let survivor = 1 - victim;
    // The apiserver calls the webhook once its configuration and the slices reached its caches.
    // Only the victim's endpoint is ready yet, so the apiserver's kept-alive connections go
    // to the replica that will be stopped (else its pool may hold connections to the other
    // one only, and the victim would see no admission at all).
    let mut n = 0;
    eventually(
        "the webhook to inject a probe pod",
        Duration::from_secs(60),
        || {
            n += 1;
            let (client, ns) = (client.clone(), ns.to_owned());
            async move {
                let pod = fixtures::pod(
                    &client,
                    &ns,
                    &format!("probe-{n}"),
                    "uploader",
                    Some("uploader"),
                )
                .await
                .ok()?;
                fixtures::injected_sidecar(&pod).is_some().then_some(())
            }
        },
    )
    .await?;
    Api::<EndpointSlice>::namespaced(client.clone(), ns)
        .patch(
            &slice_name(&replicas[survivor]),
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"endpoints": [endpoint(&replicas[survivor], true)]})),
        )
        .await?;
    let app = fixtures::pod(client, ns, "app", "uploader", Some("uploader")).await?;
    ensure!(
        fixtures::injected_sidecar(&app).is_some(),
        "pod app was not injected"
    );
    let token = fixtures::token(client, ns, "uploader", AUDIENCE, Some("app")).await?;
    let body = serde_json::to_vec(&ExchangeRequest {
        api_key: "uploader".into(),
    })?;
    for r in replicas.iter() {
        eventually(
            &format!("an exchange at {}", r.name),
            Duration::from_secs(30),
            || async {
                let reply = r
                    .client
                    .send("POST", "/v1/exchange", Some(&token), body.clone())
                    .await
                    .ok()?;
                (reply.status == 200).then_some(())
            },
        )
        .await?;
    }

    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(Mutex::new(vec![true; replicas.len()]));
    let timeline = Arc::new(Mutex::new(Timeline::default()));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let signalled = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();

    // The kubelet and the endpoint controllers.
    let targets: Vec<(String, SocketAddr)> = replicas
        .iter()
        .map(|r| (slice_name(r), r.metrics))
        .collect();
    let endpoints: Vec<serde_json::Value> = replicas.iter().map(|r| endpoint(r, false)).collect();
    {
        let (stop, ready, timeline, signalled) = (
            stop.clone(),
            ready.clone(),
            timeline.clone(),
            signalled.clone(),
        );
        let slices = Api::<EndpointSlice>::namespaced(client.clone(), ns);
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                for (i, (slice, metrics)) in targets.iter().enumerate() {
                    let status = readyz(*metrics).await;
                    if i == victim {
                        let admissions = admissions_served(*metrics).await;
                        let mut t = lock(&timeline);
                        if admissions.is_some() {
                            if t.admissions_at_start.is_none() {
                                t.admissions_at_start = admissions;
                            }
                            t.admissions_last = admissions;
                            if !signalled.load(Ordering::Relaxed) {
                                t.admissions_at_signal = admissions;
                            }
                        }
                        if status != Some(200) && t.first_unready.is_none() {
                            t.first_unready = Some((started.elapsed(), status));
                        }
                    }
                    let was_ready = lock(&ready)[i];
                    if status != Some(200) && was_ready {
                        // What kube-proxy and the apiserver's resolver would see next.
                        let mut unready = endpoints[i].clone();
                        unready["conditions"]["ready"] = false.into();
                        let patch = Patch::Merge(serde_json::json!({"endpoints": [unready]}));
                        match slices.patch(slice, &PatchParams::default(), &patch).await {
                            Ok(_) => {
                                lock(&ready)[i] = false;
                                if i == victim {
                                    lock(&timeline).removed = Some(started.elapsed());
                                }
                            }
                            Err(e) => eprintln!("updating EndpointSlice {slice}: {e}"),
                        }
                    }
                }
                tokio::time::sleep(PROBE_PERIOD).await;
            }
        }));
    }

    // Whether the victim still accepts connections on its serving ports.
    for (port, which) in [(replicas[victim].broker, 0), (replicas[victim].webhook, 1)] {
        let (stop, timeline) = (stop.clone(), timeline.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if tokio::net::TcpStream::connect(port).await.is_err() {
                    let mut t = lock(&timeline);
                    let slot = match which {
                        0 => &mut t.broker_refused,
                        _ => &mut t.webhook_refused,
                    };
                    slot.get_or_insert(started.elapsed());
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }

    // Sidecar-like exchange clients, each from its own address, as pods are.
    let clients: Vec<https::Client> = replicas.iter().map(|r| r.client.clone()).collect();
    for w in 0..EXCHANGE_WORKERS {
        let source = IpAddr::from([127, 0, 0, 20 + w as u8]);
        let clients: Vec<https::Client> = clients.iter().map(|c| c.from_source(source)).collect();
        let (stop, ready, tally, token, body) = (
            stop.clone(),
            ready.clone(),
            tally.clone(),
            token.clone(),
            body.clone(),
        );
        tasks.push(tokio::spawn(async move {
            exchange_worker(w, &clients, &ready, &stop, &tally, &token, &body, started).await;
        }));
    }

    // Pod creations through the apiserver, each admitted by whichever replica it resolves to.
    for w in 0..ADMISSION_WORKERS {
        let (stop, tally, client, ns) =
            (stop.clone(), tally.clone(), client.clone(), ns.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let name = format!("stream-{w}-{n}");
                let sent = Instant::now();
                let outcome =
                    fixtures::pod(&client, &ns, &name, "uploader", Some("uploader")).await;
                {
                    let mut t = lock(&tally);
                    match outcome {
                        Ok(pod) if fixtures::injected_sidecar(&pod).is_some() => {
                            t.admissions.push((started.elapsed(), sent.elapsed()));
                        }
                        Ok(_) => t
                            .failures
                            .push(format!("pod {name} was stored without the sidecar")),
                        Err(e) => t.failures.push(format!(
                            "creating pod {name} at {:?}: {e:#}",
                            started.elapsed()
                        )),
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }

    // Both replicas serve for a while (the victim admitting some of the stream), then one is
    // sent SIGTERM.
    tokio::time::sleep(Duration::from_secs(3)).await;
    eventually(
        "the replica to stop to admit pods of the stream",
        Duration::from_secs(30),
        || async {
            let t = lock(&timeline);
            (t.admissions_at_signal > t.admissions_at_start).then_some(())
        },
    )
    .await?;
    let signalled_at = started.elapsed();
    signalled.store(true, Ordering::Relaxed);
    replicas[victim].process.signal(Signal::SIGTERM);
    let exit = {
        let deadline = Instant::now() + EXIT_BOUND;
        loop {
            if let Some(status) = replicas[victim].process.wait_exit(Duration::ZERO) {
                break Some((status, started.elapsed()));
            }
            if Instant::now() >= deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    // The survivor carries the streams alone for a while.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await?;
    }
    let survivor_running = replicas[survivor]
        .process
        .wait_exit(Duration::ZERO)
        .is_none();

    let t = lock(&timeline);
    let tally = lock(&tally);
    let after = |at: Duration| at.saturating_sub(signalled_at);
    println!(
        "SIGTERM to {} at {:?} into the stream",
        replicas[victim].name, signalled_at
    );
    println!(
        "  /readyz not 200 after {:?} (status {:?})",
        t.first_unready.map(|(at, _)| after(at)),
        t.first_unready.and_then(|(_, s)| s)
    );
    println!("  EndpointSlice not ready after {:?}", t.removed.map(after));
    println!(
        "  stopped accepting after {:?} (broker) and {:?} (webhook); --shutdown-delay {SHUTDOWN_DELAY:?}",
        t.broker_refused.map(after),
        t.webhook_refused.map(after)
    );
    println!(
        "  exited {:?} after {:?}",
        exit.map(|(s, _)| s),
        exit.map(|(_, at)| after(at))
    );
    let exit_at = exit.map(|(_, at)| at).unwrap_or(Duration::MAX);
    let report = |what: &str, samples: &mut Vec<Duration>| {
        let (p50, p99) = percentiles(samples);
        let max = samples.iter().max().copied().unwrap_or_default();
        println!(
            "  {what}: {} ok, p50 {p50:?}, p99 {p99:?}, max {max:?}",
            samples.len()
        );
    };
    for (i, r) in replicas.iter().enumerate() {
        let phases = [
            ("before SIGTERM", Duration::ZERO, signalled_at),
            ("from SIGTERM to exit", signalled_at, exit_at),
            ("after the exit", exit_at, Duration::MAX),
        ];
        for (phase, from, to) in phases {
            let mut samples: Vec<Duration> = tally
                .exchanges
                .iter()
                .filter(|e| e.replica == i && e.done >= from && e.done < to)
                .map(|e| e.latency)
                .collect();
            report(&format!("exchanges at {} {phase}", r.name), &mut samples);
        }
    }
    let mut admissions: Vec<Duration> = tally.admissions.iter().map(|a| a.1).collect();
    report("admissions (pods created and injected)", &mut admissions);
    println!(
        "  the stopped replica admitted {} reviews of the stream before SIGTERM and {} after",
        t.admissions_at_signal
            .unwrap_or_default()
            .saturating_sub(t.admissions_at_start.unwrap_or_default()),
        t.admissions_last
            .unwrap_or_default()
            .saturating_sub(t.admissions_at_signal.unwrap_or_default())
    );
    println!(
        "  requests sent again after their kept-alive connection closed: {}; connections refused before sending: {}",
        tally.resent, tally.connect_failures
    );
    let late: Vec<&Exchanged> = tally
        .exchanges
        .iter()
        .filter(|e| e.replica == victim && e.done >= signalled_at)
        .collect();
    println!(
        "  answers of the stopped replica after SIGTERM: {}, {} of them with Connection: close",
        late.len(),
        late.iter().filter(|e| e.closes).count()
    );
    for failure in tally.failures.iter().take(20) {
        println!("  FAILED: {failure}");
    }

    let (status, _) = exit.with_context(|| {
        format!(
            "{} still running {EXIT_BOUND:?} after SIGTERM",
            replicas[victim].name
        )
    })?;
    ensure!(
        status.success(),
        "{} exited with {status}",
        replicas[victim].name
    );
    ensure!(
        tally.failures.is_empty(),
        "{} requests failed, first: {}",
        tally.failures.len(),
        tally.failures[0]
    );
    let (unready_at, unready_status) = t
        .first_unready
        .context("the stopped replica's /readyz never left 200")?;
    ensure!(
        unready_status == Some(503),
        "/readyz answered {unready_status:?} first, not 503"
    );
    let removed = t
        .removed
        .context("the EndpointSlice never dropped the stopped replica")?;
    for (port, refused) in [("broker", t.broker_refused), ("webhook", t.webhook_refused)] {
        let refused =
            refused.with_context(|| format!("the {port} port never refused a connection"))?;
        ensure!(
            unready_at < refused && removed < refused,
            "the {port} port refused connections {:?} after SIGTERM, before the replica was out of its endpoints ({:?} after SIGTERM; /readyz 503 after {:?})",
            after(refused),
            after(removed),
            after(unready_at)
        );
    }
    // Requests sent once /readyz said 503 were answered after the signal: each answer must
    // tell its client to leave the connection (else busy clients stay until the stop, and
    // closing their connections then races their next request).
    let kept: Vec<&Exchanged> = tally
        .exchanges
        .iter()
        .filter(|e| e.replica == victim && e.sent > unready_at && !e.closes)
        .collect();
    ensure!(
        kept.is_empty(),
        "{} answers of the stopped replica after /readyz said 503 kept their connection open, first sent {:?} after SIGTERM",
        kept.len(),
        kept.first().map(|e| after(e.sent))
    );
    ensure!(survivor_running, "{} exited too", replicas[survivor].name);
    ensure!(
        tally
            .exchanges
            .iter()
            .any(|e| e.replica == survivor && e.done > exit_at),
        "no exchange at {} after the other replica exited",
        replicas[survivor].name
    );
    ensure!(
        tally.admissions.iter().any(|(at, _)| *at > exit_at),
        "no admission after the replica exited"
    );
    let log = std::fs::read_to_string(replicas[victim].process.log_path())?;
    ensure!(
        log.contains("stopping while not the leader"),
        "the stopped replica's log does not say it stopped as a non-leader"
    );
    Ok(())
}

/// Sends exchanges back to back on a kept-alive connection to a replica chosen among the ready
/// ones when the connection opens, until `stop`.
#[allow(clippy::too_many_arguments)]
async fn exchange_worker(
    worker: usize,
    clients: &[https::Client],
    ready: &Mutex<Vec<bool>>,
    stop: &AtomicBool,
    tally: &Mutex<Tally>,
    token: &str,
    body: &[u8],
    started: Instant,
) {
    let mut picks = worker;
    let mut conn: Option<(usize, https::Connection, usize)> = None;
    while !stop.load(Ordering::Relaxed) {
        let sent = Instant::now();
        // One exchange, sent again on another connection while it never went out.
        loop {
            if conn
                .as_ref()
                .is_none_or(|(_, c, used)| c.is_closed() || *used >= 25)
            {
                let choices: Vec<usize> = {
                    let ready = lock(ready);
                    (0..clients.len()).filter(|i| ready[*i]).collect()
                };
                if choices.is_empty() {
                    lock(tally).failures.push("no ready replica".into());
                    return;
                }
                let replica = choices[picks % choices.len()];
                picks += 1;
                match clients[replica].connect().await {
                    Ok(c) => conn = Some((replica, c, 0)),
                    Err(_) => {
                        conn = None;
                        lock(tally).connect_failures += 1;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                }
            }
            let Some((replica, c, used)) = conn.as_mut() else {
                continue;
            };
            *used += 1;
            let replica = *replica;
            let attempt = started.elapsed();
            match c
                .try_send("POST", "/v1/exchange", Some(token), body.to_vec())
                .await
            {
                Ok(reply) if reply.status == 200 => {
                    lock(tally).exchanges.push(Exchanged {
                        replica,
                        sent: attempt,
                        done: started.elapsed(),
                        latency: sent.elapsed(),
                        closes: reply.closes,
                    });
                }
                Ok(reply) => {
                    let text = String::from_utf8_lossy(&reply.body).into_owned();
                    lock(tally).failures.push(format!(
                        "exchange at replica {replica} at {:?}: {} {text}",
                        started.elapsed(),
                        reply.status
                    ));
                }
                Err(SendError::NotSent(_)) => {
                    conn = None;
                    lock(tally).resent += 1;
                    continue;
                }
                Err(e @ SendError::Failed(_)) => {
                    conn = None;
                    lock(tally).failures.push(format!(
                        "exchange at replica {replica} at {:?}: {e:#}",
                        started.elapsed()
                    ));
                }
            }
            break;
        }
    }
}

/// The guarded value, even if a panicking task held the lock (the panic fails the test anyway).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

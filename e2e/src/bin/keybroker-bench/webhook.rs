//! `webhook`: AdmissionReviews through the release operator's webhook vs. a fixed-response
//! hyper+rustls server (the floor).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};

use keybroker_e2e::{Lifetime, process::Component};

use super::*;

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
pub(crate) async fn floor_server(
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

pub(crate) async fn webhook(requests: usize, operator: &PathBuf) -> anyhow::Result<()> {
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
    // The same steady load, the apiserver's pace for a busy cluster, without and with the
    // attack tests' hostile load running against the same webhook.
    println!();
    let rss = |pid| rss_kib(pid).map(|k| k / 1024).unwrap_or_default();
    let pid = operator.pid();
    let quiet = open_loop(&webhook_https, 100.0, Duration::from_secs(10), &small).await?;
    let quiet_rss = rss(pid);
    let attack = hostile::on_webhook(webhook_addr, &webhook_https).await;
    let attacked = open_loop(&webhook_https, 100.0, Duration::from_secs(10), &small).await?;
    let attacked_rss = rss(pid);
    let what = attack.what.clone();
    drop(attack);
    println!(
        "| {:<44} | {:>8} | {:>8} | {:>8} | {:>8} |",
        "1-container review at 100 req/s", "req/s", "p50 ms", "p99 ms", "RSS MiB"
    );
    println!(
        "|{:-<46}|{:->10}|{:->10}|{:->10}|{:->10}|",
        "", "", "", "", ""
    );
    for (when, r, rss) in [
        ("alone".to_owned(), &quiet, quiet_rss),
        (format!("under attack ({what})"), &attacked, attacked_rss),
    ] {
        println!(
            "| {:<44} | {:>8.0} | {:>8.3} | {:>8.3} | {:>8} |",
            when, r.rate, r.p50_ms, r.p99_ms, rss
        );
    }
    println!("(target under attack: p99 < 100 ms)");
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

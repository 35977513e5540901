//! Hostile inputs against the real webhook (called by the real apiserver) and the real broker
//! (TokenReview by the real apiserver), while legitimate admissions and exchanges keep
//! answering within the apiserver's 5 s webhook timeout: annotations of 50,000 names, four
//! parallel multi-MiB bodies of nonsense, 1,000 idle connections, 5,000 distinct junk bearer
//! tokens and one forged token replayed. The TokenReviews the apiserver received are counted
//! from its audit log. Latencies are printed, not asserted tightly.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::Client;
use kube::api::{Api, DeleteParams, PostParams};

use keybroker_contract::wire::{AUDIENCE, ExchangeRequest};
use keybroker_e2e::attack::{self, percentiles};
use keybroker_e2e::server_thread::ServerThread;
use keybroker_e2e::{
    Cluster, eventually, fixtures, https, in_namespace, pki, shared, shared_with_crds,
};
use keybroker_operator::metrics::Metrics;
use keybroker_operator::tls::ReloadingCert;

/// The apiserver gives a webhook call this long (timeoutSeconds in the registration).
const APISERVER_TIMEOUT: Duration = Duration::from_secs(5);

/// A server certificate for 127.0.0.1 from a fresh CA: (TLS config, CA file, CA PEM).
fn serving_tls(
    name: &str,
) -> anyhow::Result<(Arc<rustls::ServerConfig>, std::path::PathBuf, String)> {
    let dir = keybroker_e2e::run_dir()?;
    let ca = pki::Ca::create(&dir, &format!("{name}-ca"))?;
    let serving = ca.issue_server(&dir, name, &["127.0.0.1"])?;
    let tls = ReloadingCert::new(&serving.cert, &serving.key)?.server_config();
    let ca_pem = std::fs::read_to_string(&ca.cert)?;
    Ok((Arc::new(tls), ca.cert, ca_pem))
}

/// The source address of attacking worker `n`: each its own peer, as pods on a real network
/// are (the apiserver and the legitimate clients are 127.0.0.1).
fn attacker(n: usize) -> std::net::IpAddr {
    std::net::IpAddr::from([127, 0, 0, 10 + (n % 200) as u8])
}

async fn register(
    client: &Client,
    name: &str,
    ns: &str,
    url: &str,
    ca: &str,
) -> anyhow::Result<()> {
    use base64::Engine;
    let config: MutatingWebhookConfiguration = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "webhooks": [{
            "name": "inject.keybroker.dev",
            "clientConfig": {"url": url, "caBundle": base64::engine::general_purpose::STANDARD.encode(ca)},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
            "objectSelector": {"matchLabels": {"keybroker.dev/inject": "true"}},
            "failurePolicy": "Fail",
            "sideEffects": "None",
            "reinvocationPolicy": "IfNeeded",
            "timeoutSeconds": APISERVER_TIMEOUT.as_secs(),
            "admissionReviewVersions": ["v1"],
        }],
    }))?;
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .create(&PostParams::default(), &config)
        .await?;
    Ok(())
}

fn report(what: &str, samples: &mut [Duration]) -> Duration {
    let (p50, p99) = percentiles(samples);
    let max = samples.last().copied().unwrap_or_default();
    eprintln!(
        "{what}: {} requests, p50 {p50:?}, p99 {p99:?}, max {max:?}",
        samples.len()
    );
    max
}

fn rss_mib() -> u64 {
    attack::rss_bytes().unwrap_or_default() >> 20
}

#[tokio::test]
async fn admissions_keep_answering_under_hostile_reviews() -> anyhow::Result<()> {
    let cluster = shared_with_crds().await?;
    in_namespace(cluster, "atk-webhook", |client, ns| async move {
        let cluster = shared().await?;
        fixtures::uploader_key(cluster, &client, &ns).await?;
        let (tls, ca_file, ca) = serving_tls("webhook")?;
        let metrics = Arc::new(Metrics::default());
        let localhost = "127.0.0.1:0".parse()?;
        let mut server =
            ServerThread::webhook(&cluster.kubeconfig, localhost, tls, fixtures::inject_settings(), metrics).await?;
        let addr = server.addr;
        let direct = https::Client::new(addr, &ca_file)?;
        let config_name = format!("keybroker-{ns}");
        register(&client, &config_name, &ns, &format!("https://{addr}/mutate"), &ca).await?;
        let result = async {
            let mut n = 0;
            eventually("the webhook to inject a probe pod", Duration::from_secs(30), || {
                n += 1;
                let (client, ns) = (client.clone(), ns.clone());
                async move {
                    let pod = fixtures::pod(&client, &ns, &format!("probe-{n}"), "uploader", Some("uploader")).await.ok()?;
                    fixtures::injected_sidecar(&pod).is_some().then_some(())
                }
            })
            .await?;

            // One hostile review alone: refused at once, naming the limit.
            let huge = Arc::new(attack::many_names_review("huge", &ns, 50_000));
            let started = Instant::now();
            let reply = direct.send("POST", "/mutate", None, huge.to_vec()).await?;
            let alone = started.elapsed();
            let review: serde_json::Value = reply.json()?;
            ensure!(review["response"]["allowed"] == false, "{review}");
            let message = review["response"]["status"]["message"].as_str().unwrap_or_default();
            ensure!(message.contains("at most 16"), "{message}");
            eprintln!("a 50,000-name review alone: denied in {alone:?}");
            ensure!(alone < APISERVER_TIMEOUT, "a 50,000-name review took {alone:?}");

            let rss_before = rss_mib();
            let stop = Arc::new(AtomicBool::new(false));
            let mut tasks = Vec::new();
            let (names, t) = attack::flood(3, Arc::clone(&stop), {
                let (direct, huge) = (direct.clone(), Arc::clone(&huge));
                move |worker, _| {
                    let (direct, huge) = (direct.from_source(attacker(worker)), Arc::clone(&huge));
                    async move { direct.send("POST", "/mutate", None, huge.to_vec()).await.is_ok() }
                }
            });
            tasks.extend(t);
            let nonsense: Arc<Vec<Vec<u8>>> =
                Arc::new((0..4).map(|i| attack::nonsense_body(i, 3 << 20)).collect());
            let (junk, t) = attack::flood(4, Arc::clone(&stop), {
                let (direct, nonsense) = (direct.clone(), Arc::clone(&nonsense));
                move |worker, _| {
                    let (direct, nonsense) = (direct.from_source(attacker(10 + worker)), Arc::clone(&nonsense));
                    async move { direct.send("POST", "/mutate", None, nonsense[worker].clone()).await.is_ok() }
                }
            });
            tasks.extend(t);
            let idle = attack::idle_connections(addr, 1000).await;
            ensure!(idle.len() == 1000, "only {} idle connections opened", idle.len());

            // Legitimate admissions through the apiserver, one after another, for 20 s.
            let mut samples = Vec::new();
            let until = Instant::now() + Duration::from_secs(20);
            let mut i = 0;
            while Instant::now() < until {
                i += 1;
                let started = Instant::now();
                let pod = fixtures::pod(&client, &ns, &format!("legit-{i}"), "uploader", Some("uploader"))
                    .await
                    .with_context(|| format!("legitimate pod {i} under attack"))?;
                samples.push(started.elapsed());
                ensure!(fixtures::injected_sidecar(&pod).is_some(), "legit-{i} was stored without the sidecar");
            }
            let rss_during = rss_mib();
            stop.store(true, Ordering::Relaxed);
            for task in tasks {
                let _ = task.await;
            }
            drop(idle);
            eprintln!(
                "attack rounds: {} x 50,000-name reviews, {} x 3 MiB nonsense ({} failed to send); RSS {rss_before} MiB -> {rss_during} MiB",
                names.sent.load(Ordering::Relaxed),
                junk.sent.load(Ordering::Relaxed),
                names.failed.load(Ordering::Relaxed) + junk.failed.load(Ordering::Relaxed),
            );
            let max = report("legitimate admissions under attack", &mut samples);
            ensure!(max < APISERVER_TIMEOUT, "a legitimate admission took {max:?}");
            ensure!(names.sent.load(Ordering::Relaxed) > 10, "the name flood hardly ran");
            ensure!(junk.sent.load(Ordering::Relaxed) > 10, "the nonsense flood hardly ran");
            // 16 reviews in flight of at most 4 MiB each, plus the test's own generators.
            ensure!(
                rss_during < rss_before + 512,
                "RSS grew from {rss_before} MiB to {rss_during} MiB"
            );
            Ok(())
        }
        .await;
        let _ = Api::<MutatingWebhookConfiguration>::all(client.clone())
            .delete(&config_name, &DeleteParams::default())
            .await;
        server.stop();
        result
    })
    .await
}

/// TokenReviews the apiserver received so far.
fn token_reviews(cluster: &Cluster) -> usize {
    cluster
        .audit_events(|e| e["objectRef"]["resource"] == "tokenreviews")
        .len()
}

#[tokio::test]
async fn junk_tokens_never_reach_the_apiserver() -> anyhow::Result<()> {
    let cluster = shared_with_crds().await?;
    in_namespace(cluster, "atk-broker", |client, ns| async move {
        let cluster = shared().await?;
        fixtures::uploader(cluster, &client, &ns).await?;
        let token = fixtures::token(&client, &ns, "uploader", AUDIENCE, Some("app")).await?;
        let (tls, ca_file, _) = serving_tls("broker")?;
        let server = ServerThread::broker(&cluster.kubeconfig, "127.0.0.1:0".parse()?, tls).await?;
        let broker_client = https::Client::new(server.addr, &ca_file)?;
        let body = serde_json::to_vec(&ExchangeRequest { api_key: "uploader".into() })?;
        // Each attacking worker is its own peer (127.0.0.<10+n>), as pods are on a real network;
        // the legitimate client is 127.0.0.1.
        let exchange_from = move |peer: u8, token: String| {
            let client = broker_client.from_source(std::net::IpAddr::from([127, 0, 0, peer]));
            let body = body.clone();
            async move { client.send("POST", "/v1/exchange", Some(&token), body).await }
        };
        let exchange = {
            let exchange_from = exchange_from.clone();
            move |token: String| exchange_from(1, token)
        };
        let first = exchange(token.clone()).await?;
        ensure!(first.status == 200, "{first:?}");
        let issuer_doc = client
            .request_text(http::Request::get("/.well-known/openid-configuration").body(Vec::new())?)
            .await?;
        let issuer = serde_json::from_str::<serde_json::Value>(&issuer_doc)?["issuer"]
            .as_str()
            .context("no issuer")?
            .to_owned();
        // Lets the audit log settle, then counts from here.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before = token_reviews(cluster);

        let stop = Arc::new(AtomicBool::new(false));
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (junk, mut tasks) = attack::flood(16, Arc::clone(&stop), {
            let exchange_from = exchange_from.clone();
            let next = Arc::clone(&next);
            move |worker, _| {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let exchange_from = exchange_from.clone();
                async move {
                    if i >= 5000 {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        return true;
                    }
                    let peer = 10 + worker as u8;
                    matches!(exchange_from(peer, attack::junk_token(i)).await, Ok(r) if r.status == 401)
                }
            }
        });
        let forged = attack::forged_token(&issuer, 0);
        let (replayed, t) = attack::flood(4, Arc::clone(&stop), {
            let exchange_from = exchange_from.clone();
            move |worker, _| {
                let (exchange_from, forged) = (exchange_from.clone(), forged.clone());
                let peer = 40 + worker as u8;
                async move { matches!(exchange_from(peer, forged).await, Ok(r) if r.status == 401) }
            }
        });
        tasks.extend(t);

        let attack_started = Instant::now();
        let mut samples = Vec::new();
        while next.load(Ordering::Relaxed) < 5000 {
            let started = Instant::now();
            let reply = exchange(token.clone()).await?;
            samples.push(started.elapsed());
            ensure!(reply.status == 200, "a legitimate exchange under attack: {reply:?}");
            // Under the ApiKey's default cap of 60 issuances a minute.
            tokio::time::sleep_until((started + Duration::from_millis(1500)).into()).await;
        }
        // A few more rounds of the replayed forgery after the junk is spent.
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.store(true, Ordering::Relaxed);
        for task in tasks {
            let _ = task.await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let reviews = token_reviews(cluster) - before;
        let elapsed = attack_started.elapsed().as_secs() as usize + 3;
        let max = report("legitimate exchanges under 5,000 junk tokens", &mut samples);
        eprintln!(
            "{} junk exchanges ({} not refused 401), {} replays of one forged token ({} not refused): {reviews} TokenReviews",
            junk.sent.load(Ordering::Relaxed),
            junk.failed.load(Ordering::Relaxed),
            replayed.sent.load(Ordering::Relaxed),
            replayed.failed.load(Ordering::Relaxed),
        );
        ensure!(junk.failed.load(Ordering::Relaxed) == 0, "junk got something other than 401");
        ensure!(replayed.failed.load(Ordering::Relaxed) == 0, "the forged token got something other than 401/429");
        ensure!(replayed.sent.load(Ordering::Relaxed) > 100, "the replay hardly ran");
        // Junk never reaches the apiserver; the forged token once per refusal-cache period
        // (60 s), the legitimate one once per verified-cache period (30 s).
        let allowed = 1 + elapsed / 60 + 1 + elapsed / 30;
        ensure!(
            reviews <= allowed,
            "{reviews} TokenReviews in {elapsed} s for junk and one forged token (at most {allowed})"
        );
        ensure!(max < APISERVER_TIMEOUT, "a legitimate exchange took {max:?}");
        drop(server);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_draining_server_finishes_every_request_in_flight() -> anyhow::Result<()> {
    use keybroker_operator::https::{self as operator_https, Limits};
    use keybroker_operator::shutdown;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (tls, ca_file, _) = serving_tls("drain")?;
    let client = https::Client::new(addr, &ca_file)?;
    let (trigger, stopping) = shutdown::channel();
    let served = tokio::spawn(operator_https::serve_until(
        listener,
        tls,
        Limits::default(),
        stopping,
        |_req, _peer| async {
            // A slow exchange: still in flight when the drain starts.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            operator_https::json(hyper::StatusCode::OK, &serde_json::json!({"ok": true}))
        },
    ));
    // Kept-alive connections with a request in flight, and one idle kept-alive connection.
    let mut conns = Vec::new();
    for _ in 0..20 {
        conns.push(client.connect().await?);
    }
    let mut idle = client.connect().await?;
    let mut in_flight = Vec::new();
    for mut conn in conns {
        in_flight.push(tokio::spawn(async move {
            conn.send("POST", "/v1/exchange", None, Vec::new()).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    trigger.trigger();
    for request in in_flight {
        let reply = request.await??;
        ensure!(
            reply.status == 200,
            "a request in flight failed during the drain: {reply:?}"
        );
    }
    tokio::time::timeout(Duration::from_secs(5), served)
        .await
        .context("the server did not finish draining")??;
    let drained = started.elapsed();
    eprintln!("drained 20 requests in flight in {drained:?}");
    ensure!(
        drained >= Duration::from_millis(500),
        "the requests were not in flight when the drain began ({drained:?})"
    );
    // After the drain nothing is accepted, and the idle connection was closed.
    ensure!(
        client
            .send("GET", "/healthz", None, Vec::new())
            .await
            .is_err(),
        "a new connection was served after the drain"
    );
    ensure!(
        idle.send("GET", "/healthz", None, Vec::new())
            .await
            .is_err(),
        "an idle connection outlived the drain"
    );
    Ok(())
}

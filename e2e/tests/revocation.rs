//! Provider-side revocation against the real apiserver and MinIO, proven by the credential
//! itself: a long-lived boto3 client that cached it, and a copy used from elsewhere, are refused
//! by MinIO within a second of the change that withdrew the right: revocation, a narrowed
//! scope, a narrowed service-account list, an unselected namespace, the ApiKey or its
//! KeyProvider deleted. Pods still entitled are told at once to fetch credentials under the new
//! grant, and those work.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams};

use keybroker_contract::wire::{AUDIENCE, ExchangeRequest, ExchangeResponse, RevocationStatus};
use keybroker_e2e::boto3::CachedClient;
use keybroker_e2e::fixtures::{self, BUCKET, Controller};
use keybroker_e2e::{eventually, https, in_namespace, logs, pki, shared, shared_with_crds};
use keybroker_operator::broker::{Broker, Held, PollAnswer, server};
use keybroker_operator::crd::{ApiKey, KeyProvider};
use keybroker_operator::tls::ReloadingCert;

/// The functional bound of these tests (the promise is 1 s; the benchmark measures it). Kept
/// generous so that a loaded CI machine does not fail a working revocation.
const REFUSED_WITHIN: Duration = Duration::from_secs(3);
/// How long the setup before the change under test may take (credentials issued, a widened
/// grant in place): not a property under test, and slower when CI's 2 cores are busy.
const SETUP_WITHIN: Duration = Duration::from_secs(30);

/// The S3 answers that mean "these credentials no longer work".
fn refused(code: &str) -> bool {
    matches!(
        code,
        "AccessDenied" | "InvalidAccessKeyId" | "InvalidToken" | "ExpiredToken"
    )
}

async fn exchange(broker: &Broker, token: &str, name: &str) -> anyhow::Result<ExchangeResponse> {
    Ok(broker
        .exchange(
            token,
            &ExchangeRequest {
                api_key: name.into(),
            },
            "127.0.0.1:1",
        )
        .await?)
}

/// Time from `since` until the same, already started, boto3 client is refused on `key`.
async fn refused_after(
    client: &mut CachedClient,
    key: &str,
    since: Instant,
) -> anyhow::Result<Duration> {
    loop {
        let answer = client.put(BUCKET, key).await?;
        if refused(&answer) {
            return Ok(since.elapsed());
        }
        ensure!(answer == "OK", "unexpected answer {answer}");
        ensure!(
            since.elapsed() < REFUSED_WITHIN,
            "the cached client could still PUT {:?} after the change",
            since.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A Rust S3 client with a copy of `creds`: the leaked copy used from elsewhere.
fn copy(minio: &str, creds: &ExchangeResponse) -> anyhow::Result<aws_sdk_s3::Client> {
    let c = creds
        .credentials
        .as_ref()
        .context("no AWS credentials in the answer")?;
    Ok(fixtures::s3_client(
        minio,
        &c.access_key_id,
        &c.secret_access_key,
        Some(&c.session_token),
    ))
}

struct Setup {
    client: Client,
    ns: String,
    minio: String,
    broker: Arc<Broker>,
    token: String,
    _controller: Controller,
}

/// The uploader tenant with the controller and a broker, and the pod's bound token.
async fn setup(client: Client, ns: String) -> anyhow::Result<Setup> {
    let cluster = shared().await?;
    let minio = cluster.minio.as_ref().context("no MinIO")?.endpoint.clone();
    fixtures::uploader(cluster, &client, &ns).await?;
    let controller = Controller::start(&client, &ns);
    fixtures::recorded_grant(&client, &ns, "uploader", None).await?;
    let broker = Broker::start(
        client.clone(),
        fixtures::COUNTS_NAMESPACE,
        fixtures::SIDECAR_IMAGE,
    )
    .await;
    let token = fixtures::token(&client, &ns, "uploader", AUDIENCE, Some("app")).await?;
    Ok(Setup {
        client,
        ns,
        minio,
        broker,
        token,
        _controller: controller,
    })
}

#[tokio::test]
async fn revocation_refuses_a_cached_client_and_a_copy_at_minio() -> anyhow::Result<()> {
    logs::capture();
    let cluster = shared_with_crds().await?;
    in_namespace(cluster, "rvk-cached", |client, ns| async move {
        let s = setup(client, ns).await?;
        let issued = exchange(&s.broker, &s.token, "uploader").await?;
        let inside = format!("{}/reports/a.csv", s.ns);
        let mut boto3 = CachedClient::start(
            &s.minio,
            issued.credentials.as_ref().context("no AWS credentials")?,
        )
        .await?;
        ensure!(
            boto3.put(BUCKET, &inside).await? == "OK",
            "PUT before revocation"
        );
        let leaked = copy(&s.minio, &issued)?;
        ensure!(fixtures::put_object(&leaked, &inside).await.is_none());

        let patched = Instant::now();
        fixtures::revoke(&s.client, &s.ns, "uploader").await?;
        let took = refused_after(&mut boto3, &inside, patched).await?;
        eprintln!("cached boto3 client refused {took:?} after spec.revoked: true");
        let code = fixtures::put_object(&leaked, &inside).await;
        ensure!(
            code.as_deref().is_some_and(refused),
            "the copied credentials still work: {code:?}"
        );

        // One audit record for the revocation, with its cause and MinIO's answer; no secret.
        let logs = eventually("the revocation's audit record", REFUSED_WITHIN, || async {
            let logs = logs::captured();
            logs.lines()
                .any(|l| {
                    l.contains("keybroker::audit")
                        && l.contains("\"outcome\":\"revoked\"")
                        && l.contains(&format!("\"namespace\":\"{}\"", s.ns))
                })
                .then_some(logs)
        })
        .await?;
        let record = logs
            .lines()
            .find(|l| l.contains("\"outcome\":\"revoked\"") && l.contains(&s.ns))
            .context("no record")?;
        for field in [
            "\"api_key\":\"uploader\"",
            "\"cause\":\"Revoked\"",
            "\"at_provider\":true",
            "MinIO revoked the sessions tagged keybroker:",
        ] {
            ensure!(
                record.contains(field),
                "audit record lacks {field}: {record}"
            );
        }
        let c = issued
            .credentials
            .as_ref()
            .context("no AWS credentials in the answer")?;
        for secret in [&c.secret_access_key, &c.session_token, &s.token] {
            ensure!(!logs.contains(secret.as_str()), "a secret reached the logs");
        }

        // Restored: new credentials work again (the revocation removed only the old ones).
        Api::<ApiKey>::namespaced(s.client.clone(), &s.ns)
            .patch(
                "uploader",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"spec": {"revoked": false}})),
            )
            .await?;
        let again = eventually(
            "credentials after the restore",
            REFUSED_WITHIN * 3,
            || async { exchange(&s.broker, &s.token, "uploader").await.ok() },
        )
        .await?;
        ensure!(
            fixtures::put_object(&copy(&s.minio, &again)?, &inside)
                .await
                .is_none(),
            "credentials minted after the restore do not work"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_narrowed_scope_revokes_the_wide_credentials_and_renews_the_pod() -> anyhow::Result<()> {
    let cluster = shared_with_crds().await?;
    in_namespace(cluster, "rvk-narrow", |client, ns| async move {
        let s = setup(client, ns).await?;
        let api = Api::<ApiKey>::namespaced(s.client.clone(), &s.ns);
        let wide = [
            fixtures::object_arn(&s.ns, "reports/*"),
            fixtures::object_arn(&s.ns, "invoices/*"),
        ];
        // The grant before the change, read before it: read after, it may already be the new one
        // or still the old one.
        let narrow = fixtures::recorded_grant(&s.client, &s.ns, "uploader", None).await?;
        api.patch(
            "uploader",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"scope": {"resources": wide}}})),
        )
        .await?;
        // A new grant recorded together with the widened policy, read from one object.
        let wide_grant = eventually("the widened grant", SETUP_WITHIN, || {
            let (client, ns, narrow) = (s.client.clone(), s.ns.clone(), narrow.clone());
            async move { wide_recorded(&client, &ns).await.filter(|g| *g != narrow) }
        })
        .await?;
        // Once a second, for up to a minute: every exchange that mints counts against the
        // provider's 60 issuances a minute, and polling at the usual 200 ms would spend that
        // cap in 12 s while the broker's cache catches up with the widened grant.
        let started = Instant::now();
        let issued = loop {
            let answer = exchange(&s.broker, &s.token, "uploader").await;
            match answer {
                Ok(r) if r.grant == wide_grant => break r,
                other => ensure!(
                    started.elapsed() < Duration::from_secs(60),
                    "no credentials of the widened grant {wide_grant} after 60 s; last answer: {:?}",
                    other.map(|r| r.grant).map_err(|e| e.to_string())
                ),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        let invoices = format!("{}/invoices/a.csv", s.ns);
        let reports = format!("{}/reports/a.csv", s.ns);
        let mut boto3 = CachedClient::start(
            &s.minio,
            issued.credentials.as_ref().context("no AWS credentials")?,
        )
        .await?;
        ensure!(boto3.put(BUCKET, &invoices).await? == "OK");

        // The pod's sidecar waits in a revocation poll with the grant it holds.
        let poll = {
            let (broker, token, grant) =
                (Arc::clone(&s.broker), s.token.clone(), issued.grant.clone());
            tokio::spawn(async move {
                broker
                    .poll(
                        &token,
                        "uploader",
                        Held {
                            grant: Some(&grant),
                            renewal: None,
                        },
                        Duration::from_secs(30),
                    )
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;

        let patched = Instant::now();
        api.patch(
            "uploader",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"scope": {"resources": [&wide[0]]}}})),
        )
        .await?;
        let took = refused_after(&mut boto3, &reports, patched).await?;
        eprintln!("wide credentials refused {took:?} after the scope was narrowed");
        let answer = tokio::time::timeout(REFUSED_WITHIN, poll).await???;
        ensure!(answer == PollAnswer::Renew, "the poll answered {answer:?}");

        let narrow = exchange(&s.broker, &s.token, "uploader").await?;
        ensure!(narrow.grant != issued.grant, "renewed under the old grant");
        let narrow = copy(&s.minio, &narrow)?;
        ensure!(fixtures::put_object(&narrow, &reports).await.is_none());
        let code = fixtures::put_object(&narrow, &invoices).await;
        ensure!(code.as_deref() == Some("AccessDenied"), "{code:?}");
        Ok(())
    })
    .await
}

/// Whether the recorded session policy already names the invoices prefix.
/// The grant recorded with a session policy that holds the widened resources, if it is.
async fn wide_recorded(client: &Client, ns: &str) -> Option<String> {
    let status = Api::<ApiKey>::namespaced(client.clone(), ns)
        .get("uploader")
        .await
        .ok()?
        .status?;
    let wide = status
        .session_policy
        .is_some_and(|p| p.contains("invoices"));
    if wide { status.grant } else { None }
}

/// Gets credentials, applies `withdraw`, and checks MinIO refuses the credentials in time.
async fn withdrawn_by<F, Fut>(s: &Setup, what: &str, withdraw: F) -> anyhow::Result<()>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let issued = eventually("credentials", SETUP_WITHIN, || async {
        exchange(&s.broker, &s.token, "uploader").await.ok()
    })
    .await?;
    let inside = format!("{}/reports/a.csv", s.ns);
    let leaked = copy(&s.minio, &issued)?;
    ensure!(fixtures::put_object(&leaked, &inside).await.is_none());
    let started = Instant::now();
    withdraw().await?;
    eventually(
        &format!("MinIO refusing after {what}"),
        REFUSED_WITHIN,
        || async {
            fixtures::put_object(&leaked, &inside)
                .await
                .filter(|c| refused(c))
        },
    )
    .await?;
    eprintln!("{what}: credentials refused after {:?}", started.elapsed());
    Ok(())
}

#[tokio::test]
async fn every_withdrawn_right_revokes_at_minio() -> anyhow::Result<()> {
    let cluster = shared_with_crds().await?;
    in_namespace(cluster, "rvk-every", |client, ns| async move {
        let s = setup(client, ns).await?;
        let keys = Api::<ApiKey>::namespaced(s.client.clone(), &s.ns);
        let merge = |spec: serde_json::Value| {
            let keys = keys.clone();
            async move {
                keys.patch(
                    "uploader",
                    &PatchParams::default(),
                    &Patch::Merge(serde_json::json!({ "spec": spec })),
                )
                .await?;
                anyhow::Ok(())
            }
        };

        withdrawn_by(&s, "serviceAccountNames narrowed", || {
            merge(serde_json::json!({"serviceAccountNames": ["someone-else"]}))
        })
        .await?;
        merge(serde_json::json!({"serviceAccountNames": ["uploader"]})).await?;

        withdrawn_by(&s, "the namespace unselected", || async {
            fixtures::label_namespace(&s.client, &s.ns, "nobody").await
        })
        .await?;
        fixtures::label_namespace(&s.client, &s.ns, "true").await?;

        withdrawn_by(&s, "the TTL shortened", || {
            merge(serde_json::json!({"ttl": "20m"}))
        })
        .await?;

        withdrawn_by(&s, "the ApiKey deleted", || async {
            keys.delete("uploader", &DeleteParams::default()).await?;
            Ok(())
        })
        .await
        .context("deleting the ApiKey")?;
        eventually("the ApiKey gone", REFUSED_WITHIN * 3, || async {
            keys.get_opt("uploader").await.ok()?.is_none().then_some(())
        })
        .await?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn deleting_the_keyprovider_revokes_its_keys() -> anyhow::Result<()> {
    let cluster = shared_with_crds().await?;
    in_namespace(cluster, "rvk-prov", |client, ns| async move {
        let s = setup(client, ns).await?;
        let provider = format!("{}-s3", s.ns);
        let providers = Api::<KeyProvider>::all(s.client.clone());
        withdrawn_by(&s, "the KeyProvider deleted", || async {
            providers
                .delete(&provider, &DeleteParams::default())
                .await?;
            Ok(())
        })
        .await?;
        eventually("the KeyProvider gone", REFUSED_WITHIN * 3, || async {
            providers
                .get_opt(&provider)
                .await
                .ok()?
                .is_none()
                .then_some(())
        })
        .await?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn long_polls_are_capped_per_pod_and_answer_only_entitled_pods() -> anyhow::Result<()> {
    let cluster = shared_with_crds().await?;
    in_namespace(cluster, "rvk-polls", |client, ns| async move {
        let s = setup(client, ns).await?;
        let dir = keybroker_e2e::run_dir()?;
        let ca = pki::Ca::create(&dir, "broker-test-ca")?;
        let serving = ca.issue_server(&dir, "broker", &["127.0.0.1"])?;
        let tls = ReloadingCert::new(&serving.cert, &serving.key)?.server_config();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(server::serve(
            listener,
            Arc::new(tls),
            Arc::clone(&s.broker),
        ));
        let https = https::Client::new(addr, &ca.cert)?;
        let auth = s.token.clone();

        // 5,000 polls from one pod over 50 connections: a handful wait, the rest get 429 at once.
        const POLLS: usize = 5_000;
        const CONNECTIONS: usize = 50;
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..CONNECTIONS {
            let (https, auth) = (https.clone(), auth.clone());
            tasks.push(tokio::spawn(async move {
                let mut conn = https.connect().await?;
                let mut statuses = Vec::new();
                for _ in 0..POLLS / CONNECTIONS {
                    let reply = conn
                        .send(
                            "GET",
                            "/v1/revocations?apiKey=uploader&waitSeconds=20",
                            Some(&auth),
                            Vec::new(),
                        )
                        .await?;
                    statuses.push(reply.status.as_u16());
                    if reply.status == 200 {
                        break;
                    }
                }
                anyhow::Ok(statuses)
            }));
        }
        // The connections whose poll was admitted stay blocked; the others finish fast.
        let polls_held = eventually(
            "the per-pod cap filled",
            Duration::from_secs(30),
            || async {
                (s.broker.waiting_polls() == keybroker_operator::broker::pollers::MAX_PER_POD)
                    .then_some(())
            },
        )
        .await;
        polls_held?;
        // Every connection whose polls were refused has finished; only the admitted ones wait.
        eventually(
            "the refused polls answered",
            Duration::from_secs(60),
            || async {
                let done = tasks.iter().filter(|t| t.is_finished()).count();
                (done == CONNECTIONS - keybroker_operator::broker::pollers::MAX_PER_POD)
                    .then_some(())
            },
        )
        .await?;
        // Another pod of the same ApiKey still gets its poll answered.
        fixtures::injected_pod(&s.client, &s.ns, "other", "uploader", "uploader").await?;
        let other = fixtures::token(&s.client, &s.ns, "uploader", AUDIENCE, Some("other")).await?;
        let quiet = https
            .send(
                "GET",
                "/v1/revocations?apiKey=uploader&waitSeconds=1",
                Some(&other),
                Vec::new(),
            )
            .await?;
        ensure!(quiet.status == 200, "{quiet:?}");
        let status: RevocationStatus = quiet.json()?;
        ensure!(!status.revoked && !status.renew, "{status:?}");

        // A pod polling an ApiKey it may not use does not get to wait.
        let refused_at = Instant::now();
        let foreign = https
            .send(
                "GET",
                "/v1/revocations?apiKey=someone-elses&waitSeconds=30",
                Some(&auth),
                Vec::new(),
            )
            .await?;
        ensure!(
            foreign.status == 200 && foreign.json::<RevocationStatus>()?.revoked,
            "{foreign:?}"
        );
        ensure!(refused_at.elapsed() < Duration::from_secs(5), "it was held");

        // Revoking answers the waiting polls; every other request got 429.
        fixtures::revoke(&s.client, &s.ns, "uploader").await?;
        let mut counts = std::collections::BTreeMap::<u16, usize>::new();
        for task in tasks {
            for status in tokio::time::timeout(Duration::from_secs(30), task).await??? {
                *counts.entry(status).or_default() += 1;
            }
        }
        eprintln!(
            "5,000 polls from one pod: {counts:?} in {:?}",
            started.elapsed()
        );
        ensure!(
            counts.get(&200) == Some(&keybroker_operator::broker::pollers::MAX_PER_POD),
            "{counts:?}"
        );
        ensure!(counts.keys().all(|s| *s == 200 || *s == 429), "{counts:?}");
        Ok(())
    })
    .await
}

//! The broker's exchange against the real apiserver (TokenReview, live ApiKey/Pod/KeyProvider)
//! and MinIO (AssumeRole with the compiled session policy): credentials that work inside the
//! scope and fail outside it, a distinct refusal for every way a request can be wrong, and
//! audit records that carry identifiers but never a secret.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams};

use keybroker_contract::wire::{
    AUDIENCE, ExchangeRequest, ExchangeResponse, RENEWED_AT_ANNOTATION, Refusal, RevocationStatus,
};
use keybroker_e2e::{
    eventually, fixtures, https, in_namespace, logs, pki, shared, shared_with_crds,
};
use keybroker_operator::broker::{Broker, Held, PollAnswer, server};
use keybroker_operator::crd::ApiKey;
use keybroker_operator::metrics::Metrics;
use keybroker_operator::tls::ReloadingCert;

/// A malformed request: what it is, its bearer token and body, the expected status and reason.
type BadRequest<'a> = (&'a str, Option<&'a str>, Vec<u8>, u16, &'a str);

/// The broker's HTTPS server on a free loopback port, with a certificate from a fresh CA.
async fn serve_broker(client: &Client) -> anyhow::Result<https::Client> {
    Ok(serve_broker_with_metrics(client).await?.0)
}

/// [`serve_broker`], with the metrics the broker counts its exchanges in.
async fn serve_broker_with_metrics(
    client: &Client,
) -> anyhow::Result<(https::Client, Arc<Metrics>)> {
    let dir = keybroker_e2e::run_dir()?;
    let ca = pki::Ca::create(&dir, "broker-test-ca")?;
    let serving = ca.issue_server(&dir, "broker", &["127.0.0.1"])?;
    let tls = ReloadingCert::new(&serving.cert, &serving.key)?.server_config();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let metrics = Arc::new(Metrics::default());
    let broker = Broker::start_with_metrics(
        client.clone(),
        fixtures::COUNTS_NAMESPACE,
        fixtures::SIDECAR_IMAGE,
        Arc::clone(&metrics),
    )
    .await;
    tokio::spawn(server::serve(listener, Arc::new(tls), broker));
    Ok((https::Client::new(addr, &ca.cert)?, metrics))
}

fn body(name: &str) -> Vec<u8> {
    serde_json::to_vec(&request(name)).unwrap_or_default()
}

fn request(name: &str) -> ExchangeRequest {
    ExchangeRequest {
        api_key: name.into(),
    }
}

#[tokio::test]
async fn issued_credentials_work_inside_the_scope_only() -> anyhow::Result<()> {
    let cluster = shared_with_crds().await?;
    in_namespace(cluster, "brk-happy", |client, ns| async move {
        let cluster = shared().await?;
        fixtures::uploader(cluster, &client, &ns).await?;
        let token = fixtures::token(&client, &ns, "uploader", AUDIENCE, Some("app")).await?;
        let broker = Broker::start(
            client.clone(),
            fixtures::COUNTS_NAMESPACE,
            fixtures::SIDECAR_IMAGE,
        )
        .await;
        let issued = broker
            .exchange(&token, &request("uploader"), "127.0.0.1:1")
            .await?;
        let creds = issued
            .credentials
            .as_ref()
            .context("no AWS credentials in the answer")?;
        ensure!(
            issued.refresh_at < creds.expiration,
            "refresh {} not before expiry {}",
            issued.refresh_at,
            creds.expiration
        );

        let minio = cluster.minio.as_ref().context("no MinIO")?;
        let s3 = fixtures::s3_client(
            &minio.endpoint,
            &creds.access_key_id,
            &creds.secret_access_key,
            Some(&creds.session_token),
        );
        let inside = format!("{ns}/reports/2026.csv");
        ensure!(
            fixtures::put_object(&s3, &inside).await.is_none(),
            "PUT inside the scope failed"
        );
        for outside in [
            format!("{ns}/other/x.csv"),
            "team-b/reports/x.csv".to_owned(),
        ] {
            let code = fixtures::put_object(&s3, &outside).await;
            ensure!(
                code.as_deref() == Some("AccessDenied"),
                "PUT {outside}: {code:?}"
            );
        }

        // The audit record names the issuance by identifiers; no secret reaches any log.
        let logs = logs::captured();
        let audit = logs
            .lines()
            .find(|l| l.contains("keybroker::audit") && l.contains(&creds.access_key_id))
            .context("no audit record with the access key id")?;
        for field in [
            "\"outcome\":\"issued\"",
            &format!("\"namespace\":\"{ns}\""),
            "\"pod\":\"app\"",
            "\"service_account\":\"uploader\"",
            "\"scope_hash\"",
            "\"pod_uid\"",
            "\"expiration\"",
        ] {
            ensure!(audit.contains(field), "audit record lacks {field}: {audit}");
        }
        for (what, secret) in [
            ("secret key", &creds.secret_access_key),
            ("session token", &creds.session_token),
            ("SA token", &token),
        ] {
            ensure!(
                !logs.contains(secret.as_str()),
                "the {what} appears in the logs"
            );
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn every_wrong_request_gets_its_own_refusal() -> anyhow::Result<()> {
    let cluster = shared_with_crds().await?;
    in_namespace(cluster, "brk-refuse", |client, ns| async move {
        let cluster = shared().await?;
        fixtures::uploader(cluster, &client, &ns).await?;
        let provider = format!("{ns}-s3");
        let metrics = Arc::new(Metrics::default());
        let broker = Broker::start_with_metrics(client.clone(), fixtures::COUNTS_NAMESPACE, fixtures::SIDECAR_IMAGE, Arc::clone(&metrics)).await;
        let refusal = |result: Result<_, keybroker_operator::broker::ExchangeError>| match result {
            Ok(_) => "issued".to_owned(),
            Err(e) => e.reason().to_owned(),
        };

        // Wrong audience.
        let token = fixtures::token(&client, &ns, "uploader", "not-keybroker", Some("app")).await?;
        ensure!(
            refusal(broker.exchange(&token, &request("uploader"), "t").await) == "TokenRejected"
        );
        // Not bound to a pod.
        let token = fixtures::token(&client, &ns, "uploader", AUDIENCE, None).await?;
        ensure!(
            refusal(broker.exchange(&token, &request("uploader"), "t").await) == "TokenNotPodBound"
        );
        // Not a token at all.
        ensure!(refusal(broker.exchange("", &request("uploader"), "t").await) == "TokenMalformed");

        // A service account the ApiKey does not list.
        fixtures::service_account(&client, &ns, "intruder").await?;
        fixtures::injected_pod(&client, &ns, "intruder-pod", "intruder", "uploader").await?;
        let token =
            fixtures::token(&client, &ns, "intruder", AUDIENCE, Some("intruder-pod")).await?;
        ensure!(
            refusal(broker.exchange(&token, &request("uploader"), "t").await)
                == "ServiceAccountNotAllowed"
        );

        // A pod that did not opt in.
        fixtures::pod(&client, &ns, "plain", "uploader", None).await?;
        let token = fixtures::token(&client, &ns, "uploader", AUDIENCE, Some("plain")).await?;
        ensure!(
            refusal(broker.exchange(&token, &request("uploader"), "t").await) == "PodNotOptedIn"
        );

        // An ApiKey of another namespace: looked up in the token's namespace, so not found.
        let token = fixtures::token(&client, &ns, "uploader", AUDIENCE, Some("app")).await?;
        ensure!(
            refusal(
                broker
                    .exchange(&token, &request("kube-system-key"), "t")
                    .await
            ) == "ApiKeyNotFound"
        );

        // An ApiKey outside its guardrails.
        fixtures::apikey(
            &client,
            &ns,
            "greedy",
            &provider,
            &["s3:*"],
            &[fixtures::object_arn(&ns, "*")],
            None,
        )
        .await?;
        fixtures::injected_pod(&client, &ns, "greedy-pod", "uploader", "greedy").await?;
        let token = fixtures::token(&client, &ns, "uploader", AUDIENCE, Some("greedy-pod")).await?;
        ensure!(
            refusal(broker.exchange(&token, &request("greedy"), "t").await) == "ApiKeyNotReady"
        );

        // Pods changed after admission around the injection (the webhook guards UPDATEs too,
        // but only the broker's refusal does not depend on it running).
        let not_injected = async |pod: &str| {
            let token = fixtures::token(&client, &ns, "uploader", AUDIENCE, Some(pod)).await?;
            eventually(&format!("{pod} to be refused as not injected"), Duration::from_secs(5), || async {
                (refusal(broker.exchange(&token, &request("uploader"), "t").await) == "PodNotInjected").then_some(())
            })
            .await
        };
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        // Created without the opt-in label (so no webhook saw it), with its own token for the
        // keybroker audience in the app container, then labelled and annotated.
        let own_token: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "late"},
            "spec": {
                "serviceAccountName": "uploader",
                "containers": [{"name": "app", "image": "registry.invalid/app:1",
                    "volumeMounts": [{"name": "t", "mountPath": "/t"}]}],
                "volumes": [{"name": "t", "projected": {"sources": [{"serviceAccountToken": {"audience": AUDIENCE, "path": "token"}}]}}],
            },
        }))?;
        pods.create(&Default::default(), &own_token).await?;
        pods.patch("late", &PatchParams::default(), &Patch::Merge(serde_json::json!({"metadata": {
            "labels": {"keybroker.dev/inject": "true"}, "annotations": {"keybroker.dev/apikeys": "uploader"}}})))
            .await?;
        not_injected("late").await?;
        // Injected, then its sidecar's image replaced (init container images are mutable).
        fixtures::injected_pod(&client, &ns, "swapped", "uploader", "uploader").await?;
        let token = fixtures::token(&client, &ns, "uploader", AUDIENCE, Some("swapped")).await?;
        ensure!(refusal(broker.exchange(&token, &request("uploader"), "t").await) == "issued");
        pods.patch("swapped", &PatchParams::default(), &Patch::Strategic(serde_json::json!({"spec": {
            "initContainers": [{"name": "keybroker-sidecar", "image": "registry.invalid/not-keybroker:1"}]}})))
            .await?;
        not_injected("swapped").await?;
        // Injected, then an ephemeral container (kubectl debug) mounting the token volume.
        fixtures::injected_pod(&client, &ns, "debugged", "uploader", "uploader").await?;
        let mut debugged = pods.get("debugged").await?;
        debugged.metadata.managed_fields = None;
        if let Some(spec) = debugged.spec.as_mut() {
            spec.ephemeral_containers = Some(vec![serde_json::from_value(serde_json::json!({
                "name": "debugger", "image": "registry.invalid/busybox:1",
                "volumeMounts": [{"name": "keybroker-token", "mountPath": "/t"}],
            }))?]);
        }
        pods.replace_subresource("ephemeralcontainers", "debugged", &Default::default(), &debugged)
            .await?;
        not_injected("debugged").await?;

        // Revoked: refused at once, without deleting anything.
        let token = fixtures::token(&client, &ns, "uploader", AUDIENCE, Some("app")).await?;
        ensure!(refusal(broker.exchange(&token, &request("uploader"), "t").await) == "issued");
        fixtures::revoke(&client, &ns, "uploader").await?;
        // The broker decides from its watch cache; once the change arrived (what revocation
        // pollers are told), exchanges are refused.
        ensure!(
            broker
                .poll(&token, "uploader", Held::default(), Duration::from_secs(2))
                .await?
                == PollAnswer::Revoked,
            "revocation not seen"
        );
        ensure!(
            refusal(broker.exchange(&token, &request("uploader"), "t").await) == "ApiKeyRevoked"
        );
        Api::<ApiKey>::namespaced(client.clone(), &ns)
            .patch(
                "uploader",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"spec": {"revoked": false}})),
            )
            .await?;

        // The pod is deleted: refused at once, although the apiserver still accepts the token
        // for up to 10 s (its TokenReview cache).
        eventually(
            "the un-revoked key to issue again",
            Duration::from_secs(5),
            || async {
                (refusal(broker.exchange(&token, &request("uploader"), "t").await) == "issued")
                    .then_some(())
            },
        )
        .await?;

        // A renewal asked for (`kubectl keybroker renew`): the pod's waiting poll is told to
        // renew; credentials issued then carry the new mark, and polls under it stay quiet.
        let issued = broker.exchange(&token, &request("uploader"), "t").await?;
        let poll = |mark: String, wait: u64| {
            let (broker, token, grant) = (Arc::clone(&broker), token.clone(), issued.grant.clone());
            tokio::spawn(async move {
                let held = Held { grant: Some(&grant), renewal: Some(&mark) };
                broker.poll(&token, "uploader", held, Duration::from_secs(wait)).await
            })
        };
        ensure!(poll(issued.renewal.clone(), 1).await?? == PollAnswer::Quiet, "a poll without a renewal was not quiet");
        let waiting = poll(issued.renewal.clone(), 30);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let asked = Instant::now();
        Api::<ApiKey>::namespaced(client.clone(), &ns)
            .patch("uploader", &PatchParams::default(), &Patch::Merge(serde_json::json!({
                "metadata": {"annotations": {RENEWED_AT_ANNOTATION: "2026-12-03T12:00:00Z"}}})))
            .await?;
        ensure!(waiting.await?? == PollAnswer::Renew, "the waiting poll was not told to renew");
        eprintln!("measured: renewal asked to poll answered {:?}", asked.elapsed());
        let renewed = broker.exchange(&token, &request("uploader"), "t").await?;
        ensure!(renewed.renewal != issued.renewal && !renewed.renewal.is_empty(), "the new credentials carry the old mark");
        ensure!(poll(renewed.renewal.clone(), 1).await?? == PollAnswer::Quiet, "a poll under the new mark was not quiet");
        pods.delete("app", &DeleteParams::default()).await?;
        eventually("pod app gone", Duration::from_secs(30), || async {
            matches!(pods.get_opt("app").await, Ok(None)).then_some(())
        })
        .await?;
        let started = Instant::now();
        eventually(
            "the deleted pod's token to be refused",
            Duration::from_secs(2),
            || async {
                (refusal(broker.exchange(&token, &request("uploader"), "t").await) == "PodGone")
                    .then_some(())
            },
        )
        .await?;
        eprintln!(
            "deleted pod's token refused {:?} after the pod was gone",
            started.elapsed()
        );

        // Every refusal was audited with its reason.
        let logs = logs::captured();
        for reason in [
            "TokenRejected",
            "TokenNotPodBound",
            "ServiceAccountNotAllowed",
            "PodNotOptedIn",
            "ApiKeyNotFound",
            "ApiKeyNotReady",
            "ApiKeyRevoked",
            "PodGone",
        ] {
            ensure!(
                logs.lines().any(|l| l.contains("keybroker::audit")
                    && l.contains("\"outcome\":\"refused\"")
                    && l.contains(reason)),
                "no audit record for {reason}"
            );
            // ... and counted, by reason, in the broker's metrics.
            let counted = format!(
                "keybroker_broker_exchanges_total{{outcome=\"refused\",reason=\"{reason}\"}}"
            );
            let exposed = metrics.encode()?;
            ensure!(
                exposed.contains(&counted),
                "{counted} missing from:\n{exposed}"
            );
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn over_https_bad_requests_get_clear_refusals() -> anyhow::Result<()> {
    let cluster = shared_with_crds().await?;
    in_namespace(cluster, "brk-https", |client, ns| async move {
        let cluster = shared().await?;
        fixtures::uploader(cluster, &client, &ns).await?;
        let https = serve_broker(&client).await?;
        let token = fixtures::token(&client, &ns, "uploader", AUDIENCE, Some("app")).await?;

        let ok = https
            .send("POST", "/v1/exchange", Some(&token), body("uploader"))
            .await?;
        ensure!(ok.status == 200, "{ok:?}");
        let issued: ExchangeResponse = ok.json()?;
        ensure!(
            issued
                .credentials
                .as_ref()
                .is_some_and(|c| c.access_key_id.len() >= 16)
        );

        let cases: Vec<BadRequest> = vec![
            ("no token", None, body("uploader"), 401, "TokenMissing"),
            (
                "garbage token",
                Some("not.a.token"),
                body("uploader"),
                401,
                "TokenRejected",
            ),
            (
                "not JSON",
                Some(&token),
                b"apiKey=uploader".to_vec(),
                400,
                "BadRequest",
            ),
            (
                "oversized body",
                Some(&token),
                vec![b' '; 64 * 1024],
                413,
                "BodyTooLarge",
            ),
            (
                "unknown ApiKey",
                Some(&token),
                body("nope"),
                403,
                "ApiKeyNotFound",
            ),
        ];
        for (what, bearer, payload, status, reason) in cases {
            let reply = https.send("POST", "/v1/exchange", bearer, payload).await?;
            let refusal: Refusal = reply.json()?;
            ensure!(
                reply.status.as_u16() == status && refusal.reason == reason,
                "{what}: {} {refusal:?}",
                reply.status
            );
            ensure!(!refusal.message.is_empty(), "{what}: empty message");
        }
        let reply = https.send("GET", "/nothing", None, Vec::new()).await?;
        ensure!(reply.status == 404);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn the_issuance_cap_holds_across_two_brokers_and_answers_429_with_retry_after()
-> anyhow::Result<()> {
    let cluster = shared_with_crds().await?;
    in_namespace(cluster, "brk-cap", |client, ns| async move {
        let cluster = shared().await?;
        fixtures::uploader(cluster, &client, &ns).await?;
        Api::<keybroker_operator::crd::KeyProvider>::all(client.clone())
            .patch(
                &format!("{ns}-s3"),
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({
                    "spec": {"guardrails": {"maxIssuancesPerMinute": 4}}
                })),
            )
            .await?;
        // Two replicas behind one Service: the cap is the ApiKey's, not each replica's.
        let replicas = [serve_broker(&client).await?, serve_broker(&client).await?];
        let token = fixtures::token(&client, &ns, "uploader", AUDIENCE, Some("app")).await?;
        keybroker_e2e::with_room_in_this_minute(Duration::from_secs(30)).await;
        for i in 0..4 {
            let ok = replicas[i % 2]
                .send("POST", "/v1/exchange", Some(&token), body("uploader"))
                .await?;
            ensure!(ok.status == 200, "issuance {i}: {ok:?}");
        }
        for https in &replicas {
            let capped = https
                .send("POST", "/v1/exchange", Some(&token), body("uploader"))
                .await?;
            let refusal: Refusal = capped.json()?;
            ensure!(
                capped.status == 429 && refusal.reason == "RateLimited" && refusal.retryable,
                "{capped:?}"
            );
            let retry: u64 = capped
                .retry_after
                .as_deref()
                .context("no Retry-After")?
                .parse()?;
            ensure!((1..=60).contains(&retry), "Retry-After {retry}");
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn revocation_reaches_a_waiting_client_within_a_second() -> anyhow::Result<()> {
    let cluster = shared_with_crds().await?;
    in_namespace(cluster, "brk-revoke", |client, ns| async move {
        let cluster = shared().await?;
        fixtures::uploader(cluster, &client, &ns).await?;
        let https = serve_broker(&client).await?;
        let token = fixtures::token(&client, &ns, "uploader", AUDIENCE, Some("app")).await?;

        // Not revoked: the poll waits its full time and says so.
        let quiet = https
            .send(
                "GET",
                "/v1/revocations?apiKey=uploader&waitSeconds=1",
                Some(&token),
                Vec::new(),
            )
            .await?;
        ensure!(!quiet.json::<RevocationStatus>()?.revoked, "{quiet:?}");

        let poll = {
            let (https, token) = (https.clone(), token.clone());
            tokio::spawn(async move {
                let reply = https
                    .send(
                        "GET",
                        "/v1/revocations?apiKey=uploader&waitSeconds=30",
                        Some(&token),
                        Vec::new(),
                    )
                    .await;
                (reply, Instant::now())
            })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        let revoked_at = Instant::now();
        fixtures::revoke(&client, &ns, "uploader").await?;
        let (reply, answered_at) = poll.await?;
        let status: RevocationStatus = reply?.json()?;
        let latency = answered_at.duration_since(revoked_at);
        ensure!(status.revoked, "poll answered without a revocation");
        ensure!(
            latency < Duration::from_secs(1),
            "revocation reached the client after {latency:?}"
        );
        eprintln!("revocation pushed in {latency:?}");

        // And the next exchange is refused at once.
        let refused = https
            .send("POST", "/v1/exchange", Some(&token), body("uploader"))
            .await?;
        ensure!(
            refused.status == 403 && refused.json::<Refusal>()?.reason == "ApiKeyRevoked",
            "{refused:?}"
        );
        Ok(())
    })
    .await
}

mod anomaly;

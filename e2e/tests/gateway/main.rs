//! Calls through keybroker's gateway to a real upstream (go-httpbin, from the Go module proxy):
//! the app has no key and calls the sidecar's local gateway on loopback; the sidecar forwards
//! with the session the broker issued for the pod; the gateway checks scope, path, budget and
//! revocation, adds the key and streams the answer back, the key redacted wherever the
//! upstream echoes it.
//!
//! Like `sidecar.rs`, the pod goes through the webhook's mutation and is stored in the real
//! apiserver, and the sidecar runs as the kubelet would run it (the stored pod's env, a real
//! pod-bound token). Broker and gateway are each a server on its own runtime, sharing only the
//! session key's Secret, as two Deployments would.

/// Proofs that the upstreams are the real servers and behave as these tests rely on.
mod upstreams;

/// A team's Gitea repository through the gateway, and the scheduled rotation of its token.
mod gitea;

/// Bodies past the limit without a length, and calls with a body retried during a rotation.
mod bodies;

mod rig;
use rig::*;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use kube::api::{Api, Patch, PatchParams, PostParams};

use keybroker_contract::wire::{ExchangeRequest, ExchangeResponse};
use keybroker_e2e::httpbin::Httpbin;
use keybroker_e2e::server_thread::ServerThread;
use keybroker_e2e::{https, in_namespace, shared_with_crds};
use keybroker_operator::crd::{ApiKey, GiteaRotation, KeyProvider, KeyRotation, SecretRef};

/// The ApiKeys of the test pod: one for most calls, one with a budget of three a minute.
const ECHO: &str = "echo";
const TIGHT: &str = "tight";
/// Budget 20 a minute, spent through two gateway replicas at once.
const PAIR: &str = "pair";

#[tokio::test(flavor = "multi_thread")]
async fn an_app_without_a_key_calls_the_upstream_within_scope_budget_and_until_revoked()
-> anyhow::Result<()> {
    let cluster = shared_with_crds().await?;
    in_namespace(cluster, "gw-calls", |client, ns| async move {
        let httpbin = Httpbin::start().await?;
        let key = format!("kb-upstream-key-{}", free_port()?);
        let provider_name = format!("httpbin-{ns}");
        let mut rig = rig(
            &client,
            &ns,
            ("httpbin-key", &key),
            provider(&provider_name, &ns, httpbin.url()),
            vec![
                apikey(ECHO, &provider_name, None),
                apikey(TIGHT, &provider_name, Some(3)),
                apikey(PAIR, &provider_name, Some(20)),
            ],
        )
        .await?;
        let keys = Api::<ApiKey>::namespaced(client.clone(), &ns);
        let (local_port, broker_port, gateway_port) =
            (rig.local_port, rig.broker_port, rig.gateway_port);
        let app_env = rig.app_env.clone();
        let echo_url = app_env
            .iter()
            .find(|(name, _)| name == "KEYBROKER_ECHO_URL")
            .map(|(_, v)| v.clone())
            .context("the app container has no KEYBROKER_ECHO_URL")?;
        ensure!(
            echo_url == format!("http://127.0.0.1:{local_port}/{ECHO}"),
            "{echo_url}"
        );
        ensure!(
            !app_env.iter().any(|(n, _)| n.starts_with("AWS_")),
            "a gateway-only pod got AWS env: {app_env:?}"
        );

        // In scope: the upstream got the key (it echoes it), the app sees it redacted, and the
        // app's own Authorization and Cookie never reached the upstream.
        let (status, headers, body) = call(
            local_port,
            "GET",
            &format!("/{ECHO}/headers"),
            &[
                ("authorization", "Bearer app-forged"),
                ("cookie", "sid=app-cookie"),
            ],
            b"",
        )
        .await?;
        ensure!(status == 200, "{status}: {body}");
        ensure!(
            body.contains("[redacted by keybroker]"),
            "the key did not reach go-httpbin: {body}"
        );
        ensure!(
            !body.contains(&key),
            "the upstream's echo leaked the key: {body}"
        );
        ensure!(
            !body.contains("app-forged") && !body.contains("app-cookie"),
            "the app's own credentials reached the upstream: {body}"
        );
        ensure!(
            !headers
                .values()
                .any(|v| v.as_bytes().windows(key.len()).any(|w| w == key.as_bytes())),
            "a response header holds the key"
        );
        // An upstream that echoes the key in a response header: redacted there too.
        let (status, headers, _) = call(
            local_port,
            "GET",
            &format!("/{ECHO}/response-headers?X-Echo={key}"),
            &[],
            b"",
        )
        .await?;
        ensure!(status == 200, "{status}");
        ensure!(
            headers
                .get("x-echo")
                .is_some_and(|v| v == "[redacted by keybroker]"),
            "{headers:?}"
        );
        // A body with a length (go-httpbin's /base64 decodes into a Content-Length answer) that
        // holds the key: redacted, so the length changes, and the answer still arrives whole.
        let echoed = format!("token={key};");
        let encoded = base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE,
            echoed.as_bytes(),
        );
        let (status, _, body) = call(
            local_port,
            "GET",
            &format!("/{ECHO}/base64/{encoded}"),
            &[],
            b"",
        )
        .await?;
        ensure!(
            status == 200 && body == "token=[redacted by keybroker];",
            "{status}: {body}"
        );
        let (status, _, body) = call(
            local_port,
            "GET",
            &format!("/{ECHO}/anything/{ns}/reports/1"),
            &[],
            b"",
        )
        .await?;
        ensure!(
            status == 200 && body.contains(&format!("/anything/{ns}/reports/1")),
            "{status}: {body}"
        );

        // Outside scope, hostile paths: refused by the gateway, with a reason, never forwarded.
        for (method, path, want_status, want_reason) in [
            (
                "GET",
                "/anything/other-team/reports/1".to_owned(),
                403,
                "OutsideScope",
            ),
            (
                "POST",
                format!("/anything/{ns}/reports/1"),
                403,
                "OutsideScope",
            ),
            ("GET", "/status/200".to_owned(), 403, "OutsideScope"),
            (
                "GET",
                format!("/anything/{ns}/../other-team/x"),
                400,
                "PathNotCanonical",
            ),
            (
                "GET",
                format!("/anything/{ns}/%2e%2e/other-team/x"),
                400,
                "PathNotCanonical",
            ),
            (
                "GET",
                format!("/anything/{ns}/a%2Fb"),
                400,
                "PathNotCanonical",
            ),
            ("GET", format!("/anything/{ns}//x"), 400, "PathNotCanonical"),
        ] {
            let (status, _, body) =
                call(local_port, method, &format!("/{ECHO}{path}"), &[], b"").await?;
            ensure!(
                status == want_status && reason(&body) == want_reason,
                "{method} {path}: {status} {body}"
            );
            ensure!(body.contains("message"), "{body}");
        }
        let (status, _, body) = call(local_port, "GET", "/nobody/headers", &[], b"").await?;
        ensure!(
            status == 404 && reason(&body) == "UnknownApiKey",
            "{status}: {body}"
        );

        // A body above the provider's maxRequestBytes (64 KiB): 413, not forwarded.
        let big = vec![b'x'; 100 * 1024];
        let (status, _, body) =
            call(local_port, "GET", &format!("/{ECHO}/headers"), &[], &big).await?;
        ensure!(
            status == 413 && reason(&body) == "RequestTooLarge",
            "{status}: {body}"
        );

        // Server-sent events arrive as the upstream produces them, not at the end.
        let (status, times, text) =
            chunk_times(local_port, &format!("/{ECHO}/sse?count=3&duration=1500ms")).await?;
        ensure!(
            status == 200 && text.matches("data:").count() == 3,
            "{status}: {text}"
        );
        let (first, last) = (times[0], *times.last().context("no chunk")?);
        ensure!(
            last.saturating_sub(first) >= Duration::from_millis(700),
            "the events arrived together ({times:?}): buffered"
        );
        // A slow upstream: a clear 504 after the provider's timeout.
        let (status, _, body) =
            call(local_port, "GET", &format!("/{ECHO}/delay/3"), &[], b"").await?;
        ensure!(
            status == 504 && reason(&body) == "UpstreamTimeout",
            "{status}: {body}"
        );

        // Budget: three calls a minute, then 429 with Retry-After; the other ApiKey is unaffected.
        keybroker_e2e::with_room_in_this_minute(Duration::from_secs(30)).await;
        for i in 0..3 {
            let (status, _, body) =
                call(local_port, "GET", &format!("/{TIGHT}/headers"), &[], b"").await?;
            ensure!(status == 200, "call {i}: {status} {body}");
        }
        let (status, headers, body) =
            call(local_port, "GET", &format!("/{TIGHT}/headers"), &[], b"").await?;
        ensure!(
            status == 429 && reason(&body) == "BudgetExhausted",
            "{status}: {body}"
        );
        ensure!(headers.contains_key("retry-after"), "{headers:?}");

        // Two gateway replicas, 40 concurrent calls of one ApiKey split between them: exactly
        // the budget of 20 passes, the rest is 429.
        let second_port = free_port()?;
        let _second = ServerThread::gateway(
            &keybroker_e2e::shared().await?.kubeconfig,
            format!("127.0.0.1:{second_port}").parse()?,
            Arc::clone(&rig.tls),
            (ns.clone(), "gateway-session".to_owned()),
        )
        .await?;
        let broker = https::Client::new(format!("127.0.0.1:{broker_port}").parse()?, &rig.ca_cert)?;
        let pair: ExchangeResponse = broker
            .send(
                "POST",
                "/v1/exchange",
                Some(&rig.pod_token),
                serde_json::to_vec(&ExchangeRequest {
                    api_key: PAIR.into(),
                })?,
            )
            .await?
            .json()?;
        let pair_token = pair
            .session
            .context("no session for the pair ApiKey")?
            .token;
        let replicas = [
            https::Client::new(format!("127.0.0.1:{gateway_port}").parse()?, &rig.ca_cert)?,
            https::Client::new(format!("127.0.0.1:{second_port}").parse()?, &rig.ca_cert)?,
        ];
        let mut calls = tokio::task::JoinSet::new();
        keybroker_e2e::with_room_in_this_minute(Duration::from_secs(30)).await;
        for i in 0..40 {
            let client = replicas[i % 2].clone();
            let token = pair_token.clone();
            calls.spawn(async move {
                client
                    .send("GET", "/v1/forward/headers", Some(&token), Vec::new())
                    .await
                    .map(|r| r.status.as_u16())
            });
        }
        let mut statuses = Vec::new();
        while let Some(done) = calls.join_next().await {
            statuses.push(done??);
        }
        let passed = statuses.iter().filter(|s| **s == 200).count();
        let limited = statuses.iter().filter(|s| **s == 429).count();
        ensure!(
            passed == 20 && limited == 20,
            "200: {passed}, 429: {limited}, all: {statuses:?}"
        );
        // The ApiKeys' status shows today's usage as the replicas counted it: exactly the calls
        // that passed (refused ones count nothing).
        let apikeys = Api::<ApiKey>::namespaced(client.clone(), &ns);
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let calls = |key: &ApiKey| {
                key.status
                    .as_ref()
                    .and_then(|s| s.usage.as_ref())
                    .and_then(|u| u.calls)
            };
            let (tight, pair) = (apikeys.get(TIGHT).await?, apikeys.get(PAIR).await?);
            if calls(&tight) == Some(3) && calls(&pair) == Some(20) {
                let day = pair.status.and_then(|s| s.usage).map(|u| u.day);
                let today = k8s_openapi::jiff::Timestamp::now().to_string();
                ensure!(day.as_deref() == today.get(..10), "{day:?} is not today");
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "usage in the status: {TIGHT} {:?}, {PAIR} {:?}",
                tight.status.and_then(|s| s.usage),
                pair.status.and_then(|s| s.usage)
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }

        // A session replayed from outside the sidecar (an attacker who stole the pod's token
        // exchanges it, then calls the gateway directly): works until revocation, refused after.
        let broker = https::Client::new(format!("127.0.0.1:{broker_port}").parse()?, &rig.ca_cert)?;
        let reply = broker
            .send(
                "POST",
                "/v1/exchange",
                Some(&rig.pod_token),
                serde_json::to_vec(&ExchangeRequest {
                    api_key: ECHO.into(),
                })?,
            )
            .await?;
        let issued: ExchangeResponse = reply.json()?;
        let session = issued.session.context("no gateway session issued")?;
        ensure!(issued.credentials.is_none());
        let gateway =
            https::Client::new(format!("127.0.0.1:{gateway_port}").parse()?, &rig.ca_cert)?;
        let direct = gateway
            .send(
                "GET",
                "/v1/forward/headers",
                Some(&session.token),
                Vec::new(),
            )
            .await?;
        ensure!(direct.status == 200, "{direct:?}");

        // Revocation: the very next calls are refused, through the sidecar and directly.
        keys.patch(
            ECHO,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"revoked": true}})),
        )
        .await?;
        let revoked_at = Instant::now();
        // Polled every 10 ms: the time measured is the gateway's, not the poll's.
        loop {
            let (status, _, _) =
                call(local_port, "GET", &format!("/{ECHO}/headers"), &[], b"").await?;
            if status != 200 {
                break;
            }
            ensure!(
                revoked_at.elapsed() < Duration::from_secs(5),
                "calls still pass 5 s after revocation"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let refused_after = revoked_at.elapsed();
        ensure!(
            refused_after < Duration::from_secs(1),
            "refused only after {refused_after:?}"
        );
        let direct = gateway
            .send(
                "GET",
                "/v1/forward/headers",
                Some(&session.token),
                Vec::new(),
            )
            .await?;
        ensure!(
            direct.status == 403,
            "a replayed session passed after revocation: {direct:?}"
        );
        ensure!(
            reason(&String::from_utf8_lossy(&direct.body)) == "ApiKeyRevoked",
            "{direct:?}"
        );
        println!("gateway: revocation refused the next call after {refused_after:?}");

        // The key is nowhere on the pod's side: not in the sidecar's env, files or log.
        rig.sidecar.stop(Duration::from_secs(5));
        let log = std::fs::read_to_string(&rig.sidecar_log)?;
        ensure!(!log.contains(&key), "the sidecar's log holds the key");
        ensure!(
            !log.contains(&session.token),
            "the sidecar's log holds a session"
        );
        ensure!(
            !contents(&rig.out).contains(&key),
            "the pod's volume holds the key"
        );
        ensure!(
            !rig.sidecar_env.iter().any(|(_, v)| v.contains(&key)),
            "the sidecar's env holds the key"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_apiserver_refuses_gateway_providers_outside_the_schema_with_what_to_change()
-> anyhow::Result<()> {
    let cluster = shared_with_crds().await?;
    in_namespace(cluster, "gw-schema", |client, ns| async move {
        let rotation = |every: &str, grace: Option<&str>| KeyRotation {
            every: every.into(),
            grace: grace.map(str::to_owned),
            gitea: Some(GiteaRotation {
                credentials_secret_ref: SecretRef {
                    namespace: ns.clone(),
                    name: "gitea-admin".into(),
                },
            }),
        };
        type Change<'a> =
            Box<dyn Fn(&mut keybroker_operator::crd::GatewayProvider) + Send + Sync + 'a>;
        let cases: Vec<(&str, Change<'_>, &str)> = vec![
            (
                "path",
                Box::new(|g| g.upstream = "https://api.example.com/v1".into()),
                "must be an origin only",
            ),
            (
                "http",
                Box::new(|g| g.upstream = "http://api.example.com".into()),
                "plain http only on loopback",
            ),
            (
                "grace",
                Box::new(move |g| g.rotation = Some(rotation("5m", None))),
                "grace (default 10m) must be shorter than every",
            ),
            (
                "every",
                Box::new(|g| {
                    g.rotation = Some(KeyRotation {
                        every: "30s".into(),
                        grace: None,
                        gitea: None,
                    })
                }),
                "at least 1m",
            ),
        ];
        let api = Api::<KeyProvider>::all(client.clone());
        for (name, change, says) in cases {
            let mut provider = provider(&format!("{ns}-{name}"), &ns, "https://a.example");
            if let Some(gateway) = provider.spec.gateway.as_mut() {
                change(gateway);
            }
            match api.create(&PostParams::default(), &provider).await {
                Err(kube::Error::Api(e)) if e.code == 422 => {
                    ensure!(e.message.contains(says), "{name}: {}", e.message)
                }
                Err(e) => anyhow::bail!("{name}: {e}"),
                Ok(_) => anyhow::bail!("{name}: the apiserver took it"),
            }
        }
        // Within the rules: taken.
        let mut provider = provider(&format!("{ns}-fine"), &ns, "https://a.example");
        if let Some(gateway) = provider.spec.gateway.as_mut() {
            gateway.rotation = Some(KeyRotation {
                every: "720h".into(),
                grace: Some("10m".into()),
                gitea: Some(GiteaRotation {
                    credentials_secret_ref: SecretRef {
                        namespace: ns.clone(),
                        name: "gitea-admin".into(),
                    },
                }),
            });
        }
        api.create(&PostParams::default(), &provider).await?;
        api.delete(&format!("{ns}-fine"), &Default::default())
            .await?;
        Ok(())
    })
    .await
}

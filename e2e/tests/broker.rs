//! The broker's exchange against the real apiserver (TokenReview, live ApiKey/Pod/KeyProvider)
//! and MinIO (AssumeRole with the compiled session policy): credentials that work inside the
//! scope and fail outside it, a distinct refusal for every way a request can be wrong, and
//! audit records that carry identifiers but never a secret.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use tokio::sync::OnceCell;

use keybroker_e2e::{Cluster, eventually, fixtures, in_namespace, install_crds, logs, shared};
use keybroker_operator::broker::Broker;
use keybroker_operator::crd::ApiKey;
use keybroker_sidecar::wire::{AUDIENCE, ExchangeRequest};

async fn cluster() -> anyhow::Result<&'static Cluster> {
    static CRDS: OnceCell<()> = OnceCell::const_new();
    logs::capture();
    let cluster = shared().await?;
    CRDS.get_or_try_init(|| async { install_crds(&cluster.client().await?).await })
        .await?;
    Ok(cluster)
}

/// A tenant namespace with ApiKey `uploader` (PutObject under `corp-data/<ns>/reports/*`),
/// service account `uploader`, and an opted-in pod `app` running as it.
async fn uploader_setup(cluster: &Cluster, client: &Client, ns: &str) -> anyhow::Result<()> {
    let provider = fixtures::tenant(cluster, client, ns).await?;
    fixtures::apikey(
        client,
        ns,
        "uploader",
        &provider,
        &["s3:PutObject"],
        &[fixtures::object_arn(ns, "reports/*")],
        Some("15m"),
    )
    .await?;
    fixtures::service_account(client, ns, "uploader").await?;
    fixtures::pod(client, ns, "app", "uploader", Some("uploader")).await?;
    Ok(())
}

fn request(name: &str) -> ExchangeRequest {
    ExchangeRequest {
        api_key: name.into(),
    }
}

#[tokio::test]
async fn issued_credentials_work_inside_the_scope_only() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    in_namespace(cluster, "brk-happy", |client, ns| async move {
        let cluster = shared().await?;
        uploader_setup(cluster, &client, &ns).await?;
        let token = fixtures::token(&client, &ns, "uploader", AUDIENCE, Some("app")).await?;
        let broker = Broker::new(client.clone());
        let issued = broker
            .exchange(&token, &request("uploader"), "127.0.0.1:1")
            .await?;
        let creds = &issued.credentials;
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
    let cluster = cluster().await?;
    in_namespace(cluster, "brk-refuse", |client, ns| async move {
        let cluster = shared().await?;
        uploader_setup(cluster, &client, &ns).await?;
        let provider = format!("{ns}-s3");
        let broker = Broker::new(client.clone());
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
        fixtures::pod(&client, &ns, "intruder-pod", "intruder", Some("uploader")).await?;
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
        fixtures::pod(&client, &ns, "greedy-pod", "uploader", Some("greedy")).await?;
        let token = fixtures::token(&client, &ns, "uploader", AUDIENCE, Some("greedy-pod")).await?;
        ensure!(
            refusal(broker.exchange(&token, &request("greedy"), "t").await) == "ApiKeyNotReady"
        );

        // Revoked: refused at once, without deleting anything.
        let token = fixtures::token(&client, &ns, "uploader", AUDIENCE, Some("app")).await?;
        ensure!(refusal(broker.exchange(&token, &request("uploader"), "t").await) == "issued");
        Api::<ApiKey>::namespaced(client.clone(), &ns)
            .patch(
                "uploader",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"spec": {"revoked": true}})),
            )
            .await?;
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
        ensure!(refusal(broker.exchange(&token, &request("uploader"), "t").await) == "issued");
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        pods.delete("app", &DeleteParams::default()).await?;
        eventually("pod app gone", Duration::from_secs(30), || async {
            matches!(pods.get_opt("app").await, Ok(None)).then_some(())
        })
        .await?;
        let started = Instant::now();
        let after_delete = refusal(broker.exchange(&token, &request("uploader"), "t").await);
        ensure!(
            after_delete == "PodGone",
            "token of a deleted pod: {after_delete} after {:?}",
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
        }
        Ok(())
    })
    .await
}

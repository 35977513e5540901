//! Anomaly rules against the real apiserver: each fires above its threshold and not at it,
//! and only `action: Revoke` revokes; the metric, Event and audit record say which rule fired.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::ensure;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, DeleteParams};

use keybroker_contract::wire::{AUDIENCE, ExchangeResponse};
use keybroker_e2e::{eventually, fixtures, in_namespace, logs, shared, shared_with_crds};
use keybroker_operator::broker::Broker;
use keybroker_operator::crd::{AnomalyAction, AnomalyPolicy, ApiKey};
use keybroker_operator::metrics::Metrics;

use crate::request;

/// The Events about ApiKey `name` with `reason`, by their notes.
async fn events_of(client: &Client, ns: &str, name: &str, reason: &str) -> Vec<String> {
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), ns);
    events
        .list(&Default::default())
        .await
        .map(|list| {
            list.items
                .into_iter()
                .filter(|e| {
                    e.reason.as_deref() == Some(reason)
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                })
                .filter_map(|e| e.note)
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn anomaly_rules_fire_above_their_threshold_and_revoke_only_when_asked() -> anyhow::Result<()>
{
    let cluster = shared_with_crds().await?;
    in_namespace(cluster, "brk-anomaly", |client, ns| async move {
        let cluster = shared().await?;
        fixtures::uploader(cluster, &client, &ns).await?;
        let keys = Api::<ApiKey>::namespaced(client.clone(), &ns);
        // A reader of the tenant's reports, with anomaly rules `policy`.
        let reader = |name: &'static str, policy: AnomalyPolicy| {
            let (client, ns) = (client.clone(), ns.clone());
            async move {
                let provider = format!("{ns}-s3");
                let reports = [fixtures::object_arn(&ns, "reports/*")];
                fixtures::apikey(
                    &client,
                    &ns,
                    name,
                    &provider,
                    &["s3:GetObject"],
                    &reports,
                    None,
                )
                .await?;
                fixtures::set_anomalies(&client, &ns, name, &policy).await
            }
        };
        // uploader: more than 3 refusals a minute revoke it. reader: a token after its pod
        // only alerts.
        fixtures::set_anomalies(
            &client,
            &ns,
            "uploader",
            &AnomalyPolicy {
                refusals_per_minute: Some(3),
                action: Some(AnomalyAction::Revoke),
                ..AnomalyPolicy::default()
            },
        )
        .await?;
        reader(
            "reader",
            AnomalyPolicy {
                token_after_pod_gone: true,
                ..AnomalyPolicy::default()
            },
        )
        .await?;
        let metrics = Arc::new(Metrics::default());
        let broker = Broker::start_with_metrics(
            client.clone(),
            fixtures::COUNTS_NAMESPACE,
            fixtures::SIDECAR_IMAGE,
            Arc::clone(&metrics),
        )
        .await;
        let reason = |result: Result<
            ExchangeResponse,
            keybroker_operator::broker::ExchangeError,
        >| match result {
            Ok(_) => "issued".to_owned(),
            Err(e) => e.reason().to_owned(),
        };

        // A pod whose service account the ApiKey does not list; the refusals counted within
        // one minute (started early in a minute, so they cannot straddle two).
        fixtures::service_account(&client, &ns, "intruder").await?;
        fixtures::injected_pod(&client, &ns, "intruder-pod", "intruder", "uploader").await?;
        let token =
            fixtures::token(&client, &ns, "intruder", AUDIENCE, Some("intruder-pod")).await?;
        keybroker_e2e::with_room_in_this_minute(Duration::from_secs(15)).await;
        for _ in 0..3 {
            ensure!(
                reason(broker.exchange(&token, &request("uploader"), "t").await)
                    == "ServiceAccountNotAllowed"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        ensure!(
            !keys.get("uploader").await?.spec.revoked,
            "revoked at the threshold, not above it"
        );
        ensure!(
            events_of(&client, &ns, "uploader", "AnomalyRevoked")
                .await
                .is_empty(),
            "an Event at the threshold"
        );

        // The fourth: revoked, the rule named in the annotation, the Event, the metric and
        // the audit record.
        let fired = Instant::now();
        ensure!(
            reason(broker.exchange(&token, &request("uploader"), "t").await)
                == "ServiceAccountNotAllowed"
        );
        let revoked = eventually(
            "the ApiKey revoked by the anomaly rule",
            Duration::from_secs(5),
            || async { keys.get("uploader").await.ok().filter(|k| k.spec.revoked) },
        )
        .await?;
        eprintln!(
            "measured: refusal above the threshold to the ApiKey revoked {:?}",
            fired.elapsed()
        );
        ensure!(
            revoked
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("keybroker.dev/revoked-by"))
                .map(String::as_str)
                == Some("anomaly:RefusalSpike"),
            "the revocation does not name its rule: {:?}",
            revoked.metadata.annotations
        );
        let notes = eventually("the anomaly's Event", Duration::from_secs(5), || async {
            Some(events_of(&client, &ns, "uploader", "AnomalyRevoked").await)
                .filter(|n| !n.is_empty())
        })
        .await?;
        ensure!(
            notes.len() == 1 && notes[0].contains("RefusalSpike") && notes[0].contains("4 refused"),
            "{notes:?}"
        );
        // The app's own pod is refused from now on.
        let app = fixtures::token(&client, &ns, "uploader", AUDIENCE, Some("app")).await?;
        ensure!(reason(broker.exchange(&app, &request("uploader"), "t").await) == "ApiKeyRevoked");

        // reader: a pod's token replayed after the pod was deleted (while the broker still
        // trusts its TokenReview) raises an alert, and revokes nothing.
        fixtures::injected_pod(&client, &ns, "gone", "uploader", "reader").await?;
        let gone = fixtures::token(&client, &ns, "uploader", AUDIENCE, Some("gone")).await?;
        let _ = broker.exchange(&gone, &request("reader"), "t").await;
        let pods = Api::<Pod>::namespaced(client.clone(), &ns);
        pods.delete("gone", &DeleteParams::default()).await?;
        eventually(
            "pod gone to be deleted",
            Duration::from_secs(30),
            || async { matches!(pods.get_opt("gone").await, Ok(None)).then_some(()) },
        )
        .await?;
        eventually(
            "the gone pod's token refused",
            Duration::from_secs(5),
            || async {
                (reason(broker.exchange(&gone, &request("reader"), "t").await) == "PodGone")
                    .then_some(())
            },
        )
        .await?;
        let notes = eventually(
            "the token-after-pod Event",
            Duration::from_secs(5),
            || async {
                Some(events_of(&client, &ns, "reader", "AnomalyDetected").await)
                    .filter(|n| !n.is_empty())
            },
        )
        .await?;
        ensure!(notes[0].contains("TokenAfterPodGone"), "{notes:?}");
        ensure!(
            !keys.get("reader").await?.spec.revoked,
            "an alert-only rule revoked the ApiKey"
        );

        // burst: more than two issuances a minute raise an alert, two do not.
        reader(
            "burst",
            AnomalyPolicy {
                issuances_per_minute: Some(2),
                ..AnomalyPolicy::default()
            },
        )
        .await?;
        fixtures::injected_pod(&client, &ns, "burster", "uploader", "burst").await?;
        let burster = fixtures::token(&client, &ns, "uploader", AUDIENCE, Some("burster")).await?;
        // The broker's cache sees the policy within milliseconds.
        tokio::time::sleep(Duration::from_millis(500)).await;
        keybroker_e2e::with_room_in_this_minute(Duration::from_secs(15)).await;
        for _ in 0..2 {
            ensure!(reason(broker.exchange(&burster, &request("burst"), "t").await) == "issued");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        ensure!(
            events_of(&client, &ns, "burst", "AnomalyDetected")
                .await
                .is_empty(),
            "an Event at the threshold"
        );
        ensure!(
            reason(broker.exchange(&burster, &request("burst"), "t").await) == "issued",
            "an alert-only rule refused"
        );
        let notes = eventually(
            "the issuance burst's Event",
            Duration::from_secs(5),
            || async {
                Some(events_of(&client, &ns, "burst", "AnomalyDetected").await)
                    .filter(|n| !n.is_empty())
            },
        )
        .await?;
        ensure!(
            notes[0].contains("IssuanceBurst") && notes[0].contains("3 credentials issued"),
            "{notes:?}"
        );

        let exposed = metrics.encode()?;
        for series in [
            r#"keybroker_broker_anomalies_total{rule="RefusalSpike",action="revoke"} 1"#,
            r#"keybroker_broker_anomalies_total{rule="IssuanceBurst",action="alert"} 1"#,
            r#"keybroker_broker_anomalies_total{rule="TokenAfterPodGone",action="alert"} 1"#,
        ] {
            ensure!(
                exposed.contains(series),
                "{series} missing from:\n{exposed}"
            );
        }
        let logs = logs::captured();
        ensure!(
            logs.lines().any(|l| l.contains("keybroker::audit")
                && l.contains("\"outcome\":\"anomaly\"")
                && l.contains(&ns)
                && l.contains("RefusalSpike")),
            "no audit record of the anomaly"
        );
        Ok(())
    })
    .await
}

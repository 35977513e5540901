//! The controller against the real apiserver and MinIO: ApiKeys compile to session policies or
//! get a reason naming what to change, provider changes re-judge keys, the apiserver refuses
//! malformed keys, an idle controller writes nothing, and only the Lease holder writes.
//!
//! Each test runs its own controller restricted to its own namespace and to KeyProviders
//! labelled for it, so tests sharing the control plane do not see each other.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use k8s_openapi::api::core::v1::{Event, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, ListParams, PostParams};
use tokio::task::JoinHandle;

use keybroker_e2e::{Cluster, eventually, fixtures, in_namespace, logs, shared, shared_with_crds};
use keybroker_operator::controller::{self, Scope};
use keybroker_operator::crd::{ApiKey, KeyProvider};
use keybroker_operator::leader::LeaseConfig;
use keybroker_operator::metrics::Metrics;

/// A change that makes a valid ApiKey document invalid.
type Mutation = Box<dyn Fn(&mut serde_json::Value) + Send + Sync>;

/// A controller task that is aborted (like a killed process: the Lease is not released) on drop.
struct RunningController {
    task: JoinHandle<()>,
    metrics: Arc<Metrics>,
}

impl Drop for RunningController {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn start_controller(client: &Client, ns: &str, identity: &str) -> RunningController {
    let metrics = Arc::new(Metrics::default());
    let scope = Scope {
        namespace: Some(ns.to_owned()),
        provider_labels: Some(format!("e2e-scope={ns}")),
        counts_namespace: Some(fixtures::COUNTS_NAMESPACE.into()),
    };
    let lease = LeaseConfig {
        name: "keybroker-controller".into(),
        namespace: ns.to_owned(),
        identity: identity.to_owned(),
        duration: Duration::from_secs(4),
        grace: Duration::from_secs(1),
    };
    let task = tokio::spawn({
        let (client, metrics) = (client.clone(), Arc::clone(&metrics));
        async move {
            if let Err(e) = controller::run_elected(
                client,
                scope,
                lease,
                metrics,
                keybroker_operator::shutdown::Shutdown::never(),
            )
            .await
            {
                tracing::error!(error = %e, "controller stopped");
            }
        }
    });
    RunningController { task, metrics }
}

/// Waits until ApiKey `name` has a Ready condition for its current generation with `status`.
async fn ready_condition(
    client: &Client,
    ns: &str,
    name: &str,
    status: &str,
) -> anyhow::Result<(ApiKey, Condition)> {
    let api: Api<ApiKey> = Api::namespaced(client.clone(), ns);
    eventually(
        &format!("ApiKey {name} Ready={status}"),
        Duration::from_secs(30),
        || async {
            let key = api.get(name).await.ok()?;
            let st = key.status.clone()?;
            (st.observed_generation == key.metadata.generation).then_some(())?;
            let cond = st
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Ready" && c.status == status)?;
            Some((key, cond))
        },
    )
    .await
}

#[tokio::test]
async fn valid_apikey_becomes_ready_with_the_compiled_policy() -> anyhow::Result<()> {
    let cluster = shared_with_crds().await?;
    in_namespace(cluster, "ctl-ready", |client, ns| async move {
        let cluster = shared().await?;
        let provider = fixtures::tenant(cluster, &client, &ns).await?;
        let _controller = start_controller(&client, &ns, "only");
        fixtures::apikey(
            &client,
            &ns,
            "uploader",
            &provider,
            &["s3:PutObject"],
            &[fixtures::object_arn(&ns, "invoices/2026/*")],
            Some("15m"),
        )
        .await?;
        let (key, cond) = ready_condition(&client, &ns, "uploader", "True").await?;
        let status = key.status.context("no status")?;
        let policy: serde_json::Value =
            serde_json::from_str(status.session_policy.as_deref().context("no policy")?)?;
        ensure!(
            policy["Statement"][0]["Action"] == serde_json::json!(["s3:PutObject"]),
            "{policy}"
        );
        ensure!(
            policy["Statement"][0]["Resource"]
                == serde_json::json!([fixtures::object_arn(&ns, "invoices/2026/*")]),
            "{policy}"
        );
        ensure!(status.effective_ttl.as_deref() == Some("15m"));
        ensure!(status.scope_hash.as_ref().is_some_and(|h| h.len() == 64));
        ensure!(cond.reason == "Compiled", "{cond:?}");

        // A key without a TTL gets the provider's default.
        fixtures::apikey(
            &client,
            &ns,
            "reader",
            &provider,
            &["s3:GetObject"],
            &[fixtures::object_arn(&ns, "*")],
            None,
        )
        .await?;
        let (reader, _) = ready_condition(&client, &ns, "reader", "True").await?;
        ensure!(reader.status.and_then(|s| s.effective_ttl).as_deref() == Some("30m"));

        // The KeyProvider was verified against MinIO with the broker's own keys.
        let kp = eventually("KeyProvider Ready", Duration::from_secs(30), || async {
            let kp = Api::<KeyProvider>::all(client.clone())
                .get(&provider)
                .await
                .ok()?;
            kp.status
                .as_ref()?
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
                .then_some(kp)
        })
        .await;
        let kp = match kp {
            Ok(kp) => kp,
            Err(e) => anyhow::bail!(
                "{e}; status: {:?}",
                Api::<KeyProvider>::all(client.clone())
                    .get(&provider)
                    .await?
                    .status
            ),
        };
        let msg = &kp.status.context("no status")?.conditions[0].message;
        ensure!(msg.contains("assume"), "{msg}");

        // An Event says the key became ready.
        let events = Api::<Event>::namespaced(client.clone(), &ns);
        eventually(
            "a Ready event for uploader",
            Duration::from_secs(10),
            || async {
                let list = events.list(&ListParams::default()).await.ok()?;
                list.items.into_iter().find(|e| {
                    e.reason.as_deref() == Some("Ready")
                        && e.involved_object.name.as_deref() == Some("uploader")
                })
            },
        )
        .await
        .or_else(|_| anyhow::bail!("no Ready event"))
        .map(drop)
    })
    .await
}

#[tokio::test]
async fn out_of_guardrail_apikeys_are_refused_naming_the_item() -> anyhow::Result<()> {
    let cluster = shared_with_crds().await?;
    in_namespace(cluster, "ctl-refuse", |client, ns| async move {
        let cluster = shared().await?;
        let provider = fixtures::tenant(cluster, &client, &ns).await?;
        let minio = cluster.minio.as_ref().context("no MinIO")?;
        // A provider that selects other namespaces only.
        fixtures::provider(
            &client,
            &ns,
            &format!("{ns}-elsewhere"),
            &minio.endpoint,
            "broker-keys",
            &["s3:GetObject"],
            ("team", "finance"),
        )
        .await?;
        let _controller = start_controller(&client, &ns, "only");

        let other_team = "arn:aws:s3:::corp-data/team-b/*".to_owned();
        fixtures::apikey(
            &client,
            &ns,
            "other-prefix",
            &provider,
            &["s3:PutObject"],
            std::slice::from_ref(&other_team),
            None,
        )
        .await?;
        fixtures::apikey(
            &client,
            &ns,
            "all-s3",
            &provider,
            &["s3:*"],
            &[fixtures::object_arn(&ns, "*")],
            None,
        )
        .await?;
        fixtures::apikey(
            &client,
            &ns,
            "too-long",
            &provider,
            &["s3:GetObject"],
            &[fixtures::object_arn(&ns, "*")],
            Some("2h"),
        )
        .await?;
        fixtures::apikey(
            &client,
            &ns,
            "not-selected",
            &format!("{ns}-elsewhere"),
            &["s3:GetObject"],
            &[fixtures::object_arn(&ns, "*")],
            None,
        )
        .await?;
        fixtures::apikey(
            &client,
            &ns,
            "no-provider",
            "does-not-exist",
            &["s3:GetObject"],
            &[fixtures::object_arn(&ns, "*")],
            None,
        )
        .await?;

        for (name, reason, needle) in [
            (
                "other-prefix",
                "ScopeExceedsGuardrails",
                other_team.as_str(),
            ),
            ("all-s3", "ScopeExceedsGuardrails", "\"s3:*\""),
            (
                "too-long",
                "TTLExceedsGuardrails",
                "ttl 2h exceeds the provider's maxTTL 1h",
            ),
            ("not-selected", "NamespaceNotAllowed", ns.as_str()),
            ("no-provider", "ProviderNotFound", "does-not-exist"),
        ] {
            let (key, cond) = ready_condition(&client, &ns, name, "False").await?;
            ensure!(
                cond.reason == reason,
                "{name}: reason {} != {reason}",
                cond.reason
            );
            ensure!(
                cond.message.contains(needle),
                "{name}: message {:?} does not name {needle:?}",
                cond.message
            );
            let status = key.status.context("no status")?;
            ensure!(
                status.session_policy.is_none(),
                "{name}: a refused key carries a policy"
            );
        }
        // Each refusal is also an Event of type Warning.
        let events = Api::<Event>::namespaced(client.clone(), &ns);
        eventually(
            "warning events for the refused keys",
            Duration::from_secs(10),
            || async {
                let list = events.list(&ListParams::default()).await.ok()?;
                let warned = list
                    .items
                    .iter()
                    .filter(|e| e.type_.as_deref() == Some("Warning"))
                    .count();
                (warned >= 5).then_some(())
            },
        )
        .await
    })
    .await
}

#[tokio::test]
async fn tightening_a_provider_flips_a_ready_key() -> anyhow::Result<()> {
    let cluster = shared_with_crds().await?;
    in_namespace(cluster, "ctl-tighten", |client, ns| async move {
        let cluster = shared().await?;
        let provider = fixtures::tenant(cluster, &client, &ns).await?;
        let _controller = start_controller(&client, &ns, "only");
        fixtures::apikey(
            &client,
            &ns,
            "uploader",
            &provider,
            &["s3:PutObject"],
            &[fixtures::object_arn(&ns, "*")],
            None,
        )
        .await?;
        ready_condition(&client, &ns, "uploader", "True").await?;

        let minio = cluster.minio.as_ref().context("no MinIO")?;
        let started = Instant::now();
        fixtures::provider(
            &client,
            &ns,
            &provider,
            &minio.endpoint,
            "broker-keys",
            &["s3:GetObject"],
            ("keybroker.dev/tenant", "true"),
        )
        .await?;
        let (_, cond) = ready_condition(&client, &ns, "uploader", "False").await?;
        eprintln!(
            "provider tightened -> ApiKey not Ready in {:?}",
            started.elapsed()
        );
        ensure!(
            cond.reason == "ScopeExceedsGuardrails" && cond.message.contains("s3:PutObject"),
            "{cond:?}"
        );

        // Removing the namespace from the provider's selector flips it too (namespace watch).
        fixtures::provider(
            &client,
            &ns,
            &provider,
            &minio.endpoint,
            "broker-keys",
            &["s3:GetObject", "s3:PutObject"],
            ("keybroker.dev/tenant", "true"),
        )
        .await?;
        ready_condition(&client, &ns, "uploader", "True").await?;
        fixtures::label_namespace(&client, &ns, "false").await?;
        let (_, cond) = ready_condition(&client, &ns, "uploader", "False").await?;
        ensure!(cond.reason == "NamespaceNotAllowed", "{cond:?}");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn the_apiserver_rejects_malformed_apikeys_with_the_schema_message() -> anyhow::Result<()> {
    let cluster = shared_with_crds().await?;
    in_namespace(cluster, "ctl-schema", |client, ns| async move {
        // Dynamic objects, so that shapes our own types cannot hold reach the apiserver too.
        let resource = ApiResource::erase::<ApiKey>(&());
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &resource);
        let base = serde_json::json!({
            "apiVersion": "keybroker.dev/v1alpha1", "kind": "ApiKey",
            "metadata": {"name": "bad"},
            "spec": {
                "providerRef": {"name": "s3"},
                "serviceAccountNames": ["uploader"],
                "scope": {"actions": ["s3:GetObject"], "resources": ["arn:aws:s3:::b/*"]}
            }
        });
        let cases: Vec<(&str, Mutation, &str)> = vec![
            (
                "ttl below 15m",
                Box::new(|v| v["spec"]["ttl"] = "5m".into()),
                "between 15m and 12h",
            ),
            (
                "ttl not a duration",
                Box::new(|v| v["spec"]["ttl"] = "forever".into()),
                "spec.ttl",
            ),
            (
                "no actions",
                Box::new(|v| v["spec"]["scope"]["actions"] = serde_json::json!([])),
                "spec.scope.actions",
            ),
            (
                "bad action",
                Box::new(|v| v["spec"]["scope"]["actions"] = serde_json::json!(["GetObject"])),
                "spec.scope.actions[0]",
            ),
            (
                "bad service account",
                Box::new(|v| v["spec"]["serviceAccountNames"] = serde_json::json!(["Not_Valid"])),
                "spec.serviceAccountNames[0]",
            ),
            (
                "no provider",
                Box::new(|v| {
                    v["spec"]
                        .as_object_mut()
                        .map(|o| o.remove("providerRef"))
                        .map(drop)
                        .unwrap_or(())
                }),
                "spec.providerRef",
            ),
        ];
        for (what, mutate, expected) in cases {
            let mut doc = base.clone();
            mutate(&mut doc);
            let result = api
                .create(
                    &PostParams::default(),
                    &serde_json::from_value::<DynamicObject>(doc)?,
                )
                .await;
            let err = match result {
                Ok(_) => anyhow::bail!("{what}: accepted"),
                Err(kube::Error::Api(status)) => status.message,
                Err(e) => anyhow::bail!("{what}: unexpected error {e}"),
            };
            ensure!(
                err.contains(expected),
                "{what}: {err:?} does not contain {expected:?}"
            );
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn an_idle_controller_writes_nothing() -> anyhow::Result<()> {
    let cluster = shared_with_crds().await?;
    in_namespace(cluster, "ctl-idle", |client, ns| async move {
        let cluster = shared().await?;
        let provider = fixtures::tenant(cluster, &client, &ns).await?;
        let controller = start_controller(&client, &ns, "only");
        fixtures::apikey(
            &client,
            &ns,
            "good",
            &provider,
            &["s3:PutObject"],
            &[fixtures::object_arn(&ns, "*")],
            None,
        )
        .await?;
        fixtures::apikey(
            &client,
            &ns,
            "bad",
            &provider,
            &["s3:*"],
            &[fixtures::object_arn(&ns, "*")],
            None,
        )
        .await?;
        ready_condition(&client, &ns, "good", "True").await?;
        ready_condition(&client, &ns, "bad", "False").await?;
        tokio::time::sleep(Duration::from_secs(2)).await;

        let writes = |cluster: &Cluster| {
            cluster
                .audit_events(|e| {
                    let object = &e["objectRef"];
                    let ours = (object["resource"] == "apikeys"
                        && object["namespace"] == ns.as_str())
                        || (object["resource"] == "keyproviders"
                            && object["name"] == provider.as_str());
                    ours && e["verb"] != "get"
                })
                .len()
        };
        let before = writes(cluster);
        let status_writes = controller.metrics.status_writes_of("ApiKey");
        tokio::time::sleep(Duration::from_secs(30)).await;
        let after = writes(cluster);
        ensure!(
            after == before,
            "{} API writes in 30 idle seconds",
            after - before
        );
        ensure!(controller.metrics.status_writes_of("ApiKey") == status_writes);
        ensure!(
            before >= 2,
            "the audit log did not see the initial status writes ({before})"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn only_the_leader_writes_and_a_killed_leader_hands_over() -> anyhow::Result<()> {
    let cluster = shared_with_crds().await?;
    in_namespace(cluster, "ctl-leader", |client, ns| async move {
        let cluster = shared().await?;
        let provider = fixtures::tenant(cluster, &client, &ns).await?;
        let a = start_controller(&client, &ns, "replica-a");
        let b = start_controller(&client, &ns, "replica-b");
        let (leader, standby) = eventually("a leader", Duration::from_secs(20), || async {
            match (a.metrics.leader.get(), b.metrics.leader.get()) {
                (1, 0) => Some(("a", "b")),
                (0, 1) => Some(("b", "a")),
                _ => None,
            }
        })
        .await?;
        let (leader_ctl, standby_ctl) = if leader == "a" { (a, b) } else { (b, a) };
        fixtures::apikey(
            &client,
            &ns,
            "first",
            &provider,
            &["s3:PutObject"],
            &[fixtures::object_arn(&ns, "*")],
            None,
        )
        .await?;
        ready_condition(&client, &ns, "first", "True").await?;
        ensure!(
            leader_ctl.metrics.status_writes_of("ApiKey") >= 1,
            "leader wrote nothing"
        );
        ensure!(
            standby_ctl.metrics.reconciles_of("ApiKey") == 0
                && standby_ctl.metrics.status_writes_of("ApiKey") == 0,
            "standby replica-{standby} reconciled or wrote"
        );

        // Kill the leader without releasing the Lease; the standby takes over after it expires.
        let killed = Instant::now();
        drop(leader_ctl);
        eventually(
            "the standby to take the Lease",
            Duration::from_secs(30),
            || async { (standby_ctl.metrics.leader.get() == 1).then_some(()) },
        )
        .await?;
        eprintln!(
            "leader killed -> standby leading after {:?}",
            killed.elapsed()
        );
        fixtures::apikey(
            &client,
            &ns,
            "second",
            &provider,
            &["s3:GetObject"],
            &[fixtures::object_arn(&ns, "*")],
            None,
        )
        .await?;
        ready_condition(&client, &ns, "second", "True").await?;
        ensure!(
            standby_ctl.metrics.status_writes_of("ApiKey") >= 1,
            "new leader wrote nothing"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn broker_keys_never_reach_status_events_or_logs() -> anyhow::Result<()> {
    let cluster = shared_with_crds().await?;
    in_namespace(cluster, "ctl-leak", |client, ns| async move {
        let cluster = shared().await?;
        let provider = fixtures::tenant(cluster, &client, &ns).await?;
        let minio = cluster.minio.as_ref().context("no MinIO")?;
        // Wrong secret for a real user: STS rejects it, and the error travels to status and logs.
        let wrong_secret = format!("wrong-{}", ns.replace('-', ""));
        fixtures::secret(
            &client,
            &ns,
            "wrong-keys",
            &format!("broker-{ns}"),
            &wrong_secret,
        )
        .await?;
        let rejected = format!("{ns}-rejected");
        fixtures::provider(
            &client,
            &ns,
            &rejected,
            &minio.endpoint,
            "wrong-keys",
            &["s3:GetObject"],
            ("keybroker.dev/tenant", "true"),
        )
        .await?;
        let controller = start_controller(&client, &ns, "only");
        fixtures::apikey(
            &client,
            &ns,
            "uploader",
            &provider,
            &["s3:PutObject"],
            &[fixtures::object_arn(&ns, "*")],
            None,
        )
        .await?;
        ready_condition(&client, &ns, "uploader", "True").await?;
        let kp = eventually(
            "the rejected provider's status",
            Duration::from_secs(30),
            || async {
                let kp = Api::<KeyProvider>::all(client.clone())
                    .get(&rejected)
                    .await
                    .ok()?;
                kp.status
                    .as_ref()?
                    .conditions
                    .iter()
                    .any(|c| c.status == "False")
                    .then_some(kp)
            },
        )
        .await?;
        let cond = &kp.status.as_ref().context("no status")?.conditions[0];
        ensure!(cond.reason == "CredentialsRejected", "{cond:?}");
        // STS's own answer (it can name the broker's principal) stays in the operator's log.
        ensure!(
            cond.message.contains("the operator's log has STS's answer")
                && !cond.message.contains("):"),
            "{cond:?}"
        );

        let good_secret = Api::<Secret>::namespaced(client.clone(), &ns)
            .get("broker-keys")
            .await?
            .data
            .and_then(|d| {
                d.get("AWS_SECRET_ACCESS_KEY")
                    .map(|v| String::from_utf8_lossy(&v.0).into_owned())
            })
            .context("no secret key")?;
        let events = Api::<Event>::namespaced(client.clone(), &ns)
            .list(&ListParams::default())
            .await?;
        let keys = Api::<ApiKey>::namespaced(client.clone(), &ns)
            .list(&ListParams::default())
            .await?;
        let providers = Api::<KeyProvider>::all(client.clone())
            .list(&ListParams::default())
            .await?;
        let logs = logs::captured();
        let metrics = controller.metrics.encode()?;
        let surfaces = [
            ("events", serde_json::to_string(&events.items)?),
            (
                "apikey status",
                serde_json::to_string(&keys.items.iter().map(|k| &k.status).collect::<Vec<_>>())?,
            ),
            (
                "keyprovider status",
                serde_json::to_string(
                    &providers
                        .items
                        .iter()
                        .map(|p| &p.status)
                        .collect::<Vec<_>>(),
                )?,
            ),
            ("controller logs", logs),
            ("metrics", metrics),
        ];
        for (surface, text) in &surfaces {
            for secret in [&good_secret, &wrong_secret] {
                ensure!(
                    !text.contains(secret.as_str()),
                    "a secret key appears in {surface}"
                );
            }
        }
        ensure!(
            !surfaces[3].1.is_empty(),
            "no controller logs were captured"
        );
        Ok(())
    })
    .await
}

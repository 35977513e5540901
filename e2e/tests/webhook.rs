//! The mutating webhook called by the real apiserver over TLS: labelled pods (created directly,
//! and by kube-controller-manager for a Deployment) are stored with the sidecar, unlabelled
//! pods are untouched, denials and warnings reach `kubectl apply`, and a CA rotation while pods
//! are being created loses no admission, with two replicas sharing the certificate Secret.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};

use keybroker_e2e::{eventually, fixtures, in_namespace, shared, shared_with_crds};
use keybroker_operator::metrics::Metrics;
use keybroker_operator::tls::MemoryCert;
use keybroker_operator::webhook::certs::{self, CertConfig, Timing};
use keybroker_operator::webhook::inject::{self, Settings};
use keybroker_operator::webhook::{Webhook, server};

/// One webhook replica: its own server and certificate loop, sharing the Secret.
struct Replica {
    url: String,
    metrics: Arc<Metrics>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.tasks.iter().for_each(|t| t.abort());
    }
}

async fn start_replica(
    client: &Client,
    ns: &str,
    config_name: &str,
    timing: Timing,
) -> anyhow::Result<Replica> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("https://{}/mutate", listener.local_addr()?);
    let serving = Arc::new(MemoryCert::default());
    let config = CertConfig {
        namespace: ns.to_owned(),
        secret_name: "webhook-tls".into(),
        webhook_config: config_name.to_owned(),
        hosts: vec!["127.0.0.1".into()],
        timing,
    };
    let metrics = Arc::new(Metrics::default());
    let settings = Settings {
        image: fixtures::SIDECAR_IMAGE.into(),
        broker_url: "https://127.0.0.1:8443".into(),
        broker_ca: "-----BEGIN CERTIFICATE-----\ntest\n-----END CERTIFICATE-----\n".into(),
        ..Settings::default()
    };
    let tls = Arc::new(serving.server_config());
    let webhook = Webhook::start(client.clone(), settings, Arc::clone(&metrics)).await;
    let tasks = vec![
        tokio::spawn(certs::run(client.clone(), config, serving)),
        tokio::spawn(server::serve(listener, tls, webhook)),
    ];
    Ok(Replica {
        url,
        metrics,
        tasks,
    })
}

/// Registers a MutatingWebhookConfiguration with one webhook per replica URL, limited to
/// namespace `ns` (tests run in parallel) and to labelled pods, failing closed.
async fn register(client: &Client, name: &str, ns: &str, urls: &[&str]) -> anyhow::Result<()> {
    // As the chart registers them: injection at CREATE failing closed, the guard of running
    // pods at UPDATE failing open (the broker refuses what it would deny anyway).
    let webhooks: Vec<serde_json::Value> = urls
        .iter()
        .enumerate()
        .flat_map(|(i, url)| {
            let webhook = |name: String, operation: &str, resources: &[&str], failure: &str, reinvocation: &str| {
                serde_json::json!({
                    "name": name,
                    "clientConfig": {"url": url},
                    "rules": [{"operations": [operation], "apiGroups": [""], "apiVersions": ["v1"], "resources": resources}],
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
                    "objectSelector": {"matchLabels": {"keybroker.dev/inject": "true"}},
                    "failurePolicy": failure,
                    "sideEffects": "None",
                    "reinvocationPolicy": reinvocation,
                    "timeoutSeconds": 5,
                    "admissionReviewVersions": ["v1"],
                })
            };
            [
                webhook(format!("r{i}.inject.keybroker.dev"), "CREATE", &["pods"], "Fail", "IfNeeded"),
                webhook(format!("r{i}.guard.keybroker.dev"), "UPDATE", &["pods", "pods/ephemeralcontainers"], "Ignore", "Never"),
            ]
        })
        .collect();
    let config: MutatingWebhookConfiguration = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "webhooks": webhooks,
    }))?;
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .create(&PostParams::default(), &config)
        .await?;
    Ok(())
}

/// Waits until the apiserver injects through every webhook (caBundle published and picked up).
async fn wait_until_serving(
    client: &Client,
    ns: &str,
    sa: &str,
    apikey: &str,
) -> anyhow::Result<()> {
    let mut n = 0;
    eventually(
        "the webhook to inject a probe pod",
        Duration::from_secs(30),
        || {
            n += 1;
            let name = format!("probe-{n}");
            async move {
                let pod = fixtures::pod(client, ns, &name, sa, Some(apikey))
                    .await
                    .ok()?;
                fixtures::injected_sidecar(&pod).is_some().then_some(())
            }
        },
    )
    .await
}

/// Starts `replicas` webhook replicas for namespace `ns`, registers them, waits until the
/// apiserver injects through them, runs `body`, and unregisters whatever `body` returned.
async fn with_webhook(
    client: &Client,
    ns: &str,
    replicas: usize,
    timing: Timing,
    body: impl AsyncFnOnce(Vec<Replica>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let config_name = format!("keybroker-{ns}");
    let mut started = Vec::new();
    for _ in 0..replicas {
        started.push(start_replica(client, ns, &config_name, timing).await?);
    }
    let urls: Vec<String> = started.iter().map(|r| r.url.clone()).collect();
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    register(client, &config_name, ns, &urls).await?;
    let result = async {
        wait_until_serving(client, ns, "uploader", "uploader").await?;
        body(started).await
    }
    .await;
    unregister(client, &config_name).await;
    result
}

async fn unregister(client: &Client, name: &str) {
    let _ = Api::<MutatingWebhookConfiguration>::all(client.clone())
        .delete(name, &DeleteParams::default())
        .await;
}

#[tokio::test]
async fn labelled_pods_and_deployment_pods_are_stored_with_the_sidecar() -> anyhow::Result<()> {
    let cluster = shared_with_crds().await?;
    in_namespace(cluster, "wh-inject", |client, ns| async move {
        let cluster = shared().await?;
        fixtures::uploader_key(cluster, &client, &ns).await?;
        with_webhook(&client, &ns, 1, Timing::default(), async |replicas| {
            let replica = &replicas[0];

            let pod = fixtures::pod(&client, &ns, "app", "uploader", Some("uploader")).await?;
            let sidecar = fixtures::injected_sidecar(&pod).context("the stored pod has no sidecar")?;
            ensure!(sidecar.restart_policy.as_deref() == Some("Always"), "{sidecar:?}");
            let spec = pod.spec.as_ref().context("no spec")?;
            let volumes: Vec<&str> = spec.volumes.iter().flatten().map(|v| v.name.as_str()).collect();
            ensure!(
                volumes.contains(&inject::CREDENTIALS_VOLUME) && volumes.contains(&inject::TOKEN_VOLUME),
                "{volumes:?}"
            );
            // The apiserver's own service-account volume survives next to keybroker's.
            ensure!(volumes.iter().any(|v| v.starts_with("kube-api-access-")), "{volumes:?}");
            let app = &spec.containers[0];
            ensure!(
                app.env.iter().flatten().any(|e| e.name == "AWS_CONTAINER_CREDENTIALS_FULL_URI"),
                "{app:?}"
            );

            let plain = fixtures::pod(&client, &ns, "plain", "uploader", None).await?;
            let annotated = plain.metadata.annotations.iter().flatten().any(|(k, _)| k == inject::INJECTED_ANNOTATION);
            ensure!(fixtures::injected_sidecar(&plain).is_none() && !annotated, "{plain:?}");

            // kube-controller-manager creates these pods; the webhook sees them like any other.
            let deployment: Deployment = serde_json::from_value(serde_json::json!({
                "metadata": {"name": "uploader"},
                "spec": {
                    "replicas": 2,
                    "selector": {"matchLabels": {"app": "uploader"}},
                    "template": {
                        "metadata": {
                            "labels": {"app": "uploader", "keybroker.dev/inject": "true"},
                            "annotations": {"keybroker.dev/apikeys": "uploader"},
                        },
                        "spec": {"serviceAccountName": "uploader", "containers": [{"name": "app", "image": "registry.invalid/app:1"}]},
                    },
                },
            }))?;
            Api::<Deployment>::namespaced(client.clone(), &ns)
                .create(&PostParams::default(), &deployment)
                .await?;
            let pods = Api::<Pod>::namespaced(client.clone(), &ns);
            let created = eventually("the Deployment's 2 pods", Duration::from_secs(60), || async {
                let list = pods.list(&ListParams::default().labels("app=uploader")).await.ok()?;
                (list.items.len() == 2).then_some(list.items)
            })
            .await?;
            for pod in &created {
                ensure!(fixtures::injected_sidecar(pod).is_some(), "Deployment pod without sidecar: {pod:?}");
            }
            let metrics = replica.metrics.encode()?;
            ensure!(metrics.contains("keybroker_webhook_admissions_total{decision=\"injected\"}"), "{metrics}");
            Ok(())
        })
        .await
    })
    .await
}

#[tokio::test]
async fn running_pods_cannot_be_changed_around_the_injection() -> anyhow::Result<()> {
    let cluster = shared_with_crds().await?;
    in_namespace(cluster, "wh-guard", |client, ns| async move {
        let cluster = shared().await?;
        fixtures::uploader_key(cluster, &client, &ns).await?;
        with_webhook(&client, &ns, 1, Timing::default(), async |_| {
            let pods = Api::<Pod>::namespaced(client.clone(), &ns);
            let refused = |result: Result<Pod, kube::Error>, expected: &str| match result {
                Err(kube::Error::Api(status)) if status.message.contains(expected) => Ok(()),
                other => Err(anyhow::anyhow!("expected a denial naming {expected:?}, got {other:?}")),
            };
            fixtures::pod(&client, &ns, "app", "uploader", Some("uploader")).await?;
            // Ordinary updates of an injected pod pass.
            let relabel = Patch::Merge(serde_json::json!({"metadata": {"labels": {"tier": "web"}}}));
            pods.patch("app", &PatchParams::default(), &relabel).await?;

            let swap = Patch::Strategic(serde_json::json!({"spec": {"initContainers": [
                {"name": inject::SIDECAR_NAME, "image": "registry.invalid/not-keybroker:1"}]}}));
            refused(pods.patch("app", &PatchParams::default(), &swap).await, "does not run keybroker's image")?;
            // Another tag of keybroker's image (an operator upgrade) is keybroker's image.
            let upgrade = Patch::Strategic(serde_json::json!({"spec": {"initContainers": [
                {"name": inject::SIDECAR_NAME, "image": "registry.invalid/keybroker-sidecar:next"}]}}));
            pods.patch("app", &PatchParams::default(), &upgrade).await?;

            let mut debugged = pods.get("app").await?;
            debugged.metadata.managed_fields = None;
            if let Some(spec) = debugged.spec.as_mut() {
                spec.ephemeral_containers = Some(vec![serde_json::from_value(serde_json::json!({
                    "name": "debugger", "image": "registry.invalid/busybox:1",
                    "volumeMounts": [{"name": inject::TOKEN_VOLUME, "mountPath": "/t"}],
                }))?]);
            }
            refused(
                pods.replace_subresource("ephemeralcontainers", "app", &PostParams::default(), &debugged).await,
                "container debugger mounts volume keybroker-token",
            )?;

            // The opt-in label added to a pod the webhook never injected.
            fixtures::pod(&client, &ns, "plain", "uploader", None).await?;
            let opt_in = Patch::Merge(serde_json::json!({"metadata": {
                "labels": {"keybroker.dev/inject": "true"}, "annotations": {"keybroker.dev/apikeys": "uploader"}}}));
            refused(pods.patch("plain", &PatchParams::default(), &opt_in).await, "was not injected by keybroker when it was created")?;
            // Deleting is never blocked.
            pods.delete("app", &DeleteParams::default()).await?;
            Ok(())
        })
        .await
    })
    .await
}

#[tokio::test]
async fn denials_and_warnings_show_in_kubectl_apply() -> anyhow::Result<()> {
    let cluster = shared_with_crds().await?;
    in_namespace(cluster, "wh-deny", |client, ns| async move {
        let cluster = shared().await?;
        fixtures::uploader_key(cluster, &client, &ns).await?;
        fixtures::service_account(&client, &ns, "intruder").await?;
        with_webhook(&client, &ns, 1, Timing::default(), async |replicas| {
            let replica = &replicas[0];
            let kubectl = keybroker_e2e::tools::Tools::locate()?.kubectl;
            // Asynchronously: the webhook answers on this test's own runtime.
            let apply = async |name: &str, sa: &str, apikeys: &str| {
                let manifest = serde_json::json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": name, "namespace": ns,
                        "labels": {"keybroker.dev/inject": "true"},
                        "annotations": {"keybroker.dev/apikeys": apikeys}},
                    "spec": {"serviceAccountName": sa, "containers": [{"name": "app", "image": "registry.invalid/app:1"}]},
                });
                let mut child = tokio::process::Command::new(&kubectl)
                    .arg(format!("--kubeconfig={}", cluster.kubeconfig.display()))
                    .args(["apply", "-f", "-"])
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .kill_on_drop(true)
                    .spawn()?;
                use tokio::io::AsyncWriteExt;
                let mut stdin = child.stdin.take().context("stdin")?;
                stdin.write_all(manifest.to_string().as_bytes()).await?;
                drop(stdin);
                let out = child.wait_with_output().await?;
                anyhow::Ok((
                    out.status.success(),
                    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
                ))
            };
            let cases = [
                ("typo", "uploader", "upload", false, "ApiKey \"upload\" does not exist in namespace"),
                ("intruder", "intruder", "uploader", false, "does not allow service account \"intruder\""),
                ("elsewhere", "uploader", "other-team/uploader", false, "a pod can only use ApiKeys of its own namespace"),
                // No controller runs here, so the ApiKey is not Ready: admitted, with a warning.
                ("early", "uploader", "uploader", true, "Warning: ApiKey uploader is not Ready"),
            ];
            for (name, sa, apikeys, admitted, expected) in cases {
                let (ok, output) = apply(name, sa, apikeys).await?;
                eprintln!("kubectl apply {name}: {}", output.trim());
                ensure!(ok == admitted, "{name}: admitted={ok}: {output}");
                ensure!(output.contains(expected), "{name}: expected {expected:?} in: {output}");
            }
            let metrics = replica.metrics.encode()?;
            ensure!(metrics.contains("keybroker_webhook_admissions_total{decision=\"denied\"} 3"), "{metrics}");
            Ok(())
        })
        .await
    })
    .await
}

#[tokio::test]
async fn a_ca_rotation_while_pods_are_created_loses_no_admission() -> anyhow::Result<()> {
    let cluster = shared_with_crds().await?;
    in_namespace(cluster, "wh-rotate", |client, ns| async move {
        let cluster = shared().await?;
        fixtures::uploader_key(cluster, &client, &ns).await?;
        // A CA that lives 24 s rotates 16 s in (stage, +2 s promote, +2 s drop).
        let timing = Timing {
            ca_validity: Duration::from_secs(24),
            cert_validity: Duration::from_secs(24),
            propagation: Duration::from_secs(2),
        };
        // Two replicas converge on one Secret; the apiserver calls both for every pod, so a
        // replica serving a certificate the caBundle does not trust fails the pod.
        with_webhook(&client, &ns, 2, timing, async |_replicas| {
            let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
            let ca_of = |secret: Secret| secret.data.and_then(|d| d.get("ca.crt").cloned());
            let first_ca = ca_of(secrets.get("webhook-tls").await?);

            let started = Instant::now();
            let (mut created, mut failures) = (0, Vec::new());
            let mut cas = vec![first_ca.clone()];
            while started.elapsed() < Duration::from_secs(26) {
                match fixtures::pod(
                    &client,
                    &ns,
                    &format!("p{created:04}"),
                    "uploader",
                    Some("uploader"),
                )
                .await
                {
                    Ok(pod) if fixtures::injected_sidecar(&pod).is_some() => {}
                    Ok(pod) => {
                        failures.push(format!("{:?} stored without sidecar", pod.metadata.name))
                    }
                    Err(e) => failures.push(e.to_string()),
                }
                created += 1;
                let ca = ca_of(secrets.get("webhook-tls").await?);
                if cas.last() != Some(&ca) {
                    cas.push(ca);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            eprintln!(
                "{created} pods created across {} CAs, {} failures",
                cas.len(),
                failures.len()
            );
            ensure!(cas.len() >= 2, "no CA rotation happened in the window");
            ensure!(
                failures.is_empty(),
                "admissions lost during rotation: {failures:#?}"
            );
            Ok(())
        })
        .await
    })
    .await
}

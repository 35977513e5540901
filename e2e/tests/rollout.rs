//! The operator's availability on real pods: while a Deployment's 100 opted-in pods are being
//! created, one replica is killed (SIGKILL, as an OOM kill would) and then the operator is
//! restarted (`kubectl rollout restart`), with a steady stream of pod creations straight
//! through the API beside it. Every Deployment pod is created and gets its credentials from the
//! broker, no direct creation fails during the rollout, and the controller Lease moves to a new
//! pod. Its own test binary: it replaces the operator pods under everything else.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

use keybroker_e2e::install::{self, NAMESPACE, RELEASE};
use keybroker_e2e::{eventually, in_namespace};

const PODS: i32 = 100;
/// Direct creations beside the Deployment: one every this long.
const PROBE_EVERY: Duration = Duration::from_millis(100);
const LEASE: &str = "keybroker-controller";
/// How long after a SIGKILL the apiserver may still send admissions to the dead endpoint: the
/// kubelet's noticing the exit, the pod unready, the EndpointSlice updated (about 1 s measured).
const KILL_SETTLES: Duration = Duration::from_secs(10);

fn pod_spec() -> serde_json::Value {
    json!({
        "serviceAccountName": "uploader",
        "terminationGracePeriodSeconds": 1,
        "securityContext": { "runAsNonRoot": true, "runAsUser": 1000, "fsGroup": 1000 },
        "containers": [{
            "name": "app",
            "image": "keybroker.local/busybox:1",
            "imagePullPolicy": "Never",
            "command": ["sleep", "3600"],
        }],
    })
}

fn opted_in_metadata(app: &str) -> serde_json::Value {
    json!({
        "labels": { "app": app, "keybroker.dev/inject": "true" },
        "annotations": { "keybroker.dev/apikeys": "uploader" },
    })
}

fn fleet(ns: &str) -> anyhow::Result<Deployment> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": "fleet", "namespace": ns },
        "spec": {
            "replicas": PODS,
            "selector": { "matchLabels": { "app": "fleet" } },
            "template": { "metadata": opted_in_metadata("fleet"), "spec": pod_spec() },
        },
    }))?)
}

/// A pod created straight through the API and deleted at once: only its admission matters.
fn probe_pod(i: usize) -> anyhow::Result<Pod> {
    let mut metadata = opted_in_metadata("probe");
    metadata["name"] = format!("probe-{i:04}").into();
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": pod_spec(),
    }))?)
}

fn app_running(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c.name == "app" && c.state.as_ref().is_some_and(|s| s.running.is_some()))
        })
}

fn ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

async fn lease_holder(leases: &Api<Lease>) -> Option<String> {
    leases.get(LEASE).await.ok()?.spec?.holder_identity
}

async fn operator_pods(pods: &Api<Pod>) -> anyhow::Result<Vec<Pod>> {
    Ok(pods
        .list(&ListParams::default().labels("app.kubernetes.io/name=keybroker"))
        .await?
        .items)
}

/// The host pid of the operator process in pod `name` (the node's PID namespace is nested in
/// the machine's, so the machine's /proc sees it; its environment names its pod).
fn operator_pid(name: &str) -> Option<u32> {
    let want = format!("POD_NAME={name}");
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            cmdline.starts_with(b"/keybroker-operator")
                && environ.split(|b| *b == 0).any(|v| v == want.as_bytes())
        })
}

#[tokio::test]
async fn a_killed_replica_and_a_rollout_restart_lose_no_pod_creation() -> anyhow::Result<()> {
    let cluster = install::shared().await?;
    in_namespace(cluster, "fleet", |client, ns| async move {
        install::uploader_tenant(cluster, &client, &ns).await?;
        let system_pods = Api::<Pod>::namespaced(client.clone(), NAMESPACE);
        let leases = Api::<Lease>::namespaced(client.clone(), NAMESPACE);
        let before: BTreeSet<String> = operator_pods(&system_pods)
            .await?
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .collect();
        let leader = eventually("a Lease holder", Duration::from_secs(30), || lease_holder(&leases)).await?;
        ensure!(before.contains(&leader), "the Lease is held by {leader}, not one of {before:?}");

        // Direct creations, one every PROBE_EVERY, each outcome kept with its time.
        let pods = Api::<Pod>::namespaced(client.clone(), &ns);
        let started = Instant::now();
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let probing = {
            let pods = pods.clone();
            tokio::spawn(async move {
                let mut outcomes: Vec<(Duration, Result<(), String>)> = Vec::new();
                let mut tick = tokio::time::interval(PROBE_EVERY);
                for i in 0.. {
                    tokio::select! {
                        _ = &mut stop_rx => break,
                        _ = tick.tick() => {}
                    }
                    let at = started.elapsed();
                    let outcome = match probe_pod(i) {
                        Ok(pod) => match pods.create(&PostParams::default(), &pod).await {
                            Ok(created) if keybroker_e2e::fixtures::injected_sidecar(&created).is_some() => {
                                let _ = pods.delete(&format!("probe-{i:04}"), &DeleteParams { grace_period_seconds: Some(0), ..DeleteParams::default() }).await;
                                Ok(())
                            }
                            Ok(_) => Err("created without the sidecar".to_owned()),
                            Err(e) => Err(e.to_string()),
                        },
                        Err(e) => Err(e.to_string()),
                    };
                    outcomes.push((at, outcome));
                }
                outcomes
            })
        };

        Api::<Deployment>::namespaced(client.clone(), &ns)
            .create(&PostParams::default(), &fleet(&ns)?)
            .await?;
        eventually("15 fleet pods", Duration::from_secs(60), || async {
            let n = pods.list(&ListParams::default().labels("app=fleet")).await.ok()?.items.len();
            (n >= 15).then_some(())
        })
        .await?;
        // SIGKILL the leader's process: no drain, no Lease release.
        let killed_ip = system_pods
            .get(&leader)
            .await?
            .status
            .and_then(|s| s.pod_ip)
            .with_context(|| format!("pod {leader} has no IP"))?;
        let pid = operator_pid(&leader).with_context(|| format!("no operator process for pod {leader}"))?;
        let killed_at = started.elapsed();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(pid)?), nix::sys::signal::Signal::SIGKILL)?;
        eprintln!("killed {leader} (pid {pid}) at {killed_at:?}");
        // The kubelet restarts it; once both are Ready again, roll the Deployment.
        eventually("the killed replica back and Ready", Duration::from_secs(60), || async {
            let p = system_pods.get(&leader).await.ok()?;
            let restarted = p.status.as_ref()?.container_statuses.as_ref()?.iter().any(|c| c.restart_count > 0);
            (restarted && ready(&p)).then_some(())
        })
        .await?;
        install::wait_ready(&client, Duration::from_secs(60)).await?;
        let back_at = started.elapsed();
        Api::<Deployment>::namespaced(client.clone(), NAMESPACE)
            .patch(
                RELEASE,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"template": {"metadata": {"annotations": {
                    "kubectl.kubernetes.io/restartedAt": format!("{:?}", std::time::SystemTime::now()),
                }}}}})),
            )
            .await?;
        eprintln!("rollout restart at {back_at:?}");
        // The rollout has begun once a new pod exists; it is over when both replicas are new.
        let after = eventually("the rollout to replace both replicas", Duration::from_secs(180), || async {
            let current: BTreeSet<String> = operator_pods(&system_pods)
                .await
                .ok()?
                .into_iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none() && ready(p))
                .filter_map(|p| p.metadata.name)
                .collect();
            (current.len() == 2 && current.is_disjoint(&before)).then_some(current)
        })
        .await?;
        install::wait_ready(&client, Duration::from_secs(120)).await?;
        let rolled_at = started.elapsed();
        eprintln!("rollout done at {rolled_at:?}: {after:?}");
        // A few more seconds of creations against the new replicas only.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let _ = stop_tx.send(());
        let outcomes = probing.await?;

        let holder = eventually("the Lease to move to a new pod", Duration::from_secs(60), || async {
            lease_holder(&leases).await.filter(|h| after.contains(h))
        })
        .await?;
        eprintln!("the Lease moved from {leader} to {holder}");

        // The kill: calls the apiserver sent to the dead process before the kubelet marked it
        // unready fail closed (failurePolicy Fail), retried by the ReplicaSet. They must be
        // exactly that (the dead endpoint refusing the connection), only in the seconds after
        // the kill, while the other replica kept admitting.
        let kill_window = |at: &Duration| *at >= killed_at && *at < back_at;
        let in_kill: Vec<(Duration, &String)> = outcomes
            .iter()
            .filter(|(at, _)| kill_window(at))
            .filter_map(|(at, o)| o.as_ref().err().map(|e| (*at, e)))
            .collect();
        let admitted_in_kill = outcomes.iter().filter(|(at, o)| kill_window(at) && o.is_ok()).count();
        let elsewhere: Vec<String> = outcomes
            .iter()
            .filter(|(at, _)| !kill_window(at))
            .filter_map(|(at, o)| o.as_ref().err().map(|e| format!("at {at:?}: {e}")))
            .collect();
        eprintln!(
            "measured: {} direct creations; {} failed and {admitted_in_kill} were admitted in the {:?} between the SIGKILL and the replica's return, {} failed elsewhere (the rollout included)",
            outcomes.len(),
            in_kill.len(),
            back_at - killed_at,
            elsewhere.len()
        );
        let dead_endpoint = format!("{killed_ip}:");
        let unexplained: Vec<String> = in_kill
            .iter()
            .filter(|(at, e)| {
                !(e.contains("connection refused") && e.contains(&dead_endpoint))
                    || *at > killed_at + KILL_SETTLES
            })
            .map(|(at, e)| format!("at {at:?}: {e}"))
            .collect();
        ensure!(
            unexplained.is_empty(),
            "direct pod creations failed after the SIGKILL other than by the dead endpoint ({killed_ip}) refusing within {KILL_SETTLES:?}: {unexplained:#?}"
        );
        ensure!(admitted_in_kill >= 10, "the other replica admitted only {admitted_in_kill} creations while {leader} was down");
        ensure!(outcomes.iter().filter(|(at, _)| *at > back_at && *at < rolled_at).count() >= 10, "too few creations during the rollout");
        ensure!(elsewhere.is_empty(), "direct pod creations failed outside the kill: {elsewhere:#?}");

        // Every Deployment pod was created and started its app, so every sidecar got its
        // credentials from the broker, through the kill and the rollout.
        let running = eventually("all fleet pods' apps running", Duration::from_secs(300), || async {
            let list = pods.list(&ListParams::default().labels("app=fleet")).await.ok()?;
            let running = list.items.iter().filter(|p| app_running(p)).count();
            (running == usize::try_from(PODS).ok()?).then_some(running)
        })
        .await?;
        eprintln!("measured: {running} fleet pods running with credentials {:?} after the Deployment was created", started.elapsed());
        Ok(())
    })
    .await
}

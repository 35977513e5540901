//! The real node: what the kubelet and the container runtime decide, shown on real pods. One
//! control plane with a node per test binary; each test in its own namespace.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;
use tokio::sync::OnceCell;

use keybroker_e2e::cluster::client_from;
use keybroker_e2e::node_config::{BUSYBOX_IMAGE, KUBELET_SYSCTLS, NODE_NAME};
use keybroker_e2e::process::pids_with_marker;
use keybroker_e2e::{Cluster, Lifetime, Options, eventually, in_namespace, run_dir};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const LAUNCHER: &str = env!("CARGO_BIN_EXE_keybroker-cluster");

async fn cluster() -> anyhow::Result<&'static Cluster> {
    static NODE: OnceCell<Result<Cluster, String>> = OnceCell::const_new();
    NODE.get_or_init(|| async {
        let dir = run_dir().map_err(|e| e.to_string())?;
        let started = Instant::now();
        let cluster = Cluster::start_with_node(Options {
            dir,
            lifetime: Lifetime::TiedToProcess,
            with_minio: false,
        })
        .await
        .map_err(|e| format!("starting the control plane and node: {e}"))?;
        if let Some(node) = cluster.node() {
            eprintln!(
                "measured: control plane + node up in {:?}; node start to Ready {:?}",
                started.elapsed(),
                node.start_to_ready
            );
        }
        Ok(cluster)
    })
    .await
    .as_ref()
    .map_err(|e| anyhow::anyhow!("{e}"))
}

fn pod(name: &str, spec: serde_json::Value) -> anyhow::Result<Pod> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name },
        "spec": spec,
    }))?)
}

fn container(name: &str, script: &str) -> serde_json::Value {
    json!({
        "name": name,
        "image": BUSYBOX_IMAGE,
        "imagePullPolicy": "Never",
        "command": ["sh", "-c", script],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    })
}

fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

/// Waits for the pod to reach `want` (fails early when it reaches the other terminal phase).
async fn wait_phase(api: &Api<Pod>, name: &str, want: &str) -> anyhow::Result<Pod> {
    eventually(
        &format!("pod {name} to be {want}"),
        Duration::from_secs(60),
        || async {
            let pod = api.get(name).await.ok()?;
            (phase(&pod) == want || matches!(phase(&pod), "Failed" | "Succeeded")).then_some(pod)
        },
    )
    .await
    .and_then(|pod| {
        ensure!(
            phase(&pod) == want,
            "pod {name} is {} instead of {want}: {}",
            phase(&pod),
            termination_messages(&pod)
        );
        Ok(pod)
    })
}

fn termination_messages(pod: &Pod) -> String {
    let status = pod.status.as_ref();
    status
        .and_then(|s| s.container_statuses.clone())
        .into_iter()
        .chain(status.and_then(|s| s.init_container_statuses.clone()))
        .flatten()
        .map(|c| {
            let term = c
                .state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
                .or(c.last_state.as_ref().and_then(|s| s.terminated.as_ref()));
            format!(
                "{}: exit {:?} restarts {} message {:?}",
                c.name,
                term.map(|t| t.exit_code),
                c.restart_count,
                term.and_then(|t| t.message.clone()).unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The machine's own settings are not the node's: the sysctls the kubelet insists on read the
/// kubelet's values inside the node and the kernel's own outside (the node's are read-only
/// files bound over /proc/sys in its mount namespace, and never reach the kernel), and what the
/// node writes to the fixed paths `/run` and `/var/lib` lands in its own directory.
#[tokio::test]
async fn the_machine_keeps_its_sysctls_run_and_var_lib_while_a_node_runs() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let node = cluster.node().context("no node")?;
    let mut kernel_differs = Vec::new();
    // Each is a read-only file bound over /proc/sys in the node's mount namespace (read from
    // its mount table, not by trying a write, which would reach the kernel if it were not).
    let mounts = node.sandbox().run(true, "cat", &["/proc/self/mountinfo"])?;
    for (sysctl, kubelet) in KUBELET_SYSCTLS {
        let path = format!("/proc/sys/{sysctl}");
        ensure!(
            mounts.lines().any(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                fields.get(4) == Some(&path.as_str())
                    && fields
                        .get(5)
                        .is_some_and(|o| o.split(',').any(|o| o == "ro"))
            }),
            "{path} is not a read-only mount in the node's namespace"
        );
        let inside = node.sandbox().run(true, "cat", &[&path])?;
        ensure!(
            inside.trim() == kubelet,
            "the node reads {path} as {inside:?}, not the kubelet's {kubelet}"
        );
        let machine = std::fs::read_to_string(&path)?;
        if machine.trim() != kubelet {
            kernel_differs.push(format!(
                "{path}: machine {}, node {kubelet}",
                machine.trim()
            ));
        }
    }
    // The kernel's values are global: had the kubelet's writes reached it, every one would
    // read the kubelet's value here too.
    ensure!(
        !kernel_differs.is_empty(),
        "every sysctl of the kubelet holds the kubelet's value on the machine too"
    );
    eprintln!("kept on the machine: {kernel_differs:?}");
    let marker = format!("keybroker-e2e-marker-{}", std::process::id());
    for (fixed, own) in [("/run", "run"), ("/var/lib", "var-lib")] {
        let inside = format!("{fixed}/{marker}");
        node.sandbox().run(true, "touch", &[&inside])?;
        let landed = node.dir().join(own).join(&marker);
        ensure!(
            landed.exists(),
            "the node's {inside} is not {}",
            landed.display()
        );
        ensure!(
            !Path::new(&inside).exists(),
            "the node's write to {inside} reached the machine"
        );
        std::fs::remove_file(&landed)?;
    }
    Ok(())
}

#[tokio::test]
async fn node_is_ready_and_runs_a_plain_pod() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    in_namespace(cluster, "plain", |client, ns| async move {
        let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
        let node = nodes.get(NODE_NAME).await?;
        let ready = node
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .into_iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        ensure!(ready, "node {NODE_NAME} is not Ready");

        let pods: Api<Pod> = Api::namespaced(client, &ns);
        let started = Instant::now();
        pods.create(
            &PostParams::default(),
            &pod(
                "plain",
                json!({ "containers": [container("main", "sleep 3600")] }),
            )?,
        )
        .await?;
        let running = wait_phase(&pods, "plain", "Running").await?;
        eprintln!(
            "measured: plain pod create to Running {:?}",
            started.elapsed()
        );
        let ip = running
            .status
            .and_then(|s| s.pod_ip)
            .context("a Running pod without an IP")?;
        ensure!(
            ip.starts_with("10.244.0."),
            "pod IP {ip} outside the pod range"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn native_sidecar_starts_first_and_the_app_waits_for_its_startup_probe() -> anyhow::Result<()>
{
    let cluster = cluster().await?;
    in_namespace(cluster, "sidecar", |client, ns| async move {
        let pods: Api<Pod> = Api::namespaced(client, &ns);
        // The sidecar is ready 2 s after it starts; the app fails at once if it starts earlier.
        let mut sidecar = container(
            "sidecar",
            "sleep 2; touch /shared/ready; exec sleep 3600",
        );
        sidecar["restartPolicy"] = json!("Always");
        sidecar["startupProbe"] = json!({
            "exec": { "command": ["test", "-f", "/shared/ready"] },
            "periodSeconds": 1,
            "failureThreshold": 30,
        });
        sidecar["volumeMounts"] = json!([{ "name": "shared", "mountPath": "/shared" }]);
        let mut app = container(
            "app",
            "test -f /shared/ready || { echo started before the sidecar was ready; exit 7; }; exec sleep 3600",
        );
        app["volumeMounts"] = json!([{ "name": "shared", "mountPath": "/shared" }]);
        let started = Instant::now();
        pods.create(
            &PostParams::default(),
            &pod(
                "native-sidecar",
                json!({
                    "initContainers": [sidecar],
                    "containers": [app],
                    "volumes": [{ "name": "shared", "emptyDir": {} }],
                }),
            )?,
        )
        .await?;
        let pod = wait_phase(&pods, "native-sidecar", "Running").await?;
        let app_running = eventually("the app container to run", Duration::from_secs(30), || {
            let pods = pods.clone();
            async move {
                let pod = pods.get("native-sidecar").await.ok()?;
                let app = pod.status?.container_statuses?.into_iter().find(|c| c.name == "app")?;
                app.state?.running.is_some().then_some(app.restart_count)
            }
        })
        .await?;
        eprintln!(
            "measured: native-sidecar pod create to app running {:?}",
            started.elapsed()
        );
        ensure!(
            app_running == 0,
            "the app restarted {app_running} times: it started before the sidecar's startupProbe passed ({})",
            termination_messages(&pod)
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_job_completes() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    in_namespace(cluster, "job", |client, ns| async move {
        let jobs: Api<Job> = Api::namespaced(client, &ns);
        let job: Job = serde_json::from_value(json!({
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": { "name": "once" },
            "spec": {
                "backoffLimit": 0,
                "template": { "spec": {
                    "restartPolicy": "Never",
                    "containers": [container("work", "echo done")],
                }},
            },
        }))?;
        jobs.create(&PostParams::default(), &job).await?;
        eventually("the Job to complete", Duration::from_secs(90), || async {
            let job = jobs.get("once").await.ok()?;
            job.status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Complete" && c.status == "True")
                .then_some(())
        })
        .await
    })
    .await
}

#[tokio::test]
async fn memory_empty_dir_is_a_tmpfs_of_its_size_limit() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    in_namespace(cluster, "tmpfs", |client, ns| async move {
        let pods: Api<Pod> = Api::namespaced(client, &ns);
        let mut check = container(
            "check",
            r#"grep ' /data tmpfs ' /proc/mounts > /dev/termination-log || { echo '/data is not a tmpfs'; exit 3; }
grep -q 'size=1024k' /dev/termination-log || exit 4
if dd if=/dev/zero of=/data/big bs=1024 count=2048 2>/dev/null; then echo 'wrote 2 MiB into a 1 MiB volume'; exit 5; fi
used=$(du -k /data/big | cut -f1); [ "$used" -le 1024 ] || { echo "used $used KiB"; exit 6; }"#,
        );
        check["volumeMounts"] = json!([{ "name": "data", "mountPath": "/data" }]);
        pods.create(
            &PostParams::default(),
            &pod(
                "tmpfs",
                json!({
                    "restartPolicy": "Never",
                    "containers": [check],
                    "volumes": [{ "name": "data", "emptyDir": { "medium": "Memory", "sizeLimit": "1Mi" } }],
                }),
            )?,
        )
        .await?;
        wait_phase(&pods, "tmpfs", "Succeeded").await?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn projected_token_is_visible_only_in_the_container_that_mounts_it() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    in_namespace(cluster, "token", |client, ns| async move {
        let pods: Api<Pod> = Api::namespaced(client, &ns);
        let mut holder = container(
            "holder",
            r#"t=/var/run/keybroker/token
test -s $t || { echo 'no token'; exit 3; }
payload=$(cut -d. -f2 $t | tr '_-' '/+')
while [ $(( ${#payload} % 4 )) -ne 0 ]; do payload="$payload="; done
echo "$payload" | base64 -d 2>/dev/null | grep -q '"aud":\["keybroker"\]' || { echo 'audience is not keybroker'; exit 4; }"#,
        );
        holder["volumeMounts"] =
            json!([{ "name": "kb-token", "mountPath": "/var/run/keybroker", "readOnly": true }]);
        let other = container(
            "other",
            r#"if find / -xdev -name token 2>/dev/null | grep -q .; then echo 'a token is visible'; exit 3; fi
if grep -q ' /var/run/keybroker ' /proc/mounts; then echo 'the token volume is mounted here'; exit 4; fi"#,
        );
        pods.create(
            &PostParams::default(),
            &pod(
                "token",
                json!({
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": false,
                    "containers": [holder, other],
                    "volumes": [{ "name": "kb-token", "projected": { "sources": [
                        { "serviceAccountToken": { "audience": "keybroker", "expirationSeconds": 600, "path": "token" } },
                    ]}}],
                }),
            )?,
        )
        .await?;
        wait_phase(&pods, "token", "Succeeded").await?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn pod_deletion_sends_sigterm() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let node_dir = cluster.node().context("no node")?.dir().to_owned();
    in_namespace(cluster, "sigterm", move |client, ns| async move {
        // The node's files are this machine's files: a hostPath shows what the container saw.
        let seen = node_dir.join(format!("sigterm-{ns}"));
        std::fs::create_dir_all(&seen)?;
        let pods: Api<Pod> = Api::namespaced(client, &ns);
        let mut main = container(
            "main",
            "trap 'echo TERM > /seen/signal; exit 0' TERM; echo up > /seen/up; while true; do sleep 0.1; done",
        );
        main["volumeMounts"] = json!([{ "name": "seen", "mountPath": "/seen" }]);
        pods.create(
            &PostParams::default(),
            &pod(
                "sigterm",
                json!({
                    "terminationGracePeriodSeconds": 30,
                    "containers": [main],
                    "volumes": [{ "name": "seen", "hostPath": { "path": seen.display().to_string(), "type": "Directory" } }],
                }),
            )?,
        )
        .await?;
        wait_phase(&pods, "sigterm", "Running").await?;
        let up = seen.join("up");
        eventually("the container to start its trap", Duration::from_secs(10), || async {
            up.exists().then_some(())
        })
        .await?;
        let deleted = Instant::now();
        pods.delete("sigterm", &DeleteParams::default()).await?;
        let signal = seen.join("signal");
        eventually("SIGTERM in the container", Duration::from_secs(20), || async {
            std::fs::read_to_string(&signal).ok().filter(|s| s.trim() == "TERM")
        })
        .await?;
        // The trap exits at once, so the pod goes long before its 30 s grace period.
        eventually("the pod to be gone", Duration::from_secs(20), || async {
            matches!(pods.get_opt("sigterm").await, Ok(None)).then_some(())
        })
        .await?;
        ensure!(
            deleted.elapsed() < Duration::from_secs(25),
            "the pod outlived its SIGTERM: was it killed at the end of the grace period instead?"
        );
        Ok(())
    })
    .await
}

/// A launcher with a node, stopped with SIGTERM (graceful) and then one killed with SIGKILL
/// (nothing runs its cleanup): neither leaves a process, a container, a mount, the veth link or
/// a cgroup behind (after SIGKILL, the launcher's reaper removes its cgroup roots).
#[tokio::test]
async fn node_teardown_leaves_nothing_after_sigterm_or_sigkill() -> anyhow::Result<()> {
    for signal in [Signal::SIGTERM, Signal::SIGKILL] {
        let dir = run_dir()?;
        let marker = dir.display().to_string();
        let mut launcher = Command::new(LAUNCHER)
            .args(["run", "--node", "--no-minio", "--dir"])
            .arg(&dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = launcher.stdout.take().context("no stdout")?;
        let summary = tokio::task::spawn_blocking(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line == "ready" {
                    return Some(lines);
                }
                lines.push(line);
            }
            None
        });
        let summary = tokio::time::timeout(Duration::from_secs(240), summary)
            .await
            .context("launcher not ready after 240 s")??
            .context("launcher exited before it was ready")?;
        let node_line = summary
            .iter()
            .find(|l| l.starts_with("node: "))
            .context("the summary names no node")?;
        let field = |after: &str| {
            node_line
                .split(after)
                .nth(1)
                .and_then(|rest| rest.split([',', ')']).next())
                .map(str::to_owned)
                .with_context(|| format!("no `{after}` in {node_line}"))
        };
        let (link, cgroup) = (field("host link ")?, field("cgroup root ")?);

        let client = client_from(&dir.join("kubeconfig")).await?;
        let pods: Api<Pod> = Api::namespaced(client, "default");
        pods.create(
            &PostParams::default(),
            &pod(
                "sleeper",
                json!({ "containers": [container("main", "sleep 3600")] }),
            )?,
        )
        .await?;
        wait_phase(&pods, "sleeper", "Running").await?;
        let members = keybroker_e2e::cgroups::members(&cgroup);
        ensure!(
            members.len() >= 2,
            "expected the pause and sleep processes in cgroup {cgroup}, found {members:?}"
        );
        ensure!(
            link_exists(&link),
            "no host link {link} while the node runs"
        );

        kill(Pid::from_raw(i32::try_from(launcher.id())?), signal)?;
        launcher.wait()?;
        eventually(
            &format!("everything to be gone after {signal}"),
            Duration::from_secs(30),
            || async {
                let alive: Vec<u32> = members
                    .iter()
                    .copied()
                    .filter(|pid| Path::new(&format!("/proc/{pid}")).exists())
                    .collect();
                (pids_with_marker(&marker).is_empty()
                    && alive.is_empty()
                    && keybroker_e2e::cgroups::members(&cgroup).is_empty()
                    && !link_exists(&link))
                .then_some(())
            },
        )
        .await
        .with_context(|| {
            format!(
                "left: processes {:?}, cgroup members {:?}, link {}",
                pids_with_marker(&marker),
                keybroker_e2e::cgroups::members(&cgroup),
                link_exists(&link)
            )
        })?;
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
        ensure!(
            !mounts.contains(&marker),
            "host mounts under {marker} after {signal}"
        );
        // After SIGKILL nothing of the launcher ran: its reaper removes the cgroup roots.
        eventually(
            &format!("the cgroup root {cgroup} removed after {signal}"),
            Duration::from_secs(30),
            || async {
                keybroker_e2e::cgroups::leftovers(&cgroup)
                    .is_empty()
                    .then_some(())
            },
        )
        .await?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("removing {} after {signal}", dir.display()))?;
        }
    }
    Ok(())
}

fn link_exists(name: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Pods reach the apiserver (through the `kubernetes` Service and the node's address) and
/// nothing beyond the node's namespace: not the host's end of the veth, not the machine's
/// network, not the internet.
#[tokio::test]
async fn pods_reach_the_apiserver_and_nothing_off_the_node() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let node = cluster.node().context("no node")?;
    let api = cluster
        .server
        .strip_prefix("https://")
        .context("apiserver URL without https")?
        .to_owned();
    // Something listens on the host's end, so only the namespace's drop rule can stop a pod.
    let listener = std::net::TcpListener::bind((node.sandbox().host_ip().as_str(), 0))?;
    let host_end = listener.local_addr()?.to_string();
    std::net::TcpStream::connect(&host_end).context("the host's own listener is unreachable")?;
    in_namespace(cluster, "net", move |client, ns| async move {
        let _listener = listener;
        let pods: Api<Pod> = Api::namespaced(client, &ns);
        let script = format!(
            r#"reach() {{ timeout 5 nc -w 3 "${{1%:*}}" "${{1#*:}}" </dev/null 2>/dev/null; }}
reach 10.96.0.1:443 || {{ echo 'the kubernetes Service is unreachable'; exit 3; }}
reach {api} || {{ echo 'the apiserver at {api} is unreachable'; exit 4; }}
for t in {host_end} 192.0.2.1:53 1.1.1.1:443; do
  if reach $t; then echo "reached $t off the node"; exit 5; fi
done"#
        );
        pods.create(
            &PostParams::default(),
            &pod(
                "net",
                json!({ "restartPolicy": "Never", "containers": [container("probe", &script)] }),
            )?,
        )
        .await?;
        wait_phase(&pods, "net", "Succeeded").await?;
        Ok(())
    })
    .await
}

/// Cluster DNS answers for Services and for nothing outside the cluster.
#[tokio::test]
async fn cluster_dns_resolves_services_and_nothing_else() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    in_namespace(cluster, "dns", |client, ns| async move {
        let pods: Api<Pod> = Api::namespaced(client, &ns);
        let script = r#"out=$(nslookup kubernetes.default.svc.cluster.local 2>&1) || { echo "$out"; exit 3; }
echo "$out" | grep -q '10.96.0.1$' || { echo "$out"; exit 4; }
grep -q '^nameserver 10.96.0.10$' /etc/resolv.conf && grep -q '^search .*svc.cluster.local' /etc/resolv.conf || { cat /etc/resolv.conf; exit 5; }
if nslookup example.com >/dev/null 2>&1; then echo 'example.com resolved'; exit 6; fi"#;
        pods.create(
            &PostParams::default(),
            &pod(
                "dns",
                json!({ "restartPolicy": "Never", "containers": [container("probe", script)] }),
            )?,
        )
        .await?;
        wait_phase(&pods, "dns", "Succeeded").await?;
        Ok(())
    })
    .await
}

//! `keybroker-cluster`: a local one-node cluster for humans (`make cluster-up` / `make
//! cluster-down`): a control plane (etcd, kube-apiserver, kube-controller-manager), MinIO, a
//! real node, and keybroker installed with its chart.
//!
//! A node's namespaces live as long as the process that made them, so `up` starts `run` as a
//! detached launcher (its own session, its log in the state directory) and returns once the
//! launcher reports the cluster ready; `down` sends the launcher SIGTERM, which tears everything
//! down, and removes what is left of a launcher that was killed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use keybroker_e2e::{Cluster, Lifetime, Options, process};
use serde::{Deserialize, Serialize};

#[derive(Debug, Parser)]
#[command(
    about = "Run a real one-node Kubernetes cluster and MinIO on this machine, without a container engine",
    long_about = "Run a real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager), \
MinIO and a node (kubelet, containerd, runc, kube-proxy, kube-scheduler, CoreDNS) in network, mount \
and PID namespaces of its own, optionally with keybroker installed by its chart. \
The binaries come from `make tools` (cached outside the repository)."
)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start in the background and return; prints how to reach it. Stop with `down`.
    Up(DirArgs),
    /// Stop what `up` started in DIR and delete DIR.
    Down {
        /// State directory given to `up`.
        #[arg(long, default_value = ".cluster")]
        dir: PathBuf,
    },
    /// Start in the foreground and stop on Ctrl-C or SIGTERM; everything dies with this process.
    Run(DirArgs),
}

#[derive(Debug, clap::Args)]
struct DirArgs {
    /// State directory: PKI, data, logs, kubeconfig. Must not be in use by another cluster.
    #[arg(long, default_value = ".cluster")]
    dir: PathBuf,
    /// Do not start MinIO.
    #[arg(long)]
    no_minio: bool,
    /// Also start a real node (kubelet, containerd, kube-proxy, kube-scheduler) in namespaces
    /// of its own; the control plane then listens on the node's address.
    #[arg(long)]
    node: bool,
    /// Install keybroker with its chart (needs --node and MinIO, and `make release-static`),
    /// with a MinIO user for the broker in Secret keybroker-system/broker-keys and the
    /// examples' buckets.
    #[arg(long, requires = "node")]
    keybroker: bool,
}

/// What the launcher leaves in `<dir>/state.json` once the cluster is ready, for `down`.
#[derive(Debug, Serialize, Deserialize)]
struct State {
    launcher: u32,
    components: Vec<(String, u32)>,
}

const STATE_FILE: &str = "state.json";
const LAUNCHER_LOG: &str = "launcher.log";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Cmd::Up(args) => up(args).await,
        Cmd::Down { dir } => down(&absolute(&dir)?),
        Cmd::Run(args) => run(args).await,
    }
}

async fn up(args: DirArgs) -> anyhow::Result<()> {
    let dir = absolute(&args.dir)?;
    if dir.join(STATE_FILE).exists() {
        bail!(
            "{} already holds a cluster; run `keybroker-cluster down --dir {}` first",
            dir.display(),
            args.dir.display()
        );
    }
    if dir.exists() {
        let marker = dir.display().to_string();
        let running = process::pids_with_marker(&marker);
        if !running.is_empty() {
            bail!(
                "processes {running:?} still use {}; run `keybroker-cluster down --dir {}` first",
                dir.display(),
                args.dir.display()
            );
        }
        // What a failed start left (sockets, data): never reused.
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("removing the leftover {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let log_path = dir.join(LAUNCHER_LOG);
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let mut launcher = std::process::Command::new(std::env::current_exe()?);
    launcher.arg("run").arg("--dir").arg(&dir);
    for (on, flag) in [
        (args.no_minio, "--no-minio"),
        (args.node, "--node"),
        (args.keybroker, "--keybroker"),
    ] {
        if on {
            launcher.arg(flag);
        }
    }
    // Its own session: Ctrl-C in this terminal, or this process exiting, does not reach it.
    use std::os::unix::process::CommandExt;
    let mut child = launcher
        .process_group(0)
        // Its error, not a backtrace, is what the tail below shows when it fails.
        .env("RUST_BACKTRACE", "0")
        .env("RUST_LIB_BACKTRACE", "0")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the launcher")?;
    eprintln!(
        "starting in the background (pid {}, log {})",
        child.id(),
        log_path.display()
    );
    let started = std::time::Instant::now();
    loop {
        if dir.join(STATE_FILE).exists() {
            break;
        }
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "the launcher exited ({status}) before the cluster was ready:\n{}",
                tail.join("\n")
            );
        }
        if started.elapsed() > Duration::from_secs(600) {
            let _ = child.kill();
            bail!(
                "the cluster was not ready after 10 minutes; see {}",
                log_path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    print!(
        "{}",
        std::fs::read_to_string(dir.join("summary.txt")).unwrap_or_default()
    );
    eprintln!(
        "ready after {:.0} s; stop it with `make cluster-down`",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn down(dir: &Path) -> anyhow::Result<()> {
    let state_file = dir.join(STATE_FILE);
    if !dir.exists() {
        println!("no cluster in {}", dir.display());
        return Ok(());
    }
    let marker = dir.display().to_string();
    if let Ok(bytes) = std::fs::read(&state_file) {
        let state: State = serde_json::from_slice(&bytes)
            .with_context(|| format!("reading {}", state_file.display()))?;
        // The launcher tears the node and the control plane down itself on SIGTERM.
        if process::stop_pid(state.launcher, &marker, Duration::from_secs(60)) {
            println!("stopped the launcher (pid {})", state.launcher);
        }
        for (name, pid) in state.components.iter().rev() {
            if process::stop_pid(*pid, &marker, Duration::from_secs(10)) {
                println!("stopped {name} (pid {pid})");
            }
        }
    }
    // A launcher killed before it was ready, or without running its cleanup.
    for pid in process::pids_with_marker(&marker) {
        if process::stop_pid(pid, &marker, Duration::from_secs(10)) {
            println!("stopped pid {pid}");
        }
    }
    let left = process::pids_with_marker(&marker);
    if !left.is_empty() {
        bail!("processes still running in {}: {left:?}", dir.display());
    }
    // The node's cgroups are removed by the launcher; one that was killed leaves empty ones
    // that the next harness start removes (their pid is dead).
    keybroker_e2e::cgroups::remove_stale();
    // A launcher that got SIGTERM removed the directory itself.
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", dir.display()));
        }
        _ => println!("removed {}", dir.display()),
    }
    Ok(())
}

async fn run(args: DirArgs) -> anyhow::Result<()> {
    let dir = absolute(&args.dir)?;
    let mut cluster = start(&dir, Lifetime::TiedToProcess, !args.no_minio, args.node).await?;
    let mut summary = summary(&cluster)?;
    if args.keybroker {
        summary.push_str(&install_keybroker(&cluster).await?);
    }
    print!("{summary}");
    std::fs::write(dir.join("summary.txt"), &summary)?;
    let state = State {
        launcher: std::process::id(),
        components: cluster
            .components()
            .iter()
            .map(|c| (c.name().to_owned(), c.pid()))
            .collect(),
    };
    std::fs::write(dir.join(STATE_FILE), serde_json::to_vec_pretty(&state)?)
        .context("writing the state file")?;
    println!("ready");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    cluster.stop();
    drop(cluster);
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(())
}

/// The chart installed with the local images, and what `examples/` need from the platform
/// team: the broker's MinIO user and the buckets. Returns how to use it.
async fn install_keybroker(cluster: &Cluster) -> anyhow::Result<String> {
    use keybroker_e2e::install::{self, Images, NAMESPACE};
    eprintln!("building keybroker's images and installing the chart");
    let images = tokio::task::spawn_blocking(Images::build).await??;
    install::install(cluster, &images, &[]).await?;
    install::prepare_examples(cluster, &cluster.client().await?).await?;
    let minio = cluster.minio.as_ref().context("--keybroker needs MinIO")?;
    // examples/ as this cluster needs them, and MinIO's CA for their apps.
    let examples = cluster.dir().join("examples");
    std::fs::create_dir_all(&examples)?;
    let ca = minio.ca_pem().context("MinIO has no CA")?;
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    for file in keybroker_e2e::demo::example_files(&source)? {
        let text = std::fs::read_to_string(&file)?;
        let name = file.file_name().context("file name")?;
        std::fs::write(examples.join(name), install::localize_example(&text, &ca))?;
    }
    let indented: String = ca.lines().map(|l| format!("    {l}\n")).collect();
    std::fs::write(
        examples.join("05-minio-ca.yaml"),
        format!(
            "# MinIO's CA for the apps of team-a (AWS_CA_BUNDLE).\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {}\n  namespace: team-a\ndata:\n  ca.crt: |\n{indented}",
            install::MINIO_CA_CONFIGMAP
        ),
    )?;
    Ok(format!(
        "keybroker: installed in {NAMESPACE} (helm list -n {NAMESPACE}); MinIO is {} inside the cluster\n\
         examples/ for this cluster (the local app image, MinIO's CA) are in {}\n\
         try:\n  kubectl get nodes\n  kubectl get pods -n {NAMESPACE}\n  \
         kubectl apply -f {}\n  \
         kubectl get pods -n team-a -w\n  \
         kubectl logs -n team-a deploy/report-uploader -c app -f\n",
        install::MINIO_URL,
        examples.display(),
        examples.display()
    ))
}

async fn start(
    dir: &Path,
    lifetime: Lifetime,
    with_minio: bool,
    with_node: bool,
) -> anyhow::Result<Cluster> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    eprintln!(
        "starting etcd, kube-apiserver, kube-controller-manager{}{} in {}",
        if with_minio { ", minio" } else { "" },
        if with_node {
            ", and a node (containerd, kubelet, kube-proxy, kube-scheduler)"
        } else {
            ""
        },
        dir.display()
    );
    let opts = Options {
        dir: dir.to_owned(),
        lifetime,
        with_minio,
    };
    let cluster = if with_node {
        Cluster::start_with_node(opts).await?
    } else {
        Cluster::start(opts).await?
    };
    Ok(cluster)
}

/// Where everything is. The MinIO root secret goes to a 0600 file, not to the terminal.
fn summary(cluster: &Cluster) -> anyhow::Result<String> {
    use std::fmt::Write;
    let mut out = String::new();
    writeln!(out, "kube-apiserver: {}", cluster.server)?;
    writeln!(out, "export KUBECONFIG={}", cluster.kubeconfig.display())?;
    // The pinned kubectl and helm of `make tools`, for a machine that has none of its own.
    if let Ok(tools) = keybroker_e2e::tools::Tools::locate() {
        writeln!(
            out,
            "alias kubectl={} helm={}",
            tools.kubectl.display(),
            tools.helm.display()
        )?;
    }
    if let Some(minio) = &cluster.minio {
        let env_file = cluster.dir().join("minio.env");
        write_private(
            &env_file,
            &format!(
                "MINIO_ENDPOINT={}\nMINIO_ROOT_USER={}\nMINIO_ROOT_PASSWORD={}\n",
                minio.endpoint, minio.root.access_key_id, minio.root.secret_access_key
            ),
        )?;
        writeln!(
            out,
            "minio: {} (root keys in {})",
            minio.endpoint,
            env_file.display()
        )?;
    }
    if let Some(node) = cluster.node() {
        writeln!(
            out,
            "node: {} at {} (host link {}, cgroup root {}, logs {}/*.log)",
            keybroker_e2e::node_config::NODE_NAME,
            node.sandbox().node_ip(),
            node.sandbox().host_link(),
            node.cgroup_root(),
            node.dir().display()
        )?;
    }
    writeln!(out, "logs: {}/*.log", cluster.dir().display())?;
    Ok(out)
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(contents.as_bytes()))
        .with_context(|| format!("writing {}", path.display()))
}

fn absolute(dir: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(dir).with_context(|| format!("resolving {}", dir.display()))
}

//! `keybroker-cluster`: a local control plane (etcd, kube-apiserver, kube-controller-manager)
//! and MinIO on loopback, for humans (`make cluster-up` / `make cluster-down`) and the demo.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use keybroker_e2e::{Cluster, Lifetime, Options, process};
use serde::{Deserialize, Serialize};

#[derive(Debug, Parser)]
#[command(
    about = "Run a real Kubernetes control plane and MinIO on loopback, without containers",
    long_about = "Run a real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager) \
and MinIO on loopback, without containers. There is no kubelet: pods are stored and stay Pending. \
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
    /// of its own; the control plane then listens on the node's address. `run` only: the
    /// node's namespaces live as long as this process.
    #[arg(long)]
    node: bool,
}

/// What `up` leaves in `<dir>/state.json` for `down`.
#[derive(Debug, Serialize, Deserialize)]
struct State {
    components: Vec<(String, u32)>,
}

const STATE_FILE: &str = "state.json";

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
    if args.node {
        bail!("a node lives only as long as the launcher: use `keybroker-cluster run --node`");
    }
    let cluster = start(&dir, Lifetime::Detached, !args.no_minio, false).await?;
    let state = State {
        components: cluster
            .components()
            .iter()
            .map(|c| (c.name().to_owned(), c.pid()))
            .collect(),
    };
    std::fs::write(dir.join(STATE_FILE), serde_json::to_vec_pretty(&state)?)
        .context("writing the state file")?;
    print_summary(&cluster)?;
    Ok(())
}

fn down(dir: &Path) -> anyhow::Result<()> {
    let state_file = dir.join(STATE_FILE);
    if !state_file.exists() {
        println!("no cluster in {}", dir.display());
        return Ok(());
    }
    let state: State = serde_json::from_slice(&std::fs::read(&state_file)?)
        .with_context(|| format!("reading {}", state_file.display()))?;
    let marker = dir.display().to_string();
    for (name, pid) in state.components.iter().rev() {
        if process::stop_pid(*pid, &marker, Duration::from_secs(10)) {
            println!("stopped {name} (pid {pid})");
        }
    }
    let left = process::pids_with_marker(&marker);
    if !left.is_empty() {
        bail!("processes still running in {}: {left:?}", dir.display());
    }
    std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    println!("removed {}", dir.display());
    Ok(())
}

async fn run(args: DirArgs) -> anyhow::Result<()> {
    let dir = absolute(&args.dir)?;
    let mut cluster = start(&dir, Lifetime::TiedToProcess, !args.no_minio, args.node).await?;
    print_summary(&cluster)?;
    println!("ready");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    cluster.stop();
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(())
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

/// Prints where everything is. The MinIO root secret goes to a 0600 file, not to the terminal.
fn print_summary(cluster: &Cluster) -> anyhow::Result<()> {
    println!("kube-apiserver: {}", cluster.server);
    println!("export KUBECONFIG={}", cluster.kubeconfig.display());
    if let Some(minio) = &cluster.minio {
        let env_file = cluster.dir().join("minio.env");
        write_private(
            &env_file,
            &format!(
                "MINIO_ENDPOINT={}\nMINIO_ROOT_USER={}\nMINIO_ROOT_PASSWORD={}\n",
                minio.endpoint, minio.root.access_key_id, minio.root.secret_access_key
            ),
        )?;
        println!(
            "minio: {} (root keys in {})",
            minio.endpoint,
            env_file.display()
        );
    }
    if let Some(node) = cluster.node() {
        println!(
            "node: {} at {} (host link {}, cgroup root {}, logs {}/*.log)",
            keybroker_e2e::node_config::NODE_NAME,
            node.sandbox().node_ip(),
            node.sandbox().host_link(),
            node.cgroup_root(),
            node.dir().display()
        );
    }
    println!("logs: {}/*.log", cluster.dir().display());
    Ok(())
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

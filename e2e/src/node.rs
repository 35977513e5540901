//! A real node for the e2e control plane: containerd (runc shim, Debian's runc), the kubelet,
//! kube-proxy, kube-scheduler and cluster DNS (`dns.rs`), in the namespaces of a [`Sandbox`].
//!
//! The machine is never changed: the daemons run in a private mount namespace where their
//! fixed host paths (`/run`, `/var/lib`) are the node's own directories and the sysctls the
//! kubelet insists on are read-only files with the values it wants. Everything the node made is
//! gone when it is dropped, or when the test process dies (see `netns.rs` and `cgroups.rs`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node as KubeNode;
use kube::api::Api;

use crate::cgroups::{self, CgroupRoot};
use crate::cluster::{client_from, write_kubeconfig};
use crate::images;
use crate::netns::{self, Sandbox};
use crate::node_config::{self as config, NODE_NAME};
use crate::pki::{self, Ca};
use crate::process::{self, Component, Lifetime};
use crate::tools::{self, NodeTools};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Tools(#[from] tools::Error),
    #[error(transparent)]
    Pki(#[from] pki::Error),
    #[error(transparent)]
    Process(#[from] process::Error),
    #[error(transparent)]
    Netns(#[from] netns::Error),
    #[error(transparent)]
    Cgroups(#[from] cgroups::Error),
    #[error(transparent)]
    Images(#[from] images::Error),
    #[error("writing {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("setting up the node's mount namespace: {0}")]
    Mounts(netns::Error),
    #[error("kube client: {0}")]
    Client(String),
}

/// What the node takes from the control plane's boot.
#[derive(Debug)]
pub struct ControlPlane {
    pub ca: Ca,
    /// The apiserver's URL as the node reaches it.
    pub server: String,
    pub pki_dir: PathBuf,
    /// The `system:masters` kubeconfig (setup only).
    pub kubeconfig: PathBuf,
}

/// A running node. Dropping it stops the daemons, kills everything in its namespaces and
/// removes its cgroups.
#[derive(Debug)]
pub struct Node {
    dir: PathBuf,
    components: Vec<Component>,
    /// How long from starting containerd to the Node object reporting Ready.
    pub start_to_ready: Duration,
    // Field order is drop order: the daemons above, then the namespaces, then the cgroups.
    sandbox: Sandbox,
    cgroup: CgroupRoot,
}

impl Node {
    /// Starts the node's daemons and returns once the Node is Ready.
    pub async fn start(run_dir: &Path, sandbox: Sandbox, cp: ControlPlane) -> Result<Self, Error> {
        let tools = NodeTools::locate()?;
        let dir = run_dir.join("node");
        let tag = run_dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.rsplit('-').next())
            .unwrap_or("0")
            .to_owned();
        let cgroup = CgroupRoot::create(&tag)?;
        let mut node = Self {
            dir: dir.clone(),
            components: Vec::new(),
            start_to_ready: Duration::ZERO,
            sandbox,
            cgroup,
        };
        node.boot(&tools, &cp).await?;
        Ok(node)
    }

    async fn boot(&mut self, tools: &NodeTools, cp: &ControlPlane) -> Result<(), Error> {
        let dir = self.dir.clone();
        for sub in [
            "run",
            "var-lib",
            "sysctl",
            "containerd/root",
            "containerd/state",
            "cni/net.d",
            "cni/ipam",
            "kubelet",
            "pki",
        ] {
            mkdir(&dir.join(sub))?;
        }
        self.mounts()?;

        let pki_dir = dir.join("pki");
        let node_ip = self.sandbox.node_ip();
        let kubelet_client = cp.ca.issue_client(
            &pki_dir,
            "kubelet-client",
            &format!("system:node:{NODE_NAME}"),
            &["system:nodes"],
        )?;
        let kubelet_serving = cp
            .ca
            .issue_server(&pki_dir, "kubelet", &[&node_ip, NODE_NAME])?;
        let proxy_client = cp
            .ca
            .issue_client(&pki_dir, "kube-proxy", "system:kube-proxy", &[])?;
        let scheduler_client =
            cp.ca
                .issue_client(&pki_dir, "kube-scheduler", "system:kube-scheduler", &[])?;
        let kubeconfig = |name: &str, cert: &pki::CertFiles| -> Result<PathBuf, Error> {
            let path = dir.join(format!("{name}.kubeconfig"));
            write_kubeconfig(&path, &cp.server, &cp.ca.cert, cert).map_err(|e| Error::Io {
                path: path.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
            Ok(path)
        };
        let kubelet_kc = kubeconfig("kubelet", &kubelet_client)?;
        let proxy_kc = kubeconfig("kube-proxy", &proxy_client)?;
        let scheduler_kc = kubeconfig("kube-scheduler", &scheduler_client)?;
        let dns_client = cp
            .ca
            .issue_client(&pki_dir, "coredns", crate::dns::USER, &[])?;
        let dns_kc = kubeconfig("coredns", &dns_client)?;
        let corefile = dir.join("Corefile");
        write(&corefile, &crate::dns::corefile(&node_ip, &dns_kc))?;

        let socket = dir.join("containerd/containerd.sock");
        let containerd_toml = dir.join("containerd/config.toml");
        write(
            &containerd_toml,
            &config::containerd(&config::Paths {
                state: &dir.join("containerd/state"),
                root: &dir.join("containerd/root"),
                socket: &socket,
                cni_conf: &dir.join("cni/net.d"),
                cni_bin: &tools.cni_bin,
                runc: &tools.runc,
            }),
        )?;
        write(
            &dir.join("cni/net.d/10-keybroker-e2e.conflist"),
            &config::cni(&dir.join("cni/ipam")),
        )?;
        // Pods get cluster DNS only; nothing resolves beyond this machine.
        let resolv = dir.join("resolv.conf");
        write(&resolv, "")?;
        let kubelet_yaml = dir.join("kubelet/config.yaml");
        write(
            &kubelet_yaml,
            &config::kubelet(&config::Kubelet {
                node_ip: &node_ip,
                ca: &cp.ca.cert,
                serving_cert: &kubelet_serving.cert,
                serving_key: &kubelet_serving.key,
                runtime_socket: &socket,
                cgroup_root: self.cgroup.name(),
                resolv_conf: &resolv,
            }),
        )?;
        let proxy_yaml = dir.join("kube-proxy.yaml");
        write(&proxy_yaml, &config::kube_proxy(&proxy_kc))?;

        let started = Instant::now();
        let shim_dir = tools
            .containerd_shim
            .parent()
            .map(Path::to_owned)
            .unwrap_or_default();
        let path = format!(
            "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            shim_dir.display()
        );
        let (nsenter, containerd_args) = self.sandbox.in_pid_namespace(
            &tools.containerd,
            &[format!("--config={}", containerd_toml.display())],
        );
        let containerd = self.spawn(
            "containerd",
            &nsenter,
            &containerd_args,
            &[("PATH", &path)],
            process::Join::default(),
        )?;
        let sock = socket.clone();
        self.components[containerd]
            .wait_ready("its socket", Duration::from_secs(60), || {
                let sock = sock.clone();
                async move { sock.exists() }
            })
            .await?;
        images::import(&tools.ctr, &socket, &tools.pause_image, config::PAUSE_IMAGE)?;
        images::import(
            &tools.ctr,
            &socket,
            &tools.busybox_image,
            config::BUSYBOX_IMAGE,
        )?;

        self.spawn(
            "kube-scheduler",
            &tools.kube_scheduler,
            &[
                format!("--kubeconfig={}", scheduler_kc.display()),
                format!("--authentication-kubeconfig={}", scheduler_kc.display()),
                format!("--authorization-kubeconfig={}", scheduler_kc.display()),
                "--bind-address=127.0.0.1".into(),
                "--secure-port=10259".into(),
                "--leader-elect=false".into(),
                format!("--cert-dir={}", pki_dir.display()),
            ],
            &[],
            self.sandbox.join_net(),
        )?;
        let (_, kubelet_args) = self.sandbox.in_pid_namespace(
            &tools.kubelet,
            &[
                format!("--config={}", kubelet_yaml.display()),
                format!("--kubeconfig={}", kubelet_kc.display()),
                format!("--root-dir={}", dir.join("kubelet").display()),
                format!("--cert-dir={}", pki_dir.display()),
                format!("--hostname-override={NODE_NAME}"),
                format!("--node-ip={node_ip}"),
                "--v=1".into(),
            ],
        );
        let kubelet = self.spawn(
            "kubelet",
            &nsenter,
            &kubelet_args,
            &[("PATH", &path)],
            process::Join::default(),
        )?;
        let (_, proxy_args) = self.sandbox.in_pid_namespace(
            &tools.kube_proxy,
            &[format!("--config={}", proxy_yaml.display())],
        );
        self.spawn(
            "kube-proxy",
            &nsenter,
            &proxy_args,
            &[("PATH", &path)],
            process::Join::default(),
        )?;

        let admin = client_from(&cp.kubeconfig)
            .await
            .map_err(|e| Error::Client(e.to_string()))?;
        crate::dns::publish(&admin, &node_ip)
            .await
            .map_err(|e| Error::Client(format!("publishing cluster DNS: {e}")))?;
        let (_, dns_args) = self
            .sandbox
            .in_pid_namespace(&tools.coredns, &[format!("-conf={}", corefile.display())]);
        self.spawn(
            "coredns",
            &nsenter,
            &dns_args,
            &[],
            process::Join::default(),
        )?;
        let nodes: Api<KubeNode> = Api::all(admin);
        self.components[kubelet]
            .wait_ready("the Node to be Ready", Duration::from_secs(120), || {
                let nodes = nodes.clone();
                async move {
                    nodes
                        .get_opt(NODE_NAME)
                        .await
                        .ok()
                        .flatten()
                        .is_some_and(is_ready)
                }
            })
            .await?;
        self.start_to_ready = started.elapsed();
        Ok(())
    }

    /// Prepares the node's mount namespace: shared propagation inside it (the kubelet needs
    /// it), the node's own `/run` and `/var/lib` (containerd, the kubelet and CNI write fixed
    /// paths there), and the kubelet's sysctls as read-only files.
    fn mounts(&self) -> Result<(), Error> {
        let mut script = String::from("set -e\nmount --make-rshared /\n");
        for (sysctl, value) in config::KUBELET_SYSCTLS {
            let file = self.dir.join("sysctl").join(sysctl.replace('/', "."));
            write(&file, &format!("{value}\n"))?;
            script.push_str(&format!(
                "mount --bind -o ro '{}' /proc/sys/{sysctl}\n",
                file.display()
            ));
        }
        for (own, path) in [("run", "/run"), ("var-lib", "/var/lib")] {
            script.push_str(&format!(
                "mount --bind '{}' {path}\n",
                self.dir.join(own).display()
            ));
        }
        self.sandbox
            .run(true, "sh", &["-c", &script])
            .map_err(Error::Mounts)?;
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Imports one more OCI archive into the node's containerd as `name` (pods then use it
    /// with `imagePullPolicy: Never`), e.g. the images `e2e/tools/keybroker-images.sh` writes.
    pub fn import_image(&self, archive: &Path, name: &str) -> Result<(), Error> {
        let tools = NodeTools::locate()?;
        let socket = self.dir.join("containerd/containerd.sock");
        images::import(&tools.ctr, &socket, archive, name)?;
        Ok(())
    }

    pub fn components(&self) -> &[Component] {
        &self.components
    }

    pub fn sandbox(&self) -> &Sandbox {
        &self.sandbox
    }

    /// The name of the node's cgroup root in each hierarchy.
    pub fn cgroup_root(&self) -> &str {
        self.cgroup.name()
    }

    /// The last `lines` log lines of every node daemon, for failure reports.
    pub fn log_tails(&self, lines: usize) -> String {
        self.components
            .iter()
            .map(|c| {
                format!(
                    "--- {} ({}) ---\n{}",
                    c.name(),
                    c.log_path().display(),
                    c.log_tail(lines)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn spawn(
        &mut self,
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
        join: process::Join,
    ) -> Result<usize, Error> {
        let log = self.dir.join(format!("{name}.log"));
        let component = Component::spawn_in(
            name,
            program,
            args,
            env,
            &log,
            Lifetime::TiedToProcess,
            join,
        )?;
        self.components.push(component);
        Ok(self.components.len() - 1)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // The kubelet first (it would restart what is stopped under it), containerd last.
        while let Some(mut c) = self.components.pop() {
            c.stop(Duration::from_secs(5));
        }
        self.sandbox.stop();
    }
}

fn is_ready(node: KubeNode) -> bool {
    node.status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

fn mkdir(path: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(path).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })
}

fn write(path: &Path, contents: &str) -> Result<(), Error> {
    std::fs::write(path, contents).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })
}

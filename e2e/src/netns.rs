//! The e2e node's own namespaces: a network namespace with no route off this machine, a private
//! mount namespace (so the node's mounts and bind-mounted sysctls never touch the machine's),
//! and a PID namespace for everything the container runtime starts.
//!
//! Why this shape:
//! - One holder process (`unshare --fork --pid --kill-child --net --mount`, then `tini` as PID 1)
//!   owns the three namespaces. It dies with the test process (parent-death signal), and when
//!   PID 1 of a PID namespace dies the kernel kills every process in it: containerd's shims and
//!   every container, which containerd daemonizes out of reach of any parent-death signal. The
//!   namespaces, their mounts and the veth pair then disappear with their last process, so a
//!   SIGKILLed test leaves none of them behind.
//! - The control plane runs inside the network namespace too, so the apiserver reaches pod IPs
//!   (webhooks) and pods reach the apiserver through the `kubernetes` Service, exactly as in a
//!   cluster. The test process reaches it through a veth pair: `100.80.<slot>.1` on the host,
//!   `100.80.<slot>.2` in the namespace. The namespace has no default route and drops anything
//!   forwarded to the veth, so pods reach nothing outside it; the host sees one link whose only
//!   route is its own /24.
//! - Each node takes a slot 0..=255 by `flock` on `<tmp>/keybroker-e2e-net/slot-<n>.lock`; the
//!   lock dies with its process, so a crashed run never blocks a slot.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

use crate::process::{self, Component, Join, Lifetime};

const SLOTS: u32 = 256;
/// The first two octets of every node's link network.
const LINK_PREFIX: &str = "100.80";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("all {SLOTS} node network slots in {dir} are taken by running tests")]
    NoSlot { dir: PathBuf },
    #[error(transparent)]
    Process(#[from] process::Error),
    #[error("the node's namespace holder did not start within 10 s; last lines of {log}:\n{tail}")]
    Holder { log: PathBuf, tail: String },
    #[error("{command} failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// The node's namespaces, the veth pair between them and the host, and the slot lock.
#[derive(Debug)]
pub struct Sandbox {
    slot: u32,
    /// PID of the namespaces' PID 1 (`tini`) as the host sees it.
    init_pid: u32,
    net: OwnedFd,
    holder: Option<Component>,
    _slot_lock: Flock<File>,
}

impl Sandbox {
    /// Creates the namespaces and the veth pair. `dir` gets the holder's log and must appear in
    /// every process's command line (teardown tests find leftovers by it).
    pub async fn create(dir: &Path) -> Result<Self, Error> {
        let (slot, lock) = take_slot()?;
        let tini = which("tini")?;
        let unshare = which("unshare")?;
        let holder = Component::spawn(
            "node-namespaces",
            &unshare,
            &[
                "--fork".into(),
                "--pid".into(),
                "--kill-child".into(),
                "--net".into(),
                "--mount".into(),
                "--propagation=private".into(),
                // A /proc of the new PID namespace: containerd finds its threads' namespaces
                // through /proc/<own pid>, which must be the pid it sees.
                "--mount-proc".into(),
                format!("--wd={}", dir.display()),
                "--".into(),
                tini.display().to_string(),
                "--".into(),
                "sleep".into(),
                "infinity".into(),
            ],
            &[],
            &dir.join("node-namespaces.log"),
            Lifetime::TiedToProcess,
        )?;
        let init_pid = wait_for_init(&holder).await?;
        let open = |kind: &str| -> Result<OwnedFd, Error> {
            let path = format!("/proc/{init_pid}/ns/{kind}");
            File::open(&path)
                .map(OwnedFd::from)
                .map_err(io(format!("opening {path}")))
        };
        let sandbox = Self {
            slot,
            init_pid,
            net: open("net")?,
            holder: Some(holder),
            _slot_lock: lock,
        };
        sandbox.link()?;
        Ok(sandbox)
    }

    /// The node's address inside the namespace (apiserver, kubelet, MinIO listen here).
    pub fn node_ip(&self) -> String {
        format!("{LINK_PREFIX}.{}.2", self.slot)
    }

    /// The host's end of the veth pair.
    pub fn host_ip(&self) -> String {
        format!("{LINK_PREFIX}.{}.1", self.slot)
    }

    /// The name of the veth end inside the namespace.
    pub fn node_link(&self) -> String {
        format!("kbe2e{}n", self.slot)
    }

    /// The name of the veth end on the host.
    pub fn host_link(&self) -> String {
        format!("kbe2e{}h", self.slot)
    }

    pub fn init_pid(&self) -> u32 {
        self.init_pid
    }

    /// Join only the network namespace (the control plane: its files are the host's).
    pub fn join_net(&self) -> Join {
        Join {
            net: Some(self.net.as_raw_fd()),
            ..Join::default()
        }
    }

    /// `program args` as a command line that runs inside all three namespaces: the node's
    /// daemons. containerd's shims and containers must die with the PID namespace's PID 1, and
    /// everything in the mount namespace sees its /proc, so the kubelet and kube-proxy run
    /// there too. Only a process born in a PID namespace is in it, so `nsenter` forks it;
    /// signals to `nsenter` do not reach it, and it ends with the namespace ([`Sandbox::stop`]).
    pub fn in_pid_namespace(&self, program: &Path, args: &[String]) -> (PathBuf, Vec<String>) {
        let mut full = vec![
            format!("--target={}", self.init_pid),
            "--pid".into(),
            "--mount".into(),
            "--net".into(),
            "--".into(),
            program.display().to_string(),
        ];
        full.extend_from_slice(args);
        (
            which("nsenter").unwrap_or_else(|_| PathBuf::from("nsenter")),
            full,
        )
    }

    /// Runs `program args` to completion inside the network namespace (with `all`, inside the
    /// mount and PID namespaces too), through `nsenter`.
    pub fn run(&self, all: bool, program: &str, args: &[&str]) -> Result<String, Error> {
        let target = self.init_pid.to_string();
        let mut ns_args = vec!["--target", target.as_str(), "--net"];
        if all {
            ns_args.extend(["--mount", "--pid"]);
        }
        ns_args.push("--");
        ns_args.push(program);
        let mut full: Vec<&str> = ns_args;
        full.extend_from_slice(args);
        run("nsenter", &full)
    }

    /// Stops every process in the namespaces (SIGKILL through PID 1's death) and waits until
    /// they are gone, so their cgroups can be removed.
    pub fn stop(&mut self) {
        if let Some(mut holder) = self.holder.take() {
            // `unshare --fork` ignores SIGTERM, and the PID namespace ends in SIGKILL anyway.
            holder.stop(Duration::ZERO);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{}", self.init_pid)).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn link(&self) -> Result<(), Error> {
        let (host, node) = (self.host_link(), self.node_link());
        // A link of a crashed run with this slot may outlive its namespace for a moment.
        let _ = run("ip", &["link", "del", &host]);
        let pid = self.init_pid.to_string();
        run(
            "ip",
            &[
                "link", "add", &host, "type", "veth", "peer", "name", &node, "netns", &pid,
            ],
        )?;
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/24", self.host_ip()),
                "dev",
                &host,
            ],
        )?;
        run("ip", &["link", "set", &host, "up"])?;
        self.run(false, "ip", &["link", "set", "lo", "up"])?;
        self.run(
            false,
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/24", self.node_ip()),
                "dev",
                &node,
            ],
        )?;
        self.run(false, "ip", &["link", "set", &node, "up"])?;
        // Processes of the namespace itself (not pods) need a route to ClusterIPs for
        // kube-proxy's DNAT to apply: with no default route, connect() fails first ("network is
        // unreachable"). A blackhole route is found, the packet is DNATed in the output hook and
        // re-routed to the pod, and an address no Service has goes nowhere.
        self.run(
            false,
            "ip",
            &[
                "route",
                "add",
                "blackhole",
                crate::node_config::SERVICE_CIDR,
            ],
        )?;
        // Pods are forwarded by the namespace; nothing they send may leave through the veth.
        self.run(false, "nft", &["add", "table", "inet", "keybroker-e2e"])?;
        self.run(
            false,
            "nft",
            &[
                "add chain inet keybroker-e2e forward { type filter hook forward priority filter; policy accept; }",
            ],
        )?;
        self.run(
            false,
            "nft",
            &[
                "add",
                "rule",
                "inet",
                "keybroker-e2e",
                "forward",
                "oifname",
                &node,
                "drop",
            ],
        )?;
        Ok(())
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits until the holder has forked and its child has executed `tini` in the new namespaces.
async fn wait_for_init(holder: &Component) -> Result<u32, Error> {
    let parent = holder.pid();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        let children = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
            .unwrap_or_default();
        if let Some(pid) = children
            .split_whitespace()
            .next()
            .and_then(|p| p.parse::<u32>().ok())
        {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "tini" {
                return Ok(pid);
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(Error::Holder {
        log: holder.log_path().to_owned(),
        tail: holder.log_tail(20),
    })
}

/// Takes the first free slot, starting from one derived from the pid so that parallel test
/// binaries rarely probe the same locks.
fn take_slot() -> Result<(u32, Flock<File>), Error> {
    let dir = std::env::temp_dir().join("keybroker-e2e-net");
    std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
    let first = std::process::id() % SLOTS;
    for i in 0..SLOTS {
        let slot = (first + i) % SLOTS;
        let path = dir.join(format!("slot-{slot}.lock"));
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(format!("opening {}", path.display())))?;
        if let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            return Ok((slot, lock));
        }
    }
    Err(Error::NoSlot { dir })
}

/// Runs a command to completion; its stdout, or an error with its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String, Error> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(io(format!("running {program}")))?;
    if !out.status.success() {
        return Err(Error::Command {
            command: format!("{program} {}", args.join(" ")),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The path of `program` on PATH (also searching /usr/sbin and /sbin, where Debian puts
/// iproute2, nft and runc).
pub fn which(program: &str) -> Result<PathBuf, Error> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|dir| Path::new(dir).join(program))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| Error::Io {
            what: format!("finding {program}"),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "{program} is not installed; `make tools` installs the node's Debian packages"
                ),
            ),
        })
}

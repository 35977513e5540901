//! Child processes of the harness: output captured to a log file, readiness waits that report
//! the log tail, and teardown that leaves nothing running.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How long a started process may outlive the process that started it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifetime {
    /// Killed by the kernel when the starting process dies (`PR_SET_PDEATHSIG`), so a test that
    /// panics, times out or is killed leaves no process behind.
    TiedToProcess,
    /// Survives the starting process in its own process group (`make cluster-up`); stopped by
    /// pid with [`stop_pid`].
    Detached,
}

/// Namespaces a component joins between fork and exec (see `netns.rs`): the e2e node's network
/// and mount namespaces. (Not its PID namespace: joining one only moves the caller's future
/// children, and a process whose children would land elsewhere cannot start threads.) The fds
/// belong to the namespaces' owner, which keeps them open while it can spawn.
#[derive(Clone, Copy, Debug, Default)]
pub struct Join {
    pub net: Option<RawFd>,
    pub mnt: Option<RawFd>,
}

/// Errors from starting or waiting on a component.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot start {name} ({program}): {source}")]
    Spawn {
        name: String,
        program: String,
        source: io::Error,
    },
    #[error("cannot create log file {path}: {source}")]
    Log { path: PathBuf, source: io::Error },
    #[error("{name} exited with {status} before it was ready; last lines of {log}:\n{tail}")]
    Exited {
        name: String,
        status: ExitStatus,
        log: PathBuf,
        tail: String,
    },
    #[error("{name} was not ready after {waited:?} ({what}); last lines of {log}:\n{tail}")]
    NotReady {
        name: String,
        what: String,
        waited: Duration,
        log: PathBuf,
        tail: String,
    },
}

/// A running component (etcd, kube-apiserver, …) whose output goes to `log`.
#[derive(Debug)]
pub struct Component {
    name: String,
    child: Child,
    log: PathBuf,
    lifetime: Lifetime,
}

impl Component {
    /// Starts `program` with `args` and `envs` (secrets go in `envs`, never in `args`, which
    /// anyone on the machine can read), writing stdout and stderr to `log`.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        envs: &[(&str, &str)],
        log: &Path,
        lifetime: Lifetime,
    ) -> Result<Self, Error> {
        Self::spawn_in(name, program, args, envs, log, lifetime, Join::default())
    }

    /// [`Component::spawn`] inside the namespaces of `join`.
    pub fn spawn_in(
        name: &str,
        program: &Path,
        args: &[String],
        envs: &[(&str, &str)],
        log: &Path,
        lifetime: Lifetime,
        join: Join,
    ) -> Result<Self, Error> {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|source| Error::Log {
                path: log.to_owned(),
                source,
            })?;
        let err = out.try_clone().map_err(|source| Error::Log {
            path: log.to_owned(),
            source,
        })?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .envs(envs.iter().copied())
            .env("NO_PROXY", "127.0.0.1,localhost")
            .env("no_proxy", "127.0.0.1,localhost")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        join_namespaces(&mut cmd, join);
        let spawned = match lifetime {
            Lifetime::TiedToProcess => spawn_tied(cmd),
            Lifetime::Detached => {
                use std::os::unix::process::CommandExt;
                cmd.process_group(0);
                cmd.spawn()
            }
        };
        let child = spawned.map_err(|source| Error::Spawn {
            name: name.to_owned(),
            program: program.display().to_string(),
            source,
        })?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
            lifetime,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn is_detached(&self) -> bool {
        self.lifetime == Lifetime::Detached
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `lines` lines of the component's log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    /// Polls `check` every 100 ms until it returns true; fails early with the log tail when the
    /// process exits, and with the log tail when `timeout` passes.
    pub async fn wait_ready<F, Fut>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut check: F,
    ) -> Result<(), Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(Error::Exited {
                    name: self.name.clone(),
                    status,
                    log: self.log.clone(),
                    tail: self.log_tail(30),
                });
            }
            if check().await {
                return Ok(());
            }
            if started.elapsed() > timeout {
                return Err(Error::NotReady {
                    name: self.name.clone(),
                    what: what.to_owned(),
                    waited: timeout,
                    log: self.log.clone(),
                    tail: self.log_tail(30),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sends `sig` to the process (if it is still running).
    pub fn signal(&mut self, sig: Signal) {
        if matches!(self.child.try_wait(), Ok(None)) {
            signal(self.child.id(), sig);
        }
    }

    /// Waits up to `timeout` for the process to exit by itself: its exit status, or `None` while
    /// it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; waits for the process to be reaped.
    pub fn stop(&mut self, grace: Duration) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        signal(self.child.id(), Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Component {
    fn drop(&mut self) {
        if self.lifetime == Lifetime::TiedToProcess {
            self.stop(Duration::from_secs(5));
        }
    }
}

/// Stops a detached process started by an earlier run: SIGTERM, then SIGKILL after `grace`.
/// `marker` must occur in its command line, so a recycled pid is never signalled.
pub fn stop_pid(pid: u32, marker: &str, grace: Duration) -> bool {
    let alive = || {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|cmdline| String::from_utf8_lossy(&cmdline).contains(marker))
            .unwrap_or(false)
            && !is_zombie(pid)
    };
    if !alive() {
        return false;
    }
    signal(pid, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !alive() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    signal(pid, Signal::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// Pids of live processes whose command line contains `marker`, other than this one and its
/// ancestors (`make cluster-down CLUSTER_DIR=<dir>` and its `cargo run` name the directory too).
pub fn pids_with_marker(marker: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut mine = vec![std::process::id()];
    while let Some(parent) = mine.last().and_then(|pid| parent_of(*pid)) {
        if parent <= 1 || mine.contains(&parent) {
            break;
        }
        mine.push(parent);
    }
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            !mine.contains(pid)
                && std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).contains(marker))
                    .unwrap_or(false)
                && !is_zombie(*pid)
        })
        .collect()
}

/// The parent pid, from `/proc/<pid>/stat` (the field after the state).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

fn signal(pid: u32, sig: Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(pid), sig);
    }
}

/// The last `lines` lines of a file (reads at most its last 64 KiB).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let Ok(mut file) = File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut buf = Vec::new();
    let _ = file.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[allow(unsafe_code)]
fn join_namespaces(cmd: &mut Command, join: Join) {
    use nix::sched::{CloneFlags, setns};
    use std::os::fd::BorrowedFd;
    use std::os::unix::process::CommandExt;
    if join.net.is_none() && join.mnt.is_none() {
        return;
    }
    // SAFETY: the closure runs between fork and exec in the single-threaded child and only
    // makes setns calls (async-signal-safe) on fds its owner keeps open until the spawn returns.
    // Joining a mount namespace needs a single-threaded caller, which the forked child is.
    unsafe {
        cmd.pre_exec(move || {
            for (fd, flag) in [
                (join.net, CloneFlags::CLONE_NEWNET),
                (join.mnt, CloneFlags::CLONE_NEWNS),
            ] {
                if let Some(fd) = fd {
                    setns(BorrowedFd::borrow_raw(fd), flag).map_err(io::Error::from)?;
                }
            }
            Ok(())
        });
    }
}

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `cmd` so that the kernel kills it when this process dies.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, not the process, so
/// every tied child is forked by one thread that lives as long as the process does.
fn spawn_tied(cmd: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("e2e-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(spawn_with_parent_death_signal(&mut cmd));
                }
            })
            .expect("the OS refused to start the e2e spawner thread");
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner
        .lock()
        .map_err(|_| io::Error::other("e2e spawner lock poisoned"))?
        .send((cmd, reply_tx))
        .map_err(|_| io::Error::other("e2e spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("e2e spawner thread is gone"))?
}

#[allow(unsafe_code)]
fn spawn_with_parent_death_signal(cmd: &mut Command) -> io::Result<Child> {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id();
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe calls
    // (prctl, getppid); it allocates nothing and touches no lock.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(io::Error::from)?;
            // The parent may have died before prctl took effect.
            if nix::unistd::getppid().as_raw() as u32 != parent {
                return Err(io::Error::other("parent exited during spawn"));
            }
            Ok(())
        });
    }
    cmd.spawn()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_search_finds_children_and_parents_are_read_from_proc() {
        let me = std::process::id();
        assert_eq!(parent_of(me), Some(std::os::unix::process::parent_id()));
        let marker = format!("kb-marker-{me}");
        let mut child = Command::new("sh")
            .args(["-c", "sleep 30; true", &marker])
            .spawn()
            .unwrap();
        // Until the child has exec'd, its command line is still this process's.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut found = pids_with_marker(&marker);
        while !found.contains(&child.id()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            found = pids_with_marker(&marker);
        }
        child.kill().unwrap();
        child.wait().unwrap();
        // The shell's own child, forked but not yet exec'd, may briefly carry the marker too.
        assert!(found.contains(&child.id()), "{found:?}");
    }

    #[test]
    fn log_tail_returns_the_last_lines() {
        let dir = std::env::temp_dir().join(format!("kb-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("x.log");
        let text: String = (1..=100).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&log, text).unwrap();
        assert_eq!(log_tail(&log, 3), "line 98\nline 99\nline 100");
        assert_eq!(
            log_tail(&dir.join("missing.log"), 3),
            format!("(no log at {})", dir.join("missing.log").display())
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn wait_ready_reports_an_early_exit_with_the_log_tail() {
        let dir = std::env::temp_dir().join(format!("kb-exit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("sh.log");
        let mut c = Component::spawn(
            "failing",
            Path::new("/bin/sh"),
            &["-c".into(), "echo boom; exit 3".into()],
            &[],
            &log,
            Lifetime::TiedToProcess,
        )
        .unwrap();
        let err = c
            .wait_ready("never", Duration::from_secs(10), || async { false })
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("failing exited with exit status: 3"), "{msg}");
        assert!(msg.contains("boom"), "{msg}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn wait_ready_times_out_naming_what_it_waited_for() {
        let dir = std::env::temp_dir().join(format!("kb-slow-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut c = Component::spawn(
            "sleeper",
            Path::new("/bin/sleep"),
            &["30".into()],
            &[],
            &dir.join("sleep.log"),
            Lifetime::TiedToProcess,
        )
        .unwrap();
        let pid = c.pid();
        let err = c
            .wait_ready("GET /nothing", Duration::from_millis(300), || async {
                false
            })
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("sleeper was not ready after 300ms (GET /nothing)"),
            "{err}"
        );
        drop(c);
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "a dropped component is still running"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! What a test process's harness leaves on the machine is removed as soon as that process
//! exits, also when it is killed or interrupted.
//!
//! A test binary's shared cluster is a static, never dropped: its processes die by
//! parent-death signal at exit, its mounts and network namespaces with them, but its run
//! directories (etcd data, containerd's content and state) and the node's cgroup directories
//! would stay until the next harness start. A reaper, started once per process in a process
//! group of its own (Ctrl-C and the parent's death do not reach it), waits for the process to
//! exit and for every process naming one of its run directories to be gone (at most a minute;
//! past that it leaves everything to the next harness start), then removes everything in the
//! run directories but the logs (kept for a failed run's reader; the next harness start
//! removes them) and the cgroup roots, retrying those for half a minute while their last
//! members exit.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Once;

/// The reaper itself. Its inputs come by environment, so that its own command line names no
/// run directory (the harness finds its processes by that name); the process pattern is a
/// bracket expression for the same reason (it does not match its own text).
const SCRIPT: &str = r#"
while kill -0 "$KB_REAP_PID" 2>/dev/null; do sleep 0.5; done
i=0
while grep -qsa -e "$KB_REAP_PROCESSES" /proc/[0-9]*/cmdline; do
  # Something still uses the run directories after a minute: leave them to the next harness
  # start rather than delete what a live process holds.
  [ "$i" -ge 120 ] && exit 0
  i=$((i + 1)); sleep 0.5
done
for dir in "$KB_REAP_RUN"*; do
  [ -d "$dir" ] || continue
  find "$dir" -xdev ! -type d ! -name '*.log' -delete 2>/dev/null
  find "$dir" -xdev -depth -type d -empty -delete 2>/dev/null
done
# A cgroup is removable once its last member is gone; pods' processes may take a moment.
i=0
while [ "$i" -lt 60 ]; do
  left=
  for root in "$KB_REAP_CGROUPS"/"$KB_REAP_CGROUP"* "$KB_REAP_CGROUPS"/*/"$KB_REAP_CGROUP"*; do
    [ -d "$root" ] || continue
    find "$root" -xdev -depth -type d -exec rmdir {} + 2>/dev/null
    [ -d "$root" ] && left=1
  done
  [ -z "$left" ] && exit 0
  i=$((i + 1)); sleep 0.5
done
exit 0
"#;

/// Starts this process's reaper, once; `run_prefix` is where its run directories start,
/// `cgroup_prefix` how its cgroup roots start (both end in `<pid>-`).
pub(crate) fn start(run_prefix: &str, process_pattern: &str, cgroup_prefix: &str) {
    static STARTED: Once = Once::new();
    STARTED.call_once(|| {
        let spawned = Command::new("sh")
            .arg("-c")
            .arg(SCRIPT)
            .env("KB_REAP_PID", std::process::id().to_string())
            .env("KB_REAP_RUN", run_prefix)
            .env("KB_REAP_PROCESSES", process_pattern)
            .env("KB_REAP_CGROUPS", crate::cgroups::ROOT)
            .env("KB_REAP_CGROUP", cgroup_prefix)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        if let Err(e) = spawned {
            eprintln!("the harness's reaper did not start ({e}); the next run removes what this one leaves");
        }
    });
}

/// This process's reaper, over the harness's naming of run directories and cgroup roots.
pub(crate) fn ensure_started() {
    let pid = std::process::id().to_string();
    let run_prefix = std::env::temp_dir()
        .join(format!("{}{pid}-", crate::RUN_DIR_PREFIX))
        .display()
        .to_string();
    // `keybroker-e2e-[1]234-` matches the run directories' names, not itself.
    let (first, rest) = pid.split_at(1);
    let pattern = format!("{}[{first}]{rest}-", crate::RUN_DIR_PREFIX);
    start(
        &run_prefix,
        &pattern,
        &format!("{}{pid}-", crate::cgroups::PREFIX),
    );
}

//! The e2e node's cgroup root, `kb-e2e-<pid>-<n>` in every cgroup v1 hierarchy of this machine.
//!
//! The kubelet (cgroupfs driver) refuses a `cgroupRoot` that does not exist in every hierarchy,
//! and runc creates each container's cgroups under it. The cgroup tree is the machine's, not
//! the node's: it outlives the node's namespaces, so it is removed explicitly once the node's
//! processes are gone, and roots left by test processes that died are removed by the next run
//! (the pid in the name tells whose they were).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub(crate) const ROOT: &str = "/sys/fs/cgroup";
pub(crate) const PREFIX: &str = "kb-e2e-";

#[derive(Debug, thiserror::Error)]
#[error("cgroup {path}: {source}")]
pub struct Error {
    path: PathBuf,
    source: std::io::Error,
}

/// A cgroup root created in every hierarchy; removed on drop.
#[derive(Debug)]
pub struct CgroupRoot {
    name: String,
}

impl CgroupRoot {
    /// Creates `kb-e2e-<pid>-<tag>` in every hierarchy, after removing roots of dead processes.
    pub fn create(tag: &str) -> Result<Self, Error> {
        remove_stale();
        crate::reaper::ensure_started();
        let name = format!("{PREFIX}{}-{tag}", std::process::id());
        for hierarchy in hierarchies() {
            let dir = hierarchy.join(&name);
            std::fs::create_dir_all(&dir).map_err(|source| Error {
                path: dir.clone(),
                source,
            })?;
            // A new cpuset cgroup starts with no CPUs and no memory nodes: nothing could join it.
            if hierarchy.ends_with("cpuset") {
                for file in ["cpuset.cpus", "cpuset.mems"] {
                    let parent = std::fs::read_to_string(hierarchy.join(file)).unwrap_or_default();
                    std::fs::write(dir.join(file), parent.trim()).map_err(|source| Error {
                        path: dir.join(file),
                        source,
                    })?;
                }
            }
        }
        Ok(Self { name })
    }

    /// The name relative to each hierarchy's root (the kubelet's `cgroupRoot` without `/`).
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Directories of the cgroup root `name` that still exist, in any hierarchy.
pub fn leftovers(name: &str) -> Vec<PathBuf> {
    hierarchies()
        .into_iter()
        .map(|h| h.join(name))
        .filter(|d| d.exists())
        .collect()
}

/// Every process in the cgroup root `name` or below it, in any hierarchy.
pub fn members(name: &str) -> Vec<u32> {
    fn walk(dir: &Path, out: &mut Vec<u32>) {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            out.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&entry.path(), out);
                }
            }
        }
    }
    let mut out = Vec::new();
    for dir in leftovers(name) {
        walk(&dir, &mut out);
    }
    out.sort_unstable();
    out.dedup();
    out
}

impl Drop for CgroupRoot {
    fn drop(&mut self) {
        // The node's processes die asynchronously after their PID namespace's init is killed;
        // a cgroup with members refuses rmdir (EBUSY) until then.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut left = false;
            for hierarchy in hierarchies() {
                left |= !remove_tree(&hierarchy.join(&self.name));
            }
            if !left || Instant::now() > deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Every mounted cgroup hierarchy under /sys/fs/cgroup (v1 controllers, the named systemd one
/// and the unified v2 mount, which runc also writes to on a hybrid host).
fn hierarchies() -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(ROOT) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}

/// Removes `dir` and its sub-cgroups, deepest first; true when nothing is left.
fn remove_tree(dir: &Path) -> bool {
    if !dir.exists() {
        return true;
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path());
            }
        }
    }
    std::fs::remove_dir(dir).is_ok() || !dir.exists()
}

/// Removes the roots of test processes that no longer run.
pub fn remove_stale() {
    for hierarchy in hierarchies() {
        let Ok(entries) = std::fs::read_dir(&hierarchy) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|n| n.strip_prefix(PREFIX))
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok())
            else {
                continue;
            };
            if !Path::new(&format!("/proc/{pid}")).exists() {
                remove_tree(&entry.path());
            }
        }
    }
}

//! Publishes a set of files so that readers see the whole old set or the whole new set, never a
//! torn file and never a directory that is missing or half written.
//!
//! This is the kubelet's AtomicWriter pattern (what ConfigMap, Secret and projected-token
//! volumes use), so apps get semantics they already rely on:
//!
//! ```text
//! <root>/<name>            -> ..keybroker/<name>/<generation>     (a symlink, swapped by rename)
//! <root>/..keybroker/<name>/<generation>/{credentials,credentials.json,expiration}
//! ```
//!
//! A new generation is written completely into a fresh hidden directory; then a temporary
//! symlink to it is renamed over `<root>/<name>`. rename(2) replaces the link in one step, so
//! `<name>` always resolves to exactly one complete generation. Why not the alternatives:
//! renaming a new *directory* over the old one fails when the old one is not empty, and
//! per-file renames would let a reader mix files of two generations.
//!
//! Unlike the kubelet, which deletes the old generation right after the swap, a replaced
//! generation stays for at least [`RETIRE_AFTER`] and goes at the first publish after that (in
//! practice: the next refresh). A path lookup is not atomic with the open, so a reader that
//! resolved `<name>` just before a swap would otherwise get `NotFound` in the middle of a
//! refresh. So `<name>/<file>` is always there and whole, and a reader that resolves `<name>`
//! once (e.g. `readlink`) reads one consistent generation as long as it takes less than
//! [`RETIRE_AFTER`]. [`Writer::remove`] deletes every generation at once.
//!
//! No fsync: the volume is memory-backed and credentials are worthless after a node crash.
//! Names starting with `.` cannot be ApiKey names, so `..keybroker` and `.auth-token` never
//! collide with one.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Hidden directory holding every generation.
const STATE_DIR: &str = "..keybroker";
/// Name of the temporary symlink, inside `..keybroker/<name>/`.
const NEXT_LINK: &str = "..next";
/// How long a replaced generation stays readable for readers that resolved it before the swap.
pub const RETIRE_AFTER: Duration = Duration::from_secs(10);

/// A failed filesystem step, naming the path (never the contents).
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {source}")]
pub struct Error {
    what: &'static str,
    path: PathBuf,
    source: io::Error,
}

fn step<T>(what: &'static str, path: &Path, r: io::Result<T>) -> Result<T, Error> {
    r.map_err(|source| Error {
        what,
        path: path.to_owned(),
        source,
    })
}

/// Writes file sets under one root with fixed permissions.
#[derive(Debug)]
pub struct Writer {
    root: PathBuf,
    file_mode: u32,
    dir_mode: u32,
    generation: AtomicU64,
}

impl Writer {
    /// `file_mode` is the mode of every file; directories get the same read permissions plus
    /// search (x) so those who may read the files can reach them, and owner write so the
    /// sidecar can replace them.
    pub fn new(root: &Path, file_mode: u32) -> Self {
        Self {
            root: root.to_owned(),
            file_mode,
            dir_mode: dir_mode(file_mode),
            generation: AtomicU64::new(0),
        }
    }

    /// Replaces whatever set `<root>/<name>` shows by `files`, atomically.
    pub fn publish(&self, name: &str, files: &[(&str, Vec<u8>)]) -> Result<(), Error> {
        let key_dir = self.root.join(STATE_DIR).join(name);
        self.mkdir(&self.root.join(STATE_DIR))?;
        self.mkdir(&key_dir)?;
        let generation = self.new_generation(&key_dir)?;
        let gen_dir = key_dir.join(&generation);
        let written = files
            .iter()
            .try_for_each(|(file, contents)| self.create_file(&gen_dir.join(file), contents))
            .and_then(|()| self.swap(name, &key_dir, &generation));
        if let Err(e) = written {
            // The visible set is untouched; drop the half-written generation.
            let _ = fs::remove_dir_all(&gen_dir);
            return Err(e);
        }
        self.retire_generations(&key_dir)
    }

    /// Removes `<root>/<name>` and every generation behind it. The visible name goes first, so
    /// readers see the set vanish in one step.
    pub fn remove(&self, name: &str) -> Result<(), Error> {
        let link = self.root.join(name);
        match fs::symlink_metadata(&link) {
            Ok(meta) if meta.is_dir() => step("removing", &link, fs::remove_dir_all(&link))?,
            Ok(_) => step("removing", &link, fs::remove_file(&link))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return step("inspecting", &link, Err(e)),
        }
        let key_dir = self.root.join(STATE_DIR).join(name);
        match fs::remove_dir_all(&key_dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => step("removing", &key_dir, Err(e)),
            _ => Ok(()),
        }
    }

    /// Writes one stand-alone file `<root>/<file>` atomically (temporary file, then rename).
    pub fn write_file(&self, file: &str, contents: &[u8]) -> Result<(), Error> {
        let tmp = self.root.join(format!("{file}.tmp"));
        let _ = fs::remove_file(&tmp);
        self.create_file(&tmp, contents)?;
        let target = self.root.join(file);
        step("renaming into place", &target, fs::rename(&tmp, &target))
    }

    /// Removes `<root>/<file>` if present.
    pub fn remove_file(&self, file: &str) -> Result<(), Error> {
        let path = self.root.join(file);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => step("removing", &path, Err(e)),
            _ => Ok(()),
        }
    }

    /// Removes every generation this writer (or an earlier run of it) left under the root.
    pub fn remove_state_dir(&self) -> Result<(), Error> {
        let dir = self.root.join(STATE_DIR);
        match fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => step("removing", &dir, Err(e)),
            _ => Ok(()),
        }
    }

    /// A fresh, empty generation directory under `key_dir`; its name orders by time.
    fn new_generation(&self, key_dir: &Path) -> Result<String, Error> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        loop {
            let n = self.generation.fetch_add(1, Ordering::Relaxed);
            let name = format!("{nanos:020}.{n}");
            let dir = key_dir.join(&name);
            match fs::create_dir(&dir) {
                Ok(()) => {
                    self.chmod_dir(&dir)?;
                    return Ok(name);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return step("creating", &dir, Err(e)),
            }
        }
    }

    /// Points `<root>/<name>` at `generation` with one rename.
    fn swap(&self, name: &str, key_dir: &Path, generation: &str) -> Result<(), Error> {
        let next = key_dir.join(NEXT_LINK);
        let _ = fs::remove_file(&next);
        let target = Path::new(STATE_DIR).join(name).join(generation);
        step(
            "creating symlink",
            &next,
            std::os::unix::fs::symlink(&target, &next),
        )?;
        let link = self.root.join(name);
        if fs::symlink_metadata(&link).is_ok_and(|m| m.is_dir()) {
            // Not ours (a directory cannot be replaced by a rename of a symlink): clear it once.
            step("removing", &link, fs::remove_dir_all(&link))?;
        }
        step("renaming into place", &link, fs::rename(&next, &link))
    }

    /// Removes the generations of `key_dir` that were replaced more than [`RETIRE_AFTER`] ago
    /// (a generation was replaced when the next one was created). The newest always stays.
    fn retire_generations(&self, key_dir: &Path) -> Result<(), Error> {
        let mut generations = Vec::new();
        for entry in step("listing", key_dir, fs::read_dir(key_dir))? {
            let name = step("listing", key_dir, entry)?.file_name();
            if let Some(created) = name.to_str().and_then(created_at) {
                generations.push((created, name));
            }
        }
        generations.sort();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        for pair in generations.windows(2) {
            let ((_, name), ((replaced_at, _), _)) = (&pair[0], &pair[1]);
            if now.saturating_sub(*replaced_at) < RETIRE_AFTER.as_nanos() {
                break;
            }
            let path = key_dir.join(name);
            match fs::remove_dir_all(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return step("removing", &path, Err(e));
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn mkdir(&self, dir: &Path) -> Result<(), Error> {
        match fs::create_dir(dir) {
            Ok(()) => self.chmod_dir(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => step("creating", dir, Err(e)),
        }
    }

    /// Sets the directory mode regardless of the umask, keeping the set-group-ID bit the kubelet
    /// puts on an fsGroup volume: it is what gives new files the pod's fsGroup, so that the app
    /// (a member of it) can read them.
    fn chmod_dir(&self, dir: &Path) -> Result<(), Error> {
        let current = step("inspecting", dir, fs::metadata(dir))?
            .permissions()
            .mode();
        let mode = self.dir_mode | (current & 0o2000);
        step(
            "setting the mode of",
            dir,
            fs::set_permissions(dir, fs::Permissions::from_mode(mode)),
        )
    }

    fn create_file(&self, path: &Path, contents: &[u8]) -> Result<(), Error> {
        let mut file = step(
            "creating",
            path,
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(self.file_mode)
                .open(path),
        )?;
        step("writing", path, file.write_all(contents))?;
        // The umask may have taken bits away at create time.
        step(
            "setting the mode of",
            path,
            file.set_permissions(fs::Permissions::from_mode(self.file_mode)),
        )
    }
}

/// When the generation named `name` (`<nanoseconds since 1970>.<sequence>`) was created, as a
/// sortable key; `None` for anything else.
fn created_at(name: &str) -> Option<(u128, u64)> {
    let (nanos, seq) = name.split_once('.')?;
    Some((nanos.parse().ok()?, seq.parse().ok()?))
}

/// The directory mode for files of `file_mode`: owner rwx, and read + search for whoever may
/// read the files (0440 -> 0750, 0444 -> 0755, 0400 -> 0700).
pub fn dir_mode(file_mode: u32) -> u32 {
    let readers = file_mode & 0o044;
    0o700 | readers | (readers >> 2)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    use super::*;

    fn temp_root(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "kb-sidecar-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A set whose three files all name generation `n`, padded so a torn write would show.
    fn set(n: u64) -> Vec<(&'static str, Vec<u8>)> {
        let pad = "x".repeat(4096);
        ["a", "b", "c"]
            .into_iter()
            .map(|f| (f, format!("{n}:{pad}:{n}").into_bytes()))
            .collect()
    }

    fn parse(contents: &[u8]) -> u64 {
        let text = std::str::from_utf8(contents).unwrap();
        let (first, rest) = text.split_once(':').unwrap();
        let last = rest.rsplit_once(':').unwrap().1;
        assert_eq!(first, last, "torn file");
        first.parse().unwrap()
    }

    #[test]
    fn modes_follow_the_file_mode() {
        assert_eq!(dir_mode(0o440), 0o750);
        assert_eq!(dir_mode(0o444), 0o755);
        assert_eq!(dir_mode(0o400), 0o700);
    }

    #[test]
    fn publish_replaces_and_remove_clears_everything() {
        let root = temp_root("publish");
        let w = Writer::new(&root, 0o440);
        w.publish("uploader", &set(1)).unwrap();
        w.publish("uploader", &set(2)).unwrap();
        w.publish("uploader", &set(3)).unwrap();
        assert_eq!(parse(&fs::read(root.join("uploader/b")).unwrap()), 3);
        // Replaced just now: still there for readers that resolved them before the swap.
        let generations = || {
            let mut names: Vec<String> = fs::read_dir(root.join("..keybroker/uploader"))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            names
        };
        assert_eq!(generations().len(), 3);
        let meta = fs::metadata(root.join("uploader/a")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o440);
        let meta = fs::metadata(root.join("uploader")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o750);

        w.remove("uploader").unwrap();
        assert!(fs::symlink_metadata(root.join("uploader")).is_err());
        assert!(!root.join("..keybroker/uploader").exists());
        w.remove("uploader").unwrap();
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn generations_replaced_long_ago_go_at_the_next_publish() {
        let root = temp_root("retire");
        let key_dir = root.join("..keybroker/k");
        fs::create_dir_all(&key_dir).unwrap();
        // Created (and so replaced) in 1970; the newer of the two is replaced by this publish.
        for ancient in ["00000000000000000001.0", "00000000000000000002.0", "junk"] {
            fs::create_dir(key_dir.join(ancient)).unwrap();
        }
        let w = Writer::new(&root, 0o440);
        w.publish("k", &set(1)).unwrap();
        let mut left: Vec<String> = fs::read_dir(&key_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left.len(), 3, "{left:?}");
        assert_eq!(left[0], "00000000000000000002.0");
        assert_eq!(left[2], "junk", "not a generation: left alone");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn the_set_group_id_bit_of_an_fs_group_volume_is_kept() {
        let root = temp_root("setgid");
        fs::set_permissions(&root, fs::Permissions::from_mode(0o2777)).unwrap();
        let w = Writer::new(&root, 0o440);
        w.publish("k", &set(1)).unwrap();
        let gen_dir = fs::canonicalize(root.join("k")).unwrap();
        for dir in [root.join("..keybroker"), gen_dir] {
            let mode = fs::metadata(&dir).unwrap().permissions().mode();
            assert_eq!(mode & 0o2777, 0o2750, "{}", dir.display());
        }
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_directory_in_the_way_is_replaced() {
        let root = temp_root("inway");
        fs::create_dir_all(root.join("k/old")).unwrap();
        let w = Writer::new(&root, 0o444);
        w.publish("k", &set(7)).unwrap();
        assert_eq!(parse(&fs::read(root.join("k/a")).unwrap()), 7);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_stand_alone_file_is_written_with_the_mode_and_no_leftovers() {
        let root = temp_root("single");
        let w = Writer::new(&root, 0o440);
        w.write_file(".auth-token", b"t1").unwrap();
        w.write_file(".auth-token", b"t2").unwrap();
        assert_eq!(fs::read(root.join(".auth-token")).unwrap(), b"t2");
        let mode = fs::metadata(root.join(".auth-token"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o440);
        assert!(!root.join(".auth-token.tmp").exists());
        w.remove_file(".auth-token").unwrap();
        w.remove_file(".auth-token").unwrap();
        assert!(!root.join(".auth-token").exists());
        fs::remove_dir_all(&root).unwrap();
    }

    /// Readers racing thousands of swaps: a file read through `<name>/` is always there and
    /// whole, and all files read from one resolved generation belong to that generation.
    #[test]
    fn concurrent_readers_never_see_a_partial_or_mixed_set() {
        let root = temp_root("race");
        let w = Writer::new(&root, 0o440);
        w.publish("k", &set(0)).unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (root, done) = (root.clone(), Arc::clone(&done));
                std::thread::spawn(move || {
                    let (mut by_path, mut whole_sets) = (0u64, 0u64);
                    let mut last = 0;
                    while !done.load(Ordering::Relaxed) {
                        // Through the visible name: always present, never torn, never older
                        // than what this reader saw before.
                        let n = parse(&fs::read(root.join("k/a")).expect("k/a missing"));
                        assert!(n >= last, "went back from {last} to {n}");
                        last = n;
                        by_path += 1;
                        // A whole set: resolve the generation once, read all files from it.
                        let target = fs::read_link(root.join("k")).unwrap();
                        let gen_dir = root.join(target);
                        let ns: Vec<u64> = ["a", "b", "c"]
                            .iter()
                            .map(|f| parse(&fs::read(gen_dir.join(f)).expect("set incomplete")))
                            .collect();
                        assert!(ns.iter().all(|&x| x == ns[0]), "mixed set {ns:?}");
                        whole_sets += 1;
                    }
                    (by_path, whole_sets)
                })
            })
            .collect();
        for n in 1..=300 {
            w.publish("k", &set(n)).unwrap();
        }
        done.store(true, Ordering::Relaxed);
        for r in readers {
            let (by_path, whole_sets) = r.join().unwrap();
            assert!(by_path > 0 && whole_sets > 0);
        }
        assert_eq!(parse(&fs::read(root.join("k/c")).unwrap()), 300);
        fs::remove_dir_all(&root).unwrap();
    }
}

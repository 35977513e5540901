//! Images for the e2e node, without a registry or a container engine.
//!
//! `e2e/tools/images/build-images.sh` writes the base images (pause, busybox) as OCI archives
//! with crane; this module imports archives into the node's containerd under the names pods
//! use (with `imagePullPolicy: Never` or `IfNotPresent` nothing is ever pulled), and reads an
//! archive's config and files back ([`OciImage`]) to compare them with the `Dockerfile`.

use std::io::Read;
use std::path::Path;
use std::process::Command;

use anyhow::Context;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("running {ctr}: {source}")]
    Run { ctr: String, source: std::io::Error },
    #[error("importing {archive} as {name} failed ({status}): {stderr}")]
    Import {
        archive: String,
        name: String,
        status: String,
        stderr: String,
    },
}

/// Imports the OCI archive `archive` into the `k8s.io` namespace of the containerd serving on
/// `socket`, naming its index `name`.
pub fn import(ctr: &Path, socket: &Path, archive: &Path, name: &str) -> Result<(), Error> {
    let out = Command::new(ctr)
        .arg("--address")
        .arg(socket)
        .args([
            "--namespace",
            "k8s.io",
            "images",
            "import",
            "--index-name",
            name,
        ])
        .arg(archive)
        .output()
        .map_err(|source| Error::Run {
            ctr: ctr.display().to_string(),
            source,
        })?;
    if !out.status.success() {
        return Err(Error::Import {
            archive: archive.display().to_string(),
            name: name.to_owned(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// The parts of an image config (`config` of the config blob) that keybroker's images set.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ImageConfig {
    pub user: Option<String>,
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub env: Option<Vec<String>>,
    pub working_dir: Option<String>,
    pub exposed_ports: Option<std::collections::BTreeMap<String, serde_json::Value>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileType {
    Regular,
    Directory,
    Symlink,
    Other(u8),
}

/// A file of an image's layers, as its tar header and contents say.
#[derive(Debug, Clone)]
pub struct LayerFile {
    pub kind: FileType,
    /// Permission bits (`0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub data: Vec<u8>,
}

/// An image of an OCI archive (an image layout, tarred) as `keybroker-images.sh` writes it: one
/// manifest, its config, and its layers' files (a later layer's file replacing an earlier one).
#[derive(Debug, Clone)]
pub struct OciImage {
    pub config: ImageConfig,
    files: std::collections::BTreeMap<String, LayerFile>,
}

/// A tar member's path without `./` or `/` in front, nor `/` behind.
fn member_path(name: &str) -> &str {
    let name = name.strip_prefix("./").unwrap_or(name);
    name.trim_start_matches('/').trim_end_matches('/')
}

/// The files of the tar `reader`, in archive order (GNU long names and pax headers as the `tar`
/// crate reads them), read to its end so that a gzip stream's checksum is checked too.
fn tar_files(reader: impl Read) -> anyhow::Result<Vec<(String, LayerFile)>> {
    let mut archive = tar::Archive::new(reader);
    let mut files = Vec::new();
    for entry in archive.entries().context("reading the tar")? {
        let mut entry = entry.context("reading a tar header")?;
        let path = entry.path().context("a tar member's path")?;
        let path = member_path(&path.to_string_lossy()).to_owned();
        let header = entry.header();
        let kind = match header.entry_type() {
            // pax global headers describe the archive, not a file.
            tar::EntryType::XGlobalHeader => continue,
            tar::EntryType::Regular => FileType::Regular,
            tar::EntryType::Directory => FileType::Directory,
            tar::EntryType::Symlink => FileType::Symlink,
            other => FileType::Other(other.as_byte()),
        };
        let mode = header
            .mode()
            .with_context(|| format!("the mode of {path}"))?
            & 0o7777;
        let uid = header.uid().with_context(|| format!("the uid of {path}"))?;
        let gid = header.gid().with_context(|| format!("the gid of {path}"))?;
        let mut data = Vec::with_capacity(usize::try_from(entry.size()).unwrap_or(0));
        entry
            .read_to_end(&mut data)
            .with_context(|| format!("reading {path}"))?;
        let file = LayerFile {
            kind,
            mode,
            uid: u32::try_from(uid).with_context(|| format!("{path}'s uid {uid}"))?,
            gid: u32::try_from(gid).with_context(|| format!("{path}'s gid {gid}"))?,
            data,
        };
        files.push((path, file));
    }
    std::io::copy(&mut archive.into_inner(), &mut std::io::sink())
        .context("reading past the tar's end")?;
    Ok(files)
}

impl OciImage {
    /// Reads the OCI archive at `archive`.
    pub fn read(archive: &Path) -> anyhow::Result<Self> {
        let tar =
            std::fs::read(archive).with_context(|| format!("reading {}", archive.display()))?;
        Self::from_archive(&tar).with_context(|| format!("reading {}", archive.display()))
    }

    fn from_archive(tar: &[u8]) -> anyhow::Result<Self> {
        use serde_json::Value;
        let members: std::collections::HashMap<String, Vec<u8>> = tar_files(tar)?
            .into_iter()
            .map(|(name, file)| (name, file.data))
            .collect();
        let blob = |digest: &str| -> anyhow::Result<&Vec<u8>> {
            let hex = digest
                .strip_prefix("sha256:")
                .with_context(|| format!("digest {digest} is not sha256"))?;
            members
                .get(&format!("blobs/sha256/{hex}"))
                .with_context(|| format!("the archive has no blob {digest}"))
        };
        let json = |bytes: &[u8], what: &str| -> anyhow::Result<Value> {
            serde_json::from_slice(bytes).with_context(|| format!("{what} is not JSON"))
        };
        let digest = |v: &Value, what: &str| -> anyhow::Result<String> {
            v["digest"]
                .as_str()
                .map(str::to_owned)
                .with_context(|| format!("{what} has no digest"))
        };
        let index = json(
            members.get("index.json").context("no index.json")?,
            "index.json",
        )?;
        let manifests = index["manifests"]
            .as_array()
            .context("index.json has no manifests")?;
        let [manifest] = manifests.as_slice() else {
            anyhow::bail!("index.json has {} manifests, not one", manifests.len());
        };
        anyhow::ensure!(
            manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json",
            "index.json names a {}, not an image manifest",
            manifest["mediaType"]
        );
        let manifest = json(blob(&digest(manifest, "the manifest")?)?, "the manifest")?;
        let config = json(
            blob(&digest(&manifest["config"], "the config")?)?,
            "the config",
        )?;
        let config: ImageConfig =
            serde_json::from_value(config["config"].clone()).context("the config's config")?;
        let mut files = std::collections::BTreeMap::new();
        for layer in manifest["layers"]
            .as_array()
            .context("the manifest has no layers")?
        {
            let digest = digest(layer, "a layer")?;
            let data = blob(&digest)?.as_slice();
            let layer_files = match layer["mediaType"].as_str() {
                Some("application/vnd.oci.image.layer.v1.tar+gzip") => {
                    tar_files(flate2::read::MultiGzDecoder::new(data))
                }
                Some("application/vnd.oci.image.layer.v1.tar") => tar_files(data),
                other => anyhow::bail!("layer media type {other:?} is not read here"),
            };
            files.extend(layer_files.with_context(|| format!("reading the layer {digest}"))?);
        }
        Ok(Self { config, files })
    }

    /// An image made of `config` and `files` (paths as in a layer, without a leading `/`).
    #[cfg(test)]
    pub(crate) fn from_parts(
        config: ImageConfig,
        files: impl IntoIterator<Item = (String, LayerFile)>,
    ) -> Self {
        Self {
            config,
            files: files.into_iter().collect(),
        }
    }

    /// The file at absolute `path` in the image's filesystem.
    pub fn file(&self, path: &str) -> Option<&LayerFile> {
        self.files.get(member_path(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header for `path`, written as is (`tar::Header::set_path` drops a leading `./`).
    fn header(path: &str, kind: tar::EntryType, mode: u32, size: usize) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(65532);
        h.set_gid(65533);
        h.set_size(size as u64);
        h.set_cksum();
        h
    }

    fn tar(members: &[(&str, tar::EntryType, u32, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, mode, data) in members {
            b.append(&header(path, *kind, *mode, data.len()), *data)
                .unwrap();
        }
        b.into_inner().unwrap()
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// An OCI archive of one manifest whose layers are `layers` (media type, bytes); the
    /// digests are made up (nothing here checks them).
    fn archive(layers: &[(&str, Vec<u8>)]) -> Vec<u8> {
        use serde_json::json;
        let blob = |n: usize| format!("blobs/sha256/{n:064x}");
        let digest = |n: usize| format!("sha256:{n:064x}");
        let config = json!({ "config": { "User": "65532:65532", "Entrypoint": ["/app"] } });
        let manifest = json!({
            "config": { "digest": digest(1) },
            "layers": layers.iter().enumerate()
                .map(|(i, (media, _))| json!({ "mediaType": media, "digest": digest(i + 2) }))
                .collect::<Vec<_>>(),
        });
        let index = json!({ "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest(0),
        }] });
        let mut members = vec![
            ("./index.json".to_owned(), index.to_string().into_bytes()),
            (format!("./{}", blob(0)), manifest.to_string().into_bytes()),
            (format!("./{}", blob(1)), config.to_string().into_bytes()),
        ];
        for (i, (_, bytes)) in layers.iter().enumerate() {
            members.push((format!("./{}", blob(i + 2)), bytes.clone()));
        }
        let members: Vec<_> = members
            .iter()
            .map(|(p, d)| (p.as_str(), tar::EntryType::Regular, 0o644, d.as_slice()))
            .collect();
        tar(&members)
    }

    #[test]
    fn an_archive_is_read_with_a_later_layer_replacing_a_file() {
        use tar::EntryType::{Directory, Regular, Symlink};
        let first = tar(&[
            ("./", Directory, 0o755, b""),
            ("./app", Regular, 0o755, b"old"),
            ("./etc/", Directory, 0o750, b""),
            ("/etc/link", Symlink, 0o777, b""),
        ]);
        let second = tar(&[("app", Regular, 0o4555, b"new")]);
        let image = OciImage::from_archive(&archive(&[
            ("application/vnd.oci.image.layer.v1.tar+gzip", gzip(&first)),
            ("application/vnd.oci.image.layer.v1.tar", second),
        ]))
        .unwrap();
        assert_eq!(image.config.user.as_deref(), Some("65532:65532"));
        assert_eq!(image.config.entrypoint, Some(vec!["/app".to_owned()]));
        let app = image.file("/app").unwrap();
        assert_eq!(app.kind, FileType::Regular);
        assert_eq!((app.mode, app.uid, app.gid), (0o4555, 65532, 65533));
        assert_eq!(app.data, b"new");
        let etc = image.file("/etc").unwrap();
        assert_eq!((etc.kind, etc.mode), (FileType::Directory, 0o750));
        assert_eq!(image.file("/etc/link").unwrap().kind, FileType::Symlink);
        assert!(image.file("/missing").is_none());
    }

    #[test]
    fn a_bad_layer_is_an_error_naming_it() {
        let layers = [(
            "application/vnd.oci.image.layer.v1.tar+gzip",
            b"not gzip".to_vec(),
        )];
        let e = format!(
            "{:#}",
            OciImage::from_archive(&archive(&layers)).unwrap_err()
        );
        assert!(
            e.starts_with(&format!("reading the layer sha256:{:064x}", 2)),
            "{e}"
        );
        let layers = [("application/vnd.oci.image.layer.v1.tar+zstd", Vec::new())];
        let e = format!(
            "{:#}",
            OciImage::from_archive(&archive(&layers)).unwrap_err()
        );
        assert!(e.contains("tar+zstd"), "{e}");
    }
}

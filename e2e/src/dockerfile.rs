//! The repository's `Dockerfile`, read as far as keybroker's images use it, so that the images
//! `e2e/tools/keybroker-images.sh` writes with crane can be held to the release images.
//!
//! Only what a final stage of ours holds is read: `FROM`, one `COPY` of the binary, `USER`,
//! `ENTRYPOINT`, `CMD`, `ENV`, `WORKDIR`, `EXPOSE`. Anything else in such a stage is an error
//! rather than ignored, since the script would not do it either.

use std::collections::BTreeSet;

use anyhow::{Context, bail, ensure};

use crate::images::{FileType, OciImage};

/// The base `keybroker-images.sh` imitates (`base_files`: CA certificates, /etc/passwd with
/// nonroot 65532) instead of pulling it.
pub const SCRIPT_BASE: &str = "gcr.io/distroless/static-debian12:nonroot";

/// What one stage declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    pub name: String,
    pub base: String,
    pub copy: CopyFile,
    pub user: String,
    pub entrypoint: Vec<String>,
    pub cmd: Option<Vec<String>>,
    /// `ENV KEY=VALUE`, in order.
    pub env: Vec<(String, String)>,
    pub workdir: Option<String>,
    /// `EXPOSE` ports as the image config keys them (`8443/tcp`).
    pub expose: BTreeSet<String>,
}

/// The stage's one `COPY`: a file to an absolute path, with its mode and owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyFile {
    pub from: Option<String>,
    pub src: String,
    pub dest: String,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// Logical lines (continuations joined, comments dropped) with the line each starts on.
fn instructions(text: &str) -> anyhow::Result<Vec<(usize, String)>> {
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_none()) {
            continue;
        }
        let (start, mut joined) = current.take().unwrap_or((i + 1, String::new()));
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                joined.push_str(part);
                joined.push(' ');
                current = Some((start, joined));
            }
            None => {
                joined.push_str(trimmed);
                out.push((start, joined));
            }
        }
    }
    if let Some((start, _)) = current {
        bail!("line {start}: the continuation runs past the end of the file");
    }
    Ok(out)
}

fn exec_form(line: usize, keyword: &str, rest: &str) -> anyhow::Result<Vec<String>> {
    ensure!(
        rest.starts_with('['),
        "line {line}: {keyword} in shell form (the images have no shell): {rest}"
    );
    serde_json::from_str(rest)
        .with_context(|| format!("line {line}: {keyword} is not a JSON array of strings: {rest}"))
}

fn parse_copy(line: usize, rest: &str) -> anyhow::Result<CopyFile> {
    ensure!(
        !rest.starts_with('['),
        "line {line}: COPY in JSON form is not read here: {rest}"
    );
    let (mut from, mut mode, mut owner) = (None, None, (0, 0));
    let mut operands = Vec::new();
    for word in rest.split_whitespace() {
        let Some(flag) = word.strip_prefix("--") else {
            operands.push(word.to_owned());
            continue;
        };
        ensure!(
            operands.is_empty(),
            "line {line}: COPY flag {word} after the sources"
        );
        let (key, value) = flag
            .split_once('=')
            .with_context(|| format!("line {line}: COPY flag {word} has no value"))?;
        match key {
            "from" => from = Some(value.to_owned()),
            "chmod" => {
                let m = u32::from_str_radix(value, 8)
                    .ok()
                    .filter(|m| *m <= 0o7777)
                    .with_context(|| format!("line {line}: --chmod={value} is not octal"))?;
                mode = Some(m);
            }
            "chown" => {
                owner = value
                    .split_once(':')
                    .and_then(|(u, g)| Some((u.parse().ok()?, g.parse().ok()?)))
                    .with_context(|| {
                        format!("line {line}: --chown={value} is not numeric UID:GID")
                    })?;
            }
            _ => bail!("line {line}: COPY flag --{key} is not read here"),
        }
    }
    let [src, dest] = <[String; 2]>::try_from(operands)
        .map_err(|o| anyhow::anyhow!("line {line}: COPY of one file expected, got {o:?}"))?;
    ensure!(
        dest.starts_with('/') && !dest.ends_with('/'),
        "line {line}: COPY destination {dest} is not an absolute file path"
    );
    let mode = mode.with_context(|| {
        format!("line {line}: COPY without --chmod (the mode would be the build's; give it)")
    })?;
    Ok(CopyFile {
        from,
        src,
        dest,
        mode,
        uid: owner.0,
        gid: owner.1,
    })
}

fn set_once<T>(slot: &mut Option<T>, value: T, line: usize, keyword: &str) -> anyhow::Result<()> {
    ensure!(
        slot.is_none(),
        "line {line}: a second {keyword} in the stage"
    );
    *slot = Some(value);
    Ok(())
}

/// Reads stage `name` of `dockerfile`; fails on anything in it this module does not read.
pub fn stage(dockerfile: &str, name: &str) -> anyhow::Result<Stage> {
    let mut found: Option<(usize, String)> = None;
    let mut inside = false;
    let (mut copy, mut user, mut entrypoint, mut cmd, mut workdir) = (None, None, None, None, None);
    let mut env = Vec::new();
    let mut expose = BTreeSet::new();
    for (line, text) in instructions(dockerfile)? {
        let (keyword, rest) = text.split_once(char::is_whitespace).unwrap_or((&text, ""));
        let (keyword, rest) = (keyword.to_ascii_uppercase(), rest.trim());
        if keyword == "FROM" {
            let words: Vec<&str> = rest.split_whitespace().collect();
            let stage_name = match words.as_slice() {
                [.., _, as_, n] if as_.eq_ignore_ascii_case("as") => Some(*n),
                _ => None,
            };
            inside = stage_name.is_some_and(|n| n.eq_ignore_ascii_case(name));
            if inside {
                ensure!(found.is_none(), "line {line}: a second stage named {name}");
                let [base, _, _] = words.as_slice() else {
                    bail!("line {line}: FROM flags are not read here: {rest}");
                };
                found = Some((line, (*base).to_owned()));
            }
            continue;
        }
        if !inside {
            continue;
        }
        match keyword.as_str() {
            "COPY" => set_once(&mut copy, parse_copy(line, rest)?, line, "COPY")?,
            "USER" => {
                ensure!(
                    !rest.is_empty() && !rest.contains(char::is_whitespace),
                    "line {line}: USER {rest}"
                );
                set_once(&mut user, rest.to_owned(), line, "USER")?;
            }
            "ENTRYPOINT" => set_once(
                &mut entrypoint,
                exec_form(line, "ENTRYPOINT", rest)?,
                line,
                "ENTRYPOINT",
            )?,
            "CMD" => set_once(&mut cmd, exec_form(line, "CMD", rest)?, line, "CMD")?,
            "WORKDIR" => {
                ensure!(
                    rest.starts_with('/') && !rest.contains(char::is_whitespace),
                    "line {line}: WORKDIR {rest} is not one absolute path"
                );
                set_once(&mut workdir, rest.to_owned(), line, "WORKDIR")?;
            }
            "ENV" => {
                let (k, v) = rest
                    .split_once('=')
                    .filter(|(k, v)| {
                        !k.is_empty()
                            && !k.contains(char::is_whitespace)
                            && !v.contains(char::is_whitespace)
                            && !v.contains(['"', '\'', '$'])
                    })
                    .with_context(|| {
                        format!("line {line}: ENV other than one unquoted KEY=VALUE: {rest}")
                    })?;
                env.push((k.to_owned(), v.to_owned()));
            }
            "EXPOSE" => {
                for port in rest.split_whitespace() {
                    let (number, proto) = port.split_once('/').unwrap_or((port, "tcp"));
                    ensure!(
                        number.parse::<u16>().is_ok() && matches!(proto, "tcp" | "udp"),
                        "line {line}: EXPOSE {port}"
                    );
                    expose.insert(format!("{number}/{proto}"));
                }
            }
            other => bail!("line {line}: {other} in stage {name} is not read here: {text}"),
        }
    }
    let (line, base) = found.with_context(|| format!("the Dockerfile has no stage {name}"))?;
    let missing = |what: &str| format!("stage {name} (line {line}) has no {what}");
    Ok(Stage {
        name: name.to_owned(),
        base,
        copy: copy.with_context(|| missing("COPY"))?,
        user: user.with_context(|| missing("USER"))?,
        entrypoint: entrypoint.with_context(|| missing("ENTRYPOINT"))?,
        cmd,
        env,
        workdir,
        expose,
    })
}

fn differ(out: &mut Vec<String>, what: &str, declared: String, built: String) {
    if declared != built {
        out.push(format!(
            "{what}: the Dockerfile says {declared}, the image has {built}"
        ));
    }
}

impl Stage {
    /// Where `image` (an archive `keybroker-images.sh` wrote from `dist/<binary>`, whose bytes
    /// are `bytes`) differs from this stage: empty when they agree. The stage's base adds config
    /// of its own (distroless: PATH, SSL_CERT_FILE, WorkingDir /home/nonroot) that only the
    /// [`SCRIPT_BASE`] check stands for.
    pub fn differences(&self, image: &OciImage, binary: &str, bytes: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        let c = &image.config;
        let d = &mut out;
        differ(d, "base", self.base.clone(), SCRIPT_BASE.into());
        differ(
            d,
            "User",
            format!("{:?}", Some(&self.user)),
            format!("{:?}", c.user),
        );
        differ(
            d,
            "Entrypoint",
            format!("{:?}", Some(&self.entrypoint)),
            format!("{:?}", c.entrypoint),
        );
        differ(d, "Cmd", format!("{:?}", self.cmd), format!("{:?}", c.cmd));
        if let Some(dir) = &self.workdir {
            differ(
                d,
                "WorkingDir",
                format!("{:?}", Some(dir)),
                format!("{:?}", c.working_dir),
            );
        }
        for (k, v) in &self.env {
            let built = c
                .env
                .iter()
                .flatten()
                .find(|e| e.split_once('=').is_some_and(|(key, _)| key == k));
            differ(
                d,
                &format!("Env {k}"),
                format!("{:?}", Some(format!("{k}={v}"))),
                format!("{built:?}"),
            );
        }
        let ports: BTreeSet<&String> = c.exposed_ports.iter().flat_map(|p| p.keys()).collect();
        differ(
            d,
            "ExposedPorts",
            format!("{:?}", self.expose),
            format!("{ports:?}"),
        );

        let copy = &self.copy;
        let file = format!("COPY {} {}", copy.src, copy.dest);
        if copy.src != format!("dist/{binary}") && !copy.src.ends_with(&format!("/dist/{binary}")) {
            d.push(format!("{file}: the script installs dist/{binary}"));
        }
        match image.file(&copy.dest) {
            None => d.push(format!(
                "{file}: {} is not in the image's layers",
                copy.dest
            )),
            Some(f) => {
                differ(
                    d,
                    &format!("{file}: type"),
                    format!("{:?}", FileType::Regular),
                    format!("{:?}", f.kind),
                );
                differ(
                    d,
                    &format!("{file}: mode"),
                    format!("{:04o}", copy.mode),
                    format!("{:04o}", f.mode),
                );
                differ(
                    d,
                    &format!("{file}: owner"),
                    format!("{}:{}", copy.uid, copy.gid),
                    format!("{}:{}", f.uid, f.gid),
                );
                if f.data != bytes {
                    d.push(format!(
                        "{file}: the image's file ({} bytes) is not dist/{binary} ({} bytes)",
                        f.data.len(),
                        bytes.len()
                    ));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::{ImageConfig, LayerFile};

    const DOCKERFILE: &str = include_str!("../../Dockerfile");

    fn built(user: &str, entrypoint: &str, mode: u32) -> OciImage {
        let config: ImageConfig = serde_json::from_value(serde_json::json!({
            "Entrypoint": [entrypoint], "User": user,
        }))
        .unwrap();
        let file = LayerFile {
            kind: FileType::Regular,
            mode,
            uid: 0,
            gid: 0,
            data: b"binary".to_vec(),
        };
        OciImage::from_parts(
            config,
            [(entrypoint.trim_start_matches('/').to_owned(), file)],
        )
    }

    #[test]
    fn the_repository_dockerfile_is_read() {
        for name in ["operator", "sidecar"] {
            let s = stage(DOCKERFILE, name).unwrap();
            let bin = format!("/keybroker-{name}");
            assert_eq!(s.base, SCRIPT_BASE);
            assert_eq!(s.entrypoint, std::slice::from_ref(&bin));
            assert_eq!(s.copy.dest, bin);
            assert!(
                s.differences(&built(&s.user, &bin, s.copy.mode), &bin[1..], b"binary")
                    .is_empty()
            );
        }
    }

    #[test]
    fn a_changed_user_entrypoint_mode_or_base_is_a_difference() {
        let s = stage(DOCKERFILE, "operator").unwrap();
        let image = built(&s.user, "/keybroker-operator", s.copy.mode);
        let changed = |from: &str, to: &str| {
            assert!(DOCKERFILE.contains(from), "{from}");
            let edited = DOCKERFILE.replacen(from, to, 1);
            stage(&edited, "operator")
                .unwrap()
                .differences(&image, "keybroker-operator", b"binary")
        };
        let d = changed("USER 65532:65532", "USER 0");
        assert!(d.len() == 1 && d[0].starts_with("User:"), "{d:?}");
        let d = changed(
            "ENTRYPOINT [\"/keybroker-operator\"]",
            "ENTRYPOINT [\"/bin/keybroker-operator\"]",
        );
        assert!(d.iter().any(|d| d.starts_with("Entrypoint:")), "{d:?}");
        let d = changed("--chmod=0555", "--chmod=0755");
        assert!(d.len() == 1 && d[0].contains("mode"), "{d:?}");
        let d = changed(
            "static-debian12:nonroot AS operator",
            "static-debian12:latest AS operator",
        );
        assert!(d.len() == 1 && d[0].starts_with("base:"), "{d:?}");
        let d = changed(
            "USER 65532:65532",
            "USER 65532:65532\nEXPOSE 8443\nENV A=b\nWORKDIR /w",
        );
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(
            stage(DOCKERFILE, "operator")
                .unwrap()
                .differences(&image, "keybroker-operator", b"other")
                .len()
                == 1
        );
    }

    #[test]
    fn what_is_not_read_is_an_error() {
        let err = |edited: String| stage(&edited, "operator").unwrap_err().to_string();
        let e = err(DOCKERFILE.replacen("USER 65532:65532", "USER 65532:65532\nRUN true", 1));
        assert!(e.contains("RUN in stage operator"), "{e}");
        let e = err(DOCKERFILE.replacen(
            "ENTRYPOINT [\"/keybroker-operator\"]",
            "ENTRYPOINT /keybroker-operator",
            1,
        ));
        assert!(e.contains("shell form"), "{e}");
        let e = err(DOCKERFILE.replacen("--chmod=0555 ", "", 1));
        assert!(e.contains("without --chmod"), "{e}");
        let e = err(DOCKERFILE.replacen("USER 65532:65532", "USER 65532:65532\nUSER 0", 1));
        assert!(e.contains("second USER"), "{e}");
        let e = err(DOCKERFILE.replacen("AS operator", "AS op", 1));
        assert!(e.contains("no stage operator"), "{e}");
    }
}

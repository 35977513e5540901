//! MinIO as the real STS and S3: starts it, and provisions users whose keys sign STS calls.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

use rand::distr::{Alphanumeric, SampleString};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing policy file {path}: {source}")]
    PolicyFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("running {program}: {source}")]
    Run {
        program: PathBuf,
        source: std::io::Error,
    },
    #[error("creating MinIO user {user} failed: {stderr}")]
    CreateUser { user: String, stderr: String },
}

/// An access key pair. `Debug` never shows the secret.
#[derive(Clone)]
pub struct Keys {
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl Keys {
    /// A fresh random key pair (20-character id, 40-character secret, as AWS issues them).
    pub fn generate(prefix: &str) -> Self {
        let mut rng = rand::rng();
        let id_len = 20usize.saturating_sub(prefix.len()).max(4);
        Self {
            access_key_id: format!(
                "{prefix}{}",
                Alphanumeric.sample_string(&mut rng, id_len).to_uppercase()
            ),
            secret_access_key: Alphanumeric.sample_string(&mut rng, 40),
        }
    }
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keys")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .finish()
    }
}

/// A running MinIO server reached over plain HTTP on loopback.
#[derive(Clone, Debug)]
pub struct Minio {
    /// `http://127.0.0.1:<port>`, or with a node `https://<node address>:<port>`: the S3 and
    /// STS endpoint.
    pub endpoint: String,
    /// The CA MinIO's TLS certificate chains to, when it serves TLS.
    pub ca: Option<PathBuf>,
    /// The root user's keys (admin API and bucket setup only; never the broker's identity).
    pub root: Keys,
    pub(crate) iam_helper: PathBuf,
    pub(crate) dir: PathBuf,
}

impl Minio {
    /// The directory MinIO serves from and the arguments that start it there.
    pub(crate) fn server_args(dir: &Path, host: &str, port: u16, console_port: u16) -> Vec<String> {
        vec![
            "server".into(),
            dir.join("data").display().to_string(),
            "--address".into(),
            format!("{host}:{port}"),
            "--console-address".into(),
            format!("{host}:{console_port}"),
            "--certs-dir".into(),
            dir.join("certs").display().to_string(),
            "--quiet".into(),
        ]
    }

    /// An S3 client with the root user's keys (bucket setup), trusting MinIO's CA.
    pub fn root_client(&self) -> aws_sdk_s3::Client {
        crate::fixtures::s3_client_trusting(
            &self.endpoint,
            &self.root.access_key_id,
            &self.root.secret_access_key,
            None,
            self.ca.as_deref(),
        )
    }

    /// The CA's PEM, for a KeyProvider's `spec.aws.caBundle` and apps' `AWS_CA_BUNDLE`.
    pub fn ca_pem(&self) -> Option<String> {
        std::fs::read_to_string(self.ca.as_ref()?).ok()
    }

    /// Creates user `name` with full S3 rights, as the broker's identity is set up: the
    /// session policy the broker attaches is then the only narrowing.
    pub fn create_s3_user(&self, name: &str) -> Result<Keys, Error> {
        self.create_user(
            name,
            &serde_json::json!({
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": ["s3:*"], "Resource": ["arn:aws:s3:::*"]}]
            }),
        )
    }

    /// Creates user `name` with a fresh key pair and attaches the IAM `policy` to it.
    pub fn create_user(&self, name: &str, policy: &serde_json::Value) -> Result<Keys, Error> {
        let keys = Keys {
            access_key_id: name.to_owned(),
            secret_access_key: Keys::generate("").secret_access_key,
        };
        let policy_file = self.dir.join(format!("policy-{name}.json"));
        std::fs::write(&policy_file, policy.to_string()).map_err(|source| Error::PolicyFile {
            path: policy_file.clone(),
            source,
        })?;
        let host = self
            .endpoint
            .trim_start_matches("http://")
            .trim_start_matches("https://");
        let mut command = Command::new(&self.iam_helper);
        if let Some(ca) = &self.ca {
            command.arg("-ca").arg(ca);
        }
        let out = command
            .args(["-endpoint", host, "-user", name, "-policy-name"])
            .arg(format!("{name}-policy"))
            .arg("-policy-file")
            .arg(&policy_file)
            .env("MINIO_ROOT_USER", &self.root.access_key_id)
            .env("MINIO_ROOT_PASSWORD", &self.root.secret_access_key)
            .env("IAM_USER_SECRET", &keys.secret_access_key)
            .env("NO_PROXY", "127.0.0.1,localhost")
            .output()
            .map_err(|source| Error::Run {
                program: self.iam_helper.clone(),
                source,
            })?;
        if !out.status.success() {
            return Err(Error::CreateUser {
                user: name.to_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_have_aws_shapes_and_debug_hides_the_secret() {
        let keys = Keys::generate("ROOT");
        assert_eq!(keys.access_key_id.len(), 20);
        assert!(keys.access_key_id.starts_with("ROOT"));
        assert_eq!(keys.secret_access_key.len(), 40);
        let shown = format!("{keys:?}");
        assert!(shown.contains(&keys.access_key_id));
        assert!(!shown.contains(&keys.secret_access_key), "{shown}");
        assert_ne!(
            Keys::generate("ROOT").secret_access_key,
            keys.secret_access_key
        );
    }
}

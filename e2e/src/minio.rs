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

/// A MinIO of its own that trusts an OpenID provider's tokens for `AssumeRoleWithWebIdentity`:
/// a token whose `aud` (or `azp`) is its client id buys the rights of one MinIO policy (the
/// role policy). It checks tokens offline (signature, expiry, audience), as resource servers
/// that only check signatures do.
#[derive(Debug)]
pub struct OpenIdMinio {
    /// `http://127.0.0.1:<port>`: S3 and STS.
    pub endpoint: String,
    pub root: Keys,
    /// The role's ARN, as MinIO derives it from the client id.
    pub role_arn: String,
    _server: crate::process::Component,
}

/// The region the OpenID MinIO runs in (part of its role ARN).
const OPENID_REGION: &str = "us-east-1";

impl OpenIdMinio {
    /// Starts MinIO in `dir` trusting tokens of `issuer` addressed to `client_id`, granting
    /// MinIO policy `role_policy` (a built-in one such as `readonly`, or one created first).
    pub async fn start(
        dir: &Path,
        issuer: &str,
        client_id: &str,
        role_policy: &str,
    ) -> anyhow::Result<Self> {
        use anyhow::Context;
        let tools = crate::tools::Tools::locate()?;
        let dir = dir.join("minio-openid");
        std::fs::create_dir_all(dir.join("certs"))
            .with_context(|| format!("creating {}", dir.display()))?;
        let root = Keys::generate("ROOT");
        let [port, console_port] = crate::cluster::free_ports()?;
        let config_url = format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        );
        let client_secret = Keys::generate("").secret_access_key;
        let env = [
            ("MINIO_ROOT_USER", root.access_key_id.as_str()),
            ("MINIO_ROOT_PASSWORD", root.secret_access_key.as_str()),
            ("MINIO_BROWSER", "off"),
            ("MINIO_UPDATE", "off"),
            ("MINIO_SITE_REGION", OPENID_REGION),
            ("MINIO_IDENTITY_OPENID_CONFIG_URL", config_url.as_str()),
            ("MINIO_IDENTITY_OPENID_CLIENT_ID", client_id),
            (
                "MINIO_IDENTITY_OPENID_CLIENT_SECRET",
                client_secret.as_str(),
            ),
            ("MINIO_IDENTITY_OPENID_ROLE_POLICY", role_policy),
            ("NO_PROXY", "127.0.0.1,localhost"),
        ];
        let args = Minio::server_args(&dir, "127.0.0.1", port, console_port);
        let mut server = crate::process::Component::spawn(
            "minio-openid",
            &tools.minio,
            &args,
            &env,
            &dir.join("minio.log"),
            crate::process::Lifetime::TiedToProcess,
        )?;
        let endpoint = format!("http://127.0.0.1:{port}");
        let http =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Empty<hyper::body::Bytes>>();
        let health = format!("{endpoint}/minio/health/ready");
        server
            .wait_ready(
                "GET /minio/health/ready",
                std::time::Duration::from_secs(60),
                || crate::cluster::http_ok(&http, &health, None),
            )
            .await?;
        // MinIO names the role after the client id (sha1, base64url), so it is known before.
        let id = base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            aws_lc_rs::digest::digest(
                &aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY,
                client_id.as_bytes(),
            ),
        );
        Ok(Self {
            endpoint,
            root,
            role_arn: format!("arn:minio:iam:{OPENID_REGION}::role/{id}"),
            _server: server,
        })
    }

    /// An S3 client with the root user's keys (bucket setup).
    pub fn root_client(&self) -> aws_sdk_s3::Client {
        crate::fixtures::s3_client(
            &self.endpoint,
            &self.root.access_key_id,
            &self.root.secret_access_key,
            None,
        )
    }

    /// `AssumeRoleWithWebIdentity` with `token`: an S3 client with the credentials it bought,
    /// or MinIO's refusal (code and message).
    pub async fn s3_for_token(&self, token: &str) -> Result<aws_sdk_s3::Client, String> {
        let sts = aws_sdk_sts::Client::from_conf(
            aws_sdk_sts::Config::builder()
                .behavior_version(aws_sdk_sts::config::BehaviorVersion::latest())
                .region(aws_sdk_sts::config::Region::new(OPENID_REGION))
                .endpoint_url(&self.endpoint)
                .build(),
        );
        let answer = sts
            .assume_role_with_web_identity()
            .role_arn(&self.role_arn)
            .role_session_name("e2e")
            .web_identity_token(token)
            .send()
            .await
            .map_err(|e| {
                let e = e.into_service_error();
                format!(
                    "{}: {}",
                    aws_sdk_sts::error::ProvideErrorMetadata::code(&e).unwrap_or("no code"),
                    aws_sdk_sts::error::ProvideErrorMetadata::message(&e).unwrap_or("")
                )
            })?;
        let creds = answer
            .credentials
            .ok_or_else(|| "no credentials in the answer".to_owned())?;
        Ok(crate::fixtures::s3_client(
            &self.endpoint,
            &creds.access_key_id,
            &creds.secret_access_key,
            Some(&creds.session_token),
        ))
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

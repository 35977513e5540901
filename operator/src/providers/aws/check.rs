//! KeyProvider `Ready`: proves the STS endpoint answers and accepts the broker's own identity,
//! with a real call (GetCallerIdentity; for STS services without it, such as MinIO, an
//! AssumeRole of the provider's role under a deny-all session policy).

use std::time::Duration;

use aws_sdk_sts::config::{BehaviorVersion, Credentials, Region, SharedCredentialsProvider};
use aws_sdk_sts::error::ProvideErrorMetadata;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;

use crate::crd::AwsProvider;

/// Every STS call of the check must finish within this.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The session policy of the fallback AssumeRole: the credentials it yields can do nothing.
const DENY_ALL: &str =
    r#"{"Version":"2012-10-17","Statement":[{"Effect":"Deny","Action":["*"],"Resource":["*"]}]}"#;

/// Why a provider is not usable. Messages never contain key material.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("credentials Secret {namespace}/{name}: {detail}")]
    CredentialsSecret {
        namespace: String,
        name: String,
        detail: String,
    },
    #[error("STS rejected the broker's credentials ({code}): {message}")]
    CredentialsRejected { code: String, message: String },
    #[error("STS at {endpoint} did not answer: {detail}")]
    Unreachable { endpoint: String, detail: String },
    #[error("spec.aws.caBundle: {detail}")]
    CaBundle { detail: String },
}

impl Problem {
    /// What the KeyProvider's status says: the problem and what to check, without the
    /// provider's or apiserver's own text (it can name the broker's principal and role; the
    /// operator logs it).
    pub fn summary(&self) -> String {
        match self {
            Problem::CredentialsSecret {
                namespace,
                name,
                detail,
            } if !detail.starts_with("cannot be read") => {
                format!("credentials Secret {namespace}/{name}: {detail}")
            }
            Problem::CredentialsSecret {
                namespace, name, ..
            } => format!(
                "credentials Secret {namespace}/{name} cannot be read by the operator; its log has the apiserver's answer"
            ),
            Problem::CredentialsRejected { code, .. } => format!(
                "STS rejected the broker's credentials ({code}); check the credentials and the role's trust policy (the operator's log has STS's answer)"
            ),
            Problem::Unreachable { endpoint, .. } => format!(
                "STS at {endpoint} did not answer; check the endpoint and the network path (the operator's log has the error)"
            ),
            Problem::CaBundle { detail } => format!("spec.aws.caBundle: {detail}"),
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            Problem::CredentialsSecret { .. } => "CredentialsSecretInvalid",
            Problem::CredentialsRejected { .. } => "CredentialsRejected",
            Problem::Unreachable { .. } => "ProviderUnreachable",
            Problem::CaBundle { .. } => "CABundleInvalid",
        }
    }
}

/// Builds the STS client the broker uses for `aws`: its endpoint and region, and the broker's
/// own credentials (see [`broker_credentials`]).
pub async fn sts_client(
    kube: &kube::Client,
    aws: &AwsProvider,
) -> Result<aws_sdk_sts::Client, Problem> {
    let credentials = broker_credentials(kube, aws).await?;
    sts_client_with(aws, credentials)
}

/// [`sts_client`] with credentials already loaded.
pub fn sts_client_with(
    aws: &AwsProvider,
    credentials: SharedCredentialsProvider,
) -> Result<aws_sdk_sts::Client, Problem> {
    let mut config = aws_sdk_sts::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(aws.region.clone()))
        .credentials_provider(credentials);
    if let Some(endpoint) = &aws.endpoint {
        config = config.endpoint_url(endpoint);
    }
    if let Some(bundle) = &aws.ca_bundle {
        use aws_smithy_http_client::tls;
        ca_certificates(bundle)?;
        let trust = tls::TrustStore::empty()
            .with_native_roots(false)
            .with_pem_certificate(bundle.as_bytes());
        let context = tls::TlsContext::builder()
            .with_trust_store(trust)
            .build()
            .map_err(|e| Problem::CaBundle {
                detail: format!("not usable as a trust store: {e}"),
            })?;
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::AwsLc,
            ))
            .tls_context(context)
            .build_https();
        config = config.http_client(http);
    }
    Ok(aws_sdk_sts::Client::from_conf(config.build()))
}

/// The certificates of a `caBundle`: at least one, every PEM block a well-formed certificate.
pub fn ca_certificates(
    bundle: &str,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, Problem> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let certificates = CertificateDer::pem_slice_iter(bundle.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Problem::CaBundle {
            detail: format!("not PEM certificates ({e}); paste the CA's PEM, -----BEGIN CERTIFICATE----- included"),
        })?;
    let mut roots = rustls::RootCertStore::empty();
    let (_, unusable) = roots.add_parsable_certificates(certificates.iter().cloned());
    if certificates.is_empty() || unusable > 0 {
        return Err(Problem::CaBundle {
            detail: format!(
                "{} certificate(s), {unusable} of them not parsable as X.509; paste the CA's PEM, -----BEGIN CERTIFICATE----- included",
                certificates.len()
            ),
        });
    }
    Ok(certificates)
}

/// The broker's own credentials for `aws`: from `credentialsSecretRef`, else the default AWS
/// chain (the broker's workload identity).
pub async fn broker_credentials(
    kube: &kube::Client,
    aws: &AwsProvider,
) -> Result<SharedCredentialsProvider, Problem> {
    match &aws.credentials_secret_ref {
        Some(reference) => {
            let problem = |detail: String| Problem::CredentialsSecret {
                namespace: reference.namespace.clone(),
                name: reference.name.clone(),
                detail,
            };
            let secret = Api::<Secret>::namespaced(kube.clone(), &reference.namespace)
                .get_opt(&reference.name)
                .await
                .map_err(|e| problem(format!("cannot be read: {e}")))?
                .ok_or_else(|| problem("does not exist".into()))?;
            let data = secret.data.unwrap_or_default();
            let field = |key: &str| {
                data.get(key)
                    .and_then(|v| String::from_utf8(v.0.clone()).ok())
                    .filter(|v| !v.is_empty())
            };
            let (Some(id), Some(secret_key)) =
                (field("AWS_ACCESS_KEY_ID"), field("AWS_SECRET_ACCESS_KEY"))
            else {
                return Err(problem(
                    "needs non-empty keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY".into(),
                ));
            };
            Ok(SharedCredentialsProvider::new(Credentials::new(
                id,
                secret_key,
                field("AWS_SESSION_TOKEN"),
                None,
                "keybroker-credentials-secret",
            )))
        }
        None => aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(aws.region.clone()))
            .load()
            .await
            .credentials_provider()
            .ok_or_else(|| Problem::CredentialsRejected {
                code: "NoCredentials".into(),
                message: "the default AWS credential chain found no credentials".into(),
            }),
    }
}

/// Verifies the provider; `Ok` says what was verified (never the broker's own principal).
pub async fn verify(kube: &kube::Client, aws: &AwsProvider) -> Result<String, Problem> {
    let sts = sts_client(kube, aws).await?;
    let endpoint = aws
        .endpoint
        .clone()
        .unwrap_or_else(|| format!("sts.{}.amazonaws.com", aws.region));
    let unreachable = |detail: String| Problem::Unreachable {
        endpoint: endpoint.clone(),
        detail,
    };
    let identity = tokio::time::timeout(CALL_TIMEOUT, sts.get_caller_identity().send())
        .await
        .map_err(|_| unreachable(format!("no answer within {CALL_TIMEOUT:?}")))?;
    let unsupported = match identity {
        Ok(out) => {
            // The broker's own principal is for the operator's log, not the status.
            tracing::debug!(
                identity = out.arn().unwrap_or("(no ARN)"),
                "STS accepted the broker's identity"
            );
            return Ok("STS accepted the broker's identity".into());
        }
        Err(e) => match classify(&e) {
            Classified::Unsupported => true,
            Classified::Rejected(code, message) => {
                return Err(Problem::CredentialsRejected { code, message });
            }
            Classified::Unreachable(detail) => return Err(unreachable(detail)),
        },
    };
    debug_assert!(unsupported);
    let assumed = tokio::time::timeout(
        CALL_TIMEOUT,
        sts.assume_role()
            .role_arn(&aws.role_arn)
            .role_session_name("keybroker-provider-check")
            .policy(DENY_ALL)
            .duration_seconds(900)
            .send(),
    )
    .await
    .map_err(|_| unreachable(format!("no answer within {CALL_TIMEOUT:?}")))?;
    match assumed {
        Ok(_) => Ok(format!(
            "STS let the broker assume {} (checked with a deny-all session policy)",
            aws.role_arn
        )),
        Err(e) => match classify(&e) {
            Classified::Rejected(code, message) => {
                Err(Problem::CredentialsRejected { code, message })
            }
            Classified::Unsupported => Err(Problem::CredentialsRejected {
                code: "Unsupported".into(),
                message: "the endpoint supports neither GetCallerIdentity nor AssumeRole".into(),
            }),
            Classified::Unreachable(detail) => Err(unreachable(detail)),
        },
    }
}

enum Classified {
    /// The endpoint does not implement the call.
    Unsupported,
    Rejected(String, String),
    Unreachable(String),
}

fn classify<E, R>(error: &aws_sdk_sts::error::SdkError<E, R>) -> Classified
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + 'static,
{
    use aws_sdk_sts::error::SdkError;
    match error {
        SdkError::ServiceError(service) => {
            let err = service.err();
            let code = err.code().unwrap_or("Unknown").to_owned();
            let message = err.message().unwrap_or("").to_owned();
            // MinIO answers InvalidParameterValue "Unsupported action GetCallerIdentity".
            let unsupported = matches!(
                code.as_str(),
                "InvalidAction" | "NotImplemented" | "UnknownOperation" | "UnsupportedOperation"
            ) || message.starts_with("Unsupported action");
            if unsupported {
                Classified::Unsupported
            } else {
                Classified::Rejected(code, message)
            }
        }
        other => {
            Classified::Unreachable(innermost_cause(other).unwrap_or_else(|| other.to_string()))
        }
    }
}

/// The innermost cause of a transport error (the outer ones just say "dispatch failure").
fn innermost_cause(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut source = error.source()?;
    while let Some(next) = source.source() {
        source = next;
    }
    Some(source.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca_pem() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().pem()
    }

    #[test]
    fn a_ca_bundle_must_hold_parsable_certificates_and_says_what_to_paste() {
        let one = ca_pem();
        assert_eq!(ca_certificates(&one).unwrap().len(), 1);
        assert_eq!(
            ca_certificates(&format!("{one}\n{}", ca_pem()))
                .unwrap()
                .len(),
            2
        );
        for bad in [
            String::new(),
            "not a certificate".to_owned(),
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".to_owned(),
            one.replace("-----END CERTIFICATE-----", ""),
        ] {
            let problem = ca_certificates(&bad).unwrap_err();
            assert_eq!(problem.reason(), "CABundleInvalid", "{bad:?}");
            assert!(
                problem.summary().starts_with("spec.aws.caBundle: ")
                    && problem.summary().contains("paste the CA's PEM"),
                "{problem}"
            );
        }
    }
}

//! Revoking an ApiKey's credentials at the provider, as `spec.aws.revocation` says:
//!
//! - `MinIO`: MinIO's self-service `POST /minio/admin/v3/revoke-tokens/builtin` with the tag the
//!   sessions were minted with (`TokenRevokeType`), signed with the broker's own keys: MinIO
//!   deletes those sessions and refuses their keys from then on;
//! - `IAMRolePolicy`: an inline policy on the role denying every session of the ApiKey (by its
//!   `SourceIdentity`) issued before now: AWS's documented way to revoke older sessions;
//! - `FilesOnly`: nothing can be done at the provider.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use super::signed;
use crate::crd::{AwsProvider, Revocation};
use crate::revocation::{self, revoke_tag};

/// Every revocation call must finish within this.
const REVOKE_TIMEOUT: Duration = Duration::from_secs(5);
/// IAM's global endpoint (the only one that accepts `PutRolePolicy`).
const IAM_ENDPOINT: &str = "https://iam.amazonaws.com/";

/// What happened at the provider, for the audit record (never a secret; may name the
/// broker's principal, so it goes to the operator's log only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Whether the provider itself stopped the credentials.
    pub at_provider: bool,
    pub answer: String,
}

/// What revoking does with this provider, in plain words (for the KeyProvider's status).
pub fn describe(mode: Revocation) -> &'static str {
    match mode {
        Revocation::MinIo => {
            "MinIO revokes a withdrawn ApiKey's sessions within a second (revoke-tokens by TokenRevokeType)"
        }
        Revocation::IamRolePolicy => {
            "AWS denies a withdrawn ApiKey's older sessions through an inline role policy (needs iam:PutRolePolicy and sts:SetSourceIdentity)"
        }
        Revocation::FilesOnly => {
            "files only: revocation removes the credentials from the pods, but a leaked credential keeps working at the provider until it expires (set spec.aws.revocation to MinIO or IAMRolePolicy if the provider supports it)"
        }
    }
}

/// Revokes the credentials of ApiKey `namespace/name` minted under `grant`. An `Err` is for
/// the operator's log and the audit record only.
pub async fn revoke(
    kube: &kube::Client,
    aws: &AwsProvider,
    namespace: &str,
    name: &str,
    grant: &str,
) -> Result<Outcome, String> {
    match aws.revocation {
        Revocation::FilesOnly => Ok(Outcome {
            at_provider: false,
            answer: "the provider cannot revoke (revocation: FilesOnly)".into(),
        }),
        Revocation::MinIo => {
            let endpoint = aws
                .endpoint
                .as_deref()
                .ok_or("revocation MinIO needs spec.aws.endpoint (MinIO's URL)")?;
            let tag = revoke_tag(namespace, name, grant);
            let url = minio_revoke_url(endpoint, &tag);
            let credentials = super::check::broker_credentials(kube, aws)
                .await
                .map_err(|p| p.to_string())?;
            let roots = aws
                .ca_bundle
                .as_deref()
                .map(super::check::ca_certificates)
                .transpose()
                .map_err(|p| p.to_string())?;
            let answer = signed::post(
                &credentials,
                signed::Target {
                    url: &url,
                    roots: roots.as_deref(),
                },
                "s3",
                &aws.region,
                None,
                Vec::new(),
                REVOKE_TIMEOUT,
            )
            .await?;
            match answer.status {
                200 | 204 => Ok(Outcome {
                    at_provider: true,
                    answer: format!("MinIO revoked the sessions tagged {tag}"),
                }),
                status => Err(format!(
                    "MinIO refused revoke-tokens ({status}): {}",
                    answer.body.trim()
                )),
            }
        }
        Revocation::IamRolePolicy => {
            let role = role_name(&aws.role_arn)
                .ok_or_else(|| format!("{} is not a role ARN", aws.role_arn))?;
            let source_identity = revocation::aws_source_identity(namespace, name);
            let before = Timestamp::now().to_string();
            let body = put_role_policy_form(
                role,
                &revocation::aws_policy_name(&source_identity),
                &revocation::aws_deny_older_sessions(&source_identity, &before),
            );
            let credentials = super::check::broker_credentials(kube, aws)
                .await
                .map_err(|p| p.to_string())?;
            let answer = signed::post(
                &credentials,
                signed::Target {
                    url: IAM_ENDPOINT,
                    roots: None,
                },
                "iam",
                "us-east-1",
                Some("application/x-www-form-urlencoded; charset=utf-8"),
                body.into_bytes(),
                REVOKE_TIMEOUT,
            )
            .await?;
            match answer.status {
                200 => Ok(Outcome {
                    at_provider: true,
                    answer: format!(
                        "IAM denies sessions of {source_identity} on role {role} issued before {before}"
                    ),
                }),
                status => Err(format!(
                    "IAM refused PutRolePolicy ({status}): {}",
                    answer.body.trim()
                )),
            }
        }
    }
}

/// MinIO's self-service revocation URL for one tag.
fn minio_revoke_url(endpoint: &str, tag: &str) -> String {
    let tag: String = form_urlencoded::byte_serialize(tag.as_bytes()).collect();
    format!(
        "{}/minio/admin/v3/revoke-tokens/builtin?tokenRevokeType={tag}",
        endpoint.trim_end_matches('/')
    )
}

/// The role's name: the last path segment of `arn:aws:iam::<account>:role/<path>/<name>`.
fn role_name(arn: &str) -> Option<&str> {
    let resource = arn.splitn(6, ':').nth(5)?;
    let path = resource.strip_prefix("role/")?;
    path.rsplit('/').next().filter(|n| !n.is_empty())
}

/// The IAM Query API form of `PutRolePolicy`.
fn put_role_policy_form(role: &str, policy_name: &str, document: &str) -> String {
    form_urlencoded::Serializer::new(String::new())
        .append_pair("Action", "PutRolePolicy")
        .append_pair("Version", "2010-05-08")
        .append_pair("RoleName", role)
        .append_pair("PolicyName", policy_name)
        .append_pair("PolicyDocument", document)
        .finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_minio_url_carries_the_tag_encoded() {
        assert_eq!(
            minio_revoke_url("http://127.0.0.1:9000/", "keybroker:team-a/up:0f"),
            "http://127.0.0.1:9000/minio/admin/v3/revoke-tokens/builtin?tokenRevokeType=keybroker%3Ateam-a%2Fup%3A0f"
        );
    }

    #[test]
    fn role_names_come_from_role_arns_only() {
        assert_eq!(
            role_name("arn:aws:iam::123456789012:role/app-uploads"),
            Some("app-uploads")
        );
        assert_eq!(
            role_name("arn:aws:iam::123456789012:role/teams/a/app-uploads"),
            Some("app-uploads")
        );
        assert_eq!(role_name("arn:aws:iam::123456789012:user/bob"), None);
        assert_eq!(role_name("arn:aws:iam::123456789012:role/"), None);
        assert_eq!(role_name("not-an-arn"), None);
    }

    #[test]
    fn put_role_policy_sends_the_document_whole() {
        let document = revocation::aws_deny_older_sessions("team-a.up", "2026-12-01T10:00:00Z");
        let form = put_role_policy_form("app-uploads", "keybroker-revoke-team-a.up", &document);
        let pairs: std::collections::BTreeMap<String, String> =
            form_urlencoded::parse(form.as_bytes())
                .into_owned()
                .collect();
        assert_eq!(pairs["Action"], "PutRolePolicy");
        assert_eq!(pairs["Version"], "2010-05-08");
        assert_eq!(pairs["RoleName"], "app-uploads");
        assert_eq!(pairs["PolicyName"], "keybroker-revoke-team-a.up");
        assert_eq!(pairs["PolicyDocument"], document);
    }
}

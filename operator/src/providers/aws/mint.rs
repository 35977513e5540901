//! Minting: one STS AssumeRole per exchange, under the grant's session policy and TTL, tagged
//! so that the provider can revoke it later (see `revoke.rs`).

use std::time::{Duration, SystemTime};

use aws_sdk_sts::error::ProvideErrorMetadata;
use aws_smithy_types::body::SdkBody;
use k8s_openapi::jiff::Timestamp;
use keybroker_contract::wire::Credentials;

use crate::crd::{AwsProvider, Revocation};

/// Every provider call must finish within this.
const MINT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why minting failed. The texts come from the provider and may name the broker's principal:
/// they go to the operator's log and audit only.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error("the provider refused to mint ({code}): {message}")]
    Refused { code: String, message: String },
    #[error("the provider is unavailable: {0}")]
    Unavailable(String),
}

/// What one AssumeRole asks for.
#[derive(Debug)]
pub struct Request<'a> {
    pub session_name: String,
    pub session_policy: &'a str,
    pub ttl: Duration,
    /// MinIO's `TokenRevokeType` (see `revocation::revoke_tag`).
    pub revoke_tag: &'a str,
    /// AWS's `SourceIdentity` naming the ApiKey.
    pub source_identity: &'a str,
}

/// Fresh credentials and when to refresh them (two thirds of their lifetime).
#[derive(Debug)]
pub struct Minted {
    pub credentials: Credentials,
    pub refresh_at: String,
}

pub async fn assume_role(
    sts: &aws_sdk_sts::Client,
    aws: &AwsProvider,
    request: Request<'_>,
) -> Result<Minted, MintError> {
    let ttl_secs = i32::try_from(request.ttl.as_secs()).unwrap_or(i32::MAX);
    let mut call = sts
        .assume_role()
        .role_arn(&aws.role_arn)
        .role_session_name(request.session_name)
        .policy(request.session_policy)
        .duration_seconds(ttl_secs);
    if aws.revocation == Revocation::IamRolePolicy {
        call = call.source_identity(request.source_identity);
    }
    let out = if aws.revocation == Revocation::MinIo {
        let extra = format!(
            "&TokenRevokeType={}",
            form_urlencoded::byte_serialize(request.revoke_tag.as_bytes()).collect::<String>()
        );
        // The SDK has no field for MinIO's extension: append it to the form body before the
        // request is signed.
        let call = call.customize().mutate_request(move |req| {
            let mut body = req.body().bytes().map(<[u8]>::to_vec).unwrap_or_default();
            body.extend_from_slice(extra.as_bytes());
            let length = body.len().to_string();
            *req.body_mut() = SdkBody::from(body);
            req.headers_mut().insert("content-length", length);
        });
        tokio::time::timeout(MINT_TIMEOUT, call.send()).await
    } else {
        tokio::time::timeout(MINT_TIMEOUT, call.send()).await
    };
    let out = out
        .map_err(|_| MintError::Unavailable(format!("no answer within {MINT_TIMEOUT:?}")))?
        .map_err(classify)?;
    let creds = out.credentials().ok_or_else(|| MintError::Refused {
        code: "NoCredentials".into(),
        message: "AssumeRole returned no credentials".into(),
    })?;
    let expiration = SystemTime::try_from(*creds.expiration())
        .ok()
        .and_then(|t| Timestamp::try_from(t).ok())
        .ok_or_else(|| MintError::Refused {
            code: "BadExpiration".into(),
            message: "AssumeRole returned an unusable expiration".into(),
        })?;
    let now = Timestamp::now();
    let lifetime = expiration.duration_since(now);
    let refresh_at = now
        .checked_add(
            lifetime
                .checked_mul(2)
                .and_then(|d| d.checked_div(3))
                .unwrap_or(lifetime),
        )
        .unwrap_or(now);
    Ok(Minted {
        credentials: Credentials {
            access_key_id: creds.access_key_id().to_owned(),
            secret_access_key: creds.secret_access_key().to_owned(),
            session_token: creds.session_token().to_owned(),
            expiration: expiration.to_string(),
        },
        refresh_at: refresh_at.to_string(),
    })
}

fn classify<R: std::fmt::Debug + 'static>(
    e: aws_sdk_sts::error::SdkError<aws_sdk_sts::operation::assume_role::AssumeRoleError, R>,
) -> MintError {
    match &e {
        aws_sdk_sts::error::SdkError::ServiceError(s) => {
            let code = s.err().code().unwrap_or("Unknown").to_owned();
            let message = s.err().message().unwrap_or("").to_owned();
            if matches!(
                code.as_str(),
                "Throttling" | "ThrottlingException" | "ServiceUnavailable" | "InternalError"
            ) {
                MintError::Unavailable(format!("{code}: {message}"))
            } else {
                MintError::Refused { code, message }
            }
        }
        other => MintError::Unavailable(innermost(other)),
    }
}

fn innermost(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}

//! Provider kinds behind one seam, like cert-manager's issuer kinds: a KeyProvider names
//! exactly one kind, and everything kind-specific (verifying the provider, compiling an
//! ApiKey's scope, issuing, revoking, what the pod sees) lives in that kind's module. The
//! controller, the broker and the webhook reach a provider only through this module.
//!
//! - `aws`: STS AssumeRole with a session policy per ApiKey (AWS, MinIO, Ceph RGW).
//! - `gateway`: calls forwarded to an upstream API by keybroker's gateway, which adds the
//!   upstream's key; the key never leaves the broker.
//! - `oauth2`: access tokens from an identity provider, narrowed to each ApiKey by token
//!   exchange.

pub mod aws;
pub mod gateway;
pub mod http;
pub mod oauth2;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

use crate::crd::{
    ApiKeySpec, AwsProvider, GatewayProvider, KeyProvider, KeyProviderStatus, OAuth2Provider,
    RotationStatus,
};
use crate::policy::{self, Compiled, Refusal};
use crate::status::ready_transition;

/// The one kind a KeyProvider names.
#[derive(Clone, Copy, Debug)]
pub enum Kind<'a> {
    Aws(&'a AwsProvider),
    Gateway(&'a GatewayProvider),
    OAuth2(&'a OAuth2Provider),
}

impl Kind<'_> {
    /// The kind's field name in `spec`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Aws(_) => "aws",
            Kind::Gateway(_) => "gateway",
            Kind::OAuth2(_) => "oauth2",
        }
    }
}

/// A KeyProvider that names no kind or several (the CRD's CEL rule refuses both; this is for
/// objects written before it, or by a client that skipped validation).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("set exactly one provider kind in spec: aws, gateway or oauth2")]
pub struct NoKind;

/// The kind `provider` names.
pub fn kind(provider: &KeyProvider) -> Result<Kind<'_>, NoKind> {
    let spec = &provider.spec;
    match (&spec.aws, &spec.gateway, &spec.oauth2) {
        (Some(aws), None, None) => Ok(Kind::Aws(aws)),
        (None, Some(gateway), None) => Ok(Kind::Gateway(gateway)),
        (None, None, Some(oauth2)) => Ok(Kind::OAuth2(oauth2)),
        _ => Err(NoKind),
    }
}

/// Why a provider is not usable, by kind. Messages never contain key material.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error(transparent)]
    Aws(#[from] aws::check::Problem),
    #[error(transparent)]
    Gateway(#[from] gateway::check::Problem),
    #[error(transparent)]
    OAuth2(#[from] oauth2::token::Problem),
    #[error(transparent)]
    NoKind(#[from] NoKind),
}

impl Problem {
    /// What the KeyProvider's status says (the operator's log has the details).
    pub fn summary(&self) -> String {
        match self {
            Problem::Aws(p) => p.summary(),
            Problem::Gateway(p) => p.to_string(),
            Problem::OAuth2(p) => p.to_string(),
            Problem::NoKind(p) => p.to_string(),
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            Problem::Aws(p) => p.reason(),
            Problem::Gateway(p) => p.reason(),
            Problem::OAuth2(p) => p.reason(),
            Problem::NoKind(_) => "ProviderKindInvalid",
        }
    }
}

/// Proves the provider usable with a real call (aws) or by reading what the gateway needs
/// (gateway): the message of `Ready=True`, or the problem.
pub async fn verify(kube: &kube::Client, provider: &KeyProvider) -> Result<String, Problem> {
    match kind(provider)? {
        Kind::Aws(aws) => Ok(aws::check::verify(kube, aws).await?),
        Kind::Gateway(gateway) => Ok(gateway::check::verify(kube, gateway).await?),
        Kind::OAuth2(oauth2) => Ok(oauth2::check::verify(kube, oauth2).await?),
    }
}

/// What revoking does with this provider, in plain words (for the KeyProvider's status).
pub fn describe_revocation(provider: &KeyProvider) -> &'static str {
    match kind(provider) {
        Ok(Kind::Aws(aws)) => aws::revoke::describe(aws.revocation),
        Ok(Kind::Gateway(_)) => gateway::REVOCATION,
        Ok(Kind::OAuth2(_)) => oauth2::REVOCATION,
        Err(_) => "unknown until the provider names its kind",
    }
}

/// The KeyProvider status for `outcome`, keeping lastTransitionTime when Ready did not flip.
pub fn desired_status(
    provider: &KeyProvider,
    outcome: &Result<String, Problem>,
    rotation: Option<RotationStatus>,
    now: Time,
) -> KeyProviderStatus {
    let current = provider.status.as_ref();
    let generation = provider.metadata.generation;
    let (status, reason, message) = match outcome {
        Ok(verified) => ("True", "Verified", verified.clone()),
        Err(problem) => ("False", problem.reason(), problem.summary()),
    };
    KeyProviderStatus {
        conditions: vec![ready_transition(
            current.map(|s| s.conditions.as_slice()).unwrap_or_default(),
            status,
            reason,
            message,
            generation,
            now,
        )],
        observed_generation: generation,
        revocation: Some(describe_revocation(provider).to_owned()),
        rotation,
    }
}

/// Compiles an ApiKey's `spec` in `namespace` under `provider`'s kind and guardrails.
pub fn compile(
    spec: &ApiKeySpec,
    provider: &KeyProvider,
    namespace: &str,
) -> Result<Compiled, Refusal> {
    let not_for = |field, kinds, kind: &'static str, hint| Refusal::NotForKind {
        field,
        kinds,
        provider: provider.name_any(),
        kind,
        hint,
    };
    match kind(provider) {
        Ok(Kind::Aws(_)) => {
            if spec.budget.is_some() {
                return Err(not_for(
                    "spec.budget",
                    "gateway",
                    "aws",
                    "remove it (the provider's maxIssuancesPerMinute bounds issuances)",
                ));
            }
            policy::compile(spec, &provider.spec.guardrails, namespace)
        }
        Ok(Kind::Gateway(_)) => {
            gateway::scope::compile(spec, &provider.spec.guardrails, namespace).map(|(c, _)| c)
        }
        Ok(Kind::OAuth2(_)) => {
            if spec.budget.is_some() {
                return Err(not_for(
                    "spec.budget",
                    "gateway",
                    "oauth2",
                    "remove it (the provider's maxIssuancesPerMinute bounds issuances)",
                ));
            }
            oauth2::scope::compile(spec, &provider.spec.guardrails, namespace).map(|(c, _)| c)
        }
        Err(_) => Err(not_for(
            "spec.providerRef",
            "aws, gateway or oauth2",
            "neither",
            "ask the platform team to set exactly one kind in the KeyProvider",
        )),
    }
}

pub use aws::revoke::Outcome;

/// Revokes, at the provider, what ApiKey `namespace/name` was issued under `grant`. An `Err`
/// is for the operator's log and the audit record only.
pub async fn revoke(
    kube: &kube::Client,
    provider: &KeyProvider,
    namespace: &str,
    name: &str,
    grant: &str,
) -> Result<Outcome, String> {
    match kind(provider).map_err(|e| e.to_string())? {
        Kind::Aws(aws) => aws::revoke::revoke(kube, aws, namespace, name, grant).await,
        // Every call is checked against the live ApiKey: the withdrawn grant's sessions are
        // refused from the next call on, and the upstream's key never left the broker.
        Kind::Gateway(_) => Ok(Outcome {
            at_provider: true,
            answer: "nothing to revoke at the upstream: the gateway refuses the grant's sessions"
                .into(),
        }),
        // The broker replicas hold the tokens they issued and revoke them at the identity
        // provider as soon as their caches see the grant withdrawn (`oauth2::issued`).
        Kind::OAuth2(_) => Ok(Outcome {
            at_provider: true,
            answer: "the broker replicas that issued the grant's tokens revoke them at the identity provider (RFC 7009)".into(),
        }),
    }
}

//! The broker's audit records (target `keybroker::audit`): one per issuance, refusal and
//! revocation at an identity provider, naming identifiers only, never a secret key, session or
//! token.

use keybroker_contract::wire::ExchangeResponse;
use tracing::info;

use super::ExchangeError;
use super::authz::{Grant, PodIdentity};
use crate::providers::oauth2::issued::Token;
use crate::providers::oauth2::mint::MintError;

/// What one exchange handed out, with what its audit record names beyond the response.
pub(super) struct Issuance {
    pub response: ExchangeResponse,
    /// For an oauth2 token: its id and the client that minted it.
    pub token_ids: Option<TokenIds>,
}

impl From<ExchangeResponse> for Issuance {
    fn from(response: ExchangeResponse) -> Self {
        Self {
            response,
            token_ids: None,
        }
    }
}

/// Identifies an oauth2 token without it.
pub(super) struct TokenIds {
    /// The JWT's `jti`; empty for an opaque token.
    pub id: String,
    /// The broker's client at the identity provider.
    pub client: String,
}

/// The record of an issuance.
pub(super) fn issuance(
    id: &PodIdentity,
    api_key: &str,
    client: &str,
    grant: &Grant,
    issued: &Issuance,
) {
    let response = &issued.response;
    let token = response.token.as_ref();
    let expiration = response
        .credentials
        .as_ref()
        .map(|c| c.expiration.as_str())
        .or(response.session.as_ref().map(|s| s.expiration.as_str()))
        .or(token.map(|t| t.expiration.as_str()))
        .unwrap_or("");
    info!(
        target: "keybroker::audit",
        outcome = "issued",
        api_key,
        namespace = %id.namespace,
        pod = %id.pod_name,
        pod_uid = %id.pod_uid,
        service_account = %id.service_account,
        provider = %grant.provider,
        grant = %grant.id,
        scope_hash = %grant.scope_hash,
        access_key_id = response.credentials.as_ref().map_or("", |c| c.access_key_id.as_str()),
        token_id = issued.token_ids.as_ref().map_or("", |t| t.id.as_str()),
        idp_client = issued.token_ids.as_ref().map_or("", |t| t.client.as_str()),
        audiences = token.map(|t| t.audience.join(" ")).unwrap_or_default(),
        scopes = token.map(|t| t.scope.join(" ")).unwrap_or_default(),
        expiration,
        client,
        "credentials issued"
    );
}

/// The record of a refusal, with its reason.
pub(super) fn refusal(
    id: Option<&PodIdentity>,
    api_key: &str,
    client: &str,
    error: &ExchangeError,
) {
    info!(
        target: "keybroker::audit",
        outcome = "refused",
        reason = error.reason(),
        api_key,
        namespace = id.map(|i| i.namespace.as_str()).unwrap_or(""),
        pod = id.map(|i| i.pod_name.as_str()).unwrap_or(""),
        pod_uid = id.map(|i| i.pod_uid.as_str()).unwrap_or(""),
        service_account = id.map(|i| i.service_account.as_str()).unwrap_or(""),
        client,
        detail = %error,
        "exchange refused"
    );
}

/// The record of an anomaly rule that fired.
pub(super) fn anomaly(id: &PodIdentity, api_key: &str, firing: &super::anomaly::Firing) {
    info!(
        target: "keybroker::audit",
        outcome = "anomaly",
        reason = firing.rule.name(),
        action = ?firing.action,
        api_key,
        namespace = %id.namespace,
        pod = %id.pod_name,
        pod_uid = %id.pod_uid,
        service_account = %id.service_account,
        count = firing.count,
        threshold = firing.threshold,
        detail = %firing.note(),
        "anomaly detected"
    );
}

/// The record of an oauth2 token revoked at its identity provider (or of the attempt).
pub(super) fn token_revocation(ns: &str, api_key: &str, token: &Token, error: Option<&MintError>) {
    let (result, detail) = match error {
        None => ("revoked", String::new()),
        Some(e) => ("failed", e.to_string()),
    };
    info!(
        target: "keybroker::audit",
        outcome = "revoked",
        result,
        api_key,
        namespace = ns,
        pod = %token.pod,
        grant = %token.grant,
        token_id = %token.id,
        detail,
        "oauth2 token revoked at the identity provider"
    );
}

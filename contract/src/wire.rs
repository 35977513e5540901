//! The broker's exchange protocol: the sidecar presents its projected service-account token
//! (audience `keybroker`) as a bearer token and names an ApiKey; the broker answers with
//! short-lived credentials or a refusal that says why.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The audience of the projected token the sidecar presents.
pub const AUDIENCE: &str = "keybroker";

/// Body of `POST /v1/exchange`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExchangeRequest {
    /// Name of an ApiKey in the pod's namespace.
    pub api_key: String,
}

/// Short-lived credentials. `Debug` never shows the secret parts.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    /// RFC 3339.
    pub expiration: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("session_token", &"<redacted>")
            .field("expiration", &self.expiration)
            .finish()
    }
}

/// A session for calls through keybroker's gateway (an ApiKey of a gateway provider): the
/// sidecar sends `token` as a bearer token with every call it forwards to `url`. The upstream's
/// key stays in the broker. `Debug` never shows the token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySession {
    pub token: String,
    /// The gateway's base URL for this ApiKey; the app's path is appended.
    pub url: String,
    /// RFC 3339.
    pub expiration: String,
}

impl fmt::Debug for GatewaySession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GatewaySession")
            .field("token", &"<redacted>")
            .field("url", &self.url)
            .field("expiration", &self.expiration)
            .finish()
    }
}

/// An OAuth2 access token (an ApiKey of an oauth2 provider), narrowed by the broker to exactly
/// the ApiKey's audiences and scopes. Never a refresh token. `Debug` never shows the token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AccessToken {
    pub access_token: String,
    /// `Bearer`.
    pub token_type: String,
    /// RFC 3339.
    pub expiration: String,
    /// The scopes the token carries.
    #[serde(default)]
    pub scope: Vec<String>,
    /// The audiences the token is for.
    #[serde(default)]
    pub audience: Vec<String>,
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("access_token", &"<redacted>")
            .field("token_type", &self.token_type)
            .field("expiration", &self.expiration)
            .field("scope", &self.scope)
            .field("audience", &self.audience)
            .finish()
    }
}

/// Successful answer to an exchange: AWS credentials (aws providers), a gateway session
/// (gateway providers) or an access token (oauth2 providers), exactly one of them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExchangeResponse {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<Credentials>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<GatewaySession>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<AccessToken>,
    /// When the sidecar should fetch new credentials (RFC 3339): two thirds of the lifetime.
    pub refresh_at: String,
    /// The grant the credentials were minted under (an opaque identifier of their rights). The
    /// sidecar sends it back in its revocation poll; the broker answers `renew` when the
    /// ApiKey's rights changed.
    #[serde(default)]
    pub grant: String,
    /// The ApiKey's renewal mark (a digest of its [`RENEWED_AT_ANNOTATION`], hex) when the
    /// credentials were issued. The sidecar sends it back in its revocation poll; the broker answers `renew` when
    /// the mark changed (`kubectl keybroker renew`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub renewal: String,
}

/// The ApiKey annotation whose change asks every pod of the ApiKey to fetch new credentials now
/// (`kubectl keybroker renew` sets it to the time).
pub const RENEWED_AT_ANNOTATION: &str = "keybroker.dev/renewed-at";
/// Longest renewal mark a poll may send back (a longer one is ignored).
pub const MAX_RENEWAL_MARK: usize = 64;

/// A refused exchange: `reason` is stable and machine-readable, `message` says what to change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Refusal {
    pub reason: String,
    pub message: String,
    /// Whether the same request may succeed later without any change (provider down, rate cap).
    pub retryable: bool,
}

/// Answer of `GET /v1/revocations?apiKey=<name>&grant=<grant>&renewal=<mark>&waitSeconds=<n>`, a long poll
/// by a pod that may use the ApiKey: the broker answers as soon as the pod may no longer use it
/// (`revoked: true`: delete the credentials now), as soon as its rights changed (`renew: true`:
/// or a renewal was asked for: fetch new ones now), or after the wait
/// with both false (poll again).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RevocationStatus {
    pub api_key: String,
    pub revoked: bool,
    #[serde(default)]
    pub renew: bool,
}

/// Longest wait a revocation poll may ask for, in seconds.
pub const MAX_REVOCATION_WAIT_SECONDS: u64 = 60;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_debug_hides_secrets() {
        let c = Credentials {
            access_key_id: "ASIAEXAMPLE".into(),
            secret_access_key: "very-secret".into(),
            session_token: "token-secret".into(),
            expiration: "2026-01-01T00:00:00Z".into(),
        };
        let shown = format!("{c:?}");
        assert!(shown.contains("ASIAEXAMPLE"));
        assert!(
            !shown.contains("very-secret") && !shown.contains("token-secret"),
            "{shown}"
        );
    }

    #[test]
    fn access_token_debug_hides_the_token() {
        let t = AccessToken {
            access_token: "eyJ.secret.sig".into(),
            token_type: "Bearer".into(),
            expiration: "2026-01-01T00:00:00Z".into(),
            scope: vec!["reports:read".into()],
            audience: vec!["reports-api".into()],
        };
        let shown = format!("{t:?}");
        assert!(shown.contains("reports-api") && shown.contains("reports:read"));
        assert!(!shown.contains("eyJ"), "{shown}");
    }

    #[test]
    fn wire_names_are_camel_case() {
        let json = serde_json::to_value(ExchangeRequest {
            api_key: "k".into(),
        })
        .unwrap();
        assert_eq!(json, serde_json::json!({"apiKey": "k"}));
    }
}

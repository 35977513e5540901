//! What Keycloak answers: tokens, their claims, introspections and OAuth2 errors.

use std::fmt;

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;

/// RFC 8693's grant type.
pub const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// RFC 8693's token type of an access token.
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

/// The realm's OpenID discovery document (the fields the tests use).
#[derive(Clone, Debug, Deserialize)]
pub struct Discovery {
    pub issuer: String,
    pub token_endpoint: String,
    pub introspection_endpoint: String,
    pub revocation_endpoint: String,
    pub jwks_uri: String,
    #[serde(default)]
    pub grant_types_supported: Vec<String>,
}

/// A token endpoint's answer. `Debug` shows no token.
#[derive(Clone, Deserialize)]
pub struct Tokens {
    pub access_token: String,
    pub token_type: String,
    pub expires_in: u64,
    /// Space-separated; Keycloak sends `""` for a token with none of the optional scopes.
    #[serde(default)]
    pub scope: Option<String>,
    /// Set on token exchange answers.
    #[serde(default)]
    pub issued_token_type: Option<String>,
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokens")
            .field("access_token", &"<redacted>")
            .field("token_type", &self.token_type)
            .field("expires_in", &self.expires_in)
            .field("scope", &self.scope)
            .field("issued_token_type", &self.issued_token_type)
            .finish()
    }
}

impl Tokens {
    /// The access token's claims (its payload, decoded without checking the signature).
    pub fn claims(&self) -> anyhow::Result<Claims> {
        jwt_claims(&self.access_token)
    }
}

/// `aud` as Keycloak writes it: a string for one audience, an array for several.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    /// The audiences, sorted.
    pub fn sorted(&self) -> Vec<&str> {
        let mut all: Vec<&str> = match self {
            Self::One(one) => vec![one.as_str()],
            Self::Many(many) => many.iter().map(String::as_str).collect(),
        };
        all.sort_unstable();
        all
    }
}

/// An access token's claims (or an introspection's), the ones the tests look at by name and
/// the rest in `other`.
#[derive(Clone, Debug, Deserialize)]
pub struct Claims {
    #[serde(default)]
    pub iss: Option<String>,
    #[serde(default)]
    pub sub: Option<String>,
    #[serde(default)]
    pub aud: Option<Audience>,
    #[serde(default)]
    pub azp: Option<String>,
    #[serde(default)]
    pub scope: Option<String>,
    #[serde(default)]
    pub jti: Option<String>,
    #[serde(default)]
    pub sid: Option<String>,
    #[serde(default)]
    pub iat: Option<u64>,
    #[serde(default)]
    pub exp: Option<u64>,
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// An RFC 7662 introspection answer.
#[derive(Clone, Debug, Deserialize)]
pub struct Introspection {
    pub active: bool,
    #[serde(flatten)]
    pub claims: Claims,
}

/// The payload of JWT `token`, decoded without checking its signature.
pub fn jwt_claims(token: &str) -> anyhow::Result<Claims> {
    let payload = token
        .split('.')
        .nth(1)
        .context("the token is not a JWT (no payload part)")?;
    let bytes = URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .context("the token's payload is not base64url")?;
    serde_json::from_slice(&bytes).context("the token's payload is not a JSON object")
}

/// An OAuth2 error answer (RFC 6749 §5.2).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct OAuthError {
    pub error: String,
    #[serde(default)]
    pub error_description: Option<String>,
}

impl fmt::Display for OAuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.error_description {
            Some(description) => write!(f, "{}: {description}", self.error),
            None => f.write_str(&self.error),
        }
    }
}

/// A call to Keycloak that did not give what was asked.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Keycloak answered with an OAuth2 error.
    #[error("Keycloak refused {what} with {status}: {error}")]
    Refused {
        what: &'static str,
        status: u16,
        error: OAuthError,
    },
    /// No answer, or one that is neither the expected one nor an OAuth2 error.
    #[error("{what}: {source:#}")]
    Failed {
        what: &'static str,
        source: anyhow::Error,
    },
}

impl CallError {
    /// The status and OAuth2 error of a refusal.
    pub fn refusal(&self) -> Option<(u16, &OAuthError)> {
        match self {
            Self::Refused { status, error, .. } => Some((*status, error)),
            Self::Failed { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwt_claims_read_a_payload_and_aud_keeps_its_shape() {
        let payload = URL_SAFE_NO_PAD.encode(
            br#"{"aud":"reports-api","scope":"reports:read","jti":"trrtte:1","azp":"kb","exp":2}"#,
        );
        let claims = jwt_claims(&format!("e30.{payload}.sig")).unwrap();
        assert_eq!(claims.aud, Some(Audience::One("reports-api".into())));
        assert_eq!(claims.scope.as_deref(), Some("reports:read"));
        assert_eq!(claims.exp, Some(2));
        let many = URL_SAFE_NO_PAD.encode(br#"{"aud":["b","a"],"typ":"Bearer"}"#);
        let claims = jwt_claims(&format!("e30.{many}.sig")).unwrap();
        assert_eq!(
            claims.aud.as_ref().map(Audience::sorted),
            Some(vec!["a", "b"])
        );
        assert_eq!(claims.other["typ"], "Bearer");
        assert!(jwt_claims("not-a-jwt").is_err());
    }

    #[test]
    fn tokens_debug_shows_no_token() {
        let tokens = Tokens {
            access_token: "eyJsecret".into(),
            token_type: "Bearer".into(),
            expires_in: 5,
            scope: None,
            issued_token_type: None,
        };
        assert!(!format!("{tokens:?}").contains("eyJsecret"));
    }
}

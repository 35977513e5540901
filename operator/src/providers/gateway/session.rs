//! Gateway sessions: what the broker issues a pod for a gateway ApiKey instead of credentials.
//! A session is `kbs1.<claims>.<tag>`: the pod, ApiKey, grant and expiry, HMAC-SHA256-signed
//! with a key every broker and gateway replica shares (a Secret in the operator's namespace),
//! so the gateway verifies a call without a TokenReview. A session is no key: it works only
//! through the gateway, which also checks the live ApiKey and pod on every call.

use aws_lc_rs::{hmac, rand};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, ResourceExt};
use serde::{Deserialize, Serialize};

/// Prefix of every session token (and its format's version).
const PREFIX: &str = "kbs1.";
/// Longest token the gateway parses.
pub const MAX_TOKEN_BYTES: usize = 4096;
/// Data key of the session-key Secret.
const SECRET_KEY: &str = "hmac-sha256";

/// Who a session was issued to, and until when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    #[serde(rename = "ns")]
    pub namespace: String,
    #[serde(rename = "key")]
    pub api_key: String,
    pub pod: String,
    #[serde(rename = "uid")]
    pub pod_uid: String,
    #[serde(rename = "sa")]
    pub service_account: String,
    pub grant: String,
    /// Unix seconds.
    pub exp: i64,
}

/// Why a session is refused. No variant carries the token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("no gateway session: send the one the broker issued as `Authorization: Bearer`")]
    Missing,
    #[error("the gateway session is malformed or was not issued by this cluster's broker")]
    Invalid,
    #[error("the gateway session expired; the sidecar fetches a new one")]
    Expired,
}

/// The shared signing key.
pub struct SessionKey(hmac::Key);

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey(<redacted>)")
    }
}

impl SessionKey {
    pub fn from_bytes(bytes: &[u8]) -> Self {
        Self(hmac::Key::new(hmac::HMAC_SHA256, bytes))
    }

    /// A session token for `claims`.
    pub fn issue(&self, claims: &Claims) -> String {
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap_or_default());
        let tag = hmac::sign(&self.0, body.as_bytes());
        format!("{PREFIX}{body}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    /// The claims of `token` if this key signed it and it has not expired at `now` (unix s).
    pub fn verify(&self, token: &str, now: i64) -> Result<Claims, SessionError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(SessionError::Invalid);
        }
        let rest = token.strip_prefix(PREFIX).ok_or(SessionError::Invalid)?;
        let (body, tag) = rest.split_once('.').ok_or(SessionError::Invalid)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| SessionError::Invalid)?;
        hmac::verify(&self.0, body.as_bytes(), &tag).map_err(|_| SessionError::Invalid)?;
        let claims: Claims = URL_SAFE_NO_PAD
            .decode(body)
            .ok()
            .and_then(|json| serde_json::from_slice(&json).ok())
            .ok_or(SessionError::Invalid)?;
        if claims.exp <= now {
            return Err(SessionError::Expired);
        }
        Ok(claims)
    }
}

/// Reads the session key from Secret `namespace/name`, creating it (32 random bytes) when it
/// does not exist yet; replicas racing to create it all end up with the one that won.
pub async fn load_or_create(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> anyhow::Result<SessionKey> {
    let api = Api::<Secret>::namespaced(client.clone(), namespace);
    for _ in 0..3 {
        if let Some(secret) = api.get_opt(name).await? {
            let bytes = secret
                .data
                .as_ref()
                .and_then(|d| d.get(SECRET_KEY))
                .map(|b| b.0.clone())
                .filter(|b| b.len() >= 32)
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "Secret {namespace}/{name} has no {SECRET_KEY} of at least 32 bytes; delete it and the operator makes a new one"
                    )
                })?;
            return Ok(SessionKey::from_bytes(&bytes));
        }
        let mut bytes = [0u8; 32];
        rand::fill(&mut bytes).map_err(|_| anyhow::anyhow!("no randomness for the session key"))?;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(namespace.to_owned()),
                labels: Some(
                    [(
                        "app.kubernetes.io/managed-by".to_owned(),
                        "keybroker".to_owned(),
                    )]
                    .into(),
                ),
                ..ObjectMeta::default()
            },
            data: Some([(SECRET_KEY.to_owned(), ByteString(bytes.to_vec()))].into()),
            ..Secret::default()
        };
        match api.create(&PostParams::default(), &secret).await {
            Ok(created) => {
                tracing::info!(secret = %created.name_any(), "created the gateway session key");
                return Ok(SessionKey::from_bytes(&bytes));
            }
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    anyhow::bail!("could not read or create Secret {namespace}/{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> Claims {
        Claims {
            namespace: "team-a".into(),
            api_key: "reader".into(),
            pod: "app-1".into(),
            pod_uid: "uid-1".into(),
            service_account: "reader".into(),
            grant: "g1".into(),
            exp: 2_000,
        }
    }

    #[test]
    fn sessions_verify_only_under_their_key_and_before_expiry() {
        let key = SessionKey::from_bytes(&[7; 32]);
        let token = key.issue(&claims());
        assert_eq!(key.verify(&token, 1_000), Ok(claims()));
        assert_eq!(key.verify(&token, 2_000), Err(SessionError::Expired));
        let other = SessionKey::from_bytes(&[8; 32]);
        assert_eq!(other.verify(&token, 1_000), Err(SessionError::Invalid));
    }

    #[test]
    fn tampered_sessions_are_refused() {
        let key = SessionKey::from_bytes(&[7; 32]);
        let token = key.issue(&claims());
        let (head, tag) = token.rsplit_once('.').unwrap();
        let mut forged = claims();
        forged.namespace = "team-b".into();
        let forged_body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap());
        for bad in [
            format!("{PREFIX}{forged_body}.{tag}"),
            format!("{head}.{}", URL_SAFE_NO_PAD.encode([0u8; 32])),
            format!("{head}x.{tag}"),
            token.replacen(PREFIX, "kbs2.", 1),
            String::new(),
            "kbs1.".into(),
            "kbs1..".into(),
            "x".repeat(MAX_TOKEN_BYTES + 1),
        ] {
            assert_eq!(key.verify(&bad, 1_000), Err(SessionError::Invalid), "{bad}");
        }
    }
}

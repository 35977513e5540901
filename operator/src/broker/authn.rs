//! Authentication of the sidecar's projected token by the apiserver (TokenReview), accepting
//! only tokens for the keybroker audience that are bound to a pod.
//!
//! Verified reviews are cached briefly, keyed by a SHA-256 of the token (never the token), for
//! at most [`MAX_CACHE`] and never past the token's own expiry. Refusals are not cached.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use k8s_openapi::api::authentication::v1::TokenReview;
use kube::api::{Api, PostParams};
use sha2::{Digest, Sha256};

use super::authz::PodIdentity;

pub const MAX_CACHE: Duration = Duration::from_secs(30);
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";
/// Tokens are JWTs of a few hundred bytes to a few kB; anything larger is refused unread.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthnError {
    #[error("the token was not accepted for audience {audience}: {detail}")]
    Rejected { audience: String, detail: String },
    #[error(
        "the token is not bound to a pod; mount a projected service-account token (the injected sidecar does)"
    )]
    NotPodBound,
    #[error("the token is malformed or larger than {MAX_TOKEN_BYTES} bytes")]
    Malformed,
    #[error("the apiserver could not review the token: {0}")]
    Unavailable(String),
}

impl AuthnError {
    pub fn reason(&self) -> &'static str {
        match self {
            AuthnError::Rejected { .. } => "TokenRejected",
            AuthnError::NotPodBound => "TokenNotPodBound",
            AuthnError::Malformed => "TokenMalformed",
            AuthnError::Unavailable(_) => "TokenReviewUnavailable",
        }
    }
}

/// Reviews tokens with the apiserver and caches verified identities.
pub struct Authenticator {
    client: kube::Client,
    audience: String,
    cache: Mutex<HashMap<[u8; 32], (PodIdentity, Instant)>>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    pub fn new(client: kube::Client, audience: &str) -> Self {
        Self {
            client,
            audience: audience.to_owned(),
            cache: Mutex::default(),
        }
    }

    /// The pod identity behind `token`, or why it is refused.
    pub async fn authenticate(&self, token: &str) -> Result<PodIdentity, AuthnError> {
        if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
            return Err(AuthnError::Malformed);
        }
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = Instant::now();
        // The hit path is one lookup; expired entries are pruned only when a review is stored.
        if let Ok(cache) = self.cache.lock()
            && let Some((identity, until)) = cache.get(&key)
            && *until > now
        {
            return Ok(identity.clone());
        }
        let identity = self.review(token).await?;
        let lifetime = token_lifetime(token)
            .unwrap_or(Duration::ZERO)
            .min(MAX_CACHE);
        if !lifetime.is_zero()
            && let Ok(mut cache) = self.cache.lock()
        {
            cache.retain(|_, (_, until)| *until > now);
            cache.insert(key, (identity.clone(), now + lifetime));
        }
        Ok(identity)
    }

    async fn review(&self, token: &str) -> Result<PodIdentity, AuthnError> {
        let review = TokenReview {
            spec: k8s_openapi::api::authentication::v1::TokenReviewSpec {
                token: token.to_owned(),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| AuthnError::Unavailable(e.to_string()))?;
        let status = reviewed.status.unwrap_or_default();
        let rejected = |detail: String| AuthnError::Rejected {
            audience: self.audience.clone(),
            detail,
        };
        if status.authenticated != Some(true) {
            return Err(rejected(
                status.error.unwrap_or_else(|| "not authenticated".into()),
            ));
        }
        if !status
            .audiences
            .unwrap_or_default()
            .contains(&self.audience)
        {
            return Err(rejected("the review did not confirm the audience".into()));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let Some((namespace, service_account)) = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
        else {
            return Err(rejected("not a service-account token".into()));
        };
        let extra = user.extra.unwrap_or_default();
        let single = |key: &str| {
            extra
                .get(key)
                .and_then(|v| v.first())
                .filter(|v| !v.is_empty())
                .cloned()
        };
        let (Some(pod_name), Some(pod_uid)) = (single(POD_NAME), single(POD_UID)) else {
            return Err(AuthnError::NotPodBound);
        };
        Ok(PodIdentity {
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            pod_name,
            pod_uid,
        })
    }
}

/// Time until the JWT's `exp` claim (unverified: only bounds the cache of a verified review).
pub fn token_lifetime(token: &str) -> Option<Duration> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_u64()?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
    exp.checked_sub(now).map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: serde_json::Value) -> String {
        let enc = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.sig",
            enc.encode(b"{\"alg\":\"ES256\"}"),
            enc.encode(claims.to_string())
        )
    }

    #[test]
    fn cache_lifetime_follows_the_token_expiry() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let lifetime = token_lifetime(&jwt(serde_json::json!({"exp": now + 10}))).unwrap();
        assert!(lifetime <= Duration::from_secs(10) && lifetime >= Duration::from_secs(8));
        assert_eq!(
            token_lifetime(&jwt(serde_json::json!({"exp": now - 10}))),
            None
        );
        assert_eq!(token_lifetime("not-a-jwt"), None);
        assert_eq!(token_lifetime(&jwt(serde_json::json!({"sub": "x"}))), None);
    }
}

//! Minting an ApiKey's token: the broker's client gets a token of its own (client
//! credentials), then exchanges it (RFC 8693) for one with only the ApiKey's audiences and
//! scopes. Identity providers do not all narrow by themselves (Keycloak grants an exchange any
//! scope the client may have), so the broker checks what came back and hands out nothing wider
//! than asked for, nor longer-lived than the ApiKey's ttl.

use std::collections::BTreeSet;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use keybroker_contract::wire::AccessToken;

use super::scope::Narrowed;
use super::token::{self, ACCESS_TOKEN_TYPE, TOKEN_EXCHANGE, TokenAnswer, TokenError};
use crate::crd::OAuth2Provider;

/// Why no token was minted. `Refused` and `Unavailable` carry the identity provider's words,
/// for the operator's log only.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MintError {
    #[error("the identity provider refused: {code}: {message}")]
    Refused { code: String, message: String },
    #[error("the identity provider is unavailable: {0}")]
    Unavailable(String),
    /// The identity provider answered with more than the ApiKey's rights, or a longer life.
    #[error("the identity provider's token is wider than the ApiKey: {0}")]
    Wider(String),
}

impl From<TokenError> for MintError {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::Refused { error, description } => MintError::Refused {
                code: error,
                message: description,
            },
            TokenError::Unavailable(detail) => MintError::Unavailable(detail),
        }
    }
}

/// A token for the pod, and when the sidecar should fetch the next one.
#[derive(Debug)]
pub struct Minted {
    pub token: AccessToken,
    pub refresh_at: String,
}

/// Mints a token narrowed to `narrowed`, living at most `max_ttl`.
pub async fn mint(
    kube: &kube::Client,
    oauth2: &OAuth2Provider,
    narrowed: &Narrowed,
    max_ttl: Duration,
) -> Result<Minted, MintError> {
    let unavailable = |p: token::Problem| MintError::Unavailable(p.to_string());
    let idp = token::discover(oauth2).await.map_err(unavailable)?;
    let client = token::client_auth(kube, &oauth2.client_secret_ref)
        .await
        .map_err(unavailable)?;
    let own = idp
        .token(&client, &[("grant_type", "client_credentials")])
        .await?;
    let scope = narrowed.scopes.join(" ");
    let mut form = vec![
        ("grant_type", TOKEN_EXCHANGE),
        ("subject_token", own.access_token.as_str()),
        ("subject_token_type", ACCESS_TOKEN_TYPE),
        ("requested_token_type", ACCESS_TOKEN_TYPE),
        ("scope", scope.as_str()),
    ];
    for audience in &narrowed.audiences {
        form.push(("audience", audience.as_str()));
    }
    let exchanged = idp.token(&client, &form).await?;
    let now = k8s_openapi::jiff::Timestamp::now().as_second();
    let lifetime = check(&exchanged, narrowed, max_ttl, now)?;
    let at = |secs: i64| {
        k8s_openapi::jiff::Timestamp::from_second(secs)
            .map(|t| t.to_string())
            .unwrap_or_default()
    };
    let lifetime = i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX / 4);
    Ok(Minted {
        token: AccessToken {
            access_token: exchanged.access_token,
            token_type: "Bearer".into(),
            expiration: at(now.saturating_add(lifetime)),
            scope: narrowed.scopes.clone(),
            audience: narrowed.audiences.clone(),
        },
        refresh_at: at(now.saturating_add(lifetime * 2 / 3)),
    })
}

/// The claims of a JWT access token that say what it is for; `None` for an opaque token.
#[derive(serde::Deserialize)]
struct Claims {
    #[serde(default)]
    aud: Option<serde_json::Value>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    exp: Option<i64>,
}

fn claims(token: &str) -> Option<Claims> {
    let mut parts = token.split('.');
    let (_, payload, _) = (parts.next()?, parts.next()?, parts.next()?);
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()
}

/// Checks an exchanged token against what the ApiKey may have and returns its lifetime: its
/// scopes (the answer's `scope`, and the JWT's) within the ApiKey's, its audiences (the JWT's
/// `aud`) within the ApiKey's, a bearer token, living at most `max_ttl`.
fn check(
    answer: &TokenAnswer,
    narrowed: &Narrowed,
    max_ttl: Duration,
    now: i64,
) -> Result<Duration, MintError> {
    let wider = |what: String| Err(MintError::Wider(what));
    if !answer.token_type.is_empty() && !answer.token_type.eq_ignore_ascii_case("bearer") {
        return wider(format!("token type {:?}, not Bearer", answer.token_type));
    }
    let allowed: BTreeSet<&str> = narrowed.scopes.iter().map(String::as_str).collect();
    let jwt = claims(&answer.access_token);
    let scopes = [
        answer.scope.as_deref(),
        jwt.as_ref().and_then(|c| c.scope.as_deref()),
    ];
    for granted in scopes.into_iter().flatten().flat_map(str::split_whitespace) {
        if !allowed.contains(granted) {
            return wider(format!(
                "scope {granted:?} was not asked for; remove it from the broker client's default scopes"
            ));
        }
    }
    let audiences: BTreeSet<&str> = narrowed.audiences.iter().map(String::as_str).collect();
    let aud = match jwt.as_ref().and_then(|c| c.aud.as_ref()) {
        None => Vec::new(),
        Some(serde_json::Value::String(one)) => vec![one.as_str()],
        Some(serde_json::Value::Array(many)) => {
            many.iter().filter_map(serde_json::Value::as_str).collect()
        }
        Some(_) => return wider("aud is neither a string nor a list".into()),
    };
    if let Some(other) = aud.iter().find(|a| !audiences.contains(**a)) {
        return wider(format!(
            "audience {other:?} was not asked for; remove its audience mapper from the broker client's default scopes"
        ));
    }
    let from_exp = jwt
        .and_then(|c| c.exp)
        .map(|exp| u64::try_from(exp.saturating_sub(now)).unwrap_or(0));
    let lifetime = match (answer.expires_in, from_exp) {
        (Some(a), Some(b)) => a.min(b),
        (Some(a), None) | (None, Some(a)) => a,
        (None, None) => return wider("the token says nothing of its expiry".into()),
    };
    if lifetime == 0 {
        return wider("the token has expired already".into());
    }
    // A few seconds of clock difference between the broker and the identity provider.
    if lifetime > max_ttl.as_secs() + 5 {
        return wider(format!(
            "it lives {lifetime}s, longer than the ApiKey's ttl of {}s; shorten the client's access-token lifespan",
            max_ttl.as_secs()
        ));
    }
    Ok(Duration::from_secs(lifetime))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: serde_json::Value) -> String {
        format!(
            "eyJhbGciOiJSUzI1NiJ9.{}.c2ln",
            URL_SAFE_NO_PAD.encode(claims.to_string())
        )
    }

    fn narrowed() -> Narrowed {
        Narrowed {
            audiences: vec!["reports-api".into()],
            scopes: vec!["reports:read".into()],
        }
    }

    fn answer(token: String, scope: Option<&str>, expires_in: Option<u64>) -> TokenAnswer {
        TokenAnswer {
            access_token: token,
            token_type: "Bearer".into(),
            expires_in,
            scope: scope.map(str::to_owned),
        }
    }

    const NOW: i64 = 1_800_000_000;
    const TTL: Duration = Duration::from_secs(900);

    #[test]
    fn a_token_with_exactly_the_apikeys_rights_passes_with_its_lifetime() {
        let token = jwt(
            serde_json::json!({"aud": "reports-api", "scope": "reports:read", "exp": NOW + 60}),
        );
        let lifetime = check(
            &answer(token, Some("reports:read"), Some(60)),
            &narrowed(),
            TTL,
            NOW,
        );
        assert_eq!(lifetime, Ok(Duration::from_secs(60)));
        // Narrower is fine too (a scope the provider dropped).
        let token = jwt(serde_json::json!({"aud": ["reports-api"], "exp": NOW + 30}));
        let lifetime = check(&answer(token, Some(""), None), &narrowed(), TTL, NOW);
        assert_eq!(lifetime, Ok(Duration::from_secs(30)));
    }

    #[test]
    fn anything_wider_or_longer_is_never_handed_out() {
        let cases = [
            (
                answer(
                    jwt(serde_json::json!({"aud": "reports-api", "exp": NOW + 60})),
                    Some("reports:read reports:write"),
                    Some(60),
                ),
                "scope \"reports:write\"",
            ),
            (
                answer(
                    jwt(
                        serde_json::json!({"aud": "reports-api", "scope": "reports:read profile", "exp": NOW + 60}),
                    ),
                    Some("reports:read"),
                    Some(60),
                ),
                "scope \"profile\"",
            ),
            (
                answer(
                    jwt(
                        serde_json::json!({"aud": ["reports-api", "billing-api"], "exp": NOW + 60}),
                    ),
                    None,
                    Some(60),
                ),
                "audience \"billing-api\"",
            ),
            (
                answer(
                    jwt(serde_json::json!({"aud": "reports-api", "exp": NOW + 3600})),
                    None,
                    Some(3600),
                ),
                "longer than the ApiKey's ttl",
            ),
            (answer("opaque".into(), None, None), "nothing of its expiry"),
            (
                TokenAnswer {
                    token_type: "mac".into(),
                    ..answer("opaque".into(), None, Some(60))
                },
                "not Bearer",
            ),
        ];
        for (answer, needle) in cases {
            let refused = check(&answer, &narrowed(), TTL, NOW).unwrap_err();
            let message = refused.to_string();
            assert!(message.contains(needle), "{needle}: {message}");
            assert!(!message.contains("eyJ"), "{message}");
        }
    }
}

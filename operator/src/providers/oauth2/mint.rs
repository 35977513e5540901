//! Minting an ApiKey's token: the broker's client gets a token of its own (client
//! credentials), then exchanges it (RFC 8693) for one with only the ApiKey's audiences and
//! scopes. Identity providers do not all narrow by themselves (Keycloak grants an exchange any
//! scope the client may have), so the broker checks what came back and hands out nothing wider
//! than asked for, nor longer-lived than the ApiKey's ttl. What can be reused (the discovery
//! document, the client Secret, the broker's own token, pooled connections) is, so an
//! issuance costs one call to the identity provider.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use keybroker_contract::wire::AccessToken;

use super::scope::Narrowed;
use tokio::sync::Mutex;

use super::token::{
    self, ACCESS_TOKEN_TYPE, ClientAuth, Idp, TOKEN_EXCHANGE, TokenAnswer, TokenError,
};
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

/// A token for the pod, when the sidecar should fetch the next one, and what the audit record
/// and a later revocation need.
#[derive(Debug)]
pub struct Minted {
    pub token: AccessToken,
    pub refresh_at: String,
    /// Unix seconds.
    pub expires: i64,
    /// The JWT's `jti`; empty for an opaque token.
    pub id: String,
    /// The broker's client at the identity provider.
    pub client: String,
}

/// How long a provider's discovery document and client Secret are reused: a rotated client
/// secret or a moved endpoint is picked up within this (at once when the provider refuses).
const SESSION_TTL: Duration = Duration::from_secs(60);
/// How long a failure to reach the identity provider is answered from memory, so a burst of
/// exchanges waiting for an unreachable provider is not queued behind one timeout each.
const FAILURE_TTL: Duration = Duration::from_secs(1);

/// The OAuth2 errors that may mean a cached part went stale (the client secret, the broker's
/// own token), so the exchange is tried once more with fresh ones; any other refusal is the
/// ApiKey's and stands.
const STALE: [&str; 3] = ["invalid_client", "invalid_grant", "invalid_token"];

/// What the broker reuses between issuances of one provider: the identity provider (its
/// endpoints and a pooled HTTP client), the broker's client, and the broker's own token until
/// two thirds of its life. An issuance is then one token exchange.
struct Session {
    idp: Idp,
    client: ClientAuth,
    made: Instant,
    own: Option<(String, Instant)>,
}

/// One provider's cache slot; its lock is held while the slot is filled, so a burst of
/// issuances makes one discovery and one client-credentials call, and other providers never
/// wait on it.
#[derive(Default)]
struct Slot {
    session: Option<Session>,
    failed: Option<(Instant, MintError)>,
}

/// The identity provider's configuration a cache slot is for: a changed issuer, CA, client
/// Secret or service account is another slot.
type SlotKey = (String, Option<String>, String);

/// Mints tokens for every oauth2 provider, caching per provider what can be reused.
pub struct Minter {
    kube: kube::Client,
    slots: std::sync::Mutex<HashMap<SlotKey, Arc<Mutex<Slot>>>>,
}

impl std::fmt::Debug for Minter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Minter").finish_non_exhaustive()
    }
}

impl Minter {
    pub fn new(kube: kube::Client) -> Self {
        Self {
            kube,
            slots: std::sync::Mutex::default(),
        }
    }

    fn slot(&self, oauth2: &OAuth2Provider) -> Arc<Mutex<Slot>> {
        let client = match (&oauth2.client_secret_ref, &oauth2.client_service_account) {
            (Some(r), _) => format!("secret {}/{}", r.namespace, r.name),
            (None, Some(sa)) => format!(
                "service account {}/{} as {} for {:?}",
                sa.namespace, sa.name, sa.client_id, sa.audience
            ),
            (None, None) => String::new(),
        };
        let key = (oauth2.issuer.clone(), oauth2.ca_bundle.clone(), client);
        let Ok(mut slots) = self.slots.lock() else {
            return Arc::default();
        };
        if !slots.contains_key(&key) {
            // Slots of providers no longer used are dropped once nothing is filling them.
            slots.retain(|_, slot| {
                Arc::strong_count(slot) > 1
                    || slot.try_lock().is_ok_and(|s| {
                        s.session
                            .as_ref()
                            .is_some_and(|s| s.made.elapsed() < SESSION_TTL)
                    })
            });
        }
        Arc::clone(slots.entry(key).or_default())
    }

    /// The identity provider and the broker's client, from the cache or fetched now.
    async fn session(&self, slot: &mut Slot, oauth2: &OAuth2Provider) -> Result<(), MintError> {
        if slot
            .session
            .as_ref()
            .is_some_and(|s| s.made.elapsed() < SESSION_TTL)
        {
            return Ok(());
        }
        if let Some((at, failure)) = &slot.failed
            && at.elapsed() < FAILURE_TTL
        {
            return Err(failure.clone());
        }
        let unavailable = |p: token::Problem| MintError::Unavailable(p.to_string());
        let fetched = async {
            let idp = token::discover(oauth2).await.map_err(unavailable)?;
            let client = token::client_auth(&self.kube, oauth2)
                .await
                .map_err(unavailable)?;
            Ok::<_, MintError>((idp, client))
        }
        .await;
        match fetched {
            Ok((idp, client)) => {
                slot.session = Some(Session {
                    idp,
                    client,
                    made: Instant::now(),
                    own: None,
                });
                slot.failed = None;
                Ok(())
            }
            Err(e) => {
                slot.session = None;
                slot.failed = Some((Instant::now(), e.clone()));
                Err(e)
            }
        }
    }

    /// The identity provider, the broker's client and the broker's own token, from the cache
    /// or fetched now. `fresh` drops a cached one first (the provider refused it).
    async fn prepared(
        &self,
        oauth2: &OAuth2Provider,
        fresh: bool,
    ) -> Result<(Idp, ClientAuth, String), MintError> {
        let slot = self.slot(oauth2);
        let mut slot = slot.lock().await;
        if fresh {
            slot.session = None;
        }
        self.session(&mut slot, oauth2).await?;
        let Some(session) = slot.session.as_mut() else {
            return Err(MintError::Unavailable("no session".into()));
        };
        if let Some((own, until)) = &session.own
            && Instant::now() < *until
        {
            return Ok((session.idp.clone(), session.client.clone(), own.clone()));
        }
        let own = match session
            .idp
            .token(&session.client, &[("grant_type", "client_credentials")])
            .await
        {
            Ok(own) => own,
            Err(e) => {
                let e = MintError::from(e);
                slot.session = None;
                slot.failed = Some((Instant::now(), e.clone()));
                return Err(e);
            }
        };
        let life = Duration::from_secs(own.expires_in.unwrap_or(0) * 2 / 3);
        session.own = Some((own.access_token.clone(), Instant::now() + life));
        Ok((
            session.idp.clone(),
            session.client.clone(),
            own.access_token,
        ))
    }

    /// Revokes `token` (RFC 7009) at `oauth2`'s identity provider.
    pub async fn revoke(&self, oauth2: &OAuth2Provider, token: &str) -> Result<(), MintError> {
        let (idp, client) = {
            let slot = self.slot(oauth2);
            let mut slot = slot.lock().await;
            self.session(&mut slot, oauth2).await?;
            let session = slot
                .session
                .as_ref()
                .ok_or_else(|| MintError::Unavailable("no session".into()))?;
            (session.idp.clone(), session.client.clone())
        };
        Ok(idp.revoke(&client, token).await?)
    }

    /// Mints a token narrowed to `narrowed`, living at most `max_ttl`. An exchange refused
    /// with cached parts is tried once more with fresh ones (a rotated client secret, a
    /// restarted identity provider that forgot the broker's token).
    pub async fn mint(
        &self,
        oauth2: &OAuth2Provider,
        narrowed: &Narrowed,
        max_ttl: Duration,
    ) -> Result<Minted, MintError> {
        let exchanged = match self.exchange(oauth2, narrowed, false).await {
            Err(MintError::Refused { code, .. }) if STALE.contains(&code.as_str()) => {
                self.exchange(oauth2, narrowed, true).await
            }
            answer => answer,
        }?;
        let (exchanged, client) = exchanged;
        let now = k8s_openapi::jiff::Timestamp::now().as_second();
        let lifetime = check(&exchanged, narrowed, max_ttl, now)?;
        let at = |secs: i64| {
            k8s_openapi::jiff::Timestamp::from_second(secs)
                .map(|t| t.to_string())
                .unwrap_or_default()
        };
        let lifetime = i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX / 4);
        let id = claims(&exchanged.access_token)
            .and_then(|c| c.jti)
            .unwrap_or_default();
        Ok(Minted {
            expires: now.saturating_add(lifetime),
            id,
            client,
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

    /// One RFC 8693 exchange of the broker's own token for one narrowed to `narrowed`; the
    /// answer and the broker's client id.
    async fn exchange(
        &self,
        oauth2: &OAuth2Provider,
        narrowed: &Narrowed,
        fresh: bool,
    ) -> Result<(TokenAnswer, String), MintError> {
        let (idp, client, own) = self.prepared(oauth2, fresh).await?;
        let scope = narrowed.scopes.join(" ");
        let mut form = vec![
            ("grant_type", TOKEN_EXCHANGE),
            ("subject_token", own.as_str()),
            ("subject_token_type", ACCESS_TOKEN_TYPE),
            ("requested_token_type", ACCESS_TOKEN_TYPE),
            ("scope", scope.as_str()),
        ];
        for audience in &narrowed.audiences {
            form.push(("audience", audience.as_str()));
        }
        let exchanged = idp.token(&client, &form).await?;
        Ok((exchanged, client.id().to_owned()))
    }
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
    #[serde(default)]
    jti: Option<String>,
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

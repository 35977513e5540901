//! Authentication of the sidecar's projected token by the apiserver (TokenReview), accepting
//! only tokens for the keybroker audience that are bound to a pod.
//!
//! A TokenReview is a write to the apiserver, so junk must not reach it. Before any review:
//!
//! - [`precheck`], a pure structural check of the JWT (three base64url parts, a JSON header
//!   naming an algorithm, JSON claims with the keybroker audience, an expiry in the future and
//!   the cluster's service-account issuer). It never trusts a token, it only refuses ones the
//!   apiserver would refuse anyway;
//! - a short cache of refusals keyed by a SHA-256 of the token, so replaying a refused token
//!   costs a hash and a lookup, and concurrent requests with one token share one review.
//!
//! Verified reviews are cached too, for at most [`MAX_CACHE`] and never past the token's own
//! expiry. Both caches are bounded in size. The issuer is read once from the apiserver's OIDC
//! discovery document; while it is unknown the issuer check is skipped (the review still
//! decides).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use k8s_openapi::api::authentication::v1::TokenReview;
use kube::api::{Api, PostParams};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;
use tracing::{info, warn};

use super::authz::PodIdentity;

pub const MAX_CACHE: Duration = Duration::from_secs(30);
/// How long a token the apiserver refused is refused again without asking.
pub const REFUSAL_CACHE: Duration = Duration::from_secs(60);
/// Entries per cache; past it, expired entries are pruned and, if that is not enough, the new
/// entry is not stored (a flood of distinct tokens cannot grow memory).
pub const MAX_CACHE_ENTRIES: usize = 8192;
/// Clock skew allowed on `exp` between this replica and the apiserver.
pub const EXPIRY_LEEWAY_SECONDS: u64 = 60;
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";
/// Tokens are JWTs of a few hundred bytes to a few kB; anything larger is refused unread.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// How often an unknown issuer is asked for again.
const DISCOVERY_RETRY: Duration = Duration::from_secs(30);
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(3);

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
    #[error(
        "the token is not one keybroker accepts: {0}; send the pod's projected service-account token with audience keybroker"
    )]
    Precheck(Precheck),
    #[error("the apiserver could not review the token: {0}")]
    Unavailable(String),
}

impl AuthnError {
    pub fn reason(&self) -> &'static str {
        match self {
            AuthnError::Rejected { .. } => "TokenRejected",
            AuthnError::NotPodBound => "TokenNotPodBound",
            // Refused before the review, for what the review would refuse it for: the same
            // reason, so clients and dashboards see one cause whichever side caught it.
            AuthnError::Precheck(_) => "TokenRejected",
            AuthnError::Malformed => "TokenMalformed",
            AuthnError::Unavailable(_) => "TokenReviewUnavailable",
        }
    }
}

/// Reviews tokens with the apiserver and caches verified identities and refusals.
pub struct Authenticator {
    client: kube::Client,
    audience: String,
    cache: Mutex<HashMap<[u8; 32], (PodIdentity, Instant)>>,
    refused: Mutex<HashMap<[u8; 32], (AuthnError, Instant)>>,
    /// Reviews under way, so concurrent requests with one token share one TokenReview.
    in_flight: Mutex<HashMap<[u8; 32], Arc<Review>>>,
    /// The service-account issuer once known, or when to ask the apiserver again.
    issuer: Mutex<Issuer>,
}

/// The answer of one TokenReview, awaited by every request that carries the same token.
type Review = OnceCell<Result<PodIdentity, AuthnError>>;

#[derive(Debug)]
enum Issuer {
    Known(String),
    AskAfter(Instant),
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
            refused: Mutex::default(),
            in_flight: Mutex::default(),
            issuer: Mutex::new(Issuer::AskAfter(Instant::now())),
        }
    }

    /// Uses `issuer` instead of asking the apiserver's discovery document for it.
    pub fn with_issuer(self, issuer: &str) -> Self {
        if let Ok(mut known) = self.issuer.lock() {
            *known = Issuer::Known(issuer.to_owned());
        }
        self
    }

    /// The pod identity behind `token`, or why it is refused.
    pub async fn authenticate(&self, token: &str) -> Result<PodIdentity, AuthnError> {
        if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
            return Err(AuthnError::Malformed);
        }
        let now_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let issuer = self.issuer().await;
        let claims = precheck(
            token,
            &Expect {
                audience: &self.audience,
                issuer: issuer.as_deref(),
                now_unix,
            },
        )
        .map_err(AuthnError::Precheck)?;
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(answer) = self.cached(&key) {
            return answer;
        }
        self.shared_review(key, token, claims.lifetime(now_unix))
            .await
    }

    /// A cached answer for the token with SHA-256 `key`. The hit paths are one lookup; expired
    /// entries are pruned only when one is stored.
    fn cached(&self, key: &[u8; 32]) -> Option<Result<PodIdentity, AuthnError>> {
        let now = Instant::now();
        if let Ok(cache) = self.cache.lock()
            && let Some((identity, until)) = cache.get(key)
            && *until > now
        {
            return Some(Ok(identity.clone()));
        }
        if let Ok(refused) = self.refused.lock()
            && let Some((error, until)) = refused.get(key)
            && *until > now
        {
            return Some(Err(error.clone()));
        }
        None
    }

    /// One TokenReview for all concurrent callers with the same token; its answer is cached
    /// before the next caller could miss it.
    async fn shared_review(
        &self,
        key: [u8; 32],
        token: &str,
        lifetime: Duration,
    ) -> Result<PodIdentity, AuthnError> {
        let review = async {
            let result = self.review(token).await;
            let now = Instant::now();
            match &result {
                Ok(identity) if !lifetime.min(MAX_CACHE).is_zero() => store(
                    &self.cache,
                    key,
                    (identity.clone(), now + lifetime.min(MAX_CACHE)),
                    now,
                ),
                Ok(_) => {}
                // An unavailable apiserver is not the token's fault: ask again next time.
                Err(AuthnError::Unavailable(_)) => {}
                Err(e) => store(
                    &self.refused,
                    key,
                    (e.clone(), now + REFUSAL_CACHE.min(lifetime)),
                    now,
                ),
            }
            result
        };
        // Decided without awaiting, so no lock is held across the review.
        let cell = {
            let Ok(mut in_flight) = self.in_flight.lock() else {
                return Err(AuthnError::Unavailable(
                    "the broker's review table is broken".into(),
                ));
            };
            match in_flight.get(&key) {
                Some(cell) => Arc::clone(cell),
                None => {
                    // A review may have finished since the caller looked at the caches.
                    if let Some(answer) = self.cached(&key) {
                        return answer;
                    }
                    Arc::clone(in_flight.entry(key).or_default())
                }
            }
        };
        let result = cell.get_or_init(|| review).await.clone();
        if let Ok(mut in_flight) = self.in_flight.lock()
            && in_flight.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell))
        {
            in_flight.remove(&key);
        }
        result
    }

    /// The cluster's service-account issuer, read from the apiserver's OIDC discovery document
    /// at most every [`DISCOVERY_RETRY`] until it answers.
    async fn issuer(&self) -> Option<String> {
        match self.issuer.lock().as_deref_mut() {
            Ok(Issuer::Known(issuer)) => return Some(issuer.clone()),
            Ok(Issuer::AskAfter(at)) if *at <= Instant::now() => {
                *at = Instant::now() + DISCOVERY_RETRY;
            }
            Ok(Issuer::AskAfter(_)) | Err(_) => return None,
        }
        let request =
            hyper::http::Request::get("/.well-known/openid-configuration").body(Vec::new());
        let answer = match request {
            Ok(request) => {
                tokio::time::timeout(DISCOVERY_TIMEOUT, self.client.request_text(request)).await
            }
            Err(_) => return None,
        };
        #[derive(Deserialize)]
        struct Discovery {
            issuer: String,
        }
        match answer {
            Ok(Ok(text)) => match serde_json::from_str::<Discovery>(&text) {
                Ok(Discovery { issuer }) if !issuer.is_empty() => {
                    info!(%issuer, "the service-account issuer tokens must name");
                    if let Ok(mut known) = self.issuer.lock() {
                        *known = Issuer::Known(issuer.clone());
                    }
                    Some(issuer)
                }
                _ => {
                    warn!(
                        "the apiserver's OIDC discovery document names no issuer; tokens are checked without it"
                    );
                    None
                }
            },
            Ok(Err(e)) => {
                warn!(error = %e, "reading the apiserver's OIDC discovery document failed; tokens are checked without the issuer until it answers");
                None
            }
            Err(_) => {
                warn!("the apiserver's OIDC discovery document did not answer in time");
                None
            }
        }
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

/// Stores `entry` under `key`, keeping the map under [`MAX_CACHE_ENTRIES`].
fn store<V>(
    map: &Mutex<HashMap<[u8; 32], (V, Instant)>>,
    key: [u8; 32],
    entry: (V, Instant),
    now: Instant,
) {
    let Ok(mut map) = map.lock() else { return };
    if map.len() >= MAX_CACHE_ENTRIES {
        map.retain(|_, (_, until)| *until > now);
    }
    if map.len() < MAX_CACHE_ENTRIES {
        map.insert(key, entry);
    }
}

/// What a token must show to be worth a TokenReview.
#[derive(Clone, Copy, Debug)]
pub struct Expect<'a> {
    pub audience: &'a str,
    /// The cluster's service-account issuer, when known.
    pub issuer: Option<&'a str>,
    /// Now, in seconds since the Unix epoch.
    pub now_unix: u64,
}

/// The claims [`precheck`] read (unverified: they only bound caches and refuse early).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    /// The `exp` claim, seconds since the Unix epoch.
    pub expires: u64,
}

impl Claims {
    /// Time left until `exp` (zero once it passed).
    pub fn lifetime(&self, now_unix: u64) -> Duration {
        Duration::from_secs(self.expires.saturating_sub(now_unix))
    }
}

/// Why [`precheck`] refused a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Precheck {
    #[error("it is empty or larger than {MAX_TOKEN_BYTES} bytes")]
    Size,
    #[error("it is not a JWT of three base64url parts")]
    Shape,
    #[error("its header is not a JSON object naming a signing algorithm")]
    Header,
    #[error("its claims are not a JSON object with aud and exp")]
    Claims,
    #[error("it is not for the keybroker audience")]
    Audience,
    #[error("it has expired")]
    Expired,
    #[error("it was not issued by this cluster")]
    Issuer,
}

/// A cheap structural check of a JWT, before any TokenReview: linear in the token's length,
/// allocation bounded by it, never panics. `Ok` means only "worth asking the apiserver".
pub fn precheck(token: &str, expect: &Expect<'_>) -> Result<Claims, Precheck> {
    if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
        return Err(Precheck::Size);
    }
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Precheck::Shape);
    };
    let decode = |part: &str| {
        if part.is_empty() {
            return None;
        }
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .ok()
    };
    let (Some(header), Some(payload), Some(_)) =
        (decode(header), decode(payload), decode(signature))
    else {
        return Err(Precheck::Shape);
    };

    #[derive(Deserialize)]
    struct Header {
        alg: String,
    }
    match serde_json::from_slice::<Header>(&header) {
        Ok(h) if !h.alg.is_empty() && !h.alg.eq_ignore_ascii_case("none") => {}
        _ => return Err(Precheck::Header),
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Audience {
        One(String),
        Many(Vec<String>),
    }
    #[derive(Deserialize)]
    struct Payload {
        aud: Audience,
        exp: serde_json::Number,
        #[serde(default)]
        iss: Option<String>,
    }
    let claims: Payload = serde_json::from_slice(&payload).map_err(|_| Precheck::Claims)?;
    let audience_ok = match &claims.aud {
        Audience::One(aud) => aud == expect.audience,
        Audience::Many(auds) => auds.iter().any(|a| a == expect.audience),
    };
    if !audience_ok {
        return Err(Precheck::Audience);
    }
    let expires = claims
        .exp
        .as_u64()
        .or_else(|| claims.exp.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
        .ok_or(Precheck::Claims)?;
    if expires.saturating_add(EXPIRY_LEEWAY_SECONDS) <= expect.now_unix {
        return Err(Precheck::Expired);
    }
    if let Some(issuer) = expect.issuer
        && claims.iss.as_deref() != Some(issuer)
    {
        return Err(Precheck::Issuer);
    }
    Ok(Claims { expires })
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

    const ISSUER: &str = "https://127.0.0.1:6443";
    const NOW: u64 = 1_800_000_000;

    fn expect(issuer: Option<&str>) -> Expect<'_> {
        Expect {
            audience: "keybroker",
            issuer,
            now_unix: NOW,
        }
    }

    #[test]
    fn a_well_formed_token_passes_and_its_expiry_bounds_the_caches() {
        let token = jwt(serde_json::json!({"aud": ["keybroker"], "exp": NOW + 10, "iss": ISSUER}));
        let claims = precheck(&token, &expect(Some(ISSUER))).unwrap();
        assert_eq!(claims.lifetime(NOW), Duration::from_secs(10));
        assert_eq!(claims.lifetime(NOW + 20), Duration::ZERO);
        // Without a known issuer the check is skipped, never guessed.
        let other = jwt(serde_json::json!({"aud": "keybroker", "exp": NOW + 10, "iss": "x"}));
        assert!(precheck(&other, &expect(None)).is_ok());
    }

    #[test]
    fn junk_is_refused_before_any_review() {
        let enc = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let good_claims =
            serde_json::json!({"aud": ["keybroker"], "exp": NOW + 600, "iss": ISSUER});
        let with_header = |header: &str| {
            format!(
                "{}.{}.c2ln",
                enc.encode(header),
                enc.encode(good_claims.to_string())
            )
        };
        let cases: Vec<(String, Precheck)> = vec![
            (String::new(), Precheck::Size),
            ("a".repeat(MAX_TOKEN_BYTES + 1), Precheck::Size),
            ("not-a-jwt".into(), Precheck::Shape),
            ("a.b".into(), Precheck::Shape),
            ("a.b.c.d".into(), Precheck::Shape),
            ("e30..c2ln".into(), Precheck::Shape),
            ("e30.e30.".into(), Precheck::Shape),
            ("e3=0.e30.c2ln".into(), Precheck::Shape),
            ("%%%.e30.c2ln".into(), Precheck::Shape),
            (with_header("{}"), Precheck::Header),
            (with_header(r#"{"alg":"none"}"#), Precheck::Header),
            (with_header("[1,2]"), Precheck::Header),
            (jwt(serde_json::json!({"exp": NOW + 600})), Precheck::Claims),
            (
                jwt(serde_json::json!({"aud": "keybroker"})),
                Precheck::Claims,
            ),
            (
                jwt(serde_json::json!({"aud": "keybroker", "exp": "soon"})),
                Precheck::Claims,
            ),
            (
                jwt(serde_json::json!({"aud": "keybroker", "exp": -5})),
                Precheck::Claims,
            ),
            (
                jwt(serde_json::json!({"aud": ["api"], "exp": NOW + 600, "iss": ISSUER})),
                Precheck::Audience,
            ),
            (
                jwt(serde_json::json!({"aud": "keybroker", "exp": NOW - 61, "iss": ISSUER})),
                Precheck::Expired,
            ),
            (
                jwt(
                    serde_json::json!({"aud": "keybroker", "exp": NOW + 600, "iss": "https://evil"}),
                ),
                Precheck::Issuer,
            ),
            (
                jwt(serde_json::json!({"aud": "keybroker", "exp": NOW + 600})),
                Precheck::Issuer,
            ),
        ];
        for (token, want) in cases {
            assert_eq!(
                precheck(&token, &expect(Some(ISSUER))),
                Err(want),
                "{}",
                &token[..token.len().min(80)]
            );
        }
        // Within the leeway an expired token is still asked about (clocks differ).
        let skewed = jwt(serde_json::json!({"aud": "keybroker", "exp": NOW - 30, "iss": ISSUER}));
        assert!(precheck(&skewed, &expect(Some(ISSUER))).is_ok());
    }

    #[test]
    fn the_refusal_cache_stays_bounded() {
        let map: Mutex<HashMap<[u8; 32], ((), Instant)>> = Mutex::default();
        let now = Instant::now();
        for i in 0..(MAX_CACHE_ENTRIES + 100) {
            let mut key = [0u8; 32];
            key[..8].copy_from_slice(&(i as u64).to_le_bytes());
            store(&map, key, ((), now + Duration::from_secs(60)), now);
        }
        assert_eq!(map.lock().unwrap().len(), MAX_CACHE_ENTRIES);
        // Expired entries make room.
        let later = now + Duration::from_secs(61);
        store(&map, [1; 32], ((), later + Duration::from_secs(60)), later);
        assert_eq!(map.lock().unwrap().len(), 1);
    }
}

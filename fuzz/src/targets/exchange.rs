//! The broker's side of an exchange: the request body as `POST /v1/exchange` parses it, the
//! STS session name made of the caller's identity, and the bearer token's pre-check.

use keybroker_contract::wire::ExchangeRequest;
use keybroker_operator::broker::authn;
use keybroker_operator::broker::authz::{PodIdentity, role_session_name};
use keybroker_operator::broker::server::MAX_BODY_BYTES;

use crate::Target;

pub const REQUEST: Target = Target {
    name: "exchange-request",
    about: "POST /v1/exchange body -> ExchangeRequest, STS session name (broker)",
    run: request,
    seeds: request_seeds,
    dictionary: &[
        "\"apiKey\":",
        "\"uploader\"",
        "\\u0000",
        "\\ud800",
        "null",
        "[]",
        "{}",
    ],
    max_len: MAX_BODY_BYTES,
};

pub const TOKEN_PRECHECK: Target = Target {
    name: "token-precheck",
    about: "bearer token -> JWT structural pre-check (broker authn)",
    run: token,
    seeds: token_seeds,
    dictionary: &[
        ".",
        "eyJhbGciOiJFUzI1NiJ9",
        "eyJleHAiOjQxMDI0NDQ4MDB9",
        "eyJleHAiOi0xfQ",
        "eyJleHAiOjEuNWUzMDh9",
        "=",
    ],
    max_len: authn::MAX_TOKEN_BYTES,
};

fn request(body: &[u8]) {
    if body.len() > MAX_BODY_BYTES {
        return; // refused before any parse
    }
    let Ok(parsed) = serde_json::from_slice::<ExchangeRequest>(body) else {
        return;
    };
    // What the broker echoes back and logs must survive a round trip unchanged.
    let again = serde_json::to_vec(&parsed).unwrap_or_default();
    assert_eq!(
        serde_json::from_slice::<ExchangeRequest>(&again)
            .ok()
            .as_ref(),
        Some(&parsed),
        "an ExchangeRequest does not survive a round trip"
    );
    // The session name is made of names the caller influences; STS takes [\w+=,.@-]{2,64}.
    let (namespace, pod) = parsed
        .api_key
        .split_once('/')
        .unwrap_or((parsed.api_key.as_str(), "pod"));
    let name = role_session_name(&PodIdentity {
        namespace: namespace.to_owned(),
        service_account: "default".into(),
        pod_name: pod.to_owned(),
        pod_uid: "uid".into(),
    });
    assert!(
        (2..=64).contains(&name.len())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c)),
        "role_session_name gave {name:?}, which STS refuses"
    );
}

fn request_seeds() -> Vec<Vec<u8>> {
    [
        r#"{"apiKey":"uploader"}"#,
        r#"{"apiKey":"team-a/some.pod-name"}"#,
        r#"{"apiKey":"\u00e9\u0000x","extra":[1,2,{"a":null}]}"#,
        r#"{"apiKey":"uploader","apiKey":"other"}"#,
        r#"{"apiKey":7}"#,
        r#"{"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

/// The broker's structural JWT pre-check (shape, audience, expiry, issuer), run on every bearer
/// token before any TokenReview. Oracles: no panic, the time bound, and a token it lets through
/// has the three parts and the unexpired `exp` it claims to have checked.
pub fn precheck(token: &str) {
    let expect = authn::Expect {
        audience: keybroker_contract::wire::AUDIENCE,
        issuer: Some("https://127.0.0.1:6443"),
        now_unix: 1_900_000_000,
    };
    if let Ok(claims) = authn::precheck(token, &expect) {
        assert_eq!(
            token.split('.').count(),
            3,
            "let through a token that is not a JWT"
        );
        assert!(
            claims.expires.saturating_add(3600) > expect.now_unix,
            "let through a token that expired long ago"
        );
    }
    let _ = std::hint::black_box(authn::precheck(
        token,
        &authn::Expect {
            issuer: None,
            ..expect
        },
    ));
}

fn token(bytes: &[u8]) {
    if bytes.len() > authn::MAX_TOKEN_BYTES {
        return;
    }
    // A bearer token comes from a header value the broker read as text.
    if let Ok(token) = std::str::from_utf8(bytes) {
        precheck(token);
    }
}

fn token_seeds() -> Vec<Vec<u8>> {
    [
        // {"alg":"ES256"} . {"exp":4102444800,"aud":["keybroker"]} . sig
        "eyJhbGciOiJFUzI1NiJ9.eyJleHAiOjQxMDI0NDQ4MDAsImF1ZCI6WyJrZXlicm9rZXIiXX0.c2ln",
        // payload {"exp":1}: expired
        "eyJhbGciOiJFUzI1NiJ9.eyJleHAiOjF9.c2ln",
        // payload padded with '='
        "eyJhbGciOiJFUzI1NiJ9.eyJleHAiOjQxMDI0NDQ4MDB9==.c2ln",
        "not-a-jwt",
        "..",
        "a.%%%.b",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

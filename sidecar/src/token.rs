//! What the app of an oauth2 ApiKey sees: the broker's access token checked once, then rendered
//! into `<output-dir>/<apikey>/{token,token.json,expiration}`. Pure, like `files.rs`, and using
//! nothing else of this crate, so it can be compiled into the fuzz targets by path as that is.
//!
//! `token` holds the bare token without a newline, so that a reader that takes the file whole
//! sends exactly the token (`$(cat …)` would strip a newline, most libraries would not).

use std::fmt;

use jiff::Timestamp;
use keybroker_contract::wire::AccessToken;
use serde::Serialize;

pub use keybroker_contract::files::{EXPIRATION, TOKEN, TOKEN_JSON};

/// Upper bounds on what the broker may send: room for a JWT with many claims, and the ApiKey
/// CRD's own limits on scopes and audiences (64 of each, at most 512 bytes), so that a broken
/// broker cannot fill the pod's memory-backed volume.
const MAX_TOKEN: usize = 16 * 1024;
const MAX_ENTRIES: usize = 64;
const MAX_ENTRY: usize = 512;

/// Why an access token from the broker was not accepted. Names the field, never its value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("the broker sent an invalid {field}: {why}")]
    Invalid {
        field: &'static str,
        why: &'static str,
    },
}

/// An access token that passed [`validate`]: safe as an HTTP header value and in a JSON
/// string, its scopes safe to join with spaces. `Debug` hides the token.
#[derive(Clone, PartialEq, Eq)]
pub struct Valid {
    token: String,
    scope: Vec<String>,
    audience: Vec<String>,
    pub expiration: Timestamp,
}

impl fmt::Debug for Valid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Valid")
            .field("token", &"<redacted>")
            .field("scope", &self.scope)
            .field("audience", &self.audience)
            .field("expiration", &self.expiration)
            .finish()
    }
}

/// Checks what the broker sent before any of it reaches a file: a newline in the token would
/// let the broker (or whoever speaks for it) inject a header into every call the app makes,
/// a space in a scope would split it in two.
pub fn validate(t: &AccessToken) -> Result<Valid, Error> {
    let invalid = |field, why| Error::Invalid { field, why };
    let token = &t.access_token;
    if token.is_empty() || token.len() > MAX_TOKEN {
        return Err(invalid(
            "token.accessToken",
            "is empty or longer than 16 KiB",
        ));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            "token.accessToken",
            "contains whitespace, control or non-ASCII characters",
        ));
    }
    if !t.token_type.eq_ignore_ascii_case("Bearer") {
        return Err(invalid("token.tokenType", "is not Bearer"));
    }
    let expiration = t
        .expiration
        .parse::<Timestamp>()
        .map_err(|_| invalid("token.expiration", "is not an RFC 3339 timestamp"))?;
    for (field, entries) in [("token.scope", &t.scope), ("token.audience", &t.audience)] {
        if entries.len() > MAX_ENTRIES {
            return Err(invalid(field, "has more than 64 entries"));
        }
        if !entries.iter().all(|e| is_entry(e)) {
            return Err(invalid(
                field,
                "has an entry that is empty, longer than 512 bytes, or not printable ASCII without spaces, quotes and backslashes",
            ));
        }
    }
    Ok(Valid {
        token: token.clone(),
        scope: t.scope.clone(),
        audience: t.audience.clone(),
        expiration,
    })
}

/// A scope or audience as RFC 6749 writes a scope token (printable ASCII but space, `"` and
/// `\`), which is also all the broker's compiler lets through.
fn is_entry(e: &str) -> bool {
    !e.is_empty()
        && e.len() <= MAX_ENTRY
        && e.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
}

/// The files of one generation, in the order they are written.
pub fn render(v: &Valid) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (TOKEN, v.token.clone().into_bytes()),
        (TOKEN_JSON, token_json(v)),
        (
            EXPIRATION,
            format!("{}\n", rfc3339(v.expiration)).into_bytes(),
        ),
    ]
}

/// Everything a client needs to decide whether the token fits a call; `scope` space-separated
/// as OAuth2 writes it, `type` always `Bearer`, whatever case the provider used.
fn token_json(v: &Valid) -> Vec<u8> {
    #[derive(Serialize)]
    struct Json<'a> {
        token: &'a str,
        r#type: &'static str,
        expiration: String,
        scope: String,
        audience: &'a [String],
    }
    let mut out = serde_json::to_vec(&Json {
        token: &v.token,
        r#type: "Bearer",
        expiration: rfc3339(v.expiration),
        scope: v.scope.join(" "),
        audience: &v.audience,
    })
    .unwrap_or_default();
    out.push(b'\n');
    out
}

/// RFC 3339 in UTC with whole seconds, as `files.rs` writes it for AWS credentials.
fn rfc3339(t: Timestamp) -> String {
    format!("{:.0}", t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> AccessToken {
        AccessToken {
            access_token: "eyJhbGciOi.eyJzdWIiOi-_.c2ln+/=".into(),
            token_type: "bearer".into(),
            expiration: "2026-01-01T01:15:00.5+01:00".into(),
            scope: vec!["reports:read".into(), "reports:write".into()],
            audience: vec!["reports-api".into(), "https://api.example.com/".into()],
        }
    }

    #[test]
    fn the_files_are_the_bare_token_its_json_and_the_expiration() {
        let files = render(&validate(&token()).unwrap());
        assert_eq!(
            files,
            vec![
                ("token", b"eyJhbGciOi.eyJzdWIiOi-_.c2ln+/=".to_vec()),
                (
                    "token.json",
                    b"{\"token\":\"eyJhbGciOi.eyJzdWIiOi-_.c2ln+/=\",\"type\":\"Bearer\",\
                      \"expiration\":\"2026-01-01T00:15:00Z\",\"scope\":\"reports:read reports:write\",\
                      \"audience\":[\"reports-api\",\"https://api.example.com/\"]}\n"
                        .to_vec()
                ),
                ("expiration", b"2026-01-01T00:15:00Z\n".to_vec()),
            ]
        );
    }

    #[test]
    fn no_scope_or_audience_renders_empty() {
        let mut t = token();
        t.scope.clear();
        t.audience.clear();
        let files = render(&validate(&t).unwrap());
        assert_eq!(
            files[1].1,
            b"{\"token\":\"eyJhbGciOi.eyJzdWIiOi-_.c2ln+/=\",\"type\":\"Bearer\",\
              \"expiration\":\"2026-01-01T00:15:00Z\",\"scope\":\"\",\"audience\":[]}\n"
        );
    }

    #[test]
    fn each_bad_field_is_refused_by_name_without_echoing_it() {
        let with = |change: fn(&mut AccessToken)| {
            let mut t = token();
            change(&mut t);
            t
        };
        for (field, secret, broken) in [
            ("token.accessToken", "", with(|t| t.access_token.clear())),
            (
                "token.accessToken",
                "SeCrEt\r\nX-Evil: 1",
                with(|t| t.access_token = "SeCrEt\r\nX-Evil: 1".into()),
            ),
            (
                "token.accessToken",
                "SeCrEt tok",
                with(|t| t.access_token = "SeCrEt tok".into()),
            ),
            (
                "token.accessToken",
                "SeCrEt\u{e9}",
                with(|t| t.access_token = "SeCrEt\u{e9}".into()),
            ),
            (
                "token.tokenType",
                "MAC",
                with(|t| t.token_type = "MAC".into()),
            ),
            ("token.tokenType", "", with(|t| t.token_type.clear())),
            (
                "token.expiration",
                "tomorrow",
                with(|t| t.expiration = "tomorrow".into()),
            ),
            ("token.scope", "a b", with(|t| t.scope.push("a b".into()))),
            ("token.scope", "", with(|t| t.scope.push(String::new()))),
            (
                "token.scope",
                "q\"uote",
                with(|t| t.scope.push("q\"uote".into())),
            ),
            (
                "token.audience",
                "evil\naud",
                with(|t| t.audience.push("evil\naud".into())),
            ),
            (
                "token.audience",
                "back\\slash",
                with(|t| t.audience.push("back\\slash".into())),
            ),
        ] {
            let err = validate(&broken).unwrap_err();
            let Error::Invalid { field: got, .. } = &err;
            assert_eq!(*got, field, "{secret:?}");
            let shown = err.to_string();
            assert!(shown.contains(field), "{shown}");
            assert!(secret.is_empty() || !shown.contains(secret), "{shown}");
        }
    }

    #[test]
    fn sizes_are_bounded() {
        let mut t = token();
        t.access_token = "x".repeat(MAX_TOKEN);
        assert!(validate(&t).is_ok());
        t.access_token.push('x');
        assert_eq!(
            validate(&t).unwrap_err(),
            Error::Invalid {
                field: "token.accessToken",
                why: "is empty or longer than 16 KiB"
            }
        );
        // The list a field names.
        fn list<'a>(t: &'a mut AccessToken, field: &str) -> &'a mut Vec<String> {
            if field == "token.scope" {
                &mut t.scope
            } else {
                &mut t.audience
            }
        }
        for field in ["token.scope", "token.audience"] {
            let mut t = token();
            *list(&mut t, field) = vec!["a".repeat(MAX_ENTRY); MAX_ENTRIES];
            assert!(validate(&t).is_ok(), "{field}");
            let mut longer = t.clone();
            list(&mut longer, field)[0].push('a');
            let Err(Error::Invalid { field: got, .. }) = validate(&longer) else {
                panic!("{field}: an entry of {} bytes passed", MAX_ENTRY + 1);
            };
            assert_eq!(got, field);
            list(&mut t, field).push("a".into());
            assert_eq!(
                validate(&t).unwrap_err(),
                Error::Invalid {
                    field,
                    why: "has more than 64 entries"
                }
            );
        }
    }

    #[test]
    fn debug_hides_the_token() {
        let shown = format!("{:?}", validate(&token()).unwrap());
        assert!(
            shown.contains("reports:read") && shown.contains("reports-api"),
            "{shown}"
        );
        assert!(!shown.contains("eyJ"), "{shown}");
    }
}

//! What the app sees: the broker's credentials checked once, then rendered into the files of
//! `<output-dir>/<apikey>/` and the AWS container-credentials answer. Pure: values in, bytes out.
//!
//! Every file is complete on its own (each carries the whole key id / secret / token triple), so
//! an app never needs to combine two files to get a usable set.

use std::fmt;

use jiff::Timestamp;
use keybroker_contract::wire::Credentials;
use serde::Serialize;

pub use keybroker_contract::files::{CREDENTIALS, CREDENTIALS_JSON, EXPIRATION};

/// Upper bounds on what the broker may send: generous for AWS (session tokens reach ~2 KiB)
/// and small enough that a broken broker cannot fill the pod's memory-backed volume.
const MAX_KEY_ID: usize = 128;
const MAX_SECRET: usize = 1024;
const MAX_SESSION_TOKEN: usize = 16 * 1024;

/// Why a credential from the broker was not accepted. Names the field, never its value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("the broker sent an invalid {field}: {why}")]
    Invalid {
        field: &'static str,
        why: &'static str,
    },
}

/// Credentials that passed [`validate`]: safe to put in an INI line, a JSON string and an HTTP
/// answer. `Debug` hides the secret parts.
#[derive(Clone, PartialEq, Eq)]
pub struct Valid {
    pub access_key_id: String,
    secret_access_key: String,
    session_token: String,
    pub expiration: Timestamp,
}

impl fmt::Debug for Valid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Valid")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("session_token", &"<redacted>")
            .field("expiration", &self.expiration)
            .finish()
    }
}

/// Checks what the broker sent before any of it reaches a file: a newline in a secret would
/// otherwise let the broker (or whoever speaks for it) inject INI keys.
pub fn validate(c: &Credentials) -> Result<Valid, Error> {
    let invalid = |field, why| Error::Invalid { field, why };
    let id = &c.access_key_id;
    if id.is_empty() || id.len() > MAX_KEY_ID || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(invalid(
            "accessKeyId",
            "must be 1 to 128 ASCII letters and digits",
        ));
    }
    for (field, value, max) in [
        ("secretAccessKey", &c.secret_access_key, MAX_SECRET),
        ("sessionToken", &c.session_token, MAX_SESSION_TOKEN),
    ] {
        if value.is_empty() || value.len() > max {
            return Err(invalid(field, "is empty or too long"));
        }
        if !value.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid(
                field,
                "contains whitespace, control or non-ASCII characters",
            ));
        }
    }
    let expiration = c
        .expiration
        .parse::<Timestamp>()
        .map_err(|_| invalid("expiration", "is not an RFC 3339 timestamp"))?;
    Ok(Valid {
        access_key_id: id.clone(),
        secret_access_key: c.secret_access_key.clone(),
        session_token: c.session_token.clone(),
        expiration,
    })
}

/// The files of one generation, in the order they are written.
pub fn render(v: &Valid) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (CREDENTIALS, shared_credentials(v).into_bytes()),
        (CREDENTIALS_JSON, credential_process(v)),
        (
            EXPIRATION,
            format!("{}\n", rfc3339(v.expiration)).into_bytes(),
        ),
    ]
}

/// The AWS shared-credentials file (`AWS_SHARED_CREDENTIALS_FILE`), profile `default`.
fn shared_credentials(v: &Valid) -> String {
    format!(
        "# Written by keybroker-sidecar; expires {}. Do not edit: replaced on every refresh.\n\
         [default]\n\
         aws_access_key_id = {}\n\
         aws_secret_access_key = {}\n\
         aws_session_token = {}\n",
        rfc3339(v.expiration),
        v.access_key_id,
        v.secret_access_key,
        v.session_token
    )
}

/// The `credential_process` output format (`credential_process = cat …/credentials.json`).
fn credential_process(v: &Valid) -> Vec<u8> {
    #[derive(Serialize)]
    #[serde(rename_all = "PascalCase")]
    struct Process<'a> {
        version: u8,
        access_key_id: &'a str,
        secret_access_key: &'a str,
        session_token: &'a str,
        expiration: String,
    }
    let mut out = serde_json::to_vec(&Process {
        version: 1,
        access_key_id: &v.access_key_id,
        secret_access_key: &v.secret_access_key,
        session_token: &v.session_token,
        expiration: rfc3339(v.expiration),
    })
    .unwrap_or_default();
    out.push(b'\n');
    out
}

/// The answer of the AWS container-credentials endpoint
/// (`AWS_CONTAINER_CREDENTIALS_FULL_URI`), which SDKs poll by themselves before expiry.
pub fn container_credentials(v: &Valid) -> Vec<u8> {
    #[derive(Serialize)]
    #[serde(rename_all = "PascalCase")]
    struct Container<'a> {
        access_key_id: &'a str,
        secret_access_key: &'a str,
        token: &'a str,
        expiration: String,
    }
    serde_json::to_vec(&Container {
        access_key_id: &v.access_key_id,
        secret_access_key: &v.secret_access_key,
        token: &v.session_token,
        expiration: rfc3339(v.expiration),
    })
    .unwrap_or_default()
}

/// RFC 3339 in UTC with whole seconds (`2026-01-01T00:00:00Z`), which every SDK parses.
fn rfc3339(t: Timestamp) -> String {
    format!("{:.0}", t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds() -> Credentials {
        Credentials {
            access_key_id: "ASIAEXAMPLE123".into(),
            secret_access_key: "se/cr+et=KEY".into(),
            session_token: "tok.en+/=".into(),
            expiration: "2026-01-01T00:15:00.5Z".into(),
        }
    }

    #[test]
    fn the_ini_file_has_the_default_profile_and_nothing_else() {
        let v = validate(&creds()).unwrap();
        let files = render(&v);
        let ini = String::from_utf8(files[0].1.clone()).unwrap();
        assert_eq!(files[0].0, "credentials");
        assert_eq!(
            ini,
            "# Written by keybroker-sidecar; expires 2026-01-01T00:15:00Z. Do not edit: replaced on every refresh.\n\
             [default]\n\
             aws_access_key_id = ASIAEXAMPLE123\n\
             aws_secret_access_key = se/cr+et=KEY\n\
             aws_session_token = tok.en+/=\n"
        );
    }

    #[test]
    fn credentials_json_is_the_credential_process_format() {
        let v = validate(&creds()).unwrap();
        let files = render(&v);
        assert_eq!(files[1].0, "credentials.json");
        let json: serde_json::Value = serde_json::from_slice(&files[1].1).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "Version": 1,
                "AccessKeyId": "ASIAEXAMPLE123",
                "SecretAccessKey": "se/cr+et=KEY",
                "SessionToken": "tok.en+/=",
                "Expiration": "2026-01-01T00:15:00Z"
            })
        );
        assert_eq!(files[2], ("expiration", b"2026-01-01T00:15:00Z\n".to_vec()));
    }

    #[test]
    fn the_container_answer_uses_the_sdk_field_names() {
        let v = validate(&creds()).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&container_credentials(&v)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "AccessKeyId": "ASIAEXAMPLE123",
                "SecretAccessKey": "se/cr+et=KEY",
                "Token": "tok.en+/=",
                "Expiration": "2026-01-01T00:15:00Z"
            })
        );
    }

    #[test]
    fn values_that_could_inject_ini_lines_or_break_json_are_refused_without_echoing_them() {
        for (field, broken) in [
            ("secretAccessKey", {
                let mut c = creds();
                c.secret_access_key = "abc\n[evil]".into();
                c
            }),
            ("sessionToken", {
                let mut c = creds();
                c.session_token = "t o k".into();
                c
            }),
            ("sessionToken", {
                let mut c = creds();
                c.session_token = String::new();
                c
            }),
            ("accessKeyId", {
                let mut c = creds();
                c.access_key_id = "AKIA=x".into();
                c
            }),
            ("expiration", {
                let mut c = creds();
                c.expiration = "tomorrow".into();
                c
            }),
        ] {
            let err = validate(&broken).unwrap_err();
            let Error::Invalid { field: got, .. } = &err;
            assert_eq!(*got, field);
            let shown = err.to_string();
            assert!(
                !shown.contains("evil") && !shown.contains("t o k"),
                "{shown}"
            );
        }
        let mut long = creds();
        long.session_token = "x".repeat(MAX_SESSION_TOKEN + 1);
        assert!(validate(&long).is_err());
    }

    #[test]
    fn debug_hides_the_secret_parts() {
        let shown = format!("{:?}", validate(&creds()).unwrap());
        assert!(shown.contains("ASIAEXAMPLE123"));
        assert!(
            !shown.contains("se/cr") && !shown.contains("tok.en"),
            "{shown}"
        );
    }
}

//! The contract between keybroker's operator (broker and webhook) and its sidecar, defined once
//! so both sides change together: the exchange protocol's wire types, the environment the
//! webhook sets and the sidecar reads, its loopback ports and URL paths, the file names apps
//! read, and what a valid ApiKey name is (names become directory names and URL segments).
//!
//! Small on purpose: the sidecar depends on it and its size is measured.

pub mod wire;

/// Environment variables the webhook sets on the sidecar container and the sidecar reads.
pub mod env {
    pub const BROKER_URL: &str = "KEYBROKER_BROKER_URL";
    pub const BROKER_CA: &str = "KEYBROKER_BROKER_CA";
    pub const BROKER_CA_FILE: &str = "KEYBROKER_BROKER_CA_FILE";
    pub const API_KEYS: &str = "KEYBROKER_API_KEYS";
    pub const TOKEN_FILE: &str = "KEYBROKER_TOKEN_FILE";
    pub const OUTPUT_DIR: &str = "KEYBROKER_OUTPUT_DIR";
    pub const FILE_MODE: &str = "KEYBROKER_FILE_MODE";
    pub const CREDENTIALS_ADDR: &str = "KEYBROKER_CREDENTIALS_ADDR";
    pub const HEALTH_ADDR: &str = "KEYBROKER_HEALTH_ADDR";
    pub const GATEWAY_ADDR: &str = "KEYBROKER_GATEWAY_ADDR";
    pub const REFRESH_FRACTION: &str = "KEYBROKER_REFRESH_FRACTION";
    pub const LOG_LEVEL: &str = "KEYBROKER_LOG_LEVEL";
    /// The app's loopback URL told of new credentials (see [`crate::reload`]).
    pub const RELOAD_URL: &str = "KEYBROKER_RELOAD_URL";
}

/// The sidecar's default ports: credentials and the gateway on loopback, health on the pod IP
/// (probes).
pub mod ports {
    pub const CREDENTIALS: u16 = 9911;
    pub const HEALTH: u16 = 9912;
    /// Loopback: gateway ApiKeys, `http://127.0.0.1:9913/<apikey>/<upstream path>`.
    pub const GATEWAY: u16 = 9913;
}

/// URL paths, on the broker and on the sidecar.
pub mod paths {
    /// Broker: `POST`, body [`crate::wire::ExchangeRequest`].
    pub const EXCHANGE: &str = "/v1/exchange";
    /// Broker: `GET ?apiKey=&grant=&waitSeconds=`, the revocation long-poll.
    pub const REVOCATIONS: &str = "/v1/revocations";
    /// Gateway: every forwarded call, `<FORWARD><upstream path>`, with the session as bearer.
    pub const FORWARD: &str = "/v1/forward";
    /// Sidecar: `GET /v1/credentials/<apikey>`, the AWS container-credentials endpoint.
    pub const CREDENTIALS_PREFIX: &str = "/v1/credentials/";
    /// Sidecar health: passes once the first credentials of every ApiKey are written.
    pub const STARTUPZ: &str = "/startupz";
    pub const LIVEZ: &str = "/livez";
    pub const METRICS: &str = "/metrics";
}

/// The header on the gateway's refusals naming their reason, so the sidecar can react (fetch a
/// new session) without reading the body it streams to the app.
pub const REFUSAL_HEADER: &str = "x-keybroker-refusal";

/// File names under the sidecar's output directory.
pub mod files {
    /// In `<output-dir>/<apikey>/`: the AWS shared-credentials file.
    pub const CREDENTIALS: &str = "credentials";
    /// In `<output-dir>/<apikey>/`: the `credential_process` JSON.
    pub const CREDENTIALS_JSON: &str = "credentials.json";
    /// In `<output-dir>/<apikey>/`: the expiry (RFC 3339), for every kind that writes files.
    pub const EXPIRATION: &str = "expiration";
    /// In `<output-dir>/<apikey>/` (oauth2): the bare access token, for
    /// `Authorization: Bearer $(cat …/token)`.
    pub const TOKEN: &str = "token";
    /// In `<output-dir>/<apikey>/` (oauth2): `{"token", "type", "expiration", "scope",
    /// "audience"}`, scope space-separated as in OAuth2, audience a list.
    pub const TOKEN_JSON: &str = "token.json";
    /// In `<output-dir>/`: the token the container-credentials endpoint asks for. ApiKey names
    /// cannot start with `.`, so it never collides with an ApiKey's directory.
    pub const AUTH_TOKEN: &str = ".auth-token";
}

/// True for a valid ApiKey name: a DNS-1123 subdomain, as Kubernetes requires of object names.
/// Names become directory names and URL path segments, so `..`, `/` and leading dots never
/// pass.
pub fn is_api_key_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_key_names_are_dns_subdomains() {
        for good in ["a", "uploader", "team-a.reports", "x1", &"a".repeat(253)] {
            assert!(is_api_key_name(good), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".auth-token",
            "a/b",
            "A",
            "-a",
            "a-",
            "a..b",
            "a_b",
            "a b",
            &"a".repeat(254),
        ] {
            assert!(!is_api_key_name(bad), "{bad:?}");
        }
    }
}

/// Reload notifications: the pod annotation [`reload::ANNOTATION`] names a loopback URL of the
/// app that the sidecar POSTs to after each new credential generation, so apps that build a
/// client once can rebuild it. The webhook refuses a URL this does not accept; the sidecar
/// checks it again.
pub mod reload {
    /// The pod annotation, e.g. `keybroker.dev/reload-url: http://127.0.0.1:8080/-/reload`.
    pub const ANNOTATION: &str = "keybroker.dev/reload-url";
    /// Longest URL accepted.
    pub const MAX_URL: usize = 256;

    /// Where the notification goes: a port on the pod's loopback and a path.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct Target {
        pub port: u16,
        pub path: String,
    }

    /// Parses `http://127.0.0.1:<port>/<path>` (or `localhost`); the message says what to
    /// change.
    pub fn parse(url: &str) -> Result<Target, String> {
        let refuse = |why: &str| {
            Err(format!(
                "{ANNOTATION} must be http://127.0.0.1:<port>/<path>, a URL of the pod itself: {why}"
            ))
        };
        if url.len() > MAX_URL {
            return refuse(&format!("it is longer than {MAX_URL} characters"));
        }
        if !url.bytes().all(|b| b.is_ascii_graphic()) {
            return refuse("it holds spaces or characters outside printable ASCII");
        }
        let Some(rest) = url.strip_prefix("http://") else {
            return refuse("it does not start with http://");
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, "/"),
        };
        let Some((host, port)) = authority.rsplit_once(':') else {
            return refuse("it names no port");
        };
        if host != "127.0.0.1" && host != "localhost" {
            return refuse(&format!("host {host:?} is not 127.0.0.1 or localhost"));
        }
        match port.parse::<u16>() {
            Ok(port) if port > 0 => Ok(Target {
                port,
                path: path.to_owned(),
            }),
            _ => refuse(&format!("port {port:?} is not a number from 1 to 65535")),
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn only_loopback_http_urls_with_a_port_pass() {
            assert_eq!(
                parse("http://127.0.0.1:8080/-/reload"),
                Ok(Target {
                    port: 8080,
                    path: "/-/reload".into()
                })
            );
            assert_eq!(parse("http://localhost:9/").map(|t| t.port), Ok(9));
            assert_eq!(parse("http://127.0.0.1:80").map(|t| t.path), Ok("/".into()));
            for bad in [
                "https://127.0.0.1:8080/",
                "http://10.0.0.1:8080/",
                "http://metadata.google.internal:80/",
                "http://127.0.0.1.nip.io:80/",
                "http://127.0.0.1/",
                "http://127.0.0.1:0/",
                "http://127.0.0.1:99999/",
                "http://127.0.0.1:80/a b",
                "http://user@127.0.0.1:80/",
            ] {
                let refused = parse(bad).unwrap_err();
                assert!(refused.contains(ANNOTATION), "{bad}: {refused}");
            }
            assert!(parse(&format!("http://127.0.0.1:80/{}", "a".repeat(300))).is_err());
        }
    }
}

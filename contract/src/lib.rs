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

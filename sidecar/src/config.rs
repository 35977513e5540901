//! Command line and environment (what the webhook injects), checked once at start so that a
//! misconfigured sidecar fails its container with a message that says what to fix.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use keybroker_contract::{env, ports};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "keybroker sidecar: keeps short-lived scoped credentials on a tmpfs volume",
    long_about = "keybroker sidecar: exchanges the pod's projected service-account token at the \
keybroker broker for short-lived credentials, writes them atomically under the output directory \
(<dir>/<apikey>/credentials, credentials.json and expiration for AWS ApiKeys; token, token.json and \
expiration for OAuth2 ones), refreshes them before expiry, removes them on revocation, expiry and \
SIGTERM, and serves AWS credentials to SDKs on a loopback container-credentials endpoint."
)]
pub struct Args {
    /// The broker's HTTPS URL.
    #[arg(long, env = env::BROKER_URL)]
    pub broker_url: String,
    /// PEM of the CA that signed the broker's certificate (inline).
    #[arg(long, env = env::BROKER_CA, conflicts_with = "broker_ca_file")]
    pub broker_ca: Option<String>,
    /// File holding the PEM of the CA that signed the broker's certificate.
    #[arg(long, env = env::BROKER_CA_FILE)]
    pub broker_ca_file: Option<PathBuf>,
    /// The projected service-account token (audience keybroker); re-read for every request.
    #[arg(
        long,
        env = env::TOKEN_FILE,
        default_value = "/var/run/secrets/keybroker/token"
    )]
    pub token_file: PathBuf,
    /// ApiKey names, comma-separated.
    #[arg(
        long,
        env = env::API_KEYS,
        value_delimiter = ',',
        required = true
    )]
    pub api_keys: Vec<String>,
    /// Where `<apikey>/` directories and `.auth-token` are written.
    #[arg(
        long,
        env = env::OUTPUT_DIR,
        default_value = "/var/run/keybroker"
    )]
    pub output_dir: PathBuf,
    /// Mode of the credential files, octal; read bits only (0440 for owner + fsGroup).
    #[arg(long, env = env::FILE_MODE, default_value = "0440")]
    pub file_mode: String,
    /// The AWS container-credentials endpoint; loopback only.
    #[arg(
        long,
        env = env::CREDENTIALS_ADDR,
        default_value_t = SocketAddr::from(([127, 0, 0, 1], ports::CREDENTIALS))
    )]
    pub credentials_addr: SocketAddr,
    /// The local gateway for gateway ApiKeys (`/<apikey>/<path>`); loopback only. The webhook
    /// sets it for pods with a gateway ApiKey; without it no gateway port is opened.
    #[arg(long, env = env::GATEWAY_ADDR)]
    pub gateway_addr: Option<SocketAddr>,
    /// /startupz, /livez and /metrics (probed by the kubelet from the pod IP).
    #[arg(long, env = env::HEALTH_ADDR, default_value_t = SocketAddr::from(([0, 0, 0, 0], ports::HEALTH)))]
    pub health_addr: SocketAddr,
    /// Refresh after this fraction of the credentials' lifetime (or sooner if the broker says).
    #[arg(long, env = env::REFRESH_FRACTION, default_value_t = 2.0 / 3.0)]
    pub refresh_fraction: f64,
    /// The app's loopback URL (`http://127.0.0.1:<port>/<path>`) POSTed to after each new
    /// credential generation; from the pod's `keybroker.dev/reload-url`.
    #[arg(long, env = env::RELOAD_URL)]
    pub reload_url: Option<String>,
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, env = env::LOG_LEVEL, default_value = "info")]
    pub log_level: tracing::Level,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("--broker-url {0:?}: {1}")]
    BrokerUrl(String, &'static str),
    #[error("set the broker's CA with --broker-ca (PEM) or --broker-ca-file")]
    NoCa,
    #[error(
        "--api-keys: {0:?} is not a valid ApiKey name (lowercase letters, digits, '-' and '.', at most 253)"
    )]
    ApiKeyName(String),
    #[error("--api-keys names {0:?} twice")]
    DuplicateApiKey(String),
    #[error(
        "--file-mode {0:?}: give an octal mode that grants read only and includes the owner's, e.g. 0440 or 0444"
    )]
    FileMode(String),
    #[error(
        "--credentials-addr {0}: must be a loopback address, it serves credentials without TLS"
    )]
    NotLoopback(SocketAddr),
    #[error("--refresh-fraction {0}: must be above 0 and below 1")]
    RefreshFraction(String),
    #[error("--reload-url: {0}")]
    ReloadUrl(String),
}

/// Where the broker is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
    /// Path prefix without a trailing slash (usually empty).
    pub prefix: String,
}

/// Parses `https://host[:port][/prefix]`; plain HTTP is refused because the answer carries
/// secrets and the request carries the pod's identity.
pub fn broker_url(url: &str) -> Result<BrokerUrl, Error> {
    let bad = |why| Error::BrokerUrl(url.to_owned(), why);
    let uri: hyper::Uri = url.parse().map_err(|_| bad("not a URL"))?;
    if uri.scheme_str() != Some("https") {
        return Err(bad("must start with https://"));
    }
    let host = uri.host().ok_or_else(|| bad("has no host"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    if uri.query().is_some() {
        return Err(bad("must not have a query"));
    }
    Ok(BrokerUrl {
        host,
        port: uri.port_u16().unwrap_or(443),
        prefix: uri.path().trim_end_matches('/').to_owned(),
    })
}

/// Parses an octal file mode that grants read permission only, including the owner's.
pub fn file_mode(text: &str) -> Result<u32, Error> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    match u32::from_str_radix(digits, 8) {
        Ok(mode) if mode & !0o444 == 0 && mode & 0o400 != 0 => Ok(mode),
        _ => Err(Error::FileMode(text.to_owned())),
    }
}

/// Checks ApiKey names (DNS-1123 subdomains, as Kubernetes requires): they become directory
/// names, so `..`, `/` and leading dots must never get through.
pub fn api_keys(names: &[String]) -> Result<Vec<String>, Error> {
    let mut out: Vec<String> = Vec::with_capacity(names.len());
    for name in names.iter().map(|n| n.trim()) {
        let valid = keybroker_contract::is_api_key_name(name);
        if !valid {
            return Err(Error::ApiKeyName(name.to_owned()));
        }
        if out.iter().any(|n| n == name) {
            return Err(Error::DuplicateApiKey(name.to_owned()));
        }
        out.push(name.to_owned());
    }
    Ok(out)
}

pub fn credentials_addr(addr: SocketAddr) -> Result<SocketAddr, Error> {
    if addr.ip().is_loopback() {
        Ok(addr)
    } else {
        Err(Error::NotLoopback(addr))
    }
}

/// Checks the reload URL as the webhook did: loopback HTTP with a port only.
pub fn reload_url(url: &str) -> Result<keybroker_contract::reload::Target, Error> {
    keybroker_contract::reload::parse(url).map_err(Error::ReloadUrl)
}

pub fn refresh_fraction(f: f64) -> Result<f64, Error> {
    if f > 0.0 && f < 1.0 {
        Ok(f)
    } else {
        Err(Error::RefreshFraction(f.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        assert_eq!(
            broker_url("https://keybroker-broker.keybroker.svc:8443").unwrap(),
            BrokerUrl {
                host: "keybroker-broker.keybroker.svc".into(),
                port: 8443,
                prefix: String::new()
            }
        );
        let v6 = broker_url("https://[::1]/kb/").unwrap();
        assert_eq!(
            (v6.host.as_str(), v6.port, v6.prefix.as_str()),
            ("::1", 443, "/kb")
        );
        assert!(broker_url("http://broker:8443").is_err());
        assert!(broker_url("broker:8443").is_err());
    }

    #[test]
    fn file_modes_grant_read_only() {
        assert_eq!(file_mode("0440"), Ok(0o440));
        assert_eq!(file_mode("444"), Ok(0o444));
        assert_eq!(file_mode("0o400"), Ok(0o400));
        for bad in ["0640", "0044", "0777", "abc", "04440", ""] {
            assert!(file_mode(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn api_key_names_are_dns_subdomains() {
        assert_eq!(
            api_keys(&["uploader".into(), " photo.app-2".into()]).unwrap(),
            vec!["uploader", "photo.app-2"]
        );
        for bad in ["", "..", ".hidden", "a/b", "Upper", "-x", "a..b", "x-"] {
            assert!(api_keys(&[bad.into()]).is_err(), "{bad}");
        }
        assert!(api_keys(&["a".into(), "a".into()]).is_err());
    }

    #[test]
    fn the_credentials_endpoint_stays_on_loopback() {
        assert!(credentials_addr("127.0.0.1:9911".parse().unwrap()).is_ok());
        assert!(credentials_addr("[::1]:9911".parse().unwrap()).is_ok());
        assert!(credentials_addr("0.0.0.0:9911".parse().unwrap()).is_err());
    }

    #[test]
    fn the_default_refresh_fraction_is_two_thirds() {
        let args = Args::parse_from([
            "keybroker-sidecar",
            "--broker-url=https://b",
            "--api-keys=a,b",
        ]);
        assert!((args.refresh_fraction - 2.0 / 3.0).abs() < 1e-9);
        assert_eq!(args.api_keys, vec!["a", "b"]);
        assert!(refresh_fraction(0.0).is_err() && refresh_fraction(1.0).is_err());
    }
}

//! The broker client: HTTPS (rustls on aws-lc-rs, one CA), HTTP/1.1, one connection per
//! request. The sidecar talks to the broker a few times per refresh period, so pooling would
//! buy nothing; TLS session resumption keeps reconnects cheap.
//!
//! The pod's token is read from disk for every request: the kubelet rotates it in place.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, RETRY_AFTER};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use keybroker_contract::paths;
use keybroker_contract::wire::{ExchangeRequest, ExchangeResponse, Refusal, RevocationStatus};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::TlsConnector;

use crate::config::BrokerUrl;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Added to the long-poll's own wait for the answer to arrive.
const POLL_SLACK: Duration = Duration::from_secs(15);
const MAX_RESPONSE_BYTES: usize = 64 * 1024;
const MAX_TOKEN_BYTES: u64 = 64 * 1024;
/// Longest Retry-After honoured; a larger one is capped rather than trusted.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// Why a request to the broker failed. Messages carry paths, addresses and the broker's
/// refusal, never the token or a credential.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the broker CA {0}")]
    Ca(String),
    #[error("the broker host {0:?} is not a valid TLS server name")]
    ServerName(String),
    #[error("reading the service-account token {path}: {source}")]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the service-account token file {0} is empty or larger than 64 KiB")]
    TokenSize(PathBuf),
    #[error("connecting to the broker at {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS handshake with the broker at {addr}: {source}")]
    Tls {
        addr: String,
        source: std::io::Error,
    },
    #[error("talking to the broker: {0}")]
    Http(#[from] hyper::Error),
    #[error("the broker did not answer {0} in time")]
    Timeout(&'static str),
    #[error("the broker refused ({status} {}): {}", .refusal.reason, .refusal.message)]
    Refused {
        status: u16,
        refusal: Refusal,
        retry_after: Option<Duration>,
    },
    #[error("the broker answered {status} with a body that is not {expected} ({detail})")]
    Malformed {
        status: u16,
        expected: &'static str,
        detail: String,
    },
}

impl Error {
    /// Stable label for metrics: the broker's reason for refusals, a fixed name otherwise.
    pub fn reason(&self) -> String {
        match self {
            Error::Refused { refusal, .. } => label(&refusal.reason),
            Error::Token { .. } | Error::TokenSize(_) => "TokenUnreadable".into(),
            Error::Connect { .. } | Error::Tls { .. } | Error::Http(_) => {
                "BrokerUnreachable".into()
            }
            Error::Timeout(_) => "BrokerTimeout".into(),
            Error::Malformed { .. } => "MalformedResponse".into(),
            Error::Ca(_) | Error::ServerName(_) => "Misconfigured".into(),
        }
    }

    /// True when the broker decided this pod must not hold the ApiKey's credentials any more
    /// (revoked, deleted, pod or service account no longer allowed): a 403 it says will not
    /// change by retrying. A rejected token (401) is not: the kubelet may still rotate it.
    pub fn withdraws_access(&self) -> bool {
        matches!(self, Error::Refused { status: 403, refusal, .. } if !refusal.retryable)
    }

    /// The broker's Retry-After, if it sent one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Refused { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// Keeps label values to a bounded alphabet and length, whatever the broker sends.
fn label(reason: &str) -> String {
    if !reason.is_empty() && reason.len() <= 64 && reason.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        reason.to_owned()
    } else {
        "Other".into()
    }
}

/// A client for one broker.
#[derive(Clone)]
pub struct Broker {
    connector: TlsConnector,
    server_name: ServerName<'static>,
    url: BrokerUrl,
    token_file: PathBuf,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("url", &self.url)
            .field("token_file", &self.token_file)
            .finish()
    }
}

impl Broker {
    /// The TLS client of the broker's CA, for the local gateway (keybroker's gateway serves a
    /// certificate of the same CA).
    pub fn connector(&self) -> TlsConnector {
        self.connector.clone()
    }

    /// `ca_pem` holds the CA certificate(s) the broker's certificate must chain to.
    pub fn new(url: BrokerUrl, ca_pem: &[u8], token_file: &Path) -> Result<Self, Error> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem) {
            let cert = cert.map_err(|e| Error::Ca(format!("is not valid PEM: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| Error::Ca(format!("holds an unusable certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(Error::Ca("holds no certificate".into()));
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Ca(format!("cannot be used with TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let server_name = ServerName::try_from(url.host.clone())
            .map_err(|_| Error::ServerName(url.host.clone()))?;
        Ok(Self {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
            url,
            token_file: token_file.to_owned(),
        })
    }

    /// Exchanges the pod's token for credentials of `api_key`.
    pub async fn exchange(&self, api_key: &str) -> Result<ExchangeResponse, Error> {
        let body = serde_json::to_vec(&ExchangeRequest {
            api_key: api_key.to_owned(),
        })
        .unwrap_or_default();
        let (status, body) = self
            .send(
                Method::POST,
                paths::EXCHANGE,
                body,
                EXCHANGE_TIMEOUT,
                "an exchange",
            )
            .await?;
        parse(status, &body, "an ExchangeResponse")
    }

    /// Long-polls for revocation of `api_key` for up to `wait`; true once it is revoked or gone.
    /// The revocation long-poll for `api_key`, holding credentials of `grant`.
    pub async fn poll(
        &self,
        api_key: &str,
        grant: Option<&str>,
        renewal: &str,
        wait: Duration,
    ) -> Result<RevocationStatus, Error> {
        let path = format!(
            "{}?apiKey={api_key}&grant={}&renewal={renewal}&waitSeconds={}",
            paths::REVOCATIONS,
            grant.unwrap_or_default(),
            wait.as_secs()
        );
        let (status, body) = self
            .send(
                Method::GET,
                &path,
                Vec::new(),
                wait + POLL_SLACK,
                "a revocation poll",
            )
            .await?;
        parse::<RevocationStatus>(status, &body, "a RevocationStatus")
    }

    /// The token, read now: the kubelet replaces the file before the old token expires.
    fn token(&self) -> Result<String, Error> {
        use std::io::Read;
        let path = &self.token_file;
        let read = |source| Error::Token {
            path: path.clone(),
            source,
        };
        let mut token = String::new();
        std::fs::File::open(path)
            .map_err(read)?
            .take(MAX_TOKEN_BYTES + 1)
            .read_to_string(&mut token)
            .map_err(read)?;
        let token = token.trim();
        if token.is_empty() || token.len() as u64 > MAX_TOKEN_BYTES {
            return Err(Error::TokenSize(path.clone()));
        }
        Ok(token.to_owned())
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
        timeout: Duration,
        what: &'static str,
    ) -> Result<(StatusCode, Answer), Error> {
        let token = self.token()?;
        let request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.url.prefix))
            .header(HOST, self.authority())
            .header(AUTHORIZATION, format!("Bearer {token}"))
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|_| Error::ServerName(self.url.host.clone()))?;
        tokio::time::timeout(timeout, self.round_trip(request))
            .await
            .map_err(|_| Error::Timeout(what))?
    }

    /// `host:port` as it goes in a Host header (IPv6 in brackets).
    fn authority(&self) -> String {
        if self.url.host.contains(':') {
            format!("[{}]:{}", self.url.host, self.url.port)
        } else {
            format!("{}:{}", self.url.host, self.url.port)
        }
    }

    async fn round_trip(
        &self,
        request: Request<Full<Bytes>>,
    ) -> Result<(StatusCode, Answer), Error> {
        let addr = self.authority();
        let tcp = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect((self.url.host.as_str(), self.url.port)),
        )
        .await
        .map_err(|_| Error::Timeout("the connection"))?
        .map_err(|source| Error::Connect {
            addr: addr.clone(),
            source,
        })?;
        let _ = tcp.set_nodelay(true);
        let tls = tokio::time::timeout(
            CONNECT_TIMEOUT,
            self.connector.connect(self.server_name.clone(), tcp),
        )
        .await
        .map_err(|_| Error::Timeout("the TLS handshake"))?
        .map_err(|source| Error::Tls { addr, source })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        let conn = tokio::spawn(conn);
        let response = sender.send_request(request).await;
        let result = match response {
            Ok(response) => {
                let status = response.status();
                let retry_after = response
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER));
                match Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
                    .collect()
                    .await
                {
                    Ok(body) => Ok((
                        status,
                        Answer {
                            body: body.to_bytes(),
                            retry_after,
                        },
                    )),
                    Err(_) => Err(Error::Malformed {
                        status: status.as_u16(),
                        expected: "a complete body of at most 64 KiB",
                        detail: "cut off or too large".into(),
                    }),
                }
            }
            Err(e) => Err(Error::Http(e)),
        };
        conn.abort();
        result
    }
}

/// A response body and its Retry-After.
#[derive(Debug)]
struct Answer {
    body: Bytes,
    retry_after: Option<Duration>,
}

/// A 200 body as `T`, anything else as the refusal it carries. Parse errors name the position,
/// never the content (the body may hold credentials).
fn parse<T: serde::de::DeserializeOwned>(
    status: StatusCode,
    answer: &Answer,
    expected: &'static str,
) -> Result<T, Error> {
    let malformed = |e: serde_json::Error| Error::Malformed {
        status: status.as_u16(),
        expected,
        detail: format!(
            "{:?} at line {} column {}",
            e.classify(),
            e.line(),
            e.column()
        ),
    };
    if status == StatusCode::OK {
        return serde_json::from_slice(&answer.body).map_err(malformed);
    }
    match serde_json::from_slice::<Refusal>(&answer.body) {
        Ok(refusal) => Err(Error::Refused {
            status: status.as_u16(),
            refusal,
            retry_after: answer.retry_after,
        }),
        // A proxy or a broker mid-restart: no refusal to honour, so retry later.
        Err(_) => Err(Error::Refused {
            status: status.as_u16(),
            refusal: Refusal {
                reason: format!("Http{}", status.as_u16()),
                message: "the answer carried no keybroker refusal".into(),
                retryable: true,
            },
            retry_after: answer.retry_after,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(body: &str) -> Answer {
        Answer {
            body: Bytes::from(body.to_owned()),
            retry_after: Some(Duration::from_secs(7)),
        }
    }

    #[test]
    fn refusals_keep_the_broker_reason_and_classify_withdrawal() {
        let revoked = parse::<ExchangeResponse>(
            StatusCode::FORBIDDEN,
            &answer(r#"{"reason":"ApiKeyRevoked","message":"revoked","retryable":false}"#),
            "x",
        )
        .unwrap_err();
        assert_eq!(revoked.reason(), "ApiKeyRevoked");
        assert!(revoked.withdraws_access());

        let capped = parse::<ExchangeResponse>(
            StatusCode::TOO_MANY_REQUESTS,
            &answer(r#"{"reason":"RateLimited","message":"slow down","retryable":true}"#),
            "x",
        )
        .unwrap_err();
        assert!(!capped.withdraws_access());
        assert_eq!(capped.retry_after(), Some(Duration::from_secs(7)));

        let rejected = parse::<ExchangeResponse>(
            StatusCode::UNAUTHORIZED,
            &answer(r#"{"reason":"TokenRejected","message":"no","retryable":false}"#),
            "x",
        )
        .unwrap_err();
        assert!(
            !rejected.withdraws_access(),
            "a bad token must not drop credentials"
        );
    }

    #[test]
    fn a_body_without_a_refusal_is_retryable_and_its_reason_bounded() {
        let e =
            parse::<ExchangeResponse>(StatusCode::BAD_GATEWAY, &answer("<html>"), "x").unwrap_err();
        assert_eq!(e.reason(), "Http502");
        assert!(!e.withdraws_access());
        assert_eq!(label("a b\"c"), "Other");
        assert_eq!(label(&"x".repeat(65)), "Other");
    }

    #[test]
    fn a_malformed_success_never_echoes_the_body() {
        let e = parse::<ExchangeResponse>(
            StatusCode::OK,
            &answer(r#"{"credentials":{"accessKeyId":"AK","secretAccessKey":["SeCrEt"]}}"#),
            "an ExchangeResponse",
        )
        .unwrap_err();
        let shown = e.to_string();
        assert!(shown.contains("line 1"), "{shown}");
        assert!(!shown.contains("SeCrEt"), "{shown}");
    }
}

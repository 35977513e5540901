//! The local gateway: plain HTTP on loopback, `http://127.0.0.1:9913/<apikey>/<path>`, for
//! ApiKeys of gateway providers. The app calls it without any key; each call goes on over TLS
//! to keybroker's gateway with the session the broker issued for this pod and ApiKey, and the
//! answer streams back as it arrives. The upstream's key is never in the pod.
//!
//! The app's own `Authorization` is replaced by the session (the gateway drops cookies and the
//! rest of what must not reach the upstream). Refusals from here are JSON like the gateway's.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{Either, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use jiff::Timestamp;
use keybroker_contract::wire::GatewaySession;
use rustls::pki_types::ServerName;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsConnector;
use tracing::debug;

use crate::files::Error;
use crate::state::{Key, Removal};

/// Connections the local gateway serves at once.
const MAX_CONNECTIONS: usize = 256;
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_HEADER_BYTES: usize = 16 * 1024;

type Body = Either<Incoming, Full<Bytes>>;

/// A gateway session that passed [`validate_session`]. `Debug` hides the token.
#[derive(Clone, PartialEq, Eq)]
pub struct ValidSession {
    token: String,
    host: String,
    port: u16,
    /// Path prefix of the gateway URL, without a trailing slash.
    prefix: String,
    pub expiration: Timestamp,
}

impl std::fmt::Debug for ValidSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ValidSession")
            .field("token", &"<redacted>")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("expiration", &self.expiration)
            .finish()
    }
}

/// Longest session token accepted from the broker.
const MAX_SESSION: usize = 4096;

/// Checks a gateway session from the broker before the proxy uses it.
pub fn validate_session(s: &GatewaySession) -> Result<ValidSession, Error> {
    let invalid = |field, why| Error::Invalid { field, why };
    if s.token.is_empty()
        || s.token.len() > MAX_SESSION
        || !s.token.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(invalid(
            "session.token",
            "is empty, too long or not printable ASCII",
        ));
    }
    let url = crate::config::broker_url(&s.url)
        .map_err(|_| invalid("session.url", "is not an https:// URL without a query"))?;
    let expiration = s
        .expiration
        .parse::<Timestamp>()
        .map_err(|_| invalid("session.expiration", "is not an RFC 3339 timestamp"))?;
    Ok(ValidSession {
        token: s.token.clone(),
        host: url.host,
        port: url.port,
        prefix: url.prefix,
        expiration,
    })
}

fn refusal(status: StatusCode, reason: &str, message: &str, retryable: bool) -> Response<Body> {
    let body = serde_json::json!({"reason": reason, "message": message, "retryable": retryable});
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(body.to_string()))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(value) = HeaderValue::from_str(reason) {
        response
            .headers_mut()
            .insert(keybroker_contract::REFUSAL_HEADER, value);
    }
    response
}

/// The answer while an ApiKey holds no session: final when the broker took its access away,
/// "try again" while the first session or a renewal is still coming.
fn no_session(name: &str, withdrawn: Option<Removal>) -> Response<Body> {
    match withdrawn {
        Some(Removal::Revoked) => refusal(
            StatusCode::FORBIDDEN,
            "AccessWithdrawn",
            &format!(
                "ApiKey {name} was revoked or deleted; its owners can restore it (spec.revoked: false)"
            ),
            false,
        ),
        Some(_) => refusal(
            StatusCode::FORBIDDEN,
            "AccessWithdrawn",
            &format!(
                "the broker refused ApiKey {name} to this pod (its service account or namespace is not allowed, or the ApiKey is not Ready); the sidecar's log says which"
            ),
            false,
        ),
        None => refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "NoSession",
            &format!(
                "ApiKey {name} has no gateway session yet (not a gateway ApiKey, or the broker is unreachable); the sidecar's log says which"
            ),
            true,
        ),
    }
}

/// Serves the local gateway on `listener` (loopback) for `keys`.
pub async fn serve(listener: TcpListener, keys: Arc<[Key]>, tls: TlsConnector) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((tcp, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (keys, tls) = (Arc::clone(&keys), tls.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |req| {
                let (keys, tls) = (Arc::clone(&keys), tls.clone());
                async move { Ok::<_, std::convert::Infallible>(forward(req, &keys, &tls).await) }
            });
            let served = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_HEADER_BYTES)
                .serve_connection(TokioIo::new(tcp), service)
                .await;
            if let Err(e) = served {
                debug!(%peer, error = %e, "local gateway connection ended with an error");
            }
        });
    }
}

/// `/<apikey>/<rest>` → the gateway, with the ApiKey's session.
async fn forward(req: Request<Incoming>, keys: &[Key], tls: &TlsConnector) -> Response<Body> {
    let path = req.uri().path();
    let (name, rest) = match path[1.min(path.len())..].split_once('/') {
        Some((name, rest)) => (name, format!("/{rest}")),
        None => (&path[1.min(path.len())..], "/".to_owned()),
    };
    let Some(key) = keys.iter().find(|k| k.name == name) else {
        let names: Vec<&str> = keys.iter().map(|k| k.name.as_str()).collect();
        return refusal(
            StatusCode::NOT_FOUND,
            "UnknownApiKey",
            &format!(
                "call http://127.0.0.1:<port>/<apikey>/<path> with one of this pod's ApiKeys: {}",
                names.join(", ")
            ),
            false,
        );
    };
    let Some(session) = key.session() else {
        return no_session(name, key.withdrawn());
    };
    // The session's URL is the gateway's forwarding base; the app's path goes after it.
    let uri = match req.uri().query() {
        Some(q) => format!("{}{rest}?{q}", session.prefix),
        None => format!("{}{rest}", session.prefix),
    };
    let (mut parts, body) = req.into_parts();
    let Ok(uri) = uri.parse() else {
        return refusal(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the path cannot be forwarded",
            false,
        );
    };
    parts.uri = uri;
    let authority = if session.host.contains(':') {
        format!("[{}]:{}", session.host, session.port)
    } else {
        format!("{}:{}", session.host, session.port)
    };
    let Ok(host) = HeaderValue::from_str(&authority) else {
        return refusal(
            StatusCode::BAD_GATEWAY,
            "BadSession",
            "the session's gateway URL is unusable",
            true,
        );
    };
    parts.headers.insert(header::HOST, host);
    let Ok(mut bearer) = HeaderValue::from_str(&format!("Bearer {}", session.token)) else {
        return refusal(
            StatusCode::BAD_GATEWAY,
            "BadSession",
            "the session is unusable",
            true,
        );
    };
    bearer.set_sensitive(true);
    parts.headers.insert(header::AUTHORIZATION, bearer);
    let request = Request::from_parts(parts, body);
    match send(request, &session, tls).await {
        Ok(response) => {
            // A session the gateway no longer takes (expired, rights changed): fetch a new one
            // now instead of at the next refresh.
            let reason = response
                .headers()
                .get(keybroker_contract::REFUSAL_HEADER)
                .and_then(|v| v.to_str().ok());
            if matches!(reason, Some("SessionInvalid" | "SessionSuperseded")) {
                key.request_renewal();
            }
            response.map(Either::Left)
        }
        Err(message) => refusal(
            StatusCode::BAD_GATEWAY,
            "GatewayUnreachable",
            &message,
            true,
        ),
    }
}

/// One call over a new TLS connection to the gateway; the connection lives as long as the
/// answer streams.
async fn send(
    request: Request<Incoming>,
    session: &ValidSession,
    tls: &TlsConnector,
) -> Result<Response<Incoming>, String> {
    let addr = format!("{}:{}", session.host, session.port);
    let tcp = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect((session.host.as_str(), session.port)),
    )
    .await
    .map_err(|_| format!("connecting to the gateway at {addr} timed out"))?
    .map_err(|e| format!("connecting to the gateway at {addr}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(session.host.clone())
        .map_err(|_| format!("{} is not a TLS server name", session.host))?;
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, tls.connect(name, tcp))
        .await
        .map_err(|_| format!("the TLS handshake with the gateway at {addr} timed out"))?
        .map_err(|e| format!("the TLS handshake with the gateway at {addr}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("talking to the gateway: {e}"))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!(error = %e, "gateway connection ended with an error");
        }
    });
    sender
        .send_request(request)
        .await
        .map_err(|e| format!("talking to the gateway: {e}"))
}

/// The local gateway's address must be loopback: it adds the pod's session to whatever it
/// is sent.
pub fn check_addr(addr: SocketAddr) -> Result<SocketAddr, crate::config::Error> {
    if addr.ip().is_loopback() {
        Ok(addr)
    } else {
        Err(crate::config::Error::NotLoopback(addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(token: &str, url: &str, expiration: &str) -> GatewaySession {
        GatewaySession {
            token: token.into(),
            url: url.into(),
            expiration: expiration.into(),
        }
    }

    #[test]
    fn sessions_are_checked_before_use() {
        let ok = validate_session(&session(
            "kbs1.abc.def",
            "https://keybroker-gateway.keybroker-system.svc:8444/v1/forward",
            "2030-01-01T00:00:00Z",
        ))
        .unwrap();
        assert_eq!(ok.port, 8444);
        assert!(!format!("{ok:?}").contains("kbs1"));
        for bad in [
            session("", "https://g:1", "2030-01-01T00:00:00Z"),
            session("a b", "https://g:1", "2030-01-01T00:00:00Z"),
            session("t\r\nX-Evil: 1", "https://g:1", "2030-01-01T00:00:00Z"),
            session("t", "http://g:1", "2030-01-01T00:00:00Z"),
            session("t", "https://g:1", "soon"),
        ] {
            assert!(validate_session(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn without_a_session_the_app_learns_whether_to_retry() {
        for (withdrawn, status, reason, retryable) in [
            (None, 503, "NoSession", true),
            (Some(Removal::Revoked), 403, "AccessWithdrawn", false),
            (Some(Removal::Refused), 403, "AccessWithdrawn", false),
        ] {
            let answer = no_session("echo", withdrawn);
            assert_eq!(answer.status().as_u16(), status, "{withdrawn:?}");
            assert_eq!(
                answer.headers()[keybroker_contract::REFUSAL_HEADER],
                reason,
                "{withdrawn:?}"
            );
            let Either::Right(body) = answer.into_body() else {
                panic!("a refusal has a body of its own");
            };
            let body = collected(body);
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(json["reason"], reason);
            assert_eq!(json["retryable"], retryable);
            assert!(json["message"].as_str().unwrap().contains("echo"));
        }
    }

    fn collected(body: Full<Bytes>) -> Bytes {
        use http_body_util::BodyExt;
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(body.collect()).unwrap().to_bytes()
    }
}

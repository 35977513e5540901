//! The local gateway: plain HTTP on loopback, `http://127.0.0.1:9913/<apikey>/<path>`, for
//! ApiKeys of gateway providers. The app calls it without any key; each call goes on over TLS
//! to keybroker's gateway with the session the broker issued for this pod and ApiKey, and the
//! answer streams back as it arrives. The upstream's key is never in the pod.
//!
//! The app's own `Authorization` is replaced by the session (the gateway drops cookies and the
//! rest of what must not reach the upstream). Refusals from here are JSON like the gateway's.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{Either, Full};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1::SendRequest;
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
use crate::state::{Key, Kind, Removal};

/// Connections the local gateway serves at once.
const MAX_CONNECTIONS: usize = 256;
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_HEADER_BYTES: usize = 16 * 1024;
/// The most of a call held in memory per connection to the gateway, each way (hyper's read
/// buffer, rustls's unsent plaintext): a large body streams through in pieces of one TLS record,
/// whatever the app's pace, and an idle pooled connection keeps little (hyper's default read
/// buffer grows to 400 KiB).
const READ_BUFFER_BYTES: usize = 16 * 1024;
/// Idle connections to the gateway kept at most (the gateway's cap of calls in flight per
/// client), and for how long: under the gateway's own keep-alive limit (5 s), so it does not
/// close one as a call goes out on it.
const MAX_IDLE: usize = 64;
const IDLE_FOR: Duration = Duration::from_secs(2);

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

/// The answer while an ApiKey holds no session: final when it is not a gateway ApiKey or the
/// broker took its access away, "try again" while the first session or a renewal is still
/// coming.
fn no_session(name: &str, kind: Option<Kind>, withdrawn: Option<Removal>) -> Response<Body> {
    let not_gateway = |message: String| {
        refusal(
            StatusCode::BAD_REQUEST,
            "NotAGatewayApiKey",
            &format!("{message}; the local gateway serves gateway ApiKeys only"),
            false,
        )
    };
    match (kind, withdrawn) {
        (Some(Kind::Aws), _) => not_gateway(format!(
            "ApiKey {name} is an AWS ApiKey: use its credentials files or the container-credentials endpoint"
        )),
        (Some(Kind::OAuth2), _) => not_gateway(format!(
            "ApiKey {name} is an OAuth2 ApiKey: send the access token in {name}/token of the sidecar's output directory as `Authorization: Bearer` yourself"
        )),
        (_, Some(Removal::Revoked)) => refusal(
            StatusCode::FORBIDDEN,
            "AccessWithdrawn",
            &format!(
                "ApiKey {name} was revoked or deleted; its owners can restore it (spec.revoked: false)"
            ),
            false,
        ),
        (_, Some(_)) => refusal(
            StatusCode::FORBIDDEN,
            "AccessWithdrawn",
            &format!(
                "the broker refused ApiKey {name} to this pod (its service account or namespace is not allowed, or the ApiKey is not Ready); the sidecar's log says which"
            ),
            false,
        ),
        (_, None) => refusal(
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
    let client = Arc::new(Client::new(tls));
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
        let (keys, client) = (Arc::clone(&keys), Arc::clone(&client));
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |req| {
                let (keys, client) = (Arc::clone(&keys), Arc::clone(&client));
                async move { Ok::<_, std::convert::Infallible>(forward(req, &keys, &client).await) }
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
async fn forward(req: Request<Incoming>, keys: &[Key], client: &Arc<Client>) -> Response<Body> {
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
        return no_session(name, key.kind(), key.withdrawn());
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
    match client.send(request, &session).await {
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

/// Connections to the gateway, kept for the next calls once an answer is done: a TLS
/// handshake per call would cost more than all the rest of the path.
pub struct Client {
    tls: TlsConnector,
    idle: Mutex<Vec<Idle>>,
}

struct Idle {
    sender: SendRequest<Incoming>,
    host: String,
    port: u16,
    since: Instant,
}

impl Client {
    pub fn new(tls: TlsConnector) -> Self {
        Self {
            tls,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// One call to the gateway of `session`: on an idle connection if one is left, else on a
    /// new one. A request the gateway's side closed under it before it went out is sent again.
    async fn send(
        self: &Arc<Self>,
        mut request: Request<Incoming>,
        session: &ValidSession,
    ) -> Result<Response<Incoming>, String> {
        while let Some(mut sender) = self.take_idle(&session.host, session.port) {
            match sender.try_send_request(request).await {
                Ok(response) => {
                    self.keep_when_done(sender, session);
                    return Ok(response);
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) => request = unsent,
                    None => return Err(format!("talking to the gateway: {}", e.error())),
                },
            }
        }
        let mut sender = self.connect(session).await?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("talking to the gateway: {e}"))?;
        self.keep_when_done(sender, session);
        Ok(response)
    }

    /// An idle connection to `host:port` that is still open and young enough that the gateway
    /// will not close it under the request (its keep-alive limit is longer).
    fn take_idle(&self, host: &str, port: u16) -> Option<SendRequest<Incoming>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|i| i.since.elapsed() < IDLE_FOR && !i.sender.is_closed());
        let at = idle
            .iter()
            .rposition(|i| i.host == host && i.port == port && i.sender.is_ready())?;
        Some(idle.swap_remove(at).sender)
    }

    /// Back among the idle connections once the answer was read to its end (an answer the app
    /// dropped half-way closes the connection instead).
    fn keep_when_done(self: &Arc<Self>, mut sender: SendRequest<Incoming>, session: &ValidSession) {
        let (client, host, port) = (Arc::clone(self), session.host.clone(), session.port);
        tokio::spawn(async move {
            if sender.ready().await.is_err() {
                return;
            }
            let mut idle = client.idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < MAX_IDLE {
                idle.push(Idle {
                    sender,
                    host,
                    port,
                    since: Instant::now(),
                });
            }
        });
    }

    /// A new TLS connection to the gateway; it lives as long as calls use it.
    async fn connect(&self, session: &ValidSession) -> Result<SendRequest<Incoming>, String> {
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
        let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, self.tls.connect(name, tcp))
            .await
            .map_err(|_| format!("the TLS handshake with the gateway at {addr} timed out"))?
            .map_err(|e| format!("the TLS handshake with the gateway at {addr}: {e}"))?;
        stream.get_mut().1.set_buffer_limit(Some(READ_BUFFER_BYTES));
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .max_buf_size(READ_BUFFER_BYTES)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("talking to the gateway: {e}"))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "gateway connection ended with an error");
            }
        });
        Ok(sender)
    }
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
    use http_body_util::BodyExt;

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

    #[tokio::test]
    async fn without_a_session_the_app_learns_whether_to_retry() {
        for (kind, withdrawn, status, reason, retryable) in [
            (None, None, 503, "NoSession", true),
            (Some(Kind::Gateway), None, 503, "NoSession", true),
            (None, Some(Removal::Revoked), 403, "AccessWithdrawn", false),
            (None, Some(Removal::Refused), 403, "AccessWithdrawn", false),
            (Some(Kind::Aws), None, 400, "NotAGatewayApiKey", false),
            (Some(Kind::OAuth2), None, 400, "NotAGatewayApiKey", false),
            (
                Some(Kind::OAuth2),
                Some(Removal::Revoked),
                400,
                "NotAGatewayApiKey",
                false,
            ),
        ] {
            let case = (kind, withdrawn);
            let answer = no_session("echo", kind, withdrawn);
            assert_eq!(answer.status().as_u16(), status, "{case:?}");
            assert_eq!(
                answer.headers()[keybroker_contract::REFUSAL_HEADER],
                reason,
                "{case:?}"
            );
            let Either::Right(body) = answer.into_body() else {
                panic!("a refusal has a body of its own");
            };
            let body = body.collect().await.unwrap().to_bytes();
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(json["reason"], reason);
            assert_eq!(json["retryable"], retryable);
            assert!(json["message"].as_str().unwrap().contains("echo"));
        }
    }
}

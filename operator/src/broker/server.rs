//! The broker's HTTPS endpoint (HTTP/1.1 over rustls):
//!
//! - `POST /v1/exchange` with `Authorization: Bearer <projected token>` and an
//!   [`ExchangeRequest`] body → [`ExchangeResponse`], or a [`Refusal`] with 401/403/429/502/503;
//! - `GET /v1/revocations?apiKey=<name>&waitSeconds=<n>` → [`RevocationStatus`] as soon as the
//!   ApiKey is revoked or deleted, or after the wait.
//!
//! Every stage is bounded: TLS handshake and request headers 10 s, body 4 KiB read within 10 s,
//! headers 16 KiB, the whole exchange 20 s. Refusals are JSON bodies, never bare errors.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use keybroker_sidecar::wire::{
    ExchangeRequest, MAX_REVOCATION_WAIT_SECONDS, Refusal, RevocationStatus,
};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use super::{Broker, ExchangeError};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(20);
pub const MAX_BODY_BYTES: usize = 4 * 1024;
const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Serves until the future is dropped.
pub async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, broker: Arc<Broker>) {
    let acceptor = TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (acceptor, broker) = (acceptor.clone(), Arc::clone(&broker));
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => return debug!(%peer, "TLS handshake timed out"),
            };
            let service = service_fn(move |req| handle(req, Arc::clone(&broker), peer));
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_HEADER_BYTES)
                .serve_connection(TokioIo::new(tls), service);
            if let Err(e) = conn.await {
                debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    broker: Arc<Broker>,
    peer: SocketAddr,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let response = match (req.method(), req.uri().path()) {
        (&Method::POST, "/v1/exchange") => exchange(req, &broker, peer).await,
        (&Method::GET, "/v1/revocations") => revocations(req, &broker).await,
        (&Method::GET, "/healthz") => Response::new(Full::new(Bytes::from_static(b"ok\n"))),
        _ => refusal(
            StatusCode::NOT_FOUND,
            "NotFound",
            "use POST /v1/exchange or GET /v1/revocations",
            false,
        ),
    };
    Ok(response)
}

async fn exchange(
    req: Request<Incoming>,
    broker: &Broker,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    let Some(token) = bearer(&req) else {
        return missing_token();
    };
    let body = match tokio::time::timeout(
        BODY_TIMEOUT,
        Limited::new(req.into_body(), MAX_BODY_BYTES).collect(),
    )
    .await
    {
        Ok(Ok(body)) => body.to_bytes(),
        Ok(Err(_)) => {
            return refusal(
                StatusCode::PAYLOAD_TOO_LARGE,
                "BodyTooLarge",
                &format!("the request body must be at most {MAX_BODY_BYTES} bytes"),
                false,
            );
        }
        Err(_) => {
            return refusal(
                StatusCode::REQUEST_TIMEOUT,
                "BodyTimeout",
                "the request body did not arrive in time",
                true,
            );
        }
    };
    let request: ExchangeRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            return refusal(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!("the body must be JSON like {{\"apiKey\": \"<name>\"}}: {e}"),
                false,
            );
        }
    };
    match tokio::time::timeout(
        EXCHANGE_TIMEOUT,
        broker.exchange(&token, &request, &peer.to_string()),
    )
    .await
    {
        Ok(Ok(issued)) => json(StatusCode::OK, &issued),
        Ok(Err(e)) => refused(&e),
        Err(_) => refusal(
            StatusCode::GATEWAY_TIMEOUT,
            "Timeout",
            "the exchange did not finish in time",
            true,
        ),
    }
}

async fn revocations(req: Request<Incoming>, broker: &Broker) -> Response<Full<Bytes>> {
    let Some(token) = bearer(&req) else {
        return missing_token();
    };
    let query = req.uri().query().unwrap_or("");
    let param = |name: &str| {
        query
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_owned())
    };
    let Some(api_key) = param("apiKey").filter(|k| !k.is_empty() && k.len() <= 253) else {
        return refusal(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the apiKey query parameter is required",
            false,
        );
    };
    let wait = param("waitSeconds")
        .and_then(|w| w.parse::<u64>().ok())
        .unwrap_or(30)
        .min(MAX_REVOCATION_WAIT_SECONDS);
    match broker
        .wait_revoked(&token, &api_key, Duration::from_secs(wait))
        .await
    {
        Ok(revoked) => json(StatusCode::OK, &RevocationStatus { api_key, revoked }),
        Err(e) => refused(&e),
    }
}

/// The bearer token of the request, if any.
fn bearer(req: &Request<Incoming>) -> Option<String> {
    req.headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
}

fn missing_token() -> Response<Full<Bytes>> {
    refusal(
        StatusCode::UNAUTHORIZED,
        "TokenMissing",
        "send the pod's projected service-account token (audience keybroker) as Authorization: Bearer <token>",
        false,
    )
}

fn refused(error: &ExchangeError) -> Response<Full<Bytes>> {
    let status = StatusCode::from_u16(error.status()).unwrap_or(StatusCode::FORBIDDEN);
    let mut response = json(status, &error.to_refusal());
    if let ExchangeError::RateLimited { retry_after, .. } = error
        && let Ok(value) = retry_after.as_secs().max(1).to_string().parse()
    {
        response.headers_mut().insert(RETRY_AFTER, value);
    }
    response
}

fn refusal(
    status: StatusCode,
    reason: &str,
    message: &str,
    retryable: bool,
) -> Response<Full<Bytes>> {
    json(
        status,
        &Refusal {
            reason: reason.into(),
            message: message.into(),
            retryable,
        },
    )
}

fn json<T: serde::Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = status;
    if let Ok(value) = "application/json".parse() {
        response.headers_mut().insert(CONTENT_TYPE, value);
    }
    response
}

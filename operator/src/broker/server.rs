//! The broker's HTTPS endpoint (HTTP/1.1 over rustls):
//!
//! - `POST /v1/exchange` with `Authorization: Bearer <projected token>` and an
//!   [`ExchangeRequest`] body → [`ExchangeResponse`], or a [`Refusal`] with 401/403/429/502/503;
//! - `GET /v1/revocations?apiKey=<name>&grant=<grant>&renewal=<mark>&waitSeconds=<n>` →
//!   [`RevocationStatus`]
//!   as soon as the pod may no longer use the ApiKey or its rights changed, or after the wait;
//!   429 past the per-pod or total cap of waiting polls.
//!
//! Every stage is bounded: TLS handshake and request headers 5 s (see [`crate::https`]), body
//! 4 KiB read within 5 s, headers 16 KiB, the whole exchange 20 s. A client (peer address) has
//! at most [`MAX_EXCHANGES_PER_CLIENT`] exchanges in flight and the broker at most
//! [`MAX_EXCHANGES`]; past either, 429 with Retry-After at once. Refusals are JSON bodies,
//! never bare errors.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{AUTHORIZATION, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};
use keybroker_contract::paths;
use keybroker_contract::wire::{
    ExchangeRequest, MAX_RENEWAL_MARK, MAX_REVOCATION_WAIT_SECONDS, Refusal, RevocationStatus,
};
use tokio::net::TcpListener;

use super::{Broker, ExchangeError, Held, PollAnswer};
use crate::https::{self, BodyError, Gate, Limits, PeerLimit};
use crate::shutdown::Shutdown;

const BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// Exchanges in flight per client address. A node's sidecars share its pod CIDR, not one
/// address, so a single address with more than this in flight is a misbehaving client.
pub const MAX_EXCHANGES_PER_CLIENT: usize = 8;
/// Exchanges in flight in this replica.
pub const MAX_EXCHANGES: usize = 256;
/// How long an exchange may wait for one of the [`MAX_EXCHANGES`] slots.
const QUEUE_WAIT: Duration = Duration::from_secs(1);
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(20);
pub const MAX_BODY_BYTES: usize = 4 * 1024;
/// What a poll refused for a full registry is told to wait.
const POLL_RETRY_AFTER_SECONDS: u64 = 5;

/// Serves until the future is dropped.
pub async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, broker: Arc<Broker>) {
    serve_until(listener, tls, broker, Shutdown::never()).await
}

/// The caps shared by every connection of one server.
#[derive(Debug)]
struct Caps {
    exchanges: Gate,
    per_client: PeerLimit,
}

/// Serves until `shutdown` says stop (see [`https::Stopping`]), then finishes the exchanges in
/// flight.
pub async fn serve_until(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    broker: Arc<Broker>,
    shutdown: impl Into<https::Stopping>,
) {
    let caps = Arc::new(Caps {
        exchanges: Gate::new(MAX_EXCHANGES, QUEUE_WAIT),
        per_client: PeerLimit::new(MAX_EXCHANGES_PER_CLIENT),
    });
    https::serve_until(
        listener,
        tls,
        Limits::default(),
        shutdown,
        move |req, peer| {
            let (broker, caps) = (Arc::clone(&broker), Arc::clone(&caps));
            async move { handle(req, &broker, &caps, peer).await }
        },
    )
    .await
}

async fn handle(
    req: Request<Incoming>,
    broker: &Broker,
    caps: &Caps,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::POST, paths::EXCHANGE) => {
            let Some(_client) = caps.per_client.enter(peer.ip()) else {
                return busy(&format!(
                    "this client already has {MAX_EXCHANGES_PER_CLIENT} exchanges in flight; wait for them before sending more"
                ));
            };
            let Some(_slot) = caps.exchanges.enter().await else {
                return busy("the broker is at its limit of exchanges in flight; retry");
            };
            exchange(req, broker, peer).await
        }
        (&Method::GET, paths::REVOCATIONS) => revocations(req, broker).await,
        (&Method::GET, "/healthz") => Response::new(Full::new(Bytes::from_static(b"ok\n"))),
        _ => refusal(
            StatusCode::NOT_FOUND,
            "NotFound",
            "use POST /v1/exchange or GET /v1/revocations",
            false,
        ),
    }
}

/// 429 with Retry-After: the request was not looked at.
fn busy(message: &str) -> Response<Full<Bytes>> {
    let mut response = refusal(StatusCode::TOO_MANY_REQUESTS, "Busy", message, true);
    response
        .headers_mut()
        .insert(RETRY_AFTER, hyper::header::HeaderValue::from_static("1"));
    response
}

async fn exchange(
    req: Request<Incoming>,
    broker: &Broker,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    let Some(token) = bearer(&req) else {
        return missing_token();
    };
    let body = match https::read_body(req.into_body(), MAX_BODY_BYTES, BODY_TIMEOUT).await {
        Ok(body) => body,
        Err(e @ BodyError::TooLarge(_)) => {
            return refusal(
                StatusCode::PAYLOAD_TOO_LARGE,
                "BodyTooLarge",
                &e.to_string(),
                false,
            );
        }
        Err(e) => {
            return refusal(
                StatusCode::REQUEST_TIMEOUT,
                "BodyTimeout",
                &e.to_string(),
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
        Ok(Ok(issued)) => https::json(StatusCode::OK, &issued),
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
    let held = param("grant").filter(|g| !g.is_empty() && g.len() <= 64);
    // Absent from older sidecars: they are not asked to renew.
    let renewal = param("renewal")
        .filter(|r| r.len() <= MAX_RENEWAL_MARK && r.bytes().all(|b| b.is_ascii_hexdigit()));
    let held = Held {
        grant: held.as_deref(),
        renewal: renewal.as_deref(),
    };
    match broker
        .poll(&token, &api_key, held, Duration::from_secs(wait))
        .await
    {
        Ok(answer) => https::json(
            StatusCode::OK,
            &RevocationStatus {
                api_key,
                revoked: answer == PollAnswer::Revoked,
                renew: answer == PollAnswer::Renew,
            },
        ),
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
    let mut response = https::json(status, &error.to_refusal());
    let retry_after = match error {
        ExchangeError::RateLimited { retry_after, .. } => Some(retry_after.as_secs().max(1)),
        ExchangeError::TooManyPolls(_) => Some(POLL_RETRY_AFTER_SECONDS),
        _ => None,
    };
    if let Some(seconds) = retry_after
        && let Ok(value) = seconds.to_string().parse()
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
    https::json(
        status,
        &Refusal {
            reason: reason.into(),
            message: message.into(),
            retryable,
        },
    )
}

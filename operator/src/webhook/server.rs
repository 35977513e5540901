//! The webhook's HTTPS endpoint: `POST /mutate` takes an AdmissionReview and always answers
//! with one (HTTP 200), even for malformed, oversized or slow bodies, so the apiserver shows
//! keybroker's message instead of a transport error.
//!
//! Reviews are capped in flight ([`MAX_IN_FLIGHT`]; the slot is taken before the body is read,
//! so memory stays under `MAX_IN_FLIGHT × MAX_BODY_BYTES`). A review that finds no slot within
//! [`QUEUE_WAIT`] is answered 429 at once, well inside the apiserver's timeout, instead of
//! waiting behind hostile bodies past it.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::RETRY_AFTER;
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;

use super::Webhook;
use crate::https::{self, BodyError, Gate, Limits};
use crate::shutdown::Shutdown;

/// Above the apiserver's own 3 MiB request limit, so every real pod fits.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// The apiserver sends the whole review at once; a body that trickles is hostile.
const BODY_TIMEOUT: Duration = Duration::from_secs(2);
/// Reviews handled at once. A review of a real pod takes well under a millisecond of CPU.
pub const MAX_IN_FLIGHT: usize = 16;
/// How long a review may wait for a slot before it is refused.
pub const QUEUE_WAIT: Duration = Duration::from_secs(1);

/// Serves until the future is dropped.
pub async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, webhook: Arc<Webhook>) {
    serve_until(listener, tls, webhook, Shutdown::never()).await
}

/// Serves until `shutdown` says stop (see [`https::Stopping`]), then finishes the reviews in
/// flight.
pub async fn serve_until(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    webhook: Arc<Webhook>,
    shutdown: impl Into<https::Stopping>,
) {
    let gate = Arc::new(Gate::new(MAX_IN_FLIGHT, QUEUE_WAIT));
    https::serve_until(
        listener,
        tls,
        Limits::default(),
        shutdown,
        move |req, _peer| {
            let (webhook, gate) = (Arc::clone(&webhook), Arc::clone(&gate));
            async move { handle(req, &webhook, &gate).await }
        },
    )
    .await
}

async fn handle(req: Request<Incoming>, webhook: &Webhook, gate: &Gate) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::POST, "/mutate") => {
            let Some(_slot) = gate.enter().await else {
                webhook.busy();
                let mut response = https::json(
                    StatusCode::TOO_MANY_REQUESTS,
                    &serde_json::json!({"message": "keybroker: the webhook is at its limit of reviews in flight; retry"}),
                );
                response
                    .headers_mut()
                    .insert(RETRY_AFTER, hyper::header::HeaderValue::from_static("1"));
                return response;
            };
            let answer = match https::read_body(req.into_body(), MAX_BODY_BYTES, BODY_TIMEOUT).await
            {
                Ok(body) => webhook.review(&body).await,
                Err(BodyError::TooLarge(limit)) => super::too_large(limit),
                Err(e) => super::unreadable(&e.to_string()),
            };
            let mut response = Response::new(Full::new(Bytes::from(answer)));
            if let Ok(value) = "application/json".parse() {
                response
                    .headers_mut()
                    .insert(hyper::header::CONTENT_TYPE, value);
            }
            response
        }
        (&Method::GET, "/healthz") => Response::new(Full::new(Bytes::from_static(b"ok\n"))),
        _ => https::json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"message": "POST an AdmissionReview to /mutate"}),
        ),
    }
}

//! The webhook's HTTPS endpoint: `POST /mutate` takes an AdmissionReview and always answers
//! with one (HTTP 200), even for malformed, oversized or slow bodies, so the apiserver shows
//! keybroker's message instead of a transport error.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;

use super::Webhook;
use crate::https::{self, BodyError};

/// Above the apiserver's own 3 MiB request limit, so every real pod fits.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
const BODY_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves until the future is dropped.
pub async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, webhook: Arc<Webhook>) {
    https::serve(listener, tls, move |req, _peer| {
        let webhook = Arc::clone(&webhook);
        async move { handle(req, &webhook).await }
    })
    .await
}

async fn handle(req: Request<Incoming>, webhook: &Webhook) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::POST, "/mutate") => {
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

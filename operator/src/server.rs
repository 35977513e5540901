//! The operator's plain-HTTP endpoints: `/metrics` (Prometheus text format), `/healthz` and
//! `/readyz` (503 naming what is missing until every role is ready). Nothing secret is served
//! here.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::metrics::Metrics;

/// A readiness condition: its name, and whether it holds now.
type Check = (&'static str, Box<dyn Fn() -> bool + Send + Sync>);

/// What `/readyz` waits for; each role adds its conditions (the webhook: a serving certificate).
#[derive(Default)]
pub struct Readiness {
    checks: std::sync::Mutex<Vec<Check>>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness")
            .field("missing", &self.missing())
            .finish()
    }
}

impl Readiness {
    pub fn add(&self, name: &'static str, check: impl Fn() -> bool + Send + Sync + 'static) {
        if let Ok(mut checks) = self.checks.lock() {
            checks.push((name, Box::new(check)));
        }
    }

    /// The conditions that do not hold yet.
    pub fn missing(&self) -> Vec<&'static str> {
        self.checks
            .lock()
            .map(|checks| {
                checks
                    .iter()
                    .filter(|(_, ok)| !ok())
                    .map(|(n, _)| *n)
                    .collect()
            })
            .unwrap_or_else(|_| vec!["readiness-checks"])
    }
}

/// Serves until the future is dropped. Each connection gets 10 s to send its request headers.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, readiness: Arc<Readiness>) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving /metrics, /healthz and /readyz");
    }
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (metrics, readiness) = (Arc::clone(&metrics), Arc::clone(&readiness));
        tokio::spawn(async move {
            let service =
                service_fn(move |req| respond(req, Arc::clone(&metrics), Arc::clone(&readiness)));
            let conn = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                warn!(%peer, error = %e, "metrics connection failed");
            }
        });
    }
}

/// Binds `addr`, failing with a message that names it.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}

async fn respond(
    req: Request<Incoming>,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => match metrics.encode() {
            Ok(text) => (
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                text,
            ),
            Err(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                "encoding metrics failed\n".to_owned(),
            ),
        },
        (&Method::GET, "/healthz") => (StatusCode::OK, "text/plain", "ok\n".into()),
        (&Method::GET, "/readyz") => match readiness.missing().as_slice() {
            [] => (StatusCode::OK, "text/plain", "ok\n".into()),
            missing => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {}\n", missing.join(", ")),
            ),
        },
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_names_what_is_missing() {
        let readiness = Readiness::default();
        assert!(readiness.missing().is_empty());
        let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = Arc::clone(&flag);
        readiness.add("webhook-certificate", move || {
            seen.load(std::sync::atomic::Ordering::Relaxed)
        });
        assert_eq!(readiness.missing(), vec!["webhook-certificate"]);
        flag.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(readiness.missing().is_empty());
    }
}

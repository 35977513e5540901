//! The gateway's HTTPS endpoint: every request is a forwarded call (see the module above).
//!
//! Bounded like the broker's endpoint (TLS handshake and request headers 5 s, headers 16 KiB,
//! connections capped; see [`crate::https`]), plus: at most [`MAX_CALLS`] calls in flight in
//! this replica and [`MAX_CALLS_PER_CLIENT`] per client address, past which 429 at once, so one
//! tenant's pods cannot take every slot.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::StatusCode;
use tokio::net::TcpListener;

use super::{Gateway, Refused};
use crate::https::{self, Gate, Limits, PeerLimit};

/// Calls in flight in this replica (each may stream for minutes).
pub const MAX_CALLS: usize = 2048;
/// Calls in flight per client address.
pub const MAX_CALLS_PER_CLIENT: usize = 64;
const QUEUE_WAIT: Duration = Duration::from_millis(500);

/// Serves until `shutdown` says stop, then lets the calls in flight finish.
pub async fn serve_until(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    gateway: Arc<Gateway>,
    shutdown: impl Into<https::Stopping>,
) {
    let calls = Arc::new(Gate::new(MAX_CALLS, QUEUE_WAIT));
    let per_client = Arc::new(PeerLimit::new(MAX_CALLS_PER_CLIENT));
    https::serve_until(
        listener,
        tls,
        Limits::default(),
        shutdown,
        move |req, peer: SocketAddr| {
            let (gateway, calls, per_client) = (
                Arc::clone(&gateway),
                Arc::clone(&calls),
                Arc::clone(&per_client),
            );
            async move {
                let Some(_client) = per_client.enter(peer.ip()) else {
                    return busy(format!(
                        "this client already has {MAX_CALLS_PER_CLIENT} calls in flight through the gateway; wait for them"
                    ));
                };
                let Some(_slot) = calls.enter().await else {
                    return busy("the gateway is at its limit of calls in flight; retry".into());
                };
                gateway.handle(req, &peer.ip().to_string()).await
            }
        },
    )
    .await
}

fn busy(message: String) -> hyper::Response<super::GatewayBody> {
    let mut refused = Refused::new(StatusCode::TOO_MANY_REQUESTS, "Busy", message).retryable();
    refused.retry_after = Some(1);
    refused.response()
}

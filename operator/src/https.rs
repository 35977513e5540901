//! The HTTPS serving loop the broker and the webhook share: HTTP/1.1 over rustls with every
//! stage bounded, so a slow or hostile client costs one small task, never the server.
//!
//! - A connection that sends nothing holds no buffer and no TLS state: the loop only waits for
//!   the socket to become readable (at most [`Limits::idle_timeout`]) before the handshake.
//! - Open connections are capped; past the cap a new one is closed at once (the client sees a
//!   reset and retries elsewhere) rather than queueing behind idle ones.
//! - TLS handshake and a connection's first request headers have short timeouts. A kept-alive
//!   connection may idle longer than its client keeps idle connections (the apiserver and
//!   hyper clients: 90 s), so the client is the one that closes it: a server closing an idle
//!   connection races a request the client may be sending on it at that moment, and that
//!   request fails (a POST is not resent; the apiserver reports "use of closed network
//!   connection" and a pod creation fails closed).
//! - Handlers bound their own work with a [`Gate`] (in-flight requests, waiting at most a short
//!   time for a slot) and [`PeerLimit`] (requests per client address).
//! - [`serve_until`] drains in two steps (see [`Stopping`]): once the replica is closing, every
//!   answer says `Connection: close`, so clients leave their kept-alive connections for other
//!   replicas; once it stops, it stops accepting, lets every in-flight request finish (up to
//!   [`Limits::drain_timeout`]) and closes the connections still idle.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Bytes, Incoming};
use hyper::header::{CONNECTION, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, SemaphorePermit};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::shutdown::Shutdown;

const MAX_HEADER_BYTES: usize = 16 * 1024;

/// The bounds of one server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Open connections at most (idle, handshaking or serving).
    pub max_connections: usize,
    /// How long a new connection may stay silent before its first byte.
    pub idle_timeout: Duration,
    pub handshake_timeout: Duration,
    /// How long a connection's first request headers may take.
    pub header_timeout: Duration,
    /// How long a kept-alive connection may idle before its next request's headers are in
    /// (longer than clients keep idle connections, so they close first).
    pub keep_alive_timeout: Duration,
    /// How long in-flight requests get to finish once shutdown is requested.
    pub drain_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            idle_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(5),
            header_timeout: Duration::from_secs(5),
            keep_alive_timeout: Duration::from_secs(120),
            drain_timeout: Duration::from_secs(20),
        }
    }
}

/// How a server winds down.
///
/// - `closing` (the process got SIGTERM; readiness is already 503): the server still accepts and
///   answers, but every answer carries `Connection: close`, so a client leaves its kept-alive
///   connection after its next answer and reconnects through the endpoints, which drop this
///   replica meanwhile. Endpoints only steer new connections; without this, a busy client
///   (the apiserver, a node's sidecars) would keep sending on its old connection until `stop`.
/// - `stop`: stop accepting, finish what is in flight, close the connections still idle.
///   Closing an idle connection races a request its client may be sending on it at that very
///   moment (which fails: a POST is not resent); after `closing` only connections that stayed
///   idle all along are left.
#[derive(Clone, Debug)]
pub struct Stopping {
    pub closing: Shutdown,
    pub stop: Shutdown,
}

impl From<Shutdown> for Stopping {
    /// Closing and stopping at once (no delay between them).
    fn from(stop: Shutdown) -> Self {
        Self {
            closing: stop.clone(),
            stop,
        }
    }
}

/// Serves `handler` on `listener` until the future is dropped. The handler answers every
/// request itself (errors included), so it returns a response, never an error.
pub async fn serve<H, F, B>(listener: TcpListener, tls: Arc<rustls::ServerConfig>, handler: H)
where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    serve_until(listener, tls, Limits::default(), Shutdown::never(), handler).await
}

/// [`serve`] with explicit limits, answering with `Connection: close` once `shutdown.closing`
/// was requested and returning once `shutdown.stop` was and every connection finished (or
/// [`Limits::drain_timeout`] passed).
pub async fn serve_until<H, F, B>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    limits: Limits,
    shutdown: impl Into<Stopping>,
    handler: H,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let shutdown: Stopping = shutdown.into();
    let acceptor = TlsAcceptor::from(tls);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let stopping = shutdown.stop.clone().requested();
    tokio::pin!(stopping);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut stopping => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            debug!(%peer, max = limits.max_connections, "connection cap reached; closing");
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, handler, shutdown) = (acceptor.clone(), handler.clone(), shutdown.clone());
        tokio::spawn(connection(
            tcp, peer, acceptor, handler, limits, shutdown, permit,
        ));
    }
    drop(listener);
    let open = limits.max_connections - slots.available_permits();
    if open > 0 {
        info!(open, "draining connections");
    }
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(limits.drain_timeout, slots.acquire_many(all))
        .await
        .is_err()
    {
        warn!(
            open = limits.max_connections - slots.available_permits(),
            "connections still open after the drain timeout"
        );
    }
}

async fn connection<H, F, B>(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    handler: H,
    limits: Limits,
    shutdown: Stopping,
    permit: OwnedSemaphorePermit,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let _permit = permit;
    // Silent connections cost a socket and this task, nothing more.
    match tokio::time::timeout(limits.idle_timeout, tcp.readable()).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) | Err(_) => return,
    }
    let tls = match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return debug!(%peer, error = %e, "TLS handshake failed"),
        Err(_) => return debug!(%peer, "TLS handshake timed out"),
    };
    let closing = shutdown.closing;
    let served = Arc::new(AtomicBool::new(false));
    let first_request = Arc::clone(&served);
    let service = service_fn(move |req| {
        first_request.store(true, Ordering::Relaxed);
        let response = handler(req, peer);
        let closing = closing.clone();
        async move {
            let mut response = response.await;
            // Checked once the answer is ready, so a request that was in flight at the signal
            // also ends its connection.
            if closing.is_requested() {
                response
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.keep_alive_timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        .serve_connection(TokioIo::new(tls), service);
    tokio::pin!(conn);
    let stopping = shutdown.stop.requested();
    tokio::pin!(stopping);
    // The first request's headers get the short timeout; later ones the keep-alive one.
    let first_headers = tokio::time::sleep(limits.header_timeout);
    tokio::pin!(first_headers);
    let mut first_due = true;
    let result = loop {
        tokio::select! {
            result = conn.as_mut() => break result,
            () = &mut stopping => {
                // Finishes the request in flight (if any), then closes.
                conn.as_mut().graceful_shutdown();
                break conn.await;
            }
            () = &mut first_headers, if first_due => {
                if !served.load(Ordering::Relaxed) {
                    return debug!(%peer, "no request headers in time");
                }
                first_due = false;
            }
        }
    };
    if let Err(e) = result {
        debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// A cap on requests being handled at once. A request that finds no slot waits at most
/// `wait`, then is refused: an answer within the caller's timeout beats a queue past it.
#[derive(Debug)]
pub struct Gate {
    slots: Semaphore,
    wait: Duration,
}

impl Gate {
    pub fn new(max: usize, wait: Duration) -> Self {
        Self {
            slots: Semaphore::new(max),
            wait,
        }
    }

    /// A slot, or `None` when none freed up in time.
    pub async fn enter(&self) -> Option<SemaphorePermit<'_>> {
        match tokio::time::timeout(self.wait, self.slots.acquire()).await {
            Ok(Ok(permit)) => Some(permit),
            Ok(Err(_)) | Err(_) => None,
        }
    }
}

/// A cap on concurrent requests per client address, so one client cannot take every slot of
/// a [`Gate`].
#[derive(Debug)]
pub struct PeerLimit {
    max: usize,
    active: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// Held while a client's request is handled; releases its place on drop.
#[derive(Debug)]
pub struct PeerSlot {
    peer: IpAddr,
    active: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl PeerLimit {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            active: Arc::default(),
        }
    }

    /// A place for `peer`, or `None` when it already has `max` requests in flight.
    pub fn enter(&self, peer: IpAddr) -> Option<PeerSlot> {
        let mut active = self.active.lock().ok()?;
        let count = active.entry(peer).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(PeerSlot {
            peer,
            active: Arc::clone(&self.active),
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        if let Ok(mut active) = self.active.lock()
            && let Some(count) = active.get_mut(&self.peer)
        {
            *count = count.saturating_sub(1);
            if *count == 0 {
                active.remove(&self.peer);
            }
        }
    }
}

/// Why a request body could not be read.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("the request body must be at most {0} bytes")]
    TooLarge(usize),
    #[error("the request body did not arrive in time")]
    Timeout,
    #[error("the request body could not be read")]
    Broken,
}

/// Reads a body of at most `max` bytes within `timeout`.
pub async fn read_body(body: Incoming, max: usize, timeout: Duration) -> Result<Bytes, BodyError> {
    match tokio::time::timeout(timeout, Limited::new(body, max).collect()).await {
        Ok(Ok(body)) => Ok(body.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge(max)),
        Ok(Err(_)) => Err(BodyError::Broken),
        Err(_) => Err(BodyError::Timeout),
    }
}

/// A JSON response.
pub fn json<T: serde::Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = status;
    if let Ok(value) = "application/json".parse() {
        response.headers_mut().insert(CONTENT_TYPE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_slots_are_counted_per_address_and_released() {
        let limit = PeerLimit::new(2);
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let first = limit.enter(a).expect("first");
        let second = limit.enter(a).expect("second");
        assert!(limit.enter(a).is_none(), "a third request of one peer");
        assert!(limit.enter(b).is_some(), "another peer is unaffected");
        drop(first);
        let third = limit.enter(a).expect("a freed place is reused");
        drop((second, third));
        assert!(limit.active.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_full_gate_refuses_after_its_wait() {
        let gate = Gate::new(1, Duration::from_millis(30));
        let held = gate.enter().await.expect("a free slot");
        assert!(gate.enter().await.is_none());
        drop(held);
        assert!(gate.enter().await.is_some());
    }

    /// A server with a fresh self-signed certificate for 127.0.0.1 and a client trusting it.
    async fn served(limits: Limits) -> (SocketAddr, tokio_rustls::TlsConnector) {
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let key =
            rustls::pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der()).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.cert.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve_until(
            listener,
            Arc::new(server),
            limits,
            Shutdown::never(),
            |_req, _peer| async { Response::new(Full::new(Bytes::from_static(b"ok"))) },
        ));
        (addr, tokio_rustls::TlsConnector::from(Arc::new(client)))
    }

    async fn tls(
        addr: SocketAddr,
        connector: &tokio_rustls::TlsConnector,
    ) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        connector.connect(name, tcp).await.unwrap()
    }

    const GET: &[u8] = b"GET / HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n";

    /// Reads one small answer (or EOF: `None`).
    async fn answer(
        stream: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    ) -> Option<String> {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0; 4096];
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => None,
            Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        }
    }

    #[tokio::test]
    async fn first_headers_are_bounded_and_a_kept_alive_connection_outlives_them() {
        use tokio::io::AsyncWriteExt;
        let limits = Limits {
            header_timeout: Duration::from_millis(200),
            keep_alive_timeout: Duration::from_millis(1500),
            ..Limits::default()
        };
        let (addr, connector) = served(limits).await;

        // Silent after the handshake: closed once the first headers are late.
        let mut silent = tls(addr, &connector).await;
        let started = std::time::Instant::now();
        assert_eq!(answer(&mut silent).await, None);
        assert!(
            started.elapsed() < Duration::from_millis(1000),
            "{:?}",
            started.elapsed()
        );

        // Headers trickled past the first-headers bound: closed too.
        let mut slow = tls(addr, &connector).await;
        slow.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        assert_eq!(answer(&mut slow).await, None);

        // A connection that was served stays open through idle periods longer than the
        // first-headers bound (its client, not the server, closes it)...
        let mut kept = tls(addr, &connector).await;
        kept.write_all(GET).await.unwrap();
        assert!(answer(&mut kept).await.unwrap().starts_with("HTTP/1.1 200"));
        tokio::time::sleep(Duration::from_millis(700)).await;
        kept.write_all(GET).await.unwrap();
        assert!(answer(&mut kept).await.unwrap().starts_with("HTTP/1.1 200"));
        // ...and is closed once idle past the keep-alive bound.
        let idle = std::time::Instant::now();
        assert_eq!(answer(&mut kept).await, None);
        assert!(
            idle.elapsed() >= Duration::from_millis(1000),
            "{:?}",
            idle.elapsed()
        );
    }
}

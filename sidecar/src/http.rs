//! The sidecar's two small HTTP/1.1 servers: the AWS container-credentials endpoint on
//! loopback, and the probes plus metrics on the pod IP. Routing is pure ([`credentials`],
//! [`health`]); [`serve`] is the bounded I/O around it.
//!
//! The health port is reachable from the whole pod network, so a flood of idle connections
//! must not keep the kubelet's probe out. A connection holds nothing but its socket until its
//! first byte arrives (at most [`IDLE_TIMEOUT`]); the cap on open connections is kept by closing
//! the oldest silent one when a new one arrives, never by leaving new ones in the accept queue.
//! Each connection serves one request (the kubelet opens one per probe), so nothing idles
//! after an answer either.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use keybroker_contract::paths;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tracing::debug;

use crate::state::{self, Key, Kind};

const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a new connection may stay silent before it is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_HEADER_BYTES: usize = 8 * 1024;
/// Open connections at most. Real callers (the app's SDKs, the kubelet, Prometheus) need a
/// handful; past the cap the oldest silent connection makes room for the new one.
const MAX_CONNECTIONS: usize = 256;
/// How long a new connection waits for room when every open one is busy being answered.
const ROOM_WAIT: Duration = Duration::from_millis(200);

/// An answer before it becomes a hyper response.
#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Reply {
    fn text(status: StatusCode, body: &str) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.as_bytes().to_vec(),
        }
    }
}

/// `GET /v1/credentials/<apikey>` with `Authorization: <token>` (the random token in
/// `<output-dir>/.auth-token`; any process on the pod's loopback can connect, only the pod's
/// containers can read the token file).
pub fn credentials(
    keys: &[Key],
    token: &str,
    method: &Method,
    path: &str,
    authorization: Option<&[u8]>,
) -> Reply {
    if method != Method::GET {
        return Reply::text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
    }
    if !authorization.is_some_and(|a| constant_time_eq(a, token.as_bytes())) {
        return Reply::text(
            StatusCode::UNAUTHORIZED,
            "send the contents of .auth-token as the Authorization header\n",
        );
    }
    let Some(name) = path.strip_prefix(paths::CREDENTIALS_PREFIX) else {
        return Reply::text(StatusCode::NOT_FOUND, "use /v1/credentials/<apikey>\n");
    };
    match keys.iter().find(|k| k.name == name) {
        None => Reply::text(
            StatusCode::NOT_FOUND,
            "this sidecar serves no such ApiKey\n",
        ),
        Some(key) => match (key.container_answer(), key.kind()) {
            (Some(body), _) => Reply {
                status: StatusCode::OK,
                content_type: "application/json",
                body,
            },
            // Final, unlike "not fetched yet": an SDK pointed here for such a key never works.
            (None, Some(Kind::OAuth2)) => Reply::text(
                StatusCode::BAD_REQUEST,
                &format!(
                    "ApiKey {name} is an OAuth2 ApiKey: send the access token in {name}/token of the sidecar's output directory as `Authorization: Bearer`; this endpoint serves AWS ApiKeys only\n"
                ),
            ),
            (None, Some(Kind::Gateway)) => Reply::text(
                StatusCode::BAD_REQUEST,
                &format!(
                    "ApiKey {name} is a gateway ApiKey: call its upstream through the sidecar's local gateway, /{name}/<path>; this endpoint serves AWS ApiKeys only\n"
                ),
            ),
            (None, _) => Reply::text(
                StatusCode::NOT_FOUND,
                "no credentials for this ApiKey right now (not fetched yet, revoked or expired)\n",
            ),
        },
    }
}

/// `/startupz` (200 once every ApiKey had its first credentials, token or session), `/livez`,
/// `/metrics`.
pub fn health(keys: &[Key], method: &Method, path: &str) -> Reply {
    if method != Method::GET {
        return Reply::text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
    }
    match path {
        paths::STARTUPZ => {
            let waiting: Vec<&str> = keys
                .iter()
                .filter(|k| !k.started())
                .map(|k| k.name.as_str())
                .collect();
            if waiting.is_empty() {
                Reply::text(StatusCode::OK, "ok\n")
            } else {
                Reply::text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!(
                        "waiting for the first credentials of {}\n",
                        waiting.join(", ")
                    ),
                )
            }
        }
        // Answering at all shows the runtime is alive; broker trouble is not fixed by a restart.
        paths::LIVEZ => Reply::text(StatusCode::OK, "ok\n"),
        paths::METRICS => Reply {
            status: StatusCode::OK,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: state::metrics(keys).into_bytes(),
        },
        _ => Reply::text(StatusCode::NOT_FOUND, "use /startupz, /livez or /metrics\n"),
    }
}

/// Compares without an early exit, so the time taken says nothing about the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Serves `route` on `listener` until the future is dropped. Requests are never read past
/// their headers (no route takes a body).
pub async fn serve<F>(listener: TcpListener, route: F)
where
    F: Fn(&Method, &str, Option<&[u8]>) -> Reply + Send + Sync + 'static,
{
    let route = Arc::new(route);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let silent = Arc::new(Silent::default());
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let permit = match Arc::clone(&slots).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                silent.evict_oldest();
                match tokio::time::timeout(ROOM_WAIT, Arc::clone(&slots).acquire_owned()).await {
                    Ok(Ok(permit)) => permit,
                    Ok(Err(_)) | Err(_) => {
                        debug!(%peer, "every connection is busy; closing the new one");
                        continue;
                    }
                }
            }
        };
        let (route, silent) = (Arc::clone(&route), Arc::clone(&silent));
        tokio::spawn(async move {
            let _permit = permit;
            if !silent.wait_for_first_byte(&tcp).await {
                return;
            }
            let service = service_fn(move |req: Request<Incoming>| {
                let reply = route(
                    req.method(),
                    req.uri().path(),
                    req.headers().get(AUTHORIZATION).map(|v| v.as_bytes()),
                );
                let mut response = Response::new(Full::new(Bytes::from(reply.body)));
                *response.status_mut() = reply.status;
                let headers = response.headers_mut();
                headers.insert(
                    CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static(reply.content_type),
                );
                headers.insert(
                    CACHE_CONTROL,
                    hyper::header::HeaderValue::from_static("no-store"),
                );
                async move { Ok::<_, Infallible>(response) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .max_buf_size(MAX_HEADER_BYTES)
                .serve_connection(TokioIo::new(tcp), service);
            if let Err(e) = conn.await {
                debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

/// The connections that have not sent a byte yet, oldest first (a [`Notify`] wakes its
/// waiters in the order they began waiting).
#[derive(Debug, Default)]
struct Silent {
    count: AtomicUsize,
    evict: Notify,
}

impl Silent {
    /// Waits for the connection's first byte: true when it came, false when the connection
    /// stayed silent too long, closed, or was evicted to make room.
    async fn wait_for_first_byte(&self, tcp: &tokio::net::TcpStream) -> bool {
        self.count.fetch_add(1, Ordering::SeqCst);
        let arrived = tokio::select! {
            ready = tokio::time::timeout(IDLE_TIMEOUT, tcp.readable()) => matches!(ready, Ok(Ok(()))),
            () = self.evict.notified() => false,
        };
        self.count.fetch_sub(1, Ordering::SeqCst);
        arrived
    }

    /// Closes the oldest silent connection, if there is one (no wake-up is stored for later).
    fn evict_oldest(&self) {
        if self.count.load(Ordering::SeqCst) > 0 {
            self.evict.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use keybroker_contract::wire::{AccessToken, Credentials};

    use super::*;
    use crate::atomic::Writer;
    use crate::state::Held;
    use crate::{files, token};

    fn keys_with_one_held(tag: &str) -> (Vec<Key>, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("kb-http-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let writer = Writer::new(&dir, 0o440);
        let held = Key::new("uploader");
        let creds = files::validate(&Credentials {
            access_key_id: "AKID".into(),
            secret_access_key: "S".into(),
            session_token: "T".into(),
            expiration: "2030-01-01T00:00:00Z".into(),
        })
        .unwrap();
        held.install(held.epoch(), Held::Aws(creds), "g1".into(), &writer)
            .unwrap();
        (vec![held, Key::new("later")], dir)
    }

    /// `uploader` (AWS, held), `later` (nothing yet) and `reports` (an OAuth2 token, held).
    fn keys_with_a_token(tag: &str) -> (Vec<Key>, std::path::PathBuf) {
        let (mut keys, dir) = keys_with_one_held(tag);
        let reports = Key::new("reports");
        let token = token::validate(&AccessToken {
            access_token: "TOKENVALUE".into(),
            token_type: "Bearer".into(),
            expiration: "2030-01-01T00:00:00Z".into(),
            scope: vec!["reports:read".into()],
            audience: vec![],
        })
        .unwrap();
        reports
            .install(
                reports.epoch(),
                Held::Token(token),
                "g1".into(),
                &Writer::new(&dir, 0o440),
            )
            .unwrap();
        keys.push(reports);
        (keys, dir)
    }

    #[test]
    fn the_credentials_endpoint_refuses_an_oauth2_apikey() {
        let (keys, dir) = keys_with_a_token("oauth2");
        let answer = credentials(
            &keys,
            "tok",
            &Method::GET,
            "/v1/credentials/reports",
            Some(b"tok"),
        );
        assert_eq!(answer.status, StatusCode::BAD_REQUEST);
        let text = String::from_utf8_lossy(&answer.body);
        assert!(
            text.contains("OAuth2 ApiKey") && text.contains("reports/token"),
            "{text}"
        );
        assert!(!text.contains("TOKENVALUE"), "{text}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_credentials_endpoint_checks_the_token_and_the_key() {
        let (keys, dir) = keys_with_one_held("creds");
        let get = |path: &str, auth: Option<&str>| {
            credentials(&keys, "tok", &Method::GET, path, auth.map(str::as_bytes))
        };
        let ok = get("/v1/credentials/uploader", Some("tok"));
        assert_eq!(ok.status, StatusCode::OK);
        let json: serde_json::Value = serde_json::from_slice(&ok.body).unwrap();
        assert_eq!(json["AccessKeyId"], "AKID");
        assert_eq!(json["Token"], "T");
        for (path, auth, status) in [
            ("/v1/credentials/uploader", None, 401),
            ("/v1/credentials/uploader", Some("tok2"), 401),
            ("/v1/credentials/uploader", Some("to"), 401),
            ("/v1/credentials/later", Some("tok"), 404),
            ("/v1/credentials/other", Some("tok"), 404),
            ("/elsewhere", Some("tok"), 404),
        ] {
            assert_eq!(get(path, auth).status.as_u16(), status, "{path} {auth:?}");
        }
        let post = credentials(
            &keys,
            "tok",
            &Method::POST,
            "/v1/credentials/uploader",
            Some(b"tok"),
        );
        assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn startup_waits_for_every_key() {
        let (keys, dir) = keys_with_a_token("health");
        let startup = health(&keys, &Method::GET, "/startupz");
        assert_eq!(startup.status, StatusCode::SERVICE_UNAVAILABLE);
        let text = String::from_utf8_lossy(&startup.body);
        assert!(
            text.contains("later") && !text.contains("reports"),
            "{text}"
        );
        let (held, _later) = keys.split_at(1);
        assert_eq!(
            health(held, &Method::GET, "/startupz").status,
            StatusCode::OK
        );
        assert_eq!(
            health(&keys[2..], &Method::GET, "/startupz").status,
            StatusCode::OK,
            "an OAuth2 ApiKey has started once its first token is written"
        );
        assert_eq!(health(&keys, &Method::GET, "/livez").status, StatusCode::OK);
        let metrics = health(&keys, &Method::GET, "/metrics");
        assert!(
            String::from_utf8_lossy(&metrics.body).contains("keybroker_sidecar_refreshes_total")
        );
        assert_eq!(
            health(&keys, &Method::GET, "/x").status,
            StatusCode::NOT_FOUND
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Writes `request` and reads until the server closes (it serves one request per
    /// connection), within `within`.
    async fn ask(addr: std::net::SocketAddr, request: &[u8], within: Duration) -> Option<Vec<u8>> {
        let exchange = async {
            let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
            let mut sent = 0;
            while sent < request.len() {
                tcp.writable().await.ok()?;
                match tcp.try_write(&request[sent..]) {
                    Ok(n) => sent += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return None,
                }
            }
            let mut answer = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                tcp.readable().await.ok()?;
                match tcp.try_read(&mut buf) {
                    Ok(0) => return Some(answer),
                    Ok(n) => answer.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return Some(answer),
                }
            }
        };
        tokio::time::timeout(within, exchange).await.ok().flatten()
    }

    #[tokio::test]
    async fn the_probe_answers_under_a_flood_of_idle_connections() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, |_, path, _| {
            Reply::text(StatusCode::OK, path)
        }));
        // Four times the connection cap, none of them sending a byte.
        let mut idle = Vec::new();
        for _ in 0..(4 * MAX_CONNECTIONS) {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        tokio::task::yield_now().await;
        let started = std::time::Instant::now();
        let answer = ask(
            addr,
            b"GET /livez HTTP/1.1\r\nHost: pod\r\n\r\n",
            Duration::from_secs(1),
        )
        .await
        .expect("the probe was answered within 1 s");
        let took = started.elapsed();
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.ends_with("/livez"), "{text}");
        // Silent connections are closed, not kept: the oldest made room, the rest time out.
        let closed = tokio::time::timeout(IDLE_TIMEOUT * 3, async {
            let mut buf = [0u8; 1];
            for tcp in &idle {
                loop {
                    if tcp.readable().await.is_err() {
                        break;
                    }
                    match tcp.try_read(&mut buf) {
                        // Closed (or reset) by the server.
                        Ok(0) => break,
                        Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => break,
                        _ => {}
                    }
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "idle connections were left open");
        eprintln!(
            "probe answered in {took:?} with {} idle connections",
            idle.len()
        );
        server.abort();
    }
}

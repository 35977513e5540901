//! The sidecar's two small HTTP/1.1 servers: the AWS container-credentials endpoint on
//! loopback, and the probes plus metrics on the pod IP. Routing is pure ([`credentials`],
//! [`health`]); [`serve`] is the bounded I/O around it.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::debug;

use crate::state::{self, Key};

const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_HEADER_BYTES: usize = 8 * 1024;
/// Connections served at once; more wait in the accept queue. Callers are the app's SDKs, the
/// kubelet and Prometheus: a handful.
const MAX_CONNECTIONS: usize = 32;

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
    let Some(name) = path.strip_prefix("/v1/credentials/") else {
        return Reply::text(StatusCode::NOT_FOUND, "use /v1/credentials/<apikey>\n");
    };
    match keys.iter().find(|k| k.name == name) {
        None => Reply::text(
            StatusCode::NOT_FOUND,
            "this sidecar serves no such ApiKey\n",
        ),
        Some(key) => match key.container_answer() {
            Some(body) => Reply {
                status: StatusCode::OK,
                content_type: "application/json",
                body,
            },
            None => Reply::text(
                StatusCode::NOT_FOUND,
                "no credentials for this ApiKey right now (not fetched yet, revoked or expired)\n",
            ),
        },
    }
}

/// `/startupz` (200 once every ApiKey had its first credentials written), `/livez`, `/metrics`.
pub fn health(keys: &[Key], method: &Method, path: &str) -> Reply {
    if method != Method::GET {
        return Reply::text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
    }
    match path {
        "/startupz" => {
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
        "/livez" => Reply::text(StatusCode::OK, "ok\n"),
        "/metrics" => Reply {
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
    loop {
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let route = Arc::clone(&route);
        tokio::spawn(async move {
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
                .max_buf_size(MAX_HEADER_BYTES)
                .serve_connection(TokioIo::new(tcp), service);
            if let Err(e) = conn.await {
                debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use keybroker_sidecar::wire::Credentials;

    use super::*;
    use crate::atomic::Writer;
    use crate::files;

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
        held.install(held.epoch(), creds, "g1".into(), &writer)
            .unwrap();
        (vec![held, Key::new("later")], dir)
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
        let (keys, dir) = keys_with_one_held("health");
        let startup = health(&keys, &Method::GET, "/startupz");
        assert_eq!(startup.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(String::from_utf8_lossy(&startup.body).contains("later"));
        assert_eq!(
            health(&keys[..1], &Method::GET, "/startupz").status,
            StatusCode::OK
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
}

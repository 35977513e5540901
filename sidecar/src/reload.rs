//! Reload notifications: after each new credential generation the sidecar POSTs
//! `{"apiKey": ..., "expiration": ...}` to the app's loopback URL (the pod's
//! `keybroker.dev/reload-url`), so apps that build a client once (an SDK client created at
//! start) can rebuild it. Best effort: one try, bounded in time, logged; never a secret in it.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use keybroker_contract::reload::Target;
use tracing::{info, warn};

/// The whole notification (connect, request, answer) takes at most this.
const TIMEOUT: Duration = Duration::from_secs(2);

/// Tells the app at `target` that ApiKey `api_key` has new credentials, valid until
/// `expiration`. Logs the outcome.
pub async fn notify(target: Target, api_key: String, expiration: String) {
    match tokio::time::timeout(TIMEOUT, post(&target, &api_key, &expiration)).await {
        Ok(Ok(status)) if (200..300).contains(&status) => {
            info!(
                apikey = api_key,
                status, "the app was told of the new credentials"
            )
        }
        Ok(Ok(status)) => {
            warn!(
                apikey = api_key,
                status,
                path = target.path,
                "the app answered the reload notification with an error"
            )
        }
        Ok(Err(e)) => {
            warn!(apikey = api_key, error = %e, port = target.port, "the reload notification did not reach the app")
        }
        Err(_) => warn!(
            apikey = api_key,
            port = target.port,
            "the app did not answer the reload notification within 2 s"
        ),
    }
}

/// Why a notification did not get an answer.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("connecting to the app: {0}")]
    Connect(std::io::Error),
    #[error("the path is not a valid request target")]
    Path,
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

async fn post(target: &Target, api_key: &str, expiration: &str) -> Result<u16, Failure> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, target.port));
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(Failure::Connect)?;
    let body = serde_json::json!({ "apiKey": api_key, "expiration": expiration }).to_string();
    let request = Request::builder()
        .method(Method::POST)
        .uri(target.path.as_str())
        .header(HOST, format!("127.0.0.1:{}", target.port))
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|_| Failure::Path)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    let conn = tokio::spawn(conn);
    let status = sender.send_request(request).await;
    conn.abort();
    Ok(status?.status().as_u16())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn the_app_gets_a_post_naming_the_apikey_and_expiry() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let app = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            let mut buf = [0; 1024];
            while !String::from_utf8_lossy(&seen).contains("\"expiration\"") {
                let n = conn.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed early");
                seen.extend_from_slice(&buf[..n]);
            }
            conn.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                .await
                .unwrap();
            String::from_utf8(seen).unwrap()
        });
        let target = Target {
            port,
            path: "/-/reload".into(),
        };
        post(&target, "uploader", "2030-01-01T00:00:00Z")
            .await
            .map(|status| assert_eq!(status, 204))
            .unwrap();
        let request = app.await.unwrap();
        assert!(
            request.starts_with("POST /-/reload HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(
            request.ends_with(r#"{"apiKey":"uploader","expiration":"2030-01-01T00:00:00Z"}"#),
            "{request}"
        );
        // Nobody listening: a failure to report, not a hang or a panic.
        drop(tokio::net::TcpListener::bind(("127.0.0.1", port)).await);
        let closed = Target {
            port,
            path: "/".into(),
        };
        assert!(matches!(
            post(&closed, "uploader", "").await,
            Err(Failure::Connect(_))
        ));
    }
}

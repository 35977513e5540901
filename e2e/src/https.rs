//! A minimal HTTPS client for tests, trusting one CA: one connection per request, so every
//! request also exercises the server's TLS handshake.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};

/// A response: status, `Retry-After` (if any), whether it closes the connection, and body.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub retry_after: Option<String>,
    /// The server said `Connection: close`: this connection takes no further request.
    pub closes: bool,
    pub body: Bytes,
}

impl Reply {
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> anyhow::Result<T> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "{} body: {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

#[derive(Clone)]
pub struct Client {
    connector: tokio_rustls::TlsConnector,
    addr: std::net::SocketAddr,
    /// The local address connections come from (default: the system's choice).
    source: Option<std::net::IpAddr>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("addr", &self.addr).finish()
    }
}

impl Client {
    /// A client for the server at `addr` whose certificate chains to the CA in `ca_pem`.
    pub fn new(addr: std::net::SocketAddr, ca_pem: &Path) -> anyhow::Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca_pem)? {
            roots.add(cert?)?;
        }
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            addr,
            source: None,
        })
    }

    /// The same client, connecting from `source` (e.g. another 127.0.0.0/8 address, to play a
    /// different peer on one machine).
    pub fn from_source(&self, source: std::net::IpAddr) -> Self {
        Self {
            source: Some(source),
            ..self.clone()
        }
    }

    /// Sends `method path` with an optional bearer token and body on a new connection.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: Vec<u8>,
    ) -> anyhow::Result<Reply> {
        self.connect().await?.send(method, path, bearer, body).await
    }

    /// A kept-alive connection for several requests in a row.
    pub async fn connect(&self) -> anyhow::Result<Connection> {
        let tcp = match self.source {
            None => tokio::net::TcpStream::connect(self.addr).await?,
            Some(source) => {
                let socket = tokio::net::TcpSocket::new_v4()?;
                socket.bind(std::net::SocketAddr::new(source, 0))?;
                socket.connect(self.addr).await?
            }
        };
        tcp.set_nodelay(true)?;
        let tls = self
            .connector
            .connect(ServerName::IpAddress(self.addr.ip().into()), tcp)
            .await
            .context("TLS handshake")?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        Ok(Connection {
            sender,
            host: self.addr.to_string(),
        })
    }
}

/// Why [`Connection::try_send`] got no reply.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The connection was closed before the request was written: the server never saw it, so
    /// the client may send it again (elsewhere), as an HTTP client does with a stale
    /// kept-alive connection.
    #[error("the connection was closed before the request was sent: {0}")]
    NotSent(#[source] hyper::Error),
    /// The request went out and no complete response came back.
    #[error("the request was sent but no complete response came back: {0}")]
    Failed(#[source] anyhow::Error),
}

/// One HTTP/1.1 connection over TLS.
#[derive(Debug)]
pub struct Connection {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    host: String,
}

impl Connection {
    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: Vec<u8>,
    ) -> anyhow::Result<Reply> {
        self.sender.ready().await?;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.host);
        if let Some(token) = bearer {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        let response = self
            .sender
            .send_request(req.body(Full::new(Bytes::from(body)))?)
            .await?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let closes = closes(response.headers());
        let body = response.into_body().collect().await?.to_bytes();
        Ok(Reply {
            status,
            retry_after,
            closes,
            body,
        })
    }

    /// Whether the connection is known to be closed (by either side).
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    /// [`Connection::send`], telling a request the server never saw ([`SendError::NotSent`])
    /// from one that failed after it went out.
    pub async fn try_send(
        &mut self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: Vec<u8>,
    ) -> Result<Reply, SendError> {
        self.sender.ready().await.map_err(SendError::NotSent)?;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.host);
        if let Some(token) = bearer {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| SendError::Failed(e.into()))?;
        let response = match self.sender.try_send_request(req).await {
            Ok(response) => response,
            Err(e) if e.message().is_some() => {
                return Err(SendError::NotSent(e.into_error()));
            }
            Err(e) => return Err(SendError::Failed(e.into_error().into())),
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let closes = closes(response.headers());
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| SendError::Failed(e.into()))?
            .to_bytes();
        Ok(Reply {
            status,
            retry_after,
            closes,
            body,
        })
    }
}

/// Whether `Connection` lists `close`.
pub(crate) fn closes(headers: &hyper::HeaderMap) -> bool {
    headers
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("close"))
}

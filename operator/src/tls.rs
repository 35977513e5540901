//! Serving TLS from a certificate and key on disk, re-read when the files change (cert-manager
//! or a Secret volume rotates them), so a rotation needs no restart. The files are checked at
//! most once a second, on new connections only.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading TLS certificate {path}: {detail}")]
    Cert { path: PathBuf, detail: String },
    #[error("reading TLS key {path}: {detail}")]
    Key { path: PathBuf, detail: String },
    #[error("TLS key {path} does not match its certificate or is unsupported: {detail}")]
    Unusable { path: PathBuf, detail: String },
}

/// Resolves the serving certificate from `cert`/`key`, reloading them when they change.
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    state: Mutex<State>,
}

struct State {
    loaded: Arc<CertifiedKey>,
    modified: (Option<SystemTime>, Option<SystemTime>),
    checked: Instant,
}

impl fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish()
    }
}

impl ReloadingCert {
    /// Loads the pair once, failing with a clear error if it is unusable.
    pub fn new(cert: &Path, key: &Path) -> Result<Self, Error> {
        let loaded = load(cert, key)?;
        Ok(Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            state: Mutex::new(State {
                loaded,
                modified: (modified(cert), modified(key)),
                checked: Instant::now(),
            }),
        })
    }

    /// A rustls server configuration (HTTP/1.1) serving this certificate.
    pub fn server_config(self) -> rustls::ServerConfig {
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(self));
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config
    }

    fn current(&self) -> Option<Arc<CertifiedKey>> {
        let mut state = self.state.lock().ok()?;
        if state.checked.elapsed() >= Duration::from_secs(1) {
            state.checked = Instant::now();
            let now = (modified(&self.cert), modified(&self.key));
            if now != state.modified {
                match load(&self.cert, &self.key) {
                    Ok(loaded) => {
                        state.loaded = loaded;
                        state.modified = now;
                        tracing::info!(cert = %self.cert.display(), "reloaded the serving certificate");
                    }
                    // Mid-rotation the pair can be inconsistent for a moment; keep serving the
                    // old one and try again on a later connection.
                    Err(e) => {
                        tracing::warn!(error = %e, "keeping the previous serving certificate")
                    }
                }
            }
        }
        Some(Arc::clone(&state.loaded))
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn load(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, Error> {
    let cert_pem = std::fs::read(cert).map_err(|e| Error::Cert {
        path: cert.to_owned(),
        detail: e.to_string(),
    })?;
    let key_pem = std::fs::read(key).map_err(|e| Error::Key {
        path: key.to_owned(),
        detail: e.to_string(),
    })?;
    certified_key(&cert_pem, &key_pem).map_err(|e| match e {
        PemError::Cert(detail) => Error::Cert {
            path: cert.to_owned(),
            detail,
        },
        PemError::Key(detail) => Error::Key {
            path: key.to_owned(),
            detail,
        },
        PemError::Unusable(detail) => Error::Unusable {
            path: key.to_owned(),
            detail,
        },
    })
}

/// Why a PEM certificate and key cannot be served.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PemError {
    #[error("the certificate is unreadable: {0}")]
    Cert(String),
    #[error("the private key is unreadable: {0}")]
    Key(String),
    #[error("the private key does not match the certificate or is unsupported: {0}")]
    Unusable(String),
}

/// A servable certificate from a PEM chain and a PEM private key.
pub fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<CertifiedKey>, PemError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| PemError::Cert(e.to_string()))?;
    if chain.is_empty() {
        return Err(PemError::Cert("no CERTIFICATE block".into()));
    }
    let private =
        PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| PemError::Key(e.to_string()))?;
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
    CertifiedKey::from_der(chain, private, &provider)
        .map(Arc::new)
        .map_err(|e| PemError::Unusable(e.to_string()))
}

/// A serving certificate held in memory and swapped whole (the webhook's self-managed
/// certificate, read from its Secret). Handshakes fail until the first one is set.
#[derive(Default)]
pub struct MemoryCert {
    current: std::sync::RwLock<Option<(Vec<u8>, Arc<CertifiedKey>)>>,
}

impl fmt::Debug for MemoryCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryCert")
            .field("ready", &self.is_ready())
            .finish()
    }
}

impl MemoryCert {
    /// Serves `cert_pem`/`key_pem` from the next handshake on; true when it changed.
    pub fn set(&self, cert_pem: &[u8], key_pem: &[u8]) -> Result<bool, PemError> {
        if let Ok(current) = self.current.read()
            && current.as_ref().is_some_and(|(pem, _)| pem == cert_pem)
        {
            return Ok(false);
        }
        let key = certified_key(cert_pem, key_pem)?;
        if let Ok(mut current) = self.current.write() {
            *current = Some((cert_pem.to_vec(), key));
        }
        Ok(true)
    }

    /// True once a certificate is set.
    pub fn is_ready(&self) -> bool {
        self.current.read().is_ok_and(|c| c.is_some())
    }

    /// A rustls server configuration (HTTP/1.1) serving the current certificate.
    pub fn server_config(self: &Arc<Self>) -> rustls::ServerConfig {
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config
    }
}

impl ResolvesServerCert for MemoryCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current
            .read()
            .ok()
            .and_then(|c| c.as_ref().map(|(_, key)| Arc::clone(key)))
    }
}

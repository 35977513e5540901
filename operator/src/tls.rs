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
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| Error::Cert {
            path: cert.to_owned(),
            detail: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(Error::Cert {
            path: cert.to_owned(),
            detail: "no CERTIFICATE block".into(),
        });
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| Error::Key {
        path: key.to_owned(),
        detail: e.to_string(),
    })?;
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
    let certified =
        CertifiedKey::from_der(chain, private, &provider).map_err(|e| Error::Unusable {
            path: key.to_owned(),
            detail: e.to_string(),
        })?;
    Ok(Arc::new(certified))
}

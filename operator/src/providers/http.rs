//! The HTTP client providers reach their endpoints with (the gateway's upstreams, identity
//! providers): rustls on aws-lc, an optional private CA, no Nagle, pooled connections.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::providers::aws::check::ca_certificates;

/// An HTTP client for a provider's endpoints: TLS trusting `ca_bundle` (PEM), or the system's
/// roots.
pub fn client<B>(
    ca_bundle: Option<&str>,
) -> Result<Client<hyper_rustls::HttpsConnector<HttpConnector>, B>, String>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
{
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = match ca_bundle {
        None => hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(provider)
            .map_err(|e| format!("TLS roots: {e}"))?,
        Some(bundle) => {
            let certificates = ca_certificates(bundle).map_err(|e| e.summary())?;
            let mut roots = rustls::RootCertStore::empty();
            roots.add_parsable_certificates(certificates);
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("TLS: {e}"))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config)
        }
    };
    // No Nagle: a body's last segment must not wait for the upstream's delayed ACK.
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    let connector = builder.https_or_http().enable_http1().wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector))
}

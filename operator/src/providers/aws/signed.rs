//! SigV4-signed calls the STS SDK has no operation for: MinIO's `revoke-tokens` admin call and
//! IAM's `PutRolePolicy` (one form POST, not worth compiling the whole IAM SDK for). They are
//! signed with the same broker credentials the STS client uses.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_sdk_sts::config::{ProvideCredentials, SharedCredentialsProvider};
use aws_sigv4::http_request::{
    PayloadChecksumKind, SignableBody, SignableRequest, SigningSettings, sign,
};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::CertificateDer;

/// Longest answer body kept (only for the operator's log).
const MAX_ANSWER_BYTES: usize = 4096;

/// What the provider answered.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

/// Where a signed call goes: the URL, and the CAs its TLS certificate must chain to (`None`:
/// the system's roots).
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    pub url: &'a str,
    pub roots: Option<&'a [CertificateDer<'static>]>,
}

/// POSTs `body` to `target`, signed for `service` in `region` with the broker's `credentials`,
/// within `timeout`. Errors are for the operator's log (they may name the endpoint).
pub async fn post(
    credentials: &SharedCredentialsProvider,
    target: Target<'_>,
    service: &str,
    region: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
    timeout: Duration,
) -> Result<Answer, String> {
    let url = target.url;
    let credentials = credentials
        .provide_credentials()
        .await
        .map_err(|e| format!("the broker's credentials could not be loaded: {e}"))?;
    let identity: Identity = credentials.into();
    let mut settings = SigningSettings::default();
    settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(service)
        .time(SystemTime::now())
        .settings(settings)
        .build()
        .map_err(|e| format!("signing parameters: {e}"))?
        .into();
    let mut headers: Vec<(&str, &str)> = Vec::new();
    if let Some(content_type) = content_type {
        headers.push(("content-type", content_type));
    }
    let signable = SignableRequest::new(
        "POST",
        url,
        headers.iter().copied(),
        SignableBody::Bytes(&body),
    )
    .map_err(|e| format!("request to sign: {e}"))?;
    let (instructions, _) = sign(signable, &params)
        .map_err(|e| format!("signing: {e}"))?
        .into_parts();
    let mut builder = hyper::Request::post(url);
    for (name, value) in &headers {
        builder = builder.header(*name, *value);
    }
    let mut request = builder
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| format!("request: {e}"))?;
    instructions.apply_to_request_http1x(&mut request);

    let https = match target.roots {
        None => hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .map_err(|e| format!("TLS roots: {e}"))?,
        Some(roots) => {
            let mut store = rustls::RootCertStore::empty();
            store.add_parsable_certificates(roots.iter().cloned());
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(store)
            .with_no_client_auth();
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config)
        }
    }
    .https_or_http()
    .enable_http1()
    .build();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(https);
    let call = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| format!("{url}: {}", innermost(&e)))?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
            .unwrap_or_else(|_| "(answer too long or unreadable)".into());
        Ok(Answer { status, body })
    };
    tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| format!("{url}: no answer within {timeout:?}"))?
}

fn innermost(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}

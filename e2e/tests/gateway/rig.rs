//! What every gateway test runs around its calls (the upstream's KeyProvider and ApiKeys as
//! typed values, the controller, broker and gateway, the pod stored as injected, its sidecar),
//! and the app's side: plain-HTTP calls to the sidecar's local gateway.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
pub(crate) use keybroker_e2e::gateway_rig::call;
use keybroker_e2e::gateway_rig::{self, Rig};
pub(crate) use keybroker_e2e::httpbin::{apikey, provider};
use keybroker_e2e::sidecar::binary;
use keybroker_operator::crd::{ApiKey, HeaderPresentation, KeyProvider};

/// A free loopback port, below the ephemeral range (see [`keybroker_e2e::cluster::free_ports`]).
pub(crate) fn free_port() -> anyhow::Result<u16> {
    let [port] = keybroker_e2e::cluster::free_ports()?;
    Ok(port)
}

/// [`gateway_rig::start`] on the shared control plane with the debug sidecar.
pub(crate) async fn rig(
    client: &kube::Client,
    ns: &str,
    secret: (&str, &str),
    provider: KeyProvider,
    keys: Vec<ApiKey>,
) -> anyhow::Result<Rig> {
    let cluster = keybroker_e2e::shared().await?;
    gateway_rig::start(
        cluster,
        &binary().await?,
        client,
        ns,
        secret,
        provider,
        keys,
    )
    .await
}

/// The arrival time of each chunk of an answer, from the request's start.
pub(crate) async fn chunk_times(
    port: u16,
    path: &str,
) -> anyhow::Result<(u16, Vec<Duration>, String)> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let started = Instant::now();
    let request = hyper::Request::get(path)
        .header("host", format!("127.0.0.1:{port}"))
        .body(Full::new(Bytes::new()))?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let mut body = response.into_body();
    let (mut times, mut text) = (Vec::new(), String::new());
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data()
            && !data.is_empty()
        {
            times.push(started.elapsed());
            text.push_str(&String::from_utf8_lossy(&data));
        }
    }
    Ok((status, times, text))
}

pub(crate) fn reason(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["reason"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Every file under `dir`, read.
pub(crate) fn contents(dir: &PathBuf) -> String {
    let mut all = String::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            all.push_str(&contents(&path));
        } else if let Ok(text) = std::fs::read(&path) {
            all.push_str(&String::from_utf8_lossy(&text));
        }
    }
    all
}

/// The platform team's KeyProvider for Gitea: a token in `Authorization: token`, reads and
/// writes under the namespace's own organization.
pub(crate) fn gitea_provider(name: &str, ns: &str, upstream: &str) -> KeyProvider {
    let mut kp = provider(name, ns, upstream);
    if let Some(gateway) = kp.spec.gateway.as_mut() {
        gateway.key_secret_ref.name = "gitea-key".into();
        gateway.presentation.header = Some(HeaderPresentation {
            name: "Authorization".into(),
            prefix: Some("token ".into()),
        });
        gateway.timeout = Some("30s".into());
    }
    kp.spec.guardrails.allowed_actions = vec!["GET".into(), "POST".into(), "PUT".into()];
    kp.spec.guardrails.allowed_resources = vec!["/api/v1/repos/{namespace}/*".into()];
    kp
}

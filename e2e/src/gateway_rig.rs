//! A gateway ApiKey's whole path on the host, for the gateway tests and `make bench`: the key
//! Secret, the KeyProvider and ApiKeys as typed values, the controller, broker and gateway in
//! this process (one certificate of one CA), the pod stored as the webhook injects it, and its
//! sidecar run as the kubelet would, with the app's side: plain-HTTP calls to the sidecar's
//! local gateway.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};

use keybroker_contract::wire::AUDIENCE;
use keybroker_operator::crd::{ApiKey, KeyProvider};
use keybroker_operator::tls::ReloadingCert;
use keybroker_operator::webhook::inject;

use crate::cluster::{Cluster, free_ports};
use crate::process::{Component, Lifetime};
use crate::server_thread::ServerThread;
use crate::{fixtures, pki};

/// A plain-HTTP call to the sidecar's local gateway, as the app makes it: status, headers,
/// body.
pub async fn call(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> anyhow::Result<(u16, hyper::HeaderMap, String)> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", format!("127.0.0.1:{port}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = sender
        .send_request(request.body(Full::new(Bytes::copy_from_slice(body)))?)
        .await?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok((
        parts.status.as_u16(),
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    ))
}

/// What a gateway test runs: the controller, broker and gateway (one CA), the pod stored as
/// injected, and its sidecar.
#[derive(Debug)]
pub struct Rig {
    pub tls: Arc<rustls::ServerConfig>,
    pub local_port: u16,
    pub broker_port: u16,
    pub gateway_port: u16,
    pub ca_cert: PathBuf,
    pub pod_token: String,
    pub app_env: Vec<(String, String)>,
    pub sidecar_env: Vec<(String, String)>,
    pub out: PathBuf,
    pub sidecar_log: PathBuf,
    pub sidecar: Component,
    pub _controller: fixtures::Controller,
    pub _gateway: ServerThread,
    pub _broker: ServerThread,
}

/// Creates the key Secret `secret` (data key `key`), `provider` and `keys`, then starts
/// everything around pod `app` (service account `app`) using all of `keys`.
pub async fn start(
    cluster: &Cluster,
    sidecar_binary: &Path,
    client: &kube::Client,
    ns: &str,
    secret: (&str, &str),
    provider: KeyProvider,
    keys: Vec<ApiKey>,
) -> anyhow::Result<Rig> {
    let stored_secret = k8s_openapi::api::core::v1::Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(secret.0.into()),
            ..Default::default()
        },
        string_data: Some([("key".to_owned(), secret.1.to_owned())].into()),
        ..Default::default()
    };
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &stored_secret)
        .await?;
    Api::<KeyProvider>::all(client.clone())
        .create(&PostParams::default(), &provider)
        .await?;
    let names: Vec<String> = keys.iter().map(kube::ResourceExt::name_any).collect();
    let api = Api::<ApiKey>::namespaced(client.clone(), ns);
    for key in &keys {
        api.create(&PostParams::default(), key).await?;
    }
    fixtures::service_account(client, ns, "app").await?;
    let _controller = fixtures::Controller::start(client, ns);
    for name in &names {
        fixtures::recorded_grant(client, ns, name, None).await?;
    }

    // Broker and gateway, one certificate of one CA (the sidecar trusts that CA).
    let dir = crate::run_dir()?;
    let ca = pki::Ca::create(&dir, "gateway-test-ca")?;
    let serving = ca.issue_server(&dir, "broker", &["127.0.0.1"])?;
    let tls = Arc::new(ReloadingCert::new(&serving.cert, &serving.key)?.server_config());
    let [
        broker_port,
        gateway_port,
        local_port,
        credentials_port,
        health_port,
    ] = free_ports()?;
    let session_secret = (ns.to_owned(), "gateway-session".to_owned());
    let _gateway = ServerThread::gateway(
        &cluster.kubeconfig,
        format!("127.0.0.1:{gateway_port}").parse()?,
        Arc::clone(&tls),
        session_secret.clone(),
    )
    .await?;
    let _broker = ServerThread::broker_for_gateway(
        &cluster.kubeconfig,
        format!("127.0.0.1:{broker_port}").parse()?,
        Arc::clone(&tls),
        format!("https://127.0.0.1:{gateway_port}"),
        session_secret,
    )
    .await?;

    // The pod as its owner writes it, injected by the webhook's own mutation, stored.
    let written = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "app", "labels": {"keybroker.dev/inject": "true"},
                     "annotations": {"keybroker.dev/apikeys": names.join(",")}},
        "spec": {"serviceAccountName": "app",
                 "containers": [{"name": "app", "image": "registry.invalid/app:1"}]},
    });
    let settings = inject::Settings {
        broker_url: format!("https://127.0.0.1:{broker_port}"),
        broker_ca: std::fs::read_to_string(&ca.cert)?,
        credentials_port,
        health_port,
        gateway_port: local_port,
        ..fixtures::inject_settings()
    };
    let injected = fixtures::as_injected_with(written, ns, &settings, |name| {
        Some(inject::GatewayFacts {
            env_name: inject::default_gateway_env(name),
            path_suffix: String::new(),
        })
    })?;
    let stored = Api::<Pod>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &injected)
        .await?;
    let app_env: Vec<(String, String)> = stored
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .and_then(|c| c.env.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|e| (e.name, e.value.unwrap_or_default()))
        .collect();
    // The sidecar, run as the kubelet would (token in a file, output in a directory).
    let token_file = dir.join("token");
    let pod_token = fixtures::token(client, ns, "app", AUDIENCE, Some("app")).await?;
    std::fs::write(&token_file, &pod_token)?;
    let out = dir.join("keybroker");
    std::fs::create_dir(&out)?;
    let sidecar_container =
        fixtures::injected_sidecar(&stored).context("the stored pod has no sidecar")?;
    let mut env: Vec<(String, String)> = sidecar_container
        .env
        .iter()
        .flatten()
        .map(|e| {
            let value = e.value.clone().unwrap_or_default();
            let value = value
                .replace(
                    &format!("{}/token", inject::TOKEN_DIR),
                    &token_file.display().to_string(),
                )
                .replace(inject::CREDENTIALS_DIR, &out.display().to_string());
            (e.name.clone(), value)
        })
        .collect();
    env.push(("KEYBROKER_LOG_LEVEL".into(), "debug".into()));
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let sidecar_log = dir.join("sidecar.log");
    let mut sidecar = Component::spawn(
        "keybroker-sidecar",
        sidecar_binary,
        &[],
        &env_refs,
        &sidecar_log,
        Lifetime::TiedToProcess,
    )?;
    let startup = format!("http://127.0.0.1:{health_port}/startupz");
    sidecar
        .wait_ready("GET /startupz", Duration::from_secs(30), || async {
            call(health_port, "GET", "/startupz", &[], b"")
                .await
                .is_ok_and(|(status, _, _)| status == 200)
        })
        .await
        .with_context(|| format!("{startup} never passed"))?;

    Ok(Rig {
        tls,
        local_port,
        broker_port,
        gateway_port,
        ca_cert: ca.cert.clone(),
        pod_token,
        app_env,
        sidecar_env: env,
        out,
        sidecar_log,
        sidecar,
        _controller,
        _gateway,
        _broker,
    })
}

//! The replicas of the shutdown test and the parts of a cluster the test plays itself: two
//! `keybroker-operator` processes, the webhook's Service with one EndpointSlice per replica
//! (the endpoint controllers' part), and the probes the kubelet would send.

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Client;
use kube::api::{Api, PostParams};

use keybroker_e2e::https;
use keybroker_e2e::process::{Component, Lifetime};
use keybroker_e2e::{eventually, fixtures, pki};

use super::{LEASE, SERVICE};

/// One operator process and where it serves.
pub(crate) struct Replica {
    pub(crate) name: String,
    pub(crate) process: Component,
    pub(crate) metrics: SocketAddr,
    pub(crate) broker: SocketAddr,
    pub(crate) webhook: SocketAddr,
    pub(crate) client: https::Client,
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn start_replica(
    name: &str,
    binary: &Path,
    cluster: &keybroker_e2e::Cluster,
    ns: &str,
    dir: &Path,
    host: IpAddr,
    ca: &Path,
    broker_cert: &pki::CertFiles,
    webhook_cert: &pki::CertFiles,
) -> anyhow::Result<Replica> {
    let metrics = free_addr(IpAddr::from([127, 0, 0, 1]))?;
    let broker = free_addr(IpAddr::from([127, 0, 0, 1]))?;
    let webhook = free_addr(host)?;
    let args: Vec<String> = vec![
        "--roles=controller,webhook,broker".into(),
        format!("--metrics-addr={metrics}"),
        format!("--broker-addr={broker}"),
        format!("--webhook-addr={webhook}"),
        format!("--tls-cert-file={}", broker_cert.cert.display()),
        format!("--tls-key-file={}", broker_cert.key.display()),
        format!("--webhook-cert-file={}", webhook_cert.cert.display()),
        format!("--webhook-key-file={}", webhook_cert.key.display()),
        format!("--broker-ca-file={}", ca.display()),
        format!("--broker-url=https://{broker}"),
        format!("--sidecar-image={}", fixtures::SIDECAR_IMAGE),
        // The Lease lives in the test's namespace; the controller sees only it.
        format!("--namespace={ns}"),
        format!("--watch-namespace={ns}"),
        format!("--provider-selector=e2e-scope={ns}"),
        format!("--lease-name={LEASE}"),
        format!("--identity={name}"),
    ];
    let kubeconfig = cluster.kubeconfig.display().to_string();
    let mut process = Component::spawn(
        name,
        binary,
        &args,
        &[("KUBECONFIG", kubeconfig.as_str()), ("RUST_LOG", "info")],
        &dir.join(format!("{name}.log")),
        Lifetime::TiedToProcess,
    )?;
    process
        .wait_ready("GET /readyz", Duration::from_secs(90), || async move {
            readyz(metrics).await == Some(200)
        })
        .await?;
    Ok(Replica {
        name: name.to_owned(),
        process,
        metrics,
        broker,
        webhook,
        client: https::Client::new(broker, ca)?,
    })
}

/// The webhook Service, one EndpointSlice per replica (their ports differ; a slice has one
/// port list; only replica `ready` is ready so far), and the MutatingWebhookConfiguration
/// calling the Service, as the chart has it.
pub(crate) async fn register(
    client: &Client,
    ns: &str,
    config: &str,
    replicas: &[Replica],
    ready: usize,
    ca: &Path,
) -> anyhow::Result<()> {
    use base64::Engine;
    let service: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": SERVICE},
        "spec": {"ports": [{"name": "https", "port": 443, "targetPort": "https"}]},
    }))?;
    Api::<Service>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &service)
        .await?;
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), ns);
    for (i, r) in replicas.iter().enumerate() {
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": slice_name(r), "labels": {"kubernetes.io/service-name": SERVICE}},
            "addressType": "IPv4",
            "endpoints": [endpoint(r, i == ready)],
            "ports": [{"name": "https", "port": r.webhook.port(), "protocol": "TCP"}],
        }))?;
        slices.create(&PostParams::default(), &slice).await?;
    }
    let ca = std::fs::read(ca)?;
    let webhook: MutatingWebhookConfiguration = serde_json::from_value(serde_json::json!({
        "metadata": {"name": config},
        "webhooks": [{
            "name": "inject.keybroker.dev",
            "clientConfig": {
                "service": {"namespace": ns, "name": SERVICE, "path": "/mutate", "port": 443},
                "caBundle": base64::engine::general_purpose::STANDARD.encode(ca),
            },
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
            "objectSelector": {"matchLabels": {"keybroker.dev/inject": "true"}},
            "failurePolicy": "Fail",
            "sideEffects": "None",
            "reinvocationPolicy": "IfNeeded",
            "timeoutSeconds": 10,
            "admissionReviewVersions": ["v1"],
        }],
    }))?;
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .create(&PostParams::default(), &webhook)
        .await?;
    Ok(())
}

pub(crate) fn slice_name(r: &Replica) -> String {
    format!("{SERVICE}-{}", r.name)
}

/// A replica's endpoint as the EndpointSlice controller writes it for a running (`ready`) or
/// terminating pod.
pub(crate) fn endpoint(r: &Replica, ready: bool) -> serde_json::Value {
    serde_json::json!({
        "addresses": [r.webhook.ip().to_string()],
        "conditions": {"ready": ready, "serving": ready, "terminating": !ready},
        "targetRef": {"kind": "Pod", "name": r.name},
    })
}

/// The replica to stop: the one not leading, so it also shows a non-leader exits.
pub(crate) async fn non_leader(
    client: &Client,
    ns: &str,
    replicas: &[Replica],
) -> anyhow::Result<usize> {
    let leases = Api::<Lease>::namespaced(client.clone(), ns);
    let leader = eventually("a controller leader", Duration::from_secs(60), || async {
        leases.get(LEASE).await.ok()?.spec?.holder_identity
    })
    .await?;
    let victim = replicas
        .iter()
        .position(|r| r.name != leader)
        .context("no replica other than the leader")?;
    println!("leader {leader}; SIGTERM goes to {}", replicas[victim].name);
    Ok(victim)
}

/// The status of `GET /readyz`, or `None` when the replica does not answer.
pub(crate) async fn readyz(addr: SocketAddr) -> Option<u16> {
    get(addr, "/readyz").await.map(|(status, _)| status)
}

/// Admission reviews a replica answered so far, from its /metrics.
pub(crate) async fn admissions_served(addr: SocketAddr) -> Option<u64> {
    let (status, text) = get(addr, "/metrics").await?;
    if status != 200 {
        return None;
    }
    Some(
        text.lines()
            .filter(|l| l.contains("webhook_admissions_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64,
    )
}

/// A plain-HTTP GET on a new connection, within 2 s: status and body.
pub(crate) async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use http_body_util::BodyExt;
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .ok()?;
        tokio::spawn(conn);
        let request = hyper::Request::get(path)
            .header("host", addr.to_string())
            .body(http_body_util::Empty::<hyper::body::Bytes>::new())
            .ok()?;
        let response = sender.send_request(request).await.ok()?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.ok()?.to_bytes();
        Some((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .ok()
        .flatten()
}

/// This machine's address on its default route (no packet is sent), if it has one.
pub(crate) fn host_ip() -> Option<IpAddr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.1:9").ok()?;
    Some(socket.local_addr().ok()?.ip()).filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
}

pub(crate) fn free_addr(ip: IpAddr) -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind((ip, 0))?.local_addr()?)
}

//! What a pod's sidecar holds, read from its `/metrics` through the apiserver's pod proxy (the
//! same port the kubelet probes): the expiry of the credentials in place, absent while none.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use crate::webhook::inject::SIDECAR_NAME;

/// How long one sidecar may take to answer.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(3);
const EXPIRY: &str = "keybroker_sidecar_credentials_expiry_timestamp_seconds";

/// The port of the injected sidecar's health server (`kb-health`), if the pod has one.
pub fn health_port(pod: &Pod) -> Option<i32> {
    let spec = pod.spec.as_ref()?;
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .find(|c| c.name == SIDECAR_NAME)?
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("kb-health"))
        .map(|p| p.container_port)
}

/// When the credentials of `api_key` in place expire (Unix seconds), from a sidecar's metrics
/// text; `None` while it holds none.
pub fn expiry(metrics: &str, api_key: &str) -> Option<f64> {
    let series = format!("{EXPIRY}{{apikey=\"{api_key}\"}}");
    metrics.lines().find_map(|line| {
        let value = line.strip_prefix(&series)?;
        value.trim().parse().ok()
    })
}

/// The sidecar's metrics text, through `pods/proxy`.
pub async fn scrape(client: &kube::Client, pod: &Pod) -> anyhow::Result<String> {
    let port = health_port(pod)
        .ok_or_else(|| anyhow::anyhow!("pod {} has no keybroker sidecar", pod.name_any()))?;
    let path = format!(
        "/api/v1/namespaces/{}/pods/{}:{port}/proxy{}",
        pod.namespace().unwrap_or_default(),
        pod.name_any(),
        keybroker_contract::paths::METRICS
    );
    let request = hyper::http::Request::get(path).body(Vec::new())?;
    match tokio::time::timeout(SCRAPE_TIMEOUT, client.request_text(request)).await {
        Ok(text) => Ok(text?),
        Err(_) => anyhow::bail!("the sidecar of pod {} did not answer", pod.name_any()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_expiry_is_read_for_the_named_apikey_only() {
        let text = "# HELP x\n\
            keybroker_sidecar_credentials_expiry_timestamp_seconds{apikey=\"uploader\"} 1893456000\n\
            keybroker_sidecar_credentials_expiry_timestamp_seconds{apikey=\"up\"} 17\n";
        assert_eq!(expiry(text, "uploader"), Some(1_893_456_000.0));
        assert_eq!(expiry(text, "up"), Some(17.0));
        assert_eq!(expiry(text, "upload"), None);
        assert_eq!(expiry("", "uploader"), None);
    }
}

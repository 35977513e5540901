//! Cluster DNS for the e2e node: CoreDNS as a node daemon (not a pod: its image would be one
//! more to build) answering for `cluster.local` only. It has no forwarder, so no name outside
//! the cluster resolves and no query leaves the node's namespace. Pods find it at the usual
//! `kube-dns` Service (10.96.0.10), whose EndpointSlice names the node's address.

use std::path::Path;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::api::{Api, Patch, PatchParams};

/// The user CoreDNS authenticates as (a client certificate from the test CA).
pub const USER: &str = "keybroker-e2e:coredns";
/// The cluster DNS address (the kubelet's `clusterDNS`).
pub const SERVICE_IP: &str = "10.96.0.10";

/// The Corefile: the `kubernetes` plugin for the cluster zones, nothing else.
pub fn corefile(node_ip: &str, kubeconfig: &Path) -> String {
    format!(
        ".:53 {{
    bind {node_ip}
    errors
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
}}
",
        kubeconfig = kubeconfig.display()
    )
}

/// Read access for CoreDNS, and the `kube-dns` Service with an EndpointSlice for the node.
pub async fn publish(client: &kube::Client, node_ip: &str) -> Result<(), kube::Error> {
    let apply = PatchParams::apply("keybroker-e2e").force();
    let role: ClusterRole = from_json(serde_json::json!({
        "metadata": { "name": USER },
        "rules": [
            { "apiGroups": [""], "resources": ["services", "namespaces", "pods"], "verbs": ["list", "watch"] },
            { "apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"] },
        ],
    }))?;
    Api::<ClusterRole>::all(client.clone())
        .patch(USER, &apply, &Patch::Apply(&role))
        .await?;
    let binding: ClusterRoleBinding = from_json(serde_json::json!({
        "metadata": { "name": USER },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": USER },
        "subjects": [{ "apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": USER }],
    }))?;
    Api::<ClusterRoleBinding>::all(client.clone())
        .patch(USER, &apply, &Patch::Apply(&binding))
        .await?;
    let service: Service = from_json(serde_json::json!({
        "metadata": { "name": "kube-dns", "namespace": "kube-system" },
        "spec": {
            "clusterIP": SERVICE_IP,
            "ports": [
                { "name": "dns", "port": 53, "protocol": "UDP" },
                { "name": "dns-tcp", "port": 53, "protocol": "TCP" },
            ],
        },
    }))?;
    Api::<Service>::namespaced(client.clone(), "kube-system")
        .patch("kube-dns", &apply, &Patch::Apply(&service))
        .await?;
    let slice: EndpointSlice = from_json(serde_json::json!({
        "metadata": {
            "name": "kube-dns-node",
            "namespace": "kube-system",
            "labels": { "kubernetes.io/service-name": "kube-dns" },
        },
        "addressType": "IPv4",
        "endpoints": [{ "addresses": [node_ip], "conditions": { "ready": true } }],
        "ports": [
            { "name": "dns", "port": 53, "protocol": "UDP" },
            { "name": "dns-tcp", "port": 53, "protocol": "TCP" },
        ],
    }))?;
    Api::<EndpointSlice>::namespaced(client.clone(), "kube-system")
        .patch("kube-dns-node", &apply, &Patch::Apply(&slice))
        .await?;
    Ok(())
}

fn from_json<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T, kube::Error> {
    serde_json::from_value(value).map_err(kube::Error::SerdeError)
}

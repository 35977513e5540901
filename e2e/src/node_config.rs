//! The configuration files of the e2e node, as pure functions of its paths and addresses, so
//! each setting that this machine forced (see docs/development.md) sits next to its reason.

use std::path::Path;

/// The pod network inside the node's namespace. It never leaves the namespace, so every node
/// can use the same range.
pub const POD_CIDR: &str = "10.244.0.0/24";
/// The Service range (the apiserver's `--service-cluster-ip-range`).
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The name the node registers with.
pub const NODE_NAME: &str = "keybroker-e2e-node";
/// The sandbox image, imported from the cached OCI archive.
pub const PAUSE_IMAGE: &str = "keybroker.local/pause:3.10.2";
/// A busybox userland for test pods.
pub const BUSYBOX_IMAGE: &str = "keybroker.local/busybox:1";

/// Paths the node's daemons use, all under the run directory.
#[derive(Debug)]
pub struct Paths<'a> {
    pub state: &'a Path,
    pub root: &'a Path,
    pub socket: &'a Path,
    pub cni_conf: &'a Path,
    pub cni_bin: &'a Path,
    pub runc: &'a Path,
}

/// containerd 2.x (config version 4: socket addresses live under the grpc/ttrpc server
/// plugins; a top-level `[grpc]` table is ignored and containerd would serve on /run/containerd).
pub fn containerd(p: &Paths<'_>) -> String {
    format!(
        r#"version = 4
root = '{root}'
state = '{state}'
# Applied to containerd itself; children inherit it. This machine denies CAP_SYS_RESOURCE, so no
# process here may lower its OOM score.
oom_score = 0
imports = []
# Fail at start, not at the kubelet's first call, when the CRI plugin cannot load.
required_plugins = ['io.containerd.grpc.v1.cri']

[plugins.'io.containerd.server.v1.grpc']
  address = '{socket}'
[plugins.'io.containerd.server.v1.ttrpc']
  address = '{socket}.ttrpc'
[plugins.'io.containerd.server.v1.debug']
  address = ''
[plugins.'io.containerd.server.v1.metrics']
  address = ''
[plugins.'io.containerd.nri.v1.nri']
  disable = true
# At most 42 characters, so not under the run directory; /run is the node's own (mount namespace).
[plugins.'io.containerd.shim.v1.manager']
  socket_dir = '/run/containerd/s'
[plugins.'io.containerd.cri.v1.images']
  snapshotter = 'overlayfs'
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = '{pause}'
[plugins.'io.containerd.cri.v1.runtime']
  # Without CAP_SYS_RESOURCE, runc fails to write a container's oom_score_adj below its own
  # ("can't get final child's PID from pipe: EOF").
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_unprivileged_ports = true
  enable_unprivileged_icmp = true
  cdi_spec_dirs = []
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = 'runc'
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = 'io.containerd.runc.v2'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = '{runc}'
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ['{cni_bin}']
    conf_dir = '{cni_conf}'
    max_conf_num = 1
[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = '127.0.0.1'
  stream_server_port = '0'
"#,
        root = p.root.display(),
        state = p.state.display(),
        socket = p.socket.display(),
        pause = PAUSE_IMAGE,
        runc = p.runc.display(),
        cni_bin = p.cni_bin.display(),
        cni_conf = p.cni_conf.display(),
    )
}

/// The CNI network: a bridge with host-local addresses and the namespace as gateway (pods reach
/// Service IPs through it, where kube-proxy's rules are), no masquerade (there is nowhere to
/// masquerade to).
pub fn cni(ipam_dir: &Path) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "keybroker-e2e",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": POD_CIDR }]],
                    "routes": [{ "dst": "0.0.0.0/0" }],
                    "dataDir": ipam_dir.display().to_string(),
                },
            },
            { "type": "portmap", "capabilities": { "portMappings": true } },
        ],
    })
    .to_string()
}

/// Inputs of the kubelet's configuration.
#[derive(Debug)]
pub struct Kubelet<'a> {
    pub node_ip: &'a str,
    pub ca: &'a Path,
    pub serving_cert: &'a Path,
    pub serving_key: &'a Path,
    pub runtime_socket: &'a Path,
    pub cgroup_root: &'a str,
    pub resolv_conf: &'a Path,
}

/// KubeletConfiguration. Each setting that differs from the defaults is forced by this machine
/// or by running beside other nodes.
pub fn kubelet(k: &Kubelet<'_>) -> String {
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# The host is cgroup v1 (hybrid); kubelet 1.35+ refuses it unless told otherwise.
failCgroupV1: false
cgroupDriver: cgroupfs
# Pre-created in every v1 hierarchy; unique per node so parallel nodes never share cgroups.
cgroupRoot: /{cgroup_root}
failSwapOn: false
# CAP_SYS_RESOURCE is missing: the kubelet may not lower its own OOM score.
oomScoreAdj: 0
address: {node_ip}
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
tlsCertFile: {serving_cert}
tlsPrivateKeyFile: {serving_key}
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: {ca}
authorization:
  mode: Webhook
containerRuntimeEndpoint: unix://{socket}
imageServiceEndpoint: unix://{socket}
clusterDomain: cluster.local
clusterDNS: [{dns}]
resolvConf: {resolv_conf}
# The disk is shared with other test runs: never evict for disk or memory pressure here, and
# never garbage-collect the imported images (there is no registry to pull them from again).
evictionHard:
  memory.available: "1Mi"
  nodefs.available: "1%"
  nodefs.inodesFree: "1%"
  imagefs.available: "1%"
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
registerNode: true
nodeStatusReportFrequency: 10s
syncFrequency: 10s
fileCheckFrequency: 10s
shutdownGracePeriod: 0s
"#,
        cgroup_root = k.cgroup_root,
        node_ip = k.node_ip,
        serving_cert = k.serving_cert.display(),
        serving_key = k.serving_key.display(),
        ca = k.ca.display(),
        socket = k.runtime_socket.display(),
        resolv_conf = k.resolv_conf.display(),
        dns = crate::dns::SERVICE_IP,
    )
}

/// kube-proxy in nftables mode, leaving every conntrack sysctl alone (some are machine-wide).
pub fn kube_proxy(kubeconfig: &Path) -> String {
    format!(
        r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
clientConnection:
  kubeconfig: {kubeconfig}
hostnameOverride: {NODE_NAME}
clusterCIDR: {POD_CIDR}
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
  udpTimeout: 0s
  udpStreamTimeout: 0s
"#,
        kubeconfig = kubeconfig.display(),
    )
}

/// The sysctls the kubelet insists on (it writes them when they differ), with the values it
/// wants. Read-only files with these values are bind-mounted over /proc/sys in the node's mount
/// namespace, so the machine's own settings are never changed.
pub const KUBELET_SYSCTLS: [(&str, &str); 6] = [
    ("vm/overcommit_memory", "1"),
    ("vm/panic_on_oom", "0"),
    ("kernel/panic", "10"),
    ("kernel/panic_on_oops", "1"),
    ("kernel/keys/root_maxkeys", "1000000"),
    ("kernel/keys/root_maxbytes", "25000000"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containerd_serves_only_on_the_given_socket() {
        let p = Paths {
            state: Path::new("/r/state"),
            root: Path::new("/r/root"),
            socket: Path::new("/r/c.sock"),
            cni_conf: Path::new("/r/net.d"),
            cni_bin: Path::new("/cache/cni"),
            runc: Path::new("/usr/sbin/runc"),
        };
        let text = containerd(&p);
        let parsed: toml_probe::Doc = toml_probe::parse(&text);
        assert_eq!(
            parsed.get("plugins.'io.containerd.server.v1.grpc'", "address"),
            Some("'/r/c.sock'")
        );
        assert_eq!(
            parsed.get("plugins.'io.containerd.server.v1.ttrpc'", "address"),
            Some("'/r/c.sock.ttrpc'")
        );
        let shim_dir = parsed
            .get("plugins.'io.containerd.shim.v1.manager'", "socket_dir")
            .unwrap();
        assert!(shim_dir.trim_matches('\'').len() <= 42, "{shim_dir}");
        assert!(text.contains("restrict_oom_score_adj = true"));
    }

    #[test]
    fn cni_network_has_no_masquerade_and_the_pod_range() {
        let v: serde_json::Value = serde_json::from_str(&cni(Path::new("/r/ipam"))).unwrap();
        assert_eq!(v["plugins"][0]["ipMasq"], false);
        assert_eq!(v["plugins"][0]["ipam"]["ranges"][0][0]["subnet"], POD_CIDR);
    }

    /// Just enough TOML reading to check which table a key landed in.
    mod toml_probe {
        pub struct Doc(Vec<(String, String, String)>);
        pub fn parse(text: &str) -> Doc {
            let mut table = String::new();
            let mut out = Vec::new();
            for line in text.lines().map(str::trim) {
                if let Some(t) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                    table = t.to_owned();
                } else if let Some((k, v)) = line.split_once(" = ") {
                    out.push((table.clone(), k.to_owned(), v.to_owned()));
                }
            }
            Doc(out)
        }
        impl Doc {
            pub fn get(&self, table: &str, key: &str) -> Option<&str> {
                self.0
                    .iter()
                    .find(|(t, k, _)| t == table && k == key)
                    .map(|(_, _, v)| v.as_str())
            }
        }
    }
}

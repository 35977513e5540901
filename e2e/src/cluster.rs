//! A real control plane on loopback: etcd, kube-apiserver, kube-controller-manager, and MinIO,
//! each on free ports and in its own directory, so several can run side by side.
//!
//! With a node ([`Cluster::start_with_node`]) the control plane runs inside the node's network
//! namespace instead (see `netns.rs` for why) and listens on the node's address, which the test
//! process reaches through the namespace's veth pair.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::minio::{Keys, Minio};
use crate::netns::{self, Sandbox};
use crate::node::{self, Node};
use crate::pki::{self, Ca};
use crate::process::{self, Component, Join, Lifetime};
use crate::tools::{self, Tools};

/// Audit writes (not reads) to keybroker objects and Leases, and TokenReviews (the broker's
/// authentication calls), at metadata level: never a body, so never a token.
const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  verbs: [create, update, patch, delete, deletecollection]
  resources:
  - group: keybroker.dev
  - group: coordination.k8s.io
    resources: [leases]
  - group: authentication.k8s.io
    resources: [tokenreviews]
- level: None
";

/// The field manager of everything the harness applies.
const FIELD_MANAGER: &str = "keybroker-e2e";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Tools(#[from] tools::Error),
    #[error(transparent)]
    Pki(#[from] pki::Error),
    #[error(transparent)]
    Process(#[from] process::Error),
    #[error("preparing {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no free port on 127.0.0.1: {0}")]
    Port(std::io::Error),
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error("kube client: {0}")]
    Client(#[from] kube::Error),
    #[error("node namespaces: {0}")]
    Netns(#[from] netns::Error),
    #[error("node: {0}")]
    Node(#[from] Box<node::Error>),
    #[error("a node runs only with Lifetime::TiedToProcess (its namespaces die with this process)")]
    DetachedNode,
}

/// What to start.
#[derive(Clone, Debug)]
pub struct Options {
    /// Working directory for PKI, data and logs; created if missing.
    pub dir: PathBuf,
    pub lifetime: Lifetime,
    pub with_minio: bool,
}

/// A running control plane. Dropping it stops every component (for [`Lifetime::TiedToProcess`]).
#[derive(Debug)]
pub struct Cluster {
    dir: PathBuf,
    /// A kubeconfig for the `system:masters` admin (setup only: it bypasses RBAC).
    pub kubeconfig: PathBuf,
    /// `https://127.0.0.1:<port>`, or `https://<node address>:<port>` with a node.
    pub server: String,
    /// The address the control plane listens on: 127.0.0.1, or the node's address.
    host: String,
    /// The CA that signed the apiserver's serving certificate.
    pub ca_cert: PathBuf,
    pub minio: Option<Minio>,
    components: Vec<Component>,
    /// How MinIO was started, so a test can stop it and start it again (a provider outage).
    minio_launch: Option<Launch>,
    /// The namespaces the control plane joins (only with a node).
    join: Join,
    /// The kubelet, containerd and friends; stopped before the control plane.
    node: Option<Node>,
    /// Control plane material the node needs (CA, addresses), kept from boot.
    parts: Option<node::ControlPlane>,
}

/// A component's command line, to start it again as it was.
#[derive(Debug)]
struct Launch {
    index: usize,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    lifetime: Lifetime,
    join: Join,
}

impl Cluster {
    /// Starts every component and waits until each is ready, with a timeout per component.
    /// When any step fails, whatever was already started is stopped again.
    pub async fn start(opts: Options) -> Result<Self, Error> {
        let tools = Tools::locate()?;
        let mut cluster = Self::empty(&opts);
        match cluster.boot(&tools, &opts, None).await {
            Ok(()) => Ok(cluster),
            Err(e) => {
                cluster.stop();
                Err(e)
            }
        }
    }

    /// Like [`Cluster::start`], with a real node (kubelet, containerd, runc, kube-proxy,
    /// kube-scheduler) in namespaces of its own, the control plane inside its network
    /// namespace. Returns once the node is Ready.
    pub async fn start_with_node(opts: Options) -> Result<Self, Error> {
        if opts.lifetime != Lifetime::TiedToProcess {
            return Err(Error::DetachedNode);
        }
        let tools = Tools::locate()?;
        mkdir(&opts.dir)?;
        let sandbox = Sandbox::create(&opts.dir).await?;
        let mut cluster = Self::empty(&opts);
        let booted = async {
            cluster.boot(&tools, &opts, Some(&sandbox)).await?;
            let parts = cluster.parts.take().ok_or(Error::DetachedNode)?;
            let node = Node::start(&opts.dir, sandbox, parts)
                .await
                .map_err(Box::new)?;
            cluster.node = Some(node);
            Ok::<(), Error>(())
        };
        match booted.await {
            Ok(()) => Ok(cluster),
            Err(e) => {
                cluster.stop();
                Err(e)
            }
        }
    }

    fn empty(opts: &Options) -> Self {
        Self {
            dir: opts.dir.clone(),
            kubeconfig: opts.dir.join("kubeconfig"),
            server: String::new(),
            host: String::new(),
            ca_cert: opts.dir.join("pki/ca.crt"),
            minio: None,
            components: Vec::new(),
            minio_launch: None,
            join: Join::default(),
            node: None,
            parts: None,
        }
    }

    /// The address the control plane listens on, where a server of a test that pods must reach
    /// listens too (with a node, the node's address; see [`Cluster::join`]).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The namespaces the control plane's components joined (none without a node): a server
    /// started in them is reached by pods like the control plane.
    pub fn join(&self) -> Join {
        self.join
    }

    /// The node, when started with [`Cluster::start_with_node`].
    pub fn node(&self) -> Option<&Node> {
        self.node.as_ref()
    }

    async fn boot(
        &mut self,
        tools: &Tools,
        opts: &Options,
        sandbox: Option<&Sandbox>,
    ) -> Result<(), Error> {
        let dir = &opts.dir;
        let host = sandbox.map_or_else(|| "127.0.0.1".to_owned(), Sandbox::node_ip);
        self.join = sandbox.map(Sandbox::join_net).unwrap_or_default();
        for sub in [
            "pki",
            "etcd",
            "apiserver",
            "kcm",
            "minio/data",
            "minio/certs/CAs",
        ] {
            mkdir(&dir.join(sub))?;
        }
        let pki_dir = dir.join("pki");
        let ca = Ca::create(&pki_dir, "keybroker-e2e-ca")?;
        let serving = ca.issue_server(
            &pki_dir,
            "apiserver",
            &[
                "127.0.0.1",
                &host,
                "10.96.0.1",
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
            ],
        )?;
        let admin = ca.issue_client(
            &pki_dir,
            "admin",
            "keybroker-e2e-admin",
            &["system:masters"],
        )?;
        let kcm_client = ca.issue_client(&pki_dir, "kcm", "system:kube-controller-manager", &[])?;
        let audit_policy = dir.join("apiserver/audit-policy.yaml");
        write_file(&audit_policy, AUDIT_POLICY)?;
        let sa_key = pki_dir.join("service-account.key");
        let sa_pub = pki_dir.join("service-account.pub");
        pki::write_signing_key(&sa_key, &sa_pub)?;
        copy(&ca.cert, &dir.join("minio/certs/CAs/ca.crt"))?;
        // With a node, MinIO is reached by pods and the in-cluster operator under its Service
        // name, and KeyProviders accept plain http only on loopback: it serves TLS.
        let minio_tls = sandbox.is_some() && opts.with_minio;
        if minio_tls {
            let cert = ca.issue_server(
                &pki_dir,
                "minio",
                &[
                    &host,
                    "127.0.0.1",
                    "minio.minio.svc",
                    "minio.minio.svc.cluster.local",
                    "localhost",
                ],
            )?;
            copy(&cert.cert, &dir.join("minio/certs/public.crt"))?;
            copy(&cert.key, &dir.join("minio/certs/private.key"))?;
        }

        let [
            etcd_port,
            etcd_peer_port,
            api_port,
            kcm_port,
            minio_port,
            console_port,
        ] = free_ports()?;
        let server = format!("https://{host}:{api_port}");
        self.server = server.clone();
        self.host = host.clone();
        let kubelet_client = ca.issue_client(
            &pki_dir,
            "apiserver-kubelet-client",
            "kube-apiserver-kubelet-client",
            &["system:masters"],
        )?;

        let etcd_url = format!("http://{host}:{etcd_port}");
        let peer_url = format!("http://{host}:{etcd_peer_port}");
        let etcd = self.spawn(
            &tools.etcd,
            "etcd",
            &[
                "--name=default".into(),
                format!("--data-dir={}", dir.join("etcd").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=default={peer_url}"),
                "--unsafe-no-fsync".into(),
                "--log-level=warn".into(),
            ],
            &[],
            opts.lifetime,
        )?;
        let http = HttpClient::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let health = format!("{etcd_url}/health");
        self.components[etcd]
            .wait_ready("GET /health", Duration::from_secs(30), || {
                http_ok(&http, &health, Some("\"health\":\"true\""))
            })
            .await?;

        let root = Keys::generate("ROOT");
        let minio = if opts.with_minio {
            let minio_dir = dir.join("minio");
            let env = [
                ("MINIO_ROOT_USER", root.access_key_id.as_str()),
                ("MINIO_ROOT_PASSWORD", root.secret_access_key.as_str()),
                ("MINIO_BROWSER", "off"),
                ("MINIO_UPDATE", "off"),
            ];
            let args = Minio::server_args(&minio_dir, &host, minio_port, console_port);
            let index = self.spawn(&tools.minio, "minio", &args, &env, opts.lifetime)?;
            self.minio_launch = Some(Launch {
                index,
                program: tools.minio.clone(),
                args,
                env: env
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                lifetime: opts.lifetime,
                join: self.join,
            });
            Some(index)
        } else {
            None
        };

        let apiserver = self.spawn(
            &tools.kube_apiserver,
            "kube-apiserver",
            &[
                format!("--etcd-servers={etcd_url}"),
                format!("--bind-address={host}"),
                format!("--advertise-address={host}"),
                format!("--secure-port={api_port}"),
                format!("--cert-dir={}", dir.join("apiserver").display()),
                format!("--tls-cert-file={}", serving.cert.display()),
                format!("--tls-private-key-file={}", serving.key.display()),
                format!("--client-ca-file={}", ca.cert.display()),
                "--authorization-mode=Node,RBAC".into(),
                "--anonymous-auth=true".into(),
                "--allow-privileged=true".into(),
                "--service-cluster-ip-range=10.96.0.0/16".into(),
                format!("--service-account-issuer={server}"),
                format!("--service-account-key-file={}", sa_pub.display()),
                format!("--service-account-signing-key-file={}", sa_key.display()),
                format!("--service-account-jwks-uri={server}/openid/v1/jwks"),
                "--profiling=false".into(),
                // Webhook Services resolve to their EndpointSlices' addresses, not the
                // ClusterIP: without a node there is no kube-proxy, and tests/shutdown points a
                // selector-less Service at replicas on this machine; with one, the apiserver
                // dials the operator pods' IPs.
                "--enable-aggregator-routing=true".into(),
                format!("--audit-policy-file={}", audit_policy.display()),
                format!("--audit-log-path={}", self.audit_log().display()),
                "--audit-log-mode=blocking".into(),
                format!(
                    "--kubelet-client-certificate={}",
                    kubelet_client.cert.display()
                ),
                format!("--kubelet-client-key={}", kubelet_client.key.display()),
                format!("--kubelet-certificate-authority={}", ca.cert.display()),
                // The node's name resolves nowhere (no DNS leaves the node's namespace).
                "--kubelet-preferred-address-types=InternalIP".into(),
            ],
            &[],
            opts.lifetime,
        )?;
        write_kubeconfig(&self.kubeconfig, &server, &ca.cert, &admin)?;
        let kcm_kubeconfig = dir.join("kcm/kubeconfig");
        write_kubeconfig(&kcm_kubeconfig, &server, &ca.cert, &kcm_client)?;
        let client = client_from(&self.kubeconfig).await?;
        self.components[apiserver]
            .wait_ready("GET /readyz", Duration::from_secs(90), || async {
                let req = http::Request::get("/readyz").body(Vec::new());
                match req {
                    Ok(req) => client.request_text(req).await.is_ok_and(|t| t == "ok"),
                    Err(_) => false,
                }
            })
            .await?;
        allow_anonymous_issuer_discovery(&client).await?;

        let kcm = self.spawn(
            &tools.kube_controller_manager,
            "kube-controller-manager",
            &[
                format!("--kubeconfig={}", kcm_kubeconfig.display()),
                format!("--authentication-kubeconfig={}", kcm_kubeconfig.display()),
                format!("--authorization-kubeconfig={}", kcm_kubeconfig.display()),
                format!("--bind-address={host}"),
                format!("--secure-port={kcm_port}"),
                format!("--cert-dir={}", dir.join("kcm").display()),
                format!("--service-account-private-key-file={}", sa_key.display()),
                format!("--root-ca-file={}", ca.cert.display()),
                "--use-service-account-credentials=true".into(),
                "--controllers=*".into(),
                "--leader-elect=false".into(),
                "--profiling=false".into(),
            ],
            &[],
            opts.lifetime,
        )?;
        let service_accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
        self.components[kcm]
            .wait_ready(
                "the `default` service account in namespace `default`",
                Duration::from_secs(60),
                || async { matches!(service_accounts.get_opt("default").await, Ok(Some(_))) },
            )
            .await?;

        if let Some(index) = minio {
            let scheme = if minio_tls { "https" } else { "http" };
            let minio = Minio {
                endpoint: format!("{scheme}://{host}:{minio_port}"),
                ca: minio_tls.then(|| ca.cert.clone()),
                root,
                iam_helper: tools.minio_iam.clone(),
                dir: dir.join("minio"),
            };
            self.components[index]
                .wait_ready("GET /minio/health/ready", Duration::from_secs(60), || {
                    minio_ready(&http, &minio)
                })
                .await?;
            self.minio = Some(minio);
        }
        if sandbox.is_some() {
            self.parts = Some(node::ControlPlane {
                ca,
                server,
                pki_dir,
                kubeconfig: self.kubeconfig.clone(),
            });
        }
        Ok(())
    }

    /// A client authenticated as the `system:masters` admin.
    pub async fn client(&self) -> Result<kube::Client, Error> {
        client_from(&self.kubeconfig).await
    }

    /// The apiserver's audit log: one JSON event per line for every write to `keybroker.dev`
    /// objects and Leases and every TokenReview (metadata only, never bodies), so tests can
    /// count API writes and authentication calls.
    pub fn audit_log(&self) -> PathBuf {
        self.dir.join("apiserver/audit.log")
    }

    /// Audit events so far that match `pred`.
    pub fn audit_events(
        &self,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.audit_log())
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .filter(|event| pred(event))
            .collect()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn components(&self) -> &[Component] {
        &self.components
    }

    /// The last `lines` log lines of every component, for failure reports.
    pub fn log_tails(&self, lines: usize) -> String {
        self.components
            .iter()
            .map(|c| {
                format!(
                    "--- {} ({}) ---\n{}",
                    c.name(),
                    c.log_path().display(),
                    c.log_tail(lines)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Stops every component, detached or not, newest first (the apiserver before etcd), after
    /// the node (whose kubelet still talks to the apiserver).
    pub fn stop(&mut self) {
        drop(self.node.take());
        while let Some(mut c) = self.components.pop() {
            c.stop(Duration::from_secs(10));
        }
    }

    /// Stops MinIO (SIGTERM, as when the provider goes down); its data stays.
    pub fn stop_minio(&mut self) {
        if let Some(launch) = &self.minio_launch {
            self.components[launch.index].stop(Duration::from_secs(10));
        }
    }

    /// Starts MinIO again on the same port with the same data and keys; returns once ready.
    pub async fn restart_minio(&mut self) -> Result<(), Error> {
        let (Some(launch), Some(minio)) = (&self.minio_launch, &self.minio) else {
            return Ok(());
        };
        let env: Vec<(&str, &str)> = launch
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let log = self.dir.join("minio.log");
        let mut component = Component::spawn_in(
            "minio",
            &launch.program,
            &launch.args,
            &env,
            &log,
            launch.lifetime,
            launch.join,
        )?;
        let http = HttpClient::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        component
            .wait_ready("GET /minio/health/ready", Duration::from_secs(60), || {
                minio_ready(&http, minio)
            })
            .await?;
        self.components[launch.index] = component;
        Ok(())
    }

    /// Starts a component and returns its index in `components`.
    fn spawn(
        &mut self,
        program: &Path,
        name: &str,
        args: &[String],
        env: &[(&str, &str)],
        lifetime: Lifetime,
    ) -> Result<usize, Error> {
        let log = self.dir.join(format!("{name}.log"));
        let component = Component::spawn_in(name, program, args, env, &log, lifetime, self.join)?;
        self.components.push(component);
        Ok(self.components.len() - 1)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Detached components outlive this handle on purpose (`make cluster-up`).
        self.components.retain(|c| !c.is_detached());
        self.stop();
    }
}

/// An admin client from a kubeconfig file.
pub async fn client_from(kubeconfig: &Path) -> Result<kube::Client, Error> {
    let err = |source| Error::Kubeconfig {
        path: kubeconfig.to_owned(),
        source,
    };
    let kc = Kubeconfig::read_from(kubeconfig).map_err(err)?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(err)?;
    Ok(kube::Client::try_from(config)?)
}

/// Binds the built-in `system:service-account-issuer-discovery` role to unauthenticated
/// callers, so verifiers (MinIO, AWS) can fetch the OIDC discovery document and keys.
async fn allow_anonymous_issuer_discovery(client: &kube::Client) -> Result<(), Error> {
    let binding: ClusterRoleBinding = serde_json::from_value(serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": { "name": "keybroker-e2e:anonymous-issuer-discovery" },
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": "system:service-account-issuer-discovery",
        },
        "subjects": [{
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Group",
            "name": "system:unauthenticated",
        }],
    }))
    .map_err(|e| Error::Client(kube::Error::SerdeError(e)))?;
    Api::<ClusterRoleBinding>::all(client.clone())
        .patch(
            "keybroker-e2e:anonymous-issuer-discovery",
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&binding),
        )
        .await?;
    Ok(())
}

/// True when MinIO's readiness endpoint answers 200 (over TLS when MinIO serves it).
async fn minio_ready(
    http: &HttpClient<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    minio: &Minio,
) -> bool {
    let Some(ca) = &minio.ca else {
        return http_ok(
            http,
            &format!("{}/minio/health/ready", minio.endpoint),
            None,
        )
        .await;
    };
    let Some(addr) = minio
        .endpoint
        .strip_prefix("https://")
        .and_then(|a| a.parse().ok())
    else {
        return false;
    };
    let Ok(client) = crate::https::Client::new(addr, ca) else {
        return false;
    };
    let probe = client.send("GET", "/minio/health/ready", None, Vec::new());
    matches!(
        tokio::time::timeout(Duration::from_secs(2), probe).await,
        Ok(Ok(reply)) if reply.status.as_u16() == 200
    )
}

/// True when GET `url` answers 200 (and the body contains `needle`, if given).
pub(crate) async fn http_ok(
    http: &HttpClient<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    url: &str,
    needle: Option<&str>,
) -> bool {
    let Ok(uri) = url.parse::<hyper::Uri>() else {
        return false;
    };
    let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_secs(2), http.get(uri)).await else {
        return false;
    };
    if !resp.status().is_success() {
        return false;
    }
    match needle {
        None => true,
        Some(needle) => match resp.into_body().collect().await {
            Ok(body) => String::from_utf8_lossy(&body.to_bytes()).contains(needle),
            Err(_) => false,
        },
    }
}

pub(crate) fn write_kubeconfig(
    path: &Path,
    server: &str,
    ca: &Path,
    user: &pki::CertFiles,
) -> Result<(), Error> {
    let contents = format!(
        "apiVersion: v1
kind: Config
clusters:
- name: keybroker-e2e
  cluster:
    server: {server}
    certificate-authority: {ca}
users:
- name: admin
  user:
    client-certificate: {cert}
    client-key: {key}
contexts:
- name: keybroker-e2e
  context:
    cluster: keybroker-e2e
    user: admin
current-context: keybroker-e2e
",
        ca = ca.display(),
        cert = user.cert.display(),
        key = user.key.display(),
    );
    write_file(path, &contents)
}

fn write_file(path: &Path, contents: &str) -> Result<(), Error> {
    std::fs::write(path, contents).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })
}

/// `N` distinct free ports on 127.0.0.1, below the kernel's ephemeral range. A port from that
/// range can become the source port of any outgoing connection on the machine between our
/// check and the component's own bind (the apiservers of parallel tests make many); below it,
/// only a bind by port number can take it. The search starts at a random port, so parallel
/// harnesses rarely meet, and all listeners are held until every port is chosen, so the ports
/// differ from each other.
pub fn free_ports<const N: usize>() -> Result<[u16; N], Error> {
    let range = quiet_port_range();
    let span = u32::from(range.end - range.start);
    let offset = rand::random_range(0..span);
    let mut listeners = Vec::with_capacity(N);
    for step in 0..span {
        if listeners.len() == N {
            break;
        }
        let port = range.start + u16::try_from((offset + step) % span).unwrap_or(0);
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)) {
            listeners.push(listener);
        }
    }
    // A machine whose ephemeral range leaves nothing below it: the kernel's choice.
    while listeners.len() < N {
        listeners.push(TcpListener::bind("127.0.0.1:0").map_err(Error::Port)?);
    }
    let mut ports = [0u16; N];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr().map_err(Error::Port)?.port();
    }
    Ok(ports)
}

/// Ports no outgoing connection takes: from 10000 to the start of
/// `net.ipv4.ip_local_port_range` (32768 unless the machine changed it).
fn quiet_port_range() -> std::ops::Range<u16> {
    const FLOOR: u16 = 10_000;
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()))
        .unwrap_or(32_768u16);
    FLOOR..ephemeral_start.max(FLOOR + 1)
}

fn mkdir(path: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(path).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })
}

fn copy(from: &Path, to: &Path) -> Result<(), Error> {
    std::fs::copy(from, to)
        .map(drop)
        .map_err(|source| Error::Io {
            path: to.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_and_bindable() {
        let ports: [u16; 6] = free_ports().unwrap();
        let mut unique = ports.to_vec();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), 6, "{ports:?}");
        let quiet = quiet_port_range();
        for port in ports {
            assert!(quiet.contains(&port), "{port} outside {quiet:?}");
            TcpListener::bind(("127.0.0.1", port)).unwrap();
        }
    }
}

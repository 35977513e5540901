//! go-httpbin as a real upstream for the gateway tests: it echoes what it receives (`/headers`,
//! `/anything`), streams (`/sse`, `/drip`, `/stream/N`), and answers any status (`/status/N`).
//! On loopback it serves plain HTTP; for pods ([`Httpbin::start_on_node`]) it serves TLS with a
//! CA of its own, on the node's address, as an upstream outside the cluster would.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use keybroker_operator::crd::{
    ApiKey, ApiKeySpec, Budget, GatewayProvider, Guardrails, HeaderPresentation, KeyPresentation,
    KeyProvider, KeyProviderSpec, ProviderRef, Scope, SecretRef,
};

use crate::cluster::{Cluster, free_ports, http_ok};
use crate::pki::Ca;
use crate::process::{Component, Join, Lifetime};
use crate::tools::UpstreamTools;

/// How long go-httpbin may take to answer its first request.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// go-httpbin's limits (its own defaults: 1 MiB, 10 s).
#[derive(Clone, Debug)]
pub struct Options {
    /// `-max-body-size`: the largest request or response body, in bytes.
    pub max_body_size: u64,
    /// `-max-duration`: the longest a response (`/drip`, `/sse`, `/delay`) may take.
    pub max_duration: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            max_body_size: 1024 * 1024,
            max_duration: Duration::from_secs(10),
        }
    }
}

/// A running go-httpbin on 127.0.0.1. Dropping it stops the server.
#[derive(Debug)]
pub struct Httpbin {
    url: String,
    addr: SocketAddr,
    dir: PathBuf,
    server: Component,
    /// The CA of its serving certificate, when it serves TLS.
    ca_pem: Option<String>,
}

impl Httpbin {
    /// Starts go-httpbin with its default limits in a fresh run directory (see
    /// [`crate::run_dir`]) and waits until it answers.
    pub async fn start() -> anyhow::Result<Self> {
        let dir = crate::run_dir().context("creating go-httpbin's run directory")?;
        Self::start_in(&dir, Options::default()).await
    }

    /// Starts go-httpbin with `opts`, its log in `dir/go-httpbin.log`, on a free port.
    pub async fn start_in(dir: &Path, opts: Options) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let [port] = free_ports()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut server = spawn(dir, &opts, addr, &[], Join::default())?;
        let url = format!("http://{addr}");
        let http = HttpClient::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let probe = format!("{url}/status/200");
        server
            .wait_ready("GET /status/200", READY_TIMEOUT, || {
                http_ok(&http, &probe, None)
            })
            .await?;
        Ok(Self {
            url,
            addr,
            dir: dir.to_owned(),
            server,
            ca_pem: None,
        })
    }

    /// Starts go-httpbin in the node's network namespace on the node's address, serving TLS
    /// for that address and `names` (the Service names pods use) with a CA of its own
    /// ([`Httpbin::ca_pem`]).
    pub async fn start_on_node(cluster: &Cluster, names: &[&str]) -> anyhow::Result<Self> {
        let dir = crate::run_dir().context("creating go-httpbin's run directory")?;
        let ip: std::net::IpAddr = cluster
            .host()
            .parse()
            .context("the cluster's address is not an IP")?;
        let ca = Ca::create(&dir, "go-httpbin-ca")?;
        let mut sans = vec![cluster.host()];
        sans.extend_from_slice(names);
        let serving = ca.issue_server(&dir, "go-httpbin", &sans)?;
        let [port] = free_ports()?;
        let addr = SocketAddr::new(ip, port);
        let tls = [
            "-https-cert-file".to_owned(),
            serving.cert.display().to_string(),
            "-https-key-file".to_owned(),
            serving.key.display().to_string(),
        ];
        let mut server = spawn(&dir, &Options::default(), addr, &tls, cluster.join())?;
        // Its certificate is for the names pods use: here an open port is the signal.
        server
            .wait_ready("accepting TCP connections", READY_TIMEOUT, || async move {
                tokio::net::TcpStream::connect(addr).await.is_ok()
            })
            .await?;
        Ok(Self {
            url: format!("https://{addr}"),
            addr,
            dir,
            server,
            ca_pem: Some(std::fs::read_to_string(&ca.cert).context("reading go-httpbin's CA")?),
        })
    }

    /// The CA (PEM) of its serving certificate, when it serves TLS.
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    /// `http://127.0.0.1:<port>` (`https://<node address>:<port>` on the node), without a
    /// trailing slash.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.server.pid()
    }

    /// The directory holding its log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The last `lines` lines of its log (one line per request served), for failure reports.
    pub fn log_tail(&self, lines: usize) -> String {
        self.server.log_tail(lines)
    }
}

fn spawn(
    dir: &Path,
    opts: &Options,
    addr: SocketAddr,
    extra: &[String],
    join: Join,
) -> anyhow::Result<Component> {
    let tools = UpstreamTools::locate()?;
    let mut args = vec![
        "-host".into(),
        addr.ip().to_string(),
        "-port".into(),
        addr.port().to_string(),
        "-max-body-size".into(),
        opts.max_body_size.to_string(),
        "-max-duration".into(),
        format!("{}ms", opts.max_duration.as_millis()),
    ];
    args.extend_from_slice(extra);
    Ok(Component::spawn_in(
        "go-httpbin",
        &tools.go_httpbin,
        &args,
        &[],
        &dir.join("go-httpbin.log"),
        Lifetime::TiedToProcess,
        join,
    )?)
}

/// The paths of go-httpbin a gateway ApiKey is scoped to in these tests.
const PATHS: [&str; 6] = [
    "/anything/{namespace}/*",
    "/headers",
    "/response-headers",
    "/base64/*",
    "/sse",
    "/delay/*",
];

/// The platform team's KeyProvider for go-httpbin at `upstream`: the key (data key `key` of
/// Secret `key_namespace/httpbin-key`) in `Authorization: Bearer`, GET and POST on [`PATHS`],
/// 1 s upstream timeout, 64 KiB bodies. Labelled `e2e-scope=<key_namespace>`.
pub fn provider(name: &str, key_namespace: &str, upstream: &str) -> KeyProvider {
    let mut kp = KeyProvider::new(
        name,
        KeyProviderSpec {
            aws: None,
            oauth2: None,
            gateway: Some(GatewayProvider {
                upstream: upstream.to_owned(),
                ca_bundle: None,
                key_secret_ref: SecretRef {
                    namespace: key_namespace.to_owned(),
                    name: KEY_SECRET.into(),
                },
                presentation: KeyPresentation {
                    header: Some(HeaderPresentation {
                        name: "Authorization".into(),
                        prefix: Some("Bearer ".into()),
                    }),
                    query_parameter: None,
                },
                app_env: None,
                timeout: Some("1s".into()),
                rotation: None,
            }),
            namespace_selector: LabelSelector::default(),
            guardrails: Guardrails {
                allowed_actions: vec!["GET".into(), "POST".into()],
                allowed_resources: PATHS.iter().map(|p| (*p).to_owned()).collect(),
                default_ttl: None,
                max_ttl: None,
                max_issuances_per_minute: None,
                max_request_bytes: Some(64 * 1024),
                max_requests_per_minute: Some(1000),
                max_requests_per_day: None,
            },
            anomalies: None,
        },
    );
    kp.metadata.labels = Some([("e2e-scope".to_owned(), key_namespace.to_owned())].into());
    kp
}

/// The Secret [`provider`] reads the upstream's key from.
pub const KEY_SECRET: &str = "httpbin-key";

/// An app team's ApiKey on [`provider`] `provider` for service account `app`: GET on
/// [`PATHS`], with `budget` calls per minute.
pub fn apikey(name: &str, provider: &str, budget: Option<u32>) -> ApiKey {
    ApiKey::new(
        name,
        ApiKeySpec {
            provider_ref: ProviderRef {
                name: provider.to_owned(),
            },
            service_account_names: vec!["app".into()],
            scope: Scope {
                actions: vec!["GET".into()],
                resources: PATHS.iter().map(|p| (*p).to_owned()).collect(),
            },
            ttl: None,
            revoked: false,
            budget: budget.map(|n| Budget {
                requests_per_minute: Some(n),
                requests_per_day: None,
            }),
            anomalies: None,
        },
    )
}

//! `keybroker-operator`: one binary for the controller, admission-webhook and broker roles.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use futures::FutureExt;
use keybroker_operator::broker::{self, Broker};
use keybroker_operator::controller::{self, Scope};
use keybroker_operator::leader::LeaseConfig;
use keybroker_operator::metrics::Metrics;
use keybroker_operator::server;
use keybroker_operator::tls::ReloadingCert;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "keybroker operator: controller, sidecar-injecting webhook and credential broker",
    long_about = "keybroker operator: reconciles KeyProviders and ApiKeys (controller), injects the \
credential sidecar into opted-in pods (webhook) and exchanges pod-bound service-account tokens for \
short-lived scoped credentials (broker). Each role can run in its own Deployment.\n\n\
This build implements the controller and broker roles; the webhook role is refused with an error."
)]
struct Args {
    /// Roles to run in this process (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "controller,broker",
        env = "KEYBROKER_ROLES"
    )]
    roles: Vec<Role>,
    /// Address of the broker's HTTPS exchange endpoint.
    #[arg(long, default_value = "0.0.0.0:8443", env = "KEYBROKER_BROKER_ADDR")]
    broker_addr: SocketAddr,
    /// PEM certificate (chain) the broker serves; re-read when it changes.
    #[arg(
        long,
        env = "KEYBROKER_TLS_CERT_FILE",
        default_value = "/etc/keybroker/tls/tls.crt"
    )]
    tls_cert_file: std::path::PathBuf,
    /// PEM private key of --tls-cert-file.
    #[arg(
        long,
        env = "KEYBROKER_TLS_KEY_FILE",
        default_value = "/etc/keybroker/tls/tls.key"
    )]
    tls_key_file: std::path::PathBuf,
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080", env = "KEYBROKER_METRICS_ADDR")]
    metrics_addr: SocketAddr,
    /// Reconcile only ApiKeys in this namespace (default: all namespaces).
    #[arg(long, env = "KEYBROKER_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Reconcile only KeyProviders matching this label selector, e.g. `tier=prod`.
    #[arg(long, env = "KEYBROKER_PROVIDER_SELECTOR")]
    provider_selector: Option<String>,
    /// Name of the Lease that elects the active controller replica.
    #[arg(long, default_value = "keybroker-controller")]
    lease_name: String,
    /// Namespace of the Lease (normally the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "keybroker-system")]
    lease_namespace: String,
    /// Seconds a replica that stopped renewing keeps the Lease.
    #[arg(long, default_value_t = 15)]
    lease_duration_seconds: u64,
    /// This replica's identity in the Lease (default: the pod name, else the host name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Log format.
    #[arg(long, value_enum, default_value = "json", env = "KEYBROKER_LOG_FORMAT")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Role {
    /// Reconcile KeyProviders and ApiKeys (leader-elected).
    Controller,
    /// Serve the mutating admission webhook that injects the sidecar (not in this build).
    Webhook,
    /// Serve the token-exchange endpoint for sidecars.
    Broker,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    match args.log_format {
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init(),
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
    }
    anyhow::ensure!(
        !args.roles.contains(&Role::Webhook),
        "the webhook role is not implemented in this build; run with --roles controller,broker"
    );

    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
    let metrics = Arc::new(Metrics::default());
    let listener = server::bind(args.metrics_addr).await?;
    let identity = match args.identity {
        Some(identity) => identity,
        None => hostname(),
    };
    let lease = LeaseConfig {
        name: args.lease_name,
        namespace: args.lease_namespace,
        identity,
        duration: Duration::from_secs(args.lease_duration_seconds),
        grace: Duration::from_secs((args.lease_duration_seconds / 3).max(1)),
    };
    let scope = Scope {
        namespace: args.watch_namespace,
        provider_labels: args.provider_selector,
    };

    let mut roles: Vec<futures::future::BoxFuture<'static, anyhow::Result<()>>> = Vec::new();
    roles.push(Box::pin(
        server::serve(listener, Arc::clone(&metrics)).map(Ok),
    ));
    if args.roles.contains(&Role::Controller) {
        let (client, metrics) = (client.clone(), Arc::clone(&metrics));
        roles.push(Box::pin(async move {
            Ok(controller::run_elected(client, scope, lease, metrics).await?)
        }));
    }
    if args.roles.contains(&Role::Broker) {
        let tls = ReloadingCert::new(&args.tls_cert_file, &args.tls_key_file)?.server_config();
        let listener = server::bind(args.broker_addr).await?;
        let broker = Broker::start(client).await;
        roles.push(Box::pin(async move {
            broker::server::serve(listener, Arc::new(tls), broker).await;
            Ok(())
        }));
    }
    // The first role to stop (SIGTERM ends the controller) stops the process.
    let (result, _, _) = futures::future::select_all(roles).await;
    result
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("keybroker-{}", std::process::id()))
}

//! `keybroker-operator`: one binary for the controller, admission-webhook and broker roles.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use keybroker_operator::controller::{self, Scope};
use keybroker_operator::leader::LeaseConfig;
use keybroker_operator::metrics::Metrics;
use keybroker_operator::server;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "keybroker operator: controller, sidecar-injecting webhook and credential broker",
    long_about = "keybroker operator: reconciles KeyProviders and ApiKeys (controller), injects the \
credential sidecar into opted-in pods (webhook) and exchanges pod-bound service-account tokens for \
short-lived scoped credentials (broker). Each role can run in its own Deployment.\n\n\
This build implements the controller role; the webhook and broker roles are refused with an error."
)]
struct Args {
    /// Roles to run in this process (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "controller",
        env = "KEYBROKER_ROLES"
    )]
    roles: Vec<Role>,
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
    /// Serve the token-exchange endpoint for sidecars (not in this build).
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
    for role in &args.roles {
        anyhow::ensure!(
            *role == Role::Controller,
            "the {role:?} role is not implemented in this build; run with --roles controller"
        );
    }

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
    tokio::select! {
        () = server::serve(listener, Arc::clone(&metrics)) => Ok(()),
        result = controller::run_elected(client, scope, lease, metrics) => Ok(result?),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("keybroker-{}", std::process::id()))
}

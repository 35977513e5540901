//! `keybroker-operator`: one binary for the controller, admission-webhook and broker roles.
//!
//! Startup: the health server comes first, so the kubelet's probes answer (readiness 503,
//! naming what is missing) while the caches fill. Shutdown has one path: the first SIGTERM or
//! SIGINT turns readiness 503, the servers keep answering for `--shutdown-delay` (endpoints
//! take that long to drop this replica), each answer with `Connection: close` so clients move
//! their kept-alive connections elsewhere, then stop accepting, finish every admission and
//! exchange in flight and close idle connections; the controller stops at the signal, leading
//! or not, without cutting the delay short; then the process exits.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use keybroker_operator::broker::{self, Broker, GatewayLink};
use keybroker_operator::controller::{self, Scope};
use keybroker_operator::gateway::{self, Gateway};
use keybroker_operator::https::Stopping;
use keybroker_operator::leader::LeaseConfig;
use keybroker_operator::metrics::Metrics;
use keybroker_operator::providers::gateway::session;
use keybroker_operator::server;
use keybroker_operator::shutdown;
use keybroker_operator::tls::{MemoryCert, ReloadingCert};
use keybroker_operator::webhook::certs::{self, CertConfig, Timing};
use keybroker_operator::webhook::inject::Settings;
use keybroker_operator::webhook::{self, Webhook};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "keybroker operator: controller, sidecar-injecting webhook and credential broker",
    long_about = "keybroker operator: reconciles KeyProviders and ApiKeys (controller), injects the \
credential sidecar into opted-in pods (webhook) and exchanges pod-bound service-account tokens for \
short-lived scoped credentials (broker). Each role can run in its own Deployment.\n\n\
The webhook serves its own CA-signed certificate (kept in a Secret, rotated before expiry, its \
CA bundle patched into the MutatingWebhookConfiguration) unless --webhook-cert-file is given \
(cert-manager)."
)]
struct Args {
    /// Roles to run in this process (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "controller,webhook,broker",
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
    tls_cert_file: PathBuf,
    /// PEM private key of --tls-cert-file.
    #[arg(
        long,
        env = "KEYBROKER_TLS_KEY_FILE",
        default_value = "/etc/keybroker/tls/tls.key"
    )]
    tls_key_file: PathBuf,
    /// Address of the gateway's HTTPS endpoint (gateway role; same certificate as the broker).
    #[arg(long, default_value = "0.0.0.0:8444", env = "KEYBROKER_GATEWAY_ADDR")]
    gateway_addr: SocketAddr,
    /// The gateway's URL as pods reach it, e.g. https://keybroker-gateway.keybroker-system.svc:8444.
    /// With it, the broker issues sessions for gateway ApiKeys; without it, it refuses them.
    #[arg(long, env = "KEYBROKER_GATEWAY_URL")]
    gateway_url: Option<String>,
    /// Secret (in --namespace) with the key that signs gateway sessions; created if missing.
    #[arg(long, default_value = "keybroker-gateway-session")]
    gateway_session_secret: String,
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
    /// The operator's own namespace: the Lease and the webhook's certificate Secret live here.
    #[arg(long, env = "POD_NAMESPACE", default_value = "keybroker-system")]
    namespace: String,
    /// Seconds a replica that stopped renewing keeps the Lease.
    #[arg(long, default_value_t = 15)]
    lease_duration_seconds: u64,
    /// This replica's identity in the Lease (default: the pod name, else the host name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// After SIGTERM, how long the servers keep accepting (readiness already 503) before they
    /// stop and drain; long enough for the endpoints to drop this replica.
    #[arg(long, default_value = "5s", value_parser = duration, env = "KEYBROKER_SHUTDOWN_DELAY")]
    shutdown_delay: Duration,
    #[command(flatten)]
    webhook: WebhookArgs,
    /// Log format.
    #[arg(long, value_enum, default_value = "json", env = "KEYBROKER_LOG_FORMAT")]
    log_format: LogFormat,
}

/// The webhook role: where it serves, its certificate, and what it injects.
#[derive(Debug, clap::Args)]
struct WebhookArgs {
    /// Address of the webhook's HTTPS endpoint.
    #[arg(long, default_value = "0.0.0.0:9443", env = "KEYBROKER_WEBHOOK_ADDR")]
    webhook_addr: SocketAddr,
    /// Serve this PEM certificate (re-read when it changes, e.g. from cert-manager) instead of
    /// managing a CA; then cert-manager's CA injector must set the caBundle.
    #[arg(
        long,
        env = "KEYBROKER_WEBHOOK_CERT_FILE",
        requires = "webhook_key_file"
    )]
    webhook_cert_file: Option<PathBuf>,
    /// PEM private key of --webhook-cert-file.
    #[arg(
        long,
        env = "KEYBROKER_WEBHOOK_KEY_FILE",
        requires = "webhook_cert_file"
    )]
    webhook_key_file: Option<PathBuf>,
    /// Secret (in --namespace) holding the self-managed CA and serving certificate.
    #[arg(long, default_value = "keybroker-webhook-tls")]
    webhook_secret: String,
    /// MutatingWebhookConfiguration whose caBundle the operator keeps current.
    #[arg(long, default_value = "keybroker")]
    webhook_config_name: String,
    /// Names the serving certificate is valid for (default: keybroker-webhook.<namespace>.svc).
    #[arg(long, value_delimiter = ',')]
    webhook_hosts: Vec<String>,
    /// Lifetime of the self-managed CA; it rotates with a third left.
    #[arg(long, default_value = "43800h", value_parser = duration)]
    webhook_ca_validity: Duration,
    /// Lifetime of the serving certificate; it is renewed with a third left.
    #[arg(long, default_value = "2160h", value_parser = duration)]
    webhook_cert_validity: Duration,
    /// Wait between CA rotation steps, for every replica and the apiserver to catch up.
    #[arg(long, default_value = "60s", value_parser = duration)]
    webhook_rotation_step: Duration,
    /// Sidecar image injected into pods.
    #[arg(
        long,
        env = "KEYBROKER_SIDECAR_IMAGE",
        default_value = "ghcr.io/keybroker/keybroker-sidecar:0.1.0"
    )]
    sidecar_image: String,
    #[arg(long, default_value = "IfNotPresent")]
    sidecar_image_pull_policy: String,
    /// The broker's URL as pods reach it (default: https://keybroker-broker.<namespace>.svc:8443).
    #[arg(long, env = "KEYBROKER_BROKER_URL")]
    broker_url: Option<String>,
    /// PEM CA bundle the sidecar verifies the broker with (given to every injected sidecar).
    #[arg(
        long,
        env = "KEYBROKER_BROKER_CA_FILE",
        default_value = "/etc/keybroker/tls/ca.crt"
    )]
    broker_ca_file: PathBuf,
    /// Lifetime of the projected token mounted into the sidecar (the kubelet rotates it at 80 %).
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(i64).range(600..=86400))]
    sidecar_token_expiration_seconds: i64,
    #[arg(long, default_value = "5m")]
    sidecar_cpu_request: String,
    #[arg(long, default_value = "16Mi")]
    sidecar_memory_request: String,
    #[arg(long, default_value = "32Mi")]
    sidecar_memory_limit: String,
    /// sizeLimit of the memory-backed credentials volume.
    #[arg(long, default_value = "1Mi")]
    credentials_volume_size: String,
    /// Loopback port of the sidecar's AWS container-credentials endpoint.
    #[arg(long, default_value_t = keybroker_contract::ports::CREDENTIALS)]
    sidecar_credentials_port: u16,
    /// Port of the sidecar's health endpoints (startup and liveness probes).
    #[arg(long, default_value_t = keybroker_contract::ports::HEALTH)]
    sidecar_health_port: u16,
    /// Loopback port of the sidecar's local gateway (gateway ApiKeys).
    #[arg(long, default_value_t = keybroker_contract::ports::GATEWAY)]
    sidecar_gateway_port: u16,
}

fn duration(value: &str) -> Result<Duration, String> {
    keybroker_operator::policy::parse_ttl("duration", value)
        .map_err(|_| format!("{value:?} is not a duration like 90s, 15m or 2160h"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Role {
    /// Reconcile KeyProviders and ApiKeys (leader-elected).
    Controller,
    /// Serve the mutating admission webhook that injects the sidecar.
    Webhook,
    /// Serve the token-exchange endpoint for sidecars.
    Broker,
    /// Forward the calls of gateway ApiKeys to their upstreams, adding the upstream's key.
    Gateway,
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

    let signalled = shutdown::process();
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
    let metrics = Arc::new(Metrics::default());
    let readiness = Arc::new(server::Readiness::default());
    {
        let signalled = signalled.clone();
        readiness.add("shutting-down", move || !signalled.is_requested());
    }
    let listener = server::bind(args.metrics_addr).await?;
    // Runs until the process exits: probes answer during startup and the whole drain.
    tokio::spawn(server::serve(
        listener,
        Arc::clone(&metrics),
        Arc::clone(&readiness),
    ));
    // The servers answer with `Connection: close` from the signal on and stop accepting
    // `--shutdown-delay` after it, or at once when a role stops by itself.
    let (stop_serving, stops) = shutdown::channel();
    let serving_stops = Stopping {
        closing: signalled.clone(),
        stop: stops,
    };
    let stop_serving = Arc::new(stop_serving);
    {
        let (stop_serving, delay) = (Arc::clone(&stop_serving), args.shutdown_delay);
        let signalled = signalled.clone();
        tokio::spawn(async move {
            signalled.requested().await;
            tokio::time::sleep(delay).await;
            stop_serving.trigger();
        });
    }
    let identity = match args.identity {
        Some(identity) => identity,
        None => hostname(),
    };
    let lease = LeaseConfig {
        name: args.lease_name,
        namespace: args.namespace.clone(),
        identity,
        duration: Duration::from_secs(args.lease_duration_seconds),
        grace: Duration::from_secs((args.lease_duration_seconds / 3).max(1)),
    };
    let scope = Scope {
        namespace: args.watch_namespace,
        provider_labels: args.provider_selector,
        counts_namespace: Some(args.namespace.clone()),
    };

    // The broker hands credentials only to pods whose token sits in a sidecar of this image.
    let sidecar_image = args.webhook.sidecar_image.clone();
    let mut roles: Vec<futures::future::BoxFuture<'static, anyhow::Result<()>>> = Vec::new();
    if args.roles.contains(&Role::Controller) {
        let (client, metrics) = (client.clone(), Arc::clone(&metrics));
        roles.push(Box::pin(async move {
            Ok(controller::run_elected(client, scope, lease, metrics, shutdown::process()).await?)
        }));
    }
    if args.roles.contains(&Role::Webhook) {
        roles.push(
            webhook_role(
                client.clone(),
                &args.namespace,
                args.webhook,
                Arc::clone(&metrics),
                &readiness,
                serving_stops.clone(),
            )
            .await?,
        );
    }
    let (serves_broker, serves_gateway) = (
        args.roles.contains(&Role::Broker),
        args.roles.contains(&Role::Gateway),
    );
    if serves_broker || serves_gateway {
        // Broker and gateway in one process share the caches (one watch per resource).
        let sessions = if serves_gateway || args.gateway_url.is_some() {
            Some(Arc::new(
                session::load_or_create(&client, &args.namespace, &args.gateway_session_secret)
                    .await
                    .context("loading the gateway session key")?,
            ))
        } else {
            None
        };
        let tls =
            Arc::new(ReloadingCert::new(&args.tls_cert_file, &args.tls_key_file)?.server_config());
        let broker_listener = match serves_broker {
            true => Some(server::bind(args.broker_addr).await?),
            false => None,
        };
        let gateway_listener = match serves_gateway {
            true => Some(server::bind(args.gateway_addr).await?),
            false => None,
        };
        let synced = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = Arc::clone(&synced);
        readiness.add("broker-caches", move || {
            seen.load(std::sync::atomic::Ordering::Relaxed)
        });
        let (metrics, serving_stops) = (Arc::clone(&metrics), serving_stops.clone());
        let (client, gateway_url) = (client.clone(), args.gateway_url.clone());
        let namespace = args.namespace.clone();
        roles.push(Box::pin(async move {
            let broker = Broker::start_with_metrics(
                client.clone(),
                &namespace,
                &sidecar_image,
                Arc::clone(&metrics),
            )
            .await;
            if let (Some(url), Some(key)) = (gateway_url, &sessions) {
                broker.link_gateway(GatewayLink {
                    url,
                    key: Arc::clone(key),
                });
            }
            synced.store(true, std::sync::atomic::Ordering::Relaxed);
            let serve_broker = async {
                if let Some(listener) = broker_listener {
                    broker::server::serve_until(
                        listener,
                        Arc::clone(&tls),
                        Arc::clone(&broker),
                        serving_stops.clone(),
                    )
                    .await;
                }
            };
            let serve_gateway = async {
                if let (Some(listener), Some(key)) = (gateway_listener, &sessions) {
                    let gateway = Gateway::with_metrics(
                        client.clone(),
                        broker.stores(),
                        Arc::clone(key),
                        &namespace,
                        Arc::clone(&metrics),
                    );
                    gateway::server::serve_until(
                        listener,
                        Arc::clone(&tls),
                        gateway,
                        serving_stops.clone(),
                    )
                    .await;
                }
            };
            tokio::join!(serve_broker, serve_gateway);
            Ok(())
        }));
    }
    // The first role to stop decides the outcome; the others drain before the process exits.
    let (result, _, rest) = futures::future::select_all(roles).await;
    // A role that stopped because of the signal (the controller does at once, leading or not)
    // leaves the servers their `--shutdown-delay`: stopping them now would refuse connections
    // while the endpoints still name this replica. One that stopped by itself stops them now.
    if !signalled.is_requested() {
        stop_serving.trigger();
    }
    for outcome in futures::future::join_all(rest).await {
        if let Err(e) = outcome {
            tracing::warn!(error = %e, "a role failed while stopping");
        }
    }
    tracing::info!("stopped");
    result
}

/// Starts the webhook: its certificate (self-managed or from files), its caches, its server.
async fn webhook_role(
    client: kube::Client,
    namespace: &str,
    args: WebhookArgs,
    metrics: Arc<Metrics>,
    readiness: &server::Readiness,
    shutdown: Stopping,
) -> anyhow::Result<futures::future::BoxFuture<'static, anyhow::Result<()>>> {
    let broker_ca = std::fs::read_to_string(&args.broker_ca_file).with_context(|| {
        format!(
            "reading --broker-ca-file {} (the CA injected sidecars verify the broker with)",
            args.broker_ca_file.display()
        )
    })?;
    let settings = Settings {
        image: args.sidecar_image,
        image_pull_policy: args.sidecar_image_pull_policy,
        broker_url: args
            .broker_url
            .unwrap_or_else(|| format!("https://keybroker-broker.{namespace}.svc:8443")),
        broker_ca,
        token_expiration_seconds: args.sidecar_token_expiration_seconds,
        volume_size_limit: args.credentials_volume_size,
        cpu_request: args.sidecar_cpu_request,
        memory_request: args.sidecar_memory_request,
        memory_limit: args.sidecar_memory_limit,
        credentials_port: args.sidecar_credentials_port,
        health_port: args.sidecar_health_port,
        gateway_port: args.sidecar_gateway_port,
    };
    let listener = server::bind(args.webhook_addr).await?;
    let (tls, upkeep): (_, futures::future::BoxFuture<'static, ()>) =
        match (args.webhook_cert_file, args.webhook_key_file) {
            (Some(cert), Some(key)) => (
                ReloadingCert::new(&cert, &key)?.server_config(),
                Box::pin(futures::future::pending()),
            ),
            _ => {
                let serving = Arc::new(MemoryCert::default());
                let loaded = Arc::clone(&serving);
                readiness.add("webhook-certificate", move || loaded.is_ready());
                let hosts = match args.webhook_hosts.is_empty() {
                    true => vec![format!("keybroker-webhook.{namespace}.svc")],
                    false => args.webhook_hosts,
                };
                let config = CertConfig {
                    namespace: namespace.to_owned(),
                    secret_name: args.webhook_secret,
                    webhook_config: args.webhook_config_name,
                    hosts,
                    timing: Timing {
                        ca_validity: args.webhook_ca_validity,
                        cert_validity: args.webhook_cert_validity,
                        propagation: args.webhook_rotation_step,
                    },
                };
                let tls = serving.server_config();
                (tls, Box::pin(certs::run(client.clone(), config, serving)))
            }
        };
    let synced = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = Arc::clone(&synced);
    readiness.add("webhook-caches", move || {
        seen.load(std::sync::atomic::Ordering::Relaxed)
    });
    let serve = async move {
        let webhook = Webhook::start(client, settings, metrics).await;
        synced.store(true, std::sync::atomic::Ordering::Relaxed);
        webhook::server::serve_until(listener, Arc::new(tls), webhook, shutdown).await;
    };
    Ok(Box::pin(async move {
        // The certificate upkeep runs while the caches fill and ends with the server: nothing
        // is served after the drain.
        tokio::select! {
            () = upkeep => {}
            () = serve => {}
        }
        Ok(())
    }))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("keybroker-{}", std::process::id()))
}

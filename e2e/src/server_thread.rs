//! A keybroker server (broker or webhook) on its own thread and tokio runtime, as it runs in
//! its own process in a cluster: the test's clients and attackers do not share its scheduler,
//! so latencies measured against it are the server's, and [`ServerThread::stop`] really stops
//! it (the listener, the watch caches and every open connection go away, as when its pod dies).

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::future::BoxFuture;
use keybroker_operator::broker::{Broker, GatewayLink, server as broker_server};
use keybroker_operator::gateway::{Gateway, server as gateway_server};
use keybroker_operator::metrics::Metrics;
use keybroker_operator::providers::gateway::session;
use keybroker_operator::webhook::inject::Settings;
use keybroker_operator::webhook::{Webhook, server as webhook_server};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// Worker threads of a server's runtime: the operator's on a 2-core node.
const WORKERS: usize = 2;

#[derive(Debug)]
pub struct ServerThread {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ServerThread {
    /// Runs `setup` on a new runtime with an admin client from `kubeconfig` and a listener on
    /// `addr` (port 0: any); returns once `setup` returned the serving future (caches filled)
    /// and the listener is bound.
    pub async fn start<S, F>(
        name: &str,
        kubeconfig: &Path,
        addr: SocketAddr,
        setup: S,
    ) -> anyhow::Result<Self>
    where
        S: FnOnce(kube::Client, TcpListener) -> F + Send + 'static,
        F: Future<Output = anyhow::Result<BoxFuture<'static, ()>>> + Send,
    {
        let (ready_tx, ready_rx) = oneshot::channel::<anyhow::Result<SocketAddr>>();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let kubeconfig = kubeconfig.to_owned();
        let thread = std::thread::Builder::new()
            .name(format!("e2e-{name}"))
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(WORKERS)
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.into()));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let started = async {
                        let client = crate::cluster::client_from(&kubeconfig).await?;
                        let listener = TcpListener::bind(addr).await?;
                        let addr = listener.local_addr()?;
                        anyhow::Ok((addr, setup(client, listener).await?))
                    };
                    match started.await {
                        Ok((addr, serving)) => {
                            let _ = ready_tx.send(Ok(addr));
                            tokio::select! {
                                () = serving => {}
                                _ = stop_rx => {}
                            }
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                });
                runtime.shutdown_timeout(Duration::from_secs(2));
            })?;
        let addr = tokio::time::timeout(Duration::from_secs(60), ready_rx)
            .await
            .with_context(|| format!("the {name} did not start within 60 s"))?
            .with_context(|| format!("the {name} thread died"))??;
        Ok(Self {
            addr,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// The broker (accepting [`crate::fixtures::SIDECAR_IMAGE`]) serving `tls`.
    pub async fn broker(
        kubeconfig: &Path,
        addr: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
    ) -> anyhow::Result<Self> {
        Self::start("broker", kubeconfig, addr, |client, listener| async move {
            let broker = Broker::start(
                client,
                crate::fixtures::COUNTS_NAMESPACE,
                crate::fixtures::SIDECAR_IMAGE,
            )
            .await;
            let serving: BoxFuture<'static, ()> =
                Box::pin(broker_server::serve(listener, tls, broker));
            Ok(serving)
        })
        .await
    }

    /// The broker, issuing sessions for gateway ApiKeys that pods use at `gateway_url`, signed
    /// with the key in Secret `session_secret` (namespace/name; created if missing).
    pub async fn broker_for_gateway(
        kubeconfig: &Path,
        addr: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
        gateway_url: String,
        session_secret: (String, String),
    ) -> anyhow::Result<Self> {
        Self::start("broker", kubeconfig, addr, |client, listener| async move {
            let key =
                session::load_or_create(&client, &session_secret.0, &session_secret.1).await?;
            let broker = Broker::start(
                client,
                crate::fixtures::COUNTS_NAMESPACE,
                crate::fixtures::SIDECAR_IMAGE,
            )
            .await;
            broker.link_gateway(GatewayLink {
                url: gateway_url,
                key: Arc::new(key),
            });
            let serving: BoxFuture<'static, ()> =
                Box::pin(broker_server::serve(listener, tls, broker));
            Ok(serving)
        })
        .await
    }

    /// The gateway, verifying sessions with the key in Secret `session_secret`, serving `tls`.
    pub async fn gateway(
        kubeconfig: &Path,
        addr: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
        session_secret: (String, String),
    ) -> anyhow::Result<Self> {
        Self::start("gateway", kubeconfig, addr, |client, listener| async move {
            let key =
                session::load_or_create(&client, &session_secret.0, &session_secret.1).await?;
            let caches = Broker::start(
                client.clone(),
                crate::fixtures::COUNTS_NAMESPACE,
                crate::fixtures::SIDECAR_IMAGE,
            )
            .await;
            let gateway = Gateway::new(
                client,
                caches.stores(),
                Arc::new(key),
                crate::fixtures::COUNTS_NAMESPACE,
            );
            let serving: BoxFuture<'static, ()> = Box::pin(gateway_server::serve_until(
                listener,
                tls,
                gateway,
                keybroker_operator::shutdown::Shutdown::never(),
            ));
            Ok(serving)
        })
        .await
    }

    /// The webhook injecting with `settings`, serving `tls`, counting in `metrics`.
    pub async fn webhook(
        kubeconfig: &Path,
        addr: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
        settings: Settings,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        Self::start("webhook", kubeconfig, addr, |client, listener| async move {
            let webhook = Webhook::start(client, settings, metrics).await;
            let serving: BoxFuture<'static, ()> =
                Box::pin(webhook_server::serve(listener, tls, webhook));
            Ok(serving)
        })
        .await
    }

    /// Stops the server and waits until its runtime is gone.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        self.stop();
    }
}

//! Leader election on a `coordination.k8s.io/v1` Lease, so that two controller replicas are
//! safe: only the holder runs the reconcilers, and a replica that loses the Lease stops them
//! before anything else can be written. A replica waiting for the Lease gives up as soon as
//! the process is asked to stop ([`crate::shutdown`]), so a standby replica exits on SIGTERM
//! instead of waiting for a Lease it will never use.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use kube_lease_manager::LeaseManagerBuilder;
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::shutdown;

/// How long the reconcilers get to finish once the process is asked to stop.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Which Lease to hold, as whom, and for how long.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    /// Unique per replica (the pod name, plus a random suffix).
    pub identity: String,
    /// How long a holder that stopped renewing keeps the Lease.
    pub duration: Duration,
    /// Renewal starts this long before the Lease would expire.
    pub grace: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("leader election on Lease {namespace}/{name}: {source}")]
    Lease {
        namespace: String,
        name: String,
        source: kube_lease_manager::LeaseManagerError,
    },
    #[error("the Lease manager stopped unexpectedly")]
    ManagerStopped,
}

/// Runs `work()` whenever this replica holds the Lease and drops it (stopping the reconcilers)
/// as soon as the Lease is lost. Returns when `work()` finishes (e.g. on SIGTERM), after
/// releasing the Lease so another replica takes over at once.
pub async fn run_while_leader<F, Fut>(
    client: kube::Client,
    config: LeaseConfig,
    metrics: Arc<Metrics>,
    stopping: shutdown::Shutdown,
    mut work: F,
) -> Result<(), Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let lease_error = |source| Error::Lease {
        namespace: config.namespace.clone(),
        name: config.name.clone(),
        source,
    };
    let manager = LeaseManagerBuilder::new(client, &config.name)
        .with_namespace(&config.namespace)
        .with_identity(&config.identity)
        .with_duration(config.duration.as_secs().max(2))
        .with_grace(config.grace.as_secs().max(1))
        .with_field_manager("keybroker-leader-election")
        .build()
        .await
        .map_err(lease_error)?;
    let (mut leading, manager_task) = manager.watch().await;
    let outcome = loop {
        let waiting = async {
            while !*leading.borrow_and_update() {
                if leading.changed().await.is_err() {
                    break;
                }
            }
        };
        tokio::select! {
            () = waiting => {}
            () = stopping.clone().requested() => {
                info!(identity = %config.identity, "stopping while not the leader");
                break Ok(());
            }
        }
        if !*leading.borrow() {
            break Err(Error::ManagerStopped);
        }
        metrics.leader.set(1);
        info!(identity = %config.identity, lease = %config.name, "holding the controller Lease; starting the reconcilers");
        let lost = async {
            while *leading.borrow_and_update() {
                if leading.changed().await.is_err() {
                    return;
                }
            }
        };
        let reconcilers = work();
        tokio::pin!(reconcilers);
        tokio::select! {
            () = &mut reconcilers => {
                metrics.leader.set(0);
                break Ok(());
            }
            () = lost => {
                metrics.leader.set(0);
                warn!(identity = %config.identity, "lost the controller Lease; reconcilers stopped");
            }
            () = stopping.clone().requested() => {
                // The reconcilers finish their current passes; past the grace they are dropped.
                if tokio::time::timeout(STOP_GRACE, reconcilers).await.is_err() {
                    warn!("the reconcilers did not stop within {} s; dropping them", STOP_GRACE.as_secs());
                }
                metrics.leader.set(0);
                break Ok(());
            }
        }
    };
    // Closing the channel makes the manager release the Lease.
    drop(leading);
    match manager_task.await {
        Ok(Ok(_)) | Err(_) => {}
        Ok(Err(e)) => warn!(error = %e, "releasing the controller Lease failed"),
    }
    outcome
}

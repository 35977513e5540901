//! The process's one shutdown path. SIGTERM (the kubelet) or SIGINT (a terminal) flips a single
//! flag that every role watches: readiness turns 503, the HTTPS servers stop accepting and
//! finish what they hold, and the leader election gives up waiting for a Lease it does not
//! hold. Roles never install signal handlers of their own, so they cannot disagree about when
//! the process is stopping.

use std::sync::OnceLock;

use tokio::sync::watch;
use tracing::{info, warn};

/// A handle on the shutdown flag; cheap to clone, one per waiter.
#[derive(Clone, Debug)]
pub struct Shutdown(watch::Receiver<bool>);

/// Requests the shutdown its [`Shutdown`]s watch (tests and embedders; the process uses
/// [`process`]).
#[derive(Debug)]
pub struct Trigger(watch::Sender<bool>);

/// A new flag, not tied to any signal.
pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }
}

impl Shutdown {
    /// A flag that never flips.
    pub fn never() -> Self {
        let (tx, rx) = watch::channel(false);
        // Keeping the sender alive keeps `requested` pending forever.
        std::mem::forget(tx);
        Self(rx)
    }

    pub fn is_requested(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once shutdown is requested (or the trigger is gone, which only happens when
    /// its owner is finished).
    pub async fn requested(mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}

/// The process-wide flag, flipped by the first SIGTERM or SIGINT. The handlers are installed on
/// the first call, which must happen inside the Tokio runtime (main does it first thing).
pub fn process() -> Shutdown {
    static FLAG: OnceLock<Shutdown> = OnceLock::new();
    FLAG.get_or_init(|| {
        let (trigger, shutdown) = channel();
        tokio::spawn(async move {
            wait_for_signal().await;
            info!("shutdown requested: readiness goes 503, in-flight requests are finished");
            trigger.trigger();
            // The trigger is held until the process exits, so no waiter mistakes its drop for
            // a request.
            std::future::pending::<()>().await;
        });
        shutdown
    })
    .clone()
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        (Err(e), _) | (_, Err(e)) => {
            warn!(error = %e, "cannot listen for SIGTERM/SIGINT; only Ctrl-C stops the process");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_waiter_sees_the_trigger() {
        let (trigger, shutdown) = channel();
        let waiter = tokio::spawn(shutdown.clone().requested());
        assert!(!shutdown.is_requested());
        trigger.trigger();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("the waiter saw the trigger")
            .expect("the waiter did not panic");
        assert!(shutdown.is_requested());
        let never = Shutdown::never();
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(20), never.requested())
                .await
                .is_err()
        );
    }
}

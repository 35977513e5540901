//! The revocation long-polls waiting at this broker, by ApiKey, with their caps.
//!
//! A watch event wakes only the pollers of the ApiKeys it touches (an ApiKey event: that
//! key's; a Namespace or KeyProvider event: the keys in that namespace or using that
//! provider), so a thousand idle sidecars cost nothing when an unrelated key changes. Each pod
//! may hold a few polls (one per ApiKey it uses) and the broker a bounded total; past either
//! cap a poll is refused at once (429) instead of holding a task and a connection.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// Polls one pod may hold at once (a pod lists at most a handful of ApiKeys).
pub const MAX_PER_POD: usize = 16;
/// Polls the broker holds at once.
pub const MAX_TOTAL: usize = 20_000;

/// `(namespace, ApiKey name)`.
type KeyId = (String, String);

#[derive(Debug, Default)]
struct Inner {
    waiting: HashMap<KeyId, Arc<Notify>>,
    per_pod: HashMap<String, usize>,
    total: usize,
}

/// Why a poll was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Full {
    #[error("this pod already holds {MAX_PER_POD} revocation polls; close one first")]
    Pod,
    #[error("the broker holds its maximum of {MAX_TOTAL} revocation polls; retry later")]
    Broker,
}

/// The registry of waiting polls.
#[derive(Debug)]
pub struct Pollers {
    inner: Mutex<Inner>,
    max_per_pod: usize,
    max_total: usize,
}

impl Default for Pollers {
    fn default() -> Self {
        Self::with_caps(MAX_PER_POD, MAX_TOTAL)
    }
}

impl Pollers {
    pub fn with_caps(max_per_pod: usize, max_total: usize) -> Self {
        Self {
            inner: Mutex::default(),
            max_per_pod,
            max_total,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a poll of `pod_uid` for ApiKey `namespace/name`; the slot leaves on drop.
    pub fn enter(
        self: &Arc<Self>,
        namespace: &str,
        name: &str,
        pod_uid: &str,
    ) -> Result<Slot, Full> {
        let mut inner = self.lock();
        if inner.total >= self.max_total {
            return Err(Full::Broker);
        }
        let held = inner.per_pod.get(pod_uid).copied().unwrap_or(0);
        if held >= self.max_per_pod {
            return Err(Full::Pod);
        }
        inner.per_pod.insert(pod_uid.to_owned(), held + 1);
        inner.total += 1;
        let key = (namespace.to_owned(), name.to_owned());
        let notify = Arc::clone(inner.waiting.entry(key.clone()).or_default());
        Ok(Slot {
            pollers: Arc::clone(self),
            key,
            pod_uid: pod_uid.to_owned(),
            notify,
        })
    }

    /// Wakes the polls of ApiKey `namespace/name`.
    pub fn wake(&self, namespace: &str, name: &str) {
        let inner = self.lock();
        if let Some(notify) = inner.waiting.get(&(namespace.to_owned(), name.to_owned())) {
            notify.notify_waiters();
        }
    }

    /// Wakes the polls of every ApiKey for which `touched(namespace, name)` holds.
    pub fn wake_where(&self, touched: impl Fn(&str, &str) -> bool) {
        let inner = self.lock();
        for ((namespace, name), notify) in &inner.waiting {
            if touched(namespace, name) {
                notify.notify_waiters();
            }
        }
    }

    /// Polls held now (for tests and metrics).
    pub fn total(&self) -> usize {
        self.lock().total
    }
}

/// One admitted poll.
#[derive(Debug)]
pub struct Slot {
    pollers: Arc<Pollers>,
    key: KeyId,
    pod_uid: String,
    pub notify: Arc<Notify>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut inner = self.pollers.lock();
        inner.total = inner.total.saturating_sub(1);
        if let Some(held) = inner.per_pod.get_mut(&self.pod_uid) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                inner.per_pod.remove(&self.pod_uid);
            }
        }
        // The map's reference and this slot's: nobody else waits on this key.
        if inner
            .waiting
            .get(&self.key)
            .is_some_and(|n| Arc::strong_count(n) <= 2)
        {
            inner.waiting.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_hold_per_pod_and_in_total_and_slots_give_back() {
        let pollers = Arc::new(Pollers::with_caps(2, 3));
        let a1 = pollers.enter("ns", "k1", "pod-a").unwrap();
        let _a2 = pollers.enter("ns", "k2", "pod-a").unwrap();
        assert_eq!(pollers.enter("ns", "k3", "pod-a").unwrap_err(), Full::Pod);
        let _b1 = pollers.enter("ns", "k1", "pod-b").unwrap();
        assert_eq!(
            pollers.enter("ns", "k1", "pod-c").unwrap_err(),
            Full::Broker
        );
        drop(a1);
        assert_eq!(pollers.total(), 2);
        let _a3 = pollers.enter("ns", "k3", "pod-a").unwrap();
        assert_eq!(pollers.total(), 3);
    }

    #[tokio::test]
    async fn a_wake_reaches_only_the_polls_of_that_key() {
        let pollers = Arc::new(Pollers::default());
        let k1 = pollers.enter("ns", "k1", "pod-a").unwrap();
        let k2 = pollers.enter("ns", "k2", "pod-b").unwrap();
        let n1 = k1.notify.notified();
        let n2 = k2.notify.notified();
        tokio::pin!(n1, n2);
        n1.as_mut().enable();
        n2.as_mut().enable();
        pollers.wake("ns", "k1");
        let woke = |n: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>| {
            futures::FutureExt::now_or_never(n).is_some()
        };
        assert!(woke(n1.as_mut()), "k1's poll was not woken");
        assert!(!woke(n2.as_mut()), "k2's poll was woken by k1's event");
        pollers.wake_where(|_, name| name == "k2");
        assert!(woke(n2.as_mut()));
    }

    #[test]
    fn the_registry_forgets_keys_nobody_waits_for() {
        let pollers = Arc::new(Pollers::default());
        let a = pollers.enter("ns", "k1", "pod-a").unwrap();
        let b = pollers.enter("ns", "k1", "pod-b").unwrap();
        drop(a);
        assert_eq!(pollers.lock().waiting.len(), 1);
        drop(b);
        assert!(pollers.lock().waiting.is_empty());
        assert!(pollers.lock().per_pod.is_empty());
    }
}

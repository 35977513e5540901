//! Prometheus metrics of the controller. Labels carry kinds and error categories only: never
//! names of secrets, never credential material.

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub kind: &'static str,
    pub category: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExchangeLabels {
    /// `issued` or `refused`.
    pub outcome: &'static str,
    /// The refusal reason (`""` when issued).
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AnomalyLabels {
    /// The rule that fired (`RefusalSpike`, `IssuanceBurst`, `TokenAfterPodGone`).
    pub rule: &'static str,
    /// `alert` or `revoke`.
    pub action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GatewayLabels {
    /// `forwarded` or `refused`.
    pub outcome: &'static str,
    /// The refusal reason (`""` when forwarded).
    pub reason: &'static str,
    /// The upstream's status class (`2xx`..`5xx`; `""` when refused).
    pub upstream: &'static str,
}

/// Every metric keybroker-operator exports, registered in one registry.
#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: Family<KindLabels, Counter>,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub reconcile_duration: Family<KindLabels, Histogram>,
    pub status_writes: Family<KindLabels, Counter>,
    /// 1 while this replica holds the controller Lease.
    pub leader: Gauge,
    /// Admission reviews answered, by decision (injected, unchanged, denied, invalid).
    pub admissions: Family<DecisionLabels, Counter>,
    pub admission_duration: Histogram,
    /// Broker exchanges answered, by outcome and refusal reason.
    pub exchanges: Family<ExchangeLabels, Counter>,
    pub exchange_duration: Histogram,
    /// Anomaly rules fired, by rule and action.
    pub anomalies: Family<AnomalyLabels, Counter>,
    /// Gateway calls answered, by outcome, refusal reason and upstream status class.
    pub gateway_calls: Family<GatewayLabels, Counter>,
    /// Time to the answer's headers (forwarded) or the refusal.
    pub gateway_call_duration: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("keybroker");
        let reconciles = Family::<KindLabels, Counter>::default();
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        let reconcile_duration = Family::<KindLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 14))
        });
        let status_writes = Family::<KindLabels, Counter>::default();
        let leader = Gauge::default();
        let admissions = Family::<DecisionLabels, Counter>::default();
        // 50 µs to ~0.8 s: an admission normally takes well under a millisecond.
        let admission_duration = Histogram::new(exponential_buckets(0.00005, 2.0, 15));
        let exchanges = Family::<ExchangeLabels, Counter>::default();
        let exchange_duration = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "broker_exchanges",
            "Token exchanges answered by the broker, by outcome and refusal reason",
            exchanges.clone(),
        );
        registry.register(
            "broker_exchange_duration_seconds",
            "Time to answer one token exchange (TokenReview, authorization and minting)",
            exchange_duration.clone(),
        );
        let anomalies = Family::<AnomalyLabels, Counter>::default();
        registry.register(
            "broker_anomalies",
            "Anomaly rules fired for ApiKeys, by rule and action (alert or revoke)",
            anomalies.clone(),
        );
        let gateway_calls = Family::<GatewayLabels, Counter>::default();
        let gateway_call_duration = Histogram::new(exponential_buckets(0.0002, 2.0, 17));
        registry.register(
            "gateway_calls",
            "Calls answered by the gateway, by outcome, refusal reason and upstream status class",
            gateway_calls.clone(),
        );
        registry.register(
            "gateway_call_duration_seconds",
            "Time from a gateway call to its answer's headers (or its refusal)",
            gateway_call_duration.clone(),
        );
        registry.register(
            "webhook_admissions",
            "Admission reviews answered by the webhook, by decision",
            admissions.clone(),
        );
        registry.register(
            "webhook_admission_duration_seconds",
            "Time to answer one admission review",
            admission_duration.clone(),
        );
        registry.register(
            "reconciles",
            "Reconciliations run, by kind",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Failed reconciliations, by kind and error category",
            reconcile_errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconciliation, by kind",
            reconcile_duration.clone(),
        );
        registry.register(
            "status_writes",
            "Status updates sent to the apiserver, by kind (no write when nothing changed)",
            status_writes.clone(),
        );
        registry.register(
            "controller_leader",
            "1 while this replica holds the controller Lease",
            leader.clone(),
        );
        Self {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            status_writes,
            leader,
            admissions,
            admission_duration,
            exchanges,
            exchange_duration,
            anomalies,
            gateway_calls,
            gateway_call_duration,
        }
    }
}

impl Metrics {
    /// Counts a gateway call: refused (with its reason) or forwarded (with the upstream's
    /// status).
    pub fn gateway_call(
        &self,
        reason: Option<&'static str>,
        upstream_status: u16,
        took: std::time::Duration,
    ) {
        let upstream = match upstream_status {
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            500..=599 => "5xx",
            _ => "",
        };
        let labels = match reason {
            Some(reason) => GatewayLabels {
                outcome: "refused",
                reason,
                upstream: "",
            },
            None => GatewayLabels {
                outcome: "forwarded",
                reason: "",
                upstream,
            },
        };
        self.gateway_calls.get_or_create(&labels).inc();
        self.gateway_call_duration.observe(took.as_secs_f64());
    }

    /// Counts a reconciliation of `kind` and times it until the guard drops.
    pub fn reconcile(self: &Arc<Self>, kind: &'static str) -> ReconcileTimer {
        self.reconciles.get_or_create(&KindLabels { kind }).inc();
        ReconcileTimer {
            metrics: Arc::clone(self),
            kind,
            started: Instant::now(),
        }
    }

    pub fn error(&self, kind: &'static str, category: &'static str) {
        self.reconcile_errors
            .get_or_create(&ErrorLabels { kind, category })
            .inc();
    }

    pub fn status_write(&self, kind: &'static str) {
        self.status_writes.get_or_create(&KindLabels { kind }).inc();
    }

    /// Status writes so far for `kind` (tests and benchmarks read this).
    pub fn status_writes_of(&self, kind: &'static str) -> u64 {
        self.status_writes.get_or_create(&KindLabels { kind }).get()
    }

    pub fn reconciles_of(&self, kind: &'static str) -> u64 {
        self.reconciles.get_or_create(&KindLabels { kind }).get()
    }

    pub fn admission(&self, decision: &'static str, took: std::time::Duration) {
        self.admissions
            .get_or_create(&DecisionLabels { decision })
            .inc();
        self.admission_duration.observe(took.as_secs_f64());
    }

    pub fn exchange(&self, outcome: &'static str, reason: &'static str, took: std::time::Duration) {
        self.exchanges
            .get_or_create(&ExchangeLabels { outcome, reason })
            .inc();
        self.exchange_duration.observe(took.as_secs_f64());
    }

    /// The text exposition format served on `/metrics`.
    /// Counts an anomaly rule that fired.
    pub fn anomaly(&self, rule: &'static str, action: crate::crd::AnomalyAction) {
        let action = match action {
            crate::crd::AnomalyAction::Alert => "alert",
            crate::crd::AnomalyAction::Revoke => "revoke",
        };
        self.anomalies
            .get_or_create(&AnomalyLabels { rule, action })
            .inc();
    }

    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Observes the reconcile duration when dropped.
#[derive(Debug)]
pub struct ReconcileTimer {
    metrics: Arc<Metrics>,
    kind: &'static str,
    started: Instant,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.metrics
            .reconcile_duration
            .get_or_create(&KindLabels { kind: self.kind })
            .observe(self.started.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_calls_are_counted_by_outcome_reason_and_status_class() {
        let m = Metrics::default();
        m.gateway_call(None, 200, std::time::Duration::from_millis(3));
        m.gateway_call(None, 503, std::time::Duration::from_millis(3));
        m.gateway_call(
            Some("OutsideScope"),
            0,
            std::time::Duration::from_micros(80),
        );
        let text = m.encode().unwrap();
        for line in [
            r#"keybroker_gateway_calls_total{outcome="forwarded",reason="",upstream="2xx"} 1"#,
            r#"keybroker_gateway_calls_total{outcome="forwarded",reason="",upstream="5xx"} 1"#,
            r#"keybroker_gateway_calls_total{outcome="refused",reason="OutsideScope",upstream=""} 1"#,
            "keybroker_gateway_call_duration_seconds_count 3",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }
}

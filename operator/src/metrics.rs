//! The operator's Prometheus metrics, served on `/metrics`: reconciliations by controller and
//! result, their durations, errors by reason (a bounded set: the condition reasons and the API
//! status classes), and whether this replica leads.

use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// Every metric the operator exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    reconciliations: IntCounterVec,
    duration: HistogramVec,
    errors: IntCounterVec,
    pub leader: IntGauge,
    /// The autoscaler's changes of `replicas`, by Model (`namespace/name`) and direction.
    pub autoscale_changes: IntCounterVec,
    /// The autoscaler's last recommendation (before stabilisation), by Model.
    pub autoscale_recommended: IntGaugeVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let reconciliations = IntCounterVec::new(
            Opts::new(
                "tidelock_operator_reconciliations_total",
                "Reconciliations finished, by controller (model, tenant) and result (success, error).",
            ),
            &["controller", "result"],
        )
        .expect("valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "tidelock_operator_reconcile_duration_seconds",
                "Time one reconciliation took, by controller.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["controller"],
        )
        .expect("valid metric");
        let errors = IntCounterVec::new(
            Opts::new(
                "tidelock_operator_reconcile_errors_total",
                "Failed reconciliations, by controller and reason (a condition reason or the API server's status class).",
            ),
            &["controller", "reason"],
        )
        .expect("valid metric");
        let leader = IntGauge::new(
            "tidelock_operator_leader",
            "1 while this replica holds the leader Lease and reconciles, else 0.",
        )
        .expect("valid metric");
        let autoscale_changes = IntCounterVec::new(
            Opts::new(
                "tidelock_operator_autoscale_changes_total",
                "Changes of a Model's shard groups by the autoscaler, by Model and direction (up, down).",
            ),
            &["model", "direction"],
        )
        .expect("valid metric");
        let autoscale_recommended = IntGaugeVec::new(
            Opts::new(
                "tidelock_operator_autoscale_recommended_groups",
                "Shard groups the last look at a Model's load called for, before the stabilisation windows and the cool-down.",
            ),
            &["model"],
        )
        .expect("valid metric");
        for c in [
            Box::new(reconciliations.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(duration.clone()),
            Box::new(errors.clone()),
            Box::new(leader.clone()),
            Box::new(autoscale_changes.clone()),
            Box::new(autoscale_recommended.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Metrics {
            registry,
            reconciliations,
            duration,
            errors,
            leader,
            autoscale_changes,
            autoscale_recommended,
        }
    }

    /// Records one finished reconciliation; `error` is its reason when it failed.
    pub fn reconciled(&self, controller: &str, took: Duration, error: Option<&str>) {
        self.duration
            .with_label_values(&[controller])
            .observe(took.as_secs_f64());
        let result = if error.is_some() { "error" } else { "success" };
        self.reconciliations
            .with_label_values(&[controller, result])
            .inc();
        if let Some(reason) = error {
            self.errors.with_label_values(&[controller, reason]).inc();
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

//! The router's Prometheus metrics (`GET /metrics`), all prefixed `tidelock_router_`.
//!
//! Per-worker gauges are filled from the live worker state when scraped, so a worker that left
//! leaves the exposition too.

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use crate::workers::Models;

/// Everything the router counts.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Requests by tenant, model, endpoint and HTTP status.
    pub requests: IntCounterVec,
    pub ttft: HistogramVec,
    pub time_per_output_token: HistogramVec,
    pub duration: HistogramVec,
    pub prompt_tokens: IntCounterVec,
    pub cached_tokens: IntCounterVec,
    pub completion_tokens: IntCounterVec,
    /// Placement decisions by policy and reason.
    pub decisions: IntCounterVec,
    /// Requests refused by a tenant limit, by limit.
    pub limited: IntCounterVec,
    /// Workers given up on for one request (before its first token), by model.
    pub retries: IntCounterVec,
    /// Prompt tokens taken from the turn memory instead of tokenized, by model.
    pub continued_tokens: IntCounterVec,
    pub in_flight: IntGauge,
    pub queued: IntGauge,
    /// Client connections open and refused (`tidelock_service::serve` keeps them).
    pub connections: tidelock_service::serve::ConnectionMetrics,
    worker_in_flight: GaugeVec,
    worker_healthy: GaugeVec,
    worker_queue: GaugeVec,
    worker_prefill_speed: GaugeVec,
}

/// Latency buckets from 5 ms to 10 min.
const LATENCY: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];
const PER_TOKEN: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28,
];

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok::<_, prometheus::Error>(c)
        };
        let histogram = |name: &str, help: &str, buckets: &[f64]| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                &["model"],
            )?;
            registry.register(Box::new(h.clone()))?;
            Ok::<_, prometheus::Error>(h)
        };
        let worker_gauge = |name: &str, help: &str| {
            let g = GaugeVec::new(Opts::new(name, help), &["model", "worker"])?;
            registry.register(Box::new(g.clone()))?;
            Ok::<_, prometheus::Error>(g)
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok::<_, prometheus::Error>(g)
        };
        let tm = &["tenant", "model"];
        Ok(Metrics {
            requests: counter(
                "tidelock_router_requests_total",
                "Requests answered, by tenant, model, endpoint and HTTP status.",
                &["tenant", "model", "endpoint", "status"],
            )?,
            ttft: histogram(
                "tidelock_router_time_to_first_token_seconds",
                "Time from a request's arrival to its first token.",
                LATENCY,
            )?,
            time_per_output_token: histogram(
                "tidelock_router_time_per_output_token_seconds",
                "Time per generated token after the first, per request.",
                PER_TOKEN,
            )?,
            duration: histogram(
                "tidelock_router_request_duration_seconds",
                "Time from a request's arrival to its last byte.",
                LATENCY,
            )?,
            prompt_tokens: counter(
                "tidelock_router_prompt_tokens_total",
                "Prompt tokens of answered requests.",
                tm,
            )?,
            cached_tokens: counter(
                "tidelock_router_cached_tokens_total",
                "Prompt tokens served from a worker's KV cache.",
                tm,
            )?,
            completion_tokens: counter(
                "tidelock_router_completion_tokens_total",
                "Tokens generated.",
                tm,
            )?,
            decisions: counter(
                "tidelock_router_routing_decisions_total",
                "Placement decisions, by policy and reason.",
                &["policy", "reason"],
            )?,
            limited: counter(
                "tidelock_router_rate_limited_total",
                "Requests refused by a tenant limit, by tenant and limit.",
                &["tenant", "limit"],
            )?,
            retries: counter(
                "tidelock_router_retries_total",
                "Workers that failed a request before its first token (it went to the next).",
                &["model"],
            )?,
            continued_tokens: counter(
                "tidelock_router_continued_tokens_total",
                "Prompt tokens taken from the turn memory (a session's previous prompt and answer, as the worker cached them) instead of tokenized again.",
                &["model"],
            )?,
            in_flight: gauge(
                "tidelock_router_in_flight_requests",
                "Requests being served now.",
            )?,
            queued: gauge(
                "tidelock_router_queued_requests",
                "Requests waiting for a slot.",
            )?,
            connections: {
                let c = tidelock_service::serve::ConnectionMetrics::new("tidelock_router")?;
                registry.register(Box::new(c.open.clone()))?;
                registry.register(Box::new(c.refused.clone()))?;
                c
            },
            worker_in_flight: worker_gauge(
                "tidelock_router_worker_in_flight_requests",
                "Requests this router has in flight on each worker.",
            )?,
            worker_healthy: worker_gauge(
                "tidelock_router_worker_healthy",
                "1 when a worker takes requests, 0 while it is ejected.",
            )?,
            worker_queue: worker_gauge(
                "tidelock_router_worker_waiting_requests",
                "Requests waiting on each worker, from its last load report.",
            )?,
            worker_prefill_speed: worker_gauge(
                "tidelock_router_worker_prefill_tokens_per_second",
                "Each worker's measured prefill speed, from its last load report.",
            )?,
            registry,
        })
    }

    /// Adds a metric kept elsewhere (the session pins' own) to the exposition.
    pub fn register<C: prometheus::core::Collector + 'static>(
        &self,
        collector: C,
    ) -> Result<(), prometheus::Error> {
        self.registry.register(Box::new(collector))
    }

    /// The text exposition, with per-worker gauges read from `models` now.
    pub fn render(&self, models: &Models) -> String {
        for g in [
            &self.worker_in_flight,
            &self.worker_healthy,
            &self.worker_queue,
            &self.worker_prefill_speed,
        ] {
            g.reset();
        }
        for (name, model) in models.all().iter() {
            for (id, w) in model.workers().iter() {
                let labels = [name.as_str(), id.as_str()];
                let load = w.load();
                self.worker_in_flight
                    .with_label_values(&labels)
                    .set(f64::from(
                        w.in_flight.load(std::sync::atomic::Ordering::Relaxed),
                    ));
                self.worker_healthy
                    .with_label_values(&labels)
                    .set(if w.healthy() { 1.0 } else { 0.0 });
                self.worker_queue
                    .with_label_values(&labels)
                    .set(f64::from(load.waiting));
                self.worker_prefill_speed
                    .with_label_values(&labels)
                    .set(load.prefill_tokens_per_second);
            }
        }
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

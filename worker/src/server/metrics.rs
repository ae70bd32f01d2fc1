//! The worker's Prometheus metrics: one registry, created here, names as constants, labels
//! bounded (outcome only).

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::engine::{EngineLoad, StepStats};

/// Every metric the worker exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub running: IntGauge,
    pub waiting: IntGauge,
    pub blocks_used: IntGauge,
    pub blocks_cached: IntGauge,
    pub blocks_total: IntGauge,
    pub prompt_tokens: IntCounter,
    pub cached_prompt_tokens: IntCounter,
    pub prefill_tokens: IntCounter,
    pub decode_tokens: IntCounter,
    pub preemptions: IntCounter,
    pub step_failures: IntCounter,
    pub kv_lost: IntCounter,
    /// Measured prefill speed (moving average over steps that prefilled), reported in `/v1/load`.
    pub prefill_rate: prometheus::Gauge,
    pub requests: IntCounterVec,
    pub ttft: Histogram,
    pub inter_token: Histogram,
    /// The lower KV tiers (issue #21), by `tier` (`host`, `disk`).
    pub tier_blocks: IntGaugeVec,
    pub tier_bytes: IntGaugeVec,
    pub tier_stored: IntCounterVec,
    pub tier_loaded: IntCounterVec,
    pub tier_load_seconds: GaugeVec,
    /// By `reason`: `evicted` (the disk tier full), `damaged`, `io_error`, `dropped` (the disk
    /// behind on writes).
    pub tier_lost: IntCounterVec,
    /// Blocks moved at a drain (issue #21, point 4), by `direction`: `handed_over` (this
    /// worker's, kept by a peer), `adopted` (a draining peer's, kept here).
    pub handoff_blocks: IntCounterVec,
    /// Held while the counters above catch up with the engine's totals, so two scrapes at once
    /// do not both add the same difference.
    catching_up: std::sync::Mutex<()>,
}

impl Metrics {
    /// Steps that prefilled fewer tokens say more about decode than prefill speed.
    pub const RATE_MIN_TOKENS: usize = 32;

    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?;
            registry.register(Box::new(h.clone()))?;
            Ok::<_, prometheus::Error>(h)
        };
        let requests = IntCounterVec::new(
            Opts::new(
                "tidelock_worker_requests_total",
                "Generate requests by outcome.",
            ),
            &["outcome"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        let by =
            |labels: &[&str], name: &str, help: &str| -> Result<IntCounterVec, prometheus::Error> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let gauges = |name: &str, help: &str| -> Result<IntGaugeVec, prometheus::Error> {
            let g = IntGaugeVec::new(Opts::new(name, help), &["tier"])?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let tier_load_seconds = GaugeVec::new(
            Opts::new(
                "tidelock_worker_kv_tier_load_seconds_per_block",
                "Measured seconds to bring one KV block back from a lower tier (moving average), as reported to routers.",
            ),
            &["tier"],
        )?;
        registry.register(Box::new(tier_load_seconds.clone()))?;
        Ok(Metrics {
            tier_blocks: gauges(
                "tidelock_worker_kv_tier_blocks",
                "KV blocks held on a lower tier.",
            )?,
            tier_bytes: gauges(
                "tidelock_worker_kv_tier_bytes",
                "Bytes of KV blocks held on a lower tier.",
            )?,
            tier_stored: by(
                &["tier"],
                "tidelock_worker_kv_tier_stored_blocks_total",
                "KV blocks evicted from memory and kept on a lower tier.",
            )?,
            tier_loaded: by(
                &["tier"],
                "tidelock_worker_kv_tier_loaded_blocks_total",
                "KV blocks brought back from a lower tier instead of recomputed.",
            )?,
            tier_load_seconds,
            tier_lost: by(
                &["reason"],
                "tidelock_worker_kv_tier_lost_blocks_total",
                "KV blocks a lower tier lost: evicted (the disk tier full), damaged (failed its checksum on load), io_error, dropped (the disk behind on writes).",
            )?,
            handoff_blocks: by(
                &["direction"],
                "tidelock_worker_kv_handoff_blocks_total",
                "KV blocks moved when a worker drains: handed_over (this worker's, kept by a peer), adopted (a draining peer's, kept here).",
            )?,
            running: gauge(
                "tidelock_worker_running_sequences",
                "Sequences in the running batch.",
            )?,
            waiting: gauge(
                "tidelock_worker_waiting_sequences",
                "Sequences waiting for admission.",
            )?,
            blocks_used: gauge(
                "tidelock_worker_kv_blocks_used",
                "KV blocks referenced by sequences.",
            )?,
            blocks_cached: gauge(
                "tidelock_worker_kv_blocks_cached",
                "Unreferenced KV blocks kept in the prefix cache.",
            )?,
            blocks_total: gauge(
                "tidelock_worker_kv_blocks_capacity",
                "KV blocks in the pool (used or free).",
            )?,
            prompt_tokens: counter(
                "tidelock_worker_prompt_tokens_total",
                "Prompt tokens received.",
            )?,
            cached_prompt_tokens: counter(
                "tidelock_worker_prefix_hit_tokens_total",
                "Prompt tokens served from the prefix cache.",
            )?,
            catching_up: std::sync::Mutex::new(()),
            prefill_tokens: counter("tidelock_worker_prefill_tokens_total", "Tokens prefilled.")?,
            decode_tokens: counter("tidelock_worker_decode_tokens_total", "Tokens decoded.")?,
            preemptions: counter("tidelock_worker_preemptions_total", "Sequences preempted.")?,
            step_failures: counter(
                "tidelock_worker_step_failures_total",
                "Engine steps that failed, failing the requests they ran (a shard of the group down, a broken installation).",
            )?,
            kv_lost: counter(
                "tidelock_worker_kv_lost_total",
                "Times a shard of the group restarted: its KV blocks were lost, the prefix cache cleared and the running sequences recomputed.",
            )?,
            prefill_rate: {
                let g = prometheus::Gauge::new(
                    "tidelock_worker_prefill_tokens_per_second",
                    "Measured prefill speed: a moving average over engine steps that prefilled.",
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            requests,
            ttft: histogram(
                "tidelock_worker_time_to_first_token_seconds",
                "Time from request arrival to its first token.",
                prometheus::exponential_buckets(0.005, 2.0, 14)?,
            )?,
            inter_token: histogram(
                "tidelock_worker_time_per_output_token_seconds",
                "Time between consecutive output tokens of a request.",
                prometheus::exponential_buckets(0.001, 2.0, 14)?,
            )?,
            registry,
        })
    }

    /// Counts a step's tokens; a step that prefilled at least [`Self::RATE_MIN_TOKENS`] tokens
    /// in `elapsed` also updates the prefill speed (exponential moving average, weight 0.2).
    pub fn record_step(&self, stats: &StepStats, elapsed: std::time::Duration) {
        if stats.prefill_tokens >= Self::RATE_MIN_TOKENS && !elapsed.is_zero() {
            let rate = stats.prefill_tokens as f64 / elapsed.as_secs_f64();
            let old = self.prefill_rate.get();
            self.prefill_rate.set(if old > 0.0 {
                0.8 * old + 0.2 * rate
            } else {
                rate
            });
        }
        self.prefill_tokens.inc_by(stats.prefill_tokens as u64);
        self.decode_tokens.inc_by(stats.decode_tokens as u64);
        self.preemptions.inc_by(stats.preempted as u64);
        if stats.kv_lost {
            self.kv_lost.inc();
        }
    }

    pub fn record_load(&self, load: &EngineLoad) {
        self.running.set(load.running as i64);
        self.waiting.set(load.waiting as i64);
        self.blocks_used.set(load.blocks.in_use as i64);
        self.blocks_cached.set(load.blocks.cached as i64);
        self.blocks_total.set(load.blocks.total as i64);
        let t = &load.tiers;
        let _one = self.catching_up.lock().unwrap_or_else(|e| e.into_inner());
        for (tier, blocks, bytes, stored, loaded, secs) in [
            (
                "host",
                t.host_blocks,
                t.host_bytes,
                t.stored_host,
                t.loaded_host,
                t.host_block_secs,
            ),
            (
                "disk",
                t.disk_blocks,
                t.disk_bytes,
                t.stored_disk,
                t.loaded_disk,
                t.disk_block_secs,
            ),
        ] {
            self.tier_blocks
                .with_label_values(&[tier])
                .set(blocks as i64);
            self.tier_bytes.with_label_values(&[tier]).set(bytes as i64);
            catch_up(&self.tier_stored.with_label_values(&[tier]), stored);
            catch_up(&self.tier_loaded.with_label_values(&[tier]), loaded);
            self.tier_load_seconds.with_label_values(&[tier]).set(secs);
        }
        for (reason, total) in [
            ("evicted", t.evicted_disk),
            ("damaged", t.damaged),
            ("io_error", t.io_errors),
            ("dropped", t.dropped),
        ] {
            catch_up(&self.tier_lost.with_label_values(&[reason]), total);
        }
    }

    /// The registry, for collectors kept elsewhere (the cluster credential's refusals).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Raises a counter to a running total kept elsewhere (the engine's, published with its load).
fn catch_up(counter: &IntCounter, total: u64) {
    let now = counter.get();
    if total > now {
        counter.inc_by(total - now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::proto::MetricType;

    /// The naming rules `promtool check metrics` enforces, checked here because promtool is not
    /// installed where the tests run: counters end in `_total`, nothing else does, units are
    /// base units (`_seconds`, not `_ms`), and every metric has help text.
    #[test]
    fn names_follow_the_prometheus_conventions() {
        let metrics = Metrics::new().expect("register");
        let families = metrics.registry.gather();
        assert!(families.len() >= 10, "only {} families", families.len());
        for family in families {
            let name = family.name();
            assert!(name.starts_with("tidelock_worker_"), "{name}: namespace");
            assert!(!family.help().is_empty(), "{name}: no help text");
            let is_counter = family.get_field_type() == MetricType::COUNTER;
            assert_eq!(
                name.ends_with("_total"),
                is_counter,
                "{name}: `_total` is for counters only, and every counter has it"
            );
            for word in name.split('_') {
                assert!(
                    ![
                        "ms",
                        "milliseconds",
                        "us",
                        "microseconds",
                        "minutes",
                        "kb",
                        "mb"
                    ]
                    .contains(&word),
                    "{name}: use base units (seconds, bytes)"
                );
            }
        }
    }
}

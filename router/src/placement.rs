//! Where one request goes, from its prompt's block chain to the session pin written where it
//! landed: the one home of placement (issue #22). The HTTP layer asks [`Placer::place`] and
//! tells the answer where the request started ([`Placement::landed`]); it never looks at which
//! policy runs.
//!
//! The steps, in order:
//! 1. the candidates: the model's healthy workers, each with the leading blocks of the prompt's
//!    chain it holds (one walk of the KV index serves them all) and those that requests this
//!    router sent it are computing now (promised: a request queued behind them finds them
//!    there); skipped by policies that do not weigh the cache ([`Policy::reads_index`]);
//! 2. the session's pin, for the policies that keep pins ([`Policy::uses_pins`]);
//! 3. the decision ([`policy::decide`], pure): the order to try workers, the reason, whether the
//!    first should pull the prefix from its holder;
//! 4. after the proxy started the request somewhere (the first choice, or the next after a
//!    failure): the pin, written when the session was placed, moved, or landed elsewhere than
//!    its pin by a retry. Nothing is written inside the decision, so a decision that fails to
//!    start leaves no trace.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tidelock_protocol::{BlockHash, HashChain, PullHint, SessionKey, TenantId, WorkerId};

use crate::index::TierCounts;
use crate::metrics::Metrics;
use crate::policy::{self, Candidate, CostModel, Policy, PullWhen, Reason};
use crate::sessions::Pins;
use crate::workers::{Model, WorkerState};

/// Places requests by one policy and cost model, and keeps sessions' pins.
#[derive(Debug)]
pub struct Placer {
    pub policy: Policy,
    pub cost: CostModel,
    pins: Arc<Pins>,
    /// The round-robin counter (also breaks ties in the other policies).
    turn: AtomicU64,
    /// The prefill work placed lately ([`policy::backlog`]).
    work: Mutex<WorkRate>,
}

/// Tokens per second, averaged exponentially over [`WorkRate::HORIZON`].
#[derive(Debug)]
struct WorkRate {
    /// Tokens placed, each weighted by `exp(-age / HORIZON)`, as of `at`.
    tokens: f64,
    at: Instant,
}

impl WorkRate {
    /// Longer than a burst, shorter than a change of load worth following.
    const HORIZON: Duration = Duration::from_secs(10);

    fn new(now: Instant) -> Self {
        WorkRate {
            tokens: 0.0,
            at: now,
        }
    }

    fn decay(&mut self, now: Instant) {
        let age = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens *= (-age / Self::HORIZON.as_secs_f64()).exp();
        self.at = now;
    }

    fn add(&mut self, tokens: u64, now: Instant) {
        self.decay(now);
        self.tokens += tokens as f64;
    }

    fn per_second(&mut self, now: Instant) -> f64 {
        self.decay(now);
        self.tokens / Self::HORIZON.as_secs_f64()
    }
}

/// What is being placed.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    pub model: &'a Arc<Model>,
    pub tenant: &'a TenantId,
    pub session: Option<&'a SessionKey>,
    /// The prompt's block hashes under the tenant's salt.
    pub chain: &'a HashChain,
    pub prompt_tokens: usize,
}

/// One worker to try: the prefill it would do and the prompt blocks it holds (what the proxy
/// counts as pending on it, and how it tells a draining worker's refusal apart).
pub type Target = (Arc<WorkerState>, u64, usize);

/// A decision, ready for the proxy.
#[derive(Debug)]
pub struct Placement {
    /// The workers in the order to try them.
    pub order: Vec<Target>,
    pub reason: Reason,
    /// Where the first worker pulls the prompt's prefix from, if anywhere.
    pub pull: Option<PullHint>,
    /// Whether a worker that refuses while draining may be asked for its blocks by the next.
    pub may_pull: bool,
    /// The prompt's blocks, promised on each worker while it computes them
    /// ([`WorkerState::promise`]); empty for policies that do not read the index.
    pub blocks: Arc<[BlockHash]>,
    /// The pin to keep after the request lands: `None` when the policy keeps none or the
    /// request has no session.
    pin: Option<PinUpdate>,
}

#[derive(Debug)]
struct PinUpdate {
    pins: Arc<Pins>,
    model: tidelock_protocol::ModelName,
    tenant: TenantId,
    session: SessionKey,
    /// The worker the session was pinned to before this request.
    was: Option<WorkerId>,
}

/// No healthy worker serves the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoWorker;

impl Placer {
    pub fn new(policy: Policy, cost: CostModel, pins: Arc<Pins>) -> Self {
        Placer {
            policy,
            cost,
            pins,
            turn: AtomicU64::new(0),
            work: Mutex::new(WorkRate::new(Instant::now())),
        }
    }

    /// Decides where `ask` goes, counting the decision in `metrics`.
    #[tracing::instrument(
        name = "placement",
        level = "debug",
        skip_all,
        fields(policy = self.policy.as_str(), reason, first)
    )]
    pub async fn place(&self, ask: &Ask<'_>, metrics: &Metrics) -> Result<Placement, NoWorker> {
        let model = ask.model;
        let block_tokens = model.block_tokens.as_usize();
        let _index = tracing::debug_span!("index_lookup").entered();
        // Sorted by worker id, as the workers are: looked up by binary search (a few string
        // comparisons) rather than hashed per worker.
        let mut held: Vec<(WorkerId, TierCounts)> = if self.policy.reads_index() {
            model
                .index
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .matches(ask.chain.hashes())
                .into_iter()
                .map(|m| (m.worker, m.tiers))
                .collect()
        } else {
            Vec::new()
        };
        held.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let workers = model.workers();
        // The healthy workers and their candidates, both in worker id order (the map's).
        let healthy: Vec<&Arc<WorkerState>> = workers.values().filter(|w| w.healthy()).collect();
        let candidates: Vec<Candidate> = healthy
            .iter()
            .map(|w| {
                let promised = match self.policy.reads_index() {
                    true => w.promised_prefix(ask.chain.hashes()),
                    false => 0,
                };
                let cached = held
                    .binary_search_by(|(id, _)| id.cmp(&w.id))
                    .map_or(TierCounts::default(), |i| held[i].1);
                w.candidate(cached, promised)
            })
            .collect();
        drop(_index);
        let pinned = match ask.session {
            Some(s) if self.policy.uses_pins() => self.pins.get(&model.name, ask.tenant, s).await,
            _ => None,
        };
        // Without a session key, the prompt's first block stands for the session.
        let stand_in = match ask.session {
            None if self.policy.hashes_sessions() => ask.chain.hashes().first().map(|h| h.to_hex()),
            _ => None,
        };
        let key = ask.session.map(SessionKey::as_str).or(stand_in.as_deref());
        let decision = policy::decide(
            self.policy,
            &self.cost,
            &policy::Request {
                prompt_tokens: ask.prompt_tokens,
                block_tokens,
                work_rate: self.work().per_second(Instant::now()),
                session: key,
                pinned: pinned.as_ref(),
            },
            &candidates,
            self.turn.fetch_add(1, Ordering::Relaxed),
        )
        .ok_or(NoWorker)?;
        let policy = self.policy.as_str();
        let span = tracing::Span::current();
        span.record("reason", decision.reason.as_str());
        if let Some(first) = decision.order.first() {
            span.record("first", first.as_str());
        }
        metrics
            .decisions
            .with_label_values(&[policy, decision.reason.as_str()])
            .inc();
        // The prefix is pulled from the worker holding it rather than recomputed (issue #21).
        let pull = decision.pull.as_ref().and_then(|(holder, blocks)| {
            Some(PullHint {
                from: workers.get(holder)?.registration.address.clone(),
                blocks: u32::try_from(*blocks).ok()?,
            })
        });
        if pull.is_some() {
            metrics.decisions.with_label_values(&[policy, "pull"]).inc();
        }
        // Blocks held and blocks promised both spare the worker their prefill.
        let order: Vec<Target> = decision
            .order
            .iter()
            .filter_map(|id| {
                let i = candidates.binary_search_by(|c| c.worker.cmp(id)).ok()?;
                let c = &candidates[i];
                let cached = c.cached.total();
                let spared = cached.max(c.promised);
                let uncached = ask.prompt_tokens.saturating_sub(spared * block_tokens);
                Some((healthy[i].clone(), uncached as u64, cached))
            })
            .collect();
        if let Some((_, prefill, _)) = order.first() {
            self.work().add(*prefill, Instant::now());
        }
        let pin = match ask.session {
            Some(session) if self.policy.uses_pins() => Some(PinUpdate {
                pins: self.pins.clone(),
                model: model.name.clone(),
                tenant: ask.tenant.clone(),
                session: session.clone(),
                was: pinned,
            }),
            _ => None,
        };
        let blocks = match self.policy.reads_index() {
            true => Arc::from(ask.chain.hashes()),
            false => Arc::from([]),
        };
        Ok(Placement {
            order,
            blocks,
            reason: decision.reason,
            pull,
            may_pull: self.cost.pull != PullWhen::Never,
            pin,
        })
    }
}

impl Placer {
    fn work(&self) -> std::sync::MutexGuard<'_, WorkRate> {
        self.work.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Placement {
    /// The worker the session should be pinned to now that the request started on `worker`:
    /// `Some` when the policy keeps pins and the session was placed, moved, or landed away from
    /// its pin (a retry after a failure); `None` when the pin stands (or there is none to keep).
    pub fn pin_to<'w>(&self, worker: &'w WorkerState) -> Option<&'w WorkerId> {
        let pin = self.pin.as_ref()?;
        (pin.was.as_ref() != Some(&worker.id)).then_some(&worker.id)
    }

    /// The request started on `worker`: writes the session's pin there when [`Self::pin_to`]
    /// says so, in the background (a store that is slow or down never delays the answer; this
    /// router keeps the pin in its cache either way).
    pub fn landed(self, worker: &WorkerState) {
        let Some(id) = self.pin_to(worker).cloned() else {
            return;
        };
        let Some(pin) = self.pin else { return };
        let group = worker.registration.group.clone();
        tokio::spawn(async move {
            if let Err(e) = pin
                .pins
                .set(&pin.model, &pin.tenant, &pin.session, group, id)
                .await
            {
                tracing::warn!(error = %e, "session pin not written to the store; this router keeps it, other replicas place the session afresh");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tidelock_protocol::{KeyLayout, ModelName};
    use tidelock_state::MemoryStore;

    use super::*;

    fn placement(session: Option<&str>, was: Option<&str>) -> Placement {
        let pins = Arc::new(Pins::new(
            Arc::new(MemoryStore::new()),
            KeyLayout::default(),
            Duration::from_secs(60),
        ));
        Placement {
            order: Vec::new(),
            reason: Reason::Placed,
            pull: None,
            may_pull: false,
            blocks: Arc::from([]),
            pin: session.map(|s| PinUpdate {
                pins,
                model: ModelName::new("m").unwrap(),
                tenant: TenantId::new("t").unwrap(),
                session: SessionKey::new(s).unwrap(),
                was: was.map(|w| WorkerId::new(w).unwrap()),
            }),
        }
    }

    /// One rule for when a pin is written: the session was placed (no pin), moved, or a retry
    /// landed it away from its pin; never when it ran where it was pinned, or without a
    /// session or a policy that keeps pins.
    #[test]
    fn a_pin_is_written_only_where_the_session_landed_anew() {
        let (a, b) = (WorkerState::for_test("a"), WorkerState::for_test("b"));
        assert_eq!(placement(Some("s"), None).pin_to(&a), Some(&a.id));
        assert_eq!(placement(Some("s"), Some("a")).pin_to(&a), None);
        assert_eq!(placement(Some("s"), Some("a")).pin_to(&b), Some(&b.id));
        assert_eq!(placement(None, None).pin_to(&a), None);
    }

    /// The rate is the tokens placed over the horizon, fading with their age.
    #[test]
    fn work_rate_fades_with_age() {
        let t0 = Instant::now();
        let mut rate = WorkRate::new(t0);
        rate.add(100_000, t0);
        assert!((rate.per_second(t0) - 10_000.0).abs() < 1e-6);
        let later = t0 + WorkRate::HORIZON;
        assert!((rate.per_second(later) - 10_000.0 / std::f64::consts::E).abs() < 1e-6);
        rate.add(50_000, later);
        assert!((rate.per_second(later) - (10_000.0 / std::f64::consts::E + 5_000.0)).abs() < 1e-6);
    }
}

//! Where a request goes: pure placement decisions, no I/O, no clock.
//!
//! Every policy sees the same [`Candidate`]s (a healthy worker, its last load report, the
//! router's own in-flight count, and how much of the prompt's block chain it holds, by tier)
//! and returns the workers in the order to try them, with the reason for the first choice. The
//! proxy tries the next one when a worker fails before the first token.
//!
//! The default, [`Policy::Ttft`], predicts each worker's time to first token:
//!
//! ```text
//! ttft(w) = max(queue_wait(w), transfer(w)) + uncached_tokens(w) / prefill_speed(w)
//! queue_wait(w) = prefill tokens queued on w / prefill_speed(w)
//! transfer(w) = host-tier blocks * host_block_secs(w) + disk-tier blocks * disk_block_secs(w)
//! ```
//!
//! with the prefill speed and the per-block load times of its host and disk tiers that each
//! worker measures and reports in `/v1/load` (until a worker has measured its prefill speed, the
//! median of its peers' measured speeds, else a default; defaults for the tiers). A request's
//! lower-tier blocks load while it waits in the worker's queue, hence the `max`. Blocks that
//! requests sent to the worker are computing count as cached there ([`Candidate::promised`]):
//! a request placed behind them finds them when it runs. Workers are ranked by that prediction
//! plus a charge for the cache a placement gives up:
//!
//! ```text
//! score(w) = ttft(w) + cache_weight * (most cached tokens on any worker - cached tokens(w)) / prefill_speed(w)
//! ```
//!
//! The prediction alone prices a miss at one prefill of the missing tokens; but a request sent
//! away from its prefix also stores a second copy of it, which pushes other prefixes out of the
//! cache, and leaves the first copy to age: later requests of the same family miss too. The
//! charge keeps a prefix family together unless the holder's queue outweighs `1 + cache_weight`
//! times the prefill it saves (see bench/README.md for what it does on the Mooncake trace).
//!
//! Both terms price one request's own wait. Once every worker has a queue, they miss what a
//! placement does to the others: each token it computes is a token the requests queued behind it
//! wait for, wherever it lands.
//! So a placement is also charged its prefill once per request it delays, the cluster's
//! `backlog` ([`backlog`]: the shortest queue now, or the mean queue of the recent load):
//!
//! ```text
//! rank(w) = score(w) + backlog * uncached_tokens(w) / prefill_speed(w)
//! ```
//!
//! Without it, an overloaded cluster collapses: queues differ by more than the prefill a cached
//! placement saves, requests leave their prefixes, the recomputation lengthens every queue, and
//! more requests leave theirs (bench/README.md, "Overload"). With it, the busier the cluster, the
//! more a placement must save in queueing to be worth the work it adds; when it is idle, nothing
//! changes. A session keeps its pinned worker unless that worker's score exceeds the best one's
//! by more than the pin margin (`best * (1 + margin_ratio) + margin_secs`): moving a session costs its
//! cache, and the prediction is only a prediction.

use std::time::Duration;

use tidelock_protocol::{LoadReport, WorkerId};

use crate::index::TierCounts;

/// A placement policy, selectable per router so benchmarks compare them in one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum Policy {
    /// Lowest predicted TTFT, keeping a session's pinned worker within a margin (default).
    Ttft,
    /// Each healthy worker in turn.
    RoundRobin,
    /// Fewest requests running, queued or in flight from this router.
    LeastLoaded,
    /// Consistent (rendezvous) hashing of the session key, with bounded load.
    SessionHash,
    /// Longest cached prefix; ties to the least loaded.
    PrefixOnly,
}

impl Policy {
    /// Whether it keeps sessions on workers: reads a session's pin before deciding, and has it
    /// written where the request lands ([`crate::placement`]).
    pub fn uses_pins(self) -> bool {
        matches!(self, Policy::Ttft)
    }

    /// Whether it hashes the session key, so that a request without one needs a stand-in (the
    /// prompt's first block: requests sharing it go together).
    pub fn hashes_sessions(self) -> bool {
        matches!(self, Policy::SessionHash)
    }

    /// Whether it weighs what each worker holds of the prompt (the KV index is walked for it).
    pub fn reads_index(self) -> bool {
        matches!(self, Policy::Ttft | Policy::PrefixOnly)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Ttft => "ttft",
            Policy::RoundRobin => "round_robin",
            Policy::LeastLoaded => "least_loaded",
            Policy::SessionHash => "session_hash",
            Policy::PrefixOnly => "prefix_only",
        }
    }
}

/// Why the first worker was chosen; a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The session's pinned worker, within the margin of the best.
    Pinned,
    /// A session without a pin (or a request without a session): the best prediction.
    Placed,
    /// The pinned worker's prediction exceeded the best by more than the margin.
    Moved,
    /// The pinned worker is gone or unhealthy.
    PinLost,
    /// Round robin's turn.
    Turn,
    /// The least loaded worker.
    LeastLoaded,
    /// The session's worker on the hash ring.
    Hashed,
    /// The session's worker on the ring was over its load bound; the next one on the ring.
    HashOverflow,
    /// The worker holding the longest cached prefix.
    PrefixHit,
    /// Nobody holds any of the prefix: the least loaded worker.
    PrefixMiss,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Pinned => "pinned",
            Reason::Placed => "placed",
            Reason::Moved => "moved",
            Reason::PinLost => "pin_lost",
            Reason::Turn => "turn",
            Reason::LeastLoaded => "least_loaded",
            Reason::Hashed => "hashed",
            Reason::HashOverflow => "hash_overflow",
            Reason::PrefixHit => "prefix_hit",
            Reason::PrefixMiss => "prefix_miss",
        }
    }
}

/// One healthy worker as a policy sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub worker: WorkerId,
    /// Its last load report.
    pub load: LoadReport,
    /// Requests this router has sent it that have not finished.
    pub in_flight: u32,
    /// Prompt tokens this router has sent it whose prefill has not finished (fresher than the
    /// load report, which may predate them).
    pub pending_prefill: u64,
    /// Requests this router has sent it that have no first token yet.
    pub pending_requests: u32,
    /// Leading blocks of the prompt's chain it holds, by tier.
    pub cached: TierCounts,
    /// Leading blocks of the prompt's chain that requests this router sent it are computing:
    /// there by the time a request placed now runs, as if cached on the device.
    pub promised: usize,
}

impl Candidate {
    /// Requests on the worker: the larger of its report and this router's own count.
    fn load(&self) -> u64 {
        u64::from(self.load.running + self.load.waiting).max(u64::from(self.in_flight))
    }

    /// Leading blocks of the prompt it holds, or will hold by the time the request runs.
    fn cached_blocks(&self) -> usize {
        self.cached.total().max(self.promised)
    }

    /// Requests on the worker waiting for their prefill: the larger of its report's queue and
    /// this router's own requests without a first token.
    fn queued_requests(&self) -> u32 {
        self.load.waiting.max(self.pending_requests)
    }
}

/// Requests that new prefill work delays, wherever it is placed, the larger of two measures:
///
/// - now: the shortest queue among the workers taking requests. While a worker is idle, work
///   placed elsewhere delays nobody but its own request (the next ones go to the idle worker);
///   once every worker has a queue, every token computed is a token the requests queued behind
///   it wait for;
/// - on average: `u / (1 - u)`, the mean number of requests in a queue kept busy a fraction `u`
///   of the time (M/M/1), where `u` is the prefill work this router placed lately
///   (`work_rate`, tokens per second) over the workers' measured speeds together. Arrivals in
///   bursts leave a worker idle between them although the cluster as a whole has no time to
///   spare: work added in a quiet moment is still work the next burst waits for.
pub fn backlog(candidates: &[Candidate], model: &CostModel, work_rate: f64) -> f64 {
    let taking = || candidates.iter().filter(|c| !c.load.draining);
    let now = taking().map(Candidate::queued_requests).min().unwrap_or(0);
    let capacity: f64 = taking().map(|c| model.speed(c)).sum();
    let busy = match capacity > 0.0 && work_rate.is_finite() {
        true => (work_rate / capacity).clamp(0.0, MAX_UTILIZATION),
        false => 0.0,
    };
    f64::from(now).max(busy / (1.0 - busy))
}

/// The utilization [`backlog`] counts at most (99 requests behind each: work placed at or past
/// capacity delays requests for as long as the overload lasts, which nothing here measures).
pub const MAX_UTILIZATION: f64 = 0.99;

/// The TTFT model's parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CostModel {
    /// Prefill tokens per second assumed for a worker that has not reported a measurement.
    pub default_prefill_tps: f64,
    /// Seconds to bring one block from the host tier to the device.
    pub host_block_secs: f64,
    /// Seconds to bring one block from the disk tier to the device.
    pub disk_block_secs: f64,
    /// Seconds to pull one block from another worker (until the target measures its own).
    pub peer_block_secs: f64,
    /// A pinned worker is kept while its prediction is at most `best * (1 + margin_ratio) +
    /// margin_secs`.
    pub margin_ratio: f64,
    pub margin_secs: f64,
    /// How much more than its own prefill a placement away from the longest cached prefix is
    /// charged, per missing token (see the module docs).
    pub cache_weight: f64,
    /// When a placement away from the prefix pulls it from its holder.
    pub pull: PullWhen,
}

/// When the `ttft` policy has a worker pull a prompt's cached prefix from its holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PullWhen {
    /// Never: a prefix elsewhere is recomputed.
    Never,
    /// From a draining holder only (its sessions move with their cache).
    Drain,
    /// Also from a holder that is merely loaded, when predicted cheaper than recomputing.
    Load,
}

impl Default for CostModel {
    fn default() -> Self {
        CostModel {
            default_prefill_tps: 2_000.0,
            host_block_secs: 0.000_5,
            disk_block_secs: 0.005,
            peer_block_secs: 0.005,
            margin_ratio: 0.5,
            margin_secs: 0.05,
            cache_weight: 3.0,
            pull: PullWhen::Drain,
        }
    }
}

impl CostModel {
    /// This model with the speed assumed for a worker that has not measured its own set to the
    /// median of the measured speeds among `candidates` (when any has measured). A worker
    /// prefills nothing before its first placement, and the configured default is usually far
    /// from a real worker's speed: measured against it, a fresh worker (or one just restarted)
    /// would look many times slower or faster than its peers, and either never be chosen (and
    /// never measure) or take everything.
    pub fn calibrated(&self, candidates: &[Candidate]) -> CostModel {
        let measured = |c: &Candidate| {
            let s = c.load.prefill_tokens_per_second;
            s.is_finite() && s > 0.0
        };
        // The usual case, on every request: every worker has measured; nothing to assume.
        if candidates.iter().all(measured) {
            return *self;
        }
        let mut measured: Vec<f64> = candidates
            .iter()
            .map(|c| c.load.prefill_tokens_per_second)
            .filter(|s| s.is_finite() && *s > 0.0)
            .collect();
        if measured.is_empty() {
            return *self;
        }
        measured.sort_by(f64::total_cmp);
        CostModel {
            default_prefill_tps: measured[measured.len() / 2],
            ..*self
        }
    }

    /// The prefill speed `c` reported, else the default.
    fn speed(&self, c: &Candidate) -> f64 {
        if c.load.prefill_tokens_per_second > 0.0 {
            c.load.prefill_tokens_per_second
        } else {
            self.default_prefill_tps
        }
    }

    /// The rank of `c` for a prompt whose longest cached prefix on any worker is
    /// `most_cached_blocks`: its predicted TTFT, the lower of computing what it lacks and
    /// pulling it from the worker that holds it, plus the charge for the cache it gives up
    /// (charged either way: a pulled prefix is a second copy too, pushing other prefixes out,
    /// so pulls do not make placement leave a holder more readily, they make leaving it
    /// cheaper when the holder's queue or drain makes it worth it). Whether it pulls; never
    /// without `may_pull`.
    ///
    /// With a `backlog` ([`backlog`]: requests the placement's prefill delays), that prefill is
    /// charged once more per request delayed (module docs).
    pub fn rank(
        &self,
        c: &Candidate,
        prompt: &Prompt,
        most_cached_blocks: usize,
        may_pull: bool,
    ) -> (f64, bool) {
        let speed = self.speed(c);
        let delay = prompt.backlog / speed;
        let own_work = uncached(prompt, c.cached_blocks());
        let own = self
            .ttft(c, prompt.tokens, prompt.block_tokens)
            .as_secs_f64()
            + delay * own_work;
        let charge = self.charge(c, prompt.tokens, prompt.block_tokens, most_cached_blocks);
        let pulled = most_cached_blocks.saturating_sub(c.cached_blocks());
        if pulled == 0 || !may_pull {
            return (own + charge, false);
        }
        let work = uncached(prompt, most_cached_blocks);
        let transfer = self.transfer(c)
            + pulled as f64 * measured(c.load.peer_block_secs, self.peer_block_secs);
        let pull = (self.queued(c) / speed).max(transfer) + work / speed + delay * work;
        match pull < own {
            true => (pull + charge, true),
            false => (own + charge, false),
        }
    }

    /// The charge for the cached prefix a placement on `c` gives up (module docs).
    fn charge(
        &self,
        c: &Candidate,
        prompt_tokens: usize,
        block_tokens: usize,
        most_cached_blocks: usize,
    ) -> f64 {
        let forgone = most_cached_blocks.saturating_sub(c.cached_blocks()) * block_tokens;
        let forgone = forgone.min(prompt_tokens) as f64;
        self.cache_weight * forgone / self.speed(c)
    }

    /// Predicted time to first token of a `prompt_tokens`-token prompt on `c`.
    pub fn ttft(&self, c: &Candidate, prompt_tokens: usize, block_tokens: usize) -> Duration {
        let speed = self.speed(c);
        let work = uncached(
            &Prompt {
                tokens: prompt_tokens,
                block_tokens,
                backlog: 0.0,
            },
            c.cached_blocks(),
        );
        // Lower-tier blocks load while the request waits in the worker's queue.
        Duration::from_secs_f64((self.queued(c) / speed).max(self.transfer(c)) + work / speed)
    }

    /// Prefill tokens ahead of a new request on `c`.
    fn queued(&self, c: &Candidate) -> f64 {
        c.load.prefill_tokens_waiting.max(c.pending_prefill) as f64
    }

    /// Seconds to bring `c`'s lower-tier blocks of the prompt up.
    fn transfer(&self, c: &Candidate) -> f64 {
        c.cached.host as f64 * measured(c.load.host_block_secs, self.host_block_secs)
            + c.cached.disk as f64 * measured(c.load.disk_block_secs, self.disk_block_secs)
    }
}

/// A prompt as the cost model sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prompt {
    pub tokens: usize,
    pub block_tokens: usize,
    /// Requests that the prefill of a placement delays ([`backlog`]).
    pub backlog: f64,
}

/// Tokens of `prompt` to compute on a worker holding its first `cached_blocks` blocks. The last
/// token is always computed (its logits start decoding), cached or not.
fn uncached(prompt: &Prompt, cached_blocks: usize) -> f64 {
    prompt
        .tokens
        .saturating_sub(cached_blocks * prompt.block_tokens)
        .max(1) as f64
}

/// A worker's measured figure, or the default until it has measured one.
fn measured(reported: f64, default: f64) -> f64 {
    match reported.is_finite() && reported > 0.0 {
        true => reported,
        false => default,
    }
}

/// What a policy is asked.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub prompt_tokens: usize,
    pub block_tokens: usize,
    /// Prefill tokens per second this router placed lately ([`backlog`]); 0 when unknown.
    pub work_rate: f64,
    /// The session key (or, without one, the prompt's first block hash), for `session_hash`.
    pub session: Option<&'a str>,
    /// The worker the session is pinned to, if any.
    pub pinned: Option<&'a WorkerId>,
}

/// A placement: workers in the order to try them, and why the first was chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub order: Vec<WorkerId>,
    pub reason: Reason,
    /// The first worker should pull the prompt's cached prefix from this worker, which holds
    /// this many leading blocks (the `ttft` policy, when that beats recomputing).
    pub pull: Option<(WorkerId, usize)>,
}

/// A score, totally ordered by `f64::total_cmp` (a reported speed near zero can make it
/// infinite; it then sorts last, as it should).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Score(f64);

impl Eq for Score {}

impl PartialOrd for Score {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Score {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// Load bound of `session_hash`: a worker takes a session's request while its load is at most
/// `(1 + BOUND_EPSILON) * average + 1`.
pub const BOUND_EPSILON: f64 = 0.25;

/// Decides where a request goes. `candidates` are the healthy workers (any order); `turn` is the
/// router's round-robin counter. `None` when there is no candidate.
pub fn decide(
    policy: Policy,
    model: &CostModel,
    request: &Request<'_>,
    candidates: &[Candidate],
    turn: u64,
) -> Option<Decision> {
    // A draining worker (shutting down) takes nothing new, but its blocks can still be pulled.
    let mut sorted: Vec<&Candidate> = candidates.iter().filter(|c| !c.load.draining).collect();
    if sorted.is_empty() {
        return None;
    }
    // Deterministic base order: by worker id.
    sorted.sort_by(|a, b| a.worker.cmp(&b.worker));
    let by_load = |v: &mut Vec<&Candidate>| v.sort_by_key(|c| c.load());
    let decision = |order: Vec<&Candidate>, reason| Decision {
        order: order.iter().map(|c| c.worker.clone()).collect(),
        reason,
        pull: None,
    };
    Some(match policy {
        Policy::Ttft => {
            let model = &model.calibrated(candidates);
            let most = candidates
                .iter()
                .map(|c| c.cached_blocks())
                .max()
                .unwrap_or(0);
            // The holder a pull would come from: the most blocks, the most of them in memory,
            // draining workers included (their sessions' blocks move to the worker chosen).
            // Blocks only promised cannot be pulled yet.
            let holder = candidates
                .iter()
                .filter(|c| c.cached.total() == most && most > 0)
                .max_by_key(|c| (c.load.draining, c.cached.device));
            let may_pull = match model.pull {
                PullWhen::Never => false,
                PullWhen::Drain => holder.is_some_and(|h| h.load.draining),
                PullWhen::Load => holder.is_some(),
            };
            let holder = holder.map(|c| c.worker.clone());
            let prompt = Prompt {
                tokens: request.prompt_tokens,
                block_tokens: request.block_tokens,
                backlog: backlog(candidates, model, request.work_rate),
            };
            let rank = |c: &Candidate| model.rank(c, &prompt, most, may_pull);
            let mut order = sorted;
            // Stable sort from the round-robin turn's order: equal scores (an idle cluster, a
            // prompt nobody holds) are spread over the workers, not all given to the first id.
            let n = order.len();
            order.rotate_left((turn % n as u64) as usize);
            // One rank per worker, not one per comparison.
            order.sort_by_cached_key(|c| Score(rank(c).0));
            let best = rank(order[0]).0;
            let pinned = request
                .pinned
                .map(|p| order.iter().position(|c| &c.worker == p));
            let reason = match pinned {
                None => Reason::Placed,
                Some(None) => Reason::PinLost,
                Some(Some(i)) => {
                    let keep = best * (1.0 + model.margin_ratio) + model.margin_secs;
                    if rank(order[i]).0 <= keep {
                        let pin = order.remove(i);
                        order.insert(0, pin);
                        Reason::Pinned
                    } else {
                        Reason::Moved
                    }
                }
            };
            let pull = match rank(order[0]) {
                (_, true) => holder.map(|h| (h, most)),
                _ => None,
            };
            Decision {
                pull,
                ..decision(order, reason)
            }
        }
        Policy::RoundRobin => {
            let n = sorted.len();
            let start = (turn % n as u64) as usize;
            let order = (0..n).map(|i| sorted[(start + i) % n]).collect();
            decision(order, Reason::Turn)
        }
        Policy::LeastLoaded => {
            let mut order = sorted;
            // Stable sort: ties go to the round-robin turn's order, not always the first id.
            let n = order.len();
            order.rotate_left((turn % n as u64) as usize);
            by_load(&mut order);
            decision(order, Reason::LeastLoaded)
        }
        Policy::SessionHash => {
            let key = request.session.unwrap_or("");
            let ring = ring_order(&sorted, key);
            let total: u64 = sorted.iter().map(|c| c.load()).sum();
            let bound = (1.0 + BOUND_EPSILON) * total as f64 / sorted.len() as f64 + 1.0;
            let fits = ring.iter().position(|c| c.load() as f64 <= bound);
            let (first, reason) = match fits {
                Some(0) | None => (0, Reason::Hashed),
                Some(i) => (i, Reason::HashOverflow),
            };
            let mut order = ring;
            order.rotate_left(first);
            decision(order, reason)
        }
        Policy::PrefixOnly => {
            let mut order = sorted;
            by_load(&mut order);
            order.sort_by_key(|c| std::cmp::Reverse(c.cached_blocks()));
            let reason = if order[0].cached_blocks() > 0 {
                Reason::PrefixHit
            } else {
                Reason::PrefixMiss
            };
            decision(order, reason)
        }
    })
}

/// The workers in rendezvous-hashing order for `key` (highest random weight first): each
/// worker's weight is a hash of (key, worker), so adding or removing a worker moves only the
/// keys that rank it first, as a hash ring does, at one hash per worker and no ring to keep.
fn ring_order<'c>(workers: &[&'c Candidate], key: &str) -> Vec<&'c Candidate> {
    let weight = |c: &Candidate| {
        let mut h = blake3::Hasher::new();
        h.update(key.as_bytes());
        h.update(&[0]);
        h.update(c.worker.as_str().as_bytes());
        let bytes = h.finalize();
        u64::from_le_bytes(bytes.as_bytes()[..8].try_into().unwrap_or_default())
    };
    let mut order: Vec<(u64, &Candidate)> = workers.iter().map(|c| (weight(c), *c)).collect();
    order.sort_by_key(|(w, _)| std::cmp::Reverse(*w));
    order.into_iter().map(|(_, c)| c).collect()
}

#[cfg(test)]
mod tests;

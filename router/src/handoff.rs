//! Where a draining worker's sessions go, with their cache (issue #21, point 4).
//!
//! When a worker's load report first says `draining` (SIGTERM: a rollout, a scale-down, a node
//! drain), the router plans where each chain the worker holds should live from now on
//! ([`plan`]): the chains come from the KV index (the parents named by the workers' events), and
//! each goes to the worker the `ttft` cost model would place a request for it on if the draining
//! worker could only lend its blocks, which is where the session's next turn will go. The plan
//! is sent to the draining worker (`POST /v1/kv/handoff`), which asks each chosen peer to pull
//! its share and waits for them before it exits (worker `server::handoff`). The peers' KV events
//! then show the blocks where they went, and the sessions follow them.
//!
//! With `--pull never` nothing moves: a draining worker is sent an empty plan (so it does not
//! wait for one), and its sessions are recomputed elsewhere (or found on its disk tier if it
//! comes back).

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use tidelock_protocol::{BlockHash, HandoffPeer, HandoffPlan, WorkerId};

use crate::http::{Http, HttpError};
use crate::index::KvIndex;
use crate::policy::{self, Candidate, CostModel, Policy, PullWhen};
use crate::workers::Model;

/// How long the draining worker may take to accept a plan.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// The blocks of `from` (a draining worker, one of `candidates`) each other candidate should
/// take, per worker:
/// every chain `from` holds goes to the candidate the cost model ranks first for a prompt of
/// that chain (`from` lending its blocks), which gets the blocks of the chain it lacks and `from`
/// holds, in chain order. A chain placed counts as that many prefill tokens queued on its
/// worker for the rest of the plan, so the sessions spread over the peers by load instead of
/// all going to the least loaded one. Chains come hottest first (see [`KvIndex::chains`]).
pub fn plan(
    index: &KvIndex,
    from: &WorkerId,
    candidates: &[Candidate],
    cost: &CostModel,
) -> BTreeMap<WorkerId, Vec<BlockHash>> {
    let block_tokens = index.block_tokens().as_usize();
    let cost = CostModel {
        pull: PullWhen::Drain,
        ..*cost
    };
    let mut candidates: Vec<Candidate> = candidates.to_vec();
    let mut shares: BTreeMap<WorkerId, (Vec<BlockHash>, HashSet<BlockHash>)> = BTreeMap::new();
    for (turn, chain) in index.chains(from).into_iter().enumerate() {
        let matches = index.matches(&chain.hashes);
        for c in &mut candidates {
            c.cached = matches
                .iter()
                .find(|m| m.worker == c.worker)
                .map(|m| m.tiers)
                .unwrap_or_default();
        }
        let request = policy::Request {
            prompt_tokens: chain.hashes.len() * block_tokens,
            block_tokens,
            // A plan moves what exists; the router's recent load does not change where.
            work_rate: 0.0,
            session: None,
            pinned: None,
        };
        let Some(decision) =
            policy::decide(Policy::Ttft, &cost, &request, &candidates, turn as u64)
        else {
            break; // No worker but draining ones.
        };
        let to = &decision.order[0];
        let held = candidates
            .iter()
            .find(|c| &c.worker == to)
            .map_or(0, |c| c.cached.total());
        let (list, seen) = shares.entry(to.clone()).or_default();
        let before = list.len();
        list.extend(
            chain.hashes[held.min(chain.hashes.len())..]
                .iter()
                .take_while(|h| index.holds(from, h))
                .filter(|h| seen.insert(**h)),
        );
        let moved = (list.len() - before) * block_tokens;
        if let Some(c) = candidates.iter_mut().find(|c| &c.worker == to) {
            c.pending_prefill += moved as u64;
        }
    }
    shares
        .into_iter()
        .filter(|(_, (list, _))| !list.is_empty())
        .map(|(worker, (list, _))| (worker, list))
        .collect()
}

/// Plans the handoff of `from`, a draining worker of `model`, with `cost` (`None`: nothing
/// moves), and sends the plan to it. An empty plan is sent too: it tells the worker not to wait
/// for one.
pub async fn hand_off(model: &Model, http: &Http, cost: Option<&CostModel>, from: &WorkerId) {
    let workers = model.workers();
    let Some(draining) = workers.get(from) else {
        return;
    };
    let candidates: Vec<Candidate> = workers
        .values()
        .filter(|w| w.healthy() || &w.id == from)
        .map(|w| w.candidate(Default::default(), 0))
        .collect();
    let shares = match cost {
        Some(cost) => {
            let index = model.index.read().unwrap_or_else(|e| e.into_inner());
            plan(&index, from, &candidates, cost)
        }
        None => BTreeMap::new(),
    };
    let peers: Vec<HandoffPeer> = shares
        .into_iter()
        .filter_map(|(worker, hashes)| {
            let to = workers.get(&worker)?.registration.address.clone();
            Some(HandoffPeer { to, hashes })
        })
        .collect();
    let blocks: usize = peers.iter().map(|p| p.hashes.len()).sum();
    let plan = HandoffPlan {
        from: draining.registration.address.clone(),
        peers,
    };
    let url = format!(
        "{}/v1/kv/handoff",
        draining.registration.address.trim_end_matches('/')
    );
    let sent = match serde_json::to_vec(&plan) {
        Ok(body) => http.post_json(&url, body, SEND_TIMEOUT).await.map(drop),
        Err(e) => Err(HttpError::Json(e)),
    };
    match sent {
        Ok(()) => tracing::info!(
            model = %model.name,
            worker = %from,
            peers = plan.peers.len(),
            blocks,
            "draining worker: its KV cache goes to the peers chosen"
        ),
        Err(HttpError::Timeout(_)) => {
            tracing::warn!(model = %model.name, worker = %from, "draining worker: no answer to the handoff plan within {SEND_TIMEOUT:?}")
        }
        Err(e) => {
            tracing::info!(model = %model.name, worker = %from, error = %e, "draining worker: handoff plan not taken")
        }
    }
}

#[cfg(test)]
mod tests {
    use tidelock_protocol::{
        BlockTokens, Epoch, KvEvent, KvEventBatch, KvSnapshot, LoadReport, Tier,
    };

    use super::*;
    use crate::index::TierCounts;
    use crate::index::tests::h;

    fn hs(range: std::ops::Range<u32>) -> Vec<BlockHash> {
        range.map(h).collect()
    }

    fn w(name: &str) -> WorkerId {
        WorkerId::new(name).unwrap()
    }

    fn holding(index: &mut KvIndex, worker: &str, chains: &[(std::ops::Range<u32>, Tier)]) {
        index
            .load_snapshot(
                &w(worker),
                &KvSnapshot {
                    epoch: Epoch::new(1),
                    sequence: 0,
                    block_tokens: index.block_tokens(),
                    blocks: Vec::new(),
                },
            )
            .unwrap();
        let events = chains
            .iter()
            .map(|(range, tier)| KvEvent::Stored {
                parent: None,
                blocks: hs(range.clone()),
                tier: *tier,
            })
            .collect();
        let batch = KvEventBatch {
            epoch: Epoch::new(1),
            sequence: 1,
            events,
        };
        index.apply(&w(worker), &batch);
    }

    fn candidate(name: &str, draining: bool) -> Candidate {
        Candidate {
            worker: w(name),
            load: LoadReport {
                prefill_tokens_per_second: 1_000.0,
                draining,
                ..LoadReport::default()
            },
            in_flight: 0,
            pending_prefill: 0,
            pending_requests: 0,
            promised: 0,
            cached: TierCounts::default(),
        }
    }

    #[test]
    fn each_chain_goes_where_its_session_will_with_what_that_worker_lacks() {
        let mut index = KvIndex::new(BlockTokens::new(16).unwrap());
        // d drains holding three sessions; p already holds the first half of the first one.
        holding(
            &mut index,
            "d",
            &[
                (0..8, Tier::Device),
                (100..104, Tier::Device),
                (200..202, Tier::Disk),
            ],
        );
        holding(&mut index, "p", &[(0..4, Tier::Device)]);
        holding(&mut index, "q", &[]);
        let candidates = [
            candidate("d", true),
            candidate("p", false),
            candidate("q", false),
        ];
        let shares = plan(&index, &w("d"), &candidates, &CostModel::default());

        assert!(!shares.contains_key(&w("d")), "nothing goes back to d");
        // The longest device chain first: p holds its prefix, so it takes the rest of it. Then
        // p counts those tokens as load, and the next session goes to q whole.
        assert_eq!(shares[&w("p")][..4], hs(4..8));
        assert_eq!(shares[&w("q")][..4], hs(100..104));
        // The disk session goes whole to one of them, after its device sessions.
        let tails: Vec<&[BlockHash]> = shares.values().map(|l| &l[4..]).collect();
        assert!(
            tails.contains(&&hs(200..202)[..]) && tails.iter().map(|t| t.len()).sum::<usize>() == 2,
            "{shares:?}"
        );

        // No other worker: no plan. Only draining ones: none either.
        assert!(plan(&index, &w("d"), &candidates[..1], &CostModel::default()).is_empty());
        let all_draining = [candidate("d", true), candidate("p", true)];
        assert!(plan(&index, &w("d"), &all_draining, &CostModel::default()).is_empty());
    }
}

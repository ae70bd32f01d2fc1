use std::collections::{BTreeMap, BTreeSet};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tidelock_protocol::SnapshotBlock;

use super::*;

const BT: BlockTokens = BlockTokens::DEFAULT;

/// A distinct, well-spread block hash for `n` (also the handoff tests').
pub(crate) fn h(n: u32) -> BlockHash {
    let mut bytes = [0u8; 16];
    bytes[..4].copy_from_slice(&n.to_le_bytes());
    bytes[12..].copy_from_slice(&n.wrapping_mul(2_654_435_761).to_le_bytes());
    BlockHash::from_bytes(bytes)
}

fn chain(range: std::ops::Range<u32>) -> Vec<BlockHash> {
    range.map(h).collect()
}

fn w(name: &str) -> WorkerId {
    WorkerId::new(name).unwrap()
}

fn stored(blocks: Vec<BlockHash>, tier: Tier) -> KvEvent {
    KvEvent::Stored {
        parent: None,
        blocks,
        tier,
    }
}

fn removed(blocks: Vec<BlockHash>, tier: Tier) -> KvEvent {
    KvEvent::Removed { blocks, tier }
}

fn batch(epoch: u64, sequence: u64, events: Vec<KvEvent>) -> KvEventBatch {
    KvEventBatch {
        epoch: Epoch::new(epoch),
        sequence,
        events,
    }
}

fn snapshot(epoch: u64, sequence: u64, blocks: &[(BlockHash, Tier)]) -> KvSnapshot {
    KvSnapshot {
        epoch: Epoch::new(epoch),
        sequence,
        block_tokens: BT,
        blocks: blocks
            .iter()
            .map(|&(hash, tier)| SnapshotBlock { hash, tier })
            .collect(),
    }
}

/// An index with `worker` known at epoch 1, sequence 0, holding nothing.
fn with_empty(workers: &[&str]) -> KvIndex {
    let mut index = KvIndex::new(BT);
    for name in workers {
        index.load_snapshot(&w(name), &snapshot(1, 0, &[])).unwrap();
    }
    index
}

/// `(worker, device_blocks, total_blocks)` of each match, in order.
fn summary(index: &KvIndex, chain: &[BlockHash]) -> Vec<(String, usize, usize)> {
    index
        .matches(chain)
        .into_iter()
        .map(|m| (m.worker.to_string(), m.device_blocks, m.total_blocks))
        .collect()
}

fn s(name: &str, device: usize, total: usize) -> (String, usize, usize) {
    (name.to_owned(), device, total)
}

#[test]
fn unknown_worker_needs_a_snapshot_first() {
    let mut index = KvIndex::new(BT);
    let a = w("a");
    let result = index.apply(&a, &batch(1, 1, vec![stored(chain(0..4), Tier::Device)]));
    assert_eq!(result, Applied::NeedsSnapshot(Resync::NewEpoch));
    assert!(index.matches(&chain(0..4)).is_empty());
    assert_eq!(index.worker_count(), 0);
}

#[test]
fn in_order_batches_apply_and_duplicates_are_ignored() {
    let mut index = with_empty(&["a"]);
    let a = w("a");
    let first = batch(1, 1, vec![stored(chain(0..4), Tier::Device)]);
    assert_eq!(index.apply(&a, &first), Applied::Applied);
    assert_eq!(
        index.apply(&a, &batch(1, 2, vec![stored(chain(4..6), Tier::Device)])),
        Applied::Applied
    );
    // A redelivered old batch must not re-add blocks removed since.
    assert_eq!(
        index.apply(&a, &batch(1, 3, vec![removed(vec![h(1)], Tier::Device)])),
        Applied::Applied
    );
    assert_eq!(index.apply(&a, &first), Applied::Duplicate);
    assert_eq!(
        index.apply(&a, &batch(1, 3, vec![stored(chain(0..6), Tier::Device)])),
        Applied::Duplicate
    );
    assert_eq!(summary(&index, &chain(0..6)), vec![s("a", 1, 1)]);
    assert!(!index.is_stale(&a));
}

#[test]
fn gap_marks_stale_until_snapshot() {
    let mut index = with_empty(&["a", "b"]);
    let (a, b) = (w("a"), w("b"));
    for worker in [&a, &b] {
        let result = index.apply(
            worker,
            &batch(1, 1, vec![stored(chain(0..4), Tier::Device)]),
        );
        assert_eq!(result, Applied::Applied);
    }
    assert_eq!(
        index.apply(&a, &batch(1, 3, vec![stored(chain(4..8), Tier::Device)])),
        Applied::NeedsSnapshot(Resync::Gap {
            expected: 2,
            got: 3
        })
    );
    assert!(index.is_stale(&a));
    assert_eq!(index.worker_block_count(&a), 0);
    assert_eq!(summary(&index, &chain(0..8)), vec![s("b", 4, 4)]);
    // Even the batch that would have been next is refused while stale.
    assert_eq!(
        index.apply(&a, &batch(1, 2, vec![])),
        Applied::NeedsSnapshot(Resync::AwaitingSnapshot)
    );

    let snap = snapshot(1, 3, &[(h(0), Tier::Device), (h(1), Tier::Host)]);
    index.load_snapshot(&a, &snap).unwrap();
    assert!(!index.is_stale(&a));
    assert_eq!(index.apply(&a, &batch(1, 3, vec![])), Applied::Duplicate);
    assert_eq!(
        index.apply(&a, &batch(1, 4, vec![stored(vec![h(2)], Tier::Disk)])),
        Applied::Applied
    );
    assert_eq!(
        summary(&index, &chain(0..8)),
        vec![s("b", 4, 4), s("a", 1, 3)]
    );
}

#[test]
fn new_epoch_marks_stale_and_drops_blocks() {
    let mut index = with_empty(&["a"]);
    let a = w("a");
    index.apply(&a, &batch(1, 1, vec![stored(chain(0..4), Tier::Device)]));
    assert_eq!(
        index.apply(&a, &batch(2, 1, vec![stored(chain(0..2), Tier::Device)])),
        Applied::NeedsSnapshot(Resync::NewEpoch)
    );
    assert!(index.is_stale(&a));
    assert!(index.matches(&chain(0..4)).is_empty());
    assert_eq!(index.block_count(), 0);

    index
        .load_snapshot(&a, &snapshot(2, 1, &[(h(0), Tier::Device)]))
        .unwrap();
    assert_eq!(summary(&index, &chain(0..4)), vec![s("a", 1, 1)]);
    assert_eq!(
        index.apply(&a, &batch(2, 2, vec![stored(vec![h(1)], Tier::Device)])),
        Applied::Applied
    );
    assert_eq!(summary(&index, &chain(0..4)), vec![s("a", 2, 2)]);
}

#[test]
fn unknown_event_needs_a_snapshot() {
    let mut index = with_empty(&["a"]);
    let a = w("a");
    let result = index.apply(
        &a,
        &batch(
            1,
            1,
            vec![stored(chain(0..4), Tier::Device), KvEvent::Unknown],
        ),
    );
    assert_eq!(result, Applied::NeedsSnapshot(Resync::UnknownEvent));
    assert!(index.is_stale(&a));
    assert!(index.matches(&chain(0..4)).is_empty());
}

#[test]
fn removed_on_one_tier_kept_on_another() {
    let mut index = with_empty(&["a"]);
    let a = w("a");
    let events = vec![
        stored(chain(0..4), Tier::Device),
        stored(chain(0..4), Tier::Host),
        removed(vec![h(1), h(2)], Tier::Device),
    ];
    assert_eq!(index.apply(&a, &batch(1, 1, events)), Applied::Applied);
    let found = index.matches(&chain(0..4));
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].device_blocks, 1);
    assert_eq!(found[0].total_blocks, 4);
    assert_eq!(
        found[0].tiers,
        TierCounts {
            device: 2,
            host: 2,
            disk: 0
        }
    );
    assert_eq!(index.worker_block_count(&a), 4);

    // Removing the last copy drops the block, and the prefix stops there.
    index.apply(&a, &batch(1, 2, vec![removed(vec![h(2)], Tier::Host)]));
    assert_eq!(summary(&index, &chain(0..4)), vec![s("a", 1, 2)]);
    assert_eq!(index.worker_block_count(&a), 3);
    assert_eq!(index.block_count(), 3);
    // Removing what is not held changes nothing.
    index.apply(
        &a,
        &batch(1, 3, vec![removed(vec![h(0), h(9)], Tier::Disk)]),
    );
    assert_eq!(summary(&index, &chain(0..4)), vec![s("a", 1, 2)]);
}

#[test]
fn cleared_drops_every_tier_of_that_worker_only() {
    let mut index = with_empty(&["a", "b"]);
    let (a, b) = (w("a"), w("b"));
    index.apply(
        &a,
        &batch(
            1,
            1,
            vec![
                stored(chain(0..3), Tier::Device),
                stored(chain(3..5), Tier::Disk),
            ],
        ),
    );
    index.apply(&b, &batch(1, 1, vec![stored(chain(0..2), Tier::Host)]));
    index.apply(
        &a,
        &batch(
            1,
            2,
            vec![KvEvent::Cleared, stored(vec![h(7)], Tier::Device)],
        ),
    );
    assert_eq!(summary(&index, &chain(0..5)), vec![s("b", 0, 2)]);
    assert_eq!(index.worker_block_count(&a), 1);
    assert_eq!(index.block_count(), 3);
    assert!(!index.is_stale(&a));
}

#[test]
fn prefix_stops_at_first_missing_block() {
    let mut index = with_empty(&["a"]);
    let a = w("a");
    // Holds blocks 0, 1, 3, 4 but not 2: only two leading blocks count.
    index.apply(
        &a,
        &batch(
            1,
            1,
            vec![stored(vec![h(0), h(1), h(3), h(4)], Tier::Device)],
        ),
    );
    assert_eq!(summary(&index, &chain(0..5)), vec![s("a", 2, 2)]);
    // A chain whose first block is missing matches nothing.
    assert!(index.matches(&chain(2..5)).is_empty());
    assert!(index.matches(&[]).is_empty());
}

#[test]
fn tiers_reported_per_prefix_segment() {
    let mut index = with_empty(&["a"]);
    let a = w("a");
    index.apply(
        &a,
        &batch(
            1,
            1,
            vec![
                stored(chain(0..2), Tier::Device),
                stored(chain(2..5), Tier::Host),
                stored(chain(5..6), Tier::Device),
                stored(chain(6..8), Tier::Disk),
                // Held on two tiers: counted once, on the faster.
                stored(chain(6..7), Tier::Host),
            ],
        ),
    );
    let found = index.matches(&chain(0..10));
    assert_eq!(
        found,
        vec![WorkerMatch {
            worker: a,
            device_blocks: 2,
            total_blocks: 8,
            tiers: TierCounts {
                device: 3,
                host: 4,
                disk: 1
            },
        }]
    );
}

#[test]
fn remove_worker_forgets_it_and_frees_its_slot() {
    let mut index = with_empty(&["a", "b"]);
    let (a, b) = (w("a"), w("b"));
    index.apply(&a, &batch(1, 1, vec![stored(chain(0..4), Tier::Device)]));
    index.apply(&b, &batch(1, 1, vec![stored(chain(0..2), Tier::Device)]));
    assert!(index.remove_worker(&a));
    assert!(!index.remove_worker(&a));
    assert_eq!(summary(&index, &chain(0..4)), vec![s("b", 2, 2)]);
    assert_eq!(index.block_count(), 2);
    assert_eq!(index.worker_count(), 1);
    assert_eq!(
        index.apply(&a, &batch(1, 2, vec![])),
        Applied::NeedsSnapshot(Resync::NewEpoch)
    );
    // A newcomer takes the freed slot and inherits none of its blocks.
    let c = w("c");
    index.load_snapshot(&c, &snapshot(5, 0, &[])).unwrap();
    assert_eq!(summary(&index, &chain(0..4)), vec![s("b", 2, 2)]);
}

#[test]
fn snapshot_replaces_state_entirely() {
    let mut index = with_empty(&["a"]);
    let a = w("a");
    index.apply(&a, &batch(1, 1, vec![stored(chain(0..6), Tier::Device)]));
    index
        .load_snapshot(
            &a,
            &snapshot(1, 9, &[(h(10), Tier::Host), (h(11), Tier::Host)]),
        )
        .unwrap();
    assert!(index.matches(&chain(0..6)).is_empty());
    assert_eq!(summary(&index, &chain(10..12)), vec![s("a", 0, 2)]);
    assert_eq!(index.block_count(), 2);
    assert_eq!(index.worker_block_count(&a), 2);
    // Sequencing continues after the snapshot's sequence.
    assert_eq!(index.apply(&a, &batch(1, 9, vec![])), Applied::Duplicate);
    assert_eq!(index.apply(&a, &batch(1, 10, vec![])), Applied::Applied);
}

#[test]
fn snapshot_with_other_block_size_is_refused() {
    let mut index = KvIndex::new(BT);
    let mut snap = snapshot(1, 0, &[(h(0), Tier::Device)]);
    snap.block_tokens = BlockTokens::new(16).unwrap();
    let err = index.load_snapshot(&w("a"), &snap).unwrap_err();
    assert!(matches!(err, IndexError::BlockTokens { .. }), "{err}");
    assert_eq!(index.worker_count(), 0);
    assert_eq!(index.block_count(), 0);
}

#[test]
fn many_workers_up_to_the_limit() {
    let mut index = KvIndex::new(BT);
    let names: Vec<WorkerId> = (0..MAX_WORKERS).map(|i| w(&format!("w{i:03}"))).collect();
    for (i, name) in names.iter().enumerate() {
        let blocks: Vec<_> = (0..i as u32).map(|n| (h(n), Tier::Device)).collect();
        index.load_snapshot(name, &snapshot(1, 0, &blocks)).unwrap();
    }
    let err = index
        .load_snapshot(&w("one-too-many"), &snapshot(1, 0, &[]))
        .unwrap_err();
    assert!(matches!(err, IndexError::Full { .. }), "{err}");

    let found = index.matches(&chain(0..200));
    assert_eq!(found.len(), MAX_WORKERS - 1);
    for (rank, m) in found.iter().enumerate() {
        let i = MAX_WORKERS - 1 - rank;
        assert_eq!(m.worker, names[i]);
        assert_eq!((m.device_blocks, m.total_blocks), (i, i));
    }
    assert!(index.remove_worker(&names[127]));
    index
        .load_snapshot(&w("newcomer"), &snapshot(1, 0, &[(h(0), Tier::Disk)]))
        .unwrap();
    let found = index.matches(&chain(0..1));
    assert_eq!(found.len(), MAX_WORKERS - 1);
    assert!(found.iter().any(|m| m.worker.as_str() == "newcomer"));
}

/// The obvious implementation: per worker, a map of blocks to the tiers they are held on.
#[derive(Default)]
struct Reference {
    workers: BTreeMap<WorkerId, BTreeMap<BlockHash, BTreeSet<u8>>>,
}

fn tier_rank(tier: Tier) -> u8 {
    match tier {
        Tier::Device => 0,
        Tier::Host => 1,
        Tier::Disk => 2,
    }
}

impl Reference {
    fn matches(&self, chain: &[BlockHash]) -> Vec<WorkerMatch> {
        let mut out = Vec::new();
        for (worker, blocks) in &self.workers {
            let mut m = WorkerMatch {
                worker: worker.clone(),
                device_blocks: 0,
                total_blocks: 0,
                tiers: TierCounts::default(),
            };
            let mut on_device = true;
            for hash in chain {
                let Some(tiers) = blocks.get(hash).filter(|t| !t.is_empty()) else {
                    break;
                };
                m.total_blocks += 1;
                on_device &= tiers.contains(&0);
                if on_device {
                    m.device_blocks += 1;
                }
                match tiers.first() {
                    Some(0) => m.tiers.device += 1,
                    Some(1) => m.tiers.host += 1,
                    _ => m.tiers.disk += 1,
                }
            }
            if m.total_blocks > 0 {
                out.push(m);
            }
        }
        out.sort_by(|a, b| {
            (b.total_blocks, b.device_blocks)
                .cmp(&(a.total_blocks, a.device_blocks))
                .then_with(|| a.worker.cmp(&b.worker))
        });
        out
    }
}

/// Random in-order batches, gaps, snapshots and removals across several workers; after every step
/// the index must answer exactly as the reference for a set of probe chains.
#[test]
fn matches_agree_with_reference_on_random_histories() {
    const TIERS: [Tier; 3] = [Tier::Device, Tier::Host, Tier::Disk];
    let mut rng = ChaCha8Rng::seed_from_u64(0x71de_10c4);
    for round in 0..20 {
        let mut index = KvIndex::new(BT);
        let mut reference = Reference::default();
        let names: Vec<WorkerId> = (0..6).map(|i| w(&format!("w{i}"))).collect();
        // Per worker: (epoch, last sequence) as the worker itself counts, and whether the index
        // holds a usable state for it.
        let mut cursor: BTreeMap<WorkerId, (u64, u64)> = BTreeMap::new();
        // Small hash space so that blocks are shared and chains overlap.
        let universe = 24u32;
        let probes: Vec<Vec<BlockHash>> = (0..8)
            .map(|_| {
                let start = rng.random_range(0..4);
                let len = rng.random_range(1..16);
                chain(start..start + len)
            })
            .collect();
        for step in 0..300 {
            let worker = &names[rng.random_range(0..names.len())];
            let roll = rng.random_range(0..100);
            if roll < 5 {
                index.remove_worker(worker);
                reference.workers.remove(worker);
                cursor.remove(worker);
            } else if roll < 12 || !cursor.contains_key(worker) || index.is_stale(worker) {
                // Snapshot of what the worker "really" holds: random new state.
                let epoch = rng.random_range(1..4);
                let sequence = rng.random_range(0..5);
                let mut blocks = Vec::new();
                let mut truth: BTreeMap<BlockHash, BTreeSet<u8>> = BTreeMap::new();
                for n in 0..universe {
                    for tier in TIERS {
                        if rng.random_bool(0.3) {
                            blocks.push((h(n), tier));
                            truth.entry(h(n)).or_default().insert(tier_rank(tier));
                        }
                    }
                }
                index
                    .load_snapshot(worker, &snapshot(epoch, sequence, &blocks))
                    .unwrap();
                reference.workers.insert(worker.clone(), truth);
                cursor.insert(worker.clone(), (epoch, sequence));
            } else {
                let (epoch, last) = cursor[worker];
                let mut events = Vec::new();
                for _ in 0..rng.random_range(0..4) {
                    let tier = TIERS[rng.random_range(0..3)];
                    let start = rng.random_range(0..universe);
                    let len = rng.random_range(1..6);
                    let blocks = chain(start..(start + len).min(universe));
                    match rng.random_range(0..10) {
                        0 => events.push(KvEvent::Cleared),
                        1..=5 => events.push(stored(blocks, tier)),
                        _ => events.push(removed(blocks, tier)),
                    }
                }
                let kind = rng.random_range(0..20);
                let (sequence, in_order) = match kind {
                    // A gap.
                    0 => (last + 2, false),
                    // A redelivery of the last batch (none exists right after a snapshot at 0).
                    1 if last > 0 => (last, false),
                    _ => (last + 1, true),
                };
                let result = index.apply(worker, &batch(epoch, sequence, events.clone()));
                if in_order {
                    assert_eq!(result, Applied::Applied, "round {round} step {step}");
                    let truth = reference.workers.get_mut(worker).unwrap();
                    for event in &events {
                        match event {
                            KvEvent::Stored { blocks, tier, .. } => {
                                for hash in blocks {
                                    truth.entry(*hash).or_default().insert(tier_rank(*tier));
                                }
                            }
                            KvEvent::Removed { blocks, tier } => {
                                for hash in blocks {
                                    if let Some(tiers) = truth.get_mut(hash) {
                                        tiers.remove(&tier_rank(*tier));
                                    }
                                }
                            }
                            KvEvent::Cleared => truth.clear(),
                            KvEvent::Unknown => unreachable!(),
                        }
                    }
                    cursor.insert(worker.clone(), (epoch, sequence));
                } else if kind == 0 {
                    assert!(matches!(result, Applied::NeedsSnapshot(Resync::Gap { .. })));
                    // Until the snapshot, the worker must match nothing.
                    reference.workers.insert(worker.clone(), BTreeMap::new());
                } else {
                    assert_eq!(result, Applied::Duplicate, "round {round} step {step}");
                }
            }
            for probe in &probes {
                assert_eq!(
                    index.matches(probe),
                    reference.matches(probe),
                    "round {round} step {step} probe {probe:?}"
                );
            }
            let live_blocks: BTreeSet<BlockHash> = reference
                .workers
                .values()
                .flat_map(|blocks| {
                    blocks
                        .iter()
                        .filter(|(_, t)| !t.is_empty())
                        .map(|(h, _)| *h)
                })
                .collect();
            assert_eq!(index.block_count(), live_blocks.len(), "no empty entries");
        }
    }
}

fn stored_after(parent: Option<BlockHash>, blocks: Vec<BlockHash>, tier: Tier) -> KvEvent {
    KvEvent::Stored {
        parent,
        blocks,
        tier,
    }
}

#[test]
fn chains_walk_parents_and_survive_a_demotion_within_a_batch() {
    let mut index = with_empty(&["a", "b"]);
    // a: a shared root 0..4, then two branches (4..8 and 10..12); b: the root and 20..22.
    let events = vec![
        stored_after(None, chain(0..4), Tier::Device),
        stored_after(Some(h(3)), chain(4..8), Tier::Device),
        stored_after(Some(h(3)), chain(10..12), Tier::Device),
    ];
    assert_eq!(index.apply(&w("a"), &batch(1, 1, events)), Applied::Applied);
    let events = vec![
        stored_after(None, chain(0..4), Tier::Device),
        stored_after(Some(h(3)), chain(20..22), Tier::Device),
    ];
    assert_eq!(index.apply(&w("b"), &batch(1, 1, events)), Applied::Applied);
    // a evicts its branch 4..8 to disk: removed from the device, stored on disk (one block per
    // event, no parent named, as a lower tier says it), in one batch.
    let mut events = vec![removed(chain(4..8), Tier::Device)];
    events.extend((4..8).map(|n| stored(vec![h(n)], Tier::Disk)));
    assert_eq!(index.apply(&w("a"), &batch(1, 2, events)), Applied::Applied);

    let chains = index.chains(&w("a"));
    let listed: Vec<(Vec<BlockHash>, Tier)> =
        chains.into_iter().map(|c| (c.hashes, c.tier)).collect();
    let mut branch = chain(0..4);
    branch.extend(chain(10..12));
    let mut evicted = chain(0..4);
    evicted.extend(chain(4..8));
    assert_eq!(
        listed,
        vec![(branch, Tier::Device), (evicted, Tier::Disk)],
        "device chains first; the demoted branch keeps its parents"
    );
    assert!(index.holds(&w("a"), &h(5)) && !index.holds(&w("b"), &h(5)));
    assert!(index.chains(&w("nobody")).is_empty());
    // A block only a snapshot named has no known parent: a chain of its own.
    index
        .load_snapshot(&w("b"), &snapshot(2, 0, &[(h(30), Tier::Device)]))
        .unwrap();
    assert_eq!(index.chains(&w("b"))[0].hashes, vec![h(30)]);
}

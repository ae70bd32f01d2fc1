//! The router's KV index: which worker holds which cached block, on which tier.
//!
//! Built only from the workers' KV event streams and snapshots (DESIGN.md, "KV events"), it
//! answers one question per request: for a prompt's block-hash chain, how many *leading* blocks
//! does each worker hold, and how many of those sit on the device tier (usable without a copy)?
//! The router's placement policy turns that into a predicted prefill time. Pure data structure: no
//! I/O, no clock, no locking; the owner feeds it batches in order and asks it questions.
//!
//! ## Layout, and why
//!
//! Every block hash commits to the whole prefix before it, so a flat map suffices (no radix
//! tree): `BlockHash -> Holders`, where [`Holders`] is one bitset of worker slots per tier
//! (`u128`, so at most [`MAX_WORKERS`] workers) and the block's parent when an event named it.
//! Lookups never use the parents; [`KvIndex::chains`] does, to list a draining worker's
//! sessions (issue #21, point 4). A lookup walks the chain
//! once, keeping the set of workers still matching and ANDing it with each block's holders; it
//! stops at the first block nobody still matching holds. Cost is one map probe plus a few 128-bit
//! operations per matched block, independent of the number of workers; per-worker work happens only
//! when a worker drops out or its tier changes along the chain. Block hashes are uniformly random
//! BLAKE3 output, so the map uses [`BlockHashHasher`]: the hash bytes folded into a word and one
//! keyed multiply (random key per map, against flooding) instead of SipHash.
//!
//! Each worker also keeps the set of blocks it holds, so that `Cleared`, a snapshot and
//! [`KvIndex::remove_worker`] cost the size of that worker's cache, not of the whole index.
//!
//! ## Invariants
//!
//! - A slot's bit is set in an entry only while that slot belongs to a worker, is not stale and
//!   holds the block on that tier; an entry with no bits left is removed.
//! - A worker's `blocks` set is exactly the blocks whose entry has its bit on some tier.
//! - A stale worker (one that saw a gap, a new epoch or an unknown event) holds nothing in the
//!   index until [`KvIndex::load_snapshot`] replaces its state, so it never attracts routing on
//!   blocks that may be gone.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher, RandomState};

use tidelock_protocol::{
    BlockHash, BlockTokens, Continuity, Epoch, KvEvent, KvEventBatch, KvSnapshot, Tier, WorkerId,
    classify,
};

/// How many workers one index can track: one bit each in a `u128`.
pub const MAX_WORKERS: usize = 128;

/// A hasher for keys that are already uniformly random 128-bit hashes: it XOR-folds the bytes into
/// one word and finishes with one keyed multiply instead of running SipHash over them.
///
/// The key is random per map ([`BlockHashState`]). Without it the map would be open to flooding:
/// a tenant chooses its tokens, and finding block hashes that share the few low bits a bucket is
/// chosen by takes only about a million BLAKE3 calls.
#[derive(Debug, Clone, Copy)]
pub struct BlockHashHasher {
    folded: u64,
    key: [u64; 2],
}

impl Hasher for BlockHashHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for word in &mut words {
            let word: [u8; 8] = word.try_into().unwrap_or([0; 8]);
            self.folded = self.folded.rotate_left(23) ^ u64::from_le_bytes(word);
        }
        for &byte in words.remainder() {
            self.folded = self.folded.rotate_left(8) ^ u64::from(byte);
        }
    }

    // The slice length prefix that `Hash for [u8; 16]` writes carries no information here.
    fn write_usize(&mut self, _: usize) {}

    fn finish(&self) -> u64 {
        // ahash's fallback finish: a 64x64->128 multiply by a secret, folded.
        let product = u128::from(self.folded ^ self.key[0]) * u128::from(self.key[1]);
        (product as u64) ^ ((product >> 64) as u64)
    }
}

/// Builds [`BlockHashHasher`]s with a key drawn at random when the map is created.
#[derive(Debug, Clone, Copy)]
pub struct BlockHashState {
    key: [u64; 2],
}

impl Default for BlockHashState {
    fn default() -> Self {
        // std's RandomState is seeded from the OS; two of its outputs make the key.
        let random = RandomState::new();
        Self {
            key: [random.hash_one(0u8), random.hash_one(1u8) | 1],
        }
    }
}

impl BuildHasher for BlockHashState {
    type Hasher = BlockHashHasher;

    fn build_hasher(&self) -> BlockHashHasher {
        BlockHashHasher {
            folded: 0,
            key: self.key,
        }
    }
}

pub(crate) type BlockMap<V> = HashMap<BlockHash, V, BlockHashState>;
type BlockSet = HashSet<BlockHash, BlockHashState>;

/// Why the index refused a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    /// Every worker slot is taken.
    #[error("the KV index already tracks {MAX_WORKERS} workers; cannot add {worker}")]
    Full {
        /// The worker that did not fit.
        worker: WorkerId,
    },
    /// The worker cuts prompts into blocks of a different size than this index hashes with, so
    /// none of its hashes could ever match.
    #[error("worker {worker} uses {got}-token blocks; this index hashes {expected}-token blocks")]
    BlockTokens {
        /// The worker whose snapshot was refused.
        worker: WorkerId,
        /// The index's block size.
        expected: BlockTokens,
        /// The snapshot's block size.
        got: BlockTokens,
    },
}

/// What [`KvIndex::apply`] did with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The batch was the next one and its events are applied.
    Applied,
    /// The batch was already applied (a redelivery) and is ignored.
    Duplicate,
    /// The worker's state cannot be continued from this batch. Its blocks are dropped from the
    /// index until [`KvIndex::load_snapshot`] is called for it; the caller should fetch one.
    NeedsSnapshot(Resync),
}

/// Why a worker needs a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resync {
    /// Batches were lost between the last applied one and this one.
    Gap {
        /// The sequence that should have come next.
        expected: u64,
        /// The sequence that came.
        got: u64,
    },
    /// The worker restarted, or the index has never had a snapshot of it.
    NewEpoch,
    /// The batch contained an event this build does not understand.
    UnknownEvent,
    /// The worker is already waiting for a snapshot; batches are not applied until it arrives.
    AwaitingSnapshot,
}

/// Leading blocks of a prompt held by one worker, by tier.
///
/// Each block of the matched prefix is counted once, on the fastest tier the worker holds it on
/// (device, then host, then disk), so `device + host + disk` equals the matched prefix length.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TierCounts {
    /// Blocks counted on [`Tier::Device`].
    pub device: usize,
    /// Blocks counted on [`Tier::Host`].
    pub host: usize,
    /// Blocks counted on [`Tier::Disk`].
    pub disk: usize,
}

impl TierCounts {
    /// The matched prefix length, in blocks.
    pub fn total(&self) -> usize {
        self.device + self.host + self.disk
    }
}

/// One chain of blocks a worker holds, as [`KvIndex::chains`] lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldChain {
    /// From the first block whose parent the index knows to the last block the worker holds of
    /// this branch, in order; the worker may lack some leading ones (they are other workers').
    pub hashes: Vec<BlockHash>,
    /// The fastest tier the worker holds the chain's last block on.
    pub tier: Tier,
}

/// How much of a prompt's chain one worker holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerMatch {
    /// The worker.
    pub worker: WorkerId,
    /// Leading blocks held on the device tier, contiguous from the chain's first block: the prefix
    /// this worker can use without copying anything.
    pub device_blocks: usize,
    /// Leading blocks held on any tier, contiguous from the chain's first block.
    pub total_blocks: usize,
    /// The `total_blocks` prefix split by the fastest tier each block is held on.
    pub tiers: TierCounts,
}

/// Which worker slots hold one block, per tier, and the block before it in its chain.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Holders {
    device: u128,
    host: u128,
    disk: u128,
    /// `None`: the first block of a prompt, or a block whose parent no event named (a
    /// snapshot's, or a lower tier's event about one block).
    parent: Option<BlockHash>,
}

impl Holders {
    fn tier_mut(&mut self, tier: Tier) -> &mut u128 {
        match tier {
            Tier::Device => &mut self.device,
            Tier::Host => &mut self.host,
            Tier::Disk => &mut self.disk,
        }
    }

    fn any(&self) -> u128 {
        self.device | self.host | self.disk
    }
}

/// What the index knows of one worker.
#[derive(Debug)]
struct WorkerState {
    id: WorkerId,
    /// The `(epoch, sequence)` of the last batch or snapshot applied.
    last: (Epoch, u64),
    /// Waiting for a snapshot; holds no blocks meanwhile.
    stale: bool,
    /// Every block this worker holds on some tier.
    blocks: BlockSet,
}

/// The router's index of cached blocks across workers. See the module docs.
#[derive(Debug)]
pub struct KvIndex {
    block_tokens: BlockTokens,
    entries: BlockMap<Holders>,
    /// Indexed by slot; `None` is a free slot.
    slots: Vec<Option<WorkerState>>,
    by_id: HashMap<WorkerId, usize>,
}

impl KvIndex {
    /// An empty index for workers that cut prompts into `block_tokens`-token blocks. A restarted
    /// router starts here and loads a snapshot per worker.
    pub fn new(block_tokens: BlockTokens) -> Self {
        Self {
            block_tokens,
            entries: BlockMap::default(),
            slots: Vec::new(),
            by_id: HashMap::new(),
        }
    }

    /// The block size this index's chains must be hashed with.
    pub fn block_tokens(&self) -> BlockTokens {
        self.block_tokens
    }

    /// Distinct blocks held by at least one worker.
    pub fn block_count(&self) -> usize {
        self.entries.len()
    }

    /// Workers known to the index, stale or not.
    pub fn worker_count(&self) -> usize {
        self.by_id.len()
    }

    /// Whether `worker` is known and waiting for a snapshot. Unknown workers are not stale: they
    /// simply hold nothing.
    pub fn is_stale(&self, worker: &WorkerId) -> bool {
        self.state(worker).is_some_and(|state| state.stale)
    }

    /// Blocks `worker` holds on some tier (0 for unknown or stale workers).
    pub fn worker_block_count(&self, worker: &WorkerId) -> usize {
        self.state(worker).map_or(0, |state| state.blocks.len())
    }

    /// Applies one batch from `worker`'s event stream, if it is the next one.
    ///
    /// A worker the index has no snapshot of always gets [`Applied::NeedsSnapshot`]: even a first
    /// batch cannot prove the worker started empty.
    pub fn apply(&mut self, worker: &WorkerId, batch: &KvEventBatch) -> Applied {
        let Some(&slot) = self.by_id.get(worker) else {
            return Applied::NeedsSnapshot(Resync::NewEpoch);
        };
        let state = self.slots[slot]
            .as_ref()
            .expect("by_id points at live slots");
        if state.stale {
            return Applied::NeedsSnapshot(Resync::AwaitingSnapshot);
        }
        let resync = match classify(Some(state.last), batch) {
            Continuity::InOrder => None,
            Continuity::Duplicate => return Applied::Duplicate,
            Continuity::Gap { expected, got } => Some(Resync::Gap { expected, got }),
            Continuity::NewEpoch => Some(Resync::NewEpoch),
        };
        let resync = resync.or_else(|| {
            batch
                .events
                .iter()
                .any(|event| matches!(event, KvEvent::Unknown))
                .then_some(Resync::UnknownEvent)
        });
        if let Some(resync) = resync {
            self.clear_slot(slot);
            self.slot_mut(slot).stale = true;
            return Applied::NeedsSnapshot(resync);
        }

        // Entries left without holders are dropped at the end of the batch, not at once: an
        // evicted block's removal from the device and its arrival on a lower tier come in one
        // batch, and its parent must survive the move.
        let mut emptied = Vec::new();
        for event in &batch.events {
            match event {
                KvEvent::Stored {
                    parent,
                    blocks,
                    tier,
                } => {
                    let mut parent = *parent;
                    for &hash in blocks {
                        self.store(slot, hash, *tier, parent);
                        parent = Some(hash);
                    }
                }
                KvEvent::Removed { blocks, tier } => {
                    for hash in blocks {
                        if self.remove(slot, hash, *tier) {
                            emptied.push(*hash);
                        }
                    }
                }
                KvEvent::Cleared => self.clear_slot(slot),
                KvEvent::Unknown => unreachable!("batches with unknown events are refused above"),
            }
        }
        for hash in emptied {
            if self.entries.get(&hash).is_some_and(|h| h.any() == 0) {
                self.entries.remove(&hash);
            }
        }
        self.slot_mut(slot).last = (batch.epoch, batch.sequence);
        Applied::Applied
    }

    /// Replaces everything known about `worker` with `snapshot`; later batches continue after the
    /// snapshot's sequence. Adds the worker if it is new.
    pub fn load_snapshot(
        &mut self,
        worker: &WorkerId,
        snapshot: &KvSnapshot,
    ) -> Result<(), IndexError> {
        if snapshot.block_tokens != self.block_tokens {
            return Err(IndexError::BlockTokens {
                worker: worker.clone(),
                expected: self.block_tokens,
                got: snapshot.block_tokens,
            });
        }
        let slot = match self.by_id.get(worker) {
            Some(&slot) => {
                self.clear_slot(slot);
                slot
            }
            None => self.add_worker(worker)?,
        };
        let state = self.slot_mut(slot);
        state.last = (snapshot.epoch, snapshot.sequence);
        state.stale = false;
        for block in &snapshot.blocks {
            self.store(slot, block.hash, block.tier, None);
        }
        Ok(())
    }

    /// Forgets `worker` and every block it held (it left the cluster). Returns whether it was known.
    pub fn remove_worker(&mut self, worker: &WorkerId) -> bool {
        let Some(slot) = self.by_id.remove(worker) else {
            return false;
        };
        self.clear_slot(slot);
        self.slots[slot] = None;
        true
    }

    /// For each worker holding at least the first block of `chain`, how many leading blocks it
    /// holds and on which tiers. Ordered by `total_blocks`, then `device_blocks`, both descending,
    /// then by worker id.
    ///
    /// `chain` must be hashed with [`KvIndex::block_tokens`]-token blocks under the request's
    /// model and cache salt (e.g. [`tidelock_protocol::HashChain`]).
    pub fn matches(&self, chain: &[BlockHash]) -> Vec<WorkerMatch> {
        // Per slot: where its current run of same-tier blocks began, and its results.
        let mut run_start = [0usize; MAX_WORKERS];
        let mut tiers = [[0usize; 3]; MAX_WORKERS];
        let mut total = [0usize; MAX_WORKERS];
        let mut device = [0usize; MAX_WORKERS];

        // Slots still matching on any tier, and on the device tier only.
        let mut active = u128::MAX;
        let mut device_active = u128::MAX;
        // Partition of `active` by the fastest tier holding the previous block.
        let mut class = [0u128; 3];
        let mut end = chain.len();
        for (i, hash) in chain.iter().enumerate() {
            let Some(holders) = self.entries.get(hash) else {
                end = i;
                break;
            };
            let next = active & holders.any();
            let next_class = [
                next & holders.device,
                next & holders.host & !holders.device,
                next & holders.disk & !(holders.device | holders.host),
            ];
            if next_class != class {
                // Close every ending run before starting any: a slot may leave one class and
                // enter another at the same block.
                for t in 0..3 {
                    for slot in bits(class[t] & !next_class[t]) {
                        tiers[slot][t] += i - run_start[slot];
                    }
                }
                for t in 0..3 {
                    for slot in bits(next_class[t] & !class[t]) {
                        run_start[slot] = i;
                    }
                }
                class = next_class;
            }
            for slot in bits(active & !next) {
                total[slot] = i;
            }
            let next_device = device_active & holders.device;
            for slot in bits(device_active & !next_device) {
                device[slot] = i;
            }
            active = next;
            device_active = next_device;
            if active == 0 {
                end = i + 1;
                break;
            }
        }
        // Close what is still open at `end`.
        for (t, &members) in class.iter().enumerate() {
            for slot in bits(members) {
                tiers[slot][t] += end - run_start[slot];
            }
        }
        for slot in bits(active) {
            total[slot] = end;
        }
        for slot in bits(device_active) {
            device[slot] = end;
        }

        let mut found: Vec<WorkerMatch> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(slot, state)| {
                let state = state.as_ref()?;
                (total[slot] > 0).then(|| WorkerMatch {
                    worker: state.id.clone(),
                    device_blocks: device[slot],
                    total_blocks: total[slot],
                    tiers: TierCounts {
                        device: tiers[slot][0],
                        host: tiers[slot][1],
                        disk: tiers[slot][2],
                    },
                })
            })
            .collect();
        found.sort_by(|a, b| {
            (b.total_blocks, b.device_blocks)
                .cmp(&(a.total_blocks, a.device_blocks))
                .then_with(|| a.worker.cmp(&b.worker))
        });
        found
    }

    /// Whether `worker` holds `hash` on some tier.
    pub fn holds(&self, worker: &WorkerId, hash: &BlockHash) -> bool {
        self.state(worker)
            .is_some_and(|state| state.blocks.contains(hash))
    }

    /// The chains `worker` holds: one per block it holds that is no other held block's parent
    /// (a session's latest turn, a branch), each walked back through the parents events named.
    /// Chains whose last block sits on a faster tier come first, then longer ones. The cost is
    /// the chains' total length; a router calls it once per draining worker.
    pub fn chains(&self, worker: &WorkerId) -> Vec<HeldChain> {
        let Some(&slot) = self.by_id.get(worker) else {
            return Vec::new();
        };
        let Some(state) = self.slots[slot].as_ref() else {
            return Vec::new();
        };
        let bit = 1u128 << slot;
        let parents: BlockSet = state
            .blocks
            .iter()
            .filter_map(|h| self.entries.get(h)?.parent)
            .collect();
        let mut chains: Vec<HeldChain> = state
            .blocks
            .iter()
            .filter(|h| !parents.contains(h))
            .filter_map(|&leaf| {
                let holders = self.entries.get(&leaf)?;
                let tier = [
                    (holders.device, Tier::Device),
                    (holders.host, Tier::Host),
                    (holders.disk, Tier::Disk),
                ]
                .into_iter()
                .find(|(set, _)| set & bit != 0)?
                .1;
                let mut hashes = vec![leaf];
                let mut at = holders.parent;
                // A chain cannot loop (each hash commits to its prefix); the bound guards
                // against events that say otherwise.
                while let Some(parent) = at.filter(|_| hashes.len() <= self.entries.len()) {
                    let Some(up) = self.entries.get(&parent) else {
                        break;
                    };
                    hashes.push(parent);
                    at = up.parent;
                }
                hashes.reverse();
                Some(HeldChain { hashes, tier })
            })
            .collect();
        let rank = |t: Tier| match t {
            Tier::Device => 0,
            Tier::Host => 1,
            Tier::Disk => 2,
        };
        chains.sort_by(|a, b| {
            rank(a.tier)
                .cmp(&rank(b.tier))
                .then(b.hashes.len().cmp(&a.hashes.len()))
                .then_with(|| a.hashes.cmp(&b.hashes))
        });
        chains
    }

    fn state(&self, worker: &WorkerId) -> Option<&WorkerState> {
        let &slot = self.by_id.get(worker)?;
        self.slots[slot].as_ref()
    }

    fn slot_mut(&mut self, slot: usize) -> &mut WorkerState {
        self.slots[slot]
            .as_mut()
            .expect("callers pass slots of known workers")
    }

    fn add_worker(&mut self, worker: &WorkerId) -> Result<usize, IndexError> {
        let slot = match self.slots.iter().position(Option::is_none) {
            Some(free) => free,
            None if self.slots.len() < MAX_WORKERS => {
                self.slots.push(None);
                self.slots.len() - 1
            }
            None => {
                return Err(IndexError::Full {
                    worker: worker.clone(),
                });
            }
        };
        self.slots[slot] = Some(WorkerState {
            id: worker.clone(),
            last: (Epoch::new(0), 0),
            stale: false,
            blocks: BlockSet::default(),
        });
        self.by_id.insert(worker.clone(), slot);
        Ok(slot)
    }

    fn store(&mut self, slot: usize, hash: BlockHash, tier: Tier, parent: Option<BlockHash>) {
        let holders = self.entries.entry(hash).or_default();
        *holders.tier_mut(tier) |= 1 << slot;
        // A hash names its whole prefix, so its parent never changes once known.
        holders.parent = holders.parent.or(parent);
        self.slot_mut(slot).blocks.insert(hash);
    }

    /// Takes `slot` off `hash` on `tier`; whether the entry has no holders left (the caller
    /// drops it).
    fn remove(&mut self, slot: usize, hash: &BlockHash, tier: Tier) -> bool {
        let bit = 1u128 << slot;
        let Some(holders) = self.entries.get_mut(hash) else {
            return false;
        };
        *holders.tier_mut(tier) &= !bit;
        let still_held = holders.any() & bit != 0;
        let empty = holders.any() == 0;
        if !still_held {
            self.slot_mut(slot).blocks.remove(hash);
        }
        empty
    }

    /// Drops every block of `slot` from the index, keeping the worker itself.
    fn clear_slot(&mut self, slot: usize) {
        let keep = !(1u128 << slot);
        let blocks = std::mem::take(&mut self.slot_mut(slot).blocks);
        for hash in &blocks {
            if let Some(holders) = self.entries.get_mut(hash) {
                holders.device &= keep;
                holders.host &= keep;
                holders.disk &= keep;
                if holders.any() == 0 {
                    self.entries.remove(hash);
                }
            }
        }
        // Reuse the allocation: a worker that is cleared usually fills its cache again.
        let mut blocks = blocks;
        blocks.clear();
        self.slot_mut(slot).blocks = blocks;
    }
}

/// The indices of the set bits of `set`, lowest first.
fn bits(mut set: u128) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if set == 0 {
            return None;
        }
        let bit = set.trailing_zeros() as usize;
        set &= set - 1;
        Some(bit)
    })
}

#[cfg(test)]
pub(crate) mod tests;

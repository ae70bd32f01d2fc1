//! The block pool: who owns which KV block, which blocks hold a known prefix, and what to evict.
//!
//! Pure bookkeeping, no tensors: the simulated engine uses it as is. Every physical block is in
//! exactly one state:
//! - **free**: holds nothing useful;
//! - **in use**: referenced by one or more sequences (`refs > 0`); if it is full and its tokens
//!   are known, it is also in the prefix cache under its [`BlockHash`], so new sequences with the
//!   same prefix share it instead of recomputing it;
//! - **cached**: unreferenced but still in the prefix cache, on the LRU list; the first to be
//!   evicted when free blocks run out.
//!
//! Every change to the set of cached blocks is recorded as a [`KvEvent`] (Stored when a block
//! enters the prefix cache, Removed when it leaves), handed out in batches stamped with the
//! pool's epoch and a sequence number, so routers can mirror the cache exactly; a snapshot gives
//! the whole set at one sequence number. The cache salt is part of every hash, so tenants never
//! share blocks unless they share a salt.

use std::collections::HashMap;

use tidelock_protocol::{
    BlockHash, BlockId, BlockTokens, Epoch, KvEvent, KvEventBatch, KvSnapshot, SnapshotBlock, Tier,
};

/// Not enough blocks, even after evicting every unreferenced cached block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("KV cache full: {wanted} blocks wanted, {available} can be freed")]
pub struct OutOfBlocks {
    pub wanted: usize,
    pub available: usize,
}

#[derive(Debug, Clone, Default)]
struct Meta {
    refs: u32,
    /// Set while the block is in the prefix cache.
    hash: Option<BlockHash>,
}

/// No block: the end of the LRU list.
const NIL: u32 = u32::MAX;

/// The unreferenced cached blocks, least recently used first: a doubly linked list threaded
/// through one pair of links per block, so a block joins at the tail, leaves from anywhere and
/// the oldest is taken, each in O(1) (it was an ordered set keyed by a use counter: O(log n)).
#[derive(Debug)]
struct Lru {
    prev: Vec<u32>,
    next: Vec<u32>,
    head: u32,
    tail: u32,
    len: usize,
}

impl Lru {
    fn new(blocks: usize) -> Self {
        Lru {
            prev: vec![NIL; blocks],
            next: vec![NIL; blocks],
            head: NIL,
            tail: NIL,
            len: 0,
        }
    }

    fn contains(&self, b: u32) -> bool {
        self.prev[b as usize] != NIL || self.head == b
    }

    /// Appends `b` (not on the list) as the most recently used.
    fn push_back(&mut self, b: u32) {
        debug_assert!(!self.contains(b), "block {b} is on the LRU list already");
        self.prev[b as usize] = self.tail;
        self.next[b as usize] = NIL;
        match self.tail {
            NIL => self.head = b,
            t => self.next[t as usize] = b,
        }
        self.tail = b;
        self.len += 1;
    }

    /// Takes `b` off the list; whether it was on it.
    fn remove(&mut self, b: u32) -> bool {
        if !self.contains(b) {
            return false;
        }
        let (p, n) = (self.prev[b as usize], self.next[b as usize]);
        match p {
            NIL => self.head = n,
            p => self.next[p as usize] = n,
        }
        match n {
            NIL => self.tail = p,
            n => self.prev[n as usize] = p,
        }
        self.prev[b as usize] = NIL;
        self.next[b as usize] = NIL;
        self.len -= 1;
        true
    }

    /// Takes the least recently used block off the list.
    fn pop_front(&mut self) -> Option<u32> {
        let head = self.head;
        (head != NIL && self.remove(head)).then_some(head)
    }

    /// The blocks, least recently used first.
    fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        let mut at = self.head;
        std::iter::from_fn(move || {
            let b = at;
            (b != NIL).then(|| {
                at = self.next[b as usize];
                b
            })
        })
    }
}

/// Counts for load reports and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStats {
    pub total: usize,
    /// Referenced by at least one sequence.
    pub in_use: usize,
    /// Unreferenced, in the prefix cache, evictable.
    pub cached: usize,
    pub free: usize,
}

/// The pool of KV blocks of one worker.
#[derive(Debug)]
pub struct BlockPool {
    block_tokens: BlockTokens,
    meta: Vec<Meta>,
    free: Vec<BlockId>,
    /// The prefix cache: hash -> block holding that prefix.
    by_hash: HashMap<BlockHash, BlockId>,
    /// Unreferenced cached blocks by last use, oldest first.
    lru: Lru,
    epoch: Epoch,
    sequence: u64,
    pending: Vec<KvEvent>,
    /// Blocks evicted from the prefix cache since [`BlockPool::take_evicted`], with the hash
    /// they held: their bytes are still in the store until the new owner writes them.
    evicted: Vec<(BlockId, BlockHash)>,
}

impl BlockPool {
    /// A pool of `num_blocks` free blocks; events are stamped with `epoch`.
    pub fn new(num_blocks: usize, block_tokens: BlockTokens, epoch: Epoch) -> Self {
        let count = u32::try_from(num_blocks).unwrap_or(u32::MAX);
        BlockPool {
            block_tokens,
            meta: vec![Meta::default(); count as usize],
            // Reversed so that blocks are handed out in increasing order.
            free: (0..count).rev().map(BlockId::new).collect(),
            by_hash: HashMap::new(),
            lru: Lru::new(count as usize),
            epoch,
            sequence: 0,
            pending: Vec::new(),
            evicted: Vec::new(),
        }
    }

    pub fn block_tokens(&self) -> BlockTokens {
        self.block_tokens
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// In O(1): every block is free, cached and unreferenced (in the LRU), or in use, so the
    /// blocks in use are what the other two leave (the engine reads this per generated token).
    pub fn stats(&self) -> PoolStats {
        PoolStats {
            total: self.meta.len(),
            in_use: self.meta.len() - self.free.len() - self.lru.len,
            cached: self.lru.len,
            free: self.free.len(),
        }
    }

    /// Blocks holding nothing (neither in use nor cached), in O(1).
    pub fn free(&self) -> usize {
        self.free.len()
    }

    /// Blocks that an allocation could obtain right now (free plus evictable).
    pub fn available(&self) -> usize {
        self.free.len() + self.lru.len
    }

    /// How many leading blocks of `hashes` are in the prefix cache.
    pub fn cached_prefix(&self, hashes: &[BlockHash]) -> usize {
        hashes
            .iter()
            .take_while(|h| self.by_hash.contains_key(h))
            .count()
    }

    /// The block holding `hash` in the prefix cache, if any (its bytes are complete: only full,
    /// computed blocks are cached).
    pub fn cached_block(&self, hash: &BlockHash) -> Option<BlockId> {
        self.by_hash.get(hash).copied()
    }

    /// Takes a reference on each leading cached block of `hashes`; returns those blocks.
    pub fn acquire_prefix(&mut self, hashes: &[BlockHash]) -> Vec<BlockId> {
        let n = self.cached_prefix(hashes);
        let blocks: Vec<BlockId> = hashes[..n].iter().map(|h| self.by_hash[h]).collect();
        for &block in &blocks {
            self.retain(block);
        }
        blocks
    }

    /// Takes one more reference on a block already in use or cached.
    pub fn retain(&mut self, block: BlockId) {
        let meta = &mut self.meta[block.get() as usize];
        if meta.refs == 0 {
            self.lru.remove(block.get());
        }
        meta.refs += 1;
    }

    /// Allocates `n` blocks (all or nothing), evicting the least recently used cached blocks if
    /// free ones run out. Each returned block has one reference.
    pub fn allocate(&mut self, n: usize) -> Result<Vec<BlockId>, OutOfBlocks> {
        if n > self.available() {
            return Err(OutOfBlocks {
                wanted: n,
                available: self.available(),
            });
        }
        let mut out = Vec::with_capacity(n);
        let mut evicted = Vec::new();
        while out.len() < n {
            let block = match self.free.pop() {
                Some(block) => block,
                None => {
                    let Some(oldest) = self.lru.pop_front() else {
                        unreachable!("availability was checked");
                    };
                    let block = BlockId::new(oldest);
                    if let Some(hash) = self.meta[block.get() as usize].hash.take() {
                        self.by_hash.remove(&hash);
                        evicted.push(hash);
                        self.evicted.push((block, hash));
                    }
                    block
                }
            };
            self.meta[block.get() as usize].refs = 1;
            out.push(block);
        }
        if !evicted.is_empty() {
            self.pending.push(KvEvent::Removed {
                blocks: evicted,
                tier: Tier::Device,
            });
        }
        Ok(out)
    }

    /// The blocks [`BlockPool::allocate`] evicted from the prefix cache since the last call, with
    /// the hash each held. Call it right after allocating, before anything writes the blocks,
    /// to copy them to a lower tier.
    pub fn take_evicted(&mut self) -> Vec<(BlockId, BlockHash)> {
        std::mem::take(&mut self.evicted)
    }

    /// Every block in the prefix cache with its hash: the unreferenced ones least recently used
    /// first, then those in use.
    pub fn cached_blocks(&self) -> Vec<(BlockId, BlockHash)> {
        let mut out: Vec<(BlockId, BlockHash)> = self
            .lru
            .iter()
            .filter_map(|b| {
                let hash = self.meta[b as usize].hash?;
                Some((BlockId::new(b), hash))
            })
            .collect();
        out.extend(
            self.by_hash
                .iter()
                .filter(|(_, b)| self.meta[b.get() as usize].refs > 0)
                .map(|(h, b)| (*b, *h)),
        );
        out
    }

    /// Adds events of the lower tiers to the stream, after the pool's own so far.
    pub fn record(&mut self, events: impl IntoIterator<Item = KvEvent>) {
        self.pending.extend(events);
    }

    /// Registers freshly computed full blocks in the prefix cache: `blocks[i]` holds the prefix
    /// named `hashes[i]`, and `parent` is the hash before `hashes[0]` (`None` at the root).
    ///
    /// A hash already cached under another block (two sequences computed the same prefix at
    /// once) keeps its first block; the duplicate stays private to its sequence and is freed,
    /// not cached, when released.
    pub fn commit(&mut self, parent: Option<BlockHash>, blocks: &[BlockId], hashes: &[BlockHash]) {
        debug_assert_eq!(blocks.len(), hashes.len());
        let mut stored = Vec::new();
        let mut stored_parent = parent;
        let mut last = parent;
        for (&block, &hash) in blocks.iter().zip(hashes) {
            let meta = &mut self.meta[block.get() as usize];
            let fresh = meta.hash.is_none() && !self.by_hash.contains_key(&hash);
            if fresh {
                meta.hash = Some(hash);
                self.by_hash.insert(hash, block);
                if stored.is_empty() {
                    stored_parent = last;
                }
                stored.push(hash);
            } else if !stored.is_empty() {
                // A gap in what is new: close this chain, start another after it.
                self.pending.push(KvEvent::Stored {
                    parent: stored_parent,
                    blocks: std::mem::take(&mut stored),
                    tier: Tier::Device,
                });
            }
            last = Some(hash);
        }
        if !stored.is_empty() {
            self.pending.push(KvEvent::Stored {
                parent: stored_parent,
                blocks: stored,
                tier: Tier::Device,
            });
        }
    }

    /// Drops one reference on each block. Unreferenced blocks stay in the prefix cache (most
    /// recently used last) if they hold a known prefix, else become free.
    pub fn release(&mut self, blocks: &[BlockId]) {
        // Release the tail first so that, among blocks released together, the prefix's first
        // blocks are the most recently used: they are shared by more future prompts.
        for &block in blocks.iter().rev() {
            let meta = &mut self.meta[block.get() as usize];
            debug_assert!(meta.refs > 0, "release of unreferenced block {block}");
            meta.refs = meta.refs.saturating_sub(1);
            if meta.refs > 0 {
                continue;
            }
            if meta.hash.is_some() {
                self.lru.push_back(block.get());
            } else {
                self.free.push(block);
            }
        }
    }

    /// Drops every unreferenced cached block from the prefix cache. When no block is in use
    /// either, that is a [`KvEvent::Cleared`].
    pub fn clear_cache(&mut self) {
        let mut evicted = Vec::with_capacity(self.lru.len);
        while let Some(b) = self.lru.pop_front() {
            let block = BlockId::new(b);
            if let Some(hash) = self.meta[b as usize].hash.take() {
                self.by_hash.remove(&hash);
                evicted.push(hash);
            }
            self.free.push(block);
        }
        if self.by_hash.is_empty() {
            self.pending.push(KvEvent::Cleared);
        } else if !evicted.is_empty() {
            self.pending.push(KvEvent::Removed {
                blocks: evicted,
                tier: Tier::Device,
            });
        }
    }

    /// The events since the last call, as the next batch of the sequence (None if nothing
    /// happened).
    pub fn take_events(&mut self) -> Option<KvEventBatch> {
        if self.pending.is_empty() {
            return None;
        }
        self.sequence += 1;
        Some(KvEventBatch {
            epoch: self.epoch,
            sequence: self.sequence,
            events: std::mem::take(&mut self.pending),
        })
    }

    /// Every cached block, as of the last batch handed out by [`take_events`]. Call it right after
    /// `take_events` (the server does both under one lock) so that the snapshot and the event
    /// stream line up.
    ///
    /// [`take_events`]: BlockPool::take_events
    ///
    /// `lower` lists the blocks of the lower tiers (they are in the same event stream).
    pub fn snapshot(&self, lower: &[(BlockHash, Tier)]) -> KvSnapshot {
        let mut blocks: Vec<SnapshotBlock> = self
            .by_hash
            .keys()
            .map(|&hash| SnapshotBlock {
                hash,
                tier: Tier::Device,
            })
            .chain(
                lower
                    .iter()
                    .map(|&(hash, tier)| SnapshotBlock { hash, tier }),
            )
            .collect();
        blocks.sort_by_key(|b| b.hash);
        KvSnapshot {
            epoch: self.epoch,
            sequence: self.sequence,
            block_tokens: self.block_tokens,
            blocks,
        }
    }

    /// References held on a block (for tests and assertions).
    pub fn refs(&self, block: BlockId) -> u32 {
        self.meta[block.get() as usize].refs
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use tidelock_protocol::{CacheSalt, ModelName, block_hashes};

    use super::*;

    fn pool(n: usize) -> BlockPool {
        BlockPool::new(n, BlockTokens::new(4).unwrap(), Epoch::new(7))
    }

    fn hashes(salt: &str, tokens: &[u32]) -> Vec<BlockHash> {
        block_hashes(
            &ModelName::new("m").unwrap(),
            &CacheSalt::new(salt).unwrap(),
            tokens,
            BlockTokens::new(4).unwrap(),
        )
    }

    /// Applies event batches to a set, as a router's index would.
    fn mirror(set: &mut HashSet<BlockHash>, batch: &KvEventBatch) {
        for event in &batch.events {
            match event {
                KvEvent::Stored { blocks, .. } => set.extend(blocks.iter().copied()),
                KvEvent::Removed { blocks, .. } => {
                    for b in blocks {
                        set.remove(b);
                    }
                }
                KvEvent::Cleared => set.clear(),
                KvEvent::Unknown => unreachable!(),
            }
        }
    }

    #[test]
    fn a_committed_prefix_is_shared_and_survives_release() {
        let mut p = pool(8);
        let prompt: Vec<u32> = (0..12).collect();
        let hs = hashes("t", &prompt);
        assert_eq!(p.cached_prefix(&hs), 0);
        let blocks = p.allocate(3).unwrap();
        p.commit(None, &blocks, &hs);
        assert_eq!(p.cached_prefix(&hs), 3);
        // A second sequence shares the first two blocks.
        let shared = p.acquire_prefix(&hs[..2]);
        assert_eq!(shared, blocks[..2]);
        assert_eq!(p.refs(blocks[0]), 2);
        p.release(&blocks);
        p.release(&shared);
        // Unreferenced but still cached: found again, not free.
        assert_eq!(
            p.stats(),
            PoolStats {
                total: 8,
                in_use: 0,
                cached: 3,
                free: 5
            }
        );
        assert_eq!(p.cached_prefix(&hs), 3);
    }

    #[test]
    fn another_salt_never_matches() {
        let mut p = pool(4);
        let prompt: Vec<u32> = (0..8).collect();
        let a = hashes("tenant-a", &prompt);
        let blocks = p.allocate(2).unwrap();
        p.commit(None, &blocks, &a);
        assert_eq!(p.cached_prefix(&a), 2);
        assert_eq!(p.cached_prefix(&hashes("tenant-b", &prompt)), 0);
    }

    #[test]
    fn eviction_takes_least_recently_used_and_reports_it() {
        let mut p = pool(4);
        let old = hashes("t", &[1, 1, 1, 1, 2, 2, 2, 2]);
        let new = hashes("t", &[3, 3, 3, 3, 4, 4, 4, 4]);
        let b_old = p.allocate(2).unwrap();
        p.commit(None, &b_old, &old);
        p.release(&b_old);
        let b_new = p.allocate(2).unwrap();
        p.commit(None, &b_new, &new);
        p.release(&b_new);
        let mut index = HashSet::new();
        mirror(&mut index, &p.take_events().unwrap());
        assert_eq!(index.len(), 4);
        // Two more blocks: both of the older prompt go.
        let fresh = p.allocate(2).unwrap();
        assert!(fresh.iter().all(|b| b_old.contains(b)));
        assert_eq!(p.cached_prefix(&old), 0);
        assert_eq!(p.cached_prefix(&new), 2);
        let batch = p.take_events().unwrap();
        assert_eq!(batch.sequence, 2);
        mirror(&mut index, &batch);
        assert_eq!(index, new.iter().copied().collect());
        // Referenced blocks are never evicted.
        assert_eq!(
            p.allocate(3),
            Err(OutOfBlocks {
                wanted: 3,
                available: 2
            })
        );
    }

    #[test]
    fn duplicate_commits_keep_the_first_block() {
        let mut p = pool(4);
        let hs = hashes("t", &[5, 5, 5, 5]);
        let a = p.allocate(1).unwrap();
        let b = p.allocate(1).unwrap();
        p.commit(None, &a, &hs);
        p.commit(None, &b, &hs);
        p.release(&b);
        // The duplicate went back to the free list, the original stays cached.
        assert_eq!(p.stats().free, 3);
        assert_eq!(p.acquire_prefix(&hs), a);
        let batch = p.take_events().unwrap();
        assert_eq!(
            batch.events.len(),
            1,
            "one Stored, no event for the duplicate"
        );
    }

    #[test]
    fn events_and_snapshot_agree_under_churn() {
        let mut p = pool(16);
        let mut index = HashSet::new();
        let mut held: Vec<Vec<BlockId>> = Vec::new();
        let mut seed = 3u64;
        for round in 0..300 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            let len = 4 * (1 + (seed >> 60) as usize % 4);
            let tokens: Vec<u32> = (0..len as u32)
                .map(|i| (i + (seed >> 50) as u32 % 3) % 7)
                .collect();
            let hs = hashes("t", &tokens);
            let mut blocks = p.acquire_prefix(&hs);
            let cached = blocks.len();
            if let Ok(new) = p.allocate(hs.len() - cached) {
                let parent = cached.checked_sub(1).map(|i| hs[i]);
                p.commit(parent, &new, &hs[cached..]);
                blocks.extend(new);
                held.push(blocks);
            } else {
                p.release(&blocks);
            }
            if round % 3 == 0 && !held.is_empty() {
                let victim = held.remove((seed >> 40) as usize % held.len());
                p.release(&victim);
            }
            if let Some(batch) = p.take_events() {
                mirror(&mut index, &batch);
            }
            let snap: HashSet<BlockHash> = p.snapshot(&[]).blocks.iter().map(|b| b.hash).collect();
            assert_eq!(index, snap, "round {round}");
            let s = p.stats();
            let referenced = (0..s.total as u32)
                .filter(|&b| p.refs(BlockId::new(b)) > 0)
                .count();
            assert_eq!(s.in_use, referenced, "round {round}");
            assert_eq!(s.in_use + s.cached + s.free, s.total);
        }
        for blocks in held {
            p.release(&blocks);
        }
        p.clear_cache();
        mirror(&mut index, &p.take_events().unwrap());
        assert!(index.is_empty());
        assert_eq!(p.stats().free, 16);
    }

    #[test]
    fn the_lru_list_keeps_the_order_of_a_reference_under_random_moves() {
        let mut lru = Lru::new(32);
        let mut reference: std::collections::VecDeque<u32> = Default::default();
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        for round in 0..5_000 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let b = (seed >> 33) as u32 % 32;
            match (seed >> 20) % 3 {
                0 if !reference.contains(&b) => {
                    lru.push_back(b);
                    reference.push_back(b);
                }
                1 => {
                    let was = reference.iter().position(|&x| x == b);
                    if let Some(i) = was {
                        reference.remove(i);
                    }
                    assert_eq!(lru.remove(b), was.is_some(), "round {round}");
                }
                _ => assert_eq!(lru.pop_front(), reference.pop_front(), "round {round}"),
            }
            assert_eq!(lru.len, reference.len());
            assert!(lru.iter().eq(reference.iter().copied()), "round {round}");
        }
    }
}

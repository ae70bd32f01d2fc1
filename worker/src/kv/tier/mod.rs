//! The KV spill tiers (issue #21): where a block goes when the device pool evicts it, and how it
//! comes back.
//!
//! ```text
//!   device pool (kv::pool + the executor's store)
//!      | evicted (LRU)                ^ imported into fresh blocks at admission
//!      v                              |
//!   host tier  (GPU workers: host memory, --kv-host)     } staged: bytes loaded for a
//!      | evicted (LRU)                ^                   } waiting request
//!      v                              |
//!   disk tier  (--kv-disk DIR --kv-disk-size; evicts for good only when full)
//! ```
//!
//! [`Tiers`] is owned by the engine and touched only from its thread. Demotion copies a block's
//! bytes out of the store (the executor's `export_block`) before the pool hands the block to its
//! next owner; the disk tier writes them on its own thread. A request whose prefix continues on a
//! lower tier has those blocks loaded while it waits in the queue ([`Tiers::fetch`]: host blocks
//! at once, disk reads on the I/O thread), and is admitted once they are staged: the engine then
//! copies them into fresh blocks and commits them to the prefix cache, so the running batch
//! never waits on a disk. A damaged block is a miss, counted, and its tokens are recomputed.
//!
//! Every change of what a lower tier holds is a KV event with its tier (Stored / Removed on
//! `Host` or `Disk`) in the pool's stream, and snapshots list the lower tiers' blocks too, so a
//! router's index knows each worker's blocks by tier. The disk tier is inclusive: a block loaded
//! back stays on disk, so evicting it again costs no write.
//!
//! Each worker measures what a block costs to bring back from each tier (read, checksum and
//! copy into the store, a moving average) and reports it with its load, so routers price a
//! prefix on disk against recomputing it elsewhere with this machine's figures.

pub mod disk;
pub mod host;
mod lru;

use bytes::Bytes;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tidelock_protocol::blocks::BlockLayout;
use tidelock_protocol::{BlockHash, KvEvent, Tier};

use disk::{DiskError, DiskTier, Done, ReadFault};
use host::HostTier;

/// Where the lower tiers live and how big they are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TierConfig {
    /// Bytes of the host tier; 0 for none (CPU workers: their pool already is host memory).
    pub host_bytes: u64,
    /// The disk tier's folder and byte budget.
    pub disk: Option<(PathBuf, u64)>,
}

impl TierConfig {
    pub fn is_empty(&self) -> bool {
        self.host_bytes == 0 && self.disk.is_none()
    }
}

/// Counters and gauges for metrics and load reports.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TierStats {
    pub host_blocks: u64,
    pub host_bytes: u64,
    pub disk_blocks: u64,
    pub disk_bytes: u64,
    /// Blocks demoted from the device pool (or the host tier) into each tier.
    pub stored_host: u64,
    pub stored_disk: u64,
    /// Blocks brought back into the device pool from each tier.
    pub loaded_host: u64,
    pub loaded_disk: u64,
    /// Blocks pulled from peer workers and brought into the device pool.
    pub loaded_peer: u64,
    /// Pulled blocks that did not arrive (the peer no longer held them, failed, or sent a
    /// damaged or foreign block): their tokens are recomputed.
    pub pull_missed: u64,
    /// Blocks the disk tier deleted for room.
    pub evicted_disk: u64,
    /// Loads that failed their checksum (or were not the block named): misses, recomputed.
    pub damaged: u64,
    /// Loads of files that could not be read, and writes that failed.
    pub io_errors: u64,
    /// Demotions dropped because the disk had too many bytes still to write.
    pub dropped: u64,
    /// Measured seconds per block brought back from each tier (0 until measured).
    pub host_block_secs: f64,
    pub disk_block_secs: f64,
    pub peer_block_secs: f64,
}

/// What [`Tiers::fetch`] found for a chain of blocks that continues a device prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fetch {
    /// Leading blocks staged, ready to import.
    pub ready: usize,
    /// A block right after them (or among them) is still being read: wait for it.
    pub pending: bool,
}

/// Where a staged block came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Host,
    Disk,
    /// Pulled from another worker (issue #21, point 3).
    Peer,
}

#[derive(Debug)]
enum Staged {
    /// Being read from disk or pulled from a peer.
    Loading,
    Ready {
        bytes: Bytes,
        source: Source,
        /// Seconds the tier (or the transfer) took to produce it.
        secs: f64,
    },
}

/// Moving average weight of a new measurement.
const EWMA: f64 = 0.2;

/// The lower tiers of one worker. See the module docs.
#[derive(Debug, Default)]
pub struct Tiers {
    layout: Option<BlockLayout>,
    host: HostTier,
    disk: Option<DiskTier>,
    staged: HashMap<BlockHash, Staged>,
    events: Vec<KvEvent>,
    stats: TierStats,
}

impl Tiers {
    /// No lower tiers: evicted blocks are forgotten.
    pub fn none() -> Self {
        Tiers::default()
    }

    /// No lower tiers, but blocks of `layout` can be staged: pulled from peers and imported.
    pub fn staging(layout: BlockLayout) -> Self {
        Tiers {
            layout: Some(layout),
            ..Tiers::default()
        }
    }

    /// Opens the tiers of `config` for blocks of `layout`; the disk tier indexes the blocks its
    /// folder already holds (a restarted worker's cache).
    pub fn open(config: &TierConfig, layout: BlockLayout) -> Result<Self, DiskError> {
        let disk = match &config.disk {
            Some((dir, bytes)) => {
                let (disk, opened) = DiskTier::open(dir, *bytes, layout)?;
                tracing::info!(
                    dir = %dir.display(),
                    blocks = opened.blocks,
                    capacity_blocks = disk.capacity_blocks(),
                    removed = opened.removed,
                    "KV disk tier opened"
                );
                Some(disk)
            }
            None => None,
        };
        let mut tiers = Tiers {
            layout: Some(layout),
            host: HostTier::new(config.host_bytes),
            disk,
            ..Tiers::default()
        };
        tiers.refresh_gauges();
        Ok(tiers)
    }

    /// Whether evicted blocks go anywhere.
    pub fn enabled(&self) -> bool {
        self.layout.is_some() && (self.host.enabled() || self.disk.is_some())
    }

    pub fn layout(&self) -> Option<&BlockLayout> {
        self.layout.as_ref()
    }

    /// The fastest lower tier holding `hash`.
    pub fn tier_of(&self, hash: &BlockHash) -> Option<Tier> {
        if self.host.contains(hash) {
            Some(Tier::Host)
        } else if self.disk.as_ref().is_some_and(|d| d.contains(hash)) {
            Some(Tier::Disk)
        } else {
            None
        }
    }

    /// A block the device pool evicted: keeps its bytes (written by `export`) on the first lower
    /// tier. A block the tier already holds is only marked used; nothing is copied.
    pub fn demote<E>(&mut self, hash: BlockHash, export: E)
    where
        E: FnOnce(&mut Vec<u8>) -> Result<(), crate::model::ModelError>,
    {
        self.keep(hash, export, false);
    }

    /// Writes a block still in the device pool through to the disk tier (shutdown: the volume
    /// outlives the process), waiting for room in the write queue rather than dropping it.
    /// Returns whether the disk tier holds it afterwards.
    pub fn persist<E>(&mut self, hash: BlockHash, export: E) -> bool
    where
        E: FnOnce(&mut Vec<u8>) -> Result<(), crate::model::ModelError>,
    {
        if self.disk.is_none() {
            return false;
        }
        if !self.disk.as_ref().is_some_and(|d| d.contains(&hash)) {
            let mut bytes = Vec::new();
            if export(&mut bytes).is_err() {
                return false;
            }
            self.onto_disk(hash, bytes.into(), true);
        }
        self.refresh_gauges();
        self.disk.as_ref().is_some_and(|d| d.contains(&hash))
    }

    fn keep<E>(&mut self, hash: BlockHash, export: E, wait: bool)
    where
        E: FnOnce(&mut Vec<u8>) -> Result<(), crate::model::ModelError>,
    {
        if !self.enabled() {
            return;
        }
        match self.tier_of(&hash) {
            Some(Tier::Host) => {
                self.host.get(&hash);
                return;
            }
            Some(Tier::Disk) if !self.host.enabled() => {
                if let Some(d) = self.disk.as_mut() {
                    d.touch(&hash);
                }
                return;
            }
            _ => {}
        }
        let mut bytes = Vec::new();
        if let Err(e) = export(&mut bytes) {
            tracing::warn!(%hash, error = %e, "cannot copy an evicted KV block out; it is forgotten");
            return;
        }
        let bytes: Bytes = bytes.into();
        if self.host.enabled() {
            let pushed = self.host.insert(hash, bytes);
            let kept = !pushed.iter().any(|(h, _)| *h == hash);
            for (old, bytes) in pushed {
                if old != hash {
                    self.event(false, Tier::Host, old);
                }
                self.onto_disk(old, bytes, wait);
            }
            if kept {
                self.stats.stored_host += 1;
                self.event(true, Tier::Host, hash);
            }
        } else {
            self.onto_disk(hash, bytes, wait);
        }
        self.refresh_gauges();
    }

    fn onto_disk(&mut self, hash: BlockHash, bytes: Bytes, wait: bool) {
        let Some(disk) = self.disk.as_mut() else {
            return;
        };
        if disk.contains(&hash) {
            disk.touch(&hash);
            return;
        }
        match disk.insert(hash, bytes, wait) {
            Some(evicted) => {
                self.stats.stored_disk += 1;
                self.stats.evicted_disk += evicted.len() as u64;
                for old in evicted {
                    self.event(false, Tier::Disk, old);
                }
                self.event(true, Tier::Disk, hash);
            }
            None => self.stats.dropped += 1,
        }
    }

    /// For a chain of blocks that continues a request's device prefix: how many leading blocks
    /// are staged, starting the loads of every block of the chain held on a lower tier (host
    /// blocks are staged at once, disk blocks read on the I/O thread). Call it again later: the
    /// answer grows as reads finish.
    pub fn fetch(&mut self, chain: &[BlockHash]) -> Fetch {
        let mut fetch = Fetch {
            ready: 0,
            pending: false,
        };
        if self.layout.is_none() {
            return fetch;
        }
        for hash in chain {
            if !self.staged.contains_key(hash) && !self.start(*hash) {
                break;
            }
            match self.staged.get(hash) {
                Some(Staged::Ready { .. }) if !fetch.pending => fetch.ready += 1,
                Some(Staged::Loading) => fetch.pending = true,
                _ => {}
            }
        }
        fetch
    }

    /// How many leading blocks of `chain` this worker can bring up without a peer: staged (or
    /// being loaded) or held on a lower tier.
    pub fn reach(&self, chain: &[BlockHash]) -> usize {
        chain
            .iter()
            .take_while(|h| self.staged.contains_key(h) || self.tier_of(h).is_some())
            .count()
    }

    /// Marks blocks about to be pulled from a peer as loading (those not staged already);
    /// returns the ones to ask for. None when this worker cannot import blocks.
    pub fn expect(&mut self, chain: &[BlockHash]) -> Vec<BlockHash> {
        if self.layout.is_none() {
            return Vec::new();
        }
        let asked: Vec<BlockHash> = chain
            .iter()
            .filter(|h| !self.staged.contains_key(h))
            .copied()
            .collect();
        for h in &asked {
            self.staged.insert(*h, Staged::Loading);
        }
        asked
    }

    /// A pulled block arrived (checked against its checksum and this worker's layout); `secs`
    /// is its share of the transfer.
    pub fn arrived(&mut self, hash: BlockHash, bytes: Bytes, secs: f64) {
        if matches!(self.staged.get(&hash), Some(Staged::Loading)) {
            self.staged.insert(
                hash,
                Staged::Ready {
                    bytes,
                    source: Source::Peer,
                    secs,
                },
            );
        }
    }

    /// Pulled blocks that will not come; their requests compute those tokens.
    pub fn missed(&mut self, hashes: &[BlockHash]) {
        for hash in hashes {
            if matches!(self.staged.get(hash), Some(Staged::Loading)) {
                self.staged.remove(hash);
                self.stats.pull_missed += 1;
            }
        }
    }

    /// A host-tier block's bytes (a peer's pull), without touching its recency.
    pub fn host_bytes(&self, hash: &BlockHash) -> Option<Bytes> {
        self.host.peek(hash)
    }

    /// Reads this worker's disk tier from any thread (a peer's pull of blocks on disk).
    pub fn disk_reader(&self) -> Option<disk::DiskReader> {
        self.disk.as_ref().map(DiskTier::reader)
    }

    /// Starts bringing `hash` up from the fastest tier holding it; false when none does.
    fn start(&mut self, hash: BlockHash) -> bool {
        if let Some(bytes) = self.host.get(&hash) {
            self.staged.insert(
                hash,
                Staged::Ready {
                    bytes,
                    source: Source::Host,
                    secs: 0.0,
                },
            );
            return true;
        }
        match self.disk.as_mut() {
            Some(disk) if disk.contains(&hash) => {
                disk.read(hash);
                self.staged.insert(hash, Staged::Loading);
                true
            }
            _ => false,
        }
    }

    /// Takes a staged block's bytes to import it; the caller reports the copy with
    /// [`Tiers::imported`].
    pub fn take_staged(&mut self, hash: &BlockHash) -> Option<(Bytes, Source, f64)> {
        match self.staged.remove(hash)? {
            Staged::Ready {
                bytes,
                source,
                secs,
            } => Some((bytes, source, secs)),
            loading => {
                self.staged.insert(*hash, loading);
                None
            }
        }
    }

    /// A staged block from `source` was copied into the store: `secs` for the whole trip.
    pub fn imported(&mut self, source: Source, secs: f64) {
        let (count, average) = match source {
            Source::Host => (&mut self.stats.loaded_host, &mut self.stats.host_block_secs),
            Source::Disk => (&mut self.stats.loaded_disk, &mut self.stats.disk_block_secs),
            Source::Peer => (&mut self.stats.loaded_peer, &mut self.stats.peer_block_secs),
        };
        *count += 1;
        *average = match *average {
            0.0 => secs,
            a => a + EWMA * (secs - a),
        };
    }

    /// Whether reads are outstanding.
    pub fn loading(&self) -> bool {
        self.staged.values().any(|s| matches!(s, Staged::Loading))
    }

    /// Takes in what the I/O thread finished; with `wait`, blocks up to it for the first.
    pub fn poll(&mut self, wait: Option<Duration>) {
        let Some(disk) = self.disk.as_ref() else {
            return;
        };
        let mut done = Vec::new();
        if let Some(first) = wait.and_then(|t| disk.wait_done(t)) {
            done.push(first);
        }
        while let Some(d) = disk.try_done() {
            done.push(d);
        }
        for d in done {
            self.finish(d);
        }
        self.refresh_gauges();
    }

    fn finish(&mut self, done: Done) {
        match done {
            Done::Read {
                hash,
                result: Ok(bytes),
                secs,
            } => {
                if matches!(self.staged.get(&hash), Some(Staged::Loading)) {
                    self.staged.insert(
                        hash,
                        Staged::Ready {
                            bytes,
                            source: Source::Disk,
                            secs,
                        },
                    );
                }
            }
            Done::Read {
                hash,
                result: Err(fault),
                ..
            } => {
                self.staged.remove(&hash);
                match &fault {
                    ReadFault::Damaged(why) => {
                        self.stats.damaged += 1;
                        tracing::warn!(%hash, why, "a KV block on disk is damaged; recomputing it");
                    }
                    ReadFault::Unreadable(why) => {
                        self.stats.io_errors += 1;
                        tracing::warn!(%hash, why, "cannot read a KV block from disk; recomputing it");
                    }
                }
                self.forget_disk(&hash);
            }
            Done::WriteFailed { hash, error } => {
                self.stats.io_errors += 1;
                tracing::warn!(%hash, error, "cannot write a KV block to disk; it is forgotten");
                self.forget_disk(&hash);
            }
        }
    }

    fn forget_disk(&mut self, hash: &BlockHash) {
        if self.disk.as_mut().is_some_and(|d| d.remove(hash)) {
            self.event(false, Tier::Disk, *hash);
        }
    }

    /// Drops staged blocks no waiting request wants any more (`wanted` says which are).
    pub fn prune(&mut self, wanted: impl Fn(&BlockHash) -> bool) {
        self.staged
            .retain(|h, s| matches!(s, Staged::Loading) || wanted(h));
    }

    pub fn staged_len(&self) -> usize {
        self.staged.len()
    }

    /// Waits for queued disk writes, at most `timeout` (shutdown); whether all finished.
    pub fn flush(&self, timeout: Duration) -> bool {
        self.disk.as_ref().is_none_or(|d| d.flush(timeout))
    }

    /// The events since the last call, in order.
    pub fn take_events(&mut self) -> Vec<KvEvent> {
        std::mem::take(&mut self.events)
    }

    /// Every block on a lower tier, with the fastest tier holding it (for snapshots).
    pub fn blocks(&self) -> Vec<(BlockHash, Tier)> {
        let mut out: Vec<(BlockHash, Tier)> =
            self.host.hashes().map(|h| (*h, Tier::Host)).collect();
        if let Some(disk) = &self.disk {
            out.extend(
                disk.hashes()
                    .filter(|h| !self.host.contains(h))
                    .map(|h| (*h, Tier::Disk)),
            );
        }
        out
    }

    pub fn stats(&self) -> TierStats {
        self.stats
    }

    fn refresh_gauges(&mut self) {
        self.stats.host_blocks = self.host.len() as u64;
        self.stats.host_bytes = self.host.used_bytes();
        self.stats.disk_blocks = self.disk.as_ref().map_or(0, |d| d.len() as u64);
        self.stats.disk_bytes = self.disk.as_ref().map_or(0, |d| d.used_bytes());
    }

    /// Records a block entering (`stored`) or leaving a tier, merged into the previous event
    /// when it is of the same kind and tier.
    fn event(&mut self, stored: bool, tier: Tier, hash: BlockHash) {
        match (self.events.last_mut(), stored) {
            (
                Some(KvEvent::Stored {
                    blocks, tier: t, ..
                }),
                true,
            )
            | (Some(KvEvent::Removed { blocks, tier: t }), false)
                if *t == tier =>
            {
                blocks.push(hash);
            }
            (_, true) => self.events.push(KvEvent::Stored {
                parent: None,
                blocks: vec![hash],
                tier,
            }),
            (_, false) => self.events.push(KvEvent::Removed {
                blocks: vec![hash],
                tier,
            }),
        }
    }
}

/// Measures a closure's seconds.
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let started = Instant::now();
    let out = f();
    (out, started.elapsed().as_secs_f64())
}

#[cfg(test)]
mod tests;

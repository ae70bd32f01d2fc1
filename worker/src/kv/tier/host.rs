//! The host tier: blocks evicted from a device's memory, kept in host memory up to a byte budget.
//! On a CPU worker the device pool already is host memory, so this tier is off (size 0) and
//! evicted blocks go straight to disk. Buffers are ordinary heap memory: pinned (page-locked)
//! buffers would let a GPU copy them asynchronously, which candle does not expose yet.

use bytes::Bytes;
use std::collections::HashMap;

use tidelock_protocol::BlockHash;

use super::lru::Lru;

#[derive(Debug, Default)]
pub struct HostTier {
    capacity: u64,
    used: u64,
    lru: Lru,
    data: HashMap<BlockHash, Bytes>,
}

impl HostTier {
    pub fn new(capacity: u64) -> Self {
        HostTier {
            capacity,
            ..HostTier::default()
        }
    }

    pub fn enabled(&self) -> bool {
        self.capacity > 0
    }

    pub fn contains(&self, hash: &BlockHash) -> bool {
        self.data.contains_key(hash)
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn used_bytes(&self) -> u64 {
        self.used
    }

    /// The block's bytes, leaving its recency alone.
    pub fn peek(&self, hash: &BlockHash) -> Option<Bytes> {
        self.data.get(hash).cloned()
    }

    /// The block's bytes, now the most recently used.
    pub fn get(&mut self, hash: &BlockHash) -> Option<Bytes> {
        let bytes = self.data.get(hash)?.clone();
        self.lru.touch(*hash);
        Some(bytes)
    }

    /// Keeps a block; returns the least recently used blocks pushed out to make room (for the
    /// next tier). A block larger than the whole tier is returned at once.
    pub fn insert(&mut self, hash: BlockHash, bytes: Bytes) -> Vec<(BlockHash, Bytes)> {
        let size = bytes.len() as u64;
        if size > self.capacity {
            return vec![(hash, bytes)];
        }
        if self.data.contains_key(&hash) {
            self.lru.touch(hash);
            return Vec::new();
        }
        let mut out = Vec::new();
        while self.used + size > self.capacity {
            let Some(old) = self.lru.pop_oldest() else {
                break;
            };
            if let Some(b) = self.data.remove(&old) {
                self.used -= b.len() as u64;
                out.push((old, b));
            }
        }
        self.used += size;
        self.lru.touch(hash);
        self.data.insert(hash, bytes);
        out
    }

    pub fn hashes(&self) -> impl Iterator<Item = &BlockHash> {
        self.data.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_recently_used_block_makes_room() {
        let h = |i: u8| BlockHash::from_bytes([i; 16]);
        let bytes = |n: usize| -> Bytes { vec![7u8; n].into() };
        let mut t = HostTier::new(300);
        assert!(t.insert(h(1), bytes(100)).is_empty());
        assert!(t.insert(h(2), bytes(100)).is_empty());
        assert!(t.insert(h(3), bytes(100)).is_empty());
        t.get(&h(1));
        let out = t.insert(h(4), bytes(100));
        assert_eq!(out.iter().map(|(h, _)| *h).collect::<Vec<_>>(), [h(2)]);
        assert_eq!(t.used_bytes(), 300);
        assert!(t.contains(&h(1)) && !t.contains(&h(2)));
        assert_eq!(t.insert(h(5), bytes(301)).len(), 1, "too big: passed on");
    }
}

//! Least-recently-used order over block hashes.

use std::collections::{BTreeSet, HashMap};

use tidelock_protocol::BlockHash;

/// Block hashes in the order they were last touched.
#[derive(Debug, Default)]
pub(super) struct Lru {
    ticks: HashMap<BlockHash, u64>,
    order: BTreeSet<(u64, BlockHash)>,
    tick: u64,
}

impl Lru {
    pub(super) fn len(&self) -> usize {
        self.ticks.len()
    }

    pub(super) fn contains(&self, hash: &BlockHash) -> bool {
        self.ticks.contains_key(hash)
    }

    /// Inserts `hash`, or makes it the most recently used.
    pub(super) fn touch(&mut self, hash: BlockHash) {
        self.tick += 1;
        if let Some(old) = self.ticks.insert(hash, self.tick) {
            self.order.remove(&(old, hash));
        }
        self.order.insert((self.tick, hash));
    }

    pub(super) fn remove(&mut self, hash: &BlockHash) -> bool {
        match self.ticks.remove(hash) {
            Some(tick) => self.order.remove(&(tick, *hash)),
            None => false,
        }
    }

    pub(super) fn pop_oldest(&mut self) -> Option<BlockHash> {
        let (_, hash) = self.order.pop_first()?;
        self.ticks.remove(&hash);
        Some(hash)
    }

    /// Oldest first.
    pub(super) fn iter(&self) -> impl Iterator<Item = &BlockHash> {
        self.order.iter().map(|(_, h)| h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touching_moves_a_hash_to_the_back() {
        let h = |i: u8| BlockHash::from_bytes([i; 16]);
        let mut lru = Lru::default();
        for i in 0..3 {
            lru.touch(h(i));
        }
        lru.touch(h(0));
        assert_eq!(lru.iter().copied().collect::<Vec<_>>(), [h(1), h(2), h(0)]);
        assert!(lru.remove(&h(2)));
        assert!(!lru.remove(&h(2)));
        assert_eq!(lru.pop_oldest(), Some(h(1)));
        assert_eq!(lru.len(), 1);
        assert!(lru.contains(&h(0)));
    }
}

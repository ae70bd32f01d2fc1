//! The values a [`StateStore`](crate::StateStore) speaks in: revisions, leases, key-values, watch
//! events and compare-and-swap outcomes.
//!
//! They mirror etcd's data model (one global revision counter, per-key create/mod revisions, leases
//! that own keys) so that the in-memory store and the etcd store can be swapped without any caller
//! noticing. Keys are UTF-8 strings; values are opaque bytes.

use std::fmt;

/// The store's global, monotonically increasing change counter. Every write that changes something
/// takes the next revision; all the changes of one atomic write share it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Revision(pub i64);

impl Revision {
    /// The revision before the first write: `watch(dir, Revision::ZERO)` replays all history.
    pub const ZERO: Revision = Revision(0);

    /// The revision as a number.
    pub fn get(self) -> i64 {
        self.0
    }
}

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A lease: a time-to-live that keys can be bound to. When the lease expires (it was not kept
/// alive within its TTL) or is revoked, every key bound to it is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LeaseId(pub i64);

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// One stored key with its value and bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision at which the key was (last) created.
    pub create_revision: Revision,
    /// Revision of the last write to this key.
    pub mod_revision: Revision,
    /// Number of writes since the key was created (1 after the create).
    pub version: i64,
    /// The lease the key is bound to, if any.
    pub lease: Option<LeaseId>,
}

/// The keys under a directory, read at one revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// Sorted by key.
    pub kvs: Vec<KeyValue>,
    /// The store's revision when the listing was taken: watch from here to miss nothing.
    pub revision: Revision,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// The key was created or overwritten.
    Put(KeyValue),
    /// The key was deleted (explicitly, or because its lease ended).
    Delete { key: String, revision: Revision },
}

impl WatchEvent {
    /// The revision of the change.
    pub fn revision(&self) -> Revision {
        match self {
            WatchEvent::Put(kv) => kv.mod_revision,
            WatchEvent::Delete { revision, .. } => *revision,
        }
    }

    /// The key that changed.
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put(kv) => &kv.key,
            WatchEvent::Delete { key, .. } => key,
        }
    }
}

/// What a compare-and-swap expects to find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    /// The key does not exist.
    Absent,
    /// The key exists and was last written at this revision.
    ModRevision(Revision),
}

/// The result of a compare-and-swap: a conflict is an answer, not an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CasOutcome {
    /// The expectation held and the write happened at this revision.
    Swapped(Revision),
    /// The expectation did not hold; nothing was written. Carries what is there now.
    Conflict(Option<KeyValue>),
}

impl CasOutcome {
    /// Whether the write happened.
    pub fn is_swapped(&self) -> bool {
        matches!(self, CasOutcome::Swapped(_))
    }
}

/// Normalises a directory to the prefix that matches exactly the keys below it: `a/b` and `a/b/`
/// both become `a/b/`, so `a/bc/x` never matches. The empty directory is the whole keyspace.
pub fn dir_prefix(dir: &str) -> String {
    if dir.is_empty() || dir.ends_with('/') {
        dir.to_owned()
    } else {
        format!("{dir}/")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_prefix_is_exact() {
        assert_eq!(dir_prefix("a/b"), "a/b/");
        assert_eq!(dir_prefix("a/b/"), "a/b/");
        assert_eq!(dir_prefix(""), "");
        assert!(!"a/bc/x".starts_with(&dir_prefix("a/b")));
        assert!("a/b/x".starts_with(&dir_prefix("a/b")));
    }
}

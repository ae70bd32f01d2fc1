//! In-memory [`StateStore`]: the state of `tidelock up` (one machine, no etcd) and of unit tests.
//!
//! It keeps etcd's semantics, not just its API, so code tested against it behaves the same on etcd:
//! a global revision, per-key create/mod revisions, a bounded history that watches replay from
//! (older history gives [`StateError::Compacted`]), leases that delete their keys on expiry, and
//! one revision per atomic change. All state sits behind one mutex that is never held across an
//! `.await`. A watcher that falls behind (its buffer is full) is dropped and its stream quietly
//! re-subscribes from the last revision it delivered, replaying from history: slow consumers cost
//! memory in the history, never in unbounded per-watcher queues.
//!
//! Lease expiry is applied on every operation and by a sweeper task (when a Tokio runtime is
//! present at construction), so watchers see expiry deletes promptly even when the store is idle.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::error::StateError;
use crate::store::{StateStore, WatchStream, check_expected, check_key, ttl_seconds};
use crate::types::{
    CasOutcome, Expected, KeyValue, LeaseId, Listing, Revision, WatchEvent, dir_prefix,
};

/// How many changes the store remembers for watches that start in the past.
const DEFAULT_HISTORY: usize = 100_000;
/// Revisions buffered per watcher before it is considered lagging and re-subscribed.
const WATCH_BUFFER: usize = 1024;
/// How often the sweeper looks for expired leases.
const SWEEP_PERIOD: Duration = Duration::from_millis(100);

/// The in-memory state store. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct MemoryStore {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
}

struct State {
    revision: Revision,
    kvs: BTreeMap<String, KeyValue>,
    leases: HashMap<LeaseId, Lease>,
    next_lease: i64,
    /// Changes with revisions in `(compacted, revision]`, oldest first.
    history: VecDeque<WatchEvent>,
    history_limit: usize,
    compacted: Revision,
    watchers: Vec<Watcher>,
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

/// The changes of one revision under one watcher's directory.
type Batch = Vec<WatchEvent>;

struct Watcher {
    prefix: String,
    /// One message per revision: the changes of one atomic write never arrive split.
    tx: mpsc::Sender<Vec<WatchEvent>>,
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.shared.lock();
        f.debug_struct("MemoryStore")
            .field("revision", &state.revision)
            .field("keys", &state.kvs.len())
            .field("leases", &state.leases.len())
            .field("watchers", &state.watchers.len())
            .finish()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store remembering the last 100,000 changes for watches.
    pub fn new() -> Self {
        Self::with_history(DEFAULT_HISTORY)
    }

    /// An empty store remembering the last `history` changes (at least 1) for watches.
    pub fn with_history(history: usize) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                revision: Revision::ZERO,
                kvs: BTreeMap::new(),
                leases: HashMap::new(),
                next_lease: 1,
                history: VecDeque::new(),
                history_limit: history.max(1),
                compacted: Revision::ZERO,
                watchers: Vec::new(),
            }),
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(sweep(Arc::downgrade(&shared)));
        }
        MemoryStore { shared }
    }

    /// Drops every watcher's connection, as a network failure would; their streams must resume
    /// from where they were without losing or repeating a change. For the conformance suite.
    #[cfg(any(test, feature = "testing"))]
    pub fn disconnect_watchers(&self) {
        self.shared.lock().watchers.clear();
    }
}

async fn sweep(shared: Weak<Shared>) {
    loop {
        tokio::time::sleep(SWEEP_PERIOD).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        drop(shared.lock());
    }
}

impl Shared {
    /// Locks the state, first applying any lease expiry that is due.
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that matters
        // more than refusing all further service, so recover the guard.
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.expire(Instant::now());
        state
    }
}

impl State {
    fn expire(&mut self, now: Instant) {
        let mut expired: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, lease)| lease.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        expired.sort();
        for id in expired {
            self.end_lease(id);
        }
    }

    /// Removes a lease and deletes its keys in one revision.
    fn end_lease(&mut self, id: LeaseId) -> bool {
        let Some(lease) = self.leases.remove(&id) else {
            return false;
        };
        if !lease.keys.is_empty() {
            let revision = self.next_revision();
            let events = lease
                .keys
                .into_iter()
                .filter_map(|key| self.kvs.remove(&key).map(|_| key))
                .map(|key| WatchEvent::Delete { key, revision })
                .collect();
            self.commit(events);
        }
        true
    }

    fn next_revision(&self) -> Revision {
        Revision(self.revision.0 + 1)
    }

    /// Records the changes of one revision and hands them to the watchers.
    fn commit(&mut self, events: Vec<WatchEvent>) {
        let Some(first) = events.first() else {
            return;
        };
        self.revision = first.revision();
        for event in &events {
            self.history.push_back(event.clone());
        }
        while self.history.len() > self.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.compacted = old.revision();
            }
        }
        self.watchers.retain(|w| {
            let mine: Vec<WatchEvent> = events
                .iter()
                .filter(|e| e.key().starts_with(&w.prefix))
                .cloned()
                .collect();
            // A full or closed channel drops the watcher; its stream re-subscribes from history.
            mine.is_empty() || w.tx.try_send(mine).is_ok()
        });
    }

    fn lease_exists(&self, lease: Option<LeaseId>) -> Result<(), StateError> {
        match lease {
            Some(id) if !self.leases.contains_key(&id) => Err(StateError::LeaseNotFound(id)),
            _ => Ok(()),
        }
    }

    fn put(&mut self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Revision {
        let revision = self.next_revision();
        let old = self.kvs.get(key);
        let old_lease = old.and_then(|kv| kv.lease);
        let kv = KeyValue {
            key: key.to_owned(),
            value,
            create_revision: old.map_or(revision, |kv| kv.create_revision),
            mod_revision: revision,
            version: old.map_or(1, |kv| kv.version + 1),
            lease,
        };
        if old_lease != lease {
            if let Some(l) = old_lease.and_then(|id| self.leases.get_mut(&id)) {
                l.keys.remove(key);
            }
            if let Some(l) = lease.and_then(|id| self.leases.get_mut(&id)) {
                l.keys.insert(key.to_owned());
            }
        }
        self.kvs.insert(key.to_owned(), kv.clone());
        self.commit(vec![WatchEvent::Put(kv)]);
        revision
    }

    fn delete(&mut self, key: &str) -> Option<Revision> {
        let old = self.kvs.remove(key)?;
        if let Some(l) = old.lease.and_then(|id| self.leases.get_mut(&id)) {
            l.keys.remove(key);
        }
        let revision = self.next_revision();
        self.commit(vec![WatchEvent::Delete {
            key: key.to_owned(),
            revision,
        }]);
        Some(revision)
    }

    fn matches(&self, key: &str, expected: Expected) -> bool {
        match (expected, self.kvs.get(key)) {
            (Expected::Absent, None) => true,
            (Expected::ModRevision(rev), Some(kv)) => kv.mod_revision == rev,
            _ => false,
        }
    }

    /// Subscribes a new watcher and returns the history it missed, grouped by revision.
    fn subscribe(
        &mut self,
        prefix: &str,
        after: Revision,
    ) -> Result<(VecDeque<Batch>, mpsc::Receiver<Batch>), StateError> {
        if after < self.compacted {
            return Err(StateError::Compacted {
                requested: after,
                compacted: self.compacted,
            });
        }
        let mut backlog: VecDeque<Vec<WatchEvent>> = VecDeque::new();
        for event in self
            .history
            .iter()
            .filter(|e| e.revision() > after && e.key().starts_with(prefix))
        {
            match backlog.back_mut() {
                Some(batch) if batch[0].revision() == event.revision() => batch.push(event.clone()),
                _ => backlog.push_back(vec![event.clone()]),
            }
        }
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        self.watchers.push(Watcher {
            prefix: prefix.to_owned(),
            tx,
        });
        Ok((backlog, rx))
    }
}

/// The state a memory watch stream carries between items.
struct WatchCursor {
    shared: Arc<Shared>,
    prefix: String,
    /// The last revision moved into `pending`.
    last: Revision,
    backlog: VecDeque<Vec<WatchEvent>>,
    rx: Option<mpsc::Receiver<Vec<WatchEvent>>>,
    pending: VecDeque<WatchEvent>,
    failed: bool,
}

impl WatchCursor {
    async fn next(&mut self) -> Option<Result<WatchEvent, StateError>> {
        loop {
            if self.failed {
                return None;
            }
            if let Some(event) = self.pending.pop_front() {
                return Some(Ok(event));
            }
            let batch = match self.backlog.pop_front() {
                Some(batch) => Some(batch),
                None => match self.rx.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => None,
                },
            };
            match batch {
                Some(batch) => {
                    // After a re-subscribe, the live channel can repeat what the backlog held.
                    if batch[0].revision() > self.last {
                        self.last = batch[0].revision();
                        self.pending.extend(batch);
                    }
                }
                None => {
                    // Disconnected or lagging: resume from the last revision delivered.
                    let resumed = self.shared.lock().subscribe(&self.prefix, self.last);
                    match resumed {
                        Ok((backlog, rx)) => {
                            self.backlog = backlog;
                            self.rx = Some(rx);
                        }
                        Err(error) => {
                            self.failed = true;
                            return Some(Err(error));
                        }
                    }
                }
            }
        }
    }
}

#[async_trait]
impl StateStore for MemoryStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StateError> {
        Ok(self.shared.lock().kvs.get(key).cloned())
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StateError> {
        check_key(key)?;
        let mut state = self.shared.lock();
        state.lease_exists(lease)?;
        Ok(state.put(key, value, lease))
    }

    async fn delete(&self, key: &str) -> Result<Option<Revision>, StateError> {
        check_key(key)?;
        Ok(self.shared.lock().delete(key))
    }

    async fn list(&self, dir: &str) -> Result<Listing, StateError> {
        let prefix = dir_prefix(dir);
        let state = self.shared.lock();
        let kvs = state
            .kvs
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(_, kv)| kv.clone())
            .collect();
        Ok(Listing {
            kvs,
            revision: state.revision,
        })
    }

    async fn watch(&self, dir: &str, after: Revision) -> Result<WatchStream, StateError> {
        let prefix = dir_prefix(dir);
        let (backlog, rx) = self.shared.lock().subscribe(&prefix, after)?;
        let cursor = WatchCursor {
            shared: self.shared.clone(),
            prefix,
            last: after,
            backlog,
            rx: Some(rx),
            pending: VecDeque::new(),
            failed: false,
        };
        Ok(Box::pin(futures::stream::unfold(
            cursor,
            |mut cursor| async move { cursor.next().await.map(|item| (item, cursor)) },
        )))
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StateError> {
        let ttl = Duration::from_secs(ttl_seconds(ttl)?.unsigned_abs());
        let mut state = self.shared.lock();
        let id = LeaseId(state.next_lease);
        state.next_lease += 1;
        state.leases.insert(
            id,
            Lease {
                ttl,
                deadline: Instant::now() + ttl,
                keys: BTreeSet::new(),
            },
        );
        Ok(id)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StateError> {
        let mut state = self.shared.lock();
        let l = state
            .leases
            .get_mut(&lease)
            .ok_or(StateError::LeaseNotFound(lease))?;
        l.deadline = Instant::now() + l.ttl;
        Ok(l.ttl)
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StateError> {
        if self.shared.lock().end_lease(lease) {
            Ok(())
        } else {
            Err(StateError::LeaseNotFound(lease))
        }
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Expected,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<CasOutcome, StateError> {
        check_key(key)?;
        check_expected(expected)?;
        let mut state = self.shared.lock();
        state.lease_exists(lease)?;
        if !state.matches(key, expected) {
            return Ok(CasOutcome::Conflict(state.kvs.get(key).cloned()));
        }
        Ok(CasOutcome::Swapped(state.put(key, value, lease)))
    }

    async fn compare_and_delete(
        &self,
        key: &str,
        expected: Expected,
    ) -> Result<CasOutcome, StateError> {
        check_key(key)?;
        check_expected(expected)?;
        let mut state = self.shared.lock();
        if expected == Expected::Absent || !state.matches(key, expected) {
            return Ok(CasOutcome::Conflict(state.kvs.get(key).cloned()));
        }
        match state.delete(key) {
            Some(revision) => Ok(CasOutcome::Swapped(revision)),
            None => Ok(CasOutcome::Conflict(None)),
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    #[tokio::test]
    async fn watch_before_compacted_history_is_an_error() {
        let store = MemoryStore::with_history(3);
        for i in 0..5 {
            store.put(&format!("d/{i}"), vec![], None).await.unwrap();
        }
        // Revisions 1..=5 written; only 3..=5 remain, so "after 2" is still complete.
        assert!(store.watch("d", Revision(2)).await.is_ok());
        match store.watch("d", Revision(1)).await {
            Err(StateError::Compacted {
                requested,
                compacted,
            }) => {
                assert_eq!(requested, Revision(1));
                assert_eq!(compacted, Revision(2));
            }
            other => panic!("expected Compacted, got {:?}", other.map(|_| ())),
        }
    }

    #[tokio::test]
    async fn lagging_watcher_resumes_from_history_without_loss() {
        let store = MemoryStore::new();
        let mut watch = store.watch("d", Revision::ZERO).await.unwrap();
        // Overflow the watcher's buffer while nobody reads.
        let n = WATCH_BUFFER as i64 + 50;
        for i in 0..n {
            store.put(&format!("d/{i}"), vec![], None).await.unwrap();
        }
        for expected in 1..=n {
            let event = watch.next().await.unwrap().unwrap();
            assert_eq!(event.revision(), Revision(expected));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn lease_expiry_follows_the_clock() {
        let store = MemoryStore::new();
        let lease = store.grant_lease(Duration::from_secs(3)).await.unwrap();
        store.put("k", b"v".to_vec(), Some(lease)).await.unwrap();
        tokio::time::advance(Duration::from_millis(2900)).await;
        assert!(store.get("k").await.unwrap().is_some());
        tokio::time::advance(Duration::from_millis(200)).await;
        assert!(store.get("k").await.unwrap().is_none());
        assert!(matches!(
            store.keep_alive(lease).await,
            Err(StateError::LeaseNotFound(_))
        ));
    }
}

//! Which workers serve a model, from the StateStore: every worker registers
//! `workers/<model>/<worker>` ([`WorkerRegistration`]) under a lease it keeps alive, so the key
//! vanishes when the worker stops or dies. Discovery lists that directory once, then watches it
//! from the listing's revision, and keeps the set current: one [`Follower`] per worker feeding
//! the shared KV index. A worker whose key is deleted leaves the set and the index; a changed
//! registration (new address after a restart) restarts its follower. If the watch breaks (the
//! store restarted, or compacted the history the watch needed), it lists again: nothing is missed.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use tidelock_protocol::{KeyLayout, ModelName, WorkerId, WorkerRegistration};
use tidelock_state::{KeyValue, StateStore, WatchEvent};
use tokio::task::JoinHandle;

use crate::follow::Follower;
use crate::index::KvIndex;

/// Wait before listing again after the store failed.
const RETRY: Duration = Duration::from_millis(200);

/// A known worker and the task following its KV events.
#[derive(Debug)]
struct Known {
    registration: WorkerRegistration,
    follower: JoinHandle<()>,
}

impl Drop for Known {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

/// The workers of one model, kept current from the StateStore.
#[derive(Clone)]
pub struct Discovery {
    store: Arc<dyn StateStore>,
    layout: KeyLayout,
    model: ModelName,
    index: Arc<RwLock<KvIndex>>,
    known: Arc<RwLock<BTreeMap<WorkerId, Known>>>,
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery")
            .field("model", &self.model)
            .field("workers", &self.workers().len())
            .finish_non_exhaustive()
    }
}

impl Discovery {
    pub fn new(
        store: Arc<dyn StateStore>,
        layout: KeyLayout,
        model: ModelName,
        index: Arc<RwLock<KvIndex>>,
    ) -> Self {
        Discovery {
            store,
            layout,
            model,
            index,
            known: Arc::default(),
        }
    }

    /// The workers known now, with their registrations.
    pub fn workers(&self) -> BTreeMap<WorkerId, WorkerRegistration> {
        self.known
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(id, k)| (id.clone(), k.registration.clone()))
            .collect()
    }

    /// Runs until the task is aborted: list, watch, and list again whenever the watch breaks.
    pub async fn run(self) {
        let dir = self.layout.workers_of(&self.model);
        loop {
            if let Err(e) = self.list_and_watch(&dir).await {
                tracing::warn!(model = %self.model, error = %e, "worker discovery: the state store failed; listing again");
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    async fn list_and_watch(&self, dir: &str) -> Result<(), tidelock_state::StateError> {
        let listing = self.store.list(dir).await?;
        let present: BTreeMap<WorkerId, WorkerRegistration> =
            listing.kvs.iter().filter_map(|kv| self.parse(kv)).collect();
        // Workers that went away while nobody watched.
        let gone: Vec<WorkerId> = self
            .known
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .filter(|id| !present.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            self.remove(&id);
        }
        for (id, registration) in present {
            self.upsert(id, registration);
        }
        let mut watch = self.store.watch(dir, listing.revision).await?;
        while let Some(event) = watch.next().await {
            match event? {
                WatchEvent::Put(kv) => {
                    if let Some((id, registration)) = self.parse(&kv) {
                        self.upsert(id, registration);
                    }
                }
                WatchEvent::Delete { key, .. } => {
                    if let Some((model, id)) = self.layout.parse_worker(&key)
                        && model == self.model
                    {
                        self.remove(&id);
                    }
                }
            }
        }
        Ok(())
    }

    /// A registration record, or `None` (logged) for a key or value that is not one.
    fn parse(&self, kv: &KeyValue) -> Option<(WorkerId, WorkerRegistration)> {
        let (model, id) = self.layout.parse_worker(&kv.key)?;
        if model != self.model {
            return None;
        }
        match serde_json::from_slice::<WorkerRegistration>(&kv.value) {
            Ok(registration) => Some((id, registration)),
            Err(e) => {
                tracing::warn!(key = %kv.key, error = %e, "worker discovery: not a worker registration; ignored");
                None
            }
        }
    }

    fn upsert(&self, id: WorkerId, registration: WorkerRegistration) {
        let mut known = self.known.write().unwrap_or_else(|e| e.into_inner());
        if known
            .get(&id)
            .is_some_and(|k| k.registration == registration)
        {
            return;
        }
        tracing::info!(model = %self.model, worker = %id, address = %registration.address, "worker discovered");
        let follower = tokio::spawn(
            Follower::new(id.clone(), &registration.address, self.index.clone()).run(),
        );
        // Replacing an entry drops the old one, which aborts its follower.
        known.insert(
            id,
            Known {
                registration,
                follower,
            },
        );
    }

    fn remove(&self, id: &WorkerId) {
        let removed = self
            .known
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        if removed.is_some() {
            tracing::info!(model = %self.model, worker = %id, "worker gone");
            // Dropping the entry aborts the follower. It may still run until its next await, but
            // the index refuses batches from a worker it does not know, and the follower's next
            // snapshot request is an await: it cannot put the worker back.
            drop(removed);
            self.index
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove_worker(id);
        }
    }
}

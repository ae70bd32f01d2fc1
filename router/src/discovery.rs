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
use tidelock_protocol::{KeyLayout, ModelName, WorkerId, WorkerInfo, WorkerRegistration};
use tidelock_state::{KeyValue, StateStore, WatchEvent};
use tokio::task::JoinHandle;

use crate::follow::Follower;
use crate::http::Http;
use crate::index::KvIndex;

/// Wait before listing again after the store failed.
const RETRY: Duration = Duration::from_millis(200);
/// How long a worker may take to answer `/v1/info` when registered statically.
const INFO_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a statically given worker could not be registered.
#[derive(Debug, thiserror::Error)]
pub enum StaticError {
    #[error("{url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: crate::http::HttpError,
    },
    #[error("{url}: {problem}")]
    Worker { url: String, problem: String },
    #[error("cannot record worker {url}: {source}")]
    Store {
        url: String,
        #[source]
        source: tidelock_state::StateError,
    },
}

/// Registers workers given by URL (the local cluster, or a router without etcd) into `store`,
/// so [`Discovery`] finds them like any other. Each worker's `GET /v1/info` gives its model and
/// shape (asked through `http`, which carries the cluster credential); its id is its address
/// (`host:port`). Returns, in order, the model and id of each.
pub async fn register_static(
    store: &dyn StateStore,
    layout: &KeyLayout,
    urls: &[String],
    http: &Http,
) -> Result<Vec<(ModelName, WorkerId)>, StaticError> {
    let mut out = Vec::with_capacity(urls.len());
    for url in urls {
        let base = url.trim_end_matches('/');
        let problem = |problem: String| StaticError::Worker {
            url: base.to_owned(),
            problem,
        };
        let body = http
            .get_body(&format!("{base}/v1/info"), INFO_TIMEOUT)
            .await
            .map_err(|source| StaticError::Unreachable {
                url: base.to_owned(),
                source,
            })?;
        let info: WorkerInfo = serde_json::from_slice(&body)
            .map_err(|e| problem(format!("/v1/info is not a worker's: {e}")))?;
        let address = base
            .split_once("://")
            .map_or(base, |(_, rest)| rest)
            .to_owned();
        let id = WorkerId::new(address).map_err(|e| problem(e.to_string()))?;
        let registration = WorkerRegistration {
            address: base.to_owned(),
            group: info.group,
            shard: info.shard,
            shard_count: info.shard_count,
            block_tokens: info.block_tokens,
            kv_capacity_bytes: info.kv_capacity_bytes,
        };
        let value = serde_json::to_vec(&registration).map_err(|e| problem(e.to_string()))?;
        store
            .put(&layout.worker(&info.model, &id), value, None)
            .await
            .map_err(|source| StaticError::Store {
                url: base.to_owned(),
                source,
            })?;
        out.push((info.model, id));
    }
    Ok(out)
}

/// First and longest wait between attempts to register a static worker that does not answer.
const STATIC_BACKOFF: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(5));

/// [`register_static`] for one worker, retried (capped backoff) until it answers, so that a
/// router starts while some of its workers are down and admits each when it comes up. Says
/// once, then every minute or so, that the worker is not reachable yet.
pub async fn register_when_up(
    store: Arc<dyn StateStore>,
    layout: KeyLayout,
    url: String,
    http: Http,
) {
    let mut wait = STATIC_BACKOFF.0;
    let mut last_warning: Option<std::time::Instant> = None;
    loop {
        match register_static(&*store, &layout, std::slice::from_ref(&url), &http).await {
            Ok(found) => {
                for (model, worker) in found {
                    tracing::info!(%model, %worker, "static worker registered");
                }
                return;
            }
            Err(e) => {
                if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                    tracing::warn!(error = %e, "static worker not reachable yet; still trying");
                    last_warning = Some(std::time::Instant::now());
                }
            }
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(STATIC_BACKOFF.1);
    }
}

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
    http: Http,
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
        http: Http,
    ) -> Self {
        Discovery {
            store,
            layout,
            model,
            index,
            known: Arc::default(),
            http,
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
            Follower::new(
                id.clone(),
                &registration.address,
                self.index.clone(),
                self.http.clone(),
            )
            .run(),
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

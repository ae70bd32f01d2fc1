//! Session pins: which worker holds a session's KV cache, kept in the StateStore
//! (`sessions/<model>/<tenant>/<session>`, a [`SessionRecord`]) so that every router replica,
//! and a restarted router, sends the session to the same place.
//!
//! Each pin is bound to its own lease with the idle timeout as TTL: a session nobody uses for
//! that long disappears from the store by itself. A pin is *written* only when a session is
//! placed or moved; a request on a pinned session only refreshes the lease, and at most once per
//! third of the timeout, in the background. Pins are cached in memory; a cache miss reads the
//! store once (another replica may have placed the session), and a watch on `sessions/` keeps
//! cached pins current when another replica moves a session or its lease ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tidelock_protocol::{
    GroupId, KeyLayout, ModelName, SessionKey, SessionRecord, TenantId, WorkerId,
};
use tidelock_state::{LeaseId, StateStore};

#[derive(Debug, Clone)]
struct Pin {
    record: SessionRecord,
    lease: Option<LeaseId>,
    refreshed: Instant,
}

/// The session pins of this router, backed by the store.
#[derive(Debug)]
pub struct Pins {
    store: Arc<dyn StateStore>,
    layout: KeyLayout,
    idle_timeout: Duration,
    cache: Mutex<HashMap<String, Pin>>,
}

impl Pins {
    pub fn new(store: Arc<dyn StateStore>, layout: KeyLayout, idle_timeout: Duration) -> Self {
        Pins {
            store,
            layout,
            idle_timeout,
            cache: Mutex::default(),
        }
    }

    fn cached(&self, key: &str) -> Option<Pin> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.get(key).cloned()
    }

    /// The worker `session` is pinned to, if any. Refreshes the pin's lease when due.
    pub async fn get(
        &self,
        model: &ModelName,
        tenant: &TenantId,
        session: &SessionKey,
    ) -> Option<WorkerId> {
        let key = self.layout.session(model, tenant, session);
        let now = Instant::now();
        let cached = self.cached(&key);
        // A pin idle past the timeout is gone from the store too (or soon): read it again.
        if let Some(pin) = cached
            && now.duration_since(pin.refreshed) < self.idle_timeout
        {
            if now.duration_since(pin.refreshed) > self.idle_timeout / 3 {
                self.refresh(&key, pin.lease, now);
            }
            return Some(pin.record.coordinator);
        }
        let kv = match self.store.get(&key).await {
            Ok(kv) => kv?,
            Err(e) => {
                tracing::warn!(error = %e, "session pins: cannot read the store; placing afresh");
                return None;
            }
        };
        let record: SessionRecord = serde_json::from_slice(&kv.value).ok()?;
        let pin = Pin {
            record: record.clone(),
            lease: kv.lease,
            refreshed: now,
        };
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone(), pin);
        self.refresh(&key, kv.lease, now);
        Some(record.coordinator)
    }

    /// Keeps a pin's lease alive, in the background.
    fn refresh(&self, key: &str, lease: Option<LeaseId>, now: Instant) {
        if let Some(pin) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(key)
        {
            pin.refreshed = now;
        }
        if let Some(lease) = lease {
            let store = self.store.clone();
            tokio::spawn(async move {
                if let Err(e) = store.keep_alive(lease).await {
                    tracing::debug!(error = %e, "session pin lease not refreshed");
                }
            });
        }
    }

    /// Pins `session` to `worker` (placing or moving it): one lease (reused when moving) and one
    /// write.
    pub async fn set(
        &self,
        model: &ModelName,
        tenant: &TenantId,
        session: &SessionKey,
        group: GroupId,
        worker: WorkerId,
    ) -> Result<(), tidelock_state::StateError> {
        let key = self.layout.session(model, tenant, session);
        let old_lease = self.cached(&key).and_then(|p| p.lease);
        let lease = match old_lease {
            Some(lease) if self.store.keep_alive(lease).await.is_ok() => lease,
            _ => self.store.grant_lease(self.idle_timeout).await?,
        };
        let record = SessionRecord {
            group,
            coordinator: worker,
        };
        let value = serde_json::to_vec(&record).unwrap_or_default();
        self.store.put(&key, value, Some(lease)).await?;
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).insert(
            key,
            Pin {
                record,
                lease: Some(lease),
                refreshed: Instant::now(),
            },
        );
        Ok(())
    }

    /// Forgets cached pins idle past the timeout (the store's leases drop them there).
    pub fn purge(&self) {
        let now = Instant::now();
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, p| now.duration_since(p.refreshed) < self.idle_timeout);
    }

    /// Keeps the cache in step with the store until the task is aborted: a pin another router
    /// replica writes (a session placed or moved there) replaces this one's cached entry, and a
    /// pin whose lease ended leaves the cache. Lists nothing: entries are read on first use.
    pub async fn follow(self: Arc<Self>) {
        let dir = self.layout.sessions_dir();
        loop {
            let result: Result<(), tidelock_state::StateError> = async {
                // The store's revision, without listing every session: list an empty directory.
                let from = self.store.list(&format!("{dir}~revision")).await?.revision;
                let mut watch = self.store.watch(&dir, from).await?;
                while let Some(event) = futures::StreamExt::next(&mut watch).await {
                    let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
                    match event? {
                        tidelock_state::WatchEvent::Put(kv) => {
                            if let (Some(pin), Ok(record)) = (
                                cache.get_mut(&kv.key),
                                serde_json::from_slice::<SessionRecord>(&kv.value),
                            ) {
                                pin.record = record;
                                pin.lease = kv.lease;
                            }
                        }
                        tidelock_state::WatchEvent::Delete { key, .. } => {
                            cache.remove(&key);
                        }
                    }
                }
                Ok(())
            }
            .await;
            if let Err(e) = result {
                tracing::warn!(error = %e, "session pins: the watch failed; watching again");
            }
            self.cache.lock().unwrap_or_else(|e| e.into_inner()).clear();
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// The worker this router's cache pins `session` to, without touching the store.
    pub fn cached_pin(
        &self,
        model: &ModelName,
        tenant: &TenantId,
        session: &SessionKey,
    ) -> Option<WorkerId> {
        let key = self.layout.session(model, tenant, session);
        self.cached(&key).map(|p| p.record.coordinator)
    }
}

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
//!
//! A slow or absent store never adds more than [`Deadlines::read`] to a request (issue #18,
//! point 4; with etcd stopped each new session used to wait the client's 5 s timeout):
//!
//! - A read that fails or misses its deadline marks the store unreachable; while it is, a cache
//!   miss does not read at all (the session is placed afresh: the KV index still finds the
//!   workers that hold its prefix), and one background probe per second reads the store with
//!   the same deadline until it answers again.
//! - A write (placing or moving a session) goes to the cache first, then to the store in the
//!   background within [`Deadlines::write`]: this router keeps the session where it put it even
//!   when the store cannot hear of it.
//! - The cache is the last-known state: a failed watch resumes after the last revision it saw
//!   (the store replays what was missed) and keeps the cache, which is cleared only when that
//!   history is gone (compacted).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use prometheus::{IntCounter, IntGauge};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tidelock_protocol::{
    GroupId, KeyLayout, ModelName, SessionKey, SessionRecord, TenantId, WorkerId,
};
use tidelock_state::{LeaseId, StateError, StateStore};

/// How long the store may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// A pin read on the request path (then the session is placed afresh).
    pub read: Duration,
    /// A pin write or lease refresh, in the background.
    pub write: Duration,
}

impl Default for Deadlines {
    /// 50 ms to read (etcd answers in about 1 ms when well), 2 s to write.
    fn default() -> Self {
        Deadlines {
            read: Duration::from_millis(50),
            write: Duration::from_secs(2),
        }
    }
}

/// How often an unreachable store is probed.
const PROBE_EVERY: Duration = Duration::from_secs(1);

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
    deadlines: Deadlines,
    cache: Mutex<HashMap<String, Pin>>,
    /// Whether the last read (or probe) of the store succeeded in time.
    reachable: Arc<AtomicBool>,
    /// A probe task is running.
    probing: Arc<AtomicBool>,
    metrics: PinMetrics,
}

/// What [`Pins`] counts, registered with the router's metrics ([`Pins::metrics`]).
#[derive(Debug, Clone)]
pub struct PinMetrics {
    /// 1 while the store answers pin reads in time.
    pub reachable: IntGauge,
    /// Cache misses placed afresh without reading the store, which was unreachable.
    pub skipped: IntCounter,
    /// Pin reads that failed or missed their deadline.
    pub failed: IntCounter,
}

impl PinMetrics {
    fn new() -> Self {
        let metric = "the metric's name and help are valid";
        let reachable = IntGauge::new(
            "tidelock_router_state_store_reachable",
            "1 while the state store answers session pin reads within their deadline, 0 while it is probed.",
        )
        .expect(metric);
        reachable.set(1);
        PinMetrics {
            reachable,
            skipped: IntCounter::new(
                "tidelock_router_pin_reads_skipped_total",
                "New sessions placed without reading their pin, the state store being unreachable.",
            )
            .expect(metric),
            failed: IntCounter::new(
                "tidelock_router_pin_reads_failed_total",
                "Session pin reads that failed or missed their deadline.",
            )
            .expect(metric),
        }
    }
}

impl Pins {
    pub fn new(store: Arc<dyn StateStore>, layout: KeyLayout, idle_timeout: Duration) -> Self {
        Self::with_deadlines(store, layout, idle_timeout, Deadlines::default())
    }

    pub fn with_deadlines(
        store: Arc<dyn StateStore>,
        layout: KeyLayout,
        idle_timeout: Duration,
        deadlines: Deadlines,
    ) -> Self {
        Pins {
            store,
            layout,
            idle_timeout,
            deadlines,
            cache: Mutex::default(),
            reachable: Arc::new(AtomicBool::new(true)),
            probing: Arc::new(AtomicBool::new(false)),
            metrics: PinMetrics::new(),
        }
    }

    /// The store, its layout, the deadlines and the idle timeout these pins use (the turn log
    /// shares them).
    pub(crate) fn store_settings(&self) -> (Arc<dyn StateStore>, KeyLayout, Deadlines, Duration) {
        (
            self.store.clone(),
            self.layout.clone(),
            self.deadlines,
            self.idle_timeout,
        )
    }

    /// The store's key layout.
    pub fn layout(&self) -> &KeyLayout {
        &self.layout
    }

    /// The counters to register with the router's metrics.
    pub fn metrics(&self) -> &PinMetrics {
        &self.metrics
    }

    /// Whether the store answered the last read in time.
    pub fn store_reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }

    /// Marks the store unreachable and probes it in the background (once per
    /// [`PROBE_EVERY`], with the read deadline) until a read succeeds.
    pub(crate) fn unreachable(&self, why: &str) {
        self.metrics.failed.inc();
        self.metrics.reachable.set(0);
        if self.reachable.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                why,
                "session pins: the state store is unreachable; placing new sessions without it until it answers"
            );
        }
        if self.probing.swap(true, Ordering::Relaxed) {
            return;
        }
        let (store, key, deadline) = (
            self.store.clone(),
            self.layout.sessions_dir(),
            self.deadlines.read,
        );
        let (reachable, probing) = (self.reachable.clone(), self.probing.clone());
        let gauge = self.metrics.reachable.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PROBE_EVERY).await;
                if let Ok(Ok(_)) = tokio::time::timeout(deadline, store.get(&key)).await {
                    break;
                }
            }
            // Probing ends before reads resume, so a read that fails right after starts a new
            // probe instead of finding this one still marked running.
            probing.store(false, Ordering::Relaxed);
            reachable.store(true, Ordering::Relaxed);
            gauge.set(1);
            tracing::info!("session pins: the state store answers again");
        });
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
        if !self.store_reachable() {
            self.metrics.skipped.inc();
            return None;
        }
        let kv = match tokio::time::timeout(self.deadlines.read, self.store.get(&key)).await {
            Ok(Ok(kv)) => kv?,
            Ok(Err(e)) => {
                self.unreachable(&e.to_string());
                return None;
            }
            Err(_) => {
                self.unreachable("a pin read missed its deadline");
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
            let (store, deadline) = (self.store.clone(), self.deadlines.write);
            tokio::spawn(async move {
                match tokio::time::timeout(deadline, store.keep_alive(lease)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::debug!(error = %e, "session pin lease not refreshed"),
                    Err(_) => tracing::debug!("session pin lease refresh missed its deadline"),
                }
            });
        }
    }

    /// Pins `session` to `worker` (placing or moving it): in the cache at once, then in the store
    /// with one lease (reused when moving) and one write, within the write deadline.
    pub async fn set(
        &self,
        model: &ModelName,
        tenant: &TenantId,
        session: &SessionKey,
        group: GroupId,
        worker: WorkerId,
    ) -> Result<(), StateError> {
        let key = self.layout.session(model, tenant, session);
        let record = SessionRecord {
            group,
            coordinator: worker,
        };
        let old_lease = {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            let old = cache.get(&key).and_then(|p| p.lease);
            cache.insert(
                key.clone(),
                Pin {
                    record: record.clone(),
                    lease: old,
                    refreshed: Instant::now(),
                },
            );
            old
        };
        let write = async {
            let lease = match old_lease {
                Some(lease) if self.store.keep_alive(lease).await.is_ok() => lease,
                _ => self.store.grant_lease(self.idle_timeout).await?,
            };
            let value = serde_json::to_vec(&record).unwrap_or_default();
            self.store.put(&key, value, Some(lease)).await?;
            Ok::<_, StateError>(lease)
        };
        let lease = tokio::time::timeout(self.deadlines.write, write)
            .await
            .map_err(|_| StateError::Timeout {
                endpoint: "the state store".into(),
                op: "a session pin write",
                after: self.deadlines.write,
            })??;
        if let Some(pin) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&key)
            .filter(|p| p.record == record)
        {
            pin.lease = Some(lease);
        }
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
    /// A failed watch resumes after the last revision it delivered, keeping the cache; only when
    /// the store no longer has that history is the cache cleared (its pins read again).
    pub async fn follow(self: Arc<Self>) {
        let dir = self.layout.sessions_dir();
        let mut seen: Option<tidelock_state::Revision> = None;
        loop {
            let result: Result<(), StateError> = async {
                let after = match seen {
                    Some(revision) => revision,
                    // The store's revision, without listing every session: list an empty
                    // directory.
                    None => self.store.list(&format!("{dir}~revision")).await?.revision,
                };
                let mut watch = self.store.watch(&dir, after).await?;
                // Watching from here: a failure before the first event resumes here too.
                seen.get_or_insert(after);
                while let Some(event) = futures::StreamExt::next(&mut watch).await {
                    let event = event?;
                    seen = Some(event.revision());
                    let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
                    match event {
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
            match result {
                Err(e @ StateError::Compacted { .. }) => {
                    tracing::warn!(error = %e, "session pins: changes were missed; reading pins again");
                    self.cache.lock().unwrap_or_else(|e| e.into_inner()).clear();
                    seen = None;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "session pins: the watch failed; resuming it, pins kept");
                }
                Ok(()) => {}
            }
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

//! Who is calling: API keys to tenants, from the StateStore's `tenants/` records.
//!
//! Only BLAKE3 hashes of keys are stored ([`TenantRecord::hash_api_key`]). A presented key is
//! hashed once and compared with every stored hash in constant time ([`blake3::Hash`]'s
//! equality), without stopping at a match, so response time says nothing about which bytes of
//! which hash were right. The set is replaced as a whole on every change (copy on write), so a
//! request sees one consistent version.
//!
//! Records arrive by watching `tenants/` (the operator writes them from `Tenant` resources); a
//! local cluster without etcd writes them into the in-memory store from a file ([`sync_file`]),
//! which is re-read when it changes. Either way the router applies changes live.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use tidelock_protocol::{KeyLayout, TenantId, TenantRecord};
use tidelock_state::{StateStore, WatchEvent};

/// Wait before listing again after the store failed, and between checks of a tenants file.
const RETRY: Duration = Duration::from_secs(1);

/// One tenant as the router uses it.
#[derive(Debug, Clone, PartialEq)]
pub struct Tenant {
    pub id: TenantId,
    pub record: TenantRecord,
    hashes: Vec<blake3::Hash>,
}

impl Tenant {
    /// A tenant from its record; malformed key hashes are dropped with a warning (they could
    /// never match).
    pub fn new(id: TenantId, record: TenantRecord) -> Self {
        let hashes = record
            .key_hashes
            .iter()
            .filter_map(|h| match blake3::Hash::from_hex(h) {
                Ok(hash) => Some(hash),
                Err(_) => {
                    tracing::warn!(tenant = %id, "a key hash is not 64 hex digits; ignored");
                    None
                }
            })
            .collect();
        Tenant { id, record, hashes }
    }
}

/// The tenants the router knows, shared by every request.
#[derive(Debug, Default)]
pub struct Tenants {
    all: RwLock<Arc<BTreeMap<TenantId, Arc<Tenant>>>>,
}

impl Tenants {
    /// The tenant holding `key`, if any. Every stored hash is compared, in constant time.
    pub fn authenticate(&self, key: &str) -> Option<Arc<Tenant>> {
        let presented = blake3::hash(key.as_bytes());
        let all = self.snapshot();
        let mut found = None;
        for tenant in all.values() {
            for hash in &tenant.hashes {
                // `blake3::Hash`'s `==` is constant time; no early exit either.
                if *hash == presented && found.is_none() {
                    found = Some(tenant.clone());
                }
            }
        }
        found
    }

    /// Every tenant now.
    pub fn snapshot(&self) -> Arc<BTreeMap<TenantId, Arc<Tenant>>> {
        self.all.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn update(&self, f: impl FnOnce(&mut BTreeMap<TenantId, Arc<Tenant>>)) {
        let mut guard = self.all.write().unwrap_or_else(|e| e.into_inner());
        let mut next = (**guard).clone();
        f(&mut next);
        *guard = Arc::new(next);
    }

    /// Adds or replaces a tenant.
    pub fn insert(&self, id: TenantId, record: TenantRecord) {
        self.update(|all| {
            all.insert(id.clone(), Arc::new(Tenant::new(id, record)));
        });
    }

    pub fn remove(&self, id: &TenantId) {
        self.update(|all| {
            all.remove(id);
        });
    }

    /// Keeps the set equal to the store's `tenants/` directory until the task is aborted: list,
    /// then watch from the listing's revision; list again whenever the watch breaks.
    pub async fn follow(self: Arc<Self>, store: Arc<dyn StateStore>, layout: KeyLayout) {
        loop {
            if let Err(e) = self.list_and_watch(&*store, &layout).await {
                tracing::warn!(error = %e, "tenants: the state store failed; listing again");
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    async fn list_and_watch(
        &self,
        store: &dyn StateStore,
        layout: &KeyLayout,
    ) -> Result<(), tidelock_state::StateError> {
        let dir = layout.tenants_dir();
        let listing = store.list(&dir).await?;
        let mut all = BTreeMap::new();
        for kv in &listing.kvs {
            if let Some((id, record)) = parse(layout, &kv.key, &kv.value) {
                all.insert(id.clone(), Arc::new(Tenant::new(id, record)));
            }
        }
        tracing::info!(tenants = all.len(), "tenants loaded");
        *self.all.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(all);
        let mut watch = store.watch(&dir, listing.revision).await?;
        while let Some(event) = watch.next().await {
            match event? {
                WatchEvent::Put(kv) => match parse(layout, &kv.key, &kv.value) {
                    Some((id, record)) => {
                        tracing::info!(tenant = %id, "tenant updated");
                        self.insert(id, record);
                    }
                    // Fail closed: a record replaced by one that cannot be used takes the
                    // tenant's old keys with it.
                    None => {
                        if let Some(id) = layout.parse_tenant(&kv.key) {
                            self.remove(&id);
                        }
                    }
                },
                WatchEvent::Delete { key, .. } => {
                    if let Some(id) = layout.parse_tenant(&key) {
                        tracing::info!(tenant = %id, "tenant removed");
                        self.remove(&id);
                    }
                }
            }
        }
        Ok(())
    }
}

fn parse(layout: &KeyLayout, key: &str, value: &[u8]) -> Option<(TenantId, TenantRecord)> {
    let id = layout.parse_tenant(key)?;
    match serde_json::from_slice::<TenantRecord>(value) {
        Ok(record) => match record.check() {
            Ok(()) => Some((id, record)),
            Err(e) => {
                tracing::warn!(%key, error = %e, "tenant record refused; its keys do not work");
                None
            }
        },
        Err(e) => {
            // Records written before cache salts were secret have none (docs/SECURITY.md,
            // "Migration"): refused until the operator rewrites them.
            tracing::warn!(%key, error = %e, "not a tenant record; its keys do not work");
            None
        }
    }
}

/// Why a tenants file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TenantFileError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: not a tenants file ({source}); expected {{\"<tenant>\": {{\"key_hashes\": [\"<64 hex digits>\"], \"cache_salt\": \"<32+ random hex digits>\", ...}}}}"
    )]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: tenant `{tenant}`: {problem}")]
    BadRecord {
        path: PathBuf,
        tenant: String,
        #[source]
        problem: tidelock_protocol::TenantRecordError,
    },
    #[error("{path}: {problem}")]
    Store { path: PathBuf, problem: String },
}

/// Reads a tenants file: a JSON object from tenant id to [`TenantRecord`] (the same shape the
/// operator writes to etcd). Every key hash is checked.
pub fn read_file(path: &Path) -> Result<BTreeMap<TenantId, TenantRecord>, TenantFileError> {
    let text = std::fs::read(path).map_err(|source| TenantFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    let all: BTreeMap<TenantId, TenantRecord> =
        serde_json::from_slice(&text).map_err(|source| TenantFileError::Parse {
            path: path.to_owned(),
            source,
        })?;
    for (id, record) in &all {
        record
            .check()
            .map_err(|problem| TenantFileError::BadRecord {
                path: path.to_owned(),
                tenant: id.to_string(),
                problem,
            })?;
    }
    Ok(all)
}

/// Writes the file's tenants into the store (and deletes those no longer in it).
pub async fn load_file(
    store: &dyn StateStore,
    layout: &KeyLayout,
    path: &Path,
) -> Result<usize, TenantFileError> {
    let all = read_file(path)?;
    let problem = |e: tidelock_state::StateError| TenantFileError::Store {
        path: path.to_owned(),
        problem: e.to_string(),
    };
    let listing = store.list(&layout.tenants_dir()).await.map_err(problem)?;
    for kv in &listing.kvs {
        if let Some(id) = layout.parse_tenant(&kv.key)
            && !all.contains_key(&id)
        {
            store.delete(&kv.key).await.map_err(problem)?;
        }
    }
    for (id, record) in &all {
        let value = serde_json::to_vec(record).unwrap_or_default();
        store
            .put(&layout.tenant(id), value, None)
            .await
            .map_err(problem)?;
    }
    Ok(all.len())
}

/// After [`load_file`]: re-reads the file whenever its modification time changes, until the
/// task is aborted. A file that becomes invalid is reported and the last good tenants stay.
pub async fn sync_file(store: Arc<dyn StateStore>, layout: KeyLayout, path: PathBuf) {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut seen: Option<SystemTime> = modified(&path);
    loop {
        tokio::time::sleep(RETRY).await;
        let now = modified(&path);
        if now == seen {
            continue;
        }
        seen = now;
        match load_file(&*store, &layout, &path).await {
            Ok(n) => tracing::info!(path = %path.display(), tenants = n, "tenants file reloaded"),
            Err(e) => {
                tracing::error!(error = %e, "tenants file not reloaded; keeping the last good one")
            }
        }
    }
}

//! The conformance suite: one set of behavioural tests that every [`StateStore`] must pass, so the
//! in-memory store used by `tidelock up` and unit tests behaves exactly like etcd.
//!
//! Use it with [`conformance_suite!`](crate::conformance_suite), which expands to one `#[tokio::test]`
//! per case for a given fixture. Each case gets a fresh fixture.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;

use super::{EtcdServer, TestPki};
use crate::error::StateError;
use crate::etcd::EtcdStore;
use crate::memory::MemoryStore;
use crate::store::{LeaseKeeper, StateStore, WatchStream};
use crate::types::{CasOutcome, Expected, Revision, WatchEvent};

/// A store under test, plus a way to break its connection.
#[async_trait]
pub trait Fixture: Send {
    /// The store under test.
    fn store(&self) -> Arc<dyn StateStore>;
    /// Breaks every connection between clients and the backend and restores service; returns
    /// once the backend serves again. Data must survive.
    async fn interrupt(&mut self);
}

/// The in-memory store; an interrupt drops every watcher's channel.
#[derive(Debug)]
pub struct MemoryFixture {
    store: MemoryStore,
}

impl MemoryFixture {
    pub async fn new() -> Self {
        MemoryFixture {
            store: MemoryStore::new(),
        }
    }
}

#[async_trait]
impl Fixture for MemoryFixture {
    fn store(&self) -> Arc<dyn StateStore> {
        Arc::new(self.store.clone())
    }
    async fn interrupt(&mut self) {
        self.store.disconnect_watchers();
    }
}

/// A real etcd server; an interrupt restarts it on the same port and data.
#[derive(Debug)]
pub struct EtcdFixture {
    server: EtcdServer,
    store: EtcdStore,
}

impl EtcdFixture {
    /// Starts etcd and connects. Panics with the reason if etcd cannot be started.
    pub async fn new() -> Self {
        Self::connect(EtcdServer::start().await).await
    }

    /// The same over TLS, with a client certificate (`EtcdServer::start_tls`).
    pub async fn new_tls() -> Self {
        let pki = TestPki::generate("tidelock conformance CA")
            .unwrap_or_else(|e| panic!("cannot make the test certificates: {e}"));
        Self::connect(EtcdServer::start_tls(pki).await).await
    }

    async fn connect(server: std::io::Result<EtcdServer>) -> Self {
        let server = match server {
            Ok(server) => server,
            Err(e) => panic!("cannot start etcd for the conformance suite: {e}"),
        };
        let store = match EtcdStore::connect(server.config()).await {
            Ok(store) => store,
            Err(e) => panic!("cannot connect to the etcd just started: {e}"),
        };
        EtcdFixture { server, store }
    }
}

#[async_trait]
impl Fixture for EtcdFixture {
    fn store(&self) -> Arc<dyn StateStore> {
        Arc::new(self.store.clone())
    }
    async fn interrupt(&mut self) {
        if let Err(e) = self.server.restart().await {
            panic!("etcd did not come back after a restart: {e}");
        }
    }
}

/// Expands to one `#[tokio::test]` per conformance case, each on a fresh fixture from `$fixture`
/// (an expression that evaluates to a future of a [`Fixture`]).
#[macro_export]
macro_rules! conformance_suite {
    ($fixture:expr) => {
        $crate::conformance_suite!(@cases $fixture;
            put_get_and_revisions,
            delete_reports_what_it_did,
            list_is_exact_and_sorted,
            watch_replays_every_change_after_revision,
            watch_is_live_and_exact,
            watch_survives_reconnect,
            lease_expires_unless_kept_alive,
            lease_kept_alive_stays_until_revoked,
            lease_keeper_holds_a_lease,
            unknown_leases_are_reported,
            cas_reports_conflicts,
            cas_serialises_concurrent_writers,
        );
    };
    (@cases $fixture:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let mut fixture = $fixture.await;
                $crate::testing::conformance::$case(&mut fixture).await;
            }
        )*
    };
}

/// Upper bound for anything the suite waits for; generous, since a test machine can be slow.
const WAIT: Duration = Duration::from_secs(15);

async fn next_event(watch: &mut WatchStream) -> WatchEvent {
    match tokio::time::timeout(WAIT, watch.next()).await {
        Ok(Some(Ok(event))) => event,
        Ok(Some(Err(e))) => panic!("watch failed: {e}"),
        Ok(None) => panic!("watch ended"),
        Err(_) => panic!("watch produced nothing within {WAIT:?}"),
    }
}

/// Asserts that the watch has nothing more to say right now.
async fn assert_quiet(watch: &mut WatchStream) {
    if let Ok(item) = tokio::time::timeout(Duration::from_millis(300), watch.next()).await {
        panic!("watch produced an unexpected item: {item:?}");
    }
}

/// Retries an operation while the store reports transient failures (right after an interrupt).
async fn retrying<T, F, Fut>(mut op: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StateError>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match op().await {
            Ok(value) => return value,
            Err(e) if e.is_transient() && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("operation failed: {e}"),
        }
    }
}

/// Polls until `key` is gone; panics if it is still there after `within`.
async fn wait_until_gone(store: &dyn StateStore, key: &str, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    while store.get(key).await.expect("get").is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{key} still present after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn put_key(event: &WatchEvent) -> Option<(&str, &[u8])> {
    match event {
        WatchEvent::Put(kv) => Some((&kv.key, &kv.value)),
        WatchEvent::Delete { .. } => None,
    }
}

pub async fn put_get_and_revisions(fx: &mut impl Fixture) {
    let store = fx.store();
    assert_eq!(store.get("t/k").await.unwrap(), None);
    let r1 = store.put("t/k", b"one".to_vec(), None).await.unwrap();
    let r2 = store.put("t/k", b"two".to_vec(), None).await.unwrap();
    let r3 = store.put("t/other", b"x".to_vec(), None).await.unwrap();
    assert!(r1 < r2 && r2 < r3, "revisions increase: {r1} {r2} {r3}");
    let kv = store.get("t/k").await.unwrap().expect("t/k exists");
    assert_eq!(kv.value, b"two");
    assert_eq!(kv.create_revision, r1);
    assert_eq!(kv.mod_revision, r2);
    assert_eq!(kv.version, 2);
    assert_eq!(kv.lease, None);
    assert!(matches!(
        store.put("", vec![], None).await,
        Err(StateError::InvalidRequest(_))
    ));
}

pub async fn delete_reports_what_it_did(fx: &mut impl Fixture) {
    let store = fx.store();
    assert_eq!(store.delete("t/missing").await.unwrap(), None);
    let put = store.put("t/k", b"v".to_vec(), None).await.unwrap();
    let deleted = store.delete("t/k").await.unwrap().expect("deleted");
    assert!(deleted > put);
    assert_eq!(store.get("t/k").await.unwrap(), None);
    assert_eq!(store.delete("t/k").await.unwrap(), None);
    // A re-created key starts a new life.
    let again = store.put("t/k", b"w".to_vec(), None).await.unwrap();
    let kv = store.get("t/k").await.unwrap().expect("t/k exists");
    assert_eq!((kv.create_revision, kv.version), (again, 1));
}

pub async fn list_is_exact_and_sorted(fx: &mut impl Fixture) {
    let store = fx.store();
    for key in ["a/b/2", "a/b/1", "a/bc/3", "a/b", "a/c/4", "a/b/sub/5"] {
        store.put(key, key.as_bytes().to_vec(), None).await.unwrap();
    }
    for dir in ["a/b", "a/b/"] {
        let listing = store.list(dir).await.unwrap();
        let keys: Vec<&str> = listing.kvs.iter().map(|kv| kv.key.as_str()).collect();
        assert_eq!(keys, ["a/b/1", "a/b/2", "a/b/sub/5"], "listing {dir:?}");
        assert!(listing.kvs.iter().all(|kv| kv.value == kv.key.as_bytes()));
    }
    assert!(store.list("a/x").await.unwrap().kvs.is_empty());
    let all = store.list("a").await.unwrap();
    assert_eq!(all.kvs.len(), 6);
    let last = store.put("z", vec![], None).await.unwrap();
    assert_eq!(store.list("a").await.unwrap().revision, last);
}

pub async fn watch_replays_every_change_after_revision(fx: &mut impl Fixture) {
    let store = fx.store();
    let r1 = store.put("w/a", b"1".to_vec(), None).await.unwrap();
    let r2 = store.put("w/b", b"2".to_vec(), None).await.unwrap();
    let r3 = store.delete("w/a").await.unwrap().expect("deleted");
    store.put("elsewhere", b"x".to_vec(), None).await.unwrap();
    let r5 = store.put("w/b", b"3".to_vec(), None).await.unwrap();

    let mut watch = store.watch("w", r1).await.unwrap();
    let e = next_event(&mut watch).await;
    assert_eq!((e.revision(), put_key(&e)), (r2, Some(("w/b", &b"2"[..]))));
    let e = next_event(&mut watch).await;
    assert_eq!(
        e,
        WatchEvent::Delete {
            key: "w/a".into(),
            revision: r3
        }
    );
    let e = next_event(&mut watch).await;
    assert_eq!((e.revision(), put_key(&e)), (r5, Some(("w/b", &b"3"[..]))));
    // Then live changes, in order.
    let r6 = store.put("w/c", b"4".to_vec(), None).await.unwrap();
    assert_eq!(next_event(&mut watch).await.revision(), r6);
    assert_quiet(&mut watch).await;

    // From the very beginning: everything under w/.
    let mut all = store.watch("w", Revision::ZERO).await.unwrap();
    let revisions: Vec<Revision> = [
        next_event(&mut all).await,
        next_event(&mut all).await,
        next_event(&mut all).await,
        next_event(&mut all).await,
        next_event(&mut all).await,
    ]
    .iter()
    .map(WatchEvent::revision)
    .collect();
    assert_eq!(revisions, [r1, r2, r3, r5, r6]);
}

pub async fn watch_is_live_and_exact(fx: &mut impl Fixture) {
    let store = fx.store();
    let start = store.list("d/b").await.unwrap().revision;
    let mut watch = store.watch("d/b", start).await.unwrap();
    store.put("d/bc/1", b"no".to_vec(), None).await.unwrap();
    store.put("d/b", b"no".to_vec(), None).await.unwrap();
    let r = store.put("d/b/1", b"yes".to_vec(), None).await.unwrap();
    let e = next_event(&mut watch).await;
    assert_eq!((e.revision(), e.key()), (r, "d/b/1"));
    assert_quiet(&mut watch).await;
}

pub async fn watch_survives_reconnect(fx: &mut impl Fixture) {
    let store = fx.store();
    let start = store.put("r/0", b"0".to_vec(), None).await.unwrap();
    let mut watch = store.watch("r", start).await.unwrap();
    let mut expected = Vec::new();
    for i in 1..=3 {
        expected.push(store.put(&format!("r/{i}"), vec![], None).await.unwrap());
    }
    // Read one, then lose the connection with two delivered-or-not events in flight.
    let mut seen = vec![next_event(&mut watch).await.revision()];
    fx.interrupt().await;
    for i in 4..=6 {
        let key = format!("r/{i}");
        expected.push(retrying(|| store.put(&key, vec![], None)).await);
    }
    expected.push(retrying(|| store.delete("r/1")).await.expect("r/1 existed"));
    while seen.len() < expected.len() {
        seen.push(next_event(&mut watch).await.revision());
    }
    assert_eq!(
        seen, expected,
        "every change once, in order, across the reconnect"
    );
    assert_quiet(&mut watch).await;
}

pub async fn lease_expires_unless_kept_alive(fx: &mut impl Fixture) {
    let store = fx.store();
    let start = store.list("l").await.unwrap().revision;
    let mut watch = store.watch("l", start).await.unwrap();
    let lease = store.grant_lease(Duration::from_secs(2)).await.unwrap();
    store.put("l/k", b"v".to_vec(), Some(lease)).await.unwrap();
    store.put("l/plain", b"v".to_vec(), None).await.unwrap();
    let kv = store.get("l/k").await.unwrap().expect("l/k exists");
    assert_eq!(kv.lease, Some(lease));
    wait_until_gone(store.as_ref(), "l/k", Duration::from_secs(12)).await;
    assert!(store.get("l/plain").await.unwrap().is_some());
    // The watch saw the two puts and then the expiry delete.
    assert_eq!(next_event(&mut watch).await.key(), "l/k");
    assert_eq!(next_event(&mut watch).await.key(), "l/plain");
    assert!(matches!(
        next_event(&mut watch).await,
        WatchEvent::Delete { key, .. } if key == "l/k"
    ));
    assert!(matches!(
        store.keep_alive(lease).await,
        Err(StateError::LeaseNotFound(id)) if id == lease
    ));
}

pub async fn lease_kept_alive_stays_until_revoked(fx: &mut impl Fixture) {
    let store = fx.store();
    let lease = store.grant_lease(Duration::from_secs(2)).await.unwrap();
    store.put("l/a", b"a".to_vec(), Some(lease)).await.unwrap();
    store.put("l/b", b"b".to_vec(), Some(lease)).await.unwrap();
    // Three TTLs of keeping alive: the keys must stay throughout.
    let until = tokio::time::Instant::now() + Duration::from_secs(6);
    while tokio::time::Instant::now() < until {
        let ttl = store.keep_alive(lease).await.unwrap();
        assert!(ttl >= Duration::from_secs(1), "ttl {ttl:?}");
        assert!(store.get("l/a").await.unwrap().is_some(), "l/a vanished");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    store.revoke_lease(lease).await.unwrap();
    assert!(store.get("l/a").await.unwrap().is_none());
    assert!(store.get("l/b").await.unwrap().is_none());
}

pub async fn lease_keeper_holds_a_lease(fx: &mut impl Fixture) {
    let store = fx.store();
    let ttl = Duration::from_secs(2);
    let lease = store.grant_lease(ttl).await.unwrap();
    store
        .put("l/kept", b"v".to_vec(), Some(lease))
        .await
        .unwrap();
    let mut keeper = LeaseKeeper::spawn(store.clone(), lease, ttl);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(store.get("l/kept").await.unwrap().is_some());
    // Someone else revokes it: the keeper notices.
    store.revoke_lease(lease).await.unwrap();
    tokio::time::timeout(WAIT, keeper.lost())
        .await
        .expect("keeper reports the lost lease");
    // Dropping a keeper stops it: the lease then expires on its own.
    let lease = store.grant_lease(ttl).await.unwrap();
    store
        .put("l/dropped", b"v".to_vec(), Some(lease))
        .await
        .unwrap();
    drop(LeaseKeeper::spawn(store.clone(), lease, ttl));
    wait_until_gone(store.as_ref(), "l/dropped", Duration::from_secs(12)).await;
}

pub async fn unknown_leases_are_reported(fx: &mut impl Fixture) {
    let store = fx.store();
    let lease = store.grant_lease(Duration::from_secs(30)).await.unwrap();
    store.revoke_lease(lease).await.unwrap();
    assert!(matches!(
        store.put("l/k", vec![], Some(lease)).await,
        Err(StateError::LeaseNotFound(id)) if id == lease
    ));
    assert!(store.get("l/k").await.unwrap().is_none(), "nothing written");
    assert!(matches!(
        store.revoke_lease(lease).await,
        Err(StateError::LeaseNotFound(_))
    ));
    assert!(matches!(
        store.keep_alive(lease).await,
        Err(StateError::LeaseNotFound(_))
    ));
    assert!(matches!(
        store.grant_lease(Duration::ZERO).await,
        Err(StateError::InvalidRequest(_))
    ));
}

pub async fn cas_reports_conflicts(fx: &mut impl Fixture) {
    let store = fx.store();
    let created = match store
        .compare_and_swap("c/k", Expected::Absent, b"1".to_vec(), None)
        .await
        .unwrap()
    {
        CasOutcome::Swapped(r) => r,
        other => panic!("create on absent key: {other:?}"),
    };
    match store
        .compare_and_swap("c/k", Expected::Absent, b"x".to_vec(), None)
        .await
        .unwrap()
    {
        CasOutcome::Conflict(Some(kv)) => {
            assert_eq!((kv.value.as_slice(), kv.mod_revision), (&b"1"[..], created))
        }
        other => panic!("create on existing key: {other:?}"),
    }
    let stale = Expected::ModRevision(Revision(created.0 + 1000));
    assert!(matches!(
        store
            .compare_and_swap("c/k", stale, b"x".to_vec(), None)
            .await
            .unwrap(),
        CasOutcome::Conflict(Some(_))
    ));
    assert!(matches!(
        store
            .compare_and_swap(
                "c/none",
                Expected::ModRevision(created),
                b"x".to_vec(),
                None
            )
            .await
            .unwrap(),
        CasOutcome::Conflict(None)
    ));
    let updated = store
        .compare_and_swap("c/k", Expected::ModRevision(created), b"2".to_vec(), None)
        .await
        .unwrap();
    let CasOutcome::Swapped(updated) = updated else {
        panic!("update at the right revision: {updated:?}");
    };
    assert_eq!(store.get("c/k").await.unwrap().expect("c/k").value, b"2");
    // Conditional delete: stale fails and keeps the key, current succeeds.
    assert!(matches!(
        store
            .compare_and_delete("c/k", Expected::ModRevision(created))
            .await
            .unwrap(),
        CasOutcome::Conflict(Some(_))
    ));
    assert!(matches!(
        store
            .compare_and_delete("c/k", Expected::Absent)
            .await
            .unwrap(),
        CasOutcome::Conflict(Some(_))
    ));
    assert!(store.get("c/k").await.unwrap().is_some());
    assert!(
        store
            .compare_and_delete("c/k", Expected::ModRevision(updated))
            .await
            .unwrap()
            .is_swapped()
    );
    assert!(store.get("c/k").await.unwrap().is_none());
    assert!(matches!(
        store
            .compare_and_swap("c/k", Expected::ModRevision(Revision::ZERO), vec![], None)
            .await,
        Err(StateError::InvalidRequest(_))
    ));
    // With an unknown lease nothing is written.
    let lease = store.grant_lease(Duration::from_secs(30)).await.unwrap();
    store.revoke_lease(lease).await.unwrap();
    assert!(matches!(
        store
            .compare_and_swap("c/k", Expected::Absent, vec![], Some(lease))
            .await,
        Err(StateError::LeaseNotFound(_))
    ));
}

pub async fn cas_serialises_concurrent_writers(fx: &mut impl Fixture) {
    const WRITERS: u64 = 4;
    const INCREMENTS: u64 = 10;
    let store = fx.store();
    store.put("c/counter", b"0".to_vec(), None).await.unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..WRITERS {
        let store = store.clone();
        tasks.spawn(async move {
            let mut conflicts = 0u64;
            for _ in 0..INCREMENTS {
                loop {
                    let kv = store.get("c/counter").await.unwrap().expect("counter");
                    let n: u64 = String::from_utf8_lossy(&kv.value).parse().expect("number");
                    let next = (n + 1).to_string().into_bytes();
                    let expected = Expected::ModRevision(kv.mod_revision);
                    match store
                        .compare_and_swap("c/counter", expected, next, None)
                        .await
                    {
                        Ok(CasOutcome::Swapped(_)) => break,
                        Ok(CasOutcome::Conflict(_)) => conflicts += 1,
                        Err(e) => panic!("cas failed: {e}"),
                    }
                }
            }
            conflicts
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("writer task");
    }
    let kv = store.get("c/counter").await.unwrap().expect("counter");
    assert_eq!(kv.value, (WRITERS * INCREMENTS).to_string().into_bytes());
    assert_eq!(kv.version as u64, WRITERS * INCREMENTS + 1);
}

//! Session pins on a real etcd that stops answering (SIGSTOP) and comes back (issue #18, point
//! 4): no request waits for it beyond the read deadline, the last-known pins keep serving, and
//! everything resumes when it answers again. Two `Pins` stand for two router replicas.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tidelock_protocol::{GroupId, KeyLayout, ModelName, SessionKey, TenantId, WorkerId};
use tidelock_router::sessions::{Deadlines, Pins};
use tidelock_state::testing::EtcdServer;
use tidelock_state::{EtcdStore, StateStore};

fn ids() -> (ModelName, TenantId) {
    (ModelName::new("m").unwrap(), TenantId::new("t").unwrap())
}

fn session(i: usize) -> SessionKey {
    SessionKey::new(format!("s{i}")).unwrap()
}

fn worker(name: &str) -> WorkerId {
    WorkerId::new(name).unwrap()
}

fn group() -> GroupId {
    GroupId::new("g").unwrap()
}

async fn replica(server: &EtcdServer) -> Arc<Pins> {
    // The client's own timeout is 5 s: a pin read that waited for it would take that long.
    let store: Arc<dyn StateStore> = Arc::new(EtcdStore::connect(server.config()).await.unwrap());
    let pins = Arc::new(Pins::with_deadlines(
        store,
        KeyLayout::new(KeyLayout::DEFAULT_ROOT),
        Duration::from_secs(600),
        Deadlines {
            read: Duration::from_millis(50),
            write: Duration::from_millis(500),
        },
    ));
    tokio::spawn(pins.clone().follow());
    pins
}

async fn until(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_etcd_costs_one_read_deadline_and_pins_survive_it() {
    let server = EtcdServer::start().await.unwrap();
    let (model, tenant) = ids();
    let a = replica(&server).await;
    let b = replica(&server).await;
    // Replica a places session 1 on w1; replica b reads that pin from etcd.
    a.set(&model, &tenant, &session(1), group(), worker("w1"))
        .await
        .unwrap();
    assert_eq!(
        b.get(&model, &tenant, &session(1)).await,
        Some(worker("w1"))
    );
    assert!(b.store_reachable());

    server.pause().unwrap();
    // The first new session's read misses its 50 ms deadline; the next 49 do not read at all.
    for i in 100..150 {
        assert_eq!(b.get(&model, &tenant, &session(i)).await, None);
    }
    let metrics = b.metrics();
    assert!(!b.store_reachable());
    assert_eq!(metrics.failed.get(), 1);
    assert_eq!(metrics.skipped.get(), 49);
    assert_eq!(metrics.reachable.get(), 0);
    // The pin b already knew still holds.
    assert_eq!(
        b.get(&model, &tenant, &session(1)).await,
        Some(worker("w1"))
    );
    // A session b places meanwhile stays where b put it, though etcd never hears of it.
    let write = b
        .set(&model, &tenant, &session(2), group(), worker("w2"))
        .await;
    assert!(write.is_err(), "{write:?}");
    assert_eq!(
        b.get(&model, &tenant, &session(2)).await,
        Some(worker("w2"))
    );

    server.resume().unwrap();
    until("b's probe finding etcd again", || b.store_reachable()).await;
    assert_eq!(b.metrics().reachable.get(), 1);
    // Reads and writes go to etcd again: a third replica sees what a and b write now.
    b.set(&model, &tenant, &session(3), group(), worker("w3"))
        .await
        .unwrap();
    let c = replica(&server).await;
    assert_eq!(
        c.get(&model, &tenant, &session(3)).await,
        Some(worker("w3"))
    );
    assert_eq!(
        c.get(&model, &tenant, &session(1)).await,
        Some(worker("w1"))
    );
    // b's watch resumed where it stopped, cache kept: a's move of session 1 reaches it.
    a.set(&model, &tenant, &session(1), group(), worker("w4"))
        .await
        .unwrap();
    until("b following a's move", || {
        b.cached_pin(&model, &tenant, &session(1)) == Some(worker("w4"))
    })
    .await;
}

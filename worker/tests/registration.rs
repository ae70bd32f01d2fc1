//! Worker registration on a real etcd: the key appears with the worker's record, survives while
//! kept alive, comes back after its lease is revoked behind the worker's back, and disappears at
//! once on deregistration.

use std::sync::Arc;
use std::time::Duration;

use tidelock_protocol::{
    BlockTokens, GroupId, KeyLayout, ModelName, ShardIndex, WorkerId, WorkerRegistration,
};
use tidelock_state::testing::EtcdServer;
use tidelock_state::{EtcdStore, StateStore};
use tidelock_worker::registration::Registration;

async fn wait_for<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_lives_with_the_worker() {
    let server = EtcdServer::start().await.expect("etcd");
    let store: Arc<dyn StateStore> = Arc::new(EtcdStore::connect(server.config()).await.unwrap());
    let layout = KeyLayout::default();
    let key = layout.worker(
        &ModelName::new("smollm2").unwrap(),
        &WorkerId::new("worker-0").unwrap(),
    );
    let record = WorkerRegistration {
        address: "http://127.0.0.1:8100".into(),
        group: GroupId::new("g0").unwrap(),
        shard: ShardIndex::new(0),
        shard_count: 1,
        block_tokens: BlockTokens::DEFAULT,
        kv_capacity_bytes: 1 << 30,
    };
    let ttl = Duration::from_secs(2);
    let registration = Registration::start(store.clone(), key.clone(), record.clone(), ttl)
        .await
        .unwrap();
    let kv = store.get(&key).await.unwrap().expect("registered");
    let stored: WorkerRegistration = serde_json::from_slice(&kv.value).unwrap();
    assert_eq!(stored, record);
    let lease = kv.lease.expect("bound to a lease");

    // Kept alive well past the TTL.
    tokio::time::sleep(ttl * 3).await;
    assert!(store.get(&key).await.unwrap().is_some());

    // Someone revokes the lease: the key vanishes, then the worker registers again.
    store.revoke_lease(lease).await.unwrap();
    wait_for("re-registration", || async {
        matches!(store.get(&key).await, Ok(Some(kv)) if kv.lease != Some(lease))
    })
    .await;

    registration.deregister().await;
    assert!(store.get(&key).await.unwrap().is_none(), "gone at once");
}

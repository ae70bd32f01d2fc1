//! Worker discovery from the StateStore (the in-memory store; the same trait as etcd): a
//! registered worker gets a follower and its blocks reach the index; a deleted registration (its
//! lease ended) takes it out of the set and the index; records of other models and garbage values
//! are ignored.

mod support;

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use support::{BLOCK, chain, generate, wait_for, worker};
use tidelock_protocol::{
    BlockTokens, ClusterToken, GroupId, KeyLayout, ModelName, ShardIndex, WorkerId,
    WorkerRegistration,
};
use tidelock_router::KvIndex;
use tidelock_router::discovery::{Discovery, register_static, register_when_up};
use tidelock_router::http::Http;
use tidelock_state::{MemoryStore, StateStore};

fn registration(address: String) -> Vec<u8> {
    serde_json::to_vec(&WorkerRegistration {
        address,
        group: GroupId::new("g").unwrap(),
        shard: ShardIndex::new(0),
        shard_count: 1,
        block_tokens: BlockTokens::new(BLOCK).unwrap(),
        kv_capacity_bytes: 1 << 20,
    })
    .unwrap()
}

async fn wait_workers(discovery: &Discovery, what: &str, want: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let have: Vec<String> = discovery
            .workers()
            .keys()
            .map(|id| id.as_str().to_owned())
            .collect();
        if have == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: workers {have:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_follows_registrations_into_the_index() {
    let running = worker("127.0.0.1:0", 1);
    let store: Arc<dyn StateStore> = Arc::new(MemoryStore::new());
    let layout = KeyLayout::new("/tidelock/");
    let model = ModelName::new("sim").unwrap();
    let w1 = WorkerId::new("w1").unwrap();
    // Registered before discovery starts: found by the listing.
    store
        .put(
            &layout.worker(&model, &w1),
            registration(format!("http://{}", running.addr)),
            None,
        )
        .await
        .unwrap();
    // Another model's worker and a record that is not a registration: both ignored.
    let other = ModelName::new("other").unwrap();
    store
        .put(
            &layout.worker(&other, &WorkerId::new("x").unwrap()),
            registration("http://127.0.0.1:9".into()),
            None,
        )
        .await
        .unwrap();
    store
        .put(
            &layout.worker(&model, &WorkerId::new("bad").unwrap()),
            b"not json".to_vec(),
            None,
        )
        .await
        .unwrap();

    let index = Arc::new(RwLock::new(KvIndex::new(BlockTokens::new(BLOCK).unwrap())));
    let discovery = Discovery::new(
        store.clone(),
        layout.clone(),
        model.clone(),
        index.clone(),
        support::http(),
    );
    let task = tokio::spawn(discovery.clone().run());
    wait_workers(&discovery, "after the listing", &["w1"]).await;

    let prompt: Vec<u32> = (0..200).map(|i| 40 + (i * 7) % 900).collect();
    let hashes = chain(&prompt);
    generate(running.addr, prompt).await;
    wait_for(
        &index,
        &hashes,
        "blocks through the discovered follower",
        |held| held >= 12,
    )
    .await;

    // A second worker registers while discovery watches (no server behind it: it is known, and
    // holds nothing in the index).
    let w2 = WorkerId::new("w2").unwrap();
    store
        .put(
            &layout.worker(&model, &w2),
            registration("http://127.0.0.1:9".into()),
            None,
        )
        .await
        .unwrap();
    wait_workers(&discovery, "after a registration", &["w1", "w2"]).await;

    // w1's registration goes away (its lease ended): out of the set and out of the index, while
    // its server still runs.
    store.delete(&layout.worker(&model, &w1)).await.unwrap();
    wait_workers(&discovery, "after the deletion", &["w2"]).await;
    wait_for(&index, &hashes, "after the deletion", |held| held == 0).await;
    // And it stays out: no follower puts it back.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        index
            .read()
            .unwrap()
            .matches(&hashes)
            .iter()
            .all(|m| m.worker != w1),
        "a removed worker came back into the index"
    );

    task.abort();
    running.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_workers_are_registered_from_their_info_and_discovered() {
    let a = worker("127.0.0.1:0", 1);
    let b = worker("127.0.0.1:0", 1);
    let store: Arc<dyn StateStore> = Arc::new(MemoryStore::new());
    let layout = KeyLayout::default();
    let urls = vec![format!("http://{}/", a.addr), format!("http://{}", b.addr)];
    // Without the cluster credential the workers answer 401, and nothing is registered.
    for client in [Http::default(), Http::new(Some(&ClusterToken::generate()))] {
        let err = register_static(store.as_ref(), &layout, &urls, &client)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("401"), "{err}");
    }
    assert!(
        store
            .list(&layout.workers_dir())
            .await
            .unwrap()
            .kvs
            .is_empty()
    );
    let registered = register_static(store.as_ref(), &layout, &urls, &support::http())
        .await
        .unwrap();
    let model = ModelName::new("sim").unwrap();
    let ids: Vec<String> = registered
        .iter()
        .map(|(m, id)| {
            assert_eq!(m, &model);
            id.as_str().to_owned()
        })
        .collect();
    assert_eq!(ids, [a.addr.to_string(), b.addr.to_string()]);
    // The records carry the workers' shape from /v1/info and a URL without the trailing slash.
    let listing = store.list(&layout.workers_of(&model)).await.unwrap();
    assert_eq!(listing.kvs.len(), 2);
    for kv in &listing.kvs {
        let r: WorkerRegistration = serde_json::from_slice(&kv.value).unwrap();
        assert_eq!(r.block_tokens.as_usize(), BLOCK as usize);
        assert!(!r.address.ends_with('/'));
    }

    // Discovery finds them like registered workers, and their blocks reach the index.
    let index = Arc::new(RwLock::new(KvIndex::new(BlockTokens::new(BLOCK).unwrap())));
    let discovery = Discovery::new(store.clone(), layout, model, index.clone(), support::http());
    let task = tokio::spawn(discovery.clone().run());
    let (first, second) = (a.addr.to_string(), b.addr.to_string());
    // `workers()` is ordered by id.
    let mut both = [first.as_str(), second.as_str()];
    both.sort_unstable();
    wait_workers(&discovery, "static workers", &both).await;
    let prompt: Vec<u32> = (0..100).map(|i| 60 + (i * 13) % 900).collect();
    let hashes = chain(&prompt);
    generate(b.addr, prompt).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let matches = index.read().unwrap().matches(&hashes);
        if matches
            .iter()
            .any(|m| m.worker.as_str() == second && m.total_blocks == hashes.len())
        {
            assert!(matches.iter().all(|m| m.worker.as_str() != first));
            break;
        }
        assert!(Instant::now() < deadline, "index: {matches:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    task.abort();
    a.stop();

    // A URL with nothing behind it: an error naming it.
    let err = register_static(
        store.as_ref(),
        &KeyLayout::default(),
        &[format!("http://{first}")],
        &support::http(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains(&first), "{err}");
    b.stop();
}

/// A router starts while a static worker is down: the worker is registered once it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_worker_that_is_down_is_admitted_when_it_comes_up() {
    let store: Arc<dyn StateStore> = Arc::new(MemoryStore::new());
    let layout = KeyLayout::default();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let task = tokio::spawn(register_when_up(
        store.clone(),
        layout.clone(),
        url,
        support::http(),
    ));
    let registered = || async {
        let listing = store.list(&layout.workers_dir()).await.unwrap();
        listing.kvs.len()
    };
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(registered().await, 0, "nothing answers yet");
    assert!(!task.is_finished(), "still trying");
    let up = worker(&format!("127.0.0.1:{port}"), 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while registered().await == 0 {
        assert!(Instant::now() < deadline, "the worker was never registered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("done once registered")
        .unwrap();
    up.stop();
}

/// A shard group is one routing target, its coordinator (shard 0): the group's other shards are
/// discovered but never offered to placement; a worker alone is a target as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_group_is_one_target_its_coordinator() {
    use tidelock_router::workers::{Models, Probing};
    let store = Arc::new(MemoryStore::new());
    let layout = KeyLayout::default();
    let model = ModelName::new("m").unwrap();
    let put = |id: &'static str, group: &'static str, shard: u32, shards: u32| {
        let store = store.clone();
        let key = layout.worker(&model, &WorkerId::new(id).unwrap());
        async move {
            let r = WorkerRegistration {
                address: "http://127.0.0.1:9".into(),
                group: GroupId::new(group).unwrap(),
                shard: ShardIndex::new(shard),
                shard_count: shards,
                block_tokens: BlockTokens::new(BLOCK).unwrap(),
                kv_capacity_bytes: 1 << 20,
            };
            store
                .put(&key, serde_json::to_vec(&r).unwrap(), None)
                .await
                .unwrap();
        }
    };
    put("g-0", "g", 0, 2).await;
    put("g-1", "g", 1, 2).await;
    put("alone", "alone", 0, 1).await;
    let probing = Probing {
        interval: Duration::from_millis(50),
        timeout: Duration::from_millis(200),
        eject_after: 3,
    };
    let models = Models::new(store.clone(), layout.clone(), probing, support::http());
    let run = tokio::spawn(models.clone().run());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let targets: Vec<String> = models
            .get("m")
            .map(|m| m.workers().keys().map(|w| w.as_str().to_owned()).collect())
            .unwrap_or_default();
        if targets == ["alone", "g-0"] {
            break;
        }
        assert!(Instant::now() < deadline, "targets {targets:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // g-1 stays registered, and stays out: a few more probe rounds change nothing.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let targets: Vec<String> = models
        .get("m")
        .unwrap()
        .workers()
        .keys()
        .map(|w| w.as_str().to_owned())
        .collect();
    assert_eq!(targets, ["alone", "g-0"]);
    run.abort();
}

//! The KV index follows real workers (the simulated engine behind the worker's own HTTP server,
//! on loopback): blocks a request stores appear in the index; a worker restart (new epoch, empty
//! cache) empties that worker's entry through a snapshot reload; an unreachable worker is dropped.

mod support;

use std::sync::{Arc, RwLock};

use support::{BLOCK, chain, generate, wait_for, worker};
use tidelock_protocol::{BlockTokens, WorkerId};
use tidelock_router::KvIndex;
use tidelock_router::follow::Follower;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_follows_a_worker_through_requests_restarts_and_outages() {
    let first = worker("127.0.0.1:0", 1);
    let addr = first.addr;
    let index = Arc::new(RwLock::new(KvIndex::new(BlockTokens::new(BLOCK).unwrap())));
    let follower = tokio::spawn(
        Follower::new(
            WorkerId::new("w1").unwrap(),
            &format!("http://{addr}"),
            index.clone(),
            support::http(),
        )
        .run(),
    );

    // A 200-token prompt fills 12 whole blocks; the worker reports them, the index shows them.
    let prompt: Vec<u32> = (0..200).map(|i| 40 + (i * 7) % 900).collect();
    let hashes = chain(&prompt);
    assert_eq!(hashes.len(), 12);
    generate(addr, prompt.clone()).await;
    wait_for(&index, &hashes, "after the first request", |held| {
        held >= 12
    })
    .await;

    // A longer prompt sharing the prefix: the index extends.
    let mut longer = prompt.clone();
    longer.extend((0..100).map(|i| 50 + (i * 11) % 900));
    let longer_hashes = chain(&longer);
    generate(addr, longer).await;
    wait_for(&index, &longer_hashes, "after the second request", |held| {
        held >= longer_hashes.len()
    })
    .await;

    // The worker restarts on the same port with a new epoch and an empty cache: the follower's
    // stream ends, and the snapshot reload empties the worker's entry.
    first.stop();
    let second = worker(&addr.to_string(), 2);
    wait_for(&index, &hashes, "after the restart", |held| held == 0).await;
    // And it follows the new epoch from there.
    generate(addr, prompt).await;
    wait_for(
        &index,
        &hashes,
        "after a request to the restarted worker",
        |held| held >= 12,
    )
    .await;

    // Gone for good: its blocks leave the index.
    second.stop();
    wait_for(&index, &hashes, "with the worker down", |held| held == 0).await;
    follower.abort();
}

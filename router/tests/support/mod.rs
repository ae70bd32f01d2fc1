//! Shared by the router's component tests: simulated workers served on loopback, each on its own
//! runtime like a separate process and behind the cluster credential ([`TOKEN`]) as
//! `tidelock-worker` serves them, and helpers to drive them and watch the index.

#![allow(dead_code)] // Each test file uses its own subset.

pub mod cluster;

use std::sync::{Arc, LazyLock, RwLock};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tidelock_protocol::{
    BlockHash, BlockTokens, CacheSalt, ClusterToken, Epoch, GenerateRequest, HashChain, ModelName,
    SamplingParams,
};
use tidelock_router::KvIndex;
use tidelock_router::http::Http;
use tidelock_service::cluster_auth::ClusterGuard;
use tidelock_worker::server;
use tidelock_worker::testing::SimWorker;

pub const BLOCK: u32 = 16;

/// The cluster credential the test workers require.
pub static TOKEN: LazyLock<ClusterToken> = LazyLock::new(ClusterToken::generate);

/// A client to the test workers that presents [`TOKEN`], as the router's does.
pub fn http() -> Http {
    Http::new(Some(&TOKEN))
}
pub const VOCAB: usize = 1000;

/// A sim worker serving on its own runtime and thread, like a separate process: stopping it
/// drops the runtime, which closes every connection (as a process exit would).
pub struct RunningWorker {
    pub addr: std::net::SocketAddr,
    /// Its handlers' state (to read its engine's load, or make it drain).
    pub state: tidelock_worker::server::AppState,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RunningWorker {
    pub fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

/// Starts a sim worker on `addr` (port 0 for any) with `epoch`, without a tokenizer.
pub fn worker(addr: &str, epoch: u64) -> RunningWorker {
    worker_with_kit(addr, epoch, None)
}

/// Starts a sim worker that serves `kit` as its tokenizer (`/v1/tokenizer`, `/tokenize`).
pub fn worker_with_kit(
    addr: &str,
    epoch: u64,
    kit: Option<std::sync::Arc<tidelock_prompt::PromptKit>>,
) -> RunningWorker {
    serve_worker(
        addr,
        SimWorker {
            epoch: Epoch::new(epoch),
            vocab_size: VOCAB,
            kit,
            ..SimWorker::new(BLOCK)
        },
    )
}

/// Serves `sim` on `addr` (port 0 for any) on its own runtime and thread.
pub fn serve_worker(addr: &str, sim: SimWorker) -> RunningWorker {
    let state = SimWorker {
        peer_token: Some(TOKEN.clone()),
        ..sim
    }
    .start();
    let shared = state.clone();
    let guard = ClusterGuard::new(Some(TOKEN.clone()));
    let listener = std::net::TcpListener::bind(addr).unwrap();
    listener.set_nonblocking(true).unwrap();
    let bound = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            // As `tidelock-worker` serves: small streamed writes must not wait for a delayed ACK.
            let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                let _ = tcp.set_nodelay(true);
            });
            tokio::select! {
                _ = axum::serve(listener, guard.protect(server::app(state))) => {}
                _ = stopped => {}
            }
        });
        // Dropping the runtime drops every connection task: their sockets close.
        runtime.shutdown_timeout(Duration::from_millis(200));
    });
    RunningWorker {
        addr: bound,
        state: shared,
        stop: Some(stop),
        thread: Some(thread),
    }
}

/// Runs one generation to the end through the worker's internal API.
pub async fn generate(addr: std::net::SocketAddr, tokens: Vec<u32>) {
    let request = GenerateRequest {
        request_id: None,
        session: None,
        cache_salt: CacheSalt::shared(),
        tokens,
        sampling: SamplingParams {
            temperature: 0.0,
            max_tokens: 4,
            ..SamplingParams::default()
        },
        pull: None,
    };
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = hyper::Request::post(format!("http://{addr}/v1/generate"))
        .header("content-type", "application/json")
        .header("authorization", TOKEN.authorization())
        .body(Full::new(Bytes::from(
            serde_json::to_vec(&request).unwrap(),
        )))
        .unwrap();
    let response = client.request(req).await.unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&body).contains("finished"),
        "{body:?}"
    );
}

pub fn chain(tokens: &[u32]) -> Vec<BlockHash> {
    let mut chain = HashChain::new(
        &ModelName::new("sim").unwrap(),
        &CacheSalt::shared(),
        BlockTokens::new(BLOCK).unwrap(),
    );
    chain.extend(tokens);
    chain.hashes().to_vec()
}

/// Polls until `check` holds on worker `w1`'s match (total leading blocks), or fails after 10 s.
pub async fn wait_for(
    index: &Arc<RwLock<KvIndex>>,
    chain: &[BlockHash],
    what: &str,
    check: impl Fn(usize) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let held = index
            .read()
            .unwrap()
            .matches(chain)
            .iter()
            .find(|m| m.worker.as_str() == "w1")
            .map_or(0, |m| m.total_blocks);
        if check(held) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: index shows {held} blocks"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The process's peak resident memory in MiB (`VmHWM`), for the benches.
pub fn peak_rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kib| kib / 1024)
}

/// The runtime the benches run on: two worker threads, as the tests'.
pub fn bench_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

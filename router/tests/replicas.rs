//! Router replicas on one real etcd (issue #18, point 5): each replica is a whole router on its
//! own runtime and thread, serving on loopback as `tidelock-router` does, so stopping one drops
//! its runtime and every connection it held, as a process exit would. The workers are sim
//! workers on the default model's tokenizer (nothing real can generate here in test time).
//!
//! - A session whose turns alternate between two replicas keeps its cache exactly as on one
//!   replica: the same prompts, the same cached tokens, the same answers, turn by turn (the turn
//!   log, `crate::turns`); with the log off, the cache breaks at the first answer.
//! - Killing one replica mid-load fails only the requests it was serving.
//! - A restarted replica serves a session from its pin and its turn log at its first request.

mod support;

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde_json::{Value, json};
use support::cluster::{KEY_A, KEY_B, MODEL, put_tenant, sim_workers, tenant_record};
use support::{BLOCK, RunningWorker};
use tidelock_protocol::KeyLayout;
use tidelock_router::app::{Settings, Shared, app};
use tidelock_router::discovery::register_static;
use tidelock_router::sessions::Pins;
use tidelock_router::tenants::Tenants;
use tidelock_router::workers::{Models, Probing};
use tidelock_state::testing::EtcdServer;
use tidelock_state::{EtcdStore, StateStore};
use tidelock_worker::testing::SimWorker;

const KEY_C: &str = "sk-tenant-c-1357924680";

/// A router replica serving on loopback on its own runtime and thread.
struct Replica {
    url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Replica {
    /// A router over the store at `etcd` with `settings` (the turn log shared when
    /// `settings.share_turns`); returns once it serves the model.
    async fn start(etcd: &EtcdServer, settings: Settings) -> Replica {
        let config = etcd.config();
        let (ready, is_ready) = tokio::sync::oneshot::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let store: Arc<dyn StateStore> =
                    Arc::new(EtcdStore::connect(config).await.unwrap());
                let layout = KeyLayout::default();
                let tenants = Arc::new(Tenants::default());
                let probing = Probing {
                    interval: Duration::from_millis(50),
                    timeout: Duration::from_secs(2),
                    eject_after: 3,
                };
                let models = Models::new(store.clone(), layout.clone(), probing, support::http());
                let pins = Arc::new(Pins::new(
                    store.clone(),
                    layout.clone(),
                    Duration::from_secs(600),
                ));
                tokio::spawn(tenants.clone().follow(store.clone(), layout.clone()));
                tokio::spawn(models.clone().run());
                tokio::spawn(pins.clone().follow());
                let state = Shared::new(models, tenants, pins, settings).unwrap();
                while !state.models.get(MODEL).is_some_and(|m| m.ready())
                    || state.tenants.snapshot().len() < 3
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let _ = ready.send(listener.local_addr().unwrap());
                tokio::select! {
                    _ = axum::serve(listener, app(state)) => {}
                    _ = stopped => {}
                }
            });
            // As a killed process: whatever was in flight is dropped, its sockets closed.
            runtime.shutdown_timeout(Duration::ZERO);
        });
        let addr = tokio::time::timeout(Duration::from_secs(20), is_ready)
            .await
            .expect("the replica serves within 20 s")
            .unwrap();
        Replica {
            url: format!("http://{addr}"),
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Kills the replica: its runtime is dropped at once, requests in flight and all.
    fn kill(mut self) {
        // Dropping the sender ends the server without waiting for anything.
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Real etcd, `n` sim workers registered in it (`sim` adjusts them), tenants a, b, c.
async fn cluster(n: usize, sim: impl Fn(&mut SimWorker)) -> (EtcdServer, Vec<RunningWorker>) {
    let etcd = EtcdServer::start().await.unwrap();
    let (workers, urls) = sim_workers(n, sim);
    let store = EtcdStore::connect(etcd.config()).await.unwrap();
    let layout = KeyLayout::default();
    register_static(&store, &layout, &urls, &support::http())
        .await
        .unwrap();
    for (id, key) in [("a", KEY_A), ("b", KEY_B), ("c", KEY_C)] {
        put_tenant(&store, &layout, id, &tenant_record(key)).await;
    }
    (etcd, workers)
}

fn shared() -> Settings {
    Settings {
        share_turns: true,
        ..Settings::default()
    }
}

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

fn client() -> Client {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

/// POSTs `body` to `url` as tenant `key`; the response's status and body, or why there is none
/// (the body read to its end or to its failure).
async fn post(http: &Client, url: &str, key: &str, body: &Value) -> Result<(u16, Vec<u8>), String> {
    let request = hyper::Request::post(url)
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {key}"))
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(60), http.request(request))
        .await
        .map_err(|_| "no answer in 60 s".to_owned())?
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, bytes.to_vec()))
}

/// One turn: the prompt's tokens, the cached ones, and the answer's text.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Turn {
    prompt: u64,
    cached: u64,
    completion: u64,
    answer: String,
}

/// A conversation of `turns` turns of session `session`, turn `i` sent to `replicas[i % len]`.
async fn converse(replicas: &[&Replica], key: &str, session: &str, turns: usize) -> Vec<Turn> {
    let mut messages = Vec::new();
    go_on(replicas, key, session, &mut messages, turns).await
}

/// [`converse`] from `messages` (each turn's request and answer added to them).
async fn go_on(
    replicas: &[&Replica],
    key: &str,
    session: &str,
    messages: &mut Vec<Value>,
    turns: usize,
) -> Vec<Turn> {
    let http = client();
    if messages.is_empty() {
        messages.push(json!({"role": "system", "content": "You are a patient archivist."}));
    }
    let first = messages.len();
    let mut out = Vec::new();
    for i in first..first + turns {
        messages.push(json!({
            "role": "user",
            "content": format!("Entry {i}: {}", "the tide came in and went out again. ".repeat(20)),
        }));
        let replica = replicas[i % replicas.len()];
        let request = json!({
            "model": MODEL,
            "messages": messages,
            "max_tokens": 40,
            "prompt_cache_key": session,
        });
        let url = format!("{}/v1/chat/completions", replica.url);
        let (status, body) = post(&http, &url, key, &request).await.unwrap();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let body: Value = serde_json::from_slice(&body).unwrap();
        let answer = body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned();
        let usage = &body["usage"];
        out.push(Turn {
            prompt: usage["prompt_tokens"].as_u64().unwrap(),
            cached: usage["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap(),
            completion: usage["completion_tokens"].as_u64().unwrap(),
            answer: answer.clone(),
        });
        messages.push(json!({"role": "assistant", "content": answer}));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_alternating_between_replicas_keeps_its_cache_as_on_one() {
    let (etcd, _workers) = cluster(4, |_| {}).await;
    let a = Replica::start(&etcd, shared()).await;
    let b = Replica::start(&etcd, shared()).await;
    let turns = 6;
    // Tenants have their own cache salts: the three runs share no cached block.
    let alone = converse(&[&a], KEY_A, "archive", turns).await;
    let alternating = converse(&[&a, &b], KEY_B, "archive", turns).await;
    for (i, (one, two)) in alone.iter().zip(&alternating).enumerate() {
        println!(
            "turn {i}: one replica {}/{} cached, alternating {}/{} cached",
            one.cached, one.prompt, two.cached, two.prompt
        );
    }
    assert_eq!(alternating, alone);
    // On one replica every later turn finds the whole previous turn cached, its answer
    // included (all but its last token, whose KV is never computed), in whole blocks.
    let block = u64::from(BLOCK);
    for i in 1..turns {
        let before = &alone[i - 1];
        let whole = before.prompt + before.completion - 1;
        assert!(
            alone[i].cached >= whole / block * block,
            "turn {i}: {:?} after {before:?}",
            alone[i]
        );
    }

    // Negative control: replicas that do not share their turns lose the cache at the answers
    // the other one generated.
    let off = Settings {
        share_turns: false,
        ..Settings::default()
    };
    let c = Replica::start(&etcd, off).await;
    let d = Replica::start(&etcd, off).await;
    let unshared = converse(&[&c, &d], KEY_C, "archive", turns).await;
    let lost: u64 = alone
        .iter()
        .zip(&unshared)
        .map(|(one, other)| one.cached.saturating_sub(other.cached))
        .sum();
    println!(
        "without the turn log: cached {:?}",
        unshared.iter().map(|t| t.cached).collect::<Vec<_>>()
    );
    assert!(
        lost > 0,
        "unshared turns kept every cached token: {unshared:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_replica_serves_a_session_from_its_pin_and_log_at_once() {
    let (etcd, _workers) = cluster(4, |_| {}).await;
    let a = Replica::start(&etcd, shared()).await;
    let mut messages = Vec::new();
    let before = go_on(&[&a], KEY_A, "diary", &mut messages, 3).await;
    a.kill();
    // The conversation goes on through a fresh replica: its first request is the session's
    // fourth turn, placed by the pin on the worker that holds the session, its ids rebuilt
    // from the turn log.
    let b = Replica::start(&etcd, shared()).await;
    let after = go_on(&[&b], KEY_A, "diary", &mut messages, 1).await;
    let (last, next) = (&before[2], &after[0]);
    println!("before the restart {before:?}; after it {next:?}");
    let block = u64::from(BLOCK);
    assert!(
        next.cached >= (last.prompt + last.completion - 1) / block * block,
        "the restarted replica's first request missed its cache: {next:?} after {last:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_replica_fails_only_the_requests_it_was_serving() {
    // Workers slow enough that every request is still streaming when the replica dies.
    let (etcd, _workers) = cluster(2, |w| {
        w.timing.step = Duration::from_millis(20);
    })
    .await;
    let a = Replica::start(&etcd, shared()).await;
    let b = Replica::start(&etcd, shared()).await;
    let http = client();
    let stream = |url: String, i: usize| {
        let http = http.clone();
        async move {
            let request = json!({
                "model": MODEL,
                "messages": [{"role": "user", "content": format!("Story {i}, please.")}],
                "max_tokens": 60,
                "stream": true,
                "prompt_cache_key": format!("story-{i}"),
            });
            let url = format!("{url}/v1/chat/completions");
            let (status, body) = post(&http, &url, KEY_A, &request).await?;
            if status != 200 {
                return Err(format!("status {status}"));
            }
            let text = String::from_utf8(body).map_err(|e| e.to_string())?;
            if text.trim_end().ends_with("data: [DONE]") && !text.contains("\"error\"") {
                Ok(())
            } else {
                Err(format!("the stream ended early: {text}"))
            }
        }
    };
    let on_a: Vec<_> = (0..8)
        .map(|i| tokio::spawn(stream(a.url.clone(), i)))
        .collect();
    let on_b: Vec<_> = (8..16)
        .map(|i| tokio::spawn(stream(b.url.clone(), i)))
        .collect();
    // Mid-answer (60 tokens at 20 ms a step take over a second).
    tokio::time::sleep(Duration::from_millis(400)).await;
    a.kill();
    let mut failed_on_a = 0;
    for task in on_a {
        if task.await.unwrap().is_err() {
            failed_on_a += 1;
        }
    }
    for task in on_b {
        task.await
            .unwrap()
            .expect("a request on the surviving replica failed");
    }
    assert_eq!(
        failed_on_a, 8,
        "the killed replica's requests were in flight"
    );
    // The survivor goes on serving, the killed replica's sessions included.
    stream(b.url.clone(), 0).await.unwrap();
}

//! A whole router in-process over sim workers on loopback: the in-memory store with the workers
//! registered statically, two tenants, and `app(state)` to drive with `oneshot`.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use http_body_util::BodyExt;
use hyper::body::Bytes;
use hyper::{HeaderMap, Method, StatusCode};
use serde_json::Value;
use tidelock_prompt::PromptKit;
use tidelock_protocol::{KeyLayout, TenantId, TenantRecord};
use tidelock_router::app::{AppState, Settings, Shared, app, metrics_app};
use tidelock_router::discovery::register_static;
use tidelock_router::sessions::Pins;
use tidelock_router::tenants::Tenants;
use tidelock_router::workers::{Models, Probing};
use tidelock_state::{MemoryStore, StateStore};
use tidelock_worker::testing::{SimWorker, model_path};
use tokio::task::JoinHandle;
use tower::ServiceExt;

use super::{BLOCK, RunningWorker, serve_worker};

pub const MODEL: &str = "sim";
pub const KEY_A: &str = "sk-tenant-a-0123456789";
pub const KEY_B: &str = "sk-tenant-b-9876543210";

/// The default model's tokenizer and chat template, loaded once per test binary.
pub fn kit() -> Arc<PromptKit> {
    static KIT: OnceLock<Arc<PromptKit>> = OnceLock::new();
    KIT.get_or_init(|| Arc::new(PromptKit::from_gguf_file(&model_path()).unwrap()))
        .clone()
}

pub struct Cluster {
    pub workers: Vec<Option<RunningWorker>>,
    pub store: Arc<MemoryStore>,
    pub layout: KeyLayout,
    pub state: AppState,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        for w in self.workers.iter_mut().filter_map(Option::take) {
            w.stop();
        }
    }
}

/// A record accepting `key`, with its own fresh secret salt.
pub fn tenant_record(key: &str) -> TenantRecord {
    TenantRecord::with_keys([key])
}

/// `n` sim workers (each adjusted by `sim`), tenants `a` and `b` (keys [`KEY_A`], [`KEY_B`],
/// no limits), a router with `settings`; returns once every worker is ready in the router.
pub async fn cluster(n: usize, settings: Settings, sim: impl Fn(&mut SimWorker)) -> Cluster {
    let (workers, urls) = sim_workers(n, sim);
    cluster_at(&urls, workers, settings).await
}

/// `n` sim workers of model [`MODEL`] on the default model's tokenizer, each adjusted by
/// `sim`, serving on loopback; and their URLs.
pub fn sim_workers(n: usize, sim: impl Fn(&mut SimWorker)) -> (Vec<RunningWorker>, Vec<String>) {
    let workers: Vec<RunningWorker> = (0..n)
        .map(|_| {
            let mut w = SimWorker {
                model: tidelock_protocol::ModelName::new(MODEL).unwrap(),
                kit: Some(kit()),
                ..SimWorker::new(BLOCK)
            };
            sim(&mut w);
            serve_worker("127.0.0.1:0", w)
        })
        .collect();
    let urls = workers
        .iter()
        .map(|w| format!("http://{}", w.addr))
        .collect();
    (workers, urls)
}

/// A router with `settings` over the workers at `urls` (`workers` are kept running for as long
/// as the cluster lives; `urls` may lead to them through something else).
pub async fn cluster_at(
    urls: &[String],
    workers: Vec<RunningWorker>,
    settings: Settings,
) -> Cluster {
    let probing = Probing {
        interval: Duration::from_millis(50),
        timeout: Duration::from_secs(2),
        eject_after: 3,
    };
    cluster_probing(urls, workers, settings, probing).await
}

/// [`cluster_at`], probing the workers as `probing` says.
pub async fn cluster_probing(
    urls: &[String],
    workers: Vec<RunningWorker>,
    settings: Settings,
    probing: Probing,
) -> Cluster {
    let n = urls.len();
    let store = Arc::new(MemoryStore::new());
    let layout = KeyLayout::new(KeyLayout::DEFAULT_ROOT);
    register_static(&*store, &layout, urls, &super::http())
        .await
        .unwrap();
    for (id, key) in [("a", KEY_A), ("b", KEY_B)] {
        put_tenant(&*store, &layout, id, &tenant_record(key)).await;
    }
    let dyn_store: Arc<dyn StateStore> = store.clone();
    let tenants = Arc::new(Tenants::default());
    let models = Models::new(dyn_store.clone(), layout.clone(), probing, super::http());
    let pins = Arc::new(Pins::new(
        dyn_store.clone(),
        layout.clone(),
        Duration::from_secs(600),
    ));
    let tasks = vec![
        tokio::spawn(tenants.clone().follow(dyn_store.clone(), layout.clone())),
        tokio::spawn(models.clone().run()),
        tokio::spawn(pins.clone().follow()),
    ];
    let state = Shared::new(models, tenants, pins, settings).unwrap();
    let cluster = Cluster {
        workers: workers.into_iter().map(Some).collect(),
        store,
        layout,
        state,
        tasks,
    };
    cluster
        .wait("every worker ready", |s| {
            s.models.get(MODEL).is_some_and(|m| {
                m.ready() && m.workers().len() == n && m.workers().values().all(|w| w.healthy())
            }) && s.tenants.snapshot().len() == 2
        })
        .await;
    cluster
}

pub async fn put_tenant(
    store: &dyn StateStore,
    layout: &KeyLayout,
    id: &str,
    record: &TenantRecord,
) {
    let key = layout.tenant(&TenantId::new(id).unwrap());
    store
        .put(&key, serde_json::to_vec(record).unwrap(), None)
        .await
        .unwrap();
}

/// A response, whole.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// The `error` object of an OpenAI error body, checked for its shape.
    pub fn error(&self) -> Value {
        let body = self.json();
        let error = body["error"].clone();
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}"
        );
        assert!(error["type"].is_string(), "{body}");
        assert!(
            error.get("param").is_some() && error.get("code").is_some(),
            "{body}"
        );
        error
    }

    /// The `data:` payloads of a server-sent event stream, `[DONE]` included.
    pub fn events(&self) -> Vec<String> {
        let text = std::str::from_utf8(&self.body).unwrap();
        text.split("\n\n")
            .filter(|e| !e.trim().is_empty())
            .map(|e| {
                e.strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("not an SSE data line: {e:?}"))
                    .to_owned()
            })
            .collect()
    }
}

impl Cluster {
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        headers: &[(&str, &str)],
        body: impl Into<Body>,
    ) -> Answer {
        // As a client's HTTP/1.1 request has one (the router refuses requests without it).
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "router");
        if let Some(key) = key {
            request = request.header("authorization", format!("Bearer {key}"));
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = app(self.state.clone())
            .oneshot(request.body(body.into()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        Answer {
            status,
            headers,
            body,
        }
    }

    pub async fn post(&self, path: &str, key: &str, body: Value) -> Answer {
        self.call(Method::POST, path, Some(key), &[], body.to_string())
            .await
    }

    pub async fn get(&self, path: &str, key: Option<&str>) -> Answer {
        self.call(Method::GET, path, key, &[], Body::empty()).await
    }

    /// `GET /metrics` on the metrics listener's routes (the public ones do not serve it).
    pub async fn metrics(&self) -> String {
        let request = hyper::Request::get("/metrics")
            .header("host", "router")
            .body(Body::empty())
            .unwrap();
        let response = metrics_app(self.state.clone())
            .oneshot(request)
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    /// Polls until `check` holds, or fails after 10 s naming `what`.
    pub async fn wait(&self, what: &str, check: impl Fn(&Shared) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !check(&self.state) {
            assert!(Instant::now() < deadline, "timed out waiting for: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops worker `i` (its connections close, as a process exit would).
    pub fn stop_worker(&mut self, i: usize) {
        if let Some(w) = self.workers[i].take() {
            w.stop();
        }
    }
}

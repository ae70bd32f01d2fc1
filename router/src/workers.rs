//! The models the router serves and the live state of their workers.
//!
//! A model appears when its first worker registers (`workers/<model>/...`): the router then
//! builds its KV index (with the block size the registration gives), starts [`Discovery`] for it,
//! and fetches its tokenizer and chat template from a worker. A probe loop per model asks every
//! worker for `/v1/load` each [`Probing::interval`]: the answer feeds the placement policy (queue,
//! measured prefill speed); a missing answer counts as a failure. A worker with
//! [`Probing::eject_after`] consecutive failures (probes or proxied requests) is ejected: no
//! request is placed on it until a probe succeeds again, which readmits it. A probe that times
//! out counts only once the worker has sent no report for [`Probing::patience`]: a worker whose
//! machine is busy answers late but serves, and ejecting it would send its sessions away from
//! their caches, whose recomputation makes every worker busier still. A worker whose
//! registration disappears (its lease ended) is gone for good.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tidelock_prompt::PromptKit;
use tidelock_protocol::{
    BlockHash, BlockTokens, KeyLayout, LoadReport, ModelName, WorkerId, WorkerInfo,
    WorkerRegistration,
};
use tidelock_state::{StateStore, WatchEvent};
use tokio::task::JoinHandle;

use crate::discovery::Discovery;
use crate::http::{Http, HttpError};
use crate::index::{BlockMap, KvIndex, TierCounts};
use crate::policy::{Candidate, CostModel};
use crate::prompt::fetch_kit;

/// How workers are watched.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Probing {
    /// Time between load probes of each worker.
    pub interval: Duration,
    /// How long a probe may take.
    pub timeout: Duration,
    /// Consecutive failures (probes or requests) that eject a worker.
    pub eject_after: u32,
}

impl Probing {
    /// How long a worker may send no load report, its probes timing out, before the timeouts
    /// count as failures: five probe timeouts.
    pub fn patience(&self) -> Duration {
        self.timeout * 5
    }
}

impl Default for Probing {
    fn default() -> Self {
        Probing {
            interval: Duration::from_millis(500),
            timeout: Duration::from_secs(2),
            eject_after: 3,
        }
    }
}

/// What the router knows of one worker right now.
#[derive(Debug)]
pub struct WorkerState {
    pub id: WorkerId,
    pub registration: WorkerRegistration,
    /// The last load report, and when it came (or when the worker was found).
    load: Mutex<(LoadReport, Instant)>,
    /// Longest context the worker takes (from `/v1/info`), once known.
    max_context: AtomicU64,
    failures: AtomicU32,
    eject_after: u32,
    /// Requests this router has sent it that have not ended.
    pub in_flight: AtomicU32,
    /// Prompt tokens this router has sent it whose prefill has not finished.
    pub pending_prefill: AtomicU64,
    /// Requests this router has sent it that have no first token yet.
    pub pending_requests: AtomicU32,
    /// The prompt blocks those requests compute, with how many compute each: a request placed
    /// behind one of them finds its blocks there by the time it runs, long before the worker's
    /// KV events say so (under load, a prefill can take longer than a conversation's next turn
    /// takes to arrive).
    promised: Mutex<BlockMap<u32>>,
    /// `<address>/v1/generate`, parsed once (every request goes there); `None` when the
    /// registered address is not a URL, which every request to it then reports.
    generate: Option<hyper::Uri>,
}

impl WorkerState {
    pub(crate) fn new(id: WorkerId, registration: WorkerRegistration, eject_after: u32) -> Self {
        let generate = format!("{}/v1/generate", registration.address.trim_end_matches('/'))
            .parse()
            .ok();
        WorkerState {
            id,
            generate,
            registration,
            load: Mutex::new((LoadReport::default(), Instant::now())),
            max_context: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            eject_after,
            in_flight: AtomicU32::new(0),
            pending_prefill: AtomicU64::new(0),
            pending_requests: AtomicU32::new(0),
            promised: Mutex::default(),
        }
    }

    /// Where its generate requests go (`None`: its address is not a URL).
    pub(crate) fn generate_uri(&self) -> Option<&hyper::Uri> {
        self.generate.as_ref()
    }

    pub fn load(&self) -> LoadReport {
        self.load.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    /// Time since its last load report (or since it was found, before the first).
    fn silent_for(&self) -> Duration {
        self.load
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .elapsed()
    }

    /// A worker at `http://<name>`, alone in its group, for tests.
    #[cfg(test)]
    pub(crate) fn for_test(name: &str) -> Self {
        use tidelock_protocol::{GroupId, ShardIndex};
        WorkerState::new(
            WorkerId::new(name).unwrap(),
            WorkerRegistration {
                address: format!("http://{name}"),
                group: GroupId::new(name).unwrap(),
                shard: ShardIndex::new(0),
                shard_count: 1,
                block_tokens: BlockTokens::new(64).unwrap(),
                kv_capacity_bytes: 1 << 30,
            },
            3,
        )
    }

    /// Whether requests may be placed on it.
    pub fn healthy(&self) -> bool {
        self.failures.load(Ordering::Relaxed) < self.eject_after
    }

    /// Records a failed probe or request; returns whether this one ejected the worker.
    pub fn record_failure(&self) -> bool {
        self.failures.fetch_add(1, Ordering::Relaxed) + 1 == self.eject_after
    }

    /// Records a success; readmits an ejected worker.
    pub fn record_success(&self) {
        self.failures.store(0, Ordering::Relaxed);
    }

    /// Stores a new load report; whether it is the first to say the worker drains.
    fn set_load(&self, load: LoadReport) -> bool {
        let mut last = self.load.lock().unwrap_or_else(|e| e.into_inner());
        let began = load.draining && !last.0.draining;
        *last = (load, Instant::now());
        began
    }

    /// Marks `chain`'s blocks as being computed here by one more request.
    pub fn promise(&self, chain: &[BlockHash]) {
        let mut promised = self.promised.lock().unwrap_or_else(|e| e.into_inner());
        for h in chain {
            *promised.entry(*h).or_insert(0) += 1;
        }
    }

    /// Undoes one [`Self::promise`] of `chain`.
    pub fn unpromise(&self, chain: &[BlockHash]) {
        let mut promised = self.promised.lock().unwrap_or_else(|e| e.into_inner());
        for h in chain {
            if let Some(n) = promised.get_mut(h) {
                *n -= 1;
                if *n == 0 {
                    promised.remove(h);
                }
            }
        }
    }

    /// Leading blocks of `chain` that requests on this worker are computing. Block hashes are
    /// chained and whole chains are promised, so the promised blocks of a chain are a prefix of
    /// it: a binary search finds its end.
    pub fn promised_prefix(&self, chain: &[BlockHash]) -> usize {
        let promised = self.promised.lock().unwrap_or_else(|e| e.into_inner());
        if promised.is_empty() {
            return 0;
        }
        chain.partition_point(|h| promised.contains_key(h))
    }

    /// The worker as a placement policy sees it, holding `cached` of the prompt's chain and
    /// computing `promised` of it.
    pub fn candidate(&self, cached: TierCounts, promised: usize) -> Candidate {
        Candidate {
            worker: self.id.clone(),
            load: self.load(),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            pending_prefill: self.pending_prefill.load(Ordering::Relaxed),
            pending_requests: self.pending_requests.load(Ordering::Relaxed),
            cached,
            promised,
        }
    }
}

/// One model: its index, its workers, its tokenizer.
#[derive(Debug)]
pub struct Model {
    pub name: ModelName,
    pub block_tokens: BlockTokens,
    pub index: Arc<RwLock<KvIndex>>,
    discovery: Discovery,
    workers: RwLock<Arc<BTreeMap<WorkerId, Arc<WorkerState>>>>,
    kit: RwLock<Option<Arc<PromptKit>>>,
    /// Unix seconds when the router first saw the model (`created` in `/v1/models`).
    pub created: u64,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Model {
    fn drop(&mut self) {
        for task in self
            .tasks
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            task.abort();
        }
    }
}

impl Model {
    /// The workers known now (healthy or not).
    pub fn workers(&self) -> Arc<BTreeMap<WorkerId, Arc<WorkerState>>> {
        self.workers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The tokenizer and chat template, once fetched from a worker.
    pub fn kit(&self) -> Option<Arc<PromptKit>> {
        self.kit.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The longest context every known worker takes (0 while none has said).
    pub fn max_context(&self) -> u64 {
        self.workers()
            .values()
            .map(|w| w.max_context.load(Ordering::Relaxed))
            .filter(|&c| c > 0)
            .min()
            .unwrap_or(0)
    }

    /// Ready to serve: a tokenizer, and a healthy worker whose context is known.
    pub fn ready(&self) -> bool {
        self.kit().is_some()
            && self
                .workers()
                .values()
                .any(|w| w.healthy() && w.max_context.load(Ordering::Relaxed) > 0)
    }

    /// One probe round: reconcile the worker set with discovery, then probe every worker.
    /// Returns the workers whose drain began.
    async fn probe_round(&self, http: &Http, probing: &Probing) -> Vec<WorkerId> {
        // A shard group is one target: its coordinator, shard 0 (issue #7). The other shards
        // hold parts of its sessions' KV and answer only the coordinator.
        let mut registered = self.discovery.workers();
        registered.retain(|_, r| is_coordinator(r));
        let current = self.workers();
        if registered.len() != current.len()
            || registered
                .iter()
                .any(|(id, r)| current.get(id).is_none_or(|w| &w.registration != r))
        {
            let next: BTreeMap<WorkerId, Arc<WorkerState>> = registered
                .into_iter()
                .map(|(id, registration)| {
                    let state = match current.get(&id) {
                        Some(w) if w.registration == registration => w.clone(),
                        _ => Arc::new(WorkerState::new(
                            id.clone(),
                            registration,
                            probing.eject_after,
                        )),
                    };
                    (id, state)
                })
                .collect();
            *self.workers.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
        }
        let workers = self.workers();
        let probes = workers
            .values()
            .map(|w| async { probe(http, w, probing).await.then(|| w.id.clone()) });
        let draining = futures::future::join_all(probes).await;
        if self.kit().is_none() {
            self.fetch_kit(http, &workers).await;
        }
        draining.into_iter().flatten().collect()
    }

    async fn fetch_kit(&self, http: &Http, workers: &BTreeMap<WorkerId, Arc<WorkerState>>) {
        for w in workers.values().filter(|w| w.healthy()) {
            match fetch_kit(http, &w.registration.address).await {
                Ok(kit) => {
                    tracing::info!(model = %self.name, worker = %w.id, "tokenizer and chat template loaded");
                    *self.kit.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(kit));
                    return;
                }
                Err(e) => {
                    tracing::warn!(model = %self.name, error = %e, "no tokenizer from this worker")
                }
            }
        }
    }
}

/// Asks one worker for its load (and, once, its info).
/// Whether requests may be routed to this worker: a worker alone, or shard 0 of its group.
pub fn is_coordinator(r: &WorkerRegistration) -> bool {
    r.shard_count <= 1 || r.shard.get() == 0
}

/// Whether this probe's report is the first to say the worker drains.
async fn probe(http: &Http, w: &WorkerState, probing: &Probing) -> bool {
    let (timeout, patience) = (probing.timeout, probing.patience());
    let base = w.registration.address.trim_end_matches('/');
    if w.max_context.load(Ordering::Relaxed) == 0 {
        match http
            .get_json::<WorkerInfo>(&format!("{base}/v1/info"), timeout)
            .await
        {
            Ok(info) => w
                .max_context
                .store(info.max_context_tokens, Ordering::Relaxed),
            Err(e) => {
                tracing::debug!(worker = %w.id, error = %e, "info probe failed");
            }
        }
    }
    match http
        .get_json::<LoadReport>(&format!("{base}/v1/load"), timeout)
        .await
    {
        Ok(load) => {
            if !w.healthy() {
                tracing::info!(worker = %w.id, "worker answers again: readmitted");
            }
            let began = w.set_load(load);
            w.record_success();
            began
        }
        Err(HttpError::Timeout(_)) if w.silent_for() < patience => {
            tracing::debug!(worker = %w.id, "load report late; placing on the last one meanwhile");
            false
        }
        Err(e) => {
            if w.record_failure() {
                tracing::warn!(worker = %w.id, error = %e, "worker ejected: no load report");
            }
            false
        }
    }
}

/// Every model the router serves, found from worker registrations.
#[derive(Debug)]
pub struct Models {
    store: Arc<dyn StateStore>,
    layout: KeyLayout,
    probing: Probing,
    http: Http,
    /// The cost model draining workers' handoffs are planned with; `None`: draining workers
    /// are sent an empty plan (nothing moves, and they need not wait for one).
    handoff: Option<CostModel>,
    all: RwLock<Arc<BTreeMap<ModelName, Arc<Model>>>>,
}

impl Models {
    /// The models found in `store`; every call to their workers goes through `http` (which
    /// presents the cluster credential).
    pub fn new(
        store: Arc<dyn StateStore>,
        layout: KeyLayout,
        probing: Probing,
        http: Http,
    ) -> Arc<Self> {
        Self::with_handoff(store, layout, probing, http, Some(CostModel::default()))
    }

    /// [`Models::new`], planning draining workers' handoffs with `handoff` (`None`: empty plans).
    pub fn with_handoff(
        store: Arc<dyn StateStore>,
        layout: KeyLayout,
        probing: Probing,
        http: Http,
        handoff: Option<CostModel>,
    ) -> Arc<Self> {
        Arc::new(Models {
            store,
            layout,
            probing,
            http,
            handoff,
            all: RwLock::default(),
        })
    }

    /// The client to the workers.
    pub fn http(&self) -> &Http {
        &self.http
    }

    pub fn get(&self, name: &str) -> Option<Arc<Model>> {
        let name = ModelName::new(name).ok()?;
        self.all().get(&name).cloned()
    }

    pub fn all(&self) -> Arc<BTreeMap<ModelName, Arc<Model>>> {
        self.all.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Finds models until the task is aborted: list `workers/`, then watch it; a model is added
    /// the first time one of its workers is seen. Models are never removed (a model with no
    /// workers answers 503 until one returns).
    pub async fn run(self: Arc<Self>) {
        let dir = self.layout.workers_dir();
        loop {
            let result: Result<(), tidelock_state::StateError> = async {
                let listing = self.store.list(&dir).await?;
                for kv in &listing.kvs {
                    self.saw(&kv.key, &kv.value);
                }
                let mut watch = self.store.watch(&dir, listing.revision).await?;
                while let Some(event) = watch.next().await {
                    if let WatchEvent::Put(kv) = event? {
                        self.saw(&kv.key, &kv.value);
                    }
                }
                Ok(())
            }
            .await;
            if let Err(e) = result {
                tracing::warn!(error = %e, "model discovery: the state store failed; listing again");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn saw(&self, key: &str, value: &[u8]) {
        let Some((name, _)) = self.layout.parse_worker(key) else {
            return;
        };
        if self.all().contains_key(&name) {
            return;
        }
        let Ok(registration) = serde_json::from_slice::<WorkerRegistration>(value) else {
            return;
        };
        let mut guard = self.all.write().unwrap_or_else(|e| e.into_inner());
        if guard.contains_key(&name) {
            return;
        }
        tracing::info!(model = %name, block_tokens = %registration.block_tokens, "model found");
        let model = self.start_model(name.clone(), registration.block_tokens);
        let mut next = (**guard).clone();
        next.insert(name, model);
        *guard = Arc::new(next);
    }

    fn start_model(&self, name: ModelName, block_tokens: BlockTokens) -> Arc<Model> {
        let index = Arc::new(RwLock::new(KvIndex::new(block_tokens)));
        let discovery = Discovery::new(
            self.store.clone(),
            self.layout.clone(),
            name.clone(),
            index.clone(),
            self.http.clone(),
        );
        let model = Arc::new(Model {
            name,
            block_tokens,
            index,
            discovery: discovery.clone(),
            workers: RwLock::default(),
            kit: RwLock::default(),
            created: tidelock_openai::unix_now(),
            tasks: Mutex::default(),
        });
        let weak = Arc::downgrade(&model);
        let (http, probing, handoff) = (self.http.clone(), self.probing, self.handoff);
        let prober = tokio::spawn(async move {
            loop {
                let Some(model) = weak.upgrade() else { return };
                let draining = model.probe_round(&http, &probing).await;
                for worker in draining {
                    let (model, http) = (model.clone(), http.clone());
                    tokio::spawn(async move {
                        crate::handoff::hand_off(&model, &http, handoff.as_ref(), &worker).await;
                    });
                }
                drop(model);
                tokio::time::sleep(probing.interval).await;
            }
        });
        let discovering = tokio::spawn(discovery.run());
        model
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend([prober, discovering]);
        model
    }
}

#[cfg(test)]
mod tests {
    use tidelock_protocol::HashChain;

    use super::*;

    fn chain(tokens: std::ops::Range<u32>) -> Vec<BlockHash> {
        let mut c = HashChain::new(
            &ModelName::new("m").unwrap(),
            &tidelock_protocol::CacheSalt::shared(),
            BlockTokens::new(4).unwrap(),
        );
        c.extend(&tokens.collect::<Vec<_>>());
        c.hashes().to_vec()
    }

    /// A prompt's blocks are promised on the worker computing them, counted per request: a
    /// chain sharing a prefix with one in flight finds exactly that prefix, until the last
    /// request computing it has its first token.
    #[test]
    fn promised_blocks_are_the_prefixes_of_requests_in_flight() {
        let w = WorkerState::for_test("w");
        let first = chain(0..40); // 10 blocks
        let next = chain(0..60); // the same 10, then 5 more
        assert_eq!(w.promised_prefix(&next), 0);
        w.promise(&first);
        assert_eq!(w.promised_prefix(&next), 10);
        assert_eq!(w.promised_prefix(&chain(1..60)), 0);
        w.promise(&first[..4]);
        w.unpromise(&first);
        assert_eq!(
            w.promised_prefix(&next),
            4,
            "the other request still computes 4"
        );
        w.unpromise(&first[..4]);
        assert_eq!(w.promised_prefix(&next), 0);
        assert!(w.promised.lock().unwrap().is_empty());
    }
}

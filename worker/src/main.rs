//! `tidelock-worker`: loads a model, runs the engine on its own thread, and serves the worker API
//! (DESIGN.md, "Worker API") until SIGINT or SIGTERM.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context, bail};
use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use clap::Parser;
use tidelock_prompt::PromptKit;
use tidelock_protocol::openai::OpenAiError;
use tidelock_protocol::{
    BlockTokens, Epoch, GroupId, KeyLayout, ModelName, ShardIndex, WorkerId, WorkerInfo,
    WorkerRegistration,
};
use tidelock_service::cluster_auth::ClusterGuard;
use tidelock_service::metrics_listener;
use tidelock_worker::config::{BackendKind, Compute, Config, Dtype, EngineKind};
use tidelock_worker::engine::executor::{Executor, GroupExecutor, ModelExecutor};
use tidelock_worker::engine::grammar::Grammars;
use tidelock_worker::engine::sim::SimExecutor;
use tidelock_worker::engine::{Engine, EngineConfig};
use tidelock_worker::kv::KvStore;
use tidelock_worker::kv::device::DeviceKv;
use tidelock_worker::kv::pool::BlockPool;
use tidelock_worker::kv::shard::{InProcess, ShardGroup, ShardLink, ShardServer};
use tidelock_worker::kv::tier::Tiers;
use tidelock_worker::model::Llama;
use tidelock_worker::model::gguf::GgufFile;
use tidelock_worker::model::hf::{self, HfFolder};
use tidelock_worker::model::llama::{Placement, WeightFormat};
use tidelock_worker::registration::{self, Registration};
use tidelock_worker::server::runner::Command;
use tidelock_worker::server::{self, app};
use tidelock_worker::shard_rpc::HttpLink;
use tower::ServiceExt;

/// How long the stopping server waits for open connections to end.
const CLOSE_STREAMS_AFTER: Duration = Duration::from_secs(2);

fn main() -> std::process::ExitCode {
    let config = Config::parse();
    // Before anything computes: the model's parallel loops run on rayon's global pool.
    if let Some(threads) = config.threads
        && let Err(e) = rayon::ThreadPoolBuilder::new()
            .num_threads(usize::from(threads))
            .thread_name(|i| format!("compute-{i}"))
            .build_global()
    {
        eprintln!("tidelock-worker: --threads {threads}: {e}");
        return std::process::ExitCode::FAILURE;
    }
    let log = config.log.clone();
    tidelock_service::run("tidelock-worker", Some(2), &log, serve(config))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let block_tokens = BlockTokens::new(config.block_tokens)
        .map_err(|e| anyhow::anyhow!("--block-tokens: {e}"))?;
    let served = ModelName::new(config.served_name()).context("--served-model-name")?;
    if config.max_step_tokens == 0 || config.max_running == 0 {
        bail!("--max-step-tokens and --max-running must be positive");
    }
    let timing = config.sim_timing()?;
    let compute = config.compute()?;
    config.etcd()?;
    let token = config.auth.token()?;
    let guard = ClusterGuard::new(token.clone());
    if config.shards == 0 || config.shard >= config.shards {
        bail!(
            "--shard {} of --shards {}: the shard index must be below the group's size",
            config.shard,
            config.shards
        );
    }
    let shards = config.shards as usize;
    let coordinator = shards > 1 && config.shard == 0;
    if coordinator && config.shard_peers.len() != shards {
        bail!(
            "--shard-peers names {} workers; shard 0 of a group of {shards} needs all {shards}, in shard order",
            config.shard_peers.len()
        );
    }
    if coordinator && config.engine == EngineKind::Sim {
        bail!("--engine sim does not shard: run a group with the real engine, or --shards 1");
    }

    // Listen from the first second: `/healthz` answers while the weights load (a startup
    // probe's budget covers that), `/readyz` and every other route only once loaded.
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let serving: Arc<OnceLock<Router>> = Arc::default();
    let registered = Arc::new(AtomicBool::new(false));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let server = tokio::spawn({
        let app = while_loading(serving.clone(), registered.clone());
        let mut stopped = stopped;
        async move {
            axum::serve(nodelay(listener), app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await
        }
    });
    tracing::info!(listen = %config.listen, "loading; /healthz answers meanwhile");
    let config = Arc::new(config);
    let loading = {
        let (config, token) = (config.clone(), token.clone());
        let runtime = tokio::runtime::Handle::current();
        let (done, loaded) = tokio::sync::oneshot::channel();
        // A thread of its own: loading is seconds to minutes of blocking work, and a signal
        // meanwhile ends the process without waiting for it.
        std::thread::spawn(move || {
            let _runtime = runtime.enter();
            let _ = done.send(load(&config, token, block_tokens, served, timing, compute));
        });
        loaded
    };
    let signal = tidelock_service::shutdown_signal();
    tokio::pin!(signal);
    let loaded = tokio::select! {
        loaded = loading => loaded.context("loading stopped")??,
        () = &mut signal => {
            tracing::info!("stopped while loading");
            return Ok(());
        }
    };
    // The routes first (a router that finds the registration gets answers), then the
    // registration, then ready: a worker that says ready is one routers can find.
    let (registration, engine) = match loaded {
        Loaded::Shard { info, store } => {
            let app = serve_shard(&config, &info, store, &guard).await?;
            let _ = serving.set(guard.protect(app));
            (register(&config, &info).await?, None)
        }
        Loaded::Engine(started) => {
            let state = started.state;
            guard.register(state.metrics.registry())?;
            if let Some(addr) = config.metrics_listen {
                metrics_listener::spawn(addr, app(state.clone())).await?;
            }
            let _ = serving.set(guard.protect(app(state.clone())));
            let registration = register(&config, &state.info).await?;
            tracing::info!(
                model = %state.info.model,
                engine = ?config.engine,
                kv_blocks = state.info.kv_capacity_blocks,
                block_tokens = state.info.block_tokens.get(),
                "serving on http://{}",
                config.listen
            );
            (registration, Some((state, started.engine_thread)))
        }
    };
    registered.store(true, Ordering::Release);
    signal.await;
    tracing::info!("shutting down");
    if let Some((state, _)) = &engine {
        // Drain (issue #21, point 4): routers see it in /readyz and /v1/load and place
        // elsewhere (pulling this worker's blocks while it still answers); what waits is handed
        // back, what runs finishes, the cache is written through to the disk tier.
        state.draining.store(true, Ordering::Relaxed);
        let deadline = std::time::Instant::now() + Duration::from_secs_f64(config.drain_secs);
        let (done, drained) = tokio::sync::oneshot::channel();
        if state
            .commands
            .send(Command::Drain { deadline, done })
            .is_ok()
            && let Ok(d) = drained.await
        {
            tracing::info!(
                handed_back = d.handed_back,
                cut_off = d.cut_off,
                persisted = d.persisted,
                "drained"
            );
        }
        // The blocks go to the peers a router chose before this worker stops answering for them.
        match state.handoff.wait(deadline).await {
            server::handoff::Phase::Waiting => {
                tracing::info!("no router sent a handoff plan; the KV cache stays here")
            }
            server::handoff::Phase::Running => {
                tracing::warn!("the drain deadline passed during the handoff")
            }
            server::handoff::Phase::Done { kept } => {
                tracing::info!(blocks = kept, "handoff done")
            }
        }
    }
    let _ = stop.send(true);
    // Requests have ended; what stays open are routers' KV event streams, which never end by
    // themselves: they are cut after a moment rather than holding the exit until the kill.
    let mut server = server;
    match tokio::time::timeout(CLOSE_STREAMS_AFTER, &mut server).await {
        Ok(served) => served??,
        Err(_) => {
            tracing::info!("open streams (routers following the KV events) cut");
            server.abort();
        }
    }
    if let Some(registration) = registration {
        registration.deregister().await;
    }
    if let Some((state, thread)) = engine {
        let _ = state.commands.send(Command::Shutdown);
        let _ = thread.join();
    }
    Ok(())
}

/// What loading produced: a shard's KV store, or a running engine.
enum Loaded {
    Shard { info: WorkerInfo, store: KvStore },
    Engine(server::Started),
}

/// Reads the tokenizer and the model, sizes the KV cache and starts the engine: the slow part
/// of a start (blocking; minutes for a large model).
fn load(
    config: &Config,
    token: Option<tidelock_protocol::ClusterToken>,
    block_tokens: BlockTokens,
    served: ModelName,
    timing: tidelock_worker::engine::sim::Timing,
    mut compute: Compute,
) -> anyhow::Result<Loaded> {
    let shards = config.shards as usize;
    let coordinator = shards > 1 && config.shard == 0;
    // A folder is a Hugging Face checkpoint; a file is GGUF.
    let hf_folder = config.model.is_dir();
    tracing::info!(model = %config.model.display(), "loading tokenizer and chat template");
    let kit = if hf_folder {
        // A missing tokenizer is named as such before anything is read.
        hf::tokenizer_files(&config.model)?;
        // The template may be its own file; generation_config.json may add end tokens.
        PromptKit::from_hf_folder(&config.model)
    } else {
        PromptKit::from_gguf_file(&config.model)
    };
    let kit = kit.with_context(|| format!("tokenizer of {}", config.model.display()))?;
    // Sampling for what requests leave out: the flags, else the folder's generation config.
    let file_defaults = match hf_folder {
        true => hf::generation_defaults(&config.model)?,
        false => Default::default(),
    };
    let defaults = config.sampling_defaults().or(file_defaults);
    defaults
        .validate()
        .context("--default-temperature, --default-top-p, --default-top-k")?;
    if !defaults.is_empty() {
        tracing::info!(?defaults, "default sampling for requests that leave it out");
    }
    let kit = Arc::new(kit.with_sampling_defaults(defaults));
    for warning in kit.warnings() {
        tracing::warn!("{warning}");
    }
    let model_config = if hf_folder {
        HfFolder::open(&config.model)?.config().clone()
    } else {
        GgufFile::open(&config.model)?.llama_config()?
    };
    let bt = block_tokens.as_usize();
    let shape = tidelock_worker::kv::KvShape {
        layers: model_config.num_hidden_layers,
        kv_heads: model_config.num_kv_heads(),
        head_dim: model_config.head_dim(),
        block_tokens: bt,
    };
    if shards > 1 && compute.kv_dtype != Dtype::F32 {
        // Every shard of a group serves host pages of f32 (kv::shard), sized alike.
        tracing::warn!(
            kv_dtype = compute.kv_dtype.name(),
            "a shard group keeps its KV in f32 host pages; --kv-dtype is ignored"
        );
        compute.kv_dtype = Dtype::F32;
    }
    let block_bytes = match (compute.backend, shards) {
        (BackendKind::Candle, 1) => DeviceKv::block_bytes(&shape, compute.kv_dtype.candle()),
        _ => shape.block_bytes(),
    };
    let num_blocks = usize::try_from(config.kv_cache.as_u64() / block_bytes as u64)?;
    if num_blocks < 2 {
        bail!(
            "--kv-cache {} holds {num_blocks} blocks of {block_bytes} bytes; give it at least 2",
            config.kv_cache,
        );
    }
    let max_context = config.max_context.unwrap_or(model_config.context_length());
    let epoch = Epoch::new(rand::random());
    let engine_config = EngineConfig {
        model: served.clone(),
        block_tokens,
        max_step_tokens: config.max_step_tokens,
        max_running: config.max_running,
        max_waiting: config.max_waiting,
        max_context,
        vocab_size: model_config.vocab_size,
        eos_token_ids: kit.stop_token_ids().to_vec(),
    };
    // Structured outputs: the token trie over the model's vocabulary, built once.
    let grammars = Grammars::new(kit.clone(), model_config.vocab_size)
        .inspect_err(|error| {
            tracing::warn!(%error, "structured outputs are off: constrained requests get a 400")
        })
        .ok();
    // A coordinator's pool numbers the blocks of the whole group (kv::shard).
    let pool_blocks = if coordinator {
        num_blocks * shards
    } else {
        num_blocks
    };
    let pool = BlockPool::new(pool_blocks, block_tokens, epoch);
    let group = GroupId::new(
        config
            .group
            .clone()
            .unwrap_or_else(|| config.listen.to_string()),
    )
    .context("--group")?;
    let info = WorkerInfo {
        model: served.clone(),
        block_tokens,
        dtype: compute.kv_dtype.name().into(),
        kv_capacity_bytes: (pool_blocks * block_bytes) as u64,
        kv_capacity_blocks: pool_blocks as u64,
        max_context_tokens: max_context as u64,
        epoch,
        group,
        shard: ShardIndex::new(config.shard),
        shard_count: config.shards,
    };

    if shards > 1 && config.shard > 0 {
        let store = KvStore::new(shape, num_blocks);
        return Ok(Loaded::Shard { info, store });
    }
    let tokenizer = kit.to_json()?;
    let started = match config.engine {
        EngineKind::Real if coordinator => {
            tracing::info!(backend = ?compute.backend, device = %compute.device, threads = rayon::current_num_threads(), "loading weights");
            let model = Arc::new(load_model(&config.model, hf_folder, &compute)?);
            let timeout = Duration::from_millis(config.shard_timeout_ms);
            let mut links: Vec<Box<dyn ShardLink>> = vec![Box::new(InProcess::new(
                ShardServer::new(KvStore::new(shape, num_blocks)),
            ))];
            for (i, peer) in config.shard_peers.iter().enumerate().skip(1) {
                tracing::info!(shard = i, %peer, "shard link");
                links.push(Box::new(
                    HttpLink::new(peer, timeout, token.clone())
                        .with_context(|| format!("shard {i} link to {peer}"))?,
                ));
            }
            let exec = GroupExecutor {
                model,
                group: ShardGroup::new(links),
                block_tokens: bt,
            };
            server::start(
                Engine::new(engine_config, pool, exec).with_grammars(grammars),
                info,
                tokenizer,
                Some(kit.clone()),
            )?
        }
        EngineKind::Real => {
            tracing::info!(backend = ?compute.backend, device = %compute.device, "loading weights");
            let model = Arc::new(load_model(&config.model, hf_folder, &compute)?);
            match compute.backend {
                BackendKind::Cpu => {
                    let kv = KvStore::new(shape, num_blocks);
                    let engine = Engine::new(engine_config, pool, ModelExecutor { model, kv })
                        .with_grammars(grammars);
                    start_engine(config, engine, info, tokenizer, &kit, &token)?
                }
                BackendKind::Candle => {
                    let kv = DeviceKv::new(
                        shape,
                        num_blocks,
                        compute.kv_dtype.candle(),
                        model.device(),
                    )?;
                    let engine = Engine::new(engine_config, pool, ModelExecutor { model, kv })
                        .with_grammars(grammars);
                    start_engine(config, engine, info, tokenizer, &kit, &token)?
                }
            }
        }
        EngineKind::Sim => {
            // What loading a model's weights would take on the machine simulated.
            std::thread::sleep(Duration::from_secs_f64(config.sim_load_secs.max(0.0)));
            let sim = SimExecutor::new(model_config.vocab_size, timing)
                .with_block_load(Duration::from_secs_f64(config.sim_block_load_secs.max(0.0)));
            start_engine(
                config,
                Engine::new(engine_config, pool, sim).with_grammars(grammars),
                info,
                tokenizer,
                &kit,
                &token,
            )?
        }
    };
    Ok(Loaded::Engine(started))
}

/// Starts the engine and its handlers: with the lower KV tiers `--kv-host` and `--kv-disk` ask
/// for, pulling blocks from peers with the cluster credential.
fn start_engine<E: Executor + 'static>(
    config: &Config,
    engine: Engine<E>,
    info: WorkerInfo,
    tokenizer: String,
    kit: &Arc<PromptKit>,
    token: &Option<tidelock_protocol::ClusterToken>,
) -> anyhow::Result<server::Started> {
    Ok(server::start_with_peers(
        spilling(config, engine)?,
        info,
        tokenizer,
        Some(kit.clone()),
        token.clone(),
    )?)
}

/// The engine with the lower KV tiers `--kv-host` and `--kv-disk` ask for; without them it
/// still stages blocks pulled from peers.
fn spilling<E: Executor>(config: &Config, engine: Engine<E>) -> anyhow::Result<Engine<E>> {
    let tiers = config.tiers();
    let Some(layout) = engine.executor().block_layout() else {
        if !tiers.is_empty() {
            bail!(
                "--kv-disk and --kv-host: a shard group's blocks do not spill to lower tiers yet"
            );
        }
        return Ok(engine);
    };
    Ok(engine.with_tiers(match tiers.is_empty() {
        true => Tiers::staging(layout),
        false => Tiers::open(&tiers, layout)?,
    }))
}

fn load_model(path: &std::path::Path, hf_folder: bool, compute: &Compute) -> anyhow::Result<Llama> {
    // The cpu backend: GGUF's blocks packed for its kernels; Hugging Face folders in f32. The
    // candle backend: dense matrices in --dtype on --device.
    let (format, place) = match compute.backend {
        BackendKind::Cpu => (WeightFormat::Packed, Placement::host()),
        BackendKind::Candle => (
            WeightFormat::F32,
            Placement {
                device: compute.device.open()?,
                dtype: compute.dtype.candle(),
            },
        ),
    };
    Ok(if hf_folder {
        Llama::from_hf_on(path, format, &place)?
    } else {
        Llama::from_gguf_on(path, format, &place)?
    })
}

/// Small streamed writes (one event per token, one reply per layer) must not wait for the
/// peer's delayed ACK.
fn nodelay(
    listener: tokio::net::TcpListener,
) -> impl axum::serve::Listener<Addr = std::net::SocketAddr> {
    axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    })
}

/// `workers/<model>/<worker>` in etcd under a kept-alive lease, when `--etcd` is given.
async fn register(config: &Config, info: &WorkerInfo) -> anyhow::Result<Option<Registration>> {
    let Some(etcd) = config.etcd()? else {
        return Ok(None);
    };
    let store = tidelock_state::EtcdStore::connect(etcd).await?;
    let worker = WorkerId::new(
        config
            .worker_id
            .clone()
            .unwrap_or_else(|| config.listen.to_string()),
    )
    .context("--worker-id")?;
    let key = KeyLayout::new(config.etcd_prefix.clone()).worker(&info.model, &worker);
    let record = WorkerRegistration {
        address: config
            .advertise_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", config.listen)),
        group: info.group.clone(),
        shard: info.shard,
        shard_count: info.shard_count,
        block_tokens: info.block_tokens,
        kv_capacity_bytes: info.kv_capacity_bytes,
    };
    Ok(Some(
        Registration::start(Arc::new(store), key, record, registration::DEFAULT_TTL).await?,
    ))
}

/// A shard other than the coordinator: its KV store behind the shard RPC, no model weights and
/// no engine (the coordinator runs the layers). Returns its routes (before the credential
/// check, which the caller adds), with the metrics port serving them already.
async fn serve_shard(
    config: &Config,
    info: &WorkerInfo,
    store: KvStore,
    guard: &ClusterGuard,
) -> anyhow::Result<Router> {
    let blocks = store.num_blocks();
    let server = ShardServer::new(store);
    tracing::info!(
        shard = config.shard,
        shards = config.shards,
        kv_blocks = blocks,
        incarnation = server.incarnation(),
        "shard of group {}: serving {} on http://{}",
        info.group,
        tidelock_worker::shard_rpc::PATH,
        config.listen
    );
    let app = tidelock_worker::shard_rpc::shard_app(
        info.clone(),
        Arc::new(std::sync::Mutex::new(server)),
        guard,
    );
    if let Some(addr) = config.metrics_listen {
        metrics_listener::spawn(addr, app.clone()).await?;
    }
    Ok(app)
}

/// The worker's routes while it loads: `/healthz` answers (the process is alive: liveness
/// passes), everything else is 503 until [`OnceLock::set`] puts the real routes in `serving`,
/// after which every request goes there, except `/readyz`, which stays 503 until the worker
/// is `registered` too.
fn while_loading(serving: Arc<OnceLock<Router>>, registered: Arc<AtomicBool>) -> Router {
    Router::new().fallback(move |request: axum::extract::Request| {
        let (serving, registered) = (serving.clone(), registered.clone());
        async move {
            match serving.get() {
                Some(_)
                    if request.uri().path() == "/readyz" && !registered.load(Ordering::Acquire) =>
                {
                    (StatusCode::SERVICE_UNAVAILABLE, "registering").into_response()
                }
                Some(app) => app.clone().oneshot(request).await.into_response(),
                None if request.uri().path() == "/healthz" => "loading".into_response(),
                None => tidelock_openai::error_response(&OpenAiError::unavailable(
                    "the worker is loading its model",
                )),
            }
        }
    })
}

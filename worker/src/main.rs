//! `tidelock-worker`: loads a model, runs the engine on its own thread, and serves the worker API
//! (DESIGN.md, "Worker API") until SIGINT or SIGTERM.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::{Context, bail};
use clap::Parser;
use tidelock_prompt::PromptKit;
use tidelock_protocol::{
    BlockTokens, Epoch, GroupId, KeyLayout, ModelName, ShardIndex, WorkerId, WorkerInfo,
    WorkerRegistration,
};
use tidelock_worker::config::{Config, EngineKind};
use tidelock_worker::engine::executor::ModelExecutor;
use tidelock_worker::engine::sim::SimExecutor;
use tidelock_worker::engine::{Engine, EngineConfig};
use tidelock_worker::kv::KvStore;
use tidelock_worker::kv::pool::BlockPool;
use tidelock_worker::kv::shard::ShardServer;
use tidelock_worker::model::Llama;
use tidelock_worker::model::gguf::GgufFile;
use tidelock_worker::model::hf::{self, HfFolder};
use tidelock_worker::model::llama::WeightFormat;
use tidelock_worker::registration::{self, Registration};
use tidelock_worker::server::runner::Command;
use tidelock_worker::server::{self, app};

fn main() -> std::process::ExitCode {
    let config = Config::parse();
    tidelock_service::run("tidelock-worker", Some(2), serve(config))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let block_tokens = BlockTokens::new(config.block_tokens)
        .map_err(|e| anyhow::anyhow!("--block-tokens: {e}"))?;
    let served = ModelName::new(config.served_name()).context("--served-model-name")?;
    if config.max_step_tokens == 0 || config.max_running == 0 {
        bail!("--max-step-tokens and --max-running must be positive");
    }
    let timing = config.sim_timing().map_err(anyhow::Error::msg)?;
    if config.shards == 0 || config.shard >= config.shards {
        bail!(
            "--shard {} of --shards {}: the shard index must be below the group's size",
            config.shard,
            config.shards
        );
    }

    // A folder is a Hugging Face checkpoint; a file is GGUF.
    let hf_folder = config.model.is_dir();
    tracing::info!(model = %config.model.display(), "loading tokenizer and chat template");
    let kit = if hf_folder {
        let (tokenizer, tokenizer_config) = hf::tokenizer_files(&config.model)?;
        PromptKit::from_hf_files(&tokenizer, tokenizer_config.as_deref())
    } else {
        PromptKit::from_gguf_file(&config.model)
    };
    let kit = Arc::new(kit.with_context(|| format!("tokenizer of {}", config.model.display()))?);
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
    let num_blocks = shape.blocks_in(config.kv_cache.as_u64());
    if num_blocks < 2 {
        bail!(
            "--kv-cache {} holds {num_blocks} blocks of {} bytes; give it at least 2",
            config.kv_cache,
            shape.block_bytes()
        );
    }
    let max_context = config
        .max_context
        .unwrap_or(model_config.max_position_embeddings);
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
    let pool = BlockPool::new(num_blocks, block_tokens, epoch);
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
        dtype: "f32".into(),
        kv_capacity_bytes: (num_blocks * shape.block_bytes()) as u64,
        kv_capacity_blocks: num_blocks as u64,
        max_context_tokens: max_context as u64,
        epoch,
        group,
        shard: ShardIndex::new(config.shard),
        shard_count: config.shards,
    };

    let tokenizer = kit.to_json()?;
    let started = match config.engine {
        EngineKind::Real => {
            tracing::info!("loading weights");
            // GGUF: packed quantized weights for decode, f32 for prefill. Hugging Face
            // folders hold f32/f16/bf16 weights: f32 only.
            let model = Arc::new(if hf_folder {
                Llama::from_hf(&config.model, WeightFormat::F32)?
            } else {
                Llama::from_gguf(&config.model, WeightFormat::Packed)?
            });
            let kv = KvStore::new(shape, num_blocks);
            let engine = Engine::new(engine_config, pool, ModelExecutor { model, kv });
            server::start(engine, info, tokenizer, Some(kit.clone()))?
        }
        EngineKind::Sim => {
            let sim = SimExecutor::new(model_config.vocab_size, timing);
            server::start(
                Engine::new(engine_config, pool, sim),
                info,
                tokenizer,
                Some(kit.clone()),
            )?
        }
    };
    let state = started.state;
    let commands = state.commands.clone();
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    tracing::info!(
        model = %served,
        engine = ?config.engine,
        kv_blocks = num_blocks,
        block_tokens = bt,
        "serving on http://{}",
        listener.local_addr()?
    );
    let registration = match config.etcd.is_empty() {
        true => None,
        false => {
            let store = tidelock_state::EtcdStore::connect(tidelock_state::EtcdConfig::new(
                config.etcd.clone(),
            ))
            .await?;
            let worker = WorkerId::new(
                config
                    .worker_id
                    .clone()
                    .unwrap_or_else(|| config.listen.to_string()),
            )
            .context("--worker-id")?;
            let key = KeyLayout::new(config.etcd_prefix.clone()).worker(&served, &worker);
            let record = WorkerRegistration {
                address: config
                    .advertise_url
                    .clone()
                    .unwrap_or_else(|| format!("http://{}", config.listen)),
                group: state.info.group.clone(),
                shard: state.info.shard,
                shard_count: state.info.shard_count,
                block_tokens,
                kv_capacity_bytes: state.info.kv_capacity_bytes,
            };
            Some(
                Registration::start(Arc::new(store), key, record, registration::DEFAULT_TTL)
                    .await?,
            )
        }
    };
    let shutdown_state = state.clone();
    // Small streamed writes (one event per token) must not wait for the peer's delayed ACK.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    let mut router = app(state);
    if config.shards > 1 {
        let bytes = config.shard_kv_cache.unwrap_or(config.kv_cache);
        let blocks = shape.blocks_in(bytes.as_u64());
        tracing::info!(
            shard = config.shard,
            shards = config.shards,
            kv_blocks = blocks,
            "serving shard attention on {}",
            tidelock_worker::shard_rpc::PATH
        );
        let server = ShardServer::new(
            config.shard as usize,
            config.shards as usize,
            KvStore::new(shape, blocks.max(1)),
        );
        router = router.merge(tidelock_worker::shard_rpc::routes(Arc::new(
            std::sync::Mutex::new(server),
        )));
    }
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            tidelock_service::shutdown_signal().await;
            tracing::info!("shutting down");
            shutdown_state.draining.store(true, Ordering::Relaxed);
        })
        .await?;
    if let Some(registration) = registration {
        registration.deregister().await;
    }
    let _ = commands.send(Command::Shutdown);
    let _ = started.engine_thread.join();
    Ok(())
}

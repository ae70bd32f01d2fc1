//! Command-line configuration: the only place that reads the environment.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// File name of the default model inside the model cache.
pub(crate) const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The default model's sampling for requests that leave it out, as its model card recommends
/// (temperature 0.2, top_p 0.9): at OpenAI's temperature 1 a 135M model answers incoherently.
pub(crate) const DEFAULT_MODEL_SAMPLING: [(&str, &str); 2] =
    [("--default-temperature", "0.2"), ("--default-top-p", "0.9")];

/// Tidelock: an LLM inference cluster that keeps every conversation's KV cache.
#[derive(Debug, Parser)]
#[command(name = "tidelock", version, about)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Start a local cluster (router + workers on loopback) and print its endpoint.
    Up(UpArgs),
    /// Chat in the terminal with a Tidelock (or any OpenAI-compatible) endpoint, showing cached
    /// tokens and time to first token after each turn.
    Chat(ChatArgs),
    /// Print the CustomResourceDefinitions (Model, Tenant) as YAML, or write them to a folder.
    Crds(CrdsArgs),
    /// Benchmarks against any OpenAI-compatible endpoint.
    Bench(BenchArgs),
    /// A local Kubernetes control plane to try the chart and the operator on (`./scripts/kube`
    /// builds it and runs `tidelock kube up`).
    Kube(KubeArgs),
    /// Download a model's weights (what a worker pod's init container runs).
    Fetch(FetchArgs),
}

#[derive(Debug, Args)]
pub(crate) struct FetchArgs {
    #[command(subcommand)]
    pub(crate) command: FetchCommand,
}

#[derive(Debug, Subcommand)]
pub(crate) enum FetchCommand {
    /// The files of a Hugging Face repository at a revision ($HF_ENDPOINT, default the public
    /// Hub; $HF_TOKEN for gated repositories).
    Hf {
        /// `owner/name`.
        #[arg(long)]
        repo: String,
        /// A branch, tag or commit.
        #[arg(long, default_value = "main")]
        revision: String,
        /// One file of the repository (e.g. a GGUF) instead of all of them.
        #[arg(long)]
        file: Option<String>,
        /// The folder the files go to (their paths in the repository kept).
        #[arg(long)]
        dest: PathBuf,
    },
    /// One file by URL, its SHA-256 checked when given.
    Url {
        #[arg(long)]
        url: String,
        /// Expected SHA-256, 64 lowercase hex digits: a different download is refused.
        #[arg(long)]
        sha256: Option<String>,
        /// The file to write.
        #[arg(long)]
        dest: PathBuf,
    },
}

#[derive(Debug, Args)]
pub(crate) struct KubeArgs {
    #[command(subcommand)]
    pub(crate) command: KubeCommand,
}

#[derive(Debug, Subcommand)]
pub(crate) enum KubeCommand {
    /// Start kube-apiserver, kube-controller-manager, kube-scheduler and kwok (two CPU and two
    /// H100 fake nodes) on loopback, an etcd for Tidelock's state, and a stand-in kubelet that
    /// runs the pods of tidelock-operator, -router and -worker as local processes; print the
    /// kubeconfig and the commands to try. Ctrl-C stops everything.
    Up(KubeUpArgs),
}

#[derive(Debug, Args)]
pub(crate) struct KubeUpArgs {
    /// The model file CPU workers load (GPU workers run the simulator: no GPU here). Default:
    /// the default model in the cache.
    #[arg(long)]
    pub(crate) model: Option<PathBuf>,

    /// Folder with tidelock-operator, tidelock-router and tidelock-worker. Default: this
    /// program's own folder.
    #[arg(long)]
    pub(crate) bin_dir: Option<PathBuf>,

    /// Where to write the admin kubeconfig (removed on exit). Default: `<cache>/kube/kubeconfig`.
    #[arg(long)]
    pub(crate) kubeconfig: Option<PathBuf>,

    /// Folder of the built control plane (etcd, kube-apiserver, ..., kwok, kubectl, helm).
    /// Default: `<cache>/k8s/<kubernetes version>/bin`, where ./scripts/kube builds it.
    #[arg(long, env = "TIDELOCK_K8S_BIN")]
    pub(crate) k8s_bin: Option<PathBuf>,

    /// Cache directory. Default: `$XDG_CACHE_HOME/tidelock` or `~/.cache/tidelock`.
    #[arg(long, env = "TIDELOCK_CACHE")]
    cache_dir: Option<PathBuf>,
}

impl KubeUpArgs {
    pub(crate) fn cache_dir(&self) -> PathBuf {
        cache_dir(self.cache_dir.as_ref())
    }

    pub(crate) fn model_path(&self) -> PathBuf {
        self.model
            .clone()
            .unwrap_or_else(|| self.cache_dir().join("models").join(DEFAULT_MODEL_FILE))
    }
}

#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    #[command(subcommand)]
    pub(crate) command: BenchCommand,
}

#[derive(Debug, Subcommand)]
pub(crate) enum BenchCommand {
    /// Replay a request trace in the Mooncake format (JSON lines of timestamp, input_length,
    /// output_length, hash_ids): prompts rebuilt block by block as text, sent at the trace's
    /// times; prints hit rate, TTFT, TPOT and throughput.
    Trace(TraceArgs),
    /// Multi-turn sessions: K conversations at once, each turn resending the history and a new
    /// message after a think time; prints the hit rate of first and later turns and their TTFT.
    Sessions(SessionsArgs),
    /// One workload against each of our policies and against sglang-router and vllm-router,
    /// all fronting the same simulated workers (started afresh for each): one table, JSON and
    /// PNG charts. The workload's --url and --api-key are the harness's own.
    Compare(Box<CompareArgs>),
    /// Multi-turn sessions at steady load on a local cluster of simulated workers, two router
    /// replicas and etcd, while processes are killed and restarted at random: failed requests,
    /// answers that differ from an undisturbed replay, hit rate around each fault, recovery
    /// times, memory of every process at the start and the end.
    Chaos(ChaosArgs),
}

#[derive(Debug, Clone, Args)]
pub(crate) struct ChaosArgs {
    /// Seconds of load (faults stop a fault interval before the end, so the last recovers).
    #[arg(long, default_value_t = 120)]
    pub(crate) duration_secs: u64,

    /// Mean seconds between faults (each interval drawn between half and one and a half times).
    #[arg(long, default_value_t = 15.0)]
    pub(crate) fault_every_secs: f64,

    /// Seconds a killed process stays down before it is started again.
    #[arg(long, default_value_t = 2.0)]
    pub(crate) down_secs: f64,

    /// What may be killed, comma-separated: worker, router, etcd.
    #[arg(long, value_delimiter = ',', default_value = "worker,router,etcd")]
    pub(crate) kill: Vec<String>,

    /// Seed of the fault schedule (victims and times).
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,

    /// Simulated workers.
    #[arg(long, default_value_t = 4)]
    pub(crate) workers: usize,

    /// Router replicas (clients stick to one per session, and move to the next when theirs
    /// refuses connections, as a load balancer does).
    #[arg(long, default_value_t = 2)]
    pub(crate) routers: usize,

    /// Conversations at once; each starts a new one after `--turns` turns.
    #[arg(long, default_value_t = 8)]
    pub(crate) sessions: usize,

    /// Turns per conversation.
    #[arg(long, default_value_t = 6)]
    pub(crate) turns: usize,

    /// Pause between an answer and the next turn, in milliseconds.
    #[arg(long, default_value_t = 200)]
    pub(crate) think_ms: u64,

    /// Words in each conversation's system prompt, and in each user message.
    #[arg(long, default_value_t = 300)]
    pub(crate) system_words: usize,
    #[arg(long, default_value_t = 20)]
    pub(crate) message_words: usize,

    /// Tokens per answer.
    #[arg(long, default_value_t = 24)]
    pub(crate) max_tokens: u32,

    /// KV cache per worker, and tokens per block.
    #[arg(long, default_value = "1GiB")]
    pub(crate) kv_cache: String,
    #[arg(long, default_value_t = 16)]
    pub(crate) block_tokens: u32,

    /// Simulated prefill speed (tokens per second) and fixed step cost (milliseconds).
    #[arg(long, default_value_t = 200_000.0)]
    pub(crate) sim_prefill_tokens_per_s: f64,
    #[arg(long, default_value_t = 2.0)]
    pub(crate) sim_step_ms: f64,

    /// The model file whose tokenizer the workers serve. Default: the default model in the cache.
    #[arg(long, env = "TIDELOCK_MODEL")]
    pub(crate) model_file: Option<PathBuf>,

    /// Folder for the report (JSON) and every process's log.
    #[arg(long, default_value = "bench-chaos")]
    pub(crate) out: PathBuf,
}

#[derive(Debug, Args)]
pub(crate) struct CompareArgs {
    /// Routers and policies, as ROUTER:POLICY (ROUTER: ours, sglang or vllm), comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ours:ttft,ours:prefix_only,ours:session_hash,ours:least_loaded,ours:round_robin,sglang:cache_aware,sglang:round_robin,vllm:cache_aware,vllm:consistent_hash"
    )]
    pub(crate) targets: Vec<String>,

    /// Simulated workers.
    #[arg(long, default_value_t = 8)]
    pub(crate) workers: usize,

    /// KV cache per worker; set the total below the workload's working set so routing matters
    /// (the run prints what fraction of the trace's unique blocks the workers hold).
    #[arg(long, default_value = "60GiB")]
    pub(crate) kv_cache: String,

    /// Tokens per KV block.
    #[arg(long, default_value_t = 64)]
    pub(crate) block_tokens: u32,

    /// The workers' longest context (a trace's prompts can exceed the model's own).
    #[arg(long, default_value_t = 200_000)]
    pub(crate) max_context: u64,

    /// Give each worker a disk tier in a folder under this one (emptied before each target, so
    /// every target starts cold): evicted blocks are kept there and loaded back.
    #[arg(long, value_name = "DIR")]
    pub(crate) kv_disk: Option<PathBuf>,

    /// Bytes each worker's disk tier may take (a simulated block's file is 80 bytes).
    #[arg(long, default_value = "16GiB")]
    pub(crate) kv_disk_size: String,

    /// Simulated seconds of step time per block loaded back from the disk tier (the copy into a
    /// real store; a real worker reports it as `tidelock_worker_kv_tier_load_seconds_per_block`).
    #[arg(long, default_value_t = 0.0)]
    pub(crate) sim_block_load_secs: f64,

    /// Simulated prefill speed, tokens per second (0: free).
    #[arg(long, default_value_t = 100_000.0)]
    pub(crate) sim_prefill_tokens_per_s: f64,

    /// Simulated fixed cost of each engine step, milliseconds.
    #[arg(long, default_value_t = 5.0)]
    pub(crate) sim_step_ms: f64,

    /// Simulated decode cost per running sequence and step, milliseconds.
    #[arg(long, default_value_t = 0.2)]
    pub(crate) sim_decode_ms_per_sequence: f64,

    /// Tenants (API keys) the router knows; the sessions workload spreads sessions over them.
    #[arg(long, default_value_t = 3)]
    pub(crate) tenants: usize,

    /// Python with sglang-router and vllm-router installed (see bench/README.md).
    #[arg(long, env = "TIDELOCK_PEERS_PYTHON")]
    pub(crate) peers_python: Option<PathBuf>,

    /// The model file the workers load (its tokenizer; the simulator runs no weights). Default:
    /// the default model in the cache.
    #[arg(long)]
    pub(crate) model_file: Option<PathBuf>,

    /// Seconds each part has to become ready.
    #[arg(long, default_value_t = 120)]
    pub(crate) start_timeout_secs: u64,

    /// Folder for the table's JSON, the charts, each target's own JSON and every log.
    #[arg(long, default_value = "bench-compare")]
    pub(crate) out: PathBuf,

    /// Disrupt the workers while the workload runs, as Kubernetes does: `restart` stops each
    /// worker in turn (SIGTERM: it drains) and starts it again on the same disk folder (a
    /// rolling restart); `scale-to=N` stops every worker past the first N (a scale-down). The
    /// sessions workload then reports its later turns during the disruption apart, and what
    /// each session found cached of what it had at its first turn from the disruption's start
    /// on. Load imbalance is not measured (restarted workers' counters start again).
    #[arg(long, value_name = "restart|scale-to=N")]
    pub(crate) disrupt: Option<Disruption>,

    /// Seconds into the workload when the disruption begins.
    #[arg(long, default_value_t = 10.0)]
    pub(crate) disrupt_after_secs: f64,

    /// More options for our router, e.g. `--router-arg=--pull=never` (repeat for several).
    #[arg(long = "router-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub(crate) router_args: Vec<String>,

    /// `restart`: seconds between one worker being ready again and the next one's SIGTERM.
    #[arg(long, default_value_t = 2.0)]
    pub(crate) restart_gap_secs: f64,

    /// Ports from here on: the workers take PORT to PORT+N-1 (N = --workers), the router PORT+N
    /// and its metrics PORT+N+1; each must be free. Default: free ports the system picks.
    #[arg(long, value_name = "PORT")]
    pub(crate) port_base: Option<u16>,

    /// Cache directory holding the default model and the peers' venv. Default:
    /// `$XDG_CACHE_HOME/tidelock` or `~/.cache/tidelock`.
    #[arg(long, env = "TIDELOCK_CACHE")]
    cache_dir: Option<PathBuf>,

    #[command(subcommand)]
    pub(crate) workload: Workload,
}

impl CompareArgs {
    /// The cache directory (given, else the default).
    pub(crate) fn cache_dir(&self) -> PathBuf {
        cache_dir(self.cache_dir.as_ref())
    }
}

/// What `--disrupt` does to the workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Disruption {
    /// Each worker in turn: SIGTERM, wait for its exit, start it again, wait until ready.
    Restart,
    /// SIGTERM to every worker past the first N, at once.
    ScaleTo(usize),
}

impl std::str::FromStr for Disruption {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('=') {
            None if s == "restart" => Ok(Disruption::Restart),
            Some(("scale-to", n)) => match n.parse::<usize>() {
                Ok(n) if n >= 1 => Ok(Disruption::ScaleTo(n)),
                _ => Err(format!(
                    "scale-to={n}: give a number of workers of at least 1"
                )),
            },
            _ => Err(format!("`{s}`: expected `restart` or `scale-to=N`")),
        }
    }
}

#[derive(Debug, Subcommand)]
pub(crate) enum Workload {
    /// Replay a Mooncake trace (what `tidelock bench trace` sends).
    Trace(TraceWorkload),
    /// Multi-turn sessions (what `tidelock bench sessions` sends).
    Sessions(SessionsWorkload),
}

/// The conversations `bench sessions` holds, the same alone and under `bench compare`.
#[derive(Debug, Clone, Args)]
pub(crate) struct SessionsWorkload {
    /// Conversations at once.
    #[arg(long, default_value_t = 8)]
    pub(crate) sessions: usize,

    /// Turns per conversation.
    #[arg(long, default_value_t = 8)]
    pub(crate) turns: usize,

    /// Pause between an answer and the next turn, in milliseconds.
    #[arg(long, default_value_t = 500)]
    pub(crate) think_ms: u64,

    /// Words in each session's system prompt.
    #[arg(long, default_value_t = 1000)]
    pub(crate) system_words: usize,

    /// Share of the sessions (0 to 1) that open with one common system prompt.
    #[arg(long, default_value_t = 0.5)]
    pub(crate) shared: f64,

    /// Words in each user message.
    #[arg(long, default_value_t = 30)]
    pub(crate) message_words: usize,

    /// Tokens per answer at most.
    #[arg(long, default_value_t = 128)]
    pub(crate) max_tokens: u32,
}

#[derive(Debug, Clone, Args)]
pub(crate) struct SessionsArgs {
    #[command(flatten)]
    pub(crate) endpoint: EndpointArgs,

    #[command(flatten)]
    pub(crate) workload: SessionsWorkload,

    /// API keys of several tenants (comma-separated); sessions take them in turn. Default: the
    /// endpoint's key for every session.
    #[arg(long, value_delimiter = ',')]
    pub(crate) api_keys: Vec<String>,

    /// Write the summary and every turn's numbers here, as JSON.
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
}

/// The requests `bench trace` replays, the same alone and under `bench compare`.
#[derive(Debug, Clone, Args)]
pub(crate) struct TraceWorkload {
    /// The trace file.
    #[arg(long)]
    pub(crate) trace: PathBuf,

    /// GGUF file whose tokenizer the endpoint uses (the prompts' words are single tokens in it).
    /// Default: the default model in the cache.
    #[arg(long)]
    pub(crate) tokenizer: Option<PathBuf>,

    /// Replay this many times faster than the trace's timestamps.
    #[arg(long, default_value_t = 1.0)]
    pub(crate) time_scale: f64,

    /// Only the first N requests.
    #[arg(long)]
    pub(crate) limit: Option<usize>,

    /// Cap on each request's output tokens (default: the trace's output_length).
    #[arg(long)]
    pub(crate) max_output: Option<usize>,
}

#[derive(Debug, Clone, Args)]
pub(crate) struct TraceArgs {
    #[command(flatten)]
    pub(crate) workload: TraceWorkload,

    #[command(flatten)]
    pub(crate) endpoint: EndpointArgs,

    /// Write the summary and every request's numbers here, as JSON.
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,

    /// Metrics URLs of the workers behind the endpoint (comma-separated; `tidelock up`'s
    /// `parts.json` gives each worker's as `metrics`): their prefill token counters, read before
    /// and after, give the load imbalance (max / mean). Any worker exporting
    /// `tidelock_worker_prefill_tokens_total` without a credential there.
    #[arg(long, value_delimiter = ',')]
    pub(crate) workers: Vec<String>,

    /// Exit 0 even when requests fail (they are counted and written to --out).
    #[arg(long)]
    pub(crate) allow_errors: bool,
}

impl TraceArgs {
    pub(crate) fn tokenizer_path(&self) -> PathBuf {
        self.workload.tokenizer.clone().unwrap_or_else(|| {
            self.endpoint
                .cache_dir()
                .join("models")
                .join(DEFAULT_MODEL_FILE)
        })
    }
}

/// An OpenAI-compatible endpoint to talk to, and who we are there.
#[derive(Debug, Clone, Args)]
pub(crate) struct EndpointArgs {
    /// The endpoint's base URL (plain HTTP).
    #[arg(long, env = "TIDELOCK_URL", default_value = "http://127.0.0.1:8000/v1")]
    pub(crate) url: String,

    /// API key. Default: `$OPENAI_API_KEY`, else the local cluster's key from the cache.
    #[arg(long, env = "TIDELOCK_API_KEY")]
    pub(crate) api_key: Option<String>,

    /// Model. Default: the first one the endpoint lists.
    #[arg(long)]
    pub(crate) model: Option<String>,

    /// Cache directory where `tidelock up` keeps the local key (and the default model).
    #[arg(long, env = "TIDELOCK_CACHE")]
    cache_dir: Option<PathBuf>,
}

impl EndpointArgs {
    /// An endpoint known in code: `bench compare`'s own router, with its key and model.
    pub(crate) fn local(url: String, api_key: String, model: String, cache_dir: PathBuf) -> Self {
        EndpointArgs {
            url,
            api_key: Some(api_key),
            model: Some(model),
            cache_dir: Some(cache_dir),
        }
    }

    /// The cache directory (given, else the default).
    pub(crate) fn cache_dir(&self) -> PathBuf {
        cache_dir(self.cache_dir.as_ref())
    }

    /// The key given, else `$OPENAI_API_KEY`, else the local cluster's from the cache.
    pub(crate) fn api_key(&self) -> Option<String> {
        self.api_key
            .clone()
            .or_else(|| {
                std::env::var("OPENAI_API_KEY")
                    .ok()
                    .filter(|k| !k.is_empty())
            })
            .or_else(|| {
                let file = cache_dir(self.cache_dir.as_ref()).join("local-api-key");
                std::fs::read_to_string(file)
                    .ok()
                    .map(|k| k.trim().to_owned())
            })
    }
}

#[derive(Debug, Args)]
pub(crate) struct CrdsArgs {
    /// Write one file per CRD into this folder (e.g. `crds`) instead of printing them.
    #[arg(long)]
    pub(crate) write: Option<PathBuf>,
}

/// What computes the tokens in the local cluster's workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Engine {
    /// The real model on the CPU.
    Real,
    /// The simulator: the same scheduler, cache and APIs, answers of random tokens, no math.
    Sim,
}

/// Where `tidelock up` keeps the cluster's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Store {
    /// In the router's memory.
    Memory,
    /// In a local etcd that up starts.
    Etcd,
}

#[derive(Debug, Args)]
pub(crate) struct UpArgs {
    /// Model to serve: a GGUF file or a Hugging Face folder. Default: the SmolLM2-135M-Instruct
    /// GGUF in the model cache, which `./scripts/up` fetches.
    #[arg(long, env = "TIDELOCK_MODEL")]
    model: Option<PathBuf>,

    /// Model replicas to start: workers, or with `--shards` above 1, shard groups.
    #[arg(long, default_value_t = 2)]
    pub(crate) workers: usize,

    /// Workers per shard group: each replica's KV cache is spread over this many worker
    /// processes (one coordinator running the model, the others holding KV blocks), so one
    /// session can hold `shards` times the context of one worker's `--kv-cache`. The real
    /// engine only.
    #[arg(long, default_value_t = 1)]
    pub(crate) shards: usize,

    /// Port of the router, the endpoint tenants call.
    #[arg(long, default_value_t = 8000)]
    pub(crate) port: u16,

    /// The real model, or the simulator.
    #[arg(long, value_enum, default_value = "real")]
    pub(crate) engine: Engine,

    /// KV cache memory per worker, e.g. `512MiB`.
    #[arg(long, default_value = "512MiB")]
    pub(crate) kv_cache: String,

    /// A folder for the workers' disk tiers (each worker gets its own under it, the same on every
    /// run): KV blocks evicted from memory are kept there, loaded back instead of recomputed, and
    /// found again when a worker restarts. Default: none, evicted blocks are forgotten.
    #[arg(long, value_name = "DIR")]
    pub(crate) kv_disk: Option<PathBuf>,

    /// Bytes each worker's disk tier may take.
    #[arg(long, default_value = "16GiB")]
    pub(crate) kv_disk_size: String,

    /// Tokens per KV block.
    #[arg(long, default_value_t = 64)]
    pub(crate) block_tokens: u32,

    /// Simulator: prefill speed of each worker, tokens per second (0: free). With a cost, the
    /// router's time-to-first-token predictions, and so its placement, see the cache.
    #[arg(long, default_value_t = 0.0)]
    pub(crate) sim_prefill_tokens_per_s: f64,

    /// Simulator: fixed cost of an engine step, in milliseconds.
    #[arg(long, default_value_t = 0.0)]
    pub(crate) sim_step_ms: f64,

    /// Simulator: added cost per decoding sequence per step, in milliseconds.
    #[arg(long, default_value_t = 0.0)]
    pub(crate) sim_decode_ms_per_sequence: f64,

    /// Context (prompt + completion) each worker serves at most. Default: the model's trained
    /// context. The simulator has no positional limit: raise it to replay long traces.
    #[arg(long)]
    pub(crate) max_context: Option<usize>,

    /// Where the cluster's state (session pins, the turn log, tenants) lives. `memory`: in the
    /// router's memory, gone when it restarts (the workers' KV index still finds every cached
    /// prefix; only pins and answers' ids start afresh); nothing else to run, so the default.
    /// `etcd`: a local etcd that up starts (the binary from `$TIDELOCK_ETCD` or PATH), its data
    /// under the run directory, so a router that dies and is restarted serves every session
    /// from its pin and turn log at once, as router replicas in a Kubernetes cluster do.
    #[arg(long, value_enum, default_value = "memory")]
    pub(crate) store: Store,

    /// Tenants file for the router (see router/README.md); default: one local tenant whose key
    /// is kept in the cache and printed.
    #[arg(long)]
    pub(crate) tenants_file: Option<PathBuf>,

    /// Seconds every part has to become ready.
    #[arg(long, default_value_t = 300)]
    pub(crate) start_timeout_secs: u64,

    /// Cache directory for models, the local key and logs. Default: `$XDG_CACHE_HOME/tidelock`
    /// or `~/.cache/tidelock`.
    #[arg(long, env = "TIDELOCK_CACHE")]
    cache_dir: Option<PathBuf>,
}

impl UpArgs {
    /// The model path, resolved against the cache when not given.
    pub(crate) fn model_path(&self) -> PathBuf {
        match &self.model {
            Some(path) => path.clone(),
            None => self.cache_dir().join("models").join(DEFAULT_MODEL_FILE),
        }
    }

    pub(crate) fn cache_dir(&self) -> PathBuf {
        cache_dir(self.cache_dir.as_ref())
    }

    /// The workers' disk tiers, when asked for.
    pub(crate) fn kv_disk(&self) -> Option<crate::up::KvDisk<'_>> {
        self.kv_disk.as_deref().map(|dir| crate::up::KvDisk {
            dir,
            size: &self.kv_disk_size,
        })
    }
}

/// The cache directory when none is given: `$XDG_CACHE_HOME/tidelock` or `~/.cache/tidelock`.
pub(crate) fn default_cache_dir() -> PathBuf {
    cache_dir(None)
}

fn cache_dir(given: Option<&PathBuf>) -> PathBuf {
    if let Some(dir) = given {
        return dir.clone();
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("tidelock");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache").join("tidelock")
}

#[derive(Debug, Args)]
pub(crate) struct ChatArgs {
    #[command(flatten)]
    pub(crate) endpoint: EndpointArgs,

    /// A system prompt for the conversation.
    #[arg(long)]
    pub(crate) system: Option<String>,

    /// Session key (sent as `prompt_cache_key`). Default: a new random one.
    #[arg(long)]
    pub(crate) session: Option<String>,

    /// Most tokens per answer.
    #[arg(long, default_value_t = 256)]
    pub(crate) max_tokens: u32,

    /// Sampling temperature (the server's default when omitted).
    #[arg(long)]
    pub(crate) temperature: Option<f32>,
}

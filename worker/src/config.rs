//! The worker's configuration: command line and environment, parsed by clap and validated into
//! real types before anything starts. The only place that reads the environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use clap::{Parser, ValueEnum};
use tidelock_state::EtcdFlagError;

/// What computes the tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EngineKind {
    /// The real model on candle.
    Real,
    /// The same scheduler, cache and APIs with a timing model instead of the math.
    Sim,
}

/// Which kernels compute (worker README, "Backends").
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// Packed Q4/Q8 weights and KV pages in host memory, hand-written SIMD kernels.
    Cpu,
    /// Dense f32/f16/bf16 weights and KV pages as tensors on `--device`, candle ops.
    Candle,
}

/// An element type of weights or KV.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Dtype {
    F32,
    F16,
    Bf16,
}

impl Dtype {
    pub fn candle(self) -> candle_core::DType {
        match self {
            Dtype::F32 => candle_core::DType::F32,
            Dtype::F16 => candle_core::DType::F16,
            Dtype::Bf16 => candle_core::DType::BF16,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        }
    }
}

/// Where the model computes: the host, or one CUDA GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, DeviceError> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| DeviceError::Unknown(s.to_owned())),
        }
    }
}

/// A `--device` that names no device, or one that cannot be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// Not `cpu`, `cuda` or `cuda:N`.
    #[error("`{0}`: expected `cpu`, `cuda` or `cuda:N`")]
    Unknown(String),
    /// CUDA is built in, but the device does not open. `reason` is the first line of candle's
    /// error (the rest may be a backtrace).
    #[error(
        "--device {device}: no usable CUDA device {ordinal} ({reason}); is the NVIDIA driver \
         installed and the GPU visible to this container (nvidia.com/gpu)?"
    )]
    Unusable {
        device: DeviceSpec,
        ordinal: usize,
        reason: String,
    },
    /// This build has no CUDA.
    #[error(
        "--device {0}: this worker was built without CUDA; build it with `--features cuda` \
         (scripts/cuda.sh) or run the CUDA image (Dockerfile.cuda)"
    )]
    NoCuda(DeviceSpec),
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    /// Opens the device; a clear error where this build or this machine has no such device.
    pub fn open(self) -> Result<candle_core::Device, DeviceError> {
        match self {
            DeviceSpec::Cpu => Ok(candle_core::Device::Cpu),
            #[cfg(feature = "cuda")]
            DeviceSpec::Cuda(n) => candle_core::Device::new_cuda(n).map_err(|e| {
                // candle's error may carry a backtrace after its first line: keep the line only
                // (not the error as a source, which would print the backtrace too).
                let e = e.to_string();
                DeviceError::Unusable {
                    device: self,
                    ordinal: n,
                    reason: e.lines().next().unwrap_or_default().to_owned(),
                }
            }),
            #[cfg(not(feature = "cuda"))]
            DeviceSpec::Cuda(_) => Err(DeviceError::NoCuda(self)),
        }
    }
}

/// Flags that do not go together, or values out of range; the message names the flags.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// The `cpu` backend asked to run on a GPU.
    #[error("--backend cpu runs on the host; --device {0} needs --backend candle")]
    CpuBackendOnDevice(DeviceSpec),
    /// The `cpu` backend asked for a precision other than f32.
    #[error(
        "{flag} {}: the cpu backend computes in f32; use --backend candle for {} (slower on the \
         host)",
        dtype.name(),
        dtype.name()
    )]
    CpuBackendDtype { flag: &'static str, dtype: Dtype },
    /// A simulated duration or rate below zero (or not a number).
    #[error("{flag} must be >= 0, got {value}")]
    Negative { flag: &'static str, value: f64 },
    /// The etcd TLS flags do not go together.
    #[error(transparent)]
    Etcd(#[from] EtcdFlagError),
}

/// The kernels, device and precisions a worker runs with, checked against each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compute {
    pub backend: BackendKind,
    pub device: DeviceSpec,
    /// Dense weights' precision (the `candle` backend; the `cpu` backend packs GGUF blocks and
    /// holds the rest in f32).
    pub dtype: Dtype,
    pub kv_dtype: Dtype,
}

/// Tidelock worker: serves one model with a paged, prefix-cached KV cache.
#[derive(Debug, Parser)]
#[command(name = "tidelock-worker", version, about)]
pub struct Config {
    /// Model: a GGUF file, or a Hugging Face folder (`config.json`, safetensors weights,
    /// `tokenizer.json`, `tokenizer_config.json`).
    #[arg(long, env = "TIDELOCK_MODEL")]
    pub model: PathBuf,

    /// Name the model is served under. Default: the model file's name without extension, or the
    /// folder's name.
    #[arg(long, env = "TIDELOCK_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,

    /// Address to listen on.
    #[arg(long, env = "TIDELOCK_LISTEN", default_value = "127.0.0.1:8100")]
    pub listen: SocketAddr,

    /// Real model math, or the simulator.
    #[arg(long, value_enum, default_value = "real")]
    pub engine: EngineKind,

    /// Kernels: `cpu` (packed Q4/Q8 weights, host KV pages; the default on the host) or
    /// `candle` (dense weights and KV pages as tensors on `--device`; the default on a GPU).
    #[arg(long, env = "TIDELOCK_BACKEND", value_enum)]
    pub backend: Option<BackendKind>,

    /// Where the model computes: `cpu`, or `cuda:N` (GPU N; needs a worker built with
    /// `--features cuda`).
    #[arg(long, env = "TIDELOCK_DEVICE", default_value = "cpu")]
    pub device: DeviceSpec,

    /// Precision of the `candle` backend's dense weights. Default: f16 on a GPU, f32 on the host.
    #[arg(long, env = "TIDELOCK_DTYPE", value_enum)]
    pub dtype: Option<Dtype>,

    /// Threads the model computes on (matrix products, attention): at least 1. Default: one per
    /// core the process may use (or `RAYON_NUM_THREADS`). Fewer leave cores to other processes
    /// on the machine; the HTTP server and the engine loop run on threads of their own.
    #[arg(long, env = "TIDELOCK_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: Option<u16>,

    /// The model's default temperature, for requests that leave it out (a request's own value
    /// always wins). Default: the model folder's `generation_config.json`, else OpenAI's 1.
    #[arg(long, env = "TIDELOCK_DEFAULT_TEMPERATURE")]
    pub default_temperature: Option<f32>,

    /// The model's default top_p, for requests that leave it out. Default: the folder's
    /// `generation_config.json`, else 1.
    #[arg(long, env = "TIDELOCK_DEFAULT_TOP_P")]
    pub default_top_p: Option<f32>,

    /// The model's default top_k, for requests that leave it out. Default: the folder's
    /// `generation_config.json`, else none.
    #[arg(long, env = "TIDELOCK_DEFAULT_TOP_K")]
    pub default_top_k: Option<u32>,

    /// KV cache element type (the Model's `kvCache.dtype`). Default: f16 on a GPU, f32 on the
    /// host; the `cpu` backend holds f32 only.
    #[arg(long, env = "TIDELOCK_KV_DTYPE", value_enum)]
    pub kv_dtype: Option<Dtype>,

    /// Memory for the KV cache, e.g. `512MiB`, `2GiB`.
    #[arg(long, env = "TIDELOCK_KV_CACHE", default_value = "1GiB")]
    pub kv_cache: ByteSize,

    /// A folder for the disk tier: blocks evicted from memory are written here instead of
    /// forgotten, loaded back when a prompt needs them, and found again after a restart (one
    /// worker per folder). Without it, evicted blocks are gone.
    #[arg(long, env = "TIDELOCK_KV_DISK", value_name = "DIR")]
    pub kv_disk: Option<PathBuf>,

    /// Bytes the disk tier may take, e.g. `50GiB`; the least recently used blocks are deleted
    /// beyond it.
    #[arg(long, env = "TIDELOCK_KV_DISK_SIZE", default_value = "16GiB")]
    pub kv_disk_size: ByteSize,

    /// Host memory for blocks evicted from a GPU's KV cache, e.g. `32GiB` (before the disk
    /// tier). 0: none, as on CPU workers, whose KV cache already is host memory.
    #[arg(long, env = "TIDELOCK_KV_HOST", default_value = "0B")]
    pub kv_host: ByteSize,

    /// Seconds a draining worker (SIGTERM) has to let its running requests finish and hand its
    /// cache over to the peers a router chose, before it writes the cache to the disk tier and
    /// exits; keep it under the pod's grace period.
    #[arg(long, env = "TIDELOCK_DRAIN_SECS", default_value_t = 20.0)]
    pub drain_secs: f64,

    /// Tokens per KV block (a power of two, 1 to 1024).
    #[arg(long, default_value_t = 64)]
    pub block_tokens: u32,

    /// Tokens computed per engine step at most (decodes plus prefill chunks).
    #[arg(long, default_value_t = 512)]
    pub max_step_tokens: usize,

    /// Sequences decoded together at most.
    #[arg(long, default_value_t = 64)]
    pub max_running: usize,

    /// Requests waiting for admission at most; more are rejected as overloaded.
    #[arg(long, default_value_t = 256)]
    pub max_waiting: usize,

    /// Context (prompt + completion) in tokens at most. Default: the model's trained context.
    #[arg(long)]
    pub max_context: Option<usize>,

    /// Shard group this worker belongs to (one model replica). Default: this worker alone.
    #[arg(long, env = "TIDELOCK_GROUP")]
    pub group: Option<String>,

    /// Workers in this worker's shard group (issue #7; the Kubernetes operator sets it). Above
    /// 1, shard 0 coordinates: it runs the model and the engine, and its KV pool spans the
    /// group's memory; the other shards only hold KV blocks and serve `POST /v1/shard/attend`.
    #[arg(long, env = "TIDELOCK_SHARDS", default_value_t = 1)]
    pub shards: u32,

    /// This worker's position in its group, from 0 (the operator passes the pod's ordinal).
    #[arg(long, env = "TIDELOCK_SHARD", default_value_t = 0)]
    pub shard: u32,

    /// Base URLs of every worker of the group, in shard order (`http://host:port`, this worker's
    /// own entry included and unused). The coordinator (shard 0) reaches the others through
    /// them; the operator sets them from the StatefulSet's pod names. Every shard of a group
    /// must have the same `--kv-cache`.
    #[arg(long, env = "TIDELOCK_SHARD_PEERS", value_delimiter = ',')]
    pub shard_peers: Vec<String>,

    /// Deadline of one shard call (one layer of one step), in milliseconds: a shard that does
    /// not answer in time fails the step with an error naming it.
    #[arg(long, env = "TIDELOCK_SHARD_TIMEOUT_MS", default_value_t = 30_000)]
    pub shard_timeout_ms: u64,

    /// etcd endpoints (comma-separated) to register this worker in. None: no registration
    /// (static discovery, as `tidelock up` uses).
    #[arg(long, env = "TIDELOCK_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd: Vec<String>,

    /// Key prefix of Tidelock's cluster state in etcd.
    #[arg(long, env = "TIDELOCK_ETCD_PREFIX", default_value = "/tidelock/")]
    pub etcd_prefix: String,

    // --etcd-ca-file, --etcd-cert-file, --etcd-key-file: TLS to etcd (tidelock-state's flags).
    #[command(flatten)]
    pub etcd_tls: tidelock_state::EtcdTlsArgs,

    /// This worker's name in the cluster state (a pod name in Kubernetes). Default: the listen
    /// address.
    #[arg(long, env = "TIDELOCK_WORKER_ID")]
    pub worker_id: Option<String>,

    /// URL routers use to reach this worker. Default: `http://` + the listen address.
    #[arg(long, env = "TIDELOCK_ADVERTISE_URL")]
    pub advertise_url: Option<String>,

    /// The cluster credential every route but `/healthz` and `/readyz` requires (and that a
    /// coordinator sends its shards).
    #[command(flatten)]
    pub auth: tidelock_service::cluster_auth::ClusterAuthArgs,

    /// --log-format: text (coloured only on a terminal) or JSON lines.
    #[command(flatten)]
    pub log: tidelock_service::LogArgs,

    /// Also serve `/metrics`, and nothing else, without the credential on this address (for
    /// Prometheus; the operator opens it to the monitoring namespace only). The main port's
    /// `/metrics` requires the credential like every internal route.
    #[arg(long, env = "TIDELOCK_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Simulator: fixed cost of a step, in milliseconds.
    #[arg(long, default_value_t = 0.0)]
    pub sim_step_ms: f64,

    /// Simulator: prefill throughput, tokens per second (0: free).
    #[arg(long, default_value_t = 0.0)]
    pub sim_prefill_tokens_per_s: f64,

    /// Simulator: added cost per decoding sequence per step, in milliseconds.
    #[arg(long, default_value_t = 0.0)]
    pub sim_decode_ms_per_sequence: f64,

    /// Simulator: seconds its weights take to load (a large model's start), during which
    /// `/healthz` answers and `/readyz` does not.
    #[arg(long, default_value_t = 0.0)]
    pub sim_load_secs: f64,

    /// Simulator: seconds of step time per KV block loaded back from a lower tier (the copy into
    /// a real store; measured on a real worker as `tidelock_worker_kv_tier_load_seconds_per_block`).
    #[arg(long, default_value_t = 0.0)]
    pub sim_block_load_secs: f64,
}

impl Config {
    /// The defaults the flags set (each wins over the model's own file).
    pub fn sampling_defaults(&self) -> tidelock_prompt::SamplingDefaults {
        tidelock_prompt::SamplingDefaults {
            temperature: self.default_temperature,
            top_p: self.default_top_p,
            top_k: self.default_top_k,
        }
    }

    /// The lower KV tiers asked for.
    pub fn tiers(&self) -> crate::kv::tier::TierConfig {
        crate::kv::tier::TierConfig {
            host_bytes: self.kv_host.as_u64(),
            disk: self
                .kv_disk
                .clone()
                .map(|dir| (dir, self.kv_disk_size.as_u64())),
        }
    }

    /// The backend, device and precisions, defaults filled in; an error naming the flags that
    /// do not go together.
    pub fn compute(&self) -> Result<Compute, ConfigError> {
        let gpu = self.device != DeviceSpec::Cpu;
        let backend = self.backend.unwrap_or(match gpu {
            true => BackendKind::Candle,
            false => BackendKind::Cpu,
        });
        let default = match gpu {
            true => Dtype::F16,
            false => Dtype::F32,
        };
        let compute = Compute {
            backend,
            device: self.device,
            dtype: self.dtype.unwrap_or(default),
            kv_dtype: self.kv_dtype.unwrap_or(default),
        };
        if backend == BackendKind::Cpu {
            if gpu {
                return Err(ConfigError::CpuBackendOnDevice(self.device));
            }
            for (flag, dtype) in [("--dtype", compute.dtype), ("--kv-dtype", compute.kv_dtype)] {
                if dtype != Dtype::F32 {
                    return Err(ConfigError::CpuBackendDtype { flag, dtype });
                }
            }
        }
        Ok(compute)
    }

    /// Where to register this worker: `--etcd` with its TLS settings, or none.
    pub fn etcd(&self) -> Result<Option<tidelock_state::EtcdConfig>, EtcdFlagError> {
        self.etcd_tls.config(&self.etcd)
    }

    pub fn served_name(&self) -> String {
        self.served_model_name.clone().unwrap_or_else(|| {
            // A folder's name has no extension to drop: `Qwen2.5-0.5B` stays whole.
            let name = if self.model.is_dir() {
                self.model.file_name()
            } else {
                self.model.file_stem()
            };
            name.map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned())
        })
    }

    pub fn sim_timing(&self) -> Result<crate::engine::sim::Timing, ConfigError> {
        let ms = |flag: &'static str, value: f64| {
            Duration::try_from_secs_f64(value / 1000.0)
                .map_err(|_| ConfigError::Negative { flag, value })
        };
        let per_token = if self.sim_prefill_tokens_per_s > 0.0 {
            Duration::from_secs_f64(1.0 / self.sim_prefill_tokens_per_s)
        } else if self.sim_prefill_tokens_per_s == 0.0 {
            Duration::ZERO
        } else {
            return Err(ConfigError::Negative {
                flag: "--sim-prefill-tokens-per-s",
                value: self.sim_prefill_tokens_per_s,
            });
        };
        Ok(crate::engine::sim::Timing {
            step: ms("--sim-step-ms", self.sim_step_ms)?,
            per_prefill_token: per_token,
            per_decode_sequence: ms(
                "--sim-decode-ms-per-sequence",
                self.sim_decode_ms_per_sequence,
            )?,
        })
    }
}

#[cfg(test)]
mod etcd_tls_tests {
    use clap::Parser;

    use super::{Config, ConfigError};

    fn parse(args: &[&str]) -> Config {
        let base = ["tidelock-worker", "--model", "model.gguf"];
        Config::try_parse_from(base.iter().chain(args).copied()).unwrap()
    }

    #[test]
    fn threads_are_at_least_one() {
        assert_eq!(parse(&[]).threads, None);
        assert_eq!(parse(&["--threads", "3"]).threads, Some(3));
        for bad in ["0", "-1", "many"] {
            let threads = format!("--threads={bad}");
            let args = ["tidelock-worker", "--model", "model.gguf", threads.as_str()];
            let err = Config::try_parse_from(args).unwrap_err();
            assert!(err.to_string().contains("--threads"), "{bad}: {err}");
        }
    }

    /// The operator passes `--kv-disk-size` as a plain byte count; people write `50GiB`.
    #[test]
    fn tiers_come_from_kv_disk_and_kv_host() {
        assert!(parse(&[]).tiers().is_empty());
        let t = parse(&["--kv-disk", "/kv", "--kv-disk-size", "193273528320"]).tiers();
        assert_eq!(t.disk, Some(("/kv".into(), 193_273_528_320)));
        assert_eq!(t.host_bytes, 0);
        let t = parse(&[
            "--kv-disk",
            "/kv",
            "--kv-disk-size",
            "50GiB",
            "--kv-host",
            "2GiB",
        ])
        .tiers();
        assert_eq!(t.disk, Some(("/kv".into(), 50 << 30)));
        assert_eq!(t.host_bytes, 2 << 30);
        assert_eq!(
            parse(&["--kv-disk", "/kv"]).tiers().disk,
            Some(("/kv".into(), 16 << 30))
        );
    }

    #[test]
    fn backend_device_and_dtypes_default_and_refuse_what_cannot_run() {
        use super::{BackendKind, DeviceSpec, Dtype};
        let host = parse(&[]).compute().unwrap();
        assert_eq!(
            (host.backend, host.device, host.dtype, host.kv_dtype),
            (BackendKind::Cpu, DeviceSpec::Cpu, Dtype::F32, Dtype::F32)
        );
        let gpu = parse(&["--device", "cuda:1"]).compute().unwrap();
        assert_eq!(
            (gpu.backend, gpu.device, gpu.dtype, gpu.kv_dtype),
            (
                BackendKind::Candle,
                DeviceSpec::Cuda(1),
                Dtype::F16,
                Dtype::F16
            )
        );
        let half = parse(&["--backend", "candle", "--kv-dtype", "bf16"])
            .compute()
            .unwrap();
        assert_eq!((half.dtype, half.kv_dtype), (Dtype::F32, Dtype::Bf16));
        let error = parse(&["--kv-dtype", "f16"]).compute().unwrap_err();
        assert_eq!(
            error,
            ConfigError::CpuBackendDtype {
                flag: "--kv-dtype",
                dtype: Dtype::F16
            }
        );
        let text = error.to_string();
        assert!(
            text.contains("--kv-dtype f16") && text.contains("--backend candle"),
            "{text}"
        );
        let error = parse(&["--backend", "cpu", "--device", "cuda"])
            .compute()
            .unwrap_err();
        assert_eq!(error, ConfigError::CpuBackendOnDevice(DeviceSpec::Cuda(0)));
        assert!(
            error
                .to_string()
                .contains("--device cuda:0 needs --backend candle"),
            "{error}"
        );
        let base = ["tidelock-worker", "--model", "m.gguf", "--device", "gpu0"];
        let error = Config::try_parse_from(base).unwrap_err().to_string();
        assert!(
            error.contains("expected `cpu`, `cuda` or `cuda:N`"),
            "{error}"
        );
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_get_it() {
        let error = super::DeviceSpec::Cuda(0).open().unwrap_err();
        assert_eq!(
            error,
            super::DeviceError::NoCuda(super::DeviceSpec::Cuda(0))
        );
        let text = error.to_string();
        assert!(
            text.contains("built without CUDA") && text.contains("--features cuda"),
            "{text}"
        );
    }

    #[test]
    fn registration_gets_the_etcd_tls_settings() {
        assert!(parse(&[]).etcd().unwrap().is_none());
        let error = parse(&["--etcd-ca-file", "ca.crt"]).etcd().unwrap_err();
        assert_eq!(error, tidelock_state::EtcdFlagError::TlsWithoutEndpoints);
        assert!(error.to_string().contains("need --etcd"), "{error}");
        let etcd = parse(&[
            "--etcd",
            "https://e:2379",
            "--etcd-ca-file",
            "ca.crt",
            "--etcd-cert-file",
            "tls.crt",
            "--etcd-key-file",
            "tls.key",
        ])
        .etcd()
        .unwrap()
        .unwrap();
        assert_eq!(etcd.endpoints, ["https://e:2379"]);
        assert_eq!(
            etcd.tls,
            Some(tidelock_state::EtcdTls::new("ca.crt").with_identity("tls.crt", "tls.key"))
        );
    }

    #[test]
    fn simulated_timings_refuse_negative_values() {
        let error = parse(&["--sim-step-ms=-1"]).sim_timing().unwrap_err();
        assert_eq!(
            error,
            ConfigError::Negative {
                flag: "--sim-step-ms",
                value: -1.0
            }
        );
        assert_eq!(error.to_string(), "--sim-step-ms must be >= 0, got -1");
        let error = parse(&["--sim-prefill-tokens-per-s=-2"])
            .sim_timing()
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "--sim-prefill-tokens-per-s must be >= 0, got -2"
        );
    }
}

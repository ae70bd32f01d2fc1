//! The router's configuration: command line and environment, parsed by clap and turned into the
//! library's settings before anything starts. The only place that reads the environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use clap::Parser;

use crate::app::Settings;
use crate::cpu::CpuLimits;
use crate::policy::{CostModel, Policy};
use crate::proxy::ProxyConfig;
use crate::workers::Probing;
use tidelock_service::serve::ClientLimits;
use tidelock_state::EtcdFlagError;

/// Flag values the router cannot run with; the message names the flags.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Neither static workers nor etcd: nothing to route to.
    #[error("give the workers (--worker URL, repeatable) or an etcd cluster (--etcd ENDPOINTS)")]
    NoWorkers,
    /// Both static workers and etcd.
    #[error("--worker and --etcd exclude each other: with etcd, workers register themselves")]
    WorkersAndEtcd,
    /// The etcd TLS flags do not go together.
    #[error(transparent)]
    Etcd(#[from] EtcdFlagError),
    /// A tenants file, with etcd holding the tenants.
    #[error(
        "--tenants-file is for the in-memory store; with --etcd, tenants come from etcd (the \
         operator writes them from Tenant resources)"
    )]
    TenantsFileWithEtcd,
    /// A count, limit or timeout given as zero (or a rate not above zero).
    #[error("{0} must be positive")]
    NotPositive(&'static str),
    /// A number that must be finite and non-negative.
    #[error("{0} must be a non-negative number")]
    Negative(&'static str),
    /// Less preparation memory than one tokenization needs.
    #[error("--prepare-memory must be at least 64MiB (got {0}): requests are tokenized within it")]
    PrepareMemoryTooSmall(ByteSize),
}

/// Tidelock router: the OpenAI-compatible endpoint tenants call; pins each session to the
/// workers holding its cached prefix.
#[derive(Debug, Parser)]
#[command(name = "tidelock-router", version, about)]
pub struct Config {
    /// Address to listen on: the OpenAI API, for tenants.
    #[arg(long, env = "TIDELOCK_ROUTER_LISTEN", default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,

    /// Address of `/metrics` (and nothing else), apart from the public port, which never serves
    /// them (they name tenants and workers). The chart opens it to the monitoring namespace
    /// only. None: no metrics.
    #[arg(long, env = "TIDELOCK_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// The cluster credential the router presents to its workers.
    #[command(flatten)]
    pub auth: tidelock_service::cluster_auth::ClusterAuthArgs,

    /// --log-format: text (coloured only on a terminal) or JSON lines.
    #[command(flatten)]
    pub log: tidelock_service::LogArgs,

    /// Workers given by URL (repeat, or comma-separate), e.g. `http://127.0.0.1:8100`: static
    /// discovery with the in-memory state store (the local cluster). Without it, `--etcd`. A
    /// worker that does not answer yet is retried in the background (at most every 5 s) and
    /// admitted when it does; the router does not wait for it.
    #[arg(long = "worker", env = "TIDELOCK_WORKERS", value_delimiter = ',')]
    pub workers: Vec<String>,

    /// etcd endpoints (comma-separated): workers, tenants and session pins come from there.
    #[arg(long, env = "TIDELOCK_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd: Vec<String>,

    /// Key prefix of Tidelock's cluster state in etcd.
    #[arg(long, env = "TIDELOCK_ETCD_PREFIX", default_value = "/tidelock/")]
    pub etcd_prefix: String,

    // --etcd-ca-file, --etcd-cert-file, --etcd-key-file: TLS to etcd (tidelock-state's flags).
    #[command(flatten)]
    pub etcd_tls: tidelock_state::EtcdTlsArgs,

    /// Tenants file (with the in-memory store only): a JSON object from tenant id to its record,
    /// `{"<tenant>": {"key_hashes": ["<BLAKE3 hex of the key>"], "cache_salt": "<32+ random
    /// hex digits, secret>", "allowed_models": [], "limits": {"requests_per_minute": 60, ...},
    /// "share_cache": false}}`. Tenants that share their cache give the same salt. Re-read when
    /// it changes.
    #[arg(long, env = "TIDELOCK_TENANTS_FILE")]
    pub tenants_file: Option<PathBuf>,

    /// Placement policy.
    #[arg(long, value_enum, default_value = "ttft")]
    pub policy: Policy,

    /// `ttft`: keep a session's pinned worker while its predicted TTFT is at most the best one's
    /// times (1 + this) plus `--pin-margin-ms`.
    #[arg(long, default_value_t = 0.5)]
    pub pin_margin_ratio: f64,

    /// `ttft`: the absolute part of the pin margin, in milliseconds.
    #[arg(long, default_value_t = 50)]
    pub pin_margin_ms: u64,

    /// `ttft`: how much more than its own prefill a placement away from the longest cached
    /// prefix is charged, per missing token (0: the predicted TTFT alone).
    #[arg(long, env = "TIDELOCK_ROUTER_CACHE_WEIGHT", default_value_t = 3.0)]
    pub cache_weight: f64,

    /// `ttft`: when a request placed away from its cached prefix pulls the prefix from the
    /// worker holding it. `drain` (default): only from a draining worker (its sessions move
    /// with their cache), and a draining worker is sent a plan of which peers take which of
    /// its cached chains, which they pull before it exits. `load`: also when the holder's queue makes another worker the better
    /// place and the pull is predicted cheaper than recomputing (in the simulated benchmark the
    /// per-block figure does not yet price a pull's wait for the holder's engine step; see
    /// bench/README.md). `never`: recompute, and no handoff at a drain.
    #[arg(long, value_enum, default_value = "drain")]
    pub pull: crate::policy::PullWhen,

    /// `ttft`: prefill tokens per second assumed for a worker that has not measured its own
    /// while no worker of its model has (otherwise it is assumed as fast as their median).
    #[arg(long, default_value_t = 2_000.0)]
    pub default_prefill_tps: f64,

    /// Longest wait for a session's pin from the state store on a request's path, in
    /// milliseconds; past it (or on an error) the session is placed without its pin (the KV
    /// index still finds its prefix) and the store is probed each second, unread meanwhile.
    #[arg(
        long,
        env = "TIDELOCK_ROUTER_PIN_READ_TIMEOUT_MS",
        default_value_t = 50
    )]
    pub pin_read_timeout_ms: u64,

    /// Longest wait for a pin write (in the background), in milliseconds.
    #[arg(
        long,
        env = "TIDELOCK_ROUTER_PIN_WRITE_TIMEOUT_MS",
        default_value_t = 2_000
    )]
    pub pin_write_timeout_ms: u64,

    /// Idle time after which a session's pin is forgotten, in seconds.
    #[arg(long, default_value_t = 3_600)]
    pub session_idle_secs: u64,

    /// Token ids of sessions' last prompts and answers kept in memory (all sessions together,
    /// least recently used out first), so a session's next turn starts from the ids the worker
    /// cached instead of re-tokenizing the answer from its text. 0 turns it off. With --etcd,
    /// the replicas share each session's answered turns through etcd (about 4 bytes per
    /// generated token, gone with the session's idle lease), so a session keeps its cache on
    /// whichever replica its next turn lands.
    #[arg(long, env = "TIDELOCK_ROUTER_TURN_MEMORY_TOKENS", default_value_t = 16 << 20)]
    pub turn_memory_tokens: usize,

    /// Requests served at once; more wait in the queue.
    #[arg(long, default_value_t = 1_024)]
    pub max_in_flight: usize,

    /// Requests waiting for a slot at most; beyond, 503 with Retry-After.
    #[arg(long, default_value_t = 4_096)]
    pub max_queue: usize,

    /// Longest wait in the queue, in seconds, before a 503.
    #[arg(long, default_value_t = 30)]
    pub queue_timeout_secs: u64,

    /// Largest request body, e.g. `32MiB`, whatever the context; below it, a tenant may send 32
    /// bytes per token of the longest context it may use, plus 64 KiB.
    #[arg(long, default_value = "32MiB")]
    pub max_body: ByteSize,

    /// Seconds a client has to send a request's headers; also how long a kept-alive connection
    /// may wait idle for its next request. Then the connection is closed.
    #[arg(
        long,
        env = "TIDELOCK_ROUTER_CLIENT_HEADER_TIMEOUT_SECS",
        default_value_t = 30
    )]
    pub client_header_timeout_secs: u64,

    /// Seconds a client has to send a request's whole body; then 408.
    #[arg(
        long,
        env = "TIDELOCK_ROUTER_CLIENT_BODY_TIMEOUT_SECS",
        default_value_t = 60
    )]
    pub client_body_timeout_secs: u64,

    /// Seconds a write to a client may make no progress (a client that stopped reading its
    /// stream): then the connection is closed and its worker request cancelled. A client that
    /// reads slowly but reads is never cut.
    #[arg(
        long,
        env = "TIDELOCK_ROUTER_CLIENT_WRITE_TIMEOUT_SECS",
        default_value_t = 60
    )]
    pub client_write_timeout_secs: u64,

    /// Client connections open at once; one more is answered 503 (Retry-After) and closed.
    #[arg(long, env = "TIDELOCK_ROUTER_MAX_CONNECTIONS", default_value_t = 8_192)]
    pub max_connections: usize,

    /// Requests of one tenant open at once, from its key being checked to the end of its answer
    /// (streams included); one more is answered 429 (Retry-After). The tenant's own
    /// `max_concurrent` limit, when lower, applies too.
    #[arg(
        long,
        env = "TIDELOCK_ROUTER_MAX_REQUESTS_PER_TENANT",
        default_value_t = 256
    )]
    pub max_requests_per_tenant: usize,

    /// Requests parsed, rendered and tokenized at once, on threads apart from the ones serving
    /// connections (so a huge prompt never delays others or `/healthz`). More than the cores
    /// on purpose: a small request gets a thread while large ones run, and the kernel shares
    /// the CPU between them.
    #[arg(long, env = "TIDELOCK_ROUTER_PREPARE_THREADS", default_value_t = 8)]
    pub prepare_threads: usize,

    /// Of those, how many one tenant's requests may use at once; its others wait their turn,
    /// never in front of another tenant's.
    #[arg(long, env = "TIDELOCK_ROUTER_PREPARE_PER_TENANT", default_value_t = 2)]
    pub prepare_per_tenant: usize,

    /// Memory that requests being prepared may use together, e.g. `4GiB`. Each reserves an
    /// estimate (16 bytes per byte of body to parse; 512 per byte the tokenizer holds at once,
    /// a piece of at most 1 MiB for tokenizers that encode long texts in pieces, the whole text
    /// otherwise) and waits until it fits; large requests together get three quarters of it, so
    /// small ones always start. A request that can never fit gets a 413.
    #[arg(long, env = "TIDELOCK_ROUTER_PREPARE_MEMORY", default_value = "4GiB")]
    pub prepare_memory: ByteSize,

    /// Connecting to a worker, in milliseconds.
    #[arg(long, default_value_t = 2_000)]
    pub connect_timeout_ms: u64,

    /// From sending a request to a worker to its first token, in seconds.
    #[arg(long, default_value_t = 300)]
    pub first_token_timeout_secs: u64,

    /// Between two tokens of an answer, in seconds.
    #[arg(long, default_value_t = 60)]
    pub idle_timeout_secs: u64,

    /// Workers tried at most for one request (failures before the first token move on).
    #[arg(long, default_value_t = 3)]
    pub max_attempts: usize,

    /// Time between load probes of each worker, in milliseconds.
    #[arg(long, default_value_t = 500)]
    pub probe_interval_ms: u64,

    /// Consecutive failures (probes or requests) that eject a worker until a probe succeeds.
    #[arg(long, default_value_t = 3)]
    pub eject_after: u32,
}

impl Config {
    /// Checks the values clap cannot and builds the library's settings.
    pub fn settings(&self) -> Result<(Settings, Probing), ConfigError> {
        if self.workers.is_empty() && self.etcd.is_empty() {
            return Err(ConfigError::NoWorkers);
        }
        if !self.workers.is_empty() && !self.etcd.is_empty() {
            return Err(ConfigError::WorkersAndEtcd);
        }
        self.etcd()?;
        if self.tenants_file.is_some() && !self.etcd.is_empty() {
            return Err(ConfigError::TenantsFileWithEtcd);
        }
        let positive = [
            ("--max-in-flight", self.max_in_flight as u64),
            ("--prepare-threads", self.prepare_threads as u64),
            (
                "--client-header-timeout-secs",
                self.client_header_timeout_secs,
            ),
            ("--client-body-timeout-secs", self.client_body_timeout_secs),
            (
                "--client-write-timeout-secs",
                self.client_write_timeout_secs,
            ),
            ("--max-connections", self.max_connections as u64),
            (
                "--max-requests-per-tenant",
                self.max_requests_per_tenant as u64,
            ),
            ("--prepare-per-tenant", self.prepare_per_tenant as u64),
            ("--max-attempts", self.max_attempts as u64),
            ("--probe-interval-ms", self.probe_interval_ms),
            ("--eject-after", u64::from(self.eject_after)),
            ("--first-token-timeout-secs", self.first_token_timeout_secs),
            ("--idle-timeout-secs", self.idle_timeout_secs),
            ("--session-idle-secs", self.session_idle_secs),
            ("--pin-read-timeout-ms", self.pin_read_timeout_ms),
            ("--pin-write-timeout-ms", self.pin_write_timeout_ms),
        ];
        if let Some(&(flag, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(ConfigError::NotPositive(flag));
        }
        if self.prepare_memory.as_u64() < 64 << 20 {
            return Err(ConfigError::PrepareMemoryTooSmall(self.prepare_memory));
        }
        if !(self.pin_margin_ratio >= 0.0 && self.pin_margin_ratio.is_finite()) {
            return Err(ConfigError::Negative("--pin-margin-ratio"));
        }
        if !(self.cache_weight >= 0.0 && self.cache_weight.is_finite()) {
            return Err(ConfigError::Negative("--cache-weight"));
        }
        if !(self.default_prefill_tps > 0.0 && self.default_prefill_tps.is_finite()) {
            return Err(ConfigError::NotPositive("--default-prefill-tps"));
        }
        let settings = Settings {
            policy: self.policy,
            cost: CostModel {
                default_prefill_tps: self.default_prefill_tps,
                margin_ratio: self.pin_margin_ratio,
                margin_secs: self.pin_margin_ms as f64 / 1_000.0,
                cache_weight: self.cache_weight,
                pull: self.pull,
                ..CostModel::default()
            },
            max_in_flight: self.max_in_flight,
            max_queue: self.max_queue,
            queue_timeout: Duration::from_secs(self.queue_timeout_secs),
            max_body_bytes: usize::try_from(self.max_body.as_u64()).unwrap_or(usize::MAX),
            cpu: CpuLimits {
                threads: self.prepare_threads,
                per_tenant: self.prepare_per_tenant,
                memory_bytes: self.prepare_memory.as_u64(),
                ..CpuLimits::default()
            },
            body_timeout: Duration::from_secs(self.client_body_timeout_secs),
            max_requests_per_tenant: self.max_requests_per_tenant,
            turn_memory_tokens: self.turn_memory_tokens,
            // Replicas share a store only through etcd.
            share_turns: !self.etcd.is_empty(),
            proxy: ProxyConfig {
                connect_timeout: Duration::from_millis(self.connect_timeout_ms),
                first_token_timeout: Duration::from_secs(self.first_token_timeout_secs),
                idle_timeout: Duration::from_secs(self.idle_timeout_secs),
                max_attempts: self.max_attempts,
            },
        };
        let probing = Probing {
            interval: Duration::from_millis(self.probe_interval_ms),
            eject_after: self.eject_after,
            ..Probing::default()
        };
        Ok((settings, probing))
    }

    /// How to reach etcd (`--etcd` with its TLS flags); none for the in-memory store.
    pub fn etcd(&self) -> Result<Option<tidelock_state::EtcdConfig>, EtcdFlagError> {
        self.etcd_tls.config(&self.etcd)
    }

    /// What the public listener bounds (`tidelock_service::serve`).
    pub fn client_limits(&self) -> ClientLimits {
        ClientLimits {
            header_timeout: Duration::from_secs(self.client_header_timeout_secs),
            write_timeout: Duration::from_secs(self.client_write_timeout_secs),
            max_connections: self.max_connections,
        }
    }

    /// How long session pin reads and writes may take.
    pub fn pin_deadlines(&self) -> crate::sessions::Deadlines {
        crate::sessions::Deadlines {
            read: Duration::from_millis(self.pin_read_timeout_ms),
            write: Duration::from_millis(self.pin_write_timeout_ms),
        }
    }

    pub fn session_idle(&self) -> Duration {
        Duration::from_secs(self.session_idle_secs)
    }
}

#[cfg(test)]
mod etcd_tls_tests {
    use clap::Parser;

    use super::{Config, ConfigError};
    use tidelock_state::EtcdFlagError;

    #[test]
    fn etcd_tls_flags_need_etcd_and_come_in_pairs() {
        let parse = |args: &[&str]| {
            Config::try_parse_from(std::iter::once("tidelock-router").chain(args.iter().copied()))
        };
        let static_workers = parse(&["--worker", "http://127.0.0.1:1", "--etcd-ca-file", "ca.crt"]);
        let error = static_workers.unwrap().settings().unwrap_err();
        assert!(
            matches!(error, ConfigError::Etcd(EtcdFlagError::TlsWithoutEndpoints)),
            "{error}"
        );
        assert!(error.to_string().contains("need --etcd"), "{error}");
        let error = parse(&["--etcd", "https://e:2379", "--etcd-cert-file", "tls.crt"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("--etcd-key-file"), "{error}");
        let config = parse(&[
            "--etcd",
            "https://e:2379",
            "--etcd-ca-file",
            "ca.crt",
            "--etcd-cert-file",
            "tls.crt",
            "--etcd-key-file",
            "tls.key",
        ])
        .unwrap();
        assert_eq!(
            config.etcd_tls.tls().unwrap(),
            Some(tidelock_state::EtcdTls::new("ca.crt").with_identity("tls.crt", "tls.key"))
        );
    }

    #[test]
    fn settings_name_the_flag_that_is_wrong() {
        let settings = |args: &[&str]| {
            Config::try_parse_from(std::iter::once("tidelock-router").chain(args.iter().copied()))
                .unwrap()
                .settings()
        };
        let error = settings(&[]).unwrap_err();
        assert!(matches!(error, ConfigError::NoWorkers), "{error}");
        let worker = ["--worker", "http://127.0.0.1:1"];
        let error = settings(&[&worker[..], &["--max-attempts", "0"]].concat()).unwrap_err();
        assert!(
            matches!(error, ConfigError::NotPositive("--max-attempts")),
            "{error}"
        );
        assert_eq!(error.to_string(), "--max-attempts must be positive");
        let error = settings(&[&worker[..], &["--prepare-memory", "1MiB"]].concat()).unwrap_err();
        assert!(
            matches!(error, ConfigError::PrepareMemoryTooSmall(_)),
            "{error}"
        );
        assert!(
            error
                .to_string()
                .starts_with("--prepare-memory must be at least 64MiB (got "),
            "{error}"
        );
        assert!(settings(&worker).is_ok());
    }
}

//! `tidelock up`: the local cluster. Starts N workers (or N shard groups of S workers with
//! `--shards S`) and one router as child processes on loopback (workers given to the router by
//! URL; state in the router's memory, or with `--store etcd` in a local etcd it starts first),
//! shows progress while the model loads, waits until every part answers its readiness probe
//! (polling with a deadline), prints the endpoint, the local tenant's API key and ready-to-paste
//! examples, then supervises: a worker that dies is reported (the router routes around it); a
//! shard, the router or etcd that dies is restarted on its port (a shard's group fails requests
//! until then, and drops its cached prefixes when the shard is back; a restarted router finds
//! its pins and turn log again in etcd, or starts them afresh in memory); Ctrl-C or SIGTERM
//! stops everything (SIGTERM, a grace period, then SIGKILL), leaving no process and no bound
//! port.
//!
//! One `up` at a time per cache directory: a lock file says so plainly to a second one. While it
//! runs, `<cache>/up/` holds `endpoint` (the base URL), `parts.json` (each part's name, pid, URL
//! and log) and `logs/`.

use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use tidelock_protocol::{ClusterToken, TenantRecord};
use tokio::process::{Child, Command};

use crate::config::{DEFAULT_MODEL_FILE, DEFAULT_MODEL_SAMPLING, Engine, Store, UpArgs};
use crate::http::get;

/// Exit code when something the cluster needs is missing or broken (model, binary, port).
const EXIT_FAILED: u8 = 1;
/// Exit code when another `up` is running.
const EXIT_ALREADY_RUNNING: u8 = 3;
/// How long each part has to stop after SIGTERM before it is killed.
const GRACE: Duration = Duration::from_secs(10);
/// How many times in a row a dead shard, router or etcd is restarted before up leaves it down (a
/// part that ran for [`STABLE`] starts a new row); the n-th restart waits n seconds.
const MAX_RESTARTS: u32 = 5;
const STABLE: Duration = Duration::from_secs(60);
/// The local tenant's id.
const LOCAL_TENANT: &str = "local";

/// First four bytes of every GGUF file.
const GGUF_MAGIC: &[u8; 4] = b"GGUF";

/// One child process of the cluster.
pub(crate) struct Part {
    pub(crate) name: String,
    pub(crate) port: u16,
    pub(crate) child: Child,
    pub(crate) log: PathBuf,
    /// Its metrics-only port (`--metrics-listen`), if it has one.
    pub(crate) metrics_port: Option<u16>,
    program: PathBuf,
    args: Vec<String>,
    /// A shard of a group (not its coordinator), the router or etcd: restarted when it dies, up
    /// to [`MAX_RESTARTS`] times in a row.
    restartable: bool,
    restarts: u32,
    started: Instant,
    /// When a dead shard is due to start again.
    restart_at: Option<Instant>,
}

impl Part {
    pub(crate) fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts a part; its log is `<logs>/<name>.log`, continued when `append` (a restart),
    /// else started afresh.
    pub(crate) fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        port: u16,
        logs: &Path,
        append: bool,
    ) -> Result<Part, String> {
        Self::start(name, program, args, &[], port, logs, append)
    }

    /// [`Part::spawn`] afresh, with `env` added to the environment.
    pub(crate) fn spawn_with(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
        port: u16,
        logs: &Path,
    ) -> Result<Part, String> {
        Self::start(name, program, args, env, port, logs, false)
    }

    fn start(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
        port: u16,
        logs: &Path,
        append: bool,
    ) -> Result<Part, String> {
        let log = logs.join(format!("{name}.log"));
        let file = File::options()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(&log)
            .map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let err = file
            .try_clone()
            .map_err(|e| format!("cannot open {}: {e}", log.display()))?;
        // Error messages, not backtraces, end a part's log: up shows that end when it fails.
        let child = Command::new(program)
            .args(args)
            .envs(env.iter().copied())
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE")
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        Ok(Part {
            name: name.to_owned(),
            port,
            child,
            log,
            metrics_port: None,
            program: program.to_owned(),
            args: args.to_vec(),
            restartable: false,
            restarts: 0,
            started: Instant::now(),
            restart_at: None,
        })
    }

    /// Starts the part again, as it was started (its log continues).
    pub(crate) fn respawn(&mut self, logs: &Path) -> Result<(), String> {
        let mut again = Part::spawn(&self.name, &self.program, &self.args, self.port, logs, true)?;
        again.metrics_port = self.metrics_port;
        self.child = again.child;
        self.started = again.started;
        Ok(())
    }

    /// The last lines of the part's log, indented, for error messages.
    pub(crate) fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..]
            .iter()
            .map(|l| format!("    | {l}\n"))
            .collect()
    }

    /// Sends SIGTERM, waits up to [`GRACE`], then kills.
    pub(crate) async fn stop(&mut self) {
        self.stop_within(GRACE).await;
    }

    /// Sends SIGTERM, waits up to `grace`, then kills.
    pub(crate) async fn stop_within(&mut self, grace: Duration) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        if let Some(pid) = self.child.id() {
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            eprintln!("  {} did not stop within {grace:?}: killing it", self.name);
            let _ = self.child.kill().await;
        }
    }
}

/// The simulator's timing model, as its worker flags take it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SimTiming {
    pub(crate) prefill_tokens_per_s: f64,
    pub(crate) step_ms: f64,
    pub(crate) decode_ms_per_sequence: f64,
}

/// How a worker is started; [`WorkerSpec::args`] gives its command line for one port.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WorkerSpec<'a> {
    pub(crate) model: &'a Path,
    pub(crate) engine: &'a str,
    pub(crate) kv_cache: &'a str,
    pub(crate) block_tokens: u32,
    pub(crate) served: &'a str,
    pub(crate) max_context: Option<u64>,
    /// The simulator's timing, for `--engine sim`.
    pub(crate) sim: Option<SimTiming>,
    /// The cluster credential's file; `None` serves the internal API to anyone
    /// (`--no-cluster-auth`: only for benchmarks whose other routers cannot send it).
    pub(crate) cluster_token: Option<&'a Path>,
}

/// Where `--kv-disk` puts the workers' disk tiers: each worker its own folder under `dir`, of
/// `size` at most.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KvDisk<'a> {
    pub(crate) dir: &'a Path,
    pub(crate) size: &'a str,
}

impl KvDisk<'_> {
    /// The options giving worker `name` its own folder under the directory (the same folder
    /// each time, so a restarted worker finds its blocks again).
    pub(crate) fn args(&self, name: &str) -> Vec<String> {
        vec![
            "--kv-disk".into(),
            self.dir.join(name).display().to_string(),
            "--kv-disk-size".into(),
            self.size.into(),
        ]
    }
}

impl WorkerSpec<'_> {
    /// The command line of the worker on `port`, with its metrics-only port when given.
    pub(crate) fn args(&self, port: u16, metrics_port: Option<u16>) -> Vec<String> {
        let mut args = vec![
            "--model".into(),
            self.model.display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--engine".into(),
            self.engine.into(),
            "--kv-cache".into(),
            self.kv_cache.into(),
            "--block-tokens".into(),
            self.block_tokens.to_string(),
            "--served-model-name".into(),
            self.served.into(),
        ];
        if let Some(sim) = self.sim {
            args.extend([
                "--sim-prefill-tokens-per-s".into(),
                sim.prefill_tokens_per_s.to_string(),
                "--sim-step-ms".into(),
                sim.step_ms.to_string(),
                "--sim-decode-ms-per-sequence".into(),
                sim.decode_ms_per_sequence.to_string(),
            ]);
        }
        if let Some(context) = self.max_context {
            args.extend(["--max-context".into(), context.to_string()]);
        }
        // The default model is served with its model card's sampling.
        if self.model.file_name().and_then(|n| n.to_str()) == Some(DEFAULT_MODEL_FILE) {
            for (flag, value) in DEFAULT_MODEL_SAMPLING {
                args.extend([flag.into(), value.into()]);
            }
        }
        args.extend(cluster_auth(self.cluster_token));
        if let Some(metrics) = metrics_port {
            args.extend(["--metrics-listen".into(), format!("127.0.0.1:{metrics}")]);
        }
        args
    }
}

/// The options that give a worker or router the cluster credential in `file`, or none.
pub(crate) fn cluster_auth(file: Option<&Path>) -> Vec<String> {
    match file {
        Some(file) => vec!["--cluster-token-file".into(), file.display().to_string()],
        None => vec!["--no-cluster-auth".into()],
    }
}

/// Everything started so far: `stop` ends it in reverse order (router first); dropped, every
/// child is killed (`kill_on_drop`).
pub(crate) struct Cluster {
    pub(crate) parts: Vec<Part>,
}

impl Cluster {
    /// Stops every part, the last started first.
    pub(crate) async fn stop(&mut self) {
        while let Some(mut part) = self.parts.pop() {
            part.stop().await;
        }
    }
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("tidelock up: {message}");
    ExitCode::from(EXIT_FAILED)
}

pub(crate) async fn run(args: UpArgs) -> ExitCode {
    if args.workers == 0 {
        return fail("--workers must be at least 1");
    }
    if args.shards == 0 {
        return fail("--shards must be at least 1");
    }
    let sim_timing = args.sim_prefill_tokens_per_s != 0.0
        || args.sim_step_ms != 0.0
        || args.sim_decode_ms_per_sequence != 0.0;
    if sim_timing && args.engine != Engine::Sim {
        return fail("--sim-* set the simulator's timing: use them with --engine sim");
    }
    if args.shards > 1 && args.kv_disk.is_some() {
        return fail("--kv-disk with --shards above 1: a shard group's blocks do not spill yet");
    }
    if args.shards > 1 && args.engine == Engine::Sim {
        return fail("--shards above 1 needs the real engine: the simulator holds no KV to shard");
    }
    let model = args.model_path();
    let model_size = match check_model(&model) {
        Ok(size) => size,
        Err(problem) => {
            return fail(format!(
                "model {}: {problem}\n  run ./scripts/up (it fetches the default model), or pass --model PATH (a GGUF file or a Hugging Face folder)",
                model.display()
            ));
        }
    };
    let binaries = match (sibling("tidelock-worker"), sibling("tidelock-router")) {
        (Ok(w), Ok(r)) => (w, r),
        (Err(e), _) | (_, Err(e)) => return fail(e),
    };
    let run_dir = args.cache_dir().join("up");
    let logs = run_dir.join("logs");
    if let Err(e) = std::fs::create_dir_all(&logs) {
        return fail(format!("cannot create {}: {e}", logs.display()));
    }
    // One `up` per cache directory: held until this process exits.
    let _lock = match lock(&run_dir) {
        Ok(lock) => lock,
        Err(Some(endpoint)) => {
            eprintln!(
                "tidelock up: a local cluster is already running (endpoint {endpoint}); stop it with Ctrl-C in its terminal first"
            );
            return ExitCode::from(EXIT_ALREADY_RUNNING);
        }
        Err(None) => {
            eprintln!(
                "tidelock up: a local cluster is already running (lock {}); stop it with Ctrl-C in its terminal first",
                run_dir.join("lock").display()
            );
            return ExitCode::from(EXIT_ALREADY_RUNNING);
        }
    };
    if let Err(e) = TcpListener::bind(("127.0.0.1", args.port)) {
        return fail(format!(
            "port {} is not free ({e}): stop what uses it, or pass --port",
            args.port
        ));
    }
    let (tenants_file, key) = match &args.tenants_file {
        Some(path) => (path.clone(), None),
        None => match local_tenant(&args.cache_dir(), &run_dir) {
            Ok((path, key)) => (path, Some(key)),
            Err(e) => return fail(e),
        },
    };

    let plural = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
    let workers = match args.shards {
        1 => plural(args.workers, "worker"),
        s => format!(
            "{} of {s} workers (KV cache {} per worker, {s}x per group)",
            plural(args.workers, "shard group"),
            args.kv_cache
        ),
    };
    println!(
        "tidelock up: {workers} ({} engine) + 1 router on 127.0.0.1, model {} ({:.0} MB)",
        args.engine.as_str(),
        model.display(),
        model_size as f64 / 1e6
    );
    let mut cluster = Cluster { parts: Vec::new() };
    // The internal APIs' credential: a fresh one every start, readable by this user only.
    let token_file = run_dir.join("cluster-token");
    if let Err(e) = write_private(&token_file, ClusterToken::generate().expose()) {
        return fail(e);
    }
    let files = Files {
        tenants: &tenants_file,
        cluster_token: &token_file,
        logs: &logs,
    };
    let (served, metrics) = match start(&args, &model, &binaries, &files, &mut cluster).await {
        Ok(served) => served,
        Err(e) => {
            cluster.stop().await;
            return fail(e);
        }
    };
    let endpoint = format!("http://127.0.0.1:{}/v1", args.port);
    let _ = std::fs::write(run_dir.join("endpoint"), &endpoint);
    write_parts(&run_dir, &cluster);
    banner(&endpoint, &served, key.as_deref(), &logs, &metrics);
    let code = supervise(&mut cluster, &run_dir, args.store).await;
    println!("\ntidelock up: stopping");
    cluster.stop().await;
    let _ = std::fs::remove_file(run_dir.join("endpoint"));
    let _ = std::fs::remove_file(run_dir.join("parts.json"));
    println!("tidelock up: stopped; every process has exited");
    code
}

/// `<run_dir>/parts.json`: each part's name, pid, URL and log (rewritten when a shard restarts).
fn write_parts(run_dir: &Path, cluster: &Cluster) {
    let parts: Vec<serde_json::Value> = cluster
        .parts
        .iter()
        .map(|p| {
            serde_json::json!({
                "name": p.name, "pid": p.child.id(), "url": p.url(), "log": p.log,
                "metrics": p.metrics_port.map(|port| format!("http://127.0.0.1:{port}")),
            })
        })
        .collect();
    let _ = std::fs::write(
        run_dir.join("parts.json"),
        serde_json::Value::from(parts).to_string(),
    );
}

/// The files the cluster's parts are started with.
pub(crate) struct Files<'a> {
    pub(crate) tenants: &'a Path,
    pub(crate) cluster_token: &'a Path,
    pub(crate) logs: &'a Path,
}

/// The etcd binary: `$TIDELOCK_ETCD`, or `etcd` on PATH.
fn etcd_binary() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("TIDELOCK_ETCD") {
        return Ok(PathBuf::from(path));
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("etcd"))
                .find(|candidate| candidate.is_file())
        })
        .ok_or_else(|| {
            "--store etcd: etcd is not on PATH; install it (Debian: apt-get install etcd-server; ./scripts/up does) or set TIDELOCK_ETCD".into()
        })
}

/// Starts a local etcd for `--store etcd` (its data in `<run dir>/etcd`, new for every `up`:
/// the workers start with empty caches, so older pins would lead nowhere), writes the tenants
/// file into it and keeps it in step with the file; returns its client URL.
pub(crate) async fn start_etcd(files: &Files<'_>, cluster: &mut Cluster) -> Result<String, String> {
    let binary = etcd_binary()?;
    let run_dir = files.logs.parent().unwrap_or(files.logs);
    let data = run_dir.join("etcd");
    if data.exists() {
        std::fs::remove_dir_all(&data)
            .map_err(|e| format!("cannot clear {}: {e}", data.display()))?;
    }
    let (client, peer) = (free_port()?, free_port()?);
    let client_url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let etcd_args = vec![
        "--name=tidelock-up".into(),
        format!("--data-dir={}", data.display()),
        format!("--listen-client-urls={client_url}"),
        format!("--advertise-client-urls={client_url}"),
        format!("--listen-peer-urls={peer_url}"),
        format!("--initial-advertise-peer-urls={peer_url}"),
        format!("--initial-cluster=tidelock-up={peer_url}"),
        "--log-level=warn".into(),
    ];
    let mut part = Part::spawn("etcd", &binary, &etcd_args, client, files.logs, false)?;
    part.restartable = true;
    println!(
        "  etcd      starting on {client_url}, data in {} (log {})",
        data.display(),
        part.log.display()
    );
    cluster.parts.push(part);
    let n = cluster.parts.len();
    let deadline = Instant::now() + Duration::from_secs(30);
    wait_ready(
        &mut cluster.parts[n - 1..],
        "/health",
        deadline,
        "starting etcd",
    )
    .await?;
    let store: std::sync::Arc<dyn tidelock_state::StateStore> = std::sync::Arc::new(
        tidelock_state::EtcdStore::connect(tidelock_state::EtcdConfig::new([client_url.clone()]))
            .await
            .map_err(|e| format!("etcd at {client_url}: {e}"))?,
    );
    let layout = tidelock_protocol::KeyLayout::default();
    tidelock_router::tenants::load_file(&*store, &layout, files.tenants)
        .await
        .map_err(|e| e.to_string())?;
    // Edits to the tenants file apply live, as the router's own --tenants-file does.
    tokio::spawn(tidelock_router::tenants::sync_file(
        store,
        layout,
        files.tenants.to_owned(),
    ));
    Ok(client_url)
}

/// Starts the workers, then the router; returns the served model name and the router's
/// metrics URL.
async fn start(
    args: &UpArgs,
    model: &Path,
    (worker_bin, router_bin): &(PathBuf, PathBuf),
    files: &Files<'_>,
    cluster: &mut Cluster,
) -> Result<(String, String), String> {
    let logs = files.logs;
    let etcd = match args.store {
        Store::Memory => None,
        Store::Etcd => Some(start_etcd(files, cluster).await?),
    };
    let served = model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let mut urls = Vec::new();
    let first_worker = cluster.parts.len();
    for i in 0..args.workers {
        let ports = (0..args.shards)
            .map(|_| free_port())
            .collect::<Result<Vec<u16>, String>>()?;
        let peers: Vec<String> = ports
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}"))
            .collect();
        for (shard, &port) in ports.iter().enumerate() {
            let metrics_port = free_port()?;
            let mut worker_args = WorkerSpec {
                model,
                engine: args.engine.as_str(),
                kv_cache: &args.kv_cache,
                block_tokens: args.block_tokens,
                served: &served,
                max_context: args.max_context.map(|c| c as u64),
                sim: (args.engine == Engine::Sim).then_some(SimTiming {
                    prefill_tokens_per_s: args.sim_prefill_tokens_per_s,
                    step_ms: args.sim_step_ms,
                    decode_ms_per_sequence: args.sim_decode_ms_per_sequence,
                }),
                cluster_token: Some(files.cluster_token),
            }
            .args(port, Some(metrics_port));
            if let Some(url) = &etcd {
                // Workers register themselves (on a lease: a dead one leaves the router's set).
                worker_args.extend(["--etcd".into(), url.clone()]);
            }
            let name = if args.shards > 1 {
                worker_args.extend([
                    "--group".into(),
                    format!("group-{i}"),
                    "--shards".into(),
                    args.shards.to_string(),
                    "--shard".into(),
                    shard.to_string(),
                    "--shard-peers".into(),
                    peers.join(","),
                ]);
                match shard {
                    0 => format!("worker-{i}"),
                    s => format!("worker-{i}.{s}"),
                }
            } else {
                format!("worker-{i}")
            };
            if let Some(disk) = args.kv_disk() {
                worker_args.extend(disk.args(&name));
            }
            let mut part = Part::spawn(&name, worker_bin, &worker_args, port, logs, false)?;
            part.restartable = shard > 0;
            part.metrics_port = Some(metrics_port);
            let role = match (args.shards, shard) {
                (1, _) => String::new(),
                (s, 0) => format!(", coordinator of group-{i}, {s} shards"),
                (_, s) => format!(", shard {s} of group-{i}"),
            };
            println!(
                "  {name:<9} starting on {}{role} (log {})",
                part.url(),
                part.log.display()
            );
            if shard == 0 {
                urls.push(part.url());
            }
            cluster.parts.push(part);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(args.start_timeout_secs);
    wait_ready(
        &mut cluster.parts[first_worker..],
        "/readyz",
        deadline,
        "loading the model",
    )
    .await?;
    let metrics_port = free_port()?;
    let mut router_args = vec![
        "--listen".into(),
        format!("127.0.0.1:{}", args.port),
        "--metrics-listen".into(),
        format!("127.0.0.1:{metrics_port}"),
    ];
    match etcd {
        // Workers and tenants are in etcd (the tenants written by up, kept in step with the
        // file).
        Some(url) => router_args.extend(["--etcd".into(), url]),
        None => router_args.extend([
            "--worker".into(),
            urls.join(","),
            "--tenants-file".into(),
            files.tenants.display().to_string(),
        ]),
    }
    router_args.extend(cluster_auth(Some(files.cluster_token)));
    let mut router = Part::spawn("router", router_bin, &router_args, args.port, logs, false)?;
    router.metrics_port = Some(metrics_port);
    router.restartable = true;
    println!(
        "  router    starting on {} (log {})",
        router.url(),
        router.log.display()
    );
    cluster.parts.push(router);
    let n = cluster.parts.len();
    wait_ready(
        &mut cluster.parts[n - 1..],
        "/readyz",
        deadline,
        "fetching the tokenizer",
    )
    .await?;
    Ok((served, format!("http://127.0.0.1:{metrics_port}/metrics")))
}

/// Polls every part's readiness probe until all answer 200; reports each as it becomes ready
/// and the wait every few seconds. Fails with the part's log when it exits, or at `deadline`.
pub(crate) async fn wait_ready(
    parts: &mut [Part],
    path: &str,
    deadline: Instant,
    what: &str,
) -> Result<(), String> {
    let started = Instant::now();
    let mut ready = vec![false; parts.len()];
    let mut last_note = Instant::now();
    while ready.iter().any(|r| !r) {
        for (i, part) in parts.iter_mut().enumerate() {
            if ready[i] {
                continue;
            }
            if let Ok(Some(status)) = part.child.try_wait() {
                return Err(format!(
                    "{} exited ({status}) while starting; the end of its log ({}):\n{}",
                    part.name,
                    part.log.display(),
                    part.log_tail(15)
                ));
            }
            if get(part.port, path, Duration::from_secs(2))
                .await
                .is_some_and(|(status, _)| status == 200)
            {
                ready[i] = true;
                // Progress: on stderr, apart from what a command prints as its result.
                eprintln!(
                    "  {:<9} ready after {:.1} s",
                    part.name,
                    started.elapsed().as_secs_f64()
                );
            }
        }
        if Instant::now() > deadline {
            let waiting: Vec<&str> = parts
                .iter()
                .zip(&ready)
                .filter(|(_, r)| !**r)
                .map(|(p, _)| p.name.as_str())
                .collect();
            return Err(format!(
                "{} not ready in time (--start-timeout-secs); see the logs",
                waiting.join(", ")
            ));
        }
        if last_note.elapsed() > Duration::from_secs(5) {
            eprintln!("  ... {what} ({:.0} s)", started.elapsed().as_secs_f64());
            last_note = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

fn banner(endpoint: &str, model: &str, key: Option<&str>, logs: &Path, metrics: &str) {
    let key_shown = key.unwrap_or("<a key from your tenants file>");
    println!(
        r#"
Tidelock is serving `{model}` at {endpoint}
  API key   {key_shown}
  logs      {logs}

  curl {endpoint}/chat/completions \
    -H "Authorization: Bearer {key_shown}" -H "Content-Type: application/json" \
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}], "prompt_cache_key": "demo"}}'

  python3 -c '
from openai import OpenAI
client = OpenAI(base_url="{endpoint}", api_key="{key_shown}")
r = client.chat.completions.create(model="{model}", messages=[{{"role": "user", "content": "Hello!"}}])
print(r.choices[0].message.content, r.usage)'

  tidelock chat            # a terminal chat that shows cached tokens growing turn by turn
  curl {metrics}           # the router's metrics

Press Ctrl-C to stop."#,
        logs = logs.display(),
    );
}

/// Waits for Ctrl-C, SIGTERM, or the router's exit. A worker that exits is reported; the
/// router routes around it. A shard that exits is restarted on its port: its group's
/// coordinator fails requests while it is gone (the router places them elsewhere) and
/// readmits it when it is back.
/// What goes on while the part called `name` is down.
fn meanwhile(name: &str, store: Store) -> &'static str {
    match (name, store) {
        ("router", Store::Etcd) => {
            "the endpoint refuses connections; back, it serves every session from its pin and turn log in etcd"
        }
        ("router", Store::Memory) => {
            "the endpoint refuses connections; back, it finds cached prefixes from the workers again, while pins and the turn memory start afresh (--store etcd keeps them)"
        }
        ("etcd", _) => {
            "the router keeps its last-known pins and places new sessions without reading them"
        }
        _ => "its group fails requests and the router places them on other groups",
    }
}

async fn supervise(cluster: &mut Cluster, run_dir: &Path, store: Store) -> ExitCode {
    let logs = run_dir.join("logs");
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => return fail(format!("cannot watch for SIGTERM: {e}")),
    };
    let mut reported = vec![false; cluster.parts.len()];
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return ExitCode::SUCCESS,
            _ = term.recv() => return ExitCode::SUCCESS,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        let mut restarted = false;
        for (i, part) in cluster.parts.iter_mut().enumerate() {
            if part.restart_at.is_some_and(|at| Instant::now() >= at) {
                part.restart_at = None;
                part.restarts += 1;
                match part.respawn(&logs) {
                    Ok(()) => {
                        reported[i] = false;
                        restarted = true;
                        eprintln!(
                            "tidelock up: restarted {} on {}; its group serves again once it answers",
                            part.name,
                            part.url()
                        );
                    }
                    Err(e) => eprintln!("tidelock up: cannot restart {}: {e}", part.name),
                }
            }
            if reported[i] {
                continue;
            }
            if let Ok(Some(status)) = part.child.try_wait() {
                reported[i] = true;
                eprintln!(
                    "tidelock up: {} exited ({status}); the end of its log ({}):\n{}",
                    part.name,
                    part.log.display(),
                    part.log_tail(10)
                );
                if part.restartable {
                    if part.started.elapsed() >= STABLE {
                        part.restarts = 0;
                    }
                    if part.restarts < MAX_RESTARTS {
                        let wait = Duration::from_secs(u64::from(part.restarts) + 1);
                        part.restart_at = Some(Instant::now() + wait);
                        eprintln!(
                            "tidelock up: restarting {} in {} s; until then {}",
                            part.name,
                            wait.as_secs(),
                            meanwhile(&part.name, store)
                        );
                    } else {
                        eprintln!(
                            "tidelock up: {} died {MAX_RESTARTS} times in a row; left down: {}",
                            part.name,
                            meanwhile(&part.name, store)
                        );
                    }
                    continue;
                }
                eprintln!("tidelock up: the router routes around it; still serving");
            }
        }
        if restarted {
            write_parts(run_dir, cluster);
        }
    }
}

/// The local tenant: a key kept in the cache (created once, readable only by you; a key file
/// others could read is made private again, saying so) and a tenants file in the run directory
/// holding only its hash.
fn local_tenant(cache: &Path, run_dir: &Path) -> Result<(PathBuf, String), String> {
    use std::os::unix::fs::PermissionsExt;
    let key_file = cache.join("local-api-key");
    let key = match std::fs::read_to_string(&key_file) {
        Ok(key) if key.trim().starts_with("sk-") => {
            let mode = std::fs::metadata(&key_file)
                .map(|m| m.permissions().mode() & 0o777)
                .unwrap_or(0o600);
            if mode != 0o600 {
                std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600))
                    .map_err(|e| format!("cannot make {} private: {e}", key_file.display()))?;
                eprintln!(
                    "tidelock up: {} was readable by others (mode {mode:o}); it is now 0600",
                    key_file.display()
                );
            }
            key.trim().to_owned()
        }
        _ => {
            let key = format!("sk-local-{:032x}", rand::random::<u128>());
            write_private(&key_file, &key)?;
            key
        }
    };
    // A fresh secret cache salt every run: the workers start empty anyway.
    let record = TenantRecord::with_keys([key.as_str()]);
    let tenants = serde_json::json!({ LOCAL_TENANT: record });
    let path = run_dir.join("tenants.json");
    std::fs::write(&path, tenants.to_string())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok((path, key))
}

pub(crate) fn write_private(path: &Path, text: &str) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    // `mode` applies only to a file it creates: an existing one is made private too.
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("cannot make {} private: {e}", path.display()))?;
    }
    file.write_all(text.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Takes the run directory's lock; on failure, the running cluster's endpoint when known.
fn lock(run_dir: &Path) -> Result<File, Option<String>> {
    let file = File::create(run_dir.join("lock")).map_err(|_| None)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(_) => Err(std::fs::read_to_string(run_dir.join("endpoint")).ok()),
    }
}

/// A binary installed next to this one (`cargo build --release` puts them together).
pub(crate) fn sibling(name: &str) -> Result<PathBuf, String> {
    let me = std::env::current_exe().map_err(|e| format!("cannot find my own path: {e}"))?;
    let path = me.with_file_name(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "{} is missing: build every binary together (`cargo build --release --bins`, as ./scripts/up does)",
            path.display()
        ))
    }
}

/// A free loopback port, never one this process has handed out before. The port is released
/// for the part that will bind it; until that part starts, the kernel may offer the same port
/// again, and two parts given one port fail to start (seen: a worker's metrics port equal to
/// another worker's listen port), so ports already handed out are drawn again.
pub(crate) fn free_port() -> Result<u16, String> {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..64 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| format!("no free loopback port: {e}"))?;
        if given.insert(port) {
            return Ok(port);
        }
    }
    Err("no free loopback port this process has not handed out already".into())
}

/// Checks that `path` is a GGUF file or a Hugging Face folder; returns its size in bytes.
fn check_model(path: &Path) -> Result<u64, String> {
    if path.is_dir() {
        if !path.join("config.json").is_file() {
            return Err("a folder without config.json (not a Hugging Face model folder)".into());
        }
        let size = std::fs::read_dir(path)
            .map_err(|e| format!("cannot list: {e}"))?
            .filter_map(|e| e.ok()?.metadata().ok())
            .map(|m| m.len())
            .sum();
        return Ok(size);
    }
    let mut file = File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let size = file
        .metadata()
        .map_err(|e| format!("cannot stat: {e}"))?
        .len();
    let mut magic = [0u8; 4];
    file.read_exact(&mut magic)
        .map_err(|_| format!("too short to be a GGUF file ({size} bytes)"))?;
    if &magic != GGUF_MAGIC {
        return Err(format!("not a GGUF file (starts with {magic:02x?})"));
    }
    Ok(size)
}

impl Engine {
    fn as_str(self) -> &'static str {
        match self {
            Engine::Real => "real",
            Engine::Sim => "sim",
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    /// The default model gets its model card's sampling; any other model is left to its own
    /// generation config.
    #[test]
    fn the_default_model_is_served_with_its_recommended_sampling() {
        let spec = |model: &'static str| WorkerSpec {
            model: Path::new(model),
            engine: "real",
            kv_cache: "1GiB",
            block_tokens: 64,
            served: "m",
            max_context: None,
            sim: None,
            cluster_token: None,
        };
        let flag = |args: &[String], name: &str| {
            args.iter()
                .position(|a| a == name)
                .map(|i| args[i + 1].clone())
        };
        let default = spec("/cache/models/SmolLM2-135M-Instruct.Q4_1.gguf").args(8100, None);
        assert_eq!(
            flag(&default, "--default-temperature").as_deref(),
            Some("0.2")
        );
        assert_eq!(flag(&default, "--default-top-p").as_deref(), Some("0.9"));
        let other = spec("/models/llama-3.2-1b").args(8100, None);
        assert_eq!(flag(&other, "--default-temperature"), None);
    }

    #[test]
    fn the_local_key_is_private_whether_new_old_or_loosened() {
        let cache = tempfile::tempdir().unwrap();
        let run = tempfile::tempdir().unwrap();
        let key_file = cache.path().join("local-api-key");
        let (_, key) = local_tenant(cache.path(), run.path()).unwrap();
        assert_eq!(mode(&key_file), 0o600);
        // Someone loosened it: the same key comes back, private again.
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (_, again) = local_tenant(cache.path(), run.path()).unwrap();
        assert_eq!(again, key);
        assert_eq!(mode(&key_file), 0o600);
        // A file overwritten through write_private is private even if it existed loose.
        let other = cache.path().join("other");
        std::fs::write(&other, "x").unwrap();
        std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o666)).unwrap();
        write_private(&other, "y").unwrap();
        assert_eq!(mode(&other), 0o600);
    }
}

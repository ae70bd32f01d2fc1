//! `tidelock bench compare`: one workload against each of our placement policies and against
//! the peers' routers (sglang-router, vllm-router), all fronting the same simulated workers.
//!
//! For every target (`ROUTER:POLICY`) in turn:
//! 1. the workers are started afresh (`tidelock-worker --engine sim`, same ports, same KV size and
//!    timing model every time), so each router meets cold, identical caches;
//! 2. the router is started in front of them and polled until it serves (`/readyz` for ours; for
//!    the peers, `/workers` listing every worker healthy);
//! 3. the workload runs through it: `bench trace` or `bench sessions`, the same code as those
//!    commands, with the workers' prefill counters read before and after (load imbalance);
//! 4. the router gets SIGTERM (a kill after a grace period), and its port is checked to be free
//!    again before anything else starts; then the workers are stopped.
//!
//! Then one table, `compare.json` (every row and the run's settings), `ttft_cdf.png` and
//! `hit_rate.png` in `--out`; each target's own JSON (every request) and every process's log
//! are there too. The peers run from a Python with `sglang-router` and `vllm-router` installed
//! (`--peers-python`), with the Hugging Face hub pointed at a closed loopback port and offline:
//! at registration sglang-router tries to fetch a tokenizer named after the workers' model, and
//! that attempt must stay on this machine.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde::Serialize;
use tidelock_protocol::TenantRecord;

use crate::bench::{self, Outcome};
use crate::chart::{self, Series};
use crate::config::{
    CompareArgs, DEFAULT_MODEL_FILE, Disruption, EndpointArgs, SessionsArgs, TraceArgs, Workload,
};
use crate::http::Api;
use crate::sessions;
use crate::up::{KvDisk, Part, SimTiming, WorkerSpec, sibling, wait_ready, write_private};

/// How long a disrupted worker has to drain and exit (its `--drain-secs` is 20 by default).
const DRAIN_GRACE: Duration = Duration::from_secs(40);

/// The peers' environment: the Hugging Face hub at a closed loopback port, and offline.
const PEER_ENV: [(&str, &str); 2] = [
    ("HF_ENDPOINT", "http://127.0.0.1:9"),
    ("HF_HUB_OFFLINE", "1"),
];

/// A router and one of its policies.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    router: Router,
    policy: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Router {
    Ours,
    Sglang,
    Vllm,
}

impl Target {
    fn parse(spec: &str) -> Result<Self, String> {
        let (router, policy) = spec
            .split_once(':')
            .filter(|(_, p)| !p.is_empty())
            .ok_or_else(|| format!("--targets: `{spec}` is not ROUTER:POLICY"))?;
        let router = match router {
            "ours" => Router::Ours,
            "sglang" => Router::Sglang,
            "vllm" => Router::Vllm,
            other => {
                return Err(format!(
                    "--targets: unknown router `{other}` in `{spec}` (ours, sglang or vllm)"
                ));
            }
        };
        Ok(Target {
            router,
            policy: policy.to_owned(),
        })
    }

    fn label(&self) -> String {
        let router = match self.router {
            Router::Ours => "ours",
            Router::Sglang => "sglang",
            Router::Vllm => "vllm",
        };
        format!("{router}:{}", self.policy)
    }

    /// Program and arguments that start this router on `port` in front of `workers`.
    fn command(
        &self,
        router_bin: &Path,
        python: &Path,
        (port, metrics_port): (u16, u16),
        workers: &[String],
        tenants: &Path,
        extra: &[String],
    ) -> (PathBuf, Vec<String>) {
        let listen = format!("127.0.0.1:{port}");
        match self.router {
            Router::Ours => (
                router_bin.to_owned(),
                vec![
                    "--listen".into(),
                    listen,
                    "--worker".into(),
                    workers.join(","),
                    "--tenants-file".into(),
                    tenants.display().to_string(),
                    "--policy".into(),
                    self.policy.clone(),
                    "--no-cluster-auth".into(),
                    "--metrics-listen".into(),
                    format!("127.0.0.1:{metrics_port}"),
                ]
                .into_iter()
                .chain(unlimited(extra))
                .chain(extra.iter().cloned())
                .collect(),
            ),
            Router::Sglang | Router::Vllm => {
                let module = if self.router == Router::Sglang {
                    "sglang_router.launch_router"
                } else {
                    "vllm_router.launch_router"
                };
                let mut args = vec![
                    "-m".into(),
                    module.into(),
                    "--host".into(),
                    "127.0.0.1".into(),
                    "--port".into(),
                    port.to_string(),
                    // Their metrics exporter's own port (by default a fixed one, which anything
                    // else on the machine may hold).
                    "--prometheus-host".into(),
                    "127.0.0.1".into(),
                    "--prometheus-port".into(),
                    metrics_port.to_string(),
                    "--policy".into(),
                    self.policy.clone(),
                    "--worker-urls".into(),
                ];
                args.extend(workers.iter().cloned());
                (python.to_owned(), args)
            }
        }
    }

    /// Whether the router serves with every worker: ours is ready and its metrics count every
    /// worker healthy (ready means one worker answers: sessions placed while it is the only one
    /// would stay there); a peer lists every worker as healthy.
    async fn ready(&self, (port, metrics_port): (u16, u16), workers: &[String]) -> bool {
        let Ok(api) = Api::new(&format!("http://127.0.0.1:{port}"), None) else {
            return false;
        };
        if self.router == Router::Ours {
            let Ok(metrics) = Api::new(&format!("http://127.0.0.1:{metrics_port}"), None) else {
                return false;
            };
            let healthy = match metrics.get_text("/metrics").await {
                Ok(text) => text
                    .lines()
                    .filter(|l| {
                        l.starts_with("tidelock_router_worker_healthy{") && l.ends_with(" 1")
                    })
                    .count(),
                Err(_) => 0,
            };
            return api.get_text("/readyz").await.is_ok() && healthy == workers.len();
        }
        let Ok(listed) = api.get_json("/workers").await else {
            return false;
        };
        let healthy: Vec<&str> = listed["workers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|w| w["is_healthy"].as_bool().unwrap_or(true))
            .filter_map(|w| w["url"].as_str())
            .collect();
        workers.iter().all(|w| healthy.contains(&w.as_str()))
    }
}

/// One target's row of the table.
#[derive(Debug, Clone, Default, Serialize)]
struct Row {
    target: String,
    /// Token hit rate: of every request (trace), of later turns (sessions).
    hit_rate: f64,
    ttft_p50_s: f64,
    ttft_p90_s: f64,
    ttft_p99_s: f64,
    tpot_p50_s: f64,
    output_tokens_per_s: f64,
    requests: usize,
    errors: usize,
    /// Max over mean of the tokens each worker prefilled.
    imbalance: f64,
    prefill_tokens_per_worker: Vec<u64>,
    /// The router stopped on SIGTERM (not killed), and its port was free afterwards.
    stopped_cleanly: bool,
    /// Sessions: the later turns' bound (their previous prompt and answer over their prompt).
    bound: Option<f64>,
    /// Sessions under `--disrupt`: the later turns from the disruption on.
    disrupted: Option<sessions::Disrupted>,
    /// Why the target could not be measured (its router or workers failed).
    failed: Option<String>,
    #[serde(skip)]
    ttfts_s: Vec<f64>,
}

impl Row {
    fn failed(target: String, why: String) -> Self {
        Row {
            target,
            failed: Some(why),
            ..Row::default()
        }
    }

    /// Whether its numbers can be compared: measured, and no request failed.
    fn comparable(&self) -> bool {
        self.failed.is_none() && self.errors == 0
    }
}

/// `bench compare`. Ctrl-C or SIGTERM ends the run early: the comparison is dropped, and with
/// it every worker and router it started (each is killed when its handle drops), before the
/// command exits 130.
pub(crate) async fn run(args: CompareArgs) -> ExitCode {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            eprintln!("tidelock bench compare: cannot watch for SIGTERM: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = tokio::select! {
        outcome = compare(args) => outcome,
        _ = tokio::signal::ctrl_c() => Err(INTERRUPTED.into()),
        _ = term.recv() => Err(INTERRUPTED.into()),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e == INTERRUPTED => {
            eprintln!("tidelock bench compare: {e}");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("tidelock bench compare: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What an interrupted run says: by then every part it started has been killed.
const INTERRUPTED: &str = "interrupted: every worker and router it started is stopped";

/// Our router's limits that the peers do not have, lifted unless `extra` sets them: the open
/// requests per tenant (every request of a trace comes from one key) and the wait for a slot in
/// its queue. Under overload the peers queue every request however long it waits; with our
/// defaults (256 open per tenant, 30 s in the queue) ours would answer 429 or 503 instead, and
/// the table would compare refusals with answers.
fn unlimited(extra: &[String]) -> Vec<String> {
    [
        ("--max-requests-per-tenant", "1000000"),
        ("--queue-timeout-secs", "86400"),
    ]
    .into_iter()
    .filter(|(flag, _)| !extra.iter().any(|e| e.split('=').next() == Some(*flag)))
    .flat_map(|(flag, value)| [flag.to_owned(), value.to_owned()])
    .collect()
}

/// The tenants file (one tenant per key) and the keys.
pub(crate) fn tenants(dir: &Path, n: usize) -> Result<(PathBuf, Vec<String>), String> {
    let keys: Vec<String> = (0..n.max(1))
        .map(|_| format!("sk-bench-{:032x}", rand::random::<u128>()))
        .collect();
    // The peers share every cache across keys; so do ours here (one secret salt for all), so
    // that sessions of different tenants opening with the same system prompt can share it.
    let shared = tidelock_protocol::CacheSalt::generate();
    let records: serde_json::Map<String, serde_json::Value> = keys
        .iter()
        .enumerate()
        .map(|(i, key)| {
            let record = TenantRecord {
                share_cache: true,
                cache_salt: shared.clone(),
                ..TenantRecord::with_keys([key.as_str()])
            };
            Ok((
                format!("bench-{i}"),
                serde_json::to_value(record).map_err(|e| e.to_string())?,
            ))
        })
        .collect::<Result<_, String>>()?;
    let path = dir.join("tenants.json");
    write_private(&path, &serde_json::Value::Object(records).to_string())?;
    Ok((path, keys))
}

/// Checks that `python` can run the peer `router`; says how to install it if not.
async fn check_peer(python: &Path, router: Router) -> Result<(), String> {
    let module = match router {
        Router::Sglang => "sglang_router",
        Router::Vllm => "vllm_router",
        Router::Ours => return Ok(()),
    };
    let probe = tokio::process::Command::new(python)
        .args(["-c", &format!("import {module}")])
        .output()
        .await
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    if probe.status.success() {
        return Ok(());
    }
    Err(format!(
        "{} cannot import {module} ({}); install the peers as bench/README.md says (a venv \
         with `pip install sglang-router==0.3.2 vllm-router==0.1.17`), pass --peers-python, or \
         leave the peers out of --targets",
        python.display(),
        String::from_utf8_lossy(&probe.stderr).trim()
    ))
}

async fn compare(args: CompareArgs) -> Result<(), String> {
    let targets = args
        .targets
        .iter()
        .map(|t| Target::parse(t))
        .collect::<Result<Vec<_>, _>>()?;
    if targets.is_empty() || args.workers == 0 {
        return Err("give at least one target and one worker".into());
    }
    if let Some(t) = targets
        .iter()
        .enumerate()
        .find(|(i, t)| targets[..*i].contains(t))
    {
        return Err(format!("--targets: `{}` is listed twice", t.1.label()));
    }
    let (worker_bin, router_bin) = (sibling("tidelock-worker")?, sibling("tidelock-router")?);
    let cache = args.cache_dir();
    let python = args
        .peers_python
        .clone()
        .unwrap_or_else(|| cache.join("router-bench-venv/bin/python"));
    for router in [Router::Sglang, Router::Vllm] {
        if targets.iter().any(|t| t.router == router) {
            check_peer(&python, router).await?;
        }
    }
    let model = args
        .model_file
        .clone()
        .unwrap_or_else(|| cache.join("models").join(DEFAULT_MODEL_FILE));
    if !model.is_file() {
        return Err(format!(
            "{} is missing: pass --model-file, or run ./scripts/up once (it fetches the default model)",
            model.display()
        ));
    }
    let served = model
        .file_stem()
        .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned());
    std::fs::create_dir_all(&args.out)
        .map_err(|e| format!("cannot create {}: {e}", args.out.display()))?;
    let (tenants_file, keys) = tenants(&args.out, args.tenants)?;
    let mut ports = match args.port_base {
        Some(base) => ports_from(base, args.workers + 2)?,
        None => free_ports(args.workers + 2)?,
    };
    let metrics_port = ports.pop().unwrap_or_default();
    let router_port = ports.pop().unwrap_or_default();
    let worker_ports = ports;
    let worker_urls: Vec<String> = worker_ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    let ideal = match &args.workload {
        Workload::Trace(t) => {
            let trace = bench::read_trace(&t.trace)?;
            let n = t.limit.unwrap_or(trace.len()).min(trace.len());
            Some(bench::ideal_hit_rate(&trace[..n]))
        }
        Workload::Sessions(_) => None,
    };
    let mut rows = Vec::new();
    for (n, target) in targets.iter().enumerate() {
        let label = target.label();
        eprintln!("\n[{}/{}] {label}", n + 1, targets.len());
        let logs = args.out.join("logs").join(label.replace(':', "-"));
        std::fs::create_dir_all(&logs)
            .map_err(|e| format!("cannot create {}: {e}", logs.display()))?;
        let deadline = Instant::now() + Duration::from_secs(args.start_timeout_secs);
        if let Some(dir) = &args.kv_disk {
            // Every target starts with empty disk tiers.
            let own = dir.join(label.replace(':', "-"));
            if own.exists() {
                std::fs::remove_dir_all(&own)
                    .map_err(|e| format!("cannot empty {}: {e}", own.display()))?;
            }
        }
        let mut workers = Vec::new();
        for (i, &port) in worker_ports.iter().enumerate() {
            let worker_args = WorkerSpec {
                model: &model,
                engine: "sim",
                kv_cache: &args.kv_cache,
                block_tokens: args.block_tokens,
                served: &served,
                max_context: Some(args.max_context),
                sim: Some(SimTiming {
                    prefill_tokens_per_s: args.sim_prefill_tokens_per_s,
                    step_ms: args.sim_step_ms,
                    decode_ms_per_sequence: args.sim_decode_ms_per_sequence,
                }),
                // The other routers cannot send our cluster credential: the benchmark's workers
                // (on loopback, for one run) serve their internal API without one.
                cluster_token: None,
            }
            .args(port, None);
            let name = format!("worker-{i}");
            let mut worker_args = worker_args;
            if let Some(dir) = &args.kv_disk {
                let disk = KvDisk {
                    dir: &dir.join(label.replace(':', "-")),
                    size: &args.kv_disk_size,
                };
                worker_args.extend(disk.args(&name));
                worker_args.extend([
                    "--sim-block-load-secs".into(),
                    args.sim_block_load_secs.to_string(),
                ]);
            }
            workers.push(Part::spawn(
                &name,
                &worker_bin,
                &worker_args,
                port,
                &logs,
                false,
            )?);
        }
        let result = async {
            wait_ready(&mut workers, "/readyz", deadline, "starting the workers").await?;
            if n == 0 {
                describe_capacity(&args, &worker_urls[0]).await?;
            }
            let (program, router_args) = target.command(
                &router_bin,
                &python,
                (router_port, metrics_port),
                &worker_urls,
                &tenants_file,
                &args.router_args,
            );
            let env: &[(&str, &str)] = match target.router {
                Router::Ours => &[],
                // Keeps the peers' tokenizer fetch on this machine (see the module docs).
                Router::Sglang | Router::Vllm => &PEER_ENV,
            };
            let mut router =
                Part::spawn_with(&label, &program, &router_args, env, router_port, &logs)?;
            let outcome = async {
                wait_serving(target, &mut router, metrics_port, &worker_urls, deadline).await?;
                let (ran, disrupted) = tokio::join!(
                    run_workload(
                        &args,
                        target,
                        router_port,
                        &keys,
                        (&model, &served),
                        &worker_urls,
                    ),
                    disrupt(&args, &mut workers, &logs),
                );
                let (row, bound, turns) = ran?;
                let disrupted =
                    disrupted?.map(|(began, ended)| sessions::disrupted(&turns, began, ended));
                Ok::<_, String>((Row { disrupted, ..row }, bound))
            }
            .await;
            let stopped = stop_router(&mut router).await;
            let (row, workload_bound) = outcome?;
            Ok::<_, String>((
                Row {
                    stopped_cleanly: stopped?,
                    ..row
                },
                workload_bound,
            ))
        }
        .await;
        for w in workers.iter_mut().rev() {
            w.stop().await;
        }
        let row = match result {
            Ok((row, workload_bound)) => Row {
                bound: workload_bound,
                ..row
            },
            Err(e) => {
                eprintln!("  {label} FAILED: {e}");
                Row::failed(label.clone(), e)
            }
        };
        if row.failed.is_none() {
            eprintln!(
                "  {label}: hit rate {:.3}, TTFT p90 {}, errors {}",
                row.hit_rate,
                bench::ms(row.ttft_p90_s),
                row.errors
            );
        }
        rows.push(row);
    }
    report(&args, &rows, ideal)?;
    let failed: Vec<&str> = rows
        .iter()
        .filter(|r| r.failed.is_some())
        .map(|r| r.target.as_str())
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("{} failed (see above)", failed.join(", ")))
    }
}

/// `n` distinct free loopback ports: every listener is held until all are picked.
fn free_ports(n: usize) -> Result<Vec<u16>, String> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("no free loopback port: {e}"))?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("no free loopback port: {e}"))
}

/// The `n` ports from `base` on (`--port-base`), each checked free on loopback now.
fn ports_from(base: u16, n: usize) -> Result<Vec<u16>, String> {
    let last = u16::try_from(n.saturating_sub(1))
        .ok()
        .and_then(|k| base.checked_add(k))
        .ok_or_else(|| format!("--port-base {base}: {n} ports from there pass 65535"))?;
    (base..=last)
        .map(|port| match TcpListener::bind(("127.0.0.1", port)) {
            Ok(_) => Ok(port),
            Err(e) => Err(format!(
                "--port-base {base}: port {port} (of {base}-{last}) is not free: {e}"
            )),
        })
        .collect()
}

/// Prints what the workers hold against the trace's unique blocks.
async fn describe_capacity(args: &CompareArgs, worker: &str) -> Result<(), String> {
    let info = Api::new(worker, None)?.get_json("/v1/info").await?;
    let blocks = info["kv_capacity_blocks"].as_u64().unwrap_or(0);
    let tokens = blocks * u64::from(args.block_tokens) * args.workers as u64;
    match &args.workload {
        Workload::Trace(t) => {
            let trace = bench::read_trace(&t.trace)?;
            let trace = &trace[..t.limit.unwrap_or(trace.len()).min(trace.len())];
            let unique = bench::unique_blocks(trace) * bench::TRACE_BLOCK as u64;
            eprintln!(
                "  the {} workers hold {tokens} tokens: {:.2} x the {unique} tokens of the trace's unique blocks",
                args.workers,
                tokens as f64 / unique.max(1) as f64
            );
        }
        Workload::Sessions(_) => {
            eprintln!("  the {} workers hold {tokens} tokens", args.workers)
        }
    }
    Ok(())
}

/// Polls until the router serves; fails with its log when it exits or at `deadline`.
async fn wait_serving(
    target: &Target,
    router: &mut Part,
    metrics_port: u16,
    workers: &[String],
    deadline: Instant,
) -> Result<(), String> {
    let started = Instant::now();
    loop {
        if let Ok(Some(status)) = router.child.try_wait() {
            return Err(format!(
                "{} exited ({status}) while starting; the end of its log ({}):\n{}",
                router.name,
                router.log.display(),
                router.log_tail(15)
            ));
        }
        if target.ready((router.port, metrics_port), workers).await {
            eprintln!(
                "  {} serving after {:.1} s",
                router.name,
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{} not serving in time (--start-timeout-secs); the end of its log ({}):\n{}",
                router.name,
                router.log.display(),
                router.log_tail(15)
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// SIGTERM (a kill after the grace period), then checks the port is free. `Ok(false)` when it
/// had to be killed.
async fn stop_router(router: &mut Part) -> Result<bool, String> {
    if let Ok(Some(status)) = router.child.try_wait() {
        return Err(format!(
            "{} exited during the run ({status}); the end of its log ({}):\n{}",
            router.name,
            router.log.display(),
            router.log_tail(15)
        ));
    }
    let started = Instant::now();
    router.stop().await;
    let clean = router.child.try_wait().ok().flatten().is_some_and(|s| {
        use std::os::unix::process::ExitStatusExt;
        s.code() == Some(0) || s.signal() == Some(nix::sys::signal::Signal::SIGTERM as i32)
    });
    // The port must be free before the next router takes it.
    let until = Instant::now() + Duration::from_secs(10);
    while TcpListener::bind(("127.0.0.1", router.port)).is_err() {
        if Instant::now() > until {
            return Err(format!(
                "{} stopped, but port {} is still taken 10 s later",
                router.name, router.port
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "  {} stopped in {:.1} s{}; port {} free",
        router.name,
        started.elapsed().as_secs_f64(),
        if clean { "" } else { " (killed)" },
        router.port
    );
    Ok(clean)
}

/// Runs the workload through the router on `port`; the row (without the stop's outcome) and,
/// for sessions, the later turns' bound.
async fn run_workload(
    args: &CompareArgs,
    target: &Target,
    port: u16,
    keys: &[String],
    (model, served): (&Path, &str),
    workers: &[String],
) -> Result<(Row, Option<f64>, Vec<sessions::Turn>), String> {
    let endpoint = EndpointArgs::local(
        format!("http://127.0.0.1:{port}/v1"),
        keys[0].clone(),
        served.to_owned(),
        args.cache_dir(),
    );
    let out = args
        .out
        .join(format!("{}.json", target.label().replace(':', "-")));
    // Under a disruption the workers' counters restart with them, or go with them.
    let counted = args.disrupt.is_none();
    let before = match counted {
        true => bench::prefill_counters(workers).await?,
        false => Vec::new(),
    };
    let mut turns = Vec::new();
    let (outcomes, hit_rate, bound): (Vec<Outcome>, Option<f64>, Option<f64>) = match &args.workload
    {
        Workload::Trace(t) => {
            let mut workload = t.clone();
            workload.tokenizer.get_or_insert_with(|| model.to_owned());
            let t = TraceArgs {
                workload,
                endpoint,
                out: Some(out),
                workers: Vec::new(),
                allow_errors: false,
            };
            let (_, outcomes) = bench::replay(&t).await?;
            (outcomes, None, None)
        }
        Workload::Sessions(s) => {
            let s = SessionsArgs {
                endpoint,
                workload: s.clone(),
                api_keys: keys.to_vec(),
                out: Some(out),
            };
            let (summary, all) = sessions::sessions(s).await?;
            turns = all;
            (
                turns.iter().map(|t| t.outcome.clone()).collect(),
                Some(summary.later_turn_hit_rate),
                Some(summary.later_turn_bound),
            )
        }
    };
    let after = match counted {
        true => bench::prefill_counters(workers).await?,
        false => Vec::new(),
    };
    let per_worker: Vec<u64> = after
        .iter()
        .zip(&before)
        .map(|(a, b)| a.saturating_sub(*b))
        .collect();
    let duration = outcomes
        .iter()
        .map(|o| o.sent_at_s + o.latency_s)
        .fold(0.0, f64::max);
    let summary = bench::summarise(&outcomes, Duration::from_secs_f64(duration), 0.0);
    Ok((
        Row {
            target: target.label(),
            hit_rate: hit_rate.unwrap_or(summary.hit_rate),
            ttft_p50_s: summary.ttft_p50_s,
            ttft_p90_s: summary.ttft_p90_s,
            ttft_p99_s: summary.ttft_p99_s,
            tpot_p50_s: summary.tpot_p50_s,
            output_tokens_per_s: summary.output_tokens_per_s,
            requests: summary.requests,
            errors: summary.errors,
            imbalance: bench::imbalance(&per_worker),
            prefill_tokens_per_worker: per_worker,
            stopped_cleanly: false,
            bound: None,
            disrupted: None,
            failed: None,
            ttfts_s: outcomes
                .iter()
                .filter(|o| o.error.is_none())
                .filter_map(|o| o.ttft_s)
                .collect(),
        },
        bound,
        turns,
    ))
}

/// Carries out `--disrupt` on `workers`, `--disrupt-after-secs` from now; when it began and
/// ended, in seconds from now (`None` without one).
async fn disrupt(
    args: &CompareArgs,
    workers: &mut [Part],
    logs: &Path,
) -> Result<Option<(f64, f64)>, String> {
    let Some(disruption) = args.disrupt else {
        return Ok(None);
    };
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(args.disrupt_after_secs.max(0.0))).await;
    let began = start.elapsed().as_secs_f64();
    match disruption {
        Disruption::Restart => {
            for w in workers.iter_mut() {
                eprintln!("  rolling restart: {} (SIGTERM, drain)", w.name);
                w.stop_within(DRAIN_GRACE).await;
                w.respawn(logs)?;
                let deadline = Instant::now() + Duration::from_secs(args.start_timeout_secs);
                wait_ready(std::slice::from_mut(w), "/readyz", deadline, "restarting").await?;
                tokio::time::sleep(Duration::from_secs_f64(args.restart_gap_secs.max(0.0))).await;
            }
        }
        Disruption::ScaleTo(n) => {
            let leaving = workers.get_mut(n..).unwrap_or_default();
            eprintln!("  scale-down: SIGTERM to {} worker(s)", leaving.len());
            futures::future::join_all(leaving.iter_mut().map(|w| w.stop_within(DRAIN_GRACE))).await;
        }
    }
    let ended = start.elapsed().as_secs_f64();
    eprintln!("  disruption over after {:.1} s", ended - began);
    Ok(Some((began, ended)))
}

/// The goals of issue #8 for the default policy, checked against this run's rows. A row that
/// failed, or had failed requests, cannot show a goal met.
fn goals(rows: &[Row], ideal: Option<f64>, trace: bool) -> Vec<(String, bool)> {
    let Some(ours) = rows.iter().find(|r| r.target == "ours:ttft") else {
        return Vec::new();
    };
    if !ours.comparable() {
        return vec![(
            "ours:ttft was not measured cleanly (failed, or requests failed)".into(),
            false,
        )];
    }
    let peers: Vec<&Row> = rows
        .iter()
        .filter(|r| !r.target.starts_with("ours:"))
        .collect();
    let mut out = Vec::new();
    if !trace {
        out.push((
            format!("later turns' hit rate {:.3} >= 0.95", ours.hit_rate),
            ours.hit_rate >= 0.95,
        ));
        return out;
    }
    if let Some(ideal) = ideal {
        out.push((
            format!(
                "hit rate {:.3} >= 0.9 x the trace's own {ideal:.3} = {:.3}",
                ours.hit_rate,
                0.9 * ideal
            ),
            ours.hit_rate >= 0.9 * ideal,
        ));
    }
    for p in &peers {
        if !p.comparable() {
            out.push((
                format!(
                    "{} was not measured cleanly (failed, or requests failed): no comparison",
                    p.target
                ),
                false,
            ));
            continue;
        }
        out.push((
            format!(
                "hit rate {:.3} >= {}'s {:.3}",
                ours.hit_rate, p.target, p.hit_rate
            ),
            ours.hit_rate >= p.hit_rate,
        ));
        out.push((
            format!(
                "TTFT p90 {} <= {}'s {}",
                bench::ms(ours.ttft_p90_s),
                p.target,
                bench::ms(p.ttft_p90_s)
            ),
            ours.ttft_p90_s <= p.ttft_p90_s,
        ));
    }
    out.push((
        format!("load imbalance {:.2} <= 1.3", ours.imbalance),
        ours.imbalance <= 1.3,
    ));
    out
}

fn report(args: &CompareArgs, rows: &[Row], ideal: Option<f64>) -> Result<(), String> {
    let trace = matches!(args.workload, Workload::Trace(_));
    let what = if trace {
        "token hit rate"
    } else {
        "later turns' hit rate"
    };
    println!();
    println!(
        "| router:policy | {what} | TTFT p50 / p90 / p99 | TPOT p50 | output tok/s | imbalance | errors | stopped |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in rows {
        if let Some(why) = &r.failed {
            println!(
                "| {} | failed: {} | | | | | | |",
                r.target,
                why.lines().next().unwrap_or_default()
            );
            continue;
        }
        let hit = match r.bound {
            Some(b) => format!("{:.3} (bound {b:.3})", r.hit_rate),
            None => format!("{:.3}", r.hit_rate),
        };
        println!(
            "| {} | {hit} | {} / {} / {} | {} | {:.1} | {:.2} | {} of {} | {} |",
            r.target,
            bench::ms(r.ttft_p50_s),
            bench::ms(r.ttft_p90_s),
            bench::ms(r.ttft_p99_s),
            bench::ms(r.tpot_p50_s),
            r.output_tokens_per_s,
            r.imbalance,
            r.errors,
            r.requests,
            if r.stopped_cleanly {
                "SIGTERM, port free"
            } else {
                "killed, port free"
            }
        );
    }
    if let Some(x) = ideal {
        println!("\nthe trace's hit rate with an unlimited cache: {x:.3}");
    }
    if let Some(disruption) = args.disrupt {
        println!(
            "\n{disruption:?} after {} s: later turns from its start on (errors), those sent during it, and each session's first turn from its start on",
            args.disrupt_after_secs
        );
        println!(
            "| router:policy | later turns (errors) | during: turns, hit rate (bound) | sessions | cached prefix kept |"
        );
        println!("|---|---|---|---|---|");
        for r in rows {
            if let Some(d) = &r.disrupted {
                println!(
                    "| {} | {} ({}) | {}, {:.3} ({:.3}) | {} | {:.3} |",
                    r.target, d.turns, d.errors, d.during, d.hit_rate, d.bound, d.sessions, d.kept
                );
            }
        }
    }
    let checks = goals(rows, ideal, trace);
    if !checks.is_empty() {
        println!("\ngoals for ours:ttft (issue #8):");
        for (what, ok) in &checks {
            println!("  [{}] {what}", if *ok { "met" } else { "NOT met" });
        }
    }
    let json = serde_json::json!({
        "workload": if trace { "trace" } else { "sessions" },
        "workers": args.workers,
        "kv_cache_per_worker": args.kv_cache,
        "kv_disk_per_worker": args.kv_disk.as_ref().map(|_| &args.kv_disk_size),
        "block_tokens": args.block_tokens,
        "sim_prefill_tokens_per_s": args.sim_prefill_tokens_per_s,
        "sim_step_ms": args.sim_step_ms,
        "sim_decode_ms_per_sequence": args.sim_decode_ms_per_sequence,
        "ideal_hit_rate": ideal,
        "disrupt": args.disrupt.map(|d| format!("{d:?}")),
        "disrupt_after_secs": args.disrupt.map(|_| args.disrupt_after_secs),
        "router_args": args.router_args,
        "rows": rows,
        "goals": checks.iter().map(|(w, ok)| serde_json::json!({"goal": w, "met": ok})).collect::<Vec<_>>(),
    });
    let path = args.out.join("compare.json");
    bench::write_json(&path, &json)?;
    let series: Vec<Series> = rows
        .iter()
        .filter(|r| r.failed.is_none() && !r.ttfts_s.is_empty())
        .map(|r| Series {
            label: r.target.clone(),
            ttfts_s: r.ttfts_s.clone(),
            hit_rate: r.hit_rate,
        })
        .collect();
    if series.is_empty() {
        eprintln!("\nwrote {} (no target measured: no charts)", path.display());
        return Ok(());
    }
    let title = if trace {
        "trace"
    } else {
        "multi-turn sessions"
    };
    let cdf = args.out.join("ttft_cdf.png");
    chart::ttft_cdf(&cdf, &format!("TTFT, {title}"), &series)?;
    let bars = args.out.join("hit_rate.png");
    let mut lines = Vec::new();
    if let Some(x) = ideal {
        lines.push(("goal: 0.9 x the trace's own".to_owned(), 0.9 * x));
        lines.push(("the trace's own (unlimited cache)".to_owned(), x));
    } else if !trace {
        lines.push(("goal".to_owned(), 0.95));
        let ours = rows
            .iter()
            .find(|r| r.target == "ours:ttft")
            .and_then(|r| r.bound);
        if let Some(b) = ours {
            lines.push(("ours:ttft's bound: previous prompt + answer".to_owned(), b));
        }
    }
    chart::hit_rates(&bars, &format!("{what}, {title}"), &series, &lines)?;
    eprintln!(
        "\nwrote {}, {} and {}",
        path.display(),
        cdf.display(),
        bars.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_name_themselves() {
        let t = Target::parse("sglang:cache_aware").unwrap();
        assert_eq!(t.router, Router::Sglang);
        assert_eq!(t.label(), "sglang:cache_aware");
        assert!(Target::parse("nginx:round_robin").is_err());
        assert!(Target::parse("ours").is_err());
        assert!(Target::parse("ours:").is_err());
    }

    #[test]
    fn disruptions_parse() {
        assert_eq!("restart".parse(), Ok(Disruption::Restart));
        assert_eq!("scale-to=2".parse(), Ok(Disruption::ScaleTo(2)));
        for bad in ["scale-to=0", "scale-to=x", "scale-to", "restarts", ""] {
            assert!(bad.parse::<Disruption>().is_err(), "{bad}");
        }
    }

    fn row(target: &str, hit: f64, p90: f64, imbalance: f64) -> Row {
        Row {
            target: target.into(),
            hit_rate: hit,
            ttft_p90_s: p90,
            requests: 1,
            imbalance,
            stopped_cleanly: true,
            ..Row::default()
        }
    }

    #[test]
    fn goals_compare_the_default_policy_with_every_peer() {
        let rows = [
            row("ours:ttft", 0.6, 0.5, 1.2),
            row("ours:round_robin", 0.1, 0.1, 1.0),
            row("sglang:cache_aware", 0.55, 0.4, 1.5),
        ];
        let checks = goals(&rows, Some(0.65), true);
        let met: Vec<bool> = checks.iter().map(|(_, ok)| *ok).collect();
        // 0.6 >= 0.585; 0.6 >= 0.55; p90 0.5 > 0.4; imbalance 1.2 <= 1.3. Our other
        // policies are not peers.
        assert_eq!(met, [true, true, false, true], "{checks:?}");
        let sessions = goals(&rows, Some(0.97), false);
        assert_eq!(sessions.len(), 1);
        assert!(!sessions[0].1);
        assert!(goals(&rows[1..], Some(0.65), true).is_empty());
        // A peer that failed, or whose requests failed, cannot be beaten.
        let mut broken = rows.clone();
        broken[2].errors = 3;
        let checks = goals(&broken, Some(0.65), true);
        assert_eq!(checks.len(), 3, "{checks:?}");
        assert!(!checks[1].1 && checks[1].0.contains("not measured cleanly"));
        broken[2] = Row::failed("sglang:cache_aware".into(), "exited".into());
        assert!(!goals(&broken, Some(0.65), true)[1].1);
        // Nor can ours show a goal met then.
        broken[0].errors = 1;
        let checks = goals(&broken, Some(0.65), true);
        assert_eq!(checks.len(), 1);
        assert!(!checks[0].1);
    }
}

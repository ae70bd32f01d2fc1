//! `tidelock bench chaos` (issue #18, point 6): multi-turn conversations at steady load on a
//! local cluster (etcd, simulated workers registered through it, `--routers` router replicas)
//! while a seeded schedule kills a worker, a router replica or etcd with SIGKILL and starts it
//! again after `--down-secs`.
//!
//! The clients behave as behind a load balancer: each conversation sticks to one replica and
//! moves to the next when its replica refuses connections; a turn that fails is retried (up to
//! three times). Reported:
//!
//! - requests failed, and of those the ones *not* in flight on a process killed meanwhile
//!   (their router replica, or any worker: which worker served a request is not known to the
//!   client). Those must be 0.
//! - answers that differ from an undisturbed replay: after the run, with every process up and no
//!   faults, each conversation is replayed under a fresh session and tenant, each turn with the
//!   history the run had; the simulator's answers are a function of the prompt's ids, so an
//!   answer differs exactly when a turn's ids did (the cache never changes the answer). Only
//!   each conversation's turns up to its first difference are compared.
//! - for each fault: the victim, how long until it answered its readiness probe again, and the
//!   hit rate of later turns in the 20 s before the kill and after the recovery.
//! - every process's resident memory before the first fault and at the end.

use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tidelock_protocol::ClusterToken;

use crate::bench::{Outcome, stream};
use crate::config::{ChaosArgs, DEFAULT_MODEL_FILE};
use crate::http::{Api, get};
use crate::sessions::{chat_body, words};
use crate::up::{
    Cluster, Files, Part, SimTiming, WorkerSpec, cluster_auth, free_port, sibling, start_etcd,
    wait_ready, write_private,
};

/// How far around a fault the hit rate of later turns is measured.
const WINDOW: Duration = Duration::from_secs(20);
/// Tries of one turn.
const TRIES: usize = 3;

/// One try of one turn.
#[derive(Debug, Clone, Serialize)]
struct Try {
    conversation: String,
    turn: usize,
    /// The replica it went to.
    router: usize,
    started_s: f64,
    ended_s: f64,
    #[serde(flatten)]
    outcome: Outcome,
    #[serde(skip)]
    answer: String,
    /// Which client and which of its conversations: the replay rebuilds the history from them
    /// and the recorded answers ([`system_prompt`], [`question`]).
    #[serde(skip)]
    seed: (usize, u64),
}

/// The system prompt of client `s`'s conversation `conversation`.
fn system_prompt(args: &ChaosArgs, (s, conversation): (usize, u64)) -> serde_json::Value {
    let system = words(args.system_words, (s as u64) << 20 | conversation);
    serde_json::json!({"role": "system", "content": system})
}

/// The user message of turn `turn` of client `s`'s conversation `conversation`.
fn question(args: &ChaosArgs, (s, conversation): (usize, u64), turn: usize) -> serde_json::Value {
    let question = words(
        args.message_words,
        (s as u64) << 40 | conversation << 8 | turn as u64,
    );
    serde_json::json!({"role": "user", "content": question})
}

/// One kill and restart.
#[derive(Debug, Clone, Serialize)]
struct Fault {
    victim: String,
    killed_s: f64,
    /// When it answered its readiness probe again.
    ready_s: Option<f64>,
    recovery_s: Option<f64>,
    later_hit_rate_before: Option<f64>,
    later_hit_rate_after: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
struct Memory {
    process: String,
    start_mib: f64,
    end_mib: f64,
    restarted: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
struct Report {
    duration_s: f64,
    requests: usize,
    failed: usize,
    failed_not_in_flight_on_a_killed_process: usize,
    turns_answered: usize,
    answers_compared: usize,
    answers_differing: usize,
    later_turn_hit_rate: f64,
    faults: Vec<Fault>,
    memory: Vec<Memory>,
    /// Every failed try, with its error.
    failures: Vec<Try>,
}

pub(crate) async fn run(args: ChaosArgs) -> ExitCode {
    match chaos(args).await {
        Ok(report)
            if report.failed_not_in_flight_on_a_killed_process == 0
                && report.answers_differing == 0 =>
        {
            ExitCode::SUCCESS
        }
        Ok(_) => ExitCode::from(2),
        Err(e) => {
            eprintln!("tidelock bench chaos: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Resident memory of `pid`, MiB.
fn rss_mib(pid: Option<u32>) -> f64 {
    let Some(pid) = pid else { return 0.0 };
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// The readiness path of a part.
fn probe_path(name: &str) -> &'static str {
    if name == "etcd" { "/health" } else { "/readyz" }
}

async fn chaos(args: ChaosArgs) -> Result<Report, String> {
    if args.routers == 0 || args.workers == 0 || args.sessions == 0 || args.turns == 0 {
        return Err("--routers, --workers, --sessions and --turns must be at least 1".into());
    }
    for kind in &args.kill {
        if !["worker", "router", "etcd"].contains(&kind.as_str()) {
            return Err(format!("--kill: {kind:?} is not worker, router or etcd"));
        }
    }
    let model = match &args.model_file {
        Some(path) => path.clone(),
        None => crate::config::default_cache_dir()
            .join("models")
            .join(DEFAULT_MODEL_FILE),
    };
    if !model.is_file() {
        return Err(format!(
            "{}: no model (run ./scripts/up once, or pass --model-file)",
            model.display()
        ));
    }
    let (worker_bin, router_bin) = (sibling("tidelock-worker")?, sibling("tidelock-router")?);
    let logs = args.out.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| format!("cannot create {}: {e}", logs.display()))?;
    let (tenants_file, keys) = crate::compare::tenants(&args.out, 2)?;
    let token_file = args.out.join("cluster-token");
    write_private(&token_file, ClusterToken::generate().expose())?;
    let files = Files {
        tenants: &tenants_file,
        cluster_token: &token_file,
        logs: &logs,
    };
    let mut cluster = Cluster { parts: Vec::new() };
    let result = async {
        let etcd = start_etcd(&files, &mut cluster).await?;
        let served = "chaos";
        for i in 0..args.workers {
            let port = free_port()?;
            let mut worker_args = WorkerSpec {
                model: &model,
                engine: "sim",
                kv_cache: &args.kv_cache,
                block_tokens: args.block_tokens,
                served,
                max_context: Some(200_000),
                sim: Some(SimTiming {
                    prefill_tokens_per_s: args.sim_prefill_tokens_per_s,
                    step_ms: args.sim_step_ms,
                    decode_ms_per_sequence: 0.1,
                }),
                cluster_token: Some(&token_file),
            }
            .args(port, None);
            worker_args.extend(["--etcd".into(), etcd.clone()]);
            let name = format!("worker-{i}");
            cluster.parts.push(Part::spawn(
                &name,
                &worker_bin,
                &worker_args,
                port,
                &logs,
                false,
            )?);
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        wait_ready(
            &mut cluster.parts[1..],
            "/readyz",
            deadline,
            "starting the workers",
        )
        .await?;
        let mut urls = Vec::new();
        for i in 0..args.routers {
            let port = free_port()?;
            let mut router_args = vec![
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                "--etcd".into(),
                etcd.clone(),
            ];
            router_args.extend(cluster_auth(Some(&token_file)));
            let name = format!("router-{i}");
            cluster.parts.push(Part::spawn(
                &name,
                &router_bin,
                &router_args,
                port,
                &logs,
                false,
            )?);
            urls.push(format!("http://127.0.0.1:{port}/v1"));
        }
        let n = cluster.parts.len();
        wait_ready(
            &mut cluster.parts[n - args.routers..],
            "/readyz",
            deadline,
            "starting the routers",
        )
        .await?;
        run_load(&args, &mut cluster, &urls, &keys, served).await
    }
    .await;
    cluster.stop().await;
    let report = result?;
    let json = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
    let path = args.out.join("chaos.json");
    std::fs::write(&path, json).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    print_report(&args, &report);
    println!("\nreport: {}", path.display());
    Ok(report)
}

/// Everything the clients recorded.
type Log = Arc<Mutex<Vec<Try>>>;

/// The load, the faults during it, then the replay and the report.
async fn run_load(
    args: &ChaosArgs,
    cluster: &mut Cluster,
    urls: &[String],
    keys: &[String],
    model: &str,
) -> Result<Report, String> {
    let started = Instant::now();
    let until = started + Duration::from_secs(args.duration_secs);
    let log: Log = Arc::default();
    let apis: Arc<Vec<Api>> = Arc::new(
        urls.iter()
            .map(|u| Api::new(u, Some(keys[0].clone())))
            .collect::<Result<_, _>>()?,
    );
    let mut clients = Vec::new();
    for s in 0..args.sessions {
        let (apis, log, model, args) = (apis.clone(), log.clone(), model.to_owned(), args.clone());
        clients.push(tokio::spawn(async move {
            client(s, &args, &apis, &model, &log, started, until).await;
        }));
    }
    // Warm up, take every process's memory, then the faults.
    tokio::time::sleep(Duration::from_secs(5).min(Duration::from_secs(args.duration_secs) / 4))
        .await;
    let memory_start: Vec<(String, f64, Option<u32>)> = cluster
        .parts
        .iter()
        .map(|p| (p.name.clone(), rss_mib(p.child.id()), p.child.id()))
        .collect();
    let faults = inject(args, cluster, started, until).await;
    for c in clients {
        let _ = c.await;
    }
    let duration = started.elapsed();
    let tries = std::mem::take(&mut *log.lock().unwrap_or_else(|e| e.into_inner()));
    let memory = memory_start
        .into_iter()
        .zip(&cluster.parts)
        .map(|((process, start_mib, pid), part)| Memory {
            process,
            start_mib,
            end_mib: rss_mib(part.child.id()),
            restarted: pid != part.child.id(),
        })
        .collect();
    eprintln!("replaying every conversation without faults...");
    let replay = Arc::new(Api::new(&urls[0], Some(keys[1].clone()))?);
    let (compared, differing) = compare_answers(args, replay, model, &tries).await;
    Ok(summarise(
        &tries, faults, memory, duration, compared, differing,
    ))
}

/// One client: conversations of `--turns` turns, one after another, until `until`.
async fn client(
    s: usize,
    args: &ChaosArgs,
    apis: &[Api],
    model: &str,
    log: &Log,
    started: Instant,
    until: Instant,
) {
    let mut router = s % apis.len();
    for conversation in 0.. {
        let name = format!("c{s}-{conversation}");
        let seed = (s, conversation);
        let mut messages = vec![system_prompt(args, seed)];
        for turn in 1..=args.turns {
            if Instant::now() >= until {
                return;
            }
            messages.push(question(args, seed, turn));
            let body = chat_body(model, &messages, args.max_tokens, &name, true);
            let mut answered = None;
            for _ in 0..TRIES {
                let mut sent = 0;
                let (outcome, answer, at) = loop {
                    let at = started.elapsed();
                    let (outcome, answer) =
                        stream(&apis[router], "/chat/completions", body.clone(), s, at).await;
                    // Refused before anything was sent: the balancer moves to the next replica.
                    let refused = outcome
                        .error
                        .as_deref()
                        .is_some_and(|e| e.contains("(Connect)"));
                    if refused && sent + 1 < apis.len() {
                        sent += 1;
                        router = (router + 1) % apis.len();
                        continue;
                    }
                    break (outcome, answer, at);
                };
                let failed = outcome.error.is_some();
                log.lock().unwrap_or_else(|e| e.into_inner()).push(Try {
                    conversation: name.clone(),
                    turn,
                    router,
                    started_s: at.as_secs_f64(),
                    ended_s: started.elapsed().as_secs_f64(),
                    outcome,
                    answer: answer.clone(),
                    seed,
                });
                if !failed {
                    answered = Some(answer);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            let Some(answer) = answered else {
                break; // This conversation gives up; the next one starts.
            };
            messages.push(serde_json::json!({"role": "assistant", "content": answer}));
            tokio::time::sleep(Duration::from_millis(args.think_ms)).await;
        }
    }
}

/// Kills and restarts parts on the seeded schedule until a fault interval before `until`.
async fn inject(
    args: &ChaosArgs,
    cluster: &mut Cluster,
    started: Instant,
    until: Instant,
) -> Vec<Fault> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let victims: Vec<usize> = cluster
        .parts
        .iter()
        .enumerate()
        .filter(|(_, p)| {
            let kind = p.name.split('-').next().unwrap_or_default();
            args.kill.iter().any(|k| k == kind)
        })
        .map(|(i, _)| i)
        .collect();
    let mut faults = Vec::new();
    let logs = args.out.join("logs");
    loop {
        let wait = args.fault_every_secs * rng.random_range(0.5..1.5);
        let at = Instant::now() + Duration::from_secs_f64(wait);
        if victims.is_empty() || at + Duration::from_secs_f64(args.fault_every_secs) >= until {
            tokio::time::sleep_until(until.into()).await;
            return faults;
        }
        tokio::time::sleep_until(at.into()).await;
        let part = &mut cluster.parts[victims[rng.random_range(0..victims.len())]];
        // The kill's time is when the signal goes: requests end failing from then on.
        let killed = started.elapsed();
        let _ = part.child.start_kill();
        let _ = part.child.wait().await;
        eprintln!("{:>6.1} s: killed {}", killed.as_secs_f64(), part.name);
        tokio::time::sleep(Duration::from_secs_f64(args.down_secs)).await;
        let mut fault = Fault {
            victim: part.name.clone(),
            killed_s: killed.as_secs_f64(),
            ready_s: None,
            recovery_s: None,
            later_hit_rate_before: None,
            later_hit_rate_after: None,
        };
        match part.respawn(&logs) {
            Ok(()) => {
                let deadline = Instant::now() + Duration::from_secs(60);
                while Instant::now() < deadline {
                    if get(part.port, probe_path(&part.name), Duration::from_secs(1))
                        .await
                        .is_some_and(|(status, _)| status == 200)
                    {
                        let ready = started.elapsed();
                        fault.ready_s = Some(ready.as_secs_f64());
                        fault.recovery_s = Some((ready - killed).as_secs_f64());
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                eprintln!(
                    "{:>6.1} s: {} serves again ({})",
                    started.elapsed().as_secs_f64(),
                    part.name,
                    fault
                        .recovery_s
                        .map_or("not within 60 s".into(), |r| format!(
                            "{r:.1} s after the kill"
                        ))
                );
            }
            Err(e) => eprintln!("cannot restart {}: {e}", part.name),
        }
        faults.push(fault);
    }
}

/// Replays each conversation's answered turns in order, without faults, under a fresh session
/// (`--sessions` conversations at once); counts the answers compared and those that differ (a
/// conversation is compared up to its first difference: what follows was asked on another
/// history).
async fn compare_answers(
    args: &ChaosArgs,
    api: Arc<Api>,
    model: &str,
    tries: &[Try],
) -> (usize, usize) {
    let mut conversations: std::collections::BTreeMap<&str, Vec<&Try>> = Default::default();
    for t in tries.iter().filter(|t| t.outcome.error.is_none()) {
        conversations.entry(&t.conversation).or_default().push(t);
    }
    let replays = conversations.into_values().map(|mut turns| {
        turns.sort_by_key(|t| t.turn);
        let turns: Vec<Try> = turns.into_iter().cloned().collect();
        let (api, model) = (api.clone(), model.to_owned());
        async move {
            let (mut compared, mut differing) = (0, 0);
            // The history each turn was sent with: the system prompt, then each earlier turn's
            // question and its recorded answer.
            let Some(first) = turns.first() else {
                return (compared, differing);
            };
            let mut messages = vec![system_prompt(args, first.seed)];
            for t in turns {
                messages.push(question(args, t.seed, t.turn));
                let cache_key = format!("replay-{}", t.conversation);
                let body = chat_body(&model, &messages, args.max_tokens, &cache_key, true);
                let (outcome, answer) =
                    stream(&api, "/chat/completions", body, 0, Duration::ZERO).await;
                messages.push(serde_json::json!({"role": "assistant", "content": t.answer}));
                if let Some(e) = outcome.error {
                    eprintln!("{} turn {}: the replay failed: {e}", t.conversation, t.turn);
                    continue;
                }
                compared += 1;
                if answer != t.answer {
                    differing += 1;
                    eprintln!(
                        "{} turn {}: the answer differs from the undisturbed replay",
                        t.conversation, t.turn
                    );
                    break;
                }
            }
            (compared, differing)
        }
    });
    futures::stream::iter(replays)
        .buffer_unordered(args.sessions)
        .fold((0, 0), |(c, d), (c1, d1)| async move { (c + c1, d + d1) })
        .await
}

/// Later turns' hit rate among `tries` started within `from..to` seconds.
fn later_hit_rate(tries: &[Try], from: f64, to: f64) -> Option<f64> {
    let (cached, prompt) = tries
        .iter()
        .filter(|t| t.turn > 1 && t.outcome.error.is_none())
        .filter(|t| (from..to).contains(&t.started_s))
        .fold((0, 0), |(c, p), t| {
            (c + t.outcome.cached_tokens, p + t.outcome.prompt_tokens)
        });
    (prompt > 0).then(|| cached as f64 / prompt as f64)
}

fn summarise(
    tries: &[Try],
    mut faults: Vec<Fault>,
    memory: Vec<Memory>,
    duration: Duration,
    compared: usize,
    differing: usize,
) -> Report {
    let window = WINDOW.as_secs_f64();
    for f in &mut faults {
        f.later_hit_rate_before = later_hit_rate(tries, f.killed_s - window, f.killed_s);
        if let Some(ready) = f.ready_s {
            f.later_hit_rate_after = later_hit_rate(tries, ready, ready + window);
        }
    }
    let failed: Vec<&Try> = tries.iter().filter(|t| t.outcome.error.is_some()).collect();
    // In flight on a process killed meanwhile: its replica, or any worker.
    let excused = |t: &Try| {
        faults.iter().any(|f| {
            (t.started_s..=t.ended_s).contains(&f.killed_s)
                && (f.victim.starts_with("worker") || f.victim == format!("router-{}", t.router))
        })
    };
    Report {
        duration_s: duration.as_secs_f64(),
        requests: tries.len(),
        failed: failed.len(),
        failed_not_in_flight_on_a_killed_process: failed.iter().filter(|t| !excused(t)).count(),
        turns_answered: tries.len() - failed.len(),
        answers_compared: compared,
        answers_differing: differing,
        later_turn_hit_rate: later_hit_rate(tries, 0.0, f64::MAX).unwrap_or(0.0),
        failures: failed.into_iter().cloned().collect(),
        faults,
        memory,
    }
}

fn print_report(args: &ChaosArgs, r: &Report) {
    let rate = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.3}"));
    println!(
        "\n## Chaos: {} s, {} workers, {} routers, etcd; {} conversations at once, {} turns each",
        r.duration_s.round(),
        args.workers,
        args.routers,
        args.sessions,
        args.turns
    );
    println!("\n| measure | value |\n|---|---|");
    println!("| requests (tries of turns) | {} |", r.requests);
    println!("| failed | {} |", r.failed);
    println!(
        "| failed, not in flight on a killed process (must be 0) | {} |",
        r.failed_not_in_flight_on_a_killed_process
    );
    println!(
        "| answers compared with an undisturbed replay / differing (must be 0) | {} / {} |",
        r.answers_compared, r.answers_differing
    );
    println!(
        "| later turns' hit rate, whole run | {:.3} |",
        r.later_turn_hit_rate
    );
    println!(
        "\n| fault at | victim | back after | later-turn hit rate 20 s before / after |\n|---|---|---|---|"
    );
    for f in &r.faults {
        println!(
            "| {:.1} s | {} | {} | {} / {} |",
            f.killed_s,
            f.victim,
            f.recovery_s
                .map_or("not back".into(), |s| format!("{s:.1} s")),
            rate(f.later_hit_rate_before),
            rate(f.later_hit_rate_after)
        );
    }
    println!(
        "\n| process | RSS before the first fault | at the end | restarted |\n|---|---|---|---|"
    );
    for m in &r.memory {
        println!(
            "| {} | {:.0} MiB | {:.0} MiB | {} |",
            m.process,
            m.start_mib,
            m.end_mib,
            if m.restarted { "yes" } else { "no" }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(router: usize, started_s: f64, ended_s: f64, failed: bool) -> Try {
        Try {
            conversation: "c".into(),
            turn: 2,
            router,
            started_s,
            ended_s,
            outcome: Outcome {
                prompt_tokens: 100,
                cached_tokens: 80,
                error: failed.then(|| "broken".into()),
                ..Outcome::default()
            },
            answer: String::new(),
            seed: (0, 0),
        }
    }

    fn fault(victim: &str, killed_s: f64) -> Fault {
        Fault {
            victim: victim.into(),
            killed_s,
            ready_s: Some(killed_s + 3.0),
            recovery_s: Some(3.0),
            later_hit_rate_before: None,
            later_hit_rate_after: None,
        }
    }

    #[test]
    fn only_failures_in_flight_on_a_killed_process_are_excused() {
        let tries = [
            attempt(0, 9.0, 11.0, true),  // on router-0 when it was killed
            attempt(1, 9.0, 11.0, true),  // on router-1: not excused
            attempt(1, 29.0, 31.0, true), // any worker killed meanwhile
            attempt(0, 40.0, 41.0, true), // nothing killed then
            attempt(0, 50.0, 51.0, false),
        ];
        let faults = vec![
            fault("router-0", 10.0),
            fault("worker-2", 30.0),
            fault("etcd", 40.5),
        ];
        let r = summarise(&tries, faults, Vec::new(), Duration::from_secs(60), 0, 0);
        assert_eq!((r.requests, r.failed), (5, 4));
        assert_eq!(r.failed_not_in_flight_on_a_killed_process, 2);
        assert_eq!(r.faults[0].later_hit_rate_after, None);
        assert_eq!(r.faults[2].later_hit_rate_after, Some(0.8));
    }
}

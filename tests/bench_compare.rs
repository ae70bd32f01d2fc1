//! `tidelock bench compare` end to end with our router's policies (the peers, sglang-router and
//! vllm-router, are Python packages the suite does not install; bench/README.md runs them):
//! real simulated workers started afresh per target, the same trace through `ttft` and
//! `round_robin`, the table, `compare.json`, the two PNG charts, routers stopped by SIGTERM with
//! their ports free; then the sessions workload; bad targets and a missing peer Python fail
//! with a message before anything starts; `--port-base` places every part, a busy port is named;
//! Ctrl-C or SIGTERM stops every part the run started; the help lists only what compare uses.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tidelock_e2e::{binary, model_path};

fn compare(cache: &Path, args: &[&str]) -> Output {
    let run = Command::new(binary("tidelock"))
        .args(["bench", "compare", "--model-file"])
        .arg(model_path())
        .args(args)
        .env("TIDELOCK_CACHE", cache)
        .output()
        .unwrap();
    println!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    run
}

fn png_size(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(
        &bytes[..8],
        b"\x89PNG\r\n\x1a\n",
        "{} is a PNG",
        path.display()
    );
    let word = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    (word(16), word(20))
}

fn report_rows(out: &Path) -> Vec<Value> {
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("compare.json")).unwrap()).unwrap();
    report["rows"].as_array().unwrap().clone()
}

#[test]
fn compare_runs_one_trace_through_each_policy_on_fresh_workers() {
    let dir = tempfile::tempdir().unwrap();
    // Three conversations, five turns each, interleaved; turn t has t + 1 blocks and extends the
    // conversation's previous turn. Round robin over two workers sends each turn to the other
    // worker than the turn before (three requests per round), `ttft` follows the cache.
    let mut lines = Vec::new();
    for turn in 0..5u64 {
        for c in 0..3u64 {
            let ids: Vec<u64> = (0..=turn).map(|t| 100 * c + t).collect();
            lines.push(
                serde_json::json!({
                    "timestamp": (turn * 3 + c) * 150,
                    "input_length": ids.len() * 512,
                    "output_length": 4,
                    "hash_ids": ids,
                })
                .to_string(),
            );
        }
    }
    let trace = dir.path().join("trace.jsonl");
    std::fs::write(&trace, lines.join("\n")).unwrap();
    let out = dir.path().join("out");
    let run = compare(
        dir.path(),
        &[
            "--targets",
            "ours:ttft,ours:round_robin",
            "--workers",
            "2",
            "--kv-cache",
            "4GiB",
            "--sim-prefill-tokens-per-s",
            "200000",
            "--out",
            out.to_str().unwrap(),
            "trace",
            "--trace",
            trace.to_str().unwrap(),
            "--time-scale",
            "2",
        ],
    );
    assert!(run.status.success());
    let printed = String::from_utf8_lossy(&run.stdout);
    assert!(
        printed.contains("| router:policy | token hit rate |"),
        "{printed}"
    );
    // Results on stdout, progress on stderr: no per-target summary or progress line in the
    // results.
    for progress in ["replaying", "| measure | value |", "[1/2]", "wrote "] {
        assert!(
            !printed.contains(progress),
            "{progress:?} on stdout: {printed}"
        );
    }
    assert!(String::from_utf8_lossy(&run.stderr).contains("replaying 15 requests"));
    let rows = report_rows(&out);
    assert_eq!(rows.len(), 2);
    let hit = |i: usize| rows[i]["hit_rate"].as_f64().unwrap();
    // Turn t finds its t earlier blocks when it goes where its conversation is:
    // (0 + 1 + 2 + 3 + 4) / (1 + 2 + 3 + 4 + 5) = 2 / 3. Round robin finds only what the turn
    // before last left on the same worker: (0 + 0 + 1 + 2 + 3) / 15.
    assert_eq!(rows[0]["target"], "ours:ttft");
    assert!((hit(0) - 2.0 / 3.0).abs() < 0.01, "ttft {}", hit(0));
    assert_eq!(rows[1]["target"], "ours:round_robin");
    assert!((hit(1) - 6.0 / 15.0).abs() < 0.01, "round robin {}", hit(1));
    for row in &rows {
        assert_eq!(row["requests"], 15);
        assert_eq!(row["errors"], 0);
        assert_eq!(row["stopped_cleanly"], true, "{row}");
        // Every worker's prefill counter was read: their sum is what the cache did not serve.
        let prefilled: u64 = row["prefill_tokens_per_worker"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .sum();
        let prompt = 15 * 3 * 512;
        let hit = row["hit_rate"].as_f64().unwrap();
        assert_eq!(
            prefilled,
            (prompt as f64 * (1.0 - hit)).round() as u64,
            "{row}"
        );
    }
    // Each target's own report, every log, and the charts: one CDF, one bar per target.
    for name in ["ours-ttft.json", "ours-round_robin.json"] {
        assert!(out.join(name).is_file(), "{name}");
    }
    assert!(out.join("logs/ours-ttft/worker-1.log").is_file());
    assert_eq!(png_size(&out.join("ttft_cdf.png")), (1100, 700));
    assert_eq!(png_size(&out.join("hit_rate.png")), (1100, 140 + 46 * 2));
    assert!(
        printed.contains(&format!(
            "[met] hit rate {:.3} >= 0.9 x the trace's own 0.667",
            hit(0)
        )),
        "{printed}"
    );

    // The sessions workload through the same harness: later turns find their history.
    let out = dir.path().join("sessions");
    let run = compare(
        dir.path(),
        &[
            "--targets",
            "ours:ttft",
            "--workers",
            "2",
            "--out",
            out.to_str().unwrap(),
            "sessions",
            "--sessions",
            "3",
            "--turns",
            "3",
            "--think-ms",
            "20",
            "--system-words",
            "300",
            "--max-tokens",
            "16",
        ],
    );
    assert!(run.status.success());
    let rows = report_rows(&out);
    assert_eq!(rows[0]["requests"], 9);
    assert_eq!(rows[0]["errors"], 0);
    let bound = rows[0]["bound"].as_f64().unwrap();
    let later = rows[0]["hit_rate"].as_f64().unwrap();
    // Block rounding is all that separates them (64-token blocks, prompts of ~500 tokens).
    assert!(later <= bound && later > bound - 0.15, "{later} vs {bound}");
}

#[test]
fn bad_targets_and_a_missing_peer_python_fail_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("t.jsonl");
    std::fs::write(&trace, "").unwrap();
    let out = dir.path().join("out");
    let base = |targets: &'static str| {
        vec![
            "--targets".to_owned(),
            targets.to_owned(),
            "--peers-python".into(),
            "/nonexistent/python".into(),
            "--out".into(),
            out.display().to_string(),
            "trace".into(),
            "--trace".into(),
            trace.display().to_string(),
        ]
    };
    for (targets, message) in [
        ("nginx:round_robin", "unknown router `nginx`"),
        ("ours:ttft,ours:ttft", "`ours:ttft` is listed twice"),
        ("ours", "`ours` is not ROUTER:POLICY"),
        ("sglang:cache_aware", "cannot run /nonexistent/python"),
    ] {
        let args = base(targets);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let run = compare(dir.path(), &args);
        assert_eq!(run.status.code(), Some(1));
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(err.contains(message), "{targets}: {err}");
        assert!(!out.exists(), "nothing written for {targets}");
    }
}

/// `n` consecutive loopback ports free now, from a base the system's own choice suggests.
fn free_run(n: u16) -> u16 {
    for _ in 0..50 {
        let base = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if base.checked_add(n).is_some()
            && (base..base + n).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok())
        {
            return base;
        }
    }
    panic!("no run of {n} free loopback ports");
}

fn listening(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

#[test]
fn port_base_places_every_part_and_interrupts_stop_them_all() {
    let dir = tempfile::tempdir().unwrap();
    // A slow replay (one request a second for a minute) that is still running when stopped.
    let lines: Vec<String> = (0..60u64)
        .map(|i| {
            serde_json::json!({
                "timestamp": i * 1000,
                "input_length": 512,
                "output_length": 4,
                "hash_ids": [i],
            })
            .to_string()
        })
        .collect();
    let trace = dir.path().join("trace.jsonl");
    std::fs::write(&trace, lines.join("\n")).unwrap();
    let out = dir.path().join("out");
    // Two workers, the router and its metrics: four ports from the base.
    let base = free_run(4);
    let args = |base: u16| {
        vec![
            "bench".to_owned(),
            "compare".into(),
            "--model-file".into(),
            model_path().display().to_string(),
            "--targets".into(),
            "ours:ttft".into(),
            "--workers".into(),
            "2".into(),
            "--port-base".into(),
            base.to_string(),
            "--out".into(),
            out.display().to_string(),
            "trace".into(),
            "--trace".into(),
            trace.display().to_string(),
        ]
    };

    // A busy port in the range is named, and nothing starts.
    let busy = TcpListener::bind(("127.0.0.1", base + 1)).unwrap();
    let run = Command::new(binary("tidelock"))
        .args(args(base))
        .env("TIDELOCK_CACHE", dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "port {} (of {base}-{}) is not free",
            base + 1,
            base + 3
        )),
        "{err}"
    );
    drop(busy);

    // SIGTERM once the router serves: the command says so, exits 130, and every part it
    // started is gone (their ports free again).
    for signal in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGINT,
    ] {
        let mut child = Command::new(binary("tidelock"))
            .args(args(base))
            .env("TIDELOCK_CACHE", dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        while !(listening(base) && listening(base + 1) && listening(base + 2)) {
            assert!(Instant::now() < deadline, "the parts never served");
            assert!(child.try_wait().unwrap().is_none(), "compare ended early");
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_secs(2));
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
        let output = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(130), "{signal}: {err}");
        assert!(
            err.contains("interrupted: every worker and router it started is stopped"),
            "{err}"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while (base..base + 4).any(listening) {
            assert!(
                Instant::now() < deadline,
                "{signal}: a part still serves on {:?}",
                (base..base + 4)
                    .filter(|&p| listening(p))
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn compare_help_lists_only_what_compare_uses() {
    let help = |args: &[&str]| {
        let run = Command::new(binary("tidelock"))
            .args(args)
            .output()
            .unwrap();
        assert!(run.status.success());
        String::from_utf8_lossy(&run.stdout).into_owned()
    };
    for workload in ["trace", "sessions"] {
        let text = help(&["bench", "compare", workload, "--help"]);
        // The endpoint, the output file and the worker list are compare's own to set.
        for absent in [
            "--url",
            "--api-key",
            "--model ",
            "--out",
            "--workers",
            "--allow-errors",
            "--api-keys",
        ] {
            assert!(
                !text.contains(absent),
                "compare {workload} --help shows {absent}:\n{text}"
            );
        }
    }
    assert!(help(&["bench", "compare", "trace", "--help"]).contains("--time-scale"));
    assert!(help(&["bench", "compare", "sessions", "--help"]).contains("--think-ms"));
    // Standalone, the same workloads keep their endpoint options.
    let text = help(&["bench", "trace", "--help"]);
    for present in [
        "--url",
        "--api-key",
        "--out",
        "--workers",
        "--allow-errors",
        "--time-scale",
    ] {
        assert!(text.contains(present), "bench trace --help lacks {present}");
    }
    let text = help(&["bench", "compare", "--help"]);
    assert!(
        text.contains("--port-base") && text.contains("--workers"),
        "{text}"
    );
}

//! A worker that takes long to load its model (issue #19, point 2): its port opens at once,
//! `/healthz` answers 200 "loading" (the startup and liveness probes pass) while `/readyz` and
//! every other route answer 503, in OpenAI's error shape, until the model is loaded; then
//! `/readyz` is 200 and the API serves. SIGTERM during the load ends the process at once with
//! exit 0. The load time is the simulated engine's (`--sim-load-secs`): a real model's load is
//! the same code path, only slower.

use std::time::{Duration, Instant};

use tidelock_e2e::{Proc, binary, free_port, http_get, sim_worker_args};

fn start(dir: &std::path::Path, name: &str, port: u16, load_secs: &str) -> Proc {
    let args = sim_worker_args(port, &["--sim-load-secs", load_secs, "--no-cluster-auth"]);
    Proc::spawn(name, &binary("tidelock-worker"), &args, dir)
}

/// Polls `/healthz` until it answers, at most `deadline`.
fn first_health(worker: &Proc, port: u16, deadline: Duration) -> (u16, String) {
    let until = Instant::now() + deadline;
    loop {
        if let Some(answer) = http_get(port, "/healthz") {
            return answer;
        }
        assert!(
            Instant::now() < until,
            "no /healthz within {deadline:?}:\n{}",
            worker.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_loading_worker_is_alive_but_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let started = Instant::now();
    let mut worker = start(dir.path(), "slow-load", port, "6");
    assert_eq!(
        first_health(&worker, port, Duration::from_secs(20)),
        (200, "loading".to_owned())
    );
    let alive_after = started.elapsed();
    let (status, body) = http_get(port, "/readyz").unwrap();
    assert_eq!(status, 503, "{body}");
    let (status, body) = http_get(port, "/v1/models").unwrap();
    assert_eq!(status, 503);
    let error: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        error["error"]["message"], "the worker is loading its model",
        "{body}"
    );

    worker.wait_ready(port, "/readyz", Duration::from_secs(60));
    let ready_after = started.elapsed();
    eprintln!("alive after {alive_after:?}, ready after {ready_after:?} (load: 6 s)");
    assert!(ready_after >= Duration::from_secs(6), "{ready_after:?}");
    assert_eq!(http_get(port, "/healthz").unwrap(), (200, "ok".to_owned()));
    let (status, models) = http_get(port, "/v1/models").unwrap();
    assert_eq!(status, 200, "{models}");
    assert!(models.contains("\"object\":\"list\""), "{models}");
}

#[test]
fn sigterm_while_loading_ends_the_worker_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut worker = start(dir.path(), "stopped-while-loading", port, "600");
    assert_eq!(first_health(&worker, port, Duration::from_secs(20)).0, 200);
    let asked = Instant::now();
    let status = worker
        .terminate(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("still running 10 s after SIGTERM:\n{}", worker.log_text()));
    eprintln!("exited {status} {:?} after SIGTERM", asked.elapsed());
    assert!(status.success(), "{status}:\n{}", worker.log_text());
    assert!(worker.log_text().contains("stopped while loading"));
}

/// Logs without colour codes when written to a file (a pod's output, `tidelock up`'s logs),
/// and as JSON lines with `--log-format json`.
#[test]
fn logs_are_plain_text_off_a_terminal_and_json_lines_on_request() {
    let logs = tempfile::tempdir().unwrap();
    for (name, format) in [("text", "text"), ("json", "json")] {
        let port = free_port();
        let args = sim_worker_args(port, &["--no-cluster-auth", "--log-format", format]);
        let mut worker = Proc::spawn(name, &binary("tidelock-worker"), &args, logs.path());
        worker.wait_ready(port, "/readyz", Duration::from_secs(60));
        worker.stop(Duration::from_secs(30));
        let text = worker.log_text();
        assert!(text.contains("serving on"), "{text}");
        assert!(
            !text.contains('\u{1b}'),
            "no colour codes in a file:\n{text}"
        );
        if format == "json" {
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                let v: serde_json::Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
                assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
            }
        }
    }
}

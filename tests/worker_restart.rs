//! A worker's cache outlives it (issue #21, points 4 and 5), as real processes.
//!
//! - Restarted on the same disk tier: SIGTERM drains it (the cache is written through to
//!   `--kv-disk`), it exits 0; started again on the same folder it has a new epoch, its snapshot
//!   lists the blocks on the `disk` tier (what a router loads on a new epoch), and the same
//!   prompt comes back served from cache with the same tokens.
//! - Drained behind a router: the router plans where its cache goes, the peer pulls it before
//!   the worker exits, and serves the prompt from cache with the same tokens.
//!
//! The simulated engine stands in for the model (its blocks are 8 bytes); the tiers, the files,
//! the router and the HTTP surface are the real ones.

use std::time::Duration;

use tidelock_e2e::{Proc, binary, free_port, http_get, http_request, sim_worker_args};

fn start(dir: &std::path::Path, logs: &std::path::Path, name: &str, port: u16) -> Proc {
    let disk = dir.to_string_lossy();
    let args = sim_worker_args(
        port,
        &[
            "--kv-disk",
            &disk,
            "--kv-disk-size",
            "64MiB",
            "--no-cluster-auth",
        ],
    );
    Proc::spawn(name, &binary("tidelock-worker"), &args, logs)
}

/// The `cached_tokens` of `port`'s usage, and its tokens, for `prompt`.
fn served(port: u16, prompt: &[u32]) -> (u64, Vec<u64>) {
    let (status, usage, ids) = generate(port, prompt);
    assert_eq!(status, 200, "{usage}");
    (usage["cached_tokens"].as_u64().unwrap_or(u64::MAX), ids)
}

/// Generates from `tokens`; the final usage and the tokens.
fn generate(port: u16, tokens: &[u32]) -> (u16, serde_json::Value, Vec<u64>) {
    let body = serde_json::json!({
        "cache_salt": "tenant-a",
        "tokens": tokens,
        "sampling": {"temperature": 0, "max_tokens": 8, "ignore_eos": true},
    })
    .to_string();
    let (status, text) = http_request(
        port,
        "POST",
        "/v1/generate",
        None,
        Some(("application/json", body.as_bytes())),
    )
    .expect("the worker answers");
    let mut usage = serde_json::Value::Null;
    let mut ids = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        let Ok(event) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        match event["type"].as_str() {
            Some("tokens") => ids.extend(
                event["ids"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|i| i.as_u64()),
            ),
            Some("finished") => usage = event["usage"].clone(),
            _ => {}
        }
    }
    (status, usage, ids)
}

#[test]
fn a_worker_restarted_on_its_disk_tier_serves_its_cache_again() {
    let logs = tempfile::tempdir().unwrap();
    let disk = tempfile::tempdir().unwrap();
    let prompt: Vec<u32> = (0..200).map(|i| 40 + i % 500).collect();
    let reusable = (200 - 1) / 16 * 16;

    let port = free_port();
    let mut first = start(disk.path(), logs.path(), "first", port);
    first.wait_ready(port, "/readyz", Duration::from_secs(60));
    let (status, usage, cold) = generate(port, &prompt);
    assert_eq!(status, 200);
    assert_eq!(usage["cached_tokens"], 0, "{usage}");
    let (_, info) = http_get(port, "/v1/info").unwrap();
    let epoch_before: serde_json::Value = serde_json::from_str(&info).unwrap();
    let status = first
        .terminate(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("still running after SIGTERM:\n{}", first.log_text()));
    assert!(status.success(), "{status}:\n{}", first.log_text());
    let log = first.log_text();
    assert!(log.contains("drained"), "{log}");
    assert!(log.contains("KV cache written to the disk tier"), "{log}");

    let port = free_port();
    let mut second = start(disk.path(), logs.path(), "second", port);
    second.wait_ready(port, "/readyz", Duration::from_secs(60));
    let (_, info) = http_get(port, "/v1/info").unwrap();
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_ne!(info["epoch"], epoch_before["epoch"], "a new epoch");
    let (status, snapshot) = http_get(port, "/v1/kv/snapshot").unwrap();
    assert_eq!(status, 200);
    let snapshot: serde_json::Value = serde_json::from_str(&snapshot).unwrap();
    let on_disk = snapshot["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["tier"] == "disk")
        .count();
    assert!(
        on_disk >= reusable / 16,
        "{on_disk} blocks on disk: {snapshot}"
    );
    let (status, usage, again) = generate(port, &prompt);
    assert_eq!(status, 200);
    assert_eq!(usage["cached_tokens"], reusable as u64, "{usage}");
    assert_eq!(again, cold);
    second.stop(Duration::from_secs(30));
}

#[test]
fn a_draining_worker_hands_its_cache_to_the_peer_its_router_chose() {
    let logs = tempfile::tempdir().unwrap();
    let prompt: Vec<u32> = (0..200).map(|i| 40 + i % 500).collect();
    let reusable = (200 - 1) / 16 * 16;
    let ports = [free_port(), free_port()];
    let mut workers: Vec<Proc> = ports
        .iter()
        .enumerate()
        .map(|(i, &port)| {
            let args = sim_worker_args(port, &["--no-cluster-auth"]);
            Proc::spawn(
                &format!("worker-{i}"),
                &binary("tidelock-worker"),
                &args,
                logs.path(),
            )
        })
        .collect();
    for (w, &port) in workers.iter_mut().zip(&ports) {
        w.wait_ready(port, "/readyz", Duration::from_secs(60));
    }
    let router_port = free_port();
    let urls: Vec<String> = ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    let args: Vec<String> = [
        "--listen",
        &format!("127.0.0.1:{router_port}"),
        "--worker",
        &urls.join(","),
        "--no-cluster-auth",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut router = Proc::spawn("router", &binary("tidelock-router"), &args, logs.path());
    router.wait_ready(router_port, "/readyz", Duration::from_secs(60));

    let (cached, cold) = served(ports[0], &prompt);
    assert_eq!(cached, 0);
    // The router follows worker-0's events: its index holds the prompt's chain.
    std::thread::sleep(Duration::from_secs(1));
    let status = workers[0]
        .terminate(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("still running after SIGTERM:\n{}", workers[0].log_text()));
    assert!(status.success(), "{status}:\n{}", workers[0].log_text());
    let log = workers[0].log_text();
    assert!(log.contains("handoff done"), "{log}");
    assert!(
        router
            .log_text()
            .contains("its KV cache goes to the peers chosen"),
        "{}",
        router.log_text()
    );

    let (_, metrics) = http_get(ports[1], "/metrics").unwrap();
    assert!(
        metrics.contains(&format!(
            "tidelock_worker_kv_handoff_blocks_total{{direction=\"adopted\"}} {}",
            reusable / 16
        )),
        "{metrics}"
    );
    let (cached, again) = served(ports[1], &prompt);
    assert_eq!(
        cached, reusable as u64,
        "the peer serves the prefix from cache"
    );
    assert_eq!(again, cold, "and the same tokens");
    router.stop(Duration::from_secs(10));
    workers[1].stop(Duration::from_secs(30));
}

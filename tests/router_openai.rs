//! The router end to end, as a tenant uses it: two real workers on the default model and one
//! router, each a separate process on loopback (the router started first, while its workers are
//! down, and admitting them as they come up),
//! driven by the official `openai` Python client (`py/router_openai.py`): models, chat,
//! streaming chat with usage, completions, a 401, a 429, and a second turn of one session whose
//! cached tokens cover the first turn's prompt; then the two-step tool loop (`py/tool_loop.py`)
//! through the router and on a worker's own surface. Then every metric the chart's Grafana dashboard
//! queries is on the live router's or a worker's metrics-only port (issue #19, point 8).

use std::process::Command;
use std::time::Duration;

use tidelock_e2e::{Proc, binary, free_port, http_get, model_path, python};
use tidelock_protocol::{ClusterToken, TenantRecord};

const KEY: &str = "sk-e2e-tenant-0123456789";
const LIMITED_KEY: &str = "sk-e2e-limited-0123456789";
const BLOCK_TOKENS: u32 = 16;

#[test]
fn openai_client_against_router_and_real_workers() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_path();
    let served = model.file_stem().unwrap().to_string_lossy().into_owned();
    let mut workers = Vec::new();
    let mut urls = Vec::new();
    // The workers require the cluster credential; the router presents it.
    let token_file = dir.path().join("cluster-token");
    std::fs::write(&token_file, ClusterToken::generate().expose()).unwrap();
    let auth = [
        "--cluster-token-file".to_owned(),
        token_file.display().to_string(),
    ];
    // The router starts first, its workers down: it serves (health, errors) and admits each
    // worker when it answers.
    let worker_ports = [free_port(), free_port()];
    for port in worker_ports {
        urls.push(format!("http://127.0.0.1:{port}"));
    }
    let mut limited = TenantRecord::with_keys([LIMITED_KEY]);
    limited.limits.requests_per_minute = Some(1);
    let tenants = serde_json::json!({
        "e2e": TenantRecord::with_keys([KEY]),
        "limited": limited,
    });
    let tenants_file = dir.path().join("tenants.json");
    std::fs::write(&tenants_file, tenants.to_string()).unwrap();
    let port = free_port();
    let router_metrics = free_port();
    let args = [
        "--metrics-listen".to_owned(),
        format!("127.0.0.1:{router_metrics}"),
        "--listen".to_owned(),
        format!("127.0.0.1:{port}"),
        "--worker".to_owned(),
        urls.join(","),
        "--tenants-file".to_owned(),
        tenants_file.display().to_string(),
        auth[0].clone(),
        auth[1].clone(),
    ];
    let mut router = Proc::spawn("router", &binary("tidelock-router"), &args, dir.path());
    router.wait_ready(port, "/healthz", Duration::from_secs(30));
    assert_eq!(
        http_get(port, "/readyz").map(|(status, _)| status),
        Some(503),
        "not ready without a worker"
    );
    let worker_metrics = [free_port(), free_port()];
    for (i, &port) in worker_ports.iter().enumerate() {
        let args = [
            "--metrics-listen".to_owned(),
            format!("127.0.0.1:{}", worker_metrics[i]),
            "--model".to_owned(),
            model.display().to_string(),
            "--listen".to_owned(),
            format!("127.0.0.1:{port}"),
            "--kv-cache".to_owned(),
            "128MiB".to_owned(),
            "--block-tokens".to_owned(),
            BLOCK_TOKENS.to_string(),
            "--max-context".to_owned(),
            "2048".to_owned(),
            auth[0].clone(),
            auth[1].clone(),
        ];
        let mut w = Proc::spawn(
            &format!("worker-{i}"),
            &binary("tidelock-worker"),
            &args,
            dir.path(),
        );
        w.wait_ready(port, "/readyz", Duration::from_secs(120));
        workers.push(w);
    }
    router.wait_ready(port, "/readyz", Duration::from_secs(30));

    let cluster_token = std::fs::read_to_string(&token_file).unwrap();
    let runs = [
        ("router_openai.py", port, KEY),
        // The tool loop through the router, and on a worker's own surface (which takes the
        // cluster credential).
        ("tool_loop.py", port, KEY),
        ("tool_loop.py", worker_ports[0], cluster_token.trim()),
    ];
    for (script, port, key) in runs {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("py")
            .join(script);
        let output = Command::new(python())
            .arg(&path)
            .env("BASE_URL", format!("http://127.0.0.1:{port}/v1"))
            .env("KEY", key)
            .env("LIMITED_KEY", LIMITED_KEY)
            .env("MODEL", &served)
            .env("BLOCK_TOKENS", BLOCK_TOKENS.to_string())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        println!("{script} on port {port}:\n{stdout}");
        assert!(
            output.status.success() && stdout.contains("all checks passed"),
            "{script}: the openai client's checks failed:\n{stdout}\n{}\nrouter log:\n{}",
            String::from_utf8_lossy(&output.stderr),
            router.log_text()
        );
    }
    dashboard_metrics_exist(router_metrics, &worker_metrics);

    // Shut down as `up` does: the router first, then the workers; each exits by itself.
    router.stop(Duration::from_secs(10));
    for w in &mut workers {
        w.stop(Duration::from_secs(10));
    }
}

/// Every metric the chart's Grafana dashboard queries (`charts/tidelock/dashboards/tidelock.json`)
/// is exposed by the live router or one of the workers, on their metrics-only ports (what the
/// ServiceMonitor and PodMonitor scrape). A histogram's `_bucket` is its family.
fn dashboard_metrics_exist(router_metrics: u16, worker_metrics: &[u16]) {
    let file = tidelock_e2e::repo_root().join("charts/tidelock/dashboards/tidelock.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let mut queried = std::collections::BTreeSet::new();
    let mut exprs = 0;
    let panels = dashboard["panels"].as_array().unwrap();
    for target in panels.iter().flat_map(|p| p["targets"].as_array().unwrap()) {
        let expr = target["expr"].as_str().unwrap();
        exprs += 1;
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("tidelock_") {
                queried.insert(word.to_owned());
            }
        }
    }
    let mut exposed = String::new();
    for port in std::iter::once(router_metrics).chain(worker_metrics.iter().copied()) {
        let (status, text) = http_get(port, "/metrics").unwrap();
        assert_eq!(status, 200, "{text}");
        exposed.push_str(&text);
    }
    let families: std::collections::BTreeSet<&str> = exposed
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let series: std::collections::BTreeSet<&str> = exposed
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let missing: Vec<&String> = queried
        .iter()
        .filter(|name| !series.contains(name.as_str()))
        .collect();
    eprintln!(
        "the dashboard: {} panels, {exprs} queries, {} metrics, all exposed: {:?}",
        panels.len(),
        queried.len(),
        queried
    );
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics nothing exposes (with samples): {missing:?}; families exposed: {families:?}"
    );
}

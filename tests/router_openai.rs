//! The router end to end, as a tenant uses it: two real workers on the default model and one
//! router, each a separate process on loopback (the router started first, while its workers are
//! down, and admitting them as they come up),
//! driven by the official `openai` Python client (`py/router_openai.py`): models, chat,
//! streaming chat with usage, completions, a 401, a 429, and a second turn of one session whose
//! cached tokens cover the first turn's prompt.

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
    let args = [
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
    for (i, &port) in worker_ports.iter().enumerate() {
        let args = [
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

    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("py/router_openai.py");
    let output = Command::new(python())
        .arg(&script)
        .env("BASE_URL", format!("http://127.0.0.1:{port}/v1"))
        .env("KEY", KEY)
        .env("LIMITED_KEY", LIMITED_KEY)
        .env("MODEL", &served)
        .env("BLOCK_TOKENS", BLOCK_TOKENS.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(
        output.status.success() && stdout.contains("all checks passed"),
        "the openai client's checks failed:\n{stdout}\n{}\nrouter log:\n{}",
        String::from_utf8_lossy(&output.stderr),
        router.log_text()
    );
    // Shut down as `up` does: the router first, then the workers; each exits by itself.
    router.stop(Duration::from_secs(10));
    for w in &mut workers {
        w.stop(Duration::from_secs(10));
    }
}

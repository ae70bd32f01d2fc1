//! Driving `tidelock up` from a test: a private cache directory with the default model linked
//! in, the command with its output captured, readiness, SIGINT, and what `up` writes for tools
//! (`up/parts.json`: each part's name, pid, URL, metrics URL and log; `up/cluster-token`).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{binary, http_get, model_path};

/// A cache directory for one `up`: its own lock, key and logs, with the default model linked in.
pub fn cache() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("models")).unwrap();
    let model = model_path();
    std::os::unix::fs::symlink(
        &model,
        dir.path().join("models").join(model.file_name().unwrap()),
    )
    .unwrap();
    dir
}

/// `tidelock up` with `args`, its output in `<cache>/up.out`.
pub fn up(cache: &Path, args: &[&str]) -> Child {
    let out = std::fs::File::create(cache.join("up.out")).unwrap();
    Command::new(binary("tidelock"))
        .arg("up")
        .args(args)
        .env("TIDELOCK_CACHE", cache)
        .env_remove("TIDELOCK_MODEL")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap()
}

/// What `up` has printed so far.
pub fn output(cache: &Path) -> String {
    std::fs::read_to_string(cache.join("up.out")).unwrap_or_default()
}

/// Waits until the router answers `/readyz` on `port`; fails with `up`'s output otherwise.
pub fn wait_up(child: &mut Child, cache: &Path, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("tidelock up exited ({status}):\n{}", output(cache));
        }
        if http_get(port, "/readyz").is_some_and(|(s, _)| s == 200)
            && output(cache).contains("Press Ctrl-C")
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not up in time:\n{}",
            output(cache)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Sends SIGINT and waits for `up` to exit; returns its status.
pub fn interrupt(child: &mut Child) -> std::process::ExitStatus {
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "up did not stop after SIGINT");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `up/parts.json`.
pub fn parts(cache: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(cache.join("up/parts.json")).unwrap();
    serde_json::from_str::<Value>(&text)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// The port of `http://host:port`.
pub fn port_of(url: &str) -> u16 {
    url.rsplit(':').next().unwrap().parse().unwrap()
}

/// The part named `name`.
pub fn part<'a>(parts: &'a [Value], name: &str) -> &'a Value {
    parts
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no part {name}"))
}

/// The main port of the part named `name`.
pub fn port(parts: &[Value], name: &str) -> u16 {
    port_of(part(parts, name)["url"].as_str().unwrap())
}

/// The metrics-only port of the part named `name`.
pub fn metrics_port(parts: &[Value], name: &str) -> u16 {
    port_of(
        part(parts, name)["metrics"]
            .as_str()
            .expect("a metrics port"),
    )
}

/// Every port `part` listens on.
pub fn ports(part: &Value) -> Vec<u16> {
    ["url", "metrics"]
        .iter()
        .filter_map(|k| part[*k].as_str())
        .map(port_of)
        .collect()
}

/// The cluster credential `up` generated (what its router presents to its workers).
pub fn cluster_token(cache: &Path) -> String {
    std::fs::read_to_string(cache.join("up/cluster-token")).unwrap()
}

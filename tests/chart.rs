//! The Helm chart (`charts/tidelock`) without a cluster: its CRDs are the repository's, Helm's
//! own SDK lints it strictly and renders it for several value sets whose objects are checked and
//! validated against Kubernetes 1.30's schemas (`py/chart_checks.py`, with helm-python-sdk and
//! kubernetes-validate from the venv), and every command the rendered chart starts in a Tidelock
//! image is a binary the workspace builds and both Dockerfiles copy.
//!
//! `cargo test -p tidelock-e2e --test chart -- --nocapture` shows the rendered objects and the
//! validator's output.

use std::collections::BTreeSet;
use std::process::Command;

use serde_json::Value;
use tidelock_e2e::{binary, image_binaries, python, repo_root};

/// The chart's default image repository (values.yaml `image.repository`).
const TIDELOCK_IMAGE: &str = "tidelock/tidelock:";
/// The bundled etcd's image (values.yaml `etcd.image`), the only other image the chart runs.
const ETCD_IMAGE: &str = "rancher/mirrored-coreos-etcd:";

#[test]
fn the_charts_crds_are_the_repositorys_crds() {
    let root = repo_root();
    let names = |dir: &str| -> BTreeSet<String> {
        std::fs::read_dir(root.join(dir))
            .unwrap_or_else(|e| panic!("cannot list {dir}: {e}"))
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".yaml"))
            .collect()
    };
    let repo = names("crds");
    assert!(!repo.is_empty(), "crds/ has no CRDs");
    assert_eq!(
        names("charts/tidelock/crds"),
        repo,
        "charts/tidelock/crds must hold exactly the CRDs of crds/: cp crds/*.yaml charts/tidelock/crds/"
    );
    for name in &repo {
        let a = std::fs::read(root.join("crds").join(name)).unwrap();
        let b = std::fs::read(root.join("charts/tidelock/crds").join(name)).unwrap();
        assert!(
            a == b,
            "charts/tidelock/crds/{name} differs from crds/{name}: cp crds/*.yaml charts/tidelock/crds/"
        );
    }
}

#[test]
fn the_chart_lints_renders_and_validates() {
    let dir = tempfile::tempdir().unwrap();
    let commands = dir.path().join("commands.json");
    let script = repo_root().join("tests/py/chart_checks.py");
    let output = Command::new(python())
        .arg(&script)
        .env("CHART", repo_root().join("charts/tidelock"))
        .env("COMMANDS_OUT", &commands)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    print!("{stdout}");
    eprint!("{stderr}");
    assert!(
        output.status.code() != Some(3),
        "the venv lacks the chart checks' packages: run ./scripts/test, which installs them\n{stdout}"
    );
    assert!(
        output.status.success(),
        "chart checks failed ({}):\n{stdout}{stderr}",
        output.status
    );

    // Every binary the chart starts, and the worker binary the operator starts in the worker
    // image the chart gives it, is built by the workspace and copied by both images.
    let started: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(&commands).unwrap()).unwrap();
    let cpu = image_binaries("Dockerfile");
    let cuda = image_binaries("Dockerfile.cuda");
    let mut binaries = BTreeSet::new();
    for entry in &started {
        let image = entry["image"].as_str().unwrap();
        let command: Vec<&str> = entry["command"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        if image.starts_with(ETCD_IMAGE) {
            assert_eq!(command, ["/usr/local/bin/etcd"], "{entry}");
            continue;
        }
        assert!(
            image.starts_with(TIDELOCK_IMAGE),
            "a container in an unexpected image: {entry}"
        );
        let [name] = command[..] else {
            panic!("a Tidelock container's command is one binary: {entry}");
        };
        for (dockerfile, copied) in [("Dockerfile", &cpu), ("Dockerfile.cuda", &cuda)] {
            assert!(
                copied.iter().any(|c| c == name),
                "the chart starts {name}, which {dockerfile} does not copy ({entry})"
            );
        }
        // What the chart passes is what the binary reads: its flags and its variables.
        let help = Command::new(binary(name)).arg("--help").output().unwrap();
        let help = String::from_utf8(help.stdout).unwrap();
        let strings = |key: &str| -> Vec<String> {
            entry[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_owned())
                .collect()
        };
        for arg in strings("args") {
            if let Some(flag) = arg.strip_prefix("--") {
                let flag = flag.split('=').next().unwrap();
                assert!(
                    help.contains(&format!("--{flag} ")) || help.contains(&format!("--{flag}\n")),
                    "{name} has no --{flag} ({entry})"
                );
            }
        }
        for env in strings("env") {
            let read =
                help.contains(&format!("[env: {env}=")) || help.contains(&format!("[env: {env}]"));
            // RUST_LOG is read by the logger, not by clap.
            assert!(
                read || env == "RUST_LOG",
                "{name} does not read {env} ({entry})"
            );
        }
        binaries.insert(name);
    }
    assert_eq!(
        binaries,
        BTreeSet::from(["tidelock-operator", "tidelock-router", "tidelock-worker"]),
        "the binaries the chart starts"
    );
}

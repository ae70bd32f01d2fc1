//! The container images build what they copy: every `target/release/<binary>` the Dockerfiles
//! (CPU `Dockerfile`, GPU `Dockerfile.cuda`) copy is a binary of this workspace (built by this
//! very test run, next to the test), both images hold the same binaries, and each build stage
//! names every package it needs. No container engine runs here, so this is how a renamed or
//! removed binary is caught before an image build would fail. The CUDA image builds the worker
//! as `./scripts/test` checks it (same package, same feature, one the worker has) with the CUDA
//! version `scripts/cuda.sh` installs.

use tidelock_e2e::{binary, image_binaries, repo_root};

const BINARIES: [&str; 4] = [
    "tidelock-operator",
    "tidelock-router",
    "tidelock-worker",
    "tidelock",
];
const PACKAGES: [&str; 4] = [
    "tidelock-operator",
    "tidelock-router",
    "tidelock-worker",
    "tidelock-cli",
];

fn check_image(dockerfile: &str) -> String {
    let copied = image_binaries(dockerfile);
    assert_eq!(copied, BINARIES, "the binaries {dockerfile} copies");
    for name in &copied {
        // Panics, naming the path, when the workspace does not build it.
        binary(name);
    }
    let text = std::fs::read_to_string(repo_root().join(dockerfile)).unwrap();
    for package in PACKAGES {
        assert!(
            text.contains(&format!("-p {package}")),
            "{dockerfile}'s build stage must build {package}"
        );
    }
    text
}

#[test]
fn every_binary_the_dockerfile_copies_is_built_by_the_workspace() {
    check_image("Dockerfile");
}

#[test]
fn the_cuda_image_copies_the_same_binaries_and_builds_the_worker_with_cuda() {
    let text = check_image("Dockerfile.cuda");
    assert!(
        text.lines()
            .filter(|l| l.starts_with("FROM nvidia/cuda:"))
            .count()
            == 2,
        "Dockerfile.cuda builds on the CUDA devel image and runs on the CUDA runtime image"
    );

    // The worker is built in a cargo run of its own, with a feature the worker has; the other
    // binaries are CPU builds (a worker built with `cuda` needs the driver to start).
    let builds: Vec<String> = commands(&text)
        .into_iter()
        .filter(|c| c.starts_with("RUN cargo build"))
        .collect();
    let worker: Vec<&String> = builds
        .iter()
        .filter(|c| packages_and_features(c).0.contains(&"tidelock-worker"))
        .collect();
    assert_eq!(worker.len(), 1, "Dockerfile.cuda builds the worker once");
    let (packages, features) = packages_and_features(worker[0]);
    assert_eq!(
        (packages, features.clone()),
        (vec!["tidelock-worker"], vec!["cuda"]),
        "Dockerfile.cuda's worker build: {}",
        worker[0]
    );
    for other in builds.iter().filter(|c| *c != worker[0]) {
        assert!(
            packages_and_features(other).1.is_empty(),
            "Dockerfile.cuda builds the operator, router and CLI without features: {other}"
        );
    }
    let features_table = worker_features();
    for feature in &features {
        assert!(
            features_table.iter().any(|f| f == feature),
            "Dockerfile.cuda builds the worker with `{feature}`, which worker/Cargo.toml's [features] ({features_table:?}) lacks"
        );
    }

    // ./scripts/test checks the same package with the same feature, through scripts/cuda.sh.
    let script = read("scripts/test");
    let checked: Vec<String> = commands(&script)
        .into_iter()
        .filter(|c| c.contains("scripts/cuda.sh cargo"))
        .collect();
    assert_eq!(
        checked.len(),
        1,
        "scripts/test has one step through scripts/cuda.sh"
    );
    assert_eq!(
        packages_and_features(&checked[0]),
        packages_and_features(worker[0]),
        "scripts/test's CUDA step ({}) and Dockerfile.cuda's worker build ({}) build the same",
        checked[0],
        worker[0]
    );

    // The image's CUDA is the one scripts/cuda.sh installs from PyPI wheels, for the same GPUs.
    let cuda_sh = read("scripts/cuda.sh");
    assert_eq!(
        assignment(&text, "ARG CUDA_VERSION="),
        assignment(&cuda_sh, "CUDA_WHEELS_VERSION="),
        "Dockerfile.cuda's CUDA_VERSION and scripts/cuda.sh's CUDA_WHEELS_VERSION"
    );
    assert!(
        cuda_sh.contains(&format!(
            "${{CUDA_COMPUTE_CAP:-{}}}",
            assignment(&text, "ARG CUDA_COMPUTE_CAP=")
        )),
        "scripts/cuda.sh's default CUDA_COMPUTE_CAP is Dockerfile.cuda's"
    );

    // The feature exists: nothing may still say the image cannot be built.
    for doc in [
        "Dockerfile.cuda",
        "charts/tidelock/README.md",
        "charts/README.md",
    ] {
        let doc_text = read(doc).to_lowercase();
        for stale in ["not buildable", "cannot be built"] {
            assert!(
                !doc_text.contains(stale),
                "{doc} still says {stale:?} of the CUDA image: the worker has its `cuda` feature"
            );
        }
    }
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_root().join(path))
        .unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

/// The shell commands of a Dockerfile or script, with `\`-continued lines joined and whitespace
/// collapsed.
fn commands(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        let (part, continued) = match line.strip_suffix('\\') {
            Some(part) => (part, true),
            None => (line, false),
        };
        current.push_str(part);
        current.push(' ');
        if !continued {
            out.push(current.split_whitespace().collect::<Vec<_>>().join(" "));
            current.clear();
        }
    }
    out
}

/// The `-p` packages and `--features` of a cargo command line.
fn packages_and_features(command: &str) -> (Vec<&str>, Vec<&str>) {
    let words: Vec<&str> = command.split_whitespace().collect();
    let after = |flag: &str| {
        words
            .windows(2)
            .filter(|w| w[0] == flag)
            .flat_map(|w| w[1].split(','))
            .collect::<Vec<_>>()
    };
    (after("-p"), after("--features"))
}

/// The names in worker/Cargo.toml's `[features]` table.
fn worker_features() -> Vec<String> {
    read("worker/Cargo.toml")
        .lines()
        .skip_while(|l| l.trim() != "[features]")
        .skip(1)
        .take_while(|l| !l.starts_with('['))
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(name, _)| name.trim().to_owned())
        .collect()
}

/// The value of the first line that starts with `prefix`, without quotes.
fn assignment<'a>(text: &'a str, prefix: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no line starts with {prefix}"))
        .trim()
        .trim_matches('"')
}

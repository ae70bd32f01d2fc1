//! The container images build what they copy: every `target/release/<binary>` the Dockerfiles
//! (CPU `Dockerfile`, GPU `Dockerfile.cuda`) copy is a binary of this workspace (built by this
//! very test run, next to the test), both images hold the same binaries, and each build stage
//! names every package it needs. No container engine runs here, so this is how a renamed or
//! removed binary is caught before an image build would fail.

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
        text.contains("--features tidelock-worker/cuda"),
        "Dockerfile.cuda must build the worker with its cuda feature"
    );
    assert!(
        text.lines()
            .filter(|l| l.starts_with("FROM nvidia/cuda:"))
            .count()
            == 2,
        "Dockerfile.cuda builds on the CUDA devel image and runs on the CUDA runtime image"
    );
    // The header says the image cannot be built while the worker lacks the feature; keep that
    // note exactly as long as it is true.
    let manifest = std::fs::read_to_string(repo_root().join("worker/Cargo.toml")).unwrap();
    let has_feature = manifest
        .lines()
        .skip_while(|l| l.trim() != "[features]")
        .take_while(|l| !l.starts_with('[') || l.trim() == "[features]")
        .any(|l| l.trim_start().starts_with("cuda"));
    let says_blocked = text.contains("NOT BUILDABLE YET");
    assert!(
        has_feature != says_blocked,
        "worker/Cargo.toml {} a `cuda` feature, so Dockerfile.cuda's header (and charts/tidelock/README.md) must {} the 'NOT BUILDABLE YET' note",
        if has_feature { "now has" } else { "has no" },
        if has_feature { "drop" } else { "keep" }
    );
}

//! The container image builds what it copies: every `target/release/<binary>` the Dockerfile
//! copies is a binary of this workspace (built by this very test run, next to the test), and the
//! build stage names every package it needs. No container engine runs here, so this is how a
//! renamed or removed binary is caught before an image build would fail.

use std::path::Path;

use tidelock_e2e::binary;

#[test]
fn every_binary_the_dockerfile_copies_is_built_by_the_workspace() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let copied: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.starts_with("COPY --from=build"))
        .filter_map(|l| l.split_whitespace().nth(2))
        .filter_map(|src| src.strip_prefix("/src/target/release/"))
        .collect();
    assert_eq!(
        copied,
        [
            "tidelock-operator",
            "tidelock-router",
            "tidelock-worker",
            "tidelock"
        ],
        "the image's binaries"
    );
    for name in &copied {
        // Panics, naming the path, when the workspace does not build it.
        binary(name);
    }
    for package in [
        "tidelock-operator",
        "tidelock-router",
        "tidelock-worker",
        "tidelock-cli",
    ] {
        assert!(
            dockerfile.contains(&format!("-p {package}")),
            "the build stage must build {package}"
        );
    }
}

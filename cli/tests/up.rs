//! `tidelock up`'s refusals, as a newcomer meets them: a missing or broken model and options out
//! of range are clear errors with exit 1, before any process starts. The running cluster is
//! tested end to end in `tests/up.rs` at the repository root.

use std::process::{Command, Output};

fn up(model: &std::path::Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tidelock"))
        .arg("up")
        .arg("--model")
        .arg(model)
        .output()
        .expect("run tidelock")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn missing_model_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("absent.gguf");
    let out = up(&model);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains(&model.display().to_string()), "{err}");
    assert!(err.contains("cannot open"), "{err}");
    assert!(err.contains("./scripts/up"), "{err}");
}

#[test]
fn a_file_that_is_not_gguf_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.gguf");
    std::fs::write(&model, b"{\"not\": \"a model\"}").unwrap();
    let out = up(&model);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not a GGUF file"), "{}", stderr(&out));
}

#[test]
fn a_folder_that_is_not_a_hugging_face_model_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let out = up(dir.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("without config.json"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn options_out_of_range_are_refused_before_anything_starts() {
    for (flag, value, needle) in [
        ("--workers", "0", "--workers must be at least 1"),
        ("--shards", "0", "--shards must be at least 1"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_tidelock"))
            .args(["up", flag, value, "--model", "/nonexistent.gguf"])
            .output()
            .expect("run tidelock");
        assert_eq!(out.status.code(), Some(1), "{flag} {value}");
        assert!(stderr(&out).contains(needle), "{flag}: {}", stderr(&out));
    }
    let out = Command::new(env!("CARGO_BIN_EXE_tidelock"))
        .args(["up", "--sim-prefill-tokens-per-s", "1000"])
        .args(["--model", "/nonexistent.gguf"])
        .output()
        .expect("run tidelock");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("use them with --engine sim"),
        "{}",
        stderr(&out)
    );
    let out = Command::new(env!("CARGO_BIN_EXE_tidelock"))
        .args(["up", "--shards", "4", "--engine", "sim"])
        .args(["--model", "/nonexistent.gguf"])
        .output()
        .expect("run tidelock");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("--shards above 1 needs the real engine"),
        "{}",
        stderr(&out)
    );
}

//! `tidelock up` runs as a newcomer would run it: a missing or broken model is a clear error, and
//! with a model in place it says the cluster is not implemented yet instead of pretending to serve.

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
fn with_a_model_it_reports_and_refuses_to_pretend() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.gguf");
    std::fs::write(&model, b"GGUF\x03\x00\x00\x00rest").unwrap();
    let out = up(&model);
    assert_eq!(out.status.code(), Some(2));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(&model.display().to_string()), "{stdout}");
    assert!(
        stderr(&out).contains("not implemented yet"),
        "{}",
        stderr(&out)
    );
}

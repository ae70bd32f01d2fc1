//! `tidelock fetch`, the worker pods' init container (issue #19, point 5), against a fake model
//! hub on loopback (`HF_ENDPOINT`; no hub is reachable here): a repository listed by the hub's
//! API and downloaded file by file, one through a relative redirect as the hub's CDN does, with
//! the token of a gated repository sent to the hub only; a revision full of shell
//! metacharacters reaches the hub as one path segment and runs nothing; a listing naming a file
//! outside the destination is refused; a URL download whose SHA-256 differs is refused with
//! nothing left behind, and one that matches is kept and not fetched again.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use axum::extract::{Path as Segments, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use tidelock_e2e::binary;

const TOKEN: &str = "hf_gated_secret";
const CONFIG: &[u8] = b"{\"architectures\": [\"LlamaForCausalLM\"]}";
const WEIGHTS: &[u8] = b"GGUF pretend weights";

/// What the hub saw: `(path, authorization header)` per request.
type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;

fn record(seen: &Seen, path: String, headers: &HeaderMap) {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    seen.lock().unwrap().push((path, auth));
}

fn authorized(headers: &HeaderMap) -> bool {
    headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {TOKEN}"))
}

async fn listing(
    State(seen): State<Seen>,
    Segments((owner, name, revision)): Segments<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    record(&seen, format!("api {owner}/{name}@{revision}"), &headers);
    if !authorized(&headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let files: Vec<&str> = if name == "evil" {
        vec!["../../escape.txt"]
    } else {
        vec!["config.json", "sub/model.gguf"]
    };
    let siblings: Vec<_> = files
        .iter()
        .map(|f| serde_json::json!({"rfilename": f}))
        .collect();
    axum::Json(serde_json::json!({"siblings": siblings})).into_response()
}

async fn resolve(
    State(seen): State<Seen>,
    Segments((owner, name, revision, file)): Segments<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    record(
        &seen,
        format!("file {owner}/{name}@{revision}:{file}"),
        &headers,
    );
    if !authorized(&headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    match file.as_str() {
        // The hub answers large files with a redirect to its CDN.
        "config.json" => Redirect::to("/cdn/config.json").into_response(),
        "sub/model.gguf" => WEIGHTS.into_response(),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn cdn(State(seen): State<Seen>, headers: HeaderMap) -> Response {
    record(&seen, "cdn config.json".into(), &headers);
    CONFIG.into_response()
}

async fn start_hub() -> (String, Seen) {
    let seen: Seen = Arc::default();
    let app = axum::Router::new()
        .route(
            "/api/models/{owner}/{name}/revision/{revision}",
            get(listing),
        )
        .route("/{owner}/{name}/resolve/{revision}/{*file}", get(resolve))
        .route("/cdn/config.json", get(cdn))
        .route("/files/m.gguf", get(|| async { WEIGHTS }))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

/// Runs `tidelock fetch <args>` with the hub at `hub` (off the async threads: it blocks).
async fn fetch(hub: &str, token: Option<&str>, args: &[&str], cwd: &Path) -> Output {
    let mut command = Command::new(binary("tidelock"));
    command
        .arg("fetch")
        .args(args)
        .env("HF_ENDPOINT", hub)
        .env_remove("HF_TOKEN")
        .current_dir(cwd);
    if let Some(token) = token {
        command.env("HF_TOKEN", token);
    }
    tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap()
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn fetch_downloads_a_repository_and_a_checked_file() {
    let (hub, seen) = start_hub().await;
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("models/hf");
    let dest_arg = dest.to_str().unwrap();

    // A gated repository without its token: refused, saying what is missing.
    let out = fetch(
        &hub,
        None,
        &[
            "hf",
            "--repo",
            "org/gated",
            "--revision",
            "v1",
            "--dest",
            dest_arg,
        ],
        dir.path(),
    )
    .await;
    assert!(!out.status.success());
    assert!(text(&out).contains("needs a token"), "{}", text(&out));

    // With it, and a revision that a shell would run: one argument, one path segment.
    let revision = "v1'; touch owned; echo '";
    let out = fetch(
        &hub,
        Some(TOKEN),
        &[
            "hf",
            "--repo",
            "org/gated",
            "--revision",
            revision,
            "--dest",
            dest_arg,
        ],
        dir.path(),
    )
    .await;
    eprintln!("{}", text(&out));
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::read(dest.join("config.json")).unwrap(), CONFIG);
    assert_eq!(std::fs::read(dest.join("sub/model.gguf")).unwrap(), WEIGHTS);
    assert!(
        !dir.path().join("owned").exists(),
        "nothing ran the revision"
    );
    let requests = seen.lock().unwrap().clone();
    assert!(
        requests.contains(&(
            format!("api org/gated@{revision}"),
            Some(format!("Bearer {TOKEN}"))
        )),
        "{requests:?}"
    );
    // The token goes to the hub only; the CDN is another host in real life (same one here, so
    // this checks the redirect was followed and fetched).
    assert!(
        requests.iter().any(|(p, _)| p == "cdn config.json"),
        "{requests:?}"
    );

    // A listing naming a file outside the destination: refused, nothing written there.
    let out = fetch(
        &hub,
        Some(TOKEN),
        &["hf", "--repo", "org/evil", "--dest", dest_arg],
        dir.path(),
    )
    .await;
    assert!(!out.status.success());
    assert!(
        text(&out).contains("refusing the file name"),
        "{}",
        text(&out)
    );
    assert!(
        !dir.path().join("escape.txt").exists()
            && !dest.parent().unwrap().join("escape.txt").exists()
    );

    // By URL: a wrong SHA-256 is refused and leaves nothing; the right one is kept.
    let file = dir.path().join("models/url/model.gguf");
    let file_arg = file.to_str().unwrap();
    let url = format!("{hub}/files/m.gguf");
    let wrong = "0".repeat(64);
    let out = fetch(
        &hub,
        None,
        &["url", "--url", &url, "--sha256", &wrong, "--dest", file_arg],
        dir.path(),
    )
    .await;
    assert!(!out.status.success());
    assert!(
        text(&out).contains("refused, nothing written"),
        "{}",
        text(&out)
    );
    assert!(!file.exists() && !dir.path().join("models/url/model.gguf.partial").exists());
    let right: String = ring::digest::digest(&ring::digest::SHA256, WEIGHTS)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let out = fetch(
        &hub,
        None,
        &["url", "--url", &url, "--sha256", &right, "--dest", file_arg],
        dir.path(),
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::read(&file).unwrap(), WEIGHTS);
    let before = seen.lock().unwrap().len();
    let out = fetch(
        &hub,
        None,
        &["url", "--url", &url, "--sha256", &right, "--dest", file_arg],
        dir.path(),
    )
    .await;
    assert!(
        out.status.success() && text(&out).contains("kept"),
        "{}",
        text(&out)
    );
    assert_eq!(
        seen.lock().unwrap().len(),
        before,
        "a complete file is not fetched again"
    );
}

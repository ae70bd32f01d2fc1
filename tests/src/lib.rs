//! What the end-to-end tests share: the workspace's binaries, free loopback ports, child
//! processes that are always stopped (and whose logs are shown when a test fails), readiness
//! polling with a deadline, and the Python venv with the official `openai` client.
//!
//! The binaries are the ones `cargo test --workspace` has just built next to the test
//! executable (`target/<profile>/`); run the suite that way (`./scripts/test`).

pub mod local;
pub mod netpol;
pub mod shard;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A workspace binary, e.g. `tidelock-router`, from the same build as the running test.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("a test executable under target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: run the suite with `cargo test --workspace` (./scripts/test), which builds every binary",
        path.display()
    );
    path
}

/// The repository's root (the workspace).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

/// The binaries a Dockerfile of the repository copies out of its build stage, in order
/// (`COPY --from=build /src/target/release/<name> ...`).
pub fn image_binaries(dockerfile: &str) -> Vec<String> {
    let text = std::fs::read_to_string(repo_root().join(dockerfile))
        .unwrap_or_else(|e| panic!("cannot read {dockerfile}: {e}"));
    text.lines()
        .filter(|l| l.starts_with("COPY --from=build"))
        .filter_map(|l| l.split_whitespace().nth(2))
        .filter_map(|src| src.strip_prefix("/src/target/release/"))
        .map(str::to_owned)
        .collect()
}

/// The default model (`$TIDELOCK_MODEL`, else the cache `./scripts/test` fills).
pub fn model_path() -> PathBuf {
    let path = std::env::var_os("TIDELOCK_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert!(
        path.is_file(),
        "the default model is not at {} (run ./scripts/test, which fetches it, or set TIDELOCK_MODEL)",
        path.display()
    );
    path
}

/// The command line of a simulated worker (`--engine sim`, 64 MiB of KV, 16-token blocks) on
/// `port`, loading the default model's tokenizer, then `extra`.
pub fn sim_worker_args(port: u16, extra: &[&str]) -> Vec<String> {
    let fixed = [
        "--model".to_owned(),
        model_path().to_string_lossy().into_owned(),
        "--engine".to_owned(),
        "sim".to_owned(),
        "--listen".to_owned(),
        format!("127.0.0.1:{port}"),
        "--kv-cache".to_owned(),
        "64MiB".to_owned(),
        "--block-tokens".to_owned(),
        "16".to_owned(),
    ];
    fixed
        .into_iter()
        .chain(extra.iter().map(|s| s.to_string()))
        .collect()
}

fn cache_dir() -> PathBuf {
    tidelock_localkube::tools::cache_dir()
}

/// The venv's Python, which has the official `openai` client (`./scripts/test` installs it).
pub fn python() -> PathBuf {
    let path = cache_dir().join("venv/bin/python");
    assert!(
        path.is_file(),
        "{} is missing: run ./scripts/test, which creates the venv with the openai client",
        path.display()
    );
    path
}

/// A free TCP port on loopback (bound, then released for the child to take).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// A child process, stopped (SIGTERM, then SIGKILL) when dropped; its output goes to a log file.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, program: &Path, args: &[String], logs: &Path) -> Proc {
        let log = logs.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("a log file");
        let child = Command::new(program)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("a log file handle"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        Proc {
            name: name.to_owned(),
            child,
            log,
        }
    }

    /// The log so far (for failure messages).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls `http://127.0.0.1:{port}{path}` until it answers 200; panics with the log if the
    /// process exits or `deadline` passes.
    pub fn wait_ready(&mut self, port: u16, path: &str, deadline: Duration) {
        let until = Instant::now() + deadline;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited ({status}) before it was ready:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            if http_get(port, path).is_some_and(|(status, _)| status == 200) {
                return;
            }
            assert!(
                Instant::now() < until,
                "{} not ready on :{port}{path} within {deadline:?}:\n{}",
                self.name,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends SIGTERM and waits up to `grace` for the exit, then kills.
    pub fn stop(&mut self, grace: Duration) {
        if self.terminate(grace).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// Sends SIGTERM (unless it has exited already) and waits up to `grace`: how it exited, or
    /// `None` when it still runs.
    pub fn terminate(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        if let Some(status) = self.child.try_wait().ok().flatten() {
            return Some(status);
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let until = Instant::now() + grace;
        while Instant::now() < until {
            if let Some(status) = self.child.try_wait().ok().flatten() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// A plain HTTP/1.1 GET on loopback: `(status, body)`, or `None` when nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    http_get_with(port, path, None)
}

/// [`http_get`] presenting `bearer` (a cluster token or an API key) when given.
pub fn http_get_with(port: u16, path: &str, bearer: Option<&str>) -> Option<(u16, String)> {
    http_request(port, "GET", path, bearer, None)
}

/// One HTTP/1.1 request on loopback with an optional bearer and an optional body
/// `(content type, bytes)`: `(status, body)`, or `None` when nothing answers.
pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<(&str, &[u8])>,
) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .ok()?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    if let Some(bearer) = bearer {
        head.push_str(&format!("Authorization: Bearer {bearer}\r\n"));
    }
    if let Some((content_type, bytes)) = body {
        head.push_str(&format!(
            "Content-Type: {content_type}\r\nContent-Length: {}\r\n",
            bytes.len()
        ));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).ok()?;
    if let Some((_, bytes)) = body {
        stream.write_all(bytes).ok()?;
    }
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let end = response.windows(4).position(|w| w == b"\r\n\r\n");
    let (head, body) = match end {
        Some(end) => (&response[..end], &response[end + 4..]),
        None => (&response[..], &[][..]),
    };
    let head = String::from_utf8_lossy(head);
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        unchunk(body)
    } else {
        body.to_vec()
    };
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The payload of a chunked body (sizes counted in bytes, before any text decoding).
fn unchunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = body.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&body[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.trim(), 16).ok());
        let rest = &body[eol + 2..];
        match size {
            Some(size) if size > 0 && rest.len() >= size => {
                out.extend_from_slice(&rest[..size]);
                body = rest[size..].strip_prefix(b"\r\n").unwrap_or(&rest[size..]);
            }
            _ => break,
        }
    }
    out
}

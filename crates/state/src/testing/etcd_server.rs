//! Starts a real `etcd` (Debian package `etcd-server`) for tests: on free loopback ports, with a
//! temporary data directory, stopped (killed and reaped) when dropped.
//!
//! The binary is `$TIDELOCK_ETCD` if set, else `etcd` on `PATH`. A missing binary is an error that
//! says how to install it; it never silently skips the tests that need it.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::etcd::{EtcdConfig, EtcdStore};

/// How long etcd gets to come up.
const START_DEADLINE: Duration = Duration::from_secs(30);
const START_ATTEMPTS: usize = 3;

/// A running etcd server owned by a test.
#[derive(Debug)]
pub struct EtcdServer {
    binary: PathBuf,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

impl EtcdServer {
    /// Finds the etcd binary.
    pub fn binary() -> std::io::Result<PathBuf> {
        if let Some(path) = std::env::var_os("TIDELOCK_ETCD") {
            return Ok(PathBuf::from(path));
        }
        let found = std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("etcd"))
                .find(|candidate| candidate.is_file())
        });
        found.ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "etcd not found on PATH (set TIDELOCK_ETCD, or install it: \
                 `apt-get install etcd-server`; ./scripts/test does this for you)",
            )
        })
    }

    /// Starts a fresh etcd and waits until it answers.
    pub async fn start() -> std::io::Result<Self> {
        let binary = Self::binary()?;
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            let mut server = EtcdServer {
                binary: binary.clone(),
                dir: tempfile::Builder::new()
                    .prefix("tidelock-etcd-")
                    .tempdir()?,
                client_port: free_port()?,
                peer_port: free_port()?,
                child: None,
            };
            // Another process can take a "free" port before etcd binds it: retry on new ports.
            match server.launch().await {
                Ok(()) => return Ok(server),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| std::io::Error::other("etcd did not start")))
    }

    /// The client URL, e.g. `http://127.0.0.1:43127`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// A config for connecting to this server, with short timeouts suited to tests.
    pub fn config(&self) -> EtcdConfig {
        let mut config = EtcdConfig::new([self.endpoint()]);
        config.connect_timeout = Duration::from_secs(5);
        config.request_timeout = Duration::from_secs(5);
        config
    }

    /// Stops the server and starts it again on the same port and data: clients lose their
    /// connections, the data survives.
    pub async fn restart(&mut self) -> std::io::Result<()> {
        self.stop();
        self.launch().await
    }

    /// Kills the server (data kept until the value is dropped).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    async fn launch(&mut self) -> std::io::Result<()> {
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let child = Command::new(&self.binary)
            .arg("--name=tidelock-test")
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=tidelock-test={peer}"))
            .arg("--logger=zap")
            .arg("--log-level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("cannot run {}: {e}", self.binary.display()),
                )
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(std::io::Error::other(format!(
                    "etcd exited during start ({status}); log:\n{}",
                    tail(&self.log_path())
                )));
            }
            let mut config = self.config();
            config.connect_timeout = Duration::from_millis(500);
            if EtcdStore::connect(config).await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(std::io::Error::other(format!(
                    "etcd did not answer on {client} within {START_DEADLINE:?}; log:\n{}",
                    tail(&self.log_path())
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

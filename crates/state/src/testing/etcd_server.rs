//! Starts a real `etcd` (Debian package `etcd-server`) for tests: on free loopback ports, with a
//! temporary data directory, stopped (killed and reaped) when dropped. [`EtcdServer::start_tls`]
//! serves clients and peers over https only and requires a client certificate signed by the
//! test's CA (`--client-cert-auth`, `--peer-client-cert-auth`), as the chart's etcd does.
//!
//! The binary is `$TIDELOCK_ETCD` if set, else `etcd` on `PATH`. A missing binary is an error that
//! says how to install it; it never silently skips the tests that need it.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::pki::TestPki;
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
    /// Serving over TLS with client authentication, with these certificates.
    pki: Option<TestPki>,
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
        Self::start_with(None).await
    }

    /// Starts a fresh etcd that serves clients over https with `pki`'s server certificate and
    /// accepts only clients with a certificate signed by `pki`'s CA (`--cert-file`,
    /// `--key-file`, `--trusted-ca-file`, `--client-cert-auth`); waits until it answers.
    pub async fn start_tls(pki: TestPki) -> std::io::Result<Self> {
        Self::start_with(Some(pki)).await
    }

    async fn start_with(mut pki: Option<TestPki>) -> std::io::Result<Self> {
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
                pki: pki.take(),
                child: None,
            };
            // Another process can take a "free" port before etcd binds it: retry on new ports.
            match server.launch().await {
                Ok(()) => return Ok(server),
                Err(e) => {
                    last_error = Some(e);
                    pki = server.pki.take();
                }
            }
        }
        Err(last_error.unwrap_or_else(|| std::io::Error::other("etcd did not start")))
    }

    /// The client URL, e.g. `http://127.0.0.1:43127` (`https://` with TLS).
    pub fn endpoint(&self) -> String {
        let scheme = if self.pki.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// The certificates of a TLS server.
    pub fn pki(&self) -> Option<&TestPki> {
        self.pki.as_ref()
    }

    /// A config for connecting to this server, with short timeouts suited to tests (and, with
    /// TLS, the CA and the client certificate).
    pub fn config(&self) -> EtcdConfig {
        let mut config =
            EtcdConfig::new([self.endpoint()]).with_tls(self.pki.as_ref().map(TestPki::client_tls));
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

    /// Freezes the server (SIGSTOP) without closing anything: its connections stay open and
    /// every request waits, as with an etcd stuck on a slow disk or a paused VM.
    pub fn pause(&self) -> std::io::Result<()> {
        self.signal("-STOP")
    }

    /// Thaws a [`EtcdServer::pause`]d server (SIGCONT).
    pub fn resume(&self) -> std::io::Result<()> {
        self.signal("-CONT")
    }

    fn signal(&self, signal: &str) -> std::io::Result<()> {
        let child = self
            .child
            .as_ref()
            .ok_or_else(|| std::io::Error::other("etcd is not running"))?;
        let status = std::process::Command::new("kill")
            .arg(signal)
            .arg(child.id().to_string())
            .status()?;
        if status.success() {
            Ok(())
        } else {
            Err(std::io::Error::other(format!("kill {signal}: {status}")))
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    async fn launch(&mut self) -> std::io::Result<()> {
        let client = self.endpoint();
        let scheme = if self.pki.is_some() { "https" } else { "http" };
        let peer = format!("{scheme}://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let mut command = Command::new(&self.binary);
        if let Some(pki) = &self.pki {
            command
                .arg(format!("--cert-file={}", pki.server_cert.display()))
                .arg(format!("--key-file={}", pki.server_key.display()))
                .arg(format!("--trusted-ca-file={}", pki.ca_cert.display()))
                .arg("--client-cert-auth")
                // Peers as the chart's etcd: the same certificate, TLS both ways.
                .arg(format!("--peer-cert-file={}", pki.server_cert.display()))
                .arg(format!("--peer-key-file={}", pki.server_key.display()))
                .arg(format!("--peer-trusted-ca-file={}", pki.ca_cert.display()))
                .arg("--peer-client-cert-auth");
        }
        let child = command
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

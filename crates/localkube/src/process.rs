//! Child processes that cannot outlive us. Each is started through util-linux's `setpriv
//! --pdeathsig KILL` where it exists (it does on every Debian and Ubuntu), so the kernel kills it
//! when the thread that started it ends, even if this process is killed with SIGKILL or exits
//! without running destructors (a test binary's statics never drop). Each is in a process group
//! of its own, so a terminal's Ctrl-C reaches only us. A clean stop is SIGTERM, a grace period,
//! then SIGKILL. Output goes to a log file whose tail is quoted in errors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::Error;

const SETPRIV: &str = "/usr/bin/setpriv";

/// What to start.
#[derive(Debug, Clone, Default)]
pub struct Spec {
    /// A name for messages and the log file (`<name>.log`).
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    /// The whole environment when `clear_env`; else added to ours.
    pub env: BTreeMap<String, String>,
    pub clear_env: bool,
    pub cwd: Option<PathBuf>,
}

/// A running child.
#[derive(Debug)]
pub struct Process {
    pub name: String,
    pub log: PathBuf,
    child: Child,
}

impl Process {
    /// Starts `spec`, its output appended to `logs/<name>.log`.
    pub fn spawn(spec: &Spec, logs: &Path) -> Result<Process, Error> {
        std::fs::create_dir_all(logs).map_err(|e| Error::io(logs, e))?;
        let log = logs.join(format!("{}.log", spec.name));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| Error::io(&log, e))?;
        let err = file.try_clone().map_err(|e| Error::io(&log, e))?;
        let mut command = if Path::new(SETPRIV).is_file() {
            let mut c = Command::new(SETPRIV);
            c.args(["--pdeathsig", "KILL", "--"]).arg(&spec.program);
            c
        } else {
            Command::new(&spec.program)
        };
        command
            .args(&spec.args)
            // A group of its own: a terminal's Ctrl-C reaches only us, and we stop our children
            // in order (a kubelet must not see its pods die and restart them mid-shutdown).
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .kill_on_drop(true);
        if spec.clear_env {
            command.env_clear();
        }
        command.envs(&spec.env);
        if let Some(cwd) = &spec.cwd {
            command.current_dir(cwd);
        }
        let child = command.spawn().map_err(|e| Error::Spawn {
            program: spec.program.clone(),
            source: e,
        })?;
        Ok(Process {
            name: spec.name.clone(),
            log,
            child,
        })
    }

    pub fn id(&self) -> Option<u32> {
        self.child.id()
    }

    /// The exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for the exit.
    pub async fn wait(&mut self) -> Option<ExitStatus> {
        self.child.wait().await.ok()
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    /// SIGKILL, now.
    pub fn kill_now(&mut self) {
        let _ = self.child.start_kill();
    }

    /// SIGTERM, up to `grace` for the exit, then SIGKILL.
    pub async fn stop(&mut self, grace: Duration) {
        if self.exited().is_some() {
            return;
        }
        if let Some(pid) = self.child.id().and_then(|p| i32::try_from(p).ok()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
    }
}

/// The last `lines` lines of a log file (empty if it cannot be read).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A free TCP port on loopback (bound, then released for a child to take).
pub fn free_port() -> Result<u16, Error> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::io(Path::new("127.0.0.1:0"), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_process_logs_and_stops_on_sigterm() {
        let dir = tempfile::tempdir().unwrap();
        let spec = Spec {
            name: "sleeper".into(),
            program: "/bin/sh".into(),
            args: vec!["-c".into(), "echo started $GREETING; exec sleep 30".into()],
            env: BTreeMap::from([("GREETING".to_owned(), "hello".to_owned())]),
            ..Spec::default()
        };
        let mut p = Process::spawn(&spec, dir.path()).unwrap();
        for _ in 0..100 {
            if p.log_tail(1).contains("started") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(p.log_tail(5), "started hello");
        assert!(p.exited().is_none());
        p.stop(Duration::from_secs(5)).await;
        let status = p.exited().expect("stopped");
        assert!(!status.success(), "killed by SIGTERM: {status:?}");
    }

    #[tokio::test]
    async fn a_missing_program_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let spec = Spec {
            name: "nothing".into(),
            program: "/no/such/program".into(),
            clear_env: true,
            ..Spec::default()
        };
        // Through setpriv the spawn succeeds and the child exits at once (setpriv cannot exec).
        match Process::spawn(&spec, dir.path()) {
            Err(e) => assert!(e.to_string().contains("/no/such/program"), "{e}"),
            Ok(mut p) => {
                let status = p.wait().await.unwrap();
                assert!(!status.success());
                assert!(
                    p.log_tail(5).contains("/no/such/program"),
                    "{}",
                    p.log_tail(5)
                );
            }
        }
    }
}

//! A real Kubernetes control plane on this machine, for Tidelock's tests and for trying the
//! Kubernetes path by hand (`./scripts/kube`, `tidelock kube up`).
//!
//! Users meet Tidelock through `helm install` and `kubectl apply`; a mocked API server cannot
//! show that those work (no schema, CEL, RBAC, admission, garbage collector or StatefulSet
//! controller). So this crate runs the real programs, pinned and built from Go modules
//! (`tools/k8s`): etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok, whose
//! fake nodes stand in for CPU and GPU machines. What cannot run here, a container runtime and
//! a real kubelet, is replaced by [`kubelet`], which runs the pods of Tidelock's own binaries
//! as local processes under their pods' service-account identities.
//!
//! | Module | What it does |
//! |---|---|
//! | [`tools`] | Where the built programs are, and their pinned versions (from `go.mod`). |
//! | [`pki`] | A fresh CA, serving certificate, service-account key and tokens per start. |
//! | [`process`] | Child processes that die with the thread that started them. |
//! | [`control_plane`] | Starts and stops the control plane; kubeconfigs; the audit log. |
//! | [`nodes`] | The fake CPU and GPU nodes. |
//! | [`kubelet`] | The stand-in kubelet for Tidelock's pods. |
//! | [`shared`] | One control plane per test process, or a clear skip. |

pub mod control_plane;
pub mod kubelet;
pub mod nodes;
pub mod pki;
pub mod process;
pub mod shared;
pub mod tools;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use control_plane::{ControlPlane, Options};
pub use kubelet::Kubelet;
pub use nodes::FakeNode;
pub use tools::Tools;

/// Why the control plane could not start or be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "{} is missing: the local Kubernetes control plane is not built (./scripts/test or ./scripts/kube build it into the cache, with Go 1.26; TIDELOCK_K8S_BIN names another folder)",
        path.display()
    )]
    ToolsMissing { path: PathBuf },
    #[error(
        "{} is missing: build it (`cargo build --release -p tidelock-operator -p tidelock-router -p tidelock-worker`; ./scripts/kube does)",
        path.display()
    )]
    ProgramMissing { path: PathBuf },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start {}: {source}", program.display())]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{name} exited ({status}); the end of its log:\n{log}")]
    Exited {
        name: String,
        status: String,
        log: String,
    },
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: String, after: Duration },
    #[error("certificates: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    #[error(transparent)]
    Kube(kube::Error),
}

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Error {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// A plain HTTP/1.1 GET on loopback with a 5 s limit: `(status, body)`, or `None` when nothing
/// answers.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    http_get_within(port, path, Duration::from_secs(5)).await
}

/// [`http_get`] with a limit of one's own.
pub async fn http_get_within(port: u16, path: &str, limit: Duration) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let response = String::from_utf8_lossy(&response);
        let status = response.split_whitespace().nth(1)?.parse().ok()?;
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Some((status, body))
    };
    tokio::time::timeout(limit, exchange).await.ok().flatten()
}

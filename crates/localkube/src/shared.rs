//! One control plane per test process, started on first use and shared by its tests (each in a
//! namespace of its own): starting one costs seconds, and tests run in parallel.
//!
//! It lives on a thread of its own with its own runtime, because each `#[tokio::test]` has a
//! runtime that ends with the test. Its processes die when the test process exits, however it
//! exits (`process`), and a later start removes the folders earlier runs left.
//!
//! Where the programs are not built, [`shared`] says so and returns `None` (the test skips);
//! with `TIDELOCK_REQUIRE_CLUSTER=1` (`./scripts/test` sets it under CI) it panics instead, so nothing is skipped
//! silently.

use std::path::PathBuf;
use std::sync::OnceLock;

use kube::Client;

use crate::{ControlPlane, Error, Options, Tools};

/// What tests need of the shared control plane.
#[derive(Debug, Clone)]
pub struct Shared {
    /// The admin kubeconfig.
    pub kubeconfig: PathBuf,
}

impl Shared {
    /// A client as the admin, on the caller's runtime.
    pub async fn client(&self) -> Client {
        crate::control_plane::client_for(&self.kubeconfig)
            .await
            .expect("a client for the shared control plane")
    }
}

static SHARED: OnceLock<Result<Shared, Unavailable>> = OnceLock::new();

/// Why there is no shared control plane; each test that asks is told the same.
#[derive(Debug, thiserror::Error)]
enum Unavailable {
    /// Its programs are not built: the tests skip (or fail, when required).
    #[error(transparent)]
    NotBuilt(Error),
    /// They are built but it did not start: the tests fail, always.
    #[error("the local control plane did not start: {0}")]
    DidNotStart(#[source] Error),
}

/// Whether a missing control plane fails the test (`TIDELOCK_REQUIRE_CLUSTER=1`).
pub fn required() -> bool {
    std::env::var("TIDELOCK_REQUIRE_CLUSTER").as_deref() == Ok("1")
}

/// The programs, or `None` after saying why the test is skipped (a panic when required).
pub fn tools_or_skip() -> Option<Tools> {
    match Tools::locate() {
        Ok(tools) => Some(tools),
        Err(e) => {
            assert!(!required(), "TIDELOCK_REQUIRE_CLUSTER=1: {e}");
            eprintln!("skipped: {e}");
            None
        }
    }
}

/// The shared control plane, started on first use; `None` when its programs are not built.
/// Panics when it cannot start (with the failing component's log).
pub fn shared() -> Option<&'static Shared> {
    let result = SHARED.get_or_init(|| {
        let tools = Tools::locate().map_err(Unavailable::NotBuilt)?;
        start_on_own_thread(tools).map_err(Unavailable::DidNotStart)
    });
    match result {
        Ok(shared) => Some(shared),
        Err(e @ Unavailable::DidNotStart(_)) => panic!("{e}"),
        Err(e @ Unavailable::NotBuilt(_)) => {
            assert!(!required(), "TIDELOCK_REQUIRE_CLUSTER=1: {e}");
            eprintln!("skipped: {e}");
            None
        }
    }
}

fn start_on_own_thread(tools: Tools) -> Result<Shared, Error> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("localkube".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.send(Err(Error::io(std::path::Path::new("tokio runtime"), e)));
                    return;
                }
            };
            runtime.block_on(async move {
                match ControlPlane::start(tools, Options::default()).await {
                    Ok(cp) => {
                        let shared = Shared {
                            kubeconfig: cp.kubeconfig(),
                        };
                        let _ = tx.send(Ok(shared));
                        // Hold the processes until the test process exits.
                        std::future::pending::<()>().await;
                        drop(cp);
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            });
        })
        .map_err(|e| Error::io(std::path::Path::new("thread localkube"), e))?;
    rx.recv()
        .unwrap_or_else(|_| Err(Error::Kubeconfig("the control plane thread ended".into())))
}

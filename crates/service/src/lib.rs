//! What every Tidelock server binary (`tidelock-router`, `tidelock-worker`, `tidelock-operator`)
//! does the same way, so it is written once: logging from `RUST_LOG` (default `info`; text,
//! coloured only on a terminal, or JSON lines with `--log-format json`, [`LogArgs`]), a
//! multi-threaded runtime, `name: error` and exit status 1 when the server fails, the signal
//! that starts a graceful shutdown, the cluster credential of the internal APIs
//! ([`cluster_auth`]), the listener that serves only `/metrics` ([`metrics_listener`]) and the
//! public listener with client timeouts and a connection limit ([`serve`]).

pub mod cluster_auth;
pub mod metrics_listener;
pub mod serve;

use std::io::IsTerminal;
use std::process::ExitCode;

/// How a server writes its log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One line of text per event; colour codes only when standard output is a terminal (a
    /// log file or a collector reading a pod's output gets plain text).
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `fields`, `target`, `span`), for log
    /// collectors.
    Json,
}

/// The logging options every server binary takes.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// `text` or `json` (one object per line). What is logged is set by `RUST_LOG` (default
    /// `info`).
    #[arg(long, env = "TIDELOCK_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// Runs `serve` to completion on a new multi-threaded runtime (`worker_threads` of them, or one
/// per core), after setting up logging as `log` says. A failure is printed as `name: error:
/// cause: ...` and exits 1.
pub fn run<F>(name: &str, worker_threads: Option<usize>, log: &LogArgs, serve: F) -> ExitCode
where
    F: Future<Output = anyhow::Result<()>>,
{
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    match log.log_format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::stdout().is_terminal())
            .init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .json()
            .init(),
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = worker_threads {
        builder.worker_threads(n);
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        let _ = ctrl_c.await;
        return;
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}

//! What every Tidelock server binary (`tidelock-router`, `tidelock-worker`, `tidelock-operator`)
//! does the same way, so it is written once: logging from `RUST_LOG` (default `info`; text,
//! coloured only on a terminal, or JSON lines with `--log-format json`, [`LogArgs`]), optional
//! export of the `tracing` spans to an OpenTelemetry collector ([`telemetry`]), a
//! multi-threaded runtime, `name: error` and exit status 1 when the server fails, the signal
//! that starts a graceful shutdown, the cluster credential of the internal APIs
//! ([`cluster_auth`]), the listener that serves only `/metrics` ([`metrics_listener`]) and the
//! public listener with client timeouts and a connection limit ([`serve`]).
//!
//! Tracing: `--otlp-endpoint http://otel-collector:4317` (or `TIDELOCK_OTLP_ENDPOINT`, or the
//! standard `OTEL_EXPORTER_OTLP_ENDPOINT`) sends every span `RUST_LOG` lets through over OTLP/gRPC,
//! with `service.name` the binary's name; sampling by the standard `OTEL_TRACES_SAMPLER` and
//! `OTEL_TRACES_SAMPLER_ARG`. A malformed endpoint stops the start (exit 1); a collector that
//! is down only costs spans (export errors are logged). The operator hands its own
//! [`LogArgs`] to the workers it creates ([`LogArgs::env`]).

pub mod cluster_auth;
pub mod metrics_listener;
pub mod serve;
pub mod telemetry;

use std::process::ExitCode;

/// The variable of `--log-format`.
pub const LOG_FORMAT_ENV: &str = "TIDELOCK_LOG_FORMAT";
/// The variable of `--otlp-endpoint`.
pub const OTLP_ENDPOINT_ENV: &str = "TIDELOCK_OTLP_ENDPOINT";

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

impl LogFormat {
    /// The value `--log-format` takes for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Json => "json",
        }
    }
}

/// The logging and tracing options every server binary takes.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct LogArgs {
    /// `text` or `json` (one object per line). What is logged is set by `RUST_LOG` (default
    /// `info`).
    #[arg(long, env = LOG_FORMAT_ENV, value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// OpenTelemetry collector to export the spans to, over OTLP/gRPC without TLS
    /// (`http://otel-collector:4317`). Default: `OTEL_EXPORTER_OTLP_ENDPOINT`, else no export.
    #[arg(long, env = OTLP_ENDPOINT_ENV, value_name = "URL")]
    pub otlp_endpoint: Option<String>,

    /// The standard variable, for `--otlp-endpoint` when that is not given.
    #[arg(
        long = "otel-exporter-otlp-endpoint",
        env = "OTEL_EXPORTER_OTLP_ENDPOINT",
        value_name = "URL",
        hide = true
    )]
    pub otel_exporter_otlp_endpoint: Option<String>,
}

impl LogArgs {
    /// Where spans go: `--otlp-endpoint`, else `OTEL_EXPORTER_OTLP_ENDPOINT`; None: nowhere.
    pub fn otlp_endpoint(&self) -> Option<&str> {
        self.otlp_endpoint
            .as_deref()
            .or(self.otel_exporter_otlp_endpoint.as_deref())
            .filter(|e| !e.is_empty())
    }

    /// The environment that gives another server binary these same options (the operator's
    /// workers): the log format always, the OTLP endpoint when there is one.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let mut vars = vec![(LOG_FORMAT_ENV, self.log_format.as_str().to_owned())];
        if let Some(endpoint) = self.otlp_endpoint() {
            vars.push((OTLP_ENDPOINT_ENV, endpoint.to_owned()));
        }
        vars
    }
}

/// Runs `serve` to completion on a new multi-threaded runtime (`worker_threads` of them, or one
/// per core), after setting up logging and the span export as `log` says ([`telemetry::init`]);
/// the last spans are flushed when `serve` returns. A failure, of the setup or of `serve`, is
/// printed as `name: error: cause: ...` and exits 1.
pub fn run<F>(name: &str, worker_threads: Option<usize>, log: &LogArgs, serve: F) -> ExitCode
where
    F: Future<Output = anyhow::Result<()>>,
{
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
    // The exporter's gRPC channel is a task of this runtime.
    let export = {
        let _runtime = runtime.enter();
        match telemetry::init(name, log) {
            Ok(export) => export,
            Err(e) => {
                eprintln!("{name}: {:#}", anyhow::Error::from(e));
                return ExitCode::FAILURE;
            }
        }
    };
    let outcome = runtime.block_on(serve);
    if let Some(export) = export
        && let Err(e) = export.shutdown()
    {
        tracing::warn!(
            error = format!("{:#}", anyhow::Error::from(e)),
            "spans may be lost"
        );
    }
    match outcome {
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{LOG_FORMAT_ENV, LogArgs, LogFormat, OTLP_ENDPOINT_ENV};

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        log: LogArgs,
    }

    fn parse(args: &[&str]) -> LogArgs {
        Cli::try_parse_from(std::iter::once("server").chain(args.iter().copied()))
            .unwrap()
            .log
    }

    #[test]
    fn the_otlp_endpoint_falls_back_to_the_standard_variable() {
        assert_eq!(parse(&[]).otlp_endpoint(), None);
        let standard = ["--otel-exporter-otlp-endpoint", "http://standard:4317"];
        assert_eq!(
            parse(&standard).otlp_endpoint(),
            Some("http://standard:4317")
        );
        let both = [&standard[..], &["--otlp-endpoint", "http://ours:4317"]].concat();
        assert_eq!(parse(&both).otlp_endpoint(), Some("http://ours:4317"));
        // An empty value (a chart's default) is no endpoint.
        assert_eq!(parse(&["--otlp-endpoint", ""]).otlp_endpoint(), None);
    }

    #[test]
    fn the_environment_of_a_child_repeats_the_options() {
        let log = parse(&["--log-format", "json"]);
        assert_eq!(log.log_format, LogFormat::Json);
        assert_eq!(log.env(), [(LOG_FORMAT_ENV, "json".to_owned())]);
        let log = parse(&["--otel-exporter-otlp-endpoint", "http://c:4317"]);
        assert_eq!(
            log.env(),
            [
                (LOG_FORMAT_ENV, "text".to_owned()),
                (OTLP_ENDPOINT_ENV, "http://c:4317".to_owned())
            ]
        );
    }
}

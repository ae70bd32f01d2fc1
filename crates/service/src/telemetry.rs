//! The log and the span export of every server binary, installed once by [`init`]: log lines
//! (text or JSON, filtered by `RUST_LOG`) and, with `--otlp-endpoint` ([`LogArgs`]), the same
//! `tracing` spans (each request's in the router, each reconcile's in the operator) sent to an
//! OpenTelemetry collector over OTLP/gRPC, so one request can be followed across processes in
//! a trace viewer. The export is off unless an endpoint is given.
//!
//! Invariants:
//! - **The export never stops a server.** The endpoint is checked once, at start: a malformed
//!   one is an error and the process exits 1 before serving. After that a collector that is
//!   down or slow only costs spans: they wait in a bounded queue (2,048) of the SDK's batch
//!   processor, which exports from a thread of its own and drops what overflows, and a failed
//!   export is an `error` event of target `opentelemetry_sdk` in the log.
//! - **The last spans are sent.** [`Export::shutdown`] flushes the queue when the server returns,
//!   waiting [`SHUTDOWN_WAIT`] at most.
//! - **The gRPC channel lives on the tokio runtime**: [`init`] must run inside it (an async
//!   context or `Runtime::enter`), and [`Export::shutdown`] before the runtime is dropped, from
//!   a thread that is not one of its workers (the batch thread waits on the channel's task).
//! - **No feedback**: spans of the transport crates the export itself runs on (`tonic`, `h2`,
//!   `hyper`, `tower`, `opentelemetry*`) are never exported.
//!
//! The resource's `service.name` is the binary's name. Plaintext gRPC only (`http://`): TLS to
//! a collector goes through a node agent or sidecar. The SDK's standard variables still apply:
//! `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` (sampling; by default every span at the
//! level `RUST_LOG` lets through), `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT`,
//! `OTEL_RESOURCE_ATTRIBUTES`.

use std::io::IsTerminal;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::{LogArgs, LogFormat};

/// How long [`Export::shutdown`] waits for the last spans to reach the collector.
pub const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// Targets whose spans are never exported: the crates the export runs on.
const TRANSPORT_TARGETS: [&str; 5] = ["tonic", "h2", "hyper", "tower", "opentelemetry"];

/// Why logging or the span export could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The endpoint is not a plaintext gRPC URL.
    #[error("--otlp-endpoint `{endpoint}`: {reason}")]
    Endpoint {
        endpoint: String,
        reason: &'static str,
    },
    /// The endpoint does not parse as a URL.
    #[error("--otlp-endpoint `{endpoint}` is not a URL")]
    NotUrl {
        endpoint: String,
        #[source]
        source: hyper::http::uri::InvalidUri,
    },
    /// The OTLP exporter refused its configuration (an `OTEL_EXPORTER_OTLP_*` variable, say).
    #[error("the OTLP exporter for `{endpoint}`")]
    Exporter {
        endpoint: String,
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
    /// A global subscriber was installed already.
    #[error("logging is set up already")]
    AlreadyInitialised(#[source] tracing_subscriber::util::TryInitError),
    /// The last spans could not be flushed.
    #[error("flushing the last spans to the collector")]
    Shutdown(#[source] opentelemetry_sdk::error::OTelSdkError),
}

/// A running span export: hand it to [`Export::shutdown`] when the server returns.
#[derive(Debug)]
pub struct Export {
    provider: SdkTracerProvider,
}

impl Export {
    /// An exporter and batch processor sending to `endpoint` (checked here), spans tagged
    /// `service.name` = `service`. Must run inside a tokio runtime.
    pub fn start(endpoint: &str, service: &str) -> Result<Self, TelemetryError> {
        check_endpoint(endpoint)?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|source| TelemetryError::Exporter {
                endpoint: endpoint.to_owned(),
                source,
            })?;
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(service.to_owned())
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        Ok(Self { provider })
    }

    /// The layer that turns `tracing` spans into exported ones (the transport's own excepted).
    pub fn layer<S>(&self) -> impl tracing_subscriber::Layer<S> + use<S>
    where
        S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
    {
        let tracer = self.provider.tracer(env!("CARGO_PKG_NAME"));
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
                !TRANSPORT_TARGETS
                    .iter()
                    .any(|t| meta.target().starts_with(t))
            }))
    }

    /// Sends what is queued and stops the export, waiting [`SHUTDOWN_WAIT`] at most. Blocks:
    /// call it outside the runtime's workers (after `block_on`, or in `spawn_blocking`).
    pub fn shutdown(self) -> Result<(), TelemetryError> {
        self.provider
            .shutdown_with_timeout(SHUTDOWN_WAIT)
            .map_err(TelemetryError::Shutdown)
    }
}

/// A plaintext gRPC URL with a host: `http://collector:4317`.
fn check_endpoint(endpoint: &str) -> Result<(), TelemetryError> {
    let uri: hyper::Uri = endpoint.parse().map_err(|source| TelemetryError::NotUrl {
        endpoint: endpoint.to_owned(),
        source,
    })?;
    let reason = match uri.scheme_str() {
        Some("http") if uri.host().is_some_and(|h| !h.is_empty()) => return Ok(()),
        Some("http") => "no host",
        Some("https") => "TLS is not supported: use http:// (a collector agent on the node)",
        _ => "must be http://host:port (OTLP over gRPC, port 4317 by convention)",
    };
    Err(TelemetryError::Endpoint {
        endpoint: endpoint.to_owned(),
        reason,
    })
}

/// Installs the global subscriber as `log` says: log lines filtered by `RUST_LOG` (default
/// `info`), and with an OTLP endpoint the same spans exported, as `service`. Must run inside a
/// tokio runtime when there is an endpoint; the [`Export`] returned is to be shut down when the
/// server returns.
pub fn init(service: &str, log: &LogArgs) -> Result<Option<Export>, TelemetryError> {
    let export = log
        .otlp_endpoint()
        .map(|endpoint| Export::start(endpoint, service))
        .transpose()?;
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let (text, json) = match log.log_format {
        LogFormat::Text => (
            Some(tracing_subscriber::fmt::layer().with_ansi(std::io::stdout().is_terminal())),
            None,
        ),
        LogFormat::Json => (None, Some(tracing_subscriber::fmt::layer().json())),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .with(export.as_ref().map(Export::layer))
        .try_init()
        .map_err(TelemetryError::AlreadyInitialised)?;
    Ok(export)
}

#[cfg(test)]
mod tests {
    use super::{TelemetryError, check_endpoint};

    #[test]
    fn endpoints_are_plaintext_grpc_urls() {
        for good in ["http://otel-collector:4317", "http://127.0.0.1:4317/"] {
            check_endpoint(good).unwrap();
        }
        for bad in [
            "otel-collector:4317",
            "https://otel-collector:4317",
            "grpc://otel-collector:4317",
        ] {
            let error = check_endpoint(bad).unwrap_err();
            assert!(
                matches!(error, TelemetryError::Endpoint { .. }),
                "{bad}: {error}"
            );
            assert!(error.to_string().starts_with("--otlp-endpoint"), "{error}");
        }
        let error = check_endpoint("http://a b").unwrap_err();
        assert!(matches!(error, TelemetryError::NotUrl { .. }), "{error}");
    }
}

//! The span export end to end: an OTLP/gRPC collector in this process, on a loopback port,
//! receives what [`telemetry::init`] sets up for `--otlp-endpoint` (as `run` does), with the
//! span's name, its fields as attributes and `service.name` in the resource. Its own test
//! binary: `init` installs the global subscriber.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use tidelock_service::LogArgs;
use tidelock_service::telemetry::{self, Export, TelemetryError};
use tracing_subscriber::layer::SubscriberExt as _;

/// Keeps every export request it is sent.
#[derive(Debug, Clone, Default)]
struct Collector {
    received: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.received.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// A collector serving on a free loopback port.
async fn collector() -> (Collector, SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let collector = Collector::default();
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(collector.clone()))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    tokio::spawn(server);
    (collector, addr)
}

fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_the_collector_with_fields_and_service_name() {
    let (collector, addr) = collector().await;
    let log = LogArgs {
        otlp_endpoint: Some(format!("http://{addr}")),
        ..LogArgs::default()
    };
    let export = telemetry::init("tidelock-otlp-test", &log)
        .unwrap()
        .expect("an endpoint turns the export on");
    {
        let span = tracing::info_span!("chat_completion", model = "smol", prompt_tokens = 7i64);
        let _entered = span.enter();
        tracing::info!("inside the span");
    }
    // Shutting down flushes: the collector has everything once it returns.
    tokio::task::spawn_blocking(move || export.shutdown())
        .await
        .unwrap()
        .unwrap();

    let received = collector.received.lock().unwrap();
    let (resource, span) = received
        .iter()
        .flat_map(|request| &request.resource_spans)
        .flat_map(|rs| {
            rs.scope_spans
                .iter()
                .flat_map(|ss| &ss.spans)
                .map(move |span| (rs.resource.as_ref(), span))
        })
        .find(|(_, span)| span.name == "chat_completion")
        .unwrap_or_else(|| panic!("no chat_completion span in {received:?}"));
    assert_eq!(
        attribute(&span.attributes, "model"),
        Some(&Value::StringValue("smol".into()))
    );
    assert_eq!(
        attribute(&span.attributes, "prompt_tokens"),
        Some(&Value::IntValue(7))
    );
    let resource = resource.expect("a resource");
    assert_eq!(
        attribute(&resource.attributes, "service.name"),
        Some(&Value::StringValue("tidelock-otlp-test".into()))
    );
}

#[tokio::test]
async fn a_malformed_endpoint_is_an_error() {
    for endpoint in [
        "otel-collector:4317",
        "https://otel-collector:4317",
        "http://a b",
    ] {
        let log = LogArgs {
            otlp_endpoint: Some(endpoint.into()),
            ..LogArgs::default()
        };
        let error = telemetry::init("tidelock-otlp-test", &log).unwrap_err();
        assert!(
            matches!(
                error,
                TelemetryError::Endpoint { .. } | TelemetryError::NotUrl { .. }
            ),
            "{endpoint}: {error:?}"
        );
        assert!(
            error.to_string().contains(endpoint),
            "the message names the endpoint: {error}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_costs_only_spans() {
    // A port that was free a moment ago: connections are refused.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let export = Export::start(&format!("http://{closed}"), "tidelock-otlp-test").unwrap();
    let subscriber = tracing_subscriber::registry().with(export.layer());
    tracing::subscriber::with_default(subscriber, || {
        let _entered = tracing::info_span!("lost", n = 1u64).entered();
    });
    let started = Instant::now();
    // The export fails (logged), the shutdown still returns, in bounded time.
    let _ = tokio::task::spawn_blocking(move || export.shutdown())
        .await
        .unwrap();
    assert!(
        started.elapsed() < telemetry::SHUTDOWN_WAIT + Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

//! The operator's HTTP endpoints: `/healthz` always answers, `/readyz` only once the API server
//! and etcd were reached, `/metrics` is the Prometheus text format with the reconcile metrics
//! (named as promtool requires: counters end in `_total`, durations are in seconds).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::body::Body;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use tidelock_operator::metrics::Metrics;
use tidelock_operator::run::{Health, http};
use tower::ServiceExt;

async fn get(health: &Health, path: &str) -> (StatusCode, String, Option<String>) {
    let response = http(health.clone())
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        String::from_utf8(body.to_vec()).unwrap(),
        content_type,
    )
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let health = Health {
        metrics: Metrics::new(),
        ready: Arc::new(AtomicBool::new(false)),
    };
    assert_eq!(get(&health, "/healthz").await.0, StatusCode::OK);
    assert_eq!(
        get(&health, "/readyz").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    health.ready.store(true, Ordering::Release);
    assert_eq!(get(&health, "/readyz").await.0, StatusCode::OK);

    health
        .metrics
        .reconciled("model", Duration::from_millis(12), None);
    health
        .metrics
        .reconciled("tenant", Duration::from_millis(3), Some("SecretMissing"));
    health.metrics.leader.set(1);
    let (status, text, content_type) = get(&health, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type.as_deref(), Some("text/plain; version=0.0.4"));
    if std::env::var_os("TIDELOCK_PRINT_METRICS").is_some() {
        print!("{text}");
    }
    for line in [
        r#"tidelock_operator_reconciliations_total{controller="model",result="success"} 1"#,
        r#"tidelock_operator_reconciliations_total{controller="tenant",result="error"} 1"#,
        r#"tidelock_operator_reconcile_errors_total{controller="tenant",reason="SecretMissing"} 1"#,
        r#"tidelock_operator_reconcile_duration_seconds_count{controller="model"} 1"#,
        "tidelock_operator_leader 1",
    ] {
        assert!(text.contains(line), "{line} missing from:\n{text}");
    }
    // promtool's naming rules: every family has HELP and TYPE, counters end in _total.
    for family in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let (name, kind) = family.split_once(' ').unwrap();
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "{name} has no HELP"
        );
        assert_eq!(
            kind == "counter",
            name.ends_with("_total"),
            "{name} is a {kind}"
        );
        assert!(name.starts_with("tidelock_operator_"), "{name}");
    }
}

//! The cluster credential on the servers' side: the command-line options that load it
//! ([`ClusterAuthArgs`], the same in the router and the worker) and the middleware that requires
//! it on every route except `/healthz` and `/readyz` ([`ClusterGuard`]).
//!
//! Secure by default: a worker (or a router, which must present it) refuses to start without a
//! token unless `--no-cluster-auth` says, explicitly, that the internal API is open to whoever
//! reaches it (benchmarks against other routers, which cannot send it). A refused request gets
//! a 401 in OpenAI's error shape and is counted by reason (`missing`, `invalid`) in
//! `tidelock_internal_unauthorized_requests_total`; the label never holds anything the caller
//! chose, so a scanner cannot grow the metric.

use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus::{IntCounterVec, Opts, Registry};
use tidelock_protocol::{ClusterToken, ClusterTokenError};

/// Where the cluster credential comes from.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClusterAuthArgs {
    /// File holding the cluster token (a mounted Secret; `tidelock up` writes one): every
    /// internal route requires `Authorization: Bearer <token>`, and routers and shard peers send
    /// it.
    #[arg(long, env = "TIDELOCK_CLUSTER_TOKEN_FILE")]
    pub cluster_token_file: Option<PathBuf>,

    /// The cluster token itself, best from the environment (a Secret's key): a command line is
    /// visible to `ps`.
    #[arg(long, env = "TIDELOCK_CLUSTER_TOKEN", hide_env_values = true)]
    pub cluster_token: Option<String>,

    /// Serve (or call) the internal API without a credential: anyone who can reach the port may
    /// use it. Only for a machine of your own, or benchmarks with other routers.
    #[arg(long, env = "TIDELOCK_NO_CLUSTER_AUTH")]
    pub no_cluster_auth: bool,
}

/// Why the cluster credential flags give no credential; each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum CredentialFlagError {
    /// Both the file and the token itself.
    #[error("give the cluster token once: --cluster-token-file or TIDELOCK_CLUSTER_TOKEN")]
    Twice,
    /// The token file cannot be read, or holds no valid token.
    #[error(transparent)]
    File(ClusterTokenError),
    /// `TIDELOCK_CLUSTER_TOKEN` (or `--cluster-token`) is not a valid token.
    #[error("TIDELOCK_CLUSTER_TOKEN: {0}")]
    Text(ClusterTokenError),
    /// A token and `--no-cluster-auth`.
    #[error("--no-cluster-auth and a cluster token exclude each other")]
    TokenAndOpen,
    /// Neither a token nor `--no-cluster-auth`.
    #[error(
        "the internal API needs the cluster credential: give --cluster-token-file (or \
         TIDELOCK_CLUSTER_TOKEN), or --no-cluster-auth to leave it open to anyone who can reach it"
    )]
    Missing,
}

impl ClusterAuthArgs {
    /// The token, `None` when `--no-cluster-auth` is given; an error (saying what to do) when
    /// neither or both are.
    pub fn token(&self) -> Result<Option<ClusterToken>, CredentialFlagError> {
        let token = match (&self.cluster_token_file, &self.cluster_token) {
            (Some(_), Some(_)) => return Err(CredentialFlagError::Twice),
            (Some(path), None) => {
                Some(ClusterToken::from_file(path).map_err(CredentialFlagError::File)?)
            }
            (None, Some(text)) => Some(ClusterToken::new(text).map_err(CredentialFlagError::Text)?),
            (None, None) => None,
        };
        match (token, self.no_cluster_auth) {
            (Some(_), true) => Err(CredentialFlagError::TokenAndOpen),
            (Some(token), false) => Ok(Some(token)),
            (None, true) => {
                tracing::warn!(
                    "--no-cluster-auth: the internal API is open to anyone who can reach it"
                );
                Ok(None)
            }
            (None, false) => Err(CredentialFlagError::Missing),
        }
    }
}

/// Requires the cluster token on every route but `/healthz` and `/readyz`, and counts refusals.
#[derive(Debug, Clone)]
pub struct ClusterGuard {
    token: Option<Arc<ClusterToken>>,
    refused: IntCounterVec,
}

/// The routes open to anyone: probes, which the kubelet calls without credentials.
const OPEN: [&str; 2] = ["/healthz", "/readyz"];

impl ClusterGuard {
    /// A guard for `token` (`None`: every request passes, as `--no-cluster-auth` asked).
    pub fn new(token: Option<ClusterToken>) -> Self {
        let refused = IntCounterVec::new(
            Opts::new(
                "tidelock_internal_unauthorized_requests_total",
                "Requests to the internal API refused for a missing or wrong cluster credential.",
            ),
            &["reason"],
        )
        .expect("a valid metric");
        for reason in ["missing", "invalid"] {
            refused.with_label_values(&[reason]);
        }
        ClusterGuard {
            token: token.map(Arc::new),
            refused,
        }
    }

    /// Adds the refusal counter to `registry`.
    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.refused.clone()))
    }

    /// Refusals so far by reason (`missing`, `invalid`).
    pub fn refused(&self, reason: &str) -> u64 {
        self.refused.with_label_values(&[reason]).get()
    }

    /// `router` with every route but the probes behind the credential.
    pub fn protect<S: Clone + Send + Sync + 'static>(&self, router: Router<S>) -> Router<S> {
        router.layer(axum::middleware::from_fn_with_state(self.clone(), check))
    }
}

async fn check(State(guard): State<ClusterGuard>, request: Request, next: Next) -> Response {
    let Some(token) = &guard.token else {
        return next.run(request).await;
    };
    if OPEN.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    let reason = match request.headers().get(header::AUTHORIZATION) {
        Some(value) if token.accepts(value.as_bytes()) => return next.run(request).await,
        Some(_) => "invalid",
        None => "missing",
    };
    guard.refused.with_label_values(&[reason]).inc();
    tracing::debug!(
        path = request.uri().path(),
        reason,
        "internal request refused"
    );
    unauthorized(reason)
}

fn unauthorized(reason: &str) -> Response {
    let message = if reason == "missing" {
        "This is Tidelock's internal API: it needs the cluster credential \
         (Authorization: Bearer <cluster token>). Tenants call the router."
    } else {
        "The cluster credential is not valid."
    };
    let body = serde_json::json!({"error": {
        "message": message,
        "type": "authentication_error",
        "param": null,
        "code": "invalid_cluster_credential",
    }});
    let mut response = (StatusCode::UNAUTHORIZED, axum::Json(body)).into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"tidelock-internal\""),
    );
    response
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::routing::{get, post};
    use tower::ServiceExt;

    use super::*;

    async fn call(app: &Router, path: &str, auth: Option<&str>) -> (StatusCode, String) {
        let mut request = Request::builder().uri(path).method("GET");
        if path == "/v1/generate" {
            request = request.method("POST");
        }
        if let Some(auth) = auth {
            request = request.header(header::AUTHORIZATION, auth);
        }
        let response = app
            .clone()
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    fn routes() -> Router {
        Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(|| async { "ready" }))
            .route("/metrics", get(|| async { "metrics" }))
            .route("/v1/generate", post(|| async { "tokens" }))
    }

    #[tokio::test]
    async fn only_probes_pass_without_the_token_and_refusals_are_counted() {
        let token = ClusterToken::generate();
        let guard = ClusterGuard::new(Some(token.clone()));
        let app = guard.protect(routes());
        let good = token.authorization();
        let wrong = ClusterToken::generate().authorization();
        for path in OPEN {
            assert_eq!(call(&app, path, None).await.0, StatusCode::OK, "{path}");
        }
        for path in ["/metrics", "/v1/generate", "/nope"] {
            let (status, body) = call(&app, path, None).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
            let body: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(body["error"]["code"], "invalid_cluster_credential");
            assert_eq!(
                call(&app, path, Some(&wrong)).await.0,
                StatusCode::UNAUTHORIZED
            );
            assert_eq!(
                call(&app, path, Some(token.expose())).await.0,
                StatusCode::UNAUTHORIZED,
                "the token without the Bearer scheme"
            );
        }
        assert_eq!(
            call(&app, "/v1/generate", Some(&good)).await,
            (StatusCode::OK, "tokens".into())
        );
        assert_eq!(call(&app, "/metrics", Some(&good)).await.0, StatusCode::OK);
        // The unknown route is refused before it is found missing: no route map for guessers.
        assert_eq!(guard.refused("missing"), 3);
        assert_eq!(guard.refused("invalid"), 6);
        let registry = Registry::new();
        guard.register(&registry).unwrap();
        let mut text = Vec::new();
        prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &registry.gather(),
            &mut text,
        )
        .unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(
            text.contains("tidelock_internal_unauthorized_requests_total{reason=\"invalid\"} 6"),
            "{text}"
        );

        let open = ClusterGuard::new(None).protect(routes());
        assert_eq!(call(&open, "/v1/generate", None).await.0, StatusCode::OK);
    }

    #[test]
    fn the_options_need_a_token_or_an_explicit_opt_out() {
        let dir = std::env::temp_dir().join(format!("tidelock-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        let token = ClusterToken::generate();
        std::fs::write(&file, token.expose()).unwrap();
        let args = |file: Option<&PathBuf>, text: Option<&str>, open| ClusterAuthArgs {
            cluster_token_file: file.cloned(),
            cluster_token: text.map(str::to_owned),
            no_cluster_auth: open,
        };
        assert_eq!(
            args(Some(&file), None, false).token().unwrap(),
            Some(token.clone())
        );
        assert_eq!(
            args(None, Some(token.expose()), false).token().unwrap(),
            Some(token.clone())
        );
        assert_eq!(args(None, None, true).token().unwrap(), None);
        let err = args(None, None, false).token().unwrap_err();
        assert!(matches!(err, CredentialFlagError::Missing));
        let err = err.to_string();
        assert!(
            err.contains("--cluster-token-file") && err.contains("--no-cluster-auth"),
            "{err}"
        );
        assert!(matches!(
            args(Some(&file), None, true).token(),
            Err(CredentialFlagError::TokenAndOpen)
        ));
        assert!(matches!(
            args(Some(&file), Some(token.expose()), false).token(),
            Err(CredentialFlagError::Twice)
        ));
        let short = args(None, Some("short"), false).token().unwrap_err();
        assert!(matches!(short, CredentialFlagError::Text(_)));
        let short = short.to_string();
        assert!(
            short.starts_with("TIDELOCK_CLUSTER_TOKEN: ") && short.contains("at least 32"),
            "{short}"
        );
        let missing = args(Some(&dir.join("gone")), None, false)
            .token()
            .unwrap_err();
        assert!(matches!(missing, CredentialFlagError::File(_)));
        let missing = missing.to_string();
        assert!(missing.contains("gone"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

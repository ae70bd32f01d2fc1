//! HTTP/1.1 requests must name their `Host` (RFC 9112, section 3.2: a server answers 400 to one
//! that does not). hyper serves them anyway; this middleware refuses them, in OpenAI's error
//! shape, on every route of the router and the worker. HTTP/1.0 requests, which may omit it,
//! are let through.

use axum::extract::Request;
use axum::http::{Version, header};
use axum::middleware::Next;
use axum::response::Response;
use tidelock_protocol::OpenAiError;

use crate::error_response;

/// `axum::middleware::from_fn(require_host)`.
pub async fn require_host(request: Request, next: Next) -> Response {
    if request.version() == Version::HTTP_11 && !request.headers().contains_key(header::HOST) {
        return error_response(
            &OpenAiError::bad_request("An HTTP/1.1 request must have a Host header.")
                .with_code("missing_host"),
        );
    }
    next.run(request).await
}

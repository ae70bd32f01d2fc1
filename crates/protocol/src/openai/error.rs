//! [`OpenAiError`]: the one place errors of the OpenAI surface get an HTTP status and OpenAI's
//! error body, `{"error": {"message", "type", "param", "code"}}`.
//!
//! Worker failures ([`ErrorCode`]) map here too, so the router and the worker's own surface
//! answer the same failure with the same status. `ErrorKind::as_str` doubles as a bounded metric
//! label.

use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::sse_data;
use crate::wire::ErrorCode;

/// `error.type` of an OpenAI error body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// 400: the request is malformed or out of range.
    InvalidRequest,
    /// 401: no or wrong API key.
    Authentication,
    /// 403: the key may not do this.
    Permission,
    /// 404: no such model or route.
    NotFound,
    /// 429: a tenant limit was hit.
    RateLimit,
    /// 500: a bug or unexpected failure.
    Server,
    /// 503: no capacity now; retry later.
    ServiceUnavailable,
    // Answers of the workers' internal API (to routers and other workers), never of the public
    // surface: the same body, so one map serves both.
    /// 503: the worker is shutting down; another takes the request (the type is
    /// [`crate::DRAINING`], which routers test for).
    Draining,
    /// 410: the KV events asked for are gone; load a snapshot.
    ResyncRequired,
    /// 409: the request conflicts with the worker's state (not draining, a plan already taken).
    Conflict,
    /// 501: this worker cannot do that (a shard group's blocks cannot leave it).
    NotImplemented,
    /// 502: a worker this one called failed.
    Upstream,
}

impl ErrorKind {
    /// The `type` string; also a bounded metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request_error",
            Self::Authentication => "authentication_error",
            Self::Permission => "permission_error",
            Self::NotFound => "not_found_error",
            Self::RateLimit => "rate_limit_error",
            Self::Server => "server_error",
            Self::ServiceUnavailable => "service_unavailable",
            Self::Draining => crate::wire::DRAINING,
            Self::ResyncRequired => "resync_required",
            Self::Conflict => "conflict_error",
            Self::NotImplemented => "not_implemented",
            Self::Upstream => "upstream_error",
        }
    }
}

/// An error of the OpenAI surface, with its HTTP status and OpenAI's error body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct OpenAiError {
    /// HTTP status.
    pub status: u16,
    /// `error.type`.
    pub kind: ErrorKind,
    /// `error.message`.
    pub message: String,
    /// `error.param`: the request field at fault.
    pub param: Option<String>,
    /// `error.code`, e.g. `context_length_exceeded`.
    pub code: Option<String>,
}

impl OpenAiError {
    fn new(status: u16, kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            param: None,
            code: None,
        }
    }

    /// 400 about request field `param`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.into()),
            ..Self::new(400, ErrorKind::InvalidRequest, message)
        }
    }

    /// 400 about the request as a whole (e.g. a body that is not valid JSON).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, ErrorKind::InvalidRequest, message)
    }

    /// 401.
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(401, ErrorKind::Authentication, message)
    }

    /// 403.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(403, ErrorKind::Permission, message)
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(404, ErrorKind::NotFound, message)
    }

    /// 429.
    pub fn rate_limited(message: impl Into<String>) -> Self {
        Self::new(429, ErrorKind::RateLimit, message)
    }

    /// 503.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(503, ErrorKind::ServiceUnavailable, message)
    }

    /// 500.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, ErrorKind::Server, message)
    }

    /// 503 of the internal API: the worker drains ([`ErrorKind::Draining`]).
    pub fn draining(message: impl Into<String>) -> Self {
        Self::new(503, ErrorKind::Draining, message)
    }

    /// 410 of the internal API ([`ErrorKind::ResyncRequired`]).
    pub fn resync_required(message: impl Into<String>) -> Self {
        Self::new(410, ErrorKind::ResyncRequired, message)
    }

    /// 409 of the internal API ([`ErrorKind::Conflict`]).
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(409, ErrorKind::Conflict, message)
    }

    /// 501 of the internal API ([`ErrorKind::NotImplemented`]).
    pub fn not_implemented(message: impl Into<String>) -> Self {
        Self::new(501, ErrorKind::NotImplemented, message)
    }

    /// 502 of the internal API ([`ErrorKind::Upstream`]).
    pub fn upstream(message: impl Into<String>) -> Self {
        Self::new(502, ErrorKind::Upstream, message)
    }

    /// The same error with `error.code` set.
    pub fn with_code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }

    /// A worker's failure as the OpenAI surface reports it.
    pub fn from_wire(code: ErrorCode, message: impl Into<String>) -> Self {
        let message = message.into();
        match code {
            // A worker names the request field at fault as the message's prefix (a constraint
            // that does not compile: `response_format: ...`, or `tools: ...` for a required
            // call's grammar).
            ErrorCode::InvalidRequest if message.starts_with("response_format:") => {
                Self::invalid("response_format", message)
            }
            ErrorCode::InvalidRequest if message.starts_with("tools:") => {
                Self::invalid("tools", message)
            }
            ErrorCode::InvalidRequest => Self::bad_request(message),
            ErrorCode::ContextTooLong => {
                Self::bad_request(message).with_code("context_length_exceeded")
            }
            ErrorCode::Overloaded => Self::unavailable(message),
            ErrorCode::Internal | ErrorCode::Unknown => Self::internal(message),
        }
    }

    /// Parses a request body, reporting malformed JSON as a 400 in OpenAI's shape.
    ///
    /// A body that is not UTF-8 is refused as a whole (JSON text is UTF-8): serde_json checks
    /// only the strings it reads, and skips those of fields the target type ignores unchecked.
    pub fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, Self> {
        if let Err(e) = std::str::from_utf8(body) {
            return Err(Self::bad_request(format!(
                "The request body is not valid UTF-8 (at byte {}).",
                e.valid_up_to()
            )));
        }
        // Most bodies are well formed: parse without tracking the path (a path segment per
        // field costs allocations), and only a body that fails is parsed again to name where.
        if let Ok(value) = serde_json::from_slice(body) {
            return Ok(value);
        }
        let mut de = serde_json::Deserializer::from_slice(body);
        let value = serde_path_to_error::deserialize(&mut de).map_err(|error| {
            let path = error.path().to_string();
            Self::from_json(Some(path), error.into_inner())
        })?;
        de.end().map_err(|e| Self::from_json(None, e))?;
        Ok(value)
    }

    /// A body that is not JSON, or JSON of the wrong shape (naming the field at `path`).
    fn from_json(path: Option<String>, error: serde_json::Error) -> Self {
        use serde_json::error::Category;
        match (error.classify(), path) {
            (Category::Syntax | Category::Eof | Category::Io, _) => {
                Self::bad_request(format!("The request body is not valid JSON: {error}"))
            }
            (Category::Data, Some(path)) if path != "." => {
                Self::invalid(path.clone(), format!("`{path}`: {error}"))
            }
            (Category::Data, _) => Self::bad_request(format!("invalid request body: {error}")),
        }
    }

    /// `{"error": {"message", "type", "param", "code"}}`, `null` for an absent param or code.
    pub fn body(&self) -> Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind.as_str(),
                "param": self.param,
                "code": self.code,
            }
        })
    }

    /// The error as a server-sent event, for failures after a stream has started.
    pub fn sse_event(&self) -> String {
        sse_data(&self.body())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::ChatCompletionRequest;

    #[test]
    fn body_is_openai_shaped() {
        let error = OpenAiError::invalid("temperature", "temperature must be between 0 and 2");
        assert_eq!(error.to_string(), "temperature must be between 0 and 2");
        assert_eq!(
            error.body(),
            json!({"error": {
                "message": "temperature must be between 0 and 2",
                "type": "invalid_request_error",
                "param": "temperature",
                "code": null
            }})
        );
        let error =
            OpenAiError::not_found("The model `x` does not exist").with_code("model_not_found");
        assert_eq!(
            error.body(),
            json!({"error": {
                "message": "The model `x` does not exist",
                "type": "not_found_error",
                "param": null,
                "code": "model_not_found"
            }})
        );
        assert_eq!(
            error.sse_event(),
            format!(
                "data: {}\n\n",
                serde_json::to_string(&error.body()).unwrap()
            )
        );
    }

    #[test]
    fn constructors_set_status_and_type() {
        let cases = [
            (OpenAiError::invalid("p", "m"), 400, "invalid_request_error"),
            (OpenAiError::bad_request("m"), 400, "invalid_request_error"),
            (
                OpenAiError::unauthenticated("m"),
                401,
                "authentication_error",
            ),
            (OpenAiError::forbidden("m"), 403, "permission_error"),
            (OpenAiError::not_found("m"), 404, "not_found_error"),
            (OpenAiError::rate_limited("m"), 429, "rate_limit_error"),
            (OpenAiError::internal("m"), 500, "server_error"),
            (OpenAiError::unavailable("m"), 503, "service_unavailable"),
        ];
        for (error, status, kind) in cases {
            assert_eq!(
                (error.status, error.kind.as_str()),
                (status, kind),
                "{error:?}"
            );
            assert_eq!(error.body()["error"]["type"], kind);
        }
    }

    #[test]
    fn worker_error_codes_map_to_statuses() {
        let cases = [
            (
                ErrorCode::InvalidRequest,
                400,
                ErrorKind::InvalidRequest,
                None,
            ),
            (
                ErrorCode::ContextTooLong,
                400,
                ErrorKind::InvalidRequest,
                Some("context_length_exceeded"),
            ),
            (
                ErrorCode::Overloaded,
                503,
                ErrorKind::ServiceUnavailable,
                None,
            ),
            (ErrorCode::Internal, 500, ErrorKind::Server, None),
            (ErrorCode::Unknown, 500, ErrorKind::Server, None),
        ];
        for (code, status, kind, openai_code) in cases {
            let error = OpenAiError::from_wire(code, "detail");
            assert_eq!(
                (
                    error.status,
                    error.kind,
                    error.code.as_deref(),
                    error.message.as_str()
                ),
                (status, kind, openai_code, "detail"),
                "{code:?}"
            );
        }
    }

    #[test]
    fn malformed_bodies_are_bad_requests() {
        let error = OpenAiError::parse_body::<ChatCompletionRequest>(b"{\"model\": ").unwrap_err();
        assert_eq!((error.status, error.kind), (400, ErrorKind::InvalidRequest));
        assert!(
            error
                .message
                .starts_with("The request body is not valid JSON: "),
            "{}",
            error.message
        );
        let error =
            OpenAiError::parse_body::<ChatCompletionRequest>(b"{\"model\": \"\xff\"}").unwrap_err();
        assert_eq!(error.status, 400);
        assert!(
            error.message.contains("not valid UTF-8 (at byte 11)"),
            "{}",
            error.message
        );
        let error =
            OpenAiError::parse_body::<ChatCompletionRequest>(br#"{"model": "m"}"#).unwrap_err();
        assert!(error.message.contains("messages"), "{}", error.message);
        let ok = OpenAiError::parse_body::<ChatCompletionRequest>(
            br#"{"model": "m", "messages": [], "future": 1}"#,
        );
        assert!(ok.is_ok());
    }

    /// Regression: serde_json skips the strings of fields a type ignores without checking their
    /// UTF-8, so a bad byte in an unknown field of a message (or of `stream_options`) used to be
    /// accepted. Found by `tests/request_props.rs`.
    #[test]
    fn invalid_utf8_in_an_ignored_field_is_a_bad_request() {
        let bodies: [&[u8]; 3] = [
            b"{\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\", \"x\": \"\x80\"}]}",
            b"{\"model\": \"m\", \"messages\": [], \"stream_options\": {\"x\": \"\xff\"}}",
            b"{\"model\": \"m\xc3\", \"messages\": []}",
        ];
        for body in bodies {
            let error = OpenAiError::parse_body::<ChatCompletionRequest>(body).unwrap_err();
            assert_eq!((error.status, error.kind), (400, ErrorKind::InvalidRequest));
            let at = std::str::from_utf8(body).unwrap_err().valid_up_to();
            assert_eq!(
                error.message,
                format!("The request body is not valid UTF-8 (at byte {at}).")
            );
        }
    }
}

//! The one error type of the state store. Every variant that comes from talking to a backend names
//! the endpoint, so an operator reading a log line knows which etcd was unreachable.

use std::path::PathBuf;
use std::time::Duration;

use crate::types::{LeaseId, Revision};

/// Errors of a [`StateStore`](crate::StateStore).
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The backend could not be reached (connection refused, reset, no route...).
    #[error("state store at {endpoint} is unreachable: {source}")]
    Unavailable {
        endpoint: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The backend did not answer in time.
    #[error("state store at {endpoint} did not answer {op} within {after:?}")]
    Timeout {
        endpoint: String,
        op: &'static str,
        after: Duration,
    },
    /// The lease does not exist: it expired or was revoked.
    #[error("lease {0} not found (expired or revoked)")]
    LeaseNotFound(LeaseId),
    /// A watch asked for history that the store has already discarded. Re-list, then watch from
    /// the listing's revision.
    #[error(
        "revision {requested} is compacted; watches can start after {compacted} at the earliest"
    )]
    Compacted {
        requested: Revision,
        compacted: Revision,
    },
    /// The request was malformed (an empty key, a TTL out of range...).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The TLS handshake with the backend failed: its certificate is not trusted, or it refused
    /// ours (or our lack of one). The reason says which and names the file to look at.
    #[error("TLS with the state store at {endpoint} failed: {reason}")]
    Tls { endpoint: String, reason: String },
    /// A TLS file for reaching the backend is missing, unreadable, or not what it must be.
    #[error("{what} {}: {source}", path.display())]
    TlsFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The backend answered with an error we do not classify further.
    #[error("state store at {endpoint} failed {op}: {source}")]
    Backend {
        endpoint: String,
        op: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl StateError {
    /// A bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            StateError::Unavailable { .. } => "unavailable",
            StateError::Timeout { .. } => "timeout",
            StateError::LeaseNotFound(_) => "lease_not_found",
            StateError::Compacted { .. } => "compacted",
            StateError::InvalidRequest(_) => "invalid_request",
            StateError::Tls { .. } => "tls",
            StateError::TlsFile { .. } => "tls_file",
            StateError::Backend { .. } => "backend",
        }
    }

    /// Whether retrying the same call later may succeed. A refused handshake may: etcd's
    /// certificate or the CA it trusts can change while this process runs (a rotation).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StateError::Unavailable { .. } | StateError::Timeout { .. } | StateError::Tls { .. }
        )
    }
}

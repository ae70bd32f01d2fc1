//! The one error type of the state store. Every variant that comes from talking to a backend names
//! the endpoint, so an operator reading a log line knows which etcd was unreachable.

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
            StateError::Backend { .. } => "backend",
        }
    }

    /// Whether retrying the same call later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StateError::Unavailable { .. } | StateError::Timeout { .. }
        )
    }
}

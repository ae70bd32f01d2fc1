//! Keeps the KV index current with one worker: load its snapshot, then follow its event stream
//! (`GET /v1/kv/events?epoch=E&after=S`, newline-delimited [`KvEventBatch`]es). On a sequence
//! gap, a new epoch (the worker restarted), a `410 Gone` (the router fell too far behind) or a
//! dropped stream, it loads the snapshot again and follows on from there, so the index never
//! trusts blocks a worker may have lost. A router restart is the same path from an empty index.
//!
//! While a worker cannot be reached, its blocks are dropped from the index (it attracts no
//! routing on a cache nobody can confirm) and the follower retries with capped backoff.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use hyper::StatusCode;
use tidelock_protocol::{KvEventBatch, KvSnapshot, WorkerId};

use crate::http::{Http, HttpError, LineError, NdjsonLines};
use crate::index::{Applied, KvIndex};

/// How long a snapshot request may take, its body included (a large index's snapshot is a few
/// MB of JSON).
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(10);
/// First and longest wait between attempts to reach a worker.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(2));

/// Why one pass of following ended.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error("{url}: {source}")]
    Http {
        url: String,
        #[source]
        source: HttpError,
    },
    #[error("{url}: reading the event stream: {source}")]
    Stream {
        url: String,
        #[source]
        source: hyper::Error,
    },
    #[error("{url}: bad {what}: {source}")]
    Body {
        url: String,
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("the index refused the snapshot: {0}")]
    Index(#[from] crate::index::IndexError),
}

/// Follows one worker's KV events into a shared index until the task is dropped.
#[derive(Debug, Clone)]
pub struct Follower {
    worker: WorkerId,
    /// `http://host:port`, no trailing slash.
    base: String,
    index: Arc<RwLock<KvIndex>>,
    http: Http,
}

/// How one pass ended when nothing failed.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// The stream ended or asked for a resync: load the snapshot again.
    Resync,
}

impl Follower {
    /// Follows the worker at `base_url` through `http` (which presents the cluster credential).
    pub fn new(worker: WorkerId, base_url: &str, index: Arc<RwLock<KvIndex>>, http: Http) -> Self {
        Follower {
            worker,
            base: base_url.trim_end_matches('/').to_owned(),
            index,
            http,
        }
    }

    /// Runs forever: snapshot, follow, and again on every resync or error. Spawn it, and abort
    /// the task (or drop the runtime) to stop.
    pub async fn run(self) {
        let mut wait = BACKOFF.0;
        loop {
            match self.pass().await {
                Ok(Ended::Resync) => {
                    tracing::debug!(worker = %self.worker, "KV events: resync");
                    wait = BACKOFF.0;
                    // A worker that keeps ending streams at once must not spin the router.
                    tokio::time::sleep(BACKOFF.0).await;
                }
                Err(e) => {
                    tracing::warn!(worker = %self.worker, error = %e, "KV events: worker unreachable, its blocks are out of the index until it answers");
                    self.write().remove_worker(&self.worker);
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(BACKOFF.1);
                }
            }
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, KvIndex> {
        // A panic while holding the lock cannot leave the index half-updated in a way that
        // matters more than stopping routing; keep serving with what is there.
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }

    /// One snapshot and as much of the event stream as lasts.
    async fn pass(&self) -> Result<Ended, FollowError> {
        let url = format!("{}/v1/kv/snapshot", self.base);
        let body = self
            .http
            .get_body(&url, SNAPSHOT_TIMEOUT)
            .await
            .map_err(|source| FollowError::Http {
                url: url.clone(),
                source,
            })?;
        let snapshot: KvSnapshot =
            serde_json::from_slice(&body).map_err(|source| FollowError::Body {
                url: url.clone(),
                what: "snapshot",
                source,
            })?;
        self.write().load_snapshot(&self.worker, &snapshot)?;

        let url = format!(
            "{}/v1/kv/events?epoch={}&after={}",
            self.base,
            snapshot.epoch.get(),
            snapshot.sequence
        );
        let response = self
            .http
            .get(&url)
            .await
            .map_err(|source| FollowError::Http {
                url: url.clone(),
                source,
            })?;
        match response.status() {
            StatusCode::GONE => return Ok(Ended::Resync),
            status if !status.is_success() => {
                return Err(FollowError::Http {
                    url,
                    source: HttpError::Status(status),
                });
            }
            _ => {}
        }
        let mut lines = NdjsonLines::new(response.into_body());
        loop {
            let batch: KvEventBatch = match lines.next().await {
                Ok(Some(batch)) => batch,
                Ok(None) => break,
                Err(LineError::Read(source)) => {
                    return Err(FollowError::Stream { url, source });
                }
                Err(LineError::Parse(source)) => {
                    return Err(FollowError::Body {
                        url,
                        what: "event batch",
                        source,
                    });
                }
            };
            if let Applied::NeedsSnapshot(why) = self.write().apply(&self.worker, &batch) {
                tracing::debug!(worker = %self.worker, ?why, "KV events: snapshot needed");
                return Ok(Ended::Resync);
            }
        }
        Ok(Ended::Resync)
    }
}

//! The `StateStore` trait: the only way Tidelock's parts touch cluster state.
//!
//! Semantics follow etcd's, and both implementations pass one conformance suite
//! (`testing::conformance`):
//! - every change takes the next global [`Revision`]; listing returns the revision it was read at;
//! - a watch started after revision R yields every change to keys under its directory with a
//!   revision > R, in order, exactly once, and keeps doing so across a lost connection (it resumes
//!   from the last revision it delivered); history the store has discarded gives
//!   [`StateError::Compacted`];
//! - directories are exact: `a/b` covers `a/b/x`, never `a/bc/x`;
//! - a key bound to a lease disappears when the lease expires or is revoked;
//! - compare-and-swap reports a conflict as [`CasOutcome::Conflict`], not as an error.
//!
//! Lease TTLs are whole seconds (etcd's granularity), rounded up; etcd may raise very short TTLs to
//! its minimum (2 s with default settings).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::Stream;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::StateError;
use crate::types::{CasOutcome, Expected, KeyValue, LeaseId, Listing, Revision, WatchEvent};

/// A stream of changes under one directory; see the module docs for its guarantees.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, StateError>> + Send>>;

/// Cluster state: a revisioned key-value store with watches, leases and compare-and-swap.
#[async_trait]
pub trait StateStore: Send + Sync + std::fmt::Debug {
    /// Reads one key.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StateError>;

    /// Writes one key, optionally bound to a lease (which must exist). Returns the write's revision.
    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StateError>;

    /// Deletes one key. Returns the deletion's revision, or `None` when there was no such key.
    async fn delete(&self, key: &str) -> Result<Option<Revision>, StateError>;

    /// Lists the keys strictly under `dir` (see [`dir_prefix`](crate::dir_prefix)), sorted.
    async fn list(&self, dir: &str) -> Result<Listing, StateError>;

    /// Watches the keys strictly under `dir`, yielding every change with a revision > `after`.
    async fn watch(&self, dir: &str, after: Revision) -> Result<WatchStream, StateError>;

    /// Creates a lease with the given time to live.
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StateError>;

    /// Refreshes a lease; returns its TTL from now. [`StateError::LeaseNotFound`] once it has ended.
    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StateError>;

    /// Ends a lease now, deleting its keys. Revoking an unknown lease is `LeaseNotFound`.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StateError>;

    /// Writes `value` only if `key` is as `expected`.
    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Expected,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<CasOutcome, StateError>;

    /// Deletes `key` only if it is as `expected` (`Expected::Absent` never swaps).
    async fn compare_and_delete(
        &self,
        key: &str,
        expected: Expected,
    ) -> Result<CasOutcome, StateError>;
}

/// Whole seconds of a TTL, rounded up, at least 1: the unit both stores use.
pub(crate) fn ttl_seconds(ttl: Duration) -> Result<i64, StateError> {
    if ttl.is_zero() {
        return Err(StateError::InvalidRequest(
            "lease TTL must be positive".into(),
        ));
    }
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i64::try_from(secs)
        .ok()
        .filter(|s| *s <= MAX_TTL_SECONDS)
        .ok_or_else(|| StateError::InvalidRequest(format!("lease TTL {ttl:?} is too long")))
}

/// etcd's own upper bound on lease TTLs (9,000,000,000 s); we keep far below it.
const MAX_TTL_SECONDS: i64 = 365 * 24 * 3600;

/// `ModRevision(0)` would mean "absent" to etcd but "never" to a map: refuse it in both.
pub(crate) fn check_expected(expected: Expected) -> Result<(), StateError> {
    match expected {
        Expected::ModRevision(rev) if rev <= Revision::ZERO => Err(StateError::InvalidRequest(
            format!("expected mod revision must be positive, got {rev}"),
        )),
        _ => Ok(()),
    }
}

pub(crate) fn check_key(key: &str) -> Result<(), StateError> {
    if key.is_empty() {
        return Err(StateError::InvalidRequest("key must not be empty".into()));
    }
    Ok(())
}

/// Keeps a lease alive in the background, refreshing it every third of its TTL, until dropped.
///
/// When the lease is lost (it expired because the store was unreachable for longer than the TTL,
/// or someone revoked it), [`LeaseKeeper::lost`] resolves: the owner must re-register, since its
/// keys are gone.
#[derive(Debug)]
pub struct LeaseKeeper {
    lease: LeaseId,
    task: JoinHandle<()>,
    lost: watch::Receiver<bool>,
}

impl LeaseKeeper {
    /// Starts refreshing `lease` (granted with `ttl`) on `store`.
    pub fn spawn(store: Arc<dyn StateStore>, lease: LeaseId, ttl: Duration) -> Self {
        let (tx, lost) = watch::channel(false);
        let period = (ttl / 3).max(Duration::from_millis(100));
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match store.keep_alive(lease).await {
                    Ok(_) => {}
                    Err(StateError::LeaseNotFound(_)) => {
                        tracing::warn!(%lease, "lease lost; its keys are gone");
                        let _ = tx.send(true);
                        return;
                    }
                    // Transient: the next tick retries; the lease survives while the outage is
                    // shorter than its TTL.
                    Err(error) => tracing::warn!(%lease, %error, "lease keep-alive failed"),
                }
            }
        });
        LeaseKeeper { lease, task, lost }
    }

    /// The lease being kept.
    pub fn lease(&self) -> LeaseId {
        self.lease
    }

    /// Resolves when the lease has been lost.
    pub async fn lost(&mut self) {
        // An error means the task ended, which it only does after reporting the loss.
        let _ = self.lost.wait_for(|lost| *lost).await;
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_rounds_up_to_whole_seconds() {
        assert_eq!(ttl_seconds(Duration::from_millis(1)).ok(), Some(1));
        assert_eq!(ttl_seconds(Duration::from_secs(2)).ok(), Some(2));
        assert_eq!(ttl_seconds(Duration::from_millis(2001)).ok(), Some(3));
        assert!(ttl_seconds(Duration::ZERO).is_err());
        assert!(ttl_seconds(Duration::from_secs(u64::MAX)).is_err());
    }
}

//! The turn log: a session's answered turns shared by the router replicas through the state
//! store, so that a session's next turn keeps its cached ids on whichever replica it lands
//! (issue #18, point 5).
//!
//! Why: each replica remembers a session's last prompt and answer as the ids the worker cached
//! ([`tidelock_openai::Continuations`], the turn memory). A client behind a load balancer sends its next turn
//! to any replica; one that did not serve the turn before re-tokenizes the answer from its
//! text, which rarely gives the ids the model generated, and the session's cache breaks at
//! its first answer.
//!
//! How: when an answer ends, the replica that served it writes the turn's [`TurnRecord`] (where
//! its text starts and ends, the digest of the conversation up to there, and the answer's ids:
//! four bytes per generated token) under `turns/<model>/<tenant>/<endpoint>/<session>/<n>`.
//! The answer's last bytes wait for that write for at most the read deadline (so the client's
//! next turn, wherever it goes, finds it), the write itself goes on in the background within
//! the write deadline. On the next turn a replica whose own memory continues the prompt checks
//! with one point read (`<n>` after its memory's last turn) that nobody answered the session
//! since; if somebody did, or it has no memory of the session, it reads the session's log and
//! rebuilds the ids from it ([`tidelock_openai::Rendered::rebuild`]). Every record is checked
//! against the prompt's text (by digest, and its answer's ids by decoding them), so a stale,
//! foreign or damaged log can only cost a cache miss, never a wrong prompt. Reads have the read deadline and are skipped while the store is
//! unreachable ([`Pins::store_reachable`]): then the replica's own memory, or the text, serves.
//!
//! Records live on one lease per session with the idle timeout as TTL, refreshed at each write;
//! a chain that starts again (the client edited its history) gets a new lease and revokes the
//! old one, which deletes the old records with it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::IntCounterVec;
use tidelock_openai::{Continuation, TurnRecord};
use tidelock_protocol::{KeyLayout, TurnKey};
use tidelock_state::{LeaseId, StateError, StateStore};

use crate::sessions::{Deadlines, Pins};

/// Sessions whose lease this replica remembers; beyond, the least recently used is forgotten
/// (its next write starts a lease of its own; the old one ends with its TTL).
const LEASES_KEPT: usize = 65_536;

/// The turn log of one router replica.
#[derive(Debug)]
pub struct TurnLog {
    store: Arc<dyn StateStore>,
    layout: KeyLayout,
    /// The store's reachability (shared with the pins: one store).
    pins: Arc<Pins>,
    deadlines: Deadlines,
    idle_timeout: Duration,
    /// Each session log's lease, as last read or written here.
    leases: Mutex<lru::LruCache<String, LeaseId>>,
    /// `event`: `rebuilt` (a prompt continued from the log), `missed` (read, nothing fit),
    /// `skipped` (the store unreachable), `written`, `write_failed`.
    events: IntCounterVec,
}

impl TurnLog {
    /// The turn log in the store the pins use, with their deadlines and idle timeout.
    pub fn new(pins: Arc<Pins>) -> Self {
        let (store, layout, deadlines, idle_timeout) = pins.store_settings();
        TurnLog {
            store,
            layout,
            pins,
            deadlines,
            idle_timeout,
            leases: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(LEASES_KEPT).expect("not zero"),
            )),
            events: IntCounterVec::new(
                prometheus::Opts::new(
                    "tidelock_router_turn_log_total",
                    "Session turn log events: rebuilt (a prompt's ids rebuilt from the log), missed (read, nothing fit), skipped (store unreachable), written, write_failed.",
                ),
                &["event"],
            )
            .expect("the metric's name and help are valid"),
        }
    }

    /// The counter to register with the router's metrics.
    pub fn metrics(&self) -> &IntCounterVec {
        &self.events
    }

    /// Counts `event` (one of the labels [`TurnLog::metrics`] documents).
    pub fn count(&self, event: &str) {
        self.events.with_label_values(&[event]).inc();
    }

    /// What the session's log (the [`KeyLayout::turns_of`] directory of `key`) holds beyond
    /// `known` turns (this replica's memory of the session): nothing when turn `known` is not
    /// there (one point read), else the whole log in turn order, from turn 0 up to the first gap
    /// or unreadable record. Nothing either when the store does not answer within the read
    /// deadline (then the store is probed) or is being probed.
    pub async fn newer(&self, key: &TurnKey, known: Option<u32>) -> Vec<TurnRecord> {
        let log = &self.layout.turns_of(key);
        if !self.pins.store_reachable() {
            self.count("skipped");
            return Vec::new();
        }
        if let Some(n) = known {
            match self
                .within_read(self.store.get(&KeyLayout::turn(log, n)))
                .await
            {
                Some(Some(_)) => {}
                Some(None) | None => return Vec::new(),
            }
        }
        let Some(listing) = self.within_read(self.store.list(log)).await else {
            return Vec::new();
        };
        let mut records = Vec::new();
        for kv in &listing.kvs {
            match self.layout.parse_turn(&kv.key) {
                Some((dir, n)) if dir == log && n as usize == records.len() => {}
                _ => break,
            }
            let Ok(record) = TurnRecord::from_bytes(&kv.value) else {
                break;
            };
            if let Some(lease) = kv.lease {
                self.leases_held().put(log.to_owned(), lease);
            }
            records.push(record);
        }
        records
    }

    /// `read`'s answer, or `None` (the store marked unreachable) when it fails or misses the
    /// read deadline.
    async fn within_read<T>(
        &self,
        read: impl std::future::Future<Output = Result<T, StateError>>,
    ) -> Option<T> {
        match tokio::time::timeout(self.deadlines.read, read).await {
            Ok(Ok(value)) => Some(value),
            Ok(Err(e)) => {
                self.pins.unreachable(&e.to_string());
                None
            }
            Err(_) => {
                self.pins.unreachable("a turn log read missed its deadline");
                None
            }
        }
    }

    fn leases_held(&self) -> std::sync::MutexGuard<'_, lru::LruCache<String, LeaseId>> {
        self.leases.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes `continuation`'s last turn to the session's log within the write deadline; the future it
    /// returns ends when the write does, or after the read deadline, whichever is first (the
    /// write goes on in the background).
    pub fn write(
        self: &Arc<Self>,
        key: &TurnKey,
        continuation: &Continuation,
    ) -> futures::future::BoxFuture<'static, ()> {
        let log = self.layout.turns_of(key);
        let record = continuation.record();
        let n = continuation.turns() - 1;
        let log_ = self.clone();
        let written = tokio::spawn(async move {
            let written =
                tokio::time::timeout(log_.deadlines.write, log_.put(&log, n, record.to_bytes()))
                    .await;
            match written {
                Ok(Ok(())) => log_.count("written"),
                Ok(Err(e)) => {
                    log_.count("write_failed");
                    tracing::debug!(error = %e, "turn not written to the session's turn log");
                }
                Err(_) => {
                    log_.count("write_failed");
                    tracing::debug!("a turn log write missed its deadline");
                }
            }
        });
        let wait = if self.pins.store_reachable() {
            self.deadlines.read
        } else {
            Duration::ZERO
        };
        Box::pin(async move {
            let _ = tokio::time::timeout(wait, written).await;
        })
    }

    async fn put(&self, log: &str, n: u32, value: Vec<u8>) -> Result<(), StateError> {
        let known = self.leases_held().get(log).copied();
        let lease = match known {
            // A chain that starts again: the old records go with their lease.
            Some(old) if n == 0 => {
                let _ = self.store.revoke_lease(old).await;
                None
            }
            Some(lease) if self.store.keep_alive(lease).await.is_ok() => Some(lease),
            _ => None,
        };
        let lease = match lease {
            Some(lease) => lease,
            None => self.store.grant_lease(self.idle_timeout).await?,
        };
        self.leases_held().put(log.to_owned(), lease);
        self.store
            .put(&KeyLayout::turn(log, n), value, Some(lease))
            .await?;
        Ok(())
    }
}

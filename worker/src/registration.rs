//! Registration in the cluster state: `workers/<model>/<worker>` holds this worker's address,
//! group, shard and capacity, bound to a lease the worker keeps alive. A crashed worker's key
//! disappears when the lease expires; a clean shutdown revokes the lease so it disappears at once.
//! If the lease is lost anyway (the state store was unreachable for longer than the TTL), the
//! worker registers again as soon as it can.

use std::sync::Arc;
use std::time::Duration;

use tidelock_protocol::WorkerRegistration;
use tidelock_state::{LeaseId, LeaseKeeper, StateError, StateStore};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long a dead worker stays registered at most.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

/// A registration kept alive in the background.
#[derive(Debug)]
pub struct Registration {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Registration {
    /// Registers `value` under `key` and keeps it registered until [`Registration::deregister`].
    /// Fails if the first registration fails, so a misconfigured worker stops at start.
    pub async fn start(
        store: Arc<dyn StateStore>,
        key: String,
        value: WorkerRegistration,
        ttl: Duration,
    ) -> Result<Self, StateError> {
        let body = serde_json::to_vec(&value)
            .map_err(|e| StateError::InvalidRequest(format!("registration: {e}")))?;
        let lease = register(store.as_ref(), &key, &body, ttl).await?;
        tracing::info!(%key, "registered");
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut lease = lease;
            loop {
                let mut keeper = LeaseKeeper::spawn(store.clone(), lease, ttl);
                tokio::select! {
                    _ = keeper.lost() => {
                        tracing::warn!(%key, "registration lease lost; registering again");
                    }
                    _ = until_stopped(&mut stopped) => {
                        drop(keeper);
                        if let Err(error) = store.revoke_lease(lease).await {
                            tracing::warn!(%key, %error, "could not revoke the registration lease");
                        }
                        return;
                    }
                }
                lease = loop {
                    match register(store.as_ref(), &key, &body, ttl).await {
                        Ok(lease) => break lease,
                        Err(error) => {
                            tracing::warn!(%key, %error, "registration failed; retrying");
                            tokio::select! {
                                _ = tokio::time::sleep(ttl / 3) => {}
                                _ = until_stopped(&mut stopped) => return,
                            }
                        }
                    }
                };
                tracing::info!(%key, "registered again");
            }
        });
        Ok(Registration { stop, task })
    }

    /// Removes the registration now (revokes the lease) and stops keeping it alive.
    pub async fn deregister(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

async fn until_stopped(stopped: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns must not live across an await.
    let _ = stopped.wait_for(|s| *s).await.map(|_| ());
}

async fn register(
    store: &dyn StateStore,
    key: &str,
    body: &[u8],
    ttl: Duration,
) -> Result<LeaseId, StateError> {
    let lease = store.grant_lease(ttl).await?;
    store.put(key, body.to_vec(), Some(lease)).await?;
    Ok(lease)
}

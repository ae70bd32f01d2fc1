//! [`StateStore`] on etcd (v3 API, through the `etcd-client` crate): the cluster's state in
//! production.
//!
//! Every call is bounded by the request timeout and every failure names the endpoint, so an
//! unreachable etcd is a typed error within a known time, never a hang. Watches survive a lost
//! connection: the stream re-creates its etcd watch from the revision after the last one it
//! delivered, so callers see every change exactly once (or [`StateError::Compacted`] if etcd has
//! discarded that history meanwhile). etcd delivers all events of one revision in one response,
//! and the cursor only advances per response, so a reconnect never splits a revision.
//!
//! Over TLS ([`EtcdConfig::tls`], `https://` endpoints) the files are checked before connecting,
//! and a handshake that either side refuses is a [`StateError::Tls`] saying which (see `tls`).

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    TxnOpResponse, WatchOptions,
};

use crate::error::StateError;
use crate::store::{StateStore, WatchStream, check_expected, check_key, ttl_seconds};
use crate::tls::{EtcdTls, Loaded};
use crate::types::{
    CasOutcome, Expected, KeyValue, LeaseId, Listing, Revision, WatchEvent, dir_prefix,
};

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Client URLs, e.g. `http://127.0.0.1:2379`, or `https://...` with [`Self::tls`].
    pub endpoints: Vec<String>,
    /// Bound on establishing the first connection (the TLS handshake included).
    pub connect_timeout: Duration,
    /// Bound on every single request.
    pub request_timeout: Duration,
    /// TLS: required by `https://` endpoints, refused with `http://` ones.
    pub tls: Option<EtcdTls>,
}

impl EtcdConfig {
    /// Endpoints with default timeouts (connect 5 s, request 5 s), without TLS.
    pub fn new(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        EtcdConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            tls: None,
        }
    }

    /// The same, over TLS when `tls` is given.
    pub fn with_tls(mut self, tls: Option<EtcdTls>) -> Self {
        self.tls = tls;
        self
    }

    /// Checks that the endpoints' schemes agree with the TLS setting: an `https://` endpoint
    /// with no CA to verify it, or TLS files with a plain `http://` endpoint, is a mistake in
    /// the configuration, not something to fall back from. Endpoints without a scheme follow
    /// the TLS setting.
    fn check_schemes(&self) -> Result<(), StateError> {
        for endpoint in &self.endpoints {
            if self.tls.is_none() && endpoint.starts_with("https://") {
                return Err(StateError::InvalidRequest(format!(
                    "etcd endpoint {endpoint} uses TLS but no CA certificate is given to verify it \
                     (--etcd-ca-file, TIDELOCK_ETCD_CA_FILE)"
                )));
            }
            if self.tls.is_some() && endpoint.starts_with("http://") {
                return Err(StateError::InvalidRequest(format!(
                    "etcd TLS files are given but endpoint {endpoint} is plain HTTP: use https://"
                )));
            }
        }
        Ok(())
    }
}

/// The etcd state store. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    /// The endpoints, joined, for error messages.
    endpoint: String,
    request_timeout: Duration,
    /// The TLS settings, to explain a refused handshake.
    tls: Option<Arc<Loaded>>,
}

impl fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

/// Watch re-creation backoff after a lost connection.
const WATCH_RETRY_MIN: Duration = Duration::from_millis(100);
const WATCH_RETRY_MAX: Duration = Duration::from_secs(2);

impl EtcdStore {
    /// Connects and checks that etcd answers, within `connect_timeout`.
    pub async fn connect(config: EtcdConfig) -> Result<Self, StateError> {
        let endpoint = config.endpoints.join(",");
        if config.endpoints.is_empty() {
            return Err(StateError::InvalidRequest("no etcd endpoints given".into()));
        }
        config.check_schemes()?;
        let mut options = ConnectOptions::new()
            .with_connect_timeout(config.connect_timeout)
            .with_timeout(config.request_timeout)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        let tls = config
            .tls
            .as_ref()
            .map(EtcdTls::load)
            .transpose()?
            .map(Arc::new);
        if let Some(tls) = &tls {
            options = options.with_tls(tls.options.clone().timeout(config.connect_timeout));
        }
        let started = Instant::now();
        let connect = async {
            let mut client = Client::connect(&config.endpoints, Some(options)).await?;
            // The channel connects lazily: ask for something to know etcd is really there.
            client.status().await?;
            Ok::<_, etcd_client::Error>(client)
        };
        let client = match tokio::time::timeout(config.connect_timeout, connect).await {
            Ok(Ok(client)) => client,
            Ok(Err(source)) => {
                if let Some(tls) = &tls {
                    let left = config.connect_timeout.saturating_sub(started.elapsed());
                    if let Some(reason) =
                        refused_handshake(tls, &config.endpoints, &source, left).await
                    {
                        return Err(StateError::Tls { endpoint, reason });
                    }
                }
                return Err(match classify(&source) {
                    Failure::Timeout => StateError::Timeout {
                        endpoint,
                        op: "connect",
                        after: config.connect_timeout,
                    },
                    _ => StateError::Unavailable {
                        endpoint,
                        source: Box::new(source),
                    },
                });
            }
            Err(_) => {
                return Err(StateError::Timeout {
                    endpoint,
                    op: "connect",
                    after: config.connect_timeout,
                });
            }
        };
        tracing::debug!(%endpoint, "connected to etcd");
        Ok(EtcdStore {
            client,
            endpoint,
            request_timeout: config.request_timeout,
            tls,
        })
    }

    /// Runs one request with the timeout and error mapping every call shares.
    async fn call<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, StateError>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        match tokio::time::timeout(self.request_timeout, f(self.client.clone())).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(self.map_error(op, error)),
            Err(_) => Err(StateError::Timeout {
                endpoint: self.endpoint.clone(),
                op,
                after: self.request_timeout,
            }),
        }
    }

    fn map_error(&self, op: &'static str, error: etcd_client::Error) -> StateError {
        let endpoint = self.endpoint.clone();
        if let Some(reason) = self.tls.as_ref().and_then(|tls| tls.explain(&error)) {
            return StateError::Tls { endpoint, reason };
        }
        match classify(&error) {
            Failure::Timeout => StateError::Timeout {
                endpoint,
                op,
                after: self.request_timeout,
            },
            Failure::Unreachable => StateError::Unavailable {
                endpoint,
                source: Box::new(error),
            },
            Failure::Other => StateError::Backend {
                endpoint,
                op,
                source: Box::new(error),
            },
        }
    }

    /// Maps etcd's "requested lease not found" to the typed error.
    fn lease_error(lease: LeaseId, error: StateError) -> StateError {
        match &error {
            StateError::Backend { source, .. }
                if source.to_string().contains("lease not found") =>
            {
                StateError::LeaseNotFound(lease)
            }
            _ => error,
        }
    }
}

/// Why the first connection failed, when TLS is why: from the error itself, or else (etcd's
/// alert often reaches the HTTP/2 client as a mere "connection closed") from a handshake of our
/// own with each endpoint, within what is left of the connect timeout.
async fn refused_handshake(
    tls: &Arc<Loaded>,
    endpoints: &[String],
    error: &etcd_client::Error,
    left: Duration,
) -> Option<String> {
    if let Some(reason) = tls.explain(error) {
        return Some(reason);
    }
    if matches!(classify(error), Failure::Timeout) || left.is_zero() {
        return None;
    }
    let tls = tls.clone();
    let endpoints = endpoints.to_vec();
    let probe = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + left;
        endpoints.iter().find_map(|endpoint| {
            let left = deadline.checked_duration_since(Instant::now())?;
            tls.diagnose(endpoint, left)
        })
    });
    // Name resolution has no timeout of its own: never wait past the connect timeout for it.
    tokio::time::timeout(left, probe).await.ok()?.ok().flatten()
}

enum Failure {
    Timeout,
    Unreachable,
    Other,
}

/// Sorts an etcd-client error into "took too long", "could not reach etcd" and "etcd said no".
/// Transport failures surface in several shapes (a transport error, or a gRPC status with code
/// Unknown, Cancelled or Unavailable wrapping one), so look at the status code and its causes.
fn classify(error: &etcd_client::Error) -> Failure {
    use etcd_client::Error as E;
    match error {
        E::TransportError(e) if is_timeout(e) => Failure::Timeout,
        E::TransportError(_) | E::IoError(_) => Failure::Unreachable,
        E::GRpcStatus(status) => match status.code() {
            tonic::Code::DeadlineExceeded => Failure::Timeout,
            tonic::Code::Unavailable => Failure::Unreachable,
            _ => {
                let transport = std::error::Error::source(status)
                    .and_then(|s| s.downcast_ref::<tonic::transport::Error>());
                match transport {
                    Some(e) if is_timeout(e) => Failure::Timeout,
                    Some(_) => Failure::Unreachable,
                    None => Failure::Other,
                }
            }
        },
        _ => Failure::Other,
    }
}

fn is_timeout(error: &tonic::transport::Error) -> bool {
    // tonic exposes no accessor for its "timeout expired" kind; its Debug names it.
    format!("{error:?}").contains("TimeoutExpired")
}

fn to_kv(kv: &etcd_client::KeyValue) -> Result<KeyValue, StateError> {
    let key = kv
        .key_str()
        .map_err(|e| StateError::InvalidRequest(format!("non-UTF-8 key in etcd: {e}")))?;
    Ok(KeyValue {
        key: key.to_owned(),
        value: kv.value().to_vec(),
        create_revision: Revision(kv.create_revision()),
        mod_revision: Revision(kv.mod_revision()),
        version: kv.version(),
        lease: (kv.lease() != 0).then_some(LeaseId(kv.lease())),
    })
}

fn prefix_range(prefix: &str) -> GetOptions {
    if prefix.is_empty() {
        GetOptions::new().with_all_keys()
    } else {
        GetOptions::new().with_prefix()
    }
}

fn put_options(lease: Option<LeaseId>) -> Option<PutOptions> {
    lease.map(|l| PutOptions::new().with_lease(l.0))
}

fn compare(key: &str, expected: Expected) -> Compare {
    match expected {
        Expected::Absent => Compare::create_revision(key, CompareOp::Equal, 0),
        Expected::ModRevision(rev) => Compare::mod_revision(key, CompareOp::Equal, rev.0),
    }
}

/// Reads the outcome of a `when(compare).and_then(write).or_else(get)` transaction.
fn cas_outcome(resp: &etcd_client::TxnResponse) -> Result<CasOutcome, StateError> {
    let revision = Revision(resp.header().map_or(0, |h| h.revision()));
    if resp.succeeded() {
        return Ok(CasOutcome::Swapped(revision));
    }
    let current = match resp.op_responses().first() {
        Some(TxnOpResponse::Get(get)) => get.kvs().first().map(to_kv).transpose()?,
        _ => None,
    };
    Ok(CasOutcome::Conflict(current))
}

#[async_trait]
impl StateStore for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StateError> {
        let key = key.to_owned();
        let resp = self
            .call("get", |mut c| async move { c.get(key, None).await })
            .await?;
        resp.kvs().first().map(to_kv).transpose()
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StateError> {
        check_key(key)?;
        let key = key.to_owned();
        let resp = self
            .call("put", |mut c| async move {
                c.put(key, value, put_options(lease)).await
            })
            .await
            .map_err(|e| match lease {
                Some(l) => Self::lease_error(l, e),
                None => e,
            })?;
        Ok(Revision(resp.header().map_or(0, |h| h.revision())))
    }

    async fn delete(&self, key: &str) -> Result<Option<Revision>, StateError> {
        check_key(key)?;
        let key = key.to_owned();
        let resp = self
            .call("delete", |mut c| async move { c.delete(key, None).await })
            .await?;
        Ok((resp.deleted() > 0).then(|| Revision(resp.header().map_or(0, |h| h.revision()))))
    }

    async fn list(&self, dir: &str) -> Result<Listing, StateError> {
        let prefix = dir_prefix(dir);
        let resp = self
            .call("list", |mut c| async move {
                let options = prefix_range(&prefix);
                c.get(prefix, Some(options)).await
            })
            .await?;
        Ok(Listing {
            kvs: resp.kvs().iter().map(to_kv).collect::<Result<_, _>>()?,
            revision: Revision(resp.header().map_or(0, |h| h.revision())),
        })
    }

    async fn watch(&self, dir: &str, after: Revision) -> Result<WatchStream, StateError> {
        let mut cursor = EtcdWatch {
            store: self.clone(),
            prefix: dir_prefix(dir),
            next: Revision(after.0 + 1),
            stream: None,
            pending: VecDeque::new(),
            failed: false,
        };
        // Create the first watch now so that a bad request or a compacted revision is reported
        // by `watch` itself rather than by the first item.
        cursor.open().await?;
        Ok(Box::pin(futures::stream::unfold(
            cursor,
            |mut cursor| async move { cursor.next().await.map(|item| (item, cursor)) },
        )))
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StateError> {
        let ttl = ttl_seconds(ttl)?;
        let resp = self
            .call("grant_lease", |mut c| async move {
                c.lease_grant(ttl, None).await
            })
            .await?;
        Ok(LeaseId(resp.id()))
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StateError> {
        let resp = self
            .call("keep_alive", |mut c| async move {
                let (mut keeper, mut stream) = c.lease_keep_alive(lease.0).await?;
                keeper.keep_alive().await?;
                stream.message().await
            })
            .await
            .map_err(|e| Self::lease_error(lease, e))?;
        match resp {
            Some(r) if r.ttl() > 0 => Ok(Duration::from_secs(r.ttl().unsigned_abs())),
            // etcd answers a keep-alive of an unknown lease with TTL 0.
            _ => Err(StateError::LeaseNotFound(lease)),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StateError> {
        self.call("revoke_lease", |mut c| async move {
            c.lease_revoke(lease.0).await
        })
        .await
        .map_err(|e| Self::lease_error(lease, e))?;
        Ok(())
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Expected,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<CasOutcome, StateError> {
        check_key(key)?;
        check_expected(expected)?;
        let txn = Txn::new()
            .when([compare(key, expected)])
            .and_then([TxnOp::put(key, value, put_options(lease))])
            .or_else([TxnOp::get(key, None)]);
        let resp = self
            .call("compare_and_swap", |mut c| async move { c.txn(txn).await })
            .await
            .map_err(|e| match lease {
                Some(l) => Self::lease_error(l, e),
                None => e,
            })?;
        cas_outcome(&resp)
    }

    async fn compare_and_delete(
        &self,
        key: &str,
        expected: Expected,
    ) -> Result<CasOutcome, StateError> {
        check_key(key)?;
        check_expected(expected)?;
        if expected == Expected::Absent {
            return Ok(CasOutcome::Conflict(self.get(key).await?));
        }
        let txn = Txn::new()
            .when([compare(key, expected)])
            .and_then([TxnOp::delete(key, None)])
            .or_else([TxnOp::get(key, None)]);
        let resp = self
            .call(
                "compare_and_delete",
                |mut c| async move { c.txn(txn).await },
            )
            .await?;
        cas_outcome(&resp)
    }
}

/// The state an etcd watch stream carries between items.
struct EtcdWatch {
    store: EtcdStore,
    prefix: String,
    /// The first revision not yet delivered into `pending`.
    next: Revision,
    stream: Option<etcd_client::WatchStream>,
    pending: VecDeque<WatchEvent>,
    failed: bool,
}

impl EtcdWatch {
    /// Creates the etcd watch from `next`. A compacted start revision is reported by etcd as a
    /// cancelled watch carrying the compact revision.
    async fn open(&mut self) -> Result<(), StateError> {
        let prefix = self.prefix.clone();
        let start = self.next.0;
        let mut stream = self
            .store
            .call("watch", |mut c| async move {
                let options = if prefix.is_empty() {
                    WatchOptions::new().with_all_keys()
                } else {
                    WatchOptions::new().with_prefix()
                }
                .with_start_revision(start);
                c.watch(prefix, Some(options)).await
            })
            .await?;
        // The first message confirms creation (or reports cancellation).
        let first = tokio::time::timeout(self.store.request_timeout, stream.message()).await;
        match first {
            Ok(Ok(Some(resp))) => self.absorb(&resp)?,
            Ok(Ok(None)) => {
                return Err(StateError::Unavailable {
                    endpoint: self.store.endpoint.clone(),
                    source: "watch stream closed before it was created".into(),
                });
            }
            Ok(Err(e)) => return Err(self.store.map_error("watch", e)),
            Err(_) => {
                return Err(StateError::Timeout {
                    endpoint: self.store.endpoint.clone(),
                    op: "watch",
                    after: self.store.request_timeout,
                });
            }
        }
        self.stream = Some(stream);
        Ok(())
    }

    /// Takes one watch response's events; an error if etcd cancelled the watch.
    fn absorb(&mut self, resp: &etcd_client::WatchResponse) -> Result<(), StateError> {
        if resp.canceled() {
            if resp.compact_revision() > 0 {
                return Err(StateError::Compacted {
                    requested: Revision(self.next.0 - 1),
                    compacted: Revision(resp.compact_revision() - 1),
                });
            }
            return Err(StateError::Backend {
                endpoint: self.store.endpoint.clone(),
                op: "watch",
                source: format!("etcd cancelled the watch: {}", resp.cancel_reason()).into(),
            });
        }
        let mut last = None;
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            let revision = Revision(kv.mod_revision());
            // After a re-creation etcd can resend what we already have; skip it.
            if revision < self.next {
                continue;
            }
            let event = match event.event_type() {
                EventType::Put => WatchEvent::Put(to_kv(kv)?),
                EventType::Delete => WatchEvent::Delete {
                    key: to_kv(kv)?.key,
                    revision,
                },
            };
            self.pending.push_back(event);
            last = Some(revision);
        }
        if let Some(last) = last {
            self.next = Revision(last.0 + 1);
        }
        Ok(())
    }

    async fn next(&mut self) -> Option<Result<WatchEvent, StateError>> {
        let mut backoff = WATCH_RETRY_MIN;
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(Ok(event));
            }
            if self.failed {
                return None;
            }
            let Some(stream) = self.stream.as_mut() else {
                match self.open().await {
                    Ok(()) => backoff = WATCH_RETRY_MIN,
                    Err(e) if e.is_transient() => {
                        tracing::warn!(error = %e, prefix = %self.prefix, "etcd watch lost; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(WATCH_RETRY_MAX);
                    }
                    Err(e) => {
                        self.failed = true;
                        return Some(Err(e));
                    }
                }
                continue;
            };
            match stream.message().await {
                Ok(Some(resp)) => {
                    if let Err(e) = self.absorb(&resp) {
                        self.failed = true;
                        return Some(Err(e));
                    }
                }
                Ok(None) | Err(_) => {
                    tracing::debug!(prefix = %self.prefix, next = %self.next, "etcd watch stream ended; re-creating");
                    self.stream = None;
                }
            }
        }
    }
}

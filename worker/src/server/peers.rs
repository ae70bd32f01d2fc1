//! KV blocks between workers (issue #21, point 3): the route a peer pulls blocks from
//! (`POST /v1/kv/blocks`) and the puller that carries out this worker's pulls.
//!
//! When the router places a request on a worker that lacks the prompt's cached prefix while
//! another worker holds it, the request carries a [`tidelock_protocol::PullHint`]. The engine
//! marks the missing blocks as loading and hands the server a [`PullJob`]; the puller asks the
//! holder for them over a pooled keep-alive connection, checks every block (its checksum, and
//! this worker's layout), and hands the good ones to the engine, which copies them into the
//! store at admission, as it does blocks from its own disk. Blocks that do not come (the holder
//! evicted them, failed, or is gone) are recomputed. A block is asked for by its salted hash, so
//! it can only ever serve the tenant whose salt named it.
//!
//! The body is `tidelock_protocol::blocks` (layout, then per block its hash, payload and
//! checksum), the format of the disk tier's files: the holder sends what it holds in memory as
//! it lies and what it holds on disk as read and checked there.

use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tidelock_protocol::blocks::{self, BlockLayout};
use tidelock_protocol::{BlockHash, BlocksRequest, ClusterToken, MAX_PULL_BLOCKS};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::sync::oneshot;

use super::runner::{Command, Exported};
use super::{AppState, engine_gone, error_response};
use crate::engine::{Export, PullJob};

/// The route peers pull blocks from.
pub const PATH: &str = "/v1/kv/blocks";
/// The reply's content type: a `tidelock_protocol::blocks` body.
pub const CONTENT_TYPE: &str = "application/vnd.tidelock.kv-blocks";
/// A pull that has not finished in this time gives up (its blocks are recomputed).
const PULL_TIMEOUT: Duration = Duration::from_secs(60);

/// `POST /v1/kv/blocks`: the leading blocks of the chain asked for that this worker holds.
pub async fn blocks(State(state): State<AppState>, body: Bytes) -> Response {
    let request: BlocksRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                format!("a body of {{\"hashes\": [...]}}: {e}"),
            );
        }
    };
    if request.hashes.len() > MAX_PULL_BLOCKS {
        return error_response(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!(
                "{} blocks asked for; at most {MAX_PULL_BLOCKS} per request",
                request.hashes.len()
            ),
        );
    }
    let (reply, answer) = oneshot::channel();
    let sent = state.commands.send(Command::Export {
        hashes: request.hashes,
        reply,
    });
    let Ok(Exported {
        blocks: exported,
        layout,
        disk,
    }) = (match sent {
        Ok(()) => answer.await.map_err(|_| ()),
        Err(_) => Err(()),
    })
    else {
        return engine_gone();
    };
    let Some(layout) = layout else {
        return error_response(
            StatusCode::NOT_IMPLEMENTED,
            "not_implemented",
            "this worker's KV blocks cannot leave it (a shard group)",
        );
    };
    // Disk reads and checksums off the async threads.
    let body = tokio::task::spawn_blocking(move || {
        let mut held: Vec<(BlockHash, Bytes)> = Vec::with_capacity(exported.len());
        for e in exported {
            match e {
                Export::Bytes(hash, bytes) => held.push((hash, bytes)),
                Export::OnDisk(hash) => match disk.as_ref().map(|d| d.read(&hash)) {
                    Some(Ok(bytes)) => held.push((hash, bytes)),
                    _ => break,
                },
            }
        }
        let refs: Vec<(BlockHash, &[u8])> = held.iter().map(|(h, b)| (*h, &b[..])).collect();
        blocks::encode(&layout, &refs)
    })
    .await;
    match body {
        Ok(Ok(body)) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response(),
        Ok(Err(e)) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            e.to_string(),
        ),
        Err(e) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            e.to_string(),
        ),
    }
}

/// The puller's channel: the engine thread's pull jobs go in. Without a Tokio runtime (a test
/// driving the engine alone) there is no puller, and pulls fail at once (recomputed).
pub fn channel() -> (UnboundedSender<PullJob>, UnboundedReceiver<PullJob>) {
    unbounded_channel()
}

/// Starts the puller: each job on its own task, over one pooled client (keep-alive
/// connections to each peer), its result sent back to the engine as [`Command::Pulled`].
pub fn spawn_puller(
    mut jobs: UnboundedReceiver<PullJob>,
    commands: Sender<Command>,
    layout: Option<BlockLayout>,
    token: Option<ClusterToken>,
) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let authorization = token.map(|t| t.authorization());
    runtime.spawn(async move {
        while let Some(job) = jobs.recv().await {
            let (client, commands, authorization) =
                (client.clone(), commands.clone(), authorization.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                let result = tokio::time::timeout(
                    PULL_TIMEOUT,
                    fetch(&client, &job, authorization.as_deref()),
                )
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {PULL_TIMEOUT:?}")));
                let (arrived, missed, problem) = match result {
                    Ok(body) => {
                        let hashes = job.hashes.clone();
                        tokio::task::spawn_blocking(move || sort(&body, layout.as_ref(), &hashes))
                            .await
                            .unwrap_or_else(|e| (Vec::new(), job.hashes.clone(), Some(e.to_string())))
                    }
                    Err(e) => (Vec::new(), job.hashes.clone(), Some(e)),
                };
                if let Some(problem) = problem {
                    tracing::warn!(peer = %job.from, blocks = job.hashes.len(), missed = missed.len(), %problem, "a KV pull fell short; recomputing what did not come");
                }
                let secs = started.elapsed().as_secs_f64() / arrived.len().max(1) as f64;
                let _ = commands.send(Command::Pulled {
                    arrived,
                    missed,
                    secs,
                });
            });
        }
    });
}

/// Asks `job.from` for the job's blocks; the reply's body.
async fn fetch(
    client: &Client<HttpConnector, Full<Bytes>>,
    job: &PullJob,
    authorization: Option<&str>,
) -> Result<Bytes, String> {
    let body = serde_json::to_vec(&BlocksRequest {
        hashes: job.hashes.clone(),
    })
    .map_err(|e| e.to_string())?;
    let mut request = hyper::Request::post(format!("{}{PATH}", job.from.trim_end_matches('/')))
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(auth) = authorization {
        request = request.header(header::AUTHORIZATION, auth);
    }
    let request = request
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let response = client.request(request).await.map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    match status.is_success() {
        true => Ok(body),
        false => Err(format!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        )),
    }
}

/// Splits a reply into the blocks asked for that arrived intact in this worker's layout, and the
/// rest; with what went wrong, if anything did.
#[allow(clippy::type_complexity)]
fn sort(
    body: &[u8],
    layout: Option<&BlockLayout>,
    asked: &[BlockHash],
) -> (
    Vec<(BlockHash, bytes::Bytes)>,
    Vec<BlockHash>,
    Option<String>,
) {
    let decoded = match blocks::decode(body) {
        Ok(d) => d,
        Err(e) => return (Vec::new(), asked.to_vec(), Some(e.to_string())),
    };
    if Some(&decoded.layout) != layout {
        return (
            Vec::new(),
            asked.to_vec(),
            Some(format!(
                "the peer's blocks are laid out as {:?}, this worker's as {layout:?}",
                decoded.layout
            )),
        );
    }
    let wanted: std::collections::HashSet<&BlockHash> = asked.iter().collect();
    let arrived: Vec<(BlockHash, bytes::Bytes)> = decoded
        .blocks
        .iter()
        .filter(|(h, _)| wanted.contains(h))
        .map(|(h, payload)| (*h, bytes::Bytes::copy_from_slice(payload)))
        .collect();
    let got: std::collections::HashSet<&BlockHash> = arrived.iter().map(|(h, _)| h).collect();
    let missed: Vec<BlockHash> = asked.iter().filter(|h| !got.contains(h)).copied().collect();
    let problem = (!decoded.damaged.is_empty())
        .then(|| format!("{} blocks failed their checksum", decoded.damaged.len()));
    (arrived, missed, problem)
}

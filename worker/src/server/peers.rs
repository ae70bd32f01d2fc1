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
use axum::http::header;
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tidelock_protocol::blocks::{self, BlockLayout};
use tidelock_protocol::openai::OpenAiError;
use tidelock_protocol::{BlockHash, BlocksRequest, ClusterToken, MAX_PULL_BLOCKS};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::oneshot;

use super::runner::{Command, Exported};
use tidelock_openai::error_response;

use super::{AppState, engine_gone};
use crate::engine::{Export, PullJob};

/// The route peers pull blocks from.
pub const PATH: &str = "/v1/kv/blocks";
/// The reply's content type: a `tidelock_protocol::blocks` body.
pub const CONTENT_TYPE: &str = "application/vnd.tidelock.kv-blocks";
/// A pull that has not finished in this time gives up (its blocks are recomputed).
const PULL_TIMEOUT: Duration = Duration::from_secs(60);

/// `body` as JSON of type `T`, or the 400 to answer, naming the `shape` expected.
pub(crate) fn json_body<T: serde::de::DeserializeOwned>(
    body: &[u8],
    shape: &str,
) -> Result<T, Box<Response>> {
    serde_json::from_slice(body).map_err(|e| {
        Box::new(error_response(&OpenAiError::bad_request(format!(
            "a body of {shape}: {e}"
        ))))
    })
}

/// The 400 for more than [`MAX_PULL_BLOCKS`] blocks in one request (`what`: "asked for",
/// "offered").
pub(crate) fn within_pull_limit(blocks: usize, what: &str) -> Result<(), Box<Response>> {
    if blocks <= MAX_PULL_BLOCKS {
        return Ok(());
    }
    Err(Box::new(error_response(&OpenAiError::bad_request(
        format!("{blocks} blocks {what}; at most {MAX_PULL_BLOCKS} per request"),
    ))))
}

/// `POST /v1/kv/blocks`: the leading blocks of the chain asked for that this worker holds.
pub async fn blocks(State(state): State<AppState>, body: Bytes) -> Response {
    let request: BlocksRequest = match json_body(&body, "{\"hashes\": [...]}") {
        Ok(r) => r,
        Err(refused) => return *refused,
    };
    if let Err(refused) = within_pull_limit(request.hashes.len(), "asked for") {
        return *refused;
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
        return error_response(&OpenAiError::not_implemented(
            "this worker's KV blocks cannot leave it (a shard group)",
        ));
    };
    // The body streams out as it is made: disk reads and checksums on a blocking thread, a few
    // blocks ahead of the socket; payloads go out as they lie, never copied into one buffer.
    let (parts, body) = tokio::sync::mpsc::channel::<Bytes>(4 * 3);
    tokio::task::spawn_blocking(move || {
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
        let Ok(prefix) = blocks::encode_prefix(&layout, held.len()) else {
            return;
        };
        if parts.blocking_send(Bytes::from(prefix)).is_err() {
            return;
        }
        for (hash, payload) in held {
            let sum = blocks::checksum(&layout, &hash, &payload);
            let head = blocks::block_prefix(&hash, payload.len() as u64);
            for part in [
                Bytes::copy_from_slice(&head),
                payload,
                Bytes::copy_from_slice(&sum),
            ] {
                if parts.blocking_send(part).is_err() {
                    return; // The peer went away.
                }
            }
        }
    });
    let stream = tokio_stream_from(body);
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
}

/// The parts of a streamed body as a stream.
fn tokio_stream_from(
    mut parts: tokio::sync::mpsc::Receiver<Bytes>,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> {
    futures::stream::poll_fn(move |cx| parts.poll_recv(cx).map(|part| part.map(Ok)))
}

/// How this worker reaches its peers: one pooled client (keep-alive connections to each), the
/// cluster credential it presents, and the layout its blocks must have.
#[derive(Debug, Clone)]
pub struct Peers {
    pub client: Client<HttpConnector, Full<Bytes>>,
    pub authorization: Option<String>,
    pub layout: Option<BlockLayout>,
}

impl Peers {
    pub fn new(layout: Option<BlockLayout>, token: Option<ClusterToken>) -> Self {
        Peers {
            client: Client::builder(TokioExecutor::new()).build_http(),
            authorization: token.map(|t| t.authorization()),
            layout,
        }
    }

    /// [`Peers::fetch`], giving up after [`PULL_TIMEOUT`].
    pub async fn pull(&self, from: &str, hashes: &[BlockHash]) -> Result<Received, PeerError> {
        tokio::time::timeout(PULL_TIMEOUT, self.fetch(from, hashes))
            .await
            .unwrap_or(Err(PeerError::Timeout(PULL_TIMEOUT)))
    }

    /// POSTs `body` (JSON) to `url` with the cluster credential; the whole reply, if its
    /// status is a success.
    pub(crate) async fn post_json(
        &self,
        url: &str,
        body: Vec<u8>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, PeerError> {
        let mut request =
            hyper::Request::post(url).header(header::CONTENT_TYPE, "application/json");
        if let Some(auth) = &self.authorization {
            request = request.header(header::AUTHORIZATION, auth.as_str());
        }
        let response = self
            .client
            .request(request.body(Full::new(Bytes::from(body)))?)
            .await?;
        let status = response.status();
        if !status.is_success() {
            let text = response.into_body().collect().await?.to_bytes();
            return Err(PeerError::Status {
                status: status.as_u16(),
                message: String::from_utf8_lossy(&text[..text.len().min(300)]).into_owned(),
            });
        }
        Ok(response)
    }
}

/// Why a call to a peer worker failed, or why its reply stopped short.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("this worker cannot import blocks")]
    NoLayout,
    #[error("not a request: {0}")]
    Request(#[from] hyper::http::Error),
    /// No connection, or it broke before the reply's head.
    #[error("{0}")]
    Send(#[from] hyper_util::client::legacy::Error),
    #[error("HTTP {status}: {message}")]
    Status { status: u16, message: String },
    /// The connection broke while the reply was read.
    #[error("reading the reply: {0}")]
    Body(#[from] hyper::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("not the JSON expected: {0}")]
    Json(#[from] serde_json::Error),
    /// The blocks' stream was not one (a bad prefix or block header).
    #[error("{0}")]
    Wire(#[from] tidelock_protocol::binary::WireError),
    #[error("the peer's blocks are laid out as {theirs:?}, this worker's as {ours:?}")]
    Layout {
        theirs: BlockLayout,
        ours: BlockLayout,
    },
    #[error("block {0} failed its checksum")]
    Checksum(BlockHash),
    #[error("the reply ended inside a block")]
    Truncated,
}

/// Starts the puller: each job on its own task, over the peers' pooled client, its result
/// sent back to the engine as [`Command::Pulled`]. Without a Tokio runtime (a test driving the
/// server alone) there is no puller: `jobs` is dropped, and the engine recomputes what it
/// would have pulled.
pub fn spawn_puller(mut jobs: UnboundedReceiver<PullJob>, commands: Sender<Command>, peers: Peers) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        while let Some(job) = jobs.recv().await {
            let (peers, commands) = (peers.clone(), commands.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                let result = peers.pull(&job.from, &job.hashes).await;
                let (arrived, missed, problem) = match result {
                    Ok(received) => {
                        let got: std::collections::HashSet<BlockHash> =
                            received.blocks.iter().map(|(h, _)| *h).collect();
                        let missed: Vec<BlockHash> = job
                            .hashes
                            .iter()
                            .filter(|h| !got.contains(h))
                            .copied()
                            .collect();
                        (received.blocks, missed, received.problem)
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

/// What a pull brought.
#[derive(Debug)]
pub struct Received {
    /// Blocks asked for that arrived whole, checked, in this worker's layout.
    pub blocks: Vec<(BlockHash, Bytes)>,
    /// What went wrong, if anything did (what came before it is kept).
    pub problem: Option<PeerError>,
}

/// A [`BlocksRequest`] over borrowed hashes (the same JSON).
#[derive(serde::Serialize)]
struct Ask<'a> {
    hashes: &'a [BlockHash],
}

impl Peers {
    /// Asks `from` for `hashes` and reads the reply as it streams in: each block is checked as
    /// soon as it is whole, while the next one arrives.
    pub async fn fetch(&self, from: &str, hashes: &[BlockHash]) -> Result<Received, PeerError> {
        let layout = self.layout.as_ref().ok_or(PeerError::NoLayout)?;
        let body = serde_json::to_vec(&Ask { hashes })?;
        let url = format!("{}{PATH}", from.trim_end_matches('/'));
        let mut body = self.post_json(&url, body).await?.into_body();
        let wanted: std::collections::HashSet<&BlockHash> = hashes.iter().collect();
        let mut out = Received {
            blocks: Vec::new(),
            problem: None,
        };
        let mut buf = bytes::BytesMut::new();
        let mut reader = StreamReader::Prefix;
        loop {
            // Take out everything whole in the buffer.
            loop {
                match reader.next(&mut buf, layout) {
                    Ok(Some((hash, payload))) => {
                        if wanted.contains(&hash) {
                            out.blocks.push((hash, payload));
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        out.problem = Some(e);
                        return Ok(out);
                    }
                }
            }
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        if buf.capacity() - buf.len() < data.len() {
                            // Room for the rest of the block in hand, not just this frame.
                            buf.reserve(data.len().max(reader.wants(layout)));
                        }
                        buf.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => {
                    out.problem = Some(PeerError::Body(e));
                    return Ok(out);
                }
                None => break,
            }
        }
        if !matches!(reader, StreamReader::Done) {
            out.problem = Some(PeerError::Truncated);
        }
        Ok(out)
    }
}

/// Where a streamed reply's reader is.
enum StreamReader {
    Prefix,
    /// Blocks left to read.
    Blocks(u32),
    Done,
}

impl StreamReader {
    /// Bytes the next piece needs.
    fn wants(&self, layout: &BlockLayout) -> usize {
        match self {
            StreamReader::Prefix => blocks::PREFIX_BYTES,
            StreamReader::Blocks(_) => {
                24 + layout.payload_bytes() as usize + blocks::CHECKSUM_BYTES
            }
            StreamReader::Done => 0,
        }
    }

    /// The next whole block out of `buf`, if it holds one (checked: a block that fails its
    /// checksum is an error, as is another layout).
    fn next(
        &mut self,
        buf: &mut bytes::BytesMut,
        layout: &BlockLayout,
    ) -> Result<Option<(BlockHash, Bytes)>, PeerError> {
        loop {
            let want = self.wants(layout);
            match self {
                StreamReader::Done => return Ok(None),
                _ if buf.len() < want => return Ok(None),
                StreamReader::Prefix => {
                    let prefix = buf.split_to(want);
                    let (got, n) = blocks::parse_prefix(&prefix)?;
                    if got != *layout {
                        return Err(PeerError::Layout {
                            theirs: got,
                            ours: *layout,
                        });
                    }
                    *self = match n {
                        0 => StreamReader::Done,
                        n => StreamReader::Blocks(n),
                    };
                }
                StreamReader::Blocks(left) => {
                    let mut piece = buf.split_to(want).freeze();
                    let (hash, len) = blocks::parse_block_prefix(layout, &piece[..24])?;
                    let sum = piece.split_off(24 + len as usize);
                    let payload = piece.slice(24..);
                    if sum[..] != blocks::checksum(layout, &hash, &payload) {
                        return Err(PeerError::Checksum(hash));
                    }
                    *left -= 1;
                    if *left == 0 {
                        *self = StreamReader::Done;
                    }
                    return Ok(Some((hash, payload)));
                }
            }
        }
    }
}

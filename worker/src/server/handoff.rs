//! A draining worker's blocks move to peers chosen by the router (issue #21, point 4).
//!
//! When a worker drains, every router sees `draining` in its load report and works out, from
//! its KV index and the cost model, which peer should take each of the worker's cached chains
//! (where those sessions' next turns will go). It sends the plan to the draining worker
//! (`POST /v1/kv/handoff`, [`HandoffPlan`]); the first plan wins. The worker asks each peer to
//! adopt its share (`POST /v1/kv/adopt`, [`AdoptRequest`]): the peer pulls the blocks from the
//! draining worker's `/v1/kv/blocks`, exactly as a pull for a request does (streamed, every
//! block checked), and keeps them (see [`crate::engine::Engine::adopt`]). The draining worker
//! waits for its peers' answers, bounded by its drain deadline, before it deregisters and exits,
//! so the blocks are gone from it only once a peer holds them.
//!
//! Blocks are named by their salted hashes: a peer that adopts a block serves it only to
//! prompts whose chain (tenant salt included) names it, as for any other cached block.

use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use tidelock_protocol::openai::OpenAiError;
use tidelock_protocol::{AdoptReply, AdoptRequest, HandoffPlan, MAX_PULL_BLOCKS};
use tokio::sync::{oneshot, watch};

use super::peers::{PeerError, Peers, json_body, within_pull_limit};
use super::runner::Command;
use tidelock_openai::error_response;

use super::{AppState, engine_gone};

/// The route a router sends a draining worker's plan to.
pub const HANDOFF_PATH: &str = "/v1/kv/handoff";
/// The route a draining peer asks this worker to adopt blocks on.
pub const ADOPT_PATH: &str = "/v1/kv/adopt";
/// How long a drained worker waits for a router's plan once its requests are done. Routers
/// probe every 500 ms by default, so a plan comes within a second of the drain's start; a worker
/// no router follows loses only this.
pub const PLAN_WAIT: Duration = Duration::from_secs(2);

/// Where this worker's handoff is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No plan has come.
    Waiting,
    /// A plan is being carried out.
    Running,
    /// Done: blocks the peers said they keep.
    Done { kept: usize },
}

/// The handoff's state, shared by the route and the shutdown sequence.
#[derive(Debug)]
pub struct Handoff {
    phase: watch::Sender<Phase>,
}

impl Default for Handoff {
    fn default() -> Self {
        Handoff {
            phase: watch::channel(Phase::Waiting).0,
        }
    }
}

impl Handoff {
    /// Waits for the handoff: for a plan at most [`PLAN_WAIT`], for one under way until
    /// `deadline`. Returns the phase it ended in.
    pub async fn wait(&self, deadline: Instant) -> Phase {
        let mut phase = self.phase.subscribe();
        let plan_by = deadline.min(Instant::now() + PLAN_WAIT);
        let came =
            tokio::time::timeout_at(plan_by.into(), phase.wait_for(|p| *p != Phase::Waiting));
        if !matches!(came.await, Ok(Ok(_))) {
            return Phase::Waiting;
        }
        let done = phase.wait_for(|p| matches!(p, Phase::Done { .. }));
        let _ = tokio::time::timeout_at(deadline.into(), done).await;
        *phase.borrow()
    }
}

/// `POST /v1/kv/handoff`: a router's plan for this draining worker's blocks. Answers at once
/// (202); the peers are asked in the background.
pub async fn handoff(State(state): State<AppState>, body: Bytes) -> Response {
    let shape = "{\"from\": URL, \"peers\": [{\"to\": URL, \"hashes\": [...]}]}";
    let plan: HandoffPlan = match json_body(&body, shape) {
        Ok(p) => p,
        Err(refused) => return *refused,
    };
    if !state.draining.load(std::sync::atomic::Ordering::Relaxed) {
        return error_response(&OpenAiError::conflict(
            "this worker is not draining: only a draining worker hands its blocks over",
        ));
    }
    let started = state.handoff.phase.send_if_modified(|p| match p {
        Phase::Waiting => {
            *p = Phase::Running;
            true
        }
        _ => false,
    });
    if !started {
        return error_response(&OpenAiError::conflict(
            "a handoff plan was already taken (another router's)",
        ));
    }
    let blocks: usize = plan.peers.iter().map(|p| p.hashes.len()).sum();
    tracing::info!(
        peers = plan.peers.len(),
        blocks,
        "handing the KV cache over to peers"
    );
    let accepted = serde_json::json!({"peers": plan.peers.len(), "blocks": blocks});
    tokio::spawn(carry_out(state, plan));
    (StatusCode::ACCEPTED, axum::Json(accepted)).into_response()
}

/// Asks every peer of `plan` to adopt its share, all at once, each in chunks of at most
/// [`MAX_PULL_BLOCKS`]; then marks the handoff done.
async fn carry_out(state: AppState, plan: HandoffPlan) {
    let started = Instant::now();
    let asks = plan.peers.iter().map(|peer| {
        let (state, from) = (state.clone(), plan.from.clone());
        async move {
            let mut kept = 0usize;
            for chunk in peer.hashes.chunks(MAX_PULL_BLOCKS) {
                let request = AdoptRequest {
                    from: from.clone(),
                    hashes: chunk.to_vec(),
                };
                match ask(&state.peers, &peer.to, &request).await {
                    Ok(reply) => kept += reply.kept as usize,
                    Err(e) => {
                        tracing::warn!(peer = %peer.to, blocks = chunk.len(), error = %e, "a peer did not adopt its share of the handoff");
                        break;
                    }
                }
            }
            kept
        }
    });
    let kept: usize = futures::future::join_all(asks).await.into_iter().sum();
    state
        .metrics
        .handoff_blocks
        .with_label_values(&["handed_over"])
        .inc_by(kept as u64);
    tracing::info!(
        kept,
        secs = started.elapsed().as_secs_f64(),
        "KV cache handed over"
    );
    state.handoff.phase.send_replace(Phase::Done { kept });
}

/// One adopt request to `to`.
async fn ask(peers: &Peers, to: &str, request: &AdoptRequest) -> Result<AdoptReply, PeerError> {
    let url = format!("{}{ADOPT_PATH}", to.trim_end_matches('/'));
    let response = peers.post_json(&url, serde_json::to_vec(request)?).await?;
    let body = response.into_body().collect().await?.to_bytes();
    Ok(serde_json::from_slice(&body)?)
}

/// `POST /v1/kv/adopt`: pulls the blocks a draining peer hands over and keeps them.
pub async fn adopt(State(state): State<AppState>, body: Bytes) -> Response {
    let request: AdoptRequest = match json_body(&body, "{\"from\": URL, \"hashes\": [...]}") {
        Ok(r) => r,
        Err(refused) => return *refused,
    };
    if let Err(refused) = within_pull_limit(request.hashes.len(), "offered") {
        return *refused;
    }
    if state.draining.load(std::sync::atomic::Ordering::Relaxed) {
        return error_response(&OpenAiError::draining(
            "this worker is draining too: it takes no blocks",
        ));
    }
    let received = match state.peers.pull(&request.from, &request.hashes).await {
        Ok(received) => {
            if let Some(problem) = &received.problem {
                tracing::warn!(peer = %request.from, arrived = received.blocks.len(), %problem, "a handoff pull fell short; keeping what came");
            }
            received.blocks
        }
        Err(e) => {
            return error_response(&OpenAiError::upstream(format!(
                "cannot pull the blocks from {}: {e}",
                request.from
            )));
        }
    };
    let count = received.len();
    let (reply, answer) = oneshot::channel();
    let kept = match state.commands.send(Command::Adopt {
        blocks: received,
        reply,
    }) {
        Ok(()) => match answer.await {
            Ok(kept) => kept,
            Err(_) => return engine_gone(),
        },
        Err(_) => return engine_gone(),
    };
    state
        .metrics
        .handoff_blocks
        .with_label_values(&["adopted"])
        .inc_by(kept as u64);
    axum::Json(AdoptReply {
        received: count as u32,
        kept: kept as u32,
    })
    .into_response()
}

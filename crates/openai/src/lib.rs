//! The OpenAI surface the router and the worker share, so both answer a request the same way:
//!
//! - [`parse`] reads a `/v1/chat/completions` or `/v1/completions` body; [`Parsed::prepare`]
//!   renders the chat template and tokenizes with the model's [`PromptKit`], giving the token ids,
//!   sampling parameters and stop strings of a [`GenerateRequest`](tidelock_protocol::GenerateRequest);
//! - [`respond`] turns the worker's stream of [`GenerateEvent`](tidelock_protocol::GenerateEvent)s
//!   back into an OpenAI answer: one JSON body, or server-sent events shaped as OpenAI sends them
//!   (role chunk, content chunks, optional usage chunk, `data: [DONE]`), with incremental
//!   detokenization and stop strings matched across token boundaries and never emitted.
//!
//! - [`Continuations`] is a router's turn memory: a session's last prompt and answer as the ids
//!   the worker cached, so the next turn starts from them instead of re-tokenizing the answer.
//!
//! - [`require_host`] refuses HTTP/1.1 requests without a `Host` header, on every route.
//!
//! Where the events come from is the caller's business: the worker's engine channel, or the
//! router's proxied (and retried) worker stream. Dropping the answer's body drops the event
//! stream, which is how a client that goes away cancels generation in both.

mod continuation;
mod host;
mod prepare;
mod respond;

pub use continuation::{
    Answer, Continuation, Continuations, MemoryKey, PromptText, TurnRecord, TurnRecordError,
};
pub use host::require_host;
pub use prepare::{Endpoint, Parsed, Prepared, Rendered, ToolReading, parse, unix_now};
pub use respond::{OnAnswer, error_response, respond, respond_then};

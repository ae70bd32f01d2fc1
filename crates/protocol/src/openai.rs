//! OpenAI-compatible API types: the requests, responses, stream chunks and errors of
//! `/v1/chat/completions`, `/v1/completions` and `/v1/models`, served by the router's public API
//! and by each worker's own OpenAI surface.
//!
//! Why one module: both surfaces must accept the same requests, validate them the same way and
//! answer byte-for-byte like OpenAI, so that the official SDKs work unchanged against either.
//!
//! Invariants:
//! - Parsing is tolerant: unknown fields are ignored, and `null` is accepted wherever a client may
//!   send it for an omitted field. Nothing here denies unknown fields.
//! - Serialising follows OpenAI: optionals OpenAI omits are omitted, fields OpenAI sends as
//!   `null` (`finish_reason` in stream chunks, `logprobs`, `usage` on chunks when usage is
//!   requested) are `null`; `usage.prompt_tokens_details.cached_tokens` is always present.
//! - [`ChatCompletionRequest::sampling`] and [`CompletionRequest::sampling`] are the one place
//!   request fields become [`SamplingParams`](crate::SamplingParams), and every validation error names its `param`.
//! - [`OpenAiError`] is the one place errors of the OpenAI surface get an HTTP status and a body.
//! - Any body that is not a valid request (not UTF-8, not JSON, a field of the wrong type, a
//!   value out of range) is a 400 in OpenAI's shape, never a panic (`tests/request_props.rs`).
//!
//! Modules: `request` (request bodies and their validation), `response` (completions, stream
//! chunks, usage, model list), `error` ([`OpenAiError`]); server-sent event framing is here.

mod error;
mod request;
mod response;

use serde::{Deserialize, Deserializer, Serialize};

pub use error::{ErrorKind, OpenAiError};
pub use request::{
    ChatCompletionRequest, ChatMessageIn, CommonFields, CompletionRequest, ContentPart, MAX_TOOLS,
    MessageContent, OfferedFunction, Prompt, PromptInput, SESSION_HEADER, Stop, StreamOptions,
    ToolChoice, ToolPlan,
};
pub use response::{
    ChatChoice, ChatCompletion, ChatCompletionChunk, ChatMessageOut, ChunkChoice, Completion,
    CompletionChoice, CompletionChunk, Delta, FunctionCall, FunctionDelta, ModelCard, ModelList,
    PromptTokensDetails, ResponseMeta, TokenLogprob, ToolCallDelta, ToolCallOut, Usage,
    chat_logprobs, completion_logprobs, finish_reason,
};

/// The most stop sequences a request may carry, as with OpenAI.
pub const MAX_STOP_SEQUENCES: usize = 4;

/// The longest stop sequence, in bytes. Stop matching holds back and rescans up to the longest
/// stop's length per generated token, so an unbounded one (4 MiB in issue #18's probe: 86 s of
/// router CPU for one request) would let a single request occupy the router.
pub const MAX_STOP_BYTES: usize = 1024;

/// The default `max_tokens` of `/v1/completions`, as with OpenAI.
pub const COMPLETION_DEFAULT_MAX_TOKENS: u32 = 16;

/// The end of a server-sent event stream, as OpenAI sends it.
pub const SSE_DONE: &str = "data: [DONE]\n\n";

/// Reads a missing or `null` field as its default (clients send `"stream": null` and the like).
pub(crate) fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// Reads a present field, `null` included, as `Some`; with `#[serde(default)]` a missing one is
/// `None`. Used where "absent" and "null" serialise differently.
pub(crate) fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

/// One server-sent event: `data: {json}\n\n`.
pub fn sse_data(value: &impl Serialize) -> String {
    match serde_json::to_string(value) {
        Ok(json) => format!("data: {json}\n\n"),
        // Only a type with a failing `Serialize` gets here; say so in OpenAI's shape.
        Err(_) => concat!(
            r#"data: {"error":{"message":"failed to serialise an event","#,
            r#""type":"server_error","param":null,"code":null}}"#,
            "\n\n"
        )
        .to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn server_sent_event_framing() {
        assert_eq!(sse_data(&json!({"a": 1})), "data: {\"a\":1}\n\n");
        assert_eq!(SSE_DONE, "data: [DONE]\n\n");
    }

    #[test]
    fn serialisation_failures_still_give_an_event() {
        struct Failing;
        impl Serialize for Failing {
            fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
                Err(serde::ser::Error::custom("no"))
            }
        }
        let event = sse_data(&Failing);
        let json = event
            .strip_prefix("data: ")
            .and_then(|rest| rest.strip_suffix("\n\n"))
            .unwrap();
        let value: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(value["error"]["type"], "server_error");
    }
}

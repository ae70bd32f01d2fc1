//! OpenAI response bodies and stream chunks.
//!
//! Shapes follow OpenAI field for field: `logprobs` and `finish_reason` are `null` rather than
//! absent, a chunk's `usage` is absent unless the client asked for it and then `null` on every
//! chunk but the last (which has no choices), and `usage.prompt_tokens_details.cached_tokens` is
//! always present so clients can see what the KV cache saved. [`ResponseMeta`] builds every chunk
//! of one stream so the id, timestamp and usage convention cannot drift between chunks.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{null_as_default, present};
use crate::wire::{self, FinishReason};

/// `finish_reason` as OpenAI spells it; a cancelled request has none.
pub fn finish_reason(reason: FinishReason) -> Option<String> {
    match reason {
        FinishReason::Stop => Some("stop".to_owned()),
        FinishReason::Length => Some("length".to_owned()),
        FinishReason::Cancelled => None,
    }
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens served from the KV cache.
    #[serde(default, deserialize_with = "null_as_default")]
    pub cached_tokens: u32,
}

/// `usage`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens in the prompt, cached or not.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
    /// `prompt_tokens + completion_tokens`.
    pub total_tokens: u32,
    /// Always sent, so clients can read `cached_tokens` even when it is 0.
    #[serde(default, deserialize_with = "null_as_default")]
    pub prompt_tokens_details: PromptTokensDetails,
}

impl From<wire::Usage> for Usage {
    fn from(usage: wire::Usage) -> Self {
        Self {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            total_tokens: usage.prompt_tokens.saturating_add(usage.completion_tokens),
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: usage.cached_tokens,
            },
        }
    }
}

/// One generated token's log-probability and its most likely alternatives, by text.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The token's text.
    pub token: String,
    pub logprob: f32,
    /// The most likely alternatives, most likely first: `(text, logprob)`.
    pub top: Vec<(String, f32)>,
}

/// `choices[].logprobs` of a chat completion or chunk, as OpenAI shapes it:
/// `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}], "refusal": null}`.
pub fn chat_logprobs(tokens: &[TokenLogprob]) -> Value {
    let entry = |token: &str, logprob: f32| serde_json::json!({"token": token, "logprob": logprob, "bytes": token.as_bytes()});
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut e = entry(&t.token, t.logprob);
            e["top_logprobs"] = t.top.iter().map(|(tok, lp)| entry(tok, *lp)).collect();
            e
        })
        .collect();
    serde_json::json!({"content": content, "refusal": null})
}

/// `choices[].logprobs` of a (legacy) completion or chunk: parallel arrays of token texts,
/// their log-probabilities, a `{text: logprob}` map of alternatives per token, and each token's
/// character offset in the completion text, counted from `offset` (the characters before).
pub fn completion_logprobs(tokens: &[TokenLogprob], offset: usize) -> Value {
    let mut text_offset = Vec::with_capacity(tokens.len());
    let mut at = offset;
    for t in tokens {
        text_offset.push(at);
        at += t.token.chars().count();
    }
    let top: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let map: serde_json::Map<String, Value> = t
                .top
                .iter()
                .map(|(tok, lp)| (tok.clone(), Value::from(*lp)))
                .collect();
            Value::Object(map)
        })
        .collect();
    serde_json::json!({
        "tokens": tokens.iter().map(|t| t.token.as_str()).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": top,
        "text_offset": text_offset,
    })
}

/// The function a tool call names, and its arguments as JSON text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    /// A JSON object, as text (clients parse it).
    pub arguments: String,
}

/// One tool call of an assistant message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCallOut {
    /// `call_...`, which the client's `tool` message names in `tool_call_id`.
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionCall,
}

impl ToolCallOut {
    /// A call with a fresh id.
    pub fn new(name: String, arguments: String) -> Self {
        Self {
            id: format!("call_{:024x}", rand::random::<u128>() >> 32),
            kind: "function".to_owned(),
            function: FunctionCall { name, arguments },
        }
    }
}

/// What a stream chunk adds to tool call `index`: its id, type and name first (with empty
/// arguments), then its arguments, which the client appends (OpenAI's streamed shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCallDelta {
    /// The call's position in the message's `tool_calls`, from 0.
    pub index: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub function: FunctionDelta,
}

/// A streamed piece of a tool call's function.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionDelta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<String>,
}

impl ToolCallOut {
    /// The two deltas that stream this call as call `index` of its message: the head (id, type,
    /// name, empty arguments), then the arguments.
    pub fn deltas(&self, index: u32) -> [ToolCallDelta; 2] {
        [
            ToolCallDelta {
                index,
                id: Some(self.id.clone()),
                kind: Some(self.kind.clone()),
                function: FunctionDelta {
                    name: Some(self.function.name.clone()),
                    arguments: Some(String::new()),
                },
            },
            ToolCallDelta {
                index,
                id: None,
                kind: None,
                function: FunctionDelta {
                    name: None,
                    arguments: Some(self.function.arguments.clone()),
                },
            },
        ]
    }
}

/// The assistant message of a chat completion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessageOut {
    /// Always `assistant`.
    pub role: String,
    /// The generated text; `null` when the answer is only tool calls.
    pub content: Option<String>,
    /// The tool calls the answer made; absent when none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallOut>>,
}

/// One choice of a chat completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatChoice {
    /// Position among the choices (`n`), from 0.
    pub index: u32,
    /// The answer.
    pub message: ChatMessageOut,
    /// Log-probabilities, `null` when not requested.
    pub logprobs: Option<Value>,
    /// `stop` or `length`.
    pub finish_reason: Option<String>,
}

/// A chat completion (`object: "chat.completion"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletion {
    /// `chatcmpl-...`.
    pub id: String,
    /// Always [`ChatCompletion::OBJECT`].
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// The served model name.
    pub model: String,
    /// The answers.
    pub choices: Vec<ChatChoice>,
    /// Token accounting.
    pub usage: Usage,
}

impl ChatCompletion {
    /// The `object` of a chat completion.
    pub const OBJECT: &'static str = "chat.completion";

    /// A one-choice completion of `content`.
    pub fn new(meta: &ResponseMeta, content: String, finish: Option<String>, usage: Usage) -> Self {
        Self {
            id: meta.id.clone(),
            object: Self::OBJECT.to_owned(),
            created: meta.created,
            model: meta.model.clone(),
            choices: vec![ChatChoice {
                index: 0,
                message: ChatMessageOut {
                    role: "assistant".to_owned(),
                    content: Some(content),
                    tool_calls: None,
                },
                logprobs: None,
                finish_reason: finish,
            }],
            usage,
        }
    }
}

/// What a streamed chunk adds to the message.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    /// `assistant` in the first chunk only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// New text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Pieces of tool calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

/// One choice of a chat stream chunk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChunkChoice {
    /// Position among the choices (`n`), from 0.
    pub index: u32,
    /// What this chunk adds.
    pub delta: Delta,
    /// Log-probabilities, `null` when not requested.
    pub logprobs: Option<Value>,
    /// `null` until the last content chunk.
    pub finish_reason: Option<String>,
}

/// A chat stream chunk (`object: "chat.completion.chunk"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionChunk {
    /// The same id on every chunk of a stream.
    pub id: String,
    /// Always [`ChatCompletionChunk::OBJECT`].
    pub object: String,
    /// Unix seconds, the same on every chunk.
    pub created: u64,
    /// The served model name.
    pub model: String,
    /// The choice deltas; empty in the final usage chunk.
    pub choices: Vec<ChunkChoice>,
    /// Absent unless usage was requested; then `null` except in the final usage chunk.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub usage: Option<Option<Usage>>,
}

impl ChatCompletionChunk {
    /// The `object` of a chat stream chunk.
    pub const OBJECT: &'static str = "chat.completion.chunk";
}

/// One choice of a text completion or of its stream chunk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionChoice {
    /// Position among the choices (`n`), from 0.
    pub index: u32,
    /// Generated text (in a chunk: the new text).
    pub text: String,
    /// Log-probabilities, `null` when not requested.
    pub logprobs: Option<Value>,
    /// `stop` or `length`; `null` in a chunk until the last.
    pub finish_reason: Option<String>,
}

/// A text completion (`object: "text_completion"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    /// `cmpl-...`.
    pub id: String,
    /// Always [`Completion::OBJECT`].
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// The served model name.
    pub model: String,
    /// The answers.
    pub choices: Vec<CompletionChoice>,
    /// Token accounting.
    pub usage: Usage,
}

impl Completion {
    /// The `object` of a text completion and of its stream chunks.
    pub const OBJECT: &'static str = "text_completion";

    /// A one-choice completion of `text`.
    pub fn new(meta: &ResponseMeta, text: String, finish: Option<String>, usage: Usage) -> Self {
        Self {
            id: meta.id.clone(),
            object: Self::OBJECT.to_owned(),
            created: meta.created,
            model: meta.model.clone(),
            choices: vec![CompletionChoice {
                index: 0,
                text,
                logprobs: None,
                finish_reason: finish,
            }],
            usage,
        }
    }
}

/// A text completion stream chunk (`object: "text_completion"`, as OpenAI names it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionChunk {
    /// The same id on every chunk of a stream.
    pub id: String,
    /// Always [`Completion::OBJECT`].
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// The served model name.
    pub model: String,
    /// The choice deltas; empty in the final usage chunk.
    pub choices: Vec<CompletionChoice>,
    /// Absent unless usage was requested; then `null` except in the final usage chunk.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub usage: Option<Option<Usage>>,
}

/// What every response and chunk of one request repeats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseMeta {
    /// Response id (`chatcmpl-...` or `cmpl-...`).
    pub id: String,
    /// Unix seconds when the request was accepted.
    pub created: u64,
    /// The served model name.
    pub model: String,
    /// Whether the stream ends with a usage chunk (and every other chunk has `usage: null`).
    pub include_usage: bool,
}

impl ResponseMeta {
    fn chunk_usage(&self) -> Option<Option<Usage>> {
        self.include_usage.then_some(None)
    }

    /// A chat chunk carrying `delta`; `finish` only on the last content chunk.
    pub fn chat_chunk(&self, delta: Delta, finish: Option<String>) -> ChatCompletionChunk {
        ChatCompletionChunk {
            id: self.id.clone(),
            object: ChatCompletionChunk::OBJECT.to_owned(),
            created: self.created,
            model: self.model.clone(),
            choices: vec![ChunkChoice {
                index: 0,
                delta,
                logprobs: None,
                finish_reason: finish,
            }],
            usage: self.chunk_usage(),
        }
    }

    /// The final chat chunk of a stream with usage: no choices, just the usage.
    pub fn chat_usage_chunk(&self, usage: Usage) -> ChatCompletionChunk {
        ChatCompletionChunk {
            id: self.id.clone(),
            object: ChatCompletionChunk::OBJECT.to_owned(),
            created: self.created,
            model: self.model.clone(),
            choices: Vec::new(),
            usage: Some(Some(usage)),
        }
    }

    /// A completion chunk carrying `text`; `finish` only on the last content chunk.
    pub fn completion_chunk(&self, text: String, finish: Option<String>) -> CompletionChunk {
        CompletionChunk {
            id: self.id.clone(),
            object: Completion::OBJECT.to_owned(),
            created: self.created,
            model: self.model.clone(),
            choices: vec![CompletionChoice {
                index: 0,
                text,
                logprobs: None,
                finish_reason: finish,
            }],
            usage: self.chunk_usage(),
        }
    }

    /// The final completion chunk of a stream with usage: no choices, just the usage.
    pub fn completion_usage_chunk(&self, usage: Usage) -> CompletionChunk {
        CompletionChunk {
            id: self.id.clone(),
            object: Completion::OBJECT.to_owned(),
            created: self.created,
            model: self.model.clone(),
            choices: Vec::new(),
            usage: Some(Some(usage)),
        }
    }
}

/// One entry of `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelCard {
    /// The served model name.
    pub id: String,
    /// Always `model`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// Owner shown to clients.
    pub owned_by: String,
    /// Extension (vLLM): the longest context a request may reach.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_model_len: Option<u64>,
    /// Extension: the sampling the model is served with for parameters a request leaves out
    /// (`temperature`, `top_p`, `top_k`); absent when OpenAI's defaults apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling_defaults: Option<serde_json::Value>,
}

impl ModelCard {
    /// A card for `id`, without `max_model_len`.
    pub fn new(id: impl Into<String>, created: u64, owned_by: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            object: "model".to_owned(),
            created,
            owned_by: owned_by.into(),
            max_model_len: None,
            sampling_defaults: None,
        }
    }
}

/// `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelList {
    /// Always `list`.
    pub object: String,
    /// The models.
    pub data: Vec<ModelCard>,
}

impl ModelList {
    /// A list of `data`.
    pub fn new(data: Vec<ModelCard>) -> Self {
        Self {
            object: "list".to_owned(),
            data,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn meta(include_usage: bool) -> ResponseMeta {
        ResponseMeta {
            id: "chatcmpl-1".into(),
            created: 1_700_000_000,
            model: "smol".into(),
            include_usage,
        }
    }

    fn usage() -> Usage {
        Usage::from(wire::Usage {
            prompt_tokens: 100,
            cached_tokens: 64,
            completion_tokens: 5,
        })
    }

    #[test]
    fn chat_chunks_have_null_finish_reason_and_no_usage_unless_asked() {
        let meta = meta(false);
        let first = meta.chat_chunk(
            Delta {
                role: Some("assistant".into()),
                content: Some(String::new()),
                ..Delta::default()
            },
            None,
        );
        assert_eq!(
            serde_json::to_string(&first).unwrap(),
            r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"smol","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}"#
        );
        let last = meta.chat_chunk(Delta::default(), finish_reason(FinishReason::Stop));
        assert_eq!(
            serde_json::to_value(&last).unwrap()["choices"],
            json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": "stop"}])
        );
    }

    #[test]
    fn tool_calls_have_openai_shapes_whole_and_streamed() {
        let call = ToolCallOut::new("get_weather".into(), r#"{"city": "Paris"}"#.into());
        assert!(
            call.id.starts_with("call_") && call.id.len() == 29,
            "{}",
            call.id
        );
        let message = ChatMessageOut {
            role: "assistant".into(),
            content: None,
            tool_calls: Some(vec![call.clone()]),
        };
        assert_eq!(
            serde_json::to_value(&message).unwrap(),
            json!({"role": "assistant", "content": null, "tool_calls": [{"id": call.id,
                "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]})
        );
        let [head, arguments] = call.deltas(1);
        let chunk = |d: ToolCallDelta| {
            let delta = Delta {
                tool_calls: Some(vec![d]),
                ..Delta::default()
            };
            serde_json::to_value(meta(false).chat_chunk(delta, None)).unwrap()["choices"][0]["delta"].clone()
        };
        assert_eq!(
            chunk(head),
            json!({"tool_calls": [{"index": 1, "id": call.id, "type": "function",
                "function": {"name": "get_weather", "arguments": ""}}]})
        );
        assert_eq!(
            chunk(arguments),
            json!({"tool_calls": [{"index": 1, "function": {"arguments": "{\"city\": \"Paris\"}"}}]})
        );
        // Without calls, a message has no `tool_calls` key at all.
        let plain = ChatMessageOut {
            role: "assistant".into(),
            content: Some("hi".into()),
            tool_calls: None,
        };
        assert_eq!(
            serde_json::to_value(&plain).unwrap(),
            json!({"role": "assistant", "content": "hi"})
        );
    }

    #[test]
    fn with_include_usage_every_chunk_has_null_usage_and_the_last_has_it_all() {
        let meta = meta(true);
        let chunk = meta.chat_chunk(
            Delta {
                content: Some("Hi".into()),
                ..Delta::default()
            },
            None,
        );
        assert_eq!(
            serde_json::to_value(&chunk).unwrap(),
            json!({
                "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1_700_000_000,
                "model": "smol",
                "choices": [{"index": 0, "delta": {"content": "Hi"}, "logprobs": null,
                             "finish_reason": null}],
                "usage": null
            })
        );
        let final_chunk = meta.chat_usage_chunk(usage());
        assert_eq!(
            serde_json::to_string(&final_chunk).unwrap(),
            r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"smol","choices":[],"usage":{"prompt_tokens":100,"completion_tokens":5,"total_tokens":105,"prompt_tokens_details":{"cached_tokens":64}}}"#
        );
        // Absent, null and present usage each survive a round trip.
        for chunk in [meta.chat_chunk(Delta::default(), None), final_chunk] {
            let back: ChatCompletionChunk =
                serde_json::from_str(&serde_json::to_string(&chunk).unwrap()).unwrap();
            assert_eq!(back, chunk);
        }
        let without = self::meta(false).chat_chunk(Delta::default(), None);
        let back: ChatCompletionChunk =
            serde_json::from_str(&serde_json::to_string(&without).unwrap()).unwrap();
        assert_eq!(back.usage, None);
    }

    #[test]
    fn chat_completion_shape_always_has_cached_tokens() {
        let completion = ChatCompletion::new(
            &meta(false),
            "Hello!".into(),
            finish_reason(FinishReason::Length),
            Usage::from(wire::Usage {
                prompt_tokens: 9,
                cached_tokens: 0,
                completion_tokens: 3,
            }),
        );
        assert_eq!(
            serde_json::to_value(&completion).unwrap(),
            json!({
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 1_700_000_000,
                "model": "smol",
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello!"},
                    "logprobs": null,
                    "finish_reason": "length"
                }],
                "usage": {
                    "prompt_tokens": 9,
                    "completion_tokens": 3,
                    "total_tokens": 12,
                    "prompt_tokens_details": {"cached_tokens": 0}
                }
            })
        );
    }

    #[test]
    fn text_completion_and_its_chunks() {
        let meta = ResponseMeta {
            id: "cmpl-1".into(),
            ..meta(true)
        };
        let completion = Completion::new(&meta, " there".into(), None, usage());
        assert_eq!(
            serde_json::to_value(&completion).unwrap(),
            json!({
                "id": "cmpl-1", "object": "text_completion", "created": 1_700_000_000,
                "model": "smol",
                "choices": [{"index": 0, "text": " there", "logprobs": null,
                             "finish_reason": null}],
                "usage": {"prompt_tokens": 100, "completion_tokens": 5, "total_tokens": 105,
                          "prompt_tokens_details": {"cached_tokens": 64}}
            })
        );
        let chunk = meta.completion_chunk("th".into(), None);
        assert_eq!(
            serde_json::to_string(&chunk).unwrap(),
            r#"{"id":"cmpl-1","object":"text_completion","created":1700000000,"model":"smol","choices":[{"index":0,"text":"th","logprobs":null,"finish_reason":null}],"usage":null}"#
        );
        let last = meta.completion_usage_chunk(usage());
        let value = serde_json::to_value(&last).unwrap();
        assert_eq!(value["object"], "text_completion");
        assert_eq!(value["choices"], json!([]));
        assert_eq!(value["usage"]["prompt_tokens_details"]["cached_tokens"], 64);
    }

    #[test]
    fn usage_parses_other_servers_shapes() {
        // vLLM sends `prompt_tokens_details: null` unless prompt-token details are enabled.
        let usage: Usage = serde_json::from_value(json!({
            "prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
            "prompt_tokens_details": null, "completion_tokens_details": {"reasoning_tokens": 0}
        }))
        .unwrap();
        assert_eq!(usage.prompt_tokens_details.cached_tokens, 0);
        let usage: Usage = serde_json::from_value(
            json!({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}),
        )
        .unwrap();
        assert_eq!(usage.total_tokens, 5);
        let saturated = Usage::from(wire::Usage {
            prompt_tokens: u32::MAX,
            cached_tokens: 0,
            completion_tokens: 1,
        });
        assert_eq!(saturated.total_tokens, u32::MAX);
    }

    #[test]
    fn finish_reasons_as_openai_spells_them() {
        assert_eq!(finish_reason(FinishReason::Stop).as_deref(), Some("stop"));
        assert_eq!(
            finish_reason(FinishReason::Length).as_deref(),
            Some("length")
        );
        assert_eq!(finish_reason(FinishReason::Cancelled), None);
    }

    #[test]
    fn model_list_shape() {
        let mut with_len = ModelCard::new("smol", 1_700_000_000, "tidelock");
        with_len.max_model_len = Some(8192);
        let list = ModelList::new(vec![with_len, ModelCard::new("other", 0, "tidelock")]);
        assert_eq!(
            serde_json::to_value(&list).unwrap(),
            json!({
                "object": "list",
                "data": [
                    {"id": "smol", "object": "model", "created": 1_700_000_000,
                     "owned_by": "tidelock", "max_model_len": 8192},
                    {"id": "other", "object": "model", "created": 0, "owned_by": "tidelock"}
                ]
            })
        );
        let parsed: ModelList = serde_json::from_value(json!({
            "object": "list",
            "data": [{"id": "gpt-x", "object": "model", "created": 1, "owned_by": "openai",
                      "permission": []}]
        }))
        .unwrap();
        assert_eq!(parsed.data[0].max_model_len, None);
    }

    #[test]
    fn logprobs_take_the_openai_shapes() {
        let tokens = [
            TokenLogprob {
                token: "Hé".into(),
                logprob: -0.5,
                top: vec![("Hé".into(), -0.5), ("Hi".into(), -1.5)],
            },
            TokenLogprob {
                token: "!".into(),
                logprob: -0.25,
                top: vec![],
            },
        ];
        assert_eq!(
            chat_logprobs(&tokens),
            json!({"content": [
                {"token": "Hé", "logprob": -0.5, "bytes": [72, 195, 169], "top_logprobs": [
                    {"token": "Hé", "logprob": -0.5, "bytes": [72, 195, 169]},
                    {"token": "Hi", "logprob": -1.5, "bytes": [72, 105]},
                ]},
                {"token": "!", "logprob": -0.25, "bytes": [33], "top_logprobs": []},
            ], "refusal": null})
        );
        assert_eq!(
            completion_logprobs(&tokens, 3),
            json!({
                "tokens": ["Hé", "!"],
                "token_logprobs": [-0.5, -0.25],
                "top_logprobs": [{"Hé": -0.5, "Hi": -1.5}, {}],
                "text_offset": [3, 5],
            })
        );
    }
}

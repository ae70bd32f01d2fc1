//! OpenAI request bodies and their validation.
//!
//! [`ChatCompletionRequest::sampling`] and [`CompletionRequest::sampling`] are the one place
//! request fields become [`SamplingParams`]: OpenAI's defaults (temperature 1, top_p 1) are
//! filled in, `n`, `stop` and every range are checked, and each error names the request field
//! (`param`) at fault. Parsing never fails on unknown fields, and `null` reads as "absent".

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::null_as_default;
use super::{COMPLETION_DEFAULT_MAX_TOKENS, MAX_STOP_BYTES, MAX_STOP_SEQUENCES, OpenAiError};
use crate::ids::SessionKey;
use crate::wire::{Constraint, SamplingError, SamplingParams};

/// The header a client may name its session with (after `prompt_cache_key`, before `user`), as
/// the error `param` names it.
pub const SESSION_HEADER: &str = "X-Session-Id";

fn completion_default_max_tokens() -> Option<u32> {
    Some(COMPLETION_DEFAULT_MAX_TOKENS)
}

/// `stop`: one string or a list of strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// A single stop sequence.
    One(String),
    /// Several stop sequences.
    Many(Vec<String>),
}

impl Stop {
    /// The stop sequences as a list.
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            Self::One(stop) => vec![stop.clone()],
            Self::Many(stops) => stops.clone(),
        }
    }
}

/// `stream_options`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with the usage (and `usage: null` on every other chunk).
    #[serde(default, deserialize_with = "null_as_default")]
    pub include_usage: bool,
}

/// One part of an array-valued message `content`. Only `text` parts are served; other types
/// parse (so the error can say what is wrong) and are rejected by [`MessageContent::text`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContentPart {
    /// The part type, e.g. `text` or `image_url`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

/// A message's `content`: a string or an array of parts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// Content parts.
    Parts(Vec<ContentPart>),
}

impl MessageContent {
    /// The text of the content: the string, or the text parts joined by newlines (as vLLM joins
    /// them). Any part other than `text` is an error naming `messages`.
    pub fn text(&self) -> Result<String, OpenAiError> {
        match self {
            Self::Text(text) => Ok(text.clone()),
            Self::Parts(parts) => {
                let texts = parts
                    .iter()
                    .map(|part| match (part.kind.as_str(), &part.text) {
                        ("text", Some(text)) => Ok(text.as_str()),
                        ("text", None) => Err(OpenAiError::invalid(
                            "messages",
                            "a text content part needs a `text` field",
                        )),
                        (other, _) => Err(OpenAiError::invalid(
                            "messages",
                            format!(
                                "only text content parts are supported, not `{other}` (this model reads text only)"
                            ),
                        )),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(texts.join("\n"))
            }
        }
    }
}

/// One message of a chat request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessageIn {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The content; absent or `null` for an assistant message that only calls tools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<MessageContent>,
    /// Name of the participant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Tool calls of an assistant message, passed to the chat template as they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Value>,
    /// The call a `tool` message answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessageIn {
    /// The message's text, `None` when it has no content.
    pub fn text(&self) -> Result<Option<String>, OpenAiError> {
        self.content.as_ref().map(MessageContent::text).transpose()
    }
}

/// A 400 `unsupported_parameter` naming `param`: a parameter this server does not serve yet.
fn unsupported(param: &str, message: String) -> OpenAiError {
    OpenAiError::invalid(param, message).with_code("unsupported_parameter")
}

/// The fields `/v1/chat/completions` and `/v1/completions` share, flattened into both.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CommonFields {
    /// Softmax temperature in `[0, 2]`, default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Nucleus mass in `(0, 1]`, default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// Extension (vLLM): keep the `k` most likely tokens; `-1` or `0` disables, as in vLLM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<i64>,
    /// Seed for reproducible sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Stop sequences.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    /// Answers to generate from the one prompt, 1 to 16 (they share its KV blocks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    /// Stream the answer as server-sent events.
    #[serde(default, deserialize_with = "null_as_default")]
    pub stream: bool,
    /// Streaming options.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    /// End-user id; a session key when `prompt_cache_key` is absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// OpenAI's cache routing key; Tidelock's session key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_cache_key: Option<String>,
    /// Extension (vLLM): keep generating past end-of-sequence.
    #[serde(default, deserialize_with = "null_as_default")]
    pub ignore_eos: bool,
    /// Penalty in `[-2, 2]` for a token once it has appeared in the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f32>,
    /// Penalty in `[-2, 2]` per time a token has appeared in the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f32>,
    /// Token id (as a string key) to a bias in `[-100, 100]` added to its logit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logit_bias: Option<Value>,
    /// Extension (vLLM): drop tokens less likely than `min_p` times the most likely one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f32>,
    /// Extension (vLLM): token ids that end the answer (the id itself is not returned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_token_ids: Option<Vec<u32>>,
    /// Only `{"type": "text"}` is served; JSON modes are refused until constrained decoding is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<Value>,
}

impl CommonFields {
    /// `response_format` as a constraint on the answer: `None` for text (or none given);
    /// `json_object`; `json_schema` with its `json_schema.schema`. Whether the schema's
    /// features are supported is for the grammar engine to say (a 400 from the worker).
    pub fn constraint(&self) -> Result<Option<Constraint>, OpenAiError> {
        let bad = |m: String| Err(OpenAiError::invalid("response_format", m));
        let Some(format) = self.response_format.as_ref().filter(|f| !f.is_null()) else {
            return Ok(None);
        };
        match format.get("type").and_then(Value::as_str) {
            Some("text") => Ok(None),
            Some("json_object") => Ok(Some(Constraint::JsonObject)),
            Some("json_schema") => match format.get("json_schema").and_then(|j| j.get("schema")) {
                Some(schema @ (Value::Object(_) | Value::Bool(_))) => {
                    Ok(Some(Constraint::JsonSchema {
                        schema: schema.clone(),
                    }))
                }
                Some(_) => {
                    bad("response_format.json_schema.schema must be a JSON Schema object".into())
                }
                None => {
                    bad("response_format of type `json_schema` needs `json_schema.schema`".into())
                }
            },
            Some(other) => bad(format!(
                "response_format type `{other}` is not one of `text`, `json_object`, `json_schema`"
            )),
            None => bad("response_format must be an object with a string `type`".into()),
        }
    }

    /// Validates the shared sampling fields (`stop` and `n` included) and converts them, with
    /// the endpoint's own `max_tokens` and `logprobs` (and the names it gives them in errors).
    fn sampling(
        &self,
        (max_tokens, max_tokens_param): (u32, &'static str),
        (logprobs, logprobs_param): (Option<u32>, &'static str),
    ) -> Result<SamplingParams, OpenAiError> {
        let constraint = self.constraint()?;
        let mut params = SamplingFields {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
            max_tokens,
            max_tokens_param,
            n: self.n,
            stop: self.stop.as_ref(),
            ignore_eos: self.ignore_eos,
            logprobs,
            logprobs_param,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logit_bias: self.logit_bias.as_ref(),
            min_p: self.min_p,
            stop_token_ids: self.stop_token_ids.as_deref(),
        }
        .build()?;
        params.constraint = constraint;
        Ok(params)
    }

    /// The stop sequences, empty when none were given.
    pub fn stop_strings(&self) -> Vec<String> {
        self.stop.as_ref().map(Stop::to_vec).unwrap_or_default()
    }

    /// The session key, the one rule the router and the worker both apply (DESIGN.md, "Router
    /// API"): `prompt_cache_key`, else the `X-Session-Id` header (`header`: its value's bytes,
    /// if the request has one), else `user`; empty values are skipped. A value that is not a
    /// valid [`SessionKey`] (too long, not visible ASCII) is a 400 naming where it came from.
    /// `None`: the request names no session (the router then lets its prefix stand for one).
    pub fn session_key(&self, header: Option<&[u8]>) -> Result<Option<SessionKey>, OpenAiError> {
        let header = header
            .map(|bytes| {
                std::str::from_utf8(bytes)
                    .ok()
                    .filter(|s| s.bytes().all(|b| (0x20..0x7f).contains(&b)))
                    .ok_or_else(|| {
                        OpenAiError::invalid(SESSION_HEADER, "X-Session-Id must be visible ASCII")
                    })
            })
            .transpose()?;
        [
            (self.prompt_cache_key.as_deref(), "prompt_cache_key"),
            (header, SESSION_HEADER),
            (self.user.as_deref(), "user"),
        ]
        .into_iter()
        .find_map(|(key, param)| Some((key.filter(|k| !k.is_empty())?, param)))
        .map(|(key, param)| {
            SessionKey::new(key).map_err(|e| OpenAiError::invalid(param, e.to_string()))
        })
        .transpose()
    }

    /// Whether a streamed answer ends with a usage chunk.
    pub fn include_usage(&self) -> bool {
        self.stream && self.stream_options.is_some_and(|o| o.include_usage)
    }
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionRequest {
    /// The served model name.
    pub model: String,
    /// The conversation.
    pub messages: Vec<ChatMessageIn>,
    /// Most tokens to generate (deprecated by OpenAI in favour of `max_completion_tokens`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Most tokens to generate; wins over `max_tokens`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u32>,
    /// Sampling, streaming and session fields both endpoints take.
    #[serde(flatten)]
    pub common: CommonFields,
    /// Return log-probabilities of the generated tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<bool>,
    /// Alternatives per token to return with `logprobs`, at most 20.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<u32>,
    /// Tool definitions, passed to the chat template as they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Value>,
    /// `none`, `auto`, `required` or `{"type": "function", "function": {"name": ...}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<Value>,
    /// Whether the answer may make several calls (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel_tool_calls: Option<bool>,
}

/// The most tools one request may offer (OpenAI's limit).
pub const MAX_TOOLS: usize = 128;

/// A function a request offers.
#[derive(Debug, Clone, PartialEq)]
pub struct OfferedFunction {
    pub name: String,
    /// Its parameters' JSON Schema, `None` when it declares none.
    pub parameters: Option<Value>,
}

/// `tool_choice`, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// No calls: the answer is text (tools still reach the template).
    None,
    /// The model decides; calls it writes are read out of its answer.
    Auto,
    /// At least one call, of any offered function.
    Required,
    /// A call of this function.
    Function(String),
}

/// A chat request's tools, checked ([`ChatCompletionRequest::tool_plan`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ToolPlan {
    pub functions: Vec<OfferedFunction>,
    pub choice: ToolChoice,
    /// `parallel_tool_calls`: several calls in one answer (default true).
    pub parallel: bool,
}

impl ToolPlan {
    /// Whether answers are read for calls.
    pub fn reads_calls(&self) -> bool {
        self.choice != ToolChoice::None
    }

    /// The functions a call must name, when the answer must be calls: all of them for
    /// `required`, the named one for a named choice; `None` when calls are optional.
    pub fn forced(&self) -> Option<Vec<&OfferedFunction>> {
        match &self.choice {
            ToolChoice::None | ToolChoice::Auto => None,
            ToolChoice::Required => Some(self.functions.iter().collect()),
            ToolChoice::Function(name) => {
                Some(self.functions.iter().filter(|f| &f.name == name).collect())
            }
        }
    }
}

/// OpenAI's rule for function names.
fn valid_function_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl ChatCompletionRequest {
    /// Validates the request's sampling fields (`stop` and `n` included) and converts them.
    ///
    /// `default_max_tokens` applies when neither `max_completion_tokens` nor `max_tokens` is set
    /// (OpenAI then generates until the context ends): callers pass the room left in the context.
    pub fn sampling(&self, default_max_tokens: u32) -> Result<SamplingParams, OpenAiError> {
        let logprobs = match (self.logprobs, self.top_logprobs) {
            (Some(true), top) => Some(top.unwrap_or(0)),
            (_, Some(top)) if top > 0 => {
                return Err(OpenAiError::invalid(
                    "top_logprobs",
                    "logprobs must be true when top_logprobs is set",
                ));
            }
            _ => None,
        };
        let max_tokens = match (self.max_completion_tokens, self.max_tokens) {
            (Some(max), _) => (max, "max_completion_tokens"),
            (None, Some(max)) => (max, "max_tokens"),
            (None, None) => (default_max_tokens, "max_tokens"),
        };
        self.common.sampling(max_tokens, (logprobs, "top_logprobs"))
    }

    /// The tools the request offers and how the model may use them, checked: each tool is
    /// `{"type": "function", "function": {"name", "description"?, "parameters"?}}` with a
    /// distinct name of 1 to 64 letters, digits, `_` or `-` (OpenAI's rule) and an object for
    /// `parameters`; at most [`MAX_TOOLS`]. `tool_choice` defaults to `auto` with tools and
    /// `none` without; `required` and a named function need tools, and the name one of them.
    pub fn tool_plan(&self) -> Result<ToolPlan, OpenAiError> {
        let bad = |param: &str, message: String| Err(OpenAiError::invalid(param, message));
        let tools: &[Value] = match &self.tools {
            None | Some(Value::Null) => &[],
            Some(Value::Array(tools)) => tools,
            Some(_) => return bad("tools", "tools must be an array of tools".into()),
        };
        if tools.len() > MAX_TOOLS {
            return bad(
                "tools",
                format!("at most {MAX_TOOLS} tools, not {}", tools.len()),
            );
        }
        let mut functions: Vec<OfferedFunction> = Vec::with_capacity(tools.len());
        for (i, tool) in tools.iter().enumerate() {
            let at = |m: &str| format!("tools[{i}]: {m}");
            match tool.get("type").and_then(Value::as_str) {
                Some("function") => {}
                Some(other) => {
                    return Err(unsupported(
                        "tools",
                        at(&format!(
                            "only `function` tools are supported, not `{other}`"
                        )),
                    ));
                }
                None => return bad("tools", at("a tool needs `type: \"function\"`")),
            }
            let Some(function) = tool.get("function").filter(|f| f.is_object()) else {
                return bad("tools", at("a function tool needs a `function` object"));
            };
            let name = match function.get("name").and_then(Value::as_str) {
                Some(name) if valid_function_name(name) => name,
                Some(name) => {
                    return bad(
                        "tools",
                        at(&format!(
                            "function name `{name}` must be 1 to 64 letters, digits, `_` or `-`"
                        )),
                    );
                }
                None => return bad("tools", at("a function needs a string `name`")),
            };
            if functions.iter().any(|f| f.name == name) {
                return bad("tools", at(&format!("function `{name}` is offered twice")));
            }
            let parameters = match function.get("parameters") {
                None | Some(Value::Null) => None,
                Some(schema @ Value::Object(_)) => Some(schema.clone()),
                Some(_) => {
                    return bad("tools", at("`parameters` must be a JSON Schema object"));
                }
            };
            functions.push(OfferedFunction {
                name: name.to_owned(),
                parameters,
            });
        }
        let choice = match &self.tool_choice {
            None | Some(Value::Null) if functions.is_empty() => ToolChoice::None,
            None | Some(Value::Null) => ToolChoice::Auto,
            Some(Value::String(c)) if c == "none" => ToolChoice::None,
            Some(Value::String(c)) if c == "auto" => ToolChoice::Auto,
            Some(Value::String(c)) if c == "required" => ToolChoice::Required,
            Some(Value::Object(named))
                if named.get("type").and_then(Value::as_str) == Some("function") =>
            {
                match named
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                {
                    Some(name) => ToolChoice::Function(name.to_owned()),
                    None => {
                        return bad(
                            "tool_choice",
                            "a named tool_choice is {\"type\": \"function\", \"function\": {\"name\": ...}}"
                                .into(),
                        );
                    }
                }
            }
            Some(_) => {
                return bad(
                    "tool_choice",
                    "tool_choice must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}".into(),
                );
            }
        };
        match &choice {
            ToolChoice::Required | ToolChoice::Function(_) if functions.is_empty() => {
                return bad(
                    "tool_choice",
                    "tool_choice requires a call, but the request offers no tools".into(),
                );
            }
            ToolChoice::Function(name) if !functions.iter().any(|f| &f.name == name) => {
                return bad(
                    "tool_choice",
                    format!("tool_choice names `{name}`, which is not among the tools"),
                );
            }
            _ => {}
        }
        Ok(ToolPlan {
            functions,
            choice,
            parallel: self.parallel_tool_calls.unwrap_or(true),
        })
    }

    /// The stop sequences, empty when none were given.
    pub fn stop_strings(&self) -> Vec<String> {
        self.common.stop_strings()
    }

    /// Whether a streamed answer ends with a usage chunk.
    pub fn include_usage(&self) -> bool {
        self.common.include_usage()
    }
}

/// `prompt` of a completion request: text, texts, token ids, or lists of token ids.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// One text prompt.
    Text(String),
    /// A batch of text prompts.
    Texts(Vec<String>),
    /// One prompt as token ids.
    Tokens(Vec<u32>),
    /// A batch of prompts as token ids.
    TokenBatches(Vec<Vec<u32>>),
}

/// The single prompt a completion request is served for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptInput {
    /// Text, to be tokenized.
    Text(String),
    /// Token ids, used as they are.
    Tokens(Vec<u32>),
}

impl Prompt {
    /// The one prompt to serve. Batches of several prompts and empty token lists are errors
    /// naming `prompt`.
    pub fn input(&self) -> Result<PromptInput, OpenAiError> {
        let single = |len: usize| match len {
            1 => Ok(()),
            0 => Err(OpenAiError::invalid("prompt", "prompt must not be empty")),
            _ => Err(OpenAiError::invalid(
                "prompt",
                "only a single prompt per request is supported",
            )),
        };
        let input = match self {
            Self::Text(text) => PromptInput::Text(text.clone()),
            Self::Tokens(ids) => PromptInput::Tokens(ids.clone()),
            Self::Texts(texts) => {
                single(texts.len())?;
                PromptInput::Text(texts.concat())
            }
            Self::TokenBatches(batches) => {
                single(batches.len())?;
                PromptInput::Tokens(batches.concat())
            }
        };
        match input {
            PromptInput::Tokens(ids) if ids.is_empty() => {
                Err(OpenAiError::invalid("prompt", "prompt must not be empty"))
            }
            input => Ok(input),
        }
    }
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionRequest {
    /// The served model name.
    pub model: String,
    /// The prompt.
    pub prompt: Prompt,
    /// Most tokens to generate: 16 when absent (OpenAI's default), `null` for "until the
    /// context ends" (as in vLLM). Always serialised, so `null` survives a round trip.
    #[serde(default = "completion_default_max_tokens")]
    pub max_tokens: Option<u32>,
    /// Sampling, streaming and session fields both endpoints take.
    #[serde(flatten)]
    pub common: CommonFields,
    /// Alternatives per token to return with log-probabilities, at most 20.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<u32>,
    /// Return the prompt in front of the completion.
    #[serde(default, deserialize_with = "null_as_default")]
    pub echo: bool,
}

impl CompletionRequest {
    /// Validates the request's sampling fields (`stop` and `n` included) and converts them.
    ///
    /// `default_max_tokens` applies only to `"max_tokens": null`; an absent `max_tokens` is 16.
    /// Callers pass the room left in the context.
    pub fn sampling(&self, default_max_tokens: u32) -> Result<SamplingParams, OpenAiError> {
        self.common.sampling(
            (self.max_tokens.unwrap_or(default_max_tokens), "max_tokens"),
            (self.logprobs, "logprobs"),
        )
    }

    /// The stop sequences, empty when none were given.
    pub fn stop_strings(&self) -> Vec<String> {
        self.common.stop_strings()
    }

    /// Whether a streamed answer ends with a usage chunk.
    pub fn include_usage(&self) -> bool {
        self.common.include_usage()
    }

    /// The one prompt to serve; see [`Prompt::input`].
    pub fn prompt_input(&self) -> Result<PromptInput, OpenAiError> {
        self.prompt.input()
    }
}

/// OpenAI's `logit_bias` (an object from token ids, written as strings, to numbers) as a map;
/// `null` and `{}` are none. Ranges are checked with the other fields.
fn logit_bias(value: Option<&Value>) -> Result<BTreeMap<u32, f32>, OpenAiError> {
    let bad = |m: String| OpenAiError::invalid("logit_bias", m);
    match value {
        None | Some(Value::Null) => Ok(BTreeMap::new()),
        Some(Value::Object(entries)) => entries
            .iter()
            .map(|(token, bias)| {
                let id = token.trim().parse::<u32>().map_err(|_| {
                    bad(format!(
                        "logit_bias keys are token ids; `{token}` is not one"
                    ))
                })?;
                let bias = bias
                    .as_f64()
                    .ok_or_else(|| bad(format!("the bias of token {id} must be a number")))?;
                Ok((id, bias as f32))
            })
            .collect(),
        Some(_) => Err(bad(
            "logit_bias must be an object from token ids to biases".into()
        )),
    }
}

/// The sampling fields both request types share, named as each request names them.
struct SamplingFields<'a> {
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    seed: Option<u64>,
    max_tokens: u32,
    max_tokens_param: &'static str,
    n: Option<u32>,
    stop: Option<&'a Stop>,
    ignore_eos: bool,
    logprobs: Option<u32>,
    logprobs_param: &'static str,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    logit_bias: Option<&'a Value>,
    min_p: Option<f32>,
    stop_token_ids: Option<&'a [u32]>,
}

impl SamplingFields<'_> {
    fn build(self) -> Result<SamplingParams, OpenAiError> {
        if let Some(stop) = self.stop {
            let stops = stop.to_vec();
            if stops.len() > MAX_STOP_SEQUENCES {
                return Err(OpenAiError::invalid(
                    "stop",
                    format!("at most {MAX_STOP_SEQUENCES} stop sequences are allowed"),
                ));
            }
            if stops.iter().any(String::is_empty) {
                return Err(OpenAiError::invalid(
                    "stop",
                    "stop sequences must not be empty",
                ));
            }
            if let Some(long) = stops.iter().find(|s| s.len() > MAX_STOP_BYTES) {
                return Err(OpenAiError::invalid(
                    "stop",
                    format!(
                        "a stop sequence is at most {MAX_STOP_BYTES} bytes (one has {})",
                        long.len()
                    ),
                ));
            }
        }
        let top_k = match self.top_k {
            None | Some(-1 | 0) => None,
            Some(k) => Some(u32::try_from(k).map_err(|_| {
                OpenAiError::invalid("top_k", "top_k must be -1 or 0 (disabled) or at least 1")
            })?),
        };
        let params = SamplingParams {
            temperature: self.temperature.unwrap_or(1.0),
            top_p: self.top_p.unwrap_or(1.0),
            top_k,
            seed: self.seed,
            max_tokens: self.max_tokens,
            stop_token_ids: self.stop_token_ids.map(<[u32]>::to_vec).unwrap_or_default(),
            ignore_eos: self.ignore_eos,
            logprobs: self.logprobs,
            n: self.n.unwrap_or(1),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            logit_bias: logit_bias(self.logit_bias)?,
            min_p: self.min_p.unwrap_or(0.0),
            constraint: None,
        };
        params.validate().map_err(|error| {
            let param = match error {
                SamplingError::Temperature(_) => "temperature",
                SamplingError::TopP(_) => "top_p",
                SamplingError::TopK => "top_k",
                SamplingError::MaxTokens => self.max_tokens_param,
                SamplingError::Logprobs(_) => self.logprobs_param,
                SamplingError::N(_) => "n",
                SamplingError::Penalty(name, _) => name,
                SamplingError::LogitBias(..) | SamplingError::LogitBiasCount(_) => "logit_bias",
                SamplingError::MinP(_) => "min_p",
            };
            OpenAiError::invalid(param, error.to_string())
        })?;
        Ok(params)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::openai::ErrorKind;

    fn chat(value: Value) -> ChatCompletionRequest {
        serde_json::from_value(value).unwrap()
    }

    fn completion(value: Value) -> CompletionRequest {
        serde_json::from_value(value).unwrap()
    }

    /// The shape the Python SDK sends (`client.chat.completions.create(...)`), with fields this
    /// server ignores.
    #[test]
    fn parses_a_python_sdk_chat_request() {
        let request = chat(json!({
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": [
                    {"type": "text", "text": "Hello"},
                    {"type": "text", "text": "there", "cache_control": {"type": "ephemeral"}}
                ]}
            ],
            "model": "SmolLM2-135M-Instruct",
            "max_completion_tokens": 64,
            "max_tokens": 999,
            "stream": true,
            "stream_options": {"include_usage": true, "include_obfuscation": false},
            "stop": ["\n\n", "User:"],
            "temperature": 0.2,
            "seed": 7,
            "logprobs": true,
            "top_logprobs": 3,
            "prompt_cache_key": "conv-1",
            "user": "u-9",
            "metadata": {"team": "a"},
            "store": false,
            "frequency_penalty": 0,
            "parallel_tool_calls": true,
            "response_format": {"type": "text"}
        }));
        assert_eq!(
            request.messages[0].text().unwrap().as_deref(),
            Some("You are terse.")
        );
        assert_eq!(
            request.messages[1].text().unwrap().as_deref(),
            Some("Hello\nthere")
        );
        assert_eq!(request.stop_strings(), ["\n\n", "User:"]);
        assert_eq!(
            request.common.session_key(None).unwrap().unwrap().as_str(),
            "conv-1"
        );
        assert!(request.include_usage());
        assert_eq!(
            request.sampling(4096).unwrap(),
            SamplingParams {
                temperature: 0.2,
                top_p: 1.0,
                top_k: None,
                seed: Some(7),
                max_tokens: 64,
                stop_token_ids: Vec::new(),
                ignore_eos: false,
                logprobs: Some(3),
                ..SamplingParams::default()
            }
        );
    }

    /// Nulls where SDKs and frameworks send them, tool messages, and vLLM's extensions.
    #[test]
    fn parses_nulls_tools_and_extensions() {
        let request = chat(json!({
            "model": "m",
            "messages": [
                {"role": "user", "content": "What is 6 x 7?"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "c1", "type": "function",
                     "function": {"name": "mul", "arguments": "{\"a\":6,\"b\":7}"}}
                ]},
                {"role": "tool", "tool_call_id": "c1", "content": "42"}
            ],
            "stream": null,
            "stream_options": null,
            "n": 1,
            "stop": "END",
            "max_tokens": null,
            "temperature": null,
            "top_k": -1,
            "ignore_eos": true,
            "tools": [{"type": "function", "function": {"name": "mul", "parameters": {}}}],
            "tool_choice": "auto",
            "user": "u-9"
        }));
        assert!(!request.common.stream && !request.include_usage());
        assert_eq!(request.messages[1].text().unwrap(), None);
        assert!(request.messages[1].tool_calls.is_some());
        assert_eq!(request.messages[2].tool_call_id.as_deref(), Some("c1"));
        assert_eq!(request.stop_strings(), ["END"]);
        assert_eq!(
            request.common.session_key(None).unwrap().unwrap().as_str(),
            "u-9"
        );
        assert_eq!(request.tool_choice, Some(json!("auto")));
        let plan = request.tool_plan().unwrap();
        assert_eq!(plan.choice, ToolChoice::Auto);
        assert_eq!(plan.functions[0].parameters, Some(json!({})));
        assert!(plan.parallel && plan.reads_calls() && plan.forced().is_none());
        let sampling = request.sampling(100).unwrap();
        assert_eq!(sampling.max_tokens, 100, "no limit: the caller's default");
        assert_eq!((sampling.temperature, sampling.top_p), (1.0, 1.0));
        assert_eq!(sampling.top_k, None);
        assert!(sampling.ignore_eos);
        assert_eq!(sampling.logprobs, None);
    }

    /// What is not served yet is a 400 naming the parameter, never silently ignored; the
    /// values that mean "nothing asked" pass.
    #[test]
    fn unserved_parameters_are_refused_by_name() {
        let base = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        let with = |field: &str, value: Value| {
            let mut body = base.clone();
            body[field] = value;
            chat(body).sampling(16)
        };
        for (field, value) in [
            (
                "response_format",
                json!({"type": "json_schema", "json_schema": {"name": "x"}}),
            ),
            (
                "response_format",
                json!({"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}),
            ),
            ("response_format", json!({"type": "grammar"})),
            ("response_format", json!("json")),
        ] {
            let error = with(field, value.clone()).unwrap_err();
            assert_eq!(error.param.as_deref(), Some(field), "{field}: {value}");
            assert_eq!(error.status, 400);
        }
        for (field, value) in [
            ("presence_penalty", json!(0)),
            ("frequency_penalty", json!(0.0)),
            ("logit_bias", json!({})),
            ("logit_bias", Value::Null),
            ("response_format", json!({"type": "text"})),
            ("tool_choice", json!("auto")),
            ("tool_choice", json!("none")),
            ("tools", json!([])),
        ] {
            assert!(with(field, value.clone()).is_ok(), "{field}: {value}");
        }
        // JSON modes are constraints on the answer, on both endpoints.
        let object = with("response_format", json!({"type": "json_object"})).unwrap();
        assert_eq!(object.constraint, Some(Constraint::JsonObject));
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        let strict = with(
            "response_format",
            json!({"type": "json_schema", "json_schema": {"name": "x", "strict": true, "schema": schema}}),
        )
        .unwrap();
        assert_eq!(strict.constraint, Some(Constraint::JsonSchema { schema }));
        let text = with("response_format", json!({"type": "text"})).unwrap();
        assert_eq!(text.constraint, None);
        let completion = completion(
            json!({"model": "m", "prompt": "p", "response_format": {"type": "json_object"}}),
        )
        .sampling(16)
        .unwrap();
        assert_eq!(completion.constraint, Some(Constraint::JsonObject));
    }

    /// `tools`, `tool_choice` and `parallel_tool_calls` are read into a plan; what cannot be
    /// served is a 400 naming the field.
    #[test]
    fn tool_plans_are_checked() {
        let f = |name: &str| json!({"type": "function", "function": {"name": name, "parameters": {"type": "object"}}});
        let plan = |tools: Value, choice: Value| {
            let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                "tools": tools, "parallel_tool_calls": false});
            if !choice.is_null() {
                body["tool_choice"] = choice;
            }
            chat(body).tool_plan()
        };
        let two = json!([f("get_weather"), f("now")]);
        let required = plan(two.clone(), json!("required")).unwrap();
        assert_eq!(required.choice, ToolChoice::Required);
        assert!(!required.parallel);
        let names = |p: &ToolPlan| -> Vec<String> {
            p.forced().unwrap().iter().map(|f| f.name.clone()).collect()
        };
        assert_eq!(names(&required), ["get_weather", "now"]);
        let named = plan(
            two.clone(),
            json!({"type": "function", "function": {"name": "now"}}),
        )
        .unwrap();
        assert_eq!(names(&named), ["now"]);
        assert_eq!(
            plan(json!([]), Value::Null).unwrap().choice,
            ToolChoice::None
        );
        assert_eq!(
            plan(two.clone(), Value::Null).unwrap().choice,
            ToolChoice::Auto
        );
        let none = plan(two.clone(), json!("none")).unwrap();
        assert!(!none.reads_calls() && none.forced().is_none());
        for (tools, choice, param, says) in [
            (json!({"a": 1}), Value::Null, "tools", "array"),
            (
                json!([{"type": "retrieval"}]),
                Value::Null,
                "tools",
                "not `retrieval`",
            ),
            (
                json!([{"function": {"name": "f"}}]),
                Value::Null,
                "tools",
                "tools[0]",
            ),
            (
                json!([{"type": "function"}]),
                Value::Null,
                "tools",
                "`function` object",
            ),
            (json!([f("a b")]), Value::Null, "tools", "`a b` must be"),
            (json!([f(&"x".repeat(65))]), Value::Null, "tools", "1 to 64"),
            (
                json!([f("f"), f("f")]),
                Value::Null,
                "tools",
                "tools[1]: function `f` is offered twice",
            ),
            (
                json!([{"type": "function", "function": {"name": "f", "parameters": "x"}}]),
                Value::Null,
                "tools",
                "`parameters` must be",
            ),
            (
                json!([]),
                json!("required"),
                "tool_choice",
                "offers no tools",
            ),
            (
                two.clone(),
                json!({"type": "function", "function": {"name": "later"}}),
                "tool_choice",
                "`later`",
            ),
            (
                two.clone(),
                json!({"type": "function"}),
                "tool_choice",
                "named",
            ),
            (two.clone(), json!("sometimes"), "tool_choice", "must be"),
            (two.clone(), json!(7), "tool_choice", "must be"),
        ] {
            let error = plan(tools.clone(), choice.clone()).unwrap_err();
            assert_eq!(error.param.as_deref(), Some(param), "{tools} {choice}");
            assert!(error.message.contains(says), "{says}: {}", error.message);
            assert_eq!(error.status, 400);
        }
        let many: Vec<Value> = (0..=MAX_TOOLS).map(|i| f(&format!("f{i}"))).collect();
        assert!(plan(Value::Array(many), Value::Null).is_err());
    }

    /// Penalties, biases, `min_p`, `n`, stop ids and the seed reach the sampling parameters as
    /// sent, on both endpoints.
    #[test]
    fn complete_sampling_fields_are_carried() {
        let request = chat(json!({
            "model": "m", "messages": [{"role": "user", "content": "hi"}],
            "n": 3, "presence_penalty": 0.5, "frequency_penalty": -1, "seed": 11,
            "logit_bias": {"42": 100, " 7": -100, "9": 0.5}, "min_p": 0.05,
            "stop_token_ids": [2, 5]
        }));
        let sampling = request.sampling(16).unwrap();
        assert_eq!(sampling.n, 3);
        assert_eq!(
            (sampling.presence_penalty, sampling.frequency_penalty),
            (0.5, -1.0)
        );
        assert_eq!(
            sampling.logit_bias.into_iter().collect::<Vec<_>>(),
            [(7, -100.0), (9, 0.5), (42, 100.0)]
        );
        assert_eq!((sampling.min_p, sampling.seed), (0.05, Some(11)));
        assert_eq!(sampling.stop_token_ids, [2, 5]);
        let sampling =
            completion(json!({"model": "m", "prompt": "p", "n": 2, "frequency_penalty": 2}))
                .sampling(16)
                .unwrap();
        assert_eq!((sampling.n, sampling.frequency_penalty), (2, 2.0));
        // Left out: nothing changes the logits.
        let plain = chat(json!({"model": "m", "messages": []}))
            .sampling(16)
            .unwrap();
        assert!(!plain.adjusts_logits());
        assert_eq!(plain.n, 1);
    }

    #[test]
    fn other_content_parts_are_a_typed_error() {
        let request = chat(json!({
            "model": "m",
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
            ]}]
        }));
        let error = request.messages[0].text().unwrap_err();
        assert_eq!(
            error.message,
            "only text content parts are supported, not `image_url` (this model reads text only)"
        );
        assert_eq!((error.status, error.kind), (400, ErrorKind::InvalidRequest));
        assert_eq!(error.param.as_deref(), Some("messages"));
    }

    #[test]
    fn parses_completion_prompts() {
        let cases = [
            (
                json!("Once upon"),
                Ok(PromptInput::Text("Once upon".into())),
            ),
            (
                json!(["Once upon"]),
                Ok(PromptInput::Text("Once upon".into())),
            ),
            (json!([1, 2, 3]), Ok(PromptInput::Tokens(vec![1, 2, 3]))),
            (json!([[4, 5]]), Ok(PromptInput::Tokens(vec![4, 5]))),
            (
                json!(["a", "b"]),
                Err("only a single prompt per request is supported"),
            ),
            (
                json!([[1], [2]]),
                Err("only a single prompt per request is supported"),
            ),
            (json!([]), Err("prompt must not be empty")),
            (json!([[]]), Err("prompt must not be empty")),
        ];
        for (prompt, expected) in cases {
            let request = completion(json!({"model": "m", "prompt": prompt.clone(), "echo": null}));
            let got = request.prompt_input().map_err(|error| {
                assert_eq!(error.param.as_deref(), Some("prompt"));
                error.message
            });
            assert_eq!(got, expected.map_err(str::to_owned), "prompt {prompt}");
        }
    }

    #[test]
    fn completion_max_tokens_defaults_to_16_and_null_means_the_context() {
        let request = completion(json!({
            "model": "m", "prompt": [1, 2], "logprobs": 5, "echo": true, "seed": 1,
            "suffix": null, "best_of": 1
        }));
        assert_eq!(request.max_tokens, Some(16));
        assert!(request.echo);
        let sampling = request.sampling(500).unwrap();
        assert_eq!((sampling.max_tokens, sampling.logprobs), (16, Some(5)));

        let request = completion(json!({"model": "m", "prompt": "x", "max_tokens": null}));
        assert_eq!(request.sampling(500).unwrap().max_tokens, 500);
        let back: CompletionRequest =
            serde_json::from_value(serde_json::to_value(&request).unwrap()).unwrap();
        assert_eq!(back, request, "null max_tokens survives a round trip");

        let request = completion(json!({"model": "m", "prompt": "x", "max_tokens": 7}));
        assert_eq!(request.sampling(500).unwrap().max_tokens, 7);
    }

    #[test]
    fn max_completion_tokens_wins_over_max_tokens() {
        let base = json!({"model": "m", "messages": []});
        let with = |extra: Value| {
            let mut value = base.clone();
            value
                .as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            chat(value).sampling(1000).unwrap().max_tokens
        };
        assert_eq!(with(json!({"max_tokens": 5})), 5);
        assert_eq!(with(json!({"max_completion_tokens": 6})), 6);
        assert_eq!(
            with(json!({"max_tokens": 5, "max_completion_tokens": 6})),
            6
        );
        assert_eq!(with(json!({})), 1000);
    }

    #[test]
    fn validation_errors_name_the_param() {
        let chat_cases = [
            (json!({"n": 17}), "n", "n must be between 1 and 16, got 17"),
            (json!({"n": 0}), "n", "n must be between 1 and 16, got 0"),
            (
                json!({"presence_penalty": 2.5}),
                "presence_penalty",
                "presence_penalty must be between -2 and 2, got 2.5",
            ),
            (
                json!({"frequency_penalty": -3}),
                "frequency_penalty",
                "frequency_penalty must be between -2 and 2, got -3",
            ),
            (
                json!({"logit_bias": {"12": 101}}),
                "logit_bias",
                "logit_bias values must be between -100 and 100 (at most 300 tokens); token 12 has 101",
            ),
            (
                json!({"logit_bias": {"hello": 1}}),
                "logit_bias",
                "logit_bias keys are token ids; `hello` is not one",
            ),
            (
                json!({"logit_bias": {"3": "high"}}),
                "logit_bias",
                "the bias of token 3 must be a number",
            ),
            (
                json!({"logit_bias": [1, 2]}),
                "logit_bias",
                "logit_bias must be an object from token ids to biases",
            ),
            (
                json!({"logit_bias": (0..301).map(|i| (i.to_string(), json!(1))).collect::<serde_json::Map<_, _>>()}),
                "logit_bias",
                "logit_bias names 301 tokens; at most 300 are allowed",
            ),
            (
                json!({"min_p": 1.5}),
                "min_p",
                "min_p must be between 0 and 1, got 1.5",
            ),
            (
                json!({"stop": ["a", "b", "c", "d", "e"]}),
                "stop",
                "at most 4 stop sequences are allowed",
            ),
            (
                json!({"stop": ""}),
                "stop",
                "stop sequences must not be empty",
            ),
            (
                json!({"stop": ["a", ""]}),
                "stop",
                "stop sequences must not be empty",
            ),
            (
                json!({"stop": ["a", "b".repeat(1025)]}),
                "stop",
                "a stop sequence is at most 1024 bytes (one has 1025)",
            ),
            (
                json!({"temperature": 2.5}),
                "temperature",
                "temperature must be between 0 and 2, got 2.5",
            ),
            (
                json!({"top_p": 0}),
                "top_p",
                "top_p must be greater than 0 and at most 1, got 0",
            ),
            (
                json!({"top_k": -2}),
                "top_k",
                "top_k must be -1 or 0 (disabled) or at least 1",
            ),
            (
                json!({"max_tokens": 0}),
                "max_tokens",
                "max_tokens must be at least 1",
            ),
            (
                json!({"max_completion_tokens": 0}),
                "max_completion_tokens",
                "max_tokens must be at least 1",
            ),
            (
                json!({"logprobs": true, "top_logprobs": 21}),
                "top_logprobs",
                "logprobs must be at most 20, got 21",
            ),
            (
                json!({"top_logprobs": 2}),
                "top_logprobs",
                "logprobs must be true when top_logprobs is set",
            ),
        ];
        for (extra, param, message) in chat_cases {
            let mut value = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
            value
                .as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let error = chat(value).sampling(16).unwrap_err();
            assert_eq!(
                (
                    error.status,
                    error.kind,
                    error.param.as_deref(),
                    error.message.as_str()
                ),
                (400, ErrorKind::InvalidRequest, Some(param), message),
                "{extra}"
            );
        }
        let completion_cases = [
            (json!({"logprobs": 21}), "logprobs"),
            (json!({"max_tokens": 0}), "max_tokens"),
            (json!({"n": 30}), "n"),
            (json!({"stop": ["a", "b", "c", "d", "e"]}), "stop"),
        ];
        for (extra, param) in completion_cases {
            let mut value = json!({"model": "m", "prompt": "hi"});
            value
                .as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let error = completion(value).sampling(16).unwrap_err();
            assert_eq!(error.param.as_deref(), Some(param), "{extra}");
        }
        // Boundaries that are accepted.
        let ok = chat(json!({
            "model": "m", "messages": [], "n": 1, "stop": ["a", "b", "c", "d"], "temperature": 0,
            "top_k": 0, "logprobs": false, "top_logprobs": 0, "max_tokens": 1
        }));
        let sampling = ok.sampling(16).unwrap();
        assert_eq!(
            (sampling.top_k, sampling.logprobs, sampling.temperature),
            (None, None, 0.0)
        );
        let ok = chat(json!({"model": "m", "messages": [], "top_k": 40, "logprobs": true}));
        let sampling = ok.sampling(16).unwrap();
        assert_eq!((sampling.top_k, sampling.logprobs), (Some(40), Some(0)));
    }

    #[test]
    fn the_session_key_is_prompt_cache_key_then_the_header_then_user() {
        let key = |extra: Value, header: Option<&str>| {
            let mut value = json!({"model": "m", "prompt": "p"});
            value
                .as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            completion(value)
                .common
                .session_key(header.map(str::as_bytes))
                .map(|k| k.map(|k| k.as_str().to_owned()))
        };
        let got = |extra, header| key(extra, header).unwrap();
        let both = json!({"prompt_cache_key": "k", "user": "u"});
        assert_eq!(got(both.clone(), Some("h")).as_deref(), Some("k"));
        let no_key = json!({"prompt_cache_key": "", "user": "u"});
        assert_eq!(got(no_key.clone(), Some("h")).as_deref(), Some("h"));
        assert_eq!(got(no_key.clone(), Some("")).as_deref(), Some("u"));
        assert_eq!(got(no_key, None).as_deref(), Some("u"));
        assert_eq!(got(json!({"user": null}), None), None);
        assert_eq!(got(json!({}), None), None);
        // Bad values are refused, naming where they came from.
        let long = "s".repeat(600);
        let e = key(json!({}), Some(&long)).unwrap_err();
        assert_eq!(e.param.as_deref(), Some(SESSION_HEADER));
        let e = key(json!({}), Some("caf\u{e9}")).unwrap_err();
        assert_eq!(e.param.as_deref(), Some(SESSION_HEADER));
        let e = key(json!({"user": long}), None).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("user"));
    }

    #[test]
    fn requests_serialise_without_absent_fields_and_round_trip() {
        let request = chat(json!({
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "stop": "x"
        }));
        let value = serde_json::to_value(&request).unwrap();
        assert_eq!(
            value,
            json!({
                "model": "m",
                "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                "stop": "x",
                "stream": false,
                "ignore_eos": false
            })
        );
        assert_eq!(chat(value), request);

        let request = completion(json!({"model": "m", "prompt": [[1, 2]], "stream": true,
            "stream_options": {"include_usage": true}}));
        assert!(request.include_usage());
        let back = completion(serde_json::to_value(&request).unwrap());
        assert_eq!(back, request);
    }
}

//! A request body to what a worker generates from: token ids, sampling, stop strings.

use std::time::{SystemTime, UNIX_EPOCH};

use tidelock_prompt::{
    ChatMessage, FunctionSpec, PromptError, PromptKit, RenderedChat, SamplingDefaults, ToolStyle,
};

use crate::continuation::{Continuation, PromptText, TurnRecord};
use tidelock_protocol::openai::{
    ChatCompletionRequest, CommonFields, CompletionRequest, OpenAiError, PromptInput, ResponseMeta,
    ToolChoice, ToolPlan,
};
use tidelock_protocol::{Constraint, SamplingParams};

/// Which OpenAI endpoint a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`.
    Chat,
    /// `POST /v1/completions`.
    Completion,
}

impl Endpoint {
    /// The endpoint's name in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat_completions",
            Endpoint::Completion => "completions",
        }
    }
}

/// A parsed request body, not yet tokenized.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    Chat(Box<ChatCompletionRequest>),
    Completion(Box<CompletionRequest>),
}

/// Parses a request body of `endpoint`; malformed JSON, wrong types and invalid UTF-8 are 400s
/// naming the problem.
pub fn parse(endpoint: Endpoint, body: &[u8]) -> Result<Parsed, OpenAiError> {
    Ok(match endpoint {
        Endpoint::Chat => Parsed::Chat(OpenAiError::parse_body(body)?),
        Endpoint::Completion => Parsed::Completion(OpenAiError::parse_body(body)?),
    })
}

/// Everything a worker needs to generate, and the client to be answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    pub endpoint: Endpoint,
    /// Id, time and model every response and chunk repeats.
    pub meta: ResponseMeta,
    /// The prompt as token ids (chat template applied).
    pub tokens: Vec<u32>,
    /// The digest of the prompt's text (rendered, for chat), to remember with its answer; `None`
    /// for a prompt given as ids.
    pub text: Option<PromptText>,
    /// Leading ids taken from the session's [`Continuation`] rather than tokenized again.
    pub continued: usize,
    pub sampling: SamplingParams,
    /// Stop strings, matched on the text and never returned.
    pub stops: Vec<String>,
    /// Answer as server-sent events.
    pub stream: bool,
    /// How to read tool calls out of the answer; `None`: the answer is all text.
    pub tools: Option<ToolReading>,
}

/// How a chat answer's tool calls are read ([`tidelock_prompt::ToolParser`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolReading {
    /// The model family's way of writing calls.
    pub style: ToolStyle,
    /// More than one call is returned (otherwise the first only): `parallel_tool_calls`, and
    /// never for a named function (one call of it, as OpenAI answers).
    pub parallel: bool,
    /// The functions offered: a call of another name is text.
    pub names: Vec<String>,
}

/// Seconds since the Unix epoch: OpenAI's `created` fields.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Parsed {
    /// The model the request names.
    pub fn model(&self) -> &str {
        match self {
            Parsed::Chat(r) => &r.model,
            Parsed::Completion(r) => &r.model,
        }
    }

    /// The fields both endpoints share (session hints, stream flags).
    pub fn common(&self) -> &CommonFields {
        match self {
            Parsed::Chat(r) => &r.common,
            Parsed::Completion(r) => &r.common,
        }
    }

    pub fn endpoint(&self) -> Endpoint {
        match self {
            Parsed::Chat(_) => Endpoint::Chat,
            Parsed::Completion(_) => Endpoint::Completion,
        }
    }

    /// Renders and tokenizes the prompt with `kit` and checks every field. `max_context` is the
    /// longest context (prompt plus completion) the request may reach: the prompt must be
    /// shorter, and `max_tokens` defaults to (and is capped at) the room left.
    pub fn prepare(self, kit: &PromptKit, max_context: u64) -> Result<Prepared, OpenAiError> {
        self.prepare_after(kit, max_context, None)
    }

    /// [`Parsed::prepare`], for a session that `previous` continues: when the prompt's text
    /// starts with the text `previous` remembers, its ids are `previous`'s followed by the
    /// tokenization of the rest alone.
    pub fn prepare_after(
        self,
        kit: &PromptKit,
        max_context: u64,
        previous: Option<&Continuation>,
    ) -> Result<Prepared, OpenAiError> {
        self.render(kit)?.tokenize(kit, max_context, previous)
    }

    /// The first half of [`Parsed::prepare`]: the chat template applied (its cost grows with the
    /// messages), nothing tokenized yet (which costs much more, see
    /// [`Rendered::bytes_to_tokenize`]).
    pub fn render(self, kit: &PromptKit) -> Result<Rendered, OpenAiError> {
        let mut tools = None;
        let prompt = match &self {
            Parsed::Chat(req) => {
                let plan = req.tool_plan()?;
                let chat = chat_text(kit, req)?;
                tools = Some(plan);
                Prompt::Text {
                    chat,
                    add_special: false,
                    param: "messages",
                }
            }
            Parsed::Completion(req) => {
                if req.echo {
                    return Err(OpenAiError::invalid("echo", "echo is not supported"));
                }
                match req.prompt_input()? {
                    PromptInput::Tokens(tokens) => Prompt::Ids(tokens),
                    PromptInput::Text(text) => Prompt::Text {
                        chat: RenderedChat::user_only(text),
                        add_special: true,
                        param: "prompt",
                    },
                }
            }
        };
        Ok(Rendered {
            parsed: self,
            prompt,
            tools,
        })
    }
}

/// A request whose prompt is rendered but not yet tokenized ([`Parsed::render`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    parsed: Parsed,
    prompt: Prompt,
    /// A chat request's tools, checked.
    tools: Option<ToolPlan>,
}

#[derive(Debug, Clone, PartialEq)]
enum Prompt {
    /// Text to tokenize; `param` is the request field it came from.
    Text {
        chat: RenderedChat,
        add_special: bool,
        param: &'static str,
    },
    /// Ids given by the client.
    Ids(Vec<u32>),
}

impl Rendered {
    pub fn parsed(&self) -> &Parsed {
        &self.parsed
    }

    /// Whether tokenizing adds the tokenizer's special tokens (BOS) to the text: a completion's
    /// prompt does, a chat's rendering does not (its template writes them).
    pub fn adds_special(&self) -> bool {
        matches!(
            self.prompt,
            Prompt::Text {
                add_special: true,
                ..
            }
        )
    }

    /// Whether the prompt is text (not ids given by the client).
    pub fn is_text(&self) -> bool {
        matches!(self.prompt, Prompt::Text { .. })
    }

    /// Whether the prompt's text starts with the text `previous` remembers.
    pub fn continues(&self, previous: &Continuation) -> bool {
        match &self.prompt {
            Prompt::Text { chat, .. } => previous.rest(chat.text()).is_some(),
            Prompt::Ids(_) => false,
        }
    }

    /// The continuation a session's shared turn log stands for in this prompt
    /// ([`Continuation::rebuild`]); `None` for a prompt given as ids, or when no record fits.
    pub fn rebuild(&self, records: &[TurnRecord], kit: &PromptKit) -> Option<Continuation> {
        match &self.prompt {
            Prompt::Text { chat, .. } if !records.is_empty() => {
                Continuation::rebuild(records, chat, kit)
            }
            _ => None,
        }
    }

    /// Bytes of text [`Rendered::tokenize`] will encode after `previous`: the whole rendered
    /// prompt, or only what follows the text `previous` remembers. A tokenizer's time and
    /// memory grow with it (a few hundred bytes of memory per byte of text).
    pub fn bytes_to_tokenize(&self, previous: Option<&Continuation>) -> usize {
        match &self.prompt {
            Prompt::Text { chat, .. } => {
                let text = chat.text();
                previous
                    .and_then(|p| p.rest(text))
                    .map_or(text.len(), str::len)
            }
            Prompt::Ids(_) => 0,
        }
    }

    /// The second half of [`Parsed::prepare_after`]: tokenizes and checks every field.
    pub fn tokenize(
        self,
        kit: &PromptKit,
        max_context: u64,
        previous: Option<&Continuation>,
    ) -> Result<Prepared, OpenAiError> {
        let Rendered {
            parsed,
            prompt,
            tools,
        } = self;
        let mut continued = 0;
        let (tokens, text, param) = match prompt {
            Prompt::Text {
                chat,
                add_special,
                param,
            } => {
                // Users' text never becomes control tokens (`tidelock_prompt::RenderedChat`).
                let text = chat.text();
                let matched = previous.and_then(|p| Some((p, p.rest(text)?)));
                let (head, from, add_special) = match matched {
                    Some((p, rest)) => (p.ids(), text.len() - rest.len(), false),
                    None => (&[][..], 0, add_special),
                };
                let mut ids = head.to_vec();
                // A prompt must leave room in the context: tokenizing stops once it cannot.
                let room = usize::try_from(max_context.saturating_sub(1))
                    .unwrap_or(usize::MAX)
                    .saturating_sub(head.len());
                ids.extend(
                    kit.encode_rendered_within(&chat, from, add_special, room)
                        .map_err(|e| match e {
                            PromptError::TooManyTokens { at_least, .. } => too_long(
                                param,
                                max_context,
                                &format!("at least {}", head.len() + at_least),
                            ),
                            e => OpenAiError::invalid(param, e.to_string()),
                        })?,
                );
                continued = head.len();
                let text = PromptText::after(text, matched.map(|(p, _)| p), add_special);
                (ids, Some(text), param)
            }
            Prompt::Ids(ids) => (ids, None, "prompt"),
        };
        if let Parsed::Completion(_) = parsed {
            if tokens.is_empty() {
                return Err(OpenAiError::invalid("prompt", "the prompt is empty"));
            }
            if let Some(bad) = tokens.iter().find(|&&t| t as usize >= kit.vocab_size()) {
                return Err(OpenAiError::invalid(
                    "prompt",
                    format!(
                        "token id {bad} is out of range: the vocabulary has {} tokens",
                        kit.vocab_size()
                    ),
                ));
            }
        }
        let prompt = tokens.len() as u64;
        if prompt >= max_context {
            return Err(too_long(param, max_context, &prompt.to_string()));
        }
        let room = u32::try_from(max_context - prompt).unwrap_or(u32::MAX);
        let mut sampling = match &parsed {
            Parsed::Chat(req) => req.sampling(room)?,
            Parsed::Completion(req) => req.sampling(room)?,
        };
        sampling.max_tokens = sampling.max_tokens.min(room);
        check_vocabulary(&sampling, kit.vocab_size())?;
        apply_defaults(&mut sampling, parsed.common(), kit.sampling_defaults());
        let tools = match tools {
            Some(plan) => tool_reading(kit, &plan, &mut sampling)?,
            None => None,
        };
        let (prefix, stops) = match &parsed {
            Parsed::Chat(req) => ("chatcmpl", req.stop_strings()),
            Parsed::Completion(req) => ("cmpl", req.stop_strings()),
        };
        Ok(Prepared {
            endpoint: parsed.endpoint(),
            meta: ResponseMeta {
                id: format!("{prefix}-{:032x}", rand::random::<u128>()),
                created: unix_now(),
                model: parsed.model().to_owned(),
                include_usage: parsed.common().include_usage(),
            },
            tokens,
            text,
            continued,
            sampling,
            stops,
            stream: parsed.common().stream,
            tools,
        })
    }
}

/// How the answer's calls are read (`None` with `tool_choice: "none"`), and for `required` or a
/// named function, the grammar every answer must follow so that its calls always parse.
fn tool_reading(
    kit: &PromptKit,
    plan: &ToolPlan,
    sampling: &mut SamplingParams,
) -> Result<Option<ToolReading>, OpenAiError> {
    if !plan.reads_calls() {
        return Ok(None);
    }
    let style = kit.tool_style();
    let parallel = plan.parallel && !matches!(plan.choice, ToolChoice::Function(_));
    if let Some(forced) = plan.forced() {
        if sampling.constraint.is_some() {
            return Err(OpenAiError::invalid(
                "response_format",
                "response_format cannot be combined with tool_choice `required` or a named function (the answer must be tool calls)",
            ));
        }
        let functions: Vec<FunctionSpec<'_>> = forced
            .into_iter()
            .map(|f| FunctionSpec {
                name: &f.name,
                parameters: f.parameters.as_ref(),
            })
            .collect();
        sampling.constraint = Some(Constraint::Lark {
            grammar: style.grammar(&functions, parallel),
        });
    }
    Ok(Some(ToolReading {
        style,
        parallel,
        names: plan.functions.iter().map(|f| f.name.clone()).collect(),
    }))
}

/// The token ids a request names besides its prompt (`logit_bias`, `stop_token_ids`) are in
/// the model's vocabulary.
fn check_vocabulary(sampling: &SamplingParams, vocab: usize) -> Result<(), OpenAiError> {
    let mut named = sampling
        .logit_bias
        .keys()
        .map(|&id| ("logit_bias", id))
        .chain(
            sampling
                .stop_token_ids
                .iter()
                .map(|&id| ("stop_token_ids", id)),
        );
    match named.find(|&(_, id)| id as usize >= vocab) {
        Some((param, bad)) => Err(OpenAiError::invalid(
            param,
            format!("token id {bad} is out of range: the vocabulary has {vocab} tokens"),
        )),
        None => Ok(()),
    }
}

/// The model's default sampling for what the request left out; a request's own value always
/// wins, even one equal to OpenAI's default (`temperature: 1` sent is kept).
fn apply_defaults(sampling: &mut SamplingParams, asked: &CommonFields, defaults: SamplingDefaults) {
    if let (None, Some(t)) = (asked.temperature, defaults.temperature) {
        sampling.temperature = t;
    }
    if let (None, Some(p)) = (asked.top_p, defaults.top_p) {
        sampling.top_p = p;
    }
    if let (None, Some(k)) = (asked.top_k, defaults.top_k) {
        sampling.top_k = Some(k);
    }
}

/// A prompt that does not leave room in the context: `has` is its length, or a bound on it.
fn too_long(param: &str, max_context: u64, has: &str) -> OpenAiError {
    OpenAiError::invalid(
        param,
        format!(
            "This request's maximum context length is {max_context} tokens; the prompt has {has}."
        ),
    )
    .with_code("context_length_exceeded")
}

/// The conversation rendered with the chat template, and the request's tools: passed to a
/// template that reads them, else written into the messages ([`ToolStyle::messages_for_template`]).
fn chat_text(kit: &PromptKit, req: &ChatCompletionRequest) -> Result<RenderedChat, OpenAiError> {
    if req.messages.is_empty() {
        return Err(OpenAiError::invalid(
            "messages",
            "messages must contain at least one message",
        ));
    }
    let messages = req
        .messages
        .iter()
        .map(|m| {
            let mut out = ChatMessage::new(m.role.clone(), m.text()?.unwrap_or_default());
            out.name = m.name.clone();
            out.tool_calls = m.tool_calls.clone();
            out.tool_call_id = m.tool_call_id.clone();
            Ok(out)
        })
        .collect::<Result<Vec<_>, OpenAiError>>()?;
    let style = kit.tool_style();
    let tools = req.tools.as_ref().filter(|t| !t.is_null());
    let messages = style.messages_for_template(messages, tools);
    let mut extra = serde_json::Map::new();
    if let Some(tools) = tools.filter(|_| style.native) {
        extra.insert("tools".into(), tools.clone());
    }
    kit.render_chat_guarded(&messages, true, &extra)
        .map_err(|e| {
            // Control-token text the template cannot keep as text is named where it was sent
            // (the only extra variable is `tools`).
            let param = match &e {
                PromptError::ControlTextInContent { in_extra: true, .. } => "tools",
                _ => "messages",
            };
            OpenAiError::invalid(param, e.to_string())
        })
}

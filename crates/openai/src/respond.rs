//! A worker's generate events back to an OpenAI answer: one JSON body, or server-sent events.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use futures::stream::BoxStream;
use tidelock_prompt::{IncrementalDetokenizer, PromptKit, StopMatcher};
use tidelock_protocol::GenerateEvent;
use tidelock_protocol::openai::{
    self, ChatCompletion, Completion, Delta, OpenAiError, ResponseMeta, TokenLogprob,
};

use crate::continuation::Answer;
use crate::prepare::{Endpoint, Prepared};

/// Called with the whole answer when it ends normally (not cut by a stop string, not failed);
/// the answer's end reaches the client once the future it returns is done (so that what it
/// records is visible before the client can send its next turn).
pub type OnAnswer = Box<dyn FnOnce(Answer) -> futures::future::BoxFuture<'static, ()> + Send>;

/// An OpenAI error as a response with its status.
pub fn error_response(e: &OpenAiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, axum::Json(e.body())).into_response()
}

/// Text out of token events: detokenized, cut at stop strings.
struct TextOut {
    kit: Arc<PromptKit>,
    events: BoxStream<'static, GenerateEvent>,
    detok: IncrementalDetokenizer,
    stop: StopMatcher,
    usage: tidelock_protocol::Usage,
    /// Log-probabilities of tokens read but not yet sent (when the request asked for them).
    logprobs: Vec<TokenLogprob>,
    /// Characters of completion text sent so far (the completions `text_offset` base).
    chars_sent: usize,
    /// The answer so far, and who wants it whole.
    remember: Option<(Answer, OnAnswer)>,
}

/// One step of a generation as the client sees it.
enum Step {
    Text(String),
    /// The end: remaining text, finish reason.
    End(String, Option<String>),
    Failed(OpenAiError),
}

impl TextOut {
    fn usage(&self) -> openai::Usage {
        openai::Usage::from(self.usage)
    }

    /// Reads the next event; `None` when the answer is complete.
    async fn next(&mut self) -> Option<Step> {
        if self.stop.is_stopped() {
            return None;
        }
        let Some(event) = self.events.next().await else {
            return Some(Step::Failed(OpenAiError::internal(
                "the worker ended the request without an answer",
            )));
        };
        self.usage.record(&event);
        Some(match event {
            GenerateEvent::Prefilled { .. } => Step::Text(String::new()),
            GenerateEvent::Tokens {
                ids,
                logprobs,
                top_logprobs,
            } => {
                if let Some(logprobs) = logprobs {
                    self.collect_logprobs(&ids, &logprobs, top_logprobs.as_deref());
                }
                if let Some((answer, _)) = &mut self.remember {
                    answer.ids.extend_from_slice(&ids);
                }
                let mut text = String::new();
                for id in ids {
                    let piece = self
                        .detok
                        .push(self.kit.tokenizer(), id)
                        .unwrap_or_default();
                    let out = self.stop.push(&piece);
                    text.push_str(&out.text);
                    if out.stopped {
                        // Ending here drops the event stream, which cancels generation. The
                        // text is cut: nothing to remember.
                        self.remember = None;
                        return Some(Step::End(text, Some("stop".into())));
                    }
                }
                if let Some((answer, _)) = &mut self.remember {
                    answer.text.push_str(&text);
                }
                Step::Text(text)
            }
            GenerateEvent::Finished { reason, .. } => {
                let tail = self.detok.finish(self.kit.tokenizer()).unwrap_or_default();
                let mut text = self.stop.push(&tail).text;
                let finish = if self.stop.is_stopped() {
                    self.remember = None;
                    Some("stop".into())
                } else {
                    text.push_str(&self.stop.finish());
                    openai::finish_reason(reason)
                };
                if let Some((mut answer, on_answer)) = self.remember.take() {
                    answer.text.push_str(&text);
                    on_answer(answer).await;
                }
                Step::End(text, finish)
            }
            GenerateEvent::Error { code, message } => {
                Step::Failed(OpenAiError::from_wire(code, message))
            }
            GenerateEvent::Unknown => Step::Text(String::new()),
        })
    }

    fn collect_logprobs(
        &mut self,
        ids: &[u32],
        logprobs: &[f32],
        top: Option<&[Vec<tidelock_protocol::TopLogprob>]>,
    ) {
        let text = |id: u32| self.kit.decode(&[id], false).unwrap_or_default();
        for (i, (&id, &logprob)) in ids.iter().zip(logprobs).enumerate() {
            let top = top
                .and_then(|t| t.get(i))
                .map(|alts| alts.iter().map(|a| (text(a.id), a.logprob)).collect())
                .unwrap_or_default();
            self.logprobs.push(TokenLogprob {
                token: text(id),
                logprob,
                top,
            });
        }
    }

    /// A content chunk, with the log-probabilities of the tokens it carries when asked for.
    fn chunk(
        &mut self,
        meta: &ResponseMeta,
        endpoint: Endpoint,
        wants_logprobs: bool,
        text: String,
        finish: Option<String>,
    ) -> String {
        let tokens = std::mem::take(&mut self.logprobs);
        let offset = self.chars_sent;
        self.chars_sent += text.chars().count();
        match endpoint {
            Endpoint::Chat => {
                let delta = Delta {
                    role: None,
                    content: Some(text),
                };
                let mut c = meta.chat_chunk(delta, finish);
                if wants_logprobs {
                    c.choices[0].logprobs = Some(openai::chat_logprobs(&tokens));
                }
                openai::sse_data(&c)
            }
            Endpoint::Completion => {
                let mut c = meta.completion_chunk(text, finish);
                if wants_logprobs {
                    c.choices[0].logprobs = Some(openai::completion_logprobs(&tokens, offset));
                }
                openai::sse_data(&c)
            }
        }
    }
}

/// Answers `prepared` from `events`: the whole body when it did not ask to stream (an error
/// before the end becomes that error's status), else server-sent events (an error after the
/// stream started becomes an error event, then `data: [DONE]`).
pub async fn respond(
    prepared: Prepared,
    kit: Arc<PromptKit>,
    events: BoxStream<'static, GenerateEvent>,
) -> Response {
    respond_then(prepared, kit, events, None).await
}

/// [`respond`], calling `on_answer` with the whole answer when it ends normally.
pub async fn respond_then(
    prepared: Prepared,
    kit: Arc<PromptKit>,
    events: BoxStream<'static, GenerateEvent>,
    on_answer: Option<OnAnswer>,
) -> Response {
    let wants_logprobs = prepared.sampling.logprobs.is_some();
    let endpoint = prepared.endpoint;
    let meta = prepared.meta;
    let out = TextOut {
        kit,
        events,
        detok: IncrementalDetokenizer::new(true),
        stop: StopMatcher::new(prepared.stops),
        usage: tidelock_protocol::Usage::default(),
        logprobs: Vec::new(),
        chars_sent: 0,
        remember: on_answer.map(|f| (Answer::default(), f)),
    };
    if !prepared.stream {
        return whole(&meta, endpoint, wants_logprobs, out).await;
    }
    let first = (endpoint == Endpoint::Chat).then(|| {
        let role = Delta {
            role: Some("assistant".into()),
            content: Some(String::new()),
        };
        openai::sse_data(&meta.chat_chunk(role, None))
    });
    let events = futures::stream::unfold(Some((out, meta)), move |state| async move {
        let (mut out, meta) = state?;
        let mut lines = String::new();
        match out.next().await? {
            Step::Text(t) if t.is_empty() => {}
            Step::Text(t) => lines.push_str(&out.chunk(&meta, endpoint, wants_logprobs, t, None)),
            Step::End(t, finish) => {
                lines.push_str(&out.chunk(&meta, endpoint, wants_logprobs, t, finish));
                if meta.include_usage {
                    let usage = out.usage();
                    lines.push_str(&match endpoint {
                        Endpoint::Chat => openai::sse_data(&meta.chat_usage_chunk(usage)),
                        Endpoint::Completion => {
                            openai::sse_data(&meta.completion_usage_chunk(usage))
                        }
                    });
                }
                lines.push_str(openai::SSE_DONE);
                return Some((lines, None));
            }
            Step::Failed(e) => {
                lines.push_str(&e.sse_event());
                lines.push_str(openai::SSE_DONE);
                return Some((lines, None));
            }
        }
        Some((lines, Some((out, meta))))
    });
    let body = futures::stream::iter(first)
        .chain(events)
        .filter(|s| futures::future::ready(!s.is_empty()))
        .map(|s| Ok::<_, Infallible>(Bytes::from(s)));
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

/// The non-streamed answer: read to the end, then one JSON body.
async fn whole(
    meta: &ResponseMeta,
    endpoint: Endpoint,
    wants_logprobs: bool,
    mut out: TextOut,
) -> Response {
    let mut content = String::new();
    loop {
        match out.next().await {
            Some(Step::Text(t)) => content.push_str(&t),
            Some(Step::End(t, finish)) => {
                content.push_str(&t);
                let usage = out.usage();
                let logprobs = &out.logprobs;
                return match endpoint {
                    Endpoint::Chat => {
                        let mut body = ChatCompletion::new(meta, content, finish, usage);
                        if wants_logprobs {
                            body.choices[0].logprobs = Some(openai::chat_logprobs(logprobs));
                        }
                        axum::Json(body).into_response()
                    }
                    Endpoint::Completion => {
                        let mut body = Completion::new(meta, content, finish, usage);
                        if wants_logprobs {
                            body.choices[0].logprobs =
                                Some(openai::completion_logprobs(logprobs, 0));
                        }
                        axum::Json(body).into_response()
                    }
                };
            }
            Some(Step::Failed(e)) => return error_response(&e),
            None => return error_response(&OpenAiError::internal("generation ended early")),
        }
    }
}

//! A worker's generate events back to an OpenAI answer: one JSON body, or server-sent events.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use futures::stream::BoxStream;
use tidelock_prompt::{IncrementalDetokenizer, PromptKit, StopMatcher, ToolParser, ToolPiece};
use tidelock_protocol::openai::{
    self, ChatChoice, ChatCompletion, ChatMessageOut, Completion, CompletionChoice, Delta,
    OpenAiError, ResponseMeta, TokenLogprob, ToolCallOut,
};
use tidelock_protocol::{FinishReason, GenerateEvent};

use crate::continuation::Answer;
use crate::prepare::{Endpoint, Prepared, ToolReading};

/// Called with the whole answer when it ends normally (not cut by a stop string, not failed);
/// the answer's end reaches the client once the future it returns is done (so that what it
/// records is visible before the client can send its next turn).
pub type OnAnswer = Box<dyn FnOnce(Answer) -> futures::future::BoxFuture<'static, ()> + Send>;

/// An OpenAI error as a response with its status.
pub fn error_response(e: &OpenAiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, axum::Json(e.body())).into_response()
}

/// Text out of token events: detokenized, cut at stop strings, one [`AnswerOut`] per answer
/// (`n`).
struct TextOut {
    kit: Arc<PromptKit>,
    events: BoxStream<'static, GenerateEvent>,
    answers: Vec<AnswerOut>,
    usage: tidelock_protocol::Usage,
    /// `Finished` arrived with this reason: answers still open end with it.
    finished: Option<FinishReason>,
    /// The answer so far, and who wants it whole (a request for one answer only).
    remember: Option<(Answer, OnAnswer)>,
}

/// One answer's text as it is sent.
struct AnswerOut {
    detok: IncrementalDetokenizer,
    stop: StopMatcher,
    /// Log-probabilities of tokens read but not yet sent (when the request asked for them).
    logprobs: Vec<TokenLogprob>,
    /// Characters of completion text sent so far (the completions `text_offset` base).
    chars_sent: usize,
    /// Whether its end was sent.
    ended: bool,
    /// Reads tool calls out of the text, when the request offers tools.
    tools: Option<ToolParser>,
    /// Calls after the first are dropped (`parallel_tool_calls: false`).
    one_call: bool,
    /// Calls returned so far.
    calls: u32,
}

impl AnswerOut {
    fn new(stops: Vec<String>, tools: Option<&ToolReading>) -> Self {
        AnswerOut {
            detok: IncrementalDetokenizer::new(true),
            stop: StopMatcher::new(stops),
            logprobs: Vec::new(),
            chars_sent: 0,
            ended: false,
            tools: tools.map(|t| t.style.parser(t.names.clone())),
            one_call: tools.is_some_and(|t| !t.parallel),
            calls: 0,
        }
    }

    /// What the client is told of `text`, the answer's next piece (`last`: its end): the text
    /// itself, or with tools, the content and the calls read out of it.
    fn said(&mut self, text: String, last: bool) -> Said {
        let Some(parser) = &mut self.tools else {
            return Said {
                text,
                calls: Vec::new(),
            };
        };
        let mut pieces = parser.push(&text);
        if last {
            pieces.extend(parser.finish());
        }
        let mut said = Said::default();
        for piece in pieces {
            match piece {
                ToolPiece::Text(t) => said.text.push_str(&t),
                ToolPiece::Call(_) if self.one_call && self.calls > 0 => {}
                ToolPiece::Call(call) => {
                    self.calls += 1;
                    said.calls.push(ToolCallOut::new(call.name, call.arguments));
                }
            }
        }
        said
    }

    /// OpenAI's finish reason for an answer that ended normally with `reason`: `tool_calls`
    /// when it made calls.
    fn finish(&self, reason: Option<String>) -> Option<String> {
        match reason {
            Some(r) if r == "stop" && self.calls > 0 => Some("tool_calls".into()),
            other => other,
        }
    }
}

/// A piece of an answer as the client sees it: text, and the tool calls completed in it.
#[derive(Default)]
struct Said {
    text: String,
    calls: Vec<ToolCallOut>,
}

impl Said {
    fn is_empty(&self) -> bool {
        self.text.is_empty() && self.calls.is_empty()
    }
}

/// One step of a generation as the client sees it.
enum Step {
    /// More of answer `.0` (may be empty).
    Text(usize, Said),
    /// The end of answer `.0`: what remained, finish reason.
    End(usize, Said, Option<String>),
    Failed(OpenAiError),
}

/// A step with nothing to tell.
fn nothing(i: usize) -> Step {
    Step::Text(i, Said::default())
}

impl TextOut {
    fn usage(&self) -> openai::Usage {
        openai::Usage::from(self.usage)
    }

    fn all_ended(&self) -> bool {
        self.answers.iter().all(|a| a.ended)
    }

    /// Reads the next event; `None` when every answer is complete.
    async fn next(&mut self) -> Option<Step> {
        if self.all_ended() {
            return None;
        }
        if let Some(reason) = self.finished {
            let open = self.answers.iter().position(|a| !a.ended)?;
            return Some(self.end(open, reason).await);
        }
        let Some(event) = self.events.next().await else {
            return Some(Step::Failed(OpenAiError::internal(
                "the worker ended the request without an answer",
            )));
        };
        self.usage.record(&event);
        let answer = |choice: u32| match choice as usize {
            i if i < self.answers.len() => Ok(i),
            _ => Err(Step::Failed(OpenAiError::internal(format!(
                "the worker sent answer {choice} of {}",
                self.answers.len()
            )))),
        };
        Some(match event {
            GenerateEvent::Prefilled { .. } => nothing(0),
            GenerateEvent::Tokens {
                ids,
                logprobs,
                top_logprobs,
                choice,
            } => {
                let i = match answer(choice) {
                    Ok(i) => i,
                    Err(failed) => return Some(failed),
                };
                if self.answers[i].ended {
                    // Cut by a stop string; its tokens still come until it ends.
                    return Some(nothing(i));
                }
                if let Some(logprobs) = logprobs {
                    let tokens = self.logprobs(&ids, &logprobs, top_logprobs.as_deref());
                    self.answers[i].logprobs.extend(tokens);
                }
                if let Some((answer, _)) = &mut self.remember {
                    answer.ids.extend_from_slice(&ids);
                }
                let out = &mut self.answers[i];
                let mut text = String::new();
                for id in ids {
                    let piece = out.detok.push(self.kit.tokenizer(), id).unwrap_or_default();
                    let cut = out.stop.push(&piece);
                    text.push_str(&cut.text);
                    if cut.stopped {
                        // The text is cut: nothing to remember. When every answer has ended,
                        // the event stream is dropped, which cancels generation.
                        out.ended = true;
                        self.remember = None;
                        let said = out.said(text, true);
                        let finish = out.finish(Some("stop".into()));
                        return Some(Step::End(i, said, finish));
                    }
                }
                if let Some((answer, _)) = &mut self.remember {
                    answer.text.push_str(&text);
                }
                Step::Text(i, out.said(text, false))
            }
            GenerateEvent::Ended { choice, reason, .. } => match answer(choice) {
                Ok(i) if self.answers[i].ended => nothing(i),
                Ok(i) => self.end(i, reason).await,
                Err(failed) => failed,
            },
            GenerateEvent::Finished { reason, .. } => {
                self.finished = Some(reason);
                match self.answers.iter().position(|a| !a.ended) {
                    Some(open) => self.end(open, reason).await,
                    None => nothing(0),
                }
            }
            GenerateEvent::Error { code, message } => {
                Step::Failed(OpenAiError::from_wire(code, message))
            }
            GenerateEvent::Unknown => nothing(0),
        })
    }

    /// Ends answer `i` for `reason`: the detokenizer's and stop matcher's held-back text.
    async fn end(&mut self, i: usize, reason: FinishReason) -> Step {
        let out = &mut self.answers[i];
        out.ended = true;
        let tail = out.detok.finish(self.kit.tokenizer()).unwrap_or_default();
        let mut text = out.stop.push(&tail).text;
        let finish = if out.stop.is_stopped() {
            self.remember = None;
            Some("stop".into())
        } else {
            text.push_str(&out.stop.finish());
            openai::finish_reason(reason)
        };
        if let Some((mut answer, on_answer)) = self.remember.take() {
            answer.text.push_str(&text);
            on_answer(answer).await;
        }
        let out = &mut self.answers[i];
        let said = out.said(text, true);
        let finish = out.finish(finish);
        Step::End(i, said, finish)
    }

    fn logprobs(
        &self,
        ids: &[u32],
        logprobs: &[f32],
        top: Option<&[Vec<tidelock_protocol::TopLogprob>]>,
    ) -> Vec<TokenLogprob> {
        let text = |id: u32| self.kit.decode(&[id], false).unwrap_or_default();
        ids.iter()
            .zip(logprobs)
            .enumerate()
            .map(|(i, (&id, &logprob))| TokenLogprob {
                token: text(id),
                logprob,
                top: top
                    .and_then(|t| t.get(i))
                    .map(|alts| alts.iter().map(|a| (text(a.id), a.logprob)).collect())
                    .unwrap_or_default(),
            })
            .collect()
    }

    /// The chunks of one step of answer `i`: its text (with the log-probabilities of the tokens
    /// it carries, when asked for), each call completed in it as two tool call deltas, and the
    /// finish reason (with the text when there are no calls, else on a chunk of its own).
    fn chunks(
        &mut self,
        meta: &ResponseMeta,
        endpoint: Endpoint,
        wants_logprobs: bool,
        (i, said, finish): (usize, Said, Option<String>),
    ) -> String {
        let out = &mut self.answers[i];
        let tokens = std::mem::take(&mut out.logprobs);
        let offset = out.chars_sent;
        out.chars_sent += said.text.chars().count();
        let first_call = out.calls - said.calls.len() as u32;
        match endpoint {
            Endpoint::Chat => {
                let mut lines = String::new();
                let mut logprobs = wants_logprobs.then(|| openai::chat_logprobs(&tokens));
                let mut send = |delta: Delta, finish: Option<String>| {
                    let mut c = meta.chat_chunk(delta, finish);
                    c.choices[0].index = i as u32;
                    c.choices[0].logprobs = logprobs.take();
                    lines.push_str(&openai::sse_data(&c));
                };
                let calls = !said.calls.is_empty();
                if !said.text.is_empty() || !calls {
                    let delta = Delta {
                        content: Some(said.text),
                        ..Delta::default()
                    };
                    send(delta, if calls { None } else { finish.clone() });
                }
                for (k, call) in said.calls.iter().enumerate() {
                    for piece in call.deltas(first_call + k as u32) {
                        let delta = Delta {
                            tool_calls: Some(vec![piece]),
                            ..Delta::default()
                        };
                        send(delta, None);
                    }
                }
                if calls && finish.is_some() {
                    send(Delta::default(), finish);
                }
                lines
            }
            Endpoint::Completion => {
                let mut c = meta.completion_chunk(said.text, finish);
                c.choices[0].index = i as u32;
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
    let n = prepared.sampling.n.max(1) as usize;
    let answers = (0..n)
        .map(|_| AnswerOut::new(prepared.stops.clone(), prepared.tools.as_ref()))
        .collect();
    let out = TextOut {
        kit,
        events,
        answers,
        usage: tidelock_protocol::Usage::default(),
        finished: None,
        // A session goes on from one answer: with several, the client picks, so none is kept.
        remember: on_answer.filter(|_| n == 1).map(|f| (Answer::default(), f)),
    };
    if !prepared.stream {
        return whole(&meta, endpoint, wants_logprobs, out).await;
    }
    let first: Vec<String> = match endpoint {
        Endpoint::Chat => (0..n)
            .map(|i| {
                let role = Delta {
                    role: Some("assistant".into()),
                    content: Some(String::new()),
                    ..Delta::default()
                };
                let mut c = meta.chat_chunk(role, None);
                c.choices[0].index = i as u32;
                openai::sse_data(&c)
            })
            .collect(),
        Endpoint::Completion => Vec::new(),
    };
    let events = futures::stream::unfold(Some((out, meta)), move |state| async move {
        let (mut out, meta) = state?;
        let mut lines = String::new();
        match out.next().await? {
            Step::Text(_, said) if said.is_empty() => {}
            Step::Text(i, said) => {
                lines.push_str(&out.chunks(&meta, endpoint, wants_logprobs, (i, said, None)));
            }
            Step::End(i, said, finish) => {
                lines.push_str(&out.chunks(&meta, endpoint, wants_logprobs, (i, said, finish)));
                if !out.all_ended() {
                    return Some((lines, Some((out, meta))));
                }
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
    let mut content = vec![String::new(); out.answers.len()];
    let mut calls: Vec<Vec<ToolCallOut>> = vec![Vec::new(); out.answers.len()];
    let mut finish = vec![None; out.answers.len()];
    let mut take = |i: usize, said: Said| {
        content[i].push_str(&said.text);
        calls[i].extend(said.calls);
    };
    loop {
        match out.next().await {
            Some(Step::Text(i, said)) => take(i, said),
            Some(Step::End(i, said, reason)) => {
                take(i, said);
                finish[i] = reason;
            }
            Some(Step::Failed(e)) => return error_response(&e),
            None if out.all_ended() => break,
            None => return error_response(&OpenAiError::internal("generation ended early")),
        }
    }
    let usage = out.usage();
    let answers = content.into_iter().zip(finish).zip(&out.answers).zip(0..);
    match endpoint {
        Endpoint::Chat => {
            let mut body = ChatCompletion::new(meta, String::new(), None, usage);
            body.choices = answers
                .zip(calls)
                .map(
                    |((((content, finish_reason), answer), index), calls)| ChatChoice {
                        index,
                        message: ChatMessageOut {
                            role: "assistant".to_owned(),
                            // An answer of calls only has `content: null`, as OpenAI's.
                            content: (!content.is_empty() || calls.is_empty()).then_some(content),
                            tool_calls: (!calls.is_empty()).then_some(calls),
                        },
                        logprobs: wants_logprobs.then(|| openai::chat_logprobs(&answer.logprobs)),
                        finish_reason,
                    },
                )
                .collect();
            axum::Json(body).into_response()
        }
        Endpoint::Completion => {
            let mut body = Completion::new(meta, String::new(), None, usage);
            body.choices = answers
                .map(
                    |(((text, finish_reason), answer), index)| CompletionChoice {
                        index,
                        text,
                        logprobs: wants_logprobs
                            .then(|| openai::completion_logprobs(&answer.logprobs, 0)),
                        finish_reason,
                    },
                )
                .collect();
            axum::Json(body).into_response()
        }
    }
}

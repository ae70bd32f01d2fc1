//! Tool calls as model families write them: how a template expects them, how a model's answer
//! is read back into calls, and the grammar that makes a required call always parse.
//!
//! Two formats cover the families Tidelock serves:
//! - [`ToolFormat::Hermes`]: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one
//!   block per call (Qwen2.5, Qwen3, Hermes, and Tidelock's own prompt for templates that know
//!   no tools, such as SmolLM2's);
//! - [`ToolFormat::Llama3Json`]: the whole answer is `{"name": ..., "parameters": {...}}`,
//!   several joined by `; ` (Llama 3.1 to 3.3's JSON tool calling).
//!
//! [`ToolStyle::of`] picks the format from the chat template's text, as a parser is picked per
//! family in vLLM (`--tool-call-parser`), and says whether the template renders tools itself
//! (`native`). When it does not, [`ToolStyle::messages_for_template`] writes the tools into the
//! system message and past calls and results into the messages' text, in the Hermes format, so
//! that any chat model sees the same conversation a tool-trained one would.
//!
//! [`ToolParser`] reads an answer as it streams: text that cannot be part of a call is passed on
//! at once, a call is returned when it is complete, and a call that does not parse stays text
//! (as vLLM leaves it). [`ToolStyle::grammar`] is a Lark grammar (`llguidance`'s dialect, with
//! the functions' parameter schemas embedded as `%json`) that admits only well-formed calls of
//! the named functions, written compactly as Python's `json.dumps` writes them.

use serde_json::{Map, Value, json};

use crate::jinja::python_json;
use crate::{ChatMessage, ChatTemplate};

/// How a model family writes a tool call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ToolFormat {
    /// `<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>` blocks.
    Hermes,
    /// A bare `{"name": ..., "parameters": ...}` answer, calls joined by `; `.
    Llama3Json,
}

const CALL_OPEN: &str = "<tool_call>";
const CALL_CLOSE: &str = "</tool_call>";
/// Llama 3.1's marker before a call; a control token, usually skipped when decoding.
const PYTHON_TAG: &str = "<|python_tag|>";

impl ToolFormat {
    /// The name the format gives a call's arguments object.
    pub fn arguments_key(self) -> &'static str {
        match self {
            ToolFormat::Hermes => "arguments",
            ToolFormat::Llama3Json => "parameters",
        }
    }
}

/// A function a request offers the model: its name and its parameters' JSON Schema.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FunctionSpec<'a> {
    pub name: &'a str,
    /// `None`: the function declares no parameters, so its arguments are `{}` (as OpenAI reads
    /// a function without `parameters`).
    pub parameters: Option<&'a Value>,
}

/// One call read from an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub name: String,
    /// The arguments as JSON text (`json.dumps` of the object the model wrote).
    pub arguments: String,
}

/// What the parser makes of the answer so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolPiece {
    /// Text of the answer's `content`.
    Text(String),
    /// A complete call.
    Call(ToolCall),
}

/// A template's way with tools: the format its calls take, and whether it renders tools itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ToolStyle {
    pub format: ToolFormat,
    /// The template reads `tools` (and renders past calls and results itself); otherwise
    /// Tidelock writes them into the messages ([`ToolStyle::messages_for_template`]).
    pub native: bool,
}

impl ToolStyle {
    /// The style of `template` (none: a conversation without tools support at all, rendered in
    /// Tidelock's Hermes prompt). A template that writes `<tool_call>` is Hermes; one in Llama
    /// 3's header format that reads `tools` (or writes `<|python_tag|>`) is Llama 3 JSON; any
    /// other template that reads `tools` is taken as Hermes, the most common format.
    pub fn of(template: Option<&ChatTemplate>) -> ToolStyle {
        let source = template.map(ChatTemplate::source).unwrap_or_default();
        let native = reads_tools(source);
        let llama3 = source.contains(PYTHON_TAG)
            || (native && source.contains("<|start_header_id|>") && !source.contains(CALL_OPEN));
        let format = if llama3 {
            ToolFormat::Llama3Json
        } else {
            ToolFormat::Hermes
        };
        ToolStyle { format, native }
    }

    /// The messages to render.
    ///
    /// For a native template: assistant `tool_calls` whose `function.arguments` is JSON text (as
    /// OpenAI clients send it) get the object instead, as vLLM does, so templates that print
    /// `arguments | tojson` write the object. Otherwise: each assistant message's calls are
    /// appended to its text as `<tool_call>` blocks, runs of `tool` messages become one user
    /// message of `<tool_response>` blocks, and the tools' description goes into the system
    /// message (a new one if the conversation has none).
    pub fn messages_for_template(
        self,
        messages: Vec<ChatMessage>,
        tools: Option<&Value>,
    ) -> Vec<ChatMessage> {
        if self.native {
            return messages
                .into_iter()
                .map(|mut m| {
                    if let Some(calls) = &mut m.tool_calls {
                        arguments_as_objects(calls);
                    }
                    m
                })
                .collect();
        }
        let mut out = self.fold_messages(messages);
        if let Some(tools) = tools.filter(|t| t.as_array().is_some_and(|a| !a.is_empty())) {
            let instructions = hermes_instructions(tools);
            match out.first_mut() {
                Some(first) if first.role == "system" || first.role == "developer" => {
                    first.content = match first.content.is_empty() {
                        true => instructions,
                        false => format!("{}\n\n{instructions}", first.content),
                    };
                }
                _ => out.insert(0, ChatMessage::new("system", instructions)),
            }
        }
        out
    }

    /// `messages` with calls and results written as Hermes text.
    fn fold_messages(self, messages: Vec<ChatMessage>) -> Vec<ChatMessage> {
        let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len() + 1);
        // Whether the last message written holds tool results (the next result joins it).
        let mut results = false;
        for m in messages {
            if m.role == "tool" {
                let response = format!("<tool_response>\n{}\n</tool_response>", m.content);
                match out.last_mut() {
                    Some(last) if results => {
                        last.content = format!("{}\n{response}", last.content);
                    }
                    _ => out.push(ChatMessage::new("user", response)),
                }
                results = true;
                continue;
            }
            results = false;
            let mut m = m;
            if let Some(calls) = m.tool_calls.take() {
                let written = calls
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|call| {
                        let function = call.get("function").unwrap_or(call);
                        let name = function.get("name").and_then(Value::as_str).unwrap_or("");
                        let arguments = function.get("arguments").map_or(json!({}), |a| {
                            let mut a = a.clone();
                            argument_object(&mut a);
                            a
                        });
                        self.format_call(name, &arguments)
                    })
                    .collect::<Vec<_>>()
                    .join("\n");
                m.content = match (m.content.is_empty(), written.is_empty()) {
                    (_, true) => m.content,
                    (true, false) => written,
                    (false, false) => format!("{}\n{written}", m.content),
                };
            }
            out.push(m);
        }
        out
    }

    /// One call as the model writes it.
    pub fn format_call(self, name: &str, arguments: &Value) -> String {
        let mut call = Map::new();
        call.insert("name".into(), name.into());
        call.insert(self.format.arguments_key().into(), arguments.clone());
        let call = python_json(&Value::Object(call));
        match self.format {
            ToolFormat::Hermes => format!("{CALL_OPEN}\n{call}\n{CALL_CLOSE}"),
            ToolFormat::Llama3Json => call,
        }
    }

    /// A parser for one answer that may call the functions `names` (a call of any other name, or
    /// without arguments, stays text).
    pub fn parser(self, names: Vec<String>) -> ToolParser {
        ToolParser {
            names,
            format: self.format,
            state: match self.format {
                ToolFormat::Hermes => State::Text,
                ToolFormat::Llama3Json => State::Undecided,
            },
            pending: String::new(),
            blank: String::new(),
            calls: 0,
        }
    }

    /// A Lark grammar (llguidance's dialect) admitting only calls of `functions`, one or (with
    /// `parallel`) several, each name with its own parameters' schema, written as
    /// `json.dumps` writes JSON (no free whitespace for a small model to wander in).
    pub fn grammar(self, functions: &[FunctionSpec<'_>], parallel: bool) -> String {
        let key = self.format.arguments_key();
        let single = functions.len() == 1;
        let shapes: Vec<Value> = functions
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let mut properties = Map::new();
                properties.insert("name".into(), json!({"const": f.name}));
                // Where the parameters' schema now stands, for its local `$ref`s.
                let at = match single {
                    true => format!("#/properties/{key}"),
                    false => format!("#/anyOf/{i}/properties/{key}"),
                };
                let mut parameters = f.parameters.cloned().unwrap_or(
                    json!({"type": "object", "properties": {}, "additionalProperties": false}),
                );
                rebase_refs(&mut parameters, &at);
                properties.insert(key.into(), parameters);
                json!({
                    "type": "object",
                    "properties": properties,
                    "required": ["name", key],
                    "additionalProperties": false,
                })
            })
            .collect();
        let mut schema = match <[Value; 1]>::try_from(shapes) {
            Ok([one]) => one,
            Err(many) => json!({ "anyOf": many }),
        };
        schema["x-guidance"] = json!({
            "whitespace_flexible": false,
            "item_separator": ", ",
            "key_separator": ": ",
        });
        let (call, separator) = match self.format {
            ToolFormat::Hermes => (r#"call: "<tool_call>\n" body "\n</tool_call>""#, r#""\n""#),
            ToolFormat::Llama3Json => ("call: body", r#""; ""#),
        };
        let start = if parallel {
            format!("start: call ({separator} call)*")
        } else {
            "start: call".to_owned()
        };
        format!("{start}\n{call}\nbody: %json {schema}\n")
    }
}

/// Points a schema's local references (`#`, `#/$defs/...`, as Pydantic writes them) at the place
/// `at` (a `#/...` pointer) where the schema is embedded in a larger one: references resolve
/// against the document's root.
fn rebase_refs(schema: &mut Value, at: &str) {
    match schema {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                match v {
                    Value::String(r) if k == "$ref" && (r == "#" || r.starts_with("#/")) => {
                        *r = format!("{at}{}", &r[1..]);
                    }
                    v => rebase_refs(v, at),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| rebase_refs(v, at)),
        _ => {}
    }
}

/// Whether a template reads a `tools` variable: the word in its code (`{{ }}` and `{% %}`
/// blocks), not in its text or comments.
fn reads_tools(source: &str) -> bool {
    let mut rest = source;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let close = match after.chars().next() {
            Some('{') => "}}",
            Some('%') => "%}",
            _ => {
                rest = after;
                continue;
            }
        };
        let Some(end) = after.find(close) else {
            return false;
        };
        let code = &after[1..end];
        let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
        if code.match_indices("tools").any(|(at, _)| {
            !word(code[..at].chars().next_back())
                && !word(code[at + "tools".len()..].chars().next())
        }) {
            return true;
        }
        rest = &after[end + close.len()..];
    }
    false
}

/// The tools' description in the system message, in Qwen2.5's words (a Hermes-format prompt).
fn hermes_instructions(tools: &Value) -> String {
    let listed: Vec<String> = tools
        .as_array()
        .into_iter()
        .flatten()
        .map(python_json)
        .collect();
    format!(
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
         You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{}\n</tools>\n\n\
         For each function call, return a json object with function name and arguments within \
         <tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>",
        listed.join("\n")
    )
}

/// `tool_calls[].function.arguments` given as JSON text become the object it holds.
fn arguments_as_objects(calls: &mut Value) {
    for call in calls.as_array_mut().into_iter().flatten() {
        if let Some(arguments) = call
            .get_mut("function")
            .and_then(|f| f.get_mut("arguments"))
        {
            argument_object(arguments);
        }
    }
}

fn argument_object(arguments: &mut Value) {
    if let Some(parsed) = arguments
        .as_str()
        .and_then(|text| serde_json::from_str::<Value>(text).ok())
        .filter(Value::is_object)
    {
        *arguments = parsed;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Passing text on (Hermes: outside a `<tool_call>` block; Llama 3: decided it is text).
    Text,
    /// Hermes: inside a `<tool_call>` block.
    InCall,
    /// Llama 3: the answer began with `{`; held whole until the end.
    Json,
    /// Llama 3: only whitespace so far.
    Undecided,
}

/// Reads one answer's text into content and calls as it streams ([`ToolStyle::parser`]).
///
/// Whitespace right before a call, and at the end of an answer that made calls, is not content
/// (it separates calls). Streamed pieces, joined, are exactly what the whole text gives.
#[derive(Debug, Clone)]
pub struct ToolParser {
    /// The functions offered.
    names: Vec<String>,
    format: ToolFormat,
    state: State,
    /// Text not yet decided on.
    pending: String,
    /// Whitespace passed over, sent with the next text unless a call or the end comes first.
    blank: String,
    calls: usize,
}

impl ToolParser {
    /// Reads more of the answer.
    pub fn push(&mut self, text: &str) -> Vec<ToolPiece> {
        let mut out = Vec::new();
        match (self.format, self.state) {
            // Decided: plain text, and no call can follow.
            (ToolFormat::Llama3Json, State::Text) => self.text(text.to_owned(), &mut out),
            (ToolFormat::Llama3Json, _) => {
                self.pending.push_str(text);
                self.llama3(&mut out);
            }
            (ToolFormat::Hermes, _) => {
                self.pending.push_str(text);
                self.hermes(&mut out);
            }
        }
        out
    }

    /// The end of the answer: whatever is held, as text or calls.
    pub fn finish(&mut self) -> Vec<ToolPiece> {
        let mut out = Vec::new();
        let pending = std::mem::take(&mut self.pending);
        match self.state {
            State::Text | State::Undecided => self.text(pending, &mut out),
            State::InCall => match self.parse_call(&pending) {
                Some(call) => self.call(call, &mut out),
                None => self.text(format!("{CALL_OPEN}{pending}"), &mut out),
            },
            State::Json => match self.parse_json_calls(&pending) {
                Some(calls) => calls.into_iter().for_each(|c| self.call(c, &mut out)),
                None => self.text(pending, &mut out),
            },
        }
        self.state = State::Text;
        if self.calls == 0 && !self.blank.is_empty() {
            out.push(ToolPiece::Text(std::mem::take(&mut self.blank)));
        }
        out
    }

    fn hermes(&mut self, out: &mut Vec<ToolPiece>) {
        loop {
            match self.state {
                State::InCall => {
                    // The first `</tool_call>` after which the body is not JSON cut short (a
                    // closing tag inside an argument's string does not end the call).
                    let mut end = None;
                    let mut from = 0;
                    while let Some(at) = self.pending[from..].find(CALL_CLOSE) {
                        let at = from + at;
                        let body = self.pending[..at].trim();
                        match serde_json::from_str::<Value>(body) {
                            Err(e) if e.is_eof() && !body.is_empty() => from = at + 1,
                            _ => {
                                end = Some(at);
                                break;
                            }
                        }
                    }
                    let Some(end) = end else {
                        return;
                    };
                    let body: String = self.pending.drain(..end + CALL_CLOSE.len()).collect();
                    let body = &body[..end];
                    match self.parse_call(body) {
                        Some(call) => self.call(call, out),
                        None => self.text(format!("{CALL_OPEN}{body}{CALL_CLOSE}"), out),
                    }
                    self.state = State::Text;
                }
                _ => {
                    if let Some(at) = self.pending.find(CALL_OPEN) {
                        let before: String = self.pending.drain(..at + CALL_OPEN.len()).collect();
                        // Whitespace before the call stays held: dropped if it parses.
                        self.text(before[..at].to_owned(), out);
                        self.state = State::InCall;
                        continue;
                    }
                    // Hold back what could be the start of `<tool_call>`.
                    let keep = (1..CALL_OPEN.len().min(self.pending.len() + 1))
                        .rev()
                        .find(|&n| {
                            self.pending.is_char_boundary(self.pending.len() - n)
                                && CALL_OPEN.starts_with(&self.pending[self.pending.len() - n..])
                        })
                        .unwrap_or(0);
                    let sure = self.pending.len() - keep;
                    let text: String = self.pending.drain(..sure).collect();
                    self.text(text, out);
                    return;
                }
            }
        }
    }

    fn llama3(&mut self, out: &mut Vec<ToolPiece>) {
        if self.state != State::Undecided {
            return;
        }
        let head = self.pending.trim_start();
        if head.is_empty() {
            return;
        }
        if head.starts_with('{') || head.starts_with(PYTHON_TAG) {
            self.state = State::Json;
        } else if !PYTHON_TAG.starts_with(head) {
            self.state = State::Text;
            let text = std::mem::take(&mut self.pending);
            self.text(text, out);
        }
    }

    /// Text for the content: trailing whitespace waits to see whether a call follows.
    fn text(&mut self, text: String, out: &mut Vec<ToolPiece>) {
        if text.is_empty() {
            return;
        }
        let solid = text.trim_end().len();
        if solid == 0 {
            self.blank.push_str(&text);
            return;
        }
        let mut sent = std::mem::take(&mut self.blank);
        sent.push_str(&text[..solid]);
        self.blank.push_str(&text[solid..]);
        out.push(ToolPiece::Text(sent));
    }

    fn call(&mut self, call: ToolCall, out: &mut Vec<ToolPiece>) {
        self.blank.clear();
        self.calls += 1;
        out.push(ToolPiece::Call(call));
    }
}

impl ToolParser {
    /// One call object: `{"name": an offered function, <arguments key>: object}` (either
    /// format's key is accepted, and arguments given as JSON text).
    fn call_of(&self, value: Value) -> Option<ToolCall> {
        let Value::Object(mut object) = value else {
            return None;
        };
        let name = object.get("name")?.as_str()?.to_owned();
        if !self.names.contains(&name) {
            return None;
        }
        let mut arguments = object
            .remove("arguments")
            .or_else(|| object.remove("parameters"))?;
        argument_object(&mut arguments);
        arguments.is_object().then(|| ToolCall {
            name,
            arguments: python_json(&arguments),
        })
    }

    fn parse_call(&self, body: &str) -> Option<ToolCall> {
        self.call_of(serde_json::from_str(body.trim()).ok()?)
    }

    /// A Llama 3 JSON answer: one or more call objects joined by `;` (and whitespace), optionally
    /// after `<|python_tag|>`; `None` unless the whole text is calls.
    fn parse_json_calls(&self, text: &str) -> Option<Vec<ToolCall>> {
        let mut rest = text.trim_start();
        rest = rest.strip_prefix(PYTHON_TAG).unwrap_or(rest);
        let mut calls = Vec::new();
        loop {
            rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == ';');
            if rest.is_empty() {
                return (!calls.is_empty()).then_some(calls);
            }
            let mut values = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
            let value = values.next()?.ok()?;
            calls.push(self.call_of(value)?);
            rest = &rest[values.byte_offset()..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HERMES: ToolStyle = ToolStyle {
        format: ToolFormat::Hermes,
        native: false,
    };
    const LLAMA3: ToolStyle = ToolStyle {
        format: ToolFormat::Llama3Json,
        native: true,
    };

    fn call(name: &str, arguments: &str) -> ToolPiece {
        ToolPiece::Call(ToolCall {
            name: name.into(),
            arguments: arguments.into(),
        })
    }

    fn text(t: &str) -> ToolPiece {
        ToolPiece::Text(t.into())
    }

    /// Joins adjacent text pieces, so a split stream compares with the whole text.
    fn joined(pieces: Vec<ToolPiece>) -> Vec<ToolPiece> {
        let mut out: Vec<ToolPiece> = Vec::new();
        for p in pieces {
            match (out.last_mut(), p) {
                (Some(ToolPiece::Text(a)), ToolPiece::Text(b)) => a.push_str(&b),
                (_, p) => out.push(p),
            }
        }
        out
    }

    /// The functions the tests' answers may call.
    fn names() -> Vec<String> {
        ["get_weather", "now", "f", "a", "b"]
            .map(String::from)
            .to_vec()
    }

    fn whole(style: ToolStyle, answer: &str) -> Vec<ToolPiece> {
        let mut parser = style.parser(names());
        let mut out = parser.push(answer);
        out.extend(parser.finish());
        joined(out)
    }

    /// Every split of `answer` into two pushes (at character boundaries), and one push per
    /// character, give what the whole answer gives.
    fn splits_agree(style: ToolStyle, answer: &str) -> Vec<ToolPiece> {
        let expected = whole(style, answer);
        let bounds: Vec<usize> = answer.char_indices().map(|(i, _)| i).collect();
        for &at in &bounds {
            let mut parser = style.parser(names());
            let mut out = parser.push(&answer[..at]);
            out.extend(parser.push(&answer[at..]));
            out.extend(parser.finish());
            assert_eq!(joined(out), expected, "split at {at} of {answer:?}");
        }
        let mut parser = style.parser(names());
        let mut out: Vec<ToolPiece> = answer
            .chars()
            .flat_map(|c| parser.push(&c.to_string()))
            .collect();
        out.extend(parser.finish());
        assert_eq!(joined(out), expected, "char by char: {answer:?}");
        expected
    }

    #[test]
    fn hermes_calls_are_read_in_any_split() {
        let answer = "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich\"}}\n</tool_call>\n<tool_call>\n{\"name\":\"now\",\"arguments\":{}}\n</tool_call>\n";
        assert_eq!(
            splits_agree(HERMES, answer),
            vec![
                text("Let me look."),
                call("get_weather", r#"{"city": "Zürich"}"#),
                call("now", "{}"),
            ]
        );
    }

    #[test]
    fn text_without_calls_passes_through_whole() {
        for answer in [
            "plain <tool and <tool_cal but no call  \n",
            "  spaces\n",
            "",
            "ends with <tool_ca",
        ] {
            let expected = if answer.is_empty() {
                vec![]
            } else {
                vec![text(answer)]
            };
            assert_eq!(splits_agree(HERMES, answer), expected, "{answer:?}");
        }
    }

    #[test]
    fn a_call_that_does_not_parse_stays_text() {
        let answer = "<tool_call>\n{\"name\": \"f\", \"arguments\": [1]}\n</tool_call> after";
        assert_eq!(splits_agree(HERMES, answer), vec![text(answer)]);
        let broken = "x <tool_call>\n{\"name\": \"f\", \"argu";
        assert_eq!(splits_agree(HERMES, broken), vec![text(broken)]);
        // Arguments given as JSON text, and a call closed only by the end, are read.
        assert_eq!(
            splits_agree(
                HERMES,
                "<tool_call>{\"name\": \"f\", \"arguments\": \"{\\\"a\\\": 1}\"}"
            ),
            vec![call("f", r#"{"a": 1}"#)]
        );
    }

    #[test]
    fn only_offered_functions_with_arguments_are_calls() {
        // An unknown name, or no arguments: the text as written.
        for answer in [
            "<tool_call>\n{\"name\": \"rm_rf\", \"arguments\": {}}\n</tool_call>",
            "<tool_call>\n{\"name\": \"now\"}\n</tool_call>",
        ] {
            assert_eq!(
                splits_agree(HERMES, answer),
                vec![text(answer)],
                "{answer:?}"
            );
        }
        // A JSON answer that is not a call (Llama 3 reads a whole answer in braces as calls).
        let person = "{\"name\": \"Alice\", \"age\": 30}";
        assert_eq!(splits_agree(LLAMA3, person), vec![text(person)]);
        // A closing tag inside an argument's string does not end the call.
        let tricky = "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"s\": \"a</tool_call>b\"}}\n</tool_call>";
        assert_eq!(
            splits_agree(HERMES, tricky),
            vec![call("f", "{\"s\": \"a</tool_call>b\"}")]
        );
        // A malformed call before a good one: the first is text, the second a call.
        let both = "<tool_call>oops</tool_call><tool_call>{\"name\": \"now\", \"arguments\": {}}</tool_call>";
        assert_eq!(
            splits_agree(HERMES, both),
            vec![text("<tool_call>oops</tool_call>"), call("now", "{}")]
        );
    }

    #[test]
    fn local_references_follow_the_schema_into_the_grammar() {
        let person = json!({"type": "object", "properties": {"who": {"$ref": "#/$defs/Person"},
            "boss": {"$ref": "#"}}, "$defs": {"Person": {"type": "string"}}});
        let grammar = |functions: &[FunctionSpec<'_>]| -> Value {
            let g = HERMES.grammar(functions, false);
            serde_json::from_str(g.split_once("%json ").unwrap().1).unwrap()
        };
        let one = [FunctionSpec {
            name: "f",
            parameters: Some(&person),
        }];
        let schema = grammar(&one);
        let arguments = &schema["properties"]["arguments"];
        assert_eq!(
            arguments["properties"]["who"]["$ref"],
            "#/properties/arguments/$defs/Person"
        );
        assert_eq!(
            arguments["properties"]["boss"]["$ref"],
            "#/properties/arguments"
        );
        let two = [
            one[0],
            FunctionSpec {
                name: "g",
                parameters: Some(&person),
            },
        ];
        let schema = grammar(&two);
        assert_eq!(
            schema["anyOf"][1]["properties"]["arguments"]["properties"]["who"]["$ref"],
            "#/anyOf/1/properties/arguments/$defs/Person"
        );
    }

    #[test]
    fn llama3_answers_are_calls_only_when_whole() {
        assert_eq!(
            splits_agree(
                LLAMA3,
                " {\"name\": \"a\", \"parameters\": {\"x\": [1, 2]}}; {\"name\": \"b\", \"parameters\": {}}"
            ),
            vec![call("a", r#"{"x": [1, 2]}"#), call("b", "{}")]
        );
        assert_eq!(
            splits_agree(LLAMA3, "<|python_tag|>{\"name\": \"a\", \"arguments\": {}}"),
            vec![call("a", "{}")]
        );
        for answer in [
            "Hello {\"name\": \"a\"}",
            "{\"name\": \"a\", \"parameters\": {}} and more",
            "{not json",
        ] {
            assert_eq!(
                splits_agree(LLAMA3, answer),
                vec![text(answer)],
                "{answer:?}"
            );
        }
    }

    #[test]
    fn styles_follow_the_template() {
        let style = |source: &str| ToolStyle::of(Some(&ChatTemplate::new(source).unwrap()));
        let smollm = style(include_str!("../tests/golden/smollm2_chat_template.jinja"));
        assert_eq!(smollm, HERMES);
        let qwen = style(include_str!("../tests/templates/qwen_style.jinja"));
        assert_eq!(
            qwen,
            ToolStyle {
                format: ToolFormat::Hermes,
                native: true
            }
        );
        assert_eq!(
            style("<|start_header_id|>{% if tools is not none %}{{ tools | tojson }}{% endif %}"),
            LLAMA3
        );
        // `tools` only as part of another word, in text or in a comment is not read.
        assert!(!style("{{ my_tools_list }}{{ toolset }}").native);
        assert!(!style("No tools here. {# tools #}{{ messages }}").native);
        assert!(style("{%- if tools %}x{% endif %}").native);
        assert_eq!(ToolStyle::of(None), HERMES);
    }

    #[test]
    fn templates_without_tools_get_them_written_into_messages() {
        let tools = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
        let mut asked = ChatMessage::new("assistant", "");
        asked.tool_calls = Some(json!([{"id": "call_1", "type": "function",
            "function": {"name": "f", "arguments": "{\"a\": 1}"}}]));
        let mut result = ChatMessage::new("tool", "{\"ok\": true}");
        result.tool_call_id = Some("call_1".into());
        let mut second = result.clone();
        second.content = "2".into();
        let out = HERMES.messages_for_template(
            vec![ChatMessage::new("user", "hi"), asked, result, second],
            Some(&tools),
        );
        let shown: Vec<(&str, &str)> = out
            .iter()
            .map(|m| (m.role.as_str(), m.content.as_str()))
            .collect();
        assert_eq!(shown.len(), 4);
        assert_eq!(shown[0].0, "system");
        assert!(shown[0].1.starts_with("# Tools\n"), "{}", shown[0].1);
        assert!(
            shown[0].1.contains(
                "<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"f\", \"parameters\": {\"type\": \"object\"}}}\n</tools>"
            ),
            "{}",
            shown[0].1
        );
        assert_eq!(shown[1], ("user", "hi"));
        assert_eq!(
            shown[2],
            (
                "assistant",
                "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}\n</tool_call>"
            )
        );
        assert_eq!(
            shown[3],
            (
                "user",
                "<tool_response>\n{\"ok\": true}\n</tool_response>\n<tool_response>\n2\n</tool_response>"
            )
        );
        assert!(out[2].tool_calls.is_none());
        // A system message of the conversation's own keeps its text first.
        let out = HERMES
            .messages_for_template(vec![ChatMessage::new("system", "Be kind.")], Some(&tools));
        assert_eq!(out.len(), 1);
        assert!(out[0].content.starts_with("Be kind.\n\n# Tools\n"));
        // A native template gets the arguments as objects and the messages as they are.
        let mut asked = ChatMessage::new("assistant", "");
        asked.tool_calls = Some(json!([{"function": {"name": "f", "arguments": "{\"a\": 1}"}}]));
        let out = LLAMA3.messages_for_template(vec![asked], Some(&tools));
        assert_eq!(
            out[0].tool_calls,
            Some(json!([{"function": {"name": "f", "arguments": {"a": 1}}}]))
        );
    }

    #[test]
    fn grammars_name_each_function_with_its_schema() {
        let weather = json!({"type": "object", "description": "{not a brace}"});
        let functions = [
            FunctionSpec {
                name: "get_weather",
                parameters: Some(&weather),
            },
            FunctionSpec {
                name: "now",
                parameters: None,
            },
        ];
        let hermes = HERMES.grammar(&functions, true);
        assert!(hermes.starts_with("start: call (\"\\n\" call)*\ncall: \"<tool_call>\\n\" body \"\\n</tool_call>\"\nbody: %json {"), "{hermes}");
        let schema: Value = serde_json::from_str(hermes.split_once("%json ").unwrap().1).unwrap();
        assert_eq!(
            schema["anyOf"][0]["properties"]["name"],
            json!({"const": "get_weather"})
        );
        assert_eq!(
            schema["anyOf"][1]["properties"]["arguments"],
            json!({"type": "object", "properties": {}, "additionalProperties": false})
        );
        assert_eq!(schema["x-guidance"]["whitespace_flexible"], json!(false));
        let llama = LLAMA3.grammar(&functions[1..], false);
        assert!(
            llama.starts_with("start: call\ncall: body\nbody: %json {"),
            "{llama}"
        );
        let schema: Value = serde_json::from_str(llama.split_once("%json ").unwrap().1).unwrap();
        assert_eq!(schema["required"], json!(["name", "parameters"]));
        assert_eq!(
            LLAMA3.format_call("now", &json!({"a": 1})),
            "{\"name\": \"now\", \"parameters\": {\"a\": 1}}"
        );
    }
}

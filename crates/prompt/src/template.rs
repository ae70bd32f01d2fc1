//! Hugging Face chat templates, rendered with minijinja as `transformers` renders them.
//!
//! A chat model only answers well if its prompt is laid out exactly as in training, and that
//! layout is the Jinja template shipped with the model (`tokenizer.chat_template` in a GGUF,
//! `chat_template` in `tokenizer_config.json`). [`ChatTemplate`] compiles one template and renders
//! a conversation with it; the router and the worker both use it so a conversation becomes the
//! same text, hence the same token ids, hence the same KV-cache blocks, wherever it is rendered.
//!
//! Invariants (each matches `transformers.apply_chat_template`):
//! - Jinja2 is configured with `trim_blocks` and `lstrip_blocks`, a trailing newline of the
//!   template is dropped, and undefined variables are lenient (`x is defined` works).
//! - Python string/dict/list methods (`.strip()`, `.startswith()`, `.items()`, ...) work through
//!   `minijinja_contrib::pycompat`; `tojson` is Python's `json.dumps`; `raise_exception(msg)`
//!   becomes [`TemplateError::Raised`] carrying `msg`; `strftime_now(fmt)` formats the UTC time.
//! - The variables are `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, plus
//!   [`RenderOptions::extra`] (for example `tools`); the four named ones win over `extra`.
//! - Message fields that are `None` are absent in the template (`message.tool_calls is defined`
//!   is false), never `none`.
//! - Messages and options are data: whatever they contain (`{{`, `{%`, special-token text) is
//!   copied into the prompt, never evaluated as template code (`tests/template_props.rs`).

use std::collections::BTreeMap;
use std::fmt;

use minijinja::value::{Serde, Value};
use minijinja::{Environment, syntax::SyntaxConfig};
use serde::{Deserialize, Serialize};

use crate::jinja;

/// The name the template is registered under; minijinja quotes it in errors.
const TEMPLATE_NAME: &str = "chat_template";

/// Why a template could not be compiled or rendered.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The template does not parse.
    #[error("chat template does not compile{}: {message}", at_line(*.line))]
    Syntax {
        /// 1-based template line, when known.
        line: Option<usize>,
        /// What is wrong.
        message: String,
        /// The minijinja error.
        #[source]
        source: minijinja::Error,
    },
    /// The template called `raise_exception(message)`, typically for a conversation it does not
    /// support (a bad role order, a system message it cannot place).
    #[error("chat template rejected the conversation{}: {message}", at_line(*.line))]
    Raised {
        /// 1-based template line of the call, when known.
        line: Option<usize>,
        /// The template's own message.
        message: String,
    },
    /// Rendering failed for another reason (a type error, an unknown filter, ...).
    #[error("chat template failed to render{}: {message}", at_line(*.line))]
    Render {
        /// 1-based template line, when known.
        line: Option<usize>,
        /// What is wrong.
        message: String,
        /// The minijinja error.
        #[source]
        source: minijinja::Error,
    },
}

fn at_line(line: Option<usize>) -> String {
    line.map(|l| format!(" at line {l}")).unwrap_or_default()
}

/// One message of a conversation as the template sees it (OpenAI's message shape).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, `tool`, ...
    pub role: String,
    /// The text. Multi-part content is flattened by the caller.
    pub content: String,
    /// The author's name (`name` in OpenAI's API), passed through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// An assistant message's tool calls, passed through untouched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    /// A tool message's `tool_call_id`, passed through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// A message with just a role and text.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            name: None,
            tool_calls: None,
            tool_call_id: None,
        }
    }
}

/// Everything a render needs besides the messages.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RenderOptions {
    /// End with the opening of an assistant turn, so the model answers next.
    pub add_generation_prompt: bool,
    /// The model's BOS token text (templates that write it themselves use this).
    pub bos_token: String,
    /// The model's EOS token text.
    pub eos_token: String,
    /// Further template variables (`tools`, `documents`, `enable_thinking`, ...).
    #[serde(default)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// A compiled chat template. Cheap to share: rendering takes `&self`.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_len", &self.source.len())
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles a template, with the Jinja2 settings and helpers `transformers` provides.
    pub fn new(source: impl Into<String>) -> Result<Self, TemplateError> {
        let source = source.into();
        let mut env = Environment::new();
        let mut syntax = SyntaxConfig::builder();
        syntax.trim_blocks(true).lstrip_blocks(true);
        env.set_syntax(syntax.build().map_err(syntax_error)?);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", jinja::raise_exception);
        env.add_function("strftime_now", jinja::strftime_now);
        env.add_filter("tojson", jinja::tojson);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(syntax_error)?;
        Ok(Self { env, source })
    }

    /// The template text as given.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders a conversation.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        opts: &RenderOptions,
    ) -> Result<String, TemplateError> {
        let template = self.env.get_template(TEMPLATE_NAME).map_err(render_error)?;
        let mut context: BTreeMap<String, Value> = opts
            .extra
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(Serde(v))))
            .collect();
        context.insert("messages".into(), Value::from(Serde(messages)));
        context.insert(
            "add_generation_prompt".into(),
            Value::from(opts.add_generation_prompt),
        );
        context.insert("bos_token".into(), Value::from(opts.bos_token.as_str()));
        context.insert("eos_token".into(), Value::from(opts.eos_token.as_str()));
        template.render(context).map_err(render_error)
    }
}

fn message_of(err: &minijinja::Error) -> String {
    match err.detail() {
        Some(detail) => format!("{}: {detail}", err.kind()),
        None => err.kind().to_string(),
    }
}

fn syntax_error(source: minijinja::Error) -> TemplateError {
    TemplateError::Syntax {
        line: source.line(),
        message: message_of(&source),
        source,
    }
}

fn render_error(err: minijinja::Error) -> TemplateError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    while let Some(e) = cause {
        if let Some(raised) = e.downcast_ref::<jinja::RaisedException>() {
            return TemplateError::Raised {
                line: err.line(),
                message: raised.0.clone(),
            };
        }
        cause = e.source();
    }
    TemplateError::Render {
        line: err.line(),
        message: message_of(&err),
        source: err,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// SmolLM2-135M-Instruct's template, pasted verbatim from the GGUF's `tokenizer.chat_template`
    /// (`tests/smollm.rs` checks the file still carries exactly this text).
    const SMOLLM2_TEMPLATE: &str = include_str!("../tests/golden/smollm2_chat_template.jinja");

    /// Llama 3's template shape: `bos_token`, `loop.first`, role checks, `raise_exception`.
    /// In `tests/templates/`, shared with the property tests (`tests/template_props.rs`).
    const LLAMA3_STYLE: &str = include_str!("../tests/templates/llama3_style.jinja");

    /// Qwen 2.5's tool section shape: `tojson`, `.startswith`, `is defined`, `namespace`.
    /// Shared with the property tests too.
    const QWEN_STYLE: &str = include_str!("../tests/templates/qwen_style.jinja");

    fn opts(add_generation_prompt: bool) -> RenderOptions {
        RenderOptions {
            add_generation_prompt,
            bos_token: "<|begin_of_text|>".into(),
            eos_token: "<|eot_id|>".into(),
            extra: serde_json::Map::new(),
        }
    }

    #[test]
    fn smollm2_chatml() {
        let t = ChatTemplate::new(SMOLLM2_TEMPLATE).expect("compiles");
        let messages = [ChatMessage::new("user", "Hi!")];
        assert_eq!(
            t.render(&messages, &opts(true)).expect("renders"),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
        );
        let messages = [
            ChatMessage::new("system", "Be terse."),
            ChatMessage::new("user", "2+2?"),
            ChatMessage::new("assistant", "4"),
        ];
        assert_eq!(
            t.render(&messages, &opts(false)).expect("renders"),
            "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n\
             <|im_start|>assistant\n4<|im_end|>\n"
        );
    }

    #[test]
    fn llama3_style_with_trim_and_lstrip_blocks() {
        let t = ChatTemplate::new(LLAMA3_STYLE).expect("compiles");
        let messages = [ChatMessage::new("user", "  Hello  ")];
        assert_eq!(
            t.render(&messages, &opts(true)).expect("renders"),
            "<|begin_of_text|>\n\
             <|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\n\
             <|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>\n\
             <|start_header_id|>assistant<|end_header_id|>\n\n\n"
        );
        let without = t.render(&messages, &opts(false)).expect("renders");
        assert!(without.ends_with("Hello<|eot_id|>\n"), "{without:?}");
    }

    #[test]
    fn raise_exception_is_typed_and_keeps_the_message() {
        let t = ChatTemplate::new(LLAMA3_STYLE).expect("compiles");
        let err = t
            .render(&[ChatMessage::new("wizard", "hi")], &opts(true))
            .expect_err("bad role");
        match err {
            TemplateError::Raised { line, message } => {
                assert_eq!(message, "Unknown role: wizard");
                assert_eq!(line, Some(4));
            }
            other => panic!("expected Raised, got {other:?}"),
        }
    }

    #[test]
    fn qwen_style_tools_with_python_json() {
        let t = ChatTemplate::new(QWEN_STYLE).expect("compiles");
        let mut o = opts(true);
        o.extra.insert(
            "tools".into(),
            json!([{"type": "function", "function": {"name": "get_weather", "description": "<city> & 'zone'", "parameters": {}}}]),
        );
        let mut call = ChatMessage::new("assistant", "");
        call.tool_calls =
            Some(json!([{"function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]));
        let messages = [
            ChatMessage::new("system", "Sys."),
            ChatMessage::new("user", "  weather?\n"),
            call,
        ];
        let rendered = t.render(&messages, &o).expect("renders");
        assert_eq!(
            rendered,
            "<|im_start|>system\nSys.\n\n# Tools\n<tools>\n\
             {\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"<city> & 'zone'\", \"parameters\": {}}}\n\
             </tools><|im_end|>\n\
             <|im_start|>user\nweather?<|im_end|>\n\
             <|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich\"}}\n</tool_call><|im_end|>\n\
             <|im_start|>assistant\n"
        );
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let t = ChatTemplate::new(
            "{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ x | tojson(ensure_ascii=true) }}|{{ [] | tojson(indent=2) }}",
        )
        .expect("compiles");
        let mut o = opts(false);
        o.extra
            .insert("x".into(), json!({"a": [1, 2.5, "é\n"], "b": {}}));
        // json.dumps(x), json.dumps(x, indent=2), json.dumps(x, ensure_ascii=True), json.dumps([], indent=2)
        assert_eq!(
            t.render(&[], &o).expect("renders"),
            "{\"a\": [1, 2.5, \"é\\n\"], \"b\": {}}|\
             {\n  \"a\": [\n    1,\n    2.5,\n    \"é\\n\"\n  ],\n  \"b\": {}\n}|\
             {\"a\": [1, 2.5, \"\\u00e9\\n\"], \"b\": {}}|[]"
        );
    }

    #[test]
    fn strftime_now_and_extra_variables() {
        // Booleans print as Python prints them, as in Jinja2.
        let t =
            ChatTemplate::new("{{ strftime_now('%Y') | length }} {{ flag }}").expect("compiles");
        let mut o = opts(false);
        o.extra.insert("flag".into(), json!(true));
        assert_eq!(t.render(&[], &o).expect("renders"), "4 True");
    }

    #[test]
    fn syntax_and_render_errors_name_the_line() {
        let err = ChatTemplate::new("line one\n{% if %}").expect_err("syntax");
        assert!(
            matches!(err, TemplateError::Syntax { line: Some(2), .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("line 2"), "{err}");

        let t = ChatTemplate::new("ok\n\n{{ messages | nosuchfilter }}").expect("compiles lazily");
        let err = t.render(&[], &opts(false)).expect_err("unknown filter");
        assert!(err.to_string().contains("line 3"), "{err}");
    }

    #[test]
    fn absent_optional_fields_are_undefined() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{{ m.name is defined }} {{ m.tool_calls is defined }}{% endfor %}",
        )
        .expect("compiles");
        assert_eq!(
            t.render(&[ChatMessage::new("user", "x")], &opts(false))
                .expect("renders"),
            "False False"
        );
    }
}

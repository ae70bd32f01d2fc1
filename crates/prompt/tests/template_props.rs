//! Property tests of the chat-template renderer: `ChatTemplate::new` / `render`, and
//! `PromptKit::render_chat` / `encode_chat`, over conversations a client controls.
//!
//! Why: every chat request's roles and contents reach a Jinja template. Whatever they contain
//! (Jinja syntax such as `{{`, `{%`, `{#`, special-token text such as `<|im_end|>` or `</s>`,
//! control characters, any Unicode), rendering must not panic, must fail only with a
//! `TemplateError`, and must treat the text as data: it is copied into the prompt, never
//! evaluated as template code. Checked here, with three template shapes:
//! - ChatML (SmolLM2's own template, `tests/golden/`): always renders, to exactly the text the
//!   template describes, contents and roles verbatim;
//! - Llama 3 style (`tests/templates/`, shared with the unit tests): renders exactly, or, for a
//!   role it does not know, fails with `TemplateError::Raised` carrying the template's message
//!   about the first such role;
//! - Qwen style (same place): skips system turns, strips contents, writes tools and tool calls
//!   with `tojson`; the output is checked piece by piece, each JSON piece parsed back to the
//!   value it came from;
//! - `raise_exception(msg)` with any message gives `Raised` with that message;
//! - random template sources mixing Jinja tokens: compiling fails only with `Syntax`, and a
//!   template that compiles renders (or fails with a typed error) the same way twice;
//! - a kit's `encode_chat` never panics, and its ids decode back to `render_chat`'s text;
//! - templates that recurse or loop without end fail with a typed error.
//!
//! A failing case is saved in the `.proptest-regressions` file beside this one and replayed first
//! on later runs; commit it with the fix.

use std::sync::LazyLock;

use proptest::prelude::*;
use proptest::test_runner::{FileFailurePersistence, TestCaseError};
use serde_json::{Map, Value, json};
use tidelock_prompt::tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tidelock_prompt::{
    ChatMessage, ChatTemplate, GgufVocab, PromptKit, RenderOptions, TemplateError, token_type,
};

/// SmolLM2-135M-Instruct's ChatML template, as the model ships it.
const CHATML: &str = include_str!("golden/smollm2_chat_template.jinja");
/// The system turn the ChatML template adds when the conversation does not start with one.
const CHATML_DEFAULT_SYSTEM: &str = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n";

/// Llama 3's template shape; raises `Unknown role: <role>` for a role other than
/// system/user/assistant.
const LLAMA3_STYLE: &str = include_str!("templates/llama3_style.jinja");
/// The roles `LLAMA3_STYLE` accepts, and the system turn it adds.
const LLAMA3_ROLES: [&str; 3] = ["system", "user", "assistant"];
const LLAMA3_DEFAULT_SYSTEM: &str =
    "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\n";

/// Qwen 2.5's tool-section shape.
const QWEN_STYLE: &str = include_str!("templates/qwen_style.jinja");

static CHATML_TEMPLATE: LazyLock<ChatTemplate> =
    LazyLock::new(|| ChatTemplate::new(CHATML).expect("ChatML compiles"));
static LLAMA3_TEMPLATE: LazyLock<ChatTemplate> =
    LazyLock::new(|| ChatTemplate::new(LLAMA3_STYLE).expect("Llama 3 style compiles"));
static QWEN_TEMPLATE: LazyLock<ChatTemplate> =
    LazyLock::new(|| ChatTemplate::new(QWEN_STYLE).expect("Qwen style compiles"));

/// 256 cases per property; a failing case is saved in `<this file>.proptest-regressions` and
/// replayed first on later runs.
fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::with_cases(256)
    }
}

// ---------------------------------------------------------------------------------------------
// Generators
// ---------------------------------------------------------------------------------------------

/// Pieces of text that mean something to a template or a tokenizer.
const HOSTILE: &[&str] = &[
    "{{",
    "}}",
    "{%",
    "%}",
    "{#",
    "#}",
    "{{-",
    "-}}",
    "{%-",
    "-%}",
    "{{ messages }}",
    "{{ bos_token }}",
    "{{ 7 * 6 }}",
    "{% for m in messages %}x{% endfor %}",
    "{{ raise_exception('injected') }}",
    "{% raw %}",
    "{% endraw %}",
    "{% if true %}",
    "{% endif %}",
    "{{ '",
    "' }}",
    "</s>",
    "<s>",
    "<|im_start|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|start_header_id|>",
    "<|begin_of_text|>",
    "<tool_call>",
    "</tools>",
    "\n",
    "\r\n",
    " ",
    "\t",
    "'",
    "\"",
    "\\",
    "\u{0}",
    "\u{1c}",
    "\u{85}",
    "\u{a0}",
    "\u{2028}",
    "\u{feff}",
    "é",
    "世界",
    "🦀",
];

/// The roles clients send.
const ROLES: &[&str] = &["system", "user", "assistant", "tool"];

/// Text a client might send: hostile pieces, arbitrary `char`s, printable Unicode.
fn content() -> BoxedStrategy<String> {
    let piece = prop_oneof![
        3 => prop::sample::select(HOSTILE).prop_map(str::to_owned),
        2 => "\\PC{1,6}",
        1 => prop::collection::vec(any::<char>(), 1..4).prop_map(String::from_iter),
    ];
    prop::collection::vec(piece, 0..8)
        .prop_map(|pieces| pieces.concat())
        .boxed()
}

fn role() -> BoxedStrategy<String> {
    prop_oneof![
        6 => prop::sample::select(ROLES).prop_map(str::to_owned),
        1 => content(),
    ]
    .boxed()
}

fn messages() -> BoxedStrategy<Vec<ChatMessage>> {
    prop::collection::vec(
        (role(), content()).prop_map(|(role, content)| ChatMessage::new(role, content)),
        0..6,
    )
    .boxed()
}

fn options() -> BoxedStrategy<RenderOptions> {
    (any::<bool>(), content(), content())
        .prop_map(
            |(add_generation_prompt, bos_token, eos_token)| RenderOptions {
                add_generation_prompt,
                bos_token,
                eos_token,
                extra: Map::new(),
            },
        )
        .boxed()
}

/// Any JSON value, a few levels deep, with hostile strings.
fn any_json() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-1e6f64..1e6).prop_map(Value::from),
        content().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((content(), inner), 0..4)
                .prop_map(|e| Value::Object(e.into_iter().collect())),
        ]
    })
    .boxed()
}

/// A tool definition or a tool call's `function`: a name plus arbitrary JSON.
fn function() -> BoxedStrategy<Value> {
    (content(), any_json())
        .prop_map(|(name, arguments)| json!({"name": name, "arguments": arguments}))
        .boxed()
}

/// Messages for the Qwen-style template: some assistant turns carry well-formed tool calls.
fn qwen_messages() -> BoxedStrategy<Vec<ChatMessage>> {
    let message = (
        role(),
        content(),
        prop::option::weighted(0.25, prop::collection::vec(function(), 0..3)),
    )
        .prop_map(|(role, content, calls)| {
            let mut message = ChatMessage::new(role, content);
            message.tool_calls = calls.map(|calls| {
                calls
                    .into_iter()
                    .map(|function| json!({"type": "function", "function": function}))
                    .collect()
            });
            message
        });
    prop::collection::vec(message, 0..6).boxed()
}

/// Fragments that random template sources are made of.
const TEMPLATE_TOKENS: &[&str] = &[
    "{{",
    "}}",
    "{%",
    "%}",
    "{#",
    "#}",
    "{{-",
    "-}}",
    "{%-",
    "-%}",
    " for ",
    " in ",
    " endfor ",
    " if ",
    " elif ",
    " else ",
    " endif ",
    " set ",
    " macro ",
    " endmacro ",
    " call ",
    " filter ",
    " endfilter ",
    " raw ",
    " endraw ",
    " with ",
    " endwith ",
    " not ",
    " and ",
    " or ",
    " is ",
    " defined ",
    "messages",
    "message",
    "m",
    "loop.index",
    "loop.first",
    "ns",
    "namespace(",
    "add_generation_prompt",
    "bos_token",
    "eos_token",
    "tools",
    "role",
    "content",
    "[0]",
    "['role']",
    ".role",
    ".content",
    ".strip()",
    ".startswith('s')",
    ".items()",
    "|",
    " tojson",
    " trim",
    " length",
    " upper",
    "raise_exception(",
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    ",",
    ":",
    "=",
    "==",
    "+",
    "~",
    "*",
    "'",
    "\"",
    "'x'",
    "0",
    "1",
    "2",
    "none",
    "true",
    "\n",
    " ",
    "text",
    "<|im_start|>",
];

fn template_source() -> BoxedStrategy<String> {
    let piece = prop_oneof![
        8 => prop::sample::select(TEMPLATE_TOKENS).prop_map(str::to_owned),
        1 => "\\PC{1,3}",
    ];
    prop::collection::vec(piece, 0..40)
        .prop_map(|pieces| pieces.concat())
        .boxed()
}

// ---------------------------------------------------------------------------------------------
// Expected renderings
// ---------------------------------------------------------------------------------------------

/// What the ChatML template must write: every role and content verbatim.
fn chatml_expected(messages: &[ChatMessage], add_generation_prompt: bool) -> String {
    let mut out = String::new();
    for (i, m) in messages.iter().enumerate() {
        if i == 0 && m.role != "system" {
            out.push_str(CHATML_DEFAULT_SYSTEM);
        }
        out.push_str(&format!(
            "<|im_start|>{}\n{}<|im_end|>\n",
            m.role, m.content
        ));
    }
    if add_generation_prompt {
        out.push_str("<|im_start|>assistant\n");
    }
    out
}

/// What the Llama 3 style template must write when every role is one it knows. Its `trim` is
/// minijinja's, which strips what Rust's `str::trim` strips.
fn llama3_expected(messages: &[ChatMessage], opts: &RenderOptions) -> String {
    let mut out = format!("{}\n", opts.bos_token);
    for (i, m) in messages.iter().enumerate() {
        if i == 0 && m.role != "system" {
            out.push_str(LLAMA3_DEFAULT_SYSTEM);
        }
        out.push_str(&format!(
            "<|start_header_id|>{}<|end_header_id|>\n\n{}<|eot_id|>\n",
            m.role,
            m.content.trim()
        ));
    }
    if opts.add_generation_prompt {
        out.push_str("<|start_header_id|>assistant<|end_header_id|>\n\n\n");
    }
    out
}

/// A piece of expected output: literal text, or one JSON value written by `tojson`.
#[derive(Debug)]
enum Piece {
    Text(String),
    Json(Value),
}

/// What the Qwen-style template must write, as pieces.
fn qwen_expected(
    messages: &[ChatMessage],
    tools: Option<&[Value]>,
    add_generation_prompt: bool,
) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let text = |pieces: &mut Vec<Piece>, s: &str| match pieces.last_mut() {
        Some(Piece::Text(last)) => last.push_str(s),
        _ => pieces.push(Piece::Text(s.to_owned())),
    };
    if let Some(tools) = tools.filter(|t| !t.is_empty()) {
        text(&mut pieces, "<|im_start|>system\n");
        match messages.first() {
            Some(first) if first.role == "system" => text(&mut pieces, &first.content),
            _ => text(&mut pieces, "You are Qwen."),
        }
        text(&mut pieces, "\n\n# Tools\n<tools>");
        for tool in tools {
            text(&mut pieces, "\n");
            pieces.push(Piece::Json(tool.clone()));
        }
        text(&mut pieces, "\n</tools><|im_end|>\n");
    }
    for m in messages {
        if m.role.starts_with("sys") {
            continue;
        }
        match &m.tool_calls {
            Some(Value::Array(calls)) => {
                text(&mut pieces, "<|im_start|>assistant");
                for call in calls {
                    text(&mut pieces, "\n<tool_call>\n");
                    pieces.push(Piece::Json(call["function"].clone()));
                    text(&mut pieces, "\n</tool_call>");
                }
                text(&mut pieces, "<|im_end|>\n");
            }
            Some(other) => unreachable!("generated tool_calls are arrays, got {other}"),
            None => {
                let line = format!("<|im_start|>{}\n{}<|im_end|>\n", m.role, m.content.trim());
                text(&mut pieces, &line);
            }
        }
    }
    if add_generation_prompt {
        text(&mut pieces, "<|im_start|>assistant\n");
    }
    pieces
}

/// Checks `output` is exactly `pieces`: literal text verbatim, each JSON piece one JSON value
/// equal to the expected one.
fn check_pieces(output: &str, pieces: &[Piece]) -> Result<(), TestCaseError> {
    let mut rest = output;
    for piece in pieces {
        match piece {
            Piece::Text(text) => {
                prop_assert!(
                    rest.starts_with(text.as_str()),
                    "expected {:?} at byte {} of {:?}",
                    text,
                    output.len() - rest.len(),
                    output
                );
                rest = &rest[text.len()..];
            }
            Piece::Json(value) => {
                // serde_json's float parsing is not exact to the last bit: compare with the
                // value after the same print-and-parse, so the digits `tojson` wrote are what
                // is checked.
                let value: Value = serde_json::from_str(&value.to_string()).unwrap();
                let mut values = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
                let parsed = values.next();
                let used = values.byte_offset();
                prop_assert!(
                    matches!(&parsed, Some(Ok(v)) if *v == value),
                    "expected JSON {} at byte {} of {:?}, got {:?}",
                    value,
                    output.len() - rest.len(),
                    output,
                    parsed
                );
                rest = &rest[used..];
            }
        }
    }
    prop_assert!(rest.is_empty(), "unexpected trailing output {rest:?}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    /// ChatML always renders, to exactly the documented layout: any role, any content,
    /// Jinja syntax included, is copied through as text.
    #[test]
    fn chatml_copies_every_message_verbatim(messages in messages(), opts in options()) {
        let rendered = CHATML_TEMPLATE.render(&messages, &opts);
        prop_assert_eq!(
            rendered.map_err(|e| e.to_string()),
            Ok(chatml_expected(&messages, opts.add_generation_prompt))
        );
    }

    /// The Llama 3 style template renders exactly when every role is known, and otherwise
    /// raises its own error about the first unknown role, on the line that raises.
    #[test]
    fn llama3_renders_or_raises_for_the_first_unknown_role(
        messages in messages(),
        opts in options(),
    ) {
        let rendered = LLAMA3_TEMPLATE.render(&messages, &opts);
        let unknown = messages.iter().find(|m| !LLAMA3_ROLES.contains(&m.role.as_str()));
        match (rendered, unknown) {
            (Ok(text), None) => prop_assert_eq!(text, llama3_expected(&messages, &opts)),
            (Err(TemplateError::Raised { line, message }), Some(bad)) => {
                prop_assert_eq!(message, format!("Unknown role: {}", bad.role));
                prop_assert_eq!(line, Some(4));
            }
            (other, unknown) => {
                return Err(TestCaseError::fail(format!(
                    "got {other:?} for first unknown role {:?}",
                    unknown.map(|m| &m.role)
                )));
            }
        }
    }

    /// The Qwen-style template writes tools, tool calls and turns as documented; what `tojson`
    /// writes parses back to the value given, whatever strings it holds.
    #[test]
    fn qwen_writes_turns_tools_and_calls(
        messages in qwen_messages(),
        tools in prop::option::of(prop::collection::vec(
            function().prop_map(|f| json!({"type": "function", "function": f})),
            0..3,
        )),
        add_generation_prompt in any::<bool>(),
    ) {
        let mut opts = RenderOptions { add_generation_prompt, ..RenderOptions::default() };
        if let Some(tools) = &tools {
            opts.extra.insert("tools".into(), Value::Array(tools.clone()));
        }
        let has_tools = tools.as_ref().is_some_and(|t| !t.is_empty());
        match QWEN_TEMPLATE.render(&messages, &opts) {
            Ok(output) => check_pieces(
                &output,
                &qwen_expected(&messages, tools.as_deref(), add_generation_prompt),
            )?,
            // With tools the template reads `messages[0]['role']`, which fails on an empty
            // conversation; nothing else may fail.
            Err(TemplateError::Render { .. }) if has_tools && messages.is_empty() => {}
            Err(error) => return Err(TestCaseError::fail(format!("{error:?}"))),
        }
    }

    /// Malformed tool calls and tools (any JSON where a list of objects belongs) never panic:
    /// the template renders or fails with a typed, non-empty error.
    #[test]
    fn qwen_survives_any_tool_calls_and_tools(
        messages in prop::collection::vec((role(), content(), any_json()), 0..4),
        tools in any_json(),
    ) {
        let messages: Vec<ChatMessage> = messages
            .into_iter()
            .map(|(role, content, calls)| {
                let mut message = ChatMessage::new(role, content);
                message.tool_calls = Some(calls);
                message
            })
            .collect();
        let mut opts = RenderOptions::default();
        opts.extra.insert("tools".into(), tools);
        if let Err(error) = QWEN_TEMPLATE.render(&messages, &opts) {
            prop_assert!(!error.to_string().is_empty());
            prop_assert!(!matches!(error, TemplateError::Syntax { .. }), "{error:?}");
        }
    }

    /// `raise_exception(msg)` fails the render with exactly `msg`, whatever it contains.
    #[test]
    fn raise_exception_carries_the_message(message in content()) {
        let template = ChatTemplate::new("before {{ raise_exception(why) }} after").unwrap();
        let mut opts = RenderOptions::default();
        opts.extra.insert("why".into(), json!(message));
        match template.render(&[], &opts) {
            Err(TemplateError::Raised { line, message: raised }) => {
                prop_assert_eq!(raised, message);
                prop_assert_eq!(line, Some(1));
            }
            other => return Err(TestCaseError::fail(format!("{other:?}"))),
        }
    }

    /// Random template sources: compiling fails only with `Syntax`, and a template that
    /// compiles renders, or fails with a typed error, and does the same again.
    #[test]
    fn random_template_sources_never_panic(
        source in template_source(),
        messages in messages(),
        opts in options(),
    ) {
        match ChatTemplate::new(source.clone()) {
            Ok(template) => {
                prop_assert_eq!(template.source(), source.as_str());
                let first = template.render(&messages, &opts).map_err(|e| e.to_string());
                let again = template.render(&messages, &opts).map_err(|e| e.to_string());
                if let Err(message) = &first {
                    prop_assert!(message.starts_with("chat template "), "{message}");
                }
                prop_assert_eq!(first, again);
            }
            Err(TemplateError::Syntax { message, .. }) => prop_assert!(!message.is_empty()),
            Err(other) => return Err(TestCaseError::fail(format!("compile gave {other:?}"))),
        }
    }

    /// Through a kit, any conversation encodes without panicking, and the ids decode back to
    /// exactly the rendered text (special-token text in a message included).
    #[test]
    fn kit_encodes_any_conversation_losslessly(
        messages in messages(),
        add_generation_prompt in any::<bool>(),
    ) {
        let extra = Map::new();
        let rendered = KIT.render_chat(&messages, add_generation_prompt, &extra).unwrap();
        prop_assert_eq!(&rendered, &chatml_expected(&messages, add_generation_prompt));
        let ids = KIT.encode_chat(&messages, add_generation_prompt, &extra).unwrap();
        prop_assert_eq!(KIT.decode(&ids, false).unwrap(), rendered);
    }
}

/// A kit over a byte-level vocabulary (every byte a token, plus the two ChatML control tokens)
/// with the ChatML template.
static KIT: LazyLock<PromptKit> = LazyLock::new(|| {
    let mut bytes: Vec<String> = ByteLevel::alphabet()
        .into_iter()
        .map(String::from)
        .collect();
    bytes.sort();
    let mut tokens = vec!["<|im_start|>".to_owned(), "<|im_end|>".to_owned()];
    tokens.extend(bytes);
    let mut token_types = vec![token_type::NORMAL; tokens.len()];
    token_types[..2].fill(token_type::CONTROL);
    let vocab = GgufVocab {
        model: "gpt2".into(),
        pre: Some("gpt2".into()),
        tokens,
        token_types,
        merges: Vec::new(),
        bos: None,
        eos: Some(1),
        unk: None,
        pad: None,
        add_bos: false,
        add_eos: false,
        chat_template: Some(CHATML.into()),
    };
    PromptKit::from_vocab(&vocab).expect("kit")
});

/// Templates that would recurse or loop without end fail with a typed error, not a stack
/// overflow or a hang: minijinja's recursion and range limits hold in this configuration.
#[test]
fn runaway_templates_fail_cleanly() {
    let opts = RenderOptions::default();
    let recursive = ChatTemplate::new("{% macro m(n) %}{{ m(n + 1) }}{% endmacro %}{{ m(0) }}")
        .expect("compiles");
    let error = recursive.render(&[], &opts).expect_err("endless recursion");
    assert!(
        matches!(error, TemplateError::Render { .. })
            && error.to_string().contains("recursion limit exceeded"),
        "{error}"
    );

    let nested = format!("{{{{ {}1{} }}}}", "(".repeat(1000), ")".repeat(1000));
    let error = ChatTemplate::new(nested).expect_err("nesting past the parser's limit");
    assert!(
        matches!(error, TemplateError::Syntax { .. })
            && error.to_string().contains("maximum recursion limits"),
        "{error}"
    );

    let huge = ChatTemplate::new("{% for i in range(100000000) %}x{% endfor %}").expect("compiles");
    let error = huge
        .render(&[], &opts)
        .expect_err("a hundred million iterations");
    assert!(
        error.to_string().contains("range has too many elements"),
        "{error}"
    );
}

//! Tool calls through the engine: a request with `tool_choice` `required` or a named function
//! is prepared by the OpenAI surface (the family's prompt and grammar), generated under that
//! grammar, and its answer read back by the family's parser. Every answer is calls only, of the
//! functions allowed, with arguments that validate against their schema (the `jsonschema`
//! crate): on the real default model (whose template knows no tools, so Tidelock's Hermes prompt
//! is used) and on tiny generated models of two families whose templates render tools themselves
//! (Qwen2.5's `<tool_call>` blocks, Llama 3.1's bare JSON).

mod support;

use std::sync::Arc;

use serde_json::{Value, json};
use support::{constrained_engine, model_path, run_answers};
use tidelock_openai::{Endpoint, Prepared, parse};
use tidelock_prompt::{PromptKit, ToolCall, ToolFormat, ToolPiece, ToolStyle};
use tidelock_protocol::FinishReason;
use tidelock_worker::engine::Engine;
use tidelock_worker::engine::executor::ModelExecutor;
use tidelock_worker::engine::grammar::Grammars;
use tidelock_worker::model::Llama;
use tidelock_worker::model::llama::WeightFormat;
use tidelock_worker::model::tiny::{TinyFamily, TinySpec, write_tiny_llama};
use tidelock_worker::testing::greedy;

fn engine(model: Arc<Llama>, kit: &Arc<PromptKit>) -> Engine<ModelExecutor> {
    constrained_engine(model, kit, 512)
}

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_forecast", "description": "Weather forecast",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7}
            }, "required": ["city", "unit", "days"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "set_alarm", "description": "An alarm",
            "parameters": {"type": "object", "properties": {
                "hour": {"type": "integer", "minimum": 0, "maximum": 23},
                "label": {"type": "string", "maxLength": 12}
            }, "required": ["hour"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "now"}}
    ])
}

fn prepare(kit: &PromptKit, extra: Value) -> Prepared {
    let mut body = json!({
        "model": "m",
        "messages": [{"role": "user", "content": "What will the weather be in Oslo this week?"}],
        "tools": tools(),
        "temperature": 1.0,
        "max_tokens": 120,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    parse(Endpoint::Chat, body.to_string().as_bytes())
        .unwrap()
        .prepare(kit, 4096)
        .unwrap()
}

/// The answers' texts (control tokens skipped, as the OpenAI surface decodes them) and finish
/// reasons.
fn generate(
    e: &mut Engine<ModelExecutor>,
    kit: &PromptKit,
    prepared: &Prepared,
    n: u32,
    seed: u64,
) -> Vec<(String, FinishReason)> {
    let mut request = greedy(prepared.tokens.clone(), 0);
    request.sampling = prepared.sampling.clone();
    request.sampling.n = n;
    request.sampling.seed = Some(seed);
    run_answers(e, request)
        .unwrap_or_else(|(_, message)| panic!("{message}"))
        .into_iter()
        .map(|(ids, reason)| (kit.decode(&ids, true).unwrap(), reason))
        .collect()
}

/// The calls of an answer, which must be nothing else.
fn calls_only(style: ToolStyle, text: &str) -> Vec<ToolCall> {
    let names = ["get_forecast", "set_alarm", "now"]
        .map(String::from)
        .to_vec();
    let mut parser = style.parser(names);
    let mut pieces = parser.push(text);
    pieces.extend(parser.finish());
    pieces
        .into_iter()
        .map(|p| match p {
            ToolPiece::Call(call) => call,
            ToolPiece::Text(t) => panic!("text {t:?} in a required answer: {text:?}"),
        })
        .collect()
}

/// Each call names an allowed function and its arguments validate against that function's
/// schema.
fn assert_valid(calls: &[ToolCall], allowed: &[&str]) {
    let tools = tools();
    for call in calls {
        assert!(allowed.contains(&call.name.as_str()), "{call:?}");
        let tool = tools
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["function"]["name"] == call.name.as_str())
            .unwrap();
        let schema = tool["function"]
            .get("parameters")
            .cloned()
            .unwrap_or(json!({"type": "object", "additionalProperties": false}));
        let arguments: Value = serde_json::from_str(&call.arguments).unwrap();
        let validator = jsonschema::validator_for(&schema).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&arguments)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{call:?}: {errors:?}");
    }
}

#[test]
fn required_calls_on_the_default_model_always_parse_and_validate() {
    let kit = Arc::new(PromptKit::from_gguf_file(&model_path()).expect("tokenizer"));
    let model = Arc::new(Llama::from_gguf(&model_path(), WeightFormat::Packed).expect("model"));
    let mut e = engine(model, &kit);
    let style = kit.tool_style();
    assert_eq!((style.format, style.native), (ToolFormat::Hermes, false));
    let mut seen = Vec::new();
    // Any function, several calls allowed: 4 answers.
    let required = prepare(&kit, json!({"tool_choice": "required"}));
    for (text, reason) in generate(&mut e, &kit, &required, 4, 11) {
        assert_eq!(reason, FinishReason::Stop, "{text:?}");
        let calls = calls_only(style, &text);
        assert!(!calls.is_empty(), "{text:?}");
        assert_valid(&calls, &["get_forecast", "set_alarm", "now"]);
        seen.extend(calls);
    }
    // A named function, one call: 3 answers.
    let named = prepare(
        &kit,
        json!({"tool_choice": {"type": "function", "function": {"name": "set_alarm"}},
               "parallel_tool_calls": false}),
    );
    for (text, reason) in generate(&mut e, &kit, &named, 3, 5) {
        assert_eq!(reason, FinishReason::Stop, "{text:?}");
        let calls = calls_only(style, &text);
        assert_eq!(calls.len(), 1, "{text:?}");
        assert_valid(&calls, &["set_alarm"]);
        seen.extend(calls);
    }
    eprintln!("calls made by the default model:");
    for call in &seen {
        eprintln!("  {}({})", call.name, call.arguments);
    }
}

#[test]
fn families_that_render_tools_themselves_get_their_own_format() {
    for (family, format) in [
        (TinyFamily::Qwen25, ToolFormat::Hermes),
        (TinyFamily::Llama3, ToolFormat::Llama3Json),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let spec = TinySpec {
            family,
            ..TinySpec::issue7()
        };
        write_tiny_llama(dir.path(), &spec).unwrap();
        let kit = Arc::new(PromptKit::from_hf_folder(dir.path()).unwrap());
        let model = Arc::new(Llama::from_hf(dir.path(), WeightFormat::F32).unwrap());
        let style = kit.tool_style();
        assert_eq!((style.format, style.native), (format, true), "{family:?}");
        let mut e = engine(model, &kit);
        let prepared = prepare(
            &kit,
            // Random weights write strings of odd characters, several tokens each.
            json!({"tool_choice": {"type": "function", "function": {"name": "get_forecast"}},
                   "parallel_tool_calls": false, "max_tokens": 600}),
        );
        // The template itself wrote the tools into the prompt.
        let prompt = kit.decode(&prepared.tokens, false).unwrap();
        assert!(prompt.contains("\"name\": \"get_forecast\""), "{prompt}");
        for (text, reason) in generate(&mut e, &kit, &prepared, 3, 2) {
            assert_eq!(reason, FinishReason::Stop, "{family:?}: {text:?}");
            let calls = calls_only(style, &text);
            assert_eq!(calls.len(), 1, "{family:?}: {text:?}");
            assert_valid(&calls, &["get_forecast"]);
            match format {
                ToolFormat::Hermes => {
                    assert!(text.starts_with("<tool_call>\n{\"name\": "), "{text:?}")
                }
                ToolFormat::Llama3Json => {
                    assert!(
                        text.starts_with("{\"name\": \"get_forecast\", \"parameters\": {"),
                        "{text:?}"
                    )
                }
            }
        }
    }
}

/// A past call and its result, rendered by the family's own template: the assistant turn holds
/// the call as the model would write it, the result its turn.
#[test]
fn past_calls_and_results_render_in_each_familys_own_way() {
    let history = json!([
        {"role": "user", "content": "Alarm at 7?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "set_alarm", "arguments": "{\"hour\": 7}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "ok"}
    ]);
    for (family, expected) in [
        (
            TinyFamily::Qwen25,
            "<|im_start|>user\nAlarm at 7?<|im_end|>\n<|im_start|>assistant\n<tool_call>\n{\"name\": \"set_alarm\", \"arguments\": {\"hour\": 7}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\nok\n</tool_response><|im_end|>\n<|im_start|>assistant\n",
        ),
        (
            TinyFamily::Llama3,
            "<|start_header_id|>user<|end_header_id|>\n\nAlarm at 7?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n{\"name\": \"set_alarm\", \"parameters\": {\"hour\": 7}}<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\nok<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_llama(
            dir.path(),
            &TinySpec {
                family,
                ..TinySpec::issue7()
            },
        )
        .unwrap();
        let kit = PromptKit::from_hf_folder(dir.path()).unwrap();
        let body = json!({"model": "m", "messages": history, "tools": tools()});
        let prepared = parse(Endpoint::Chat, body.to_string().as_bytes())
            .unwrap()
            .prepare(&kit, 4096)
            .unwrap();
        let prompt = kit.decode(&prepared.tokens, false).unwrap();
        assert!(prompt.ends_with(expected), "{family:?}: {prompt}");
        // What the model would write for that call is what the history holds.
        let style = kit.tool_style();
        let written = style.format_call("set_alarm", &json!({"hour": 7}));
        assert!(prompt.contains(&written), "{family:?}: {written}");
    }
}

/// A function whose parameters use a schema feature the grammar engine does not support is
/// refused when its call is required, naming `tools` (the OpenAI surface makes it a 400); the
/// schemas SDKs write (`$defs` and local `$ref`s, any text in strings) compile.
#[test]
fn parameter_schemas_compile_where_embedded_or_are_refused_naming_tools() {
    let kit = Arc::new(PromptKit::from_gguf_file(&model_path()).expect("tokenizer"));
    let grammars = Grammars::new(kit.clone(), kit.vocab_size()).unwrap();
    let body = json!({
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required",
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
            "properties": {"tags": {"type": "array", "uniqueItems": true}}}}}],
    });
    let prepared = parse(Endpoint::Chat, body.to_string().as_bytes())
        .unwrap()
        .prepare(&kit, 4096)
        .unwrap();
    let error = grammars
        .guide(prepared.sampling.constraint.as_ref().unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        error.starts_with("tools: ") && error.contains("uniqueItems"),
        "{error}"
    );
    let openai = tidelock_protocol::openai::OpenAiError::from_wire(
        tidelock_protocol::ErrorCode::InvalidRequest,
        error,
    );
    assert_eq!(
        (openai.status, openai.param.as_deref()),
        (400, Some("tools"))
    );
    // A Pydantic-style schema (`$defs`, local `$ref`s) compiles where it is embedded; braces,
    // quotes and Lark syntax inside a schema's strings stay inside its JSON.
    for parameters in [
        json!({"type": "object", "properties": {"who": {"$ref": "#/$defs/Person"}},
            "required": ["who"],
            "$defs": {"Person": {"type": "object", "properties": {"name": {"type": "string"}}}}}),
        json!({"type": "object", "description": "a } brace, a \" quote, %json { and start: x",
            "properties": {"q": {"type": "string", "pattern": "^[}{]+$"}}}),
    ] {
        let body = json!({
            "model": "m", "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required",
            "tools": [{"type": "function", "function": {"name": "f", "parameters": parameters}},
                      {"type": "function", "function": {"name": "g"}}],
        });
        let prepared = parse(Endpoint::Chat, body.to_string().as_bytes())
            .unwrap()
            .prepare(&kit, 4096)
            .unwrap();
        if let Err(e) = grammars.guide(prepared.sampling.constraint.as_ref().unwrap()) {
            panic!("{parameters}: {e}");
        }
    }
}

//! Structured outputs on the real default model: a corpus of JSON schemas (nested objects,
//! arrays with bounds, enums, numbers with bounds, optional fields, any object), each answer
//! constrained by `llguidance` and then checked by an independent validator (the `jsonschema`
//! crate): every one parses and validates. An unsupported schema is refused before anything
//! runs, naming what is wrong.

mod support;

use std::sync::Arc;

use support::{AnswerIds, constrained_engine, model_path, run_answers, tokens};
use tidelock_prompt::{ChatMessage, PromptKit};
use tidelock_protocol::{Constraint, ErrorCode, FinishReason};
use tidelock_worker::engine::Engine;
use tidelock_worker::engine::executor::ModelExecutor;
use tidelock_worker::model::Llama;
use tidelock_worker::model::llama::WeightFormat;
use tidelock_worker::testing::greedy;

fn engine() -> (Engine<ModelExecutor>, Arc<PromptKit>) {
    let kit = Arc::new(PromptKit::from_gguf_file(&model_path()).expect("tokenizer"));
    let model = Arc::new(Llama::from_gguf(&model_path(), WeightFormat::Packed).expect("model"));
    (constrained_engine(model, &kit, 256), kit)
}

/// The answers to `prompt` under `constraint`, `n` of them, with their finish reasons; or the
/// error the engine answered.
fn answers(
    e: &mut Engine<ModelExecutor>,
    prompt: Vec<u32>,
    constraint: Constraint,
    n: u32,
    seed: u64,
) -> Result<Vec<AnswerIds>, (ErrorCode, String)> {
    let mut request = greedy(prompt, 200);
    request.sampling.ignore_eos = false;
    request.sampling.temperature = 0.7;
    request.sampling.seed = Some(seed);
    request.sampling.n = n;
    request.sampling.constraint = Some(constraint);
    run_answers(e, request)
}

#[test]
fn every_constrained_answer_parses_and_validates() {
    let (mut e, kit) = engine();
    let corpus = [
        (
            "a person with an address",
            serde_json::json!({
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 40},
                    "address": {
                        "type": "object",
                        "properties": {
                            "city": {"type": "string", "maxLength": 40},
                            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}
                        },
                        "required": ["city", "zip"],
                        "additionalProperties": false
                    }
                },
                "required": ["name", "address"],
                "additionalProperties": false
            }),
        ),
        (
            "two to four lucky numbers",
            serde_json::json!({
                "type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4
            }),
        ),
        (
            "your mood",
            serde_json::json!({
                "type": "object",
                "properties": {"mood": {"enum": ["happy", "sad", "calm"]}},
                "required": ["mood"]
            }),
        ),
        (
            "an age and a score",
            serde_json::json!({
                "type": "object",
                "properties": {
                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                    "score": {"type": "number", "minimum": 0, "maximum": 1}
                },
                "required": ["age", "score"],
                "additionalProperties": false
            }),
        ),
        (
            "a title, maybe a flag",
            serde_json::json!({
                "type": "object",
                "properties": {
                    "title": {"type": "string", "maxLength": 30},
                    "done": {"type": "boolean"},
                    "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3}
                },
                "required": ["title"],
                "additionalProperties": false
            }),
        ),
    ];
    for (i, (what, schema)) in corpus.iter().enumerate() {
        let messages = [ChatMessage::new("user", format!("Answer in JSON: {what}."))];
        let prompt = kit
            .encode_chat(&messages, true, &Default::default())
            .unwrap();
        let validator = jsonschema::validator_for(schema).unwrap();
        let constraint = Constraint::JsonSchema {
            schema: schema.clone(),
        };
        for (ids, reason) in answers(&mut e, prompt, constraint, 3, i as u64).unwrap() {
            let text = kit.decode(&ids, true).unwrap();
            assert_eq!(
                reason,
                FinishReason::Stop,
                "{what}: cut at 200 tokens: {text}"
            );
            let value: serde_json::Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {text}"));
            let errors: Vec<String> = validator
                .iter_errors(&value)
                .map(|e| e.to_string())
                .collect();
            assert!(
                errors.is_empty(),
                "{what}: {text} breaks the schema: {errors:?}"
            );
        }
    }
    // Any JSON object.
    let prompt = tokens(40, 3);
    for (ids, reason) in answers(&mut e, prompt, Constraint::JsonObject, 2, 9).unwrap() {
        let text = kit.decode(&ids, true).unwrap();
        assert_eq!(reason, FinishReason::Stop, "{text}");
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(value.is_object(), "{text}");
    }
}

/// Unsupported schema features and broken schemas are refused before anything runs, the
/// message naming the feature (the router and the worker's surface turn it into a 400 with
/// `param: response_format`).
#[test]
fn a_schema_that_does_not_compile_is_refused_naming_the_problem() {
    let (mut e, _) = engine();
    for (schema, names) in [
        (
            serde_json::json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}),
            "missing",
        ),
        (
            serde_json::json!({"type": "array", "items": {"type": "integer"}, "uniqueItems": true}),
            "uniqueItems",
        ),
        (
            serde_json::json!({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}),
            "if",
        ),
        (
            serde_json::json!({"oneOf": [
                {"type": "object", "properties": {"a": {"type": "integer"}}},
                {"type": "object", "properties": {"b": {"type": "string"}}}
            ]}),
            "oneOf",
        ),
    ] {
        let bad = Constraint::JsonSchema { schema };
        let (code, message) = answers(&mut e, tokens(10, 1), bad, 1, 1).unwrap_err();
        assert_eq!(code, ErrorCode::InvalidRequest);
        assert!(
            message.starts_with("response_format:") && message.contains(names),
            "{message}"
        );
    }
}

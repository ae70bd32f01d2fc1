//! Property tests of the OpenAI request parser: `OpenAiError::parse_body` into
//! `ChatCompletionRequest` / `CompletionRequest`, then the accessors a server calls next
//! (`sampling`, `stop_strings`, `prompt_input`, each message's `text`).
//!
//! Why: these types take raw bytes from the public API. Whatever arrives (random bytes, invalid
//! UTF-8, broken or truncated JSON, JSON of the wrong shape, values out of range), the answer
//! must be a 4xx in OpenAI's error shape that names the problem, never a panic or a 5xx. Checked
//! here:
//! - any bytes: parsing never panics, and every error is a 400 `invalid_request_error` whose
//!   body is exactly `{"error": {"message", "type", "param", "code"}}`;
//! - any body containing invalid UTF-8 is refused, wherever the bad bytes are (also inside a
//!   field the server ignores);
//! - JSON built around the real field names: when a body parses, the accessors never panic and
//!   agree with an independent statement of the rules: `sampling` succeeds exactly when no field
//!   is out of range, and otherwise fails with a 400 whose `param` is a field that is;
//! - a valid request with one field replaced by a value of the wrong JSON type is a 400 whose
//!   message states the type that field takes. Known gap, not asserted away: such an error's
//!   `param` is `null` and the message does not name the field (serde_json reports the expected
//!   type and a position, and for fields flattened from `CommonFields` the position is the end
//!   of the object); the property accepts `param` null or the field itself;
//! - fixed cases: nesting far past serde_json's depth limit, and the malformed bodies the
//!   acceptance criteria list, each a 400 whose message says what is wrong.
//!
//! A failing case is saved in the `.proptest-regressions` file beside this one and replayed first
//! on later runs; commit it with the fix.

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{FileFailurePersistence, TestCaseError};
use serde_json::{Map, Value, json};
use tidelock_protocol::SamplingParams;
use tidelock_protocol::openai::{
    ChatCompletionRequest, ChatMessageIn, CommonFields, CompletionRequest, ErrorKind,
    MAX_STOP_SEQUENCES, MessageContent, OpenAiError, Prompt, PromptInput, ToolChoice,
};

/// Passed to `sampling` as the room left in the context.
const DEFAULT_MAX_TOKENS: u32 = 256;

/// The most alternatives per token a request may ask for.
const MAX_LOGPROBS: u32 = SamplingParams::MAX_LOGPROBS;

/// Field names the generators prefer besides [`REQUEST_FIELDS`], so that generated objects
/// reach the typed fields (see [`field_names`]).
const OTHER_FIELDS: &[&str] = &[
    "model",
    "messages",
    "prompt",
    "include_usage",
    "role",
    "content",
    "type",
    "text",
    "name",
    "tool_calls",
    "tool_call_id",
];

/// Every field name the generators prefer.
fn field_names() -> Vec<&'static str> {
    REQUEST_FIELDS.iter().chain(OTHER_FIELDS).copied().collect()
}

/// Top-level fields of either request, besides `model`, `messages` and `prompt`.
const REQUEST_FIELDS: &[&str] = &[
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "n",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "logprobs",
    "top_logprobs",
    "user",
    "prompt_cache_key",
    "ignore_eos",
    "echo",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "min_p",
    "stop_token_ids",
    "response_format",
];

const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];

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

/// Short strings: empty, ASCII, any printable Unicode, or any `char` at all (controls included).
fn text() -> BoxedStrategy<String> {
    prop_oneof![
        1 => Just(String::new()),
        3 => "[a-z \n]{1,8}",
        3 => "\\PC{1,12}",
        2 => prop::collection::vec(any::<char>(), 1..8).prop_map(String::from_iter),
    ]
    .boxed()
}

fn key() -> BoxedStrategy<String> {
    prop_oneof![
        3 => prop::sample::select(field_names()).prop_map(str::to_owned),
        1 => text(),
    ]
    .boxed()
}

/// A JSON number: small or extreme integers, or finite floats (JSON has no NaN or infinity).
fn number() -> BoxedStrategy<Value> {
    prop_oneof![
        (-3i64..30).prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-3.0f64..3.0).prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |x| serde_json::Number::from_f64(x)
            .map(Value::Number)),
    ]
    .boxed()
}

fn scalar() -> BoxedStrategy<Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        number(),
        text().prop_map(Value::from),
    ]
    .boxed()
}

/// Any JSON value, nested a few levels, with keys biased toward the real field names.
fn any_json() -> BoxedStrategy<Value> {
    scalar()
        .prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec((key(), inner), 0..6)
                    .prop_map(|entries| Value::Object(entries.into_iter().collect())),
            ]
        })
        .boxed()
}

fn object(entries: impl IntoIterator<Item = (&'static str, Option<Value>)>) -> Value {
    Value::Object(
        entries
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v)))
            .collect(),
    )
}

/// A content part: usually `text`, sometimes another type or no `text`.
fn content_part() -> BoxedStrategy<Value> {
    (
        prop_oneof![
            4 => Just("text".to_owned()),
            1 => Just("image_url".to_owned()),
            1 => text(),
        ],
        prop::option::weighted(0.85, text()),
        prop::option::of(any_json()),
    )
        .prop_map(|(kind, text, extra)| {
            object([
                ("type", Some(Value::from(kind))),
                ("text", text.map(Value::from)),
                ("cache_control", extra),
            ])
        })
        .boxed()
}

/// A chat message, mostly well formed.
fn message() -> BoxedStrategy<Value> {
    let role = prop_oneof![
        8 => prop::sample::select(ROLES).prop_map(Value::from),
        1 => text().prop_map(Value::from),
        1 => any_json(),
    ];
    let content = prop_oneof![
        8 => text().prop_map(Value::from),
        2 => prop::collection::vec(content_part(), 0..4).prop_map(Value::Array),
        1 => Just(Value::Null),
        1 => any_json(),
    ];
    (
        prop::option::weighted(0.95, role),
        prop::option::weighted(0.9, content),
        prop::option::weighted(0.1, text().prop_map(Value::from)),
        prop::option::weighted(0.1, any_json()),
        prop::option::weighted(0.1, text().prop_map(Value::from)),
    )
        .prop_map(|(role, content, name, tool_calls, tool_call_id)| {
            object([
                ("role", role),
                ("content", content),
                ("name", name),
                ("tool_calls", tool_calls),
                ("tool_call_id", tool_call_id),
            ])
        })
        .boxed()
}

/// Values of the type a field takes (mostly) and near its valid range, else anything.
fn field_value(name: &'static str) -> BoxedStrategy<Value> {
    let count = || {
        prop_oneof![
            Just(Value::Null),
            (0u32..=25).prop_map(Value::from),
            any::<u32>().prop_map(Value::from),
        ]
    };
    let typed: BoxedStrategy<Value> = match name {
        "model" | "user" | "prompt_cache_key" => {
            prop_oneof![4 => text().prop_map(Value::from), 1 => Just(Value::Null)].boxed()
        }
        "messages" => prop::collection::vec(message(), 0..5)
            .prop_map(Value::Array)
            .boxed(),
        "prompt" => prop_oneof![
            text().prop_map(Value::from),
            prop::collection::vec(text(), 0..3).prop_map(|v| json!(v)),
            prop::collection::vec(any::<u32>(), 0..5).prop_map(|v| json!(v)),
            prop::collection::vec(prop::collection::vec(0u32..100, 0..3), 0..3)
                .prop_map(|v| json!(v)),
        ]
        .boxed(),
        "max_tokens" | "max_completion_tokens" | "n" | "top_logprobs" => count().boxed(),
        "temperature" | "top_p" => prop_oneof![
            Just(Value::Null),
            (-0.5f64..2.5).prop_map(Value::from),
            prop::sample::select(vec![0.0, 1.0, 2.0, 1e300]).prop_map(Value::from),
            (-1i64..=3).prop_map(Value::from),
        ]
        .boxed(),
        "top_k" => prop_oneof![
            Just(Value::Null),
            (-3i64..50).prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
        ]
        .boxed(),
        "seed" => prop_oneof![Just(Value::Null), any::<u64>().prop_map(Value::from)].boxed(),
        "stop" => prop_oneof![
            Just(Value::Null),
            text().prop_map(Value::from),
            prop::collection::vec(text(), 0..7).prop_map(|v| json!(v)),
        ]
        .boxed(),
        // `logprobs` is a boolean for chat and a count for completions.
        "logprobs" => prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            count()
        ]
        .boxed(),
        "stream" | "echo" | "ignore_eos" | "parallel_tool_calls" => {
            prop_oneof![Just(Value::Null), any::<bool>().prop_map(Value::from)].boxed()
        }
        "stream_options" => prop_oneof![
            Just(Value::Null),
            prop::option::of(prop::option::of(any::<bool>()))
                .prop_map(|usage| object([("include_usage", usage.map(|u| json!(u)))])),
        ]
        .boxed(),
        "presence_penalty" | "frequency_penalty" => prop_oneof![
            Just(Value::Null),
            Just(json!(0)),
            (-2.0f64..2.0).prop_map(Value::from),
            (-5.0f64..5.0).prop_map(Value::from),
        ]
        .boxed(),
        "min_p" => prop_oneof![Just(Value::Null), (-0.5f64..1.5).prop_map(Value::from),].boxed(),
        "stop_token_ids" => prop_oneof![
            Just(Value::Null),
            prop::collection::vec(0u32..1000, 0..4).prop_map(|v| json!(v)),
        ]
        .boxed(),
        "logit_bias" => prop_oneof![
            Just(Value::Null),
            Just(json!({})),
            (0u32..100, -100i64..100).prop_map(|(id, bias)| json!({ id.to_string(): bias })),
            (key(), -150i64..150).prop_map(|(id, bias)| json!({ id: bias })),
        ]
        .boxed(),
        "response_format" => prop::sample::select(vec![
            Value::Null,
            json!({"type": "text"}),
            json!({"type": "json_object"}),
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
            json!({"type": "json_schema", "json_schema": {"name": "x"}}),
            json!({"type": "regex"}),
            json!({"kind": "text"}),
        ])
        .boxed(),
        "tool_choice" => prop::sample::select(vec![
            Value::Null,
            json!("none"),
            json!("auto"),
            json!("required"),
            json!({"type": "function", "function": {"name": "f"}}),
            json!({"type": "function", "function": {"name": "g"}}),
            json!("sometimes"),
        ])
        .boxed(),
        "tools" => prop::sample::select(vec![
            Value::Null,
            json!([]),
            json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]),
            json!([{"type": "function", "function": {"name": "no spaces"}}]),
            json!({"type": "function"}),
        ])
        .boxed(),
        _ => any_json().boxed(),
    };
    prop_oneof![16 => typed, 1 => any_json()].boxed()
}

/// A request-like JSON object: usually `model` and `messages` or `prompt`, plus some of the
/// other fields and the odd unknown one.
fn request_object() -> BoxedStrategy<Value> {
    let entry = prop_oneof![
        12 => prop::sample::select(REQUEST_FIELDS)
            .prop_flat_map(|name| (Just(name.to_owned()), field_value(name))),
        1 => (key(), any_json()),
    ];
    (
        prop::option::weighted(0.9, field_value("model")),
        prop::option::weighted(0.7, field_value("messages")),
        prop::option::weighted(0.7, field_value("prompt")),
        prop::collection::vec(entry, 0..8),
    )
        .prop_map(|(model, messages, prompt, rest)| {
            let mut map = Map::new();
            map.extend(model.map(|v| ("model".to_owned(), v)));
            map.extend(messages.map(|v| ("messages".to_owned(), v)));
            map.extend(prompt.map(|v| ("prompt".to_owned(), v)));
            map.extend(rest);
            Value::Object(map)
        })
        .boxed()
}

/// The fields both endpoints take, every one valid (or absent).
fn valid_common() -> BoxedStrategy<Map<String, Value>> {
    (
        prop::option::of((0u32..=200).prop_map(|t| json!(f64::from(t) / 100.0))),
        prop::option::of((1u32..=100).prop_map(|p| json!(f64::from(p) / 100.0))),
        prop::option::of((-1i64..=100).prop_map(Value::from)),
        prop::option::of(any::<u64>().prop_map(Value::from)),
        prop::option::of(prop_oneof![
            "\\PC{1,6}".prop_map(Value::from),
            prop::collection::vec("\\PC{1,6}", 0..=MAX_STOP_SEQUENCES).prop_map(|v| json!(v)),
        ]),
        prop::option::of((1..=SamplingParams::MAX_N).prop_map(Value::from)),
        prop::option::of(any::<bool>().prop_map(Value::from)),
        prop::option::of(any::<bool>().prop_map(|u| json!({"include_usage": u}))),
        prop::option::of(text().prop_map(Value::from)),
        prop::option::of(text().prop_map(Value::from)),
    )
        .prop_map(
            |(temperature, top_p, top_k, seed, stop, n, stream, stream_options, user, key)| {
                let Value::Object(map) = object([
                    ("temperature", temperature),
                    ("top_p", top_p),
                    ("top_k", top_k),
                    ("seed", seed),
                    ("stop", stop),
                    ("n", n),
                    ("stream", stream),
                    ("stream_options", stream_options),
                    ("user", user),
                    ("prompt_cache_key", key),
                ]) else {
                    unreachable!("object() builds an object")
                };
                map
            },
        )
        .boxed()
}

/// A chat request every field of which is valid.
fn valid_chat() -> BoxedStrategy<Value> {
    let message = (prop::sample::select(ROLES), text())
        .prop_map(|(role, content)| json!({"role": role, "content": content}));
    (
        text(),
        prop::collection::vec(message, 0..4),
        valid_common(),
        prop::option::of(1u32..=4096),
        prop::option::of(1u32..=4096),
        prop::option::of(0u32..=MAX_LOGPROBS),
    )
        .prop_map(
            |(model, messages, mut map, max_tokens, max_completion_tokens, top_logprobs)| {
                map.insert("model".into(), json!(model));
                map.insert("messages".into(), json!(messages));
                map.extend(max_tokens.map(|m| ("max_tokens".to_owned(), json!(m))));
                map.extend(
                    max_completion_tokens.map(|m| ("max_completion_tokens".to_owned(), json!(m))),
                );
                if let Some(top) = top_logprobs {
                    map.insert("logprobs".into(), json!(true));
                    map.insert("top_logprobs".into(), json!(top));
                }
                Value::Object(map)
            },
        )
        .boxed()
}

/// A completion request every field of which is valid.
fn valid_completion() -> BoxedStrategy<Value> {
    let prompt = prop_oneof![
        text().prop_map(Value::from),
        text().prop_map(|t| json!([t])),
        prop::collection::vec(any::<u32>(), 1..5).prop_map(|v| json!(v)),
        prop::collection::vec(any::<u32>(), 1..5).prop_map(|v| json!([v])),
    ];
    (
        text(),
        prompt,
        valid_common(),
        prop::option::of(1u32..=4096),
        prop::option::of(0u32..=MAX_LOGPROBS),
        prop::option::of(any::<bool>()),
    )
        .prop_map(|(model, prompt, mut map, max_tokens, logprobs, echo)| {
            map.insert("model".into(), json!(model));
            map.insert("prompt".into(), prompt);
            map.extend(max_tokens.map(|m| ("max_tokens".to_owned(), json!(m))));
            map.extend(logprobs.map(|l| ("logprobs".to_owned(), json!(l))));
            map.extend(echo.map(|e| ("echo".to_owned(), json!(e))));
            Value::Object(map)
        })
        .boxed()
}

/// Byte sequences that are never valid UTF-8: a stray continuation byte, bytes that never
/// occur, truncated sequences, an overlong encoding, an encoded surrogate, a code point past
/// U+10FFFF.
const INVALID_UTF8: &[&[u8]] = &[
    b"\x80",
    b"\xff",
    b"\xfe",
    b"\xc3",
    b"\xe2\x82",
    b"\xf0\x9f\x98",
    b"\xc0\xaf",
    b"\xed\xa0\x80",
    b"\xf4\x90\x80\x80",
];

#[derive(Debug, Clone)]
enum Mutation {
    Replace(Index, u8),
    Insert(Index, Vec<u8>),
    Delete(Index),
    Truncate(Index),
}

fn mutation() -> BoxedStrategy<Mutation> {
    prop_oneof![
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Replace(i, b)),
        (any::<Index>(), prop::sample::select(INVALID_UTF8))
            .prop_map(|(i, bytes)| Mutation::Insert(i, bytes.to_vec())),
        (
            any::<Index>(),
            prop::sample::select(b"{}[]\",:\\0-.en".to_vec())
        )
            .prop_map(|(i, b)| Mutation::Insert(i, vec![b])),
        any::<Index>().prop_map(Mutation::Delete),
        any::<Index>().prop_map(Mutation::Truncate),
    ]
    .boxed()
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        if bytes.is_empty() {
            break;
        }
        match m {
            Mutation::Replace(i, b) => {
                let i = i.index(bytes.len());
                bytes[i] = *b;
            }
            Mutation::Insert(i, new) => {
                let i = i.index(bytes.len() + 1);
                bytes.splice(i..i, new.iter().copied());
            }
            Mutation::Delete(i) => {
                bytes.remove(i.index(bytes.len()));
            }
            Mutation::Truncate(i) => bytes.truncate(i.index(bytes.len())),
        }
    }
    bytes
}

/// Request bodies that are mostly not valid requests: random bytes, or a request-like JSON
/// object with a few bytes changed, inserted (invalid UTF-8 among them), deleted or cut off.
fn body_bytes() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..128),
        (
            prop_oneof![request_object(), valid_chat(), valid_completion()],
            prop::collection::vec(mutation(), 1..4),
        )
            .prop_map(|(value, mutations)| mutate(serde_json::to_vec(&value).unwrap(), &mutations)),
    ]
    .boxed()
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

/// A 4xx with a message, and a body of exactly OpenAI's shape carrying the same fields.
fn check_error_shape(error: &OpenAiError) -> Result<(), TestCaseError> {
    prop_assert!((400..500).contains(&error.status), "{error:?}");
    prop_assert!(!error.message.trim().is_empty(), "{error:?}");
    let body = error.body();
    let outer = body.as_object().expect("body is an object");
    prop_assert_eq!(outer.keys().collect::<Vec<_>>(), vec!["error"]);
    let inner = outer["error"].as_object().expect("`error` is an object");
    let mut keys: Vec<&str> = inner.keys().map(String::as_str).collect();
    keys.sort_unstable();
    prop_assert_eq!(keys, vec!["code", "message", "param", "type"]);
    prop_assert_eq!(&inner["message"], &json!(error.message));
    prop_assert_eq!(&inner["type"], &json!(error.kind.as_str()));
    prop_assert_eq!(&inner["param"], &json!(error.param));
    prop_assert_eq!(&inner["code"], &json!(error.code));
    Ok(())
}

/// An error about a request field: 400, `invalid_request_error`, naming one of `params`.
fn check_invalid(error: &OpenAiError, params: &[&str]) -> Result<(), TestCaseError> {
    check_error_shape(error)?;
    prop_assert_eq!((error.status, error.kind), (400, ErrorKind::InvalidRequest));
    let param = error.param.as_deref().unwrap_or("(none)");
    prop_assert!(
        params.contains(&param),
        "param {} is not one of the fields at fault {:?}: {:?}",
        param,
        params,
        error
    );
    Ok(())
}

/// An error of `parse_body`: a 400 in OpenAI's shape. (The wording is left to the fixed cases
/// and the wrong-type property, which check what the message says.)
fn check_parse_error(error: &OpenAiError) -> Result<(), TestCaseError> {
    check_error_shape(error)?;
    prop_assert_eq!((error.status, error.kind), (400, ErrorKind::InvalidRequest));
    Ok(())
}

/// The sampling fields both endpoints share that break a rule, by the request field's name.
fn common_violations(common: &CommonFields) -> Vec<&'static str> {
    let mut bad = Vec::new();
    for (param, value) in [
        ("presence_penalty", common.presence_penalty),
        ("frequency_penalty", common.frequency_penalty),
    ] {
        if value.is_some_and(|v| !(-2.0..=2.0).contains(&v)) {
            bad.push(param);
        }
    }
    match &common.logit_bias {
        None | Some(Value::Null) => {}
        Some(Value::Object(bias)) => {
            let fits = |(k, v): (&String, &Value)| {
                k.trim().parse::<u32>().is_ok()
                    && v.as_f64()
                        .is_some_and(|b| (-100.0..=100.0).contains(&(b as f32)))
            };
            if bias.len() > SamplingParams::MAX_LOGIT_BIAS || !bias.iter().all(fits) {
                bad.push("logit_bias");
            }
        }
        Some(_) => bad.push("logit_bias"),
    }
    if common.min_p.is_some_and(|p| !(0.0..=1.0).contains(&p)) {
        bad.push("min_p");
    }
    // Text, any JSON object, or JSON with a schema object; anything else is refused by name.
    match &common.response_format {
        None | Some(Value::Null) => {}
        Some(format) => {
            let schema = format.get("json_schema").and_then(|j| j.get("schema"));
            let served = match format.get("type").and_then(Value::as_str) {
                Some("text" | "json_object") => true,
                Some("json_schema") => matches!(schema, Some(Value::Object(_) | Value::Bool(_))),
                _ => false,
            };
            if !served {
                bad.push("response_format");
            }
        }
    }
    if common
        .n
        .is_some_and(|n| !(1..=SamplingParams::MAX_N).contains(&n))
    {
        bad.push("n");
    }
    let stops = common.stop_strings();
    if stops.len() > MAX_STOP_SEQUENCES || stops.iter().any(String::is_empty) {
        bad.push("stop");
    }
    if common
        .temperature
        .is_some_and(|t| !(0.0..=2.0).contains(&t))
    {
        bad.push("temperature");
    }
    if common.top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
        bad.push("top_p");
    }
    if common
        .top_k
        .is_some_and(|k| k < -1 || k > i64::from(u32::MAX))
    {
        bad.push("top_k");
    }
    bad
}

/// What the shared fields must have become in a successful `sampling`.
fn check_common_sampling(
    common: &CommonFields,
    sampling: &SamplingParams,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(sampling.temperature, common.temperature.unwrap_or(1.0));
    prop_assert_eq!(sampling.top_p, common.top_p.unwrap_or(1.0));
    prop_assert_eq!(
        sampling.top_k,
        common
            .top_k
            .filter(|&k| k > 0)
            .map(|k| u32::try_from(k).unwrap())
    );
    prop_assert_eq!(sampling.seed, common.seed);
    prop_assert_eq!(sampling.ignore_eos, common.ignore_eos);
    prop_assert_eq!(sampling.n, common.n.unwrap_or(1));
    prop_assert_eq!(
        sampling.presence_penalty,
        common.presence_penalty.unwrap_or(0.0)
    );
    prop_assert_eq!(
        sampling.frequency_penalty,
        common.frequency_penalty.unwrap_or(0.0)
    );
    prop_assert_eq!(sampling.min_p, common.min_p.unwrap_or(0.0));
    prop_assert_eq!(
        &sampling.stop_token_ids,
        &common.stop_token_ids.clone().unwrap_or_default()
    );
    let biased = match &common.logit_bias {
        Some(Value::Object(bias)) => bias.len(),
        _ => 0,
    };
    prop_assert_eq!(sampling.logit_bias.len(), biased);
    // The ranges every worker relies on.
    prop_assert!((0.0..=2.0).contains(&sampling.temperature));
    prop_assert!(sampling.top_p > 0.0 && sampling.top_p <= 1.0);
    prop_assert!(sampling.top_k != Some(0));
    prop_assert!(sampling.max_tokens >= 1);
    prop_assert!(sampling.logprobs.is_none_or(|n| n <= MAX_LOGPROBS));
    let stops = common.stop_strings();
    prop_assert!(stops.len() <= MAX_STOP_SEQUENCES);
    prop_assert!(stops.iter().all(|s| !s.is_empty()));
    Ok(())
}

/// A message's text is its string, or its text parts joined by newlines; any other part is a
/// 400 naming `messages`.
fn check_message(message: &ChatMessageIn) -> Result<(), TestCaseError> {
    let text = message.text();
    match &message.content {
        None => prop_assert_eq!(text, Ok(None)),
        Some(MessageContent::Text(s)) => prop_assert_eq!(text, Ok(Some(s.clone()))),
        Some(MessageContent::Parts(parts)) => {
            let texts: Option<Vec<&str>> = parts
                .iter()
                .map(|p| (p.kind == "text").then_some(p.text.as_deref()).flatten())
                .collect();
            match texts {
                Some(texts) => prop_assert_eq!(text, Ok(Some(texts.join("\n")))),
                None => check_invalid(&text.unwrap_err(), &["messages"])?,
            }
        }
    }
    Ok(())
}

fn check_chat(request: &ChatCompletionRequest) -> Result<(), TestCaseError> {
    for message in &request.messages {
        check_message(message)?;
    }
    let stop = request.common.stop.as_ref().map(|s| s.to_vec());
    prop_assert_eq!(request.stop_strings(), stop.unwrap_or_default());

    let mut bad = common_violations(&request.common);
    check_tool_plan(request)?;
    let (max_tokens, max_param) = match (request.max_completion_tokens, request.max_tokens) {
        (Some(max), _) => (max, "max_completion_tokens"),
        (None, Some(max)) => (max, "max_tokens"),
        (None, None) => (DEFAULT_MAX_TOKENS, "max_tokens"),
    };
    if max_tokens == 0 {
        bad.push(max_param);
    }
    let logprobs = match (request.logprobs, request.top_logprobs) {
        (Some(true), top) => Some(top.unwrap_or(0)),
        (_, top) => {
            if top.is_some_and(|t| t > 0) {
                bad.push("top_logprobs");
            }
            None
        }
    };
    if logprobs.is_some_and(|n| n > MAX_LOGPROBS) {
        bad.push("top_logprobs");
    }

    match request.sampling(DEFAULT_MAX_TOKENS) {
        Ok(sampling) => {
            prop_assert!(bad.is_empty(), "accepted although {bad:?} break a rule");
            check_common_sampling(&request.common, &sampling)?;
            prop_assert_eq!(sampling.max_tokens, max_tokens);
            prop_assert_eq!(sampling.logprobs, logprobs);
        }
        Err(error) => check_invalid(&error, &bad)?,
    }
    Ok(())
}

/// `tool_plan`, against a model of the rules: tools are a list of valid, distinct function
/// tools; a choice that promises a call needs tools, and a named one one of them.
fn check_tool_plan(request: &ChatCompletionRequest) -> Result<(), TestCaseError> {
    let names: Option<Vec<&str>> = match &request.tools {
        None | Some(Value::Null) => Some(Vec::new()),
        Some(Value::Array(tools)) => tools
            .iter()
            .map(|t| {
                let name = t["function"]["name"].as_str()?;
                let valid = t["type"] == "function"
                    && !name.is_empty()
                    && name.len() <= 64
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                valid.then_some(name)
            })
            .collect(),
        Some(_) => None,
    };
    let Some(names) = names else {
        return check_invalid(&request.tool_plan().unwrap_err(), &["tools"]);
    };
    let expected = match &request.tool_choice {
        None | Some(Value::Null) if names.is_empty() => Some(ToolChoice::None),
        None | Some(Value::Null) => Some(ToolChoice::Auto),
        Some(c) if c == "none" => Some(ToolChoice::None),
        Some(c) if c == "auto" => Some(ToolChoice::Auto),
        Some(c) if c == "required" && !names.is_empty() => Some(ToolChoice::Required),
        Some(c) => c["function"]["name"]
            .as_str()
            .filter(|n| c["type"] == "function" && names.contains(n))
            .map(|n| ToolChoice::Function(n.to_owned())),
    };
    match (request.tool_plan(), expected) {
        (Ok(plan), Some(choice)) => {
            prop_assert_eq!(plan.choice, choice);
            prop_assert_eq!(plan.functions.len(), names.len());
            prop_assert_eq!(plan.parallel, request.parallel_tool_calls != Some(false));
        }
        (Err(error), None) => check_invalid(&error, &["tool_choice"])?,
        (got, expected) => {
            return Err(TestCaseError::fail(format!(
                "tool_plan gave {got:?}, expected {expected:?}"
            )));
        }
    }
    Ok(())
}

fn check_completion(request: &CompletionRequest) -> Result<(), TestCaseError> {
    let stop = request.common.stop.as_ref().map(|s| s.to_vec());
    prop_assert_eq!(request.stop_strings(), stop.unwrap_or_default());

    let expected = match &request.prompt {
        Prompt::Text(text) => Some(PromptInput::Text(text.clone())),
        Prompt::Texts(texts) if texts.len() == 1 => Some(PromptInput::Text(texts[0].clone())),
        Prompt::Tokens(ids) if !ids.is_empty() => Some(PromptInput::Tokens(ids.clone())),
        Prompt::TokenBatches(batches) if batches.len() == 1 && !batches[0].is_empty() => {
            Some(PromptInput::Tokens(batches[0].clone()))
        }
        _ => None,
    };
    match (request.prompt_input(), expected) {
        (Ok(input), Some(expected)) => prop_assert_eq!(input, expected),
        (Err(error), None) => check_invalid(&error, &["prompt"])?,
        (got, expected) => {
            return Err(TestCaseError::fail(format!(
                "prompt_input gave {got:?}, expected {expected:?}"
            )));
        }
    }

    let mut bad = common_violations(&request.common);
    let max_tokens = request.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
    if max_tokens == 0 {
        bad.push("max_tokens");
    }
    if request.logprobs.is_some_and(|n| n > MAX_LOGPROBS) {
        bad.push("logprobs");
    }
    match request.sampling(DEFAULT_MAX_TOKENS) {
        Ok(sampling) => {
            prop_assert!(bad.is_empty(), "accepted although {bad:?} break a rule");
            check_common_sampling(&request.common, &sampling)?;
            prop_assert_eq!(sampling.max_tokens, max_tokens);
            prop_assert_eq!(sampling.logprobs, request.logprobs);
        }
        Err(error) => check_invalid(&error, &bad)?,
    }
    Ok(())
}

/// Parses `body` as the endpoint's request type, keeping only the error.
fn parse_as(endpoint: Endpoint, body: &[u8]) -> Result<(), OpenAiError> {
    match endpoint {
        Endpoint::Chat => OpenAiError::parse_body::<ChatCompletionRequest>(body).map(drop),
        Endpoint::Completion => OpenAiError::parse_body::<CompletionRequest>(body).map(drop),
    }
}

/// Parses `body` as both request types and checks whatever comes out; a body that is not UTF-8
/// must not parse.
fn check_body(body: &[u8]) -> Result<(), TestCaseError> {
    let utf8 = std::str::from_utf8(body).is_ok();
    match OpenAiError::parse_body::<ChatCompletionRequest>(body) {
        Ok(request) => {
            prop_assert!(utf8, "a body that is not UTF-8 parsed");
            check_chat(&request)?;
        }
        Err(error) => check_parse_error(&error)?,
    }
    match OpenAiError::parse_body::<CompletionRequest>(body) {
        Ok(request) => {
            prop_assert!(utf8, "a body that is not UTF-8 parsed");
            check_completion(&request)?;
        }
        Err(error) => check_parse_error(&error)?,
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    /// Random and corrupted bodies never panic; whatever fails is a 400 in OpenAI's shape.
    #[test]
    fn any_bytes_parse_or_fail_with_a_400(body in body_bytes()) {
        check_body(&body)?;
    }

    /// JSON objects around the real field names: a body that parses is validated exactly by
    /// the rules, and an error names a field that breaks one.
    #[test]
    fn parsed_requests_validate_by_the_rules(value in request_object()) {
        check_body(&serde_json::to_vec(&value).unwrap())?;
    }

    /// Valid requests parse, and every accessor succeeds on them.
    #[test]
    fn valid_requests_are_accepted(chat in valid_chat(), completion in valid_completion()) {
        let request: ChatCompletionRequest =
            OpenAiError::parse_body(&serde_json::to_vec(&chat).unwrap()).unwrap();
        check_chat(&request)?;
        prop_assert!(request.sampling(DEFAULT_MAX_TOKENS).is_ok());
        for message in &request.messages {
            prop_assert!(message.text().unwrap().is_some());
        }
        let request: CompletionRequest =
            OpenAiError::parse_body(&serde_json::to_vec(&completion).unwrap()).unwrap();
        check_completion(&request)?;
        prop_assert!(request.sampling(DEFAULT_MAX_TOKENS).is_ok());
        prop_assert!(request.prompt_input().is_ok());
    }

    /// A valid request with invalid UTF-8 in any string, whether a field the server reads or one
    /// it ignores, is refused with a 400.
    #[test]
    fn invalid_utf8_anywhere_is_refused(
        chat in valid_chat(),
        completion in valid_completion(),
        place in 0usize..6,
        bad in prop::sample::select(INVALID_UTF8),
        before in "\\PC{0,4}",
    ) {
        const SENTINEL: &str = "\u{E000}";
        for (endpoint, mut value) in [(Endpoint::Chat, chat), (Endpoint::Completion, completion)] {
            let planted = format!("{before}{SENTINEL}");
            let map = value.as_object_mut().unwrap();
            match place {
                0 => { map.insert("model".into(), json!(planted)); }
                1 => { map.insert("user".into(), json!(planted)); }
                2 => { map.insert("metadata".into(), json!({"note": planted})); }
                3 => { map.insert("stream_options".into(), json!({"x": planted})); }
                4 => {
                    map.insert("messages".into(), json!([{
                        "role": "user", "content": "hi", "cache_control": planted
                    }]));
                }
                _ => {
                    map.insert("messages".into(), json!([{
                        "role": "user", "content": [{"type": "text", "text": "hi", "x": planted}]
                    }]));
                }
            }
            let mut body = serde_json::to_vec(&value).unwrap();
            let at = body
                .windows(SENTINEL.len())
                .position(|w| w == SENTINEL.as_bytes())
                .unwrap();
            body.splice(at..at + SENTINEL.len(), bad.iter().copied());
            prop_assert!(std::str::from_utf8(&body).is_err());
            let error = parse_as(endpoint, &body).expect_err("invalid UTF-8 accepted");
            check_parse_error(&error)?;
        }
    }

    /// A valid request with one field replaced by a value of the wrong JSON type is a 400 whose
    /// message says what that field takes.
    #[test]
    fn a_wrong_typed_field_is_a_400_saying_what_it_takes(
        chat in valid_chat(),
        completion in valid_completion(),
        (field, wrong) in prop::sample::select(TYPED_FIELDS)
            .prop_flat_map(|field| (Just(field), wrong_value(field.takes))),
    ) {
        let mut value = match field.endpoint {
            Endpoint::Chat => chat,
            Endpoint::Completion => completion,
        };
        value.as_object_mut().unwrap().insert(field.name.into(), wrong.clone());
        let error = parse_as(field.endpoint, &serde_json::to_vec(&value).unwrap())
            .expect_err("a wrong-typed field was accepted");
        check_parse_error(&error)?;
        prop_assert!(
            error.message.contains(field.says),
            "`{}` = {} gave {:?}, which does not say {:?}",
            field.name,
            wrong,
            error.message,
            field.says
        );
        // Where a field is named, it is this one.
        prop_assert!(
            error.param.is_none() || error.param.as_deref() == Some(field.name),
            "{error:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Wrong types
// ---------------------------------------------------------------------------------------------

/// The JSON kinds of value a generator can produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Null,
    Bool,
    /// A non-negative integer.
    Count,
    NegativeInt,
    /// A number with a fractional part.
    Fraction,
    String,
    Array,
    Object,
}

const KINDS: [Kind; 8] = [
    Kind::Null,
    Kind::Bool,
    Kind::Count,
    Kind::NegativeInt,
    Kind::Fraction,
    Kind::String,
    Kind::Array,
    Kind::Object,
];

#[derive(Debug, Clone, Copy)]
enum Endpoint {
    Chat,
    Completion,
}

/// A field, the kinds of JSON value it takes, and what a parse error for it says.
#[derive(Debug, Clone, Copy)]
struct TypedField {
    endpoint: Endpoint,
    name: &'static str,
    takes: &'static [Kind],
    says: &'static str,
}

const OPTIONAL_COUNT: &[Kind] = &[Kind::Null, Kind::Count];
const OPTIONAL_FLOAT: &[Kind] = &[Kind::Null, Kind::Count, Kind::NegativeInt, Kind::Fraction];
const OPTIONAL_BOOL: &[Kind] = &[Kind::Null, Kind::Bool];
const OPTIONAL_STRING: &[Kind] = &[Kind::Null, Kind::String];

const fn chat(name: &'static str, takes: &'static [Kind], says: &'static str) -> TypedField {
    TypedField {
        endpoint: Endpoint::Chat,
        name,
        takes,
        says,
    }
}

const fn completion(name: &'static str, takes: &'static [Kind], says: &'static str) -> TypedField {
    TypedField {
        endpoint: Endpoint::Completion,
        name,
        takes,
        says,
    }
}

const TYPED_FIELDS: &[TypedField] = &[
    chat("model", &[Kind::String], "expected a string"),
    chat("messages", &[Kind::Array], "expected a sequence"),
    chat("max_tokens", OPTIONAL_COUNT, "expected u32"),
    chat("max_completion_tokens", OPTIONAL_COUNT, "expected u32"),
    chat("n", OPTIONAL_COUNT, "expected u32"),
    chat("top_logprobs", OPTIONAL_COUNT, "expected u32"),
    chat("temperature", OPTIONAL_FLOAT, "expected f32"),
    chat("top_p", OPTIONAL_FLOAT, "expected f32"),
    chat("min_p", OPTIONAL_FLOAT, "expected f32"),
    chat("presence_penalty", OPTIONAL_FLOAT, "expected f32"),
    completion("frequency_penalty", OPTIONAL_FLOAT, "expected f32"),
    chat(
        "top_k",
        &[Kind::Null, Kind::Count, Kind::NegativeInt],
        "expected i64",
    ),
    chat("seed", OPTIONAL_COUNT, "expected u64"),
    chat(
        "stop",
        &[Kind::Null, Kind::String, Kind::Array],
        "untagged enum Stop",
    ),
    chat("stream", OPTIONAL_BOOL, "expected a boolean"),
    chat("ignore_eos", OPTIONAL_BOOL, "expected a boolean"),
    chat("logprobs", OPTIONAL_BOOL, "expected a boolean"),
    chat(
        "stream_options",
        &[Kind::Null, Kind::Object, Kind::Array],
        "expected struct StreamOptions",
    ),
    chat("user", OPTIONAL_STRING, "expected a string"),
    chat("prompt_cache_key", OPTIONAL_STRING, "expected a string"),
    completion("model", &[Kind::String], "expected a string"),
    completion(
        "prompt",
        &[Kind::String, Kind::Array],
        "untagged enum Prompt",
    ),
    completion("max_tokens", OPTIONAL_COUNT, "expected u32"),
    completion("logprobs", OPTIONAL_COUNT, "expected u32"),
    completion("echo", OPTIONAL_BOOL, "expected a boolean"),
    completion("temperature", OPTIONAL_FLOAT, "expected f32"),
    completion(
        "stop",
        &[Kind::Null, Kind::String, Kind::Array],
        "untagged enum Stop",
    ),
];

/// A value of a kind the field does not take.
fn wrong_value(takes: &'static [Kind]) -> impl Strategy<Value = Value> {
    let kinds: Vec<Kind> = KINDS.into_iter().filter(|k| !takes.contains(k)).collect();
    prop::sample::select(kinds).prop_flat_map(|kind| -> BoxedStrategy<Value> {
        match kind {
            Kind::Null => Just(Value::Null).boxed(),
            Kind::Bool => any::<bool>().prop_map(Value::from).boxed(),
            Kind::Count => any::<u64>().prop_map(Value::from).boxed(),
            Kind::NegativeInt => (i64::MIN..0).prop_map(Value::from).boxed(),
            Kind::Fraction => (-1e6f64..1e6)
                .prop_filter("has a fractional part", |x| x.fract() != 0.0)
                .prop_map(Value::from)
                .boxed(),
            Kind::String => text().prop_map(Value::from).boxed(),
            Kind::Array => prop::collection::vec(any_json(), 0..3)
                .prop_map(Value::Array)
                .boxed(),
            Kind::Object => prop::collection::vec((key(), any_json()), 0..3)
                .prop_map(|e| Value::Object(e.into_iter().collect()))
                .boxed(),
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Fixed cases
// ---------------------------------------------------------------------------------------------

/// Nesting far past serde_json's recursion limit, in a typed field, an untyped field and an
/// ignored one, is a 400, not a stack overflow.
#[test]
fn deep_nesting_is_a_400() {
    for depth in [200, 100_000] {
        let nested = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let objects = format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth));
        for field in ["stop", "tools", "metadata"] {
            for value in [&nested, &objects] {
                let body = format!(
                    r#"{{"model": "m", "messages": [], "prompt": "p", "{field}": {value}}}"#
                );
                for error in [
                    OpenAiError::parse_body::<ChatCompletionRequest>(body.as_bytes()).map(drop),
                    OpenAiError::parse_body::<CompletionRequest>(body.as_bytes()).map(drop),
                ] {
                    let error = error.expect_err("nesting past the limit accepted");
                    assert_eq!((error.status, error.kind), (400, ErrorKind::InvalidRequest));
                    assert!(
                        error.message.contains("recursion limit exceeded"),
                        "{field} at depth {depth}: {}",
                        error.message
                    );
                }
            }
        }
    }
}

/// The bodies the acceptance criteria list, each a 400 whose message says what is wrong.
#[test]
fn listed_bad_bodies_are_400s_naming_the_problem() {
    let cases: &[(&[u8], &str)] = &[
        (b"", "EOF while parsing"),
        (b"{\"model\": ", "EOF while parsing"),
        (b"{\"model\": \"m\", \"messages\": [],}", "trailing comma"),
        (b"[1, 2]", "expected struct ChatCompletionRequest"),
        (b"\"hello\"", "expected struct ChatCompletionRequest"),
        (b"{\"messages\": []}", "missing field `model`"),
        (b"{\"model\": \"m\"}", "missing field `messages`"),
        (
            b"{\"model\": \"m\", \"messages\": [{}]}",
            "missing field `role`",
        ),
        (
            b"{\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": 7}]}",
            "untagged enum MessageContent",
        ),
        (
            b"{\"model\": \"m\xff\", \"messages\": []}",
            "not valid UTF-8",
        ),
    ];
    for (body, says) in cases {
        let error = OpenAiError::parse_body::<ChatCompletionRequest>(body)
            .expect_err(&String::from_utf8_lossy(body));
        assert_eq!((error.status, error.kind), (400, ErrorKind::InvalidRequest));
        assert!(
            error.message.contains(says),
            "{:?}: {:?} does not say {says:?}",
            String::from_utf8_lossy(body),
            error.message
        );
        assert_eq!(error.body()["error"]["type"], "invalid_request_error");
    }
}

//! The turn memory on the default model's vocabulary (SmolLM2-135M-Instruct, Q4_1 GGUF, at
//! `$TIDELOCK_MODEL` or `~/.cache/tidelock/models/`; `./scripts/test` fetches it): a session's
//! next turn starts from the ids of its previous prompt and answer even when the answer's ids
//! are not the tokenizer's own choice for its text, and falls back to tokenizing everything
//! whenever the text does not continue what was remembered.

mod support;

use support::kit;

use std::sync::{Arc, mpsc};

use futures::StreamExt;
use serde_json::json;
use tidelock_openai::{
    Answer, Continuation, Continuations, Endpoint, PromptText, TurnRecord, parse, respond_then,
};
use tidelock_prompt::PromptKit;
use tidelock_protocol::{ErrorCode, FinishReason, GenerateEvent, Usage};

fn chat(messages: &[(&str, &str)]) -> tidelock_openai::Parsed {
    let messages: Vec<_> = messages
        .iter()
        .map(|(role, content)| json!({"role": role, "content": content}))
        .collect();
    let body = json!({"model": "m", "messages": messages});
    parse(Endpoint::Chat, body.to_string().as_bytes()).expect("parse")
}

/// An answer whose ids spell `words` one piece at a time, split where the tokenizer would not:
/// each word's first letter is its own token. Its text is exactly `words`.
fn odd_answer(words: &str) -> Answer {
    let kit = kit();
    let mut ids = Vec::new();
    for (i, word) in words.split(' ').enumerate() {
        let word = if i == 0 {
            word.to_owned()
        } else {
            format!(" {word}")
        };
        let cut = word
            .char_indices()
            .nth(if i == 0 { 1 } else { 2 })
            .unwrap()
            .0;
        ids.extend(kit.encode(&word[..cut], false).unwrap());
        ids.extend(kit.encode(&word[cut..], false).unwrap());
    }
    let answer = Answer {
        text: kit.decode(&ids, false).unwrap(),
        ids,
    };
    assert_eq!(answer.text, words);
    answer
}

#[test]
fn the_next_turn_starts_from_the_ids_the_worker_cached() {
    let kit = kit();
    let history = [("system", "You are terse."), ("user", "Name three rivers.")];
    let first = chat(&history).prepare_after(kit, 8192, None).unwrap();
    assert_eq!(first.continued, 0);
    let answer = odd_answer("Nile, Amazon and Danube.");
    let retokenized = kit.encode(&answer.text, false).unwrap();
    assert_ne!(
        retokenized, answer.ids,
        "the answer's ids are not the tokenizer's"
    );

    let memory = first
        .text
        .clone()
        .unwrap()
        .then(first.tokens.clone(), &answer, kit)
        .expect("remembered");
    let second = chat(&[
        history[0],
        history[1],
        ("assistant", &answer.text),
        ("user", "And three lakes?"),
    ]);
    let without = second.clone().prepare(kit, 8192).unwrap();
    let with = second.prepare_after(kit, 8192, Some(&memory)).unwrap();

    // With the memory: the previous prompt, then the answer's own ids, then the rest.
    let head = first.tokens.len() + answer.ids.len();
    assert_eq!(with.continued, head);
    assert_eq!(with.tokens[..first.tokens.len()], first.tokens[..]);
    assert_eq!(with.tokens[first.tokens.len()..head], answer.ids[..]);
    // The same text either way; only the answer's tokenization differs.
    assert_eq!(
        kit.decode(&with.tokens, false).unwrap(),
        kit.decode(&without.tokens, false).unwrap()
    );
    assert_eq!(without.tokens[..first.tokens.len()], first.tokens[..]);
    assert_ne!(without.tokens[first.tokens.len()..head], answer.ids[..]);
    println!(
        "turn 2: {} tokens, {} from memory; re-tokenized, the cached prefix breaks at token {}",
        with.tokens.len(),
        with.continued,
        first.tokens.len()
            + without.tokens[first.tokens.len()..]
                .iter()
                .zip(&answer.ids)
                .take_while(|(a, b)| a == b)
                .count()
    );
}

#[test]
fn a_history_that_does_not_continue_the_memory_is_tokenized_whole() {
    let kit = kit();
    let history = [("user", "Hello there.")];
    let first = chat(&history).prepare_after(kit, 8192, None).unwrap();
    let answer = odd_answer("General Kenobi.");
    let memory = first
        .text
        .clone()
        .unwrap()
        .then(first.tokens.clone(), &answer, kit)
        .unwrap();
    // An edited answer, another first message, a shorter history, a completion's plain text.
    let cases = [
        chat(&[
            history[0],
            ("assistant", "General Kenobi!"),
            ("user", "Hi."),
        ]),
        chat(&[("user", "Hello there!"), ("assistant", &answer.text)]),
        chat(&[("user", "Hello")]),
        parse(
            Endpoint::Completion,
            json!({"model": "m", "prompt": "Hello there. General Kenobi."})
                .to_string()
                .as_bytes(),
        )
        .unwrap(),
    ];
    for parsed in cases {
        let plain = parsed.clone().prepare(kit, 8192).unwrap();
        let after = parsed.prepare_after(kit, 8192, Some(&memory)).unwrap();
        assert_eq!(after.continued, 0);
        assert_eq!(after.tokens, plain.tokens);
    }
    // A prompt text that ends inside a multi-byte character of the remembered text.
    let remembered = PromptText::new("caf\u{e9}")
        .then(vec![1, 2], &Answer::default(), kit)
        .unwrap();
    assert_eq!(remembered.rest("caf\u{e9} au lait"), Some(" au lait"));
    assert_eq!(remembered.rest("caf"), None);
    assert_eq!(remembered.rest("cafe au lait"), None);
}

#[test]
fn an_answer_whose_ids_do_not_spell_its_text_is_not_remembered() {
    let kit = kit();
    let im_end = kit.encode("<|im_end|>", false).unwrap();
    assert_eq!(im_end.len(), 1);
    // A control token inside the answer: the client was sent the text without it.
    let mut ids = kit.encode("Yes", false).unwrap();
    ids.extend(&im_end);
    ids.extend(kit.encode(" no", false).unwrap());
    let answer = Answer {
        ids,
        text: "Yes no".into(),
    };
    assert!(PromptText::new("q").then(vec![7], &answer, kit).is_none());
    let fine = Answer {
        ids: kit.encode("Yes no", false).unwrap(),
        text: "Yes no".into(),
    };
    let memory = PromptText::new("q").then(vec![7], &fine, kit).unwrap();
    assert_eq!(memory.ids()[0], 7);
    assert_eq!(memory.rest("qYes no, maybe"), Some(", maybe"));
}

fn remembered(tokens: usize) -> Continuation {
    PromptText::new("p")
        .then(vec![0; tokens], &Answer::default(), kit())
        .unwrap()
}

#[test]
fn memory_is_bounded_by_tokens_least_recently_used_out() {
    // Each session also costs its key and 128 bytes, in 4-byte ids: (1 + 128) / 4 -> 33.
    let extra = 33;
    let memory = Continuations::<String>::new(2 * (40 + extra) + 10);
    memory.put("a".into(), remembered(40));
    memory.put("b".into(), remembered(40));
    assert_eq!(memory.usage(), (2, 2 * (40 + extra)));
    // `a` used last: `b` goes first.
    assert!(memory.get("a").is_some());
    memory.put("c".into(), remembered(30));
    assert_eq!(memory.usage(), (2, 40 + 30 + 2 * extra));
    assert!(memory.get("b").is_none());
    // Replacing a session's memory frees its old ids first.
    memory.put("a".into(), remembered(60));
    assert_eq!(memory.usage(), (2, 60 + 30 + 2 * extra));
    // Longer than the whole budget: not kept, and the session's old memory is gone.
    memory.put("c".into(), remembered(2 * (40 + extra) + 10 - extra + 1));
    assert_eq!(memory.usage(), (1, 60 + extra));
    assert!(memory.get("c").is_none());
    // Many short sessions are bounded by their overheads too: each 3-letter key costs
    // 1 + (3 + 128) / 4 -> 34, and 1,000 / 34 -> 29 sessions.
    let many = Continuations::<String>::new(1_000);
    for i in 0..100 {
        many.put(format!("{i:03}"), remembered(1));
    }
    assert_eq!(many.usage(), (29, 29 * 34));
    assert!(many.get("099").is_some() && many.get("070").is_none());
    // Off.
    let off = Continuations::<String>::new(0);
    off.put("a".into(), remembered(1));
    assert_eq!(off.usage(), (0, 0));
}

/// A worker's events for an answer of `ids`, ending with `end`.
fn events(ids: &[u32], end: GenerateEvent) -> futures::stream::BoxStream<'static, GenerateEvent> {
    let tokens = ids.iter().map(|&id| GenerateEvent::Tokens {
        ids: vec![id],
        logprobs: None,
        top_logprobs: None,
        choice: 0,
    });
    let prefilled = GenerateEvent::Prefilled {
        prompt_tokens: 5,
        cached_tokens: 0,
    };
    futures::stream::iter(
        std::iter::once(prefilled)
            .chain(tokens)
            .chain([end])
            .collect::<Vec<_>>(),
    )
    .boxed()
}

/// What the callback got from answering `body` with `ids` then `end`, the answer read whole.
async fn answered(body: serde_json::Value, ids: &[u32], end: GenerateEvent) -> Option<Answer> {
    let kit = kit();
    let prepared = parse(Endpoint::Chat, body.to_string().as_bytes())
        .unwrap()
        .prepare(kit, 8192)
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let response = respond_then(
        prepared,
        Arc::new(kit.clone()),
        events(ids, end),
        Some(Box::new(move |answer| {
            tx.send(answer).unwrap();
            Box::pin(async {})
        })),
    )
    .await;
    axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    rx.try_recv().ok()
}

#[tokio::test]
async fn the_whole_answer_reaches_the_callback_unless_it_was_cut_or_failed() {
    let answer = odd_answer("Nile, Amazon and Danube.");
    let finished = || GenerateEvent::Finished {
        reason: FinishReason::Length,
        usage: Usage {
            prompt_tokens: 5,
            cached_tokens: 0,
            completion_tokens: answer.ids.len() as u32,
        },
    };
    let messages = json!([{"role": "user", "content": "Rivers?"}]);
    for stream in [false, true] {
        let body = json!({"model": "m", "messages": messages, "stream": stream});
        let got = answered(body, &answer.ids, finished()).await;
        assert_eq!(got.as_ref(), Some(&answer), "stream {stream}");
        // A stop string cuts the text the client sees: nothing to remember.
        let body =
            json!({"model": "m", "messages": messages, "stream": stream, "stop": ["Amazon"]});
        assert_eq!(answered(body, &answer.ids, finished()).await, None);
        // A failed generation neither.
        let body = json!({"model": "m", "messages": messages, "stream": stream});
        let failed = GenerateEvent::Error {
            code: ErrorCode::Internal,
            message: "worker lost".into(),
        };
        assert_eq!(answered(body, &answer.ids, failed).await, None);
    }
}

/// Turns of one chat on one replica: each turn's request continues the memory of the one
/// before; returns the last request prepared with memory, the memory after each turn, and the
/// last request's rendered form.
fn converse(
    kit: &PromptKit,
    users: &[&str],
) -> (
    tidelock_openai::Prepared,
    Vec<Continuation>,
    tidelock_openai::Rendered,
) {
    let mut history: Vec<(String, String)> = vec![("system".into(), "You are terse.".into())];
    let mut memories: Vec<Continuation> = Vec::new();
    for (turn, user) in users.iter().enumerate() {
        history.push(("user".into(), (*user).into()));
        let messages: Vec<(&str, &str)> = history
            .iter()
            .map(|(r, c)| (r.as_str(), c.as_str()))
            .collect();
        let rendered = chat(&messages).render(kit).unwrap();
        let prepared = rendered
            .clone()
            .tokenize(kit, 8192, memories.last())
            .unwrap();
        if turn + 1 == users.len() {
            return (prepared, memories, rendered);
        }
        let answer = odd_answer(&format!(
            "Answer {} follows here.",
            ["one", "two", "three", "four", "five"][turn]
        ));
        let memory = prepared
            .text
            .clone()
            .unwrap()
            .then(prepared.tokens.clone(), &answer, kit)
            .unwrap();
        assert_eq!(memory.turns() as usize, turn + 1);
        memories.push(memory);
        history.push(("assistant".into(), answer.text));
    }
    unreachable!("users is not empty")
}

#[test]
fn a_turn_log_rebuilds_on_another_replica_the_ids_the_first_one_sent() {
    let kit = kit();
    // One message with control-token text: its turn is tokenized in pieces.
    let users = [
        "Name a river.",
        "Write <|im_start|>system literally.",
        "Another one?",
        "Thanks.",
    ];
    let (last, memories, rendered) = converse(kit, &users);
    let records: Vec<_> = memories.iter().map(Continuation::record).collect();
    for record in &records {
        // The stored form round-trips.
        let bytes = record.to_bytes();
        assert_eq!(TurnRecord::from_bytes(&bytes).unwrap(), *record);
    }

    // Another replica, with no memory of its own, rebuilds the same continuation from the log.
    let rebuilt = rendered.rebuild(&records, kit).expect("rebuilt");
    assert_eq!(&rebuilt, memories.last().unwrap());
    let other = rendered
        .clone()
        .tokenize(kit, 8192, Some(&rebuilt))
        .unwrap();
    assert_eq!(other.tokens, last.tokens);
    assert_eq!(other.continued, last.continued);
    assert!(other.continued > 0);
    // Without it the answers' ids are lost: the ids differ from the first answer on.
    let cold = rendered.clone().tokenize(kit, 8192, None).unwrap();
    assert_ne!(cold.tokens, last.tokens);

    // A damaged record ends the chain where it stands; the rest is tokenized from the text.
    let mut damaged = records.clone();
    damaged[1].digest[0] ^= 1;
    let partial = rendered.rebuild(&damaged, kit).unwrap();
    assert_eq!(partial, memories[0]);
    let after = rendered
        .clone()
        .tokenize(kit, 8192, Some(&partial))
        .unwrap();
    assert_eq!(
        kit.decode(&after.tokens, false).unwrap(),
        kit.decode(&last.tokens, false).unwrap()
    );
    // Records out of order, or of another conversation, fit nothing.
    let mut swapped = records.clone();
    swapped.swap(0, 1);
    assert!(rendered.rebuild(&swapped, kit).is_none());
    let (_, _, other_chat) = converse(kit, &["Name a lake.", "And?"]);
    assert!(other_chat.rebuild(&records, kit).is_none());
    let mut special_later = records.clone();
    special_later[2].add_special = true;
    assert_eq!(rendered.rebuild(&special_later, kit).unwrap(), memories[1]);
}

#[test]
fn a_turn_record_refuses_bytes_it_did_not_write() {
    let record = TurnRecord {
        from: 3,
        answer_at: 10,
        end: 20,
        add_special: true,
        digest: [7; 32],
        answer: vec![1, 2, u32::MAX],
    };
    let bytes = record.to_bytes();
    assert_eq!(bytes.len(), 62 + 12);
    assert_eq!(TurnRecord::from_bytes(&bytes).unwrap(), record);
    for cut in [0, 1, 61, 62, 73] {
        assert!(
            TurnRecord::from_bytes(&bytes[..cut]).is_err(),
            "cut at {cut}"
        );
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(TurnRecord::from_bytes(&longer).is_err());
    let mut version = bytes.clone();
    version[0] = 2;
    assert!(TurnRecord::from_bytes(&version).is_err());
    let mut flag = bytes.clone();
    flag[25] = 2;
    assert!(TurnRecord::from_bytes(&flag).is_err());
    let mut count = bytes;
    count[58] = 0xff;
    assert!(TurnRecord::from_bytes(&count).is_err());
}

#[test]
fn a_turn_record_whose_answer_ids_do_not_spell_its_text_ends_the_chain() {
    // A fuzzer's finding: the digest covers the text, not the ids; a record whose answer ids
    // were changed must not put another answer into the prompt.
    let kit = kit();
    let (_, memories, rendered) = converse(kit, &["Name a river.", "Another?", "Thanks."]);
    let mut records: Vec<_> = memories.iter().map(Continuation::record).collect();
    records[1].answer[0] = kit.encode("Zzz", false).unwrap()[0];
    assert_eq!(rendered.rebuild(&records, kit).unwrap(), memories[0]);
}

/// The model's default sampling fills what a request leaves out, and only that; it travels with
/// the kit's JSON (what routers fetch from a worker), and out-of-range defaults are refused.
#[test]
fn the_models_sampling_defaults_fill_only_what_a_request_leaves_out() {
    use tidelock_prompt::{PromptKitJson, SamplingDefaults};
    let defaults = SamplingDefaults {
        temperature: Some(0.2),
        top_p: Some(0.9),
        top_k: Some(40),
    };
    // Through the kit's JSON, as a router gets it.
    let json = kit()
        .clone()
        .with_sampling_defaults(defaults)
        .to_json()
        .unwrap();
    let served = PromptKit::from_json(&json).unwrap();
    assert_eq!(served.sampling_defaults(), defaults);
    let sampling = |body: serde_json::Value| {
        parse(Endpoint::Chat, body.to_string().as_bytes())
            .unwrap()
            .prepare(&served, 8192)
            .unwrap()
            .sampling
    };
    let hi = json!([{"role": "user", "content": "Hi"}]);
    let left_out = sampling(json!({"model": "m", "messages": hi}));
    assert_eq!(
        (left_out.temperature, left_out.top_p, left_out.top_k),
        (0.2, 0.9, Some(40))
    );
    // A request's own values win, OpenAI's defaults included.
    let own = sampling(
        json!({"model": "m", "messages": hi, "temperature": 1, "top_p": 1.0, "top_k": -1}),
    );
    assert_eq!((own.temperature, own.top_p, own.top_k), (1.0, 1.0, None));
    // Without defaults, OpenAI's apply.
    let plain = parse(
        Endpoint::Chat,
        json!({"model": "m", "messages": hi}).to_string().as_bytes(),
    )
    .unwrap()
    .prepare(kit(), 8192)
    .unwrap()
    .sampling;
    assert_eq!(
        (plain.temperature, plain.top_p, plain.top_k),
        (1.0, 1.0, None)
    );
    // As /v1/models shows them: the decimals that were set.
    assert_eq!(
        defaults.shown(),
        Some(json!({"temperature": 0.2, "top_p": 0.9, "top_k": 40}))
    );
    assert_eq!(SamplingDefaults::default().shown(), None);
    // A kit document with defaults out of range is refused.
    let mut doc: PromptKitJson = serde_json::from_str(&json).unwrap();
    doc.sampling_defaults.temperature = Some(2.5);
    let err = PromptKit::from_json_value(doc).unwrap_err().to_string();
    assert!(err.contains("temperature 2.5"), "{err}");
}

//! An in-repo mutation fuzzer for every decoder that reads bytes from outside a process (issue
//! #18, point 7): the OpenAI request parser (through rendering and tokenization with the default
//! model's chat template), the binary generate request, the shard RPC bodies, KV event batches,
//! the router replicas' turn log records (through rebuilding a prompt's ids from them), GGUF
//! tokenizer metadata and safetensors headers.
//!
//! Each target starts from valid inputs (seeds) and mutates them: bit flips, byte changes to
//! boundary values, insertions, deletions, duplicated or spliced chunks, truncation, 32-bit
//! little-endian lengths set to extremes. An input passes when the decoder returns (an error is
//! fine) without panicking and within [`HANG`]. A failing input is written to
//! `$TMPDIR/tidelock-fuzz/<target>-<n>.bin` and named in the failure.
//!
//! The test suite runs a short pass (`TIDELOCK_FUZZ_ITERATIONS`, default 300 per target, a few
//! seconds in all); a long run is
//! `TIDELOCK_FUZZ_ITERATIONS=200000 TIDELOCK_FUZZ_SEED=$RANDOM cargo test --release -p tidelock-e2e --test fuzz`.
//! The generator is seeded (`TIDELOCK_FUZZ_SEED`, default 18), so a finding replays.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tidelock_openai::{Answer, Endpoint, TurnRecord, parse};
use tidelock_prompt::PromptKit;
use tidelock_protocol::shard::{Append, AttendReply, AttendRequest, AttendSeq};
use tidelock_protocol::{CacheSalt, GenerateRequest, KvEventBatch, SamplingParams};

/// One input taking longer than this is reported as a hang.
const HANG: Duration = Duration::from_secs(10);

/// SplitMix64: a seeded generator, the same mutations on every run with the same seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn iterations() -> usize {
    std::env::var("TIDELOCK_FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

fn seed() -> u64 {
    std::env::var("TIDELOCK_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(18)
}

/// One mutation of `input`, sometimes spliced with `other`.
fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = out.len();
        let at = rng.below(len + 1);
        match rng.below(8) {
            0 if len > 0 => out[at.min(len - 1)] ^= 1 << rng.below(8),
            1 if len > 0 => {
                out[at.min(len - 1)] = [0, 0x7f, 0x80, 0xff, b'"', b'{', b'\\'][rng.below(7)]
            }
            2 => {
                let bytes: Vec<u8> = (0..1 + rng.below(8)).map(|_| rng.next() as u8).collect();
                out.splice(at..at, bytes);
            }
            3 if len > 0 => {
                let end = (at + 1 + rng.below(16)).min(len);
                out.drain(at.min(len - 1)..end);
            }
            4 if len > 0 => {
                let start = rng.below(len);
                let end = (start + 1 + rng.below(64)).min(len);
                let chunk = out[start..end].to_vec();
                out.splice(at..at, chunk);
            }
            5 => out.truncate(at),
            6 if len >= 4 => {
                let at = at.min(len - 4);
                let v: u32 = [0, 1, 0x7fff_ffff, u32::MAX, 0x10_0000][rng.below(5)];
                out[at..at + 4].copy_from_slice(&v.to_le_bytes());
            }
            _ if !other.is_empty() => {
                let start = rng.below(other.len());
                let end = (start + 1 + rng.below(256)).min(other.len());
                out.splice(at..at, other[start..end].iter().copied());
            }
            _ => {}
        }
    }
    out
}

/// Runs `check` on mutations of `seeds`; panics naming the saved input of the first finding.
fn fuzz(target: &str, seeds: &[Vec<u8>], check: impl Fn(&[u8])) {
    let mut rng = Rng(seed() ^ target.bytes().fold(0, |h, b| h * 31 + u64::from(b)));
    let check = &check;
    // The seeds themselves must pass.
    let mut inputs: Vec<Vec<u8>> = seeds.to_vec();
    for _ in 0..iterations() {
        let a = &seeds[rng.below(seeds.len())];
        let b = &seeds[rng.below(seeds.len())];
        inputs.push(mutate(&mut rng, a, b));
    }
    // Quiet the default hook's printing while inputs are expected to fail decoding, not panic.
    for (n, input) in inputs.iter().enumerate() {
        let started = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(|| check(input)));
        let took = started.elapsed();
        if outcome.is_err() || took > HANG {
            let dir = std::env::temp_dir().join("tidelock-fuzz");
            let _ = std::fs::create_dir_all(&dir);
            let path = dir.join(format!("{target}-{n}.bin"));
            let _ = std::fs::write(&path, input);
            panic!(
                "{target}: input {n} {} (saved to {}; seed {})",
                if outcome.is_err() { "panicked" } else { "hung" },
                path.display(),
                seed()
            );
        }
    }
}

fn model_path() -> PathBuf {
    std::env::var_os("TIDELOCK_MODEL").map_or_else(
        || {
            let home = std::env::var_os("HOME").unwrap_or_default();
            Path::new(&home).join(".cache/tidelock/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        },
        PathBuf::from,
    )
}

fn kit() -> &'static PromptKit {
    static KIT: OnceLock<PromptKit> = OnceLock::new();
    KIT.get_or_init(|| PromptKit::from_gguf_file(&model_path()).expect("the default model"))
}

#[test]
fn openai_requests_parse_render_and_tokenize_without_panicking() {
    let seeds: Vec<Vec<u8>> = [
        r#"{"model":"m","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hi <|im_start|> there"}],"max_tokens":8,"stop":["\n\n","END"],"stream":true,"stream_options":{"include_usage":true}}"#,
        r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"part one"},{"type":"text","text":"two"}]},{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{\"x\":1}"}}]},{"role":"tool","tool_call_id":"c1","content":"42"}],"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}],"temperature":0.7,"top_p":0.9,"seed":7,"logprobs":true,"top_logprobs":3}"#,
        r#"{"model":"m","prompt":"Once upon a time","max_tokens":16,"logprobs":2,"echo":false,"n":1,"user":"u1"}"#,
        r#"{"model":"m","prompt":[1,2,3,49151],"max_tokens":4,"prompt_cache_key":"s","ignore_eos":true}"#,
        r#"{"model":"m","prompt":["a","b"],"stop":"x"}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    let kit = kit();
    fuzz("openai", &seeds, |body| {
        for endpoint in [Endpoint::Chat, Endpoint::Completion] {
            if let Ok(parsed) = parse(endpoint, body) {
                let _ = parsed.prepare(kit, 4096);
            }
        }
    });
}

#[test]
fn turn_log_records_decode_and_rebuild_only_what_their_text_says() {
    let kit = kit();
    let chat = |messages: &str| {
        let body = format!(r#"{{"model":"m","messages":[{messages}]}}"#);
        parse(Endpoint::Chat, body.as_bytes())
            .unwrap()
            .render(kit)
            .unwrap()
    };
    let first = chat(r#"{"role":"user","content":"Name a river <|im_start|>."}"#);
    let prepared = first.tokenize(kit, 4096, None).unwrap();
    let ids = kit.encode("Nile.", false).unwrap();
    let answer = Answer {
        text: kit.decode(&ids, false).unwrap(),
        ids,
    };
    let memory = prepared
        .text
        .clone()
        .unwrap()
        .then(prepared.tokens.clone(), &answer, kit)
        .unwrap();
    let next = chat(&format!(
        r#"{{"role":"user","content":"Name a river <|im_start|>."}},{{"role":"assistant","content":"{}"}},{{"role":"user","content":"Another?"}}"#,
        answer.text
    ));
    assert_eq!(
        next.rebuild(&[memory.record()], kit).as_ref(),
        Some(&memory)
    );
    let text = kit
        .decode(
            &next.clone().tokenize(kit, 4096, None).unwrap().tokens,
            false,
        )
        .unwrap();
    fuzz("turn-record", &[memory.record().to_bytes()], |bytes| {
        let Ok(record) = TurnRecord::from_bytes(bytes) else {
            return;
        };
        assert_eq!(TurnRecord::from_bytes(&record.to_bytes()).unwrap(), record);
        // Whatever a record says, the ids rebuilt from it spell the text they stand for.
        if let Some(rebuilt) = next.rebuild(std::slice::from_ref(&record), kit) {
            let rest = rebuilt
                .rest(&text)
                .expect("the rebuilt text is the prompt's");
            let spelled = kit.decode(rebuilt.ids(), false).unwrap();
            assert_eq!(format!("{spelled}{rest}"), text);
        }
    });
}

#[test]
fn binary_generate_requests_decode_without_panicking() {
    let request = |tokens: Vec<u32>| GenerateRequest {
        request_id: Some("r".into()),
        session: None,
        cache_salt: CacheSalt::new("0123456789abcdef0123456789abcdef").unwrap(),
        tokens,
        sampling: SamplingParams::default(),
        pull: None,
    };
    let seeds = vec![
        request(vec![]).to_binary(),
        request((0..64).collect()).to_binary(),
        serde_json::to_vec(&request(vec![1, 2, 3])).unwrap(),
    ];
    fuzz("generate", &seeds, |body| {
        if let Ok(decoded) = GenerateRequest::from_binary(body) {
            // What decodes encodes back to the same request.
            assert_eq!(
                GenerateRequest::from_binary(&decoded.to_binary()).unwrap(),
                decoded
            );
        }
    });
}

#[test]
fn shard_rpc_bodies_decode_without_panicking() {
    let request = AttendRequest {
        layer: 1,
        heads: 2,
        kv_heads: 1,
        head_dim: 2,
        scale: 0.5,
        seqs: vec![
            AttendSeq {
                start: 130,
                rows: 1,
                blocks: vec![(0, 7), (2, 3)],
            },
            AttendSeq {
                start: 0,
                rows: 2,
                blocks: vec![(0, 9)],
            },
        ],
        appends: vec![Append {
            local: 3,
            slot: 2,
            key: vec![1.0, -1.0],
            value: vec![0.25, 2.0],
        }],
        queries: (0..12).map(|i| i as f32 / 4.0).collect(),
    };
    let reply = AttendReply {
        incarnation: 9,
        rows: 3,
        heads: 2,
        head_dim: 2,
        outputs: (0..12).map(|i| i as f32).collect(),
        lse: vec![0.5, f32::NEG_INFINITY, 1.0, 2.0, 3.0, 4.0],
    };
    let seeds = vec![request.encode().unwrap(), reply.encode().unwrap()];
    fuzz("shard", &seeds, |body| {
        if let Ok(r) = AttendRequest::decode(body) {
            let again = AttendRequest::decode(&r.encode().unwrap()).unwrap();
            assert_eq!(again.encode().unwrap(), r.encode().unwrap());
        }
        if let Ok(r) = AttendReply::decode(body) {
            let again = AttendReply::decode(&r.encode().unwrap()).unwrap();
            assert_eq!(again.encode().unwrap(), r.encode().unwrap());
        }
    });
}

#[test]
fn kv_event_batches_decode_without_panicking() {
    let seeds: Vec<Vec<u8>> = [
        r#"{"epoch":3,"sequence":7,"events":[{"type":"stored","parent":null,"blocks":["00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"],"tier":"device"},{"type":"removed","blocks":["00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"],"tier":"host"},{"type":"cleared"},{"type":"future"}]}"#,
        r#"{"epoch":1,"sequence":1,"events":[]}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    fuzz("kv-events", &seeds, |line| {
        if let Ok(batch) = serde_json::from_slice::<KvEventBatch>(line) {
            let text = serde_json::to_vec(&batch).unwrap();
            let _ = serde_json::from_slice::<KvEventBatch>(&text).unwrap();
        }
    });
}

#[test]
fn gguf_tokenizer_metadata_reads_without_panicking() {
    use candle_core::quantized::gguf_file::Value;
    let strings = |items: &[&str]| {
        Value::Array(
            items
                .iter()
                .map(|s| Value::String((*s).to_owned()))
                .collect(),
        )
    };
    let metadata: Vec<(&str, Value)> = vec![
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("smollm".into())),
        (
            "tokenizer.ggml.tokens",
            strings(&["a", "b", "ab", "<|im_end|>"]),
        ),
        (
            "tokenizer.ggml.token_type",
            Value::Array(vec![
                Value::I32(1),
                Value::I32(1),
                Value::I32(1),
                Value::I32(3),
            ]),
        ),
        ("tokenizer.ggml.merges", strings(&["a b"])),
        ("tokenizer.ggml.eos_token_id", Value::U32(3)),
        (
            "tokenizer.chat_template",
            Value::String("{% for m in messages %}{{ m.content }}<|im_end|>{% endfor %}".into()),
        ),
    ];
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let mut seed = std::io::Cursor::new(Vec::new());
    candle_core::quantized::gguf_file::write(&mut seed, &metadata, &[]).unwrap();
    let seed = seed.into_inner();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fuzz.gguf");
    fuzz("gguf", &[seed], |bytes| {
        std::fs::write(&path, bytes).unwrap();
        if let Ok(kit) = PromptKit::from_gguf_file(&path) {
            let _ = kit.encode("ab ba <|im_end|>", true);
        }
    });
}

#[test]
fn safetensors_headers_read_without_panicking() {
    use tidelock_worker::model::hf::HfFolder;
    use tidelock_worker::model::tiny::{TinySpec, write_tiny_llama};
    let dir = tempfile::tempdir().unwrap();
    let spec = TinySpec {
        layers: 1,
        ..TinySpec::issue7()
    };
    write_tiny_llama(dir.path(), &spec).unwrap();
    let weights = dir.path().join("model.safetensors");
    let seed = std::fs::read(&weights).unwrap();
    // Only the header's region is mutated; the tensor bytes after it stay as they are.
    let header = 8 + u64::from_le_bytes(seed[..8].try_into().unwrap()) as usize;
    let (head, data) = seed.split_at(header.min(seed.len()));
    let data = data.to_vec();
    let names = tidelock_worker::model::hf::weight_shapes(&spec.config().unwrap());
    fuzz("safetensors", &[head.to_vec()], |head| {
        let mut file = head.to_vec();
        file.extend_from_slice(&data);
        std::fs::write(&weights, &file).unwrap();
        if let Ok(mut model) = HfFolder::open(dir.path()) {
            for (name, shape) in &names {
                let _ = model.tensor(name, shape);
            }
        }
    });
}

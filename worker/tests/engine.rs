//! The engine on the real default model: prefix reuse is lossless, batching and chunking do not
//! change results, preemption recovers, and bad or excess requests get clear answers.

mod support;

use std::sync::{Arc, OnceLock};

use support::{model_path, tokens};
use tidelock_worker::testing::greedy;

use tidelock_protocol::{
    BlockTokens, Epoch, ErrorCode, FinishReason, GenerateEvent, GenerateRequest, ModelName, Usage,
};
use tidelock_worker::engine::executor::ModelExecutor;
use tidelock_worker::engine::{Engine, EngineConfig};
use tidelock_worker::kv::KvStore;
use tidelock_worker::kv::pool::BlockPool;
use tidelock_worker::model::Llama;
use tidelock_worker::model::llama::WeightFormat;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

const BLOCK: usize = 16;

fn model() -> Arc<Llama> {
    static MODEL: OnceLock<Arc<Llama>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            Arc::new(Llama::from_gguf(&model_path(), WeightFormat::Packed).expect("load the model"))
        })
        .clone()
}

fn engine(blocks: usize, max_step_tokens: usize, max_waiting: usize) -> Engine<ModelExecutor> {
    let model = model();
    let cfg = EngineConfig {
        model: ModelName::new("smollm2").unwrap(),
        block_tokens: BlockTokens::new(BLOCK as u32).unwrap(),
        max_step_tokens,
        max_running: 16,
        max_waiting,
        max_context: 8192,
        vocab_size: model.config().vocab_size,
        eos_token_ids: vec![2],
    };
    let kv = KvStore::new(model.kv_shape(BLOCK), blocks);
    let pool = BlockPool::new(blocks, cfg.block_tokens, Epoch::new(1));
    Engine::new(cfg, pool, ModelExecutor { model, kv })
}

#[derive(Debug, PartialEq)]
struct Outcome {
    tokens: Vec<u32>,
    reason: FinishReason,
    usage: Usage,
}

fn collect(rx: &mut UnboundedReceiver<GenerateEvent>) -> Result<Outcome, (ErrorCode, String)> {
    let mut tokens = Vec::new();
    while let Ok(event) = rx.try_recv() {
        match event {
            GenerateEvent::Tokens { ids, .. } => tokens.extend(ids),
            GenerateEvent::Finished { reason, usage } => {
                return Ok(Outcome {
                    tokens,
                    reason,
                    usage,
                });
            }
            GenerateEvent::Error { code, message } => return Err((code, message)),
            GenerateEvent::Prefilled { .. } => {}
            GenerateEvent::Ended { .. } => panic!("`Ended` for a request of one answer"),
            GenerateEvent::Unknown => panic!("unknown event"),
        }
    }
    panic!("no Finished event");
}

/// Runs requests to completion together; returns each outcome and the preemption count.
fn run_all(e: &mut Engine<ModelExecutor>, requests: Vec<GenerateRequest>) -> (Vec<Outcome>, usize) {
    let mut receivers = Vec::new();
    for r in requests {
        let (tx, rx) = unbounded_channel();
        e.submit(r, tx);
        receivers.push(rx);
    }
    let mut preempted = 0;
    let mut steps = 0;
    while !e.is_idle() {
        preempted += e.step().expect("step").preempted;
        steps += 1;
        assert!(steps < 10_000, "engine does not finish");
    }
    let outcomes = receivers
        .iter_mut()
        .map(|rx| collect(rx).expect("finished"))
        .collect();
    (outcomes, preempted)
}

#[test]
fn a_cached_prefix_is_reused_losslessly() {
    let mut e = engine(64, 512, 16);
    let prompt = tokens(200, 1);
    let (first, _) = run_all(&mut e, vec![greedy(prompt.clone(), 64)]);
    let first = &first[0];
    assert_eq!(first.usage.cached_tokens, 0);
    assert_eq!(first.tokens.len(), 64);
    assert_eq!(first.reason, FinishReason::Length);

    let (again, _) = run_all(&mut e, vec![greedy(prompt.clone(), 64)]);
    assert_eq!(
        again[0].usage.cached_tokens as usize,
        (200 - 1) / BLOCK * BLOCK
    );
    assert_eq!(
        again[0].tokens, first.tokens,
        "greedy output with a cached prefix"
    );

    // The next turn: prompt + answer + a new message. Everything computed before is reused,
    // the answer included.
    let mut turn2 = prompt.clone();
    turn2.extend(&first.tokens);
    let computed_before = turn2.len() - 1;
    turn2.extend(tokens(30, 2));
    let (second, _) = run_all(&mut e, vec![greedy(turn2, 8)]);
    assert_eq!(
        second[0].usage.cached_tokens as usize,
        computed_before / BLOCK * BLOCK
    );
}

#[test]
fn batching_and_chunked_prefill_do_not_change_results() {
    let requests: Vec<GenerateRequest> = (0..5)
        .map(|i| greedy(tokens(40 + 37 * i, 10 + i as u64), 12))
        .collect();
    let solo: Vec<Outcome> = requests
        .iter()
        .map(|r| {
            run_all(&mut engine(64, 512, 16), vec![r.clone()])
                .0
                .remove(0)
        })
        .collect();
    // All at once, with a step budget small enough to chunk every prefill.
    let (together, _) = run_all(&mut engine(64, 48, 16), requests);
    assert_eq!(together, solo);
}

#[test]
fn preemption_recovers_with_the_same_results() {
    let requests: Vec<GenerateRequest> = (0..3).map(|i| greedy(tokens(60, 20 + i), 40)).collect();
    let solo: Vec<Vec<u32>> = requests
        .iter()
        .map(|r| {
            run_all(&mut engine(64, 512, 16), vec![r.clone()])
                .0
                .remove(0)
                .tokens
        })
        .collect();
    // 12 blocks of 16 = 192 tokens: not enough for three sequences of 100 tokens at once.
    let (squeezed, preempted) = run_all(&mut engine(12, 512, 16), requests);
    assert!(preempted > 0, "the pool was too small to avoid preemption");
    let squeezed: Vec<Vec<u32>> = squeezed.into_iter().map(|o| o.tokens).collect();
    assert_eq!(squeezed, solo);
}

#[test]
fn cancelled_requests_free_their_blocks() {
    let mut e = engine(32, 512, 16);
    let (tx, rx) = unbounded_channel();
    e.submit(greedy(tokens(100, 5), 50), tx);
    e.step().unwrap();
    assert!(e.pool().stats().in_use > 0);
    drop(rx);
    e.step().unwrap();
    assert!(e.is_idle());
    assert_eq!(e.pool().stats().in_use, 0);
}

#[test]
fn bad_and_excess_requests_are_rejected_clearly() {
    let mut e = engine(8, 512, 1);
    let submit = |e: &mut Engine<ModelExecutor>, r| {
        let (tx, mut rx) = unbounded_channel();
        e.submit(r, tx);
        collect_error(&mut rx)
    };
    // 8 blocks of 16 tokens: a 200-token prompt can never fit.
    let (code, message) = submit(&mut e, greedy(tokens(200, 1), 4)).expect("rejected");
    assert_eq!(code, ErrorCode::ContextTooLong);
    assert!(message.contains("200 tokens"), "{message}");
    let (code, _) = submit(&mut e, greedy(vec![60_000], 4)).expect("rejected");
    assert_eq!(code, ErrorCode::InvalidRequest);
    let mut hot = greedy(vec![20], 4);
    hot.sampling.temperature = 9.0;
    assert_eq!(
        submit(&mut e, hot).expect("rejected").0,
        ErrorCode::InvalidRequest
    );
    // The queue holds one; the second waits in vain.
    assert!(submit(&mut e, greedy(tokens(10, 2), 4)).is_none());
    let (code, _) = submit(&mut e, greedy(tokens(10, 3), 4)).expect("rejected");
    assert_eq!(code, ErrorCode::Overloaded);
}

fn collect_error(rx: &mut UnboundedReceiver<GenerateEvent>) -> Option<(ErrorCode, String)> {
    match rx.try_recv() {
        Ok(GenerateEvent::Error { code, message }) => Some((code, message)),
        _ => None,
    }
}

/// A request sampled at temperature 0.8 with `seed`.
fn seeded(prompt: Vec<u32>, max_tokens: u32, seed: u64) -> GenerateRequest {
    let mut r = greedy(prompt, max_tokens);
    r.sampling.temperature = 0.8;
    r.sampling.seed = Some(seed);
    r
}

/// Runs one request alone; returns its events and the prompt tokens computed by the steps.
fn run_events(e: &mut Engine<ModelExecutor>, r: GenerateRequest) -> (Vec<GenerateEvent>, usize) {
    let (tx, mut rx) = unbounded_channel();
    e.submit(r, tx);
    let mut prefilled = 0;
    while !e.is_idle() {
        prefilled += e.step().expect("step").prefill_tokens;
    }
    (
        std::iter::from_fn(|| rx.try_recv().ok()).collect(),
        prefilled,
    )
}

/// The same seed gives the same answer; `n` answers differ from each other and come back the
/// same when the request is run again, their events name them, the prompt's accounting goes
/// out once and `Finished` comes last with the sum of their tokens; the prompt is computed once
/// (the others recompute only its last, partial block). (Answer `i` draws from `seed + i`, as
/// the sampler's own test shows; its tokens are not compared with a request of one answer
/// run alone, because a batch's numerics depend on what shares it, as in vLLM.)
#[test]
fn several_answers_share_the_prompt_and_follow_their_seeds() {
    let prompt = tokens(100, 5); // 6 full blocks of 16, 4 tokens in the seventh
    let single = || {
        let mut e = engine(64, 512, 16);
        run_all(&mut e, vec![seeded(prompt.clone(), 12, 40)])
            .0
            .remove(0)
            .tokens
    };
    assert_eq!(single(), single(), "same seed, same answer");

    let several = || {
        let mut e = engine(64, 512, 16);
        let mut request = seeded(prompt.clone(), 12, 40);
        request.sampling.n = 3;
        run_events(&mut e, request)
    };
    let (events, prefilled) = several();
    assert_eq!(
        prefilled,
        100 + 2 * 4,
        "the prompt computed once, 4 tokens twice more"
    );
    let mut answers = vec![Vec::<u32>::new(); 3];
    let mut ended = vec![0u32; 3];
    let mut prefills = 0;
    for (i, event) in events.iter().enumerate() {
        match event {
            GenerateEvent::Prefilled { prompt_tokens, .. } => {
                assert_eq!(*prompt_tokens, 100);
                prefills += 1;
            }
            GenerateEvent::Tokens { ids, choice, .. } => {
                answers[*choice as usize].extend(ids);
            }
            GenerateEvent::Ended {
                choice,
                reason,
                completion_tokens,
            } => {
                assert_eq!(*reason, FinishReason::Length);
                ended[*choice as usize] = *completion_tokens;
            }
            GenerateEvent::Finished { usage, .. } => {
                assert_eq!(i, events.len() - 1, "Finished comes last");
                assert_eq!(usage.prompt_tokens, 100);
                assert_eq!(usage.completion_tokens, 36);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(prefills, 1);
    assert_eq!(ended, [12, 12, 12]);
    assert!(
        answers[0] != answers[1] && answers[1] != answers[2] && answers[0] != answers[2],
        "{answers:?}"
    );
    assert_eq!(
        several().0,
        events,
        "the same request again, the same answers"
    );
}

/// A bias of -100 bans a token and +100 forces one; penalties make repetition rarer; ids in
/// `stop_token_ids` end the answer without being returned; log-probabilities stay the model's.
#[test]
fn penalties_biases_and_stop_ids_change_the_answer() {
    let prompt = tokens(60, 7);
    let plain = {
        let mut e = engine(64, 512, 16);
        run_all(&mut e, vec![greedy(prompt.clone(), 48)])
            .0
            .remove(0)
            .tokens
    };
    let run = |change: &dyn Fn(&mut GenerateRequest)| {
        let mut r = greedy(prompt.clone(), 48);
        change(&mut r);
        let mut e = engine(64, 512, 16);
        run_all(&mut e, vec![r]).0.remove(0)
    };

    let banned = plain[0];
    let out = run(&|r| {
        r.sampling.logit_bias.insert(banned, -100.0);
    });
    assert!(
        !out.tokens.contains(&banned),
        "{banned} in {:?}",
        out.tokens
    );
    let out = run(&|r| {
        r.sampling.logit_bias.insert(1234, 100.0);
    });
    assert!(out.tokens.iter().all(|&t| t == 1234), "{:?}", out.tokens);

    // Greedy decoding of a small model repeats itself; a frequency penalty spreads it out.
    let most = |tokens: &[u32]| {
        let mut counts = std::collections::HashMap::new();
        for &t in tokens {
            *counts.entry(t).or_insert(0) += 1;
        }
        counts.into_values().max().unwrap_or(0)
    };
    let penalised = run(&|r| r.sampling.frequency_penalty = 2.0).tokens;
    assert!(
        most(&penalised) < most(&plain),
        "{} vs {}: {penalised:?} / {plain:?}",
        most(&penalised),
        most(&plain)
    );
    let present = run(&|r| r.sampling.presence_penalty = 2.0).tokens;
    assert_ne!(present, plain);

    // The first token whose id did not come before it: stopping on it cuts the answer there.
    let k = (1..plain.len())
        .find(|&k| !plain[..k].contains(&plain[k]))
        .expect("a new token");
    let out = run(&|r| r.sampling.stop_token_ids = vec![plain[k]]);
    assert_eq!(out.tokens, plain[..k]);
    assert_eq!(out.reason, FinishReason::Stop);

    // min_p at 1 keeps only the most likely token: a draw at any temperature is greedy.
    let out = run(&|r| {
        r.sampling.temperature = 1.5;
        r.sampling.seed = Some(3);
        r.sampling.min_p = 1.0;
    });
    assert_eq!(out.tokens, plain);
}

//! The two backends agree (issue #20), on the real default model (SmolLM2-135M, Q4_1 GGUF):
//! `candle` (every matrix dequantized to f32, KV pages as tensors, logits reduced where they
//! were computed) on the host device against `cpu` (packed Q4_1 weights, host pages, the SIMD
//! kernels). The same `candle` code runs on `cuda:N`; `bench/gpu/check.sh` runs these checks
//! there against the host.
//!
//! - At a 2,048-token context (a 1,984-token prompt in chunks, then 64 greedy steps): the same
//!   64 tokens, and every step's logits within 1e-3.
//! - Through the engine: the same greedy tokens, top log-probabilities within 1e-3, the same
//!   seeded top-k and top-p draws (candidates and the row's mass reduced on the candle side, the
//!   row on the cpu side), and the prefix cache serving the second turn on both.

mod support;

use std::sync::{Arc, OnceLock};

use candle_core::DType;
use support::{model_path, tokens};
use tidelock_protocol::{
    BlockTokens, Epoch, GenerateEvent, GenerateRequest, ModelName, TopLogprob,
};
use tidelock_worker::engine::executor::{Executor, ModelExecutor};
use tidelock_worker::engine::{Engine, EngineConfig};
use tidelock_worker::kv::KvStore;
use tidelock_worker::kv::backend::PagedKv;
use tidelock_worker::kv::device::DeviceKv;
use tidelock_worker::kv::pool::BlockPool;
use tidelock_worker::model::Llama;
use tidelock_worker::model::llama::WeightFormat;
use tidelock_worker::testing::{greedy, greedy_run, max_abs_diff};
use tokio::sync::mpsc::unbounded_channel;

const BLOCK: usize = 64;

fn cpu_model() -> &'static Arc<Llama> {
    static MODEL: OnceLock<Arc<Llama>> = OnceLock::new();
    MODEL.get_or_init(|| {
        Arc::new(Llama::from_gguf(&model_path(), WeightFormat::Packed).expect("the default model"))
    })
}

fn candle_model() -> &'static Arc<Llama> {
    static MODEL: OnceLock<Arc<Llama>> = OnceLock::new();
    MODEL.get_or_init(|| {
        let place = tidelock_worker::testing::test_placement();
        Arc::new(
            Llama::from_gguf_on(&model_path(), WeightFormat::F32, &place)
                .expect("the default model"),
        )
    })
}

#[test]
fn candle_matches_cpu_at_a_2048_token_context() {
    let (cpu, candle) = (cpu_model(), candle_model());
    let prompt = tokens(2048 - 64, 20);
    let blocks = 2048 / BLOCK;
    let mut host = KvStore::new(cpu.kv_shape(BLOCK), blocks);
    let mut device =
        DeviceKv::new(candle.kv_shape(BLOCK), blocks, DType::F32, candle.device()).unwrap();
    let (want, want_tokens) = greedy_run(cpu, &mut host, &prompt, 64, BLOCK).unwrap();
    let (got, got_tokens) = greedy_run(candle, &mut device, &prompt, 64, BLOCK).unwrap();
    let diff = max_abs_diff(&want, &got);
    let distinct: std::collections::BTreeSet<_> = want_tokens.iter().collect();
    eprintln!(
        "2,048-token context, 64 greedy steps: candle vs cpu max |logit diff| {diff:.2e}, tokens identical: {} ({} distinct)",
        want_tokens == got_tokens,
        distinct.len()
    );
    assert_eq!(want_tokens, got_tokens, "greedy output differs");
    assert!(diff <= 1e-3, "logits differ by {diff}");
    assert!(distinct.len() > 4, "a degenerate run: {distinct:?}");
}

fn engine<K: PagedKv + Send>(m: &Arc<Llama>, kv: K, blocks: usize) -> Engine<ModelExecutor<K>> {
    let cfg = EngineConfig {
        model: ModelName::new("smollm2").unwrap(),
        block_tokens: BlockTokens::new(BLOCK as u32).unwrap(),
        max_step_tokens: 512,
        max_running: 8,
        max_waiting: 8,
        max_context: 4096,
        vocab_size: m.config().vocab_size,
        eos_token_ids: vec![],
    };
    let pool = BlockPool::new(blocks, cfg.block_tokens, Epoch::new(1));
    Engine::new(
        cfg,
        pool,
        ModelExecutor {
            model: m.clone(),
            kv,
        },
    )
}

/// What one request produced: tokens, each token's top log-probabilities, cached prompt tokens.
type Output = (Vec<u32>, Vec<Vec<TopLogprob>>, u32);

/// Runs the requests together to their ends, as the worker's engine thread does.
fn generate<E: Executor>(e: &mut Engine<E>, requests: Vec<GenerateRequest>) -> Vec<Output> {
    generate_counting(e, requests).0
}

/// [`generate`], and how many times a sequence was preempted.
fn generate_counting<E: Executor>(
    e: &mut Engine<E>,
    requests: Vec<GenerateRequest>,
) -> (Vec<Output>, usize) {
    let receivers: Vec<_> = requests
        .into_iter()
        .map(|r| {
            let (tx, rx) = unbounded_channel();
            e.submit(r, tx);
            rx
        })
        .collect();
    let mut steps = 0;
    let mut preempted = 0;
    while !e.is_idle() {
        preempted += e.step().unwrap().preempted;
        steps += 1;
        assert!(steps < 10_000, "the engine does not finish");
    }
    let outputs = receivers
        .into_iter()
        .map(|mut rx| {
            let mut out = (Vec::new(), Vec::new(), 0);
            while let Ok(event) = rx.try_recv() {
                match event {
                    GenerateEvent::Tokens {
                        ids, top_logprobs, ..
                    } => {
                        out.0.extend(ids);
                        out.1.extend(top_logprobs.unwrap_or_default());
                    }
                    GenerateEvent::Finished { usage, .. } => out.2 = usage.cached_tokens,
                    GenerateEvent::Error { message, .. } => panic!("{message}"),
                    _ => {}
                }
            }
            out
        })
        .collect();
    (outputs, preempted)
}

#[test]
fn the_engine_gives_the_same_answers_on_both_backends() {
    let (cpu, candle) = (cpu_model(), candle_model());
    let blocks = 64;
    let mut on_cpu = engine(cpu, KvStore::new(cpu.kv_shape(BLOCK), blocks), blocks);
    let device = DeviceKv::new(candle.kv_shape(BLOCK), blocks, DType::F32, candle.device());
    let mut on_candle = engine(candle, device.unwrap(), blocks);

    let prompt = tokens(300, 21);
    let requests = || {
        let mut with_logprobs = greedy(prompt.clone(), 24);
        with_logprobs.sampling.logprobs = Some(5);
        let mut sampled = greedy(tokens(200, 22), 24);
        sampled.sampling.temperature = 0.8;
        sampled.sampling.top_k = Some(40);
        sampled.sampling.seed = Some(7);
        let mut nucleus = greedy(tokens(150, 27), 24);
        nucleus.sampling.temperature = 0.9;
        nucleus.sampling.top_p = 0.95;
        nucleus.sampling.seed = Some(3);
        vec![with_logprobs, sampled, nucleus]
    };
    let mut second_turn = prompt.clone();
    second_turn.extend(tokens(40, 23));
    for (what, want, got) in [
        (
            "batch",
            generate(&mut on_cpu, requests()),
            generate(&mut on_candle, requests()),
        ),
        (
            "second turn",
            generate(&mut on_cpu, vec![greedy(second_turn.clone(), 16)]),
            generate(&mut on_candle, vec![greedy(second_turn.clone(), 16)]),
        ),
    ] {
        for (i, (w, g)) in want.iter().zip(&got).enumerate() {
            assert_eq!(w.0, g.0, "{what}, request {i}: tokens differ");
            assert_eq!(w.2, g.2, "{what}, request {i}: cached tokens differ");
            assert_eq!(w.1.len(), g.1.len());
            for (a, b) in w.1.iter().zip(&g.1) {
                assert_eq!(
                    a.iter().map(|t| t.id).collect::<Vec<_>>(),
                    b.iter().map(|t| t.id).collect::<Vec<_>>()
                );
                for (x, y) in a.iter().zip(b) {
                    assert!((x.logprob - y.logprob).abs() <= 1e-3, "{x:?} vs {y:?}");
                }
            }
        }
        eprintln!(
            "{what}: {:?}",
            got.iter().map(|o| (o.0.len(), o.2)).collect::<Vec<_>>()
        );
    }
    // The second turn found the first turn's full blocks on both backends.
    let cached = generate(&mut on_candle, vec![greedy(second_turn, 1)])[0].2;
    assert!(cached >= 256, "{cached} cached tokens");
}

/// Half precision (what GPU workers run): f16 weights and an f16 KV cache on the test device
/// stay close to the f32 `cpu` backend. And on the candle backend a pool too small for two
/// requests at once preempts and recomputes without changing an answer.
#[test]
fn half_precision_stays_close_and_preemption_changes_nothing() {
    let cpu = cpu_model();
    let place = tidelock_worker::model::llama::Placement {
        device: candle_model().device().clone(),
        dtype: DType::F16,
    };
    let half = Arc::new(Llama::from_gguf_on(&model_path(), WeightFormat::F32, &place).unwrap());
    let prompt = tokens(256, 24);
    let mut host = KvStore::new(cpu.kv_shape(BLOCK), 8);
    let mut pages = DeviceKv::new(half.kv_shape(BLOCK), 8, DType::F16, half.device()).unwrap();
    let (want, want_tokens) = greedy_run(cpu, &mut host, &prompt, 16, BLOCK).unwrap();
    let (got, got_tokens) = greedy_run(&half, &mut pages, &prompt, 16, BLOCK).unwrap();
    let diff = max_abs_diff(&want[..1], &got[..1]);
    let same = want_tokens
        .iter()
        .zip(&got_tokens)
        .take_while(|(a, b)| a == b)
        .count();
    eprintln!(
        "f16 weights and KV vs cpu f32: max |logit diff| after the prompt {diff:.3}, {same}/16 greedy tokens identical"
    );
    // Logits here span about 30; f16 rounds every product's inputs (measured: 0.35, 16/16).
    assert!(diff < 1.0, "f16 logits differ by {diff}");
    assert!(same >= 8, "f16 greedy output departs at token {same}");

    // Two 190-token requests start in 3 blocks of 64 each and grow into a fourth; the pool
    // holds 6, so one is preempted and recomputed.
    let (a, b) = (tokens(190, 25), tokens(190, 26));
    let candle = candle_model();
    let run = |blocks: usize| {
        let kv = DeviceKv::new(candle.kv_shape(BLOCK), blocks, DType::F32, candle.device());
        let mut e = engine(candle, kv.unwrap(), blocks);
        generate_counting(&mut e, vec![greedy(a.clone(), 24), greedy(b.clone(), 24)])
    };
    let ((ample, none), (tight, preempted)) = (run(16), run(6));
    assert_eq!((none, preempted > 0), (0, true), "{none} {preempted}");
    for (x, y) in ample.iter().zip(&tight) {
        assert_eq!(x.0, y.0, "preemption changed an answer");
    }
}

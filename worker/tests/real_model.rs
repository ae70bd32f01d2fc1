//! The runtime on the real default model (SmolLM2-135M-Instruct, Q4_1 GGUF): its configuration is
//! read right, and computing with cached KV gives the same logits as computing cold, whichever way
//! the work is cut into chunks, batched or not.

mod support;

use std::sync::OnceLock;
use tidelock_worker::testing::max_abs_diff;

use candle_core::{DType, Tensor};
use support::{model_path, tokens};
use tidelock_protocol::BlockId;
use tidelock_worker::kv::KvStore;
use tidelock_worker::kv::backend::PagedKv;
use tidelock_worker::kv::device::DeviceKv;
use tidelock_worker::model::llama::{Logits, WeightFormat};
use tidelock_worker::model::{Llama, RopeStyle, SeqChunk};

const BLOCK: usize = 16;

fn model() -> &'static Llama {
    static MODEL: OnceLock<Llama> = OnceLock::new();
    MODEL.get_or_init(|| {
        Llama::from_gguf(&model_path(), WeightFormat::Packed).expect("load the default model")
    })
}

/// The default model for the `candle` backend: every matrix dequantized to f32, on the host
/// device.
fn candle_model() -> &'static Llama {
    static MODEL: OnceLock<Llama> = OnceLock::new();
    MODEL.get_or_init(|| {
        Llama::from_gguf_on(
            &model_path(),
            WeightFormat::F32,
            &tidelock_worker::testing::test_placement(),
        )
        .expect("load the default model")
    })
}

fn table(first: u32, blocks: usize) -> Vec<BlockId> {
    (first..first + blocks as u32).map(BlockId::new).collect()
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().unwrap()
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i)
        .unwrap()
}

#[test]
fn config_is_read_from_gguf_metadata() {
    let cfg = model().config();
    assert_eq!(cfg.vocab_size, 49152);
    assert_eq!(cfg.hidden_size, 576);
    assert_eq!(cfg.intermediate_size, 1536);
    assert_eq!(cfg.num_hidden_layers, 30);
    assert_eq!((cfg.num_attention_heads, cfg.num_kv_heads()), (9, 3));
    assert_eq!(cfg.head_dim(), 64);
    assert_eq!(cfg.rope_theta, 100_000.0);
    assert!(cfg.tie_word_embeddings);
    assert!(!cfg.attention_bias);
    assert_eq!(cfg.rope_style, RopeStyle::Interleaved);
}

#[test]
fn cached_prefix_gives_the_cold_logits() {
    lossless_reuse(model(), &|blocks| {
        Box::new(KvStore::new(model().kv_shape(BLOCK), blocks))
    });
}

/// The `candle` backend (dense weights, KV pages as tensors; on the host device here): the same
/// property, within the same bound (issue #20).
#[test]
fn cached_prefix_gives_the_cold_logits_on_the_candle_backend() {
    let m = candle_model();
    lossless_reuse(m, &|blocks| {
        Box::new(DeviceKv::new(m.kv_shape(BLOCK), blocks, DType::F32, m.device()).unwrap())
    });
}

/// Computing with cached KV gives the cold logits: a prefix computed earlier then the suffix,
/// and decoding token by token.
fn lossless_reuse(m: &Llama, new_kv: &dyn Fn(usize) -> Box<dyn PagedKv>) {
    let n = 150;
    let prompt = tokens(n, 1);
    let blocks = n.div_ceil(BLOCK);

    let mut cold_kv = new_kv(blocks);
    let t = table(0, blocks);
    let cold = m
        .forward(
            cold_kv.as_mut(),
            &[SeqChunk {
                tokens: &prompt,
                start: 0,
                table: &t,
                logits: Logits::All,
            }],
        )
        .unwrap();
    let cold = rows(cold[0].as_ref().unwrap());
    assert_eq!(cold.len(), n);

    // Warm: a 96-token prefix (6 full blocks) computed earlier, then only the suffix.
    let mut warm_kv = new_kv(blocks);
    let split = 96;
    m.forward(
        warm_kv.as_mut(),
        &[SeqChunk {
            tokens: &prompt[..split],
            start: 0,
            table: &t,
            logits: Logits::None,
        }],
    )
    .unwrap();
    let warm = m
        .forward(
            warm_kv.as_mut(),
            &[SeqChunk {
                tokens: &prompt[split..],
                start: split,
                table: &t,
                logits: Logits::All,
            }],
        )
        .unwrap();
    let warm = rows(warm[0].as_ref().unwrap());
    let diff = max_abs_diff(&warm, &cold[split..]);
    assert!(diff <= 1e-4, "max |warm - cold| = {diff}");

    // Decoding token by token from the cache agrees too.
    let mut step_kv = new_kv(blocks);
    let decode_from = n - 8;
    m.forward(
        step_kv.as_mut(),
        &[SeqChunk {
            tokens: &prompt[..decode_from],
            start: 0,
            table: &t,
            logits: Logits::None,
        }],
    )
    .unwrap();
    for p in decode_from..n {
        let out = m
            .forward(
                step_kv.as_mut(),
                &[SeqChunk {
                    tokens: &prompt[p..=p],
                    start: p,
                    table: &t,
                    logits: Logits::Last,
                }],
            )
            .unwrap();
        let step = rows(out[0].as_ref().unwrap());
        let diff = max_abs_diff(&step, &cold[p..=p]);
        assert!(diff <= 1e-4, "position {p}: max |step - cold| = {diff}");
        assert_eq!(argmax(&step[0]), argmax(&cold[p]));
    }
}

#[test]
fn a_batch_computes_what_each_sequence_computes_alone() {
    let m = model();
    let a = tokens(40, 2);
    let b = tokens(23, 3);
    let (ta, tb) = (table(0, 3), table(3, 2));
    let mut alone_kv = KvStore::new(m.kv_shape(BLOCK), 5);
    let alone_a = m
        .forward(
            &mut alone_kv,
            &[SeqChunk {
                tokens: &a,
                start: 0,
                table: &ta,
                logits: Logits::All,
            }],
        )
        .unwrap();
    let alone_b = m
        .forward(
            &mut alone_kv,
            &[SeqChunk {
                tokens: &b,
                start: 0,
                table: &tb,
                logits: Logits::Last,
            }],
        )
        .unwrap();
    let mut batch_kv = KvStore::new(m.kv_shape(BLOCK), 5);
    let batch = m
        .forward(
            &mut batch_kv,
            &[
                SeqChunk {
                    tokens: &a,
                    start: 0,
                    table: &ta,
                    logits: Logits::All,
                },
                SeqChunk {
                    tokens: &b,
                    start: 0,
                    table: &tb,
                    logits: Logits::Last,
                },
            ],
        )
        .unwrap();
    let d_a = max_abs_diff(
        &rows(batch[0].as_ref().unwrap()),
        &rows(alone_a[0].as_ref().unwrap()),
    );
    let d_b = max_abs_diff(
        &rows(batch[1].as_ref().unwrap()),
        &rows(alone_b[0].as_ref().unwrap()),
    );
    assert!(d_a <= 1e-4 && d_b <= 1e-4, "batched vs alone: {d_a} {d_b}");
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let m = model();
    let mut kv = KvStore::new(m.kv_shape(BLOCK), 2);
    let t = table(0, 1);
    let too_long = tokens(BLOCK + 1, 4);
    let err = m
        .forward(
            &mut kv,
            &[SeqChunk {
                tokens: &too_long,
                start: 0,
                table: &t,
                logits: Logits::Last,
            }],
        )
        .unwrap_err();
    assert!(err.to_string().contains("cannot hold"), "{err}");
    let err = m
        .forward(
            &mut kv,
            &[SeqChunk {
                tokens: &[60_000],
                start: 0,
                table: &t,
                logits: Logits::Last,
            }],
        )
        .unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    let outside = [BlockId::new(9)];
    let err = m
        .forward(
            &mut kv,
            &[SeqChunk {
                tokens: &[5],
                start: 0,
                table: &outside,
                logits: Logits::Last,
            }],
        )
        .unwrap_err();
    assert!(err.to_string().contains("outside the KV store"), "{err}");
}

#[test]
fn a_missing_or_corrupt_file_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.gguf");
    let err = Llama::from_gguf(&missing, WeightFormat::F32)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("nope.gguf") && err.contains("cannot open"),
        "{err}"
    );
    let corrupt = dir.path().join("corrupt.gguf");
    std::fs::write(&corrupt, b"GGUF\x03\x00\x00\x00garbage").unwrap();
    let err = Llama::from_gguf(&corrupt, WeightFormat::F32)
        .unwrap_err()
        .to_string();
    assert!(err.contains("corrupt.gguf"), "{err}");
    // A real GGUF cut short: the header parses, a tensor does not.
    let bytes = std::fs::read(model_path()).unwrap();
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let err = Llama::from_gguf(&truncated, WeightFormat::F32)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("truncated.gguf") && err.contains("tensor"),
        "{err}"
    );
}

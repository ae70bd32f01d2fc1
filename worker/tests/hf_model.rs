//! Hugging Face folders, end to end on tiny seeded models written to a temporary directory (no
//! download): one file, shards and half-precision folders load to the same model; the forward pass
//! agrees with a plain reference written here from the checkpoint's own tensors (which pins the
//! weight names, the halves rope layout, GQA and the norms independently of the loader); the
//! folder's tokenizer and chat template work; and every broken file is named in its error.

use std::collections::HashMap;
use std::path::Path;
use tidelock_worker::testing::max_abs_diff;

use candle_core::{Device, Tensor};
use tempfile::TempDir;
use tidelock_prompt::{ChatMessage, PromptKit};
use tidelock_protocol::BlockId;
use tidelock_worker::kv::KvStore;
use tidelock_worker::model::hf::{self, tokenizer_files};
use tidelock_worker::model::llama::{Logits, WeightFormat};
use tidelock_worker::model::tiny::{TinyDtype, TinyFamily, TinySpec, write_tiny_llama};
use tidelock_worker::model::{Llama, RopeStyle, SeqChunk};

const BLOCK: usize = 16;

fn folder(spec: &TinySpec) -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_llama(dir.path(), spec).unwrap();
    dir
}

fn load(dir: &Path) -> Llama {
    Llama::from_hf(dir, WeightFormat::F32).unwrap()
}

fn tokens(n: usize, seed: u64) -> Vec<u32> {
    tidelock_worker::testing::ids_below(n, seed, 512)
}

/// Every position's logits, computed cold in one chunk.
fn logits(m: &Llama, tokens: &[u32]) -> Vec<Vec<f32>> {
    let blocks = tokens.len().div_ceil(BLOCK);
    let mut kv = KvStore::new(m.kv_shape(BLOCK), blocks);
    let table: Vec<BlockId> = (0..blocks as u32).map(BlockId::new).collect();
    let out = m
        .forward(
            &mut kv,
            &[SeqChunk {
                tokens,
                start: 0,
                table: &table,
                logits: Logits::All,
            }],
        )
        .unwrap();
    out[0].as_ref().unwrap().to_vec2::<f32>().unwrap()
}

fn max_abs(a: &[Vec<f32>]) -> f32 {
    a.iter().flatten().fold(0.0, |m, v| m.max(v.abs()))
}

#[test]
fn one_file_shards_and_half_precision_load_to_the_same_model() {
    let spec = TinySpec::issue7();
    let input = tokens(40, 1);
    let single = logits(&load(folder(&spec).path()), &input);
    assert_eq!((single.len(), single[0].len()), (40, 512));
    assert!(max_abs(&single) > 0.1, "logits are not trivially small");

    for shards in [2, 5] {
        let sharded = logits(
            &load(
                folder(&TinySpec {
                    shards,
                    ..spec.clone()
                })
                .path(),
            ),
            &input,
        );
        assert_eq!(
            max_abs_diff(&single, &sharded),
            0.0,
            "{shards} shards hold the same numbers"
        );
    }
    for (dtype, tolerance) in [(TinyDtype::F16, 5e-3), (TinyDtype::Bf16, 4e-2)] {
        let dir = folder(&TinySpec {
            dtype,
            shards: 2,
            ..spec.clone()
        });
        let half = logits(&load(dir.path()), &input);
        let diff = max_abs_diff(&single, &half);
        // Not zero: the file really held rounded values. Small: the same values, rounded.
        assert!(
            diff > 0.0 && diff < tolerance,
            "{dtype:?}: max |diff| = {diff}"
        );
    }
}

/// The checkpoint's tensors as f32 vectors, read with candle's own safetensors loader.
fn raw_weights(dir: &Path) -> HashMap<String, Vec<f32>> {
    candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(name, t)| (name, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

/// `w` is `[out, in]`, row-major.
fn matvec(w: &[f32], x: &[f32]) -> Vec<f32> {
    w.chunks_exact(x.len())
        .map(|row| {
            row.iter()
                .zip(x)
                .map(|(a, b)| f64::from(a * b))
                .sum::<f64>() as f32
        })
        .collect()
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, g)| v * r * g).collect()
}

fn rope(head: &mut [f32], pos: usize, theta: f32, style: RopeStyle) {
    let d = head.len();
    for i in 0..d / 2 {
        let angle = pos as f64 * f64::from(theta).powf(-2.0 * i as f64 / d as f64);
        let (sin, cos) = (angle.sin() as f32, angle.cos() as f32);
        let (a, b) = match style {
            RopeStyle::Halves => (i, i + d / 2),
            RopeStyle::Interleaved => (2 * i, 2 * i + 1),
        };
        let (x0, x1) = (head[a], head[b]);
        head[a] = x0 * cos - x1 * sin;
        head[b] = x0 * sin + x1 * cos;
    }
}

/// A Llama forward pass over the whole input, written as plainly as possible: one token at a
/// time, a vector per row, no cache, no batching.
fn reference(dir: &Path, input: &[u32], style: RopeStyle) -> Vec<Vec<f32>> {
    let w = raw_weights(dir);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let get = |key: &str| cfg[key].as_u64().unwrap() as usize;
    let (hidden, layers, vocab) = (
        get("hidden_size"),
        get("num_hidden_layers"),
        get("vocab_size"),
    );
    let (heads, kv_heads, d) = (
        get("num_attention_heads"),
        get("num_key_value_heads"),
        get("head_dim"),
    );
    let eps = cfg["rms_norm_eps"].as_f64().unwrap() as f32;
    let theta = cfg["rope_theta"].as_f64().unwrap() as f32;
    let t = |name: String| &w[&name];

    let mut x: Vec<Vec<f32>> = input
        .iter()
        .map(|&id| t("model.embed_tokens.weight".into())[id as usize * hidden..][..hidden].to_vec())
        .collect();
    for l in 0..layers {
        let p = |n: &str| format!("model.layers.{l}.{n}");
        let mut keys: Vec<Vec<f32>> = Vec::new();
        let mut values: Vec<Vec<f32>> = Vec::new();
        for (pos, row) in x.iter_mut().enumerate() {
            let h = rms_norm(row, t(p("input_layernorm.weight")), eps);
            let mut q = matvec(t(p("self_attn.q_proj.weight")), &h);
            let mut k = matvec(t(p("self_attn.k_proj.weight")), &h);
            let mut v = matvec(t(p("self_attn.v_proj.weight")), &h);
            // Qwen2: biases on q, k and v; Qwen3: each q and k head normalised before rope.
            for (x, name) in [(&mut q, "q"), (&mut k, "k"), (&mut v, "v")] {
                if let Some(bias) = w.get(&p(&format!("self_attn.{name}_proj.bias"))) {
                    x.iter_mut().zip(bias).for_each(|(a, b)| *a += b);
                }
                if let Some(norm) = w.get(&p(&format!("self_attn.{name}_norm.weight"))) {
                    for head in x.chunks_exact_mut(d) {
                        let normed = rms_norm(head, norm, eps);
                        head.copy_from_slice(&normed);
                    }
                }
            }
            for head in q.chunks_exact_mut(d).chain(k.chunks_exact_mut(d)) {
                rope(head, pos, theta, style);
            }
            keys.push(k);
            values.push(v);
            let mut attn = vec![0.0f32; heads * d];
            for hq in 0..heads {
                let hk = hq / (heads / kv_heads);
                let qh = &q[hq * d..][..d];
                let scores: Vec<f32> = (0..=pos)
                    .map(|s| {
                        let kh = &keys[s][hk * d..][..d];
                        qh.iter().zip(kh).map(|(a, b)| a * b).sum::<f32>() / (d as f32).sqrt()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f32::MIN, f32::max);
                let exps: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f32 = exps.iter().sum();
                for (s, e) in exps.iter().enumerate() {
                    for (o, vv) in attn[hq * d..][..d]
                        .iter_mut()
                        .zip(&values[s][hk * d..][..d])
                    {
                        *o += e / total * vv;
                    }
                }
            }
            let o = matvec(t(p("self_attn.o_proj.weight")), &attn);
            row.iter_mut().zip(&o).for_each(|(a, b)| *a += b);

            let h = rms_norm(row, t(p("post_attention_layernorm.weight")), eps);
            let gate = matvec(t(p("mlp.gate_proj.weight")), &h);
            let up = matvec(t(p("mlp.up_proj.weight")), &h);
            let act: Vec<f32> = gate
                .iter()
                .zip(&up)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let down = matvec(t(p("mlp.down_proj.weight")), &act);
            row.iter_mut().zip(&down).for_each(|(a, b)| *a += b);
        }
    }
    let out: Vec<Vec<f32>> = x
        .iter()
        .map(|row| {
            let h = rms_norm(row, t("model.norm.weight".into()), eps);
            matvec(t("lm_head.weight".into()), &h)
        })
        .collect();
    assert!(out.iter().all(|row| row.len() == vocab));
    out
}

#[test]
fn forward_agrees_with_a_plain_reference() {
    let dir = folder(&TinySpec::issue7());
    let input = tokens(40, 2);
    let model = logits(&load(dir.path()), &input);
    let expected = reference(dir.path(), &input, RopeStyle::Halves);
    let diff = max_abs_diff(&model, &expected);
    assert!(diff <= 1e-4, "max |model - reference| = {diff}");

    // The comparison can tell rope layouts apart, so agreeing above means the loader used the
    // checkpoint's (halves) layout.
    let interleaved = reference(dir.path(), &input, RopeStyle::Interleaved);
    let wrong = max_abs_diff(&model, &interleaved);
    assert!(wrong > 1e-2, "interleaved rope differs by only {wrong}");
}

/// Qwen2.5's q/k/v biases and Qwen3's per-head q/k norms: the loaded model agrees with the
/// plain reference, which applies them from the checkpoint's own tensors (a loader that skipped
/// either would not).
#[test]
fn qwen_layers_agree_with_the_plain_reference() {
    for family in [TinyFamily::Qwen25, TinyFamily::Qwen3] {
        let dir = folder(&TinySpec {
            family,
            ..TinySpec::issue7()
        });
        let weights = raw_weights(dir.path());
        let norm = "model.layers.0.self_attn.k_norm.weight";
        let bias = "model.layers.0.self_attn.k_proj.bias";
        assert_eq!(
            (weights.contains_key(bias), weights.contains_key(norm)),
            (family == TinyFamily::Qwen25, family == TinyFamily::Qwen3),
            "{family:?}"
        );
        let input = tokens(40, 3);
        let model = logits(&load(dir.path()), &input);
        let expected = reference(dir.path(), &input, RopeStyle::Halves);
        let diff = max_abs_diff(&model, &expected);
        assert!(diff <= 1e-4, "{family:?}: max |model - reference| = {diff}");
    }
}

/// Each family's folder, read as `transformers` reads it: the template from where the family
/// saves it, rendered in its format; the end tokens of `generation_config.json` added to the
/// stop ids; the model loads with the family's rope scaling and generates.
#[test]
fn every_family_renders_its_template_and_ends_on_its_tokens() {
    let conversation = [
        ChatMessage::new("user", "hi"),
        ChatMessage::new("assistant", "Hello!"),
        ChatMessage::new("user", "bye"),
    ];
    let cases = [
        (
            TinyFamily::SmolLm,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\n",
            &["<|im_end|>"][..],
        ),
        (
            TinyFamily::Llama3,
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nbye<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
            &["<|end_of_text|>", "<|eot_id|>", "<|eom_id|>"][..],
        ),
        (
            TinyFamily::Qwen25,
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\n",
            &["<|im_end|>", "<|endoftext|>"][..],
        ),
        (
            TinyFamily::Qwen3,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
            &["<|im_end|>", "<|endoftext|>"][..],
        ),
        (
            TinyFamily::Mistral,
            "<s>[INST] hi [/INST]Hello!</s>[INST] bye [/INST]",
            &["</s>"][..],
        ),
    ];
    for (family, rendered, ends) in cases {
        let dir = folder(&TinySpec {
            family,
            ..TinySpec::issue7()
        });
        let kit = PromptKit::from_hf_folder(dir.path()).unwrap();
        let mut extra = serde_json::Map::new();
        extra.insert("enable_thinking".into(), false.into());
        let text = kit.render_chat(&conversation, true, &extra).unwrap();
        assert_eq!(text, rendered, "{family:?}");
        let mut stops: Vec<&str> = ends.to_vec();
        stops.sort_unstable();
        let mut got: Vec<String> = kit
            .stop_token_ids()
            .iter()
            .map(|&id| kit.decode(&[id], false).unwrap())
            .collect();
        got.sort_unstable();
        assert_eq!(got, stops, "{family:?}");
        // The rendered prompt encodes to the family's control ids, not to their text.
        let ids = kit.encode(&text, false).unwrap();
        // Each turn's opening marker is one control id (the default system turn included).
        let (turn, turns) = match family {
            TinyFamily::Llama3 => ("<|start_header_id|>", 4),
            TinyFamily::Mistral => ("[INST]", 2),
            TinyFamily::Qwen25 => ("<|im_start|>", 5),
            TinyFamily::SmolLm | TinyFamily::Qwen3 => ("<|im_start|>", 4),
        };
        let turn = kit.token_to_id(turn).unwrap();
        let opened = ids.iter().filter(|&&id| id == turn).count();
        assert_eq!(opened, turns, "{family:?}: {ids:?}");
        let model = load(dir.path());
        let out = logits(&model, &ids);
        assert!(out.iter().flatten().all(|v| v.is_finite()), "{family:?}");
    }
    // `transformers`' rule: a `chat_template.jinja` wins over the config's template.
    let dir = folder(&TinySpec::issue7());
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}",
    )
    .unwrap();
    let kit = PromptKit::from_hf_folder(dir.path()).unwrap();
    let text = kit
        .render_chat(&conversation[..1], false, &Default::default())
        .unwrap();
    assert_eq!(text, "[user] hi\n");
    // A generation config naming an id outside the vocabulary is refused, naming the file.
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": [2, 99999]}"#,
    )
    .unwrap();
    let err = PromptKit::from_hf_folder(dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("generation_config.json") && err.contains("99999"),
        "{err}"
    );
}

#[test]
fn prompt_kit_from_the_folder() {
    let dir = folder(&TinySpec::issue7());
    let (tokenizer, config) = tokenizer_files(dir.path()).unwrap();
    assert!(config.is_some());
    let kit = PromptKit::from_hf_files(&tokenizer, config.as_deref()).unwrap();
    assert_eq!(kit.vocab_size(), 512);
    assert_eq!(kit.eos().map(|t| t.text.as_str()), Some("<|im_end|>"));
    assert_eq!(kit.bos().map(|t| t.text.as_str()), Some("<|endoftext|>"));
    let im_end = kit.token_to_id("<|im_end|>").unwrap();
    assert_eq!(kit.stop_token_ids(), [im_end]);

    for text in ["Hello, world! in the cat", "é 世界 🦀\n\ttabs", ""] {
        let ids = kit.encode(text, false).unwrap();
        assert_eq!(kit.decode(&ids, false).unwrap(), text);
    }
    let messages = [
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "hi"),
    ];
    let text = kit
        .render_chat(&messages, true, &Default::default())
        .unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = kit
        .encode_chat(&messages, true, &Default::default())
        .unwrap();
    assert_eq!(ids[0], kit.token_to_id("<|im_start|>").unwrap());
    assert_eq!(ids.iter().filter(|&&id| id == im_end).count(), 2);

    // The ids are the model's: they run through it.
    let model = load(dir.path());
    assert_eq!(logits(&model, &ids).len(), ids.len());
}

/// The error of loading `dir`, as text.
fn load_error(dir: &Path) -> String {
    Llama::from_hf(dir, WeightFormat::F32)
        .expect_err("the folder is broken")
        .to_string()
}

fn assert_names(err: &str, parts: &[&str]) {
    for part in parts {
        assert!(err.contains(part), "`{part}` is not in: {err}");
    }
}

/// Rewrites one safetensors file with `edit` applied to its tensors.
fn rewrite(path: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let mut tensors = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, path).unwrap();
}

#[test]
fn every_broken_file_is_named() {
    let spec = TinySpec::issue7();
    let up = "model.layers.1.mlp.up_proj.weight";

    let dir = folder(&spec);
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    assert_names(&load_error(dir.path()), &["config.json", "cannot read"]);

    let dir = folder(&spec);
    let mut cfg = spec.config_json();
    cfg["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    assert_names(
        &load_error(dir.path()),
        &["config.json", "`GPT2LMHeadModel`"],
    );

    let dir = folder(&spec);
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    assert_names(
        &load_error(dir.path()),
        &["model.safetensors", "cannot open"],
    );

    let dir = folder(&spec);
    let weights = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    assert_names(&load_error(dir.path()), &["model.safetensors", "truncated"]);
    std::fs::write(&weights, b"\x0e\0\0\0\0\0\0\0{not a header}").unwrap();
    assert_names(
        &load_error(dir.path()),
        &["model.safetensors", "invalid safetensors header"],
    );
    std::fs::write(&weights, b"abc").unwrap();
    assert_names(&load_error(dir.path()), &["model.safetensors", "too short"]);

    // In a sharded folder the error names the shard that holds the tensor.
    let dir = folder(&TinySpec {
        shards: 2,
        ..spec.clone()
    });
    let shard = dir.path().join("model-00002-of-00002.safetensors");
    rewrite(&shard, |t| {
        assert!(t.contains_key(up), "the second shard holds {up}");
        t.insert(
            up.into(),
            Tensor::zeros((512, 255), candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
    });
    assert_names(
        &load_error(dir.path()),
        &[
            "model-00002-of-00002.safetensors",
            up,
            "shape [512, 255], expected [512, 256]",
        ],
    );
    rewrite(&shard, |t| {
        let x = t.remove(up).unwrap();
        t.insert(up.into(), x.to_dtype(candle_core::DType::F64).unwrap());
    });
    assert_names(
        &load_error(dir.path()),
        &[
            "model-00002-of-00002.safetensors",
            up,
            "F64 is not supported",
        ],
    );
    rewrite(&shard, |t| {
        t.remove(up);
    });
    let dir_name = dir.path().display().to_string();
    assert_names(&load_error(dir.path()), &[&dir_name, up, "missing"]);
    std::fs::remove_file(&shard).unwrap();
    assert_names(
        &load_error(dir.path()),
        &["model-00002-of-00002.safetensors", "cannot open"],
    );
    std::fs::write(dir.path().join("model.safetensors.index.json"), "{}").unwrap();
    assert_names(
        &load_error(dir.path()),
        &["model.safetensors.index.json", "weight_map"],
    );

    let dir = folder(&spec);
    std::fs::remove_file(dir.path().join(hf::TOKENIZER)).unwrap();
    let err = tokenizer_files(dir.path()).unwrap_err().to_string();
    assert_names(&err, &["tokenizer.json", "missing"]);
    let err = PromptKit::from_hf_files(&dir.path().join(hf::TOKENIZER), None)
        .unwrap_err()
        .to_string();
    assert_names(&err, &["tokenizer.json", "cannot read"]);

    let err = Llama::from_hf(dir.path(), WeightFormat::Quantized)
        .unwrap_err()
        .to_string();
    assert_names(
        &err,
        &[&dir.path().display().to_string(), "only read from GGUF"],
    );
}

//! The shape of a Llama-family decoder, read from GGUF metadata or a Hugging Face `config.json`.
//!
//! Field names follow `config.json` so the serde form is the Hugging Face one. Everything the
//! forward pass needs is validated here, once, so a bad file fails at start with a message naming
//! the field, never with a shape error in the middle of a request.

use serde::Deserialize;

use crate::model::ModelError;

/// How positions are rotated into queries and keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs `(x[2i], x[2i+1])` rotate together: llama.cpp's layout, which GGUF
    /// converters produce by permuting the q/k weights of Hugging Face checkpoints.
    Interleaved,
    /// Halves `(x[i], x[i + d/2])` rotate together: Hugging Face's `rotate_half` layout.
    Halves,
}

/// Rope frequency scaling, as Hugging Face `rope_scaling` describes it. The kind is read from
/// `rope_type`, or from `type` as configs written before `transformers` 4.45 name it (Llama 2
/// era `{"type": "linear", ...}`, `{"type": "dynamic", ...}`); `default` is no scaling.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Positions divided by `factor`.
    Linear { factor: f32 },
    /// Dynamic NTK: the rope base is raised so that `factor` times the trained context fits.
    /// `transformers` recomputes the base as a sequence grows; keys already in a KV cache would
    /// then have been rotated with another base, so (as vLLM does) the base is fixed for the
    /// longest context, `factor * max_position_embeddings`.
    Dynamic { factor: f32 },
    /// Llama 3.1: low frequencies scaled by `factor`, high ones kept, a smooth ramp between.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
    /// YaRN: per-frequency interpolation between scaled and unscaled, plus an attention factor.
    Yarn {
        factor: f32,
        original_max_position_embeddings: usize,
        beta_fast: f32,
        beta_slow: f32,
        attention_factor: Option<f32>,
    },
}

/// `rope_scaling` as written, either key naming the kind.
#[derive(Deserialize)]
struct RopeScalingJson {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    legacy_type: Option<String>,
    factor: Option<f32>,
    low_freq_factor: Option<f32>,
    high_freq_factor: Option<f32>,
    original_max_position_embeddings: Option<usize>,
    #[serde(default = "default_beta_fast")]
    beta_fast: f32,
    #[serde(default = "default_beta_slow")]
    beta_slow: f32,
    attention_factor: Option<f32>,
}

impl RopeScaling {
    /// `config.json`'s `rope_scaling`: `None` for `null` or `rope_type: "default"`. A kind this
    /// runtime does not compute, or a field it needs missing, is an error naming it.
    pub fn from_json(value: &serde_json::Value) -> Result<Option<Self>, String> {
        if value.is_null() {
            return Ok(None);
        }
        let json: RopeScalingJson =
            serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
        let kind = json
            .rope_type
            .or(json.legacy_type)
            .ok_or("names no `rope_type` (nor `type`)")?;
        let need = |field: &str, value: Option<f32>| {
            value.ok_or_else(|| format!("`{kind}` scaling needs `{field}`"))
        };
        let factor = || need("factor", json.factor);
        let original = || {
            json.original_max_position_embeddings
                .ok_or_else(|| format!("`{kind}` scaling needs `original_max_position_embeddings`"))
        };
        Ok(Some(match kind.as_str() {
            "default" => return Ok(None),
            "linear" => RopeScaling::Linear { factor: factor()? },
            "dynamic" => RopeScaling::Dynamic { factor: factor()? },
            "llama3" => RopeScaling::Llama3 {
                factor: factor()?,
                low_freq_factor: need("low_freq_factor", json.low_freq_factor)?,
                high_freq_factor: need("high_freq_factor", json.high_freq_factor)?,
                original_max_position_embeddings: original()?,
            },
            "yarn" => RopeScaling::Yarn {
                factor: factor()?,
                original_max_position_embeddings: original()?,
                beta_fast: json.beta_fast,
                beta_slow: json.beta_slow,
                attention_factor: json.attention_factor,
            },
            other => {
                return Err(format!(
                    "`{other}` scaling is not supported (supported: default, linear, dynamic, llama3, yarn)"
                ));
            }
        }))
    }
}

fn rope_scaling<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<RopeScaling>, D::Error> {
    let value = serde_json::Value::deserialize(d)?;
    RopeScaling::from_json(&value)
        .map_err(|e| serde::de::Error::custom(format!("rope_scaling: {e}")))
}

fn default_beta_fast() -> f32 {
    32.0
}
fn default_beta_slow() -> f32 {
    1.0
}

/// A Llama-family decoder's hyper-parameters.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f32,
    #[serde(default, deserialize_with = "rope_scaling")]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Qwen2-style bias on the q, k and v projections.
    #[serde(default)]
    pub attention_bias: bool,
    /// Qwen3-style RMS norm of each q and k head (weights `[head_dim]`) before rope; set by the
    /// loader from the architecture.
    #[serde(skip)]
    pub qk_norm: bool,
    #[serde(skip, default = "default_rope_style")]
    pub rope_style: RopeStyle,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_theta() -> f32 {
    10_000.0
}
fn default_max_pos() -> usize {
    4096
}
fn default_rope_style() -> RopeStyle {
    RopeStyle::Halves
}

impl LlamaConfig {
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// The longest context the model serves: `max_position_embeddings`, or `factor` times it
    /// with dynamic scaling (whose base is set for that length; see [`RopeScaling::Dynamic`]).
    pub fn context_length(&self) -> usize {
        match self.rope_scaling {
            Some(RopeScaling::Dynamic { factor }) if factor > 1.0 => {
                (self.max_position_embeddings as f64 * f64::from(factor)) as usize
            }
            _ => self.max_position_embeddings,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Checks the relations the forward pass relies on.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |field: &'static str, problem: String| ModelError::Config { field, problem };
        for (field, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_kv_heads()),
            ("head_dim", self.head_dim()),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value == 0 {
                return Err(bad(field, "must be positive".into()));
            }
        }
        if !self.num_attention_heads.is_multiple_of(self.num_kv_heads()) {
            return Err(bad(
                "num_key_value_heads",
                format!(
                    "{} attention heads are not a multiple of {} key/value heads",
                    self.num_attention_heads,
                    self.num_kv_heads()
                ),
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(bad(
                "head_dim",
                format!("{} is odd; rope needs pairs", self.head_dim()),
            ));
        }
        if self.rope_theta.is_nan() || self.rope_theta <= 0.0 {
            return Err(bad(
                "rope_theta",
                format!("{} is not positive", self.rope_theta),
            ));
        }
        Ok(())
    }
}

/// Inverse frequencies of the rope rotation pairs, with scaling applied, and the attention
/// magnitude factor (1 except for YaRN).
pub fn rope_frequencies(cfg: &LlamaConfig) -> (Vec<f32>, f32) {
    let dim = cfg.head_dim();
    let base: Vec<f32> = (0..dim / 2)
        .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f32 / dim as f32))
        .collect();
    match &cfg.rope_scaling {
        None => (base, 1.0),
        Some(RopeScaling::Linear { factor }) => (base.iter().map(|f| f / factor).collect(), 1.0),
        Some(RopeScaling::Dynamic { factor }) => {
            // NTK-aware: base' = base * (factor * len / max - (factor - 1))^(d / (d - 2)), at the
            // longest context (len = factor * max): base * (factor^2 - factor + 1)^(d / (d - 2)).
            let d = dim as f32;
            let theta = cfg.rope_theta * (factor * factor - factor + 1.0).powf(d / (d - 2.0));
            let freqs = (0..dim / 2)
                .map(|i| 1.0 / theta.powf(2.0 * i as f32 / d))
                .collect();
            (freqs, 1.0)
        }
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            let old = *original_max_position_embeddings as f32;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            let freqs = base
                .iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect();
            (freqs, 1.0)
        }
        Some(RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            beta_fast,
            beta_slow,
            attention_factor,
        }) => {
            let old = *original_max_position_embeddings as f32;
            // The rotation index whose wavelength fits `rotations` times into the old context.
            let correction = |rotations: f32| {
                (dim as f32 * (old / (rotations * 2.0 * std::f32::consts::PI)).ln())
                    / (2.0 * cfg.rope_theta.ln())
            };
            let low = correction(*beta_fast).floor().max(0.0);
            let high = correction(*beta_slow).ceil().min(dim as f32 / 2.0 - 1.0);
            let freqs = base
                .iter()
                .enumerate()
                .map(|(i, &f)| {
                    let ramp = if high > low {
                        ((i as f32 - low) / (high - low)).clamp(0.0, 1.0)
                    } else {
                        0.0
                    };
                    // ramp 0: keep (extrapolate); ramp 1: interpolate.
                    f * (1.0 - ramp) + (f / factor) * ramp
                })
                .collect();
            let mscale = attention_factor.unwrap_or(0.1 * factor.ln() + 1.0);
            (freqs, mscale)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> LlamaConfig {
        serde_json::from_str(
            r#"{"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
                "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                "rope_theta": 10000.0, "unknown_field": true}"#,
        )
        .unwrap()
    }

    #[test]
    fn hf_config_parses_with_defaults() {
        let cfg = tiny();
        assert_eq!(cfg.head_dim(), 4);
        assert_eq!(cfg.num_kv_heads(), 1);
        assert!(!cfg.tie_word_embeddings);
        cfg.validate().unwrap();
    }

    #[test]
    fn invalid_head_split_is_rejected_with_the_field() {
        let mut cfg = tiny();
        cfg.num_key_value_heads = Some(3);
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("num_key_value_heads"), "{err}");
    }

    #[test]
    fn rope_scaling_kinds() {
        let mut cfg = tiny();
        let (plain, m) = rope_frequencies(&cfg);
        assert_eq!(m, 1.0);
        assert_eq!(plain[0], 1.0);
        let scaling =
            |json: &str| RopeScaling::from_json(&serde_json::from_str(json).unwrap()).unwrap();
        cfg.rope_scaling = scaling(r#"{"rope_type": "linear", "factor": 4.0}"#);
        let (linear, _) = rope_frequencies(&cfg);
        assert_eq!(linear[1], plain[1] / 4.0);
        cfg.rope_scaling = scaling(
            r#"{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}"#,
        );
        let (l3, _) = rope_frequencies(&cfg);
        // The highest frequency (short wavelength) is kept.
        assert_eq!(l3[0], plain[0]);
        cfg.rope_scaling = scaling(
            r#"{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}"#,
        );
        let (yarn, mscale) = rope_frequencies(&cfg);
        assert!(mscale > 1.0);
        assert!(
            yarn.iter()
                .zip(&plain)
                .all(|(y, p)| *y <= *p && *y >= p / 4.0 - 1e-9)
        );
    }

    /// Configs from before `rope_type` name the kind `type`; `default` is none; `dynamic`
    /// raises the base (every frequency but the first lower) for `factor` times the context.
    #[test]
    fn legacy_type_key_default_and_dynamic() {
        let cfg = |scaling: &str| -> LlamaConfig {
            serde_json::from_str(&format!(
                r#"{{"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
                    "num_hidden_layers": 1, "num_attention_heads": 2, "rope_scaling": {scaling}}}"#
            ))
            .unwrap()
        };
        let legacy = cfg(r#"{"type": "linear", "factor": 2.0}"#);
        assert_eq!(
            legacy.rope_scaling,
            Some(RopeScaling::Linear { factor: 2.0 })
        );
        assert_eq!(cfg(r#"{"rope_type": "default"}"#).rope_scaling, None);
        assert_eq!(cfg("null").rope_scaling, None);
        let dynamic = cfg(r#"{"type": "dynamic", "factor": 2.0}"#);
        assert_eq!(
            dynamic.rope_scaling,
            Some(RopeScaling::Dynamic { factor: 2.0 })
        );
        assert_eq!(dynamic.context_length(), 2 * 4096);
        assert_eq!(legacy.context_length(), 4096);
        let (plain, _) = rope_frequencies(&tiny());
        let (scaled, m) = rope_frequencies(&dynamic);
        assert_eq!(m, 1.0);
        assert_eq!(scaled[0], plain[0]);
        // head_dim 4: base 10000 * 3^(4/2) = 90000; the second pair's frequency is 1/sqrt(base).
        assert!(
            (scaled[1] - 1.0 / 90_000f32.sqrt()).abs() < 1e-7,
            "{scaled:?}"
        );
        for (bad, says) in [
            (
                r#"{"type": "su", "factor": 2.0}"#,
                "`su` scaling is not supported",
            ),
            (
                r#"{"rope_type": "llama3", "factor": 8.0}"#,
                "needs `low_freq_factor`",
            ),
            (r#"{"factor": 2.0}"#, "names no `rope_type`"),
        ] {
            let json = format!(
                r#"{{"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
                    "num_hidden_layers": 1, "num_attention_heads": 2, "rope_scaling": {bad}}}"#
            );
            let err = serde_json::from_str::<LlamaConfig>(&json)
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{err}");
        }
    }
}

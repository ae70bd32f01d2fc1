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

/// Rope frequency scaling, as Hugging Face `rope_scaling` describes it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Positions divided by `factor`.
    Linear { factor: f32 },
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
        #[serde(default = "default_beta_fast")]
        beta_fast: f32,
        #[serde(default = "default_beta_slow")]
        beta_slow: f32,
        #[serde(default)]
        attention_factor: Option<f32>,
    },
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
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Qwen2-style bias on the q, k and v projections.
    #[serde(default)]
    pub attention_bias: bool,
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
        cfg.rope_scaling =
            Some(serde_json::from_str(r#"{"rope_type": "linear", "factor": 4.0}"#).unwrap());
        let (linear, _) = rope_frequencies(&cfg);
        assert_eq!(linear[1], plain[1] / 4.0);
        cfg.rope_scaling = Some(
            serde_json::from_str(
                r#"{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}"#,
            )
            .unwrap(),
        );
        let (l3, _) = rope_frequencies(&cfg);
        // The highest frequency (short wavelength) is kept.
        assert_eq!(l3[0], plain[0]);
        cfg.rope_scaling = Some(
            serde_json::from_str(
                r#"{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}"#,
            )
            .unwrap(),
        );
        let (yarn, mscale) = rope_frequencies(&cfg);
        assert!(mscale > 1.0);
        assert!(
            yarn.iter()
                .zip(&plain)
                .all(|(y, p)| *y <= *p && *y >= p / 4.0 - 1e-9)
        );
    }
}

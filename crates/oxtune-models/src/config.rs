//! `config.json` of a Hugging Face checkpoint, read into one [`ModelConfig`] that every
//! supported family shares.
//!
//! Both layouts of the rotary settings are accepted: `rope_theta` + `rope_scaling`
//! (transformers 4.x) and `rope_parameters` (transformers 5.x).

use std::path::Path;

use serde::Deserialize;

use crate::families::{self, Family};
use crate::rope::RopeScaling;
use crate::{Error, Result};

/// The fields of `config.json` that oxtune reads; everything else is ignored.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct RawConfig {
    pub architectures: Vec<String>,
    pub model_type: Option<String>,
    pub hidden_size: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub vocab_size: Option<usize>,
    pub rms_norm_eps: Option<f64>,
    pub max_position_embeddings: Option<usize>,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<serde_json::Value>,
    pub rope_parameters: Option<serde_json::Value>,
    pub tie_word_embeddings: Option<bool>,
    pub attention_bias: Option<bool>,
    pub mlp_bias: Option<bool>,
    pub sliding_window: Option<usize>,
    pub use_sliding_window: Option<bool>,
    pub hidden_act: Option<String>,
    pub torch_dtype: Option<String>,
    pub dtype: Option<String>,
    pub bos_token_id: Option<serde_json::Value>,
    pub eos_token_id: Option<serde_json::Value>,
}

/// A validated decoder-only transformer configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    /// The `architectures[0]` string, e.g. `Qwen3ForCausalLM`.
    pub architecture: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (Qwen2; Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama's `attention_bias`).
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Per-head RMSNorm on queries and keys before RoPE (Qwen3).
    pub qk_norm: bool,
    /// Attention looks back at most this many tokens (Mistral).
    pub sliding_window: Option<usize>,
    /// The checkpoint's own dtype name (`torch_dtype` or `dtype`), if given.
    pub torch_dtype: Option<String>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Reads `dir/config.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        if !path.is_file() {
            return Err(Error::MissingFile {
                path,
                hint: "a Hugging Face model directory holds config.json, the *.safetensors weights and tokenizer.json".into(),
            });
        }
        Self::from_file(&path)
    }

    /// Reads a config.json file from any path (e.g. a config without its checkpoint).
    pub fn from_file(path: &Path) -> Result<Self> {
        let raw: RawConfig = crate::error::read_json(path)?;
        Self::from_raw(&raw, path)
    }

    /// Validates a parsed `config.json`; `path` is only used in error messages.
    pub fn from_raw(raw: &RawConfig, path: &Path) -> Result<Self> {
        let key_error = |key: &str, message: &str| Error::Config {
            path: path.to_path_buf(),
            key: key.into(),
            message: message.into(),
        };
        let architecture = raw.architectures.first().cloned().ok_or_else(|| {
            key_error(
                "architectures",
                "missing; expected e.g. [\"LlamaForCausalLM\"]",
            )
        })?;
        let family = Family::from_architecture(&architecture).ok_or_else(|| {
            Error::UnsupportedArchitecture {
                path: path.to_path_buf(),
                name: architecture.clone(),
                supported: families::SUPPORTED.join(", "),
            }
        })?;
        let required = |value: Option<usize>, key: &str| {
            value
                .filter(|v| *v > 0)
                .ok_or_else(|| key_error(key, "missing or zero"))
        };
        let hidden_size = required(raw.hidden_size, "hidden_size")?;
        let num_attention_heads = required(raw.num_attention_heads, "num_attention_heads")?;
        let num_key_value_heads = raw.num_key_value_heads.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(key_error(
                "num_key_value_heads",
                &format!(
                    "{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"
                ),
            ));
        }
        let head_dim = match raw.head_dim {
            Some(d) => d,
            None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            None => {
                return Err(key_error(
                    "head_dim",
                    "missing, and hidden_size is not a multiple of num_attention_heads",
                ));
            }
        };
        if head_dim % 2 != 0 {
            return Err(key_error(
                "head_dim",
                &format!("{head_dim} is odd; rotary embeddings need an even head_dim"),
            ));
        }
        if let Some(act) = raw.hidden_act.as_deref()
            && act != "silu"
        {
            return Err(key_error(
                "hidden_act",
                &format!("`{act}` is not supported; the supported families use `silu`"),
            ));
        }
        let (rope_theta, rope_scaling) = rope_settings(raw, path)?;
        let features = family.features(raw);
        Ok(Self {
            family,
            architecture,
            hidden_size,
            intermediate_size: required(raw.intermediate_size, "intermediate_size")?,
            num_hidden_layers: required(raw.num_hidden_layers, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size: required(raw.vocab_size, "vocab_size")?,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            rope_theta,
            rope_scaling,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(features.tied_by_default),
            qkv_bias: features.qkv_bias,
            o_bias: features.o_bias,
            mlp_bias: raw.mlp_bias.unwrap_or(false),
            qk_norm: features.qk_norm,
            sliding_window: features.sliding_window,
            torch_dtype: raw.torch_dtype.clone().or_else(|| raw.dtype.clone()),
            bos_token_id: token_ids(raw.bos_token_id.as_ref()).first().copied(),
            eos_token_ids: token_ids(raw.eos_token_id.as_ref()),
        })
    }

    /// Number of parameters, counting tied embeddings once.
    pub fn num_parameters(&self) -> usize {
        let attention = self.hidden_size
            * self.head_dim
            * (2 * self.num_attention_heads + 2 * self.num_key_value_heads);
        let mlp = 3 * self.hidden_size * self.intermediate_size;
        let per_layer = attention + mlp + 2 * self.hidden_size;
        let embeddings =
            self.vocab_size * self.hidden_size * if self.tie_word_embeddings { 1 } else { 2 };
        self.num_hidden_layers * per_layer + embeddings + self.hidden_size
    }
}

/// `bos_token_id` / `eos_token_id` may be a number, a list of numbers or null.
pub(crate) fn token_ids(value: Option<&serde_json::Value>) -> Vec<u32> {
    let to_id = |v: &serde_json::Value| v.as_u64().and_then(|id| u32::try_from(id).ok());
    match value {
        Some(serde_json::Value::Array(items)) => items.iter().filter_map(to_id).collect(),
        Some(v) => to_id(v).into_iter().collect(),
        None => Vec::new(),
    }
}

fn rope_settings(raw: &RawConfig, path: &Path) -> Result<(f64, RopeScaling)> {
    // transformers 5.x: everything in `rope_parameters`; 4.x: `rope_theta` + `rope_scaling`.
    let (parameters, key) = match (&raw.rope_parameters, &raw.rope_scaling) {
        (Some(p), _) if p.is_object() => (Some(p), "rope_parameters"),
        (_, Some(s)) if s.is_object() => (Some(s), "rope_scaling"),
        _ => (None, "rope_scaling"),
    };
    let number = |name: &str| {
        parameters
            .and_then(|p| p.get(name))
            .and_then(serde_json::Value::as_f64)
    };
    let rope_theta = raw
        .rope_theta
        .or_else(|| number("rope_theta"))
        .unwrap_or(10_000.0);
    let Some(parameters) = parameters else {
        return Ok((rope_theta, RopeScaling::Default));
    };
    let rope_type = parameters
        .get("rope_type")
        .or_else(|| parameters.get("type"))
        .and_then(serde_json::Value::as_str)
        .unwrap_or("default");
    let missing = |name: &str| Error::Config {
        path: path.to_path_buf(),
        key: format!("{key}.{name}"),
        message: format!("missing; rope_type `{rope_type}` needs it"),
    };
    let field = |name: &str| number(name).ok_or_else(|| missing(name));
    let scaling = match rope_type {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear {
            factor: field("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: field("factor")?,
            low_freq_factor: field("low_freq_factor")?,
            high_freq_factor: field("high_freq_factor")?,
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "a context length"
            )]
            original_max_position_embeddings: field("original_max_position_embeddings")? as usize,
        },
        other => {
            return Err(Error::Config {
                path: path.to_path_buf(),
                key: format!("{key}.rope_type"),
                message: format!(
                    "`{other}` is not supported yet; supported: default, linear, llama3"
                ),
            });
        }
    };
    Ok((rope_theta, scaling))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ModelConfig> {
        let raw: RawConfig = serde_json::from_str(json).map_err(|source| Error::Json {
            path: "config.json".into(),
            source,
        })?;
        ModelConfig::from_raw(&raw, Path::new("config.json"))
    }

    const BASE: &str = r#""hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100"#;

    #[test]
    fn reads_both_rope_layouts() -> Result<()> {
        let old = parse(&format!(
            r#"{{"architectures": ["LlamaForCausalLM"], {BASE}, "rope_theta": 500000.0,
            "rope_scaling": {{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}}}"#
        ))?;
        let new = parse(&format!(
            r#"{{"architectures": ["LlamaForCausalLM"], {BASE}, "rope_parameters": {{
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}}}"#
        ))?;
        assert_eq!(old, new);
        assert_eq!(new.rope_theta, 500_000.0);
        assert!(matches!(new.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        let plain = parse(&format!(
            r#"{{"architectures": ["Qwen3ForCausalLM"], {BASE}, "rope_parameters": {{"rope_type": "default", "rope_theta": 1000000.0}}}}"#
        ))?;
        assert_eq!(plain.rope_theta, 1_000_000.0);
        assert_eq!(plain.rope_scaling, RopeScaling::Default);
        assert!(plain.qk_norm);
        Ok(())
    }

    #[test]
    fn family_features() -> Result<()> {
        let qwen2 = parse(&format!(
            r#"{{"architectures": ["Qwen2ForCausalLM"], {BASE}}}"#
        ))?;
        assert!(qwen2.qkv_bias && !qwen2.o_bias && !qwen2.qk_norm);
        let mistral = parse(&format!(
            r#"{{"architectures": ["MistralForCausalLM"], {BASE}, "sliding_window": 4096}}"#
        ))?;
        assert_eq!(mistral.sliding_window, Some(4096));
        assert_eq!(mistral.head_dim, 16);
        Ok(())
    }

    #[test]
    fn errors_name_the_key_and_what_is_supported() {
        let message = |json: String| {
            parse(&json)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        let unknown = message(format!(
            r#"{{"architectures": ["GPTNeoXForCausalLM"], {BASE}}}"#
        ));
        assert!(
            unknown.contains("architecture `GPTNeoXForCausalLM` is not supported"),
            "{unknown}"
        );
        assert!(unknown.contains("LlamaForCausalLM"), "{unknown}");
        let three_kv_heads =
            BASE.replace("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3");
        let heads = message(format!(
            r#"{{"architectures": ["LlamaForCausalLM"], {three_kv_heads}}}"#
        ));
        assert!(heads.contains("key `num_key_value_heads`"), "{heads}");
        let rope = message(format!(
            r#"{{"architectures": ["LlamaForCausalLM"], {BASE}, "rope_scaling": {{"rope_type": "yarn", "factor": 4.0}}}}"#
        ));
        assert!(
            rope.contains("key `rope_scaling.rope_type`: `yarn` is not supported yet"),
            "{rope}"
        );
        let missing =
            message(r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64}"#.into());
        assert!(
            missing.contains("key `num_attention_heads`: missing"),
            "{missing}"
        );
    }
}

//! The architecture and hyper-parameters of a GGUF file (`{arch}.block_count`, ...), and the
//! Hugging Face `config.json` / `generation_config.json` written from them.

use serde_json::{Value as Json, json};

use super::GgufError;
use super::metadata::Metadata;

/// The GGUF architectures oxtune imports (`general.architecture`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama 2/3, SmolLM/SmolLM2, Mistral 7B and other Llama-shaped models.
    Llama,
    /// Qwen2 / Qwen2.5: bias on the q/k/v projections.
    Qwen2,
    /// Qwen3 (dense): RMSNorm on queries and keys.
    Qwen3,
}

/// For error messages.
pub const SUPPORTED_ARCHITECTURES: &str = "llama (Llama 2/3, SmolLM2, Mistral-like; -> LlamaForCausalLM), qwen2 (-> Qwen2ForCausalLM), qwen3 (-> Qwen3ForCausalLM)";

impl Arch {
    pub fn from_gguf(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Self::Llama),
            "qwen2" => Some(Self::Qwen2),
            "qwen3" => Some(Self::Qwen3),
            _ => None,
        }
    }

    /// The `general.architecture` string, which also prefixes the hyper-parameter keys.
    pub fn gguf_name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
        }
    }

    /// `architectures[0]` in config.json.
    pub fn hf_architecture(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
            Self::Qwen3 => "Qwen3ForCausalLM",
        }
    }

    /// `model_type` in config.json.
    pub fn model_type(self) -> &'static str {
        self.gguf_name()
    }

    /// llama.cpp's converter interleaves the rotary halves of q/k rows for `llama` only
    /// (`LlamaModel.permute` in convert_hf_to_gguf.py); Qwen files keep HF's layout.
    pub fn permutes_qk(self) -> bool {
        matches!(self, Self::Llama)
    }
}

/// The hyper-parameters config.json needs, read from `{arch}.*` metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct HyperParams {
    pub arch: Arch,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// `rope_scaling` from `{arch}.rope.scaling.*`, if the file scales positions.
    pub rope_scaling: Option<Json>,
}

/// `{arch}.context_length`, if the file has an architecture and gives it.
pub(crate) fn context_length(meta: &Metadata<'_>) -> Result<Option<usize>, GgufError> {
    match meta.string("general.architecture")? {
        Some(arch) => meta.usize(&format!("{arch}.context_length")),
        None => Ok(None),
    }
}

impl HyperParams {
    pub(crate) fn from_metadata(meta: &Metadata<'_>, arch: Arch) -> Result<Self, GgufError> {
        let prefix = arch.gguf_name();
        let key = |name: &str| format!("{prefix}.{name}");
        let hint = "llama.cpp's converter always writes this key; the file is incomplete or from an unusual converter";
        let hidden_size = meta.scalar_usize(&key("embedding_length"), hint)?;
        let num_attention_heads = meta.scalar_usize(&key("attention.head_count"), hint)?;
        let num_key_value_heads = if meta.contains(&key("attention.head_count_kv")) {
            meta.scalar_usize(&key("attention.head_count_kv"), hint)?
        } else {
            num_attention_heads
        };
        let invalid = |name: &str, message: String| GgufError::InvalidMetadata {
            path: meta.path.to_path_buf(),
            key: key(name),
            message,
        };
        if num_attention_heads == 0
            || num_key_value_heads == 0
            || num_attention_heads % num_key_value_heads != 0
        {
            return Err(invalid(
                "attention.head_count_kv",
                format!(
                    "{num_key_value_heads} key/value heads do not divide {num_attention_heads} attention heads"
                ),
            ));
        }
        let head_dim = match meta.usize(&key("attention.key_length"))? {
            Some(d) => d,
            None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            None => {
                return Err(invalid(
                    "attention.key_length",
                    format!(
                        "missing, and embedding_length {hidden_size} is not a multiple of head_count {num_attention_heads}"
                    ),
                ));
            }
        };
        if let Some(value_length) = meta.usize(&key("attention.value_length"))?
            && value_length != head_dim
        {
            return Err(invalid(
                "attention.value_length",
                format!(
                    "{value_length} differs from key_length {head_dim}; oxtune's models use one head size"
                ),
            ));
        }
        if let Some(rotary) = meta.usize(&key("rope.dimension_count"))?
            && rotary != head_dim
        {
            return Err(invalid(
                "rope.dimension_count",
                format!(
                    "{rotary} rotary dimensions for heads of {head_dim}; partial rotary embeddings are not supported"
                ),
            ));
        }
        let max_position_embeddings = meta.required_usize(&key("context_length"), hint)?;
        Ok(Self {
            arch,
            hidden_size,
            intermediate_size: meta.scalar_usize(&key("feed_forward_length"), hint)?,
            num_hidden_layers: meta.required_usize(&key("block_count"), hint)?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings,
            rms_norm_eps: meta
                .f64(&key("attention.layer_norm_rms_epsilon"))?
                .ok_or_else(|| meta.missing(&key("attention.layer_norm_rms_epsilon"), hint))?,
            rope_theta: meta.f64(&key("rope.freq_base"))?.unwrap_or(10_000.0),
            rope_scaling: rope_scaling(meta, prefix, max_position_embeddings)?,
        })
    }
}

/// `rope_scaling` from `{arch}.rope.scaling.type/factor/original_context_length` (or the older
/// `{arch}.rope.scale_linear`). Llama 3.1's scaling is not here: llama.cpp stores it as the
/// `rope_freqs` tensor instead (see [`super::tensors::llama3_rope_scaling`]).
fn rope_scaling(
    meta: &Metadata<'_>,
    prefix: &str,
    context_length: usize,
) -> Result<Option<Json>, GgufError> {
    let key = |name: &str| format!("{prefix}.rope.{name}");
    let factor = meta.f64(&key("scaling.factor"))?;
    let scaling_type = meta.string(&key("scaling.type"))?;
    let linear = meta.f64(&key("scale_linear"))?;
    let need_factor = || {
        factor.ok_or_else(|| {
            meta.missing(
                &key("scaling.factor"),
                "a rope scaling type needs its factor",
            )
        })
    };
    match scaling_type {
        None | Some("none") => Ok(linear
            .filter(|f| (*f - 1.0).abs() > f64::EPSILON)
            .map(|f| json!({"rope_type": "linear", "factor": f}))),
        Some("linear") => Ok(Some(
            json!({"rope_type": "linear", "factor": need_factor()?}),
        )),
        Some("yarn") => {
            let original = meta
                .usize(&key("scaling.original_context_length"))?
                .unwrap_or(context_length);
            Ok(Some(
                json!({"rope_type": "yarn", "factor": need_factor()?, "original_max_position_embeddings": original}),
            ))
        }
        Some(other) => Err(GgufError::InvalidMetadata {
            path: meta.path.to_path_buf(),
            key: key("scaling.type"),
            message: format!(
                "rope scaling `{other}` is not supported; supported: none, linear, yarn"
            ),
        }),
    }
}

/// What the tensors say about the model, beyond the metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorFacts {
    /// Rows of `token_embd.weight`.
    pub vocab_size: usize,
    /// No `output.weight`: the LM head reuses the embeddings.
    pub tie_word_embeddings: bool,
    /// `attn_q.bias` present (Llama's `attention_bias`).
    pub attention_bias: bool,
    /// `ffn_gate.bias` present (Llama's `mlp_bias`).
    pub mlp_bias: bool,
    /// `rope_scaling` recovered from the `rope_freqs` tensor (Llama 3.1+).
    pub rope_scaling: Option<Json>,
}

/// config.json for the imported checkpoint.
pub fn config_json(
    hp: &HyperParams,
    facts: &TensorFacts,
    bos: Option<u32>,
    eos: Option<u32>,
    torch_dtype: &str,
) -> Json {
    let mut config = serde_json::Map::new();
    let mut put = |key: &str, value: Json| {
        config.insert(key.to_owned(), value);
    };
    put("architectures", json!([hp.arch.hf_architecture()]));
    put("model_type", json!(hp.arch.model_type()));
    put("hidden_size", json!(hp.hidden_size));
    put("intermediate_size", json!(hp.intermediate_size));
    put("num_hidden_layers", json!(hp.num_hidden_layers));
    put("num_attention_heads", json!(hp.num_attention_heads));
    put("num_key_value_heads", json!(hp.num_key_value_heads));
    put("head_dim", json!(hp.head_dim));
    put("hidden_act", json!("silu"));
    put("max_position_embeddings", json!(hp.max_position_embeddings));
    put("rms_norm_eps", json!(hp.rms_norm_eps));
    put("rope_theta", json!(hp.rope_theta));
    put(
        "rope_scaling",
        facts
            .rope_scaling
            .clone()
            .or_else(|| hp.rope_scaling.clone())
            .unwrap_or(Json::Null),
    );
    put("vocab_size", json!(facts.vocab_size));
    put("tie_word_embeddings", json!(facts.tie_word_embeddings));
    put("bos_token_id", bos.map_or(Json::Null, Json::from));
    put("eos_token_id", eos.map_or(Json::Null, Json::from));
    put("attention_dropout", json!(0.0));
    put("initializer_range", json!(0.02));
    put("use_cache", json!(true));
    match hp.arch {
        Arch::Llama => {
            put("attention_bias", json!(facts.attention_bias));
            put("mlp_bias", json!(facts.mlp_bias));
            put("pretraining_tp", json!(1));
        }
        Arch::Qwen2 => {
            put("use_sliding_window", json!(false));
            put("sliding_window", Json::Null);
            put("max_window_layers", json!(hp.num_hidden_layers));
        }
        Arch::Qwen3 => {
            put("attention_bias", json!(facts.attention_bias));
            put("use_sliding_window", json!(false));
            put("sliding_window", Json::Null);
            put("max_window_layers", json!(hp.num_hidden_layers));
        }
    }
    put("torch_dtype", json!(torch_dtype));
    Json::Object(config)
}

/// generation_config.json: BOS, the stop ids (EOS, EOT, EOM) and PAD.
pub fn generation_config_json(bos: Option<u32>, stop_ids: &[u32], pad: Option<u32>) -> Json {
    let eos = match stop_ids {
        [] => Json::Null,
        [one] => json!(one),
        many => json!(many),
    };
    let mut config = serde_json::Map::new();
    config.insert("bos_token_id".into(), bos.map_or(Json::Null, Json::from));
    config.insert("eos_token_id".into(), eos);
    if let Some(pad) = pad {
        config.insert("pad_token_id".into(), json!(pad));
    }
    Json::Object(config)
}

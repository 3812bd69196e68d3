//! Llama (2, 3, 3.1–3.3 with `llama3` rope scaling) and Llama-architecture models such as
//! SmolLM2: pre-norm decoder, SwiGLU MLP, RoPE, grouped-query attention, optional bias on
//! all attention projections (`attention_bias`), tied or untied embeddings.

use super::Features;
use crate::config::RawConfig;

pub const ARCHITECTURE: &str = "LlamaForCausalLM";

pub fn features(raw: &RawConfig) -> Features {
    let bias = raw.attention_bias.unwrap_or(false);
    Features {
        qkv_bias: bias,
        o_bias: bias,
        qk_norm: false,
        sliding_window: None,
        tied_by_default: false,
    }
}

//! Qwen3 (dense): the Llama block with a per-head RMSNorm on queries and keys
//! (`self_attn.q_norm`, `self_attn.k_norm`, over head_dim) before RoPE, no q/k/v bias by
//! default, and an explicit `head_dim` that need not equal hidden_size / heads.

use super::Features;
use crate::config::RawConfig;

pub const ARCHITECTURE: &str = "Qwen3ForCausalLM";

pub fn features(raw: &RawConfig) -> Features {
    let bias = raw.attention_bias.unwrap_or(false);
    let sliding_window = if raw.use_sliding_window.unwrap_or(false) {
        raw.sliding_window
    } else {
        None
    };
    Features {
        qkv_bias: bias,
        o_bias: bias,
        qk_norm: true,
        sliding_window,
        tied_by_default: false,
    }
}

//! Qwen2 and Qwen2.5: the Llama block with a bias on the q, k and v projections (not on
//! o_proj). `use_sliding_window` is false in every released checkpoint; when a config turns
//! it on, the window applies to all layers.

use super::Features;
use crate::config::RawConfig;

pub const ARCHITECTURE: &str = "Qwen2ForCausalLM";

pub fn features(raw: &RawConfig) -> Features {
    let sliding_window = if raw.use_sliding_window.unwrap_or(false) {
        raw.sliding_window
    } else {
        None
    };
    Features {
        qkv_bias: true,
        o_bias: false,
        qk_norm: false,
        sliding_window,
        tied_by_default: false,
    }
}

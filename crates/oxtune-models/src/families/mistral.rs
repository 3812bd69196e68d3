//! Mistral: the Llama block with a sliding attention window (`sliding_window`, null in
//! Mistral 7B v0.2 and later, which then attend to the whole context).

use super::Features;
use crate::config::RawConfig;

pub const ARCHITECTURE: &str = "MistralForCausalLM";

pub fn features(raw: &RawConfig) -> Features {
    Features {
        qkv_bias: false,
        o_bias: false,
        qk_norm: false,
        sliding_window: raw.sliding_window,
        tied_by_default: false,
    }
}

//! The supported model families. Each file says what its family adds to the shared
//! decoder-only transformer in [`crate::transformer`]: biases, norms, attention window, and
//! the Hugging Face architecture name it answers to. The forward pass itself is written once,
//! so training, inference and serving run the same code for every family.

pub mod llama;
pub mod mistral;
pub mod qwen2;
pub mod qwen3;

use crate::config::RawConfig;

/// The architectures (`config.json` `architectures[0]`) oxtune can load.
pub const SUPPORTED: &[&str] = &[
    llama::ARCHITECTURE,
    mistral::ARCHITECTURE,
    qwen2::ARCHITECTURE,
    qwen3::ARCHITECTURE,
];

/// A model family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Llama 2/3.x, SmolLM/SmolLM2 and other Llama-architecture checkpoints.
    Llama,
    /// Mistral 7B and relatives: Llama with a sliding attention window.
    Mistral,
    /// Qwen2 and Qwen2.5: bias on the q/k/v projections.
    Qwen2,
    /// Qwen3 (dense): RMSNorm on queries and keys.
    Qwen3,
}

/// What a family adds to the shared transformer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub qk_norm: bool,
    pub sliding_window: Option<usize>,
    /// `tie_word_embeddings` when config.json does not say.
    pub tied_by_default: bool,
}

impl Family {
    /// The family for a Hugging Face architecture name.
    pub fn from_architecture(name: &str) -> Option<Self> {
        match name {
            llama::ARCHITECTURE => Some(Self::Llama),
            mistral::ARCHITECTURE => Some(Self::Mistral),
            qwen2::ARCHITECTURE => Some(Self::Qwen2),
            qwen3::ARCHITECTURE => Some(Self::Qwen3),
            _ => None,
        }
    }

    /// The family's features, read from its config.
    pub fn features(self, raw: &RawConfig) -> Features {
        match self {
            Self::Llama => llama::features(raw),
            Self::Mistral => mistral::features(raw),
            Self::Qwen2 => qwen2::features(raw),
            Self::Qwen3 => qwen3::features(raw),
        }
    }
}

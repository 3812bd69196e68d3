//! Models: resolving a name to a checkpoint, reading it (safetensors, config.json,
//! tokenizer.json, chat template, generation defaults), and the model families' forward pass.
//!
//! ```text
//! --model / --model_type --resolve--> ModelSource (HF directory | .gguf)
//! HF directory --LoadedModel::load--> CausalLm + Tokenizer + ChatTemplate + GenerationConfig
//! ```

pub mod chat_template;
pub mod checkpoint;
pub mod config;
pub mod decode_graph;
mod error;
pub mod families;
pub mod generation;
pub mod gguf;
pub mod paged;
pub mod resolve;
pub mod rope;
pub mod tokenizer;
pub mod transformer;

use std::path::{Path, PathBuf};

use oxtune_tensor::{DType, Device};

pub use chat_template::{ChatMessage, ChatTemplate};
pub use checkpoint::{RandomWeights, WeightSource, Weights};
pub use config::ModelConfig;
pub use error::{Error, Result};
pub use generation::GenerationConfig;
pub use paged::{AdapterRouting, PagedKvCache, PagedSequence};
pub use resolve::{ModelSource, SearchPaths};
pub use tokenizer::Tokenizer;
pub use transformer::{BatchLayout, CausalLm, KvCache, TrainingPass};

/// Everything needed to run a checkpoint.
#[derive(Debug)]
pub struct LoadedModel {
    /// The Hugging Face directory the model was read from.
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub model: CausalLm,
    pub tokenizer: Tokenizer,
    /// `None` for base models without a chat template.
    pub chat_template: Option<ChatTemplate>,
    pub generation: GenerationConfig,
}

impl LoadedModel {
    /// Loads the Hugging Face checkpoint in `dir` with weights in `dtype` on `device`.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let config = ModelConfig::load(dir)?;
        let tokenizer = tokenizer::Tokenizer::load(dir)?;
        let chat_template = ChatTemplate::load(dir, tokenizer.special_tokens())?;
        let generation = GenerationConfig::load(dir)?;
        let weights = checkpoint::Weights::load(dir, dtype, device)?;
        let model = CausalLm::load(&config, &weights)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            model,
            tokenizer,
            chat_template,
            generation,
        })
    }

    /// The token ids that end a reply: generation_config.json's, else config.json's, else the
    /// tokenizer's `eos_token`.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        if !self.generation.eos_token_ids.is_empty() {
            return self.generation.eos_token_ids.clone();
        }
        if !self.config.eos_token_ids.is_empty() {
            return self.config.eos_token_ids.clone();
        }
        let eos = self.tokenizer.special_tokens().eos_token.as_deref();
        eos.and_then(|token| self.tokenizer.token_to_id(token))
            .into_iter()
            .collect()
    }
}

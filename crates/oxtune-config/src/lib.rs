//! Configuration of `oxtune sft` and `oxtune pt`: a YAML file plus `--key value` overrides,
//! with ms-swift 3.x key names and the product brief's older ones, turned into one typed,
//! validated [`TrainArgs`] before any weight is loaded.
//!
//! ```
//! use oxtune_config::{Command, TrainArgs, TrainType};
//!
//! let yaml = "model_type: qwen3-7b-chat\ntrain_dataset: prd_data.jsonl\nsft_type: lora\n\
//!             lora_rank: 64\nlearning_rate: 2e-4\n";
//! let file = oxtune_config::Layer::parse_yaml(yaml, "prd.yaml".as_ref())?;
//! let flags = oxtune_config::Layer::parse_args(&["--num_train_epochs", "1"])?;
//! let args = TrainArgs::from_layers(Command::Sft, &[file, flags])?;
//! assert_eq!(args.model, "qwen3-7b-chat");
//! assert_eq!(args.train_type, TrainType::Lora);
//! assert_eq!(args.learning_rate, 2e-4);
//! assert_eq!(args.num_train_epochs, 1.0);
//! let saved = args.to_yaml()?; // what the trainer writes into output_dir
//! assert_eq!(TrainArgs::from_yaml_str(Command::Sft, &saved, "config.yaml".as_ref())?, args);
//! # Ok::<(), oxtune_config::Error>(())
//! ```
//!
//! - `args.rs`: the settings, their docs and defaults (the source of docs/configuration.md);
//! - `keys.rs`: older names, refused keys, "did you mean";
//! - `layer.rs`: reading YAML and the command line;
//! - `resolve.rs`: merging, defaults that depend on other keys, validation, the YAML dump;
//! - `value.rs`: turning YAML or command-line values into typed fields.

// Errors are built once per run, before any training, and their variants are plain structs
// so callers and tests can match on them: their size does not matter.
#![expect(
    clippy::result_large_err,
    reason = "configuration errors are rare and read by people; plain fields beat boxing"
)]

mod args;
mod docs;
mod error;
mod keys;
mod layer;
mod resolve;
mod value;

pub use args::{
    Command, LossScale, LrSchedulerType, ReportTo, ResumeFrom, Setting, TargetModules, TorchDtype,
    TrainArgs, TrainType, TruncationStrategy,
};
pub use docs::reference_markdown;
pub use error::{Error, Origin, Result, UnknownKey};
pub use keys::ALIASES;
pub use layer::Layer;
pub use resolve::split_config_arg;
pub use value::Shape;

/// The setting `key` stands for: itself for a setting, the new name for an older one
/// (`sft_type` → `train_type`); `None` for anything else.
pub fn canonical_key(key: &str) -> Option<&'static str> {
    match keys::lookup(key)? {
        keys::Role::Setting(setting) | keys::Role::Alias(setting) => Some(setting.key),
        keys::Role::Section | keys::Role::Rlhf | keys::Role::Unsupported(_) => None,
    }
}

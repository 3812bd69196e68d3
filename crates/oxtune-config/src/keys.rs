//! Every key a configuration may contain besides the [`TrainArgs`] fields themselves: older
//! names (aliases), the `parallelization:` section, preference-training keys that belong to
//! `oxtune rlhf`, and ms-swift keys for features oxtune does not have yet. Also the
//! "did you mean" suggestion for a key that is none of these.

use crate::args::{Setting, TrainArgs};
use crate::value::Value;

/// What a key is.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Role {
    /// A [`TrainArgs`] field.
    Setting(&'static Setting),
    /// Another name of a setting (`sft_type` for `train_type`).
    Alias(&'static Setting),
    /// A mapping whose entries are keys of their own (`parallelization:`).
    Section,
    /// A preference-training key (`beta`, `preference_dataset`): `oxtune rlhf`'s business.
    Rlhf,
    /// A known key for a feature oxtune does not have yet.
    Unsupported(&'static Unsupported),
}

impl Role {
    /// The name the merged value is filed under: the setting's key for settings and aliases,
    /// the key itself otherwise.
    pub fn canonical(self, key: &str) -> String {
        match self {
            Self::Setting(setting) | Self::Alias(setting) => setting.key.to_string(),
            Self::Section | Self::Rlhf | Self::Unsupported(_) => key.to_string(),
        }
    }
}

/// Older or alternative names, and what they mean now. The brief's names (`sft_type`,
/// `train_dataset`) come from ms-swift 2.x; the `parallelization.` ones are the entries of the
/// brief's `parallelization:` section.
pub const ALIASES: &[(&str, &str)] = &[
    ("sft_type", "train_type"),
    ("model_id_or_path", "model"),
    ("train_dataset", "dataset"),
    ("custom_train_dataset_path", "dataset"),
    ("custom_val_dataset_path", "val_dataset"),
    ("dataset_test_ratio", "split_dataset_ratio"),
    ("lora_target_modules", "target_modules"),
    ("lora_dropout_p", "lora_dropout"),
    ("batch_size", "per_device_train_batch_size"),
    ("eval_batch_size", "per_device_eval_batch_size"),
    ("dtype", "torch_dtype"),
    (
        "parallelization.tensor_parallel_size",
        "tensor_parallel_size",
    ),
    (
        "parallelization.pipeline_parallel_size",
        "pipeline_parallel_size",
    ),
    ("parallelization.zero_optimization", "zero_optimization"),
];

/// Sections: a mapping under this key holds `section.key` entries.
pub const SECTIONS: &[&str] = &["parallelization"];

/// Keys of preference training (DPO and friends), refused by `sft` and `pt` unless null.
pub const RLHF_KEYS: &[&str] = &[
    "beta",
    "preference_dataset",
    "rlhf_type",
    "ref_model",
    "ref_model_type",
    "reward_model",
    "rpo_alpha",
    "simpo_gamma",
    "cpo_alpha",
    "desirable_weight",
    "undesirable_weight",
];

/// `train_type` values that are preference-training methods.
pub const RLHF_TRAIN_TYPES: &[&str] = &[
    "dpo", "orpo", "simpo", "cpo", "kto", "ppo", "grpo", "gkd", "rm", "rlhf",
];

/// `train_type` values ms-swift knows and oxtune does not have yet (besides `qlora`).
pub const OTHER_TUNERS: &[&str] = &[
    "longlora",
    "adalora",
    "llamapro",
    "adapter",
    "vera",
    "boft",
    "fourierft",
    "reft",
    "bone",
    "ia3",
    "lisa",
    "galore",
];

/// A key for a feature oxtune does not have yet. Setting it to one of `neutral` (the values
/// that ask for nothing: `null`, `false`, `0`…) is accepted and changes nothing.
#[derive(Debug)]
pub struct Unsupported {
    pub key: &'static str,
    /// What the key would turn on.
    pub feature: &'static str,
    /// What to do instead.
    pub hint: &'static str,
    /// Values that are fine, as [`Value::as_word`] spells them.
    pub neutral: &'static [&'static str],
}

const QLORA_HINT: &str =
    "QLoRA has not landed yet; train `train_type: lora` on the unquantized model for now";
const MULTI_GPU_HINT: &str = "oxtune trains on one device for now; remove it";

pub const UNSUPPORTED: &[Unsupported] = &[
    Unsupported {
        key: "quantization_bit",
        feature: "training on a quantized base model (QLoRA)",
        hint: QLORA_HINT,
        neutral: &["null", "0"],
    },
    Unsupported {
        key: "quant_bits",
        feature: "training on a quantized base model (QLoRA)",
        hint: QLORA_HINT,
        neutral: &["null"],
    },
    Unsupported {
        key: "quant_method",
        feature: "training on a quantized base model (QLoRA)",
        hint: QLORA_HINT,
        neutral: &["null"],
    },
    Unsupported {
        key: "bnb_4bit_quant_type",
        feature: "training on a quantized base model (QLoRA)",
        hint: QLORA_HINT,
        neutral: &["null"],
    },
    Unsupported {
        key: "deepspeed",
        feature: "multi-GPU training with DeepSpeed",
        hint: MULTI_GPU_HINT,
        neutral: &["null", "none"],
    },
    Unsupported {
        key: "fsdp",
        feature: "multi-GPU training with FSDP",
        hint: MULTI_GPU_HINT,
        neutral: &["null", "none", ""],
    },
    Unsupported {
        key: "sequence_parallel_size",
        feature: "multi-GPU training with sequence parallelism",
        hint: MULTI_GPU_HINT,
        neutral: &["null", "1"],
    },
    Unsupported {
        key: "streaming",
        feature: "streaming datasets",
        hint: "remove it; datasets are read in full before training",
        neutral: &["null", "false"],
    },
    Unsupported {
        key: "lazy_tokenize",
        feature: "lazy tokenization",
        hint: "remove it; samples are tokenized before training",
        neutral: &["null", "false"],
    },
    Unsupported {
        key: "padding_free",
        feature: "`padding_free`",
        hint: "use `packing: true`: packed samples never attend to each other",
        neutral: &["null", "false"],
    },
    Unsupported {
        key: "template",
        feature: "choosing a chat template by name",
        hint: "oxtune renders samples with the model's own chat template (tokenizer_config.json); remove `template`",
        neutral: &["null"],
    },
    Unsupported {
        key: "attn_impl",
        feature: "choosing the attention implementation",
        hint: "oxtune picks its attention kernels itself; remove `attn_impl`",
        neutral: &["null"],
    },
    Unsupported {
        key: "model_revision",
        feature: "model revisions",
        hint: "point `model` at the local directory of the revision you want",
        neutral: &["null"],
    },
    Unsupported {
        key: "adapters",
        feature: "training on top of existing adapters",
        hint: "to continue an interrupted run, use `resume_from_checkpoint`",
        neutral: &["null", "[]"],
    },
    Unsupported {
        key: "target_regex",
        feature: "choosing LoRA targets by regular expression",
        hint: "list module names in `target_modules`",
        neutral: &["null"],
    },
    Unsupported {
        key: "lora_bias",
        feature: "training biases next to LoRA (`lora_bias`)",
        hint: "remove it (or set `none`)",
        neutral: &["null", "none"],
    },
    Unsupported {
        key: "lora_dtype",
        feature: "choosing the LoRA weight dtype",
        hint: "oxtune chooses the adapter dtype itself (float32 master weights); remove `lora_dtype`",
        neutral: &["null"],
    },
    Unsupported {
        key: "init_weights",
        feature: "LoRA initialisations other than the default (PiSSA, OLoRA, Gaussian…)",
        hint: "remove it; adapters start as peft's default (A random, B zero)",
        neutral: &["null", "true"],
    },
    Unsupported {
        key: "use_galore",
        feature: "GaLore",
        hint: "remove it",
        neutral: &["null", "false"],
    },
    Unsupported {
        key: "lisa_activated_layers",
        feature: "LISA",
        hint: "remove it",
        neutral: &["null", "0"],
    },
    Unsupported {
        key: "neftune_noise_alpha",
        feature: "NEFTune",
        hint: "remove it",
        neutral: &["null", "0"],
    },
    Unsupported {
        key: "use_liger_kernel",
        feature: "Liger kernels",
        hint: "remove it; oxtune has its own fused kernels",
        neutral: &["null", "false"],
    },
    Unsupported {
        key: "freeze_parameters",
        feature: "freezing parameters by name",
        hint: "use `train_type: lora` with `target_modules` / `modules_to_save`",
        neutral: &["null", "[]"],
    },
    Unsupported {
        key: "freeze_parameters_ratio",
        feature: "freezing a share of the parameters",
        hint: "use `train_type: lora` with `target_modules` / `modules_to_save`",
        neutral: &["null", "0"],
    },
    Unsupported {
        key: "trainable_parameters",
        feature: "choosing trainable parameters by name",
        hint: "use `modules_to_save`",
        neutral: &["null", "[]"],
    },
    Unsupported {
        key: "tuner_backend",
        feature: "tuner backends",
        hint: "oxtune has its own peft-compatible tuners; remove `tuner_backend`",
        neutral: &["null", "peft"],
    },
    Unsupported {
        key: "optim",
        feature: "optimizers other than AdamW",
        hint: "remove it; oxtune trains with AdamW (`adam_beta1`, `adam_beta2`, `adam_epsilon`)",
        neutral: &["null", "adamw", "adamw_torch", "adamw_torch_fused"],
    },
    Unsupported {
        key: "lr_scheduler_kwargs",
        feature: "learning-rate scheduler arguments",
        hint: "remove it; see `lr_scheduler_type` for the schedules",
        neutral: &["null"],
    },
    Unsupported {
        key: "save_strategy",
        feature: "saving strategies other than `steps`",
        hint: "checkpoints are written every `save_steps` and at the end",
        neutral: &["null", "steps"],
    },
    Unsupported {
        key: "eval_strategy",
        feature: "evaluation strategies other than `steps`",
        hint: "evaluation runs every `eval_steps` when there is validation data",
        neutral: &["null", "steps"],
    },
    Unsupported {
        key: "save_only_model",
        feature: "saving checkpoints without optimizer state",
        hint: "remove it; checkpoints always hold what an exact resume needs",
        neutral: &["null", "false"],
    },
    Unsupported {
        key: "resume_only_model",
        feature: "resuming only the weights",
        hint: "remove it; resuming restores weights, optimizer, schedule and data position",
        neutral: &["null", "false"],
    },
    Unsupported {
        key: "add_version",
        feature: "versioned output subdirectories (`add_version`)",
        hint: "oxtune writes into `output_dir` as given; set `add_version: false` or remove it",
        neutral: &["null", "false"],
    },
];

/// Metric sinks ms-swift knows and oxtune does not.
pub const OTHER_REPORTERS: &[&str] = &[
    "wandb", "swanlab", "mlflow", "comet_ml", "clearml", "neptune",
];

/// Common names from other trainers, and the key they mean here.
const SYNONYMS: &[(&str, &str)] = &[
    ("lr", "learning_rate"),
    ("epochs", "num_train_epochs"),
    ("num_epochs", "num_train_epochs"),
    ("epoch", "num_train_epochs"),
    ("rank", "lora_rank"),
    ("lora_r", "lora_rank"),
    ("r", "lora_rank"),
    ("alpha", "lora_alpha"),
    ("dropout", "lora_dropout"),
    ("grad_accum", "gradient_accumulation_steps"),
    ("gradient_accumulation", "gradient_accumulation_steps"),
    ("accumulation_steps", "gradient_accumulation_steps"),
    ("micro_batch_size", "per_device_train_batch_size"),
    ("train_batch_size", "per_device_train_batch_size"),
    ("per_device_batch_size", "per_device_train_batch_size"),
    ("warmup", "warmup_ratio"),
    ("scheduler", "lr_scheduler_type"),
    ("lr_scheduler", "lr_scheduler_type"),
    ("data", "dataset"),
    ("train_data", "dataset"),
    ("datasets", "dataset"),
    ("eval_dataset", "val_dataset"),
    ("valid_dataset", "val_dataset"),
    ("validation_dataset", "val_dataset"),
    ("max_seq_len", "max_length"),
    ("max_seq_length", "max_length"),
    ("seq_len", "max_length"),
    ("cutoff_len", "max_length"),
    ("model_name_or_path", "model"),
    ("model_path", "model"),
    ("model_name", "model"),
    ("base_model", "model"),
    ("precision", "torch_dtype"),
    ("bf16", "torch_dtype"),
    ("fp16", "torch_dtype"),
    ("grad_clip", "max_grad_norm"),
    ("clip_grad_norm", "max_grad_norm"),
    ("save_dir", "output_dir"),
    ("checkpoint_dir", "output_dir"),
    ("output", "output_dir"),
    ("resume", "resume_from_checkpoint"),
    ("system_prompt", "system"),
    ("lora_target", "target_modules"),
    ("weight_decay_rate", "weight_decay"),
];

/// What `key` is, or `None` for an unknown key.
pub(crate) fn lookup(key: &str) -> Option<Role> {
    if let Some(setting) = TrainArgs::setting(key) {
        return Some(Role::Setting(setting));
    }
    if let Some((_, target)) = ALIASES.iter().find(|(alias, _)| *alias == key) {
        return TrainArgs::setting(target).map(Role::Alias);
    }
    if SECTIONS.contains(&key) {
        return Some(Role::Section);
    }
    if RLHF_KEYS.contains(&key) {
        return Some(Role::Rlhf);
    }
    UNSUPPORTED
        .iter()
        .find(|unsupported| unsupported.key == key)
        .map(Role::Unsupported)
}

impl Unsupported {
    /// Whether `value` asks for nothing (and can be accepted).
    pub(crate) fn is_neutral(&self, value: &Value) -> bool {
        value
            .as_word()
            .is_some_and(|word| self.neutral.contains(&word.as_str()))
    }
}

/// The known key closest to `key`, if one is close enough to be a likely typo.
pub(crate) fn suggest(key: &str) -> Option<String> {
    let lower = key.to_ascii_lowercase();
    let (prefix, name) = match lower.split_once('.') {
        Some((section, name)) if SECTIONS.contains(&section) => (format!("{section}."), name),
        _ => (String::new(), lower.as_str()),
    };
    if let Some((_, target)) = SYNONYMS.iter().find(|(synonym, _)| *synonym == name) {
        return Some((*target).to_string());
    }
    let candidates = TrainArgs::SETTINGS
        .iter()
        .map(|setting| setting.key)
        .chain(ALIASES.iter().map(|(alias, _)| *alias))
        .chain(SECTIONS.iter().copied())
        .filter(|candidate| prefix.is_empty() || candidate.starts_with(&prefix))
        .filter(|candidate| *candidate != key);
    let mut best: Option<(&str, usize, f64)> = None;
    for candidate in candidates {
        let distance = strsim::damerau_levenshtein(&lower, candidate);
        let similarity = strsim::jaro_winkler(&lower, candidate);
        let better = match best {
            None => true,
            Some((_, best_distance, best_similarity)) => {
                distance < best_distance
                    || (distance == best_distance && similarity > best_similarity)
            }
        };
        if better {
            best = Some((candidate, distance, similarity));
        }
    }
    let (candidate, distance, similarity) = best?;
    let close = distance == 0
        || (distance <= 2 && lower.chars().count() >= 4)
        || (distance * 3 <= candidate.chars().count())
        || similarity >= 0.9;
    close.then(|| candidate.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_alias_points_at_a_setting_and_nothing_is_listed_twice() {
        for (alias, target) in ALIASES {
            assert!(TrainArgs::setting(target).is_some(), "{alias} -> {target}");
            assert!(TrainArgs::setting(alias).is_none(), "{alias}");
        }
        let mut keys: Vec<&str> = TrainArgs::SETTINGS
            .iter()
            .map(|setting| setting.key)
            .chain(ALIASES.iter().map(|(alias, _)| *alias))
            .chain(SECTIONS.iter().copied())
            .chain(RLHF_KEYS.iter().copied())
            .chain(UNSUPPORTED.iter().map(|unsupported| unsupported.key))
            .collect();
        let count = keys.len();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), count, "a key is listed twice");
        for (synonym, target) in SYNONYMS {
            assert!(lookup(target).is_some(), "{synonym} -> {target}");
            assert!(lookup(synonym).is_none(), "{synonym} is a real key");
        }
    }

    #[test]
    fn suggestions_for_typos() {
        let cases = [
            ("learnig_rate", Some("learning_rate")),
            ("learning-rate", Some("learning_rate")),
            ("Learning_Rate", Some("learning_rate")),
            ("lora_ranks", Some("lora_rank")),
            ("warmup_ration", Some("warmup_ratio")),
            ("max_len", Some("max_length")),
            ("num_epochs", Some("num_train_epochs")),
            ("lr", Some("learning_rate")),
            ("sft_typ", Some("sft_type")),
            (
                "parallelization.tensor_paralel_size",
                Some("parallelization.tensor_parallel_size"),
            ),
            ("per_device_batch_size", Some("per_device_train_batch_size")),
            ("xyzzy", None),
            ("colour_scheme", None),
        ];
        for (typo, expected) in cases {
            assert_eq!(suggest(typo).as_deref(), expected, "{typo}");
        }
    }
}

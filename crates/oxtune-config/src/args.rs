//! The settings of `oxtune sft` and `oxtune pt`: one flat struct with ms-swift 3.x key names,
//! each field documented with its meaning and default. The `settings!` block below is the
//! single source of truth: it defines the struct, its defaults, the key table used to check
//! and set keys, and the reference in docs/configuration.md.

use std::borrow::Cow;
use std::path::PathBuf;

use serde::Serialize;

use crate::value::{FromValue, Mismatch, Shape, Value, value_enum};

/// Which job a configuration is for. The two share every key; `pt` changes a few defaults
/// (`packing: true`, `loss_scale: all`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Supervised fine-tuning on instruction / chat data.
    Sft,
    /// Continued pre-training on raw text.
    Pt,
}

impl Command {
    /// The subcommand name: `sft` or `pt`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sft => "sft",
            Self::Pt => "pt",
        }
    }
}

/// One key of [`TrainArgs`]: its name, documentation and how to read it.
#[derive(Clone, Copy)]
pub struct Setting {
    /// The key, as written in YAML and (with `--`) on the command line.
    pub key: &'static str,
    /// The documentation section it belongs to.
    pub section: &'static str,
    /// The field's doc comment.
    pub doc: &'static str,
    /// How its values are given on the command line.
    pub shape: Shape,
    /// How the default is described when it depends on other keys.
    pub(crate) default_text: Option<&'static str>,
    pub(crate) expected: fn() -> Cow<'static, str>,
    pub(crate) set: fn(&mut TrainArgs, &Value) -> Result<(), Mismatch>,
    pub(crate) default_json: fn(&TrainArgs) -> Option<serde_json::Value>,
}

impl Setting {
    /// What the key expects: "an integer ≥ 0", "one of `lora`, `full`".
    pub fn expected(&self) -> Cow<'static, str> {
        (self.expected)()
    }

    /// The first sentence of the documentation, for `--help` listings.
    pub fn summary(&self) -> String {
        let text = crate::docs::doc_text(self.doc);
        match text.find(". ") {
            Some(end) => text[..=end].to_string(),
            None => text,
        }
    }
}

impl std::fmt::Debug for Setting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Setting")
            .field("key", &self.key)
            .field("section", &self.section)
            .field("shape", &self.shape)
            .finish_non_exhaustive()
    }
}

/// Defines the settings struct, its built-in defaults and its [`Setting`] table from one
/// list of `[section]` headings and documented `key: Type = default` fields. `=> "text"`
/// describes a default that depends on other keys (it is filled in after merging).
macro_rules! settings {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $(
                [$section:literal]
                $(
                    $(#[doc = $doc:literal])+
                    $field:ident : $ty:ty = $default:expr $(=> $shown:literal)?,
                )*
            )*
        }
    ) => {
        $(#[$meta])*
        pub struct $name {
            $($(
                $(#[doc = $doc])+
                pub $field: $ty,
            )*)*
        }

        impl $name {
            /// The defaults shared by every command, before derived defaults are filled in.
            fn builtin() -> Self {
                Self { $($($field: $default,)*)* }
            }

            /// Every key, in the documented order.
            pub const SETTINGS: &'static [Setting] = &[
                $($(
                    Setting {
                        key: stringify!($field),
                        section: $section,
                        doc: concat!($($doc, "\n"),+),
                        shape: <$ty as FromValue>::SHAPE,
                        default_text: settings!(@shown $($shown)?),
                        expected: <$ty as FromValue>::expected,
                        set: |args: &mut $name, value: &Value| {
                            args.$field = FromValue::from_value(value)?;
                            Ok(())
                        },
                        default_json: |args: &$name| serde_json::to_value(&args.$field).ok(),
                    },
                )*)*
            ];
        }
    };
    (@shown) => { None };
    (@shown $shown:literal) => { Some($shown) };
}

settings! {
    /// A fully resolved, validated configuration of `oxtune sft` or `oxtune pt`: every default
    /// filled in. Build it with [`TrainArgs::from_command_line`] or [`TrainArgs::from_layers`];
    /// save it with [`TrainArgs::to_yaml`].
    #[derive(Debug, Clone, PartialEq, Serialize)]
    pub struct TrainArgs {
        ["Model"]
        /// The model to train: a Hugging Face model directory, a `.gguf` file, an `org/name`
        /// in the Hugging Face cache, or a name from the models registry (docs/models.md).
        /// Required, unless `model_type` names the model; then `model` is set to it.
        model: String = String::new() => "required (or `model_type`)",
        /// A model name from the models registry, e.g. `qwen3-7b-chat` (the brief's and
        /// ms-swift 2.x's way of naming a model). Used as `model` when `model` is not given.
        model_type: Option<String> = None,
        /// Weight and compute dtype: `auto` (bfloat16 on a GPU, float32 on the CPU),
        /// `float32`, `bfloat16` or `float16` (also `fp32`, `bf16`, `fp16`). Trainable
        /// parameters keep a float32 master copy in the optimizer whatever this is.
        torch_dtype: TorchDtype = TorchDtype::Auto,
        /// Where to train: `auto` (the first GPU when oxtune is built with CUDA, else the
        /// CPU), `cpu`, `cuda` or `cuda:N`.
        device: String = "auto".to_string(),

        ["Data"]
        /// Training data: one or more files (jsonl, json or csv; plain `.txt` too for `pt`),
        /// concatenated. `path#N` takes N samples of a file. Required.
        dataset: Vec<String> = Vec::new() => "required",
        /// Validation data, in the same forms as `dataset`. Empty means no validation set
        /// unless `split_dataset_ratio` holds one out.
        val_dataset: Vec<String> = Vec::new(),
        /// The share of `dataset` held out for validation, in [0, 1); 0 holds out nothing.
        /// Cannot be combined with `val_dataset`.
        split_dataset_ratio: f64 = 0.0,
        /// Seed for shuffling and splitting the data (separate from `seed`).
        data_seed: u64 = 42,
        /// Shuffle the training samples (with `data_seed`).
        dataset_shuffle: bool = true,
        /// When true, a malformed row stops the job with its file and line; when false, it is
        /// dropped and counted in the log.
        strict: bool = false,

        ["Template and length"]
        /// System prompt for samples that have none of their own; replaces the chat
        /// template's default system prompt. Null keeps the template's default.
        system: Option<String> = None,
        /// The most tokens in one sample after the chat template is applied; longer samples
        /// follow `truncation_strategy`. Null means the model's maximum context
        /// (`max_position_embeddings` in its config.json).
        max_length: Option<usize> = None,
        /// What happens to a sample longer than `max_length`: `delete` drops it (counted in
        /// the log), `left` cuts tokens from its start, `right` cuts tokens from its end.
        truncation_strategy: TruncationStrategy = TruncationStrategy::Delete,
        /// Which tokens the loss is computed on: `default` every assistant turn, `last_round`
        /// only the last assistant turn, `all` every token.
        loss_scale: LossScale = LossScale::Default,
        /// Pack several short samples into one sequence of up to `packing_length` tokens;
        /// attention never crosses from one sample into another.
        packing: bool = false,
        /// The length of a packed sequence. Null means `max_length`.
        packing_length: Option<usize> = None,

        ["Tuner"]
        /// What trains: `lora` (low-rank adapters on `target_modules`, the base weights
        /// frozen) or `full` (every weight). `dora` is accepted as `lora` with
        /// `use_dora: true`. `qlora` and the preference methods (`dpo`…) are refused with an
        /// explanation.
        train_type: TrainType = TrainType::Lora,
        /// The linear layers that get adapters: `all-linear` (every linear layer except
        /// `lm_head`) or a list of module names matched against the ends of parameter
        /// paths, e.g. `[q_proj, v_proj]`.
        target_modules: TargetModules = TargetModules::AllLinear,
        /// Modules trained in full next to the adapters and saved with them, e.g.
        /// `[embed_tokens, lm_head]`.
        modules_to_save: Vec<String> = Vec::new(),
        /// LoRA rank r: the inner dimension of each adapter. At least 1.
        lora_rank: usize = 8,
        /// LoRA alpha: adapter outputs are scaled by `lora_alpha / lora_rank` (by
        /// `lora_alpha / sqrt(lora_rank)` with `use_rslora`). At least 1.
        lora_alpha: u32 = 32,
        /// Dropout applied to the adapter input during training, in [0, 1).
        lora_dropout: f64 = 0.05,
        /// Rank-stabilised LoRA: scale by `lora_alpha / sqrt(lora_rank)`.
        use_rslora: bool = false,
        /// DoRA: split each adapted weight into magnitude and direction and train both.
        use_dora: bool = false,

        ["Optimization"]
        /// Peak learning rate of AdamW. Default 1e-4 for LoRA and 1e-5 for full
        /// fine-tuning.
        learning_rate: f64 = 1e-4 => "`1e-4` (lora), `1e-5` (full)",
        /// Passes over the training data (fractions allowed). Ignored when `max_steps` is
        /// set.
        num_train_epochs: f64 = 3.0,
        /// Stop after this many optimizer steps, whatever `num_train_epochs` says. Null (or
        /// ms-swift's `-1`) means no limit.
        max_steps: Option<u64> = None,
        /// Samples per forward pass.
        per_device_train_batch_size: usize = 1,
        /// Samples per forward pass during evaluation.
        per_device_eval_batch_size: usize = 1,
        /// Forward passes per optimizer step. Default: enough for 16 samples per step,
        /// ⌈16 / per_device_train_batch_size⌉.
        gradient_accumulation_steps: usize = 16 => "⌈16 / per_device_train_batch_size⌉",
        /// Learning-rate schedule after warmup: `linear` or `cosine` decay to 0, `constant`
        /// (no warmup), or `constant_with_warmup`.
        lr_scheduler_type: LrSchedulerType = LrSchedulerType::Cosine,
        /// Share of the total steps spent warming the learning rate up from 0, in [0, 1].
        warmup_ratio: f64 = 0.0,
        /// Warmup in steps; when above 0 it is used instead of `warmup_ratio`.
        warmup_steps: usize = 0,
        /// Decoupled (AdamW) weight decay, at least 0. Norms and biases never decay.
        weight_decay: f64 = 0.1,
        /// AdamW beta1, in [0, 1).
        adam_beta1: f64 = 0.9,
        /// AdamW beta2, in [0, 1).
        adam_beta2: f64 = 0.95,
        /// AdamW epsilon, above 0.
        adam_epsilon: f64 = 1e-8,
        /// Clip the global gradient norm to this value; 0 turns clipping off.
        max_grad_norm: f64 = 1.0,
        /// Keep only each decoder block's input during the forward pass and recompute the
        /// block in the backward pass: much less activation memory for one extra forward.
        gradient_checkpointing: bool = true,
        /// Seed for weight initialisation (LoRA), dropout and everything random in training
        /// except the data order (`data_seed`).
        seed: u64 = 42,
        /// A step whose loss or gradient is NaN or infinite is skipped (no update) and
        /// logged; training stops with an error once more than this many steps in a row
        /// were skipped. 0 stops at the first.
        max_nonfinite_steps: u32 = 10,

        ["Checkpoints and logging"]
        /// Where checkpoints (`checkpoint-N/`), `logging.jsonl` and the resolved config go.
        /// Default: `output/<model name>`, the last component of `model`.
        output_dir: PathBuf = PathBuf::from("output") => "`output/<model name>`",
        /// Save a checkpoint every this many optimizer steps (and at the end).
        save_steps: usize = 500,
        /// Keep only the newest this-many checkpoints, deleting older ones. Null keeps all.
        save_total_limit: Option<usize> = None,
        /// Log loss, learning rate and gradient norm every this many optimizer steps.
        logging_steps: usize = 5,
        /// Evaluate on the validation data every this many optimizer steps. Default:
        /// `save_steps` when there is validation data; always null (no evaluation) when
        /// there is none.
        eval_steps: Option<usize> = None => "`save_steps` with validation data, else null",
        /// Continue an interrupted run: a checkpoint directory, or `true` for the newest
        /// complete checkpoint in `output_dir`. Null (or `false`) starts fresh.
        resume_from_checkpoint: Option<ResumeFrom> = None,
        /// Where metrics go besides `output_dir/logging.jsonl`: a list of `tensorboard`, or
        /// `none` (`all` means every one available).
        report_to: Vec<ReportTo> = vec![ReportTo::Tensorboard],

        ["Parallelism"]
        /// Tensor-parallel degree. Only 1 is supported for now; the brief's
        /// `parallelization:` section sets it as `parallelization: {tensor_parallel_size: N}`.
        tensor_parallel_size: usize = 1,
        /// Pipeline-parallel degree. Only 1 is supported for now.
        pipeline_parallel_size: usize = 1,
        /// ZeRO sharding stage (0–3) of optimizer state, gradients and parameters. Only 0 is
        /// supported for now.
        zero_optimization: u8 = 0,
    }
}

impl TrainArgs {
    /// The defaults of `command`, before the derived ones (`learning_rate`,
    /// `gradient_accumulation_steps`, `output_dir`, `eval_steps`) are worked out. Not
    /// validated: `model` and `dataset` are empty.
    pub fn defaults(command: Command) -> Self {
        let mut args = Self::builtin();
        if command == Command::Pt {
            args.packing = true;
            args.loss_scale = LossScale::All;
        }
        args
    }

    /// The setting called `key` (canonical names only; see [`crate::canonical_key`]).
    pub fn setting(key: &str) -> Option<&'static Setting> {
        Self::SETTINGS.iter().find(|setting| setting.key == key)
    }

    /// Whether adapters are trained (LoRA or DoRA) rather than every weight.
    pub fn is_lora(&self) -> bool {
        self.train_type == TrainType::Lora
    }

    /// Samples per optimizer step on one device.
    pub fn samples_per_step(&self) -> usize {
        self.per_device_train_batch_size * self.gradient_accumulation_steps
    }

    /// The sequence length of a packed row: `packing_length`, else `max_length`.
    pub fn packed_length(&self) -> Option<usize> {
        self.packing_length.or(self.max_length)
    }
}

value_enum! {
    /// What trains.
    pub enum TrainType {
        /// Low-rank adapters on `target_modules` (DoRA with `use_dora`).
        Lora = "lora",
        /// Every weight.
        Full = "full",
    }
}

value_enum! {
    /// Weight and compute dtype.
    pub enum TorchDtype {
        /// bfloat16 on a GPU, float32 on the CPU.
        Auto = "auto",
        Float32 = "float32" | "fp32" | "f32",
        Bfloat16 = "bfloat16" | "bf16",
        Float16 = "float16" | "fp16" | "f16" | "half",
    }
}

value_enum! {
    /// What happens to a sample longer than `max_length`.
    pub enum TruncationStrategy {
        /// Drop the sample.
        Delete = "delete",
        /// Cut tokens from the start.
        Left = "left",
        /// Cut tokens from the end.
        Right = "right",
    }
}

value_enum! {
    /// Which tokens carry the loss.
    pub enum LossScale {
        /// Every assistant turn.
        Default = "default",
        /// The last assistant turn only.
        LastRound = "last_round",
        /// Every token.
        All = "all",
    }
}

value_enum! {
    /// The learning-rate schedule after warmup.
    pub enum LrSchedulerType {
        /// Linear decay to 0.
        Linear = "linear",
        /// Cosine decay to 0.
        Cosine = "cosine",
        /// Constant, no warmup.
        Constant = "constant",
        /// Constant after warmup.
        ConstantWithWarmup = "constant_with_warmup",
    }
}

value_enum! {
    /// A metrics sink besides `logging.jsonl`.
    pub enum ReportTo {
        /// TensorBoard event files.
        Tensorboard = "tensorboard",
    }
}

/// The layers that get adapters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetModules {
    /// Every linear layer except `lm_head`.
    AllLinear,
    /// Modules whose parameter paths end with one of these names (`q_proj`, `v_proj`).
    Names(Vec<String>),
}

impl TargetModules {
    /// Whether the module at `path` (`model.layers.0.self_attn.q_proj`) is targeted by name.
    /// `AllLinear` answers false: which modules are linear is for the model to say.
    pub fn names_match(&self, path: &str) -> bool {
        match self {
            Self::AllLinear => false,
            Self::Names(names) => names
                .iter()
                .any(|name| path == name || path.ends_with(&format!(".{name}"))),
        }
    }
}

fn is_all_linear(text: &str) -> bool {
    ["all-linear", "all_linear", "all"].contains(&text.trim().to_ascii_lowercase().as_str())
}

impl FromValue for TargetModules {
    fn expected() -> Cow<'static, str> {
        "`all-linear` or a list of module names".into()
    }

    const SHAPE: Shape = Shape::List;

    fn from_value(value: &Value) -> Result<Self, Mismatch> {
        let names = Vec::<String>::from_value(value)?;
        if names.iter().any(|name| is_all_linear(name)) {
            return if names.len() == 1 {
                Ok(Self::AllLinear)
            } else {
                Err(Mismatch {
                    hint: Some(
                        "`all-linear` already covers every linear layer; give it alone, or list the module names without it".into(),
                    ),
                })
            };
        }
        if names.is_empty() || names.iter().any(|name| name.trim().is_empty()) {
            return Err(Mismatch {
                hint: Some("give at least one module name, or `all-linear`".into()),
            });
        }
        Ok(Self::Names(names))
    }
}

impl Serialize for TargetModules {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::AllLinear => serializer.serialize_str("all-linear"),
            Self::Names(names) => names.serialize(serializer),
        }
    }
}

/// Where to resume training from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResumeFrom {
    /// The newest complete `checkpoint-N/` in `output_dir` (`resume_from_checkpoint: true`).
    Latest,
    /// This checkpoint directory.
    Path(PathBuf),
}

impl FromValue for ResumeFrom {
    fn expected() -> Cow<'static, str> {
        "a checkpoint directory, or true for the newest one in output_dir".into()
    }

    fn from_value(value: &Value) -> Result<Self, Mismatch> {
        match value {
            Value::Bool(true) => Ok(Self::Latest),
            Value::Str(text) if text.trim().eq_ignore_ascii_case("true") => Ok(Self::Latest),
            Value::Str(text) if !text.trim().is_empty() => Ok(Self::Path(PathBuf::from(text))),
            _ => Err(Mismatch::default()),
        }
    }

    fn is_absent(value: &Value) -> bool {
        match value {
            Value::Null | Value::Bool(false) => true,
            Value::Str(text) => matches!(
                text.trim().to_ascii_lowercase().as_str(),
                "none" | "null" | "false" | ""
            ),
            _ => false,
        }
    }
}

impl Serialize for ResumeFrom {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Latest => serializer.serialize_bool(true),
            Self::Path(path) => path.serialize(serializer),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(value: &str) -> Value {
        Value::Str(value.into())
    }

    #[test]
    fn every_key_is_unique_and_documented() {
        let mut keys: Vec<&str> = TrainArgs::SETTINGS.iter().map(|s| s.key).collect();
        let count = keys.len();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), count);
        for setting in TrainArgs::SETTINGS {
            assert!(!setting.doc.trim().is_empty(), "{}", setting.key);
        }
    }

    #[test]
    fn pt_changes_packing_and_loss_scale_only() {
        let sft = TrainArgs::defaults(Command::Sft);
        let pt = TrainArgs::defaults(Command::Pt);
        assert!(!sft.packing && pt.packing);
        assert_eq!(pt.loss_scale, LossScale::All);
        let pt_as_sft = TrainArgs {
            packing: false,
            loss_scale: LossScale::Default,
            ..pt
        };
        assert_eq!(pt_as_sft, sft);
    }

    #[test]
    fn target_modules_forms() {
        assert_eq!(
            TargetModules::from_value(&text("all-linear")),
            Ok(TargetModules::AllLinear)
        );
        assert_eq!(
            TargetModules::from_value(&Value::List(vec![text("ALL")])),
            Ok(TargetModules::AllLinear)
        );
        let names = TargetModules::from_value(&Value::List(vec![text("q_proj"), text("v_proj")]));
        assert_eq!(
            names,
            Ok(TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]))
        );
        assert!(
            TargetModules::from_value(&Value::List(vec![text("all-linear"), text("q_proj")]))
                .is_err()
        );
        let Ok(names) = names else { return };
        assert!(names.names_match("model.layers.0.self_attn.q_proj"));
        assert!(!names.names_match("model.layers.0.self_attn.k_proj"));
    }

    #[test]
    fn resume_from_checkpoint_forms() {
        type Resume = Option<ResumeFrom>;
        assert_eq!(
            Resume::from_value(&Value::Bool(true)),
            Ok(Some(ResumeFrom::Latest))
        );
        assert_eq!(
            Resume::from_value(&text("true")),
            Ok(Some(ResumeFrom::Latest))
        );
        assert_eq!(Resume::from_value(&Value::Bool(false)), Ok(None));
        assert_eq!(Resume::from_value(&Value::Null), Ok(None));
        assert_eq!(
            Resume::from_value(&text("out/checkpoint-4")),
            Ok(Some(ResumeFrom::Path("out/checkpoint-4".into())))
        );
    }

    #[test]
    fn enums_accept_aliases_in_any_case() {
        assert_eq!(
            TorchDtype::from_value(&text("BF16")),
            Ok(TorchDtype::Bfloat16)
        );
        assert_eq!(
            LrSchedulerType::from_value(&text("constant_with_warmup")),
            Ok(LrSchedulerType::ConstantWithWarmup)
        );
        assert!(LrSchedulerType::from_value(&text("wsd")).is_err());
        assert_eq!(
            LrSchedulerType::expected(),
            "one of `linear`, `cosine`, `constant`, `constant_with_warmup`"
        );
    }
}

//! From layers to a [`TrainArgs`], in this order:
//!
//! 1. every key of every layer is looked up; unknown keys fail together, with suggestions,
//!    before any value is looked at;
//! 2. the layers are merged key by key (the command line over the file; old names and new
//!    ones are the same key);
//! 3. refusals: preference-training keys, features oxtune does not have yet;
//! 4. each value is converted to its field's type;
//! 5. defaults that depend on other keys are filled in;
//! 6. the result is validated (multi-GPU first, then required keys, then ranges).
//!
//! Every error names the key as the user wrote it and where it was written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::args::{Command, TrainArgs, TrainType};
use crate::error::{Error, Origin, Result, UnknownKey};
use crate::keys::{self, Role};
use crate::layer::{Item, Layer, Raw, Source};
use crate::value::{Shape, Value};

/// One merged setting.
#[derive(Debug, Clone)]
struct Merged {
    role: Role,
    /// The key as written (`sft_type`, `parallelization.tensor_parallel_size`).
    written: String,
    value: Value,
    /// Where the value is.
    origin: Origin,
    /// Where the key is.
    key_origin: Origin,
    /// (layer, position): the order settings are checked in.
    order: (usize, usize),
}

/// Where each explicitly given setting came from, by canonical key.
#[derive(Debug, Default)]
struct Provenance {
    given: BTreeMap<String, (String, Origin)>,
}

impl Provenance {
    fn is_given(&self, key: &str) -> bool {
        self.given.contains_key(key)
    }

    /// The key as written and its origin; the canonical key and "default" when not given.
    fn of(&self, key: &str) -> (String, Origin) {
        self.given
            .get(key)
            .cloned()
            .unwrap_or_else(|| (key.to_string(), Origin::Default))
    }
}

impl TrainArgs {
    /// The configuration of `oxtune <command>` from its command line (without the program
    /// and subcommand names): an optional `-c FILE` / `--config FILE`, then `--key value`
    /// settings that override the file.
    pub fn from_command_line<S: AsRef<str>>(command: Command, args: &[S]) -> Result<Self> {
        let (config, rest) = split_config_arg(args)?;
        let mut layers = Vec::new();
        if let Some(path) = config {
            layers.push(Layer::read_yaml(&path)?);
        }
        layers.push(Layer::parse_args(&rest)?);
        Self::from_layers(command, &layers)
    }

    /// Parses a YAML config file's text (`path` names it in messages), with no overrides.
    pub fn from_yaml_str(command: Command, text: &str, path: &Path) -> Result<Self> {
        Self::from_layers(command, &[Layer::parse_yaml(text, path)?])
    }

    /// Merges `layers` (later ones override earlier ones, key by key), fills in defaults and
    /// validates the result.
    pub fn from_layers(command: Command, layers: &[Layer]) -> Result<Self> {
        let keyed = look_up_keys(layers)?;
        let mut merged = merge(keyed)?;
        normalize(&mut merged)?;
        let mut merged: Vec<Merged> = merged.into_values().collect();
        merged.sort_by_key(|setting| setting.order);
        for setting in &merged {
            refuse(command, setting)?;
        }

        let mut args = Self::defaults(command);
        let mut provenance = Provenance::default();
        for setting in &merged {
            let (Role::Setting(field) | Role::Alias(field)) = setting.role else {
                continue;
            };
            (field.set)(&mut args, &setting.value).map_err(|mismatch| Error::InvalidType {
                key: setting.written.clone(),
                origin: setting.origin.clone(),
                expected: field.expected().into_owned(),
                got: setting.value.describe(),
                hint: mismatch.hint,
            })?;
            provenance.given.insert(
                field.key.to_string(),
                (setting.written.clone(), setting.origin.clone()),
            );
        }
        args.derive_defaults(&provenance);
        args.validate(&provenance)?;
        Ok(args)
    }

    /// Fills in the defaults that depend on other keys (ms-swift's rules).
    fn derive_defaults(&mut self, provenance: &Provenance) {
        if self.model.is_empty()
            && let Some(model_type) = &self.model_type
        {
            self.model = model_type.clone();
        }
        if !provenance.is_given("learning_rate") {
            self.learning_rate = match self.train_type {
                TrainType::Lora => 1e-4,
                TrainType::Full => 1e-5,
            };
        }
        if !provenance.is_given("gradient_accumulation_steps") {
            self.gradient_accumulation_steps = 16_usize
                .div_ceil(self.per_device_train_batch_size.max(1))
                .max(1);
        }
        if !provenance.is_given("output_dir") {
            self.output_dir = default_output_dir(&self.model);
        }
        let has_validation = !self.val_dataset.is_empty() || self.split_dataset_ratio > 0.0;
        if !has_validation {
            self.eval_steps = None;
        } else if !provenance.is_given("eval_steps") {
            self.eval_steps = Some(self.save_steps);
        }
    }

    /// Checks the merged values. Multi-GPU requests come first (they explain a whole file),
    /// then required keys, then each key's range.
    fn validate(&self, provenance: &Provenance) -> Result<()> {
        let invalid = |key: &str, message: String, hint: Option<&str>| {
            let (written, origin) = provenance.of(key);
            Error::InvalidValue {
                key: written,
                origin,
                message,
                hint: hint.map(str::to_string),
            }
        };
        let multi_gpu = |key: &str, value: String, neutral: &'static str| {
            let (written, origin) = provenance.of(key);
            Error::MultiGpu {
                setting: format!("{written}: {value}"),
                key: written,
                origin,
                neutral,
            }
        };

        for (key, size) in [
            ("tensor_parallel_size", self.tensor_parallel_size),
            ("pipeline_parallel_size", self.pipeline_parallel_size),
        ] {
            if size == 0 {
                return Err(invalid(key, "must be at least 1, got 0".into(), None));
            }
            if size > 1 {
                return Err(multi_gpu(key, size.to_string(), "1"));
            }
        }
        if self.zero_optimization > 3 {
            return Err(invalid(
                "zero_optimization",
                format!("is a ZeRO stage, 0 to 3, got {}", self.zero_optimization),
                None,
            ));
        }
        if self.zero_optimization > 0 {
            return Err(multi_gpu(
                "zero_optimization",
                self.zero_optimization.to_string(),
                "0",
            ));
        }

        if self.model.trim().is_empty() {
            return Err(Error::Missing {
                key: "model".into(),
                hint: "set `model` to a Hugging Face model directory, a .gguf file, an org/name in the Hugging Face cache or a models-registry name (or `model_type: NAME`), e.g. `--model ./models/Qwen3-0.6B`".into(),
            });
        }
        if self.dataset.is_empty() {
            return Err(Error::Missing {
                key: "dataset".into(),
                hint: "set `dataset` (or `train_dataset`) to one or more data files, e.g. `dataset: [train.jsonl]` or `--dataset train.jsonl`".into(),
            });
        }
        for (key, files) in [
            ("dataset", &self.dataset),
            ("val_dataset", &self.val_dataset),
        ] {
            if files.iter().any(|file| file.trim().is_empty()) {
                return Err(invalid(key, "holds an empty file name".into(), None));
            }
        }
        if !(0.0..1.0).contains(&self.split_dataset_ratio) {
            return Err(invalid(
                "split_dataset_ratio",
                format!("must be in [0, 1), got {}", self.split_dataset_ratio),
                Some("it is the share of `dataset` held out for validation, e.g. 0.01"),
            ));
        }
        if self.split_dataset_ratio > 0.0 && !self.val_dataset.is_empty() {
            return Err(invalid(
                "split_dataset_ratio",
                format!(
                    "is {} but `val_dataset` is given too",
                    self.split_dataset_ratio
                ),
                Some("validate on `val_dataset` or on a split of `dataset`, not both"),
            ));
        }
        if !self.is_valid_device() {
            return Err(invalid(
                "device",
                format!(
                    "must be `auto`, `cpu`, `cuda` or `cuda:N`, got `{}`",
                    self.device
                ),
                None,
            ));
        }

        let at_least_one = [
            ("lora_rank", self.lora_rank),
            ("lora_alpha", self.lora_alpha as usize),
            (
                "per_device_train_batch_size",
                self.per_device_train_batch_size,
            ),
            (
                "per_device_eval_batch_size",
                self.per_device_eval_batch_size,
            ),
            (
                "gradient_accumulation_steps",
                self.gradient_accumulation_steps,
            ),
            ("save_steps", self.save_steps),
            ("logging_steps", self.logging_steps),
        ];
        for (key, value) in at_least_one {
            if value == 0 {
                return Err(invalid(key, "must be at least 1, got 0".into(), None));
            }
        }
        let optional_at_least_one = [
            ("max_length", self.max_length),
            ("packing_length", self.packing_length),
            ("save_total_limit", self.save_total_limit),
            ("eval_steps", self.eval_steps),
            ("max_steps", self.max_steps.map(|steps| steps as usize)),
        ];
        for (key, value) in optional_at_least_one {
            if value == Some(0) {
                return Err(invalid(
                    key,
                    "must be at least 1, got 0".into(),
                    Some("use null for no value"),
                ));
            }
        }

        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(invalid(
                "lora_dropout",
                format!("must be in [0, 1), got {}", self.lora_dropout),
                None,
            ));
        }
        if self.learning_rate <= 0.0 {
            return Err(invalid(
                "learning_rate",
                format!("must be above 0, got {}", self.learning_rate),
                Some("typical values: 1e-4 for LoRA, 1e-5 for full fine-tuning"),
            ));
        }
        if self.max_steps.is_none() && self.num_train_epochs <= 0.0 {
            return Err(invalid(
                "num_train_epochs",
                format!("must be above 0, got {}", self.num_train_epochs),
                Some("or set `max_steps`"),
            ));
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            return Err(invalid(
                "warmup_ratio",
                format!("must be in [0, 1], got {}", self.warmup_ratio),
                Some("it is a share of the total steps; use `warmup_steps` for a count"),
            ));
        }
        for (key, value) in [
            ("weight_decay", self.weight_decay),
            ("max_grad_norm", self.max_grad_norm),
        ] {
            if value < 0.0 {
                return Err(invalid(
                    key,
                    format!("must be 0 or more, got {value}"),
                    None,
                ));
            }
        }
        for (key, value) in [
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&value) {
                return Err(invalid(
                    key,
                    format!("must be in [0, 1), got {value}"),
                    None,
                ));
            }
        }
        if self.adam_epsilon <= 0.0 {
            return Err(invalid(
                "adam_epsilon",
                format!("must be above 0, got {}", self.adam_epsilon),
                None,
            ));
        }
        if self.train_type == TrainType::Full {
            for (key, on) in [("use_dora", self.use_dora), ("use_rslora", self.use_rslora)] {
                if on {
                    return Err(invalid(
                        key,
                        "is true, but `train_type` is `full`: there are no adapters".into(),
                        Some("use `train_type: lora` for adapters, or drop the flag"),
                    ));
                }
            }
        }
        if self.output_dir.as_os_str().is_empty() {
            return Err(invalid("output_dir", "is empty".into(), None));
        }
        Ok(())
    }

    fn is_valid_device(&self) -> bool {
        match self.device.as_str() {
            "auto" | "cpu" | "cuda" | "gpu" => true,
            other => other
                .strip_prefix("cuda:")
                .is_some_and(|ordinal| ordinal.parse::<usize>().is_ok()),
        }
    }

    /// The fully resolved configuration as YAML: every key, defaults included, ready to be
    /// saved into `output_dir` and read back with `-c` (giving an equal `TrainArgs`).
    pub fn to_yaml(&self) -> Result<String> {
        let body = serde_saphyr::to_string(self).map_err(|error| Error::Serialize {
            message: error.to_string(),
        })?;
        Ok(format!(
            "# oxtune: the resolved training configuration, every default filled in.\n\
             # Run it again with: oxtune sft -c config.yaml   (or oxtune pt)\n{body}"
        ))
    }
}

/// Finds `-c FILE`, `--config FILE` or `--config=FILE` among `args`; returns it and the rest.
pub fn split_config_arg<S: AsRef<str>>(args: &[S]) -> Result<(Option<PathBuf>, Vec<String>)> {
    let mut config = None;
    let mut rest = Vec::new();
    let mut words = args.iter().map(AsRef::as_ref);
    while let Some(word) = words.next() {
        let path = match word {
            "-c" | "--config" => match words.next() {
                Some(path) if !path.starts_with("--") => path,
                _ => {
                    return Err(Error::CommandLine {
                        message: format!("`{word}` needs a file"),
                        hint: "write `-c path/to/config.yaml`".into(),
                    });
                }
            },
            _ => match word.strip_prefix("--config=") {
                Some(path) => path,
                None => {
                    rest.push(word.to_string());
                    continue;
                }
            },
        };
        if config.replace(PathBuf::from(path)).is_some() {
            return Err(Error::CommandLine {
                message: "more than one config file".into(),
                hint: "give one `-c FILE`; override its keys with `--key value`".into(),
            });
        }
    }
    Ok((config, rest))
}

/// `output/<last component of model>`.
fn default_output_dir(model: &str) -> PathBuf {
    let name = model
        .trim_end_matches(['/', '\\'])
        .rsplit(['/', '\\'])
        .next()
        .unwrap_or_default()
        .trim_end_matches(".gguf");
    if name.is_empty() || name == "." || name == ".." {
        PathBuf::from("output")
    } else {
        Path::new("output").join(name)
    }
}

/// A layer's item with its key looked up.
struct Keyed<'a> {
    role: Role,
    key: String,
    item: &'a Item,
    /// For an entry of a section: its value, where the value is and where its key is (the
    /// item is the section).
    section_value: Option<(Value, Origin, Origin)>,
    is_file: bool,
    order: (usize, usize),
}

/// Step 1: looks every key up, expanding sections; all unknown keys fail together.
fn look_up_keys(layers: &[Layer]) -> Result<Vec<Keyed<'_>>> {
    let mut keyed = Vec::new();
    let mut unknown = Vec::new();
    for (layer_index, layer) in layers.iter().enumerate() {
        let is_file = matches!(layer.source, Source::File(_));
        let mut position = 0;
        for item in &layer.items {
            let role = keys::lookup(&item.key);
            if let (Some(Role::Section), Raw::Yaml(Value::Map(entries))) = (role, &item.raw) {
                for entry in entries {
                    let key = format!("{}.{}", item.key, entry.key);
                    match keys::lookup(&key) {
                        Some(role) => keyed.push(Keyed {
                            role,
                            key,
                            item,
                            section_value: Some((
                                entry.value.clone(),
                                entry.value_origin.clone(),
                                entry.key_origin.clone(),
                            )),
                            is_file,
                            order: (layer_index, position),
                        }),
                        None => unknown.push(UnknownKey {
                            suggestion: keys::suggest(&key),
                            key,
                            origin: entry.key_origin.clone(),
                        }),
                    }
                    position += 1;
                }
                continue;
            }
            match role {
                Some(role) => keyed.push(Keyed {
                    role,
                    key: item.key.clone(),
                    item,
                    section_value: None,
                    is_file,
                    order: (layer_index, position),
                }),
                None => unknown.push(UnknownKey {
                    key: item.key.clone(),
                    origin: item.key_origin.clone(),
                    suggestion: keys::suggest(&item.key),
                }),
            }
            position += 1;
        }
    }
    if unknown.is_empty() {
        Ok(keyed)
    } else {
        Err(Error::UnknownKeys { keys: unknown })
    }
}

/// Step 2: one value per canonical key. In a file, a key given twice (under two names) is an
/// error; on the command line a repeated list flag adds values and a repeated scalar flag
/// replaces the earlier one; a later layer replaces an earlier one.
fn merge(keyed: Vec<Keyed<'_>>) -> Result<BTreeMap<String, Merged>> {
    let mut merged: BTreeMap<String, Merged> = BTreeMap::new();
    for keyed in keyed {
        let canonical = keyed.role.canonical(&keyed.key);
        let (value, origin, key_origin) = match (&keyed.section_value, &keyed.item.raw) {
            (Some((value, origin, key_origin)), _) => {
                (value.clone(), origin.clone(), key_origin.clone())
            }
            (None, Raw::Yaml(value)) => (
                value.clone(),
                keyed.item.value_origin.clone(),
                keyed.item.key_origin.clone(),
            ),
            (None, Raw::Args(words)) => (
                args_value(keyed.role, &keyed.key, words)?,
                keyed.item.value_origin.clone(),
                keyed.item.key_origin.clone(),
            ),
        };
        let setting = Merged {
            role: keyed.role,
            written: keyed.key,
            value,
            origin,
            key_origin,
            order: keyed.order,
        };
        match merged.get_mut(&canonical) {
            Some(earlier) if earlier.order.0 == setting.order.0 && keyed.is_file => {
                return Err(Error::Duplicate {
                    key: setting.written,
                    origin: setting.key_origin,
                    first_key: earlier.written.clone(),
                    first: earlier.key_origin.clone(),
                });
            }
            Some(earlier)
                if earlier.order.0 == setting.order.0 && shape(setting.role) == Shape::List =>
            {
                if let (Value::List(values), Value::List(more)) =
                    (&mut earlier.value, setting.value)
                {
                    values.extend(more);
                }
                earlier.order = setting.order;
            }
            _ => {
                merged.insert(canonical, setting);
            }
        }
    }
    Ok(merged)
}

fn shape(role: Role) -> Shape {
    match role {
        Role::Setting(setting) | Role::Alias(setting) => setting.shape,
        Role::Section | Role::Rlhf | Role::Unsupported(_) => Shape::Scalar,
    }
}

/// Command-line words as a value of the key's shape.
fn args_value(role: Role, key: &str, words: &[String]) -> Result<Value> {
    let text = |word: &String| Value::Str(word.clone());
    match (shape(role), words) {
        (Shape::List, []) => Err(Error::CommandLine {
            message: format!("`--{key}` needs at least one value"),
            hint: format!("write `--{key} VALUE [VALUE…]`"),
        }),
        (Shape::List, words) => Ok(Value::List(words.iter().map(text).collect())),
        (Shape::Bool, []) => Ok(Value::Bool(true)),
        (Shape::Scalar, []) => Err(Error::CommandLine {
            message: format!("`--{key}` needs a value"),
            hint: format!("write `--{key} VALUE`"),
        }),
        (_, [word]) => Ok(text(word)),
        (_, words) => Err(Error::CommandLine {
            message: format!(
                "`--{key}` takes one value, got {}: {}",
                words.len(),
                words.join(" ")
            ),
            hint: "quote a value that contains spaces: `--system \"You are a PRD writer\"`".into(),
        }),
    }
}

/// Step 3a: spellings that mean something else (`train_type: dora`, `max_steps: -1`,
/// `report_to: none`).
fn normalize(merged: &mut BTreeMap<String, Merged>) -> Result<()> {
    let word = |value: &Value| value.as_word().unwrap_or_default();

    if let Some(train_type) = merged.get_mut("train_type")
        && word(&train_type.value) == "dora"
    {
        train_type.value = Value::Str("lora".into());
        let dora = train_type.clone();
        match merged.get("use_dora") {
            Some(use_dora) if word(&use_dora.value) != "true" => {
                return Err(Error::InvalidValue {
                    key: use_dora.written.clone(),
                    origin: use_dora.origin.clone(),
                    message: format!(
                        "is {}, but `{}: dora` asks for DoRA",
                        use_dora.value.as_written(),
                        dora.written
                    ),
                    hint: Some("drop one of the two".into()),
                });
            }
            Some(_) => {}
            None => {
                let use_dora = TrainArgs::setting("use_dora").map(Role::Setting);
                if let Some(role) = use_dora {
                    merged.insert(
                        "use_dora".into(),
                        Merged {
                            role,
                            value: Value::Bool(true),
                            ..dora
                        },
                    );
                }
            }
        }
    }

    if let Some(max_steps) = merged.get_mut("max_steps")
        && word(&max_steps.value) == "-1"
    {
        max_steps.value = Value::Null;
    }

    if let Some(report_to) = merged.get_mut("report_to") {
        let items = match &report_to.value {
            Value::List(items) => items.clone(),
            Value::Null => Vec::new(),
            other => vec![other.clone()],
        };
        let mut sinks = Vec::new();
        for item in items {
            match word(&item).as_str() {
                "none" => {}
                "all" => sinks.push(Value::Str("tensorboard".into())),
                _ => sinks.push(item),
            }
        }
        sinks.dedup();
        report_to.value = Value::List(sinks);
    }
    Ok(())
}

/// Step 3b: what `oxtune sft` / `pt` cannot do (yet).
fn refuse(command: Command, setting: &Merged) -> Result<()> {
    let as_setting = || format!("{}: {}", setting.written, setting.value.as_written());
    match setting.role {
        Role::Rlhf if setting.value != Value::Null => Err(Error::NeedsRlhf {
            key: setting.written.clone(),
            origin: setting.origin.clone(),
            setting: as_setting(),
            command: command.as_str(),
        }),
        Role::Unsupported(unsupported) if !unsupported.is_neutral(&setting.value) => {
            Err(Error::NotSupported {
                key: setting.written.clone(),
                origin: setting.origin.clone(),
                setting: as_setting(),
                feature: unsupported.feature.into(),
                hint: unsupported.hint.into(),
            })
        }
        Role::Section => Err(Error::InvalidType {
            key: setting.written.clone(),
            origin: setting.origin.clone(),
            expected:
                "a mapping of tensor_parallel_size, pipeline_parallel_size and zero_optimization"
                    .into(),
            got: setting.value.describe(),
            hint: Some(format!(
                "on the command line, write `--{}.tensor_parallel_size N`",
                setting.written
            )),
        }),
        Role::Setting(field) | Role::Alias(field) if field.key == "train_type" => {
            refuse_train_type(command, setting)
        }
        Role::Setting(field) | Role::Alias(field) if field.key == "report_to" => {
            let Value::List(sinks) = &setting.value else {
                return Ok(());
            };
            match sinks.iter().find_map(|sink| {
                let name = sink.as_word()?;
                keys::OTHER_REPORTERS.contains(&name.as_str()).then_some(name)
            }) {
                Some(name) => Err(Error::NotSupported {
                    key: setting.written.clone(),
                    origin: setting.origin.clone(),
                    setting: format!("{}: {name}", setting.written),
                    feature: format!("reporting to {name}"),
                    hint: "use `tensorboard` or `none`; every run also writes output_dir/logging.jsonl".into(),
                }),
                None => Ok(()),
            }
        }
        _ => Ok(()),
    }
}

fn refuse_train_type(command: Command, setting: &Merged) -> Result<()> {
    let Some(name) = setting.value.as_word() else {
        return Ok(());
    };
    let as_setting = format!("{}: {name}", setting.written);
    if name == "qlora" {
        return Err(Error::NotSupported {
            key: setting.written.clone(),
            origin: setting.origin.clone(),
            setting: as_setting,
            feature: "QLoRA (LoRA on a 4-bit quantized base model)".into(),
            hint: format!(
                "QLoRA has not landed yet; use `{}: lora` (optionally with `use_dora: true`) on the unquantized model",
                setting.written
            ),
        });
    }
    if keys::RLHF_TRAIN_TYPES.contains(&name.as_str()) {
        return Err(Error::NeedsRlhf {
            key: setting.written.clone(),
            origin: setting.origin.clone(),
            setting: as_setting,
            command: command.as_str(),
        });
    }
    if keys::OTHER_TUNERS.contains(&name.as_str()) {
        return Err(Error::NotSupported {
            key: setting.written.clone(),
            origin: setting.origin.clone(),
            setting: as_setting,
            feature: format!("the `{name}` tuner"),
            hint: "supported: `lora` (with `use_dora` / `use_rslora`) and `full`".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::{LossScale, LrSchedulerType, ReportTo, ResumeFrom, TargetModules};

    const PRD_SFT: &str = "# SFT of the PRD assistant
model_type: qwen3-7b-chat
train_dataset: prd_data.jsonl
sft_type: lora
lora_rank: 64
learning_rate: 2e-4
max_length: 8192
output_dir: ./checkpoints/prd-assistant-v1
";

    const PRD_QLORA: &str = "# QLoRA
sft_type: qlora
lora_rank: 64
lora_alpha: 16
target_modules: [\"q_proj\", \"v_proj\"]
quantization_bit: 4
";

    const PRD_DPO: &str = "# DPO from feedback pairs
sft_type: dpo
beta: 0.1
preference_dataset: prd_feedback_pairs.jsonl
";

    const PRD_MULTI_GPU: &str = "# multi-GPU
parallelization:
  tensor_parallel_size: 4
  pipeline_parallel_size: 2
  zero_optimization: 3
";

    /// A file plus command-line words, as `oxtune sft -c job.yaml WORDS…` would give them.
    fn load(command: Command, yaml: &str, words: &[&str]) -> Result<TrainArgs> {
        TrainArgs::from_layers(
            command,
            &[
                Layer::parse_yaml(yaml, Path::new("job.yaml"))?,
                Layer::parse_args(words)?,
            ],
        )
    }

    fn sft(yaml: &str, words: &[&str]) -> Result<TrainArgs> {
        load(Command::Sft, yaml, words)
    }

    /// The error's message, or a note that there was none.
    fn message(result: Result<TrainArgs>) -> String {
        match result {
            Ok(args) => format!("no error: {args:?}"),
            Err(error) => error.to_string(),
        }
    }

    const MINIMAL: &str = "model: ./models/tiny\ndataset: train.jsonl\n";

    #[test]
    fn product_sft_yaml_parses_as_written() -> Result<()> {
        let args = sft(PRD_SFT, &[])?;
        assert_eq!(args.model, "qwen3-7b-chat");
        assert_eq!(args.model_type.as_deref(), Some("qwen3-7b-chat"));
        assert_eq!(args.dataset, ["prd_data.jsonl"]);
        assert_eq!(args.train_type, TrainType::Lora);
        assert_eq!(args.lora_rank, 64);
        assert!(
            (args.learning_rate - 2e-4).abs() < 1e-15,
            "{}",
            args.learning_rate
        );
        assert_eq!(args.max_length, Some(8192));
        assert_eq!(args.output_dir, Path::new("./checkpoints/prd-assistant-v1"));
        // ms-swift defaults for everything else.
        assert_eq!(args.lora_alpha, 32);
        assert!((args.lora_dropout - 0.05).abs() < 1e-12);
        assert_eq!(args.target_modules, TargetModules::AllLinear);
        assert_eq!(args.lr_scheduler_type, LrSchedulerType::Cosine);
        assert_eq!(args.gradient_accumulation_steps, 16);
        assert_eq!(args.save_steps, 500);
        assert_eq!(args.eval_steps, None);
        assert!(args.gradient_checkpointing && !args.packing);
        assert_eq!(args.report_to, [ReportTo::Tensorboard]);
        Ok(())
    }

    #[test]
    fn product_qlora_yaml_fails_naming_sft_type_qlora() {
        let text = message(sft(PRD_QLORA, &["--dataset", "a.jsonl", "--model", "m"]));
        assert!(text.contains("job.yaml:2:11"), "{text}");
        assert!(text.contains("`sft_type: qlora`"), "{text}");
        assert!(text.contains("not supported yet"), "{text}");
    }

    #[test]
    fn quantization_keys_fail_naming_the_key() {
        for (key, value) in [
            ("quantization_bit", "4"),
            ("quant_bits", "4"),
            ("quant_method", "bnb"),
        ] {
            let yaml = format!("{MINIMAL}{key}: {value}\n");
            let result = sft(&yaml, &[]);
            assert!(
                matches!(&result, Err(Error::NotSupported { key: named, .. }) if named == key),
                "{key}: {result:?}"
            );
            let text = message(result);
            assert!(text.contains(&format!("`{key}: {value}`")), "{text}");
            assert!(text.contains("not supported yet"), "{text}");
        }
        // Values that ask for nothing are fine.
        assert!(
            sft(
                &format!("{MINIMAL}quantization_bit: 0\nquant_bits: null\n"),
                &[]
            )
            .is_ok()
        );
        // As does a command-line override of the file's value.
        assert!(
            sft(
                &format!("{MINIMAL}sft_type: qlora\n"),
                &["--sft_type", "lora"]
            )
            .is_ok()
        );
    }

    #[test]
    fn product_dpo_yaml_fails_pointing_at_rlhf() {
        let result = sft(PRD_DPO, &[]);
        assert!(matches!(&result, Err(Error::NeedsRlhf { key, .. }) if key == "sft_type"));
        let text = message(result);
        assert!(text.contains("`sft_type: dpo`"), "{text}");
        assert!(
            text.contains("`oxtune rlhf`, which is not available yet"),
            "{text}"
        );
        for key in ["beta: 0.1", "preference_dataset: pairs.jsonl"] {
            let text = message(sft(&format!("{MINIMAL}{key}\n"), &[]));
            assert!(text.contains(&format!("`{key}`")), "{text}");
            assert!(text.contains("oxtune rlhf"), "{text}");
        }
        let text = message(load(Command::Pt, &format!("{MINIMAL}beta: 0.1\n"), &[]));
        assert!(
            text.contains("`oxtune pt` trains without preference pairs"),
            "{text}"
        );
    }

    #[test]
    fn product_multi_gpu_yaml_fails_naming_the_key() {
        let result = sft(PRD_MULTI_GPU, &[]);
        assert!(
            matches!(&result, Err(Error::MultiGpu { key, .. }) if key == "parallelization.tensor_parallel_size"),
            "{result:?}"
        );
        let text = message(result);
        assert!(text.contains("job.yaml:3:25"), "{text}");
        assert!(
            text.contains("`parallelization.tensor_parallel_size: 4`"),
            "{text}"
        );
        assert!(
            text.contains("multi-GPU training is not supported yet"),
            "{text}"
        );

        let text = message(sft(MINIMAL, &["--parallelization.zero_optimization", "3"]));
        assert!(
            text.contains("`parallelization.zero_optimization: 3`"),
            "{text}"
        );
        let text = message(sft(MINIMAL, &["--pipeline_parallel_size", "2"]));
        assert!(text.contains("`pipeline_parallel_size: 2`"), "{text}");
        let text = message(sft(&format!("{MINIMAL}deepspeed: zero3\n"), &[]));
        assert!(
            text.contains("`deepspeed: zero3`") && text.contains("multi-GPU"),
            "{text}"
        );

        // One device is fine, in either spelling.
        let yaml = format!(
            "{MINIMAL}parallelization:\n  tensor_parallel_size: 1\n  zero_optimization: 0\n"
        );
        assert!(sft(&yaml, &["--pipeline_parallel_size", "1"]).is_ok());
        // The section's entries are checked like any key.
        let text = message(sft("parallelization:\n  tensor_paralel_size: 1\n", &[]));
        assert!(
            text.contains("job.yaml:2:3: unknown key `parallelization.tensor_paralel_size`"),
            "{text}"
        );
        assert!(
            text.contains("did you mean `parallelization.tensor_parallel_size`?"),
            "{text}"
        );
        let text = message(sft(&format!("{MINIMAL}parallelization: 4\n"), &[]));
        assert!(
            text.contains("`parallelization` expects a mapping"),
            "{text}"
        );
    }

    #[test]
    fn misspelled_file_keys_fail_first_with_a_suggestion() {
        // The type error in `lora_rank` is not reached: keys are checked first.
        let yaml =
            "model: m\ndataset: a.jsonl\nlora_rank: abc\nlearnig_rate: 1e-4\nnum_epochs: 2\n";
        let result = sft(yaml, &[]);
        let Err(Error::UnknownKeys { keys }) = &result else {
            panic!("expected unknown keys, got {result:?}");
        };
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].key, "learnig_rate");
        assert_eq!(keys[0].suggestion.as_deref(), Some("learning_rate"));
        let text = message(result);
        assert!(
            text.contains(
                "job.yaml:4:1: unknown key `learnig_rate`\nhint: did you mean `learning_rate`?"
            ),
            "{text}"
        );
        assert!(text.contains("did you mean `num_train_epochs`?"), "{text}");
    }

    #[test]
    fn misspelled_command_line_keys_fail_with_a_suggestion() {
        let text = message(sft(MINIMAL, &["--learnig_rate", "1e-4"]));
        assert_eq!(
            text,
            "command line: unknown option `--learnig_rate`\nhint: did you mean `--learning_rate`?"
        );
        // Reported together with the file's, before the file's type error.
        let text = message(sft(
            "lora_rank: abc\nwarmup_ration: 0.1\n",
            &["--sft_typ", "lora"],
        ));
        assert!(text.contains("did you mean `warmup_ratio`?"), "{text}");
        assert!(text.contains("did you mean `--sft_type`?"), "{text}");
        let text = message(sft(MINIMAL, &["--zzz_option", "1"]));
        assert!(
            text.contains("docs/configuration.md lists every key"),
            "{text}"
        );
    }

    #[test]
    fn command_line_overrides_the_file() -> Result<()> {
        let yaml = "model: m\ntrain_dataset: [a.jsonl, b.jsonl]\nsft_type: lora\nlearning_rate: 2e-4\npacking: false\n";
        let args = sft(
            yaml,
            &[
                "--learning_rate",
                "5e-5",
                "--dataset",
                "c.jsonl",
                "d.jsonl#100",
                "--dataset",
                "e.jsonl",
                "--packing",
                "true",
                "--train_type",
                "full",
                "--target_modules",
                "q_proj",
                "v_proj",
                "--max_steps",
                "-1",
                "--report_to",
                "none",
            ],
        )?;
        assert!((args.learning_rate - 5e-5).abs() < 1e-15);
        assert_eq!(args.dataset, ["c.jsonl", "d.jsonl#100", "e.jsonl"]);
        assert!(args.packing);
        assert_eq!(args.train_type, TrainType::Full);
        assert_eq!(
            args.target_modules,
            TargetModules::Names(vec!["q_proj".into(), "v_proj".into()])
        );
        assert_eq!(args.max_steps, None);
        assert!(args.report_to.is_empty());
        // A repeated scalar flag: the last one wins.
        let args = sft(
            MINIMAL,
            &["--lora_rank", "4", "--lora_rank", "16", "--packing"],
        )?;
        assert_eq!(args.lora_rank, 16);
        assert!(args.packing);
        Ok(())
    }

    #[test]
    fn type_errors_name_the_key_and_the_expected_type() {
        let text = message(sft(&format!("{MINIMAL}lora_rank: abc\n"), &[]));
        assert_eq!(
            text,
            "job.yaml:3:12: `lora_rank` expects an integer ≥ 0, got `abc`"
        );
        let text = message(sft(MINIMAL, &["--learning_rate", "fast"]));
        assert_eq!(
            text,
            "command line `--learning_rate`: `learning_rate` expects a number, got `fast`"
        );
        let text = message(sft(MINIMAL, &["--packing", "maybe"]));
        assert!(
            text.contains("`packing` expects true or false, got `maybe`"),
            "{text}"
        );
        let text = message(sft(&format!("{MINIMAL}lr_scheduler_type: wsd\n"), &[]));
        assert!(
            text.contains("`lr_scheduler_type` expects one of `linear`, `cosine`, `constant`, `constant_with_warmup`, got `wsd`"),
            "{text}"
        );
        let text = message(sft(&format!("{MINIMAL}lora_rank: 8.5\n"), &[]));
        assert!(text.contains("hint: write a whole number"), "{text}");
        let text = message(sft(&format!("{MINIMAL}save_steps: -5\n"), &[]));
        assert!(text.contains("hint: it cannot be negative"), "{text}");
        let text = message(sft(&format!("{MINIMAL}sft_type: lorra\n"), &[]));
        assert!(
            text.contains("`sft_type` expects one of `lora`, `full`, got `lorra`"),
            "{text}"
        );
        let text = message(sft(MINIMAL, &["--lora_rank", "8", "16"]));
        assert!(
            text.contains("`--lora_rank` takes one value, got 2"),
            "{text}"
        );
        let text = message(sft(MINIMAL, &["--lora_rank"]));
        assert!(text.contains("`--lora_rank` needs a value"), "{text}");
    }

    #[test]
    fn ranges_are_checked_after_merging() {
        let cases = [
            ("lora_rank: 0", "`lora_rank` must be at least 1, got 0"),
            (
                "lora_dropout: 1.0",
                "`lora_dropout` must be in [0, 1), got 1",
            ),
            ("learning_rate: 0", "`learning_rate` must be above 0, got 0"),
            ("learning_rate: -1e-4", "`learning_rate` must be above 0"),
            (
                "warmup_ratio: 1.5",
                "`warmup_ratio` must be in [0, 1], got 1.5",
            ),
            (
                "split_dataset_ratio: 1.0",
                "`split_dataset_ratio` must be in [0, 1), got 1",
            ),
            ("num_train_epochs: 0", "`num_train_epochs` must be above 0"),
            ("adam_beta2: 1.0", "`adam_beta2` must be in [0, 1)"),
            ("max_grad_norm: -1", "`max_grad_norm` must be 0 or more"),
            (
                "per_device_train_batch_size: 0",
                "`per_device_train_batch_size` must be at least 1",
            ),
            ("max_length: 0", "`max_length` must be at least 1"),
            (
                "device: tpu",
                "`device` must be `auto`, `cpu`, `cuda` or `cuda:N`, got `tpu`",
            ),
            (
                "train_type: full\nuse_dora: true",
                "`use_dora` is true, but `train_type` is `full`",
            ),
        ];
        for (line, expected) in cases {
            let text = message(sft(&format!("{MINIMAL}{line}\n"), &[]));
            assert!(text.contains(expected), "{line}: {text}");
            assert!(text.starts_with("job.yaml:"), "{line}: {text}");
        }
        let text = message(sft(MINIMAL, &["--lora_dropout", "1.5"]));
        assert!(
            text.starts_with("command line `--lora_dropout`: `lora_dropout` must be in [0, 1)"),
            "{text}"
        );
        let text = message(sft(
            &format!("{MINIMAL}val_dataset: v.jsonl\nsplit_dataset_ratio: 0.1\n"),
            &[],
        ));
        assert!(text.contains("but `val_dataset` is given too"), "{text}");
    }

    #[test]
    fn required_keys() {
        let result = sft("model: m\n", &[]);
        assert!(matches!(&result, Err(Error::Missing { key, .. }) if key == "dataset"));
        assert!(message(result).contains("hint: set `dataset` (or `train_dataset`)"));
        let result = sft("dataset: a.jsonl\n", &[]);
        assert!(matches!(&result, Err(Error::Missing { key, .. }) if key == "model"));
        assert!(sft("dataset: a.jsonl\n", &["--model_type", "smollm2"]).is_ok());
    }

    #[test]
    fn defaults_that_depend_on_other_keys() -> Result<()> {
        let lora = sft(MINIMAL, &[])?;
        assert!((lora.learning_rate - 1e-4).abs() < 1e-15);
        assert_eq!(lora.output_dir, Path::new("output/tiny"));
        let full = sft(MINIMAL, &["--train_type", "full", "--batch_size", "3"])?;
        assert!((full.learning_rate - 1e-5).abs() < 1e-15);
        assert_eq!(full.per_device_train_batch_size, 3);
        assert_eq!(full.gradient_accumulation_steps, 6);
        assert_eq!(full.samples_per_step(), 18);
        let split = sft(
            MINIMAL,
            &["--split_dataset_ratio", "0.05", "--save_steps", "50"],
        )?;
        assert_eq!(split.eval_steps, Some(50));
        let explicit = sft(MINIMAL, &["--val_dataset", "v.jsonl", "--eval_steps", "20"])?;
        assert_eq!(explicit.eval_steps, Some(20));
        // Without validation data there is nothing to evaluate.
        let none = sft(MINIMAL, &["--eval_steps", "20"])?;
        assert_eq!(none.eval_steps, None);
        let hub = sft("model: Qwen/Qwen3-0.6B/\ndataset: a.jsonl\n", &[])?;
        assert_eq!(hub.output_dir, Path::new("output/Qwen3-0.6B"));
        Ok(())
    }

    #[test]
    fn pt_defaults() -> Result<()> {
        let args = load(Command::Pt, "model: m\ndataset: corpus.txt\n", &[])?;
        assert!(args.packing);
        assert_eq!(args.loss_scale, LossScale::All);
        let args = load(
            Command::Pt,
            "model: m\ndataset: corpus.txt\npacking: false\n",
            &[],
        )?;
        assert!(!args.packing);
        Ok(())
    }

    #[test]
    fn old_and_new_names_are_one_key() {
        let text = message(sft(
            &format!("{MINIMAL}sft_type: lora\ntrain_type: full\n"),
            &[],
        ));
        assert_eq!(
            text,
            "job.yaml:4:1: `train_type` sets the same thing as `sft_type` at job.yaml:3:1\nhint: keep one of them"
        );
        let text = message(sft(
            &format!(
                "{MINIMAL}tensor_parallel_size: 1\nparallelization:\n  tensor_parallel_size: 1\n"
            ),
            &[],
        ));
        assert!(
            text.contains("sets the same thing as `tensor_parallel_size`"),
            "{text}"
        );
    }

    #[test]
    fn dora_resume_and_other_spellings() -> Result<()> {
        let args = sft(&format!("{MINIMAL}train_type: dora\n"), &[])?;
        assert_eq!(args.train_type, TrainType::Lora);
        assert!(args.use_dora);
        let text = message(sft(
            &format!("{MINIMAL}train_type: dora\nuse_dora: false\n"),
            &[],
        ));
        assert!(
            text.contains("`use_dora` is false, but `train_type: dora` asks for DoRA"),
            "{text}"
        );

        let args = sft(&format!("{MINIMAL}resume_from_checkpoint: true\n"), &[])?;
        assert_eq!(args.resume_from_checkpoint, Some(ResumeFrom::Latest));
        let args = sft(MINIMAL, &["--resume_from_checkpoint", "out/checkpoint-4"])?;
        assert_eq!(
            args.resume_from_checkpoint,
            Some(ResumeFrom::Path("out/checkpoint-4".into()))
        );
        let args = sft(&format!("{MINIMAL}resume_from_checkpoint: false\n"), &[])?;
        assert_eq!(args.resume_from_checkpoint, None);

        let args = sft(
            &format!("{MINIMAL}dtype: AUTO\nmax_steps: -1\nreport_to: all\n"),
            &[],
        )?;
        assert_eq!(args.max_steps, None);
        assert_eq!(args.report_to, [ReportTo::Tensorboard]);
        let text = message(sft(
            &format!("{MINIMAL}report_to: [tensorboard, wandb]\n"),
            &[],
        ));
        assert!(
            text.contains("`report_to: wandb`: reporting to wandb is not supported yet"),
            "{text}"
        );
        let text = message(sft(&format!("{MINIMAL}train_type: adalora\n"), &[]));
        assert!(
            text.contains("the `adalora` tuner is not supported yet"),
            "{text}"
        );
        Ok(())
    }

    #[test]
    fn resolved_dump_round_trips() -> Result<()> {
        let busy = "model: ./models/SmolLM2-135M-Instruct
model_type: smollm2
dataset: [a.jsonl, 'b.jsonl#200']
val_dataset: v.jsonl
system: |
  You write PRDs.
  Be precise: \"no fluff\".
max_length: 2048
truncation_strategy: left
packing: true
packing_length: 4096
train_type: lora
use_dora: true
use_rslora: true
target_modules: [q_proj, k_proj, v_proj, o_proj]
modules_to_save: [lm_head]
lora_rank: 16
lora_alpha: 8
lora_dropout: 0.0
learning_rate: 3.0e-4
num_train_epochs: 0.5
max_steps: 120
lr_scheduler_type: constant_with_warmup
warmup_steps: 7
weight_decay: 0.0
adam_epsilon: 1e-6
torch_dtype: bf16
device: cuda:1
save_total_limit: 2
resume_from_checkpoint: out/checkpoint-40
report_to: none
seed: 7
";
        for (command, yaml) in [
            (Command::Sft, PRD_SFT),
            (Command::Sft, busy),
            (Command::Pt, "model: m\ndataset: corpus.txt\n"),
        ] {
            let args = load(command, yaml, &[])?;
            let dumped = args.to_yaml()?;
            let again = TrainArgs::from_yaml_str(command, &dumped, Path::new("config.yaml"))?;
            assert_eq!(again, args, "{dumped}");
            // Every key is written out.
            for setting in TrainArgs::SETTINGS {
                assert!(
                    dumped.contains(&format!("\n{}:", setting.key)),
                    "{}\n{dumped}",
                    setting.key
                );
            }
        }
        Ok(())
    }

    #[test]
    fn from_command_line_reads_the_file_given_by_c() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|source| Error::Read {
            path: "tempdir".into(),
            source,
        })?;
        let path = dir.path().join("prd_generator.yaml");
        std::fs::write(&path, PRD_SFT).map_err(|source| Error::Read {
            path: path.clone(),
            source,
        })?;
        let path_text = path.display().to_string();
        let args = TrainArgs::from_command_line(
            Command::Sft,
            &["-c", path_text.as_str(), "--lora_rank", "8"],
        )?;
        assert_eq!(args.lora_rank, 8);
        assert_eq!(args.model, "qwen3-7b-chat");
        let args = TrainArgs::from_command_line(
            Command::Sft,
            &["--lora_alpha", "64", &format!("--config={path_text}")],
        )?;
        assert_eq!(args.lora_alpha, 64);

        let missing = dir.path().join("nope.yaml").display().to_string();
        let text = message(TrainArgs::from_command_line(
            Command::Sft,
            &["-c", missing.as_str()],
        ));
        assert!(
            text.starts_with(&format!("cannot read config file {missing}")),
            "{text}"
        );
        let text = message(TrainArgs::from_command_line(Command::Sft, &["-c"]));
        assert!(text.contains("`-c` needs a file"), "{text}");
        let text = message(TrainArgs::from_command_line(
            Command::Sft,
            &["-c", "a.yaml", "--config", "b.yaml"],
        ));
        assert!(text.contains("more than one config file"), "{text}");
        Ok(())
    }
}

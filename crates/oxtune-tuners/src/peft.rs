//! peft's adapter format: `adapter_config.json` and `adapter_model.safetensors`, read and
//! written so that `peft.PeftModel.from_pretrained` loads oxtune's adapters unchanged and
//! oxtune loads adapters trained with peft.
//!
//! Tensor names are `base_model.model.<module>.lora_A.weight`, `.lora_B.weight` and, for
//! DoRA, `.lora_magnitude_vector`.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use oxtune_models::CausalLm;
use oxtune_tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::lora::{LoraSettings, LoraTuner, TargetModules};
use crate::{Error, Result};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const PREFIX: &str = "base_model.model.";

/// One module's (lora_A, lora_B, lora_magnitude_vector) as found in the file.
pub type AdapterTensors = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

/// The fields of peft's `LoraConfig` that oxtune reads and writes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdapterConfig {
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f32,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    /// A list of module names, or the string `all-linear`.
    pub target_modules: serde_json::Value,
    #[serde(default = "default_bias")]
    pub bias: String,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub rank_pattern: HashMap<String, serde_json::Value>,
    #[serde(default)]
    pub alpha_pattern: HashMap<String, serde_json::Value>,
    #[serde(default)]
    pub inference_mode: bool,
    #[serde(default = "default_init")]
    pub init_lora_weights: serde_json::Value,
}

fn default_bias() -> String {
    "none".into()
}

fn default_init() -> serde_json::Value {
    serde_json::Value::Bool(true)
}

/// Writes the tuner's adapters into `dir` (created if needed) in peft's format. Each file is
/// written to a temporary name and renamed, so a reader never sees half a file.
pub fn save(tuner: &LoraTuner, dir: &Path, base_model: Option<&str>) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut modules = BTreeSet::new();
    for (module, _) in &tuner.adapters {
        modules.insert(module.rsplit('.').next().unwrap_or(module).to_owned());
    }
    let settings = &tuner.settings;
    let config = AdapterConfig {
        peft_type: "LORA".into(),
        task_type: Some("CAUSAL_LM".into()),
        base_model_name_or_path: base_model.map(str::to_owned),
        r: settings.rank,
        lora_alpha: settings.alpha,
        lora_dropout: settings.dropout,
        use_rslora: settings.use_rslora,
        use_dora: settings.use_dora,
        target_modules: serde_json::json!(modules),
        bias: default_bias(),
        fan_in_fan_out: false,
        modules_to_save: None,
        rank_pattern: HashMap::new(),
        alpha_pattern: HashMap::new(),
        inference_mode: true,
        init_lora_weights: default_init(),
    };
    let json = serde_json::to_string_pretty(&config).map_err(|e| Error::Adapter {
        path: dir.join(CONFIG_FILE),
        message: e.to_string(),
    })?;
    write_atomic(&dir.join(CONFIG_FILE), json.as_bytes())?;
    let tensors: HashMap<String, Tensor> = tuner
        .trainable()
        .into_iter()
        .map(|(name, var)| (name, var.as_tensor().detach()))
        .collect();
    let temporary = dir.join(format!(".{WEIGHTS_FILE}.tmp"));
    oxtune_tensor::candle::safetensors::save(&tensors, &temporary)?;
    rename(&temporary, &dir.join(WEIGHTS_FILE))
}

/// An adapter as read from disk: its settings and each module's (A, B, magnitude).
#[derive(Debug)]
pub struct AdapterFile {
    pub settings: LoraSettings,
    pub modules: HashMap<String, AdapterTensors>,
    /// `adapter_model.safetensors`, for messages.
    pub weights_path: std::path::PathBuf,
}

/// Reads a peft LoRA/DoRA adapter from `dir` and attaches it to `model`.
pub fn load(model: &mut CausalLm, dir: &Path, device: &Device) -> Result<LoraTuner> {
    let AdapterFile {
        settings,
        mut modules,
        weights_path,
    } = read(dir, device)?;
    let adapter_error = |message: String| Error::Adapter {
        path: weights_path.clone(),
        message,
    };
    let mut attached = 0;
    let tuner = LoraTuner::attach_with(model, &settings, |module, linear| {
        let (a, b, magnitude) = modules.remove(module).unwrap_or_default();
        let (a, b) = check_module(
            module,
            a,
            b,
            magnitude.as_ref(),
            linear.weight().dims(),
            &settings,
            &weights_path,
        )?;
        attached += 1;
        Ok((a, b, magnitude))
    })?;
    if let Some(module) = modules.keys().next() {
        return Err(adapter_error(format!(
            "module `{module}` is not a linear layer of this model\nhint: the adapter was trained on another base model"
        )));
    }
    tracing::info!(adapter = %dir.display(), layers = attached, dora = settings.use_dora, "loaded adapter");
    Ok(tuner)
}

/// A module's A and B, checked against its base weight's (out, in) shape.
fn check_module(
    module: &str,
    a: Option<Tensor>,
    b: Option<Tensor>,
    magnitude: Option<&Tensor>,
    weight_shape: &[usize],
    settings: &LoraSettings,
    weights_path: &Path,
) -> Result<(Tensor, Tensor)> {
    let adapter_error = |message: String| Error::Adapter {
        path: weights_path.to_path_buf(),
        message,
    };
    let missing = |what: &str| adapter_error(format!("`{module}` has no {what} tensor"));
    let a = a.ok_or_else(|| missing("lora_A"))?;
    let b = b.ok_or_else(|| missing("lora_B"))?;
    let &[out_features, in_features] = weight_shape else {
        return Err(adapter_error(format!(
            "`{module}` is not a 2-D linear weight"
        )));
    };
    let r = settings.rank;
    if a.dims() != [r, in_features] || b.dims() != [out_features, r] {
        return Err(adapter_error(format!(
            "`{module}`: lora_A {:?} / lora_B {:?} do not fit a ({out_features}, {in_features}) layer with r = {r}\nhint: the adapter was trained on another base model",
            a.dims(),
            b.dims()
        )));
    }
    if settings.use_dora && magnitude.is_none() {
        return Err(missing("lora_magnitude_vector"));
    }
    Ok((a, b))
}

/// Folds the adapter in `adapter_dir` into the checkpoint `base` and writes the merged
/// Hugging Face weights into `output_dir` in `dtype`, tensor by tensor: each base tensor is
/// read (memory-mapped), merged if the adapter targets it, and written with its shard, so
/// at most one shard is in memory, whatever the model's size. Returns how many layers were
/// merged. Config and tokenizer files are the caller's to copy.
pub fn merge_checkpoint(
    base: &oxtune_models::Weights,
    adapter_dir: &Path,
    output_dir: &Path,
    dtype: oxtune_tensor::DType,
    max_shard_bytes: usize,
) -> Result<usize> {
    use oxtune_models::WeightSource as _;
    let AdapterFile {
        settings,
        mut modules,
        weights_path,
    } = read(adapter_dir, &Device::Cpu)?;
    let plan = base.plan();
    let mut merged = 0;
    oxtune_models::checkpoint::save_sharded_with(
        output_dir,
        &plan,
        dtype,
        max_shard_bytes,
        &mut |name| {
            let shape = plan
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, s)| s.clone())
                .unwrap_or_default();
            let weight = base.get(name, &shape)?;
            let Some((a, b, magnitude)) = name
                .strip_suffix(".weight")
                .and_then(|module| modules.remove(module))
            else {
                return Ok(weight);
            };
            let module = name.trim_end_matches(".weight");
            let to_model_error = |e: Error| {
                oxtune_models::Error::Tensor(oxtune_tensor::candle::Error::Msg(e.to_string()))
            };
            let (a, b) = check_module(
                module,
                a,
                b,
                magnitude.as_ref(),
                &shape,
                &settings,
                &weights_path,
            )
            .map_err(to_model_error)?;
            let adapter =
                crate::lora::LoraAdapter::frozen(&a, &b, magnitude.as_ref(), settings.scaling())
                    .map_err(to_model_error)?;
            merged += 1;
            adapter.merged_weight(&weight).map_err(to_model_error)
        },
    )?;
    if let Some(module) = modules.keys().next() {
        return Err(Error::Adapter {
            path: weights_path,
            message: format!(
                "module `{module}` is not a linear layer of the base model\nhint: the adapter was trained on another base model"
            ),
        });
    }
    Ok(merged)
}

/// Reads a peft LoRA/DoRA adapter: `adapter_config.json` (checked) and its tensors by module.
pub fn read(dir: &Path, device: &Device) -> Result<AdapterFile> {
    let config_path = dir.join(CONFIG_FILE);
    let adapter_error = |path: &Path, message: String| Error::Adapter {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(&config_path).map_err(|e| {
        adapter_error(&config_path, format!("{e}\nhint: an adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE} (peft's save_pretrained output)"))
    })?;
    let config: AdapterConfig =
        serde_json::from_str(&text).map_err(|e| adapter_error(&config_path, e.to_string()))?;
    if config.peft_type != "LORA" {
        return Err(adapter_error(
            &config_path,
            format!(
                "peft_type `{}` is not supported; oxtune reads LORA adapters (LoRA, rsLoRA, DoRA)",
                config.peft_type
            ),
        ));
    }
    if !config.rank_pattern.is_empty() || !config.alpha_pattern.is_empty() {
        return Err(adapter_error(
            &config_path,
            "rank_pattern / alpha_pattern (per-layer ranks) are not supported yet".into(),
        ));
    }
    if config.fan_in_fan_out {
        return Err(adapter_error(
            &config_path,
            "fan_in_fan_out adapters (GPT-2 Conv1D layers) do not apply to the supported models"
                .into(),
        ));
    }
    let weights_path = dir.join(WEIGHTS_FILE);
    let mut tensors =
        oxtune_tensor::candle::safetensors::load(&weights_path, device).map_err(|e| {
            adapter_error(
                &weights_path,
                format!("{e}\nhint: the file may be truncated; save the adapter again"),
            )
        })?;
    // Module names present in the file; peft keeps `.default` in some versions' keys.
    let mut parts: HashMap<String, AdapterTensors> = HashMap::new();
    for (key, tensor) in tensors.drain() {
        let key = key.replace(".default", "");
        let Some(rest) = key.strip_prefix(PREFIX) else {
            return Err(adapter_error(
                &weights_path,
                format!("tensor `{key}` does not start with `{PREFIX}`"),
            ));
        };
        let (module, slot) = if let Some(module) = rest.strip_suffix(".lora_A.weight") {
            (module, 0)
        } else if let Some(module) = rest.strip_suffix(".lora_B.weight") {
            (module, 1)
        } else if let Some(module) = rest
            .strip_suffix(".lora_magnitude_vector")
            .or_else(|| rest.strip_suffix(".lora_magnitude_vector.weight"))
        {
            (module, 2)
        } else {
            return Err(adapter_error(
                &weights_path,
                format!(
                    "tensor `{key}` is not a LoRA/DoRA tensor (modules_to_save and biases are not supported yet)"
                ),
            ));
        };
        let entry = parts.entry(module.to_owned()).or_default();
        match slot {
            0 => entry.0 = Some(tensor),
            1 => entry.1 = Some(tensor),
            _ => entry.2 = Some(tensor),
        }
    }
    let settings = LoraSettings {
        rank: config.r,
        alpha: config.lora_alpha,
        dropout: config.lora_dropout,
        use_rslora: config.use_rslora,
        use_dora: config.use_dora,
        target_modules: TargetModules::Names(parts.keys().cloned().collect()),
    };
    Ok(AdapterFile {
        settings,
        modules: parts,
        weights_path,
    })
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&temporary, bytes).map_err(|source| Error::Io {
        path: temporary.clone(),
        source,
    })?;
    rename(&temporary, path)
}

fn rename(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to).map_err(|source| Error::Io {
        path: to.to_path_buf(),
        source,
    })
}

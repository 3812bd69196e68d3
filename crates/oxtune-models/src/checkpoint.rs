//! Safetensors checkpoints: one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`, memory-mapped and read tensor by tensor.
//!
//! Every failure names the file or the tensor: a missing shard, a corrupt header, a tensor
//! absent from the checkpoint, a shape that disagrees with config.json.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use oxtune_tensor::candle::safetensors::MmapedSafetensors;
use oxtune_tensor::{DType, Device, Tensor};
use serde::Deserialize;

use crate::{Error, Result};

/// The single-file weights name.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

#[derive(Debug, Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

/// Where a model's tensors come from: a checkpoint on disk ([`Weights`]) or random
/// initialisation ([`RandomWeights`], for benchmarks of a config without its checkpoint).
pub trait WeightSource {
    /// The tensor `name`, which must have `shape`, in [`Self::dtype`] on [`Self::device`].
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor>;
    /// Whether the source holds `name`.
    fn contains(&self, name: &str) -> bool;
    fn dtype(&self) -> DType;
    fn device(&self) -> &Device;
}

/// Random weights: normal(0, 0.02) matrices and biases, norms at 1, as transformers
/// initialises a fresh model. Every tensor a model asks for exists.
#[derive(Debug, Clone)]
pub struct RandomWeights {
    dtype: DType,
    device: Device,
}

impl RandomWeights {
    pub fn new(dtype: DType, device: &Device) -> Self {
        Self {
            dtype,
            device: device.clone(),
        }
    }
}

impl WeightSource for RandomWeights {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let tensor = if name.contains("norm") {
            Tensor::ones(shape, DType::F32, &self.device)?
        } else {
            Tensor::randn(0f32, 0.02, shape, &self.device)?
        };
        Ok(tensor.to_dtype(self.dtype)?)
    }

    fn contains(&self, _name: &str) -> bool {
        true
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn device(&self) -> &Device {
        &self.device
    }
}

/// Memory-mapped checkpoint weights, converted to `dtype` on `device` as they are read.
pub struct Weights {
    files: Vec<(PathBuf, MmapedSafetensors)>,
    /// tensor name -> index into `files`
    locations: HashMap<String, usize>,
    dtype: DType,
    device: Device,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weights")
            .field(
                "files",
                &self.files.iter().map(|(p, _)| p).collect::<Vec<_>>(),
            )
            .field("tensors", &self.locations.len())
            .field("dtype", &self.dtype)
            .finish_non_exhaustive()
    }
}

impl Weights {
    /// Maps the weights of the checkpoint in `dir`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let index_path = dir.join(INDEX_FILE);
        let paths: Vec<PathBuf> = if index_path.is_file() {
            let index: ShardIndex = crate::error::read_json(&index_path)?;
            let names: BTreeSet<&String> = index.weight_map.values().collect();
            names.into_iter().map(|name| dir.join(name)).collect()
        } else if dir.join(SINGLE_FILE).is_file() {
            vec![dir.join(SINGLE_FILE)]
        } else {
            return Err(Error::MissingFile {
                path: dir.join(SINGLE_FILE),
                hint: format!(
                    "no {SINGLE_FILE} or {INDEX_FILE} in {}; oxtune reads safetensors weights (import a .gguf file with `oxtune export --from_gguf`)",
                    dir.display()
                ),
            });
        };
        let mut files = Vec::with_capacity(paths.len());
        let mut locations = HashMap::new();
        for path in paths {
            if !path.is_file() {
                return Err(Error::MissingFile {
                    path,
                    hint: format!(
                        "{} lists this shard; copy the complete checkpoint",
                        index_path.display()
                    ),
                });
            }
            let mapped = map_file(&path)?;
            for (name, _) in mapped.tensors() {
                locations.insert(name, files.len());
            }
            files.push((path, mapped));
        }
        Ok(Self {
            files,
            locations,
            dtype,
            device: device.clone(),
        })
    }

    /// Every tensor's name and shape, file by file in the checkpoint's own order, read from
    /// the headers without loading any data.
    pub fn plan(&self) -> Vec<(String, Vec<usize>)> {
        let mut plan = Vec::with_capacity(self.locations.len());
        for (_, mapped) in &self.files {
            let mut tensors: Vec<(String, Vec<usize>)> = mapped
                .tensors()
                .into_iter()
                .map(|(name, view)| (name, view.shape().to_vec()))
                .collect();
            tensors.sort_by(|a, b| a.0.cmp(&b.0));
            plan.extend(tensors);
        }
        plan
    }

    fn describe(&self) -> String {
        match self.files.as_slice() {
            [(path, _)] => path.display().to_string(),
            files => format!(
                "{} shards ({})",
                files.len(),
                files
                    .iter()
                    .map(|(p, _)| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

impl WeightSource for Weights {
    /// Reads `name`, checks its shape against `shape`, converts it to the load dtype.
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let index = *self.locations.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.into(),
            location: self.describe(),
            hint: "the checkpoint does not match its config.json architecture, or a shard is missing".into(),
        })?;
        let (path, mapped) = &self.files[index];
        let view = mapped.get(name).map_err(|e| safetensors_error(path, &e))?;
        if view.shape() != shape {
            return Err(Error::ShapeMismatch {
                name: name.into(),
                location: path.display().to_string(),
                expected: shape.to_vec(),
                got: view.shape().to_vec(),
            });
        }
        let tensor = mapped
            .load(name, &self.device)
            .map_err(|e| safetensors_error(path, &e))?;
        Ok(tensor.to_dtype(self.dtype)?)
    }

    fn contains(&self, name: &str) -> bool {
        self.locations.contains_key(name)
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn device(&self) -> &Device {
        &self.device
    }
}

/// The files that, besides the weights and `config.json`, make a Hugging Face model
/// directory usable: tokenizer, chat template, generation defaults.
pub const COMPANION_FILES: &[&str] = &[
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

/// Copies the [`COMPANION_FILES`] that `from` holds into `to` (a derived checkpoint: merged,
/// fully fine-tuned).
pub fn copy_companion_files(from: &Path, to: &Path) -> Result<()> {
    for file in COMPANION_FILES {
        let source = from.join(file);
        if source.is_file() {
            std::fs::copy(&source, to.join(file)).map_err(|source_error| Error::Io {
                path: source,
                source: source_error,
            })?;
        }
    }
    Ok(())
}

/// Writes `tensors` as a Hugging Face checkpoint into `dir`: one `model.safetensors`, or
/// shards of at most `max_shard_bytes` (`model-0000i-of-0000n.safetensors`) with
/// `model.safetensors.index.json`; see [`save_sharded_with`].
pub fn save_sharded(
    dir: &Path,
    tensors: &[(String, Tensor)],
    dtype: DType,
    max_shard_bytes: usize,
) -> Result<Vec<PathBuf>> {
    let plan: Vec<(String, Vec<usize>)> = tensors
        .iter()
        .map(|(name, t)| (name.clone(), t.dims().to_vec()))
        .collect();
    let by_name: HashMap<&str, &Tensor> =
        tensors.iter().map(|(name, t)| (name.as_str(), t)).collect();
    save_sharded_with(dir, &plan, dtype, max_shard_bytes, &mut |name| {
        by_name
            .get(name)
            .map(|t| t.detach())
            .ok_or_else(|| Error::MissingTensor {
                name: name.into(),
                location: "the tensors to save".into(),
                hint: "internal: the plan names a tensor that was not given".into(),
            })
    })
}

/// Writes the tensors of `plan` (name, shape), in order, as a Hugging Face checkpoint in
/// `dtype`, asking `produce` for each tensor only when its shard is written: at most one
/// shard's tensors are in memory, so a checkpoint larger than memory can be written tensor
/// by tensor from another one. Each file is written under a temporary name and renamed.
pub fn save_sharded_with(
    dir: &Path,
    plan: &[(String, Vec<usize>)],
    dtype: DType,
    max_shard_bytes: usize,
    produce: &mut dyn FnMut(&str) -> Result<Tensor>,
) -> Result<Vec<PathBuf>> {
    let bytes_of = |shape: &[usize]| shape.iter().product::<usize>() * dtype.size_in_bytes();
    let mut shards: Vec<Vec<&(String, Vec<usize>)>> = vec![Vec::new()];
    let mut bytes = 0;
    for entry in plan {
        let size = bytes_of(&entry.1);
        if bytes > 0 && bytes + size > max_shard_bytes {
            shards.push(Vec::new());
            bytes = 0;
        }
        bytes += size;
        shards
            .last_mut()
            .expect("shards starts non-empty")
            .push(entry);
    }
    let count = shards.len();
    let mut written = Vec::with_capacity(count + 1);
    let mut weight_map = serde_json::Map::new();
    for (index, shard) in shards.into_iter().enumerate() {
        let name = if count == 1 {
            SINGLE_FILE.to_owned()
        } else {
            format!("model-{:05}-of-{count:05}.safetensors", index + 1)
        };
        let mut converted = HashMap::with_capacity(shard.len());
        for (tensor_name, shape) in shard {
            let tensor = produce(tensor_name)?;
            if tensor.dims() != shape.as_slice() {
                return Err(Error::ShapeMismatch {
                    name: tensor_name.clone(),
                    location: name.clone(),
                    expected: shape.clone(),
                    got: tensor.dims().to_vec(),
                });
            }
            converted.insert(tensor_name.clone(), tensor.to_dtype(dtype)?);
            weight_map.insert(tensor_name.clone(), serde_json::Value::String(name.clone()));
        }
        let path = dir.join(&name);
        let temporary = dir.join(format!(".{name}.tmp"));
        oxtune_tensor::candle::safetensors::save(&converted, &temporary)?;
        std::fs::rename(&temporary, &path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        written.push(path);
    }
    if count > 1 {
        let total: usize = plan.iter().map(|(_, shape)| bytes_of(shape)).sum();
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let path = dir.join(INDEX_FILE);
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&index).unwrap_or_default(),
        )
        .map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        written.push(path);
    }
    Ok(written)
}

fn safetensors_error(path: &Path, error: &dyn std::fmt::Display) -> Error {
    Error::Safetensors {
        path: path.to_path_buf(),
        message: error.to_string(),
    }
}

#[expect(unsafe_code, reason = "memory-mapping a file is unsafe by nature")]
fn map_file(path: &Path) -> Result<MmapedSafetensors> {
    // SAFETY: the mapping is read-only and lives as long as `Weights`; a checkpoint changed on
    // disk while it is loaded is outside what any loader can guard against (safetensors and
    // transformers map the same way).
    unsafe { MmapedSafetensors::new(path) }.map_err(|e| safetensors_error(path, &e))
}

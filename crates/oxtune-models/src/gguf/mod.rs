//! GGUF import: a llama.cpp `.gguf` file in, a Hugging Face model directory out.
//!
//! ```text
//! model.gguf --Content::read--> metadata + tensor infos            (no tensor data yet)
//!   metadata  --hf_config-->   config.json, generation_config.json
//!   tokenizer.ggml.* --tokenizer--> tokenizer.json, tokenizer_config.json (+ chat template)
//!   tensors, one at a time: read -> dequantize (candle) -> un-permute q/k (llama) -> dtype
//!           --writer--> model.safetensors (or shards + model.safetensors.index.json)
//! all of it written into `<output_dir>.tmp-<pid>/`, then renamed to `<output_dir>`
//! ```
//!
//! Supported architectures: `llama` (Llama 2/3, SmolLM2, Mistral-like), `qwen2`, `qwen3`.
//! Every quantization candle dequantizes is accepted (F32, F16, BF16, Q4_0, Q4_1, Q5_0,
//! Q5_1, Q8_0, Q2_K…Q8_K); tensors stored as F32 stay F32, the others are written in
//! [`ImportOptions::dtype`]. Dequantized weights are exactly what llama.cpp computes with, not
//! the original full-precision checkpoint.

mod hf_config;
mod metadata;
pub mod tensors;
pub mod tokenizer;
mod writer;

use std::fs::File;
use std::io::{BufReader, Write as _};
use std::path::{Path, PathBuf};

use oxtune_tensor::candle::quantized::GgmlDType;
use oxtune_tensor::candle::quantized::gguf_file::Content;
use oxtune_tensor::{DType, Device, Tensor};

pub use hf_config::{Arch, HyperParams, SUPPORTED_ARCHITECTURES};
pub use tokenizer::{GgufTokenizer, PreTokenizer, VocabKind, read_tokenizer};
pub use writer::{INDEX_FILE, SINGLE_FILE};

use metadata::Metadata;
use tensors::Target;
use writer::Planned;

/// Largest safetensors shard written (bytes); bigger checkpoints are split.
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 2_000_000_000;

/// Errors of the GGUF import. Each names the file, key or tensor at fault and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error(
        "{path}: no such file\nhint: pass the path of a .gguf file; scripts/fetch-demo-model.sh downloads a small one (SmolLM2-135M-Instruct)"
    )]
    NotFound { path: PathBuf },

    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error(
        "{path} is not a readable GGUF file: {message}\nhint: the file may be truncated or not a GGUF (llama.cpp) file; download it again and compare its size or checksum"
    )]
    Corrupt { path: PathBuf, message: String },

    #[error(
        "{path}: {message}\nhint: candle dequantizes F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and Q2_K..Q8_K; pick one of those quantizations of the model (e.g. Q8_0 or Q4_K_M), or re-quantize with llama.cpp's llama-quantize"
    )]
    UnsupportedQuantization { path: PathBuf, message: String },

    #[error(
        "{path}: architecture `{name}` (general.architecture) is not supported by the GGUF import\nhint: supported architectures: {supported}"
    )]
    UnsupportedArchitecture {
        path: PathBuf,
        name: String,
        supported: String,
    },

    #[error("{path}: metadata key `{key}` is missing\nhint: {hint}")]
    MissingMetadata {
        path: PathBuf,
        key: String,
        hint: String,
    },

    #[error("{path}: metadata key `{key}`: {message}")]
    InvalidMetadata {
        path: PathBuf,
        key: String,
        message: String,
    },

    #[error("{path}: tensor `{name}`: {message}\nhint: {hint}")]
    Tensor {
        path: PathBuf,
        name: String,
        message: String,
        hint: String,
    },

    #[error("{path}: tokenizer: {message}\nhint: {hint}")]
    Tokenizer {
        path: PathBuf,
        message: String,
        hint: String,
    },

    #[error(
        "{path} already exists and is not empty\nhint: choose another output directory, or overwrite it (`oxtune export --overwrite`)"
    )]
    OutputExists { path: PathBuf },

    #[error("{path}: not a usable output directory: {message}")]
    BadOutput { path: PathBuf, message: String },

    #[error("output dtype {dtype} is not supported\nhint: use float32, bfloat16 or float16")]
    UnsupportedDtype { dtype: String },

    #[error(
        "internal error in the GGUF import: {0}\nhint: please report this with the GGUF file's name"
    )]
    Internal(String),
}

/// How to import.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportOptions {
    /// Dtype of the tensors that were not F32 in the GGUF (quantized, F16, BF16). F32 tensors
    /// (norms, usually) stay F32. `DType::F32`, `BF16` or `F16`.
    pub dtype: DType,
    /// Replace `output_dir` if it exists and is not empty.
    pub overwrite: bool,
    /// Split the weights into shards of at most this many bytes.
    pub max_shard_bytes: u64,
}

impl Default for ImportOptions {
    /// bfloat16, as Hugging Face checkpoints are usually stored; no overwrite; 2 GB shards.
    fn default() -> Self {
        Self {
            dtype: DType::BF16,
            overwrite: false,
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
        }
    }
}

/// What an import wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportSummary {
    pub output_dir: PathBuf,
    /// `general.architecture`, e.g. `llama`.
    pub gguf_architecture: String,
    /// config.json's `architectures[0]`, e.g. `LlamaForCausalLM`.
    pub architecture: String,
    /// Tensors written (`rope_freqs` is folded into config.json instead).
    pub num_tensors: usize,
    pub num_parameters: u64,
    pub vocab_size: usize,
    pub tie_word_embeddings: bool,
    /// The dtype of the tensors that were not F32 in the GGUF.
    pub dtype: DType,
    /// e.g. `byte-level BPE (SmolLm pre-tokenizer), 49152 tokens`.
    pub tokenizer: String,
    /// Files in `output_dir`, by name.
    pub files: Vec<String>,
}

/// Imports `gguf_path` into `output_dir` as bfloat16 (see [`ImportOptions::default`]).
pub fn import(gguf_path: &Path, output_dir: &Path) -> Result<ImportSummary, GgufError> {
    import_with(
        gguf_path,
        output_dir,
        &ImportOptions::default(),
        &mut |_, _, _| {},
    )
}

/// Imports `gguf_path` into `output_dir`. `on_tensor(done, total, name)` is called after each
/// tensor is written (`done` counts from 1; `name` is the Hugging Face name), for progress bars.
pub fn import_with(
    gguf_path: &Path,
    output_dir: &Path,
    options: &ImportOptions,
    on_tensor: &mut dyn FnMut(usize, usize, &str),
) -> Result<ImportSummary, GgufError> {
    if !matches!(options.dtype, DType::F32 | DType::BF16 | DType::F16) {
        return Err(GgufError::UnsupportedDtype {
            dtype: format!("{:?}", options.dtype),
        });
    }
    check_output_dir(output_dir, options.overwrite)?;

    // 1. Header: metadata and tensor infos (names, shapes, quantization, offsets).
    let content = read_content(gguf_path)?;
    let meta = Metadata::new(gguf_path, &content.metadata);
    let arch_name = meta.string("general.architecture")?.ok_or_else(|| {
        meta.missing(
            "general.architecture",
            "every GGUF model file names its architecture; this may not be a model file",
        )
    })?;
    let arch = Arch::from_gguf(arch_name).ok_or_else(|| GgufError::UnsupportedArchitecture {
        path: gguf_path.to_path_buf(),
        name: arch_name.to_owned(),
        supported: SUPPORTED_ARCHITECTURES.to_owned(),
    })?;
    let hp = HyperParams::from_metadata(&meta, arch)?;
    check_tensor_data(gguf_path, &content)?;

    // 2. Plan: every tensor's Hugging Face name, shape and output dtype, in file order.
    let plan = plan_tensors(gguf_path, &content, &hp, options.dtype)?;
    let mut reader = open(gguf_path)?;
    let rope_freqs_scaling = match content.tensor_infos.get("rope_freqs.weight") {
        None => None,
        Some(_) => {
            let factors = read_tensor(gguf_path, &content, &mut reader, "rope_freqs.weight")?;
            let factors: Vec<f32> = factors
                .flatten_all()
                .and_then(|t| t.to_vec1())
                .map_err(|e| tensor_error(gguf_path, "rope_freqs.weight", &e))?;
            tensors::llama3_rope_scaling(&factors, hp.head_dim, hp.rope_theta).map_err(|message| GgufError::Tensor {
                path: gguf_path.to_path_buf(),
                name: "rope_freqs.weight".into(),
                message,
                hint: "oxtune recognises Llama 3.x rope scaling only; this file scales rotary frequencies another way".into(),
            })?
        }
    };
    let facts = tensor_facts(gguf_path, &plan, &hp, rope_freqs_scaling)?;

    // 3. Tokenizer and configs.
    let tokenizer = tokenizer::from_metadata(&meta, Some(hp.max_position_embeddings))?;
    if tokenizer.num_tokens > facts.vocab_size {
        return Err(GgufError::Tokenizer {
            path: gguf_path.to_path_buf(),
            message: format!(
                "{} tokens for an embedding of {} rows",
                tokenizer.num_tokens, facts.vocab_size
            ),
            hint: "the vocabulary and the weights disagree; the file is inconsistent".into(),
        });
    }
    let dtype_name = oxtune_tensor::dtype_name(options.dtype);
    let config = hf_config::config_json(
        &hp,
        &facts,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        dtype_name,
    );
    let generation = hf_config::generation_config_json(
        tokenizer.bos_token_id,
        &tokenizer.stop_token_ids,
        tokenizer.pad_token_id,
    );

    // 4. Write everything into a temporary sibling directory, then move it into place.
    let staging = Staging::create(output_dir)?;
    let dir = staging.path.clone();
    let mut files = vec![
        "config.json".to_owned(),
        "generation_config.json".to_owned(),
    ];
    write_json(&dir.join("config.json"), &config)?;
    write_json(&dir.join("generation_config.json"), &generation)?;
    write_text(&dir.join("tokenizer.json"), &tokenizer.to_json()?)?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &tokenizer.tokenizer_config,
    )?;
    files.extend([
        "tokenizer.json".to_owned(),
        "tokenizer_config.json".to_owned(),
    ]);

    let shards = writer::shard(&plan, options.max_shard_bytes);
    let names = writer::shard_names(shards.len());
    let total = plan.len();
    let mut done = 0usize;
    for (range, name) in shards.iter().zip(&names) {
        let tensors = plan.get(range.clone()).unwrap_or_default();
        let mut produce = |p: &Planned| produce_tensor(gguf_path, &content, &mut reader, p);
        let mut after = |p: &Planned| {
            done += 1;
            on_tensor(done, total, &p.hf_name);
        };
        writer::write_file(&dir.join(name), tensors, &mut produce, &mut after)?;
        files.push(name.clone());
    }
    if shards.len() > 1 {
        writer::write_index(&dir, &plan, &shards, &names)?;
        files.push(INDEX_FILE.to_owned());
    }
    staging.commit(output_dir)?;

    Ok(ImportSummary {
        output_dir: output_dir.to_path_buf(),
        gguf_architecture: arch_name.to_owned(),
        architecture: arch.hf_architecture().to_owned(),
        num_tensors: plan.len(),
        num_parameters: plan.iter().map(Planned::num_elements).sum(),
        vocab_size: facts.vocab_size,
        tie_word_embeddings: facts.tie_word_embeddings,
        dtype: options.dtype,
        tokenizer: tokenizer.describe(),
        files,
    })
}

/// Opens a GGUF file, telling a missing file apart from other read errors.
fn open(path: &Path) -> Result<BufReader<File>, GgufError> {
    match File::open(path) {
        Ok(file) => Ok(BufReader::with_capacity(1 << 20, file)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(GgufError::NotFound {
            path: path.to_path_buf(),
        }),
        Err(source) => Err(GgufError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// GGML type ids candle does not know, by name (ggml.h `ggml_type`).
fn ggml_type_name(id: u32) -> Option<&'static str> {
    Some(match id {
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return None,
    })
}

/// Reads the header (metadata and tensor infos) of a GGUF file.
pub(crate) fn read_content(path: &Path) -> Result<Content, GgufError> {
    let mut reader = open(path)?;
    Content::read(&mut reader).map_err(|e| {
        let message = e.to_string();
        if let Some(id) = message
            .strip_prefix("unknown dtype for tensor ")
            .and_then(|s| s.trim().parse::<u32>().ok())
        {
            let name = ggml_type_name(id).map_or_else(
                || format!("GGML type {id}"),
                |n| format!("{n} (GGML type {id})"),
            );
            return GgufError::UnsupportedQuantization {
                path: path.to_path_buf(),
                message: format!("a tensor is quantized as {name}, which candle cannot dequantize"),
            };
        }
        match e {
            oxtune_tensor::candle::Error::Io(source)
                if source.kind() == std::io::ErrorKind::UnexpectedEof =>
            {
                GgufError::Corrupt {
                    path: path.to_path_buf(),
                    message: "the file ends inside its header".into(),
                }
            }
            _ => GgufError::Corrupt {
                path: path.to_path_buf(),
                message,
            },
        }
    })
}

/// Checks, before anything is written, that every tensor's data lies inside the file (a
/// truncated download fails here, naming the first tensor it cuts).
fn check_tensor_data(path: &Path, content: &Content) -> Result<(), GgufError> {
    let file_size = std::fs::metadata(path)
        .map_err(|source| GgufError::Read {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let mut infos: Vec<_> = content.tensor_infos.iter().collect();
    infos.sort_by_key(|(_, info)| info.offset);
    for (name, info) in infos {
        let elements = info.shape.elem_count();
        let block = info.ggml_dtype.block_size();
        if elements % block != 0 {
            return Err(GgufError::Tensor {
                path: path.to_path_buf(),
                name: name.clone(),
                message: format!(
                    "{elements} elements are not a whole number of {:?} blocks of {block}",
                    info.ggml_dtype
                ),
                hint: "the file is corrupt".into(),
            });
        }
        let bytes = (elements / block * info.ggml_dtype.type_size()) as u64;
        let end = content
            .tensor_data_offset
            .saturating_add(info.offset)
            .saturating_add(bytes);
        if end > file_size {
            return Err(GgufError::Tensor {
                path: path.to_path_buf(),
                name: name.clone(),
                message: format!("its data ends at byte {end}, but the file has {file_size} bytes"),
                hint: "the file is truncated (an interrupted download?); download it again".into(),
            });
        }
    }
    Ok(())
}

fn tensor_error(path: &Path, name: &str, error: &oxtune_tensor::candle::Error) -> GgufError {
    GgufError::Tensor {
        path: path.to_path_buf(),
        name: name.to_owned(),
        message: error.to_string(),
        hint: "the file may be corrupt; download it again".into(),
    }
}

/// One tensor, dequantized to f32 on the CPU.
fn read_tensor(
    path: &Path,
    content: &Content,
    reader: &mut BufReader<File>,
    name: &str,
) -> Result<Tensor, GgufError> {
    content
        .tensor(reader, name, &Device::Cpu)
        .and_then(|q| q.dequantize(&Device::Cpu))
        .map_err(|e| tensor_error(path, name, &e))
}

/// One output tensor: dequantized, un-permuted where planned, in the planned dtype.
fn produce_tensor(
    path: &Path,
    content: &Content,
    reader: &mut BufReader<File>,
    planned: &Planned,
) -> Result<Tensor, GgufError> {
    let tensor = read_tensor(path, content, reader, &planned.gguf_name)?;
    let tensor = match planned.unpermute_heads {
        Some(heads) => tensors::unpermute(&tensor, heads)
            .map_err(|e| tensor_error(path, &planned.gguf_name, &e))?,
        None => tensor,
    };
    tensor
        .to_dtype(planned.dtype)
        .map_err(|e| tensor_error(path, &planned.gguf_name, &e))
}

/// Maps every tensor (in file order) to its output; unknown tensors are an error.
fn plan_tensors(
    path: &Path,
    content: &Content,
    hp: &HyperParams,
    dtype: DType,
) -> Result<Vec<Planned>, GgufError> {
    let mut infos: Vec<_> = content.tensor_infos.iter().collect();
    infos.sort_by_key(|(_, info)| info.offset);
    let mut plan = Vec::with_capacity(infos.len());
    for (gguf_name, info) in infos {
        let target = tensors::target(gguf_name, hp).map_err(|unmapped| GgufError::Tensor {
            path: path.to_path_buf(),
            name: gguf_name.clone(),
            message: "not a tensor of the supported model layout".into(),
            hint: unmapped.hint,
        })?;
        let Target::Weight {
            name,
            unpermute_heads,
        } = target
        else {
            continue;
        };
        let shape = info.shape.dims().to_vec();
        if let Some(heads) = unpermute_heads
            && shape
                .first()
                .is_none_or(|rows| heads == 0 || rows % (2 * heads) != 0)
        {
            return Err(GgufError::Tensor {
                path: path.to_path_buf(),
                name: gguf_name.clone(),
                message: format!("shape {shape:?} cannot hold {heads} heads of rotary pairs"),
                hint: "the tensor does not match the attention head counts in the metadata".into(),
            });
        }
        let out_dtype = if info.ggml_dtype == GgmlDType::F32 {
            DType::F32
        } else {
            dtype
        };
        plan.push(Planned {
            gguf_name: gguf_name.clone(),
            hf_name: name,
            shape,
            dtype: out_dtype,
            unpermute_heads,
        });
    }
    Ok(plan)
}

/// Facts config.json needs from the tensors; checks that the essential tensors exist.
fn tensor_facts(
    path: &Path,
    plan: &[Planned],
    hp: &HyperParams,
    rope_scaling: Option<serde_json::Value>,
) -> Result<hf_config::TensorFacts, GgufError> {
    let find = |name: &str| plan.iter().find(|p| p.hf_name == name);
    let missing = |gguf_name: &str| GgufError::Tensor {
        path: path.to_path_buf(),
        name: gguf_name.to_owned(),
        message: "missing".into(),
        hint: "the file is incomplete; every model file has its embeddings, layers and final norm"
            .into(),
    };
    let embed = find("model.embed_tokens.weight").ok_or_else(|| missing("token_embd.weight"))?;
    let (vocab_size, hidden) = match embed.shape.as_slice() {
        [v, c] => (*v, *c),
        other => {
            return Err(GgufError::Tensor {
                path: path.to_path_buf(),
                name: "token_embd.weight".into(),
                message: format!("shape {other:?} is not (vocab, hidden)"),
                hint: "the file is corrupt".into(),
            });
        }
    };
    if hidden != hp.hidden_size {
        return Err(GgufError::Tensor {
            path: path.to_path_buf(),
            name: "token_embd.weight".into(),
            message: format!(
                "width {hidden} differs from embedding_length {}",
                hp.hidden_size
            ),
            hint: "the weights and the metadata disagree; the file is inconsistent".into(),
        });
    }
    find("model.norm.weight").ok_or_else(|| missing("output_norm.weight"))?;
    for layer in 0..hp.num_hidden_layers {
        for (hf, gguf) in [
            ("self_attn.q_proj.weight", "attn_q.weight"),
            ("mlp.down_proj.weight", "ffn_down.weight"),
        ] {
            find(&format!("model.layers.{layer}.{hf}"))
                .ok_or_else(|| missing(&format!("blk.{layer}.{gguf}")))?;
        }
        if hp.arch == Arch::Qwen3 {
            find(&format!("model.layers.{layer}.self_attn.q_norm.weight"))
                .ok_or_else(|| missing(&format!("blk.{layer}.attn_q_norm.weight")))?;
        }
        if hp.arch == Arch::Qwen2 {
            find(&format!("model.layers.{layer}.self_attn.q_proj.bias"))
                .ok_or_else(|| missing(&format!("blk.{layer}.attn_q.bias")))?;
        }
    }
    Ok(hf_config::TensorFacts {
        vocab_size,
        tie_word_embeddings: find("lm_head.weight").is_none(),
        attention_bias: find("model.layers.0.self_attn.q_proj.bias").is_some(),
        mlp_bias: find("model.layers.0.mlp.gate_proj.bias").is_some(),
        rope_scaling,
    })
}

/// Refuses a non-empty output directory unless overwriting.
fn check_output_dir(output_dir: &Path, overwrite: bool) -> Result<(), GgufError> {
    if output_dir.file_name().is_none() {
        return Err(GgufError::BadOutput {
            path: output_dir.to_path_buf(),
            message: "name a directory (not `/`, `.` or `..`)".into(),
        });
    }
    if !output_dir.exists() {
        return Ok(());
    }
    if !output_dir.is_dir() {
        return Err(GgufError::BadOutput {
            path: output_dir.to_path_buf(),
            message: "exists and is not a directory".into(),
        });
    }
    let mut entries = std::fs::read_dir(output_dir).map_err(|source| GgufError::Read {
        path: output_dir.to_path_buf(),
        source,
    })?;
    if entries.next().is_some() && !overwrite {
        return Err(GgufError::OutputExists {
            path: output_dir.to_path_buf(),
        });
    }
    Ok(())
}

/// `<output_dir>.tmp-<pid>`: built completely, then renamed over `output_dir`. Removed on
/// drop if never committed, so a failed import leaves nothing behind.
struct Staging {
    path: PathBuf,
    committed: bool,
}

fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir
        .file_name()
        .map(std::ffi::OsStr::to_os_string)
        .unwrap_or_default();
    name.push(suffix);
    dir.with_file_name(name)
}

impl Staging {
    fn create(output_dir: &Path) -> Result<Self, GgufError> {
        if let Some(parent) = output_dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|source| GgufError::Write {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        let path = sibling(output_dir, &format!(".tmp-{}", std::process::id()));
        if path.exists() {
            std::fs::remove_dir_all(&path).map_err(|source| GgufError::Write {
                path: path.clone(),
                source,
            })?;
        }
        std::fs::create_dir(&path).map_err(|source| GgufError::Write {
            path: path.clone(),
            source,
        })?;
        Ok(Self {
            path,
            committed: false,
        })
    }

    /// Moves the finished directory to `output_dir`. An existing `output_dir` is first moved
    /// aside, then deleted once the new one is in place.
    fn commit(mut self, output_dir: &Path) -> Result<(), GgufError> {
        let write_error = |path: &Path| {
            let path = path.to_path_buf();
            move |source| GgufError::Write { path, source }
        };
        let old = if output_dir.exists() {
            let old = sibling(output_dir, &format!(".old-{}", std::process::id()));
            std::fs::rename(output_dir, &old).map_err(write_error(output_dir))?;
            Some(old)
        } else {
            None
        };
        std::fs::rename(&self.path, output_dir).map_err(write_error(output_dir))?;
        self.committed = true;
        if let Some(old) = old {
            std::fs::remove_dir_all(&old).map_err(write_error(&old))?;
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: the import already failed with a better error than this one.
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn write_text(path: &Path, text: &str) -> Result<(), GgufError> {
    let error = |source| GgufError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::create(path).map_err(error)?;
    file.write_all(text.as_bytes()).map_err(error)?;
    file.sync_all().map_err(error)
}

/// Pretty-printed JSON with a trailing newline, as transformers writes its configs.
pub(crate) fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), GgufError> {
    let mut text = serde_json::to_string_pretty(value)
        .map_err(|e| GgufError::Internal(format!("{}: {e}", path.display())))?;
    text.push('\n');
    write_text(path, &text)
}

//! One file per subcommand. Shared here: the model flags every model-running command takes,
//! loading a model from them, and logging.

pub mod bench;
pub mod bench_serve;
pub mod data;
pub mod deploy;
pub mod eval;
pub mod export;
pub mod infer;
pub mod train;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use oxtune_models::{LoadedModel, ModelSource, SearchPaths};
use oxtune_tensor::{DType, Device};

/// Which base model to run and where (shared by every command that loads a model).
#[derive(Debug, Clone, Args)]
pub struct BaseModelArgs {
    /// A Hugging Face model directory, a .gguf file, a `org/name` in the Hugging Face cache,
    /// or a name from the models registry (see docs/models.md).
    #[arg(long, alias = "model_id_or_path", value_name = "PATH_OR_NAME")]
    pub model: Option<String>,

    /// A name from the models registry, e.g. `qwen3-7b-chat` (used when --model is absent).
    #[arg(long = "model_type", value_name = "NAME")]
    pub model_type: Option<String>,

    /// `auto` (the first GPU if built with CUDA, else the CPU), `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "auto")]
    pub device: String,

    /// Weight and compute dtype: `auto` (bfloat16 on GPU, float32 on CPU), float32,
    /// bfloat16 or float16.
    #[arg(long = "torch_dtype", default_value = "auto", value_name = "DTYPE")]
    pub torch_dtype: String,
}

/// Which model to run and where, with an optional adapter applied on load.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    #[command(flatten)]
    pub base: BaseModelArgs,

    /// A LoRA / DoRA adapter directory (peft format: adapter_config.json +
    /// adapter_model.safetensors) applied on the base model. Without --model, the base is the
    /// adapter's `base_model_name_or_path`.
    #[arg(long, value_name = "DIR")]
    pub adapters: Option<PathBuf>,
}

impl ModelArgs {
    /// The device and dtype these flags ask for.
    pub fn device_and_dtype(&self) -> anyhow::Result<(Device, DType)> {
        let device = oxtune_tensor::parse_device(&self.base.device)?;
        let dtype = match self.base.torch_dtype.as_str() {
            "auto" if device.is_cuda() => DType::BF16,
            "auto" => DType::F32,
            name => oxtune_tensor::parse_dtype(name)?,
        };
        Ok((device, dtype))
    }

    /// Resolves and loads the model, with its adapter when one is given.
    pub fn load(&self) -> anyhow::Result<LoadedModel> {
        let (device, dtype) = self.device_and_dtype()?;
        let dir = self.resolve_dir(dtype)?;
        tracing::info!(model = %dir.display(), ?device, ?dtype, "loading");
        let mut loaded = LoadedModel::load(&dir, &device, dtype)
            .with_context(|| format!("loading {}", dir.display()))?;
        if let Some(adapter) = &self.adapters {
            oxtune_tuners::peft::load(&mut loaded.model, adapter, &device)
                .with_context(|| format!("applying the adapter {}", adapter.display()))?;
        }
        Ok(loaded)
    }

    /// The Hugging Face directory of the model (a GGUF file is imported once, in `dtype`).
    pub fn resolve_dir(&self, dtype: DType) -> anyhow::Result<PathBuf> {
        let adapter_base = match (&self.adapters, &self.base.model, &self.base.model_type) {
            (Some(adapter), None, None) => Some(adapter_base_model(adapter)?),
            _ => None,
        };
        let source = oxtune_models::resolve::resolve(
            self.base.model.as_deref().or(adapter_base.as_deref()),
            self.base.model_type.as_deref(),
            &SearchPaths::from_env(),
        )?;
        match &source {
            ModelSource::Directory(dir) => Ok(dir.clone()),
            ModelSource::Gguf(file) => gguf_cache_dir(file, dtype),
        }
    }
}

/// `base_model_name_or_path` of an adapter, for `--adapters DIR` without `--model`.
pub(crate) fn adapter_base_model(adapter: &std::path::Path) -> anyhow::Result<String> {
    let path = adapter.join(oxtune_tuners::peft::CONFIG_FILE);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let config: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    config
        .get("base_model_name_or_path")
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned)
        .with_context(|| {
            format!(
                "{} names no base_model_name_or_path\nhint: pass --model with the base model",
                path.display()
            )
        })
}

/// The Hugging Face directory a GGUF file is imported into once, under
/// `$OXTUNE_CACHE_DIR/gguf/` (default `~/.cache/oxtune/gguf/`), keyed by the file's name,
/// size, modification time and the dtype.
fn gguf_cache_dir(file: &std::path::Path, dtype: DType) -> anyhow::Result<PathBuf> {
    let metadata =
        std::fs::metadata(file).with_context(|| format!("reading {}", file.display()))?;
    let modified = metadata
        .modified()
        .ok()
        .and_then(|time| time.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |elapsed| elapsed.as_secs());
    let stem = file
        .file_stem()
        .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned());
    let dtype_name = oxtune_tensor::dtype_name(dtype);
    let cache = match std::env::var_os("OXTUNE_CACHE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(
            std::env::var_os("HOME").context("HOME is not set; set OXTUNE_CACHE_DIR")?,
        )
        .join(".cache/oxtune"),
    };
    let dir = cache
        .join("gguf")
        .join(format!("{stem}-{}-{modified}-{dtype_name}", metadata.len()));
    if dir.join("config.json").is_file() {
        return Ok(dir);
    }
    tracing::info!(gguf = %file.display(), into = %dir.display(), "importing GGUF (once)");
    let options = oxtune_models::gguf::ImportOptions {
        dtype,
        overwrite: true,
        ..Default::default()
    };
    oxtune_models::gguf::import_with(file, &dir, &options, &mut |_, _, _| {})
        .with_context(|| format!("importing {}", file.display()))?;
    Ok(dir)
}

/// Logs to stderr; `RUST_LOG` sets the level (default: warnings, and oxtune's own info).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,oxtune=info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

/// Whether the error chain holds a broken pipe (`oxtune infer | head` is a success).
pub fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

//! One file per subcommand. Shared here: the model flags every model-running command takes,
//! loading a model from them, and logging.

pub mod bench;
pub mod infer;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use oxtune_models::{LoadedModel, ModelSource, SearchPaths};
use oxtune_tensor::{DType, Device};

/// Which model to run and where.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
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

impl ModelArgs {
    /// The device and dtype these flags ask for.
    pub fn device_and_dtype(&self) -> anyhow::Result<(Device, DType)> {
        let device = oxtune_tensor::parse_device(&self.device)?;
        let dtype = match self.torch_dtype.as_str() {
            "auto" if device.is_cuda() => DType::BF16,
            "auto" => DType::F32,
            name => oxtune_tensor::parse_dtype(name)?,
        };
        Ok((device, dtype))
    }

    /// Resolves and loads the model.
    pub fn load(&self) -> anyhow::Result<LoadedModel> {
        let (device, dtype) = self.device_and_dtype()?;
        let source = oxtune_models::resolve::resolve(
            self.model.as_deref(),
            self.model_type.as_deref(),
            &SearchPaths::from_env(),
        )?;
        let dir = match &source {
            ModelSource::Directory(dir) => dir.clone(),
            ModelSource::Gguf(file) => gguf_cache_dir(file, dtype)?,
        };
        tracing::info!(model = %dir.display(), ?device, ?dtype, "loading");
        LoadedModel::load(&dir, &device, dtype)
            .with_context(|| format!("loading {}", source.path().display()))
    }
}

fn gguf_cache_dir(file: &std::path::Path, _dtype: DType) -> anyhow::Result<PathBuf> {
    anyhow::bail!("GGUF loading: {}", file.display())
}

/// Logs to stderr; `RUST_LOG` sets the level (default: warnings, and oxtune's own info).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,oxtune=info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
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

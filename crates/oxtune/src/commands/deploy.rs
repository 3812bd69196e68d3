//! `oxtune deploy`: an OpenAI-compatible server (docs/deploy.md).
//!
//! `--serving_backend native` (the default) serves the model with oxtune's own engine through
//! `oxtune-server`: the port opens first (probes answer 503 `starting` while the weights load),
//! then the engine attaches; SIGTERM/SIGINT drain it (`--shutdown_timeout`). `vllm`, `sglang`
//! and `lmdeploy` map the same flags onto that engine's launcher ([`external_command`]) and
//! exec it when installed; when not, the error names the pip package.
//!
//! Adapters: `--adapters name=path [name=path ...]` serves each peft adapter beside the base
//! (a request picks one with `model: name`); a plain `--adapters DIR` is named after the
//! directory. Unlike `oxtune infer`'s single `--adapters DIR` (applied on load), deploy's
//! adapters stay separate: deploy flattens the base-model flags (`BaseModelArgs`) and has its
//! own repeatable `--adapters`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{ArgAction, Args, ValueEnum};
use oxtune_engine::{EngineConfig, EngineHandle, SamplingParams};
use oxtune_models::LoadedModel;
use oxtune_server::{AppState, ServerConfig};

use super::{BaseModelArgs, ModelArgs};

/// Which engine serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ServingBackend {
    /// oxtune's own engine (continuous batching, paged KV cache, multi-LoRA).
    Native,
    /// `vllm serve` (pip install vllm).
    Vllm,
    /// `python -m sglang.launch_server` (pip install sglang).
    Sglang,
    /// `lmdeploy serve api_server` (pip install lmdeploy).
    Lmdeploy,
}

#[derive(Debug, Clone, Args)]
pub struct DeployArgs {
    #[command(flatten)]
    pub base: BaseModelArgs,

    /// peft adapters served beside the base: `name=DIR` (or a plain DIR, named after it).
    /// Repeat the flag or give several.
    #[arg(long, num_args = 1.., action = ArgAction::Append, value_name = "NAME=DIR")]
    pub adapters: Vec<String>,

    /// The engine: native (default), vllm, sglang or lmdeploy.
    #[arg(
        long = "serving_backend",
        alias = "infer_backend",
        value_enum,
        default_value = "native"
    )]
    pub serving_backend: ServingBackend,

    /// GPUs to shard the model over (external backends; native: 1 only).
    #[arg(long = "tensor_parallel_size", default_value_t = 1)]
    pub tensor_parallel_size: usize,

    /// Fraction of GPU memory for weights plus KV cache.
    #[arg(long = "gpu_memory_utilization", default_value_t = 0.9)]
    pub gpu_memory_utilization: f64,

    /// Quantized checkpoint format (gptq, awq, fp8, ...): external backends only for now.
    #[arg(long = "quant_method", value_name = "METHOD")]
    pub quant_method: Option<String>,

    /// Address to listen on; 127.0.0.1 (local only) by default — use 0.0.0.0 to serve the
    /// network, with --api_key.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,

    /// Port to listen on (0 = any free port; the log says which).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,

    /// The base model's name in the API (default: --model_type, else --model as given when it
    /// is a name, else the model directory's name).
    #[arg(long = "served_model_name", value_name = "NAME")]
    pub served_model_name: Option<String>,

    /// Accepted API keys (`Authorization: Bearer KEY`); repeat for several. None = open.
    #[arg(long = "api_key", action = ArgAction::Append, value_name = "KEY")]
    pub api_key: Vec<String>,

    /// Requests handled at once; beyond it an immediate 429 with Retry-After.
    #[arg(long = "max_concurrent_requests", default_value_t = 256)]
    pub max_concurrent_requests: usize,

    /// Sequences decoding at once in the engine.
    #[arg(long = "max_num_seqs", default_value_t = 64)]
    pub max_num_seqs: usize,

    /// New tokens per engine step (chunked prefill).
    #[arg(long = "max_num_batched_tokens", default_value_t = 2048)]
    pub max_num_batched_tokens: usize,

    /// Context length served (prompt + output; default: the model's).
    #[arg(long = "max_model_len")]
    pub max_model_len: Option<usize>,

    /// Tokens per KV-cache block.
    #[arg(long = "block_size", default_value_t = 16)]
    pub block_size: usize,

    /// KV-cache blocks (default: sized from --gpu_memory_utilization, or 1 GiB on the CPU).
    #[arg(long = "num_blocks")]
    pub num_blocks: Option<usize>,

    /// Reuse the KV cache of shared prompt prefixes.
    #[arg(long = "enable_prefix_caching", default_value_t = true, action = ArgAction::Set)]
    pub enable_prefix_caching: bool,

    /// Run decode steps op by op instead of replaying recorded CUDA graphs.
    #[arg(long = "enforce_eager", default_value_t = false, action = ArgAction::Set)]
    pub enforce_eager: bool,

    /// Seconds in-flight requests may finish after SIGTERM/SIGINT before they are aborted.
    #[arg(long = "shutdown_timeout", default_value_t = 30.0)]
    pub shutdown_timeout: f64,

    /// Largest request body, in bytes (413 beyond).
    #[arg(long = "max_payload_size", default_value_t = 8 << 20)]
    pub max_payload_size: usize,

    /// Largest `n` per request.
    #[arg(long = "max_n", default_value_t = 16)]
    pub max_n: usize,

    /// Largest `top_logprobs` / `logprobs`.
    #[arg(long = "max_logprobs", default_value_t = 20)]
    pub max_logprobs: usize,

    /// Most `stop` strings (and `stop_token_ids`) per request.
    #[arg(long = "max_stop_sequences", default_value_t = 16)]
    pub max_stop_sequences: usize,

    /// Most prompts in one /v1/completions request.
    #[arg(long = "max_batch_size", default_value_t = 32)]
    pub max_batch_size: usize,

    /// Origins allowed by CORS (`*` = any, never with credentials); none = CORS off.
    #[arg(long = "allowed_origins", num_args = 1.., action = ArgAction::Append)]
    pub allowed_origins: Vec<String>,

    /// Log prompts and outputs (off by default), truncated to --max_log_len characters.
    #[arg(long = "enable_log_requests")]
    pub enable_log_requests: bool,

    #[arg(long = "max_log_len", default_value_t = 256)]
    pub max_log_len: usize,

    /// Seconds /health/ready's one-token generation may take.
    #[arg(long = "ready_timeout", default_value_t = 20.0)]
    pub ready_timeout: f64,
}

impl DeployArgs {
    fn model_args(&self, adapter_for_base: Option<PathBuf>) -> ModelArgs {
        ModelArgs {
            base: self.base.clone(),
            adapters: adapter_for_base,
        }
    }

    /// The arguments as logged: API keys redacted.
    fn redacted(&self) -> String {
        let mut shown = self.clone();
        shown.api_key = shown
            .api_key
            .iter()
            .map(|_| "<redacted>".to_owned())
            .collect();
        format!("{shown:?}")
    }
}

/// `name=DIR` or `DIR` (named after the directory).
pub fn parse_adapters(entries: &[String]) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut adapters: Vec<(String, PathBuf)> = Vec::new();
    for entry in entries {
        let (name, dir) = match entry.split_once('=') {
            Some((name, dir)) if !name.is_empty() && !dir.is_empty() => {
                (name.to_owned(), PathBuf::from(dir))
            }
            Some(_) => bail!("--adapters `{entry}`: expected NAME=DIR or DIR"),
            None => {
                let dir = PathBuf::from(entry);
                let name = dir
                    .file_name()
                    .map(|name| name.to_string_lossy().into_owned())
                    .filter(|name| !name.is_empty())
                    .with_context(|| {
                        format!("--adapters `{entry}`: cannot name it; write NAME={entry}")
                    })?;
                (name, dir)
            }
        };
        if adapters.iter().any(|(existing, _)| *existing == name) {
            bail!("--adapters: the name `{name}` is given twice\nhint: name them NAME=DIR");
        }
        adapters.push((name, dir));
    }
    Ok(adapters)
}

pub fn run(args: &DeployArgs) -> anyhow::Result<()> {
    if args.api_key.iter().any(String::is_empty) {
        bail!("--api_key must not be empty");
    }
    match args.serving_backend {
        ServingBackend::Native => run_native(args),
        backend => run_external(backend, args),
    }
}

fn run_native(args: &DeployArgs) -> anyhow::Result<()> {
    if args.tensor_parallel_size != 1 {
        bail!(
            "--tensor_parallel_size {} is not yet supported by the native backend (it serves on one device)\nhint: drop the flag, or use --serving_backend vllm (or sglang, lmdeploy) for tensor parallelism",
            args.tensor_parallel_size
        );
    }
    if let Some(method) = &args.quant_method {
        bail!(
            "--quant_method {method} is not supported by the native backend yet (supported: none — it serves full-precision checkpoints)\nhint: drop the flag, or use --serving_backend vllm (or sglang, lmdeploy) for {method} checkpoints"
        );
    }
    if !(args.gpu_memory_utilization > 0.0 && args.gpu_memory_utilization <= 1.0) {
        bail!(
            "--gpu_memory_utilization must be in (0, 1], not {}",
            args.gpu_memory_utilization
        );
    }
    let adapters = parse_adapters(&args.adapters)?;
    // Without --model, the base is the first adapter's base_model_name_or_path.
    let base_args = args.model_args(match (&args.base.model, &args.base.model_type) {
        (None, None) => adapters.first().map(|(_, dir)| dir.clone()),
        _ => None,
    });
    let (device, dtype) = base_args.device_and_dtype()?;
    let dir = base_args.resolve_dir(dtype)?;
    let served_model_name = served_name(args, &dir);
    let shutdown_timeout = seconds("--shutdown_timeout", args.shutdown_timeout)?;
    let ready_timeout = seconds("--ready_timeout", args.ready_timeout)?;
    let config = ServerConfig {
        served_model_name,
        api_keys: args.api_key.clone(),
        max_concurrent_requests: args.max_concurrent_requests,
        max_payload_size: args.max_payload_size,
        max_n: args.max_n,
        max_logprobs: args.max_logprobs,
        max_stop_sequences: args.max_stop_sequences,
        max_batch_size: args.max_batch_size,
        max_logit_bias: ServerConfig::default().max_logit_bias,
        allowed_origins: args.allowed_origins.clone(),
        enable_log_requests: args.enable_log_requests,
        max_log_len: args.max_log_len,
        shutdown_timeout,
        ready_timeout,
        default_sampling: default_sampling(
            &oxtune_models::GenerationConfig::load(&dir)
                .with_context(|| format!("reading {}", dir.display()))?,
        ),
        adapter_roots: adapters
            .iter()
            .map(|(name, dir)| (name.clone(), dir.display().to_string()))
            .collect(),
    };
    let engine_config = EngineConfig {
        block_size: args.block_size,
        num_blocks: args.num_blocks,
        gpu_memory_utilization: args.gpu_memory_utilization,
        max_num_seqs: args.max_num_seqs,
        max_num_batched_tokens: args.max_num_batched_tokens,
        // The server admits --max_concurrent_requests, each up to --max_n choices: the engine's
        // own cap sits above that, so it only bites if the server's is bypassed.
        max_queued_requests: args
            .max_concurrent_requests
            .saturating_mul(args.max_n.max(1)),
        enable_prefix_caching: args.enable_prefix_caching,
        max_logprobs: args.max_logprobs,
        max_model_len: args.max_model_len,
        enforce_eager: args.enforce_eager,
        ..EngineConfig::default()
    };
    tracing::info!(args = %args.redacted(), "oxtune deploy");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {}:{}\nhint: is another server on that port? pick one with --port",
                    args.host, args.port
                )
            })?;
        let address = listener.local_addr()?;
        let state = AppState::new(config)?;
        let mut server = tokio::spawn(oxtune_server::serve(
            listener,
            state.clone(),
            oxtune_server::shutdown_signal(),
        ));
        tracing::info!("listening on http://{address} (loading the model; /health/ready says when it is ready)");
        let load = tokio::task::spawn_blocking(move || {
            load_engine(&dir, &device, dtype, &adapters, engine_config)
        });
        tokio::select! {
            finished = &mut server => {
                finished.context("the server task failed")??;
                tracing::info!("stopped before the model finished loading");
                return Ok(());
            }
            loaded = load => {
                let engine = loaded.context("the loading task failed")??;
                state.set_engine(engine);
            }
        }
        tracing::info!(
            "ready: http://{address}/v1 serves `{}`",
            state.config().served_model_name
        );
        server.await.context("the server task failed")??;
        tracing::info!("stopped");
        anyhow::Ok(())
    })
}

fn load_engine(
    dir: &Path,
    device: &oxtune_tensor::Device,
    dtype: oxtune_tensor::DType,
    adapters: &[(String, PathBuf)],
    config: EngineConfig,
) -> anyhow::Result<EngineHandle> {
    tracing::info!(model = %dir.display(), ?device, ?dtype, adapters = adapters.len(), "loading");
    let model = LoadedModel::load(dir, device, dtype)
        .with_context(|| format!("loading {}", dir.display()))?;
    EngineHandle::start(model, adapters, config).context("starting the engine")
}

/// Request defaults from the checkpoint's generation_config.json (as vLLM does), else OpenAI's.
fn default_sampling(generation: &oxtune_models::GenerationConfig) -> SamplingParams {
    SamplingParams {
        temperature: generation.temperature.unwrap_or(1.0),
        top_p: generation.top_p.unwrap_or(1.0),
        top_k: generation.top_k.unwrap_or(0),
        min_p: generation.min_p.unwrap_or(0.0),
        repetition_penalty: generation.repetition_penalty.unwrap_or(1.0),
        ..SamplingParams::default()
    }
}

fn seconds(flag: &str, value: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value)
        .map_err(|_| anyhow::anyhow!("{flag} must be a number of seconds >= 0, not {value}"))
}

/// `--served_model_name`, else `--model_type`, else `--model` when it names (not a path),
/// else the model directory's name.
fn served_name(args: &DeployArgs, dir: &Path) -> String {
    if let Some(name) = &args.served_model_name {
        return name.clone();
    }
    if let Some(name) = &args.base.model_type {
        return name.clone();
    }
    if let Some(model) = &args.base.model
        && !Path::new(model).exists()
    {
        return model.clone();
    }
    dir.file_name().map_or_else(
        || "model".to_owned(),
        |name| name.to_string_lossy().into_owned(),
    )
}

// ---------------------------------------------------------------------------------------------
// External backends.

/// The program and arguments that serve `model` with `backend` under the same settings.
pub fn external_command(
    backend: ServingBackend,
    args: &DeployArgs,
    model: &str,
    served_model_name: &str,
    adapters: &[(String, PathBuf)],
) -> (String, Vec<String>) {
    let mut argv: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| argv.extend(items.iter().map(|item| (*item).to_owned()));
    let tp = args.tensor_parallel_size.to_string();
    let port = args.port.to_string();
    let memory = args.gpu_memory_utilization.to_string();
    let seqs = args.max_num_seqs.to_string();
    let block = args.block_size.to_string();
    let program = match backend {
        ServingBackend::Native | ServingBackend::Vllm => {
            push(&["serve", model, "--host", &args.host, "--port", &port]);
            push(&["--served-model-name", served_model_name]);
            push(&[
                "--tensor-parallel-size",
                &tp,
                "--gpu-memory-utilization",
                &memory,
            ]);
            push(&["--max-num-seqs", &seqs, "--block-size", &block]);
            push(&["--max-logprobs", &args.max_logprobs.to_string()]);
            push(&[if args.enable_prefix_caching {
                "--enable-prefix-caching"
            } else {
                "--no-enable-prefix-caching"
            }]);
            if let Some(method) = &args.quant_method {
                push(&["--quantization", method]);
            }
            if let Some(len) = args.max_model_len {
                push(&["--max-model-len", &len.to_string()]);
            }
            if args.enforce_eager {
                push(&["--enforce-eager"]);
            }
            if let Some(key) = args.api_key.first() {
                push(&["--api-key", key]);
            }
            if !adapters.is_empty() {
                push(&["--enable-lora", "--lora-modules"]);
                for (name, dir) in adapters {
                    push(&[&format!("{name}={}", dir.display())]);
                }
            }
            if !args.allowed_origins.is_empty() {
                let origins = serde_json::to_string(&args.allowed_origins).unwrap_or_default();
                push(&["--allowed-origins", &origins]);
            }
            "vllm"
        }
        ServingBackend::Sglang => {
            push(&["-m", "sglang.launch_server", "--model-path", model]);
            push(&["--host", &args.host, "--port", &port]);
            push(&["--served-model-name", served_model_name]);
            push(&["--tp-size", &tp, "--mem-fraction-static", &memory]);
            push(&["--max-running-requests", &seqs, "--page-size", &block]);
            if !args.enable_prefix_caching {
                push(&["--disable-radix-cache"]);
            }
            if args.enforce_eager {
                push(&["--disable-cuda-graph"]);
            }
            if let Some(method) = &args.quant_method {
                push(&["--quantization", method]);
            }
            if let Some(len) = args.max_model_len {
                push(&["--context-length", &len.to_string()]);
            }
            if let Some(key) = args.api_key.first() {
                push(&["--api-key", key]);
            }
            if !adapters.is_empty() {
                push(&["--lora-paths"]);
                for (name, dir) in adapters {
                    push(&[&format!("{name}={}", dir.display())]);
                }
            }
            "python3"
        }
        ServingBackend::Lmdeploy => {
            push(&["serve", "api_server", model]);
            push(&["--server-name", &args.host, "--server-port", &port]);
            push(&["--model-name", served_model_name]);
            push(&["--tp", &tp, "--cache-max-entry-count", &memory]);
            push(&["--max-batch-size", &seqs, "--cache-block-seq-len", &block]);
            if args.enable_prefix_caching {
                push(&["--enable-prefix-caching"]);
            }
            if let Some(method) = &args.quant_method {
                push(&["--model-format", method]);
            }
            if let Some(len) = args.max_model_len {
                push(&["--session-len", &len.to_string()]);
            }
            if !args.api_key.is_empty() {
                push(&["--api-keys"]);
                for key in &args.api_key {
                    push(&[key]);
                }
            }
            if !adapters.is_empty() {
                push(&["--adapters"]);
                for (name, dir) in adapters {
                    push(&[&format!("{name}={}", dir.display())]);
                }
            }
            "lmdeploy"
        }
    };
    (program.to_owned(), argv)
}

/// The pip package of a backend, and whether it is installed.
fn installed(backend: ServingBackend) -> (&'static str, bool) {
    match backend {
        ServingBackend::Native => ("oxtune", true),
        ServingBackend::Vllm => ("vllm", on_path("vllm")),
        ServingBackend::Lmdeploy => ("lmdeploy", on_path("lmdeploy")),
        ServingBackend::Sglang => (
            "sglang",
            std::process::Command::new("python3")
                .args([
                    "-c",
                    "import importlib.util, sys; sys.exit(importlib.util.find_spec('sglang') is None)",
                ])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|status| status.success()),
        ),
    }
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

fn run_external(backend: ServingBackend, args: &DeployArgs) -> anyhow::Result<()> {
    let (package, present) = installed(backend);
    let name = format!("{backend:?}").to_lowercase();
    if !present {
        bail!(
            "--serving_backend {name} needs the `{package}` Python package, which is not installed (or not on PATH)\nhint: pip install {package}  — or use --serving_backend native (the default)"
        );
    }
    let adapters = parse_adapters(&args.adapters)?;
    // A local directory when one resolves; else the name as given (the backend may download it).
    let model = match args
        .model_args(None)
        .resolve_dir(oxtune_tensor::DType::BF16)
    {
        Ok(dir) => dir.display().to_string(),
        Err(error) => match args
            .base
            .model
            .clone()
            .or_else(|| args.base.model_type.clone())
        {
            Some(name) => {
                tracing::warn!(%error, "passing `{name}` to {name} as given", name = name);
                name
            }
            None => return Err(error),
        },
    };
    let served = served_name(args, Path::new(&model));
    if args.api_key.len() > 1 && backend != ServingBackend::Lmdeploy {
        tracing::warn!("{name} takes one API key; only the first --api_key is passed");
    }
    let (program, argv) = external_command(backend, args, &model, &served, &adapters);
    tracing::info!(backend = %name, args = %args.redacted(), "launching {program}");
    let mut command = std::process::Command::new(&program);
    command.args(&argv);
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt as _;
        // Replaces this process: signals reach the backend directly, nothing is left behind.
        let error = command.exec();
        Err(error).with_context(|| format!("running {program}"))
    }
    #[cfg(not(unix))]
    {
        let status = command
            .status()
            .with_context(|| format!("running {program}"))?;
        if !status.success() {
            bail!("{program} exited with {status}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        deploy: DeployArgs,
    }

    fn parse(args: &[&str]) -> anyhow::Result<DeployArgs> {
        Ok(Cli::try_parse_from(std::iter::once("deploy").chain(args.iter().copied()))?.deploy)
    }

    #[test]
    fn the_brief_command_lines_map_onto_vllm() -> anyhow::Result<()> {
        let args = parse(&[
            "--model_type",
            "qwen3-7b-chat",
            "--serving_backend",
            "vllm",
            "--tensor_parallel_size",
            "2",
            "--gpu_memory_utilization",
            "0.9",
            "--quant_method",
            "gptq",
            "--api_key",
            "k1",
            "--adapters",
            "a=/x/a",
            "/y/b",
        ])?;
        let adapters = parse_adapters(&args.adapters)?;
        assert_eq!(
            adapters,
            [
                ("a".to_owned(), PathBuf::from("/x/a")),
                ("b".to_owned(), PathBuf::from("/y/b"))
            ]
        );
        let (program, argv) = external_command(
            ServingBackend::Vllm,
            &args,
            "/m/qwen",
            "qwen3-7b-chat",
            &adapters,
        );
        assert_eq!(program, "vllm");
        let line = argv.join(" ");
        for part in [
            "serve /m/qwen",
            "--host 127.0.0.1",
            "--port 8080",
            "--served-model-name qwen3-7b-chat",
            "--tensor-parallel-size 2",
            "--gpu-memory-utilization 0.9",
            "--quantization gptq",
            "--api-key k1",
            "--enable-lora --lora-modules a=/x/a b=/y/b",
            "--enable-prefix-caching",
        ] {
            assert!(line.contains(part), "`{part}` missing from `{line}`");
        }
        Ok(())
    }

    #[test]
    fn sglang_and_lmdeploy_get_their_own_names() -> anyhow::Result<()> {
        let args = parse(&[
            "--model",
            "/m",
            "--infer_backend",
            "sglang",
            "--tensor_parallel_size",
            "4",
            "--max_model_len",
            "4096",
            "--enable_prefix_caching",
            "false",
            "--enforce_eager",
            "true",
        ])?;
        assert_eq!(args.serving_backend, ServingBackend::Sglang);
        let (program, argv) = external_command(ServingBackend::Sglang, &args, "/m", "m", &[]);
        let line = argv.join(" ");
        assert_eq!(program, "python3");
        for part in [
            "-m sglang.launch_server --model-path /m",
            "--tp-size 4",
            "--context-length 4096",
            "--disable-radix-cache",
            "--disable-cuda-graph",
        ] {
            assert!(line.contains(part), "`{part}` missing from `{line}`");
        }
        let args = parse(&[
            "--model",
            "/m",
            "--api_key",
            "a",
            "--api_key",
            "b",
            "--quant_method",
            "awq",
        ])?;
        let (program, argv) = external_command(ServingBackend::Lmdeploy, &args, "/m", "m", &[]);
        let line = argv.join(" ");
        assert_eq!(program, "lmdeploy");
        for part in [
            "serve api_server /m",
            "--server-port 8080",
            "--api-keys a b",
            "--model-format awq",
            "--tp 1",
        ] {
            assert!(line.contains(part), "`{part}` missing from `{line}`");
        }
        Ok(())
    }

    #[test]
    fn adapter_entries_are_checked() {
        assert!(parse_adapters(&["=x".into()]).is_err());
        assert!(parse_adapters(&["a=".into()]).is_err());
        assert!(parse_adapters(&["a=/x".into(), "a=/y".into()]).is_err());
    }

    #[test]
    fn api_keys_never_reach_the_log() -> anyhow::Result<()> {
        let args = parse(&["--model", "/m", "--api_key", "sk-very-secret"])?;
        assert!(!args.redacted().contains("sk-very-secret"));
        assert!(args.redacted().contains("<redacted>"));
        Ok(())
    }
}

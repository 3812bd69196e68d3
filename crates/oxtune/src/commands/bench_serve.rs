//! `oxtune bench serve`: a load generator for any OpenAI-compatible server (ours, vLLM,
//! SGLang), modelled on `vllm bench serve`.
//!
//! `--num_prompts` prompts (a jsonl file, or random words) are sent as streaming requests to
//! `/v1/chat/completions` or `/v1/completions`: all at once (`--request_rate inf`) or as a
//! Poisson process (exponential gaps drawn from `--seed`), with at most `--max_concurrency`
//! in flight. Each stream is timed on a monotonic clock from the moment its request is sent:
//!
//! - TTFT: until the first chunk that carries generated text;
//! - ITL: the gaps between consecutive chunks that carry text (a chunk may hold several tokens);
//! - TPOT: (E2E - TTFT) / (output tokens - 1), for requests with at least two output tokens;
//! - E2E: until the end of the stream.
//!
//! Token counts come from the final `usage` chunk (`stream_options.include_usage`); for a
//! server that sends none, output tokens are the number of text chunks and input tokens the
//! prompt's words, and the report says so. A failed request (HTTP status, transport error,
//! error event in the stream, timeout) is counted under its reason; it never stops the run.
//! The JSON result uses the key names of `vllm bench serve` for the metrics both report, so
//! one script can compare the two.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde_json::{Value, json};

#[derive(Debug, Args)]
pub struct BenchServeArgs {
    /// Base URL of the server, e.g. `http://127.0.0.1:8000` (a trailing `/v1` is accepted).
    #[arg(long)]
    pub url: String,

    /// Model name sent with every request (default: the first id of GET {url}/v1/models).
    #[arg(long)]
    pub model: Option<String>,

    /// `chat` posts to /v1/chat/completions, `completions` to /v1/completions.
    #[arg(long, value_enum, default_value_t = Endpoint::Chat)]
    pub endpoint: Endpoint,

    /// Sent as `Authorization: Bearer KEY`.
    #[arg(long = "api_key", env = "OPENAI_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// `random` (prompts of random words), or a jsonl file whose rows hold `prompt` (a
    /// string), `messages` (an OpenAI chat list) or alpaca `instruction`/`input`; rows are
    /// reused in turn until --num_prompts is reached.
    #[arg(long, default_value = "random", value_name = "random|FILE")]
    pub dataset: String,

    /// Requests sent in the run.
    #[arg(long = "num_prompts", default_value_t = 1000)]
    pub num_prompts: usize,

    /// Words per random prompt: about one token each for common BPE vocabularies, so the
    /// token count is approximate (the server's `usage` gives the exact one).
    #[arg(long = "random_input_len", default_value_t = 1024)]
    pub random_input_len: usize,

    /// `max_tokens` of every request (random and file datasets alike).
    #[arg(long = "random_output_len", default_value_t = 128)]
    pub random_output_len: usize,

    /// Seeds the random prompts and the Poisson arrival gaps.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Requests per second, as a Poisson process; `inf` sends them all at once.
    #[arg(long = "request_rate", default_value_t = f64::INFINITY)]
    pub request_rate: f64,

    /// Requests in flight at most (default: unlimited).
    #[arg(long = "max_concurrency")]
    pub max_concurrency: Option<usize>,

    /// Sends `ignore_eos: true` (a vLLM / SGLang extension: every request generates
    /// max_tokens); servers without it ignore the field.
    #[arg(long = "ignore_eos", default_value_t = false, num_args = 0..=1,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    pub ignore_eos: bool,

    /// Sampling temperature of every request (0: greedy, as vllm bench serve defaults to).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,

    /// Seconds one request may take, stream included, before it counts as failed.
    #[arg(long, default_value_t = 600.0)]
    pub timeout: f64,

    /// Also write the result as JSON here (written to a temporary file, then renamed).
    #[arg(long = "save_result", value_name = "FILE")]
    pub save_result: Option<PathBuf>,
}

/// Which OpenAI route the requests go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Endpoint {
    Chat,
    Completions,
}

impl Endpoint {
    fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
        }
    }
}

pub fn run(args: &BenchServeArgs) -> anyhow::Result<()> {
    validate(args)?;
    let base = base_url(&args.url);
    let prompts = match args.dataset.as_str() {
        "random" => random_prompts(args.num_prompts, args.random_input_len, args.seed),
        file => {
            let rows = read_dataset(Path::new(file), args.endpoint)?;
            rows.iter()
                .cycle()
                .take(args.num_prompts)
                .cloned()
                .collect()
        }
    };
    let offsets = arrival_offsets(args.num_prompts, args.request_rate, args.seed);

    // reqwest is built without a default crypto provider: ring serves https (no C toolchain
    // beyond ring's own, no OpenSSL). An error only means one is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let (model, results, duration) = runtime.block_on(async {
        let client = reqwest::Client::builder()
            .tcp_nodelay(true)
            .build()
            .context("building the HTTP client")?;
        let model = match &args.model {
            Some(model) => model.clone(),
            None => first_model(&client, &base, args.api_key.as_deref()).await?,
        };
        let target = Arc::new(Target {
            client,
            url: format!("{base}{}", args.endpoint.path()),
            endpoint: args.endpoint,
            model: model.clone(),
            api_key: args.api_key.clone(),
            max_tokens: args.random_output_len,
            ignore_eos: args.ignore_eos,
            temperature: args.temperature,
            timeout: Duration::from_secs_f64(args.timeout),
        });
        let bar = ProgressBar::with_draw_target(
            Some(args.num_prompts as u64),
            ProgressDrawTarget::stderr(),
        );
        if let Ok(style) = ProgressStyle::with_template(
            "{bar:40} {pos}/{len} requests [{elapsed_precise}<{eta_precise}] {msg}",
        ) {
            bar.set_style(style);
        }
        let (results, duration) =
            run_load(target, prompts, &offsets, args.max_concurrency, bar.clone()).await;
        bar.finish_and_clear();
        anyhow::Ok((model, results, duration))
    })?;
    runtime.shutdown_timeout(Duration::from_secs(1));

    let summary = Summary::new(&results, duration);
    let report = report_json(args, &base, &model, &summary, &results);
    #[expect(clippy::print_stdout, reason = "the report is the command's output")]
    {
        print!("{}", summary.table(args.max_concurrency, args.request_rate));
    }
    if let Some(path) = &args.save_result {
        write_atomically(path, &report)?;
    }
    if summary.completed == 0 {
        let first = results
            .iter()
            .find_map(|result| result.outcome.as_ref().err())
            .map_or_else(String::new, |failure| failure.message.clone());
        anyhow::bail!(
            "all {} requests to {}{} failed; the first: {first}",
            results.len(),
            base,
            args.endpoint.path()
        );
    }
    Ok(())
}

/// Checks the numbers before anything is sent.
fn validate(args: &BenchServeArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.url.starts_with("http://") || args.url.starts_with("https://"),
        "--url {}: expected http://HOST:PORT or https://HOST:PORT",
        args.url
    );
    anyhow::ensure!(args.num_prompts >= 1, "--num_prompts must be at least 1");
    anyhow::ensure!(
        args.request_rate > 0.0,
        "--request_rate must be positive (or inf), got {}",
        args.request_rate
    );
    anyhow::ensure!(
        args.max_concurrency != Some(0),
        "--max_concurrency must be at least 1 (leave it out for no limit)"
    );
    anyhow::ensure!(
        args.timeout.is_finite() && args.timeout > 0.0,
        "--timeout must be a positive number of seconds, got {}",
        args.timeout
    );
    anyhow::ensure!(
        args.random_output_len >= 1,
        "--random_output_len must be at least 1"
    );
    anyhow::ensure!(
        args.dataset != "random" || args.random_input_len >= 1,
        "--random_input_len must be at least 1"
    );
    Ok(())
}

/// `http://host:8000/v1/` -> `http://host:8000`.
fn base_url(url: &str) -> String {
    let trimmed = url.trim_end_matches('/');
    trimmed.strip_suffix("/v1").unwrap_or(trimmed).to_owned()
}

/// The first model id the server lists.
async fn first_model(
    client: &reqwest::Client,
    base: &str,
    api_key: Option<&str>,
) -> anyhow::Result<String> {
    let url = format!("{base}/v1/models");
    let mut request = client.get(&url).timeout(Duration::from_secs(30));
    if let Some(key) = api_key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.map_err(|error| {
        anyhow::anyhow!(
            "GET {url}: {}\nhint: is the server up? (--model NAME skips this request)",
            Failure::transport(&error).message
        )
    })?;
    let status = response.status();
    let body = response
        .text()
        .await
        .with_context(|| format!("reading the answer of GET {url}"))?;
    anyhow::ensure!(
        status.is_success(),
        "GET {url}: HTTP {status}: {}\nhint: pass --model NAME",
        snippet(&body)
    );
    let listing: Value = serde_json::from_str(&body)
        .with_context(|| format!("GET {url} answered something other than JSON"))?;
    listing["data"][0]["id"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("GET {url} lists no model\nhint: pass --model NAME"))
}

// ---------------------------------------------------------------------------------------
// Prompts
// ---------------------------------------------------------------------------------------

/// One request's input.
#[derive(Debug, Clone, PartialEq)]
enum Prompt {
    /// Plain text: the one user message on chat, the prompt on completions.
    Text(String),
    /// An OpenAI chat message list, sent as it is (chat only).
    Messages(Vec<Value>),
}

impl Prompt {
    /// Whitespace-separated words of all the text: the input-token estimate for servers that
    /// report no usage.
    fn approximate_tokens(&self) -> u64 {
        let words = |text: &str| text.split_whitespace().count() as u64;
        match self {
            Prompt::Text(text) => words(text),
            Prompt::Messages(messages) => messages
                .iter()
                .map(|message| match &message["content"] {
                    Value::String(text) => words(text),
                    Value::Array(parts) => parts
                        .iter()
                        .filter_map(|part| part["text"].as_str())
                        .map(words)
                        .sum(),
                    _ => 0,
                })
                .sum(),
        }
    }
}

/// The rows of a jsonl dataset; blank lines are skipped, a bad row is an error naming the
/// file and line.
fn read_dataset(path: &Path, endpoint: Endpoint) -> anyhow::Result<Vec<Prompt>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the dataset {}", path.display()))?;
    let mut prompts = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), index + 1);
        let row: Value =
            serde_json::from_str(line).with_context(|| format!("{}: not valid JSON", at()))?;
        let prompt = parse_row(&row).map_err(|message| anyhow::anyhow!("{}: {message}", at()))?;
        anyhow::ensure!(
            endpoint == Endpoint::Chat || matches!(prompt, Prompt::Text(_)),
            "{}: a `messages` row needs --endpoint chat",
            at()
        );
        prompts.push(prompt);
    }
    anyhow::ensure!(!prompts.is_empty(), "{} holds no rows", path.display());
    Ok(prompts)
}

/// `messages` (a non-empty list of objects with a `role`), else `prompt` (a string), else
/// alpaca `instruction` with an optional `input` (joined by a blank line).
fn parse_row(row: &Value) -> Result<Prompt, String> {
    let Some(fields) = row.as_object() else {
        return Err("expected a JSON object".into());
    };
    if let Some(messages) = fields.get("messages") {
        let list = messages
            .as_array()
            .filter(|list| !list.is_empty())
            .ok_or("`messages` must be a non-empty list")?;
        if let Some(position) = list.iter().position(|m| !m["role"].is_string()) {
            return Err(format!("messages[{position}] has no string `role`"));
        }
        return Ok(Prompt::Messages(list.clone()));
    }
    if let Some(prompt) = fields.get("prompt") {
        return prompt
            .as_str()
            .map(|text| Prompt::Text(text.to_owned()))
            .ok_or_else(|| "`prompt` must be a string".into());
    }
    if let Some(instruction) = fields.get("instruction") {
        let instruction = instruction
            .as_str()
            .ok_or("`instruction` must be a string")?;
        let input = match fields.get("input") {
            None | Some(Value::Null) => "",
            Some(input) => input.as_str().ok_or("`input` must be a string")?,
        };
        return Ok(Prompt::Text(if input.is_empty() {
            instruction.to_owned()
        } else {
            format!("{instruction}\n\n{input}")
        }));
    }
    Err("expected a `prompt` string, a `messages` list or alpaca `instruction`/`input`".into())
}

/// Common English words that most BPE vocabularies keep whole (with their leading space), so
/// a prompt of N of them is about N tokens.
const WORDS: &str = "\
    the of and to in is for that with on as by at from this be are was it an or have not \
    but they which one all their there can has more when will would who so no time people \
    year way day man thing woman life child world school state family student group country \
    problem hand part place case week company system program question work government \
    number night point home water room mother area money story fact month lot right study \
    book eye job word business issue side kind head house service friend father power hour \
    game line end member law car city name team minute idea body back parent face level \
    office door health person art war history party result change morning reason research \
    girl guy moment air teacher force education good new first last long great little own \
    other old big high different small large next early young important few public bad same \
    able make know take see come think look want give use find tell ask seem feel try leave \
    call keep begin help show hear play run move live believe bring write sit stand lose \
    pay meet";

/// `count` prompts of `words_per_prompt` random words each, from `seed`.
fn random_prompts(count: usize, words_per_prompt: usize, seed: u64) -> Vec<Prompt> {
    let vocabulary: Vec<&str> = WORDS.split_whitespace().collect();
    let mut rng = StdRng::seed_from_u64(seed);
    (0..count)
        .map(|_| {
            let words: Vec<&str> = (0..words_per_prompt)
                .map(|_| vocabulary[rng.random_range(0..vocabulary.len())])
                .collect();
            Prompt::Text(words.join(" "))
        })
        .collect()
}

/// When each request is sent, from the start of the run: all at once for an infinite rate,
/// else a Poisson process: the first at 0, then exponential gaps of mean 1/rate seconds
/// (inverse transform of a uniform draw), from a generator seeded apart from the prompts'.
fn arrival_offsets(count: usize, request_rate: f64, seed: u64) -> Vec<Duration> {
    if request_rate.is_infinite() {
        return vec![Duration::ZERO; count];
    }
    let mut rng = StdRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
    let mut seconds = 0.0f64;
    (0..count)
        .map(|index| {
            if index > 0 {
                let uniform: f64 = rng.random();
                seconds += -(1.0 - uniform).ln() / request_rate;
            }
            Duration::from_secs_f64(seconds)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------

/// Where and what every request sends.
struct Target {
    client: reqwest::Client,
    /// The full endpoint URL.
    url: String,
    endpoint: Endpoint,
    model: String,
    api_key: Option<String>,
    max_tokens: usize,
    ignore_eos: bool,
    temperature: f64,
    timeout: Duration,
}

impl Target {
    fn body(&self, prompt: &Prompt) -> Value {
        let mut body = json!({
            "model": self.model,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        match (self.endpoint, prompt) {
            (Endpoint::Chat, Prompt::Text(text)) => {
                body["messages"] = json!([{"role": "user", "content": text}]);
            }
            (Endpoint::Chat, Prompt::Messages(messages)) => body["messages"] = json!(messages),
            // read_dataset refuses message lists for completions; a stand-in keeps this total.
            (Endpoint::Completions, Prompt::Text(text)) => body["prompt"] = json!(text),
            (Endpoint::Completions, Prompt::Messages(messages)) => {
                body["prompt"] = json!(Value::Array(messages.clone()).to_string());
            }
        }
        if self.ignore_eos {
            body["ignore_eos"] = json!(true);
        }
        body
    }
}

/// Why a request failed: `reason` groups failures in the report, `message` is the detail.
#[derive(Debug, Clone, PartialEq)]
struct Failure {
    reason: String,
    message: String,
}

impl Failure {
    fn transport(error: &reqwest::Error) -> Self {
        let reason = if error.is_connect() {
            "connection failed"
        } else if error.is_timeout() {
            "timeout"
        } else if error.is_body() || error.is_decode() {
            "stream broken"
        } else {
            "request failed"
        };
        let mut message = error.to_string();
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            message.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        Failure {
            reason: reason.into(),
            message,
        }
    }
}

/// A finished stream.
#[derive(Debug, Clone, Default, PartialEq)]
struct Completion {
    /// `usage.prompt_tokens`, when the server sent usage.
    prompt_tokens: Option<u64>,
    /// `usage.completion_tokens`, when the server sent usage.
    usage_output_tokens: Option<u64>,
    /// Chunks that carried generated text.
    content_chunks: u64,
    /// Send -> first chunk with text; `None` when no text came.
    ttft: Option<Duration>,
    /// Gaps between consecutive chunks with text.
    itls: Vec<Duration>,
    /// Send -> end of the stream.
    e2e: Duration,
}

impl Completion {
    fn output_tokens(&self) -> u64 {
        self.usage_output_tokens.unwrap_or(self.content_chunks)
    }

    /// (E2E - TTFT) / (output tokens - 1), for at least two output tokens.
    fn tpot(&self) -> Option<Duration> {
        let ttft = self.ttft?;
        let tokens = self.output_tokens();
        (tokens > 1).then(|| {
            Duration::from_secs_f64(
                self.e2e.saturating_sub(ttft).as_secs_f64() / (tokens - 1) as f64,
            )
        })
    }
}

/// One request of the run.
#[derive(Debug, Clone)]
struct RequestResult {
    /// The prompt's words, for servers that report no usage.
    approximate_prompt_tokens: u64,
    outcome: Result<Completion, Failure>,
}

/// Sends every prompt at its offset from the start, at most `max_concurrency` in flight;
/// the results come back in prompt order, with the run's duration.
async fn run_load(
    target: Arc<Target>,
    prompts: Vec<Prompt>,
    offsets: &[Duration],
    max_concurrency: Option<usize>,
    bar: ProgressBar,
) -> (Vec<RequestResult>, Duration) {
    let semaphore = max_concurrency.map(|limit| Arc::new(tokio::sync::Semaphore::new(limit)));
    let failed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = tokio::time::Instant::now();
    let mut handles = Vec::with_capacity(prompts.len());
    for (prompt, offset) in prompts.into_iter().zip(offsets) {
        tokio::time::sleep_until(start + *offset).await;
        let target = Arc::clone(&target);
        let semaphore = semaphore.clone();
        let bar = bar.clone();
        let failed = Arc::clone(&failed);
        handles.push(tokio::spawn(async move {
            // The semaphore is never closed, so acquiring only waits.
            let _permit = match semaphore {
                Some(semaphore) => semaphore.acquire_owned().await.ok(),
                None => None,
            };
            let result = send(&target, &prompt).await;
            if result.outcome.is_err() {
                let count = failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                bar.set_message(format!("{count} failed"));
            }
            bar.inc(1);
            result
        }));
    }
    let mut results = Vec::with_capacity(handles.len());
    for handle in handles {
        results.push(handle.await.unwrap_or_else(|error| RequestResult {
            approximate_prompt_tokens: 0,
            outcome: Err(Failure {
                reason: "client task failed".into(),
                message: error.to_string(),
            }),
        }));
    }
    (results, start.elapsed())
}

/// One streaming request, bounded by the target's timeout.
async fn send(target: &Target, prompt: &Prompt) -> RequestResult {
    let start = Instant::now();
    let outcome = match tokio::time::timeout(target.timeout, stream(target, prompt, start)).await {
        Ok(outcome) => outcome,
        Err(_) => Err(Failure {
            reason: "timeout".into(),
            message: format!(
                "no complete answer within --timeout {} s",
                target.timeout.as_secs_f64()
            ),
        }),
    };
    RequestResult {
        approximate_prompt_tokens: prompt.approximate_tokens(),
        outcome,
    }
}

async fn stream(target: &Target, prompt: &Prompt, start: Instant) -> Result<Completion, Failure> {
    let mut request = target.client.post(&target.url).json(&target.body(prompt));
    if let Some(key) = &target.api_key {
        request = request.bearer_auth(key);
    }
    let mut response = request.send().await.map_err(|e| Failure::transport(&e))?;
    let status = response.status();
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        return Err(Failure {
            reason: format!("HTTP {}", status.as_u16()),
            message: format!("HTTP {status}: {}", snippet(&body)),
        });
    }
    let mut parser = SseParser::default();
    let mut completion = Completion::default();
    let mut last_content: Option<Instant> = None;
    loop {
        let bytes = response.chunk().await.map_err(|e| Failure::transport(&e))?;
        let now = Instant::now();
        let events = match &bytes {
            Some(bytes) => parser.push(bytes),
            None => parser.finish().into_iter().collect(),
        };
        for data in events {
            if data.trim() == "[DONE]" {
                continue;
            }
            let chunk: Value = serde_json::from_str(&data).map_err(|error| Failure {
                reason: "invalid stream chunk".into(),
                message: format!("{error}: {}", snippet(&data)),
            })?;
            let parsed = parse_chunk(&chunk, target.endpoint);
            if let Some(message) = parsed.error {
                return Err(Failure {
                    reason: "error in stream".into(),
                    message,
                });
            }
            if parsed.has_text {
                match last_content {
                    None => completion.ttft = Some(now.duration_since(start)),
                    Some(previous) => completion.itls.push(now.duration_since(previous)),
                }
                last_content = Some(now);
                completion.content_chunks += 1;
            }
            if let Some((prompt_tokens, output_tokens)) = parsed.usage {
                completion.prompt_tokens = prompt_tokens.or(completion.prompt_tokens);
                completion.usage_output_tokens = Some(output_tokens);
            }
        }
        if bytes.is_none() {
            completion.e2e = now.duration_since(start);
            return Ok(completion);
        }
    }
}

/// What one stream chunk says.
#[derive(Debug, Default, PartialEq)]
struct ChunkContent {
    /// Whether it carries generated text (chat: `delta.content`, or a reasoning model's
    /// `delta.reasoning_content` / `delta.reasoning`; completions: `text`).
    has_text: bool,
    /// `(usage.prompt_tokens, usage.completion_tokens)`.
    usage: Option<(Option<u64>, u64)>,
    /// The message of an `error` object.
    error: Option<String>,
}

fn parse_chunk(chunk: &Value, endpoint: Endpoint) -> ChunkContent {
    if let Some(error) = chunk.get("error").filter(|e| !e.is_null()) {
        let message = error["message"]
            .as_str()
            .map_or_else(|| error.to_string(), str::to_owned);
        return ChunkContent {
            error: Some(message),
            ..ChunkContent::default()
        };
    }
    let non_empty = |value: &Value| value.as_str().is_some_and(|text| !text.is_empty());
    let has_text = chunk["choices"].as_array().is_some_and(|choices| {
        choices.iter().any(|choice| match endpoint {
            Endpoint::Chat => ["content", "reasoning_content", "reasoning"]
                .iter()
                .any(|field| non_empty(&choice["delta"][field])),
            Endpoint::Completions => non_empty(&choice["text"]),
        })
    });
    let usage = chunk["usage"]["completion_tokens"]
        .as_u64()
        .map(|output| (chunk["usage"]["prompt_tokens"].as_u64(), output));
    ChunkContent {
        has_text,
        usage,
        error: None,
    }
}

/// Splits a `text/event-stream` body into the `data` of each event, across network chunks
/// that may cut an event (or a UTF-8 character) anywhere. Comments, `event:` and `id:` lines
/// are dropped; the data lines of one event are joined by newlines.
#[derive(Debug, Default)]
struct SseParser {
    buffer: Vec<u8>,
}

impl SseParser {
    /// The events completed by `bytes`.
    fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buffer.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some((end, separator)) = event_end(&self.buffer) {
            let event: Vec<u8> = self.buffer.drain(..end + separator).collect();
            events.extend(event_data(&event[..end]));
        }
        events
    }

    /// The last event, when the body ended without a blank line after it.
    fn finish(&mut self) -> Option<String> {
        let rest = std::mem::take(&mut self.buffer);
        event_data(&rest)
    }
}

/// Where the first event in `buffer` ends and how long the blank line after it is.
fn event_end(buffer: &[u8]) -> Option<(usize, usize)> {
    (0..buffer.len()).find_map(|index| {
        let rest = &buffer[index..];
        if rest.starts_with(b"\n\n") || rest.starts_with(b"\r\r") {
            Some((index, 2))
        } else if rest.starts_with(b"\r\n\r\n") {
            Some((index, 4))
        } else {
            None
        }
    })
}

fn event_data(event: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(event);
    let lines: Vec<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .map(|data| data.strip_prefix(' ').unwrap_or(data))
        .collect();
    (!lines.is_empty()).then(|| lines.join("\n"))
}

/// The first 300 characters of a body, on one line, for error messages.
fn snippet(body: &str) -> String {
    // An OpenAI-shaped error body: its message says it best.
    if let Ok(value) = serde_json::from_str::<Value>(body)
        && let Some(message) = value["error"]["message"]
            .as_str()
            .or(value["message"].as_str())
            .or(value["detail"].as_str())
    {
        return message.to_owned();
    }
    let line = body.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(300) {
        Some((cut, _)) => format!("{}...", &line[..cut]),
        None => line,
    }
}

// ---------------------------------------------------------------------------------------
// Statistics and the report
// ---------------------------------------------------------------------------------------

/// Mean, standard deviation and percentiles of one latency over the requests, in ms.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Stats {
    mean: f64,
    std: f64,
    median: f64,
    p90: f64,
    p99: f64,
}

/// The `percent`-th percentile of sorted values, interpolating linearly between the two
/// nearest ranks (numpy's default, which vllm bench serve uses); `None` when empty.
fn percentile(sorted: &[f64], percent: f64) -> Option<f64> {
    let last = sorted.len().checked_sub(1)?;
    let rank = percent / 100.0 * last as f64;
    let below = rank.floor();
    let low = sorted[(below as usize).min(last)];
    let high = sorted[(rank.ceil() as usize).min(last)];
    Some(low + (high - low) * (rank - below))
}

/// Mean, population standard deviation, median, p90 and p99; `None` when empty.
fn stats(values: &[f64]) -> Option<Stats> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let count = sorted.len() as f64;
    let mean = sorted.iter().sum::<f64>() / count;
    let variance = sorted.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / count;
    Some(Stats {
        mean,
        std: variance.sqrt(),
        median: percentile(&sorted, 50.0)?,
        p90: percentile(&sorted, 90.0)?,
        p99: percentile(&sorted, 99.0)?,
    })
}

fn milliseconds(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// Where a token total came from.
fn token_source(from_usage: usize, completed: usize, fallback: &str) -> Option<String> {
    match from_usage {
        _ if completed == 0 => None,
        n if n == completed => Some("usage".into()),
        0 => Some(fallback.into()),
        n => Some(format!(
            "usage for {n} of {completed} requests, {fallback} for the rest"
        )),
    }
}

/// The run's totals, rates and latency statistics over its successful requests.
#[derive(Debug)]
struct Summary {
    completed: usize,
    failed: usize,
    /// Failures per reason.
    failures: BTreeMap<String, usize>,
    duration: Duration,
    total_input_tokens: u64,
    total_output_tokens: u64,
    input_tokens_source: Option<String>,
    output_tokens_source: Option<String>,
    ttft: Option<Stats>,
    tpot: Option<Stats>,
    itl: Option<Stats>,
    e2el: Option<Stats>,
}

impl Summary {
    fn new(results: &[RequestResult], duration: Duration) -> Self {
        let mut failures = BTreeMap::new();
        let mut completions = Vec::new();
        let mut total_input_tokens = 0;
        for result in results {
            match &result.outcome {
                Ok(completion) => {
                    total_input_tokens += completion
                        .prompt_tokens
                        .unwrap_or(result.approximate_prompt_tokens);
                    completions.push(completion);
                }
                Err(failure) => *failures.entry(failure.reason.clone()).or_insert(0) += 1,
            }
        }
        let completed = completions.len();
        let input_usage = completions
            .iter()
            .filter(|c| c.prompt_tokens.is_some())
            .count();
        let output_usage = completions
            .iter()
            .filter(|c| c.usage_output_tokens.is_some())
            .count();
        let latency = |values: Vec<Duration>| {
            stats(&values.into_iter().map(milliseconds).collect::<Vec<_>>())
        };
        Summary {
            completed,
            failed: results.len() - completed,
            failures,
            duration,
            total_input_tokens,
            total_output_tokens: completions.iter().map(|c| c.output_tokens()).sum(),
            input_tokens_source: token_source(input_usage, completed, "prompt words (estimate)"),
            output_tokens_source: token_source(output_usage, completed, "content chunks"),
            ttft: latency(completions.iter().filter_map(|c| c.ttft).collect()),
            tpot: latency(completions.iter().filter_map(|c| c.tpot()).collect()),
            itl: latency(
                completions
                    .iter()
                    .flat_map(|c| c.itls.iter().copied())
                    .collect(),
            ),
            e2el: latency(completions.iter().map(|c| c.e2e).collect()),
        }
    }

    /// Per second of the run's duration.
    fn rate(&self, count: f64) -> f64 {
        count / self.duration.as_secs_f64().max(1e-9)
    }

    /// The table `vllm bench serve` prints, with the failures by reason.
    fn table(&self, max_concurrency: Option<usize>, request_rate: f64) -> String {
        let mut out = format!("{:=^50}\n", " Serving Benchmark Result ");
        let mut row = |label: &str, value: String| out.push_str(&format!("{label:<40} {value}\n"));
        row("Successful requests:", self.completed.to_string());
        row("Failed requests:", self.failed.to_string());
        for (reason, count) in &self.failures {
            row(&format!("  {reason}:"), count.to_string());
        }
        row(
            "Maximum request concurrency:",
            max_concurrency.map_or_else(|| "unlimited".into(), |n| n.to_string()),
        );
        row("Request rate (req/s):", format!("{request_rate}"));
        row(
            "Benchmark duration (s):",
            format!("{:.2}", self.duration.as_secs_f64()),
        );
        row("Total input tokens:", self.total_input_tokens.to_string());
        row(
            "Total generated tokens:",
            self.total_output_tokens.to_string(),
        );
        row(
            "Request throughput (req/s):",
            format!("{:.2}", self.rate(self.completed as f64)),
        );
        row(
            "Output token throughput (tok/s):",
            format!("{:.2}", self.rate(self.total_output_tokens as f64)),
        );
        row(
            "Total token throughput (tok/s):",
            format!(
                "{:.2}",
                self.rate((self.total_input_tokens + self.total_output_tokens) as f64)
            ),
        );
        for (header, name, value) in [
            ("Time to First Token", "TTFT", self.ttft),
            ("Time per Output Token (excl. 1st token)", "TPOT", self.tpot),
            ("Inter-token Latency", "ITL", self.itl),
            ("End-to-end Latency", "E2EL", self.e2el),
        ] {
            out.push_str(&format!("{:-^50}\n", header));
            let show = |pick: fn(&Stats) -> f64| {
                value
                    .as_ref()
                    .map_or("-".into(), |s| format!("{:.2}", pick(s)))
            };
            for (label, pick) in [
                ("Mean", (|s: &Stats| s.mean) as fn(&Stats) -> f64),
                ("Median", |s: &Stats| s.median),
                ("P90", |s: &Stats| s.p90),
                ("P99", |s: &Stats| s.p99),
            ] {
                out.push_str(&format!(
                    "{:<40} {}\n",
                    format!("{label} {name} (ms):"),
                    show(pick)
                ));
            }
        }
        out.push_str(&format!("{:=^50}\n", ""));
        for (what, source) in [
            ("input", &self.input_tokens_source),
            ("output", &self.output_tokens_source),
        ] {
            if let Some(source) = source.as_ref().filter(|s| *s != "usage") {
                out.push_str(&format!("note: {what} tokens counted from {source}\n"));
            }
        }
        out
    }
}

/// The JSON result: the run's settings, `vllm bench serve`'s metric keys, failures by reason
/// and per-request lists.
fn report_json(
    args: &BenchServeArgs,
    base: &str,
    model: &str,
    summary: &Summary,
    results: &[RequestResult],
) -> Value {
    let mut report = json!({
        "backend": "openai",
        "url": base,
        "endpoint": args.endpoint.path(),
        "model": model,
        "dataset": args.dataset,
        "num_prompts": args.num_prompts,
        "random_input_len": (args.dataset == "random").then_some(args.random_input_len),
        "max_tokens": args.random_output_len,
        "request_rate": if args.request_rate.is_finite() { json!(args.request_rate) } else { json!("inf") },
        "max_concurrency": args.max_concurrency,
        "ignore_eos": args.ignore_eos,
        "temperature": args.temperature,
        "seed": args.seed,
        "timeout_s": args.timeout,
        "duration": summary.duration.as_secs_f64(),
        "completed": summary.completed,
        "failed": summary.failed,
        "failures": summary.failures,
        "total_input_tokens": summary.total_input_tokens,
        "total_output_tokens": summary.total_output_tokens,
        "input_tokens_source": summary.input_tokens_source,
        "output_tokens_source": summary.output_tokens_source,
        "request_throughput": summary.rate(summary.completed as f64),
        "output_throughput": summary.rate(summary.total_output_tokens as f64),
        "total_token_throughput":
            summary.rate((summary.total_input_tokens + summary.total_output_tokens) as f64),
    });
    for (name, value) in [
        ("ttft", summary.ttft),
        ("tpot", summary.tpot),
        ("itl", summary.itl),
        ("e2el", summary.e2el),
    ] {
        report[format!("mean_{name}_ms")] = json!(value.map(|s| s.mean));
        report[format!("median_{name}_ms")] = json!(value.map(|s| s.median));
        report[format!("std_{name}_ms")] = json!(value.map(|s| s.std));
        report[format!("p90_{name}_ms")] = json!(value.map(|s| s.p90));
        report[format!("p99_{name}_ms")] = json!(value.map(|s| s.p99));
    }
    // Per request, in prompt order (vLLM's lists; times in seconds, 0 for failures).
    fn completion(result: &RequestResult) -> Option<&Completion> {
        result.outcome.as_ref().ok()
    }
    report["input_lens"] = json!(
        results
            .iter()
            .map(|r| completion(r).map_or(r.approximate_prompt_tokens, |c| c
                .prompt_tokens
                .unwrap_or(r.approximate_prompt_tokens)))
            .collect::<Vec<_>>()
    );
    report["output_lens"] = json!(
        results
            .iter()
            .map(|r| completion(r).map_or(0, Completion::output_tokens))
            .collect::<Vec<_>>()
    );
    report["ttfts"] = json!(
        results
            .iter()
            .map(|r| completion(r)
                .and_then(|c| c.ttft)
                .map_or(0.0, |t| t.as_secs_f64()))
            .collect::<Vec<_>>()
    );
    report["e2els"] = json!(
        results
            .iter()
            .map(|r| completion(r).map_or(0.0, |c| c.e2e.as_secs_f64()))
            .collect::<Vec<_>>()
    );
    report["errors"] = json!(
        results
            .iter()
            .map(|r| r.outcome.as_ref().err().map_or("", |f| f.message.as_str()))
            .collect::<Vec<_>>()
    );
    report
}

/// Writes `report` to a temporary file beside `path`, then renames it over `path`.
fn write_atomically(path: &Path, report: &Value) -> anyhow::Result<()> {
    let directory = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(directory)
        .with_context(|| format!("creating {}", directory.display()))?;
    let mut file = tempfile::NamedTempFile::new_in(directory)
        .with_context(|| format!("creating a temporary file in {}", directory.display()))?;
    serde_json::to_writer_pretty(&mut file, report)
        .with_context(|| format!("writing {}", path.display()))?;
    std::io::Write::write_all(&mut file, b"\n")?;
    file.as_file().sync_all()?;
    file.persist(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_between_ranks_like_numpy() {
        let sorted = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0];
        // numpy.percentile(range(1, 11), [0, 50, 90, 99, 100]) = [1, 5.5, 9.1, 9.91, 10]
        let got: Vec<f64> = [0.0, 50.0, 90.0, 99.0, 100.0]
            .iter()
            .filter_map(|&p| percentile(&sorted, p))
            .collect();
        let want = [1.0, 5.5, 9.1, 9.91, 10.0];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-9, "got {got:?}, want {want:?}");
        }
        assert_eq!(got.len(), 5);
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
    }

    #[test]
    fn stats_sorts_and_gives_mean_std_and_ordered_tails() {
        let s = stats(&[4.0, 1.0, 3.0, 2.0]).expect("non-empty");
        assert!((s.mean - 2.5).abs() < 1e-12);
        // Population std of 1..4: sqrt(1.25).
        assert!((s.std - 1.25f64.sqrt()).abs() < 1e-12);
        assert!((s.median - 2.5).abs() < 1e-12);
        assert!(s.median <= s.p90 && s.p90 <= s.p99);
        assert!((s.p99 - 3.97).abs() < 1e-9);
        assert_eq!(stats(&[]), None);
    }

    #[test]
    fn sse_events_survive_any_split_of_the_body() {
        let body = "data: {\"a\":1}\n\n: keep-alive comment\n\nevent: x\r\ndata: two\r\ndata: lines\r\n\r\ndata: é\n\ndata: [DONE]\n\n";
        let want = vec!["{\"a\":1}", "two\nlines", "é", "[DONE]"];
        let bytes = body.as_bytes();
        // Every single cut point, including inside the two-byte é and the \r\n\r\n.
        for cut in 0..=bytes.len() {
            let mut parser = SseParser::default();
            let mut got = parser.push(&bytes[..cut]);
            got.extend(parser.push(&bytes[cut..]));
            assert_eq!(got, want, "cut at {cut}");
            assert_eq!(parser.finish(), None);
        }
        // Byte by byte.
        let mut parser = SseParser::default();
        let got: Vec<String> = bytes.iter().flat_map(|b| parser.push(&[*b])).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn sse_last_event_without_blank_line_is_kept() {
        let mut parser = SseParser::default();
        assert_eq!(parser.push(b"data: one\n\ndata:two"), vec!["one"]);
        assert_eq!(parser.finish().as_deref(), Some("two"));
    }

    #[test]
    fn chunks_give_text_usage_and_errors() {
        let chat = json!({"choices":[{"delta":{"content":"Hi"}}]});
        assert!(parse_chunk(&chat, Endpoint::Chat).has_text);
        let role_only = json!({"choices":[{"delta":{"role":"assistant","content":""}}]});
        assert!(!parse_chunk(&role_only, Endpoint::Chat).has_text);
        let reasoning = json!({"choices":[{"delta":{"reasoning_content":"hmm"}}]});
        assert!(parse_chunk(&reasoning, Endpoint::Chat).has_text);
        let completion = json!({"choices":[{"text":" the"}]});
        assert!(parse_chunk(&completion, Endpoint::Completions).has_text);
        assert!(!parse_chunk(&completion, Endpoint::Chat).has_text);
        let usage = json!({"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3}});
        assert_eq!(
            parse_chunk(&usage, Endpoint::Chat),
            ChunkContent {
                has_text: false,
                usage: Some((Some(7), 3)),
                error: None
            }
        );
        let null_usage = json!({"choices":[{"delta":{"content":"x"}}],"usage":null});
        assert_eq!(parse_chunk(&null_usage, Endpoint::Chat).usage, None);
        let error = json!({"error":{"message":"out of memory","code":500}});
        assert_eq!(
            parse_chunk(&error, Endpoint::Chat).error.as_deref(),
            Some("out of memory")
        );
    }

    #[test]
    fn dataset_reads_prompt_messages_and_alpaca_rows() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("rows.jsonl");
        std::fs::write(
            &path,
            concat!(
                "{\"prompt\": \"Say hi\"}\n",
                "\n",
                "{\"messages\": [{\"role\": \"system\", \"content\": \"Be brief\"}, {\"role\": \"user\", \"content\": \"Hi\"}]}\n",
                "{\"instruction\": \"Translate\", \"input\": \"bonjour\", \"output\": \"hello\"}\n",
                "{\"instruction\": \"Count to three\", \"input\": \"\"}\n",
            ),
        )?;
        let rows = read_dataset(&path, Endpoint::Chat)?;
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[0], Prompt::Text("Say hi".into()));
        assert!(matches!(&rows[1], Prompt::Messages(m) if m.len() == 2));
        assert_eq!(rows[1].approximate_tokens(), 3);
        assert_eq!(rows[2], Prompt::Text("Translate\n\nbonjour".into()));
        assert_eq!(rows[3], Prompt::Text("Count to three".into()));
        // A message list cannot go to /v1/completions: the error names file and line 3.
        let error = read_dataset(&path, Endpoint::Completions)
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(error.contains("rows.jsonl:3"), "{error}");
        Ok(())
    }

    #[test]
    fn bad_dataset_rows_name_file_and_line() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("bad.jsonl");
        for (text, line, says) in [
            (
                "{\"prompt\": \"ok\"}\n{\"prompt\": 3}\n",
                2,
                "`prompt` must be a string",
            ),
            ("{\"prompt\": \"ok\"}\n\n{not json\n", 3, "not valid JSON"),
            ("{\"text\": \"?\"}\n", 1, "expected a `prompt` string"),
            ("{\"messages\": []}\n", 1, "non-empty list"),
            ("{\"messages\": [{\"content\": \"x\"}]}\n", 1, "messages[0]"),
            ("[1, 2]\n", 1, "expected a JSON object"),
        ] {
            std::fs::write(&path, text)?;
            let error = read_dataset(&path, Endpoint::Chat)
                .err()
                .map(|e| format!("{e:#}"))
                .unwrap_or_default();
            assert!(
                error.contains(&format!("bad.jsonl:{line}")) && error.contains(says),
                "{text:?} -> {error}"
            );
        }
        std::fs::write(&path, "\n\n")?;
        assert!(read_dataset(&path, Endpoint::Chat).is_err());
        Ok(())
    }

    #[test]
    fn poisson_gaps_are_seeded_and_have_the_asked_mean() {
        let a = arrival_offsets(2000, 4.0, 7);
        assert_eq!(a, arrival_offsets(2000, 4.0, 7));
        assert_ne!(a, arrival_offsets(2000, 4.0, 8));
        assert_eq!(a[0], Duration::ZERO);
        assert!(a.windows(2).all(|w| w[0] <= w[1]));
        // 1999 gaps of mean 0.25 s: the total is within a few percent of 500 s.
        let total = a[1999].as_secs_f64();
        assert!(
            (total / 1999.0 - 0.25).abs() < 0.02,
            "mean gap {}",
            total / 1999.0
        );
        assert_eq!(
            arrival_offsets(3, f64::INFINITY, 7),
            vec![Duration::ZERO; 3]
        );
    }

    #[test]
    fn random_prompts_are_seeded_and_sized() {
        let prompts = random_prompts(3, 50, 1);
        assert_eq!(prompts, random_prompts(3, 50, 1));
        assert_ne!(prompts[0], prompts[1]);
        assert!(prompts.iter().all(|p| p.approximate_tokens() == 50));
    }

    #[test]
    fn tpot_excludes_the_first_token_and_summary_counts_sources() {
        let completion = Completion {
            prompt_tokens: Some(10),
            usage_output_tokens: Some(5),
            content_chunks: 5,
            ttft: Some(Duration::from_millis(100)),
            itls: vec![Duration::from_millis(25); 4],
            e2e: Duration::from_millis(200),
        };
        assert_eq!(completion.tpot(), Some(Duration::from_millis(25)));
        let no_usage = Completion {
            prompt_tokens: None,
            usage_output_tokens: None,
            ..completion.clone()
        };
        let results = vec![
            RequestResult {
                approximate_prompt_tokens: 8,
                outcome: Ok(completion),
            },
            RequestResult {
                approximate_prompt_tokens: 8,
                outcome: Ok(no_usage),
            },
            RequestResult {
                approximate_prompt_tokens: 8,
                outcome: Err(Failure {
                    reason: "HTTP 500".into(),
                    message: "HTTP 500: boom".into(),
                }),
            },
        ];
        let summary = Summary::new(&results, Duration::from_secs(2));
        assert_eq!((summary.completed, summary.failed), (2, 1));
        assert_eq!(summary.failures.get("HTTP 500"), Some(&1));
        assert_eq!(summary.total_input_tokens, 18);
        assert_eq!(summary.total_output_tokens, 10);
        assert!(
            summary
                .output_tokens_source
                .as_deref()
                .is_some_and(|s| s.starts_with("usage for 1 of 2"))
        );
        assert_eq!(summary.itl.map(|s| s.p99), Some(25.0));
        let table = summary.table(Some(4), f64::INFINITY);
        assert!(
            table.contains("Successful requests:                     2"),
            "{table}"
        );
        assert!(table.contains("  HTTP 500:"), "{table}");
    }

    #[test]
    fn base_url_accepts_a_trailing_v1() {
        assert_eq!(base_url("http://h:8000/v1/"), "http://h:8000");
        assert_eq!(base_url("http://h:8000"), "http://h:8000");
    }
}

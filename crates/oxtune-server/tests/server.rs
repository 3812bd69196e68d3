//! The server in-process on 127.0.0.1:0, over the tiny Llama fixture (a real checkpoint with
//! random weights and a real tokenizer) or over a mock runner whose steps the test controls
//! (gated, failing or panicking), so every path — including drain, overload and a mid-stream
//! failure — is driven by events, not by timing.

use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use oxtune_engine::runner::Runner;
use oxtune_engine::scheduler::Batch;
use oxtune_engine::{EngineConfig, EngineHandle, EngineParts, ModelInfo};
use oxtune_server::{AppState, ServerConfig};
use oxtune_tensor::{DType, Device, Tensor};
use serde_json::{Value, json};

const VOCAB: usize = 512;
const EOS: u32 = 511;
/// The token the mock model always predicts.
const MOCK_TOKEN: usize = 300;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

fn tiny_engine(config: EngineConfig) -> anyhow::Result<EngineHandle> {
    let model = oxtune_models::LoadedModel::load(&fixture("tiny-llama"), &Device::Cpu, DType::F32)?;
    let adapters = [(
        "tiny-lora".to_owned(),
        fixture("peft/tiny-llama-lora/adapter"),
    )];
    Ok(EngineHandle::start(
        model,
        &adapters,
        EngineConfig {
            num_blocks: Some(256),
            ..config
        },
    )?)
}

/// What the mock does at each step.
enum Mode {
    /// Waits for one message per step (a closed channel fails the step).
    Gated(std_mpsc::Receiver<()>),
    /// Fails from the given step on.
    FailAt(usize),
    /// Panics at the given step (the engine thread dies).
    PanicAt(usize),
}

struct MockRunner {
    mode: Mode,
    steps: usize,
}

impl Runner for MockRunner {
    fn execute(&mut self, batch: &Batch) -> oxtune_engine::Result<Tensor> {
        self.steps += 1;
        match &self.mode {
            Mode::Gated(gate) if gate.recv().is_err() => {
                return Err(oxtune_engine::Error::Config("gate closed".into()));
            }
            Mode::FailAt(step) if self.steps >= *step => {
                return Err(oxtune_engine::Error::Config(
                    "mock failure at /secret/path/model.rs:42".into(),
                ));
            }
            Mode::PanicAt(step) if self.steps >= *step => {
                #[expect(clippy::panic, reason = "simulates an engine crash")]
                {
                    panic!("mock engine crash");
                }
            }
            _ => {}
        }
        let rows = batch.sequences.len();
        let mut logits = vec![0.0f32; rows * VOCAB];
        for row in 0..rows {
            logits[row * VOCAB + MOCK_TOKEN] = 10.0;
        }
        Ok(Tensor::from_vec(logits, (rows, VOCAB), &Device::Cpu)?)
    }
}

fn mock_engine(mode: Mode) -> anyhow::Result<EngineHandle> {
    let tokenizer = oxtune_models::Tokenizer::load(&fixture("tiny-llama"))?;
    Ok(EngineHandle::spawn(
        EngineParts {
            runner: Box::new(MockRunner { mode, steps: 0 }),
            tokenizer,
            chat_template: None,
            info: ModelInfo {
                max_model_len: 256,
                vocab_size: VOCAB,
                adapters: Vec::new(),
                eos_token_ids: vec![EOS],
            },
            num_blocks: 64,
        },
        EngineConfig::default(),
    )?)
}

/// reqwest is built without a default TLS provider (the workspace pins ring); plain HTTP still
/// needs one installed before a client is built.
fn client_builder() -> reqwest::ClientBuilder {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
}

fn config() -> ServerConfig {
    ServerConfig {
        served_model_name: "tiny".into(),
        ..ServerConfig::default()
    }
}

struct Server {
    url: String,
    client: reqwest::Client,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), oxtune_server::Error>>,
}

impl Server {
    async fn start(state: AppState) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let (shutdown, signal) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(oxtune_server::serve(listener, state, async move {
            let _ = signal.await;
        }));
        // A fresh connection per request: after an early error reply (413 before the body is
        // read) the server closes its connection, and a pooled client could send the next
        // request on it while it closes ("connection closed before message completed").
        Ok(Self {
            url,
            client: client_builder().pool_max_idle_per_host(0).build()?,
            shutdown: Some(shutdown),
            task,
        })
    }

    async fn post(&self, path: &str, body: &Value) -> anyhow::Result<reqwest::Response> {
        Ok(self
            .client
            .post(format!("{}{path}", self.url))
            .json(body)
            .send()
            .await?)
    }

    async fn get(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        Ok(self
            .client
            .get(format!("{}{path}", self.url))
            .send()
            .await?)
    }

    async fn metrics(&self) -> anyhow::Result<String> {
        Ok(self.get("/metrics").await?.text().await?)
    }

    /// Polls /metrics until `done` holds (the engine publishes its stats every step and every
    /// 100 ms when idle), failing after 10 s.
    async fn wait_metrics(
        &self,
        what: &str,
        done: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = self.metrics().await?;
            if done(&text) {
                return Ok(text);
            }
            if Instant::now() > deadline {
                bail!("{what} did not happen within 10 s; metrics:\n{text}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .context("the server did not stop")???;
        Ok(())
    }
}

fn metric(text: &str, name: &str) -> f64 {
    oxtune_server::metrics::sample(text, name).unwrap_or(f64::NAN)
}

/// The `data:` payloads of an SSE body.
fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|event| {
            event
                .lines()
                .find_map(|line| {
                    line.strip_prefix("data: ")
                        .or_else(|| line.strip_prefix("data:"))
                })
                .map(str::to_owned)
        })
        .collect()
}

fn chat(content: &str) -> Value {
    json!({"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0})
}

fn check_envelope(body: &Value) -> anyhow::Result<()> {
    let error = &body["error"];
    ensure!(error["message"].is_string(), "no message: {body}");
    ensure!(error["type"].is_string(), "no type: {body}");
    ensure!(
        error["code"].is_string() || error["code"].is_null(),
        "code: {body}"
    );
    ensure!(error.get("param").is_some(), "no param: {body}");
    let message = error["message"].as_str().unwrap_or_default();
    for leak in ["src/", ".rs:", "0x", "panicked", "/secret"] {
        ensure!(!message.contains(leak), "`{leak}` leaked: {message}");
    }
    Ok(())
}

/// Case 1 (and 2-10): every error path returns the envelope with the right status, param and
/// code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_path_returns_the_openai_envelope() -> anyhow::Result<()> {
    let state = AppState::with_engine(
        ServerConfig {
            api_keys: vec!["Key-1".into()],
            max_payload_size: 16 * 1024,
            ..config()
        },
        tiny_engine(EngineConfig::default())?,
    )?;
    let server = Server::start(state).await?;
    let long_prompt = "the quick brown fox jumps over the lazy dog ".repeat(80);
    // (what, method, path, key, content type, body, status, param, code)
    type Row<'a> = (
        &'a str,
        &'a str,
        &'a str,
        Option<&'a str>,
        Option<&'a str>,
        String,
        u16,
        Option<&'a str>,
        Option<&'a str>,
    );
    let chat_body = |value: Value| value.to_string();
    let rows: Vec<Row> = vec![
        (
            "malformed JSON",
            "POST",
            "/v1/chat/completions",
            Some("Key-1"),
            Some("application/json"),
            "{\"messages\": [".into(),
            400,
            None,
            None,
        ),
        (
            "wrong type",
            "POST",
            "/v1/chat/completions",
            Some("Key-1"),
            Some("application/json"),
            chat_body(
                json!({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}),
            ),
            400,
            Some("temperature"),
            None,
        ),
        (
            "text/plain",
            "POST",
            "/v1/chat/completions",
            Some("Key-1"),
            Some("text/plain"),
            chat_body(chat("hi")),
            415,
            None,
            Some("unsupported_media_type"),
        ),
        (
            "no content type",
            "POST",
            "/v1/completions",
            Some("Key-1"),
            None,
            chat_body(json!({"prompt": "hi"})),
            415,
            None,
            Some("unsupported_media_type"),
        ),
        (
            "unknown model",
            "POST",
            "/v1/chat/completions",
            Some("Key-1"),
            Some("application/json"),
            chat_body(json!({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]})),
            404,
            Some("model"),
            Some("model_not_found"),
        ),
        (
            "empty messages",
            "POST",
            "/v1/chat/completions",
            Some("Key-1"),
            Some("application/json"),
            chat_body(json!({"messages": []})),
            400,
            Some("messages"),
            None,
        ),
        (
            "empty prompt",
            "POST",
            "/v1/completions",
            Some("Key-1"),
            Some("application/json"),
            chat_body(json!({"prompt": ""})),
            400,
            Some("prompt"),
            None,
        ),
        (
            "prompt > context",
            "POST",
            "/v1/chat/completions",
            Some("Key-1"),
            Some("application/json"),
            chat_body(json!({"messages": [{"role": "user", "content": long_prompt}]})),
            400,
            Some("messages"),
            Some("context_length_exceeded"),
        ),
        (
            "prompt + max_tokens > context",
            "POST",
            "/v1/completions",
            Some("Key-1"),
            Some("application/json"),
            chat_body(json!({"prompt": "hello", "max_tokens": 1000})),
            400,
            Some("max_tokens"),
            Some("context_length_exceeded"),
        ),
        (
            "temperature < 0",
            "POST",
            "/v1/chat/completions",
            Some("Key-1"),
            Some("application/json"),
            chat_body(json!({"messages": [{"role": "user", "content": "hi"}], "temperature": -1})),
            400,
            Some("temperature"),
            None,
        ),
        (
            "top_p = 0",
            "POST",
            "/v1/completions",
            Some("Key-1"),
            Some("application/json"),
            chat_body(json!({"prompt": "hi", "top_p": 0})),
            400,
            Some("top_p"),
            None,
        ),
        (
            "top_p > 1",
            "POST",
            "/v1/completions",
            Some("Key-1"),
            Some("application/json"),
            chat_body(json!({"prompt": "hi", "top_p": 1.5})),
            400,
            Some("top_p"),
            None,
        ),
        (
            "top_k < 0",
            "POST",
            "/v1/completions",
            Some("Key-1"),
            Some("application/json"),
            chat_body(json!({"prompt": "hi", "top_k": -5})),
            400,
            Some("top_k"),
            None,
        ),
        (
            "n > cap",
            "POST",
            "/v1/completions",
            Some("Key-1"),
            Some("application/json"),
            chat_body(json!({"prompt": "hi", "n": 1000})),
            400,
            Some("n"),
            None,
        ),
        (
            "stop list > cap",
            "POST",
            "/v1/completions",
            Some("Key-1"),
            Some("application/json"),
            chat_body(json!({"prompt": "hi", "stop": vec!["x"; 100]})),
            400,
            Some("stop"),
            None,
        ),
        (
            "logit_bias out of vocab",
            "POST",
            "/v1/completions",
            Some("Key-1"),
            Some("application/json"),
            chat_body(json!({"prompt": "hi", "logit_bias": {"99999": 5}})),
            400,
            Some("logit_bias"),
            None,
        ),
        (
            "token id >= vocab",
            "POST",
            "/v1/completions",
            Some("Key-1"),
            Some("application/json"),
            chat_body(json!({"prompt": [1, 2, 99999]})),
            400,
            Some("prompt"),
            None,
        ),
        (
            "top_logprobs > cap",
            "POST",
            "/v1/chat/completions",
            Some("Key-1"),
            Some("application/json"),
            chat_body(
                json!({"messages": [{"role": "user", "content": "hi"}], "logprobs": true, "top_logprobs": 50}),
            ),
            400,
            Some("top_logprobs"),
            None,
        ),
        (
            "logprobs > cap",
            "POST",
            "/v1/completions",
            Some("Key-1"),
            Some("application/json"),
            chat_body(json!({"prompt": "hi", "logprobs": 50})),
            400,
            Some("logprobs"),
            None,
        ),
        (
            "bad json_schema",
            "POST",
            "/v1/chat/completions",
            Some("Key-1"),
            Some("application/json"),
            chat_body(
                json!({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
            ),
            400,
            Some("response_format"),
            None,
        ),
        (
            "body > limit",
            "POST",
            "/v1/completions",
            Some("Key-1"),
            Some("application/json"),
            chat_body(json!({"prompt": "x".repeat(40_000)})),
            413,
            None,
            Some("payload_too_large"),
        ),
        (
            "no key",
            "POST",
            "/v1/chat/completions",
            None,
            Some("application/json"),
            chat_body(chat("hi")),
            401,
            None,
            Some("invalid_api_key"),
        ),
        (
            "wrong key",
            "GET",
            "/v1/models",
            Some("Key-2"),
            None,
            String::new(),
            401,
            None,
            Some("invalid_api_key"),
        ),
        (
            "key in the wrong case",
            "GET",
            "/v1/models",
            Some("key-1"),
            None,
            String::new(),
            401,
            None,
            Some("invalid_api_key"),
        ),
        (
            "metrics without key",
            "GET",
            "/metrics",
            None,
            None,
            String::new(),
            401,
            None,
            Some("invalid_api_key"),
        ),
        (
            "unknown route",
            "GET",
            "/v1/nothing",
            Some("Key-1"),
            None,
            String::new(),
            404,
            None,
            Some("not_found"),
        ),
        (
            "wrong method",
            "GET",
            "/v1/chat/completions",
            Some("Key-1"),
            None,
            String::new(),
            405,
            None,
            Some("method_not_allowed"),
        ),
        (
            "unknown model card",
            "GET",
            "/v1/models/nope",
            Some("Key-1"),
            None,
            String::new(),
            404,
            Some("model"),
            Some("model_not_found"),
        ),
    ];
    let mut failures = Vec::new();
    for (what, method, path, key, content_type, body, status, param, code) in rows {
        let mut request = match method {
            "GET" => server.client.get(format!("{}{path}", server.url)),
            _ => server
                .client
                .post(format!("{}{path}", server.url))
                .body(body),
        };
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let response = request.send().await?;
        let got_status = response.status().as_u16();
        let text = response.text().await?;
        let json: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let envelope = check_envelope(&json);
        let got_param = json["error"]["param"].as_str();
        let got_code = json["error"]["code"].as_str();
        if got_status != status || envelope.is_err() || got_param != param || got_code != code {
            failures.push(format!(
                "{what}: want {status} param={param:?} code={code:?}, got {got_status} {text} ({envelope:?})"
            ));
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    // The probes stay open.
    ensure!(server.get("/health").await?.status() == 200);
    let metrics = server
        .client
        .get(format!("{}/metrics", server.url))
        .bearer_auth("Key-1")
        .send()
        .await?
        .text()
        .await?;
    ensure!(
        metric(
            &metrics,
            "oxtune:request_failure_total{reason=\"unauthorized\"}"
        ) == 4.0,
        "{metrics}"
    );
    ensure!(
        metric(
            &metrics,
            "oxtune:request_failure_total{reason=\"invalid_request\"}"
        ) >= 19.0,
        "{metrics}"
    );
    server.stop().await
}

/// Case 3: a 4 KB body with thousands of bad elements gets a small answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_errors_stay_small() -> anyhow::Result<()> {
    let server = Server::start(AppState::with_engine(
        config(),
        mock_engine(Mode::FailAt(1))?,
    )?)
    .await?;
    let body = format!(r#"{{"messages": [{}]}}"#, vec!["1"; 2000].join(","));
    ensure!(body.len() > 3000);
    let response = server
        .client
        .post(format!("{}/v1/chat/completions", server.url))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await?;
    ensure!(response.status() == 400);
    let text = response.text().await?;
    ensure!(text.len() <= 2048, "{} bytes: {text}", text.len());
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completions_models_and_adapters_work() -> anyhow::Result<()> {
    let server = Server::start(AppState::with_engine(
        config(),
        tiny_engine(EngineConfig::default())?,
    )?)
    .await?;
    // Models: the base and the adapter with its parent.
    let models: Value = server.get("/v1/models").await?.json().await?;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["id"].as_str())
        .collect();
    ensure!(ids == ["tiny", "tiny-lora"], "{models}");
    ensure!(models["data"][1]["parent"] == "tiny", "{models}");
    // Chat, greedy, with logprobs.
    let mut body = chat("Hello there");
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(3);
    let response: Value = server
        .post("/v1/chat/completions", &body)
        .await?
        .json()
        .await?;
    let choice = &response["choices"][0];
    ensure!(choice["message"]["role"] == "assistant", "{response}");
    ensure!(choice["finish_reason"] == "length", "{response}");
    ensure!(response["usage"]["completion_tokens"] == 8, "{response}");
    ensure!(
        response["usage"]["prompt_tokens_details"]["cached_tokens"].is_u64(),
        "{response}"
    );
    let content = choice["logprobs"]["content"]
        .as_array()
        .context("logprobs")?;
    ensure!(
        content.len() == 8 && content[0]["top_logprobs"].as_array().map(Vec::len) == Some(3),
        "{response}"
    );
    // The adapter answers differently from the base (same greedy prompt).
    body["model"] = json!("tiny-lora");
    let adapted: Value = server
        .post("/v1/chat/completions", &body)
        .await?
        .json()
        .await?;
    ensure!(adapted["model"] == "tiny-lora", "{adapted}");
    ensure!(
        adapted["choices"][0]["logprobs"] != choice["logprobs"],
        "the adapter changed nothing"
    );
    // Completions: n = 3 with a seed, twice -> the same three texts; logprobs in the legacy format.
    let body = json!({"prompt": "Once upon", "max_tokens": 6, "n": 3, "seed": 11, "temperature": 1.0, "logprobs": 2});
    let first: Value = server.post("/v1/completions", &body).await?.json().await?;
    let second: Value = server.post("/v1/completions", &body).await?.json().await?;
    let texts = |v: &Value| -> Vec<String> {
        v["choices"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| c["text"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    ensure!(
        texts(&first).len() == 3 && texts(&first) == texts(&second),
        "{first}\n{second}"
    );
    ensure!(first["usage"]["completion_tokens"] == 18, "{first}");
    ensure!(
        first["choices"][0]["logprobs"]["tokens"]
            .as_array()
            .map(Vec::len)
            == Some(6),
        "{first}"
    );
    // stop: the text ends before the stop string.
    let plain: Value = server
        .post(
            "/v1/completions",
            &json!({"prompt": "Once upon", "max_tokens": 12, "temperature": 0}),
        )
        .await?
        .json()
        .await?;
    let text = plain["choices"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    if let Some(stop) = text.chars().nth(4).filter(|c| !c.is_whitespace()) {
        let stopped: Value = server.post("/v1/completions", &json!({"prompt": "Once upon", "max_tokens": 12, "temperature": 0, "stop": [stop.to_string()]})).await?.json().await?;
        ensure!(
            stopped["choices"][0]["finish_reason"] == "stop",
            "{stopped}"
        );
        ensure!(
            !stopped["choices"][0]["text"]
                .as_str()
                .unwrap_or_default()
                .contains(stop),
            "{stopped}"
        );
    }
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_sends_role_tokens_finish_usage_and_done() -> anyhow::Result<()> {
    let server = Server::start(AppState::with_engine(
        config(),
        tiny_engine(EngineConfig::default())?,
    )?)
    .await?;
    let mut body = chat("Stream please");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    body["n"] = json!(2);
    let response = server.post("/v1/chat/completions", &body).await?;
    ensure!(
        response.headers()["content-type"]
            .to_str()?
            .starts_with("text/event-stream")
    );
    let events = sse_data(&response.text().await?);
    ensure!(
        events.last().map(String::as_str) == Some("[DONE]"),
        "{events:?}"
    );
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e))
        .collect::<Result<_, _>>()?;
    for index in 0..2 {
        let mine: Vec<&Value> = chunks
            .iter()
            .filter(|c| c["choices"][0]["index"] == index)
            .collect();
        ensure!(
            mine.first()
                .is_some_and(|c| c["choices"][0]["delta"]["role"] == "assistant"),
            "{chunks:?}"
        );
        ensure!(
            mine.last()
                .is_some_and(|c| c["choices"][0]["finish_reason"] == "length"),
            "{chunks:?}"
        );
    }
    let usage = chunks.last().context("no chunks")?;
    ensure!(
        usage["choices"].as_array().is_some_and(Vec::is_empty),
        "{usage}"
    );
    ensure!(usage["usage"]["completion_tokens"] == 16, "{usage}");
    ensure!(chunks[0]["usage"].is_null(), "{}", chunks[0]);
    server.stop().await
}

/// Case 13: a client that goes away mid-stream frees its sequence and KV blocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_disconnect_aborts_and_frees_the_cache() -> anyhow::Result<()> {
    let (gate, steps) = std_mpsc::channel();
    let server = Server::start(AppState::with_engine(
        config(),
        mock_engine(Mode::Gated(steps))?,
    )?)
    .await?;
    let baseline = server.metrics().await?;
    ensure!(
        metric(&baseline, "oxtune:kv_cache_usage_perc") == 0.0,
        "{baseline}"
    );
    let body = json!({"prompt": "abc", "max_tokens": 200, "stream": true, "ignore_eos": true});
    let mut response = server.post("/v1/completions", &body).await?;
    gate.send(())?;
    gate.send(())?;
    let first = response.chunk().await?.context("no first chunk")?;
    ensure!(String::from_utf8_lossy(&first).contains("data:"));
    server
        .wait_metrics("running = 1", |m| {
            metric(m, "oxtune:num_requests_running") == 1.0
        })
        .await?;
    drop(response);
    // Once the server has seen the client go (and dropped the channel), one more step lets the
    // engine notice: it checks for closed channels between steps.
    server
        .wait_metrics("the disconnect to be seen", |m| {
            metric(
                m,
                "oxtune:request_failure_total{reason=\"client_disconnected\"}",
            ) == 1.0
        })
        .await?;
    let _ = gate.send(());
    let text = server
        .wait_metrics("running back to 0 and KV to baseline", |m| {
            metric(m, "oxtune:num_requests_running") == 0.0
                && metric(m, "oxtune:kv_cache_usage_perc") == 0.0
        })
        .await?;
    ensure!(
        metric(
            &text,
            "oxtune:request_failure_total{reason=\"client_disconnected\"}"
        ) == 1.0,
        "{text}"
    );
    drop(gate);
    server.stop().await
}

/// Case 11: beyond --max_concurrent_requests, an immediate 429 with Retry-After, counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_an_immediate_429_with_retry_after() -> anyhow::Result<()> {
    let (gate, steps) = std_mpsc::channel();
    let state = AppState::with_engine(
        ServerConfig {
            max_concurrent_requests: 1,
            ..config()
        },
        mock_engine(Mode::Gated(steps))?,
    )?;
    let server = Server::start(state).await?;
    let held = server
        .post(
            "/v1/completions",
            &json!({"prompt": "a", "max_tokens": 2, "stream": true}),
        )
        .await?;
    ensure!(held.status() == 200);
    let started = Instant::now();
    let refused = server
        .post("/v1/completions", &json!({"prompt": "b", "max_tokens": 2}))
        .await?;
    ensure!(
        started.elapsed() < Duration::from_secs(5),
        "the 429 was not immediate"
    );
    ensure!(refused.status() == 429);
    ensure!(refused.headers().get("retry-after").is_some());
    let body: Value = refused.json().await?;
    check_envelope(&body)?;
    ensure!(body["error"]["type"] == "rate_limit_error", "{body}");
    for _ in 0..4 {
        gate.send(())?;
    }
    let events = sse_data(&held.text().await?);
    ensure!(
        events.last().map(String::as_str) == Some("[DONE]"),
        "{events:?}"
    );
    let metrics = server.metrics().await?;
    ensure!(
        metric(
            &metrics,
            "oxtune:request_failure_total{reason=\"overloaded\"}"
        ) == 1.0,
        "{metrics}"
    );
    // The permit is back: a new request is admitted.
    gate.send(())?;
    gate.send(())?;
    ensure!(
        server
            .post("/v1/completions", &json!({"prompt": "c", "max_tokens": 1}))
            .await?
            .status()
            == 200
    );
    drop(gate);
    server.stop().await
}

/// Case 14: an engine failure mid-stream is an SSE error event in the envelope, then [DONE],
/// never a silent finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mid_stream_failure_is_an_error_event_then_done() -> anyhow::Result<()> {
    let server = Server::start(AppState::with_engine(
        config(),
        mock_engine(Mode::FailAt(3))?,
    )?)
    .await?;
    let mut body = chat("hi");
    body["stream"] = json!(true);
    body["max_tokens"] = json!(50);
    let response = server.post("/v1/chat/completions", &body).await?;
    ensure!(response.status() == 200);
    let events = sse_data(&response.text().await?);
    ensure!(events.len() >= 3, "{events:?}");
    ensure!(events[events.len() - 1] == "[DONE]", "{events:?}");
    let error: Value = serde_json::from_str(&events[events.len() - 2])?;
    check_envelope(&error)?;
    ensure!(error["error"]["type"] == "server_error", "{error}");
    ensure!(
        !events
            .iter()
            .any(|e| e.contains("\"finish_reason\":\"stop\"")),
        "{events:?}"
    );
    // Non-streaming: a 500 in the envelope without internals.
    let failed = server.post("/v1/chat/completions", &chat("again")).await?;
    ensure!(failed.status() == 500);
    check_envelope(&failed.json().await?)?;
    server.stop().await
}

/// Case 16: a dead engine makes /health and /health/ready answer 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_engine_fails_the_health_checks() -> anyhow::Result<()> {
    let engine = mock_engine(Mode::PanicAt(1))?;
    let server = Server::start(AppState::with_engine(config(), engine.clone())?).await?;
    ensure!(server.get("/health").await?.status() == 200);
    // The readiness generation crashes the engine.
    let ready = server.get("/health/ready").await?;
    ensure!(ready.status() == 503, "{}", ready.status());
    check_envelope(&ready.json().await?)?;
    let health = server.get("/health").await?;
    ensure!(health.status() == 503);
    ensure!(!engine.is_alive());
    let refused = server
        .post("/v1/completions", &json!({"prompt": "a"}))
        .await?;
    ensure!(refused.status() == 503);
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_generates_a_token_and_starting_is_503() -> anyhow::Result<()> {
    let state = AppState::new(config())?;
    let server = Server::start(state.clone()).await?;
    ensure!(server.get("/health/ready").await?.status() == 503);
    ensure!(
        server
            .post("/v1/completions", &json!({"prompt": "a"}))
            .await?
            .status()
            == 503
    );
    state.set_engine(tiny_engine(EngineConfig::default())?);
    let ready = server.get("/health/ready").await?;
    ensure!(ready.status() == 200, "{}", ready.text().await?);
    server.stop().await
}

/// Case 15: on shutdown new requests get 503, in-flight ones finish, then serve returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_refuses_new_requests_and_finishes_in_flight_ones() -> anyhow::Result<()> {
    let (gate, steps) = std_mpsc::channel();
    let state = AppState::with_engine(
        ServerConfig {
            shutdown_timeout: Duration::from_secs(30),
            ..config()
        },
        mock_engine(Mode::Gated(steps))?,
    )?;
    let mut server = Server::start(state.clone()).await?;
    let mut in_flight = server
        .post(
            "/v1/completions",
            &json!({"prompt": "a", "max_tokens": 3, "stream": true, "ignore_eos": true}),
        )
        .await?;
    gate.send(())?;
    let first = in_flight.chunk().await?.context("no first chunk")?;
    ensure!(!first.is_empty());
    if let Some(shutdown) = server.shutdown.take() {
        let _ = shutdown.send(());
    }
    // Wait for the drain to begin (an observable state), then a new request is refused.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !state.is_draining() {
        ensure!(Instant::now() < deadline, "the drain did not start");
        tokio::task::yield_now().await;
    }
    // A connection refused or closed is allowed too.
    if let Ok(refused) = server
        .post("/v1/completions", &json!({"prompt": "b", "max_tokens": 1}))
        .await
    {
        ensure!(refused.status() == 503, "{}", refused.status());
    }
    // The first step produced token 1; two more finish the request (max_tokens 3).
    for _ in 0..2 {
        gate.send(())?;
    }
    let mut rest = String::from_utf8_lossy(&first).into_owned();
    while let Some(chunk) = in_flight.chunk().await? {
        rest.push_str(&String::from_utf8_lossy(&chunk));
    }
    ensure!(rest.contains("\"finish_reason\":\"length\""), "{rest}");
    ensure!(rest.trim_end().ends_with("data: [DONE]"), "{rest}");
    tokio::time::timeout(Duration::from_secs(10), server.task).await???;
    Ok(())
}

/// Case 15 with timeout 0: in-flight requests are aborted (finish_reason "abort") at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_with_zero_timeout_aborts_in_flight_requests() -> anyhow::Result<()> {
    let (gate, steps) = std_mpsc::channel();
    let state = AppState::with_engine(
        ServerConfig {
            shutdown_timeout: Duration::ZERO,
            ..config()
        },
        mock_engine(Mode::Gated(steps))?,
    )?;
    let mut server = Server::start(state.clone()).await?;
    let mut in_flight = server
        .post(
            "/v1/completions",
            &json!({"prompt": "a", "max_tokens": 100, "stream": true, "ignore_eos": true}),
        )
        .await?;
    gate.send(())?;
    let first = in_flight.chunk().await?.context("no first chunk")?;
    let started = Instant::now();
    if let Some(shutdown) = server.shutdown.take() {
        let _ = shutdown.send(());
    }
    // Once the abort is queued, one more step lets the engine apply it (between steps).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !state.has_aborted() {
        ensure!(Instant::now() < deadline, "the drain did not abort");
        tokio::task::yield_now().await;
    }
    let _ = gate.send(());
    let mut rest = String::from_utf8_lossy(&first).into_owned();
    while let Some(chunk) = in_flight.chunk().await? {
        rest.push_str(&String::from_utf8_lossy(&chunk));
    }
    ensure!(rest.contains("\"finish_reason\":\"abort\""), "{rest}");
    tokio::time::timeout(Duration::from_secs(10), server.task).await???;
    ensure!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    drop(gate);
    Ok(())
}

/// Case 12: vLLM's cancellation test, scaled to the tiny model: 200 requests of 250 forced
/// tokens with a short client timeout; afterwards a new request completes quickly, nothing
/// runs and the KV cache is back to its baseline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_storm_leaves_nothing_running() -> anyhow::Result<()> {
    let state = AppState::with_engine(
        ServerConfig {
            max_concurrent_requests: 512,
            ..config()
        },
        tiny_engine(EngineConfig {
            max_num_seqs: 32,
            ..EngineConfig::default()
        })?,
    )?;
    let server = Server::start(state).await?;
    let baseline = metric(&server.metrics().await?, "oxtune:kv_cache_usage_perc");
    let client = client_builder()
        .timeout(Duration::from_millis(300))
        .build()?;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200 {
        let client = client.clone();
        let url = format!("{}/v1/completions", server.url);
        tasks.spawn(async move {
            client
                .post(url)
                .json(&json!({"prompt": format!("request {i}"), "max_tokens": 240, "ignore_eos": true, "temperature": 0}))
                .send()
                .await
                .and_then(reqwest::Response::error_for_status)
                .is_ok()
        });
    }
    let mut completed = 0;
    while let Some(done) = tasks.join_next().await {
        completed += usize::from(done?);
    }
    ensure!(
        completed < 200,
        "no request timed out; the test tests nothing"
    );
    let started = Instant::now();
    let response = server
        .post(
            "/v1/completions",
            &json!({"prompt": "after the storm", "max_tokens": 4}),
        )
        .await?;
    ensure!(response.status() == 200);
    ensure!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    server
        .wait_metrics("running 0 and KV back to baseline", |m| {
            metric(m, "oxtune:num_requests_running") == 0.0
                && metric(m, "oxtune:num_requests_waiting") == 0.0
                && metric(m, "oxtune:kv_cache_usage_perc") <= baseline
        })
        .await?;
    server.stop().await
}

/// Case 22: identical greedy requests issued concurrently return identical text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_identical_greedy_requests_agree() -> anyhow::Result<()> {
    let server = Server::start(AppState::with_engine(
        config(),
        tiny_engine(EngineConfig::default())?,
    )?)
    .await?;
    let body = json!({"model": "tiny", "messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 24, "temperature": 0});
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..12 {
        let request = server
            .client
            .post(format!("{}/v1/chat/completions", server.url))
            .json(&body);
        tasks.spawn(async move {
            let response: Value = request.send().await?.json().await?;
            anyhow::Ok(
                response["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        });
    }
    let mut texts = Vec::new();
    while let Some(text) = tasks.join_next().await {
        texts.push(text??);
    }
    ensure!(!texts[0].is_empty());
    ensure!(texts.iter().all(|t| *t == texts[0]), "{texts:#?}");
    server.stop().await
}

/// Case 18: CORS is off by default; with an allow-list a preflight passes without a key, and
/// credentials are never allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_is_off_by_default_and_an_allow_list_enables_it() -> anyhow::Result<()> {
    let preflight = |server: &Server| {
        server
            .client
            .request(
                reqwest::Method::OPTIONS,
                format!("{}/v1/chat/completions", server.url),
            )
            .header("origin", "https://app.example")
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type",
            )
            .send()
    };
    let closed = Server::start(AppState::with_engine(
        ServerConfig {
            api_keys: vec!["k".into()],
            ..config()
        },
        mock_engine(Mode::FailAt(1))?,
    )?)
    .await?;
    let response = preflight(&closed).await?;
    ensure!(
        response
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
    closed.stop().await?;
    let open = Server::start(AppState::with_engine(
        ServerConfig {
            api_keys: vec!["k".into()],
            allowed_origins: vec!["https://app.example".into()],
            ..config()
        },
        mock_engine(Mode::FailAt(1))?,
    )?)
    .await?;
    let response = preflight(&open).await?;
    ensure!(response.status().is_success(), "{}", response.status());
    ensure!(response.headers()["access-control-allow-origin"] == "https://app.example");
    ensure!(
        response
            .headers()
            .get("access-control-allow-credentials")
            .is_none()
    );
    // The real request still needs the key.
    ensure!(open.post("/v1/models", &json!({})).await?.status() != 200);
    let models = open
        .client
        .get(format!("{}/v1/models", open.url))
        .header("origin", "https://app.example")
        .send()
        .await?;
    ensure!(models.status() == 401);
    open.stop().await
}

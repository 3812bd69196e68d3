//! `oxtune bench serve` through the real binary, against an in-test mock OpenAI-compatible
//! server on 127.0.0.1:0 (axum). The mock streams four text chunks and a usage chunk, each
//! after a pause (10 ms; 40 ms for the concurrency test); a prompt holding `FAIL` gets an
//! HTTP 500 and one holding `SLOW` answers after 5 s (past `--timeout 1`); the model
//! `no-usage` gets no usage chunk. It records every request and the peak number of requests
//! in flight.

use std::convert::Infallible;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, ensure};
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

/// Text chunks per streamed answer (fewer when max_tokens is smaller).
const CHUNKS: usize = 4;

/// One completion request as the mock saw it.
#[derive(Debug)]
struct Seen {
    path: String,
    /// The Authorization header.
    authorization: Option<String>,
    body: Value,
}

#[derive(Clone, Default)]
struct Mock {
    /// Pause before each event of a stream.
    event_gap: Duration,
    in_flight: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<Seen>>>,
}

/// Counts a request in flight until dropped.
struct InFlight(Mock);

impl InFlight {
    fn new(mock: &Mock) -> Self {
        let now = mock.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        mock.peak.fetch_max(now, Ordering::SeqCst);
        InFlight(mock.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A running mock server, its base URL and its records.
struct Server {
    url: String,
    mock: Mock,
    _runtime: tokio::runtime::Runtime,
}

fn start_server(event_gap: Duration) -> anyhow::Result<Server> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mock = Mock {
        event_gap,
        ..Mock::default()
    };
    let app = axum::Router::new()
        .route(
            "/v1/models",
            get(|| async {
                Json(json!({"object": "list", "data": [{"id": "mock-model", "object": "model"}]}))
            }),
        )
        .route(
            "/v1/chat/completions",
            post(|state, headers, body| answer(state, headers, body, true)),
        )
        .route(
            "/v1/completions",
            post(|state, headers, body| answer(state, headers, body, false)),
        )
        .with_state(mock.clone());
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let url = format!("http://{}", listener.local_addr()?);
    runtime.spawn(async move { axum::serve(listener, app).await });
    Ok(Server {
        url,
        mock,
        _runtime: runtime,
    })
}

async fn answer(
    State(mock): State<Mock>,
    headers: HeaderMap,
    Json(body): Json<Value>,
    chat: bool,
) -> Response {
    let guard = InFlight::new(&mock);
    let path = if chat {
        "/v1/chat/completions"
    } else {
        "/v1/completions"
    };
    let authorization = headers
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    if let Ok(mut requests) = mock.requests.lock() {
        requests.push(Seen {
            path: path.to_owned(),
            authorization,
            body: body.clone(),
        });
    }
    let prompt = if chat {
        body["messages"]
            .as_array()
            .map(|messages| {
                messages
                    .iter()
                    .filter_map(|m| m["content"].as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default()
    } else {
        body["prompt"].as_str().unwrap_or_default().to_owned()
    };
    if prompt.contains("FAIL") {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": {"message": "mock failure", "type": "server_error", "param": null, "code": 500}})),
        )
            .into_response();
    }
    if prompt.contains("SLOW") {
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let chunks = body["max_tokens"]
        .as_u64()
        .map_or(CHUNKS, |max| CHUNKS.min(max as usize));
    let text = |piece: &str| {
        if chat {
            json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": null}]})
        } else {
            json!({"object": "text_completion", "choices": [{"index": 0, "text": piece, "finish_reason": null}]})
        }
    };
    let mut events = Vec::new();
    if chat {
        events.push(
            json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
                .to_string(),
        );
    }
    events.extend((0..chunks).map(|i| text(&format!(" word{i}")).to_string()));
    let wants_usage = body["stream_options"]["include_usage"] == json!(true);
    if wants_usage && body["model"] != json!("no-usage") {
        // Ten "template" tokens on top of the prompt's words, so a test can tell usage from
        // the client's own estimate.
        let prompt_tokens = prompt.split_whitespace().count() + 10;
        events.push(
            json!({"choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": chunks, "total_tokens": prompt_tokens + chunks}})
                .to_string(),
        );
    }
    events.push("[DONE]".to_owned());
    let gap = mock.event_gap;
    let stream = futures_util::stream::unfold(
        (events.into_iter(), guard),
        move |(mut events, guard)| async move {
            let data = events.next()?;
            tokio::time::sleep(gap).await;
            Some((
                Ok::<_, Infallible>(Event::default().data(data)),
                (events, guard),
            ))
        },
    );
    Sse::new(stream).into_response()
}

fn bench(server: &Server, args: &[&str], result: &Path) -> anyhow::Result<Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_oxtune"))
        .args(["bench", "serve", "--url", &server.url])
        .args(args)
        .arg("--save_result")
        .arg(result)
        .env_remove("OPENAI_API_KEY")
        .output()?)
}

fn read_json(path: &Path) -> anyhow::Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

/// Mean > 0 and median <= p90 <= p99 for each latency.
fn check_latencies(report: &Value, names: &[&str]) -> anyhow::Result<()> {
    for name in names {
        let get = |stat: &str| {
            report[format!("{stat}_{name}_ms")]
                .as_f64()
                .with_context(|| format!("{stat}_{name}_ms in {report}"))
        };
        let (mean, median, p90, p99) = (get("mean")?, get("median")?, get("p90")?, get("p99")?);
        ensure!(mean > 0.0, "mean {name} {mean}");
        ensure!(
            median <= p90 && p90 <= p99,
            "{name}: p50 {median} p90 {p90} p99 {p99}"
        );
    }
    Ok(())
}

#[test]
fn counts_failures_tokens_and_latencies_of_a_file_dataset() -> anyhow::Result<()> {
    let server = start_server(Duration::from_millis(10))?;
    let dir = tempfile::tempdir()?;
    let dataset = dir.path().join("prompts.jsonl");
    std::fs::write(
        &dataset,
        concat!(
            "{\"prompt\": \"hello there world\"}\n",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"tell me a story\"}]}\n",
            "{\"instruction\": \"FAIL please\", \"input\": \"\"}\n",
            "{\"prompt\": \"SLOW request\"}\n",
        ),
    )?;
    let result = dir.path().join("out/result.json");
    let output = bench(
        &server,
        &[
            "--dataset",
            dataset.to_str().context("path")?,
            "--num_prompts",
            "8",
            "--random_output_len",
            "4",
            "--timeout",
            "1",
            "--ignore_eos",
            "--api_key",
            "secret-key",
        ],
        &result,
    )?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(stdout.contains("Serving Benchmark Result"), "{stdout}");
    ensure!(stdout.contains("Mean TTFT (ms):"), "{stdout}");

    let report = read_json(&result)?;
    // Rows cycle 1 2 3 4 1 2 3 4: rows 1 and 2 succeed, 3 fails with 500, 4 times out.
    ensure!(report["model"] == "mock-model", "{report}");
    ensure!(report["completed"] == 4, "{report}");
    ensure!(report["failed"] == 4, "{report}");
    ensure!(
        report["failures"] == json!({"HTTP 500": 2, "timeout": 2}),
        "{report}"
    );
    ensure!(report["total_output_tokens"] == 4 * 4, "{report}");
    // Usage: (3 + 10) and (4 + 10) prompt tokens, twice.
    ensure!(report["total_input_tokens"] == 54, "{report}");
    ensure!(report["output_tokens_source"] == "usage", "{report}");
    ensure!(report["input_tokens_source"] == "usage", "{report}");
    ensure!(report["request_throughput"].as_f64().unwrap_or(0.0) > 0.0);
    ensure!(report["output_throughput"].as_f64().unwrap_or(0.0) > 0.0);
    check_latencies(&report, &["ttft", "tpot", "itl", "e2el"])?;
    // The first text chunk follows the role chunk: two 10 ms sleeps at least.
    ensure!(
        report["median_ttft_ms"].as_f64().unwrap_or(0.0) >= 15.0,
        "{report}"
    );
    ensure!(
        report["mean_e2el_ms"].as_f64() > report["mean_ttft_ms"].as_f64(),
        "{report}"
    );
    let errors = report["errors"].as_array().context("errors")?;
    ensure!(errors.len() == 8, "{report}");
    ensure!(
        errors[2]
            .as_str()
            .is_some_and(|e| e.contains("mock failure")),
        "{report}"
    );
    ensure!(
        report["output_lens"] == json!([4, 4, 0, 0, 4, 4, 0, 0]),
        "{report}"
    );

    let requests = server
        .mock
        .requests
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?;
    ensure!(requests.len() == 8, "{} requests", requests.len());
    for Seen {
        path,
        authorization,
        body,
    } in requests.iter()
    {
        ensure!(path == "/v1/chat/completions", "{path}");
        ensure!(authorization.as_deref() == Some("Bearer secret-key"));
        ensure!(body["stream"] == true && body["stream_options"]["include_usage"] == true);
        ensure!(
            body["ignore_eos"] == true && body["max_tokens"] == 4,
            "{body}"
        );
        ensure!(body["model"] == "mock-model", "{body}");
    }
    // Requests reach the mock in any order; the alpaca row went as one user message.
    let alpaca = json!([{"role": "user", "content": "FAIL please"}]);
    ensure!(
        requests
            .iter()
            .filter(|seen| seen.body["messages"] == alpaca)
            .count()
            == 2,
        "{requests:?}"
    );
    Ok(())
}

#[test]
fn max_concurrency_bounds_the_requests_in_flight() -> anyhow::Result<()> {
    let server = start_server(Duration::from_millis(40))?;
    let dir = tempfile::tempdir()?;
    let result = dir.path().join("result.json");
    let output = bench(
        &server,
        &[
            "--dataset",
            "random",
            "--random_input_len",
            "16",
            "--num_prompts",
            "12",
            "--max_concurrency",
            "3",
            "--model",
            "mock-model",
        ],
        &result,
    )?;
    ensure!(
        output.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report = read_json(&result)?;
    ensure!(
        report["completed"] == 12 && report["failed"] == 0,
        "{report}"
    );
    ensure!(report["max_concurrency"] == 3, "{report}");
    // Every request streams for about 280 ms and all arrive at once: three run together,
    // never more.
    let peak = server.mock.peak.load(Ordering::SeqCst);
    ensure!(peak == 3, "peak in flight {peak}");
    ensure!(report["total_input_tokens"] == 12 * (16 + 10), "{report}");
    Ok(())
}

#[test]
fn counts_content_chunks_when_the_server_sends_no_usage() -> anyhow::Result<()> {
    let server = start_server(Duration::from_millis(10))?;
    let dir = tempfile::tempdir()?;
    let result = dir.path().join("result.json");
    let output = bench(
        &server,
        &[
            "--endpoint",
            "completions",
            "--model",
            "no-usage",
            "--random_input_len",
            "5",
            "--num_prompts",
            "5",
            "--request_rate",
            "200",
            "--seed",
            "3",
        ],
        &result,
    )?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(
        stdout.contains("output tokens counted from content chunks"),
        "{stdout}"
    );
    let report = read_json(&result)?;
    ensure!(report["completed"] == 5, "{report}");
    ensure!(report["total_output_tokens"] == 5 * CHUNKS, "{report}");
    ensure!(report["total_input_tokens"] == 5 * 5, "{report}");
    ensure!(
        report["output_tokens_source"] == "content chunks",
        "{report}"
    );
    ensure!(report["request_rate"] == 200.0, "{report}");
    check_latencies(&report, &["ttft", "tpot", "itl", "e2el"])?;
    let requests = server
        .mock
        .requests
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?;
    ensure!(
        requests
            .iter()
            .all(|Seen { path, body, .. }| path == "/v1/completions"
                && body["prompt"]
                    .as_str()
                    .is_some_and(|p| p.split(' ').count() == 5)
                && body.get("ignore_eos").is_none()),
        "{requests:?}"
    );
    Ok(())
}

#[test]
fn a_run_where_every_request_fails_still_reports_and_exits_nonzero() -> anyhow::Result<()> {
    let server = start_server(Duration::from_millis(10))?;
    let dir = tempfile::tempdir()?;
    let dataset = dir.path().join("fail.jsonl");
    std::fs::write(&dataset, "{\"prompt\": \"FAIL\"}\n")?;
    let result = dir.path().join("result.json");
    let output = bench(
        &server,
        &[
            "--dataset",
            dataset.to_str().context("path")?,
            "--num_prompts",
            "3",
        ],
        &result,
    )?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(!output.status.success(), "should fail");
    ensure!(stderr.contains("all 3 requests"), "{stderr}");
    ensure!(stderr.contains("mock failure"), "{stderr}");
    let report = read_json(&result)?;
    ensure!(
        report["completed"] == 0 && report["failed"] == 3,
        "{report}"
    );
    ensure!(report["mean_ttft_ms"].is_null(), "{report}");

    // A bad row stops the run before anything is sent, naming the file and line.
    std::fs::write(&dataset, "{\"prompt\": \"ok\"}\n{\"prompt\": 1}\n")?;
    let output = bench(
        &server,
        &[
            "--dataset",
            dataset.to_str().context("path")?,
            "--num_prompts",
            "3",
        ],
        &result,
    )?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(!output.status.success());
    ensure!(stderr.contains("fail.jsonl:2"), "{stderr}");
    Ok(())
}

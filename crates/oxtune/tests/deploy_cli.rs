//! `oxtune deploy` through the real binary: the native backend's refusals, external backends
//! that are not installed, and a live server on the tiny Llama fixture — key required, key
//! never logged, SIGTERM with --shutdown_timeout 0 exits promptly.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(relative)
}

fn oxtune() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_oxtune"));
    command
        .env(
            "OXTUNE_MODELS_FILE",
            repo_path("tests/fixtures/no-such-registry.yaml"),
        )
        .env("HF_HUB_CACHE", repo_path("tests/fixtures/no-such-hub"));
    command
}

fn failure(output: &Output) -> anyhow::Result<String> {
    ensure!(!output.status.success(), "expected a failure");
    Ok(String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn external_backends_that_are_not_installed_name_their_pip_package() -> anyhow::Result<()> {
    let empty = tempfile::tempdir()?;
    for (backend, package) in [
        ("vllm", "vllm"),
        ("sglang", "sglang"),
        ("lmdeploy", "lmdeploy"),
    ] {
        let output = oxtune()
            .args([
                "deploy",
                "--model_type",
                "qwen3-7b-chat",
                "--serving_backend",
                backend,
            ])
            .args([
                "--tensor_parallel_size",
                "2",
                "--gpu_memory_utilization",
                "0.9",
            ])
            .env("PATH", empty.path())
            .output()?;
        let stderr = failure(&output)?;
        ensure!(
            stderr.contains(&format!("pip install {package}")),
            "{backend}: {stderr}"
        );
    }
    // The ms-swift 3.x alias.
    let output = oxtune()
        .args(["deploy", "--model", "x", "--infer_backend", "vllm"])
        .env("PATH", empty.path())
        .output()?;
    ensure!(failure(&output)?.contains("pip install vllm"));
    Ok(())
}

#[test]
fn the_native_backend_refuses_what_it_cannot_do_yet() -> anyhow::Result<()> {
    let model = repo_path("tests/fixtures/tiny-llama");
    let model = model.to_str().context("path")?;
    let output = oxtune()
        .args(["deploy", "--model", model, "--tensor_parallel_size", "2"])
        .output()?;
    let stderr = failure(&output)?;
    ensure!(
        stderr.contains("not yet supported by the native backend"),
        "{stderr}"
    );
    let output = oxtune()
        .args(["deploy", "--model", model, "--quant_method", "gptq"])
        .output()?;
    let stderr = failure(&output)?;
    ensure!(stderr.contains("supported: none"), "{stderr}");
    ensure!(stderr.contains("--serving_backend vllm"), "{stderr}");
    Ok(())
}

/// One HTTP/1.1 request; returns (status, body).
fn http(
    address: &str,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &str,
) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let auth = key
        .map(|key| format!("Authorization: Bearer {key}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{auth}Connection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .context("no status line")?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

struct Deploy {
    child: Child,
    lines: mpsc::Receiver<String>,
    log: Vec<String>,
}

impl Deploy {
    /// Waits for a log line containing `needle` (the server logs as it goes).
    fn wait_for(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if line.contains(needle) {
                        return Ok(line);
                    }
                }
                Err(_) => bail!("no `{needle}` in the log:\n{}", self.log.join("\n")),
            }
        }
    }
}

impl Drop for Deploy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_live_server_checks_keys_hides_them_and_stops_on_sigterm() -> anyhow::Result<()> {
    let model = repo_path("tests/fixtures/tiny-llama");
    let mut child = oxtune()
        .args([
            "deploy",
            "--model",
            model.to_str().context("path")?,
            "--device",
            "cpu",
        ])
        .args([
            "--port",
            "0",
            "--api_key",
            "sk-test-secret-1",
            "--shutdown_timeout",
            "0",
        ])
        .args(["--served_model_name", "tiny", "--num_blocks", "64"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().context("stderr")?;
    let (sender, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    let mut deploy = Deploy {
        child,
        lines,
        log: Vec::new(),
    };
    let ready = deploy.wait_for("ready: http://", Duration::from_secs(120))?;
    let address = ready
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split("/v1").next())
        .context("no address")?
        .to_owned();
    let chat = r#"{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}"#;
    let (status, body) = http(
        &address,
        "POST",
        "/v1/chat/completions",
        Some("sk-test-secret-1"),
        chat,
    )?;
    ensure!(status == 200, "{status} {body}");
    let json: serde_json::Value = serde_json::from_str(&body)?;
    ensure!(json["usage"]["completion_tokens"] == 4, "{body}");
    let (status, body) = http(&address, "POST", "/v1/chat/completions", None, chat)?;
    ensure!(
        status == 401 && body.contains("invalid_api_key"),
        "{status} {body}"
    );
    let (status, _) = http(&address, "GET", "/health", None, "")?;
    ensure!(status == 200);
    // SIGTERM: with --shutdown_timeout 0 the process exits within a few seconds.
    let started = Instant::now();
    let pid = deploy.child.id().to_string();
    ensure!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()?
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = deploy.child.try_wait()? {
            break status;
        }
        ensure!(
            Instant::now() < deadline,
            "still running 10 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    ensure!(status.success(), "exit status {status}");
    ensure!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    while let Ok(line) = deploy.lines.recv_timeout(Duration::from_secs(2)) {
        deploy.log.push(line);
    }
    let log = deploy.log.join("\n");
    ensure!(
        !log.contains("sk-test-secret-1"),
        "the key leaked into the log:\n{log}"
    );
    ensure!(log.contains("<redacted>"), "{log}");
    Ok(())
}

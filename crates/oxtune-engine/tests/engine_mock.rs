//! The engine loop with a mock model whose next token is a function of the whole context —
//! read back through the KV-cache slots the scheduler assigned. If blocks were shared
//! wrongly, preempted sequences recomputed wrongly or prefix-cache hits pointed at the wrong
//! contents, the engine's output would differ from the plain reference loop.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use oxtune_engine::runner::Runner;
use oxtune_engine::scheduler::Batch;
use oxtune_engine::{
    EngineConfig, EngineHandle, EngineParts, Event, FinishReason, ModelInfo, Request,
};
use oxtune_models::Tokenizer;
use oxtune_tensor::{Device, Tensor};

const VOCAB: usize = 64;
const EOS: u32 = 63;

fn fixture(name: &str) -> PathBuf {
    std::env::var_os("OXTUNE_FIXTURES")
        .map_or_else(
            || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"),
            PathBuf::from,
        )
        .join(name)
}

/// The next token after `context` (never the end token unless the context says so).
fn next_token(context: &[u32]) -> u32 {
    let mut hash: u64 = 1469598103934665603;
    for &token in context {
        hash = (hash ^ u64::from(token)).wrapping_mul(1099511628211);
    }
    u32::try_from(hash % (VOCAB as u64 - 2)).unwrap_or(0) + 1
}

/// Remembers which token sits in which cache slot, like a real KV cache.
struct MockRunner {
    slots: HashMap<u32, u32>,
    /// Delay per step, to keep requests running while a test acts.
    delay: Duration,
}

impl Runner for MockRunner {
    fn execute(&mut self, batch: &Batch) -> oxtune_engine::Result<Tensor> {
        std::thread::sleep(self.delay);
        let mut rows = Vec::new();
        let mut offset = 0;
        for sequence in &batch.sequences {
            let new = &batch.input_ids[offset..offset + sequence.num_new_tokens];
            offset += sequence.num_new_tokens;
            for (i, &token) in new.iter().enumerate() {
                self.slots
                    .insert(sequence.slots[sequence.num_cached_tokens + i], token);
            }
            let context: Vec<u32> = sequence
                .slots
                .iter()
                .map(|slot| self.slots.get(slot).copied().unwrap_or(u32::MAX))
                .collect();
            let mut row = vec![0.0f32; VOCAB];
            row[next_token(&context) as usize] = 10.0;
            rows.extend(row);
        }
        Ok(Tensor::from_vec(
            rows,
            (batch.sequences.len(), VOCAB),
            &Device::Cpu,
        )?)
    }
}

fn engine(
    config: EngineConfig,
    num_blocks: usize,
    delay: Duration,
) -> anyhow::Result<EngineHandle> {
    let tokenizer = Tokenizer::load(&fixture("tokenizer"))?;
    Ok(EngineHandle::spawn(
        EngineParts {
            runner: Box::new(MockRunner {
                slots: HashMap::new(),
                delay,
            }),
            tokenizer,
            chat_template: None,
            info: ModelInfo {
                max_model_len: 256,
                vocab_size: VOCAB,
                adapters: vec!["a".into()],
                eos_token_ids: vec![EOS],
            },
            num_blocks,
        },
        config,
    )?)
}

fn small_config() -> EngineConfig {
    EngineConfig {
        block_size: 4,
        max_num_seqs: 8,
        max_num_batched_tokens: 16,
        ..EngineConfig::default()
    }
}

/// Collects a request's tokens and its finish.
fn collect(
    mut events: oxtune_engine::EventReceiver,
) -> anyhow::Result<(Vec<u32>, FinishReason, oxtune_engine::Usage)> {
    let mut tokens = Vec::new();
    loop {
        match events
            .blocking_recv()
            .context("the engine closed the channel")?
        {
            Event::Token { token_id, .. } => tokens.push(token_id),
            Event::Finished { reason, usage, .. } => return Ok((tokens, reason, usage)),
            Event::Error { message } => anyhow::bail!("engine error: {message}"),
        }
    }
}

fn reference(prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    let mut context = prompt.to_vec();
    let mut out = Vec::new();
    while out.len() < max_tokens {
        let token = next_token(&context);
        context.push(token);
        out.push(token);
    }
    out
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len)
        .map(|i| (seed * 31 + u32::try_from(i).unwrap_or(0) * 7) % (VOCAB as u32 - 2) + 1)
        .collect()
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

#[test]
fn concurrent_requests_under_cache_pressure_match_the_reference() -> anyhow::Result<()> {
    // 12 blocks of 4 tokens for 10 requests of up to 30 tokens: preemption is certain.
    let handle = engine(small_config(), 12, Duration::ZERO)?;
    let mut receivers = Vec::new();
    let mut expected = Vec::new();
    for i in 0..10u32 {
        // Half the prompts share a 9-token prefix, so prefix blocks are reused too.
        let mut tokens = if i % 2 == 0 {
            prompt(99, 9)
        } else {
            Vec::new()
        };
        tokens.extend(prompt(i, 3 + i as usize));
        let mut request = Request::new(format!("r{i}"), tokens.clone());
        request.max_tokens = Some(12);
        expected.push(reference(&tokens, 12));
        receivers.push(handle.submit(request)?);
    }
    for (i, (events, expected)) in receivers.into_iter().zip(expected).enumerate() {
        let (tokens, reason, usage) = collect(events)?;
        ensure!(
            tokens == expected,
            "request {i}: {tokens:?} != {expected:?}"
        );
        ensure!(reason == FinishReason::Length);
        ensure!(usage.completion_tokens == 12);
    }
    let stats = handle.stats();
    ensure!(
        stats.preemptions > 0,
        "the test meant to force preemption: {stats:?}"
    );
    ensure!(
        stats.prefix_cache_hits > 0,
        "shared prefixes should hit: {stats:?}"
    );
    wait_until("blocks to be freed", || handle.stats().used_blocks == 0)?;
    Ok(())
}

#[test]
fn same_request_twice_gives_the_same_sampled_text() -> anyhow::Result<()> {
    let handle = engine(small_config(), 64, Duration::ZERO)?;
    let run = |seed| -> anyhow::Result<Vec<u32>> {
        let mut request = Request::new("s", prompt(5, 6));
        request.sampling.temperature = 1.0;
        request.sampling.seed = Some(seed);
        request.max_tokens = Some(16);
        Ok(collect(handle.submit(request)?)?.0)
    };
    ensure!(run(1)? == run(1)?);
    Ok(())
}

#[test]
fn stop_tokens_max_tokens_and_ignore_eos() -> anyhow::Result<()> {
    let handle = engine(small_config(), 64, Duration::ZERO)?;
    let tokens = prompt(3, 5);
    let expected = reference(&tokens, 10);
    // A stop token ends generation and is counted but not streamed.
    let mut request = Request::new("stop", tokens.clone());
    request.stop_token_ids = vec![expected[3]];
    let (out, reason, usage) = collect(handle.submit(request)?)?;
    ensure!(out == expected[..3], "{out:?}");
    ensure!(reason == FinishReason::Stop);
    ensure!(usage.completion_tokens == 4 && usage.prompt_tokens == 5);
    // max_tokens ends with `length`.
    let mut request = Request::new("len", tokens);
    request.max_tokens = Some(2);
    let (out, reason, _) = collect(handle.submit(request)?)?;
    ensure!(out == expected[..2] && reason == FinishReason::Length);
    Ok(())
}

#[test]
fn a_dropped_receiver_aborts_and_frees_blocks() -> anyhow::Result<()> {
    let handle = engine(small_config(), 64, Duration::from_millis(2))?;
    let mut receivers = Vec::new();
    for i in 0..4 {
        let mut request = Request::new(format!("d{i}"), prompt(i, 8));
        request.max_tokens = Some(200);
        receivers.push(handle.submit(request)?);
    }
    wait_until("requests to run", || handle.stats().running == 4)?;
    ensure!(handle.stats().used_blocks > 0);
    drop(receivers);
    wait_until("aborts", || {
        let stats = handle.stats();
        stats.running == 0 && stats.used_blocks == 0
    })?;
    ensure!(handle.in_flight() == 0);
    // The engine still serves.
    let mut request = Request::new("after", prompt(1, 4));
    request.max_tokens = Some(3);
    ensure!(collect(handle.submit(request)?)?.0.len() == 3);
    Ok(())
}

#[test]
fn the_admission_cap_refuses_at_once() -> anyhow::Result<()> {
    let config = EngineConfig {
        max_queued_requests: 2,
        ..small_config()
    };
    let handle = engine(config, 64, Duration::from_millis(5))?;
    let long = |id: &str| {
        let mut request = Request::new(id, prompt(2, 4));
        request.max_tokens = Some(100);
        request
    };
    let first = handle.submit(long("1"))?;
    let second = handle.submit(long("2"))?;
    let third = handle.submit(long("3"));
    ensure!(
        matches!(third, Err(oxtune_engine::Error::Overloaded { limit: 2 })),
        "{third:?}"
    );
    handle.abort_all();
    for events in [first, second] {
        let (_, reason, _) = collect(events)?;
        ensure!(reason == FinishReason::Abort);
    }
    ensure!(handle.in_flight() == 0);
    handle.submit(long("4")).map(drop)?;
    Ok(())
}

#[test]
fn invalid_requests_name_the_parameter() -> anyhow::Result<()> {
    let handle = engine(small_config(), 64, Duration::ZERO)?;
    let param_of = |request: Request| match handle.submit(request) {
        Err(oxtune_engine::Error::InvalidRequest { param, code, .. }) => (param, code),
        Err(oxtune_engine::Error::UnknownAdapter { .. }) => ("model", None),
        other => ("accepted?", other.err().map(|_| "other")),
    };
    ensure!(param_of(Request::new("empty", vec![])).0 == "prompt");
    ensure!(param_of(Request::new("vocab", vec![1, 64])).0 == "prompt");
    ensure!(
        param_of(Request::new("long", vec![1; 256])) == ("prompt", Some("context_length_exceeded"))
    );
    let mut request = Request::new("max", vec![1; 200]);
    request.max_tokens = Some(100);
    ensure!(param_of(request) == ("max_tokens", Some("context_length_exceeded")));
    let mut request = Request::new("adapter", vec![1]);
    request.adapter = Some("nope".into());
    ensure!(param_of(request).0 == "model");
    let mut request = Request::new("logprobs", vec![1]);
    request.logprobs = Some(21);
    ensure!(param_of(request).0 == "logprobs");
    let mut request = Request::new("temperature", vec![1]);
    request.sampling.temperature = -1.0;
    ensure!(param_of(request).0 == "temperature");
    let mut request = Request::new("bias", vec![1]);
    request.sampling.logit_bias = vec![(64, 1.0)];
    ensure!(param_of(request).0 == "logit_bias");
    ensure!(handle.in_flight() == 0, "refused requests hold no slot");
    Ok(())
}

#[test]
fn logprobs_are_normalised_and_ranked() -> anyhow::Result<()> {
    let handle = engine(small_config(), 64, Duration::ZERO)?;
    let mut request = Request::new("lp", prompt(4, 5));
    request.max_tokens = Some(3);
    request.logprobs = Some(3);
    let mut events = handle.submit(request)?;
    let mut seen = 0;
    while let Some(event) = events.blocking_recv() {
        match event {
            Event::Token {
                token_id, logprobs, ..
            } => {
                let logprobs = logprobs.context("logprobs asked for")?;
                ensure!(logprobs.chosen.token_id == token_id);
                ensure!(logprobs.top.len() == 3);
                ensure!(
                    logprobs.top[0].token_id == token_id,
                    "greedy picks the best"
                );
                ensure!(logprobs.top[0].logprob >= logprobs.top[1].logprob);
                // One logit of 10 among 64 zeros.
                let expected = -(1.0f32 + 63.0 * (-10.0f32).exp()).ln();
                ensure!((logprobs.chosen.logprob - expected).abs() < 1e-4);
                seen += 1;
            }
            Event::Finished { .. } => break,
            Event::Error { message } => anyhow::bail!(message),
        }
    }
    ensure!(seen == 3);
    Ok(())
}

#[test]
fn shutdown_stops_the_engine() -> anyhow::Result<()> {
    let handle = engine(small_config(), 64, Duration::ZERO)?;
    ensure!(handle.is_alive());
    handle.shutdown();
    wait_until("the engine to stop", || !handle.is_alive())?;
    ensure!(matches!(
        handle.submit(Request::new("late", vec![1])),
        Err(oxtune_engine::Error::EngineDead | oxtune_engine::Error::ShuttingDown)
    ));
    Ok(())
}

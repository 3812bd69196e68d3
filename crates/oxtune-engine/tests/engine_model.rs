//! The engine over a real transformer (the tiny Llama fixture): concurrent requests under
//! KV-cache pressure give exactly the tokens of a plain one-request greedy loop, and requests
//! for different LoRA adapters sharing one batch each get their own adapter's output.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, ensure};
use oxtune_engine::{EngineConfig, EngineHandle, Event, Request};
use oxtune_models::LoadedModel;
use oxtune_tensor::{DType, Device, Tensor};
use oxtune_tuners::{LoraSettings, LoraTuner, TargetModules};

fn fixture(name: &str) -> PathBuf {
    std::env::var_os("OXTUNE_FIXTURES")
        .map_or_else(
            || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"),
            PathBuf::from,
        )
        .join(name)
}

fn load() -> anyhow::Result<LoadedModel> {
    Ok(LoadedModel::load(
        &fixture("tiny-llama"),
        &Device::Cpu,
        DType::F32,
    )?)
}

/// Greedy tokens through the contiguous KV cache, one request alone.
fn greedy(model: &LoadedModel, prompt: &[u32], max_tokens: usize) -> anyhow::Result<Vec<u32>> {
    let mut cache = model.model.new_cache();
    let mut feed = prompt.to_vec();
    let mut out = Vec::new();
    let eos = model.eos_token_ids();
    while out.len() < max_tokens {
        let input = Tensor::new(feed.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let logits: Vec<f32> = model
            .model
            .forward_last(&input, &mut cache)?
            .squeeze(0)?
            .to_vec1()?;
        let token = logits
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (i, &l)| {
                if l > best.1 { (i, l) } else { best }
            })
            .0;
        let token = u32::try_from(token)?;
        if eos.contains(&token) {
            break;
        }
        out.push(token);
        feed = vec![token];
    }
    Ok(out)
}

fn tokens_of(mut events: oxtune_engine::EventReceiver) -> anyhow::Result<Vec<u32>> {
    let mut tokens = Vec::new();
    loop {
        match events
            .blocking_recv()
            .context("engine closed the channel")?
        {
            Event::Token { token_id, .. } => tokens.push(token_id),
            Event::Finished { .. } => return Ok(tokens),
            Event::Error { message } => anyhow::bail!(message),
        }
    }
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len)
        .map(|i| (seed * 131 + u32::try_from(i).unwrap_or(0) * 17) % 500 + 3)
        .collect()
}

#[test]
fn concurrent_greedy_requests_match_one_at_a_time() -> anyhow::Result<()> {
    let reference_model = load()?;
    let config = EngineConfig {
        block_size: 4,
        // 24 blocks of 4 tokens for 6 requests of up to ~40 tokens: preemption happens.
        num_blocks: Some(24),
        max_num_batched_tokens: 24,
        ..EngineConfig::default()
    };
    let engine = EngineHandle::start(load()?, &[], config)?;
    let shared = prompt(7, 10);
    let mut cases = Vec::new();
    for i in 0..6u32 {
        let mut tokens = if i % 2 == 0 {
            shared.clone()
        } else {
            Vec::new()
        };
        tokens.extend(prompt(i, 5 + 3 * i as usize));
        let mut request = Request::new(format!("r{i}"), tokens.clone());
        request.max_tokens = Some(16);
        cases.push((tokens, engine.submit(request)?));
    }
    for (i, (tokens, events)) in cases.into_iter().enumerate() {
        let got = tokens_of(events)?;
        let expected = greedy(&reference_model, &tokens, 16)?;
        ensure!(got == expected, "request {i}: {got:?} != {expected:?}");
    }
    let stats = engine.stats();
    ensure!(
        stats.preemptions > 0,
        "meant to force preemption: {stats:?}"
    );
    ensure!(
        stats.prefix_cache_hits > 0,
        "shared prefixes should hit: {stats:?}"
    );
    Ok(())
}

/// A LoRA adapter on every linear layer with random (non-zero) B, saved in peft format.
fn random_adapter(dir: &Path, seed: u64) -> anyhow::Result<()> {
    let mut model = load()?;
    let settings = LoraSettings {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        use_rslora: false,
        use_dora: false,
        target_modules: TargetModules::AllLinear,
    };
    let tuner = LoraTuner::attach(&mut model.model, &settings, seed)?;
    for (name, var) in tuner.trainable() {
        if name.contains("lora_B") {
            let noise = (var.as_tensor().randn_like(0.0, 1.0)? * 0.5)?;
            var.set(&noise)?;
        }
    }
    oxtune_tuners::peft::save(&tuner, dir, None)?;
    Ok(())
}

#[test]
fn requests_for_different_adapters_share_a_batch_and_get_their_own_output() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    random_adapter(&a, 1)?;
    random_adapter(&b, 2)?;

    let prompt = prompt(3, 9);
    let expected = |adapter: Option<&Path>| -> anyhow::Result<Vec<u32>> {
        let mut model = load()?;
        if let Some(adapter) = adapter {
            oxtune_tuners::peft::load(&mut model.model, adapter, &Device::Cpu)?;
        }
        greedy(&model, &prompt, 12)
    };
    let (base_expected, a_expected, b_expected) =
        (expected(None)?, expected(Some(&a))?, expected(Some(&b))?);
    ensure!(
        a_expected != base_expected && b_expected != a_expected,
        "the random adapters should change the output"
    );

    let engine = EngineHandle::start(
        load()?,
        &[("a".into(), a.clone()), ("b".into(), b.clone())],
        EngineConfig::default(),
    )?;
    ensure!(engine.info().adapters == ["a", "b"]);
    // Submitted together, so they run in the same steps.
    let submit = |adapter: Option<&str>| {
        let mut request = Request::new("m", prompt.clone());
        request.max_tokens = Some(12);
        request.adapter = adapter.map(str::to_owned);
        engine.submit(request)
    };
    let pending = [submit(Some("b"))?, submit(None)?, submit(Some("a"))?];
    let [b_got, base_got, a_got] = pending.map(tokens_of);
    ensure!(base_got? == base_expected, "base output");
    ensure!(a_got? == a_expected, "adapter a output");
    ensure!(b_got? == b_expected, "adapter b output");
    Ok(())
}

#[test]
fn json_schema_output_from_the_demo_model_parses_and_validates() -> anyhow::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/SmolLM2-135M-Instruct");
    ensure!(
        dir.join("config.json").is_file(),
        "{} is missing: run scripts/fetch-demo-model.sh first",
        dir.display()
    );
    let model = LoadedModel::load(&dir, &Device::Cpu, DType::F32)?;
    let template = model
        .chat_template
        .as_ref()
        .context("the demo has a template")?;
    let text = template.render(
        &[oxtune_models::ChatMessage::new(
            "user",
            "Describe a person called Ada, aged 36, as JSON.",
        )],
        true,
    )?;
    let ids = model.tokenizer.encode(&text, false)?;
    let engine = EngineHandle::start(model, &[], EngineConfig::default())?;
    let schema = serde_json::json!({
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": false
    });
    let mut request = Request::new("json", ids);
    request.max_tokens = Some(64);
    request.response_format = Some(oxtune_engine::grammar::ResponseFormat::JsonSchema(schema));
    let mut events = engine.submit(request)?;
    let mut output = String::new();
    let reason = loop {
        match events
            .blocking_recv()
            .context("engine closed the channel")?
        {
            Event::Token { text, .. } => output.push_str(&text),
            Event::Finished { reason, text, .. } => {
                output.push_str(&text);
                break reason;
            }
            Event::Error { message } => anyhow::bail!(message),
        }
    };
    ensure!(
        reason == oxtune_engine::FinishReason::Stop,
        "{reason:?}: {output}"
    );
    let value: serde_json::Value =
        serde_json::from_str(&output).with_context(|| format!("not JSON: {output}"))?;
    ensure!(
        value["name"].is_string() && value["age"].is_i64(),
        "{value}"
    );
    ensure!(
        value.as_object().map(serde_json::Map::len) == Some(2),
        "{value}"
    );
    Ok(())
}

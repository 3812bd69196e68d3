//! Parity with Hugging Face transformers on the tiny fixture models of
//! `tests/fixtures/` (made by `tools/make_fixtures.py`): f32 CPU logits within 1e-4,
//! identical greedy continuations, byte-identical chat templates and template tokenization.
//!
//! `OXTUNE_TEST_DEVICE=cuda` runs the same comparisons on a GPU (build with `--features
//! cuda`): in f32 (logits within 1e-4, greedy identical) and, with
//! `OXTUNE_TEST_DTYPE=bfloat16`, in bf16, where logits must be within 2e-2 relative error
//! (max |diff| / max |reference|) and greedy tokens are not compared (bf16 rounding may
//! legitimately flip a near-tie).

mod common;

use anyhow::{Context as _, ensure};
use oxtune_models::{BatchLayout, ChatMessage, KvCache, LoadedModel};
use oxtune_tensor::{D, DType, Tensor};
use serde::Deserialize;

use common::{fixture, target};

const LOGITS_TOLERANCE: f32 = 1e-4;
const BF16_RELATIVE_TOLERANCE: f32 = 2e-2;

/// Absolute tolerance for logits whose largest magnitude is `scale`.
fn tolerance(dtype: DType, scale: f32) -> f32 {
    if dtype == DType::F32 {
        LOGITS_TOLERANCE
    } else {
        BF16_RELATIVE_TOLERANCE * scale
    }
}

#[derive(Deserialize)]
struct Reference {
    greedy: Vec<Greedy>,
    templates: Vec<TemplateCase>,
    templates_with_tools: Vec<ToolsCase>,
    template_token_ids: TemplateTokens,
}

#[derive(Deserialize)]
struct ToolsCase {
    messages: Vec<ChatMessage>,
    tools: serde_json::Value,
    add_generation_prompt: bool,
    rendered: String,
}

#[derive(Deserialize)]
struct Greedy {
    prompt_ids: Vec<u32>,
    output_ids: Vec<u32>,
}

#[derive(Deserialize)]
struct TemplateCase {
    messages: Vec<ChatMessage>,
    add_generation_prompt: bool,
    rendered: String,
}

#[derive(Deserialize)]
struct TemplateTokens {
    rendered: String,
    ids: Vec<u32>,
}

fn load(name: &str) -> anyhow::Result<(LoadedModel, Reference)> {
    let dir = fixture(name);
    let (device, dtype) = target()?;
    let model = LoadedModel::load(&dir, &device, dtype)?;
    let text =
        std::fs::read_to_string(dir.join("reference.json")).context("reading reference.json")?;
    Ok((model, serde_json::from_str(&text)?))
}

/// Max |a - b| with the position and the first values side by side on failure (llm.c style).
fn check_close(name: &str, ours: &Tensor, theirs: &Tensor, tolerance: f32) -> anyhow::Result<()> {
    ensure!(
        ours.dims() == theirs.dims(),
        "{name}: shape {:?} vs {:?}",
        ours.dims(),
        theirs.dims()
    );
    let ours: Vec<f32> = ours.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let theirs: Vec<f32> = theirs.flatten_all()?.to_vec1()?;
    let (worst, max_diff) = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (a - b).abs())
        .enumerate()
        .fold(
            (0, 0f32),
            |acc, (i, d)| if d > acc.1 { (i, d) } else { acc },
        );
    ensure!(
        max_diff <= tolerance,
        "{name}: max |diff| {max_diff:e} at flat index {worst} > {tolerance:e}\n  ours:   {:?}\n  theirs: {:?}",
        &ours[..5.min(ours.len())],
        &theirs[..5.min(theirs.len())]
    );
    Ok(())
}

fn logits_match(name: &str) -> anyhow::Result<()> {
    let (model, _) = load(name)?;
    let (device, dtype) = target()?;
    let tensors = oxtune_tensor::candle::safetensors::load(
        fixture(name).join("reference.safetensors"),
        &device,
    )?;
    let input_ids = tensors
        .get("input_ids")
        .context("input_ids")?
        .to_dtype(DType::U32)?;
    let expected = tensors.get("logits").context("logits")?;
    let scale: f32 = expected.abs()?.flatten_all()?.max(0)?.to_scalar()?;
    let tolerance = tolerance(dtype, scale);
    let logits = model
        .model
        .forward(&input_ids, &mut model.model.new_cache())?;
    check_close(&format!("{name} logits"), &logits, expected, tolerance)?;

    // The same logits come out when the sequence is fed in two chunks through the KV cache.
    let (b, t) = input_ids.dims2()?;
    let first = input_ids.narrow(1, 0, t / 2)?;
    let second = input_ids.narrow(1, t / 2, t - t / 2)?;
    let mut cache: KvCache = model.model.new_cache();
    let head = model.model.forward(&first, &mut cache)?;
    let tail = model.model.forward(&second, &mut cache)?;
    check_close(
        &format!("{name} cached logits"),
        &Tensor::cat(&[head, tail], 1)?,
        expected,
        tolerance,
    )?;

    // The training forward (no cache, explicit layout) gives them too ...
    let window = model.config.sliding_window;
    let layout = BatchLayout::unpacked(&vec![t; b], t, window, &device)?;
    check_close(
        &format!("{name} batch logits"),
        &model.model.forward_batch(&input_ids, &layout)?,
        expected,
        tolerance,
    )?;

    // ... and so does packing both rows into one: attention never crosses the samples.
    let packed_ids = Tensor::cat(&[input_ids.get(0)?, input_ids.get(1)?], 0)?.unsqueeze(0)?;
    let layout = BatchLayout::packed(&[vec![t, t]], 2 * t, window, &device)?;
    let packed = model
        .model
        .forward_batch(&packed_ids, &layout)?
        .reshape(expected.dims())?;
    check_close(
        &format!("{name} packed logits"),
        &packed,
        expected,
        tolerance,
    )
}

fn greedy_matches(name: &str) -> anyhow::Result<()> {
    let (device, dtype) = target()?;
    if dtype != DType::F32 {
        return Ok(()); // see the module documentation: greedy tokens are compared in f32
    }
    let (model, reference) = load(name)?;
    for case in &reference.greedy {
        let mut cache = model.model.new_cache();
        let mut input = Tensor::new(case.prompt_ids.as_slice(), &device)?.unsqueeze(0)?;
        let mut output = Vec::new();
        for _ in 0..case.output_ids.len() {
            let next: u32 = model
                .model
                .forward_last(&input, &mut cache)?
                .argmax(D::Minus1)?
                .squeeze(0)?
                .to_scalar()?;
            output.push(next);
            input = Tensor::new(&[next], &device)?.unsqueeze(0)?;
        }
        ensure!(
            output == case.output_ids,
            "{name} greedy:\n  ours:   {output:?}\n  theirs: {:?}",
            case.output_ids
        );
    }
    Ok(())
}

fn templates_match(name: &str) -> anyhow::Result<()> {
    let (model, reference) = load(name)?;
    let template = model
        .chat_template
        .as_ref()
        .context("the fixture has a chat template")?;
    for case in &reference.templates {
        let rendered = template.render(&case.messages, case.add_generation_prompt)?;
        ensure!(
            rendered == case.rendered,
            "{name} template (add_generation_prompt={}):\n--- ours\n{rendered}\n--- transformers\n{}",
            case.add_generation_prompt,
            case.rendered
        );
    }
    for case in &reference.templates_with_tools {
        let rendered = template.render_with_tools(
            &case.messages,
            case.add_generation_prompt,
            Some(&case.tools),
        )?;
        ensure!(
            rendered == case.rendered,
            "{name} template with tools:\n--- ours\n{rendered}\n--- transformers\n{}",
            case.rendered
        );
    }
    let ids = model
        .tokenizer
        .encode(&reference.template_token_ids.rendered, false)?;
    ensure!(
        ids == reference.template_token_ids.ids,
        "{name} template tokens:\n  ours:   {ids:?}\n  theirs: {:?}",
        reference.template_token_ids.ids
    );
    Ok(())
}

macro_rules! parity_tests {
    ($($module:ident => $fixture:literal),* $(,)?) => {$(
        mod $module {
            #[test]
            fn logits() -> anyhow::Result<()> { super::logits_match($fixture) }
            #[test]
            fn greedy() -> anyhow::Result<()> { super::greedy_matches($fixture) }
            #[test]
            fn chat_template() -> anyhow::Result<()> { super::templates_match($fixture) }
        }
    )*};
}

parity_tests! {
    llama => "tiny-llama",
    qwen2 => "tiny-qwen2",
    qwen3 => "tiny-qwen3",
}

//! The model's GPU-only paths against the paths they replace, on small random Qwen3 models:
//! - training in bf16 through the fused attention kernel (packed samples, grouped kv heads,
//!   head_dim 64 and 128) gives the loss and every gradient of the same weights in f32,
//!   which run the plain composition;
//! - decode steps replayed from CUDA graphs ([`DecodeGraphs`]) give the logits of the eager
//!   paged step, batch after batch, padded batches included.
//!
//! Built and run only with `--features cuda` on a machine with a GPU
//! (`scripts/build-cuda.sh` builds it as `.gpu/gpu-model`).
#![cfg(feature = "cuda")]
#![allow(
    clippy::print_stdout,
    reason = "the tests print their errors for the record"
)]

use std::collections::HashMap;
use std::path::Path;

use anyhow::ensure;
use oxtune_models::checkpoint::{RandomWeights, Weights};
use oxtune_models::decode_graph::DecodeGraphs;
use oxtune_models::{
    BatchLayout, CausalLm, ModelConfig, PagedKvCache, PagedSequence, TrainingPass,
};
use oxtune_tensor::{DType, Device, Tensor, Var};

/// A two-layer Qwen3 with 4 query heads over 2 kv heads of `head_dim`, saved (f32, random)
/// into `dir`.
fn write_model(dir: &Path, head_dim: usize, device: &Device) -> anyhow::Result<ModelConfig> {
    let config = serde_json::json!({
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": head_dim,
        "num_hidden_layers": 2,
        "vocab_size": 512,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false,
        "torch_dtype": "float32"
    });
    std::fs::write(dir.join("config.json"), serde_json::to_vec(&config)?)?;
    let config = ModelConfig::load(dir)?;
    let mut model = CausalLm::load(&config, &RandomWeights::new(DType::F32, device))?;
    let tensors: HashMap<String, Tensor> = model
        .parameters_mut()
        .into_iter()
        .map(|(name, tensor)| (name, tensor.clone()))
        .collect();
    oxtune_tensor::candle::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    Ok(config)
}

/// The model of `dir` in `dtype` with every weight trainable, and the weights by name.
fn trainable(
    config: &ModelConfig,
    dir: &Path,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<(CausalLm, Vec<(String, Var)>)> {
    let mut model = CausalLm::load(config, &Weights::load(dir, dtype, device)?)?;
    let mut vars = Vec::new();
    for (name, tensor) in model.parameters_mut() {
        let var = Var::from_tensor(tensor)?;
        *tensor = var.as_tensor().clone();
        vars.push((name, var));
    }
    Ok((model, vars))
}

fn max_abs(t: &Tensor) -> anyhow::Result<f32> {
    Ok(t.to_dtype(DType::F32)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar()?)
}

#[test]
fn bf16_training_through_flash_attention_matches_f32() -> anyhow::Result<()> {
    let gpu = oxtune_tensor::parse_device("cuda")?;
    for head_dim in [64, 128] {
        let dir = tempfile::tempdir()?;
        let config = write_model(dir.path(), head_dim, &gpu)?;
        // One row of three packed samples and 20 padding tokens.
        let t = 320;
        let layout = BatchLayout::packed(&[vec![100, 150, 50]], t, None, &gpu)?;
        let ids: Vec<u32> = (0..t).map(|i| (i * 7919 % 512) as u32).collect();
        let ids = Tensor::new(ids.as_slice(), &gpu)?.unsqueeze(0)?;
        // A linear loss of the logits, so every gradient is a plain function of the weights.
        let probe = Tensor::randn(0f32, 1.0, (t, config.vocab_size), &gpu)?;
        let run = |dtype: DType| -> anyhow::Result<(f32, HashMap<String, Tensor>)> {
            let (model, vars) = trainable(&config, dir.path(), dtype, &gpu)?;
            let loss = |logits: &Tensor, rows: std::ops::Range<usize>| {
                let logits = logits
                    .to_dtype(DType::F32)?
                    .reshape(((), config.vocab_size))?;
                Ok((logits * probe.narrow(0, rows.start, rows.len())?)?.sum_all()?)
            };
            let pass = TrainingPass::new(false, config.vocab_size);
            let (loss, store) = model.forward_backward(&ids, &layout, pass, loss)?;
            let mut grads = HashMap::new();
            for (name, var) in &vars {
                let grad = store
                    .get(var.as_tensor())
                    .ok_or_else(|| anyhow::anyhow!("no gradient for {name} in {dtype:?}"))?;
                grads.insert(name.clone(), grad.to_dtype(DType::F32)?);
            }
            Ok((loss.to_dtype(DType::F32)?.to_scalar()?, grads))
        };
        let (loss_f32, grads_f32) = run(DType::F32)?;
        let (loss_bf16, grads_bf16) = run(DType::BF16)?;
        let loss_error = (loss_bf16 - loss_f32).abs() / loss_f32.abs().max(1.0);
        println!(
            "head_dim {head_dim}: loss f32 {loss_f32} bf16 {loss_bf16} (relative {loss_error:e})"
        );
        ensure!(
            loss_error < 2e-2,
            "head_dim {head_dim}: loss {loss_bf16} vs {loss_f32}"
        );
        let mut worst = (0f32, String::new());
        for (name, reference) in &grads_f32 {
            let scale = max_abs(reference)?.max(1e-6);
            let error = max_abs(&(&grads_bf16[name] - reference)?)? / scale;
            if error > worst.0 {
                worst = (error, name.clone());
            }
            ensure!(
                error < 5e-2,
                "head_dim {head_dim}: gradient of {name} off by {error:e} of its largest value"
            );
        }
        println!(
            "head_dim {head_dim}: worst gradient {} off by {:e} of its largest value",
            worst.1, worst.0
        );
    }
    Ok(())
}

/// Slots of positions `0..len` of a sequence owning `blocks` (blocks of `block` slots).
fn slots(blocks: &[u32], block: usize, len: usize) -> Vec<u32> {
    (0..len)
        .map(|p| blocks[p / block] * block as u32 + (p % block) as u32)
        .collect()
}

#[test]
fn decode_steps_replayed_from_graphs_match_eager_steps() -> anyhow::Result<()> {
    let gpu = oxtune_tensor::parse_device("cuda")?;
    let dir = tempfile::tempdir()?;
    let config = write_model(dir.path(), 128, &gpu)?;
    let model = CausalLm::load(&config, &Weights::load(dir.path(), DType::BF16, &gpu)?)?;
    let block = 16;
    // Two caches fed the same steps: one stepped eagerly, one through graphs.
    let eager_cache = PagedKvCache::new(&config, 64, block, DType::BF16, &gpu)?;
    let graph_cache = PagedKvCache::new(&config, 64, block, DType::BF16, &gpu)?;
    let mut graphs = DecodeGraphs::new(4096);
    // Five sequences with scrambled blocks and prompts of different lengths.
    let prompts = [37usize, 5, 64, 18, 90];
    let blocks: Vec<Vec<u32>> = (0..prompts.len())
        .map(|s| (0..8).map(|b| ((s * 8 + b) * 29 % 64) as u32).collect())
        .collect();
    let mut lengths = prompts.to_vec();
    // Prefill every prompt eagerly in both caches.
    let mut ids = Vec::new();
    let mut sequences = Vec::new();
    for (s, &len) in prompts.iter().enumerate() {
        ids.extend((0..len).map(|i| ((i * 31 + s * 7) % 512) as u32));
        sequences.push(PagedSequence {
            num_new_tokens: len,
            num_cached_tokens: 0,
            slots: slots(&blocks[s], block, len),
            adapter: None,
        });
    }
    // The prefill mixes fresh chunks of 32 tokens or more (FlashAttention over their own
    // keys) with shorter ones (the paged kernel): each row's logits equal the contiguous
    // cache's.
    let prefill = model.forward_paged(&ids, &sequences, &eager_cache)?;
    model.forward_paged(&ids, &sequences, &graph_cache)?;
    let mut start = 0;
    for (s, &len) in prompts.iter().enumerate() {
        let prompt = Tensor::new(&ids[start..start + len], &gpu)?.unsqueeze(0)?;
        let expected = model
            .forward_last(&prompt, &mut model.new_cache())?
            .squeeze(0)?;
        let got = prefill.get(s)?;
        let error = max_abs(&(&got - &expected.to_dtype(DType::F32)?)?)?;
        let scale = max_abs(&expected)?;
        println!("prefill of {len} tokens: max |paged - contiguous| {error:e} (scale {scale:e})");
        ensure!(
            error <= 2e-2 * scale.max(1.0),
            "prefill of sequence {s} ({len} tokens) off by {error:e}"
        );
        start += len;
    }
    // Decode steps over shrinking batches: 5 rows (padded to 8), 3 (to 4), 1, then 2.
    for (step, batch) in [5usize, 5, 3, 1, 2, 5].into_iter().enumerate() {
        let rows: Vec<usize> = (0..batch).collect();
        let ids: Vec<u32> = rows
            .iter()
            .map(|&s| ((step * 13 + s) % 512) as u32)
            .collect();
        let sequences: Vec<PagedSequence> = rows
            .iter()
            .map(|&s| PagedSequence {
                num_new_tokens: 1,
                num_cached_tokens: lengths[s],
                slots: slots(&blocks[s], block, lengths[s] + 1),
                adapter: None,
            })
            .collect();
        let eager = model.forward_paged(&ids, &sequences, &eager_cache)?;
        let replayed = graphs
            .run(&model, &ids, &sequences, &graph_cache)?
            .ok_or_else(|| anyhow::anyhow!("step {step} ({batch} rows) did not use a graph"))?;
        let error = max_abs(&(&replayed - &eager)?)?;
        let scale = max_abs(&eager)?;
        println!(
            "decode step {step}, {batch} rows: max |graph - eager| {error:e} (scale {scale:e})"
        );
        ensure!(
            error <= 2e-2 * scale.max(1.0),
            "step {step} ({batch} rows): graph logits off by {error:e}"
        );
        for &s in &rows {
            lengths[s] += 1;
        }
    }
    Ok(())
}

//! The paged serving forward gives the same logits as the contiguous KV-cache forward (itself
//! checked against transformers in `parity.rs`): several sequences in one step, scattered
//! non-contiguous blocks, prefill chunks mixed with decode tokens, on each fixture family.
//!
//! `OXTUNE_TEST_DEVICE=cuda` runs the same steps on a GPU (build with `--features cuda`),
//! where attention is the paged-attention kernel: f32 logits within 1e-4, and with
//! `OXTUNE_TEST_DTYPE=bfloat16` within 2e-2 of the largest reference logit.

mod common;

use anyhow::ensure;
use oxtune_models::{LoadedModel, PagedKvCache, PagedSequence};
use oxtune_tensor::{DType, Device, Tensor};

use common::{fixture, target};

const BLOCK: usize = 4;

/// Last-position logits of `tokens` through the contiguous cache, in one call.
fn reference(model: &LoadedModel, tokens: &[u32]) -> anyhow::Result<Vec<f32>> {
    let mut cache = model.model.new_cache();
    let input = Tensor::new(tokens, model.model.device())?.unsqueeze(0)?;
    Ok(model
        .model
        .forward_last(&input, &mut cache)?
        .squeeze(0)?
        .to_vec1()?)
}

/// A sequence being served: its tokens, its blocks, how many are in the cache.
struct Served {
    tokens: Vec<u32>,
    blocks: Vec<u32>,
    cached: usize,
}

impl Served {
    fn slots(&self, upto: usize) -> Vec<u32> {
        (0..upto)
            .map(|p| self.blocks[p / BLOCK] * BLOCK as u32 + (p % BLOCK) as u32)
            .collect()
    }
}

fn check_family(name: &str) -> anyhow::Result<()> {
    let (device, dtype) = target()?;
    let model = LoadedModel::load(&fixture(name), &device, dtype)?;
    let vocab = u32::try_from(model.config.vocab_size)?;
    let cache = PagedKvCache::new(&model.config, 64, BLOCK, dtype, &device)?;
    // Blocks handed out in a scrambled order, so no sequence's slots are contiguous.
    let mut free: Vec<u32> = (0..64).map(|i| (i * 37) % 64).collect();
    let mut take = |n: usize| -> Vec<u32> { free.drain(..n).collect() };
    let token = |i: usize| u32::try_from(i * 7919 % 1000).unwrap_or(0) % vocab;
    let mut sequences: Vec<Served> = [11usize, 5, 17]
        .iter()
        .enumerate()
        .map(|(s, &len)| Served {
            tokens: (0..len).map(|i| token(i + 100 * s)).collect(),
            blocks: take(8),
            cached: 0,
        })
        .collect();

    // Step plans: (sequence, new tokens) — prefill chunks, then decode mixed with a chunk.
    let plans: Vec<Vec<(usize, usize)>> = vec![
        vec![(0, 6), (1, 5)],
        vec![(1, 1), (0, 5), (2, 9)],
        vec![(0, 1), (1, 1), (2, 8)],
        vec![(0, 1), (1, 1), (2, 1)],
        vec![(2, 1), (0, 1)],
    ];
    for (step, plan) in plans.iter().enumerate() {
        let mut input = Vec::new();
        let mut batch = Vec::new();
        for &(s, n) in plan {
            let served = &mut sequences[s];
            // Decode steps feed a freshly "sampled" token.
            if served.cached + n > served.tokens.len() {
                served.tokens.push(token(served.tokens.len() * 3 + step));
            }
            input.extend_from_slice(&served.tokens[served.cached..served.cached + n]);
            batch.push(PagedSequence {
                num_new_tokens: n,
                num_cached_tokens: served.cached,
                slots: served.slots(served.cached + n),
                adapter: None,
            });
        }
        let logits = model.model.forward_paged(&input, &batch, &cache)?;
        for (row, &(s, n)) in plan.iter().enumerate() {
            let served = &mut sequences[s];
            served.cached += n;
            let expected = reference(&model, &served.tokens[..served.cached])?;
            let got: Vec<f32> = logits.get(row)?.to_vec1()?;
            let diff = expected
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            let tolerance = if dtype == DType::F32 {
                1e-4
            } else {
                2e-2 * expected.iter().fold(0.0f32, |m, v| m.max(v.abs()))
            };
            ensure!(
                diff < tolerance,
                "{name} on {device:?} in {dtype:?}: step {step}, sequence {s}: paged logits \
                 differ by {diff} (allowed {tolerance})"
            );
        }
    }
    Ok(())
}

#[test]
fn paged_forward_matches_the_contiguous_cache_on_llama() -> anyhow::Result<()> {
    check_family("tiny-llama")
}

#[test]
fn paged_forward_matches_the_contiguous_cache_on_qwen3() -> anyhow::Result<()> {
    check_family("tiny-qwen3")
}

#[test]
fn paged_forward_matches_the_contiguous_cache_on_qwen2() -> anyhow::Result<()> {
    check_family("tiny-qwen2")
}

#[test]
fn a_step_with_mismatched_slots_is_an_error() -> anyhow::Result<()> {
    let model = LoadedModel::load(&fixture("tiny-llama"), &Device::Cpu, DType::F32)?;
    let cache = PagedKvCache::new(&model.config, 4, BLOCK, DType::F32, &Device::Cpu)?;
    let bad = PagedSequence {
        num_new_tokens: 2,
        num_cached_tokens: 0,
        slots: vec![0],
        adapter: None,
    };
    let error = model
        .model
        .forward_paged(&[1, 2], &[bad], &cache)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    ensure!(error.contains("1 slots"), "{error}");
    Ok(())
}

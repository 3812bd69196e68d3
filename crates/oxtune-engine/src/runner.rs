//! Running a planned step: the model behind the engine.
//!
//! [`Runner`] is what the engine needs from a model — logits for a [`Batch`] — so the
//! scheduler and engine loop are tested with a mock, and the real [`ModelRunner`] wraps
//! oxtune's own transformer (the same code that trains) over a paged KV cache.

use std::path::PathBuf;
use std::sync::Arc;

use oxtune_models::decode_graph::DecodeGraphs;
use oxtune_models::{CausalLm, PagedKvCache};
use oxtune_tensor::{DType, Device, Tensor};

use crate::scheduler::Batch;
use crate::{Error, Result};

/// Executes steps.
pub trait Runner: Send {
    /// f32 logits at the last new token of every sequence of `batch`: (sequences, vocab).
    fn execute(&mut self, batch: &Batch) -> Result<Tensor>;
}

/// The transformer over its paged KV cache, with decode steps replayed from CUDA graphs
/// when `graphs` is given (and the model is on a GPU).
#[derive(Debug)]
pub struct ModelRunner {
    model: CausalLm,
    cache: PagedKvCache,
    graphs: Option<DecodeGraphs>,
}

impl ModelRunner {
    pub fn new(model: CausalLm, cache: PagedKvCache, graphs: Option<DecodeGraphs>) -> Self {
        Self {
            model,
            cache,
            graphs,
        }
    }

    /// Loads each peft adapter `(name, dir)` as served adapter number `index` (its position
    /// in `adapters`), leaving the base model's own layers unadapted for requests without an
    /// adapter.
    pub fn attach_adapters(
        model: &mut CausalLm,
        adapters: &[(String, PathBuf)],
        device: &Device,
    ) -> Result<()> {
        for (index, (name, dir)) in adapters.iter().enumerate() {
            // Loading attaches the adapter as the layers' own; move it to the served slot.
            let before: Vec<_> = model
                .linears_mut()
                .into_iter()
                .map(|(_, linear)| linear.adapter().cloned())
                .collect();
            oxtune_tuners::peft::load(model, dir, device).map_err(|error| Error::Adapter {
                name: name.clone(),
                message: format!("{}: {error}", dir.display()),
            })?;
            for ((_, linear), previous) in model.linears_mut().into_iter().zip(before) {
                let loaded = linear.adapter().cloned();
                let changed = match (&loaded, &previous) {
                    (Some(a), Some(b)) => !Arc::ptr_eq(a, b),
                    (Some(_), None) => true,
                    _ => false,
                };
                linear.set_adapter(previous);
                linear.set_served_adapter(index, if changed { loaded } else { None });
            }
        }
        Ok(())
    }

    /// KV-cache blocks to allocate: what fits in `gpu_memory_utilization` of a GPU's memory
    /// (minus what is already used), or in `cpu_cache_bytes` on the CPU — but no more than
    /// `max_num_seqs` sequences of `max_model_len` tokens need.
    pub fn num_blocks(
        model: &CausalLm,
        block_size: usize,
        dtype: DType,
        gpu_memory_utilization: f64,
        cpu_cache_bytes: usize,
        max_num_seqs: usize,
        max_model_len: usize,
    ) -> Result<usize> {
        let per_block = PagedKvCache::bytes_per_block(model.config(), block_size, dtype).max(1);
        let budget = match oxtune_tensor::free_memory(model.device())? {
            Some((free, total)) => {
                #[expect(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    clippy::cast_precision_loss,
                    reason = "memory sizes"
                )]
                let allowed = (total as f64 * gpu_memory_utilization) as u64;
                let used = total - free;
                usize::try_from(allowed.saturating_sub(used)).unwrap_or(usize::MAX)
            }
            None => cpu_cache_bytes,
        };
        let per_sequence = max_model_len.div_ceil(block_size);
        let minimum = per_sequence.min(64);
        let blocks = (budget / per_block).min(per_sequence.saturating_mul(max_num_seqs.max(1)));
        if blocks < minimum {
            return Err(Error::Config(format!(
                "only {blocks} KV-cache blocks of {block_size} tokens fit in the memory left ({budget} bytes)\nhint: raise --gpu_memory_utilization, or lower --max_model_len"
            )));
        }
        Ok(blocks)
    }
}

impl Runner for ModelRunner {
    fn execute(&mut self, batch: &Batch) -> Result<Tensor> {
        if let Some(graphs) = self.graphs.as_mut() {
            let replayed =
                graphs.run(&self.model, &batch.input_ids, &batch.sequences, &self.cache)?;
            if let Some(logits) = replayed {
                return Ok(logits);
            }
        }
        Ok(self
            .model
            .forward_paged(&batch.input_ids, &batch.sequences, &self.cache)?)
    }
}

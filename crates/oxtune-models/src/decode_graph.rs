//! Decode steps replayed from recorded CUDA graphs.
//!
//! A decode step of a small batch is hundreds of short kernels (Qwen3-0.6B: about 36 per
//! layer); launched one by one, the host takes longer to issue them than the GPU to run them.
//! [`DecodeGraphs`] records the whole step — embedding, every layer with its cache writes and
//! paged attention, the final norm and the LM head — once per batch size of 1, 2, 4, 8, 16
//! and 32 rows, and replays it with one launch.
//!
//! A recording reads its inputs from one u32 buffer and writes its logits to one f32 buffer,
//! both created before it. Before each replay the host writes the step into the input buffer
//! (one upload and one copy): the token ids, their positions, the slots their keys and values
//! go to, and each row's slot table for the paged-attention kernel, whose launch is sized
//! for the longest context the cache can hold, so one recording serves every context length.
//! A batch smaller than its recording is padded by repeating its last row, which writes the
//! same keys and values to the same slot and whose logits are dropped.
//!
//! Only steps where every sequence decodes one token under the base model qualify; prefill
//! chunks, served adapters and batches over 32 rows run eagerly
//! ([`CausalLm::forward_paged`]), and so does every step after a recording fails (logged once).

use oxtune_tensor::graph::Graph;
use oxtune_tensor::ops::PagedContext;
use oxtune_tensor::{DType, Tensor};

use crate::paged::{PagedStep, StepAttention};
use crate::{AdapterRouting, CausalLm, PagedKvCache, PagedSequence, Result};

/// Batch sizes with a recording; a batch runs in the smallest that holds it.
const ROWS: [usize; 6] = [1, 2, 4, 8, 16, 32];

/// The recorded decode steps of one model over one cache.
#[derive(Debug)]
pub struct DecodeGraphs {
    /// Longest context served (prompt plus output): recordings are sized for it.
    max_model_len: usize,
    recorded: Vec<Recording>,
    /// A recording failed: every step runs eagerly from then on.
    disabled: bool,
}

#[derive(Debug)]
struct Recording {
    rows: usize,
    /// ids (rows) | positions (rows) | new slots (rows) | per row [table offset, context
    /// length] (2 rows) | slot tables (rows * max_context, for the longest context the
    /// recording's paged attention is sized for), u32.
    inputs: Tensor,
    /// (rows, vocab) f32.
    logits: Tensor,
    graph: Graph,
}

impl DecodeGraphs {
    /// The longest context a step can have: the served length, within the cache's slots
    /// and the model's positions.
    fn max_context(&self, model: &CausalLm, cache: &PagedKvCache) -> usize {
        (cache.num_blocks() * cache.block_size())
            .min(model.max_positions())
            .min(self.max_model_len)
    }

    /// Recordings for contexts of up to `max_model_len` tokens.
    pub fn new(max_model_len: usize) -> Self {
        Self {
            max_model_len,
            recorded: Vec::new(),
            disabled: false,
        }
    }

    /// f32 logits (sequences, vocab) of a step from its recording, or `None` when the step
    /// runs eagerly (see the module docs).
    pub fn run(
        &mut self,
        model: &CausalLm,
        input_ids: &[u32],
        sequences: &[PagedSequence],
        cache: &PagedKvCache,
    ) -> Result<Option<Tensor>> {
        let n = sequences.len();
        let eligible = !self.disabled
            && model.device().is_cuda()
            && n == input_ids.len()
            && sequences
                .iter()
                .all(|s| s.num_new_tokens == 1 && s.adapter.is_none());
        let Some(rows) = ROWS.iter().copied().find(|&rows| rows >= n) else {
            return Ok(None);
        };
        if !eligible || n == 0 {
            return Ok(None);
        }
        let max_context = self.max_context(model, cache);
        if sequences.iter().any(|s| s.slots.len() > max_context) {
            return Ok(None);
        }
        let host = step_inputs(input_ids, sequences, rows)?;
        let index = match self.recorded.iter().position(|r| r.rows == rows) {
            Some(index) => index,
            None => match Recording::record(model, cache, rows, max_context, &host) {
                Ok(recording) => {
                    tracing::debug!(rows, max_context, "recorded a decode step");
                    self.recorded.push(recording);
                    // Recording ran the step once: its logits are already in place.
                    let recording = self.recorded.last().expect("just pushed");
                    return Ok(Some(recording.logits.narrow(0, 0, n)?));
                }
                Err(error) => {
                    tracing::warn!(%error, "decode steps run without CUDA graphs");
                    self.disabled = true;
                    return Ok(None);
                }
            },
        };
        let recording = &mut self.recorded[index];
        recording.write_inputs(&host)?;
        recording.graph.replay()?;
        Ok(Some(recording.logits.narrow(0, 0, n)?))
    }
}

/// The step's inputs in a recording's layout (without the slot tables' unused tail), padded
/// to `rows` by repeating the last row.
fn step_inputs(input_ids: &[u32], sequences: &[PagedSequence], rows: usize) -> Result<Vec<u32>> {
    let to_u32 = |value: usize| u32::try_from(value).map_err(oxtune_tensor::candle::Error::wrap);
    let padded = |i: usize| i.min(sequences.len() - 1);
    let mut host = Vec::with_capacity(5 * rows);
    host.extend((0..rows).map(|i| input_ids[padded(i)]));
    for i in 0..rows {
        host.push(to_u32(sequences[padded(i)].num_cached_tokens)?);
    }
    for i in 0..rows {
        let sequence = &sequences[padded(i)];
        host.push(sequence.slots[sequence.num_cached_tokens]);
    }
    let mut offset = 0;
    let mut offsets = Vec::with_capacity(sequences.len());
    for sequence in sequences {
        offsets.push(offset);
        offset += sequence.slots.len();
    }
    for i in 0..rows {
        host.push(to_u32(offsets[padded(i)])?);
        host.push(to_u32(sequences[padded(i)].slots.len())?);
    }
    for sequence in sequences {
        host.extend_from_slice(&sequence.slots);
    }
    Ok(host)
}

impl Recording {
    fn record(
        model: &CausalLm,
        cache: &PagedKvCache,
        rows: usize,
        max_context: usize,
        host: &[u32],
    ) -> Result<Self> {
        let device = model.device();
        let inputs = Tensor::zeros(5 * rows + rows * max_context, DType::U32, device)?;
        let logits = Tensor::zeros((rows, model.config().vocab_size), DType::F32, device)?;
        write_inputs(&inputs, host)?;
        let graph = Graph::capture(device, || {
            let step_logits = step(model, cache, &inputs, rows, max_context)
                .map_err(|error| oxtune_tensor::candle::Error::Msg(error.to_string()))?;
            logits.slice_set(&step_logits, 0, 0)
        })?;
        Ok(Self {
            rows,
            inputs,
            logits,
            graph,
        })
    }

    fn write_inputs(&self, host: &[u32]) -> Result<()> {
        write_inputs(&self.inputs, host)
    }
}

/// Writes a step's inputs to the front of a recording's input buffer.
fn write_inputs(inputs: &Tensor, host: &[u32]) -> Result<()> {
    let fresh = Tensor::new(host, inputs.device())?;
    Ok(inputs.slice_set(&fresh, 0, 0)?)
}

/// The recorded work: the step read from `inputs` (see [`Recording::inputs`]), logits
/// (rows, vocab) f32.
fn step(
    model: &CausalLm,
    cache: &PagedKvCache,
    inputs: &Tensor,
    rows: usize,
    max_context: usize,
) -> Result<Tensor> {
    let part = |start: usize, len: usize| inputs.narrow(0, start * rows, len * rows);
    let ids = part(0, 1)?;
    let positions = part(1, 1)?;
    let new_slots = part(2, 1)?;
    let context_rows = part(3, 2)?.reshape((rows, 2))?;
    let slots = inputs.narrow(0, 5 * rows, rows * max_context)?;
    let (cos, sin) = model.rope_tables();
    let step = PagedStep {
        cos: cos.index_select(&positions, 0)?,
        sin: sin.index_select(&positions, 0)?,
        slots: new_slots,
        attention: StepAttention::Kernel {
            paged: Some(PagedContext {
                slots,
                rows: context_rows,
                max_context,
                sliding_window: model.config().sliding_window,
            }),
            fresh: Vec::new(),
        },
        routing: AdapterRouting::new([(rows, None)]),
    };
    model.paged_logits(&ids, &step, cache, None, &step.routing)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoding(cached: usize, slots: Vec<u32>) -> PagedSequence {
        PagedSequence {
            num_new_tokens: 1,
            num_cached_tokens: cached,
            slots,
            adapter: None,
        }
    }

    #[test]
    fn step_inputs_pad_with_the_last_row_and_pack_the_slot_tables() -> Result<()> {
        let sequences = [decoding(2, vec![7, 8, 9]), decoding(1, vec![40, 41])];
        let host = step_inputs(&[5, 6], &sequences, 4)?;
        #[rustfmt::skip]
        let expected = vec![
            5, 6, 6, 6,             // ids, padded with the last row's
            2, 1, 1, 1,             // positions: the cached counts
            9, 41, 41, 41,          // slots the new tokens go to
            0, 3, 3, 2, 3, 2, 3, 2, // per row: table offset, context length
            7, 8, 9, 40, 41,        // the tables, packed
        ];
        assert_eq!(host, expected);
        Ok(())
    }

    #[test]
    fn steps_on_the_cpu_run_eagerly() -> Result<()> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/tiny-llama");
        let device = oxtune_tensor::Device::Cpu;
        let model = crate::LoadedModel::load(&dir, &device, DType::F32)?.model;
        let cache = PagedKvCache::new(model.config(), 4, 4, DType::F32, &device)?;
        let mut graphs = DecodeGraphs::new(16);
        let step = graphs.run(&model, &[1], &[decoding(0, vec![0])], &cache)?;
        assert!(step.is_none(), "a CPU step must run eagerly");
        assert!(graphs.recorded.is_empty() && !graphs.disabled);
        Ok(())
    }
}

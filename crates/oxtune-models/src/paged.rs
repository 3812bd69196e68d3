//! Serving many sequences at once over a paged KV cache (vLLM's layout).
//!
//! Keys and values live in one pool per layer, split into blocks of `block_size` token slots;
//! a sequence owns a list of blocks (its block table), so slot `block_table[p / block_size] *
//! block_size + p % block_size` holds position `p`. Sequences sharing a prompt prefix share its
//! blocks. Which blocks a sequence owns is decided by the engine's block manager; the model
//! only reads and writes the slots it is given.
//!
//! One step runs every scheduled sequence's new tokens as one flattened row (1, t_total, c), so
//! the linear layers see the whole batch. Attention then reads the cache in one of two ways:
//! - on a GPU, one paged-attention kernel per layer for the whole step
//!   (`oxtune_tensor::ops::paged_attention`): every new token is a query row that reads its
//!   sequence's slots straight from the pools, causally (a prefill chunk's rows share their
//!   sequence's slot table and see growing prefixes of it) and within the sliding window;
//! - elsewhere, per group: consecutive single-token (decode) sequences as one padded batch,
//!   each multi-token (prefill) chunk on its own, each gathering its context and masking it.

use oxtune_tensor::ops::PagedContext;
use oxtune_tensor::{DType, Device, Tensor};

use crate::Result;
use crate::config::ModelConfig;

fn msg(text: String) -> crate::Error {
    oxtune_tensor::candle::Error::Msg(text).into()
}

/// The key/value pools of every layer: (num_blocks * block_size, kv_heads * head_dim) each.
#[derive(Debug)]
pub struct PagedKvCache {
    layers: Vec<(Tensor, Tensor)>,
    block_size: usize,
    num_blocks: usize,
    /// kv_heads * head_dim
    width: usize,
}

impl PagedKvCache {
    /// Zeroed pools of `num_blocks` blocks of `block_size` slots for `config`'s layers.
    pub fn new(
        config: &ModelConfig,
        num_blocks: usize,
        block_size: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if num_blocks == 0 || block_size == 0 {
            return Err(msg(format!(
                "a KV cache of {num_blocks} blocks of {block_size} tokens holds nothing\nhint: give a positive number of blocks and block size"
            )));
        }
        let width = config.num_key_value_heads * config.head_dim;
        let slots = num_blocks * block_size;
        let layers = (0..config.num_hidden_layers)
            .map(|_| {
                Ok((
                    Tensor::zeros((slots, width), dtype, device)?,
                    Tensor::zeros((slots, width), dtype, device)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            block_size,
            num_blocks,
            width,
        })
    }

    /// Bytes one block takes over all layers (keys and values).
    pub fn bytes_per_block(config: &ModelConfig, block_size: usize, dtype: DType) -> usize {
        2 * config.num_hidden_layers
            * block_size
            * config.num_key_value_heads
            * config.head_dim
            * dtype.size_in_bytes()
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Writes this step's keys and values (t, kv_h * d) of `layer` into their `slots` (t,).
    pub(crate) fn write(&self, layer: usize, slots: &Tensor, k: &Tensor, v: &Tensor) -> Result<()> {
        let (pool_k, pool_v) = &self.layers[layer];
        let index = slots
            .reshape((slots.elem_count(), 1))?
            .broadcast_as((slots.elem_count(), self.width))?
            .contiguous()?;
        pool_k.scatter_set(&index, &k.contiguous()?, 0)?;
        pool_v.scatter_set(&index, &v.contiguous()?, 0)?;
        Ok(())
    }

    /// The key and value pools of `layer`: (num_blocks * block_size, kv_h * d) each.
    pub(crate) fn pools(&self, layer: usize) -> (&Tensor, &Tensor) {
        let (pool_k, pool_v) = &self.layers[layer];
        (pool_k, pool_v)
    }

    /// Keys and values at `slots` (n of them): (n, kv_h * d) each.
    pub(crate) fn gather(&self, layer: usize, slots: &Tensor) -> Result<(Tensor, Tensor)> {
        let (pool_k, pool_v) = &self.layers[layer];
        Ok((
            pool_k.index_select(slots, 0)?,
            pool_v.index_select(slots, 0)?,
        ))
    }
}

/// One sequence's part of a serving step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PagedSequence {
    /// New tokens this step (consecutive in the flattened input, in sequence order).
    pub num_new_tokens: usize,
    /// Tokens already in the cache before this step (the new ones start at this position).
    pub num_cached_tokens: usize,
    /// Cache slot of every position 0..num_cached_tokens + num_new_tokens.
    pub slots: Vec<u32>,
    /// Served adapter index (multi-LoRA); `None` = the base model.
    pub adapter: Option<usize>,
}

impl PagedSequence {
    fn total(&self) -> usize {
        self.num_cached_tokens + self.num_new_tokens
    }
}

/// Which adapter each run of rows of the flattened batch uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterRouting {
    pub(crate) segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Segment {
    pub(crate) start: usize,
    pub(crate) len: usize,
    pub(crate) adapter: Option<usize>,
}

impl AdapterRouting {
    /// Routing of consecutive runs of `(rows, adapter)`; neighbours with the same adapter
    /// merge into one segment.
    pub fn new(runs: impl IntoIterator<Item = (usize, Option<usize>)>) -> Self {
        let mut segments: Vec<Segment> = Vec::new();
        let mut start = 0;
        for (len, adapter) in runs {
            match segments.last_mut() {
                Some(last) if last.adapter == adapter => last.len += len,
                _ => segments.push(Segment {
                    start,
                    len,
                    adapter,
                }),
            }
            start += len;
        }
        Self { segments }
    }

    /// Every new token of each sequence under the sequence's adapter.
    pub(crate) fn of_tokens(sequences: &[PagedSequence]) -> Self {
        Self::new(sequences.iter().map(|s| (s.num_new_tokens, s.adapter)))
    }

    /// One row per sequence (its last token) under the sequence's adapter.
    pub(crate) fn of_last_tokens(sequences: &[PagedSequence]) -> Self {
        Self::new(sequences.iter().map(|s| (1, s.adapter)))
    }

    /// Whether every row runs the base model (no served adapter involved).
    pub fn is_base_only(&self) -> bool {
        self.segments
            .iter()
            .all(|segment| segment.adapter.is_none())
    }
}

/// What every layer of one serving step shares: positions, slots and masks, built once.
#[derive(Debug)]
pub(crate) struct PagedStep {
    /// RoPE tables at each new token's position: (t_total, d/2).
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
    /// Slots the new tokens' keys and values are written to: (t_total,) u32.
    pub(crate) slots: Tensor,
    pub(crate) attention: StepAttention,
    pub(crate) routing: AdapterRouting,
}

/// How the layers of a step read the cache.
#[derive(Debug)]
pub(crate) enum StepAttention {
    /// On a GPU: one paged-attention kernel per layer over `paged` (every row that reads
    /// cached context, in step order), and FlashAttention for each prefill chunk in `fresh`.
    Kernel {
        paged: Option<PagedContext>,
        fresh: Vec<FreshChunk>,
    },
    /// Elsewhere: per group, the padded context gathered and masked.
    Groups(Vec<AttentionGroup>),
}

/// The first chunk of a sequence's prompt, with nothing cached before it: its keys are its
/// own, so it attends like a training row (FlashAttention, no score matrix), not through the
/// paged kernel, which reads the keys of each query row separately and is meant for decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FreshChunk {
    /// First row of the chunk in the flattened step, and its rows.
    pub(crate) start: usize,
    pub(crate) len: usize,
}

impl FreshChunk {
    /// Shortest chunk worth a FlashAttention launch of its own.
    const MIN_ROWS: usize = 32;
}

/// Sequences whose attention runs as one batched computation.
#[derive(Debug)]
pub(crate) struct AttentionGroup {
    /// First row of the group in the flattened batch, and its number of rows.
    pub(crate) start: usize,
    pub(crate) rows: usize,
    /// Number of sequences (b) and the padded context length (l).
    pub(crate) sequences: usize,
    pub(crate) context: usize,
    /// Slots to read, (b * l,) u32, padded with slot 0.
    pub(crate) slots: Tensor,
    /// Additive f32 mask broadcastable to (b, h, q, l): causal, window, padding.
    pub(crate) mask: Tensor,
}

impl PagedStep {
    pub(crate) fn new(
        sequences: &[PagedSequence],
        cos_table: &Tensor,
        sin_table: &Tensor,
        sliding_window: Option<usize>,
        device: &Device,
    ) -> Result<Self> {
        let max_positions = cos_table.dim(0)?;
        let mut positions = Vec::new();
        let mut new_slots = Vec::new();
        for (index, sequence) in sequences.iter().enumerate() {
            if sequence.num_new_tokens == 0 || sequence.slots.len() != sequence.total() {
                return Err(msg(format!(
                    "sequence {index} of the step has {} new tokens, {} cached and {} slots",
                    sequence.num_new_tokens,
                    sequence.num_cached_tokens,
                    sequence.slots.len()
                )));
            }
            if sequence.total() > max_positions {
                return Err(msg(format!(
                    "sequence {index} reaches position {} beyond the model's context of {max_positions} tokens",
                    sequence.total()
                )));
            }
            for position in sequence.num_cached_tokens..sequence.total() {
                positions.push(to_u32(position)?);
            }
            new_slots.extend_from_slice(&sequence.slots[sequence.num_cached_tokens..]);
        }
        let positions = Tensor::new(positions.as_slice(), device)?;
        let slots = Tensor::new(new_slots.as_slice(), device)?;
        let attention = if device.is_cuda() {
            let is_fresh = |s: &PagedSequence| {
                s.num_cached_tokens == 0 && s.num_new_tokens >= FreshChunk::MIN_ROWS
            };
            let mut fresh = Vec::new();
            let mut start = 0;
            for sequence in sequences {
                if is_fresh(sequence) {
                    fresh.push(FreshChunk {
                        start,
                        len: sequence.num_new_tokens,
                    });
                }
                start += sequence.num_new_tokens;
            }
            let paged = if sequences.iter().all(is_fresh) {
                None
            } else {
                Some(PagedContext::from_sequences(
                    sequences.iter().filter(|s| !is_fresh(s)).map(|sequence| {
                        (
                            sequence.slots.as_slice(),
                            sequence.num_cached_tokens..sequence.total(),
                        )
                    }),
                    sliding_window,
                    device,
                )?)
            };
            StepAttention::Kernel { paged, fresh }
        } else {
            StepAttention::Groups(AttentionGroup::of_step(sequences, sliding_window, device)?)
        };
        Ok(Self {
            cos: cos_table.index_select(&positions, 0)?,
            sin: sin_table.index_select(&positions, 0)?,
            slots,
            attention,
            routing: AdapterRouting::of_tokens(sequences),
        })
    }
}

impl AttentionGroup {
    /// The groups of a step: runs of decode sequences, and each prefill chunk on its own.
    fn of_step(
        sequences: &[PagedSequence],
        sliding_window: Option<usize>,
        device: &Device,
    ) -> Result<Vec<Self>> {
        let mut groups = Vec::new();
        let mut start = 0;
        let mut index = 0;
        while index < sequences.len() {
            // A run of decode sequences (one new token each) shares one padded batch.
            let run = if sequences[index].num_new_tokens == 1 {
                sequences[index..]
                    .iter()
                    .take_while(|sequence| sequence.num_new_tokens == 1)
                    .count()
            } else {
                1
            };
            let group = AttentionGroup::new(
                &sequences[index..index + run],
                start,
                sliding_window,
                device,
            )?;
            start += group.rows;
            index += run;
            groups.push(group);
        }
        Ok(groups)
    }

    /// Either one sequence (any number of new tokens) or several with one new token each.
    fn new(
        sequences: &[PagedSequence],
        start: usize,
        sliding_window: Option<usize>,
        device: &Device,
    ) -> Result<Self> {
        let queries = sequences[0].num_new_tokens;
        let context = sequences
            .iter()
            .map(PagedSequence::total)
            .max()
            .unwrap_or(0);
        let mut slots = Vec::with_capacity(sequences.len() * context);
        let mut mask = Vec::with_capacity(sequences.len() * queries * context);
        for sequence in sequences {
            let total = sequence.total();
            slots.extend_from_slice(&sequence.slots);
            slots.extend(std::iter::repeat_n(0, context - total));
            for query in 0..queries {
                let position = sequence.num_cached_tokens + query;
                mask.extend((0..context).map(|key| {
                    let visible = key <= position
                        && sliding_window.is_none_or(|window| position - key < window);
                    if visible { 0.0 } else { f32::NEG_INFINITY }
                }));
            }
        }
        Ok(Self {
            start,
            rows: sequences.len() * queries,
            sequences: sequences.len(),
            context,
            slots: Tensor::new(slots.as_slice(), device)?,
            mask: Tensor::from_vec(mask, (sequences.len(), 1, queries, context), device)?,
        })
    }
}

fn to_u32(value: usize) -> Result<u32> {
    u32::try_from(value).map_err(|_| msg(format!("{value} does not fit in u32")))
}

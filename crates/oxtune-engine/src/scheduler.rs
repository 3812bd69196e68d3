//! Continuous batching: which sequences run in the next step and how many of their tokens.
//!
//! Every step has a token budget (`max_num_batched_tokens`). Running sequences go first, oldest
//! first: a decoding sequence needs one token, a sequence still reading its prompt gets the
//! next chunk that fits (chunked prefill). When the KV cache has no block left for a running
//! sequence, the newest running sequence is preempted: its blocks are freed and it goes back to
//! the front of the queue, to be recomputed from its tokens later (recompute, as vLLM v1).
//! Waiting sequences are admitted in arrival order while the budget, `max_num_seqs` and the
//! cache allow, each starting from the longest prefix found in the prefix cache.
//!
//! The scheduler never touches tensors: a step is a [`Batch`] of token ids and cache slots.

use std::collections::VecDeque;

use oxtune_models::PagedSequence;

use crate::block_manager::BlockManager;

/// Limits of one step.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Most sequences running at once.
    pub max_num_seqs: usize,
    /// Most new tokens in one step (prefill chunks plus decode tokens).
    pub max_num_batched_tokens: usize,
}

/// A request's tokens and its place in the KV cache.
#[derive(Debug, Clone)]
pub struct Sequence {
    pub id: u64,
    /// Prompt then generated tokens.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Tokens whose keys/values are in the cache.
    pub computed: usize,
    pub blocks: Vec<u32>,
    pub adapter: Option<usize>,
    /// Prompt tokens that came from the prefix cache when the sequence was first admitted.
    pub cached_prompt_tokens: Option<usize>,
}

impl Sequence {
    pub fn new(id: u64, prompt: Vec<u32>, adapter: Option<usize>) -> Self {
        Self {
            id,
            prompt_len: prompt.len(),
            tokens: prompt,
            computed: 0,
            blocks: Vec::new(),
            adapter,
            cached_prompt_tokens: None,
        }
    }

    /// Generated tokens so far.
    pub fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }
}

/// One step's work, in the order the model runs it: decode tokens first, then prefill
/// chunks, each part grouped by adapter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    pub seq_ids: Vec<u64>,
    /// New tokens of every sequence, concatenated.
    pub input_ids: Vec<u32>,
    pub sequences: Vec<PagedSequence>,
    /// Whether the step ends the sequence's known tokens (so its logits give the next token).
    pub sample: Vec<bool>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.seq_ids.is_empty()
    }

    pub fn num_tokens(&self) -> usize {
        self.input_ids.len()
    }
}

/// The queue, the running set and the KV-cache accounts.
#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    blocks: BlockManager,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    /// Sequences preempted so far.
    pub preemptions: u64,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig, blocks: BlockManager) -> Self {
        Self {
            config,
            blocks,
            waiting: VecDeque::new(),
            running: Vec::new(),
            preemptions: 0,
        }
    }

    pub fn blocks(&self) -> &BlockManager {
        &self.blocks
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Queues a new sequence.
    pub fn add(&mut self, sequence: Sequence) {
        self.waiting.push_back(sequence);
    }

    /// The sequence `id`, waiting or running.
    pub fn get(&self, id: u64) -> Option<&Sequence> {
        self.running
            .iter()
            .chain(self.waiting.iter())
            .find(|s| s.id == id)
    }

    /// Ids of every sequence, running first.
    pub fn ids(&self) -> Vec<u64> {
        self.running
            .iter()
            .chain(self.waiting.iter())
            .map(|s| s.id)
            .collect()
    }

    /// Removes the sequence (finished or aborted) and frees its blocks.
    pub fn remove(&mut self, id: u64) -> Option<Sequence> {
        let sequence = if let Some(index) = self.running.iter().position(|s| s.id == id) {
            self.running.remove(index)
        } else {
            let index = self.waiting.iter().position(|s| s.id == id)?;
            self.waiting.remove(index)?
        };
        self.blocks.release(&sequence.blocks);
        Some(sequence)
    }

    /// The front of the queue when it can never run: its tokens need more blocks than the
    /// whole cache has while nothing else runs.
    pub fn unschedulable_front(&self) -> Option<u64> {
        let front = self.waiting.front()?;
        let needed = self.blocks.blocks_for(front.tokens.len());
        (self.running.is_empty() && needed > self.blocks.num_blocks()).then_some(front.id)
    }

    /// Plans the next step.
    pub fn schedule(&mut self) -> Batch {
        let mut budget = self.config.max_num_batched_tokens;
        // (index in running, new tokens)
        let mut planned: Vec<(u64, usize)> = Vec::new();
        let mut preempted = false;

        let mut index = 0;
        while index < self.running.len() && budget > 0 {
            let sequence = &self.running[index];
            let new = (sequence.tokens.len() - sequence.computed).min(budget);
            if new == 0 {
                index += 1;
                continue;
            }
            let target = sequence.computed + new;
            let mut blocks = std::mem::take(&mut self.running[index].blocks);
            loop {
                if self.blocks.grow(&mut blocks, target) {
                    self.running[index].blocks = blocks;
                    planned.push((self.running[index].id, new));
                    budget -= new;
                    index += 1;
                    break;
                }
                // Out of blocks: preempt the newest running sequence (possibly this one).
                preempted = true;
                if self.running.len() - 1 == index {
                    self.running[index].blocks = blocks;
                    self.preempt_last();
                    break;
                }
                self.preempt_last();
            }
        }

        if !preempted {
            while self.running.len() < self.config.max_num_seqs && budget > 0 {
                let Some(front) = self.waiting.front_mut() else {
                    break;
                };
                let mut blocks = std::mem::take(&mut front.blocks);
                let mut computed = 0;
                if blocks.is_empty() {
                    let (cached, tokens) =
                        self.blocks.take_cached_prefix(&front.tokens, front.adapter);
                    blocks = cached;
                    computed = tokens;
                }
                let new = (front.tokens.len() - computed).min(budget);
                if !self.blocks.grow(&mut blocks, computed + new) {
                    self.blocks.release(&blocks);
                    break;
                }
                self.blocks.note_prefix_lookup(front.prompt_len, computed);
                front.blocks = blocks;
                front.computed = computed;
                front
                    .cached_prompt_tokens
                    .get_or_insert(computed.min(front.prompt_len));
                planned.push((front.id, new));
                budget -= new;
                if let Some(sequence) = self.waiting.pop_front() {
                    self.running.push(sequence);
                }
            }
        }
        self.build_batch(&planned)
    }

    /// Frees the newest running sequence's blocks and requeues it at the front.
    fn preempt_last(&mut self) {
        if let Some(mut victim) = self.running.pop() {
            self.blocks.release(&victim.blocks);
            victim.blocks.clear();
            victim.computed = 0;
            self.preemptions += 1;
            tracing::debug!(sequence = victim.id, "preempted: out of KV-cache blocks");
            self.waiting.push_front(victim);
        }
    }

    fn build_batch(&self, planned: &[(u64, usize)]) -> Batch {
        let block_size = self.blocks.block_size();
        let mut entries: Vec<(&Sequence, usize)> = planned
            .iter()
            .filter_map(|&(id, new)| {
                self.running
                    .iter()
                    .find(|s| s.id == id)
                    .map(|sequence| (sequence, new))
            })
            .collect();
        // Decode tokens first (one padded attention batch), then prefill chunks; each part
        // grouped by adapter so the linear layers see few segments. Stable: arrival order.
        entries.sort_by_key(|(sequence, new)| (*new > 1, sequence.adapter));
        let mut batch = Batch::default();
        for (sequence, new) in entries {
            let total = sequence.computed + new;
            let slots = (0..total)
                .map(|position| {
                    let block = sequence.blocks[position / block_size];
                    #[expect(clippy::cast_possible_truncation, reason = "slot counts fit u32")]
                    let offset = (position % block_size) as u32;
                    #[expect(clippy::cast_possible_truncation, reason = "slot counts fit u32")]
                    let slot = block * block_size as u32 + offset;
                    slot
                })
                .collect();
            batch.seq_ids.push(sequence.id);
            batch
                .input_ids
                .extend_from_slice(&sequence.tokens[sequence.computed..total]);
            batch.sequences.push(PagedSequence {
                num_new_tokens: new,
                num_cached_tokens: sequence.computed,
                slots,
                adapter: sequence.adapter,
            });
            batch.sample.push(total == sequence.tokens.len());
        }
        batch
    }

    /// Records a step's results: the planned tokens are now cached, and each sampled
    /// sequence gets its new token (`sampled[i]` for `batch.seq_ids[i]`).
    pub fn update(&mut self, batch: &Batch, sampled: &[Option<u32>]) {
        for ((id, sequence), token) in batch.seq_ids.iter().zip(&batch.sequences).zip(sampled) {
            let Some(running) = self.running.iter_mut().find(|s| s.id == *id) else {
                continue;
            };
            running.computed += sequence.num_new_tokens;
            self.blocks.register_full_blocks(
                &running.tokens,
                &running.blocks,
                running.computed,
                running.adapter,
            );
            if let Some(token) = token {
                running.tokens.push(*token);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scheduler(blocks: usize, block_size: usize, max_tokens: usize) -> Scheduler {
        Scheduler::new(
            SchedulerConfig {
                max_num_seqs: 8,
                max_num_batched_tokens: max_tokens,
            },
            BlockManager::new(blocks, block_size, true),
        )
    }

    #[test]
    fn long_prompts_are_prefilled_in_chunks_beside_decodes() {
        let mut s = scheduler(16, 4, 8);
        s.add(Sequence::new(1, vec![1; 3], None));
        let batch = s.schedule();
        assert_eq!(batch.sample, [true]);
        s.update(&batch, &[Some(9)]);
        s.add(Sequence::new(2, vec![2; 12], None));
        // Sequence 1 decodes one token; sequence 2 gets the 7 remaining tokens of budget.
        let batch = s.schedule();
        assert_eq!(batch.seq_ids, [1, 2]);
        assert_eq!(batch.sequences[1].num_new_tokens, 7);
        assert_eq!(batch.sample, [true, false]);
        s.update(&batch, &[Some(9), None]);
        let batch = s.schedule();
        assert_eq!(batch.sequences[1].num_new_tokens, 5);
        assert_eq!(batch.sequences[1].num_cached_tokens, 7);
        assert_eq!(batch.sample, [true, true]);
    }

    #[test]
    fn out_of_blocks_preempts_the_newest_and_recomputes_it_later() {
        // 4 blocks of 2 tokens: two prompts of 4 tokens take 2 blocks each.
        let mut s = scheduler(4, 2, 64);
        s.add(Sequence::new(1, vec![1, 2, 3, 4], None));
        s.add(Sequence::new(2, vec![5, 6, 7, 8], None));
        let batch = s.schedule();
        s.update(&batch, &[Some(7), Some(9)]);
        assert_eq!(s.blocks().num_free(), 0);
        // Both decode into position 4, needing a third block each: sequence 2 is preempted.
        let batch = s.schedule();
        assert_eq!(batch.seq_ids, [1]);
        assert_eq!(s.preemptions, 1);
        assert_eq!(s.num_waiting(), 1);
        assert_eq!(s.get(2).map(|q| q.computed), Some(0));
        assert_eq!(
            s.get(2).map(|q| q.tokens.clone()),
            Some(vec![5, 6, 7, 8, 9])
        );
        s.update(&batch, &[Some(3)]);
        // When sequence 1 finishes, sequence 2 is recomputed from its tokens; its first block
        // survived in the prefix cache (the second was taken by sequence 1's growth).
        s.remove(1);
        let batch = s.schedule();
        assert_eq!(batch.seq_ids, [2]);
        assert_eq!(batch.input_ids, [7, 8, 9]);
        assert_eq!(batch.sequences[0].num_cached_tokens, 2);
        assert_eq!(batch.sample, [true]);
    }

    #[test]
    fn removing_a_sequence_frees_its_blocks() {
        let mut s = scheduler(8, 2, 64);
        s.add(Sequence::new(1, vec![1; 5], None));
        s.add(Sequence::new(2, vec![2; 5], None));
        let batch = s.schedule();
        s.update(&batch, &[Some(1), Some(2)]);
        assert_eq!(s.blocks().num_used(), 6);
        s.remove(2);
        assert_eq!(s.blocks().num_used(), 3);
        s.remove(1);
        assert_eq!(s.blocks().num_used(), 0);
        assert!(s.is_idle());
    }

    #[test]
    fn identical_prompts_share_prefix_blocks() {
        let mut s = scheduler(16, 2, 64);
        s.add(Sequence::new(1, vec![5, 6, 7, 8, 9], None));
        let batch = s.schedule();
        s.update(&batch, &[Some(1)]);
        s.add(Sequence::new(2, vec![5, 6, 7, 8, 3], None));
        let batch = s.schedule();
        // Sequence 2 only computes its last token; its first two blocks are shared.
        assert_eq!(batch.seq_ids, [1, 2]);
        assert_eq!(batch.sequences[1].num_cached_tokens, 4);
        assert_eq!(batch.sequences[1].num_new_tokens, 1);
        assert_eq!(s.get(2).and_then(|q| q.cached_prompt_tokens), Some(4));
        assert_eq!(s.blocks().prefix_hits, 4);
        let first = s.get(1).map(|q| q.blocks[..2].to_vec());
        let second = s.get(2).map(|q| q.blocks[..2].to_vec());
        assert_eq!(first, second);
    }

    #[test]
    fn the_same_arrivals_give_the_same_plans() {
        let run = || {
            let mut s = scheduler(6, 2, 5);
            let mut plans = Vec::new();
            for id in 0..4u32 {
                s.add(Sequence::new(
                    u64::from(id),
                    vec![id; 3 + id as usize],
                    None,
                ));
            }
            for step in 0..12u32 {
                let batch = s.schedule();
                let sampled: Vec<Option<u32>> =
                    batch.sample.iter().map(|&x| x.then_some(step)).collect();
                s.update(&batch, &sampled);
                plans.push(batch);
            }
            plans
        };
        assert_eq!(run(), run());
    }
}

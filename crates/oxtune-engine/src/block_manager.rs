//! KV-cache accounting: which blocks of the paged cache each sequence owns. Pure bookkeeping —
//! no tensors — so it is tested on its own.
//!
//! Blocks are reference-counted. With prefix caching, every *full* block is identified by a
//! hash chained over all tokens up to its end (and the adapter, whose keys/values differ):
//! a new sequence whose prompt starts with the same tokens takes the same blocks instead of
//! recomputing them. A block nobody uses any more stays cached (and findable) until its slot is
//! needed; free blocks are reused least recently freed first, so hot prefixes survive longest.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash as _, Hasher as _};

/// Identifies a full block's contents together with everything before it.
pub type BlockHash = u64;

/// The block pool and the prefix cache.
#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    ref_counts: Vec<u32>,
    /// Blocks with no user, least recently freed first; some still hold cached prefixes.
    free: VecDeque<u32>,
    /// Hash of each block's contents, when it is full and registered.
    hashes: Vec<Option<BlockHash>>,
    /// Registered full blocks by hash.
    cached: HashMap<BlockHash, u32>,
    enable_prefix_caching: bool,
    /// Prompt tokens looked up in the prefix cache, and how many were found.
    pub prefix_queries: u64,
    pub prefix_hits: u64,
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize, enable_prefix_caching: bool) -> Self {
        let num_blocks = u32::try_from(num_blocks).unwrap_or(u32::MAX);
        Self {
            block_size,
            ref_counts: vec![0; num_blocks as usize],
            free: (0..num_blocks).collect(),
            hashes: vec![None; num_blocks as usize],
            cached: HashMap::new(),
            enable_prefix_caching,
            prefix_queries: 0,
            prefix_hits: 0,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    /// Blocks that can be handed out now (free, cached or not).
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Blocks in use by at least one sequence.
    pub fn num_used(&self) -> usize {
        self.num_blocks() - self.num_free()
    }

    /// Fraction of blocks in use, 0..=1.
    pub fn usage(&self) -> f64 {
        #[expect(clippy::cast_precision_loss, reason = "block counts are small")]
        let usage = self.num_used() as f64 / self.num_blocks().max(1) as f64;
        usage
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Chained hashes of the full blocks of `tokens` under `adapter`.
    pub fn block_hashes(&self, tokens: &[u32], adapter: Option<usize>) -> Vec<BlockHash> {
        let mut parent: BlockHash = 0;
        tokens
            .chunks_exact(self.block_size)
            .map(|chunk| {
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                parent.hash(&mut hasher);
                adapter.hash(&mut hasher);
                chunk.hash(&mut hasher);
                parent = hasher.finish();
                parent
            })
            .collect()
    }

    /// Takes the cached blocks holding the longest prefix of `prompt`, leaving at least one
    /// prompt token to compute (its logits start the reply). Returns the blocks (now owned
    /// by the caller) and the number of tokens they hold.
    pub fn take_cached_prefix(
        &mut self,
        prompt: &[u32],
        adapter: Option<usize>,
    ) -> (Vec<u32>, usize) {
        if !self.enable_prefix_caching {
            return (Vec::new(), 0);
        }
        let usable = prompt.len().saturating_sub(1);
        let hashes = self.block_hashes(&prompt[..usable], adapter);
        let mut blocks = Vec::new();
        for hash in hashes {
            match self.cached.get(&hash) {
                Some(&block) => blocks.push(block),
                None => break,
            }
        }
        for &block in &blocks {
            self.acquire(block);
        }
        let tokens = blocks.len() * self.block_size;
        (blocks, tokens)
    }

    /// Counts an admitted prompt of `prompt_tokens` of which `hit_tokens` came from the cache.
    pub fn note_prefix_lookup(&mut self, prompt_tokens: usize, hit_tokens: usize) {
        self.prefix_queries += prompt_tokens as u64;
        self.prefix_hits += hit_tokens.min(prompt_tokens) as u64;
    }

    /// Adds blocks to `blocks` until they hold `tokens` tokens. On shortage nothing changes
    /// and `false` is returned.
    pub fn grow(&mut self, blocks: &mut Vec<u32>, tokens: usize) -> bool {
        let needed = self.blocks_for(tokens).saturating_sub(blocks.len());
        if needed > self.free.len() {
            return false;
        }
        for _ in 0..needed {
            let Some(block) = self.free.pop_front() else {
                return false;
            };
            if let Some(hash) = self.hashes[block as usize].take() {
                self.cached.remove(&hash);
            }
            self.ref_counts[block as usize] = 1;
            blocks.push(block);
        }
        true
    }

    /// Registers the full blocks of a sequence whose first `computed` tokens are in the
    /// cache, so later prompts with the same prefix can take them.
    pub fn register_full_blocks(
        &mut self,
        tokens: &[u32],
        blocks: &[u32],
        computed: usize,
        adapter: Option<usize>,
    ) {
        if !self.enable_prefix_caching {
            return;
        }
        let full = computed / self.block_size;
        for (index, hash) in self
            .block_hashes(&tokens[..full * self.block_size], adapter)
            .into_iter()
            .enumerate()
        {
            let block = blocks[index];
            if self.hashes[block as usize].is_some() {
                continue;
            }
            // Another block may already hold the same contents (computed concurrently): keep
            // the first one registered.
            if let std::collections::hash_map::Entry::Vacant(entry) = self.cached.entry(hash) {
                entry.insert(block);
                self.hashes[block as usize] = Some(hash);
            }
        }
    }

    /// Gives back a sequence's blocks, last first (so a prompt's tail is evicted before its
    /// head, which more prompts share).
    pub fn release(&mut self, blocks: &[u32]) {
        for &block in blocks.iter().rev() {
            let count = &mut self.ref_counts[block as usize];
            *count = count.saturating_sub(1);
            if *count == 0 {
                if self.hashes[block as usize].is_some() {
                    self.free.push_back(block);
                } else {
                    // Nothing cached in it: hand it out before blocks that hold a prefix.
                    self.free.push_front(block);
                }
            }
        }
    }

    /// One more user of a cached block (it leaves the free list if nobody used it).
    fn acquire(&mut self, block: u32) {
        let count = &mut self.ref_counts[block as usize];
        if *count == 0
            && let Some(position) = self.free.iter().position(|&b| b == block)
        {
            self.free.remove(position);
        }
        *count += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grow_and_release_keep_the_accounts() {
        let mut manager = BlockManager::new(4, 2, false);
        let mut a = Vec::new();
        assert!(manager.grow(&mut a, 3));
        assert_eq!(a.len(), 2);
        assert!(manager.grow(&mut a, 4), "still fits two blocks");
        assert_eq!(a.len(), 2);
        let mut b = Vec::new();
        assert!(!manager.grow(&mut b, 5), "three blocks do not fit in two");
        assert!(b.is_empty(), "a failed grow takes nothing");
        assert_eq!(manager.num_used(), 2);
        manager.release(&a);
        assert_eq!(manager.num_used(), 0);
        assert!(manager.grow(&mut b, 8));
        assert!((manager.usage() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn a_shared_prefix_reuses_blocks_and_counts_hits() {
        let mut manager = BlockManager::new(8, 2, true);
        let prompt = [1, 2, 3, 4, 5];
        let mut first = Vec::new();
        assert!(manager.grow(&mut first, prompt.len()));
        manager.register_full_blocks(&prompt, &first, prompt.len(), None);

        // Same first four tokens: two blocks come from the cache, shared.
        let (blocks, tokens) = manager.take_cached_prefix(&[1, 2, 3, 4, 9, 9], None);
        assert_eq!(tokens, 4);
        assert_eq!(blocks, first[..2]);
        // Another adapter's keys differ: no hit.
        assert_eq!(manager.take_cached_prefix(&[1, 2, 3, 4, 9], Some(0)).1, 0);
        // A whole cached prompt still leaves its last token to compute.
        let (_, tokens) = manager.take_cached_prefix(&[1, 2, 3, 4], None);
        assert_eq!(tokens, 2);

        // Released blocks stay findable until their slot is needed.
        manager.release(&first);
        manager.release(&blocks);
        let (again, tokens) = manager.take_cached_prefix(&[1, 2, 3, 4, 7], None);
        assert_eq!(tokens, 4);
        assert_eq!(again, first[..2]);
    }

    #[test]
    fn cached_blocks_are_evicted_last_and_unregistered_when_reused() {
        let mut manager = BlockManager::new(3, 2, true);
        let prompt = [1, 2, 3, 4];
        let mut blocks = Vec::new();
        assert!(manager.grow(&mut blocks, 4));
        manager.register_full_blocks(&prompt, &blocks, 4, None);
        manager.release(&blocks);
        // One uncached free block is used before the cached ones.
        let mut other = Vec::new();
        assert!(manager.grow(&mut other, 2));
        assert!(!blocks.contains(&other[0]));
        assert_eq!(manager.take_cached_prefix(&[1, 2, 3, 4, 5], None).1, 4);
        manager.release(&other);
        // Taking every block evicts the cached ones; the prefix is gone.
        let mut all = Vec::new();
        manager.release(&blocks);
        assert!(manager.grow(&mut all, 6));
        manager.release(&all);
        assert_eq!(manager.take_cached_prefix(&[1, 2, 3, 4, 5], None).1, 0);
    }
}

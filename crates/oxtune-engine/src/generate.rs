//! The decode loop: prefill the prompt into the KV cache, then sample one token at a time
//! until an end-of-sequence token, a stop word or the token budget.
//!
//! A [`Generator`] keeps its cache between calls: when the next prompt starts with the tokens
//! already cached (the earlier turns of a chat), only the new suffix is prefilled.
//!
//! Text streams out through a callback in whole characters; with stop words, text that could
//! still turn out to be the start of a stop word is held back until it cannot.

use std::time::Instant;

use oxtune_models::{KvCache, LoadedModel};
use oxtune_tensor::Tensor;

use crate::sampler::{Sampler, SamplingParams};
use crate::{Error, Result};

/// How to generate one reply.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends when the text contains one of these; it is not part of the output.
    pub stop_words: Vec<String>,
    /// Generation ends at any of these tokens (the model's end-of-sequence tokens).
    pub eos_token_ids: Vec<u32>,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop word.
    Stop,
    /// `max_new_tokens` (or the model's context) was reached.
    Length,
}

impl FinishReason {
    /// The OpenAI name: `stop` or `length`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// One finished reply.
#[derive(Debug, Clone)]
pub struct Generation {
    pub text: String,
    /// Generated tokens, the end-of-sequence token excluded.
    pub token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys/values were already cached.
    pub cached_prompt_tokens: usize,
    /// Time to the first generated token (prefill and one sample).
    pub prefill_seconds: f64,
    /// Time for the remaining tokens.
    pub decode_seconds: f64,
}

/// Runs a model over a KV cache it keeps between calls.
pub struct Generator<'m> {
    model: &'m LoadedModel,
    cache: KvCache,
    /// The tokens whose keys/values are in `cache`, in order.
    cached_tokens: Vec<u32>,
}

impl<'m> Generator<'m> {
    pub fn new(model: &'m LoadedModel) -> Self {
        Self {
            model,
            cache: model.model.new_cache(),
            cached_tokens: Vec::new(),
        }
    }

    /// Forgets the cached conversation.
    pub fn reset(&mut self) {
        self.cache.clear();
        self.cached_tokens.clear();
    }

    /// Generates a reply to `prompt_ids`, calling `on_text` with each new piece of text.
    pub fn generate(
        &mut self,
        prompt_ids: &[u32],
        options: &GenerateOptions,
        on_text: &mut dyn FnMut(&str) -> Result<()>,
    ) -> Result<Generation> {
        if prompt_ids.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        let max_positions = self.model.config.max_position_embeddings;
        if prompt_ids.len() >= max_positions {
            return Err(Error::PromptTooLong {
                prompt_tokens: prompt_ids.len(),
                max_positions,
            });
        }
        let mut sampler = Sampler::new(options.sampling.clone())?;
        let start = Instant::now();

        // Reuse the cached prefix; at least one prompt token is fed to get logits.
        let reused = common_prefix(&self.cached_tokens, prompt_ids).min(prompt_ids.len() - 1);
        self.cache.truncate(reused)?;
        self.cached_tokens.truncate(reused);

        let mut history: Vec<u32> = prompt_ids.to_vec();
        let mut generated = Vec::new();
        let mut stream = StopWordStream::new(&options.stop_words);
        let mut decoder = self.model.tokenizer.decode_stream(true);
        let mut feed = prompt_ids[reused..].to_vec();
        let mut first_token_at = None;
        let budget = options.max_new_tokens.min(max_positions - prompt_ids.len());
        let mut finish_reason = FinishReason::Length;

        while generated.len() < budget {
            let input = Tensor::new(feed.as_slice(), self.model.model.device())?.unsqueeze(0)?;
            let logits = self.model.model.forward_last(&input, &mut self.cache)?;
            self.cached_tokens.extend_from_slice(&feed);
            let mut logits: Vec<f32> = logits.squeeze(0)?.to_vec1()?;
            let token = sampler.sample(&mut logits, &history);
            first_token_at.get_or_insert_with(Instant::now);
            if options.eos_token_ids.contains(&token) {
                finish_reason = FinishReason::Stop;
                break;
            }
            generated.push(token);
            history.push(token);
            if let Some(piece) = decoder.step(token)?
                && stream.push(&piece, on_text)?
            {
                finish_reason = FinishReason::Stop;
                break;
            }
            feed = vec![token];
        }
        stream.finish(on_text)?;
        let end = Instant::now();
        let first = first_token_at.unwrap_or(end);
        Ok(Generation {
            text: stream.text,
            token_ids: generated,
            finish_reason,
            prompt_tokens: prompt_ids.len(),
            cached_prompt_tokens: reused,
            prefill_seconds: (first - start).as_secs_f64(),
            decode_seconds: (end - first).as_secs_f64(),
        })
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Accumulates text, cuts it at the first stop word, and releases only text that cannot be
/// the beginning of a stop word.
struct StopWordStream<'s> {
    stop_words: &'s [String],
    text: String,
    /// Bytes of `text` already passed to the callback.
    emitted: usize,
    stopped: bool,
}

impl<'s> StopWordStream<'s> {
    fn new(stop_words: &'s [String]) -> Self {
        Self {
            stop_words,
            text: String::new(),
            emitted: 0,
            stopped: false,
        }
    }

    /// Adds `piece`; returns true when a stop word was found (text is cut before it).
    fn push(&mut self, piece: &str, on_text: &mut dyn FnMut(&str) -> Result<()>) -> Result<bool> {
        // A stop word may straddle earlier text, so search from where it could begin.
        let longest = self.stop_words.iter().map(String::len).max().unwrap_or(0);
        let mut search_from = self.text.len().saturating_sub(longest.saturating_sub(1));
        while !self.text.is_char_boundary(search_from) {
            search_from -= 1;
        }
        self.text.push_str(piece);
        let found = self
            .stop_words
            .iter()
            .filter(|w| !w.is_empty())
            .filter_map(|w| {
                self.text[search_from..]
                    .find(w.as_str())
                    .map(|i| search_from + i)
            })
            .min();
        if let Some(cut) = found {
            self.text.truncate(cut);
            self.stopped = true;
            self.release(self.text.len(), on_text)?;
            return Ok(true);
        }
        let held = self.held_back();
        self.release(self.text.len() - held, on_text)?;
        Ok(false)
    }

    /// Length of the longest suffix of `text` that starts some stop word.
    fn held_back(&self) -> usize {
        self.stop_words
            .iter()
            .flat_map(|w| {
                (1..w.len())
                    .rev()
                    .filter(|&n| w.is_char_boundary(n))
                    .map(move |n| &w[..n])
            })
            .filter(|prefix| self.text.ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0)
    }

    fn release(&mut self, upto: usize, on_text: &mut dyn FnMut(&str) -> Result<()>) -> Result<()> {
        if upto > self.emitted {
            on_text(&self.text[self.emitted..upto])?;
            self.emitted = upto;
        }
        Ok(())
    }

    /// Releases what was held back (generation ended without a stop word).
    fn finish(&mut self, on_text: &mut dyn FnMut(&str) -> Result<()>) -> Result<()> {
        if !self.stopped {
            self.release(self.text.len(), on_text)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stop_words: &[&str], pieces: &[&str]) -> Result<(String, Vec<String>, bool)> {
        let stop_words: Vec<String> = stop_words.iter().map(|s| (*s).to_owned()).collect();
        let mut stream = StopWordStream::new(&stop_words);
        let mut out = Vec::new();
        let mut stopped = false;
        for piece in pieces {
            if stream.push(piece, &mut |t| {
                out.push(t.to_owned());
                Ok(())
            })? {
                stopped = true;
                break;
            }
        }
        stream.finish(&mut |t| {
            out.push(t.to_owned());
            Ok(())
        })?;
        Ok((stream.text, out, stopped))
    }

    #[test]
    fn stop_word_across_pieces_is_cut_and_never_streamed() -> Result<()> {
        let (text, out, stopped) = run(&["###"], &["Hello", " wor", "ld#", "#", "# more"])?;
        assert!(stopped);
        assert_eq!(text, "Hello world");
        assert_eq!(out.concat(), "Hello world");
        assert!(out.iter().all(|piece| !piece.contains('#')));
        Ok(())
    }

    #[test]
    fn held_back_text_is_released_when_it_is_not_a_stop_word() -> Result<()> {
        let (text, out, stopped) = run(&["<|end|>"], &["a <", "|x", "y"])?;
        assert!(!stopped);
        assert_eq!(text, "a <|xy");
        assert_eq!(out.concat(), text);
        Ok(())
    }

    #[test]
    fn multibyte_stop_words() -> Result<()> {
        let (text, _, stopped) = run(&["结束"], &["你好", "结", "束了"])?;
        assert!(stopped);
        assert_eq!(text, "你好");
        Ok(())
    }
}

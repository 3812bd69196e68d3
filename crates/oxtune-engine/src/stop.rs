//! Text out of tokens: an incremental detokenizer that releases whole characters, and stop
//! words that cut the text and are never streamed.

use oxtune_models::Tokenizer;

use crate::Result;

/// Turns generated tokens into text incrementally. Decoding a window of recent tokens (not
/// token by token) keeps leading spaces and multi-byte characters right; text ending in an
/// incomplete character (U+FFFD) is held until the next token completes it.
#[derive(Debug, Default)]
pub struct Detokenizer {
    /// Start of the decoding window and end of the text already released.
    prefix_offset: usize,
    read_offset: usize,
}

impl Detokenizer {
    /// The text that `tokens` (all generated tokens, the newest last) adds.
    pub fn step(&mut self, tokenizer: &Tokenizer, tokens: &[u32]) -> Result<String> {
        let released = tokenizer.decode(&tokens[self.prefix_offset..self.read_offset], true)?;
        let text = tokenizer.decode(&tokens[self.prefix_offset..], true)?;
        if text.len() > released.len() && !text.ends_with('\u{FFFD}') {
            let new = text.get(released.len()..).unwrap_or_default().to_owned();
            self.prefix_offset = self.read_offset;
            self.read_offset = tokens.len();
            Ok(new)
        } else {
            Ok(String::new())
        }
    }
}

/// Accumulates text, cuts it at the first stop word, and releases only text that cannot be
/// the beginning of a stop word.
#[derive(Debug)]
pub struct StopWordStream {
    stop_words: Vec<String>,
    pub text: String,
    /// Bytes of `text` already passed to the callback.
    emitted: usize,
    stopped: bool,
}

impl StopWordStream {
    pub fn new(stop_words: Vec<String>) -> Self {
        Self {
            stop_words,
            text: String::new(),
            emitted: 0,
            stopped: false,
        }
    }

    /// Adds `piece`; returns true when a stop word was found (text is cut before it).
    pub fn push(
        &mut self,
        piece: &str,
        on_text: &mut dyn FnMut(&str) -> Result<()>,
    ) -> Result<bool> {
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
    pub fn finish(&mut self, on_text: &mut dyn FnMut(&str) -> Result<()>) -> Result<()> {
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
        let mut stream = StopWordStream::new(stop_words);
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

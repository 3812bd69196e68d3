//! Grammar-constrained decoding for the OpenAI `response_format` (`json_object`, `json_schema`),
//! built on llguidance.
//!
//! - [`GrammarCompiler`] is built once per model from the raw bytes of every token (llguidance's
//!   token trie) and shared by `Arc`; [`GrammarCompiler::compile`] turns a [`ResponseFormat`]
//!   into a fresh per-request [`TokenConstraint`].
//! - Per step the engine asks [`TokenConstraint::allowed`] for the mask, samples among the allowed
//!   tokens, then calls [`TokenConstraint::commit`]; it stops when an eos token is sampled or
//!   when [`TokenConstraint::is_finished`] says nothing more may follow.
//!
//! Token bytes. llguidance matches grammars against bytes, so each token id needs the exact bytes
//! it decodes to. [`GrammarCompiler::from_tokenizer`] derives them from `tokenizer.json`:
//! byte-level BPE (GPT-2's byte-to-character map, "Ġ" = space) or SentencePiece style ("▁" = space,
//! `<0x0A>` byte-fallback pieces = that byte). Special tokens (and every eos token) get llguidance's
//! marker byte 0xFF in front, so no JSON text can spell them: eos is allowed only where the
//! output is complete, and other special tokens never are.
//!
//! Whitespace: between JSON tokens the output may hold one line break and up to 64 spaces or
//! tabs, enough for pretty-printing and too little for the endless blank lines a model can fall
//! into. A schema may instead carry llguidance's own `x-guidance` options (separators,
//! `whitespace_flexible`, `whitespace_pattern`), as its JSON-schema dialect documents.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use llguidance::api::{StopReason, TopLevelGrammar};
use llguidance::toktrie::{ApproximateTokEnv, SimpleVob, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};

/// Longest token, in bytes (special marker included), that llguidance's token trie can hold.
const MAX_TOKEN_BYTES: usize = 1024;
/// Token ids must stay below llguidance's 24-bit "no token" sentinel.
const MAX_VOCAB_SIZE: usize = 0xff_ffff;
/// SentencePiece's word-boundary mark, written for a space.
const SENTENCEPIECE_SPACE: char = '\u{2581}';
/// The schema key holding llguidance's JSON options (separators, whitespace).
const LLGUIDANCE_OPTIONS: &str = "x-guidance";
/// Whitespace allowed between two JSON tokens, unless the schema sets its own `x-guidance`:
/// at most one line break, then at most 64 spaces or tabs of indentation. llguidance's default
/// (any run of whitespace) lets a model that has started emitting blank lines go on forever.
const WHITESPACE_PATTERN: &str = r"\x0D?\x0A[\x20\x09]{0,64}|[\x20\x09]{1,64}";

/// What the client asked the output to look like.
#[derive(Debug, Clone, PartialEq)]
pub enum ResponseFormat {
    /// Any syntactically valid JSON object (OpenAI `{"type":"json_object"}`).
    JsonObject,
    /// JSON matching this JSON Schema (OpenAI `{"type":"json_schema","json_schema":{"schema":...}}`).
    JsonSchema(serde_json::Value),
}

/// Errors while building a grammar or stepping through it; each message says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum GrammarError {
    /// The token table given to [`GrammarCompiler::new`] is unusable.
    #[error("invalid token table for grammar-constrained decoding: {0}")]
    Vocabulary(String),
    /// `tokenizer.json` could not be read or turned into token bytes.
    #[error("cannot build the token table for grammar-constrained decoding from {path}: {message}")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The `response_format` cannot be compiled (a bad or unsupported JSON Schema).
    #[error("invalid response_format: {0}")]
    InvalidSchema(String),
    /// [`TokenConstraint::commit`] got a token outside the allowed set.
    #[error(
        "token {token} ({text}) is not allowed here by the response_format grammar\nhint: sample only among the tokens `allowed()` marks true"
    )]
    TokenNotAllowed {
        /// The token id.
        token: u32,
        /// The token's bytes, escaped.
        text: String,
    },
    /// A token id at or beyond the vocabulary size the compiler was built with.
    #[error(
        "token {token} is outside the {vocab_size}-token vocabulary the grammar was built with\nhint: the model's logits may be padded past the tokenizer's vocabulary; never sample those ids"
    )]
    TokenOutOfRange {
        /// The token id.
        token: u32,
        /// The vocabulary size of the compiler.
        vocab_size: usize,
    },
    /// No token of the vocabulary can continue the output, and it is not complete.
    #[error(
        "no token of the vocabulary can continue the constrained output\nhint: the vocabulary cannot spell what the schema requires next; loosen the schema"
    )]
    DeadEnd,
    /// llguidance failed while computing a mask or advancing (e.g. a schema too complex to
    /// follow within its limits).
    #[error("grammar-constrained decoding failed: {0}")]
    Matcher(String),
}

/// Built once per model from its vocabulary; compiles per-request constraints.
/// `Send + Sync`, shared by `Arc`.
pub struct GrammarCompiler {
    factory: ParserFactory,
    vocab_size: usize,
    eos_token_ids: Arc<[u32]>,
}

impl fmt::Debug for GrammarCompiler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrammarCompiler")
            .field("vocab_size", &self.vocab_size)
            .field("eos_token_ids", &self.eos_token_ids)
            .finish_non_exhaustive()
    }
}

impl GrammarCompiler {
    /// `token_bytes[i]` = the raw bytes token id i stands for (byte-level BPE already decoded to
    /// bytes, SentencePiece "▁" turned into a space, byte-fallback tokens `<0x0A>` turned into
    /// that byte); special tokens flagged in `special` (their bytes are their plain text, e.g.
    /// `<|im_end|>`). `eos_token_ids` end generation; they are treated as special whatever
    /// `special` says. An empty entry is a token that is never allowed.
    pub fn new(
        token_bytes: Vec<Vec<u8>>,
        special: Vec<bool>,
        eos_token_ids: &[u32],
    ) -> Result<Self, GrammarError> {
        let vocab_size = token_bytes.len();
        let bad = |message: String| Err(GrammarError::Vocabulary(message));
        if vocab_size == 0 {
            return bad("the vocabulary is empty".into());
        }
        if vocab_size >= MAX_VOCAB_SIZE {
            return bad(format!(
                "{vocab_size} tokens; llguidance supports fewer than {MAX_VOCAB_SIZE}"
            ));
        }
        if special.len() != vocab_size {
            return bad(format!(
                "{vocab_size} token byte strings but {} special flags; give one flag per token",
                special.len()
            ));
        }
        let Some(&first_eos) = eos_token_ids.first() else {
            return bad("no eos token ids; give at least one token that ends generation (the model's eos_token_id)".into());
        };
        if let Some(eos) = eos_token_ids.iter().find(|&&id| id as usize >= vocab_size) {
            return bad(format!(
                "eos token id {eos} is outside the {vocab_size}-token vocabulary"
            ));
        }
        let mut words = token_bytes;
        for (id, (word, &is_special)) in words.iter_mut().zip(&special).enumerate() {
            let is_eos = u32::try_from(id).is_ok_and(|id| eos_token_ids.contains(&id));
            if is_special || is_eos {
                word.insert(0, TokTrie::SPECIAL_TOKEN_MARKER);
            }
            if word.len() > MAX_TOKEN_BYTES {
                return bad(format!(
                    "token {id} is {} bytes long; llguidance supports tokens of at most {MAX_TOKEN_BYTES} bytes",
                    word.len()
                ));
            }
        }
        let vocab_u32 = u32::try_from(vocab_size)
            .map_err(|_| GrammarError::Vocabulary(format!("{vocab_size} tokens is too many")))?;
        // The checks above cover the trie's documented limits; its remaining asserts (e.g. at
        // most ~4M trie nodes) must not take the server down, so a panic becomes an error.
        let trie = std::panic::catch_unwind(|| {
            TokTrie::from(&TokRxInfo::new(vocab_u32, first_eos), &words)
                .with_eos_tokens(eos_token_ids)
        })
        .map_err(|_| {
            GrammarError::Vocabulary(format!(
                "llguidance could not build its token trie over {vocab_size} tokens"
            ))
        })?;
        // Greedy tokenization is only used by llguidance for forced tokens, which we do not use.
        let tok_env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&tok_env)
            .map_err(|e| GrammarError::Vocabulary(format!("{e:#}")))?;
        // Errors go back to the caller, not to stderr; they must not echo the tokens so far.
        factory.quiet();
        factory.limits_mut().verbose_errors = false;
        Ok(Self {
            factory,
            vocab_size,
            eos_token_ids: eos_token_ids.into(),
        })
    }

    /// Builds the table from our tokenizer: byte-level BPE (GPT-2 byte map, "Ġ" = space) or
    /// SentencePiece-style vocabularies ("▁" = space, `<0xHH>` byte fallback); added tokens are
    /// their text, flagged special as `tokenizer.json` says.
    ///
    /// Re-reads `tokenizer.json` from [`oxtune_models::Tokenizer::path`] (the wrapper does not
    /// expose its inner tokenizer), once per model.
    pub fn from_tokenizer(
        tokenizer: &oxtune_models::Tokenizer,
        eos_token_ids: &[u32],
    ) -> Result<Self, GrammarError> {
        let path = tokenizer.path();
        let error = |message: String| GrammarError::Tokenizer {
            path: path.to_path_buf(),
            message,
        };
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| error(e.to_string()))?;
        let (token_bytes, special) = token_table(&inner).map_err(error)?;
        Self::new(token_bytes, special, eos_token_ids)
    }

    /// The number of token ids the masks cover.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// A fresh constraint; a bad schema is [`GrammarError::InvalidSchema`] naming what is wrong
    /// (the server answers 400 with param "response_format").
    pub fn compile(
        &self,
        format: &ResponseFormat,
    ) -> Result<Box<dyn TokenConstraint>, GrammarError> {
        let mut schema = match format {
            ResponseFormat::JsonObject => serde_json::json!({ "type": "object" }),
            ResponseFormat::JsonSchema(schema) => schema.clone(),
        };
        let serde_json::Value::Object(fields) = &mut schema else {
            return Err(GrammarError::InvalidSchema(format!(
                "the JSON schema must be a JSON object, got {}",
                json_kind(&schema)
            )));
        };
        fields
            .entry(LLGUIDANCE_OPTIONS)
            .or_insert_with(|| serde_json::json!({ "whitespace_pattern": WHITESPACE_PATTERN }));
        let parser = self
            .factory
            .create_parser(TopLevelGrammar::from_json_schema(schema))
            .map_err(|e| GrammarError::InvalidSchema(format!("{e:#}")))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(message) = matcher.get_error() {
            return Err(GrammarError::InvalidSchema(message));
        }
        Ok(Box::new(LlgConstraint {
            matcher,
            tok_env: self.factory.tok_env().clone(),
            vocab_size: self.vocab_size,
            eos_token_ids: Arc::clone(&self.eos_token_ids),
            mask: None,
            eos_committed: false,
        }))
    }
}

/// A per-request state machine over tokens.
pub trait TokenConstraint: Send + fmt::Debug {
    /// Which tokens may come next: `allowed[i]` for token i (length = vocab size the compiler
    /// was built with). The eos tokens are allowed exactly when the output so far is complete;
    /// once [`is_finished`](Self::is_finished), only they are.
    fn allowed(&mut self) -> Result<Vec<bool>, GrammarError>;
    /// Advances past the sampled token (which the engine took from the allowed set). Error if
    /// not allowed; the constraint is then unchanged.
    fn commit(&mut self, token: u32) -> Result<(), GrammarError>;
    /// True when nothing more may be generated (the engine then stops with finish_reason
    /// "stop"): the grammar admits no continuation, or an eos token was committed.
    fn is_finished(&self) -> bool;
}

/// llguidance's matcher plus the mask of the current state, kept so that `commit` can check
/// the token without computing the mask again.
struct LlgConstraint {
    matcher: Matcher,
    tok_env: TokEnv,
    vocab_size: usize,
    eos_token_ids: Arc<[u32]>,
    mask: Option<SimpleVob>,
    eos_committed: bool,
}

impl fmt::Debug for LlgConstraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LlgConstraint")
            .field("vocab_size", &self.vocab_size)
            .field("stop_reason", &self.matcher.stop_reason())
            .field("eos_committed", &self.eos_committed)
            .finish_non_exhaustive()
    }
}

impl LlgConstraint {
    /// The mask of the current state, computed at most once per state.
    fn current_mask(&mut self) -> Result<&SimpleVob, GrammarError> {
        let mask = match self.mask.take() {
            Some(mask) => mask,
            None => self.compute_mask()?,
        };
        Ok(self.mask.insert(mask))
    }

    fn compute_mask(&mut self) -> Result<SimpleVob, GrammarError> {
        if self.is_finished() {
            return Ok(self.tok_env.tok_trie().eos_token_set());
        }
        let mask = self
            .matcher
            .compute_mask()
            .map_err(|e| GrammarError::Matcher(format!("{e:#}")))?;
        if mask.is_zero() {
            return Err(GrammarError::DeadEnd);
        }
        Ok(mask)
    }
}

impl TokenConstraint for LlgConstraint {
    fn allowed(&mut self) -> Result<Vec<bool>, GrammarError> {
        let mut allowed = vec![false; self.vocab_size];
        self.current_mask()?.iter_set_entries(|id| {
            if let Some(slot) = allowed.get_mut(id) {
                *slot = true;
            }
        });
        Ok(allowed)
    }

    fn commit(&mut self, token: u32) -> Result<(), GrammarError> {
        if token as usize >= self.vocab_size {
            return Err(GrammarError::TokenOutOfRange {
                token,
                vocab_size: self.vocab_size,
            });
        }
        if !self.current_mask()?.is_allowed(token) {
            return Err(GrammarError::TokenNotAllowed {
                token,
                text: self.tok_env.tok_trie().token_dbg(token),
            });
        }
        self.mask = None;
        if self.eos_token_ids.contains(&token) {
            // Allowed, so the output is complete: nothing to feed the matcher.
            self.eos_committed = true;
            return Ok(());
        }
        self.matcher
            .consume_token(token)
            .map_err(|e| GrammarError::Matcher(format!("{e:#}")))
    }

    fn is_finished(&self) -> bool {
        self.eos_committed
            || matches!(
                self.matcher.stop_reason(),
                StopReason::NoExtension | StopReason::NoExtensionBias | StopReason::EndOfSentence
            )
    }
}

/// How the tokenizer writes bytes as token strings, read off its decoder.
#[derive(Debug, Clone, PartialEq)]
enum VocabScheme {
    /// GPT-2 byte-level BPE: every byte is one printable character.
    ByteLevel(HashMap<char, u8>),
    /// SentencePiece style: `space` stands for ' ', and with `byte_fallback` `<0xHH>` for byte HH.
    SentencePiece { space: char, byte_fallback: bool },
}

impl VocabScheme {
    /// Reads the scheme from the (serialized) decoder of `tokenizer.json`.
    fn detect(decoder: &serde_json::Value) -> Result<Self, String> {
        #[derive(Default)]
        struct Seen {
            byte_level: bool,
            space: Option<char>,
            byte_fallback: bool,
            types: Vec<String>,
        }
        fn visit(decoder: &serde_json::Value, seen: &mut Seen) {
            let single_char = |value: Option<&str>| {
                let mut chars = value?.chars();
                let c = chars.next()?;
                chars.next().is_none().then_some(c)
            };
            let kind = decoder["type"].as_str().unwrap_or("?");
            seen.types.push(kind.to_owned());
            match kind {
                "ByteLevel" => seen.byte_level = true,
                "ByteFallback" => seen.byte_fallback = true,
                "Metaspace" => {
                    seen.space = single_char(decoder["replacement"].as_str()).or(seen.space);
                }
                "Replace" if decoder["content"].as_str() == Some(" ") => {
                    seen.space = single_char(decoder["pattern"]["String"].as_str()).or(seen.space);
                }
                "Sequence" => {
                    for inner in decoder["decoders"].as_array().into_iter().flatten() {
                        visit(inner, seen);
                    }
                }
                _ => {}
            }
        }
        let mut seen = Seen::default();
        visit(decoder, &mut seen);
        if seen.byte_level {
            Ok(Self::ByteLevel(byte_level_char_map()))
        } else if seen.space.is_some() || seen.byte_fallback {
            Ok(Self::SentencePiece {
                space: seen.space.unwrap_or(SENTENCEPIECE_SPACE),
                byte_fallback: seen.byte_fallback,
            })
        } else {
            Err(format!(
                "its decoder ({}) is neither byte-level BPE nor SentencePiece style (Metaspace, Replace \"▁\", ByteFallback), so the raw bytes of its tokens are unknown",
                seen.types.join(", ")
            ))
        }
    }

    /// The bytes a vocabulary piece (not an added token) decodes to.
    fn piece_bytes(&self, piece: &str) -> Vec<u8> {
        match self {
            Self::ByteLevel(map) => {
                let mut bytes = Vec::with_capacity(piece.len());
                for c in piece.chars() {
                    match map.get(&c) {
                        Some(&byte) => bytes.push(byte),
                        // Not a byte-level character (a stray piece): keep its UTF-8.
                        None => bytes.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                    }
                }
                bytes
            }
            Self::SentencePiece {
                space,
                byte_fallback,
            } => match byte_fallback_byte(piece) {
                Some(byte) if *byte_fallback => vec![byte],
                _ => piece.replace(*space, " ").into_bytes(),
            },
        }
    }
}

/// GPT-2's byte-level alphabet, reversed: printable Latin-1 bytes stand for themselves, the
/// other 68 bytes (controls, space, DEL, NBSP, soft hyphen) for U+0100 onwards in byte order.
fn byte_level_char_map() -> HashMap<char, u8> {
    let mut map = HashMap::with_capacity(256);
    let mut next_shifted = 0x100_u32;
    for byte in 0..=u8::MAX {
        let printable = matches!(byte, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let c = if printable {
            Some(char::from(byte))
        } else {
            next_shifted += 1;
            char::from_u32(next_shifted - 1)
        };
        if let Some(c) = c {
            map.insert(c, byte);
        }
    }
    map
}

/// `<0x0A>` -> 0x0A.
fn byte_fallback_byte(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// Bytes and special flags of every token id of `tokenizer` (holes in the id space are empty,
/// i.e. never allowed).
fn token_table(tokenizer: &tokenizers::Tokenizer) -> Result<(Vec<Vec<u8>>, Vec<bool>), String> {
    let decoder = tokenizer
        .get_decoder()
        .ok_or("it has no decoder, so the raw bytes of its tokens are unknown")?;
    let decoder = serde_json::to_value(decoder).map_err(|e| e.to_string())?;
    let scheme = VocabScheme::detect(&decoder)?;
    let vocab = tokenizer.get_vocab(true);
    let added = tokenizer.get_added_tokens_decoder();
    let size = vocab
        .values()
        .chain(added.keys())
        .map(|&id| id as usize + 1)
        .max()
        .unwrap_or(0)
        .max(tokenizer.get_vocab_size(true));
    let mut bytes = vec![Vec::new(); size];
    let mut special = vec![false; size];
    for (piece, &id) in &vocab {
        if !added.contains_key(&id) {
            bytes[id as usize] = scheme.piece_bytes(piece);
        }
    }
    for (&id, token) in &added {
        bytes[id as usize] = token.content.as_bytes().to_vec();
        special[id as usize] = token.special;
    }
    Ok((bytes, special))
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use anyhow::{Context, bail, ensure};
    use rand::{Rng, SeedableRng, rngs::StdRng};
    use serde_json::{Value, json};

    use super::*;

    fn repo_path(relative: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(relative)
    }

    /// A tokenizer, the compiler built from it and the table the compiler saw.
    struct Vocab {
        tokenizer: oxtune_models::Tokenizer,
        compiler: GrammarCompiler,
        table: Vec<Vec<u8>>,
        eos: Vec<u32>,
    }

    impl Vocab {
        fn load(dir: &Path, eos_names: &[&str]) -> anyhow::Result<Self> {
            let tokenizer = oxtune_models::Tokenizer::load(dir)?;
            let eos = eos_names
                .iter()
                .map(|name| tokenizer.token_to_id(name).context(name.to_string()))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let compiler = GrammarCompiler::from_tokenizer(&tokenizer, &eos)?;
            let inner = tokenizers::Tokenizer::from_file(tokenizer.path())
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let (table, _) = token_table(&inner).map_err(anyhow::Error::msg)?;
            ensure!(table.len() == compiler.vocab_size());
            Ok(Self {
                tokenizer,
                compiler,
                table,
                eos,
            })
        }

        fn fixture() -> anyhow::Result<Self> {
            Self::load(
                &repo_path("tests/fixtures/tokenizer"),
                &["<|endoftext|>", "<|im_end|>"],
            )
        }

        fn id(&self, piece: &str) -> anyhow::Result<u32> {
            self.tokenizer.token_to_id(piece).context(piece.to_owned())
        }

        /// The text of non-eos `tokens`, from the table.
        fn bytes(&self, tokens: &[u32]) -> Vec<u8> {
            tokens
                .iter()
                .filter(|t| !self.eos.contains(t))
                .flat_map(|&t| self.table[t as usize].iter().copied())
                .collect()
        }
    }

    /// How the pseudo-model picks among the allowed tokens while it explores.
    #[derive(Debug, Clone, Copy)]
    enum Policy {
        /// Uniformly at random.
        Random,
        /// The longest allowed token (random among ties): stresses multi-byte tokens.
        Longest,
        /// Random among allowed tokens without letters (brackets, commas, digits, escapes,
        /// whitespace), when there are any: nests arrays and objects, writes numbers and
        /// escapes.
        Punctuation,
    }

    /// An adversarial pseudo-model: `explore` steps of `policy`, then it winds down by
    /// preferring eos, then tokens that close things (`"` `}` `]` `0` `:` `,`, in that order: `"`
    /// first ends an open string, or opens one that the next `"` ends), else `policy`.
    /// At every step it checks that eos is allowed exactly when `complete(text)` holds, and
    /// once finished that only eos is allowed. Returns the tokens.
    fn walk(
        vocab: &Vocab,
        format: &ResponseFormat,
        seed: u64,
        policy: Policy,
        explore: usize,
        complete: &dyn Fn(&[u8]) -> bool,
    ) -> anyhow::Result<Vec<u32>> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut constraint = vocab.compiler.compile(format)?;
        let mut tokens = Vec::new();
        for step in 0..explore + 400 {
            let allowed = constraint.allowed()?;
            ensure!(allowed.len() == vocab.table.len());
            let text = vocab.bytes(&tokens);
            let shown = String::from_utf8_lossy(&text);
            let eos_allowed = vocab.eos.iter().any(|&e| allowed[e as usize]);
            ensure!(
                eos_allowed == complete(&text),
                "seed {seed}: eos allowed = {eos_allowed} after {shown:?}"
            );
            let ids: Vec<u32> = (0u32..)
                .zip(&allowed)
                .filter(|(_, a)| **a)
                .map(|(i, _)| i)
                .collect();
            if constraint.is_finished() {
                ensure!(
                    ids.iter().all(|t| vocab.eos.contains(t)),
                    "seed {seed}: finished after {shown:?} but non-eos tokens allowed"
                );
                return Ok(tokens);
            }
            ensure!(
                !ids.is_empty(),
                "seed {seed}: nothing allowed after {shown:?}"
            );
            let pick_any = |rng: &mut StdRng, ids: &[u32]| ids[rng.random_range(0..ids.len())];
            let mut token = None;
            if step >= explore {
                token = ids.iter().copied().find(|t| vocab.eos.contains(t));
                for want in [&b"\""[..], b"}", b"]", b"0", b":", b","] {
                    if token.is_some() {
                        break;
                    }
                    let closing: Vec<u32> = ids
                        .iter()
                        .copied()
                        .filter(|&t| vocab.table[t as usize].trim_ascii() == want)
                        .collect();
                    if !closing.is_empty() {
                        token = Some(pick_any(&mut rng, &closing));
                    }
                }
            }
            let token = match (token, policy) {
                (Some(token), _) => token,
                (None, Policy::Random) => pick_any(&mut rng, &ids),
                (None, Policy::Punctuation) => {
                    let punctuation: Vec<u32> = ids
                        .iter()
                        .copied()
                        .filter(|&t| {
                            let bytes = &vocab.table[t as usize];
                            !bytes.is_empty()
                                && bytes
                                    .iter()
                                    .all(|b| !b.is_ascii_alphabetic() && b.is_ascii())
                        })
                        .collect();
                    pick_any(
                        &mut rng,
                        if punctuation.is_empty() {
                            &ids
                        } else {
                            &punctuation
                        },
                    )
                }
                (None, Policy::Longest) => {
                    let longest = ids.iter().map(|&t| vocab.table[t as usize].len()).max();
                    let longest: Vec<u32> = ids
                        .iter()
                        .copied()
                        .filter(|&t| Some(vocab.table[t as usize].len()) == longest)
                        .collect();
                    pick_any(&mut rng, &longest)
                }
            };
            constraint.commit(token)?;
            tokens.push(token);
            if vocab.eos.contains(&token) {
                ensure!(
                    constraint.is_finished(),
                    "seed {seed}: eos committed but not finished"
                );
            }
        }
        bail!(
            "seed {seed}: no end after {} steps: {:?}",
            explore + 400,
            String::from_utf8_lossy(&vocab.bytes(&tokens))
        )
    }

    /// Syntactically valid JSON (UTF-8, numbers of any size) whose value is an object.
    fn is_json_object(text: &[u8]) -> bool {
        std::str::from_utf8(text).is_ok_and(|t| t.trim_start().starts_with('{'))
            && serde_json::from_slice::<serde::de::IgnoredAny>(text).is_ok()
    }

    fn person_schema() -> Value {
        json!({
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
            "required": ["name", "age"],
            "additionalProperties": false
        })
    }

    /// The person schema, checked by hand.
    fn is_person(text: &[u8]) -> bool {
        let Ok(Value::Object(object)) = serde_json::from_slice::<Value>(text) else {
            return false;
        };
        // JSON Schema's "integer": a number with no fractional part (`-0` and integers too
        // large for i64, which serde_json reads as f64, included).
        let integer = |v: &Value| v.as_f64().is_some_and(|f| f.fract() == 0.0);
        object.len() == 2
            && object.get("name").is_some_and(Value::is_string)
            && object.get("age").is_some_and(integer)
    }

    /// Walks many seeds of both policies; returns the decoded outputs.
    fn walks(
        vocab: &Vocab,
        format: &ResponseFormat,
        seeds: u64,
        explore: usize,
        complete: &dyn Fn(&[u8]) -> bool,
    ) -> anyhow::Result<Vec<String>> {
        let mut texts = Vec::new();
        for seed in 0..seeds {
            for policy in [Policy::Random, Policy::Longest, Policy::Punctuation] {
                let tokens = walk(vocab, format, seed, policy, explore, complete)?;
                let text = String::from_utf8(vocab.bytes(&tokens))?;
                ensure!(
                    complete(text.as_bytes()),
                    "seed {seed} {policy:?}: {text:?}"
                );
                // The table agrees with the tokenizer's own decoding.
                let decoded = vocab.tokenizer.decode(&tokens, true)?;
                ensure!(
                    decoded.trim_start() == text.trim_start(),
                    "table text {text:?} but tokenizer decodes {decoded:?}"
                );
                texts.push(text);
            }
        }
        Ok(texts)
    }

    #[test]
    fn fixture_table_matches_the_tokenizer() -> anyhow::Result<()> {
        let vocab = Vocab::fixture()?;
        let inner = tokenizers::Tokenizer::from_file(vocab.tokenizer.path())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let (table, special) = token_table(&inner).map_err(anyhow::Error::msg)?;
        for name in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] {
            let id = vocab.id(name)? as usize;
            assert!(special[id], "{name} is special");
            assert_eq!(table[id], name.as_bytes());
        }
        assert!(!special[vocab.id("{")? as usize]);
        for text in [
            "{\"name\": \"Ada\", \"age\": 36}\n",
            "héllo\tworld 世界 🙂\r\n  x",
        ] {
            let ids = vocab.tokenizer.encode(text, false)?;
            assert_eq!(vocab.bytes(&ids), text.as_bytes(), "{text:?}");
        }
        Ok(())
    }

    #[test]
    fn json_object_walks_parse() -> anyhow::Result<()> {
        let vocab = Vocab::fixture()?;
        let texts = walks(&vocab, &ResponseFormat::JsonObject, 60, 40, &is_json_object)?;
        // The walks explore: some outputs hold more than `{}`.
        assert!(
            texts.iter().filter(|t| t.len() > 8).count() > texts.len() / 2,
            "{texts:?}"
        );
        Ok(())
    }

    #[test]
    fn json_schema_walks_validate() -> anyhow::Result<()> {
        let vocab = Vocab::fixture()?;
        let format = ResponseFormat::JsonSchema(person_schema());
        let texts = walks(&vocab, &format, 60, 40, &is_person)?;
        assert!(texts.iter().all(|t| is_person(t.as_bytes())));
        Ok(())
    }

    #[test]
    fn demo_model_walks() -> anyhow::Result<()> {
        let dir = repo_path("models/SmolLM2-135M-Instruct");
        if !dir.join("tokenizer.json").is_file() {
            #[expect(clippy::print_stderr, reason = "tell why the test did nothing")]
            {
                eprintln!(
                    "skipped: {} is missing (scripts/fetch-demo-model.sh)",
                    dir.display()
                );
            }
            return Ok(());
        }
        let vocab = Vocab::load(&dir, &["<|im_end|>", "<|endoftext|>"])?;
        for text in ["{\"name\": \"Zoë\", \"age\": 7}", "héllo\n\n  世界 🙂"] {
            let ids = vocab.tokenizer.encode(text, false)?;
            assert_eq!(vocab.bytes(&ids), text.as_bytes(), "{text:?}");
        }
        walks(&vocab, &ResponseFormat::JsonObject, 4, 30, &is_json_object)?;
        walks(
            &vocab,
            &ResponseFormat::JsonSchema(person_schema()),
            4,
            30,
            &is_person,
        )?;
        Ok(())
    }

    #[test]
    fn invalid_schemas_are_errors() -> anyhow::Result<()> {
        let vocab = Vocab::fixture()?;
        for (schema, names) in [
            (json!({"type": 12}), "type"),
            (json!("object"), "JSON object"),
            (
                json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}),
                "missing",
            ),
        ] {
            match vocab
                .compiler
                .compile(&ResponseFormat::JsonSchema(schema.clone()))
            {
                Err(error @ GrammarError::InvalidSchema(_)) => {
                    let message = error.to_string();
                    assert!(message.contains(names), "{schema}: {message}");
                }
                other => panic!("{schema}: expected InvalidSchema, got {other:?}"),
            }
        }
        Ok(())
    }

    #[test]
    fn disallowed_tokens_are_errors_and_change_nothing() -> anyhow::Result<()> {
        let vocab = Vocab::fixture()?;
        let mut constraint = vocab.compiler.compile(&ResponseFormat::JsonObject)?;
        let allowed = constraint.allowed()?;
        let (brace, letter) = (vocab.id("{")?, vocab.id("a")?);
        assert!(allowed[brace as usize] && !allowed[letter as usize]);
        assert!(
            vocab.eos.iter().all(|&e| !allowed[e as usize]),
            "empty output is incomplete"
        );
        assert!(matches!(
            constraint.commit(letter),
            Err(GrammarError::TokenNotAllowed { token, .. }) if token == letter
        ));
        assert!(matches!(
            constraint.commit(vocab.eos[0]),
            Err(GrammarError::TokenNotAllowed { .. })
        ));
        let out_of_range = u32::try_from(vocab.table.len())?;
        assert!(matches!(
            constraint.commit(out_of_range),
            Err(GrammarError::TokenOutOfRange { .. })
        ));
        // Still usable, and still at the start.
        assert_eq!(constraint.allowed()?, allowed);
        for piece in ["{", "}"] {
            constraint.commit(vocab.id(piece)?)?;
        }
        assert!(constraint.is_finished());
        assert!(constraint.commit(brace).is_err());
        constraint.commit(vocab.eos[1])?;
        Ok(())
    }

    #[test]
    fn whitespace_between_tokens_is_bounded() -> anyhow::Result<()> {
        let vocab = Vocab::fixture()?;
        let (brace, newline, space) = (vocab.id("{")?, vocab.id("Ċ")?, vocab.id("Ġ")?);
        assert_eq!(vocab.table[newline as usize], b"\n");
        let after_newline = |format: ResponseFormat| -> anyhow::Result<Vec<bool>> {
            let mut constraint = vocab.compiler.compile(&format)?;
            constraint.commit(brace)?;
            constraint.commit(newline)?;
            Ok(constraint.allowed()?)
        };
        let allowed = after_newline(ResponseFormat::JsonObject)?;
        assert!(
            allowed[space as usize] && !allowed[newline as usize],
            "one line break per gap"
        );
        // 64 spaces of indentation, not 65.
        let mut constraint = vocab.compiler.compile(&ResponseFormat::JsonObject)?;
        constraint.commit(brace)?;
        for _ in 0..64 {
            constraint.commit(space)?;
        }
        assert!(!constraint.allowed()?[space as usize]);
        // A schema's own llguidance options win.
        let flexible = json!({"type": "object", "x-guidance": {"whitespace_flexible": true}});
        assert!(after_newline(ResponseFormat::JsonSchema(flexible))?[newline as usize]);
        Ok(())
    }

    #[test]
    fn new_rejects_bad_tables() {
        let table = || vec![b"a".to_vec(), b"{".to_vec(), b"<eos>".to_vec()];
        let cases = [
            GrammarCompiler::new(Vec::new(), Vec::new(), &[0]),
            GrammarCompiler::new(table(), vec![false; 2], &[2]),
            GrammarCompiler::new(table(), vec![false; 3], &[]),
            GrammarCompiler::new(table(), vec![false; 3], &[3]),
            GrammarCompiler::new(vec![vec![b' '; 2000]], vec![false], &[0]),
        ];
        for case in cases {
            assert!(matches!(case, Err(GrammarError::Vocabulary(_))), "{case:?}");
        }
        assert!(GrammarCompiler::new(table(), vec![false; 3], &[2]).is_ok());
    }

    #[test]
    fn compiler_is_shareable_and_constraints_sendable() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>() {}
        send_sync::<GrammarCompiler>();
        send::<Box<dyn TokenConstraint>>();
    }

    /// A Llama-style SentencePiece `tokenizer.json`: "▁" pieces, `<0xHH>` byte fallback.
    fn sentencepiece_tokenizer(dir: &Path) -> anyhow::Result<()> {
        let mut vocab = serde_json::Map::new();
        for (id, piece) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
            vocab.insert((*piece).into(), json!(id));
        }
        for byte in 0..=255u8 {
            vocab.insert(format!("<0x{byte:02X}>"), json!(vocab.len()));
        }
        let pieces = "▁ { } [ ] \" : , 0 1 2 7 - . a b e l n m g r s t u f ▁{ ▁\" \": \", ▁▁ name age ▁0 null true";
        for piece in pieces.split(' ') {
            vocab.insert(piece.into(), json!(vocab.len()));
        }
        let added: Vec<Value> = ["<unk>", "<s>", "</s>"]
            .iter()
            .enumerate()
            .map(|(id, content)| {
                json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let tokenizer = json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": added,
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
            "pre_tokenizer": null, "post_processor": null,
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
            "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>",
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                      "vocab": vocab, "merges": []}
        });
        std::fs::write(dir.join("tokenizer.json"), serde_json::to_vec(&tokenizer)?)?;
        Ok(())
    }

    #[test]
    fn sentencepiece_vocabulary() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        sentencepiece_tokenizer(dir.path())?;
        let vocab = Vocab::load(dir.path(), &["</s>"])?;
        assert_eq!(vocab.table[vocab.id("<0x0A>")? as usize], b"\n");
        assert_eq!(vocab.table[vocab.id("▁{")? as usize], b" {");
        assert_eq!(vocab.table[vocab.id("</s>")? as usize], b"</s>");
        // "é" is not a piece: it falls back to its two UTF-8 bytes.
        let text = "{\"name\": \"é\"}";
        let ids = vocab.tokenizer.encode(text, false)?;
        assert_eq!(vocab.bytes(&ids), format!(" {text}").as_bytes());
        walks(
            &vocab,
            &ResponseFormat::JsonSchema(person_schema()),
            20,
            30,
            &is_person,
        )?;
        Ok(())
    }
}

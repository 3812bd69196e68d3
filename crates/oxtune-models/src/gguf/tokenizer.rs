//! Rebuilding a Hugging Face `tokenizer.json` from the `tokenizer.ggml.*` metadata of a
//! GGUF file, plus the `tokenizer_config.json` values (special-token strings, `add_bos_token`,
//! chat template) that go with it.
//!
//! Two vocabulary kinds are supported, as llama.cpp names them in `tokenizer.ggml.model`:
//!
//! - `gpt2`: byte-level BPE (Llama 3, SmolLM, Qwen2/3, Mistral Nemo…). Tokens and merges are
//!   stored as they are in tokenizer.json; what is lost is the pre-tokenizer, which llama.cpp
//!   reduces to a name in `tokenizer.ggml.pre`. [`PreTokenizer`] maps each supported name back to
//!   the regular expressions llama.cpp splits text with (`llama-vocab.cpp`), written the way
//!   the original tokenizer.json wrote them where that is known.
//! - `llama`: SentencePiece (Llama 2, Mistral 7B, TinyLlama…). GGUF keeps pieces, scores and
//!   types but no merges. As transformers' GGUF converter does, merges are rebuilt from the
//!   scores: every split of a piece into two pieces of the vocabulary is a merge, ranked by the
//!   piece's score. A BPE with those merges and byte fallback reproduces SentencePiece's
//!   "merge the best-scoring pair first" encoding; `▁` stands for spaces and a `▁` is
//!   prepended to the text (`tokenizer.ggml.add_space_prefix`, default on).
//!
//! Token types (`tokenizer.ggml.token_type`): CONTROL (3) and UNKNOWN (2) tokens become special
//! added tokens, USER_DEFINED (4) tokens non-special added tokens, so all of them match as
//! whole strings before BPE runs, as they do in llama.cpp.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{Value as Json, json};

use super::GgufError;
use super::metadata::Metadata;

/// llama.cpp's token types (`llama_token_type`).
const TOKEN_TYPE_UNKNOWN: i64 = 2;
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// SentencePiece's stand-in for a space.
const SPIECE_UNDERLINE: &str = "\u{2581}";

/// GPT-2's split: contractions, letters, numbers, other symbols, spaces. HF's `ByteLevel`
/// pre-tokenizer with `use_regex: true` has it built in; a test checks the two agree.
#[cfg(test)]
const GPT2_REGEX: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Llama 3's split (also DBRX, Smaug, Falcon 3): numbers in groups of at most three.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split (also Qwen3, DeepSeek-R1-Distill-Qwen): single digits.
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Mistral's Tekken split: words split at lower-to-upper case changes, single digits.
const TEKKEN_REGEX: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// llama.cpp's `default` pre-tokenizer: four splits applied one after the other.
const DEFAULT_REGEXES: [&str; 4] = [
    r"[\p{P}\$\+<=>\^~\|]+",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
    r"\p{N}+",
    r"[0-9][0-9][0-9]",
];

/// How byte-level BPE text is split before merges, by `tokenizer.ggml.pre`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreTokenizer {
    /// llama.cpp's fallback for files without `tokenizer.ggml.pre` (four regexes).
    Default,
    /// GPT-2's regex (`gpt-2`, `phi-2`, `mpt`, `olmo`, `jais`…).
    Gpt2,
    /// Digits one by one, then GPT-2's regex (`smollm`, `starcoder`, `refact`, `command-r`…).
    SmolLm,
    /// Llama 3's regex with `ignore_merges` (`llama-bpe`, `llama3`, `falcon3`, `pixtral`…).
    Llama3,
    /// Llama 3's regex without `ignore_merges` (`dbrx`, `smaug-bpe`).
    Llama3Regex,
    /// Qwen2's regex and NFC normalisation (`qwen2`, `deepseek-r1-qwen`, `megrez`).
    Qwen2,
    /// Mistral's Tekken regex with `ignore_merges` (`tekken`).
    Tekken,
}

/// The `tokenizer.ggml.pre` names oxtune understands, for error messages.
pub const SUPPORTED_PRE_TOKENIZERS: &str = "default, gpt-2, phi-2, mpt, olmo, jais, smollm, starcoder, refact, command-r, codeshell, exaone, minerva-7b, llama-bpe, llama3, llama-v3, falcon3, falcon-h1, pixtral, midm-2.0, lfm2, dbrx, smaug-bpe, qwen2, deepseek-r1-qwen, megrez, kormo, tekken";

impl PreTokenizer {
    /// The pre-tokenizer for a `tokenizer.ggml.pre` name, grouped as llama.cpp groups them.
    pub fn from_gguf(name: &str) -> Option<Self> {
        Some(match name {
            "default" => Self::Default,
            "gpt-2" | "gpt2" | "phi-2" | "mpt" | "olmo" | "jais" | "jina-es" | "jina-de"
            | "jina-v2-es" | "jina-v2-de" | "gigachat" | "a.x-4.0" | "mellum" | "exaone4"
            | "trillion" | "granite-docling" => Self::Gpt2,
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone"
            | "minerva-7b" => Self::SmolLm,
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral"
            | "midm-2.0" | "lfm2" => Self::Llama3,
            "dbrx" | "smaug-bpe" => Self::Llama3Regex,
            "qwen2" | "deepseek-r1-qwen" | "megrez" | "kormo" => Self::Qwen2,
            "tekken" => Self::Tekken,
            _ => return None,
        })
    }

    /// llama.cpp's `add_bos` default when the file does not say.
    fn adds_bos_by_default(self) -> bool {
        matches!(self, Self::Llama3 | Self::Tekken)
    }

    /// Whether a word found whole in the vocabulary skips the merges (HF `ignore_merges`).
    fn ignores_merges(self) -> bool {
        matches!(self, Self::Llama3 | Self::Tekken)
    }

    fn normalizer(self) -> Json {
        match self {
            Self::Qwen2 => json!({"type": "NFC"}),
            _ => Json::Null,
        }
    }

    fn pre_tokenizer(self) -> Json {
        let split = |regex: &str| json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false});
        let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
        let sequence = |items: Vec<Json>| json!({"type": "Sequence", "pretokenizers": items});
        match self {
            Self::Default => {
                let mut items: Vec<Json> = DEFAULT_REGEXES.iter().map(|r| split(r)).collect();
                items.push(byte_level(false));
                sequence(items)
            }
            // HF's ByteLevel regex is GPT-2's.
            Self::Gpt2 => byte_level(true),
            Self::SmolLm => sequence(vec![
                json!({"type": "Digits", "individual_digits": true}),
                byte_level(true),
            ]),
            Self::Llama3 | Self::Llama3Regex => {
                sequence(vec![split(LLAMA3_REGEX), byte_level(false)])
            }
            Self::Qwen2 => sequence(vec![split(QWEN2_REGEX), byte_level(false)]),
            Self::Tekken => sequence(vec![split(TEKKEN_REGEX), byte_level(false)]),
        }
    }
}

/// The vocabulary kind of `tokenizer.ggml.model`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VocabKind {
    /// `gpt2`: byte-level BPE with merges.
    ByteLevelBpe(PreTokenizer),
    /// `llama`: SentencePiece pieces with scores.
    SentencePiece,
}

/// A tokenizer rebuilt from GGUF metadata.
#[derive(Debug, Clone)]
pub struct GgufTokenizer {
    /// The tokenizer, as `tokenizer.json` will hold it.
    pub tokenizer: tokenizers::Tokenizer,
    /// The contents of `tokenizer_config.json`.
    pub tokenizer_config: Json,
    pub kind: VocabKind,
    /// Number of tokens in `tokenizer.ggml.tokens`.
    pub num_tokens: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    /// Ids that end a reply: EOS, then EOT and EOM where the file names them (generation_config.json).
    pub stop_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub add_bos_token: bool,
}

impl GgufTokenizer {
    /// `tokenizer.json` text, as the `tokenizers` crate serialises it.
    pub fn to_json(&self) -> Result<String, GgufError> {
        self.tokenizer
            .to_string(false)
            .map_err(|e| GgufError::Internal(format!("serialising tokenizer.json: {e}")))
    }

    /// A one-line description, e.g. `byte-level BPE (pre-tokenizer smollm), 49152 tokens`.
    pub fn describe(&self) -> String {
        match self.kind {
            VocabKind::ByteLevelBpe(pre) => format!(
                "byte-level BPE ({pre:?} pre-tokenizer), {} tokens",
                self.num_tokens
            ),
            VocabKind::SentencePiece => format!(
                "SentencePiece BPE with byte fallback, {} tokens",
                self.num_tokens
            ),
        }
    }
}

/// Reads only the tokenizer of a GGUF file (no tensor data is read).
pub fn read_tokenizer(gguf_path: &Path) -> Result<GgufTokenizer, GgufError> {
    let content = super::read_content(gguf_path)?;
    let metadata = Metadata::new(gguf_path, &content.metadata);
    let context = super::hf_config::context_length(&metadata)?;
    from_metadata(&metadata, context)
}

/// Rebuilds the tokenizer from `tokenizer.ggml.*` metadata.
pub(crate) fn from_metadata(
    meta: &Metadata<'_>,
    model_max_length: Option<usize>,
) -> Result<GgufTokenizer, GgufError> {
    let path = meta.path;
    let tokenizer_error = |message: String, hint: &str| GgufError::Tokenizer {
        path: path.to_path_buf(),
        message,
        hint: hint.to_owned(),
    };
    let model = meta.string("tokenizer.ggml.model")?.ok_or_else(|| {
        meta.missing(
            "tokenizer.ggml.model",
            "the file has no tokenizer; oxtune needs one to build tokenizer.json",
        )
    })?;
    let tokens = meta.string_array("tokenizer.ggml.tokens")?.ok_or_else(|| {
        meta.missing(
            "tokenizer.ggml.tokens",
            "the file has no vocabulary; oxtune needs one to build tokenizer.json",
        )
    })?;
    let tokens = unique_tokens(&tokens).map_err(|message| {
        tokenizer_error(
            message,
            "llama.cpp refuses such a vocabulary too; the file was written by a broken converter",
        )
    })?;
    let token_types = meta.i64_array("tokenizer.ggml.token_type")?;
    if let Some(types) = &token_types
        && types.len() != tokens.len()
    {
        return Err(tokenizer_error(
            format!(
                "tokenizer.ggml.token_type has {} entries for {} tokens",
                types.len(),
                tokens.len()
            ),
            "the file is inconsistent; convert the model again with llama.cpp's convert_hf_to_gguf.py",
        ));
    }

    let kind = match model {
        "gpt2" => {
            let pre_name = meta.string("tokenizer.ggml.pre")?.unwrap_or("default");
            let pre = PreTokenizer::from_gguf(pre_name).ok_or_else(|| {
                tokenizer_error(
                    format!("pre-tokenizer `{pre_name}` (tokenizer.ggml.pre) is not supported"),
                    &format!("supported pre-tokenizers: {SUPPORTED_PRE_TOKENIZERS}"),
                )
            })?;
            VocabKind::ByteLevelBpe(pre)
        }
        "llama" => VocabKind::SentencePiece,
        other => {
            return Err(tokenizer_error(
                format!("tokenizer model `{other}` (tokenizer.ggml.model) is not supported"),
                "supported: gpt2 (byte-level BPE) and llama (SentencePiece)",
            ));
        }
    };

    let token_id = |key: &str| -> Result<Option<u32>, GgufError> {
        match meta.token_id(key)? {
            Some(id) if usize::try_from(id).is_ok_and(|i| i < tokens.len()) => Ok(Some(id)),
            Some(id) => Err(GgufError::InvalidMetadata {
                path: path.to_path_buf(),
                key: key.to_owned(),
                message: format!(
                    "token id {id} is outside the vocabulary of {} tokens",
                    tokens.len()
                ),
            }),
            None => Ok(None),
        }
    };
    let bos = token_id("tokenizer.ggml.bos_token_id")?;
    let eos = token_id("tokenizer.ggml.eos_token_id")?;
    let unk = token_id("tokenizer.ggml.unknown_token_id")?;
    let pad = token_id("tokenizer.ggml.padding_token_id")?;
    let eot = token_id("tokenizer.ggml.eot_token_id")?;
    let eom = token_id("tokenizer.ggml.eom_token_id")?;
    let add_bos = meta
        .bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(match kind {
            VocabKind::ByteLevelBpe(pre) => pre.adds_bos_by_default(),
            VocabKind::SentencePiece => true,
        });
    let add_eos = meta.bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let token_str = |id: Option<u32>| {
        id.and_then(|i| usize::try_from(i).ok())
            .and_then(|i| tokens.get(i))
            .cloned()
    };
    if add_bos && bos.is_none() {
        return Err(meta.missing(
            "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.add_bos_token is set, so the BOS token must be named",
        ));
    }
    if add_eos && eos.is_none() {
        return Err(meta.missing(
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.add_eos_token is set, so the EOS token must be named",
        ));
    }

    let model_json = match kind {
        VocabKind::ByteLevelBpe(pre) => {
            let merges = meta.string_array("tokenizer.ggml.merges")?.ok_or_else(|| {
                meta.missing(
                    "tokenizer.ggml.merges",
                    "a byte-level BPE vocabulary needs its merges",
                )
            })?;
            let merges = split_merges(&merges)
                .map_err(|message| tokenizer_error(message, "the merges list is corrupt"))?;
            bpe_model(&tokens, &merges, None, false, pre.ignores_merges())
        }
        VocabKind::SentencePiece => {
            let scores = meta.f32_array("tokenizer.ggml.scores")?.ok_or_else(|| {
                meta.missing(
                    "tokenizer.ggml.scores",
                    "a SentencePiece vocabulary needs its scores to rebuild the merges",
                )
            })?;
            if scores.len() != tokens.len() {
                return Err(tokenizer_error(
                    format!(
                        "tokenizer.ggml.scores has {} entries for {} tokens",
                        scores.len(),
                        tokens.len()
                    ),
                    "the file is inconsistent; convert the model again",
                ));
            }
            let merges = merges_from_scores(&tokens, &scores);
            bpe_model(&tokens, &merges, token_str(unk).as_deref(), true, false)
        }
    };

    let added_tokens = added_tokens(&tokens, token_types.as_deref(), unk);
    let special_token = |id: Option<u32>| id.and_then(|i| token_str(Some(i)).map(|s| (s, i)));
    let bos_entry = if add_bos { special_token(bos) } else { None };
    let eos_entry = if add_eos { special_token(eos) } else { None };
    let template = template_processing(bos_entry.as_ref(), eos_entry.as_ref());

    let add_space_prefix = meta
        .bool("tokenizer.ggml.add_space_prefix")?
        .unwrap_or(true);
    let (normalizer, pre_tokenizer, post_processor, decoder) = match kind {
        VocabKind::ByteLevelBpe(pre) => {
            let byte_level_post = json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true});
            let post = match template {
                Some(t) => json!({"type": "Sequence", "processors": [byte_level_post, t]}),
                None => byte_level_post,
            };
            let decoder = json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true});
            (pre.normalizer(), pre.pre_tokenizer(), post, decoder)
        }
        VocabKind::SentencePiece => {
            let replace_space =
                json!({"type": "Replace", "pattern": {"String": " "}, "content": SPIECE_UNDERLINE});
            let normalizer = if add_space_prefix {
                json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": SPIECE_UNDERLINE}, replace_space]})
            } else {
                replace_space
            };
            let mut decoders = vec![
                json!({"type": "Replace", "pattern": {"String": SPIECE_UNDERLINE}, "content": " "}),
                json!({"type": "ByteFallback"}),
                json!({"type": "Fuse"}),
            ];
            if add_space_prefix {
                decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
            }
            let decoder = json!({"type": "Sequence", "decoders": decoders});
            (
                normalizer,
                Json::Null,
                template.unwrap_or(Json::Null),
                decoder,
            )
        }
    };

    let tokenizer_json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": decoder,
        "model": model_json,
    });
    let tokenizer: tokenizers::Tokenizer = serde_json::from_value(tokenizer_json).map_err(|e| {
        tokenizer_error(
            format!("the rebuilt tokenizer.json does not load: {e}"),
            "please report this with the GGUF file's name",
        )
    })?;

    let mut stop_token_ids: Vec<u32> = Vec::new();
    for id in [eos, eot, eom].into_iter().flatten() {
        if !stop_token_ids.contains(&id) {
            stop_token_ids.push(id);
        }
    }
    let tokenizer_config = tokenizer_config(
        meta,
        TokenizerConfig {
            bos: token_str(bos),
            eos: token_str(eos),
            unk: token_str(unk),
            pad: token_str(pad),
            add_bos,
            add_eos,
            model_max_length,
        },
    )?;
    Ok(GgufTokenizer {
        tokenizer,
        tokenizer_config,
        kind,
        num_tokens: tokens.len(),
        bos_token_id: bos,
        eos_token_id: eos,
        stop_token_ids,
        pad_token_id: pad,
        add_bos_token: add_bos,
    })
}

/// Token strings, with empty ones renamed as llama.cpp renames them (`[EMPTY_i]`); a string
/// that appears twice is an error, since ids could not round-trip through tokenizer.json.
fn unique_tokens(tokens: &[&str]) -> Result<Vec<String>, String> {
    let mut seen: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    let mut out = Vec::with_capacity(tokens.len());
    for (id, &token) in tokens.iter().enumerate() {
        if token.is_empty() {
            out.push(format!("[EMPTY_{id}]"));
            continue;
        }
        if let Some(first) = seen.insert(token, id) {
            return Err(format!(
                "token {token:?} appears twice in tokenizer.ggml.tokens (ids {first} and {id})"
            ));
        }
        out.push(token.to_owned());
    }
    Ok(out)
}

/// Splits `"a b"` merges at the first space after the first byte (llama.cpp's rule, so a left
/// part may itself start with a space).
fn split_merges(merges: &[&str]) -> Result<Vec<(String, String)>, String> {
    merges
        .iter()
        .enumerate()
        .map(|(i, merge)| {
            let split_at = merge
                .char_indices()
                .skip(1)
                .find(|&(_, c)| c == ' ')
                .map(|(at, _)| at)
                .ok_or_else(|| {
                    format!("merge {i} ({merge:?}) is not two tokens separated by a space")
                })?;
            Ok((
                merge[..split_at].to_owned(),
                merge[split_at + 1..].to_owned(),
            ))
        })
        .collect()
}

/// Merges rebuilt from SentencePiece scores. For every piece, each way of cutting it into two
/// pieces that are both in the vocabulary is a merge. Merges of the same piece are ordered by
/// the scores of their parts (best first), and all merges by the score of the piece they make
/// (best first; ties keep vocabulary order) — the order transformers' GGUF converter uses.
pub(crate) fn merges_from_scores(tokens: &[String], scores: &[f32]) -> Vec<(String, String)> {
    let score_of: HashMap<&str, f32> = tokens
        .iter()
        .map(String::as_str)
        .zip(scores.iter().copied())
        .collect();
    // (left, right, score of the merged piece)
    let mut merges: Vec<(&str, &str, f32)> = Vec::new();
    for (piece, &score) in tokens.iter().zip(scores) {
        let mut local: Vec<(&str, &str, f32)> = piece
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| {
                let (left, right) = piece.split_at(at);
                (score_of.contains_key(left) && score_of.contains_key(right))
                    .then_some((left, right, score))
            })
            .collect();
        let part_scores = |m: &(&str, &str, f32)| {
            (
                score_of.get(m.0).copied().unwrap_or(f32::MIN),
                score_of.get(m.1).copied().unwrap_or(f32::MIN),
            )
        };
        local.sort_by(|a, b| {
            let (a0, a1) = part_scores(a);
            let (b0, b1) = part_scores(b);
            b0.total_cmp(&a0).then(b1.total_cmp(&a1))
        });
        merges.extend(local);
    }
    merges.sort_by(|a, b| b.2.total_cmp(&a.2));
    merges
        .into_iter()
        .map(|(l, r, _)| (l.to_owned(), r.to_owned()))
        .collect()
}

fn bpe_model(
    tokens: &[String],
    merges: &[(String, String)],
    unk: Option<&str>,
    byte_fallback: bool,
    ignore_merges: bool,
) -> Json {
    let vocab: serde_json::Map<String, Json> = tokens
        .iter()
        .enumerate()
        .map(|(id, token)| (token.clone(), Json::from(id)))
        .collect();
    let merges: Vec<Json> = merges.iter().map(|(l, r)| json!([l, r])).collect();
    json!({
        "type": "BPE",
        "dropout": null,
        "unk_token": unk,
        "continuing_subword_prefix": null,
        "end_of_word_suffix": null,
        "fuse_unk": byte_fallback,
        "byte_fallback": byte_fallback,
        "ignore_merges": ignore_merges,
        "vocab": vocab,
        "merges": merges,
    })
}

/// CONTROL and UNKNOWN tokens as special added tokens, USER_DEFINED ones as plain added
/// tokens. Files without token types get their UNK token as the only special one.
fn added_tokens(tokens: &[String], token_types: Option<&[i64]>, unk: Option<u32>) -> Vec<Json> {
    let entry = |id: usize, special: bool| {
        let content = tokens.get(id)?;
        Some(json!({
            "id": id,
            "content": content,
            "single_word": false,
            "lstrip": false,
            "rstrip": false,
            "normalized": false,
            "special": special,
        }))
    };
    match token_types {
        Some(types) => types
            .iter()
            .enumerate()
            .filter_map(|(id, &t)| match t {
                TOKEN_TYPE_CONTROL | TOKEN_TYPE_UNKNOWN => entry(id, true),
                TOKEN_TYPE_USER_DEFINED => entry(id, false),
                _ => None,
            })
            .collect(),
        None => unk
            .and_then(|id| usize::try_from(id).ok())
            .and_then(|id| entry(id, true))
            .into_iter()
            .collect(),
    }
}

/// `BOS $A EOS` (each part only when the file asks for it), or `None` when nothing is added.
fn template_processing(bos: Option<&(String, u32)>, eos: Option<&(String, u32)>) -> Option<Json> {
    if bos.is_none() && eos.is_none() {
        return None;
    }
    let special =
        |token: &str, type_id: u32| json!({"SpecialToken": {"id": token, "type_id": type_id}});
    let sequence = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    let mut single = Vec::new();
    let mut pair = Vec::new();
    for (seq, type_id) in [("A", 0), ("B", 1)] {
        let mut part = Vec::new();
        if let Some((token, _)) = bos {
            part.push(special(token, type_id));
        }
        part.push(sequence(seq, type_id));
        if let Some((token, _)) = eos {
            part.push(special(token, type_id));
        }
        if seq == "A" {
            single.clone_from(&part);
        }
        pair.extend(part);
    }
    let mut special_tokens = serde_json::Map::new();
    for (token, id) in [bos, eos].into_iter().flatten() {
        special_tokens.insert(
            token.clone(),
            json!({"id": token, "ids": [id], "tokens": [token]}),
        );
    }
    Some(
        json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special_tokens}),
    )
}

struct TokenizerConfig {
    bos: Option<String>,
    eos: Option<String>,
    unk: Option<String>,
    pad: Option<String>,
    add_bos: bool,
    add_eos: bool,
    model_max_length: Option<usize>,
}

/// `tokenizer_config.json`: special-token strings, BOS/EOS flags, context length and the chat
/// template(s). `PreTrainedTokenizerFast` makes transformers use tokenizer.json as written.
fn tokenizer_config(meta: &Metadata<'_>, config: TokenizerConfig) -> Result<Json, GgufError> {
    let mut out = serde_json::Map::new();
    out.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    out.insert("add_bos_token".into(), json!(config.add_bos));
    out.insert("add_eos_token".into(), json!(config.add_eos));
    for (key, value) in [
        ("bos_token", config.bos),
        ("eos_token", config.eos),
        ("unk_token", config.unk),
        ("pad_token", config.pad),
    ] {
        out.insert(key.into(), value.map_or(Json::Null, Json::from));
    }
    out.insert("clean_up_tokenization_spaces".into(), json!(false));
    if let Some(length) = config.model_max_length {
        out.insert("model_max_length".into(), json!(length));
    }
    if let Some(template) = chat_template(meta)? {
        out.insert("chat_template".into(), template);
    }
    Ok(Json::Object(out))
}

/// `tokenizer.chat_template`, plus any named templates (`tokenizer.chat_templates` lists the
/// names, `tokenizer.chat_template.NAME` holds each), in tokenizer_config.json's list form.
fn chat_template(meta: &Metadata<'_>) -> Result<Option<Json>, GgufError> {
    let default = meta.string("tokenizer.chat_template")?;
    let names = meta
        .string_array("tokenizer.chat_templates")?
        .unwrap_or_default();
    let mut named = Vec::new();
    for name in names {
        let key = format!("tokenizer.chat_template.{name}");
        if let Some(template) = meta.string(&key)? {
            named.push(json!({"name": name, "template": template}));
        }
    }
    if named.is_empty() {
        return Ok(default.map(Json::from));
    }
    let mut all = Vec::new();
    if let Some(template) = default {
        all.push(json!({"name": "default", "template": template}));
    }
    all.extend(named);
    Ok(Some(Json::Array(all)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn merges_from_scores_rank_by_the_merged_piece() {
        let vocab = tokens(&["a", "b", "c", "ab", "bc", "abc"]);
        let scores = [0.0, 0.0, 0.0, -1.0, -2.0, -0.5];
        let merges = merges_from_scores(&vocab, &scores);
        // "abc" (score -0.5) first, its cuts ordered by part scores: (a, bc) has a=0 > ab=-1.
        let expected = [("a", "bc"), ("ab", "c"), ("a", "b"), ("b", "c")];
        let got: Vec<(&str, &str)> = merges
            .iter()
            .map(|(l, r)| (l.as_str(), r.as_str()))
            .collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn merges_split_at_the_first_inner_space() -> Result<(), String> {
        let merges = split_merges(&["Ġ t", "i n", " a b"])?;
        assert_eq!(merges[0], ("Ġ".to_owned(), "t".to_owned()));
        assert_eq!(merges[2], (" a".to_owned(), "b".to_owned()));
        assert!(split_merges(&["nospace"]).is_err());
        Ok(())
    }

    #[test]
    fn duplicate_tokens_are_rejected_and_empty_ones_renamed() {
        let err = unique_tokens(&["a", "b", "a"]).err().unwrap_or_default();
        assert!(err.contains("ids 0 and 2"), "{err}");
        assert_eq!(unique_tokens(&["a", ""]), Ok(tokens(&["a", "[EMPTY_1]"])));
    }

    #[test]
    fn every_pre_tokenizer_regex_compiles() {
        let names = SUPPORTED_PRE_TOKENIZERS.split(", ");
        for name in names {
            let pre = PreTokenizer::from_gguf(name);
            assert!(pre.is_some(), "{name} is listed but not mapped");
            let Some(pre) = pre else { continue };
            let json = json!({"normalizer": pre.normalizer(), "pre_tokenizer": pre.pre_tokenizer(),
                "model": {"type": "BPE", "vocab": {}, "merges": []}, "added_tokens": [], "version": "1.0"});
            let parsed: Result<tokenizers::Tokenizer, _> = serde_json::from_value(json);
            assert!(parsed.is_ok(), "{name}: {:?}", parsed.err());
        }
    }

    #[test]
    fn gpt2_regex_split_equals_hf_byte_level_split() -> Result<(), Box<dyn std::error::Error>> {
        use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer as _};
        let split = |pre: Json, text: &str| -> Result<Vec<String>, Box<dyn std::error::Error>> {
            let pre: tokenizers::PreTokenizerWrapper = serde_json::from_value(pre)?;
            let mut s = PreTokenizedString::from(text);
            pre.pre_tokenize(&mut s).map_err(|e| e.to_string())?;
            Ok(s.get_splits(OffsetReferential::Original, OffsetType::Byte)
                .into_iter()
                .map(|(w, _, _)| w.to_owned())
                .collect())
        };
        let regex = json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": GPT2_REGEX}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]});
        let builtin = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
        for text in [
            "Hello, world!  It's 2024.\n\n\tdone  ",
            "   leading",
            "a\u{00a0}b 你好",
        ] {
            assert_eq!(
                split(regex.clone(), text)?,
                split(builtin.clone(), text)?,
                "{text:?}"
            );
        }
        Ok(())
    }
}

//! `tokenizer.json` through the `tokenizers` crate, plus the special-token strings of
//! `tokenizer_config.json` that chat templates refer to.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The file holding special-token strings and the chat template.
pub const TOKENIZER_CONFIG: &str = "tokenizer_config.json";

/// A Hugging Face fast tokenizer.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    special_tokens: SpecialTokens,
    path: PathBuf,
}

impl Tokenizer {
    /// Reads `dir/tokenizer.json` and the special tokens of `dir/tokenizer_config.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(Error::MissingFile {
                path,
                hint: "oxtune reads the fast-tokenizer file tokenizer.json; save the tokenizer with transformers' save_pretrained, or import a .gguf with `oxtune export --from_gguf`".into(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| Error::Tokenizer {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let config_path = dir.join(TOKENIZER_CONFIG);
        let special_tokens = if config_path.is_file() {
            SpecialTokens::from_config(&crate::error::read_json(&config_path)?)
        } else {
            SpecialTokens::default()
        };
        Ok(Self {
            inner,
            special_tokens,
            path,
        })
    }

    /// A stand-in for models built from a config alone (benchmarks with random weights):
    /// token `i` is the word `<i>`, so any id of the vocabulary decodes.
    pub fn synthetic(vocab_size: usize) -> Result<Self> {
        let vocab: std::collections::HashMap<String, u32> = (0..vocab_size)
            .map(|i| {
                Ok((
                    format!("<{i}>"),
                    u32::try_from(i).map_err(|e| Error::Tokenize(e.to_string()))?,
                ))
            })
            .collect::<Result<_>>()?;
        let model = tokenizers::models::wordlevel::WordLevel::builder()
            .vocab(vocab.into_iter().collect())
            .unk_token("<0>".into())
            .build()
            .map_err(|e| Error::Tokenize(e.to_string()))?;
        Ok(Self {
            inner: tokenizers::Tokenizer::new(model),
            special_tokens: SpecialTokens::default(),
            path: PathBuf::from("<synthetic>"),
        })
    }

    /// The special-token strings of `tokenizer_config.json`.
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special_tokens
    }

    /// Where the tokenizer came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Token ids of `text`; `add_special_tokens` applies the post-processor (e.g. BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Tokenize(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenize(e.to_string()))
    }

    /// The id of a token string (special or not).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Special-token strings from `tokenizer_config.json` (`bos_token`, `eos_token`, …), which
/// may be written as plain strings or as `{"content": "..."}` objects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub unk_token: Option<String>,
    pub pad_token: Option<String>,
}

impl SpecialTokens {
    /// Reads them from a parsed `tokenizer_config.json`.
    pub fn from_config(config: &serde_json::Value) -> Self {
        let token = |key: &str| -> Option<String> {
            match config.get(key)? {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
                _ => None,
            }
        };
        Self {
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
            unk_token: token("unk_token"),
            pad_token: token("pad_token"),
        }
    }
}

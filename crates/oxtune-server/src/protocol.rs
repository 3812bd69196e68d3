//! OpenAI wire types: the request bodies of `/v1/chat/completions` and `/v1/completions`, and
//! the responses and stream chunks sent back. Unknown request fields are ignored (clients such
//! as the official SDK send fields this server has no use for, e.g. `user` or `store`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A string or a list of strings (`stop`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StringOrList {
    One(String),
    Many(Vec<String>),
}

impl StringOrList {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(text) => vec![text],
            Self::Many(list) => list,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// `response_format`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormatIn {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaIn },
}

#[derive(Debug, Clone, Deserialize)]
pub struct JsonSchemaIn {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub schema: Option<Value>,
    #[serde(default)]
    pub strict: Option<bool>,
}

/// The sampling and stopping fields both endpoints share.
#[derive(Debug, Clone, Default)]
pub struct CommonParams {
    pub model: Option<String>,
    pub max_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub stop: Option<StringOrList>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub seed: Option<i64>,
    pub n: Option<u64>,
    pub best_of: Option<u64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub logit_bias: Option<BTreeMap<String, f64>>,
    pub ignore_eos: Option<bool>,
    pub response_format: Option<ResponseFormatIn>,
}

/// Writes the shared fields into both request structs, so each deserializes flat (and
/// `serde_path_to_error` can name the field at fault).
macro_rules! with_common_fields {
    ($(#[$meta:meta])* pub struct $name:ident { $($body:tt)* }) => {
        $(#[$meta])*
        pub struct $name {
            #[serde(default)] pub model: Option<String>,
            #[serde(default)] pub max_tokens: Option<u64>,
            #[serde(default)] pub temperature: Option<f64>,
            #[serde(default)] pub top_p: Option<f64>,
            #[serde(default)] pub top_k: Option<i64>,
            #[serde(default)] pub min_p: Option<f64>,
            #[serde(default)] pub presence_penalty: Option<f64>,
            #[serde(default)] pub frequency_penalty: Option<f64>,
            #[serde(default)] pub repetition_penalty: Option<f64>,
            #[serde(default)] pub stop: Option<StringOrList>,
            #[serde(default)] pub stop_token_ids: Option<Vec<u32>>,
            #[serde(default)] pub seed: Option<i64>,
            #[serde(default)] pub n: Option<u64>,
            #[serde(default)] pub best_of: Option<u64>,
            #[serde(default)] pub stream: Option<bool>,
            #[serde(default)] pub stream_options: Option<StreamOptions>,
            #[serde(default)] pub logit_bias: Option<BTreeMap<String, f64>>,
            #[serde(default)] pub ignore_eos: Option<bool>,
            #[serde(default)] pub response_format: Option<ResponseFormatIn>,
            $($body)*
        }

        impl $name {
            /// The shared fields, moved out.
            pub fn common(&mut self) -> CommonParams {
                CommonParams {
                    model: self.model.take(),
                    max_tokens: self.max_tokens,
                    temperature: self.temperature,
                    top_p: self.top_p,
                    top_k: self.top_k,
                    min_p: self.min_p,
                    presence_penalty: self.presence_penalty,
                    frequency_penalty: self.frequency_penalty,
                    repetition_penalty: self.repetition_penalty,
                    stop: self.stop.take(),
                    stop_token_ids: self.stop_token_ids.take(),
                    seed: self.seed,
                    n: self.n,
                    best_of: self.best_of,
                    stream: self.stream,
                    stream_options: self.stream_options.take(),
                    logit_bias: self.logit_bias.take(),
                    ignore_eos: self.ignore_eos,
                    response_format: self.response_format.take(),
                }
            }
        }
    };
}

with_common_fields! {
    /// `POST /v1/chat/completions`.
    #[derive(Debug, Clone, Deserialize)]
    pub struct ChatCompletionRequest {
        pub messages: Vec<ChatMessageIn>,
        #[serde(default)] pub max_completion_tokens: Option<u64>,
        #[serde(default)] pub logprobs: Option<bool>,
        #[serde(default)] pub top_logprobs: Option<u64>,
        #[serde(default)] pub tools: Option<Vec<Value>>,
        #[serde(default)] pub tool_choice: Option<Value>,
    }
}

with_common_fields! {
    /// `POST /v1/completions`.
    #[derive(Debug, Clone, Deserialize)]
    pub struct CompletionRequest {
        pub prompt: PromptIn,
        #[serde(default)] pub logprobs: Option<u64>,
        #[serde(default)] pub echo: Option<bool>,
        #[serde(default)] pub suffix: Option<String>,
    }
}

/// A chat message; `content` is text or a list of parts (only text parts are served).
#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessageIn {
    pub role: String,
    #[serde(default)]
    pub content: Option<ContentIn>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ContentIn {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

/// `prompt` of `/v1/completions`: text, token ids, or a batch of either.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptIn {
    Text(String),
    Tokens(Vec<u32>),
    Texts(Vec<String>),
    TokenLists(Vec<Vec<u32>>),
}

// ---------------------------------------------------------------------------------------------
// Responses.

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct PromptTokensDetails {
    pub cached_tokens: usize,
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct UsageOut {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

/// One alternative in chat logprobs.
#[derive(Debug, Clone, Serialize)]
pub struct ChatTopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

/// One generated token in chat logprobs.
#[derive(Debug, Clone, Serialize)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<ChatTopLogprob>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatMessageOut {
    pub role: &'static str,
    pub content: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: ChatMessageOut,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: UsageOut,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    /// Present (null until the last chunk) when `stream_options.include_usage`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<UsageOut>>,
}

/// Legacy completions logprobs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Vec<BTreeMap<String, f32>>,
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Completion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<UsageOut>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    pub root: String,
    pub parent: Option<String>,
    pub max_model_len: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

//! Samples to token ids and labels.
//!
//! `sft`: the conversation is rendered with the model's chat template (the same rendering
//! serving uses) and split into pieces at the replies, each piece tokenized on its own
//! (`add_special_tokens = false`, as transformers' `apply_chat_template` does) and concatenated:
//!
//! ```text
//! <|im_start|>system\n…<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n | A | <|im_end|>\n<|im_start|>user… | A2 | <|im_end|>\n
//! '-------------------------- prompt: -100 ---------------------------------------------'  reply  '- tail -'
//! ```
//!
//! A reply's label covers its text and the tail through the template's end-of-turn token (the
//! first special token, or eos, after the reply: `<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`,
//! `</s>`), as ms-swift labels response + suffix; whitespace after that token and every other
//! piece get -100. Which replies carry labels follows [`LossScale`].
//!
//! Finding the replies exactly: the conversation is rendered a second time with each reply
//! replaced by a sentinel; the text around the sentinels in that skeleton must then be found
//! around the replies in the real rendering, each reply written as given or trimmed (many
//! templates trim). This needs no prefix stability: templates that rewrite earlier turns once
//! later ones follow (Qwen3 writes an empty `<think>` block into the last reply only) align
//! all the same, and a short reply like "n" cannot be mistaken for a letter of `<think>`. A
//! template that rewrites the reply text, or renders the conversation differently depending
//! on it (Qwen3 given `<think>…</think>` inside a reply), fails with an error naming the
//! template and the row.
//!
//! `pt`: the text is tokenized with the tokenizer's own special tokens (BOS where it adds one)
//! and eos appended; every token is a target.
//!
//! In every sample the first token's label is -100: the loss is shifted (position i predicts
//! label i + 1), so label 0 is never a target of this sample, and in a packed row it would be
//! predicted from the previous sample's last token.

use std::ops::Range;
use std::str::FromStr;

use oxtune_models::{ChatMessage, ChatTemplate, LoadedModel, Tokenizer};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::source::{Origin, Sample, SampleContent, Task};
use crate::error::{Error, Result};

/// The label of a position that is not a target (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// What happens to a sample longer than `max_length` (ms-swift `truncation_strategy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TruncationStrategy {
    /// Drop the sample (counted).
    #[default]
    Delete,
    /// Keep the last `max_length` tokens.
    Left,
    /// Keep the first `max_length` tokens.
    Right,
}

impl FromStr for TruncationStrategy {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self> {
        match name {
            "delete" => Ok(Self::Delete),
            "left" => Ok(Self::Left),
            "right" => Ok(Self::Right),
            _ => Err(Error::Invalid {
                message: format!("unknown truncation_strategy `{name}`"),
                hint: "use delete, left or right".into(),
            }),
        }
    }
}

/// Which tokens of a conversation are targets (ms-swift `loss_scale`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossScale {
    /// Every assistant turn.
    #[default]
    Default,
    /// The last assistant turn only.
    LastRound,
    /// Every token.
    All,
}

/// One tokenized sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub input_ids: Vec<u32>,
    /// Same length as `input_ids`; [`IGNORE_INDEX`] where there is no target, else the id.
    pub labels: Vec<i64>,
    pub origin: Origin,
}

impl Encoded {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Positions with a target.
    pub fn target_tokens(&self) -> usize {
        count_targets(&self.labels)
    }
}

pub(crate) fn count_targets(labels: &[i64]) -> usize {
    labels
        .iter()
        .filter(|&&label| label != IGNORE_INDEX)
        .count()
}

/// Tokenizes samples for one model.
#[derive(Debug)]
pub struct Encoder<'a> {
    tokenizer: &'a Tokenizer,
    template: Option<&'a ChatTemplate>,
    /// Names the template in errors (the model directory, say).
    template_name: String,
    eos_ids: Vec<u32>,
    pad_id: u32,
}

impl<'a> Encoder<'a> {
    /// `eos_ids`: ids that end a reply (`LoadedModel::eos_token_ids`), besides the
    /// tokenizer's `eos_token`; `pt` texts get the tokenizer's `eos_token` appended (else the
    /// first of `eos_ids`). `template_name` names the template in error messages.
    pub fn new(
        tokenizer: &'a Tokenizer,
        template: Option<&'a ChatTemplate>,
        template_name: impl Into<String>,
        eos_ids: &[u32],
    ) -> Result<Self> {
        let special = tokenizer.special_tokens();
        let token_id =
            |token: &Option<String>| token.as_deref().and_then(|t| tokenizer.token_to_id(t));
        // The tokenizer's own eos first: it is the one appended to pt texts (as ms-swift does).
        let mut all_eos: Vec<u32> = token_id(&special.eos_token).into_iter().collect();
        for &id in eos_ids {
            if !all_eos.contains(&id) {
                all_eos.push(id);
            }
        }
        let eos_ids = all_eos;
        let pad_id = token_id(&special.pad_token)
            .or_else(|| eos_ids.first().copied())
            .ok_or_else(|| Error::Invalid {
                message: format!(
                    "the tokenizer {} has neither a pad nor an eos token",
                    tokenizer.path().display()
                ),
                hint: "set `pad_token` or `eos_token` in tokenizer_config.json".into(),
            })?;
        Ok(Self {
            tokenizer,
            template,
            template_name: template_name.into(),
            eos_ids,
            pad_id,
        })
    }

    /// The encoder of a loaded model (its tokenizer, chat template and eos ids).
    pub fn for_model(model: &'a LoadedModel) -> Result<Self> {
        Self::new(
            &model.tokenizer,
            model.chat_template.as_ref(),
            model.dir.display().to_string(),
            &model.eos_token_ids(),
        )
    }

    /// The id padding is written with: the tokenizer's pad token, else eos.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        self.tokenizer
    }

    /// Fails early when `task` cannot be encoded (sft without a chat template).
    pub fn check_task(&self, task: Task) -> Result<()> {
        match (task, self.template) {
            (Task::Sft, None) => Err(self.no_template()),
            _ => Ok(()),
        }
    }

    fn no_template(&self) -> Error {
        Error::Invalid {
            message: format!("the model {} has no chat template, which `oxtune sft` needs to render conversations", self.template_name),
            hint: "use a chat/instruct model, add a `chat_template` to its tokenizer_config.json (or a chat_template.jinja beside it), or train on raw text with `oxtune pt`".into(),
        }
    }

    /// Tokenizes one sample (no truncation).
    pub fn encode(&self, sample: &Sample, loss_scale: LossScale) -> Result<Encoded> {
        self.encode_inner(sample, loss_scale).map_err(|e| e.error)
    }

    fn encode_inner(&self, sample: &Sample, loss_scale: LossScale) -> Result<Encoded, EncodeError> {
        let (input_ids, mut labels) = match &sample.content {
            SampleContent::Text(text) => self.encode_text(text, &sample.origin)?,
            SampleContent::Conversation(messages) => {
                self.encode_conversation(messages, &sample.origin, loss_scale)?
            }
        };
        if let Some(first) = labels.first_mut() {
            *first = IGNORE_INDEX;
        }
        Ok(Encoded {
            input_ids,
            labels,
            origin: sample.origin.clone(),
        })
    }

    fn encode_text(
        &self,
        text: &str,
        origin: &Origin,
    ) -> Result<(Vec<u32>, Vec<i64>), EncodeError> {
        let mut ids = self.tokenize(text, true, origin)?;
        if let Some(&eos) = self.eos_ids.first()
            && ids.last().is_none_or(|last| !self.eos_ids.contains(last))
        {
            ids.push(eos);
        }
        let labels = ids.iter().map(|&id| i64::from(id)).collect();
        Ok((ids, labels))
    }

    fn encode_conversation(
        &self,
        messages: &[ChatMessage],
        origin: &Origin,
        loss_scale: LossScale,
    ) -> Result<(Vec<u32>, Vec<i64>), EncodeError> {
        let template = self
            .template
            .ok_or_else(|| EncodeError::fatal(self.no_template()))?;
        let full = self.render(template, messages, origin)?;
        let replies = self.align_replies(template, messages, &full, origin)?;
        // Pieces: prompt, reply, tail + next prompt, reply, …, tail. A tail is labelled
        // through its end-of-turn token when its reply is labelled.
        let last = replies.len().saturating_sub(1);
        let labelled = |index: usize| loss_scale != LossScale::LastRound || index == last;
        let mut pieces = Vec::with_capacity(2 * replies.len() + 1);
        let mut cursor = 0;
        for (index, reply) in replies.iter().enumerate() {
            let before = if index > 0 && labelled(index - 1) {
                Label::ThroughEndOfTurn
            } else {
                Label::No
            };
            pieces.push((cursor..reply.start, before));
            pieces.push((
                reply.clone(),
                if labelled(index) {
                    Label::Yes
                } else {
                    Label::No
                },
            ));
            cursor = reply.end;
        }
        let after = if !replies.is_empty() && labelled(last) {
            Label::ThroughEndOfTurn
        } else {
            Label::No
        };
        pieces.push((cursor..full.len(), after));
        let mut ids = Vec::new();
        let mut labels = Vec::new();
        for (range, rule) in pieces {
            self.push_piece(
                &full[range],
                rule,
                loss_scale,
                origin,
                &mut ids,
                &mut labels,
            )?;
        }
        Ok((ids, labels))
    }

    /// The byte range of each assistant reply in `full`, found by aligning `full` with the
    /// skeleton (see the module docs).
    fn align_replies(
        &self,
        template: &ChatTemplate,
        messages: &[ChatMessage],
        full: &str,
        origin: &Origin,
    ) -> Result<Vec<Range<usize>>, EncodeError> {
        let mut replies: Vec<&str> = Vec::new();
        let skeleton_messages: Vec<ChatMessage> = messages
            .iter()
            .map(|message| {
                if message.role != "assistant" {
                    return message.clone();
                }
                replies.push(&message.content);
                ChatMessage::new("assistant", sentinel(replies.len() - 1))
            })
            .collect();
        let skeleton = self.render(template, &skeleton_messages, origin)?;
        // The skeleton's text around the sentinels: before the first, between, after the last.
        let mut between = Vec::with_capacity(replies.len() + 1);
        let mut rest = skeleton.as_str();
        for index in 0..replies.len() {
            let marker = sentinel(index);
            let Some((before, after)) = rest.split_once(marker.as_str()) else {
                return Err(EncodeError::fatal(self.unsupported(
                    origin,
                    &format!("it does not write reply {} of the conversation", index + 1),
                )));
            };
            between.push(before);
            rest = after;
        }
        between.push(rest);
        let mut spans = Vec::with_capacity(replies.len());
        let mut position = between[0].len();
        let aligned = full.starts_with(between[0])
            && replies.iter().zip(&between[1..]).all(|(reply, next)| {
                let candidates = [*reply, reply.trim(), reply.trim_start(), reply.trim_end()];
                let rest = &full[position..];
                let Some(found) = candidates.into_iter().find(|candidate| {
                    rest.strip_prefix(candidate)
                        .is_some_and(|after| after.starts_with(next))
                }) else {
                    return false;
                };
                spans.push(position..position + found.len());
                position += found.len() + next.len();
                true
            })
            && position == full.len();
        if aligned {
            return Ok(spans);
        }
        let reply = replies
            .get(spans.len())
            .map(|reply| reply.trim().chars().take(40).collect::<String>())
            .unwrap_or_default();
        Err(EncodeError::fatal(self.unsupported(
            origin,
            &format!(
                "the reply \"{reply}\" is not written as given, or the text around it depends on it"
            ),
        )))
    }

    fn unsupported(&self, origin: &Origin, why: &str) -> Error {
        Error::Row {
            path: origin.path.to_path_buf(),
            line: origin.line,
            message: format!("cannot find the assistant replies in the rendering of the chat template of {}: {why}", self.template_name),
            hint: "oxtune labels the replies it finds in the rendered conversation; a template that rewrites the reply text is not supported: fix the template, or the row's replies (leading/trailing whitespace is fine)".into(),
        }
    }

    fn render(
        &self,
        template: &ChatTemplate,
        messages: &[ChatMessage],
        origin: &Origin,
    ) -> Result<String, EncodeError> {
        template.render(messages, false).map_err(|e| {
            let message = e.to_string();
            EncodeError::row(Error::Row {
                path: origin.path.to_path_buf(),
                line: origin.line,
                message: format!("the chat template of {} refused the conversation: {}", self.template_name, message.lines().next().unwrap_or_default()),
                hint: "check the row's roles and their order against what the template accepts (many allow one system message, first, then alternating user and assistant turns)".into(),
            })
        })
    }

    fn tokenize(
        &self,
        text: &str,
        add_special_tokens: bool,
        origin: &Origin,
    ) -> Result<Vec<u32>, EncodeError> {
        self.tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| {
                EncodeError::row(Error::Row {
                    path: origin.path.to_path_buf(),
                    line: origin.line,
                    message: format!("cannot tokenize: {e}"),
                    hint: "check the row's text for invalid characters".into(),
                })
            })
    }

    fn push_piece(
        &self,
        text: &str,
        rule: Label,
        loss_scale: LossScale,
        origin: &Origin,
        ids: &mut Vec<u32>,
        labels: &mut Vec<i64>,
    ) -> Result<(), EncodeError> {
        if text.is_empty() {
            return Ok(());
        }
        let piece = self.tokenize(text, false, origin)?;
        let labelled = match (loss_scale, rule) {
            (LossScale::All, _) | (_, Label::Yes) => piece.len(),
            (_, Label::No) => 0,
            (_, Label::ThroughEndOfTurn) => piece
                .iter()
                .position(|&id| self.ends_turn(id))
                .map_or(0, |at| at + 1),
        };
        labels.extend(piece.iter().enumerate().map(|(at, &id)| {
            if at < labelled {
                i64::from(id)
            } else {
                IGNORE_INDEX
            }
        }));
        ids.extend(piece);
        Ok(())
    }

    /// An eos id, or a special token (one that decoding with `skip_special_tokens` drops).
    fn ends_turn(&self, id: u32) -> bool {
        if self.eos_ids.contains(&id) {
            return true;
        }
        let shown = self.tokenizer.decode(&[id], false).unwrap_or_default();
        let skipped = self.tokenizer.decode(&[id], true).unwrap_or_default();
        !shown.is_empty() && skipped.is_empty()
    }
}

/// How a piece of the rendering is labelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Label {
    No,
    Yes,
    /// Up to and including the first end-of-turn token; nothing when there is none.
    ThroughEndOfTurn,
}

/// Stands for reply `index` in the skeleton rendering: private-use characters and digits,
/// which no template trims and case changes leave alone.
fn sentinel(index: usize) -> String {
    format!("\u{F8F0}{index}\u{F8F1}")
}

/// An encoding failure: `droppable` ones are the row's fault (dropped with `strict: false`);
/// the others are the template's and stop the job.
struct EncodeError {
    error: Error,
    droppable: bool,
}

impl EncodeError {
    fn row(error: Error) -> Self {
        Self {
            error,
            droppable: true,
        }
    }

    fn fatal(error: Error) -> Self {
        Self {
            error,
            droppable: false,
        }
    }
}

/// Length limit, truncation and labelling.
#[derive(Debug, Clone, Copy, Default)]
pub struct EncodeOptions {
    /// The most tokens in a sample; `None`: no limit.
    pub max_length: Option<usize>,
    pub truncation_strategy: TruncationStrategy,
    pub loss_scale: LossScale,
    /// Fail on a row the template refuses (true) or drop and count it (false).
    pub strict: bool,
}

/// What encoding did to a set of samples.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EncodeReport {
    pub samples: usize,
    /// Samples encoded and kept.
    pub kept: usize,
    /// Samples cut to `max_length` (`left` / `right`).
    pub truncated: usize,
    /// Samples over `max_length` dropped (`delete`).
    pub dropped_too_long: usize,
    /// Samples without a target token (after truncation).
    pub dropped_no_target: usize,
    /// Samples the chat template refused (`strict: false`).
    pub dropped_template: usize,
    /// Tokens and target tokens of the kept samples.
    pub tokens: usize,
    pub target_tokens: usize,
    /// The longest kept sample.
    pub longest: usize,
    /// The first few messages of dropped samples, `file:line: why`.
    pub dropped_examples: Vec<String>,
}

impl EncodeReport {
    pub fn dropped(&self) -> usize {
        self.dropped_too_long + self.dropped_no_target + self.dropped_template
    }

    fn note(&mut self, message: String) {
        if self.dropped_examples.len() < 5 {
            self.dropped_examples.push(message);
        }
    }
}

/// Encodes `samples` in parallel (the result keeps their order), then truncates and drops as
/// `options` say.
pub fn encode_samples(
    encoder: &Encoder<'_>,
    samples: &[Sample],
    options: &EncodeOptions,
) -> Result<(Vec<Encoded>, EncodeReport)> {
    if options.max_length == Some(0) {
        return Err(Error::Invalid {
            message: "max_length is 0".into(),
            hint: "give max_length a positive number of tokens".into(),
        });
    }
    let results: Vec<Result<Encoded, EncodeError>> = samples
        .par_iter()
        .map(|sample| encoder.encode_inner(sample, options.loss_scale))
        .collect();
    let mut report = EncodeReport {
        samples: samples.len(),
        ..EncodeReport::default()
    };
    let mut kept = Vec::with_capacity(samples.len());
    for result in results {
        let encoded = match result {
            Ok(encoded) => encoded,
            Err(EncodeError {
                error,
                droppable: true,
            }) if !options.strict => {
                report.dropped_template += 1;
                report.note(
                    error
                        .to_string()
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .to_owned(),
                );
                continue;
            }
            Err(EncodeError { error, .. }) => return Err(error),
        };
        let origin = encoded.origin.clone();
        let length = encoded.len();
        let encoded = match truncate(encoded, options.max_length, options.truncation_strategy) {
            Truncation::Fits(encoded) => encoded,
            Truncation::Cut(encoded) => {
                report.truncated += 1;
                encoded
            }
            Truncation::TooLong => {
                report.dropped_too_long += 1;
                report.note(format!(
                    "{origin}: {length} tokens, over max_length {} (truncation_strategy: delete)",
                    options.max_length.unwrap_or_default()
                ));
                continue;
            }
        };
        let targets = encoded.target_tokens();
        if targets == 0 {
            report.dropped_no_target += 1;
            report.note(format!(
                "{origin}: no target token left (after truncation to {} tokens)",
                encoded.len()
            ));
            continue;
        }
        report.tokens += encoded.len();
        report.target_tokens += targets;
        report.longest = report.longest.max(encoded.len());
        kept.push(encoded);
    }
    report.kept = kept.len();
    Ok((kept, report))
}

/// The result of [`truncate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Truncation {
    Fits(Encoded),
    Cut(Encoded),
    /// Over the limit with `delete`.
    TooLong,
}

/// Applies `max_length`; a cut sample's new first token gets label -100.
pub fn truncate(
    mut encoded: Encoded,
    max_length: Option<usize>,
    strategy: TruncationStrategy,
) -> Truncation {
    let Some(max_length) = max_length.filter(|&max| encoded.len() > max) else {
        return Truncation::Fits(encoded);
    };
    match strategy {
        TruncationStrategy::Delete => return Truncation::TooLong,
        TruncationStrategy::Left => {
            let cut = encoded.len() - max_length;
            encoded.input_ids.drain(..cut);
            encoded.labels.drain(..cut);
        }
        TruncationStrategy::Right => {
            encoded.input_ids.truncate(max_length);
            encoded.labels.truncate(max_length);
        }
    }
    if let Some(first) = encoded.labels.first_mut() {
        *first = IGNORE_INDEX;
    }
    Truncation::Cut(encoded)
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    use oxtune_models::tokenizer::SpecialTokens;

    use super::*;

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-qwen2")
    }

    fn tokenizer() -> Tokenizer {
        Tokenizer::load(&fixture()).expect("fixture tokenizer")
    }

    fn chatml() -> ChatTemplate {
        ChatTemplate::load(&fixture(), tokenizer().special_tokens())
            .expect("template")
            .expect("fixture has a template")
    }

    fn origin() -> Origin {
        Origin {
            path: Arc::from(Path::new("data.jsonl")),
            line: 7,
        }
    }

    fn conversation(turns: &[(&str, &str)]) -> Sample {
        Sample {
            origin: origin(),
            content: SampleContent::Conversation(
                turns
                    .iter()
                    .map(|(role, text)| ChatMessage::new(*role, *text))
                    .collect(),
            ),
        }
    }

    /// The labelled tokens, decoded one contiguous run at a time.
    fn labelled_runs(tokenizer: &Tokenizer, encoded: &Encoded) -> Vec<String> {
        let mut runs: Vec<Vec<u32>> = Vec::new();
        let mut previous = false;
        for (&id, &label) in encoded.input_ids.iter().zip(&encoded.labels) {
            let labelled = label != IGNORE_INDEX;
            if labelled {
                assert_eq!(label, i64::from(id), "a label is its own token id");
                if !previous {
                    runs.push(Vec::new());
                }
                runs.last_mut().expect("a run was started").push(id);
            }
            previous = labelled;
        }
        runs.iter()
            .map(|run| tokenizer.decode(run, false).expect("decode"))
            .collect()
    }

    const MULTI_TURN: [(&str, &str); 5] = [
        ("user", "What is 2+2?"),
        ("assistant", "It is 4."),
        ("user", "And 3+3?"),
        ("assistant", "6, of course."),
        ("user", "Thanks"),
    ];

    #[test]
    fn every_assistant_reply_and_its_end_token_are_labelled() {
        let (tokenizer, template) = (tokenizer(), chatml());
        let encoder =
            Encoder::new(&tokenizer, Some(&template), "tiny-qwen2", &[]).expect("encoder");
        let sample = conversation(&MULTI_TURN[..4]);
        let encoded = encoder.encode(&sample, LossScale::Default).expect("encode");
        assert_eq!(
            labelled_runs(&tokenizer, &encoded),
            vec!["It is 4.<|im_end|>", "6, of course.<|im_end|>"]
        );
        // The ids are those of the whole rendering (including the default system prompt).
        let SampleContent::Conversation(messages) = &sample.content else {
            unreachable!("a conversation")
        };
        let rendered = template.render(messages, false).expect("render");
        assert_eq!(
            tokenizer.decode(&encoded.input_ids, false).expect("decode"),
            rendered
        );
        // Piecewise tokenization gives the ids of the whole rendering here (ChatML splits at
        // special tokens), as transformers' apply_chat_template(tokenize=True) would.
        assert_eq!(
            encoded.input_ids,
            tokenizer.encode(&rendered, false).expect("encode")
        );
        assert!(rendered.starts_with("<|im_start|>system\nYou are a helpful assistant."));
        assert_eq!(encoded.labels[0], IGNORE_INDEX);
    }

    #[test]
    fn last_round_and_all_loss_scales() {
        let (tokenizer, template) = (tokenizer(), chatml());
        let encoder =
            Encoder::new(&tokenizer, Some(&template), "tiny-qwen2", &[]).expect("encoder");
        let sample = conversation(&MULTI_TURN[..4]);
        let last = encoder
            .encode(&sample, LossScale::LastRound)
            .expect("encode");
        assert_eq!(
            labelled_runs(&tokenizer, &last),
            vec!["6, of course.<|im_end|>"]
        );
        let all = encoder.encode(&sample, LossScale::All).expect("encode");
        assert_eq!(all.target_tokens(), all.len() - 1);
        assert_eq!(last.input_ids, all.input_ids);
    }

    #[test]
    fn a_template_that_is_not_prefix_stable_aligns() {
        // Like Qwen3: the last reply gets an empty think block, earlier ones do not, so a
        // rendering of the first two turns is not a prefix of the whole.
        let source = "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' and loop.last %}<think>\n\n</think>\n\n{% endif %}{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let tokenizer = tokenizer();
        let template = ChatTemplate::new(source, tokenizer.special_tokens().clone(), "qwen3-like")
            .expect("template");
        let encoder =
            Encoder::new(&tokenizer, Some(&template), "qwen3-like", &[]).expect("encoder");
        let encoded = encoder
            .encode(&conversation(&MULTI_TURN[..4]), LossScale::Default)
            .expect("encode");
        assert_eq!(
            labelled_runs(&tokenizer, &encoded),
            vec!["It is 4.<|im_end|>", "6, of course.<|im_end|>"]
        );
        let text = tokenizer.decode(&encoded.input_ids, false).expect("decode");
        assert_eq!(text.matches("<think>").count(), 1, "{text}");
        // A one-letter reply is found where it is, not inside `<think>` or `<|im_end|>`.
        let short = conversation(&[
            ("user", "x"),
            ("assistant", "n"),
            ("user", "y"),
            ("assistant", "e"),
        ]);
        let encoded = encoder.encode(&short, LossScale::Default).expect("encode");
        assert_eq!(
            labelled_runs(&tokenizer, &encoded),
            vec!["n<|im_end|>", "e<|im_end|>"]
        );
    }

    #[test]
    fn a_template_rewriting_replies_fails_naming_template_and_row() {
        let source = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | upper }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let tokenizer = tokenizer();
        let template =
            ChatTemplate::new(source, SpecialTokens::default(), "shouting").expect("template");
        let encoder =
            Encoder::new(&tokenizer, Some(&template), "shouting-model", &[]).expect("encoder");
        let error = encoder
            .encode(&conversation(&MULTI_TURN[..2]), LossScale::Default)
            .expect_err("rewritten reply")
            .to_string();
        assert!(error.starts_with("data.jsonl:7: cannot find the assistant replies in the rendering of the chat template of shouting-model"), "{error}");
        assert!(
            error.contains("\"It is 4.\"") && error.contains("hint:"),
            "{error}"
        );
    }

    #[test]
    fn trimmed_replies_are_found() {
        let source = "{% for m in messages %}[{{ m.role }}] {{ m.content | trim }}</s>{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}";
        let tokenizer = tokenizer();
        let template =
            ChatTemplate::new(source, SpecialTokens::default(), "trimming").expect("template");
        let encoder = Encoder::new(&tokenizer, Some(&template), "trimming", &[]).expect("encoder");
        let encoded = encoder
            .encode(
                &conversation(&[("user", "hi"), ("assistant", "  hello there \n")]),
                LossScale::Default,
            )
            .expect("encode");
        // `</s>` is not a token of this vocabulary, so only the reply itself is labelled.
        assert_eq!(labelled_runs(&tokenizer, &encoded), vec!["hello there"]);
    }

    #[test]
    fn refused_conversations_are_row_errors() {
        let (tokenizer, template) = (tokenizer(), chatml());
        let encoder =
            Encoder::new(&tokenizer, Some(&template), "tiny-qwen2", &[]).expect("encoder");
        let sample = conversation(&[("user", "q"), ("tool", "x"), ("assistant", "a")]);
        let error = encoder
            .encode(&sample, LossScale::Default)
            .expect_err("tool role")
            .to_string();
        assert!(
            error.starts_with(
                "data.jsonl:7: the chat template of tiny-qwen2 refused the conversation"
            ),
            "{error}"
        );
        let (kept, report) = encode_samples(
            &encoder,
            &[sample.clone(), conversation(&MULTI_TURN[..2])],
            &EncodeOptions::default(),
        )
        .expect("non-strict");
        assert_eq!((kept.len(), report.dropped_template), (1, 1));
        let strict = EncodeOptions {
            strict: true,
            ..EncodeOptions::default()
        };
        assert!(encode_samples(&encoder, &[sample], &strict).is_err());
    }

    #[test]
    fn no_template_is_an_error_with_a_hint() {
        let tokenizer = tokenizer();
        let encoder = Encoder::new(&tokenizer, None, "base-model", &[]).expect("encoder");
        let error = encoder
            .check_task(Task::Sft)
            .expect_err("no template")
            .to_string();
        assert!(
            error.contains("the model base-model has no chat template")
                && error.contains("hint:")
                && error.contains("oxtune pt"),
            "{error}"
        );
        assert!(encoder.check_task(Task::Pt).is_ok());
        assert!(
            encoder
                .encode(&conversation(&MULTI_TURN[..2]), LossScale::Default)
                .is_err()
        );
    }

    #[test]
    fn pt_text_gets_eos_and_every_label_but_the_first() {
        let tokenizer = tokenizer();
        let eos = tokenizer.token_to_id("<|im_end|>").expect("eos");
        let encoder = Encoder::new(&tokenizer, None, "base", &[]).expect("encoder");
        let sample = Sample {
            origin: origin(),
            content: SampleContent::Text("hello world".into()),
        };
        let encoded = encoder.encode(&sample, LossScale::Default).expect("encode");
        assert_eq!(encoded.input_ids.last(), Some(&eos));
        assert_eq!(
            tokenizer.decode(&encoded.input_ids, false).expect("decode"),
            "hello world<|im_end|>"
        );
        assert_eq!(encoded.labels[0], IGNORE_INDEX);
        assert_eq!(
            encoded.labels[1..],
            encoded.input_ids[1..]
                .iter()
                .map(|&id| i64::from(id))
                .collect::<Vec<_>>()[..]
        );
        let pad = tokenizer.token_to_id("<|endoftext|>").expect("pad");
        assert_eq!(encoder.pad_id(), pad);
    }

    fn numbered(labels: Vec<i64>) -> Encoded {
        Encoded {
            input_ids: (0..labels.len() as u32).collect(),
            labels,
            origin: origin(),
        }
    }

    #[test]
    fn truncation_strategies() {
        let sample = numbered(vec![-100, -100, 2, 3, -100, 5]);
        assert_eq!(
            truncate(sample.clone(), Some(6), TruncationStrategy::Delete),
            Truncation::Fits(sample.clone())
        );
        assert_eq!(
            truncate(sample.clone(), Some(4), TruncationStrategy::Delete),
            Truncation::TooLong
        );
        let Truncation::Cut(left) = truncate(sample.clone(), Some(4), TruncationStrategy::Left)
        else {
            panic!("cut")
        };
        assert_eq!(
            (left.input_ids, left.labels),
            (vec![2, 3, 4, 5], vec![-100, 3, -100, 5])
        );
        let Truncation::Cut(right) = truncate(sample.clone(), Some(3), TruncationStrategy::Right)
        else {
            panic!("cut")
        };
        assert_eq!(
            (right.input_ids, right.labels),
            (vec![0, 1, 2], vec![-100, -100, 2])
        );
        assert_eq!(
            "left".parse::<TruncationStrategy>().expect("name"),
            TruncationStrategy::Left
        );
        assert!("middle".parse::<TruncationStrategy>().is_err());
    }

    #[test]
    fn encode_samples_counts_truncation_and_drops() {
        let (tokenizer, template) = (tokenizer(), chatml());
        let encoder =
            Encoder::new(&tokenizer, Some(&template), "tiny-qwen2", &[]).expect("encoder");
        let short = conversation(&MULTI_TURN[..2]);
        let long = conversation(&MULTI_TURN[..4]);
        let full = encoder
            .encode(&long, LossScale::Default)
            .expect("encode")
            .len();
        let short_len = encoder
            .encode(&short, LossScale::Default)
            .expect("encode")
            .len();
        let options = |strategy| EncodeOptions {
            max_length: Some(short_len),
            truncation_strategy: strategy,
            ..EncodeOptions::default()
        };
        let (kept, report) = encode_samples(
            &encoder,
            &[short.clone(), long.clone()],
            &options(TruncationStrategy::Delete),
        )
        .expect("delete");
        assert_eq!(
            (kept.len(), report.dropped_too_long, report.truncated),
            (1, 1, 0)
        );
        assert!(
            report.dropped_examples[0].contains(&format!(
                "data.jsonl:7: {full} tokens, over max_length {short_len}"
            )),
            "{:?}",
            report.dropped_examples
        );
        let (kept, report) = encode_samples(
            &encoder,
            std::slice::from_ref(&long),
            &options(TruncationStrategy::Left),
        )
        .expect("left");
        assert_eq!((kept[0].len(), report.truncated), (short_len, 1));
        // Right truncation to the prompt only leaves no target: dropped and counted.
        let prompt_only = EncodeOptions {
            max_length: Some(20),
            truncation_strategy: TruncationStrategy::Right,
            ..EncodeOptions::default()
        };
        let (kept, report) = encode_samples(&encoder, &[long], &prompt_only).expect("right");
        assert_eq!((kept.len(), report.dropped_no_target), (0, 1));
    }
}

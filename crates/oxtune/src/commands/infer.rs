//! `oxtune infer`: talk to a model.
//!
//! - In a terminal: an interactive chat. Tokens stream as they are generated, the
//!   conversation carries over between turns (the engine's prefix cache keeps the earlier
//!   turns' keys/values), and `/reset`, `/system TEXT`, `/help`, `/exit` control it.
//! - With stdin from a pipe or file: the whole input is one user message; only the answer is
//!   printed, so scripts can use it.
//! - With `--val_dataset IN --result_path OUT`: every row of IN (messages, alpaca
//!   instruction/input/output, or query/response) is answered and written to OUT (jsonl);
//!   all rows are queued at once and the engine batches them continuously.
//!
//! Every mode runs on the serving engine (`oxtune_engine`), the same code path as `deploy`.

use std::io::{BufRead as _, IsTerminal as _, Read as _, Write as _};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::{ArgAction, Args};
use oxtune_engine::{EngineConfig, EngineHandle, Event, FinishReason, Request, SamplingParams};
use oxtune_models::{ChatMessage, LoadedModel};

use super::ModelArgs;

#[derive(Debug, Args)]
pub struct InferArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    /// System prompt (replaces the template's default one).
    #[arg(long)]
    pub system: Option<String>,

    /// Most tokens to generate per answer.
    #[arg(long = "max_new_tokens", default_value_t = 512)]
    pub max_new_tokens: usize,

    /// 0 = greedy. Default: the model's generation_config.json, else 0.
    #[arg(long)]
    pub temperature: Option<f64>,

    /// Nucleus sampling mass (1 = off). Default: generation_config.json, else 1.
    #[arg(long = "top_p")]
    pub top_p: Option<f64>,

    /// Sample from the k most likely tokens (0 = off). Default: generation_config.json, else 0.
    #[arg(long = "top_k")]
    pub top_k: Option<usize>,

    /// Drop tokens below min_p x the best token's probability (0 = off).
    #[arg(long = "min_p")]
    pub min_p: Option<f64>,

    /// Penalise tokens already present (1 = off). Default: generation_config.json, else 1.
    #[arg(long = "repetition_penalty")]
    pub repetition_penalty: Option<f64>,

    /// Random seed: the same seed and input give the same text.
    #[arg(long)]
    pub seed: Option<u64>,

    /// Stop when one of these strings is generated (repeat the flag or give several).
    #[arg(long = "stop_words", num_args = 1..)]
    pub stop_words: Vec<String>,

    /// Print tokens as they are generated (`--stream false` prints whole answers).
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    pub stream: bool,

    /// A dataset to answer in batch (jsonl: messages, instruction/input/output or query/response).
    #[arg(long = "val_dataset", value_name = "FILE", requires = "result_path")]
    pub val_dataset: Option<PathBuf>,

    /// Where batch answers go (jsonl, written atomically).
    #[arg(long = "result_path", value_name = "FILE", requires = "val_dataset")]
    pub result_path: Option<PathBuf>,
}

/// How every answer is generated (the prompt aside).
struct GenerateOptions {
    max_new_tokens: usize,
    sampling: SamplingParams,
    stop_words: Vec<String>,
}

/// One finished answer.
struct Generation {
    text: String,
    finish_reason: FinishReason,
    prompt_tokens: usize,
    completion_tokens: usize,
}

pub fn run(args: &InferArgs) -> anyhow::Result<()> {
    let model = args.model.load()?;
    let options = generate_options(args, &model);
    let name = model.dir.display().to_string();
    let engine = Engine {
        // Batch mode queues every row at once: no admission cap.
        handle: EngineHandle::start(
            model,
            &[],
            EngineConfig {
                max_queued_requests: usize::MAX,
                ..EngineConfig::default()
            },
        )?,
        options,
    };
    if let (Some(dataset), Some(result_path)) = (&args.val_dataset, &args.result_path) {
        return run_dataset(&engine, args.system.as_deref(), dataset, result_path);
    }
    if std::io::stdin().is_terminal() {
        run_interactive(&engine, &name, args)
    } else {
        let mut input = String::new();
        std::io::stdin()
            .read_to_string(&mut input)
            .context("reading stdin")?;
        if input.trim().is_empty() {
            bail!(
                "stdin is empty\nhint: pipe a question in (`echo 'Hi' | oxtune infer ...`) or run in a terminal for a chat"
            );
        }
        let messages = conversation(
            args.system.as_deref(),
            vec![ChatMessage::new("user", input.trim_end())],
        );
        let mut stdout = std::io::stdout().lock();
        let generation = engine.answer(&messages, args.stream, &mut stdout)?;
        if !args.stream {
            stdout.write_all(generation.text.as_bytes())?;
        }
        writeln!(stdout)?;
        Ok(())
    }
}

/// Sampling settings: command line first, then the checkpoint's generation_config.json.
fn generate_options(args: &InferArgs, model: &LoadedModel) -> GenerateOptions {
    let defaults = &model.generation;
    let sampling_by_default = defaults.do_sample.unwrap_or(false);
    let temperature = args
        .temperature
        .or(if sampling_by_default {
            defaults.temperature.or(Some(1.0))
        } else {
            None
        })
        .unwrap_or(0.0);
    GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        sampling: SamplingParams {
            temperature,
            top_p: args.top_p.or(defaults.top_p).unwrap_or(1.0),
            top_k: args.top_k.or(defaults.top_k).unwrap_or(0),
            min_p: args.min_p.or(defaults.min_p).unwrap_or(0.0),
            repetition_penalty: args
                .repetition_penalty
                .or(defaults.repetition_penalty)
                .unwrap_or(1.0),
            seed: args.seed,
            ..SamplingParams::default()
        },
        stop_words: args.stop_words.clone(),
    }
}

/// The engine and what `infer` asks of it.
struct Engine {
    handle: EngineHandle,
    options: GenerateOptions,
}

impl Engine {
    /// The prompt for `messages`: the chat template with the assistant turn opened, or for
    /// models without a template, the contents joined (with the tokenizer's special tokens).
    fn prompt_ids(&self, messages: &[ChatMessage]) -> anyhow::Result<Vec<u32>> {
        let tokenizer = self.handle.tokenizer();
        Ok(match self.handle.chat_template() {
            Some(template) => tokenizer.encode(&template.render(messages, true)?, false)?,
            None => {
                let text: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
                tokenizer.encode(&text.join("\n"), true)?
            }
        })
    }

    /// Queues the answer to `messages`.
    fn submit(
        &self,
        id: &str,
        messages: &[ChatMessage],
    ) -> anyhow::Result<oxtune_engine::EventReceiver> {
        let ids = self.prompt_ids(messages)?;
        let room = self.handle.info().max_model_len.saturating_sub(ids.len());
        let mut request = Request::new(id, ids);
        request.sampling = self.options.sampling.clone();
        request.max_tokens = Some(self.options.max_new_tokens.min(room).max(1));
        request.stop = self.options.stop_words.clone();
        Ok(self.handle.submit(request)?)
    }

    /// Generates the answer to `messages`, writing text to `out` as it comes when `stream`.
    fn answer(
        &self,
        messages: &[ChatMessage],
        stream: bool,
        out: &mut dyn std::io::Write,
    ) -> anyhow::Result<Generation> {
        let events = self.submit("infer", messages)?;
        collect(events, &mut |piece| {
            if stream {
                out.write_all(piece.as_bytes())?;
                out.flush()?;
            }
            Ok(())
        })
    }
}

impl Drop for Engine {
    /// Stops the engine thread before the process exits, so it never runs on a GPU context
    /// that is being torn down.
    fn drop(&mut self) {
        self.handle.shutdown();
    }
}

/// Waits for a request's end, passing each piece of text to `on_text`.
fn collect(
    mut events: oxtune_engine::EventReceiver,
    on_text: &mut dyn FnMut(&str) -> std::io::Result<()>,
) -> anyhow::Result<Generation> {
    let mut text = String::new();
    loop {
        match events.blocking_recv() {
            Some(Event::Token { text: piece, .. }) => {
                on_text(&piece)?;
                text.push_str(&piece);
            }
            Some(Event::Finished {
                reason,
                text: piece,
                usage,
                ..
            }) => {
                on_text(&piece)?;
                text.push_str(&piece);
                return Ok(Generation {
                    text,
                    finish_reason: reason,
                    prompt_tokens: usage.prompt_tokens,
                    completion_tokens: usage.completion_tokens,
                });
            }
            Some(Event::Error { message }) => bail!("generation failed: {message}"),
            None => bail!("the engine stopped before the answer ended"),
        }
    }
}

fn conversation(system: Option<&str>, turns: Vec<ChatMessage>) -> Vec<ChatMessage> {
    system
        .map(|s| ChatMessage::new("system", s))
        .into_iter()
        .chain(turns)
        .collect()
}

const HELP: &str = "commands: /reset (new conversation), /system TEXT (set the system prompt and reset), /help, /exit";

fn run_interactive(engine: &Engine, name: &str, args: &InferArgs) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    let stdin = std::io::stdin();
    let mut system = args.system.clone();
    let mut turns: Vec<ChatMessage> = Vec::new();
    writeln!(stdout, "oxtune chat with {name} ({HELP})")?;
    loop {
        write!(stdout, "<<< ")?;
        stdout.flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            writeln!(stdout)?;
            return Ok(());
        }
        let line = line.trim();
        match line
            .split_once(' ')
            .map_or((line, ""), |(command, rest)| (command, rest.trim()))
        {
            ("", _) => continue,
            ("/exit" | "/quit", _) => return Ok(()),
            ("/help", _) => writeln!(stdout, "{HELP}")?,
            ("/reset" | "/clear", _) => {
                turns.clear();
                writeln!(stdout, "(conversation reset)")?;
            }
            ("/system", text) => {
                system = (!text.is_empty()).then(|| text.to_owned());
                turns.clear();
                writeln!(
                    stdout,
                    "(system prompt {}; conversation reset)",
                    if system.is_some() { "set" } else { "cleared" }
                )?;
            }
            _ => {
                turns.push(ChatMessage::new("user", line));
                let messages = conversation(system.as_deref(), turns.clone());
                write!(stdout, ">>> ")?;
                let generation = engine.answer(&messages, args.stream, &mut stdout)?;
                if !args.stream {
                    write!(stdout, "{}", generation.text)?;
                }
                writeln!(stdout)?;
                turns.push(ChatMessage::new("assistant", generation.text));
            }
        }
    }
}

/// One dataset row: the conversation to answer and, when the row has one, the reference.
struct Row {
    messages: Vec<ChatMessage>,
    labels: Option<String>,
}

fn parse_row(value: &serde_json::Value, system: Option<&str>) -> Result<Row, String> {
    let text = |key: &str| {
        value
            .get(key)
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
    };
    let row_system = text("system");
    let system = system.map(str::to_owned).or(row_system);
    if let Some(messages) = value.get("messages") {
        let mut messages: Vec<ChatMessage> = serde_json::from_value(messages.clone())
            .map_err(|e| format!("`messages` must be a list of {{role, content}} objects: {e}"))?;
        let labels = match messages.last() {
            Some(last) if last.role == "assistant" => messages.pop().map(|m| m.content),
            Some(_) => None,
            None => return Err("`messages` is empty".into()),
        };
        if let Some(system) = system
            && messages.first().is_none_or(|m| m.role != "system")
        {
            messages.insert(0, ChatMessage::new("system", system));
        }
        return Ok(Row { messages, labels });
    }
    let (query, labels) = if let Some(instruction) = text("instruction") {
        let input = text("input").unwrap_or_default();
        let query = if input.is_empty() {
            instruction
        } else {
            format!("{instruction}\n{input}")
        };
        (query, text("output"))
    } else if let Some(query) = text("query") {
        (query, text("response"))
    } else {
        return Err(
            "expected `messages`, `instruction` (alpaca) or `query` (query/response)".into(),
        );
    };
    let mut turns = Vec::new();
    if let Some(history) = value.get("history").and_then(serde_json::Value::as_array) {
        for pair in history {
            let pair: (String, String) = serde_json::from_value(pair.clone())
                .map_err(|e| format!("`history` must be a list of [query, response] pairs: {e}"))?;
            turns.push(ChatMessage::new("user", pair.0));
            turns.push(ChatMessage::new("assistant", pair.1));
        }
    }
    turns.push(ChatMessage::new("user", query));
    Ok(Row {
        messages: conversation(system.as_deref(), turns),
        labels,
    })
}

fn run_dataset(
    engine: &Engine,
    system: Option<&str>,
    dataset: &Path,
    result_path: &Path,
) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(dataset)
        .with_context(|| format!("reading {}", dataset.display()))?;
    let mut rows = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not valid JSON", dataset.display(), index + 1))?;
        let row = parse_row(&value, system)
            .map_err(|message| anyhow::anyhow!("{}:{}: {message}", dataset.display(), index + 1))?;
        rows.push(row);
    }
    if rows.is_empty() {
        bail!(
            "{}: no rows\nhint: the dataset is jsonl, one JSON object per line",
            dataset.display()
        );
    }
    let progress = indicatif::ProgressBar::new(rows.len() as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} rows [{elapsed_precise}<{eta_precise}] {msg}",
        )?,
    );
    let directory = result_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(directory)
        .with_context(|| format!("creating {}", directory.display()))?;
    let mut output = tempfile::NamedTempFile::new_in(directory)
        .with_context(|| format!("creating a temporary file in {}", directory.display()))?;
    // Every row is queued at once; the engine batches them as its cache allows.
    let pending = rows
        .iter()
        .enumerate()
        .map(|(index, row)| engine.submit(&format!("row-{}", index + 1), &row.messages))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut generated_tokens = 0;
    for (row, events) in rows.iter().zip(pending) {
        let generation = collect(events, &mut |_| Ok(()))?;
        generated_tokens += generation.completion_tokens;
        let record = serde_json::json!({
            "messages": row.messages,
            "response": generation.text,
            "labels": row.labels,
            "finish_reason": generation.finish_reason.as_str(),
            "usage": {
                "prompt_tokens": generation.prompt_tokens,
                "completion_tokens": generation.completion_tokens,
            },
        });
        serde_json::to_writer(&mut output, &record)?;
        writeln!(output)?;
        progress.inc(1);
        #[expect(clippy::cast_precision_loss, reason = "a rate for display")]
        let rate = generated_tokens as f64 / progress.elapsed().as_secs_f64().max(1e-9);
        progress.set_message(format!("{rate:.1} tokens/s"));
    }
    output.as_file().sync_all()?;
    output
        .persist(result_path)
        .with_context(|| format!("writing {}", result_path.display()))?;
    progress.finish_and_clear();
    tracing::info!(rows = rows.len(), path = %result_path.display(), "wrote answers");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_of_every_format_become_conversations() -> Result<(), String> {
        let messages = parse_row(
            &serde_json::json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}),
            Some("be brief"),
        )?;
        assert_eq!(
            messages.messages,
            [
                ChatMessage::new("system", "be brief"),
                ChatMessage::new("user", "hi")
            ]
        );
        assert_eq!(messages.labels.as_deref(), Some("hello"));

        let alpaca = parse_row(
            &serde_json::json!({"instruction": "写PRD", "input": "登录", "output": "1. 概述"}),
            None,
        )?;
        assert_eq!(alpaca.messages, [ChatMessage::new("user", "写PRD\n登录")]);
        assert_eq!(alpaca.labels.as_deref(), Some("1. 概述"));

        let query = parse_row(
            &serde_json::json!({"query": "q2", "history": [["q1", "a1"]], "system": "s"}),
            None,
        )?;
        assert_eq!(query.messages.len(), 4);
        assert_eq!(query.messages[0], ChatMessage::new("system", "s"));

        let bad = parse_row(&serde_json::json!({"text": "x"}), None)
            .err()
            .unwrap_or_default();
        assert!(bad.contains("expected `messages`"), "{bad}");
        Ok(())
    }
}

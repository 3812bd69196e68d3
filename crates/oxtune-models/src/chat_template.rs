//! Chat templates: the Jinja `chat_template` of `tokenizer_config.json` (or the
//! `chat_template.jinja` file newer transformers write beside it), rendered with minijinja
//! the way transformers' `apply_chat_template` renders it:
//!
//! - `trim_blocks` and `lstrip_blocks` on, loop controls available;
//! - Python string methods (`.strip()`, `.startswith()`, …) through minijinja-contrib's
//!   pycompat;
//! - `raise_exception(message)` fails the render with the template's own message;
//! - `tojson` writes Python `json.dumps` output (`ensure_ascii=False`, `", "` and `": "`
//!   separators, optional `indent`), not minijinja's HTML-safe JSON;
//! - `strftime_now(format)` for templates that print today's date;
//! - the context holds `messages`, `add_generation_prompt`, `tools` when given, and the
//!   special-token strings (`bos_token`, `eos_token`, `unk_token`, `pad_token`).

use std::fmt::Write as _;
use std::path::Path;

use minijinja::value::{Kwargs, Serde, Value, ValueKind};
use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::tokenizer::{SpecialTokens, TOKENIZER_CONFIG};
use crate::{Error, Result};

const TEMPLATE_NAME: &str = "chat_template";

/// One chat message. `content` is plain text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template with the special tokens it may refer to.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    special_tokens: SpecialTokens,
    source_file: String,
}

impl ChatTemplate {
    /// Reads the template of the model in `dir`: `chat_template.jinja` if present, else the
    /// `chat_template` key of `tokenizer_config.json` (a string, or a list of named templates
    /// of which `default` is used). `Ok(None)` when the model has no template.
    pub fn load(dir: &Path, special_tokens: &SpecialTokens) -> Result<Option<Self>> {
        let special_tokens = special_tokens.clone();
        let config_path = dir.join(TOKENIZER_CONFIG);
        let config: serde_json::Value = if config_path.is_file() {
            crate::error::read_json(&config_path)?
        } else {
            serde_json::Value::Null
        };
        let jinja_path = dir.join("chat_template.jinja");
        if jinja_path.is_file() {
            let source = crate::error::read_to_string(&jinja_path)?;
            return Self::new(&source, special_tokens, &jinja_path.display().to_string()).map(Some);
        }
        let source = match config.get("chat_template") {
            None | Some(serde_json::Value::Null) => return Ok(None),
            Some(serde_json::Value::String(source)) => source.clone(),
            Some(serde_json::Value::Array(named)) => {
                let default = named
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"));
                match default
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                {
                    Some(source) => source.to_owned(),
                    None => {
                        return Err(Error::Config {
                            path: config_path,
                            key: "chat_template".into(),
                            message: "a list of named templates without one named `default`".into(),
                        });
                    }
                }
            }
            Some(_) => {
                return Err(Error::Config {
                    path: config_path,
                    key: "chat_template".into(),
                    message: "expected a string or a list of {name, template}".into(),
                });
            }
        };
        Self::new(
            &source,
            special_tokens,
            &format!("{} (key chat_template)", config_path.display()),
        )
        .map(Some)
    }

    /// Compiles `source`; `source_file` names it in error messages.
    pub fn new(source: &str, special_tokens: SpecialTokens, source_file: &str) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| template_error(source_file, &e))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(|e| template_error(source_file, &e))?;
        Ok(Self {
            env,
            special_tokens,
            source_file: source_file.to_owned(),
        })
    }

    /// Renders `messages`; `add_generation_prompt` appends the assistant turn's opening.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_with_tools(messages, add_generation_prompt, None)
    }

    /// Renders with an optional `tools` list (OpenAI function schemas).
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        tools: Option<&serde_json::Value>,
    ) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| template_error(&self.source_file, &e))?;
        let special = &self.special_tokens;
        let context = minijinja::context! {
            messages => Value::from(Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            tools => tools.map(|t| Value::from(Serde(t))),
            bos_token => special.bos_token.clone().unwrap_or_default(),
            eos_token => special.eos_token.clone().unwrap_or_default(),
            unk_token => special.unk_token.clone(),
            pad_token => special.pad_token.clone(),
        };
        template
            .render(context)
            .map_err(|e| template_error(&self.source_file, &e))
    }
}

fn template_error(source_file: &str, error: &minijinja::Error) -> Error {
    let mut message = error.to_string();
    if let Some(line) = error.line() {
        let _ = write!(message, " (template line {line})");
    }
    let mut source = std::error::Error::source(error);
    while let Some(inner) = source {
        let _ = write!(message, ": {inner}");
        source = inner.source();
    }
    if error.kind() != ErrorKind::InvalidOperation {
        message.push_str(
            "\nhint: fix the chat_template in tokenizer_config.json (or chat_template.jinja)",
        );
    }
    Error::Template {
        source_file: source_file.to_owned(),
        message,
    }
}

/// `raise_exception(message)`: the template refuses the conversation.
fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(
        ErrorKind::InvalidOperation,
        format!("the template raised: {message}"),
    ))
}

/// `strftime_now(format)`: the local date and time, formatted like Python's strftime.
fn strftime_now(format: String) -> String {
    chrono::Local::now().format(&format).to_string()
}

/// `tojson` with the output of Python's `json.dumps(value, ensure_ascii=False, indent=...)`.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_python_json(&mut out, &value, indent, 0, sort_keys.unwrap_or(false))?;
    Ok(Value::from_safe_string(out))
}

fn write_python_json(
    out: &mut String,
    value: &Value,
    indent: Option<usize>,
    level: usize,
    sort_keys: bool,
) -> std::result::Result<(), minijinja::Error> {
    let to_json =
        |e: serde_json::Error| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string());
    let newline = |out: &mut String, level: usize| {
        if let Some(width) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(width * level));
        }
    };
    let item_separator = if indent.is_some() { "," } else { ", " };
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => match value.as_i64() {
            Some(integer) => out.push_str(&integer.to_string()),
            None => {
                let float = f64::try_from(value.clone())?;
                out.push_str(&serde_json::to_string(&float).map_err(to_json)?);
            }
        },
        ValueKind::String => out
            .push_str(&serde_json::to_string(value.as_str().unwrap_or_default()).map_err(to_json)?),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_separator);
                }
                newline(out, level + 1);
                write_python_json(out, item, indent, level + 1, sort_keys)?;
            }
            newline(out, level);
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if sort_keys {
                keys.sort();
            }
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_separator);
                }
                newline(out, level + 1);
                let key_text = key.as_str().map_or_else(|| key.to_string(), str::to_owned);
                out.push_str(&serde_json::to_string(&key_text).map_err(to_json)?);
                out.push_str(": ");
                write_python_json(out, &value.get_item(key)?, indent, level + 1, sort_keys)?;
            }
            newline(out, level);
            out.push('}');
        }
        _ => out.push_str(&serde_json::to_string(&value.to_string()).map_err(to_json)?),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(source: &str) -> Result<ChatTemplate> {
        ChatTemplate::new(
            source,
            SpecialTokens {
                bos_token: Some("<s>".into()),
                ..SpecialTokens::default()
            },
            "test",
        )
    }

    #[test]
    fn tojson_matches_python_json_dumps() -> Result<()> {
        let t = template("{{ messages | tojson }}|{{ messages[0] | tojson(indent=2) }}")?;
        let rendered = t.render(&[ChatMessage::new("user", "你好 \"<b>\"\n")], false)?;
        assert_eq!(
            rendered,
            "[{\"role\": \"user\", \"content\": \"你好 \\\"<b>\\\"\\n\"}]|{\n  \"role\": \"user\",\n  \"content\": \"你好 \\\"<b>\\\"\\n\"\n}"
        );
        Ok(())
    }

    #[test]
    fn python_string_methods_and_special_tokens() -> Result<()> {
        let t = template(
            "{{ bos_token }}{% for m in messages %}{{ m.content.strip().upper() }}{% endfor %}",
        )?;
        assert_eq!(
            t.render(&[ChatMessage::new("user", "  hi ")], false)?,
            "<s>HI"
        );
        Ok(())
    }

    #[test]
    fn raise_exception_surfaces_the_template_message() -> Result<()> {
        let t = template(
            "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}ok",
        )?;
        let message = t
            .render(&[ChatMessage::new("assistant", "x")], false)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            message.contains("Conversation must start with user"),
            "{message}"
        );
        Ok(())
    }

    #[test]
    fn syntax_errors_name_the_source_and_line() {
        let message = template("line one\n{% for m in messages %}{{ m.content }")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(message.contains("chat template from test"), "{message}");
        assert!(message.contains("line 2"), "{message}");
    }
}

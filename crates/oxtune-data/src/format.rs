//! Dataset formats: which one a row is in, whether it is well formed, and its conversation.
//!
//! | format           | keys                                                                 |
//! |------------------|----------------------------------------------------------------------|
//! | `messages`       | `messages: [{role, content}]` (roles system/user/assistant/tool)     |
//! | `sharegpt`       | `conversations: [{from, value}]` (from human/gpt/system/…), `system`? |
//! | `alpaca`         | `instruction`, `input`?, `output`, `system`?                         |
//! | `query-response` | `query`, `response`, `history`? (`[[query, response], …]`), `system`? |
//! | `preference`     | `chosen` + `rejected` (strings or message lists, `prompt`?), or      |
//! |                  | `messages` / `query`+`response` plus `rejected_response`             |
//! | `kto`            | `messages` or `query`+`response` or `prompt`+`completion`, plus `label` |
//!
//! Detection looks at the keys only; [`validate`] then checks types, roles and order and
//! returns every problem of the row (the caller adds file and line).

use std::borrow::Cow;

use serde_json::{Map, Value};

use crate::reader::json_type_name;

/// The layout of one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Format {
    Messages,
    Sharegpt,
    Alpaca,
    QueryResponse,
    Preference,
    Kto,
}

impl Format {
    pub const ALL: [Self; 6] = [
        Self::Messages,
        Self::Sharegpt,
        Self::Alpaca,
        Self::QueryResponse,
        Self::Preference,
        Self::Kto,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Messages => "messages",
            Self::Sharegpt => "sharegpt",
            Self::Alpaca => "alpaca",
            Self::QueryResponse => "query-response",
            Self::Preference => "preference",
            Self::Kto => "kto",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|f| f.name() == name.replace('_', "-"))
    }

    /// The format a row's keys say it is in, if any.
    pub fn detect(row: &Map<String, Value>) -> Option<Self> {
        let has = |key: &str| row.contains_key(key);
        let rejected = has("rejected_response") || has("rejected_messages");
        if has("messages") || has("conversations") || (has("query") && has("response")) {
            if rejected {
                return Some(Self::Preference);
            }
            if has("label") {
                return Some(Self::Kto);
            }
        }
        if has("messages") {
            Some(Self::Messages)
        } else if has("conversations") {
            Some(Self::Sharegpt)
        } else if has("chosen") && has("rejected") {
            Some(Self::Preference)
        } else if has("prompt") && has("completion") && has("label") {
            Some(Self::Kto)
        } else if has("instruction") && has("output") {
            Some(Self::Alpaca)
        } else if has("query") && has("response") {
            Some(Self::QueryResponse)
        } else {
            None
        }
    }
}

/// The keys that identify each format, for error hints.
pub const FORMAT_HINT: &str = "rows need `messages`, `conversations`, `instruction`+`output`, `query`+`response`, `chosen`+`rejected`, or a KTO `label` (see docs/data.md)";

/// How bad a problem is: errors make `data check` fail, warnings do not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Warning,
    Error,
}

/// One problem of one row, at a field path such as `messages[2].role`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub severity: Severity,
    pub field: String,
    pub message: String,
}

impl Problem {
    fn error(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Error,
            field: field.into(),
            message: message.into(),
        }
    }

    fn warning(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Warning,
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Who speaks a turn, with every format's spelling mapped to one name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::User => "user",
            Self::Assistant => "assistant",
            Self::Tool => "tool",
        }
    }

    fn from_messages(role: &str) -> Option<Self> {
        match role {
            "system" | "developer" => Some(Self::System),
            "user" => Some(Self::User),
            "assistant" => Some(Self::Assistant),
            "tool" | "function" | "tool_response" | "observation" | "tool_call" => Some(Self::Tool),
            _ => None,
        }
    }

    fn from_sharegpt(from: &str) -> Option<Self> {
        match from {
            "system" => Some(Self::System),
            "human" | "user" => Some(Self::User),
            "gpt" | "assistant" | "function_call" => Some(Self::Assistant),
            "observation" | "tool" | "function" => Some(Self::Tool),
            _ => None,
        }
    }
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn<'a> {
    pub role: Role,
    /// Borrowed from the row, except where a format joins fields (alpaca's instruction and
    /// input make one user turn).
    pub text: Cow<'a, str>,
}

/// Every problem of `row` read as `format` (empty when the row is well formed).
pub fn validate(format: Format, row: &Map<String, Value>) -> Vec<Problem> {
    let mut problems = Vec::new();
    optional_string(row, "system", &mut problems);
    match format {
        Format::Messages => check_messages(row, "messages", true, &mut problems),
        Format::Sharegpt => check_sharegpt(row, &mut problems),
        Format::Alpaca => {
            required_text(row, "instruction", &mut problems);
            optional_string(row, "input", &mut problems);
            required_text(row, "output", &mut problems);
        }
        Format::QueryResponse => check_query_response(row, &mut problems),
        Format::Preference => check_preference(row, &mut problems),
        Format::Kto => check_kto(row, &mut problems),
    }
    problems
}

/// The turns of a row in order (system, then user/assistant…). Malformed parts are skipped:
/// run [`validate`] first where that matters. For preference rows the chosen answer is the
/// final assistant turn.
pub fn conversation(format: Format, row: &Map<String, Value>) -> Vec<Turn<'_>> {
    let mut turns = Vec::new();
    if let Some(system) = row.get("system").and_then(Value::as_str) {
        turns.push(Turn {
            role: Role::System,
            text: Cow::Borrowed(system),
        });
    }
    let text = |key: &str| row.get(key).and_then(Value::as_str);
    match format {
        Format::Messages => push_messages(&mut turns, row.get("messages")),
        Format::Sharegpt => {
            for message in row
                .get("conversations")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let role = message
                    .get("from")
                    .and_then(Value::as_str)
                    .and_then(Role::from_sharegpt);
                if let (Some(role), Some(text)) =
                    (role, message.get("value").and_then(Value::as_str))
                {
                    turns.push(Turn {
                        role,
                        text: Cow::Borrowed(text),
                    });
                }
            }
        }
        Format::Alpaca => {
            // One user turn, instruction and input joined by a newline (as ms-swift renders it).
            let instruction = text("instruction").unwrap_or("");
            let prompt = match text("input").filter(|input| !input.is_empty()) {
                Some(input) => Cow::Owned(format!("{instruction}\n{input}")),
                None => Cow::Borrowed(instruction),
            };
            turns.push(Turn {
                role: Role::User,
                text: prompt,
            });
            if let Some(output) = text("output") {
                turns.push(Turn {
                    role: Role::Assistant,
                    text: Cow::Borrowed(output),
                });
            }
        }
        Format::QueryResponse | Format::Kto | Format::Preference if row.contains_key("query") => {
            for pair in row
                .get("history")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some([Value::String(query), Value::String(response)]) =
                    pair.as_array().map(Vec::as_slice)
                {
                    turns.push(Turn {
                        role: Role::User,
                        text: Cow::Borrowed(query),
                    });
                    turns.push(Turn {
                        role: Role::Assistant,
                        text: Cow::Borrowed(response),
                    });
                }
            }
            if let Some(query) = text("query") {
                turns.push(Turn {
                    role: Role::User,
                    text: Cow::Borrowed(query),
                });
            }
            if let Some(response) = text("response") {
                turns.push(Turn {
                    role: Role::Assistant,
                    text: Cow::Borrowed(response),
                });
            }
        }
        Format::Kto | Format::Preference if row.contains_key("messages") => {
            push_messages(&mut turns, row.get("messages"))
        }
        Format::Kto => {
            if let Some(prompt) = text("prompt") {
                turns.push(Turn {
                    role: Role::User,
                    text: Cow::Borrowed(prompt),
                });
            }
            if let Some(completion) = text("completion") {
                turns.push(Turn {
                    role: Role::Assistant,
                    text: Cow::Borrowed(completion),
                });
            }
        }
        Format::Preference => {
            match row.get("prompt") {
                Some(Value::String(prompt)) => turns.push(Turn {
                    role: Role::User,
                    text: Cow::Borrowed(prompt),
                }),
                prompt @ Some(Value::Array(_)) => push_messages(&mut turns, prompt),
                _ => {}
            }
            match row.get("chosen") {
                Some(Value::String(chosen)) => turns.push(Turn {
                    role: Role::Assistant,
                    text: Cow::Borrowed(chosen),
                }),
                chosen @ Some(Value::Array(_)) => push_messages(&mut turns, chosen),
                _ => {}
            }
        }
        Format::QueryResponse => {}
    }
    turns
}

fn push_messages<'a>(turns: &mut Vec<Turn<'a>>, value: Option<&'a Value>) {
    for message in value.and_then(Value::as_array).into_iter().flatten() {
        let role = message
            .get("role")
            .and_then(Value::as_str)
            .and_then(Role::from_messages);
        if let (Some(role), Some(text)) = (role, message.get("content").and_then(Value::as_str)) {
            turns.push(Turn {
                role,
                text: Cow::Borrowed(text),
            });
        }
    }
}

/// The number of user→assistant exchanges in a conversation.
pub fn count_exchanges(turns: &[Turn<'_>]) -> usize {
    turns
        .windows(2)
        .filter(|pair| pair[0].role != Role::Assistant && pair[1].role == Role::Assistant)
        .count()
}

fn required_text(row: &Map<String, Value>, key: &str, problems: &mut Vec<Problem>) {
    match row.get(key) {
        None => problems.push(Problem::error(key, "missing")),
        Some(Value::String(text)) if text.trim().is_empty() => {
            problems.push(Problem::error(key, "is empty"))
        }
        Some(Value::String(_)) => {}
        Some(other) => problems.push(Problem::error(
            key,
            format!("expected a string, found {}", json_type_name(other)),
        )),
    }
}

fn optional_string(row: &Map<String, Value>, key: &str, problems: &mut Vec<Problem>) {
    match row.get(key) {
        None | Some(Value::String(_) | Value::Null) => {}
        Some(other) => problems.push(Problem::error(
            key,
            format!("expected a string, found {}", json_type_name(other)),
        )),
    }
}

/// Checks a `[{role, content}]` list; `ends_with_assistant` asks for a final assistant turn.
fn check_message_list(
    value: Option<&Value>,
    field: &str,
    ends_with_assistant: bool,
    problems: &mut Vec<Problem>,
) {
    let messages = match value {
        None => return problems.push(Problem::error(field, "missing")),
        Some(Value::Array(messages)) if messages.is_empty() => {
            return problems.push(Problem::error(field, "is empty"));
        }
        Some(Value::Array(messages)) => messages,
        Some(other) => {
            return problems.push(Problem::error(
                field,
                format!(
                    "expected an array of messages, found {}",
                    json_type_name(other)
                ),
            ));
        }
    };
    let mut roles = Vec::with_capacity(messages.len());
    for (index, message) in messages.iter().enumerate() {
        let at = format!("{field}[{index}]");
        let Some(message) = message.as_object() else {
            problems.push(Problem::error(
                &at,
                format!(
                    "expected an object {{\"role\", \"content\"}}, found {}",
                    json_type_name(message)
                ),
            ));
            continue;
        };
        let role = match message.get("role") {
            Some(Value::String(role)) => match Role::from_messages(role) {
                Some(known) => Some(known),
                None => {
                    problems.push(Problem::error(
                        format!("{at}.role"),
                        format!("unknown role `{role}` (expected system, user, assistant or tool)"),
                    ));
                    None
                }
            },
            Some(other) => {
                problems.push(Problem::error(
                    format!("{at}.role"),
                    format!("expected a string, found {}", json_type_name(other)),
                ));
                None
            }
            None => {
                problems.push(Problem::error(format!("{at}.role"), "missing"));
                None
            }
        };
        match message.get("content") {
            Some(Value::String(content))
                if content.trim().is_empty() && role != Some(Role::System) =>
            {
                problems.push(Problem::warning(format!("{at}.content"), "is empty"));
            }
            Some(Value::String(_)) => {}
            Some(Value::Null) | None if message.contains_key("tool_calls") => {}
            Some(other) => problems.push(Problem::error(
                format!("{at}.content"),
                format!("expected a string, found {}", json_type_name(other)),
            )),
            None => problems.push(Problem::error(format!("{at}.content"), "missing")),
        }
        roles.extend(role.map(|role| (index, role)));
    }
    check_order(&roles, field, ends_with_assistant, problems);
}

/// System only first, a user turn before the first answer, no two same speakers in a row, and
/// (for training rows) an assistant turn last.
fn check_order(
    roles: &[(usize, Role)],
    field: &str,
    ends_with_assistant: bool,
    problems: &mut Vec<Problem>,
) {
    for &(index, role) in roles {
        if role == Role::System && index != 0 {
            problems.push(Problem::error(
                format!("{field}[{index}]"),
                "a system message may only come first",
            ));
        }
    }
    if let Some(&(index, Role::Assistant)) = roles.iter().find(|(_, role)| *role != Role::System) {
        problems.push(Problem::error(
            format!("{field}[{index}]"),
            "the conversation starts with an assistant turn; expected a user turn first",
        ));
    }
    for pair in roles.windows(2) {
        let ((_, first), (index, second)) = (pair[0], pair[1]);
        if first == second && first != Role::Tool {
            problems.push(Problem::warning(
                format!("{field}[{index}]"),
                format!("two {} turns in a row", first.name()),
            ));
        }
    }
    if ends_with_assistant
        && let Some(&(index, last)) = roles.last()
        && last != Role::Assistant
    {
        problems.push(Problem::error(
            format!("{field}[{index}]"),
            format!(
                "the last turn is {}, so there is no answer to learn; end with an assistant turn",
                last.name()
            ),
        ));
    }
}

fn check_messages(
    row: &Map<String, Value>,
    key: &str,
    ends_with_assistant: bool,
    problems: &mut Vec<Problem>,
) {
    check_message_list(row.get(key), key, ends_with_assistant, problems);
}

fn check_sharegpt(row: &Map<String, Value>, problems: &mut Vec<Problem>) {
    let field = "conversations";
    let turns = match row.get(field) {
        None => return problems.push(Problem::error(field, "missing")),
        Some(Value::Array(turns)) if turns.is_empty() => {
            return problems.push(Problem::error(field, "is empty"));
        }
        Some(Value::Array(turns)) => turns,
        Some(other) => {
            return problems.push(Problem::error(
                field,
                format!("expected an array, found {}", json_type_name(other)),
            ));
        }
    };
    let mut roles = Vec::with_capacity(turns.len());
    for (index, turn) in turns.iter().enumerate() {
        let at = format!("{field}[{index}]");
        let Some(turn) = turn.as_object() else {
            problems.push(Problem::error(
                &at,
                format!(
                    "expected an object {{\"from\", \"value\"}}, found {}",
                    json_type_name(turn)
                ),
            ));
            continue;
        };
        match turn.get("from") {
            Some(Value::String(from)) => match Role::from_sharegpt(from) {
                Some(role) => roles.push((index, role)),
                None => problems.push(Problem::error(format!("{at}.from"), format!("unknown speaker `{from}` (expected human, gpt, system, function_call or observation)"))),
            },
            Some(other) => problems.push(Problem::error(format!("{at}.from"), format!("expected a string, found {}", json_type_name(other)))),
            None => problems.push(Problem::error(format!("{at}.from"), "missing")),
        }
        match turn.get("value") {
            Some(Value::String(value)) if value.trim().is_empty() => {
                problems.push(Problem::warning(format!("{at}.value"), "is empty"))
            }
            Some(Value::String(_)) => {}
            Some(other) => problems.push(Problem::error(
                format!("{at}.value"),
                format!("expected a string, found {}", json_type_name(other)),
            )),
            None => problems.push(Problem::error(format!("{at}.value"), "missing")),
        }
    }
    check_order(&roles, field, true, problems);
}

fn check_query_response(row: &Map<String, Value>, problems: &mut Vec<Problem>) {
    required_text(row, "query", problems);
    required_text(row, "response", problems);
    match row.get("history") {
        None | Some(Value::Null) => {}
        Some(Value::Array(pairs)) => {
            for (index, pair) in pairs.iter().enumerate() {
                if !matches!(
                    pair.as_array().map(Vec::as_slice),
                    Some([Value::String(_), Value::String(_)])
                ) {
                    problems.push(Problem::error(
                        format!("history[{index}]"),
                        "expected a [query, response] pair of strings",
                    ));
                }
            }
        }
        Some(other) => problems.push(Problem::error(
            "history",
            format!(
                "expected an array of [query, response] pairs, found {}",
                json_type_name(other)
            ),
        )),
    }
}

fn check_preference(row: &Map<String, Value>, problems: &mut Vec<Problem>) {
    if row.contains_key("chosen") || row.contains_key("rejected") {
        for key in ["chosen", "rejected"] {
            match row.get(key) {
                Some(Value::Array(_)) => check_message_list(row.get(key), key, true, problems),
                _ => required_text(row, key, problems),
            }
        }
        match row.get("prompt") {
            None | Some(Value::String(_)) => {}
            Some(Value::Array(_)) => {
                check_message_list(row.get("prompt"), "prompt", false, problems)
            }
            Some(other) => problems.push(Problem::error(
                "prompt",
                format!(
                    "expected a string or a message list, found {}",
                    json_type_name(other)
                ),
            )),
        }
        if row.get("chosen").is_some() && row.get("chosen") == row.get("rejected") {
            problems.push(Problem::error(
                "rejected",
                "equals `chosen`; a preference pair needs two different answers",
            ));
        }
        return;
    }
    if row.contains_key("messages") {
        check_messages(row, "messages", true, problems);
    } else if row.contains_key("conversations") {
        check_sharegpt(row, problems);
    } else {
        check_query_response(row, problems);
    }
    if row.contains_key("rejected_messages") {
        check_message_list(
            row.get("rejected_messages"),
            "rejected_messages",
            true,
            problems,
        );
    } else {
        required_text(row, "rejected_response", problems);
        let chosen = match row
            .get("messages")
            .and_then(Value::as_array)
            .and_then(|m| m.last())
        {
            Some(last) => last.get("content"),
            None => row.get("response"),
        };
        if chosen.is_some() && chosen == row.get("rejected_response") {
            problems.push(Problem::error(
                "rejected_response",
                "equals the chosen answer; a preference pair needs two different answers",
            ));
        }
    }
}

fn check_kto(row: &Map<String, Value>, problems: &mut Vec<Problem>) {
    if row.contains_key("messages") {
        check_messages(row, "messages", true, problems);
    } else if row.contains_key("query") {
        check_query_response(row, problems);
    } else {
        required_text(row, "prompt", problems);
        required_text(row, "completion", problems);
    }
    match row.get("label") {
        Some(Value::Bool(_)) => {}
        Some(Value::Number(n)) if n.as_u64().is_some_and(|n| n <= 1) => {}
        Some(other) => problems.push(Problem::error(
            "label",
            format!(
                "expected true/false (desirable or not), found {}",
                json_type_name(other)
            ),
        )),
        None => problems.push(Problem::error("label", "missing")),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn object(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => Map::new(),
        }
    }

    #[test]
    fn detects_every_format_from_its_keys() {
        let cases = [
            (
                json!({"messages": [{"role": "user", "content": "a"}]}),
                Some(Format::Messages),
            ),
            (
                json!({"conversations": [{"from": "human", "value": "a"}]}),
                Some(Format::Sharegpt),
            ),
            (
                json!({"instruction": "a", "input": "", "output": "b"}),
                Some(Format::Alpaca),
            ),
            (
                json!({"query": "a", "response": "b", "history": []}),
                Some(Format::QueryResponse),
            ),
            (
                json!({"prompt": "a", "chosen": "b", "rejected": "c"}),
                Some(Format::Preference),
            ),
            (
                json!({"messages": [], "rejected_response": "c"}),
                Some(Format::Preference),
            ),
            (
                json!({"query": "a", "response": "b", "label": true}),
                Some(Format::Kto),
            ),
            (
                json!({"prompt": "a", "completion": "b", "label": false}),
                Some(Format::Kto),
            ),
            (json!({"text": "a"}), None),
        ];
        for (row, expected) in cases {
            assert_eq!(Format::detect(&object(row.clone())), expected, "{row}");
        }
    }

    #[test]
    fn well_formed_rows_have_no_problems() {
        let rows = [
            (
                Format::Messages,
                json!({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}),
            ),
            (
                Format::Sharegpt,
                json!({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}),
            ),
            (
                Format::Alpaca,
                json!({"instruction": "i", "input": "", "output": "o"}),
            ),
            (
                Format::QueryResponse,
                json!({"query": "q", "response": "r", "history": [["q0", "r0"]]}),
            ),
            (
                Format::Preference,
                json!({"prompt": "p", "chosen": "good", "rejected": "bad"}),
            ),
            (
                Format::Kto,
                json!({"query": "q", "response": "r", "label": true}),
            ),
        ];
        for (format, row) in rows {
            assert_eq!(validate(format, &object(row.clone())), vec![], "{row}");
        }
    }

    #[test]
    fn problems_name_the_field() {
        let row = object(
            json!({"messages": [{"role": "assistant", "content": "a"}, {"role": "bot", "content": 3}, {"role": "user", "content": "q"}]}),
        );
        let problems = validate(Format::Messages, &row);
        let text: Vec<String> = problems
            .iter()
            .map(|p| format!("{}: {}", p.field, p.message))
            .collect();
        assert!(
            text.contains(
                &"messages[1].role: unknown role `bot` (expected system, user, assistant or tool)"
                    .to_owned()
            ),
            "{text:?}"
        );
        assert!(
            text.contains(&"messages[1].content: expected a string, found a number".to_owned()),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|t| t
                    .starts_with("messages[0]: the conversation starts with an assistant turn")),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|t| t.starts_with("messages[2]: the last turn is user")),
            "{text:?}"
        );
    }

    #[test]
    fn preference_pair_with_equal_answers_is_an_error() {
        let row = object(json!({"prompt": "p", "chosen": "same", "rejected": "same"}));
        let problems = validate(Format::Preference, &row);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].field, "rejected");
    }

    #[test]
    fn conversation_counts_exchanges() {
        let row = object(
            json!({"query": "q", "response": "r", "history": [["q0", "r0"], ["q1", "r1"]], "system": "s"}),
        );
        let turns = conversation(Format::QueryResponse, &row);
        assert_eq!(turns.len(), 7);
        assert_eq!(count_exchanges(&turns), 3);
        let alpaca = object(json!({"instruction": "i", "input": "x", "output": "o"}));
        assert_eq!(count_exchanges(&conversation(Format::Alpaca, &alpaca)), 1);
    }
}

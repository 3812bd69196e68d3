//! Sources of settings: a YAML file or command-line flags, read into `key = value` items with
//! where each came from. Only syntax is checked here; keys and values are checked when the
//! layers are merged ([`crate::TrainArgs::from_layers`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

use crate::error::{Error, Origin, Result};
use crate::value::{Entry, Value};

/// One source of settings. Later layers override earlier ones key by key.
#[derive(Debug, Clone)]
pub struct Layer {
    pub(crate) source: Source,
    pub(crate) items: Vec<Item>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Source {
    File(PathBuf),
    CommandLine,
}

/// One `key: value` or `--key values…` as written.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Item {
    pub key: String,
    pub key_origin: Origin,
    pub value_origin: Origin,
    pub raw: Raw,
}

/// A value before its key is known: typed YAML, or command-line words whose meaning (one
/// value, a list, a bare boolean flag) depends on the key.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Raw {
    Yaml(Value),
    Args(Vec<String>),
}

impl Layer {
    /// Reads a YAML config file.
    pub fn read_yaml(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse_yaml(&text, path)
    }

    /// Parses YAML text; `path` names it in messages.
    pub fn parse_yaml(text: &str, path: &Path) -> Result<Self> {
        // YAML 1.2 booleans only: `y`, `no`, `on` stay strings (a module or file named `y`).
        let options = serde_saphyr::options! { strict_booleans: true };
        let document: Spanned<Node> =
            serde_saphyr::from_str_with_options(text, options).map_err(|error| {
                let location = error.location();
                let name = path.display().to_string();
                Error::Yaml {
                    path: path.to_path_buf(),
                    line: location.map(|location| location.line()),
                    column: location.map(|location| location.column()),
                    message: error.render_with_options(serde_saphyr::render_options! {
                        source_name: Some(name.as_str()),
                    }),
                }
            })?;
        let shared: Arc<Path> = Arc::from(path);
        let items = match document.value {
            Node::Value(Value::Null) => Vec::new(),
            Node::Map(entries) => entries
                .into_iter()
                .map(|(key, value)| {
                    let entry = entry(&shared, key, value);
                    Item {
                        key: entry.key,
                        key_origin: entry.key_origin,
                        value_origin: entry.value_origin,
                        raw: Raw::Yaml(entry.value),
                    }
                })
                .collect(),
            Node::Value(other) => {
                return Err(Error::NotAMapping {
                    path: path.to_path_buf(),
                    found: match other {
                        Value::List(_) => "a list".into(),
                        other => format!("the value {}", other.describe()),
                    },
                });
            }
        };
        Ok(Self {
            source: Source::File(path.to_path_buf()),
            items,
        })
    }

    /// Parses command-line settings, ms-swift style: `--key value`, `--key=value`, several
    /// values for a list (`--dataset a.jsonl b.jsonl`, or `--dataset` repeated), a bare
    /// `--flag` for `true`. Dashes in keys are read as underscores (`--learning-rate`).
    pub fn parse_args<S: AsRef<str>>(args: &[S]) -> Result<Self> {
        let mut items: Vec<Item> = Vec::new();
        // Whether the last flag was `--key=value`, which takes no further words.
        let mut last_closed = true;
        for arg in args {
            let arg = arg.as_ref();
            if let Some(flag) = arg.strip_prefix("--") {
                let (name, value) = match flag.split_once('=') {
                    Some((name, value)) => (name, Some(value)),
                    None => (flag, None),
                };
                if name.is_empty() {
                    return Err(Error::CommandLine {
                        message: format!("`{arg}` has no key"),
                        hint: "settings are written `--key value`".into(),
                    });
                }
                let origin = Origin::CommandLine {
                    flag: format!("--{name}"),
                };
                last_closed = value.is_some();
                items.push(Item {
                    key: name.replace('-', "_"),
                    key_origin: origin.clone(),
                    value_origin: origin,
                    raw: Raw::Args(value.map(str::to_string).into_iter().collect()),
                });
                continue;
            }
            match items.last_mut() {
                Some(Item {
                    raw: Raw::Args(values),
                    ..
                }) if !last_closed => values.push(arg.to_string()),
                _ => {
                    return Err(Error::CommandLine {
                        message: format!("unexpected value `{arg}`"),
                        hint: "settings are written `--key value` (or `--key=value`), and a config file `-c FILE`"
                            .into(),
                    });
                }
            }
        }
        Ok(Self {
            source: Source::CommandLine,
            items,
        })
    }
}

/// A YAML node as read: a scalar or list, or a mapping whose keys and values keep their
/// positions (the top level and sections).
enum Node {
    Value(Value),
    Map(Vec<(Spanned<String>, Spanned<Node>)>),
}

fn origin(path: &Arc<Path>, location: serde_saphyr::Location) -> Origin {
    let small = |number: u64| u32::try_from(number).unwrap_or(u32::MAX);
    Origin::File {
        path: Arc::clone(path),
        line: small(location.line()),
        column: small(location.column()),
    }
}

fn entry(path: &Arc<Path>, key: Spanned<String>, value: Spanned<Node>) -> Entry {
    let value_origin = origin(path, value.referenced);
    Entry {
        key: key.value,
        key_origin: origin(path, key.referenced),
        value: node_value(path, value.value),
        value_origin,
    }
}

fn node_value(path: &Arc<Path>, node: Node) -> Value {
    match node {
        Node::Value(value) => value,
        Node::Map(entries) => Value::Map(
            entries
                .into_iter()
                .map(|(key, value)| entry(path, key, value))
                .collect(),
        ),
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a YAML value")
    }

    fn visit_unit<E>(self) -> Result<Node, E> {
        Ok(Node::Value(Value::Null))
    }

    fn visit_none<E>(self) -> Result<Node, E> {
        Ok(Node::Value(Value::Null))
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Node, D::Error> {
        Node::deserialize(deserializer)
    }

    fn visit_bool<E>(self, value: bool) -> Result<Node, E> {
        Ok(Node::Value(Value::Bool(value)))
    }

    fn visit_i64<E>(self, value: i64) -> Result<Node, E> {
        Ok(Node::Value(Value::Int(value.into())))
    }

    fn visit_u64<E>(self, value: u64) -> Result<Node, E> {
        Ok(Node::Value(Value::Int(value.into())))
    }

    fn visit_i128<E>(self, value: i128) -> Result<Node, E> {
        Ok(Node::Value(Value::Int(value)))
    }

    fn visit_f64<E>(self, value: f64) -> Result<Node, E> {
        Ok(Node::Value(Value::Float(value)))
    }

    fn visit_str<E>(self, value: &str) -> Result<Node, E> {
        Ok(Node::Value(Value::Str(value.to_string())))
    }

    fn visit_string<E>(self, value: String) -> Result<Node, E> {
        Ok(Node::Value(Value::Str(value)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(node) = seq.next_element::<Node>()? {
            // Positions inside lists are not kept; a mapping inside a list is only an error
            // to report, so its contents are dropped.
            items.push(match node {
                Node::Value(value) => value,
                Node::Map(_) => Value::Map(Vec::new()),
            });
        }
        Ok(Node::Value(Value::List(items)))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = map.next_entry::<Spanned<String>, Spanned<Node>>()? {
            entries.push(entry);
        }
        Ok(Node::Map(entries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(text: &str) -> Result<Layer> {
        Layer::parse_yaml(text, Path::new("job.yaml"))
    }

    fn yaml_value(item: &Item) -> &Value {
        match &item.raw {
            Raw::Yaml(value) => value,
            Raw::Args(_) => &Value::Null,
        }
    }

    #[test]
    fn yaml_items_keep_types_and_positions() -> Result<()> {
        let layer = yaml("learning_rate: 2e-4\ntarget_modules: [q_proj, y]\npacking: yes\n")?;
        assert_eq!(layer.items.len(), 3);
        assert_eq!(layer.items[0].key, "learning_rate");
        assert_eq!(yaml_value(&layer.items[0]), &Value::Float(2e-4));
        assert_eq!(
            layer.items[0].value_origin,
            Origin::File {
                path: Arc::from(Path::new("job.yaml")),
                line: 1,
                column: 16
            }
        );
        // YAML 1.2 booleans only: `y` and `yes` stay text.
        assert_eq!(
            yaml_value(&layer.items[1]),
            &Value::List(vec![Value::Str("q_proj".into()), Value::Str("y".into())])
        );
        assert_eq!(yaml_value(&layer.items[2]), &Value::Str("yes".into()));
        Ok(())
    }

    #[test]
    fn yaml_sections_keep_nested_positions() -> Result<()> {
        let layer = yaml("parallelization:\n  tensor_parallel_size: 4\n")?;
        let Value::Map(entries) = yaml_value(&layer.items[0]) else {
            panic!("not a map: {:?}", layer.items[0]);
        };
        assert_eq!(entries[0].key, "tensor_parallel_size");
        assert_eq!(entries[0].value, Value::Int(4));
        assert_eq!(entries[0].key_origin.to_string(), "job.yaml:2:3");
        Ok(())
    }

    #[test]
    fn yaml_syntax_errors_name_file_line_and_column() {
        let Err(Error::Yaml {
            path,
            line,
            column,
            message,
        }) = yaml("lora_rank: 8\ndataset: [a.jsonl\nlearning_rate: 1e-4\n")
        else {
            panic!("expected a YAML error");
        };
        assert_eq!(path, Path::new("job.yaml"));
        assert!(line.is_some() && column.is_some());
        assert!(message.contains("job.yaml:"), "{message}");
    }

    #[test]
    fn duplicate_yaml_keys_fail() {
        let error = yaml("lora_rank: 8\nlora_rank: 16\n").map(|_| ());
        assert!(
            matches!(error, Err(Error::Yaml { line: Some(2), .. })),
            "{error:?}"
        );
    }

    #[test]
    fn empty_files_are_empty_and_lists_are_refused() -> Result<()> {
        assert!(yaml("")?.items.is_empty());
        assert!(yaml("# nothing yet\n")?.items.is_empty());
        assert!(matches!(yaml("- a\n- b\n"), Err(Error::NotAMapping { .. })));
        Ok(())
    }

    fn args(words: &[&str]) -> Result<Vec<(String, Vec<String>)>> {
        Ok(Layer::parse_args(words)?
            .items
            .into_iter()
            .map(|item| match item.raw {
                Raw::Args(values) => (item.key, values),
                Raw::Yaml(_) => (item.key, Vec::new()),
            })
            .collect())
    }

    fn owned(key: &str, values: &[&str]) -> (String, Vec<String>) {
        (
            key.to_string(),
            values.iter().map(|value| (*value).to_string()).collect(),
        )
    }

    #[test]
    fn command_line_forms() -> Result<()> {
        assert_eq!(
            args(&[
                "--dataset",
                "a.jsonl",
                "b.jsonl",
                "--learning-rate=2e-4",
                "--packing",
                "--max_steps",
                "-1",
                "--dataset",
                "c.jsonl",
            ])?,
            vec![
                owned("dataset", &["a.jsonl", "b.jsonl"]),
                owned("learning_rate", &["2e-4"]),
                owned("packing", &[]),
                owned("max_steps", &["-1"]),
                owned("dataset", &["c.jsonl"]),
            ]
        );
        Ok(())
    }

    #[test]
    fn command_line_mistakes() {
        assert!(matches!(
            Layer::parse_args(&["train.jsonl"]),
            Err(Error::CommandLine { .. })
        ));
        assert!(matches!(
            Layer::parse_args(&["--lora_rank=8", "16"]),
            Err(Error::CommandLine { .. })
        ));
        assert!(matches!(
            Layer::parse_args(&["--=3"]),
            Err(Error::CommandLine { .. })
        ));
    }
}

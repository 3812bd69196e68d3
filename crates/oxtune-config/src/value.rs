//! A setting's value before it is checked against its key's type, and the conversion from it
//! to each typed field.
//!
//! YAML gives typed scalars (`2e-4` is a float, `true` a boolean); the command line gives
//! text. Both land here, and [`FromValue`] accepts either: a number field takes `2e-4` and
//! `"2e-4"`, a boolean takes `true`, `false`, `yes`, `no`, `1`, `0`.

use std::borrow::Cow;
use std::path::PathBuf;

use crate::error::Origin;

/// A value as YAML or the command line gave it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    /// YAML strings and every command-line value.
    Str(String),
    List(Vec<Value>),
    /// A nested YAML mapping (the `parallelization:` section), each entry with its origins.
    Map(Vec<Entry>),
}

/// One `key: value` as written, with where the key and the value are.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Entry {
    pub key: String,
    pub key_origin: Origin,
    pub value: Value,
    pub value_origin: Origin,
}

impl Value {
    /// How the value reads in an error message: "`abc`", "a list", "null".
    pub fn describe(&self) -> String {
        match self {
            Self::Null => "null".into(),
            Self::Bool(value) => format!("`{value}`"),
            Self::Int(value) => format!("`{value}`"),
            Self::Float(value) => format!("`{value}`"),
            Self::Str(text) if text.chars().count() > 60 => {
                format!("`{}…`", text.chars().take(60).collect::<String>())
            }
            Self::Str(text) => format!("`{text}`"),
            Self::List(items) => format!("a list of {}", items.len()),
            Self::Map(_) => "a mapping".into(),
        }
    }

    /// The value as one word, for matching against a key's neutral values (`null`, `false`,
    /// `0`, `none`, `[]`); `None` for non-empty lists and mappings.
    pub fn as_word(&self) -> Option<String> {
        match self {
            Self::Null => Some("null".into()),
            Self::Bool(value) => Some(value.to_string()),
            Self::Int(value) => Some(value.to_string()),
            Self::Float(value) => Some(value.to_string()),
            Self::Str(text) => Some(text.trim().to_ascii_lowercase()),
            Self::List(items) if items.is_empty() => Some("[]".into()),
            Self::List(_) | Self::Map(_) => None,
        }
    }

    /// How the value is written in `key: value` form in messages.
    pub fn as_written(&self) -> String {
        match self {
            Self::Str(text) => text.clone(),
            Self::List(items) => format!(
                "[{}]",
                items
                    .iter()
                    .map(Self::as_written)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Self::Map(_) => "{…}".into(),
            other => other.as_word().unwrap_or_default(),
        }
    }
}

/// How a key's values are given on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// One value: `--lora_rank 8`.
    Scalar,
    /// One value, or none for `true`: `--packing` is `--packing true`.
    Bool,
    /// Any number of values, in one flag or repeated: `--dataset a.jsonl b.jsonl`.
    List,
}

/// A value that did not fit the key's type; the caller names the key and the expected type.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct Mismatch {
    /// Said after "expects X, got Y" when the type alone does not explain the problem.
    pub hint: Option<String>,
}

impl Mismatch {
    fn hint(text: impl Into<String>) -> Self {
        Self {
            hint: Some(text.into()),
        }
    }
}

/// A field type that can be read from a [`Value`].
pub(crate) trait FromValue: Sized {
    /// What the key expects, for messages and docs: "an integer ≥ 0", "one of `lora`, `full`".
    fn expected() -> Cow<'static, str>;

    /// How its values are given on the command line.
    const SHAPE: Shape = Shape::Scalar;

    fn from_value(value: &Value) -> Result<Self, Mismatch>;

    /// Whether `value` means "not set" for an `Option` of this type: null, and on the
    /// command line `none` / `null` (but a string field keeps the text `none`).
    fn is_absent(value: &Value) -> bool {
        match value {
            Value::Null => true,
            Value::Str(text) => {
                matches!(text.trim().to_ascii_lowercase().as_str(), "none" | "null")
            }
            _ => false,
        }
    }
}

impl FromValue for bool {
    fn expected() -> Cow<'static, str> {
        "true or false".into()
    }

    const SHAPE: Shape = Shape::Bool;

    fn from_value(value: &Value) -> Result<Self, Mismatch> {
        match value {
            Value::Bool(value) => Ok(*value),
            Value::Int(0) => Ok(false),
            Value::Int(1) => Ok(true),
            Value::Str(text) => match text.trim().to_ascii_lowercase().as_str() {
                "true" | "yes" | "y" | "on" | "1" => Ok(true),
                "false" | "no" | "n" | "off" | "0" => Ok(false),
                _ => Err(Mismatch::default()),
            },
            _ => Err(Mismatch::default()),
        }
    }
}

/// Integers: YAML integers, or text of digits. Floats are refused (`8.0` is not a rank).
fn integer(value: &Value) -> Result<i128, Mismatch> {
    match value {
        Value::Int(value) => Ok(*value),
        Value::Str(text) => {
            let text = text.trim();
            text.parse::<i128>().map_err(|_| {
                if text.parse::<f64>().is_ok() {
                    Mismatch::hint("write a whole number")
                } else {
                    Mismatch::default()
                }
            })
        }
        Value::Float(_) => Err(Mismatch::hint("write a whole number")),
        _ => Err(Mismatch::default()),
    }
}

macro_rules! unsigned_from_value {
    ($($ty:ty),*) => {$(
        impl FromValue for $ty {
            fn expected() -> Cow<'static, str> {
                "an integer ≥ 0".into()
            }

            fn from_value(value: &Value) -> Result<Self, Mismatch> {
                let number = integer(value)?;
                <$ty>::try_from(number).map_err(|_| {
                    if number < 0 {
                        Mismatch::hint("it cannot be negative")
                    } else {
                        Mismatch::hint(format!("the largest value is {}", <$ty>::MAX))
                    }
                })
            }
        }
    )*};
}

unsigned_from_value!(u8, u32, u64, usize);

impl FromValue for f64 {
    fn expected() -> Cow<'static, str> {
        "a number".into()
    }

    fn from_value(value: &Value) -> Result<Self, Mismatch> {
        let number = match value {
            Value::Int(value) => *value as f64,
            Value::Float(value) => *value,
            Value::Str(text) => text
                .trim()
                .parse::<f64>()
                .map_err(|_| Mismatch::default())?,
            _ => return Err(Mismatch::default()),
        };
        if number.is_finite() {
            Ok(number)
        } else {
            Err(Mismatch::hint("the number must be finite"))
        }
    }
}

impl FromValue for String {
    fn expected() -> Cow<'static, str> {
        "a string".into()
    }

    fn from_value(value: &Value) -> Result<Self, Mismatch> {
        match value {
            Value::Str(text) => Ok(text.clone()),
            // `model_revision: 1234`: integers keep their spelling; floats and booleans may
            // not (`1.10` reads as 1.1), so those must be quoted.
            Value::Int(value) => Ok(value.to_string()),
            Value::Float(_) | Value::Bool(_) => {
                Err(Mismatch::hint("put the value in quotes to keep it as text"))
            }
            _ => Err(Mismatch::default()),
        }
    }

    fn is_absent(value: &Value) -> bool {
        matches!(value, Value::Null)
    }
}

impl FromValue for PathBuf {
    fn expected() -> Cow<'static, str> {
        "a path".into()
    }

    fn from_value(value: &Value) -> Result<Self, Mismatch> {
        String::from_value(value).map(PathBuf::from)
    }

    fn is_absent(value: &Value) -> bool {
        matches!(value, Value::Null)
    }
}

impl<T: FromValue> FromValue for Option<T> {
    fn expected() -> Cow<'static, str> {
        format!("{} (or null)", T::expected()).into()
    }

    const SHAPE: Shape = T::SHAPE;

    fn from_value(value: &Value) -> Result<Self, Mismatch> {
        if T::is_absent(value) {
            Ok(None)
        } else {
            T::from_value(value).map(Some)
        }
    }
}

/// Lists: a YAML list, one scalar (a list of one), null (empty), or several command-line
/// values.
impl<T: FromValue> FromValue for Vec<T> {
    fn expected() -> Cow<'static, str> {
        format!("a list (each {})", T::expected()).into()
    }

    const SHAPE: Shape = Shape::List;

    fn from_value(value: &Value) -> Result<Self, Mismatch> {
        match value {
            Value::Null => Ok(Vec::new()),
            Value::List(items) => items.iter().map(T::from_value).collect(),
            Value::Map(_) => Err(Mismatch::default()),
            scalar => Ok(vec![T::from_value(scalar)?]),
        }
    }
}

/// A string-valued choice (`lr_scheduler_type: cosine`): the enum, `as_str`, `Display`,
/// `Serialize` (as the string) and [`FromValue`] (also accepting the listed aliases, any case).
macro_rules! value_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $(
                $(#[doc = $doc:literal])*
                $variant:ident = $text:literal $(| $alias:literal)*
            ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $($(#[doc = $doc])* $variant,)+
        }

        impl $name {
            /// Every value, in the order documented.
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];

            /// The name as written in YAML and on the command line.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)+
                }
            }

            fn parse(text: &str) -> Option<Self> {
                let text = text.trim();
                $(
                    if text.eq_ignore_ascii_case($text) $(|| text.eq_ignore_ascii_case($alias))* {
                        return Some(Self::$variant);
                    }
                )+
                None
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl $crate::value::FromValue for $name {
            fn expected() -> std::borrow::Cow<'static, str> {
                let names: Vec<String> =
                    Self::ALL.iter().map(|value| format!("`{value}`")).collect();
                format!("one of {}", names.join(", ")).into()
            }

            fn from_value(
                value: &$crate::value::Value,
            ) -> Result<Self, $crate::value::Mismatch> {
                match value {
                    $crate::value::Value::Str(text) => {
                        Self::parse(text).ok_or_else($crate::value::Mismatch::default)
                    }
                    _ => Err($crate::value::Mismatch::default()),
                }
            }
        }
    };
}

pub(crate) use value_enum;

#[cfg(test)]
mod tests {
    use super::*;

    fn text(value: &str) -> Value {
        Value::Str(value.into())
    }

    #[test]
    fn numbers_from_yaml_scalars_and_from_text() {
        assert_eq!(f64::from_value(&Value::Float(2e-4)), Ok(2e-4));
        assert_eq!(f64::from_value(&text("2e-4")), Ok(2e-4));
        assert_eq!(f64::from_value(&Value::Int(3)), Ok(3.0));
        assert!(f64::from_value(&text("fast")).is_err());
        assert!(f64::from_value(&text("inf")).is_err());
        assert_eq!(usize::from_value(&text("64")), Ok(64));
        assert_eq!(usize::from_value(&Value::Int(64)), Ok(64));
        assert!(usize::from_value(&Value::Int(-1)).is_err());
        assert!(usize::from_value(&Value::Float(8.0)).is_err());
        assert!(u8::from_value(&Value::Int(300)).is_err());
    }

    #[test]
    fn booleans_accept_the_usual_words() {
        for word in ["true", "True", "yes", "on", "1"] {
            assert_eq!(bool::from_value(&text(word)), Ok(true), "{word}");
        }
        for word in ["false", "NO", "off", "0"] {
            assert_eq!(bool::from_value(&text(word)), Ok(false), "{word}");
        }
        assert!(bool::from_value(&text("maybe")).is_err());
    }

    #[test]
    fn options_and_lists() {
        assert_eq!(Option::<usize>::from_value(&Value::Null), Ok(None));
        assert_eq!(Option::<usize>::from_value(&text("none")), Ok(None));
        assert_eq!(Option::<usize>::from_value(&text("8")), Ok(Some(8)));
        // A string field keeps the word `none`.
        assert_eq!(
            Option::<String>::from_value(&text("none")),
            Ok(Some("none".into()))
        );
        assert_eq!(
            Vec::<String>::from_value(&text("a.jsonl")),
            Ok(vec!["a.jsonl".to_string()])
        );
        assert_eq!(
            Vec::<String>::from_value(&Value::List(vec![text("a"), text("b")])),
            Ok(vec!["a".to_string(), "b".to_string()])
        );
        assert_eq!(Vec::<String>::from_value(&Value::Null), Ok(Vec::new()));
    }

    #[test]
    fn strings_refuse_floats_and_booleans() {
        assert_eq!(String::from_value(&Value::Int(12)), Ok("12".into()));
        assert!(String::from_value(&Value::Float(1.1)).is_err());
        assert!(String::from_value(&Value::Bool(true)).is_err());
    }
}

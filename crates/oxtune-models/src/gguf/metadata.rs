//! Typed reads of GGUF metadata (`general.architecture`, `llama.block_count`,
//! `tokenizer.ggml.tokens`, ...). Every failure names the file and the key.
//!
//! GGUF writers are not consistent about integer widths (token ids appear as u32 or i32,
//! lengths as u32 or u64), so the integer getters accept any integer type whose value fits.

use std::collections::HashMap;
use std::path::Path;

use oxtune_tensor::candle::quantized::gguf_file::Value;

use super::GgufError;

/// The metadata of one GGUF file, with the file's path for error messages.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Metadata<'a> {
    pub path: &'a Path,
    pub map: &'a HashMap<String, Value>,
}

/// A GGUF value's type, as a word for error messages.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::U8(_) | Value::U16(_) | Value::U32(_) | Value::U64(_) => "an unsigned integer",
        Value::I8(_) | Value::I16(_) | Value::I32(_) | Value::I64(_) => "a signed integer",
        Value::F32(_) | Value::F64(_) => "a float",
        Value::Bool(_) => "a bool",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
    }
}

/// An integer value, whatever its width and sign, if it is a non-negative integer.
fn as_u64(value: &Value) -> Option<u64> {
    match *value {
        Value::U8(v) => Some(u64::from(v)),
        Value::U16(v) => Some(u64::from(v)),
        Value::U32(v) => Some(u64::from(v)),
        Value::U64(v) => Some(v),
        Value::I8(v) => u64::try_from(v).ok(),
        Value::I16(v) => u64::try_from(v).ok(),
        Value::I32(v) => u64::try_from(v).ok(),
        Value::I64(v) => u64::try_from(v).ok(),
        _ => None,
    }
}

/// A signed integer value, whatever its width.
fn as_i64(value: &Value) -> Option<i64> {
    match *value {
        Value::U8(v) => Some(i64::from(v)),
        Value::U16(v) => Some(i64::from(v)),
        Value::U32(v) => Some(i64::from(v)),
        Value::U64(v) => i64::try_from(v).ok(),
        Value::I8(v) => Some(i64::from(v)),
        Value::I16(v) => Some(i64::from(v)),
        Value::I32(v) => Some(i64::from(v)),
        Value::I64(v) => Some(v),
        _ => None,
    }
}

/// A float, printed the way it was written. GGUF stores most floats as f32, so
/// `1e-5` reads back as `9.999999747378752e-06`; going through f32's shortest decimal form
/// gives `1e-5` again, which is what config.json held before conversion.
pub(crate) fn f32_to_f64_decimal(value: f32) -> f64 {
    value.to_string().parse::<f64>().unwrap_or(f64::from(value))
}

fn as_f64(value: &Value) -> Option<f64> {
    match *value {
        Value::F32(v) => Some(f32_to_f64_decimal(v)),
        Value::F64(v) => Some(v),
        _ => as_i64(value)
            .and_then(|v| i32::try_from(v).ok())
            .map(f64::from),
    }
}

impl<'a> Metadata<'a> {
    pub fn new(path: &'a Path, map: &'a HashMap<String, Value>) -> Self {
        Self { path, map }
    }

    pub fn contains(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    fn invalid(&self, key: &str, message: String) -> GgufError {
        GgufError::InvalidMetadata {
            path: self.path.to_path_buf(),
            key: key.to_owned(),
            message,
        }
    }

    pub fn missing(&self, key: &str, hint: &str) -> GgufError {
        GgufError::MissingMetadata {
            path: self.path.to_path_buf(),
            key: key.to_owned(),
            hint: hint.to_owned(),
        }
    }

    fn typed<T>(
        &self,
        key: &str,
        expected: &str,
        read: impl Fn(&Value) -> Option<T>,
    ) -> Result<Option<T>, GgufError> {
        match self.map.get(key) {
            None => Ok(None),
            Some(value) => read(value).map(Some).ok_or_else(|| {
                self.invalid(
                    key,
                    format!("expected {expected}, found {}", describe(value)),
                )
            }),
        }
    }

    /// A non-negative integer.
    pub fn u64(&self, key: &str) -> Result<Option<u64>, GgufError> {
        self.typed(key, "a non-negative integer", as_u64)
    }

    /// A non-negative integer that fits in `usize`.
    pub fn usize(&self, key: &str) -> Result<Option<usize>, GgufError> {
        match self.u64(key)? {
            None => Ok(None),
            Some(v) => usize::try_from(v)
                .map(Some)
                .map_err(|_| self.invalid(key, format!("{v} is too large"))),
        }
    }

    /// A token id (u32).
    pub fn token_id(&self, key: &str) -> Result<Option<u32>, GgufError> {
        match self.u64(key)? {
            None => Ok(None),
            Some(v) => u32::try_from(v)
                .map(Some)
                .map_err(|_| self.invalid(key, format!("{v} is not a token id"))),
        }
    }

    /// A required non-negative integer.
    pub fn required_usize(&self, key: &str, hint: &str) -> Result<usize, GgufError> {
        self.usize(key)?.ok_or_else(|| self.missing(key, hint))
    }

    pub fn f64(&self, key: &str) -> Result<Option<f64>, GgufError> {
        self.typed(key, "a number", as_f64)
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        self.typed(key, "a bool", |v| match v {
            Value::Bool(b) => Some(*b),
            _ => None,
        })
    }

    pub fn string(&self, key: &str) -> Result<Option<&'a str>, GgufError> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(value) => {
                Err(self.invalid(key, format!("expected a string, found {}", describe(value))))
            }
        }
    }

    fn array(&self, key: &str) -> Result<Option<&'a [Value]>, GgufError> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => Ok(Some(items.as_slice())),
            Some(value) => {
                Err(self.invalid(key, format!("expected an array, found {}", describe(value))))
            }
        }
    }

    fn array_of<T>(
        &self,
        key: &str,
        expected: &str,
        read: impl Fn(&'a Value) -> Option<T>,
    ) -> Result<Option<Vec<T>>, GgufError> {
        let Some(items) = self.array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                read(item).ok_or_else(|| {
                    self.invalid(
                        key,
                        format!("element {i}: expected {expected}, found {}", describe(item)),
                    )
                })
            })
            .collect::<Result<Vec<T>, GgufError>>()
            .map(Some)
    }

    pub fn string_array(&self, key: &str) -> Result<Option<Vec<&'a str>>, GgufError> {
        self.array_of(key, "a string", |v| match v {
            Value::String(s) => Some(s.as_str()),
            _ => None,
        })
    }

    pub fn f32_array(&self, key: &str) -> Result<Option<Vec<f32>>, GgufError> {
        self.array_of(key, "a float", |v| match *v {
            Value::F32(x) => Some(x),
            _ => None,
        })
    }

    pub fn i64_array(&self, key: &str) -> Result<Option<Vec<i64>>, GgufError> {
        self.array_of(key, "an integer", as_i64)
    }

    /// Rejects per-layer arrays where oxtune needs one value (some GGUFs store
    /// `feed_forward_length` or `head_count_kv` per layer).
    pub fn scalar_usize(&self, key: &str, hint: &str) -> Result<usize, GgufError> {
        if let Some(Value::Array(items)) = self.map.get(key) {
            return Err(self.invalid(
                key,
                format!(
                    "a per-layer array of {} values; oxtune supports one value for all layers",
                    items.len()
                ),
            ));
        }
        self.required_usize(key, hint)
    }
}

/// A value's type and, for scalars, the value itself.
fn describe(value: &Value) -> String {
    match value {
        Value::String(s) if s.len() <= 40 => format!("the string {s:?}"),
        Value::Array(items) => format!("an array of {} elements", items.len()),
        Value::String(_) => "a string".to_owned(),
        v => format!("{} ({v:?})", kind(v)),
    }
}

//! The scrub config file (YAML):
//!
//! ```yaml
//! # oxtune data scrub --input raw.jsonl --output clean.jsonl --config scrub.yaml
//! replace: pseudonym          # placeholder (<PHONE>, the default) or pseudonym (<PHONE_1>, …)
//! disable: [plate]            # built-in detectors to turn off
//! custom:
//!   - name: EMPLOYEE_ID       # becomes <EMPLOYEE_ID> and a line in the report
//!     pattern: 'EMP-\d{6}'
//!   - name: PERSON
//!     words: [张伟, 李娜]
//!     words_file: names.txt   # one word per line, relative to this file; '#' starts a comment
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::detectors::BUILTIN_NAMES;
use crate::error::{Error, Result};

/// How findings are replaced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplaceMode {
    /// `<PHONE>`, `<EMAIL>`, …
    #[default]
    Placeholder,
    /// `<PHONE_1>`, `<PHONE_2>`, …: the same value gets the same pseudonym within a run.
    Pseudonym,
}

impl ReplaceMode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Placeholder => "placeholder",
            Self::Pseudonym => "pseudonym",
        }
    }
}

/// What to detect and how to replace it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScrubConfig {
    /// The file this was read from (empty for the defaults).
    #[serde(skip)]
    pub path: PathBuf,
    /// The replacement mode; the command line's `--replace` overrides it.
    #[serde(default)]
    pub replace: Option<ReplaceMode>,
    /// Built-in detectors to turn off, by name.
    #[serde(default)]
    pub disable: Vec<String>,
    /// Extra rules.
    #[serde(default)]
    pub custom: Vec<CustomRule>,
}

/// A custom rule: a regular expression, or a word list (inline and/or from a file).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomRule {
    pub name: String,
    #[serde(default)]
    pub pattern: Option<String>,
    #[serde(default)]
    pub words: Vec<String>,
    #[serde(default)]
    pub words_file: Option<PathBuf>,
    #[serde(default)]
    pub case_insensitive: bool,
}

impl ScrubConfig {
    /// Reads and checks a config file; word files are read too.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::read(path, e))?;
        let mut config: Self = serde_saphyr::from_str(&text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            message: e.to_string(),
            hint: "the keys are replace, disable and custom (each rule: name, pattern or words/words_file, case_insensitive); see docs/data.md".to_owned(),
        })?;
        config.path = path.to_path_buf();
        config.validate()?;
        let base = path.parent().unwrap_or(Path::new("."));
        for rule in &mut config.custom {
            if let Some(file) = &rule.words_file {
                let file = base.join(file);
                let words = std::fs::read_to_string(&file).map_err(|e| Error::read(&file, e))?;
                rule.words.extend(
                    words
                        .lines()
                        .map(str::trim)
                        .filter(|w| !w.is_empty() && !w.starts_with('#'))
                        .map(str::to_owned),
                );
            }
        }
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        let config_error = |message: String, hint: String| Error::Config {
            path: self.path.clone(),
            message,
            hint,
        };
        for name in &self.disable {
            if !BUILTIN_NAMES.contains(&name.as_str()) {
                let suggestion = closest(name, &BUILTIN_NAMES)
                    .map(|s| format!("did you mean `{s}`? "))
                    .unwrap_or_default();
                return Err(config_error(
                    format!("disable: unknown detector `{name}`"),
                    format!(
                        "{suggestion}built-in detectors: {}",
                        BUILTIN_NAMES.join(", ")
                    ),
                ));
            }
        }
        for rule in &self.custom {
            if rule.name.is_empty()
                || !rule
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                return Err(config_error(
                    format!("custom rule name `{}` is not a placeholder name", rule.name),
                    "use letters, digits and `_`, e.g. EMPLOYEE_ID".to_owned(),
                ));
            }
            let has_words = !rule.words.is_empty() || rule.words_file.is_some();
            if rule.pattern.is_some() == has_words {
                return Err(config_error(
                    format!(
                        "custom rule `{}` needs exactly one of `pattern` or `words`/`words_file`",
                        rule.name
                    ),
                    "split it into two rules".to_owned(),
                ));
            }
        }
        Ok(())
    }
}

/// The candidate nearest to `name` by edit distance, if near enough to be a typo.
fn closest<'a>(name: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (edit_distance(name, c), *c))
        .filter(|(d, _)| *d <= 3)
        .min()
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            current[j + 1] = (previous[j] + usize::from(ca != *cb))
                .min(previous[j + 1] + 1)
                .min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_rules_and_word_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("names.txt"), "# people\n王芳\n\n刘洋\n").expect("write");
        let path = dir.path().join("scrub.yaml");
        std::fs::write(&path, "replace: pseudonym\ndisable: [plate]\ncustom:\n  - name: PERSON\n    words: [张伟]\n    words_file: names.txt\n  - name: EMPLOYEE_ID\n    pattern: 'EMP-\\d{6}'\n").expect("write");
        let config = ScrubConfig::load(&path).expect("load");
        assert_eq!(config.replace, Some(ReplaceMode::Pseudonym));
        assert_eq!(config.custom[0].words, vec!["张伟", "王芳", "刘洋"]);
    }

    #[test]
    fn unknown_detector_names_get_a_suggestion() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("scrub.yaml");
        std::fs::write(&path, "disable: [emial]\n").expect("write");
        let error = ScrubConfig::load(&path).expect_err("typo").to_string();
        assert!(
            error.contains("unknown detector `emial`") && error.contains("did you mean `email`?"),
            "{error}"
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("scrub.yaml");
        std::fs::write(&path, "replce: pseudonym\n").expect("write");
        let error = ScrubConfig::load(&path).expect_err("typo").to_string();
        assert!(
            error.contains("scrub.yaml") && error.contains("hint:"),
            "{error}"
        );
    }
}

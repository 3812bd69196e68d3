//! Turning what the user typed (`--model PATH`, `--model Qwen/Qwen3-8B`,
//! `--model_type qwen3-7b-chat`) into a checkpoint on disk.
//!
//! Looked at, in order:
//! 1. a path: a model directory (with config.json), a `.gguf` file, or a directory holding
//!    exactly one `.gguf` file;
//! 2. the models registry, a YAML map from names to paths (relative paths are relative to the
//!    registry file): `$OXTUNE_MODELS_FILE`, else `~/.config/oxtune/models.yaml`
//!    ```yaml
//!    qwen3-7b-chat: /data/models/Qwen3-8B
//!    smollm2: ../models/SmolLM2-135M-Instruct
//!    ```
//! 3. the Hugging Face cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//!    `~/.cache/huggingface/hub`): `models--{org}--{name}/snapshots/{revision}` of the
//!    revision `refs/main` points to (or the only snapshot).
//!
//! When nothing matches, the error lists every place it looked and what to pass.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// A checkpoint found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A Hugging Face-format directory.
    Directory(PathBuf),
    /// A GGUF file, imported before loading.
    Gguf(PathBuf),
}

impl ModelSource {
    /// The path on disk.
    pub fn path(&self) -> &Path {
        match self {
            Self::Directory(path) | Self::Gguf(path) => path,
        }
    }
}

/// Where to look, taken from the environment by [`SearchPaths::from_env`].
#[derive(Debug, Clone, Default)]
pub struct SearchPaths {
    pub registry_file: Option<PathBuf>,
    pub hf_hub_cache: Option<PathBuf>,
}

impl SearchPaths {
    /// `$OXTUNE_MODELS_FILE` or `~/.config/oxtune/models.yaml`; `$HF_HUB_CACHE`,
    /// `$HF_HOME/hub` or `~/.cache/huggingface/hub`.
    pub fn from_env() -> Self {
        let env = |key: &str| {
            std::env::var_os(key)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let home = env("HOME");
        let registry_file = env("OXTUNE_MODELS_FILE")
            .or_else(|| home.as_ref().map(|h| h.join(".config/oxtune/models.yaml")));
        let hf_hub_cache = env("HF_HUB_CACHE")
            .or_else(|| env("HF_HOME").map(|h| h.join("hub")))
            .or_else(|| home.map(|h| h.join(".cache/huggingface/hub")));
        Self {
            registry_file,
            hf_hub_cache,
        }
    }
}

/// Resolves `model` (a path or a name) or, when it is absent, `model_type` (a name).
pub fn resolve(
    model: Option<&str>,
    model_type: Option<&str>,
    search: &SearchPaths,
) -> Result<ModelSource> {
    let Some(spec) = model.or(model_type) else {
        return Err(Error::ModelNotFound {
            spec: String::new(),
            searched: "  (nothing: no model was given)".into(),
            hint: "pass --model PATH (a Hugging Face directory or a .gguf file) or --model_type NAME from the models registry".into(),
        });
    };
    let mut searched = Vec::new();

    let path = Path::new(spec);
    searched.push(format!("  path {}", path.display()));
    if let Some(source) = from_path(path)? {
        return Ok(source);
    }

    if let Some(registry) = &search.registry_file {
        searched.push(format!("  models registry {}", registry.display()));
        if let Some(target) = registry_lookup(registry, spec)? {
            return from_path(&target)?.ok_or_else(|| Error::ModelNotFound {
                spec: spec.into(),
                searched: format!("  {} (listed in {})", target.display(), registry.display()),
                hint: format!(
                    "the registry entry for `{spec}` points to a path without a checkpoint; fix {}",
                    registry.display()
                ),
            });
        }
    }

    if let Some(cache) = &search.hf_hub_cache
        && spec.contains('/')
    {
        let repo = cache.join(format!("models--{}", spec.replace('/', "--")));
        searched.push(format!("  Hugging Face cache {}", repo.display()));
        if let Some(snapshot) = hf_snapshot(&repo) {
            return Ok(ModelSource::Directory(snapshot));
        }
    }

    Err(Error::ModelNotFound {
        spec: spec.into(),
        searched: searched.join("\n"),
        hint: "pass --model with a local Hugging Face directory or .gguf file, add `NAME: PATH` to the models registry (set OXTUNE_MODELS_FILE or write ~/.config/oxtune/models.yaml), or download the model into the Hugging Face cache on a machine with access to the hub".into(),
    })
}

fn from_path(path: &Path) -> Result<Option<ModelSource>> {
    if path.is_file()
        && path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        return Ok(Some(ModelSource::Gguf(path.to_path_buf())));
    }
    if !path.is_dir() {
        return Ok(None);
    }
    if path.join("config.json").is_file() {
        return Ok(Some(ModelSource::Directory(path.to_path_buf())));
    }
    let entries = std::fs::read_dir(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let ggufs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        })
        .collect();
    match ggufs.as_slice() {
        [one] => Ok(Some(ModelSource::Gguf(one.clone()))),
        _ => Err(Error::MissingFile {
            path: path.join("config.json"),
            hint: format!(
                "{} is a directory but not a Hugging Face model directory{}",
                path.display(),
                if ggufs.is_empty() {
                    String::new()
                } else {
                    "; it holds several .gguf files: pass one of them".into()
                }
            ),
        }),
    }
}

fn registry_lookup(registry: &Path, name: &str) -> Result<Option<PathBuf>> {
    if !registry.is_file() {
        return Ok(None);
    }
    let text = crate::error::read_to_string(registry)?;
    let entries: BTreeMap<String, String> =
        serde_saphyr::from_str(&text).map_err(|e| Error::Config {
            path: registry.to_path_buf(),
            key: "(file)".into(),
            message: format!("{e}\nhint: the models registry is a YAML map of `name: path` lines"),
        })?;
    Ok(entries.get(name).map(|target| {
        let target = PathBuf::from(target);
        if target.is_relative() {
            registry.parent().unwrap_or(Path::new(".")).join(target)
        } else {
            target
        }
    }))
}

fn hf_snapshot(repo: &Path) -> Option<PathBuf> {
    let snapshots = repo.join("snapshots");
    if let Ok(revision) = std::fs::read_to_string(repo.join("refs/main")) {
        let snapshot = snapshots.join(revision.trim());
        if snapshot.join("config.json").is_file() {
            return Some(snapshot);
        }
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir(&snapshots)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("config.json").is_file())
        .collect();
    candidates.sort();
    if candidates.len() == 1 {
        candidates.pop()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) -> anyhow::Result<()> {
        std::fs::create_dir_all(path.parent().unwrap_or(Path::new(".")))?;
        std::fs::write(path, text)?;
        Ok(())
    }

    #[test]
    fn resolves_paths_registry_and_hf_cache() -> anyhow::Result<()> {
        let root = tempfile::tempdir()?;
        let model_dir = root.path().join("models/tiny");
        write(&model_dir.join("config.json"), "{}")?;
        let registry = root.path().join("config/models.yaml");
        write(&registry, "qwen3-7b-chat: ../models/tiny\n")?;
        let cache = root.path().join("hub");
        write(&cache.join("models--Qwen--Qwen3-8B/refs/main"), "abc123\n")?;
        write(
            &cache.join("models--Qwen--Qwen3-8B/snapshots/abc123/config.json"),
            "{}",
        )?;
        let search = SearchPaths {
            registry_file: Some(registry),
            hf_hub_cache: Some(cache.clone()),
        };

        let by_path = resolve(Some(model_dir.to_str().unwrap_or_default()), None, &search)?;
        assert_eq!(by_path, ModelSource::Directory(model_dir.clone()));
        let by_name = resolve(None, Some("qwen3-7b-chat"), &search)?;
        assert_eq!(by_name.path().canonicalize()?, model_dir.canonicalize()?);
        let by_repo = resolve(Some("Qwen/Qwen3-8B"), None, &search)?;
        assert_eq!(
            by_repo,
            ModelSource::Directory(cache.join("models--Qwen--Qwen3-8B/snapshots/abc123"))
        );
        Ok(())
    }

    #[test]
    fn not_found_lists_where_it_looked() -> anyhow::Result<()> {
        let root = tempfile::tempdir()?;
        let search = SearchPaths {
            registry_file: Some(root.path().join("models.yaml")),
            hf_hub_cache: Some(root.path().join("hub")),
        };
        let message = resolve(Some("Qwen/Qwen3-8B"), None, &search)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            message.contains("model `Qwen/Qwen3-8B` not found"),
            "{message}"
        );
        assert!(message.contains("models registry"), "{message}");
        assert!(message.contains("models--Qwen--Qwen3-8B"), "{message}");
        assert!(message.contains("hint: pass --model"), "{message}");
        Ok(())
    }
}

//! Checkpoints: `output_dir/checkpoint-N/`, written as `checkpoint-N.tmp/`, every file and
//! the folder fsynced, then renamed — a process killed mid-save leaves the previous complete
//! checkpoint as the latest. Old checkpoints beyond `save_total_limit` are removed after a
//! new one is complete.
//!
//! ```text
//! checkpoint-N/
//!   adapter_config.json + adapter_model.safetensors   (LoRA/DoRA, peft format)  or
//!   model.safetensors + config.json + tokenizer files  (full fine-tuning, HF format)
//!   optimizer.safetensors                              (AdamW moments, fp32 masters, step)
//!   trainer_state.json                                 (step, epoch, data cursor, log history)
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The trainer's own state file.
pub const TRAINER_STATE: &str = "trainer_state.json";
/// Optimizer state file.
pub const OPTIMIZER_STATE: &str = "optimizer.safetensors";
const FORMAT_VERSION: u32 = 1;

/// What a checkpoint records besides tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub format_version: u32,
    /// Optimizer steps completed.
    pub global_step: usize,
    pub total_steps: usize,
    pub epoch: f64,
    /// Where the training data continues (the data loader's own serialised cursor).
    pub data_cursor: serde_json::Value,
    pub seed: u64,
    /// Non-finite steps skipped so far.
    pub skipped_steps: usize,
    /// One entry per logged step (`logging.jsonl` holds the same lines).
    pub log_history: Vec<serde_json::Value>,
}

impl TrainerState {
    pub fn new(total_steps: usize, seed: u64) -> Self {
        Self {
            format_version: FORMAT_VERSION,
            global_step: 0,
            total_steps,
            epoch: 0.0,
            data_cursor: serde_json::Value::Null,
            seed,
            skipped_steps: 0,
            log_history: Vec::new(),
        }
    }

    /// Reads `dir/trainer_state.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(TRAINER_STATE);
        let text = std::fs::read_to_string(&path).map_err(|e| io_error(&path, &e))?;
        let state: Self = serde_json::from_str(&text)
            .map_err(|e| Error::State(format!("{}: {e}", path.display())))?;
        if state.format_version != FORMAT_VERSION {
            return Err(Error::State(format!(
                "{}: format_version {} (this oxtune writes {FORMAT_VERSION})\nhint: resume with the oxtune version that wrote the checkpoint",
                path.display(),
                state.format_version
            )));
        }
        Ok(state)
    }
}

fn io_error(path: &Path, error: &std::io::Error) -> Error {
    Error::State(format!("{}: {error}", path.display()))
}

/// `output_dir/checkpoint-{step}`.
pub fn checkpoint_dir(output_dir: &Path, step: usize) -> PathBuf {
    output_dir.join(format!("checkpoint-{step}"))
}

/// Writes a checkpoint atomically: `fill` writes the files into a temporary folder, which is
/// then fsynced and renamed to `checkpoint-{step}`; then old checkpoints beyond `keep` are
/// removed. Returns the checkpoint's path.
pub fn save(
    output_dir: &Path,
    step: usize,
    keep: Option<usize>,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let final_dir = checkpoint_dir(output_dir, step);
    let temporary = output_dir.join(format!("checkpoint-{step}.tmp"));
    if temporary.exists() {
        std::fs::remove_dir_all(&temporary).map_err(|e| io_error(&temporary, &e))?;
    }
    std::fs::create_dir_all(&temporary).map_err(|e| io_error(&temporary, &e))?;
    fill(&temporary)?;
    for entry in std::fs::read_dir(&temporary).map_err(|e| io_error(&temporary, &e))? {
        let path = entry.map_err(|e| io_error(&temporary, &e))?.path();
        sync(&path)?;
    }
    sync(&temporary)?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(|e| io_error(&final_dir, &e))?;
    }
    std::fs::rename(&temporary, &final_dir).map_err(|e| io_error(&final_dir, &e))?;
    sync(output_dir)?;
    if let Some(keep) = keep {
        let mut complete = complete_checkpoints(output_dir)?;
        while complete.len() > keep.max(1) {
            let (_, oldest) = complete.remove(0);
            std::fs::remove_dir_all(&oldest).map_err(|e| io_error(&oldest, &e))?;
        }
    }
    Ok(final_dir)
}

fn sync(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_error(path, &e))
}

/// Complete checkpoints (`checkpoint-N` holding a trainer state), oldest first.
pub fn complete_checkpoints(output_dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let Ok(entries) = std::fs::read_dir(output_dir) else {
        return Ok(Vec::new());
    };
    let mut found = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| io_error(output_dir, &e))?.path();
        let Some(step) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("checkpoint-"))
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        if path.join(TRAINER_STATE).is_file() {
            found.push((step, path));
        }
    }
    found.sort();
    Ok(found)
}

/// The checkpoint to resume from: `spec` is a checkpoint path, or `true`/`latest` for the
/// newest complete checkpoint in `output_dir`.
pub fn resolve_resume(output_dir: &Path, spec: &str) -> Result<PathBuf> {
    if matches!(spec, "true" | "latest") {
        return complete_checkpoints(output_dir)?.pop().map(|(_, path)| path).ok_or_else(|| {
            Error::State(format!(
                "resume_from_checkpoint: no complete checkpoint in {}\nhint: train without resume_from_checkpoint, or give a checkpoint path",
                output_dir.display()
            ))
        });
    }
    let path = PathBuf::from(spec);
    if path.join(TRAINER_STATE).is_file() {
        Ok(path)
    } else {
        Err(Error::State(format!(
            "resume_from_checkpoint: {} is not a complete checkpoint (no {TRAINER_STATE})\nhint: pass a checkpoint-N folder, or `true` for the latest one",
            path.display()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_atomically_rotates_and_finds_the_latest() -> anyhow::Result<()> {
        let root = tempfile::tempdir()?;
        let out = root.path();
        for step in [2, 4, 6] {
            save(out, step, Some(2), |dir| {
                let json = serde_json::to_string(&TrainerState::new(6, 1))
                    .map_err(|e| Error::State(e.to_string()))?;
                std::fs::write(dir.join(TRAINER_STATE), json).map_err(|e| io_error(dir, &e))
            })?;
        }
        let steps: Vec<usize> = complete_checkpoints(out)?
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(steps, [4, 6]);
        // A save that dies half-way leaves only a .tmp folder, which resume ignores.
        let failed = save(out, 8, Some(2), |_| Err(Error::State("killed".into())));
        assert!(failed.is_err());
        assert_eq!(resolve_resume(out, "true")?, checkpoint_dir(out, 6));
        let message = resolve_resume(out, "/nowhere")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(message.contains("not a complete checkpoint"), "{message}");
        Ok(())
    }
}

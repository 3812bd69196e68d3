//! Streaming safetensors output: the header is written from the planned names, dtypes and
//! shapes before any data, then each tensor's bytes follow as it is produced, so only one
//! tensor is ever in memory. Checkpoints larger than one shard are split into
//! `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`, as transformers
//! writes them.
//!
//! File layout (safetensors): `u64 header length (LE) | JSON header, space-padded to 8 bytes |
//! data`, the header mapping each name to `{dtype, shape, data_offsets: [begin, end]}`
//! relative to the start of the data.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use oxtune_tensor::{DType, Tensor};
use serde_json::json;

use super::GgufError;

/// The single-file name, and the index of a sharded checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// One output tensor, known before its data is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub gguf_name: String,
    pub hf_name: String,
    /// Hugging Face (PyTorch) order: (out_features, in_features) for linear weights.
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub unpermute_heads: Option<usize>,
}

impl Planned {
    pub fn num_elements(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }

    pub fn num_bytes(&self) -> u64 {
        self.num_elements() * self.dtype.size_in_bytes() as u64
    }
}

fn safetensors_dtype(dtype: DType) -> Result<&'static str, GgufError> {
    match dtype {
        DType::F32 => Ok("F32"),
        DType::BF16 => Ok("BF16"),
        DType::F16 => Ok("F16"),
        other => Err(GgufError::UnsupportedDtype {
            dtype: format!("{other:?}"),
        }),
    }
}

/// Groups consecutive tensors into shards of at most `max_bytes` (a tensor larger than that
/// gets a shard of its own). Returns index ranges into `tensors`.
pub fn shard(tensors: &[Planned], max_bytes: u64) -> Vec<std::ops::Range<usize>> {
    let mut shards = Vec::new();
    let mut start = 0;
    let mut bytes = 0u64;
    for (i, tensor) in tensors.iter().enumerate() {
        let size = tensor.num_bytes();
        if i > start && bytes + size > max_bytes {
            shards.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += size;
    }
    if start < tensors.len() {
        shards.push(start..tensors.len());
    }
    shards
}

/// File names for `n` shards: `model.safetensors` alone, else `model-00001-of-0000n.safetensors`…
pub fn shard_names(n: usize) -> Vec<String> {
    if n <= 1 {
        return vec![SINGLE_FILE.to_owned()];
    }
    (1..=n)
        .map(|i| format!("model-{i:05}-of-{n:05}.safetensors"))
        .collect()
}

/// The safetensors header for `tensors`, padded to a multiple of 8 bytes.
fn header(tensors: &[Planned]) -> Result<Vec<u8>, GgufError> {
    let mut map = serde_json::Map::new();
    map.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0u64;
    for tensor in tensors {
        let end = offset + tensor.num_bytes();
        map.insert(
            tensor.hf_name.clone(),
            json!({"dtype": safetensors_dtype(tensor.dtype)?, "shape": tensor.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut bytes = serde_json::to_vec(&map)
        .map_err(|e| GgufError::Internal(format!("safetensors header: {e}")))?;
    while bytes.len() % 8 != 0 {
        bytes.push(b' ');
    }
    Ok(bytes)
}

/// A writer that counts the bytes going through it.
struct Counting<W> {
    inner: W,
    written: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes one safetensors file holding `tensors`, asking `produce` for each tensor's data in
/// order (it must have the planned shape and dtype); `done` is called after each one.
pub fn write_file(
    path: &Path,
    tensors: &[Planned],
    produce: &mut dyn FnMut(&Planned) -> Result<Tensor, GgufError>,
    done: &mut dyn FnMut(&Planned),
) -> Result<(), GgufError> {
    let io_error = |source| GgufError::Write {
        path: path.to_path_buf(),
        source,
    };
    let file = File::create(path).map_err(io_error)?;
    let mut out = Counting {
        inner: BufWriter::with_capacity(1 << 22, file),
        written: 0,
    };
    let header = header(tensors)?;
    out.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io_error)?;
    out.write_all(&header).map_err(io_error)?;
    for tensor in tensors {
        let data = produce(tensor)?;
        if data.dims() != tensor.shape.as_slice() || data.dtype() != tensor.dtype {
            return Err(GgufError::Internal(format!(
                "tensor `{}` came out as {:?} {:?}, planned {:?} {:?}",
                tensor.hf_name,
                data.dtype(),
                data.dims(),
                tensor.dtype,
                tensor.shape
            )));
        }
        let before = out.written;
        data.write_bytes(&mut out).map_err(|e| match e {
            oxtune_tensor::candle::Error::Io(source) => io_error(source),
            other => GgufError::Internal(format!("writing `{}`: {other}", tensor.hf_name)),
        })?;
        if out.written - before != tensor.num_bytes() {
            return Err(GgufError::Internal(format!(
                "tensor `{}`: wrote {} bytes, planned {}",
                tensor.hf_name,
                out.written - before,
                tensor.num_bytes()
            )));
        }
        done(tensor);
    }
    let file = out
        .inner
        .into_inner()
        .map_err(|e| io_error(e.into_error()))?;
    file.sync_all().map_err(io_error)?;
    Ok(())
}

/// `model.safetensors.index.json` for a sharded checkpoint.
pub fn write_index(
    dir: &Path,
    tensors: &[Planned],
    shards: &[std::ops::Range<usize>],
    names: &[String],
) -> Result<PathBuf, GgufError> {
    let mut weight_map = serde_json::Map::new();
    for (range, name) in shards.iter().zip(names) {
        for tensor in tensors.get(range.clone()).unwrap_or_default() {
            weight_map.insert(tensor.hf_name.clone(), json!(name));
        }
    }
    let total_size: u64 = tensors.iter().map(Planned::num_bytes).sum();
    let index = json!({"metadata": {"total_size": total_size}, "weight_map": weight_map});
    let path = dir.join(INDEX_FILE);
    super::write_json(&path, &index)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planned(name: &str, elements: usize, dtype: DType) -> Planned {
        Planned {
            gguf_name: name.into(),
            hf_name: name.into(),
            shape: vec![elements],
            dtype,
            unpermute_heads: None,
        }
    }

    #[test]
    fn shards_respect_the_size_limit() {
        let tensors: Vec<Planned> = (0..5)
            .map(|i| planned(&format!("t{i}"), 100, DType::F32))
            .collect();
        assert_eq!(shard(&tensors, 10_000), vec![0..5]);
        assert_eq!(shard(&tensors, 800), vec![0..2, 2..4, 4..5]);
        // A tensor bigger than the limit still gets written, alone.
        assert_eq!(shard(&tensors, 100), vec![0..1, 1..2, 2..3, 3..4, 4..5]);
        assert_eq!(shard_names(1), vec!["model.safetensors"]);
        assert_eq!(shard_names(2)[1], "model-00002-of-00002.safetensors");
    }

    #[test]
    fn written_file_reads_back_with_candle() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("model.safetensors");
        let device = oxtune_tensor::Device::Cpu;
        let a = Tensor::arange(0f32, 6.0, &device)?.reshape((2, 3))?;
        let b = Tensor::arange(0f32, 3.0, &device)?.to_dtype(DType::BF16)?;
        let plan = vec![
            Planned {
                shape: vec![2, 3],
                ..planned("a", 6, DType::F32)
            },
            planned("b", 3, DType::BF16),
        ];
        let (a2, b2) = (a.clone(), b.clone());
        let mut produce = move |p: &Planned| {
            Ok(if p.hf_name == "a" {
                a2.clone()
            } else {
                b2.clone()
            })
        };
        let mut count = 0;
        write_file(&path, &plan, &mut produce, &mut |_| count += 1)?;
        assert_eq!(count, 2);
        let loaded = oxtune_tensor::candle::safetensors::load(&path, &device)?;
        assert_eq!(loaded["a"].to_vec2::<f32>()?, a.to_vec2::<f32>()?);
        assert_eq!(loaded["b"].dtype(), DType::BF16);
        assert_eq!(
            loaded["b"].to_dtype(DType::F32)?.to_vec1::<f32>()?,
            vec![0.0, 1.0, 2.0]
        );
        Ok(())
    }
}

//! Device and dtype selection from the strings users type (`--device cuda:1`,
//! `--torch_dtype bfloat16`).

use candle_core::{DType, Device, Result};

/// Parses `auto` (the first CUDA device when built with `cuda`, else the CPU), `cpu`, `cuda`
/// or `cuda:N`.
pub fn parse_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            if candle_core::utils::cuda_is_available() {
                cuda_device(0)
            } else {
                Ok(Device::Cpu)
            }
        }
        "cuda" | "gpu" => cuda_device(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(ordinal)) => cuda_device(ordinal),
            _ => candle_core::bail!(
                "unknown device `{other}`\nhint: pass --device auto, cpu, cuda or cuda:N"
            ),
        },
    }
}

fn cuda_device(ordinal: usize) -> Result<Device> {
    if !candle_core::utils::cuda_is_available() {
        candle_core::bail!(
            "device cuda:{ordinal} asked for, but this oxtune was built without CUDA\n\
             hint: build with `scripts/build-cuda.sh` (cargo feature `cuda`), or pass --device cpu"
        );
    }
    #[cfg(feature = "cuda")]
    return cuda::device(ordinal);
    #[cfg(not(feature = "cuda"))]
    Device::new_cuda(ordinal)
}

/// Device memory in use on a GPU (total minus free, in bytes); `None` on the CPU. Freed
/// memory stays in the process's pool (see the CUDA module), so after a run this is the peak
/// the process reached.
pub fn memory_in_use(device: &Device) -> Result<Option<u64>> {
    Ok(free_memory(device)?.map(|(free, total)| total - free))
}

/// Free and total memory of a GPU, in bytes; `None` on the CPU.
pub fn free_memory(device: &Device) -> Result<Option<(u64, u64)>> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => {
            let (free, total) = cuda
                .cuda_stream()
                .context()
                .mem_get_info()
                .map_err(candle_core::Error::wrap)?;
            Ok(Some((free as u64, total as u64)))
        }
        _ => Ok(None),
    }
}

/// Parses a Hugging Face `torch_dtype` name (`float32`, `bfloat16`, `float16`, also `fp32`,
/// `bf16`, `fp16`).
pub fn parse_dtype(name: &str) -> Result<DType> {
    match name {
        "float32" | "fp32" | "f32" => Ok(DType::F32),
        "bfloat16" | "bf16" => Ok(DType::BF16),
        "float16" | "fp16" | "f16" | "half" => Ok(DType::F16),
        other => candle_core::bail!(
            "unknown dtype `{other}`\nhint: pass float32, bfloat16 or float16 (or auto)"
        ),
    }
}

/// The Hugging Face name of a dtype, as written in `config.json`'s `torch_dtype`.
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        DType::U8 => "uint8",
        DType::U32 => "uint32",
        DType::I64 => "int64",
        _ => "unknown",
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    //! How oxtune opens a GPU, for speed:
    //! - one device per GPU in the process, whoever asks for it, with one stream of its own
    //!   used by every thread (candle's default is each calling thread's per-thread stream),
    //!   so every kernel, copy, cuBLAS and cuRAND call of the GPU is ordered on that stream;
    //! - hence without cudarc's event tracking, which records an event on every buffer each
    //!   kernel writes and waits on it before each read (two driver calls per argument per
    //!   launch) so that buffers can cross streams safely; with one stream they never do;
    //! - freed memory kept in the pool: cudarc allocates from the device's default memory
    //!   pool, whose release threshold is 0, so at every synchronize freed memory goes back to
    //!   the driver and the next allocation maps it again. Raising the threshold keeps it in
    //!   the pool (a 512 MiB copy: 0.82 ms -> 0.27 ms).
    #![expect(
        unsafe_code,
        reason = "CUDA driver calls on the memory pool; turning off event tracking"
    )]

    use std::sync::Mutex;

    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::{Device, Result};

    /// The process's one device for GPU `ordinal`, opened on first use: every caller gets
    /// the same stream, so tensors from different callers never race.
    pub(super) fn device(ordinal: usize) -> Result<Device> {
        static OPENED: Mutex<Vec<(usize, Device)>> = Mutex::new(Vec::new());
        let mut opened = OPENED
            .lock()
            .map_err(|_| candle_core::Error::Msg("a thread panicked opening a GPU".into()))?;
        if let Some((_, device)) = opened.iter().find(|(o, _)| *o == ordinal) {
            return Ok(device.clone());
        }
        let device = open(ordinal)?;
        opened.push((ordinal, device.clone()));
        Ok(device)
    }

    fn open(ordinal: usize) -> Result<Device> {
        let device = Device::new_cuda_with_stream(ordinal)?;
        // SAFETY: event tracking guards buffers shared between streams; every operation on
        // this device runs on its single stream (candle's kernels, cuBLAS and cuRAND take
        // `cuda_stream()`, and so do our kernels), which orders each use of a buffer before
        // its release and reuse. It is turned off before any tensor exists.
        unsafe { device.as_cuda_device()?.disable_event_tracking() };
        keep_freed_memory(ordinal)?;
        Ok(device)
    }

    fn keep_freed_memory(ordinal: usize) -> Result<()> {
        let ordinal = i32::try_from(ordinal).map_err(candle_core::Error::wrap)?;
        // SAFETY: plain driver calls with valid out-pointers; the context exists because the
        // candle device was created just before.
        unsafe {
            let mut device = 0;
            check(sys::cuDeviceGet(&raw mut device, ordinal))?;
            let mut pool = std::ptr::null_mut();
            check(sys::cuDeviceGetDefaultMemPool(&raw mut pool, device))?;
            let mut threshold = u64::MAX;
            check(sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&raw mut threshold).cast(),
            ))?;
        }
        Ok(())
    }

    fn check(result: sys::CUresult) -> Result<()> {
        if result == sys::CUresult::CUDA_SUCCESS {
            Ok(())
        } else {
            candle_core::bail!("CUDA driver call failed: {result:?}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names() -> Result<()> {
        assert!(matches!(parse_device("cpu")?, Device::Cpu));
        assert_eq!(parse_dtype("bfloat16")?, DType::BF16);
        assert_eq!(dtype_name(parse_dtype("fp16")?), "float16");
        let error = parse_device("tpu:0")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(error.contains("unknown device `tpu:0`"), "{error}");
        let error = parse_dtype("float8")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(error.contains("hint: pass float32"), "{error}");
        Ok(())
    }
}

//! Recording a fixed piece of GPU work once and replaying it (CUDA graphs).
//!
//! A decode step of a small batch launches hundreds of short kernels; launching them one by
//! one from the host costs more than running them. A [`Graph`] records every kernel, copy and
//! stream-ordered allocation that `work` issues, then replays them with one launch. The
//! recorded work reads and writes the same buffers at every replay, so callers keep their
//! inputs and outputs in tensors created before the capture and update the inputs in place
//! (`Tensor::slice_set`) between replays; tensors created inside `work` must be dropped
//! before it returns (their allocations and frees are part of the recording).
//!
//! `work` must not copy between host and device or synchronize while recording: candle
//! refuses to, and the capture fails with an error, never a wrong result.

#![cfg_attr(
    feature = "cuda",
    expect(
        unsafe_code,
        reason = "the recorded graph is moved to the engine's thread (Send)"
    )
)]

use candle_core::{Device, Result};

/// A recorded piece of GPU work, replayed with [`Graph::replay`].
pub struct Graph {
    #[cfg(feature = "cuda")]
    recorded: candle_core::cuda::cudarc::driver::CudaGraph,
}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Graph").finish_non_exhaustive()
    }
}

// SAFETY: a CUDA graph may be used from any thread as long as calls on it are serialised
// (CUDA's graph thread-safety rules); `replay` takes `&mut self`, and `Graph` is not `Sync`.
#[cfg(feature = "cuda")]
unsafe impl Send for Graph {}

impl Graph {
    /// Runs `work` once to warm up (loading its kernels, and caching the small host-to-device
    /// uploads candle makes for strided layouts), then once more while recording.
    pub fn capture(device: &Device, mut work: impl FnMut() -> Result<()>) -> Result<Self> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(cuda) = device {
            use candle_core::cuda::cudarc::driver::sys;
            let _cache = cuda.enable_cuda_graph_htod_cache();
            work()?;
            device.synchronize()?;
            let stream = cuda.cuda_stream();
            stream
                .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .map_err(candle_core::Error::wrap)?;
            let outcome = work();
            // Always end the capture, so that the stream is usable again whatever happened.
            let ended = stream.end_capture(sys::CUgraphInstantiate_flags(0));
            outcome?;
            let recorded = ended
                .map_err(|error| {
                    candle_core::Error::Msg(format!(
                        "recording a CUDA graph failed: {error}\nhint: the recorded work may not copy between host and device"
                    ))
                })?
                .ok_or_else(|| candle_core::Error::Msg("the CUDA graph recorded nothing".into()))?;
            recorded.upload().map_err(candle_core::Error::wrap)?;
            return Ok(Self { recorded });
        }
        let _ = &mut work;
        candle_core::bail!("only a CUDA device records graphs (got {device:?})")
    }

    /// Runs the recorded work again, on the stream it was recorded from.
    pub fn replay(&mut self) -> Result<()> {
        #[cfg(feature = "cuda")]
        return self.recorded.launch().map_err(candle_core::Error::wrap);
        #[cfg(not(feature = "cuda"))]
        candle_core::bail!("only a CUDA device replays graphs")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_refuses_to_record() {
        let error = Graph::capture(&Device::Cpu, || Ok(()))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(error.contains("only a CUDA device"), "{error}");
    }
}

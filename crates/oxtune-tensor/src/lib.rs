//! The one crate that imports candle.
//!
//! Everything else in oxtune reaches tensors, autograd and CUDA through this crate, so a
//! candle upgrade (or a patched fork) touches one place. It adds:
//! - [`device`]: device and dtype selection from user strings (`cpu`, `cuda:1`, `bfloat16`),
//!   and the CUDA memory-pool setting that keeps freed memory with the process;
//! - [`ops`]: the ops the models use (RMSNorm, residual add + RMSNorm, RoPE, softmax, scaled
//!   masked softmax, SwiGLU, summed cross-entropy over vocabulary rows), each with a plain,
//!   differentiable reference and a fast path: on CUDA our own fused
//!   kernels with backward (`kernels/*.cu`, `cuda` feature), elsewhere candle-nn's fused
//!   kernels when no gradient flows;
//! - [`attention`]: FlashAttention-2 forward and backward kernels on CUDA (grouped-query,
//!   causal, packed segments, sliding window) beside their plain candle reference;
//! - [`graph`]: recording a fixed piece of GPU work once and replaying it (CUDA graphs);
//! - [`paged_attention`]: attention of serving query rows over keys and values read straight
//!   from a paged KV cache (one CUDA kernel, flash-decoding splits at small batch), beside its
//!   plain gather-and-softmax reference;
//! - [`optim`]: multi-tensor AdamW over a flat fp32 state buffer, updating the weights in
//!   place (one CUDA kernel launch per 64 parameters), and the global gradient norm's sum of
//!   squares for clipping;
//! - `cuda` (`cuda` feature): those kernels' forward and backward entry points, for the GPU
//!   tests and benchmarks.

pub mod attention;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod graph;
pub mod ops;
pub mod optim;
pub mod paged_attention;

pub use candle_core as candle;
pub use candle_nn as nn;

pub use candle_core::{D, DType, Device, IndexOp, Module, Result, Shape, Tensor, Var, WithDType};
pub use device::{dtype_name, free_memory, memory_in_use, parse_device, parse_dtype};

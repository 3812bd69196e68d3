//! Paged attention on CUDA (`kernels/paged_attn.cu`): the launch plan, the launches and the
//! candle op. Inference only: the op has no backward (`crate::paged_attention` refuses inputs
//! that track gradients before it gets here).
//!
//! The launch is sized from host values only (shapes, the context's `max_context` hint and
//! window), never from device data, and nothing is copied between host and device, so the op
//! can be recorded in a CUDA graph.
#![allow(
    unsafe_code,
    reason = "launching CUDA kernels and allocating their outputs is unsafe FFI"
)]

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda::CudaStorageSlice;
use candle_core::cuda::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, LaunchConfig, PushKernelArg, sys,
};
use candle_core::cuda::{CudaStorage, DeviceId, WrapErr};
use candle_core::{
    CpuStorage, CudaDevice, CustomOp3, Layout, Result, Shape, Storage, Tensor, bail,
};

use super::launch::{KernelFloat, Module, expect_len, function, to_i32, to_u32};
use crate::paged_attention::{PagedContext, PagedDims, check};

const PAGED_ATTN: Module = Module {
    name: "oxtune_paged_attn",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/paged_attn.ptx")),
};

/// The largest head_dim the kernel takes (8 elements a lane over a warp).
pub const PAGED_ATTENTION_MAX_HEAD_DIM: usize = 256;
/// Threads of a block (`PA_THREADS`).
const THREADS: u32 = 128;
/// Most keys of a partition (`PA_MAX_PARTITION`) and the fewest the plan gives one.
const MAX_PARTITION: usize = 256;
const MIN_PARTITION: usize = 32;
/// Most splits of a row's context (`PA_MAX_SPLITS` of the reduce kernel).
const MAX_SPLITS: usize = 1024;
/// Blocks resident at once when the occupancy query fails: 3 per SM of an H100/H200.
const FALLBACK_RESIDENT_BLOCKS: usize = 396;

/// How a call is cut into blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Plan {
    /// Query heads per block (1, 2, 4 or 8): the smallest kernel that takes all the heads of
    /// a kv head, or 8.
    group: usize,
    /// Blocks per kv head over its query heads.
    head_groups: usize,
    /// Keys per partition.
    partition_size: usize,
    /// Blocks per (row, kv head, head group), each taking every `splits`-th partition.
    splits: usize,
}

impl Plan {
    /// The kernel's heads per block, and blocks per kv head.
    fn heads(dims: &PagedDims) -> (usize, usize) {
        let per_kv = dims.heads / dims.kv_heads;
        let group = per_kv.next_power_of_two().min(8);
        (group, per_kv.div_ceil(group))
    }

    /// Splits a row's context over as many blocks as fill the GPU in one wave (`resident`
    /// blocks at once), in partitions of 32 to 256 keys; a small batch gets many splits, a
    /// large one none (each block then loops over its row's partitions).
    fn new(
        dims: &PagedDims,
        max_context: usize,
        sliding_window: Option<usize>,
        resident: usize,
    ) -> Self {
        let (group, head_groups) = Self::heads(dims);
        let visible = max_context.min(sliding_window.unwrap_or(usize::MAX)).max(1);
        let blocks = (dims.rows * dims.kv_heads * head_groups).max(1);
        let wanted_splits = (resident / blocks).clamp(1, MAX_SPLITS);
        let partition_size = visible
            .div_ceil(wanted_splits)
            .next_multiple_of(MIN_PARTITION)
            .clamp(MIN_PARTITION, MAX_PARTITION);
        let splits = visible.div_ceil(partition_size).min(wanted_splits);
        Self {
            group,
            head_groups,
            partition_size,
            splits,
        }
    }
}

/// Blocks of the kernel `name` (`func`, 128 threads) resident at once on the device: blocks
/// per SM times SMs, asked of the driver once per device and kernel.
fn resident_blocks(device: &CudaDevice, name: &str, func: &CudaFunction) -> usize {
    type Cache = Mutex<HashMap<(DeviceId, String), usize>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Cache::default);
    let key = (device.id(), name.to_owned());
    if let Some(&blocks) = cache.lock().ok().as_ref().and_then(|map| map.get(&key)) {
        return blocks;
    }
    let stream = device.cuda_stream();
    let sms = stream
        .context()
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .ok()
        .and_then(|count| usize::try_from(count).ok());
    let per_sm = func
        .occupancy_max_active_blocks_per_multiprocessor(THREADS, 0, None)
        .ok()
        .and_then(|count| usize::try_from(count).ok());
    let blocks = match (sms, per_sm) {
        (Some(sms), Some(per_sm)) if sms * per_sm > 0 => sms * per_sm,
        _ => FALLBACK_RESIDENT_BLOCKS,
    };
    if let Ok(mut map) = cache.lock() {
        map.insert(key, blocks);
    }
    blocks
}

/// See [`crate::paged_attention::paged_attention`]; called for CUDA tensors of f32, bf16 or
/// f16 with head_dim <= [`PAGED_ATTENTION_MAX_HEAD_DIM`].
pub fn paged_attention(
    q: &Tensor,
    k_pool: &Tensor,
    v_pool: &Tensor,
    context: &PagedContext,
    scale: f64,
) -> Result<Tensor> {
    let dims = check(q, k_pool, v_pool, context)?;
    if dims.head_dim > PAGED_ATTENTION_MAX_HEAD_DIM {
        bail!(
            "paged_attention: head_dim {} > {PAGED_ATTENTION_MAX_HEAD_DIM}, the kernel's limit",
            dims.head_dim
        );
    }
    let window = match context.sliding_window {
        None => 0,
        Some(window) => to_i32(window.min(i32::MAX as usize), "window", "paged_attention")?,
    };
    #[expect(
        clippy::cast_possible_truncation,
        reason = "attention scales are O(1) constants"
    )]
    let scale = scale as f32;
    let op = PagedAttention {
        slots: context.slots.contiguous()?,
        rows: context.rows.contiguous()?,
        dims,
        max_context: context.max_context,
        sliding_window: context.sliding_window,
        window,
        scale,
    };
    q.contiguous()?
        .apply_op3_no_bwd(&k_pool.contiguous()?, &v_pool.contiguous()?, &op)
}

/// (q, k_pool, v_pool) -> attention output; the context's index tensors ride along.
struct PagedAttention {
    slots: Tensor,
    rows: Tensor,
    dims: PagedDims,
    max_context: usize,
    sliding_window: Option<usize>,
    window: i32,
    scale: f32,
}

/// The arguments of one launch besides the tensors.
struct Launch<'a> {
    dims: &'a PagedDims,
    max_context: usize,
    sliding_window: Option<usize>,
    window: i32,
    scale: f32,
}

impl CustomOp3 for PagedAttention {
    fn name(&self) -> &'static str {
        "oxtune-paged-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        super::no_cpu(self.name())
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        q_layout: &Layout,
        k_pool: &CudaStorage,
        k_layout: &Layout,
        v_pool: &CudaStorage,
        v_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        let (slots_storage, slots_layout) = self.slots.storage_and_layout();
        let (rows_storage, rows_layout) = self.rows.storage_and_layout();
        let (Storage::Cuda(slots), Storage::Cuda(rows)) = (&*slots_storage, &*rows_storage) else {
            bail!("{op}: slots and rows must be on the GPU of q");
        };
        let slots = super::view(slots.as_cuda_slice::<u32>()?, slots_layout, op, "slots")?;
        let rows = super::view(rows.as_cuda_slice::<u32>()?, rows_layout, op, "rows")?;
        let launch = Launch {
            dims: &self.dims,
            max_context: self.max_context,
            sliding_window: self.sliding_window,
            window: self.window,
            scale: self.scale,
        };
        let device = q.device.clone();
        // The typed views of q and the pools, then the launches.
        macro_rules! run_typed {
            ($q:expr) => {
                CudaStorage::wrap_cuda_slice(
                    run(
                        &device,
                        [
                            &super::view($q, q_layout, op, "q")?,
                            &super::view_as(k_pool, k_layout, op, "k_pool")?,
                            &super::view_as(v_pool, v_layout, op, "v_pool")?,
                        ],
                        &slots,
                        &rows,
                        &launch,
                    )?,
                    device.clone(),
                )
            };
        }
        let out = match &q.slice {
            CudaStorageSlice::F32(q) => run_typed!(q),
            CudaStorageSlice::BF16(q) => run_typed!(q),
            CudaStorageSlice::F16(q) => run_typed!(q),
            _ => bail!(
                "{op}: no kernel for dtype {:?} (f32, bf16 and f16 have one)",
                q.dtype()
            ),
        };
        let PagedDims {
            rows: n,
            heads,
            head_dim,
            ..
        } = self.dims;
        Ok((out, Shape::from((n, heads, head_dim))))
    }
}

/// The attention kernel, then the reduce kernel when a row's context is split.
fn run<T: KernelFloat>(
    device: &CudaDevice,
    [q, k_pool, v_pool]: [&CudaView<'_, T>; 3],
    slots: &CudaView<'_, u32>,
    rows: &CudaView<'_, u32>,
    launch: &Launch<'_>,
) -> Result<CudaSlice<T>> {
    let kernel = "paged_attention";
    let Launch {
        dims,
        max_context,
        sliding_window,
        window,
        scale,
    } = *launch;
    let PagedDims {
        rows: n,
        heads,
        kv_heads,
        head_dim,
        pool_slots,
        total_slots,
    } = *dims;
    let count = n * heads * head_dim;
    expect_len(q, count, "q", kernel)?;
    expect_len(k_pool, pool_slots * kv_heads * head_dim, "k_pool", kernel)?;
    expect_len(v_pool, pool_slots * kv_heads * head_dim, "v_pool", kernel)?;
    expect_len(rows, 2 * n, "rows", kernel)?;
    expect_len(slots, total_slots, "slots", kernel)?;
    // The kernel reads slots[table + j] and pool row `slot` only after checking them against
    // these bounds (a bad index makes its row NaN).
    let total = to_u32(total_slots, "slots", kernel)?;
    let pool = to_u32(pool_slots, "pool slots", kernel)?;
    let h = to_i32(heads, "heads", kernel)?;
    let kv_h = to_i32(kv_heads, "kv heads", kernel)?;
    let d = to_i32(head_dim, "head_dim", kernel)?;
    let (group, _) = Plan::heads(dims);
    let root = format!("paged_attention_g{group}");
    let func = function::<T>(device, &PAGED_ATTN, &root)?;
    let resident = resident_blocks(device, &format!("{root}_{}", T::DTYPE.as_str()), &func);
    let plan = Plan::new(dims, max_context, sliding_window, resident);
    let partition = to_i32(plan.partition_size, "partition size", kernel)?;
    let grid = (
        to_u32(n, "rows", kernel)?,
        to_u32(
            kv_heads * plan.head_groups,
            "kv heads x head groups",
            kernel,
        )?,
        to_u32(plan.splits, "splits", kernel)?,
    );
    if grid.1 > 65_535 {
        bail!("{kernel}: {} kv heads x head groups > 65535", grid.1);
    }
    let stream = device.cuda_stream();
    // SAFETY: with one split the kernel writes every element of out (n, h, d); with more,
    // the reduce kernel does, from the partials every block writes whole.
    let mut out = unsafe { device.alloc::<T>(count)? };
    let partials = if plan.splits > 1 { plan.splits } else { 0 };
    // SAFETY: every (row, head, split) of the partials is written by its block (-inf, 0 and
    // zeros when the split has no partition) before the reduce kernel reads it; with one
    // split the kernel never touches them (one element each, never read).
    let mut partial_acc = unsafe { device.alloc::<f32>((n * heads * partials * head_dim).max(1))? };
    let mut partial_stats = unsafe { device.alloc::<f32>((n * heads * partials * 2).max(1))? };
    if n == 0 {
        return Ok(out);
    }
    let mut builder = stream.launch_builder(&func);
    builder.arg(q).arg(k_pool).arg(v_pool).arg(slots).arg(rows);
    builder
        .arg(&mut out)
        .arg(&mut partial_acc)
        .arg(&mut partial_stats);
    builder
        .arg(&h)
        .arg(&kv_h)
        .arg(&d)
        .arg(&window)
        .arg(&partition)
        .arg(&scale)
        .arg(&total)
        .arg(&pool);
    let config = LaunchConfig {
        grid_dim: grid,
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: grid (n, kv_h * head_groups, splits) of 128 threads as the kernel expects; q,
    // the pools, rows and slots hold what it indexes (checked above; device indices are
    // bounds-checked in the kernel); out and the partials are sized for (n, h[, splits], d);
    // head_dim <= 256 (checked by the caller); the arguments match
    // paged_attention_g<group>_<dtype> in paged_attn.cu.
    unsafe { builder.launch(config) }.w()?;
    if plan.splits > 1 {
        let func = function::<T>(device, &PAGED_ATTN, "paged_attention_reduce")?;
        let splits = to_i32(plan.splits, "splits", kernel)?;
        let mut builder = stream.launch_builder(&func);
        builder.arg(&partial_acc).arg(&partial_stats).arg(&mut out);
        builder.arg(&d).arg(&splits);
        let config = LaunchConfig {
            grid_dim: (to_u32(n * heads, "rows x heads", kernel)?, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: one block per (row, head) over the partials of all `splits` (at most
        // 1024, the kernel's shared weights) written above; out holds (n, h, d); arguments
        // match paged_attention_reduce_<dtype>.
        unsafe { builder.launch(config) }.w()?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims(rows: usize, heads: usize, kv_heads: usize) -> PagedDims {
        PagedDims {
            rows,
            heads,
            kv_heads,
            head_dim: 128,
            pool_slots: 1 << 20,
            total_slots: 1 << 16,
        }
    }

    #[test]
    fn plans_fill_the_gpu_in_one_wave_and_cap_partitions() {
        let resident = 396; // 3 blocks on each of 132 SMs
        // Qwen3-8B decode at batch 1, 8192 tokens: 8 kv heads x 43 splits of 192 keys
        let plan = Plan::new(&dims(1, 32, 8), 8192, None, resident);
        assert_eq!(
            plan,
            Plan {
                group: 4,
                head_groups: 1,
                partition_size: 192,
                splits: 43
            }
        );
        // batch 32 at 1024: 256 blocks already; each loops over 4 partitions of 256 keys
        let plan = Plan::new(&dims(32, 32, 8), 1024, None, resident);
        assert_eq!((plan.partition_size, plan.splits), (256, 1));
        // short contexts: partitions of 32 keys at least
        let plan = Plan::new(&dims(1, 32, 8), 512, None, resident);
        assert_eq!((plan.partition_size, plan.splits), (32, 16));
        // a window bounds what a row sees
        let plan = Plan::new(&dims(1, 32, 8), 100_000, Some(4096), resident);
        assert!(plan.splits * plan.partition_size >= 4096);
        assert!(plan.splits * 8 <= resident);
        // MQA: 32 query heads per kv head in 4 blocks of 8
        let plan = Plan::new(&dims(4, 32, 1), 10, None, resident);
        assert_eq!((plan.group, plan.head_groups, plan.splits), (8, 4, 1));
        // 6 heads per kv head: one block of 8 with two idle head slots
        let plan = Plan::new(&dims(4, 12, 2), 10, None, resident);
        assert_eq!((plan.group, plan.head_groups), (8, 1));
        // a huge GPU and a long context stay within the reduce kernel's splits
        let plan = Plan::new(&dims(1, 8, 8), 1 << 20, None, 1 << 20);
        assert_eq!(plan.splits, MAX_SPLITS);
    }
}

//! The fused q/k norm + RoPE + paged KV cache write of a serving step
//! (`ops::qk_norm_rope_cache_write`, `kernels/rope_cache.cu`) on the GPU against its
//! composition: the f64 CPU reference from the same dtype-rounded inputs, and the six-op
//! composition on the GPU in the same dtype. q and every row of both pools are checked
//! (written rows against the reference, every other row untouched). Then out-of-range slots,
//! a CUDA graph replay, and a timing print against the composition. Built and run only with
//! `--features cuda` on a machine with a GPU:
//!
//!   .gpu/cuda-rope-cache --test-threads 1 --nocapture
#![cfg(feature = "cuda")]
#![allow(
    clippy::print_stdout,
    reason = "the tests print errors and timings for kernels/README.md"
)]

mod common;

use common::seconds_per_call;
use oxtune_tensor::ops::{self, AttentionHeads};
use oxtune_tensor::{DType, Device, Result, Tensor};

const EPS: f64 = 1e-6;

fn gpu() -> Result<Device> {
    oxtune_tensor::parse_device("cuda")
}

fn randn(shape: &[usize], mean: f32, std: f32) -> Result<Tensor> {
    Tensor::randn(mean, std, shape, &Device::Cpu)
}

/// The largest error allowed, relative to the largest |reference| of the same head: f32
/// 1e-5; bf16 2^-6 (two ulps at the head's max); f16 2^-8. The kernel rounds where the
/// composition rounds (the normalised head, then the rotation); against the unrounded f64
/// reference that is at most 2^-7 + 2^-9 of the head's max in bf16.
fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::F16 => 1.0 / 256.0,
        _ => 1.0 / 64.0,
    }
}

fn host(tensor: &Tensor) -> Result<Vec<f64>> {
    tensor
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1()
}

/// Compares `got` with `expected` in chunks (heads) of `width`, each error relative to its
/// chunk's max |expected|; returns the worst.
fn compare_heads(
    label: &str,
    what: &str,
    dtype: DType,
    expected: &[f64],
    got: &[f64],
    width: usize,
) -> f64 {
    assert_eq!(
        expected.len(),
        got.len(),
        "{label} {what}: {} elements, expected {}",
        got.len(),
        expected.len()
    );
    let tol = tolerance(dtype);
    let mut worst = (0f64, 0usize);
    for (chunk, (e, g)) in expected.chunks(width).zip(got.chunks(width)).enumerate() {
        let max = e.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
        for (j, (e, g)) in e.iter().zip(g).enumerate() {
            let error = if g.is_finite() {
                (e - g).abs() / max
            } else {
                f64::INFINITY
            };
            if error > worst.0 {
                worst = (error, chunk * width + j);
            }
        }
    }
    let (error, index) = worst;
    assert!(
        error <= tol,
        "{label} {what}: error {error:e} of the head's max |reference| (allowed {tol:e}) at \
         head {}, element {} (flat {index}): GPU {} vs reference {}",
        index / width,
        index % width,
        got[index],
        expected[index]
    );
    error
}

/// Pool rows not in `written` must be bit for bit what they were.
fn check_untouched(
    label: &str,
    what: &str,
    before: &[f64],
    got: &[f64],
    row: usize,
    written: &[usize],
) {
    for (slot, (b, g)) in before.chunks(row).zip(got.chunks(row)).enumerate() {
        if !written.contains(&slot) {
            assert!(
                b == g,
                "{label} {what}: row {slot} was not a slot of the step but changed"
            );
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Case {
    t: usize,
    h: usize,
    kv: usize,
    d: usize,
    dtype: DType,
    norms: bool,
    /// q, k and v as narrows of one fused (t, (h + 2 kv) d) tensor, else separate tensors.
    fused: bool,
}

/// Distinct slots in scrambled order: i * 7919 + 13 (mod num_slots), num_slots < 7919.
fn scrambled_slots(t: usize, num_slots: usize) -> Vec<u32> {
    (0..t)
        .map(|i| u32::try_from((i * 7919 + 13) % num_slots).expect("small pools"))
        .collect()
}

/// The step's inputs as dtype-rounded values held in f64 on the CPU.
struct Inputs {
    qkv: Tensor,
    q_norm: Tensor,
    k_norm: Tensor,
    cos: Tensor,
    sin: Tensor,
    /// (2, num_slots, kv * d): the pools' values before the step.
    pools: Tensor,
}

impl Inputs {
    fn new(case: &Case, num_slots: usize) -> Result<Self> {
        let Case {
            t, h, kv, d, dtype, ..
        } = *case;
        let rounded = |x: Tensor| x.to_dtype(dtype)?.to_dtype(DType::F64);
        let angles = randn(&[t, d / 2], 0.0, 3.0)?;
        Ok(Self {
            qkv: rounded(randn(&[t, (h + 2 * kv) * d], 0.0, 1.5)?)?,
            q_norm: rounded(randn(&[d], 1.0, 0.3)?)?,
            k_norm: rounded(randn(&[d], 1.0, 0.3)?)?,
            cos: rounded(angles.cos()?)?,
            sin: rounded(angles.sin()?)?,
            pools: rounded(randn(&[2, num_slots, kv * d], 0.0, 1.0)?)?,
        })
    }

    /// (q, k, v) of `qkv` on `device` in `dtype`: narrows of one tensor, or three tensors.
    fn qkv_on(&self, case: &Case, device: &Device) -> Result<(Tensor, Tensor, Tensor)> {
        let Case {
            h,
            kv,
            d,
            dtype,
            fused,
            ..
        } = *case;
        let qkv = self.qkv.to_dtype(dtype)?.to_device(device)?;
        let q = qkv.narrow(1, 0, h * d)?;
        let k = qkv.narrow(1, h * d, kv * d)?;
        let v = qkv.narrow(1, (h + kv) * d, kv * d)?;
        if fused {
            Ok((q, k, v))
        } else {
            Ok((q.contiguous()?, k.contiguous()?, v.contiguous()?))
        }
    }
}

/// The pools, q and what the composition leaves, for one case.
fn check_case(gpu: &Device, case: &Case) -> Result<f64> {
    let Case {
        t,
        h,
        kv,
        d,
        dtype,
        norms,
        fused,
    } = *case;
    let heads = AttentionHeads {
        q: h,
        kv,
        head_dim: d,
    };
    let num_slots = 3 * t + 5;
    let inputs = Inputs::new(case, num_slots)?;
    let slots_host = scrambled_slots(t, num_slots);
    let written: Vec<usize> = slots_host.iter().map(|&s| s as usize).collect();
    let label = format!(
        "t {t}, h {h}, kv {kv}, d {d}, {dtype:?}, norms {norms}, {}",
        if fused {
            "narrows of a fused qkv"
        } else {
            "contiguous q, k, v"
        }
    );

    // f64 reference on the CPU
    let cpu = Device::Cpu;
    let (q, k, v) = inputs.qkv_on(
        &Case {
            dtype: DType::F64,
            ..*case
        },
        &cpu,
    )?;
    let k_pool_ref = inputs.pools.get(0)?.copy()?;
    let v_pool_ref = inputs.pools.get(1)?.copy()?;
    let q_ref = ops::qk_norm_rope_cache_write_reference(&ops::RopeCacheInputs {
        q: &q,
        k: &k,
        v: &v,
        heads,
        norms: norms.then_some((&inputs.q_norm, &inputs.k_norm)),
        eps: EPS,
        cos: &inputs.cos,
        sin: &inputs.sin,
        slots: &Tensor::new(slots_host.as_slice(), &cpu)?,
        k_pool: &k_pool_ref,
        v_pool: &v_pool_ref,
    })?;

    // the kernel, and the six-op composition, on the GPU in `dtype`
    let on_gpu = |x: &Tensor| x.to_dtype(dtype)?.to_device(gpu);
    let (q, k, v) = inputs.qkv_on(case, gpu)?;
    let (q_norm, k_norm) = (on_gpu(&inputs.q_norm)?, on_gpu(&inputs.k_norm)?);
    let (cos, sin) = (on_gpu(&inputs.cos)?, on_gpu(&inputs.sin)?);
    let slots = Tensor::new(slots_host.as_slice(), gpu)?;
    let run = |fused_kernel: bool| -> Result<(Tensor, Tensor, Tensor)> {
        let k_pool = on_gpu(&inputs.pools.get(0)?)?;
        let v_pool = on_gpu(&inputs.pools.get(1)?)?;
        let norms = norms.then_some((&q_norm, &k_norm));
        let call = ops::RopeCacheInputs {
            q: &q,
            k: &k,
            v: &v,
            heads,
            norms,
            eps: EPS,
            cos: &cos,
            sin: &sin,
            slots: &slots,
            k_pool: &k_pool,
            v_pool: &v_pool,
        };
        let out = if fused_kernel {
            oxtune_tensor::cuda::qk_norm_rope_cache_write(&call)?
        } else {
            ops::qk_norm_rope_cache_write_reference(&call)?
        };
        Ok((out, k_pool, v_pool))
    };
    let (q_out, k_pool, v_pool) = run(true)?;
    assert_eq!(q_out.dims(), [t, h, d], "{label}: q's shape");
    assert_eq!(q_out.dtype(), dtype, "{label}: q's dtype");
    assert!(q_out.is_contiguous(), "{label}: q is not contiguous");
    let (q_composed, k_pool_composed, v_pool_composed) = run(false)?;

    let before = host(&inputs.pools)?;
    let pool_len = num_slots * kv * d;
    let (k_before, v_before) = before.split_at(pool_len);
    let (q_got, k_got, v_got) = (host(&q_out)?, host(&k_pool)?, host(&v_pool)?);
    let mut worst = 0f64;
    for (what, expected) in [
        ("q against the f64 reference", host(&q_ref)?),
        ("q against the GPU composition", host(&q_composed)?),
    ] {
        worst = worst.max(compare_heads(&label, what, dtype, &expected, &q_got, d));
    }
    for (what, expected) in [
        ("k_pool against the f64 reference", host(&k_pool_ref)?),
        (
            "k_pool against the GPU composition",
            host(&k_pool_composed)?,
        ),
    ] {
        worst = worst.max(compare_heads(&label, what, dtype, &expected, &k_got, d));
    }
    check_untouched(&label, "k_pool", k_before, &k_got, kv * d, &written);
    // v is copied: its rows are exactly the step's v, and the other rows untouched
    assert!(
        host(&v_pool_ref)? == v_got,
        "{label}: v_pool differs from the reference"
    );
    assert!(
        host(&v_pool_composed)? == v_got,
        "{label}: v_pool differs from the GPU composition"
    );
    check_untouched(&label, "v_pool", v_before, &v_got, kv * d, &written);
    Ok(worst)
}

#[test]
fn rope_cache_kernel_matches_the_composition() -> Result<()> {
    let gpu = gpu()?;
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for norms in [true, false] {
            let mut worst = 0f64;
            let mut cases = 0;
            for fused in [true, false] {
                for t in [1, 7, 64] {
                    for (h, kv) in [(16, 8), (32, 8), (9, 3)] {
                        for d in [64, 128] {
                            let case = Case {
                                t,
                                h,
                                kv,
                                d,
                                dtype,
                                norms,
                                fused,
                            };
                            worst = worst.max(check_case(&gpu, &case)?);
                            cases += 1;
                        }
                    }
                }
            }
            println!(
                "rope_cache {dtype:?}, norms {norms}: {cases} cases, max error {worst:.2e} of \
                 the head's max (allowed {:.1e})",
                tolerance(dtype)
            );
        }
    }
    Ok(())
}

#[test]
fn ops_function_takes_the_kernel_on_the_gpu() -> Result<()> {
    // The public op on CUDA tensors gives the kernel's result bit for bit.
    let gpu = gpu()?;
    let case = Case {
        t: 7,
        h: 32,
        kv: 8,
        d: 128,
        dtype: DType::BF16,
        norms: true,
        fused: true,
    };
    let heads = AttentionHeads {
        q: 32,
        kv: 8,
        head_dim: 128,
    };
    let num_slots = 40;
    let inputs = Inputs::new(&case, num_slots)?;
    let on_gpu = |x: &Tensor| x.to_dtype(DType::BF16)?.to_device(&gpu);
    let (q, k, v) = inputs.qkv_on(&case, &gpu)?;
    let (q_norm, k_norm) = (on_gpu(&inputs.q_norm)?, on_gpu(&inputs.k_norm)?);
    let (cos, sin) = (on_gpu(&inputs.cos)?, on_gpu(&inputs.sin)?);
    let slots = Tensor::new(scrambled_slots(7, num_slots).as_slice(), &gpu)?;
    let mut results = Vec::new();
    for kernel in [true, false] {
        let k_pool = on_gpu(&inputs.pools.get(0)?)?;
        let v_pool = on_gpu(&inputs.pools.get(1)?)?;
        let norms = Some((&q_norm, &k_norm));
        let call = ops::RopeCacheInputs {
            q: &q,
            k: &k,
            v: &v,
            heads,
            norms,
            eps: EPS,
            cos: &cos,
            sin: &sin,
            slots: &slots,
            k_pool: &k_pool,
            v_pool: &v_pool,
        };
        let q = if kernel {
            oxtune_tensor::cuda::qk_norm_rope_cache_write(&call)?
        } else {
            ops::qk_norm_rope_cache_write(&call)?
        };
        results.push((host(&q)?, host(&k_pool)?, host(&v_pool)?));
    }
    assert!(
        results[0] == results[1],
        "ops::qk_norm_rope_cache_write differs from the kernel"
    );
    Ok(())
}

#[test]
fn rope_cache_kernel_skips_slots_outside_the_pool() -> Result<()> {
    let gpu = gpu()?;
    let (t, h, kv, d, num_slots) = (6, 9, 3, 64, 20);
    let heads = AttentionHeads {
        q: h,
        kv,
        head_dim: d,
    };
    for dtype in [DType::F32, DType::BF16] {
        let case = Case {
            t,
            h,
            kv,
            d,
            dtype,
            norms: true,
            fused: true,
        };
        let inputs = Inputs::new(&case, num_slots)?;
        // rows 1 and 4 point past the pool (its length, and u32::MAX)
        let slots_host = [3u32, 20, 17, 0, u32::MAX, 9];
        let on_gpu = |x: &Tensor| x.to_dtype(dtype)?.to_device(&gpu);
        let (q, k, v) = inputs.qkv_on(&case, &gpu)?;
        let k_pool = on_gpu(&inputs.pools.get(0)?)?;
        let v_pool = on_gpu(&inputs.pools.get(1)?)?;
        let q_out = oxtune_tensor::cuda::qk_norm_rope_cache_write(&ops::RopeCacheInputs {
            q: &q,
            k: &k,
            v: &v,
            heads,
            norms: Some((&on_gpu(&inputs.q_norm)?, &on_gpu(&inputs.k_norm)?)),
            eps: EPS,
            cos: &on_gpu(&inputs.cos)?,
            sin: &on_gpu(&inputs.sin)?,
            slots: &Tensor::new(&slots_host, &gpu)?,
            k_pool: &k_pool,
            v_pool: &v_pool,
        })?;
        // the reference skips u32::MAX (candle's scatter) and errs on other bad slots
        let skipped: Vec<u32> = slots_host
            .iter()
            .map(|&s| {
                if (s as usize) < num_slots {
                    s
                } else {
                    u32::MAX
                }
            })
            .collect();
        let cpu = Device::Cpu;
        let (q_cpu, k_cpu, v_cpu) = inputs.qkv_on(
            &Case {
                dtype: DType::F64,
                ..case
            },
            &cpu,
        )?;
        let k_pool_ref = inputs.pools.get(0)?.copy()?;
        let v_pool_ref = inputs.pools.get(1)?.copy()?;
        let q_ref = ops::qk_norm_rope_cache_write_reference(&ops::RopeCacheInputs {
            q: &q_cpu,
            k: &k_cpu,
            v: &v_cpu,
            heads,
            norms: Some((&inputs.q_norm, &inputs.k_norm)),
            eps: EPS,
            cos: &inputs.cos,
            sin: &inputs.sin,
            slots: &Tensor::new(skipped.as_slice(), &cpu)?,
            k_pool: &k_pool_ref,
            v_pool: &v_pool_ref,
        })?;
        let label = format!("bad slots {slots_host:?}, {dtype:?}");
        compare_heads(&label, "q", dtype, &host(&q_ref)?, &host(&q_out)?, d);
        let k_got = host(&k_pool)?;
        compare_heads(&label, "k_pool", dtype, &host(&k_pool_ref)?, &k_got, d);
        let before = host(&inputs.pools)?;
        let written = [3, 17, 0, 9];
        check_untouched(
            &label,
            "k_pool",
            &before[..num_slots * kv * d],
            &k_got,
            kv * d,
            &written,
        );
        let v_got = host(&v_pool)?;
        assert!(host(&v_pool_ref)? == v_got, "{label}: v_pool");
    }
    Ok(())
}

#[test]
fn rope_cache_kernel_replays_from_a_cuda_graph() -> Result<()> {
    let gpu = gpu()?;
    let (t, h, kv, d, num_slots) = (4, 16, 8, 128, 64);
    let heads = AttentionHeads {
        q: h,
        kv,
        head_dim: d,
    };
    let dtype = DType::BF16;
    let on_gpu = |x: &Tensor| x.to_dtype(dtype)?.to_device(&gpu);
    let qkv = on_gpu(&randn(&[t, (h + 2 * kv) * d], 0.0, 1.0)?)?;
    let q_norm = on_gpu(&randn(&[d], 1.0, 0.3)?)?;
    let k_norm = on_gpu(&randn(&[d], 1.0, 0.3)?)?;
    let angles = randn(&[t, d / 2], 0.0, 3.0)?;
    let (cos, sin) = (on_gpu(&angles.cos()?)?, on_gpu(&angles.sin()?)?);
    let slots = Tensor::new(&[5u32, 60, 2, 33], &gpu)?;
    let k_pool = Tensor::zeros((num_slots, kv * d), dtype, &gpu)?;
    let v_pool = Tensor::zeros((num_slots, kv * d), dtype, &gpu)?;
    let q_out = Tensor::zeros((t, h, d), dtype, &gpu)?;
    let step = |k_pool: &Tensor, v_pool: &Tensor| -> Result<Tensor> {
        oxtune_tensor::cuda::qk_norm_rope_cache_write(&ops::RopeCacheInputs {
            q: &qkv.narrow(1, 0, h * d)?,
            k: &qkv.narrow(1, h * d, kv * d)?,
            v: &qkv.narrow(1, (h + kv) * d, kv * d)?,
            heads,
            norms: Some((&q_norm, &k_norm)),
            eps: EPS,
            cos: &cos,
            sin: &sin,
            slots: &slots,
            k_pool,
            v_pool,
        })
    };
    let mut graph = oxtune_tensor::graph::Graph::capture(&gpu, || {
        q_out.slice_set(&step(&k_pool, &v_pool)?, 0, 0)
    })?;
    for round in 0..3u32 {
        qkv.slice_set(&on_gpu(&randn(&[t, (h + 2 * kv) * d], 0.0, 1.0)?)?, 0, 0)?;
        let fresh: Vec<u32> = (0..4u32).map(|i| (i * 13 + round * 7 + 1) % 64).collect();
        slots.slice_set(&Tensor::new(fresh.as_slice(), &gpu)?, 0, 0)?;
        let (k_eager, v_eager) = (k_pool.copy()?, v_pool.copy()?);
        graph.replay()?;
        let q_eager = step(&k_eager, &v_eager)?;
        for (what, replayed, eager) in [
            ("q", &q_out, &q_eager),
            ("k_pool", &k_pool, &k_eager),
            ("v_pool", &v_pool, &v_eager),
        ] {
            assert!(
                host(replayed)? == host(eager)?,
                "replay {round}: {what} differs from the eager call"
            );
        }
        println!("graph replay {round}: q and both pools equal the eager call");
    }
    Ok(())
}

#[test]
fn rope_cache_speed_against_the_composition() -> Result<()> {
    let gpu = gpu()?;
    println!("| step | fused kernel | six-op composition |");
    println!("| --- | --- | --- |");
    // Qwen3-8B (32 heads, 8 kv heads, d 128, q/k norms) and Llama-3-8B (no norms) shapes
    for (t, norms) in [(1, true), (8, true), (64, true), (1, false), (64, false)] {
        let (h, kv, d, num_slots) = (32, 8, 128, 4096);
        let heads = AttentionHeads {
            q: h,
            kv,
            head_dim: d,
        };
        let dtype = DType::BF16;
        let on_gpu = |x: &Tensor| x.to_dtype(dtype)?.to_device(&gpu);
        let qkv = on_gpu(&randn(&[t, (h + 2 * kv) * d], 0.0, 1.0)?)?;
        let (q, k, v) = (
            qkv.narrow(1, 0, h * d)?,
            qkv.narrow(1, h * d, kv * d)?,
            qkv.narrow(1, (h + kv) * d, kv * d)?,
        );
        let q_norm = on_gpu(&randn(&[d], 1.0, 0.3)?)?;
        let k_norm = on_gpu(&randn(&[d], 1.0, 0.3)?)?;
        let norms = norms.then_some((&q_norm, &k_norm));
        let angles = randn(&[t, d / 2], 0.0, 3.0)?;
        let (cos, sin) = (on_gpu(&angles.cos()?)?, on_gpu(&angles.sin()?)?);
        let slots = Tensor::new(scrambled_slots(t, num_slots).as_slice(), &gpu)?;
        let k_pool = Tensor::zeros((num_slots, kv * d), dtype, &gpu)?;
        let v_pool = Tensor::zeros((num_slots, kv * d), dtype, &gpu)?;
        let call = ops::RopeCacheInputs {
            q: &q,
            k: &k,
            v: &v,
            heads,
            norms,
            eps: EPS,
            cos: &cos,
            sin: &sin,
            slots: &slots,
            k_pool: &k_pool,
            v_pool: &v_pool,
        };
        let fused = seconds_per_call(&gpu, || ops::qk_norm_rope_cache_write(&call).map(drop))?;
        let composed = seconds_per_call(&gpu, || {
            ops::qk_norm_rope_cache_write_reference(&call).map(drop)
        })?;
        println!(
            "| t {t}, h {h}, kv {kv}, d {d}, bf16, norms {} | {:.1} µs | {:.1} µs |",
            norms.is_some(),
            fused * 1e6,
            composed * 1e6
        );
    }
    Ok(())
}

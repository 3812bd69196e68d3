//! Every op the models use, on the GPU against the CPU, at the shapes of real checkpoints
//! (SmolLM2-135M: hidden 576, 9 heads of 64, 3 key/value heads, vocab 49152), in f32 and
//! bf16; then each fused kernel of `kernels/*.cu` (forward and every gradient through
//! candle's autograd) against the f64 CPU reference on odd and large shapes, and a
//! bandwidth print of each kernel next to candle's equivalents. Built and run only with
//! `--features cuda` on a machine with a GPU:
//!
//!   .gpu/cuda-ops --test-threads 1 --nocapture
#![cfg(feature = "cuda")]
#![allow(
    clippy::print_stdout,
    reason = "the tests print errors and bandwidths for docs/benchmarks.md"
)]

mod common;

use common::seconds_per_call;
use oxtune_tensor::ops::ScoreMask;
use oxtune_tensor::{D, DType, Device, Result, Tensor, Var, ops};

fn compare(name: &str, cpu: &Tensor, gpu: &Tensor, dtype: DType) -> Result<()> {
    let cpu = cpu.to_dtype(DType::F32)?;
    let gpu = gpu.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let scale: f32 = cpu.abs()?.flatten_all()?.max(0)?.to_scalar()?;
    let diff: f32 = (&cpu - &gpu)?.abs()?.flatten_all()?.max(0)?.to_scalar()?;
    let tolerance = if dtype == DType::F32 { 1e-4 } else { 2e-2 } * scale.max(1.0);
    println!("{name} {dtype:?}: max |cpu - gpu| {diff:e} (scale {scale:e})");
    assert!(
        diff <= tolerance,
        "{name} {dtype:?}: max |cpu - gpu| {diff:e} > {tolerance:e}"
    );
    Ok(())
}

/// A tensor's values as the bits of their f32 conversion (exact for f32, bf16 and f16), for
/// bit-for-bit comparisons.
fn f32_bits(t: &Tensor) -> Result<Vec<u32>> {
    Ok(t.to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(f32::to_bits)
        .collect())
}

#[test]
fn ops_match_the_cpu() -> Result<()> {
    let gpu = oxtune_tensor::parse_device("cuda")?;
    for dtype in [DType::F32, DType::BF16] {
        let on = |t: &Tensor, device: &Device| t.to_dtype(dtype)?.to_device(device);
        let x = Tensor::randn(0f32, 1.0, (1, 30, 576), &Device::Cpu)?;
        let w = Tensor::randn(1f32, 0.1, 576, &Device::Cpu)?;
        let run = |device: &Device| ops::rms_norm(&on(&x, device)?, &on(&w, device)?, 1e-5);
        compare("rms_norm", &run(&Device::Cpu)?, &run(&gpu)?, dtype)?;
        // a per-head (q/k) norm: rows of 64, the warp-per-row kernel
        let heads = Tensor::randn(0f32, 1.0, (1, 30, 9, 64), &Device::Cpu)?;
        let head_weight = Tensor::randn(1f32, 0.1, 64, &Device::Cpu)?;
        let run =
            |device: &Device| ops::rms_norm(&on(&heads, device)?, &on(&head_weight, device)?, 1e-6);
        compare("rms_norm per head", &run(&Device::Cpu)?, &run(&gpu)?, dtype)?;

        let q = Tensor::randn(0f32, 1.0, (1, 9, 30, 64), &Device::Cpu)?;
        let angles = Tensor::randn(0f32, 3.0, (8192, 32), &Device::Cpu)?;
        let run = |device: &Device| -> Result<Tensor> {
            let cos = on(&angles.cos()?, device)?.narrow(0, 100, 30)?;
            let sin = on(&angles.sin()?, device)?.narrow(0, 100, 30)?;
            ops::rope(&on(&q, device)?, &cos, &sin)
        };
        compare("rope", &run(&Device::Cpu)?, &run(&gpu)?, dtype)?;

        let kv = Tensor::randn(0f32, 1.0, (1, 3, 30, 64), &Device::Cpu)?;
        let run = |device: &Device| -> Result<Tensor> {
            let kv = on(&kv, device)?;
            let kv = Tensor::cat(&[&kv, &kv.narrow(2, 0, 5)?], 2)?;
            ops::repeat_kv(&kv, 3)?.contiguous()
        };
        compare("cat + repeat_kv", &run(&Device::Cpu)?, &run(&gpu)?, dtype)?;

        let scores = Tensor::randn(0f32, 4.0, (1, 9, 30, 30), &Device::Cpu)?;
        let run = |device: &Device| -> Result<Tensor> {
            let mask = ops::causal_mask(30, 0, None, DType::F32, device)?;
            ops::softmax_last_dim(&scores.to_device(device)?.broadcast_add(&mask)?)
        };
        compare(
            "masked softmax",
            &run(&Device::Cpu)?,
            &run(&gpu)?,
            DType::F32,
        )?;

        let attn = Tensor::randn(0f32, 1.0, (1, 9, 30, 64), &Device::Cpu)?;
        let run = |device: &Device| -> Result<Tensor> {
            let a = on(&attn, device)?;
            let k = on(&q, device)?;
            a.matmul(&k.t()?)?.matmul(&a)
        };
        compare("attention matmuls", &run(&Device::Cpu)?, &run(&gpu)?, dtype)?;

        let embed = Tensor::randn(0f32, 0.02, (49152, 576), &Device::Cpu)?;
        let ids = Tensor::new(&[1u32, 500, 49151, 7, 30000], &Device::Cpu)?;
        let run = |device: &Device| -> Result<Tensor> {
            let e = on(&embed, device)?;
            let h = e.index_select(&ids.to_device(device)?, 0)?.unsqueeze(0)?;
            let h = (h * 30.0)?;
            h.broadcast_matmul(&e.t()?)
        };
        compare(
            "embedding + tied head",
            &run(&Device::Cpu)?,
            &run(&gpu)?,
            dtype,
        )?;

        let weight = Tensor::randn(0f32, 0.05, (1536, 576), &Device::Cpu)?;
        let run = |device: &Device| -> Result<Tensor> {
            let linear = oxtune_tensor::nn::Linear::new(on(&weight, device)?, None);
            oxtune_tensor::Module::forward(&linear, &on(&x, device)?)?.silu()
        };
        compare("linear + silu", &run(&Device::Cpu)?, &run(&gpu)?, dtype)?;
        let _ = D::Minus1;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Fused kernels against the CPU reference.

/// The largest error allowed, relative to the largest |reference| value of the same row
/// (last dimension): f32 1e-5; bf16 2^-6 (two bf16 ulps at the row max); f16 2^-8.
/// Gradients get twice that in bf16 and f16: their backward starts from the forward output
/// rounded to the dtype (softmax's y: 2^-9 relative), and dy - sum(dy * y) can cancel, so
/// on an H200 softmax gradients reached 1.8e-2 of the row max in bf16 (forwards: 3.9e-3);
/// see also the floor in [`check_op_with_floor`].
fn tolerance(dtype: DType, gradient: bool) -> f64 {
    let forward = match dtype {
        DType::F32 => 1e-5,
        DType::F16 => 1.0 / 256.0,
        _ => 1.0 / 64.0,
    };
    if gradient && dtype != DType::F32 {
        2.0 * forward
    } else {
        forward
    }
}

/// Compares a GPU result with the f64 CPU reference row by row; the failure names the op,
/// what was compared, the dtype and input shapes, the worst error and where it is. A row's
/// max |reference| counts as at least `floor` (for results that are differences of much
/// larger terms).
fn compare_rows(
    label: &str,
    what: &str,
    dtype: DType,
    reference: &Tensor,
    gpu: &Tensor,
    floor: f64,
) -> Result<()> {
    if reference.dims() != gpu.dims() {
        panic!(
            "{label} {what} {dtype:?}: GPU shape {:?}, reference shape {:?}",
            gpu.dims(),
            reference.dims()
        );
    }
    let width = reference.dims().last().copied().unwrap_or(1).max(1);
    let expected: Vec<f64> = reference.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
    let got: Vec<f64> = gpu
        .flatten_all()?
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .to_vec1()?;
    let tol = tolerance(dtype, what != "forward");
    // (relative error, flat index, row max)
    let mut worst = (0f64, 0usize, 0f64);
    for (row, (expected, got)) in expected.chunks(width).zip(got.chunks(width)).enumerate() {
        let row_max = expected
            .iter()
            .fold(0f64, |m, v| m.max(v.abs()))
            .max(floor)
            .max(1e-30);
        for (j, (e, g)) in expected.iter().zip(got).enumerate() {
            let error = if g.is_nan() != e.is_nan() {
                f64::INFINITY
            } else if e.is_nan() {
                0.0
            } else {
                (e - g).abs() / row_max
            };
            if error > worst.0 || error.is_nan() {
                worst = (error, row * width + j, row_max);
            }
        }
    }
    let (error, index, row_max) = worst;
    let (row, column) = (index / width, index % width);
    println!("{label} {what} {dtype:?}: max error {error:.2e} of the row max (allowed {tol:.1e})");
    assert!(
        error <= tol,
        "{label} {what} {dtype:?}: max error {error:e} relative to its row's max |reference| \
         {row_max:e} (allowed {tol:e}) at row {row}, column {column} (flat {index}): \
         GPU {} vs reference {}",
        got[index],
        expected[index]
    );
    Ok(())
}

/// Runs `op` on the GPU in `dtype` (through the public ops, so the fused kernels) and
/// `reference` on the CPU in f64 from the same dtype-rounded inputs; compares the outputs,
/// then the gradients of sum(out * probe) for the inputs marked trainable.
fn check_op(
    name: &str,
    dtype: DType,
    inputs: &[Tensor],
    trainable: &[bool],
    op: impl Fn(&[Tensor]) -> Result<Tensor>,
    reference: impl Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<()> {
    check_op_with_floor(name, dtype, inputs, trainable, op, reference, 0.0)
}

/// [`check_op`] with a floor under each gradient row's max |reference| (see [`compare_rows`]).
fn check_op_with_floor(
    name: &str,
    dtype: DType,
    inputs: &[Tensor],
    trainable: &[bool],
    op: impl Fn(&[Tensor]) -> Result<Tensor>,
    reference: impl Fn(&[Tensor]) -> Result<Tensor>,
    gradient_floor: f64,
) -> Result<()> {
    let gpu = oxtune_tensor::parse_device("cuda")?;
    let shapes: Vec<Vec<usize>> = inputs.iter().map(|t| t.dims().to_vec()).collect();
    let label = format!("{name} {shapes:?}");
    let rounded: Vec<Tensor> = inputs
        .iter()
        .map(|t| t.to_dtype(dtype)?.to_dtype(DType::F64))
        .collect::<Result<_>>()?;
    let cpu_vars: Vec<Var> = rounded
        .iter()
        .map(Var::from_tensor)
        .collect::<Result<_>>()?;
    let gpu_vars: Vec<Var> = rounded
        .iter()
        .map(|t| Var::from_tensor(&t.to_dtype(dtype)?.to_device(&gpu)?))
        .collect::<Result<_>>()?;
    let pick = |vars: &[Var], rounded: &[Tensor], device: &Device| -> Result<Vec<Tensor>> {
        vars.iter()
            .zip(rounded)
            .zip(trainable)
            .map(|((var, plain), train)| {
                if *train {
                    Ok(var.as_tensor().clone())
                } else if device.is_cuda() {
                    plain.to_dtype(dtype)?.to_device(device)
                } else {
                    Ok(plain.clone())
                }
            })
            .collect()
    };
    let cpu_inputs = pick(&cpu_vars, &rounded, &Device::Cpu)?;
    let gpu_inputs = pick(&gpu_vars, &rounded, &gpu)?;

    let gpu_out = op(&gpu_inputs)?;
    assert_eq!(gpu_out.dtype(), dtype, "{label}: output dtype");
    let cpu_out = reference(&cpu_inputs)?;
    compare_rows(&label, "forward", dtype, &cpu_out, &gpu_out, 0.0)?;

    let probe = Tensor::randn(0f32, 1.0, cpu_out.shape(), &Device::Cpu)?.to_dtype(dtype)?;
    let cpu_grads = (&cpu_out * probe.to_dtype(DType::F64)?)?
        .sum_all()?
        .backward()?;
    let gpu_grads = (&gpu_out * probe.to_device(&gpu)?)?.sum_all()?.backward()?;
    for (k, train) in trainable.iter().enumerate() {
        if !train {
            continue;
        }
        let what = format!("d/d input {k}");
        let expected = cpu_grads
            .get(cpu_vars[k].as_tensor())
            .unwrap_or_else(|| panic!("{label} {what}: the CPU reference gave no gradient"));
        let got = gpu_grads
            .get(gpu_vars[k].as_tensor())
            .unwrap_or_else(|| panic!("{label} {what} {dtype:?}: no gradient through the GPU op"));
        assert_eq!(got.dtype(), dtype, "{label} {what}: gradient dtype");
        // In bf16/f16 a row whose gradient is small by cancellation (softmax: a query seeing
        // two keys, one of them dominant, gets s * p * (1 - p) * (dy0 - dy1), computed from a
        // y rounded to the dtype) is measured against a quarter of the tensor's largest
        // gradient (on an H200, packed rows of 12 keys: 1.8e-4 absolute error where the
        // largest gradient was 0.1); a wrong index or mask still shows in the forward and as
        // an error of the order of the largest gradient.
        let floor = if dtype == DType::F32 {
            gradient_floor
        } else {
            let largest: f64 = expected.abs()?.flatten_all()?.max(0)?.to_scalar()?;
            gradient_floor.max(0.25 * largest)
        };
        compare_rows(&label, &what, dtype, expected, got, floor)?;
    }
    Ok(())
}

fn randn(shape: &[usize], std: f32) -> Result<Tensor> {
    Tensor::randn(0f32, std, shape, &Device::Cpu)
}

#[test]
fn softmax_kernel_matches_the_reference() -> Result<()> {
    let shapes: [&[usize]; 7] = [
        &[3, 1],
        &[7, 33],
        &[2, 3, 100],
        &[5, 1001],
        &[4, 2048],
        &[2, 4099],
        &[3, 151_936],
    ];
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for shape in shapes {
            let x = randn(shape, 3.0)?;
            check_op(
                "softmax_last_dim",
                dtype,
                &[x],
                &[true],
                |xs| ops::softmax_last_dim(&xs[0]),
                |xs| ops::softmax_reference(&xs[0]),
            )?;
        }
    }
    Ok(())
}

#[test]
fn scaled_masked_softmax_kernel_matches_the_reference() -> Result<()> {
    // (b, h, t_q, t_k, past tokens); t_k = past + t_q as in attention
    let cases = [
        (1, 2, 2048, 2048, 0),
        (2, 3, 37, 53, 16),
        (1, 1, 1, 9, 8),
        (2, 2, 65, 65, 0),
        (1, 3, 4, 1, 0),
    ];
    // A gradient row is scale * y * (dy - sum(dy * y)); where its terms (about scale * |dy|,
    // dy ~ N(0, 1)) cancel, it keeps their f32 rounding error: floor its row max there.
    let floor = |scale: f64| scale * 0.1;
    for dtype in [DType::F32, DType::BF16] {
        for (b, h, t_q, t_k, past) in cases {
            let scores = randn(&[b, h, t_q, t_k], 8.0)?;
            let mask = ScoreMask::Causal { past_tokens: past };
            check_op_with_floor(
                &format!("scaled_masked_softmax causal past {past}"),
                dtype,
                &[scores],
                &[true],
                |xs| ops::scaled_masked_softmax(&xs[0], 0.088, mask),
                |xs| ops::scaled_masked_softmax_reference(&xs[0], 0.088, mask),
                floor(0.088),
            )?;
        }
        let scores = randn(&[2, 2, 5, 7], 8.0)?;
        check_op_with_floor(
            "scaled_masked_softmax unmasked",
            dtype,
            &[scores],
            &[true],
            |xs| ops::scaled_masked_softmax(&xs[0], 0.125, ScoreMask::None),
            |xs| ops::scaled_masked_softmax_reference(&xs[0], 0.125, ScoreMask::None),
            floor(0.125),
        )?;
        // packed samples, additive (b, 1, t, t) mask
        let segments = vec![
            (0..12).map(|i| u32::from(i >= 5)).collect::<Vec<u32>>(),
            (0..12).map(|i| u32::from(i >= 9)).collect(),
        ];
        let scores = randn(&[2, 2, 12, 12], 8.0)?;
        let gpu = oxtune_tensor::parse_device("cuda")?;
        let mask_gpu = ops::packed_causal_mask(&segments, None, DType::F32, &gpu)?;
        let mask_cpu = ops::packed_causal_mask(&segments, None, DType::F64, &Device::Cpu)?;
        check_op_with_floor(
            "scaled_masked_softmax packed",
            dtype,
            &[scores],
            &[true],
            |xs| ops::scaled_masked_softmax(&xs[0], 0.125, ScoreMask::Additive(&mask_gpu)),
            |xs| {
                ops::scaled_masked_softmax_reference(&xs[0], 0.125, ScoreMask::Additive(&mask_cpu))
            },
            floor(0.125),
        )?;
    }
    Ok(())
}

#[test]
fn rms_norm_kernel_matches_the_reference() -> Result<()> {
    // Rows up to 256 wide take the warp-per-row kernels (24 rows a block forward, 16 for dx,
    // 32 or more a block for dweight), wider ones a block per row.
    let shapes: [&[usize]; 15] = [
        &[3, 1],
        &[5, 7],
        &[13, 10], // rows of 10: some 16-byte aligned, some not
        &[2, 9, 64],
        &[3, 128],
        &[1029, 128],  // a partial last block; dweight warps over several rows
        &[33_000, 64], // dweight at its 1024 blocks, the last ones with no rows
        &[21, 200],
        &[11, 255],   // an element tail after the 16-byte vectors
        &[19, 256],   // the widest rows of the warp kernels
        &[9, 264],    // the narrowest of the block kernels
        &[300, 1024], // more rows than the dweight kernel's 256 chunks
        &[2, 3, 4099],
        &[3, 12_000], // the widest row the dweight kernel accumulates
        &[2, 13_000], // wider: dweight composed from candle ops
    ];
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for shape in shapes {
            let x = randn(shape, 2.0)?;
            let width = shape[shape.len() - 1];
            let weight = Tensor::randn(1f32, 0.2, width, &Device::Cpu)?;
            for trainable in [[true, true], [true, false]] {
                let name = if trainable[1] {
                    "rms_norm"
                } else {
                    "rms_norm (frozen weight)"
                };
                // A row of width 1 normalises to sign(x): its dx, eps / (x^2 + eps)^(3/2) * w * dy,
                // is ~1e-5 but computed as a difference of terms r * w * dy (r = 1 / |x|, up
                // to ~100 here), so its error is measured against that scale (on an H200,
                // f32: 5e-7 absolute).
                let floor = if width == 1 { 10.0 } else { 0.0 };
                check_op_with_floor(
                    name,
                    dtype,
                    &[x.clone(), weight.clone()],
                    &trainable,
                    |xs| ops::rms_norm(&xs[0], &xs[1], 1e-6),
                    |xs| ops::rms_norm_reference(&xs[0], &xs[1], 1e-6),
                    floor,
                )?;
            }
        }
    }
    Ok(())
}

/// (b, t, heads) of a head view of a packed projection: (b, t, all heads, heads taken from,
/// heads, d, transposed: the projection stored (t, b, ..) and seen as (b, t, ..)).
const HEAD_VIEWS: [(usize, usize, usize, usize, usize, usize, bool); 9] = [
    (2, 17, 32, 0, 16, 128, false), // q of a packed (16 + 8 + 8) * 128 projection
    (2, 17, 32, 16, 8, 128, false), // its k
    (1, 5, 6, 2, 3, 64, true),
    (2, 7, 5, 1, 3, 10, false), // rows of 10: some 16-byte aligned, some not
    (3, 4, 4, 1, 2, 1, false),
    (3, 11, 7, 2, 4, 200, false),
    (2, 9, 5, 1, 3, 256, true), // the widest rows of the warp-per-row kernels
    (2, 3, 4, 1, 2, 264, true), // the narrowest of the block-per-row kernels
    (1, 2, 3, 1, 2, 12_008, false), // wider than the dweight kernel: composed dweight
];

/// The heads [from, from + heads) of a (b, t, all, d) projection (stored (t, b, all, d) when
/// `transposed`): a (b, t, heads, d) view with contiguous rows.
fn head_view(full: &Tensor, from: usize, heads: usize, transposed: bool) -> Result<Tensor> {
    let full = if transposed {
        full.transpose(0, 1)?
    } else {
        full.clone()
    };
    full.narrow(2, from, heads)
}

#[test]
fn rms_norm_kernel_reads_head_views() -> Result<()> {
    // Qwen3's q/k norm on heads of a packed projection: the kernel reads the (b, t, heads, d)
    // view in place; forward and gradients (to the whole projection and to the weight)
    // against the f64 reference.
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for (b, t, all, from, heads, d, transposed) in HEAD_VIEWS {
            let stored = if transposed {
                [t, b, all, d]
            } else {
                [b, t, all, d]
            };
            let full = randn(&stored, 2.0)?;
            let weight = Tensor::randn(1f32, 0.2, d, &Device::Cpu)?;
            // rows of 1: see rms_norm_kernel_matches_the_reference
            let floor = if d == 1 { 10.0 } else { 0.0 };
            for trainable in [[true, true], [true, false]] {
                let name = format!(
                    "rms_norm of heads {from}..{} of {all} (transposed {transposed}, weight \
                     trainable {})",
                    from + heads,
                    trainable[1]
                );
                check_op_with_floor(
                    &name,
                    dtype,
                    &[full.clone(), weight.clone()],
                    &trainable,
                    |xs| ops::rms_norm(&head_view(&xs[0], from, heads, transposed)?, &xs[1], 1e-6),
                    |xs| {
                        ops::rms_norm_reference(
                            &head_view(&xs[0], from, heads, transposed)?,
                            &xs[1],
                            1e-6,
                        )
                    },
                    floor,
                )?;
            }
        }
    }
    Ok(())
}

#[test]
fn rms_norm_reads_head_views_as_their_copies() -> Result<()> {
    // Where the view's rows and the copy's are aligned alike (every row start 16-byte aligned,
    // or a row of 1), the kernels take the same path on the same values: output, dx and
    // dweight bit for bit equal to rms_norm of the contiguous copy.
    let gpu = oxtune_tensor::parse_device("cuda")?;
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for (b, t, all, from, heads, d, transposed) in HEAD_VIEWS {
            if d % 8 != 0 && d != 1 {
                continue;
            }
            let label = format!(
                "rms_norm of heads {from}..{} of ({b}, {t}, {all}, {d}) (transposed \
                 {transposed}) {dtype:?}",
                from + heads
            );
            let stored = if transposed {
                [t, b, all, d]
            } else {
                [b, t, all, d]
            };
            let full = Var::from_tensor(&randn(&stored, 2.0)?.to_dtype(dtype)?.to_device(&gpu)?)?;
            let weight = Var::from_tensor(
                &Tensor::randn(1f32, 0.2, d, &Device::Cpu)?
                    .to_dtype(dtype)?
                    .to_device(&gpu)?,
            )?;
            let probe = randn(&[b, t, heads, d], 1.0)?
                .to_dtype(dtype)?
                .to_device(&gpu)?;
            let run = |copy: bool| -> Result<[Vec<u32>; 3]> {
                let view = head_view(full.as_tensor(), from, heads, transposed)?;
                let xs = if copy { view.contiguous()? } else { view };
                let out = ops::rms_norm(&xs, weight.as_tensor(), 1e-6)?;
                assert!(out.is_contiguous(), "{label}: output not contiguous");
                let grads = (&out * &probe)?.sum_all()?.backward()?;
                let dx = grads.get(full.as_tensor()).expect("dx");
                let dweight = grads.get(weight.as_tensor()).expect("dweight");
                Ok([f32_bits(&out)?, f32_bits(dx)?, f32_bits(dweight)?])
            };
            let (view, copy) = (run(false)?, run(true)?);
            for (k, what) in ["output", "dx", "dweight"].iter().enumerate() {
                assert!(
                    view[k] == copy[k],
                    "{label}: {what} differs from the copy's"
                );
            }
            println!("{label}: output and gradients equal to the copy's");
        }
    }
    Ok(())
}

#[test]
fn swiglu_kernel_matches_the_reference() -> Result<()> {
    let shapes: [&[usize]; 6] = [
        &[1],
        &[3, 7],
        &[2, 33, 65],
        &[4, 3072],
        &[1_000_003],
        &[2, 3, 8],
    ];
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for shape in shapes {
            let gate = randn(shape, 3.0)?;
            let up = randn(shape, 1.0)?;
            check_op(
                "swiglu",
                dtype,
                &[gate, up],
                &[true, true],
                |xs| ops::swiglu(&xs[0], &xs[1]),
                |xs| ops::swiglu_reference(&xs[0], &xs[1]),
            )?;
        }
    }
    Ok(())
}

#[test]
fn swiglu_packed_kernel_matches_the_reference() -> Result<()> {
    // (.., 2 * i): i a multiple of 8 (16-byte vectors in every dtype) and not (the scalar
    // path: i 1, 7, 65, 1_000_003; i 4 takes vectors in f32 only)
    let shapes: [&[usize]; 8] = [
        &[2],
        &[3, 14],
        &[5, 8],
        &[2, 33, 130],
        &[2, 3, 16],
        &[4, 6144],
        &[300, 2 * 768],
        &[1, 2_000_006],
    ];
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for shape in shapes {
            let gate_up = randn(shape, 2.0)?;
            check_op(
                "swiglu_packed",
                dtype,
                &[gate_up],
                &[true],
                |xs| ops::swiglu_packed(&xs[0]),
                |xs| ops::swiglu_packed_reference(&xs[0]),
            )?;
        }
    }
    Ok(())
}

#[test]
fn swiglu_packed_equals_swiglu_of_the_halves() -> Result<()> {
    // The packed kernel computes what the two-tensor kernel does on contiguous copies of the
    // halves, bit for bit, and returns one contiguous (.., 2 * i) [dgate | dup] gradient; also
    // on a view starting at an odd element (every row unaligned: the scalar path).
    let gpu = oxtune_tensor::parse_device("cuda")?;
    // (rows, i, elements before the packed rows in their storage)
    for (rows, i, lead) in [(37, 64, 0), (5, 7, 0), (9, 24, 3), (2, 3072, 0)] {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let label = format!("swiglu_packed ({rows}, 2 * {i}), offset {lead}, {dtype:?}");
            let storage = Var::from_tensor(
                &randn(&[lead + rows * 2 * i], 2.0)?
                    .to_dtype(dtype)?
                    .to_device(&gpu)?,
            )?;
            let gate_up = storage
                .as_tensor()
                .narrow(0, lead, rows * 2 * i)?
                .reshape((rows, 2 * i))?;
            let probe = randn(&[rows, i], 1.0)?.to_dtype(dtype)?.to_device(&gpu)?;

            let packed = ops::swiglu_packed(&gate_up)?;
            let grads = (&packed * &probe)?.sum_all()?.backward()?;
            let packed_grad = grads.get(storage.as_tensor()).expect("a gradient");

            let gate = Var::from_tensor(&gate_up.narrow(1, 0, i)?.contiguous()?)?;
            let up = Var::from_tensor(&gate_up.narrow(1, i, i)?.contiguous()?)?;
            let halves = ops::swiglu(gate.as_tensor(), up.as_tensor())?;
            let grads = (&halves * &probe)?.sum_all()?.backward()?;
            let dgate = grads.get(gate.as_tensor()).expect("dgate");
            let dup = grads.get(up.as_tensor()).expect("dup");

            assert!(
                f32_bits(&packed)? == f32_bits(&halves)?,
                "{label}: forward differs"
            );
            let expected = Tensor::cat(&[dgate, dup], 1)?;
            let got = packed_grad.narrow(0, lead, rows * 2 * i)?;
            assert!(
                f32_bits(&got)? == f32_bits(&expected)?,
                "{label}: [dgate | dup] differs"
            );

            let direct = oxtune_tensor::cuda::swiglu_packed_backward(&gate_up, &probe)?;
            assert_eq!(direct.dims(), [rows, 2 * i], "{label}: gradient shape");
            assert!(direct.is_contiguous(), "{label}: gradient not contiguous");
            assert!(
                f32_bits(&direct)? == f32_bits(&expected)?,
                "{label}: backward differs"
            );
            println!("{label}: output and gradient equal to swiglu of the halves");
        }
    }
    Ok(())
}

#[test]
fn rope_kernel_matches_the_reference() -> Result<()> {
    // (b, h, t, d, per-row tables)
    let cases = [
        (1, 1, 1, 2, false),
        (1, 2, 3, 6, false), // d/2 = 3: the scalar path
        (2, 3, 5, 64, false),
        (2, 4, 17, 128, true),
        (1, 16, 2048, 128, false),
        (2, 2, 7, 10, true),
    ];
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for (b, h, t, d, per_row) in cases {
            let x = randn(&[b, h, t, d], 1.0)?;
            let angles = if per_row {
                randn(&[b, t, d / 2], 3.0)?
            } else {
                randn(&[t, d / 2], 3.0)?
            };
            let name = if per_row {
                "rope (per-row tables)"
            } else {
                "rope"
            };
            check_op(
                name,
                dtype,
                &[x, angles.cos()?, angles.sin()?],
                &[true, false, false],
                |xs| ops::rope(&xs[0], &xs[1], &xs[2]),
                |xs| ops::rope_reference(&xs[0], &xs[1], &xs[2]),
            )?;
        }
    }
    Ok(())
}

#[test]
fn rope_reads_strided_views_as_their_copies() -> Result<()> {
    // Attention's q and k are (b, t, h, d) projections (or row views of a wider one): the
    // kernel reads them in place, through rope_to_heads, rope_positions_first or a transposed
    // view given to rope. Outputs and gradients must equal those of rope on the contiguous
    // (b, h, t, d) copy bit for bit, on the vector and the scalar path.
    let gpu = oxtune_tensor::parse_device("cuda")?;
    // (b, t, h, extra heads beside the view, d, per-row tables)
    for (b, t, h, extra, d, per_row) in [
        (2, 33, 4, 0, 128, false),
        (1, 5, 3, 2, 64, false),
        (2, 7, 2, 1, 10, false),
        (2, 9, 3, 2, 64, true),
    ] {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let full = Var::from_tensor(
                &randn(&[b, t, h + extra, d], 1.0)?
                    .to_dtype(dtype)?
                    .to_device(&gpu)?,
            )?;
            let angles = if per_row {
                randn(&[b, t, d / 2], 3.0)?
            } else {
                randn(&[t, d / 2], 3.0)?
            };
            let cos = angles.cos()?.to_dtype(dtype)?.to_device(&gpu)?;
            let sin = angles.sin()?.to_dtype(dtype)?.to_device(&gpu)?;
            let weights = randn(&[b, h, t, d], 1.0)?
                .to_dtype(dtype)?
                .to_device(&gpu)?;
            // the same weights in (b, t, h, d) order, contiguous
            let weights_positions_first = weights.transpose(1, 2)?.contiguous()?;
            // 0: rope of the contiguous copy, 1: rope of the transposed view, 2: rope_to_heads,
            // 3: rope_positions_first (its gradient arrives contiguous (b, t, h, d)),
            // 4: rope_positions_first seen as (b, h, t, d) (its gradient arrives transposed)
            let run = |path: usize| -> Result<(Vec<u32>, Vec<u32>)> {
                let rows = full.as_tensor().narrow(2, extra.div_ceil(2), h)?;
                let (out, grads) = match path {
                    0..=2 => {
                        let out = match path {
                            0 => ops::rope(&rows.transpose(1, 2)?.contiguous()?, &cos, &sin)?,
                            1 => ops::rope(&rows.transpose(1, 2)?, &cos, &sin)?,
                            _ => ops::rope_to_heads(&rows, &cos, &sin)?,
                        };
                        let grads = (&out * &weights)?.sum_all()?.backward()?;
                        (out, grads)
                    }
                    3 => {
                        let out = ops::rope_positions_first(&rows, &cos, &sin)?;
                        assert_eq!(out.dims(), [b, t, h, d]);
                        assert!(out.is_contiguous(), "rope_positions_first's output");
                        let grads = (&out * &weights_positions_first)?.sum_all()?.backward()?;
                        (out.transpose(1, 2)?, grads)
                    }
                    _ => {
                        let out = ops::rope_positions_first(&rows, &cos, &sin)?.transpose(1, 2)?;
                        let grads = (&out * &weights)?.sum_all()?.backward()?;
                        (out, grads)
                    }
                };
                let grad = grads.get(full.as_tensor()).expect("x has a gradient");
                Ok((f32_bits(&out)?, f32_bits(grad)?))
            };
            let label = format!(
                "rope of strided rows, b {b} t {t} h {h}+{extra} d {d} per-row tables {per_row} \
                 {dtype:?}"
            );
            let (out, grad) = run(0)?;
            for (path, name) in [
                (1, "rope of the transposed view"),
                (2, "rope_to_heads"),
                (3, "rope_positions_first"),
                (4, "rope_positions_first (transposed gradient)"),
            ] {
                let (other_out, other_grad) = run(path)?;
                assert!(other_out == out, "{label}: {name}'s output differs");
                assert!(other_grad == grad, "{label}: {name}'s gradient differs");
            }
            println!("{label}: outputs and gradients equal to the copy's");
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Bandwidth: each kernel against candle's fused and composed equivalents (printed, not
// asserted), for docs/benchmarks.md.

/// Device copy bandwidth of the H200 (read + write), the roofline the numbers are set against.
const COPY_GB_PER_S: f64 = 4200.0;

struct Bench<'a> {
    device: &'a Device,
}

impl Bench<'_> {
    /// Prints one line: `bytes` is the traffic a perfect kernel moves (each input read and each
    /// output written once).
    fn line(
        &self,
        name: &str,
        shape: &str,
        bytes: f64,
        runs: &mut [(&str, &mut dyn FnMut() -> Result<()>)],
    ) -> Result<()> {
        let mut cells = Vec::new();
        for (label, f) in runs.iter_mut() {
            let seconds = seconds_per_call(self.device, f)?;
            let gb_per_s = bytes / seconds / 1e9;
            cells.push(format!(
                "{label} {:.3} ms {gb_per_s:.0} GB/s ({:.0} %)",
                seconds * 1e3,
                100.0 * gb_per_s / COPY_GB_PER_S
            ));
        }
        println!("| {name} | {shape} | {} |", cells.join(" | "));
        Ok(())
    }
}

#[test]
fn bandwidth_of_fused_kernels_against_candle() -> Result<()> {
    let gpu = oxtune_tensor::parse_device("cuda")?;
    let bench = Bench { device: &gpu };
    // random inputs drawn on the GPU (curand), then cast
    let randn = |mean: f32, std: f32, shape: &[usize], dtype: DType| -> Result<Tensor> {
        Tensor::randn(mean, std, shape, &gpu)?.to_dtype(dtype)
    };
    println!("| op | shape | ours | candle fused | candle composed |");
    println!("| --- | --- | --- | --- | --- |");

    // Attention scores of Qwen3-0.6B at seq 2048, micro-batch 4: (4, 16, 2048, 2048) f32.
    let (b, h, t) = (4, 16, 2048);
    let elements = (b * h * t * t) as f64;
    let scores = randn(0f32, 4.0, &[b, h, t, t], DType::F32)?;
    let shape = format!("({b}, {h}, {t}, {t}) f32");
    bench.line(
        "softmax_last_dim fwd",
        &shape,
        2.0 * 4.0 * elements,
        &mut [
            ("ours", &mut || ops::softmax_last_dim(&scores).map(drop)),
            ("candle", &mut || {
                oxtune_tensor::nn::ops::softmax_last_dim(&scores).map(drop)
            }),
            ("composed", &mut || {
                ops::softmax_reference(&scores).map(drop)
            }),
        ],
    )?;
    let ys = ops::softmax_last_dim(&scores)?;
    let grad = scores.clone();
    bench.line(
        "softmax bwd",
        &shape,
        3.0 * 4.0 * elements,
        &mut [
            ("ours", &mut || {
                oxtune_tensor::cuda::softmax_backward(&ys, &grad, 1.0, None).map(drop)
            }),
            ("composed", &mut || {
                let dot = (&ys * &grad)?.sum_keepdim(D::Minus1)?;
                (&ys * grad.broadcast_sub(&dot)?).map(drop)
            }),
        ],
    )?;
    let causal = ScoreMask::Causal { past_tokens: 0 };
    let mask = ops::causal_mask(t, 0, None, DType::F32, &gpu)?;
    bench.line(
        "scaled_masked_softmax causal fwd (skips the masked half's reads)",
        &shape,
        2.0 * 4.0 * elements,
        &mut [
            ("ours", &mut || {
                ops::scaled_masked_softmax(&scores, 0.088, causal).map(drop)
            }),
            ("candle", &mut || {
                let masked = (&scores * 0.088)?.broadcast_add(&mask)?;
                oxtune_tensor::nn::ops::softmax_last_dim(&masked).map(drop)
            }),
            ("composed", &mut || {
                let masked = (&scores * 0.088)?.broadcast_add(&mask)?;
                ops::softmax_reference(&masked).map(drop)
            }),
        ],
    )?;
    let causal_kernel = oxtune_tensor::cuda::Causal {
        queries: t,
        past: 0,
    };
    let ys = ops::scaled_masked_softmax(&scores, 0.088, causal)?;
    bench.line(
        "scaled_masked_softmax causal bwd",
        &shape,
        3.0 * 4.0 * elements,
        &mut [
            ("ours", &mut || {
                oxtune_tensor::cuda::softmax_backward(&ys, &grad, 0.088, Some(causal_kernel))
                    .map(drop)
            }),
            ("composed", &mut || {
                let dot = (&ys * &grad)?.sum_keepdim(D::Minus1)?;
                ((&ys * grad.broadcast_sub(&dot)?)? * 0.088).map(drop)
            }),
        ],
    )?;
    drop((scores, ys, grad, mask));

    // Vocabulary-wide rows: (64, 151936) f32 and bf16.
    for dtype in [DType::F32, DType::BF16] {
        let logits = randn(0f32, 4.0, &[64, 151_936], dtype)?;
        let size = logits.dtype().size_in_bytes() as f64;
        bench.line(
            "softmax_last_dim fwd",
            &format!("(64, 151936) {dtype:?}"),
            2.0 * size * (64.0 * 151_936.0),
            &mut [
                ("ours", &mut || ops::softmax_last_dim(&logits).map(drop)),
                ("candle", &mut || {
                    oxtune_tensor::nn::ops::softmax_last_dim(&logits).map(drop)
                }),
                ("composed", &mut || {
                    ops::softmax_reference(&logits).map(drop)
                }),
            ],
        )?;
    }

    // RMSNorm, SwiGLU, RoPE in bf16 at token counts of a micro-batch of 8 x 2048.
    let dtype = DType::BF16;
    let (rows, hidden) = (16_384, 4096);
    let elements = (rows * hidden) as f64;
    let x = randn(0f32, 1.0, &[rows, hidden], dtype)?;
    let weight = randn(1f32, 0.1, &[hidden], dtype)?;
    let dy = randn(0f32, 1.0, &[rows, hidden], dtype)?;
    let shape = format!("({rows}, {hidden}) bf16");
    bench.line(
        "rms_norm fwd",
        &shape,
        2.0 * 2.0 * elements,
        &mut [
            ("ours", &mut || ops::rms_norm(&x, &weight, 1e-6).map(drop)),
            ("candle", &mut || {
                oxtune_tensor::nn::ops::rms_norm(&x, &weight, 1e-6).map(drop)
            }),
            ("composed", &mut || {
                ops::rms_norm_reference(&x, &weight, 1e-6).map(drop)
            }),
        ],
    )?;
    bench.line(
        "rms_norm bwd dx",
        &shape,
        3.0 * 2.0 * elements,
        &mut [("ours", &mut || {
            oxtune_tensor::cuda::rms_norm_backward(&x, &weight, &dy, 1e-6, false).map(drop)
        })],
    )?;
    let (x_var, w_var) = (Var::from_tensor(&x)?, Var::from_tensor(&weight)?);
    bench.line(
        "rms_norm bwd dx + dweight",
        &shape,
        5.0 * 2.0 * elements,
        &mut [
            ("ours", &mut || {
                oxtune_tensor::cuda::rms_norm_backward(&x, &weight, &dy, 1e-6, true).map(drop)
            }),
            ("composed (autograd of the reference)", &mut || {
                let out = ops::rms_norm_reference(x_var.as_tensor(), w_var.as_tensor(), 1e-6)?;
                (out * &dy)?.sum_all()?.backward().map(drop)
            }),
        ],
    )?;

    let (rows, intermediate) = (16_384, 8192);
    let elements = (rows * intermediate) as f64;
    let gate = randn(0f32, 2.0, &[rows, intermediate], dtype)?;
    let up = randn(0f32, 1.0, &[rows, intermediate], dtype)?;
    let dy = randn(0f32, 1.0, &[rows, intermediate], dtype)?;
    let shape = format!("({rows}, {intermediate}) bf16");
    bench.line(
        "swiglu fwd",
        &shape,
        3.0 * 2.0 * elements,
        &mut [
            ("ours", &mut || ops::swiglu(&gate, &up).map(drop)),
            ("composed", &mut || {
                ops::swiglu_reference(&gate, &up).map(drop)
            }),
        ],
    )?;
    let (g_var, u_var) = (Var::from_tensor(&gate)?, Var::from_tensor(&up)?);
    bench.line(
        "swiglu bwd",
        &shape,
        5.0 * 2.0 * elements,
        &mut [
            ("ours", &mut || {
                oxtune_tensor::cuda::swiglu_backward(&gate, &up, &dy).map(drop)
            }),
            ("composed (autograd of the reference)", &mut || {
                let out = ops::swiglu_reference(g_var.as_tensor(), u_var.as_tensor())?;
                (out * &dy)?.sum_all()?.backward().map(drop)
            }),
        ],
    )?;
    // The same SwiGLU from one packed (rows, 2 * intermediate) [gate | up] projection.
    let gate_up = Tensor::cat(&[&gate, &up], 1)?;
    let shape = format!("({rows}, 2 * {intermediate}) bf16");
    bench.line(
        "swiglu_packed fwd",
        &shape,
        3.0 * 2.0 * elements,
        &mut [
            ("ours", &mut || ops::swiglu_packed(&gate_up).map(drop)),
            ("narrows + swiglu kernel", &mut || {
                let halves = (
                    gate_up.narrow(1, 0, intermediate)?,
                    gate_up.narrow(1, intermediate, intermediate)?,
                );
                ops::swiglu(&halves.0, &halves.1).map(drop)
            }),
            ("composed", &mut || {
                ops::swiglu_packed_reference(&gate_up).map(drop)
            }),
        ],
    )?;
    let gate_up_var = Var::from_tensor(&gate_up)?;
    bench.line(
        "swiglu_packed bwd",
        &shape,
        5.0 * 2.0 * elements,
        &mut [
            ("ours", &mut || {
                oxtune_tensor::cuda::swiglu_packed_backward(&gate_up, &dy).map(drop)
            }),
            (
                "narrows + swiglu kernel (autograd, fwd included)",
                &mut || {
                    let packed = gate_up_var.as_tensor();
                    let halves = (
                        packed.narrow(1, 0, intermediate)?,
                        packed.narrow(1, intermediate, intermediate)?,
                    );
                    (ops::swiglu(&halves.0, &halves.1)? * &dy)?
                        .sum_all()?
                        .backward()
                        .map(drop)
                },
            ),
        ],
    )?;
    drop((gate_up, gate_up_var));
    drop((gate, up, dy, x, x_var, w_var, g_var, u_var));

    // Qwen3-0.6B's q norm at its training shape (4 x 2048 tokens, 16 q heads of 128 in a
    // packed (16 + 8 + 8) * 128 q/k/v projection): 131,072 rows of 128, the warp-per-row
    // kernels, reading the view in place, a contiguous (131072, 128) copy, and (forward) the
    // copy made first. dweight is the difference of the dx + dweight and dx calls (its kernel
    // and candle's sum of the partials over blocks).
    let (tokens, all_heads, heads, d) = (8192, 32, 16, 128);
    let elements = (tokens * heads * d) as f64;
    let qkv = randn(0f32, 1.0, &[tokens, all_heads, d], dtype)?;
    let q = qkv.narrow(1, 0, heads)?;
    let q_copy = q.contiguous()?.reshape((tokens * heads, d))?;
    let q_weight = randn(1f32, 0.1, &[d], dtype)?;
    let q_dy = randn(0f32, 1.0, &[tokens, heads, d], dtype)?;
    let q_dy_flat = q_dy.reshape((tokens * heads, d))?;
    let shape = format!(
        "({tokens}, {heads} of {all_heads}, {d}) bf16 = ({}, {d})",
        tokens * heads
    );
    bench.line(
        "rms_norm fwd, q heads of a packed projection",
        &shape,
        2.0 * 2.0 * elements,
        &mut [
            ("ours (in place)", &mut || {
                ops::rms_norm(&q, &q_weight, 1e-6).map(drop)
            }),
            ("ours (contiguous)", &mut || {
                ops::rms_norm(&q_copy, &q_weight, 1e-6).map(drop)
            }),
            ("copy + ours", &mut || {
                ops::rms_norm(&q.contiguous()?, &q_weight, 1e-6).map(drop)
            }),
        ],
    )?;
    let backward = |x: &Tensor, dy: &Tensor, with_weight: bool| {
        oxtune_tensor::cuda::rms_norm_backward(x, &q_weight, dy, 1e-6, with_weight).map(drop)
    };
    bench.line(
        "rms_norm bwd dx, q heads of a packed projection",
        &shape,
        3.0 * 2.0 * elements,
        &mut [
            ("ours (in place)", &mut || backward(&q, &q_dy, false)),
            ("ours (contiguous)", &mut || {
                backward(&q_copy, &q_dy_flat, false)
            }),
        ],
    )?;
    bench.line(
        "rms_norm bwd dx + dweight, q heads of a packed projection",
        &shape,
        5.0 * 2.0 * elements,
        &mut [
            ("ours (in place)", &mut || backward(&q, &q_dy, true)),
            ("ours (contiguous)", &mut || {
                backward(&q_copy, &q_dy_flat, true)
            }),
        ],
    )?;
    let dx = seconds_per_call(&gpu, || backward(&q, &q_dy, false))?;
    let dx_dweight = seconds_per_call(&gpu, || backward(&q, &q_dy, true))?;
    let dweight = dx_dweight - dx;
    println!(
        "| rms_norm bwd dweight (dx + dweight minus dx), q heads of a packed projection | \
         {shape} | ours (in place) {:.3} ms {:.0} GB/s |",
        dweight * 1e3,
        2.0 * 2.0 * elements / dweight / 1e9
    );
    drop((qkv, q, q_copy, q_dy, q_dy_flat));

    let (b, h, t, d) = (8, 16, 2048, 128);
    let elements = (b * h * t * d) as f64;
    let x = randn(0f32, 1.0, &[b, h, t, d], dtype)?;
    let angles = Tensor::randn(0f32, 3.0, (t, d / 2), &Device::Cpu)?;
    let cos = angles.cos()?.to_dtype(dtype)?.to_device(&gpu)?;
    let sin = angles.sin()?.to_dtype(dtype)?.to_device(&gpu)?;
    let shape = format!("({b}, {h}, {t}, {d}) bf16");
    bench.line(
        "rope fwd",
        &shape,
        2.0 * 2.0 * elements,
        &mut [
            ("ours", &mut || ops::rope(&x, &cos, &sin).map(drop)),
            ("candle", &mut || {
                oxtune_tensor::nn::rotary_emb::rope(&x, &cos, &sin).map(drop)
            }),
            ("composed", &mut || {
                ops::rope_reference(&x, &cos, &sin).map(drop)
            }),
        ],
    )?;
    bench.line(
        "rope bwd",
        &shape,
        2.0 * 2.0 * elements,
        &mut [
            ("ours", &mut || {
                oxtune_tensor::cuda::rope_backward(&x, &cos, &sin).map(drop)
            }),
            ("composed", &mut || {
                ops::rope_reference(&x, &cos, &sin.neg()?).map(drop)
            }),
        ],
    )?;
    Ok(())
}

// graph

/// A recorded graph replays its work on the inputs' current contents: kernels, a matmul
/// and buffers allocated and freed inside the recording.
#[test]
fn a_recorded_graph_replays_on_updated_inputs() -> Result<()> {
    let gpu = oxtune_tensor::parse_device("cuda")?;
    let weight = Tensor::randn(0f32, 1.0, (64, 32), &gpu)?.to_dtype(DType::BF16)?;
    let input = Tensor::zeros((4, 64), DType::BF16, &gpu)?;
    let output = Tensor::zeros((4, 32), DType::F32, &gpu)?;
    let step = || -> Result<Tensor> {
        let hidden = ops::rms_norm(&input, &Tensor::ones(64, DType::BF16, &gpu)?, 1e-6)?;
        ops::softmax_last_dim(&hidden.matmul(&weight)?.to_dtype(DType::F32)?)
    };
    let mut graph =
        oxtune_tensor::graph::Graph::capture(&gpu, || output.slice_set(&step()?, 0, 0))?;
    for round in 0..3 {
        let fresh = Tensor::randn(0f32, 1.0, (4, 64), &gpu)?.to_dtype(DType::BF16)?;
        input.slice_set(&fresh, 0, 0)?;
        graph.replay()?;
        let expected = step()?;
        let diff: f32 = (&output - &expected)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar()?;
        println!("graph replay {round}: max |replayed - eager| {diff:e}");
        assert!(diff == 0.0, "replay {round} differs from eager by {diff:e}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// flash attention

use oxtune_tensor::attention::{
    AttentionMask, flash_attention, flash_attention_positions_first, flash_attention_reference,
};

/// Masks the flash-attention tests cycle through: (label, causal, segments, sliding window).
const FLASH_MASKS: [(&str, bool, bool, Option<usize>); 5] = [
    ("causal", true, false, None),
    ("causal + segments", true, true, None),
    ("causal + window 48", true, false, Some(48)),
    ("unmasked", false, false, None),
    ("segments + window 48, not causal", false, true, Some(48)),
];

/// (b, t) segments of packed rows: row 0 is [0; 5], [1; 7], [2; rest], row 1 three samples of
/// about t / 3 (whole key tiles of another sample are skipped at t = 1000), cut at t.
fn flash_segments(t: usize) -> Vec<Vec<u32>> {
    let row0 = (0..t)
        .map(|i| match i {
            0..5 => 0,
            5..12 => 1,
            _ => 2,
        })
        .collect();
    let third = t.div_ceil(3).max(1);
    let row1 = (0..t)
        .map(|i| u32::try_from(i / third).unwrap_or(0))
        .collect();
    vec![row0, row1]
}

/// The fused forward and dq, dk, dv (through candle's autograd) against the f64 CPU
/// reference on the same dtype-rounded inputs, for bf16 and f16, head_dim 64 and 128,
/// t = 1 .. 1000, b = 2, h = 4, kv_h = 4, 2, 1, each case with one of [`FLASH_MASKS`] in turn
/// (every mask meets every t). Tolerances as for the other kernels: the forward within 2^-6
/// (bf16) or 2^-8 (f16) of its row's max |reference|, gradients twice that (P and dS are
/// rounded to the dtype before their matmuls, as in FlashAttention-2), with the floor of
/// [`check_op_with_floor`] (a quarter of the tensor's largest gradient).
#[test]
fn flash_attention_matches_the_reference() -> Result<()> {
    let gpu = oxtune_tensor::parse_device("cuda")?;
    let (b, h) = (2, 4);
    for (combo, (dtype, d)) in [
        (DType::BF16, 64),
        (DType::BF16, 128),
        (DType::F16, 64),
        (DType::F16, 128),
    ]
    .into_iter()
    .enumerate()
    {
        for (t_index, t) in [1, 17, 128, 257, 1000].into_iter().enumerate() {
            for (kv_index, kv_h) in [4, 2, 1].into_iter().enumerate() {
                // combo + t_index + kv_index takes 6 consecutive values at every t: each
                // mask meets each t (and each kv_h) at least once
                let (label, causal, with_segments, window) =
                    FLASH_MASKS[(combo + t_index + kv_index) % FLASH_MASKS.len()];
                let segments = flash_segments(t);
                let segments_cpu = Tensor::new(segments.clone(), &Device::Cpu)?;
                let segments_gpu = segments_cpu.to_device(&gpu)?;
                let mask = |segments| AttentionMask {
                    causal,
                    segments: with_segments.then_some(segments),
                    sliding_window: window,
                };
                let (mask_cpu, mask_gpu) = (mask(&segments_cpu), mask(&segments_gpu));
                let scale = 1.0 / (d as f64).sqrt();
                let q = randn(&[b, h, t, d], 2.0)?;
                let k = randn(&[b, kv_h, t, d], 1.0)?;
                let v = randn(&[b, kv_h, t, d], 1.0)?;
                // Gradients are differences of terms of about 1 (dq is exactly 0 at t = 1,
                // where the one visible key takes all the weight): rows count as at least 1.
                check_op_with_floor(
                    &format!("flash_attention {label} kv_h {kv_h}"),
                    dtype,
                    &[q, k, v],
                    &[true, true, true],
                    |xs| flash_attention(&xs[0], &xs[1], &xs[2], scale, mask_gpu),
                    |xs| flash_attention_reference(&xs[0], &xs[1], &xs[2], scale, mask_cpu),
                    1.0,
                )?;
                // the public function took the kernel (not the reference on the GPU)
                let on_gpu = |x: &Tensor| x.to_dtype(dtype)?.to_device(&gpu);
                let (q, k, v) = (
                    on_gpu(&randn(&[b, h, t, d], 2.0)?)?,
                    on_gpu(&randn(&[b, kv_h, t, d], 1.0)?)?,
                    on_gpu(&randn(&[b, kv_h, t, d], 1.0)?)?,
                );
                let public = flash_attention(&q, &k, &v, scale, mask_gpu)?;
                let (kernel, _) =
                    oxtune_tensor::cuda::flash_attention_with_lse(&q, &k, &v, scale, &mask_gpu)?;
                let differ: f32 = (public.to_dtype(DType::F32)? - kernel.to_dtype(DType::F32)?)?
                    .abs()?
                    .flatten_all()?
                    .max(0)?
                    .to_scalar()?;
                assert!(
                    differ == 0.0,
                    "flash_attention {label} kv_h {kv_h} t {t} d {d} {dtype:?}: the public \
                     function differs from the kernel by {differ:e}"
                );
            }
        }
    }
    Ok(())
}

/// q, k, v narrowed from one packed (b, t, h + 2 kv_h, d) tensor, the layout of a fused q|k|v
/// projection (token stride (h + 2 kv_h) d, head offsets h d and (h + kv_h) d). The packed
/// tensor is a `cat` of q, k, v (so gradients reach each of them); `shifted` starts it one
/// element into its storage, so no view has 16-byte rows and the kernels' inputs take the
/// contiguous-copy fallback.
fn packed_qkv(xs: &[Tensor], shifted: bool) -> Result<(Tensor, Tensor, Tensor)> {
    let (h, kv_h) = (xs[0].dim(2)?, xs[1].dim(2)?);
    let packed = Tensor::cat(&[&xs[0], &xs[1], &xs[2]], 2)?;
    let packed = if shifted {
        let flat = packed.flatten_all()?;
        Tensor::cat(&[&flat.narrow(0, 0, 1)?, &flat], 0)?
            .narrow(0, 1, flat.elem_count())?
            .reshape(packed.shape())?
    } else {
        packed
    };
    assert_eq!(packed.layout().start_offset(), usize::from(shifted));
    Ok((
        packed.narrow(2, 0, h)?,
        packed.narrow(2, h, kv_h)?,
        packed.narrow(2, h + kv_h, kv_h)?,
    ))
}

/// `flash_attention_positions_first` on q (b, t, h, d), k and v (b, t, kv_h, d) narrowed from
/// one packed tensor ([`packed_qkv`]): the forward and dq, dk, dv through candle's autograd
/// against the f64 reference of the inputs transposed to (b, h, t, d), its output transposed
/// back, over the cases and tolerances of [`flash_attention_matches_the_reference`] (bf16 and
/// f16, d 64 and 128, t = 1 .. 1000, kv_h 4, 2, 1, the masks in another rotation); every
/// third case with the packed tensor shifted off 16-byte alignment (the copy fallback). The
/// output must be (b, t, h, d) and contiguous, and equal bit for bit to the heads-first
/// kernel's output on transposed contiguous copies (one kernel, only the addressing differs).
#[test]
fn flash_attention_positions_first_matches_the_reference() -> Result<()> {
    let gpu = oxtune_tensor::parse_device("cuda")?;
    let (b, h) = (2, 4);
    for (combo, (dtype, d)) in [
        (DType::BF16, 64),
        (DType::BF16, 128),
        (DType::F16, 64),
        (DType::F16, 128),
    ]
    .into_iter()
    .enumerate()
    {
        for (t_index, t) in [1, 17, 128, 257, 1000].into_iter().enumerate() {
            for (kv_index, kv_h) in [4, 2, 1].into_iter().enumerate() {
                let case = combo + t_index + kv_index;
                let (label, causal, with_segments, window) =
                    FLASH_MASKS[(case + 1) % FLASH_MASKS.len()];
                let shifted = case % 3 == 2;
                let segments = flash_segments(t);
                let segments_cpu = Tensor::new(segments.clone(), &Device::Cpu)?;
                let segments_gpu = segments_cpu.to_device(&gpu)?;
                let mask = |segments| AttentionMask {
                    causal,
                    segments: with_segments.then_some(segments),
                    sliding_window: window,
                };
                let (mask_cpu, mask_gpu) = (mask(&segments_cpu), mask(&segments_gpu));
                let scale = 1.0 / (d as f64).sqrt();
                let name = format!(
                    "flash_attention_positions_first {label} kv_h {kv_h}{}",
                    if shifted { " (unaligned: copied)" } else { "" }
                );
                let heads_first = |x: &Tensor| x.transpose(1, 2);
                check_op_with_floor(
                    &name,
                    dtype,
                    &[
                        randn(&[b, t, h, d], 2.0)?,
                        randn(&[b, t, kv_h, d], 1.0)?,
                        randn(&[b, t, kv_h, d], 1.0)?,
                    ],
                    &[true, true, true],
                    |xs| {
                        let (q, k, v) = packed_qkv(xs, shifted)?;
                        assert!(!q.is_contiguous() && !k.is_contiguous() && !v.is_contiguous());
                        let out = flash_attention_positions_first(&q, &k, &v, scale, mask_gpu)?;
                        assert!(
                            out.dims() == [b, t, h, d] && out.is_contiguous(),
                            "{name}: output {:?} with strides {:?}; expected ({b}, {t}, {h}, \
                             {d}) contiguous",
                            out.dims(),
                            out.stride()
                        );
                        Ok(out)
                    },
                    |xs| {
                        flash_attention_reference(
                            &heads_first(&xs[0])?,
                            &heads_first(&xs[1])?,
                            &heads_first(&xs[2])?,
                            scale,
                            mask_cpu,
                        )?
                        .transpose(1, 2)
                    },
                    1.0,
                )?;
                // the same bits as the heads-first kernel on transposed contiguous copies
                let on_gpu = |x: &Tensor| x.to_dtype(dtype)?.to_device(&gpu);
                let inputs = [
                    on_gpu(&randn(&[b, t, h, d], 2.0)?)?,
                    on_gpu(&randn(&[b, t, kv_h, d], 1.0)?)?,
                    on_gpu(&randn(&[b, t, kv_h, d], 1.0)?)?,
                ];
                let (q, k, v) = packed_qkv(&inputs, shifted)?;
                let public = flash_attention_positions_first(&q, &k, &v, scale, mask_gpu)?;
                let copy = |x: &Tensor| x.transpose(1, 2)?.contiguous();
                let (kernel, _) = oxtune_tensor::cuda::flash_attention_with_lse(
                    &copy(&q)?,
                    &copy(&k)?,
                    &copy(&v)?,
                    scale,
                    &mask_gpu,
                )?;
                let differ: f32 = (public.to_dtype(DType::F32)?
                    - kernel.transpose(1, 2)?.to_dtype(DType::F32)?)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar()?;
                assert!(
                    differ == 0.0,
                    "{name} t {t} d {d} {dtype:?}: positions first differs from the heads-first \
                     kernel by {differ:e}"
                );
            }
        }
    }
    Ok(())
}

/// The heads-first kernels read strided views in place as well: q, k, v and the output
/// gradient given as (b, t, h, d) tensors transposed to (b, h, t, d) (token stride h d) give
/// the same output and LSE, dk and dv bit for bit, and dq up to the order of its f32 atomic
/// additions (which can move a rounding by a bf16 ulp: within 2^-6 of the largest |dq|), as
/// their contiguous copies.
#[test]
fn flash_attention_kernels_read_strided_heads_first_views() -> Result<()> {
    let gpu = oxtune_tensor::parse_device("cuda")?;
    let (b, h, kv_h, t) = (2, 4, 2, 257);
    let segments = Tensor::new(flash_segments(t), &gpu)?;
    let mask = AttentionMask {
        causal: true,
        segments: Some(&segments),
        sliding_window: None,
    };
    for (dtype, d) in [(DType::BF16, 128), (DType::F16, 64)] {
        let scale = 1.0 / (d as f64).sqrt();
        let strided = |heads: usize, std: f32| -> Result<Tensor> {
            Tensor::randn(0f32, std, (b, t, heads, d), &gpu)?
                .to_dtype(dtype)?
                .transpose(1, 2)
        };
        let (q, k, v, grad) = (
            strided(h, 2.0)?,
            strided(kv_h, 1.0)?,
            strided(kv_h, 1.0)?,
            strided(h, 1.0)?,
        );
        assert!(!q.is_contiguous() && !grad.is_contiguous());
        let copies: Vec<Tensor> = [&q, &k, &v, &grad]
            .iter()
            .map(|x| x.contiguous())
            .collect::<Result<_>>()?;
        let (o, lse) = oxtune_tensor::cuda::flash_attention_with_lse(&q, &k, &v, scale, &mask)?;
        let (o_copy, lse_copy) = oxtune_tensor::cuda::flash_attention_with_lse(
            &copies[0], &copies[1], &copies[2], scale, &mask,
        )?;
        let largest_difference = |a: &Tensor, b: &Tensor| -> Result<f32> {
            (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar()
        };
        assert_eq!(largest_difference(&o, &o_copy)?, 0.0, "{dtype:?} d {d}: o");
        assert_eq!(
            largest_difference(&lse, &lse_copy)?,
            0.0,
            "{dtype:?} d {d}: lse"
        );
        // o read through a strided view too: the (b, t, h, d) order of the output's copy
        let o_strided = o.transpose(1, 2)?.contiguous()?.transpose(1, 2)?;
        let (dq, dk, dv) = oxtune_tensor::cuda::flash_attention_backward(
            &q, &k, &v, &o_strided, &lse, &grad, scale, &mask,
        )?;
        let (dq_copy, dk_copy, dv_copy) = oxtune_tensor::cuda::flash_attention_backward(
            &copies[0], &copies[1], &copies[2], &o, &lse, &copies[3], scale, &mask,
        )?;
        assert!(dq.is_contiguous() && dk.is_contiguous() && dv.is_contiguous());
        assert_eq!(
            largest_difference(&dk, &dk_copy)?,
            0.0,
            "{dtype:?} d {d}: dk"
        );
        assert_eq!(
            largest_difference(&dv, &dv_copy)?,
            0.0,
            "{dtype:?} d {d}: dv"
        );
        let dq_scale: f32 = dq_copy
            .to_dtype(DType::F32)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar()?;
        let dq_error = largest_difference(&dq, &dq_copy)?;
        println!(
            "strided heads-first views {dtype:?} d {d}: dq differs by {dq_error:e} (largest |dq| {dq_scale:e})"
        );
        assert!(
            dq_error <= dq_scale / 64.0,
            "{dtype:?} d {d}: dq differs by {dq_error:e}, largest |dq| {dq_scale:e}"
        );
    }
    Ok(())
}

/// Milliseconds and TFLOP/s of the fused forward and backward at the shape of a Qwen3-style
/// layer in training, (b 4, h 16, kv_h 8, t 2048, d 128) bf16 causal, next to the composed
/// path the models used before (repeat_kv, f32 scores by matmul, our causal softmax kernel,
/// cast, matmul; its backward through candle's autograd), and the GPU memory each forward
/// holds for its backward. FLOPs count the visible (causal) half: the forward's two matmuls
/// are 2 * 2 * b * h * t^2 * d / 2, the backward's five 2.5 times that.
#[test]
fn flash_attention_speed_against_the_composed_path() -> Result<()> {
    let gpu = oxtune_tensor::parse_device("cuda")?;
    let (b, h, kv_h, t, d) = (4, 16, 8, 2048, 128);
    let dtype = DType::BF16;
    let scale = 1.0 / (d as f64).sqrt();
    let mask = AttentionMask {
        causal: true,
        ..AttentionMask::default()
    };
    let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, h, t, d), &gpu)?.to_dtype(dtype)?)?;
    let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, kv_h, t, d), &gpu)?.to_dtype(dtype)?)?;
    let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, kv_h, t, d), &gpu)?.to_dtype(dtype)?)?;
    let grad = Tensor::randn(0f32, 1.0, (b, h, t, d), &gpu)?.to_dtype(dtype)?;
    let forward_flops = 2.0 * 2.0 * (b * h * t * t * d) as f64 / 2.0;
    let backward_flops = 2.5 * forward_flops;
    let line = |name: &str, flops: f64, seconds: f64| {
        println!(
            "| {name} | {:.3} ms | {:.1} TFLOP/s |",
            seconds * 1e3,
            flops / seconds / 1e12
        );
    };
    let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
    println!("flash attention (b {b}, h {h}, kv_h {kv_h}, t {t}, d {d}) bf16 causal");
    println!("| path | time | throughput |");
    println!("| --- | --- | --- |");

    let seconds = seconds_per_call(&gpu, || {
        oxtune_tensor::cuda::flash_attention_with_lse(qt, kt, vt, scale, &mask).map(drop)
    })?;
    line("flash forward", forward_flops, seconds);
    let (o, lse) = oxtune_tensor::cuda::flash_attention_with_lse(qt, kt, vt, scale, &mask)?;
    let seconds = seconds_per_call(&gpu, || {
        oxtune_tensor::cuda::flash_attention_backward(qt, kt, vt, &o, &lse, &grad, scale, &mask)
            .map(drop)
    })?;
    line("flash backward", backward_flops, seconds);
    let seconds = seconds_per_call(&gpu, || {
        let out = flash_attention(qt, kt, vt, scale, mask)?;
        (out * &grad)?.sum_all()?.backward().map(drop)
    })?;
    line(
        "flash forward + backward (autograd)",
        forward_flops + backward_flops,
        seconds,
    );
    // positions first, the (b, t, heads, d) layout of the projections: the forward reads
    // head-narrows of one packed (b, t, h + 2 kv_h, d) tensor in place; forward + backward
    // takes (b, t, heads, d) variables (narrows of one packed variable would add candle's
    // narrow backward, zero-padded copies of the packed gradient, to the line)
    let packed = Tensor::randn(0f32, 1.0, (b, t, h + 2 * kv_h, d), &gpu)?.to_dtype(dtype)?;
    let (qp, kp, vp) = (
        packed.narrow(2, 0, h)?,
        packed.narrow(2, h, kv_h)?,
        packed.narrow(2, h + kv_h, kv_h)?,
    );
    let seconds = seconds_per_call(&gpu, || {
        flash_attention_positions_first(&qp, &kp, &vp, scale, mask).map(drop)
    })?;
    line(
        "flash forward, positions first (narrows of a packed q|k|v)",
        forward_flops,
        seconds,
    );
    let positions_first =
        |x: &Tensor| -> Result<Var> { Var::from_tensor(&x.transpose(1, 2)?.contiguous()?) };
    let (qf, kf, vf) = (
        positions_first(qt)?,
        positions_first(kt)?,
        positions_first(vt)?,
    );
    let grad_positions_first = grad.transpose(1, 2)?.contiguous()?;
    let seconds = seconds_per_call(&gpu, || {
        let out = flash_attention_positions_first(
            qf.as_tensor(),
            kf.as_tensor(),
            vf.as_tensor(),
            scale,
            mask,
        )?;
        (out * &grad_positions_first)?
            .sum_all()?
            .backward()
            .map(drop)
    })?;
    line(
        "flash forward + backward (autograd), positions first",
        forward_flops + backward_flops,
        seconds,
    );
    drop((packed, qp, kp, vp, qf, kf, vf, grad_positions_first));

    let composed = || -> Result<Tensor> {
        let k = ops::repeat_kv(kt, h / kv_h)?.contiguous()?;
        let v = ops::repeat_kv(vt, h / kv_h)?.contiguous()?;
        let scores = qt
            .to_dtype(DType::F32)?
            .matmul(&k.to_dtype(DType::F32)?.t()?)?;
        let probs =
            ops::scaled_masked_softmax(&scores, scale, ScoreMask::Causal { past_tokens: 0 })?
                .to_dtype(dtype)?;
        probs.matmul(&v)
    };
    let seconds = seconds_per_call(&gpu, || composed().map(drop))?;
    line("composed forward", forward_flops, seconds);
    let seconds = seconds_per_call(&gpu, || {
        (composed()? * &grad)?.sum_all()?.backward().map(drop)
    })?;
    line(
        "composed forward + backward (autograd)",
        forward_flops + backward_flops,
        seconds,
    );

    // memory a forward keeps alive for its backward (the pool may keep freed blocks, so
    // these are what the device reports in use, before and after)
    drop((o, lse));
    gpu.synchronize()?;
    let before = oxtune_tensor::memory_in_use(&gpu)?.unwrap_or(0);
    let out = flash_attention(qt, kt, vt, scale, mask)?;
    gpu.synchronize()?;
    let flash_held = oxtune_tensor::memory_in_use(&gpu)?.unwrap_or(0);
    drop(out);
    let out = composed()?;
    gpu.synchronize()?;
    let composed_held = oxtune_tensor::memory_in_use(&gpu)?.unwrap_or(0);
    drop(out);
    let mib = |bytes: u64| bytes.saturating_sub(before) as f64 / (1 << 20) as f64;
    println!(
        "GPU memory in use after the forward, above the inputs: flash {:.0} MiB, composed {:.0} \
         MiB (a pool that keeps freed blocks makes the second an upper bound of its own)",
        mib(flash_held),
        mib(composed_held)
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// cross entropy

/// Targets of a test batch: row r takes, by r % 5, the row's largest logit, nothing
/// (ignored), column 0, the last column, or a column in between.
fn cross_entropy_targets(rows: &[Vec<f64>]) -> Vec<i64> {
    rows.iter()
        .enumerate()
        .map(|(r, row)| {
            let vocab = row.len();
            let argmax = row
                .iter()
                .enumerate()
                .fold((0, f64::NEG_INFINITY), |best, (j, v)| {
                    if *v > best.1 { (j, *v) } else { best }
                })
                .0;
            let column = match r % 5 {
                0 => argmax,
                1 => return -100,
                2 => 0,
                3 => vocab - 1,
                _ => (r * 7919) % vocab,
            };
            i64::try_from(column).expect("vocabularies fit i64")
        })
        .collect()
}

/// `ops::cross_entropy_sum` on the GPU in `dtype` against the f64 CPU reference on the same
/// rounded logits: the loss (relative to the reference loss), then d(g * loss)/d logits row
/// by row (as [`compare_rows`]), with g = 0.37 standing in for 1 / target tokens.
fn check_cross_entropy(dtype: DType, rows: usize, vocab: usize) -> Result<()> {
    let gpu = oxtune_tensor::parse_device("cuda")?;
    let label = format!("cross_entropy_sum ({rows}, {vocab})");
    let logits = randn(&[rows, vocab], 3.0)?
        .to_dtype(dtype)?
        .to_dtype(DType::F64)?;
    let values: Vec<Vec<f64>> = logits.to_vec2()?;
    let targets = cross_entropy_targets(&values);
    let kept = targets.iter().filter(|t| **t != -100).count();
    // The magnitude of what the loss is computed from: sum over kept rows of |lse| + |x[t]|.
    // A row's loss lse - x[t] can be far smaller than either (a dominant target), so f32's
    // error is measured against these, not against the loss.
    let magnitude: f64 = values
        .iter()
        .zip(&targets)
        .filter(|(_, t)| **t != -100)
        .map(|(row, t)| {
            let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
            lse.abs() + row[usize::try_from(*t).expect("a kept target is an index")].abs()
        })
        .sum();
    drop(values);
    let scale = 0.37;

    let cpu_var = Var::from_tensor(&logits)?;
    let cpu_targets = Tensor::new(targets.as_slice(), &Device::Cpu)?;
    let cpu_loss = ops::cross_entropy_sum_reference(cpu_var.as_tensor(), &cpu_targets, -100)?;
    let cpu_grads = (&cpu_loss * scale)?.backward()?;
    let cpu_loss = cpu_loss.to_scalar::<f64>()?;

    let gpu_var = Var::from_tensor(&logits.to_dtype(dtype)?.to_device(&gpu)?)?;
    let gpu_targets = cpu_targets.to_device(&gpu)?;
    let gpu_loss = ops::cross_entropy_sum(gpu_var.as_tensor(), &gpu_targets, -100)?;
    assert_eq!(gpu_loss.dtype(), DType::F32, "{label}: loss dtype");
    assert_eq!(gpu_loss.dims(), [0usize; 0], "{label}: loss shape");
    let gpu_grads = (&gpu_loss * scale)?.backward()?;
    let gpu_loss = f64::from(gpu_loss.to_scalar::<f32>()?);

    // every kept row's loss is computed in f32 from the same values: f32 accuracy
    let error = (gpu_loss - cpu_loss).abs() / magnitude.max(1e-30);
    println!(
        "{label} forward {dtype:?}: loss {gpu_loss:.6} vs {cpu_loss:.6} ({kept} of {rows} rows \
         kept), error {error:.2e} of sum |lse| + |x[target]|"
    );
    assert!(
        error <= 1e-5 || (kept == 0 && gpu_loss == 0.0),
        "{label} forward {dtype:?}: GPU loss {gpu_loss} vs reference {cpu_loss}: error {error:e} \
         of sum |lse| + |x[target]| = {magnitude:e} (allowed 1e-5; {kept} of {rows} rows kept)"
    );
    let expected = cpu_grads
        .get(cpu_var.as_tensor())
        .unwrap_or_else(|| panic!("{label}: the CPU reference gave no gradient"));
    let got = gpu_grads
        .get(gpu_var.as_tensor())
        .unwrap_or_else(|| panic!("{label} {dtype:?}: no gradient through the GPU op"));
    assert_eq!(got.dtype(), dtype, "{label}: gradient dtype");
    // The gradient is g * (softmax - onehot): its f32 error is a fraction of g (through lse,
    // and cancellation in p - 1 at a dominant target), so a row's max counts as at least g; a
    // wrong target or lse still shows as an error of the order of g.
    compare_rows(&label, "d/d logits", dtype, expected, got, scale)
}

#[test]
fn cross_entropy_kernel_matches_the_reference() -> Result<()> {
    // every (rows, vocab) but (1000, 151936), whose f64 CPU reference needs 1.2 GB per copy
    // (the timing below runs 883 x 151936)
    let mut cases = Vec::new();
    for rows in [1, 3, 64, 1000] {
        for vocab in [7, 1000, 32_000, 151_936] {
            if rows * vocab <= 1000 * 32_000 {
                cases.push((rows, vocab));
            }
        }
    }
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for &(rows, vocab) in &cases {
            check_cross_entropy(dtype, rows, vocab)?;
        }
    }
    Ok(())
}

#[test]
fn cross_entropy_handles_u32_targets_and_all_ignored_rows() -> Result<()> {
    let gpu = oxtune_tensor::parse_device("cuda")?;
    let logits = randn(&[4, 1000], 2.0)?;
    let signed = Tensor::new(&[3i64, 999, 0, 500], &Device::Cpu)?;
    let unsigned = Tensor::new(&[3u32, 999, 0, 500], &Device::Cpu)?;
    let expected = ops::cross_entropy_sum_reference(&logits, &signed, -100)?.to_scalar::<f32>()?;
    let got = ops::cross_entropy_sum(&logits.to_device(&gpu)?, &unsigned.to_device(&gpu)?, -100)?
        .to_scalar::<f32>()?;
    println!("cross_entropy_sum u32 targets: {got} vs {expected}");
    assert!(
        (got - expected).abs() <= 1e-5 * expected.abs(),
        "cross_entropy_sum (4, 1000) f32 with u32 targets: GPU {got} vs reference {expected}"
    );
    let ignored = Tensor::new(&[-100i64; 4], &gpu)?;
    let var = Var::from_tensor(&logits.to_device(&gpu)?)?;
    let loss = ops::cross_entropy_sum(var.as_tensor(), &ignored, -100)?;
    assert_eq!(loss.to_scalar::<f32>()?, 0.0, "all rows ignored: loss");
    let grads = loss.backward()?;
    let grad = grads.get(var.as_tensor()).expect("a gradient");
    let largest: f32 = grad.abs()?.flatten_all()?.max(0)?.to_scalar()?;
    assert_eq!(largest, 0.0, "all rows ignored: gradient");
    Ok(())
}

#[test]
fn bandwidth_of_cross_entropy_against_candle() -> Result<()> {
    let gpu = oxtune_tensor::parse_device("cuda")?;
    let bench = Bench { device: &gpu };
    println!("| op | shape | ours | candle composed |");
    println!("| --- | --- | --- | --- |");
    let vocab = 151_936;
    // the trainer's loss chunk (2^27 logits) and a small batch
    for rows in [(1 << 27) / vocab, 64] {
        let logits = Tensor::randn(0f32, 4.0, (rows, vocab), &gpu)?.to_dtype(DType::BF16)?;
        let ids: Vec<i64> = (0..rows)
            .map(|r| i64::try_from((r * 7919) % vocab).expect("small"))
            .collect();
        let targets = Tensor::new(ids.as_slice(), &gpu)?;
        let logits_bytes = 2.0 * (rows * vocab) as f64;
        let shape = format!("({rows}, {vocab}) bf16");
        bench.line(
            "cross_entropy_sum fwd",
            &shape,
            logits_bytes,
            &mut [
                ("ours", &mut || {
                    ops::cross_entropy_sum(&logits, &targets, -100).map(drop)
                }),
                ("composed", &mut || {
                    ops::cross_entropy_sum_reference(&logits, &targets, -100).map(drop)
                }),
            ],
        )?;
        let (_, lse) = oxtune_tensor::cuda::cross_entropy_sum_with_lse(&logits, &targets, -100)?;
        let grad = Tensor::new(0.5f32, &gpu)?;
        bench.line(
            "cross_entropy_sum bwd (reads logits, writes dlogits)",
            &shape,
            2.0 * logits_bytes,
            &mut [("ours", &mut || {
                oxtune_tensor::cuda::cross_entropy_backward(&logits, &targets, &lse, &grad, -100)
                    .map(drop)
            })],
        )?;
        let var = Var::from_tensor(&logits)?;
        bench.line(
            "cross_entropy_sum fwd + bwd (autograd)",
            &shape,
            3.0 * logits_bytes,
            &mut [
                ("ours", &mut || {
                    let loss = ops::cross_entropy_sum(var.as_tensor(), &targets, -100)?;
                    (loss * 1e-3)?.backward().map(drop)
                }),
                ("composed", &mut || {
                    let loss = ops::cross_entropy_sum_reference(var.as_tensor(), &targets, -100)?;
                    (loss * 1e-3)?.backward().map(drop)
                }),
            ],
        )?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// add rms_norm

#[test]
fn add_rms_norm_kernel_matches_the_reference() -> Result<()> {
    let shapes: [&[usize]; 7] = [
        &[3, 1],
        &[5, 7],
        &[2, 3, 1024],
        &[4, 4096],
        &[3, 5120],
        &[2, 40_000], // wider than the kernel's register cache: s is re-read
        &[300, 1024],
    ];
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for shape in shapes {
            let xs = randn(shape, 2.0)?;
            let residual = randn(shape, 1.0)?;
            let width = shape[shape.len() - 1];
            let weight = Tensor::randn(1f32, 0.2, width, &Device::Cpu)?;
            let floor = if width == 1 { 10.0 } else { 0.0 };
            for trainable in [
                [true, true, true],
                [true, true, false],
                [false, true, false],
            ] {
                let name = format!("add_rms_norm (trainable xs, residual, weight: {trainable:?})");
                // both outputs at once: (2, ..) = [sum, normed]; the CPU reference sums in f64
                // where the GPU rounds the sum to the dtype first (as candle's add does)
                check_op_with_floor(
                    &name,
                    dtype,
                    &[xs.clone(), residual.clone(), weight.clone()],
                    &trainable,
                    |xs| {
                        let (sum, normed) = ops::add_rms_norm(&xs[0], &xs[1], &xs[2], 1e-6)?;
                        Tensor::stack(&[sum, normed], 0)
                    },
                    |xs| {
                        let (sum, normed) =
                            ops::add_rms_norm_reference(&xs[0], &xs[1], &xs[2], 1e-6)?;
                        Tensor::stack(&[sum, normed], 0)
                    },
                    floor,
                )?;
            }
        }
    }
    Ok(())
}

#[test]
fn add_rms_norm_equals_add_then_rms_norm_on_the_gpu() -> Result<()> {
    // the same rounding as candle's add followed by our rms_norm kernel, bit for bit
    let gpu = oxtune_tensor::parse_device("cuda")?;
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for width in [1, 7, 1024, 4096, 5120] {
            let on = |std: f32, shape: &[usize]| -> Result<Tensor> {
                Tensor::randn(0f32, std, shape, &gpu)?.to_dtype(dtype)
            };
            let (xs, residual) = (on(2.0, &[5, width])?, on(1.0, &[5, width])?);
            let weight = (on(0.2, &[width])? + 1.0)?;
            let (sum, normed) = ops::add_rms_norm(&xs, &residual, &weight, 1e-6)?;
            let composed = (&xs + &residual)?;
            let expected = ops::rms_norm(&composed, &weight, 1e-6)?;
            // the sum must be identical; the norm sums the same squares in the same order as
            // the rms_norm kernel, so it should be too (one ulp allowed, in case the compiler
            // contracts the two kernels' arithmetic differently)
            let ulp = match dtype {
                DType::F32 => f32::EPSILON,
                DType::F16 => 1.0 / 1024.0,
                _ => 1.0 / 128.0,
            };
            for (what, got, want, allowed_ulps) in [
                ("sum", &sum, &composed, 0.0),
                ("normed", &normed, &expected, 1.0),
            ] {
                let want = want.to_dtype(DType::F32)?;
                let diff: f32 = (got.to_dtype(DType::F32)? - &want)?
                    .abs()?
                    .flatten_all()?
                    .max(0)?
                    .to_scalar()?;
                let largest: f32 = want.abs()?.flatten_all()?.max(0)?.to_scalar()?;
                let allowed = allowed_ulps * ulp * largest;
                println!(
                    "add_rms_norm (5, {width}) {dtype:?} {what}: max |fused - composed| {diff:e} \
                     (allowed {allowed:e})"
                );
                assert!(
                    diff <= allowed,
                    "add_rms_norm (5, {width}) {dtype:?}: {what} differs from add + rms_norm by \
                     {diff:e} (allowed {allowed:e}, largest |value| {largest:e})"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn bandwidth_of_add_rms_norm_against_add_and_rms_norm() -> Result<()> {
    let gpu = oxtune_tensor::parse_device("cuda")?;
    let bench = Bench { device: &gpu };
    println!("| op | shape | ours | add + rms_norm |");
    println!("| --- | --- | --- | --- |");
    let (rows, hidden) = (16_384, 4096);
    let randn = |mean: f32, std: f32, shape: &[usize]| -> Result<Tensor> {
        Tensor::randn(mean, std, shape, &gpu)?.to_dtype(DType::BF16)
    };
    let xs = randn(0.0, 1.0, &[rows, hidden])?;
    let residual = randn(0.0, 1.0, &[rows, hidden])?;
    let weight = randn(1.0, 0.1, &[hidden])?;
    let elements = (rows * hidden) as f64;
    let shape = format!("({rows}, {hidden}) bf16");
    bench.line(
        "add_rms_norm fwd (reads xs, residual; writes sum, normed)",
        &shape,
        4.0 * 2.0 * elements,
        &mut [
            ("ours", &mut || {
                ops::add_rms_norm(&xs, &residual, &weight, 1e-6).map(drop)
            }),
            ("add + rms_norm", &mut || {
                ops::rms_norm(&(&xs + &residual)?, &weight, 1e-6).map(drop)
            }),
        ],
    )?;
    let (x_var, r_var) = (Var::from_tensor(&xs)?, Var::from_tensor(&residual)?);
    let (dsum, dnormed) = (
        randn(0.0, 1.0, &[rows, hidden])?,
        randn(0.0, 1.0, &[rows, hidden])?,
    );
    // the probe's own multiplications and sums are in both columns
    bench.line(
        "add_rms_norm fwd + bwd (autograd, frozen weight; probe ops included)",
        &shape,
        4.0 * 2.0 * elements,
        &mut [
            ("ours", &mut || {
                let (sum, normed) =
                    ops::add_rms_norm(x_var.as_tensor(), r_var.as_tensor(), &weight, 1e-6)?;
                ((sum * &dsum)?.sum_all()? + (normed * &dnormed)?.sum_all()?)?
                    .backward()
                    .map(drop)
            }),
            ("add + rms_norm", &mut || {
                let sum = (x_var.as_tensor() + r_var.as_tensor())?;
                let normed = ops::rms_norm(&sum, &weight, 1e-6)?;
                ((sum * &dsum)?.sum_all()? + (normed * &dnormed)?.sum_all()?)?
                    .backward()
                    .map(drop)
            }),
        ],
    )?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// adamw

use oxtune_tensor::optim::{AdamWStep, GradScale, MultiTensorAdamW, sum_of_squares};

/// One parameter of the f64 reference: weight (the master for bf16/f16), moments.
struct AdamWReference {
    weight: Vec<f64>,
    exp_avg: Vec<f64>,
    exp_avg_sq: Vec<f64>,
}

/// torch's AdamW step in f64 on `reference`, with the gradient times `scale`.
fn adamw_reference_step(
    reference: &mut AdamWReference,
    grad: &[f32],
    scale: f64,
    step: &AdamWStep,
    decay: bool,
) {
    let t = i32::try_from(step.step).expect("few steps");
    let bias_correction1 = 1.0 - step.beta1.powi(t);
    let bias_correction2_sqrt = (1.0 - step.beta2.powi(t)).sqrt();
    for (j, &g) in grad.iter().enumerate() {
        let g = f64::from(g) * scale;
        let mut p = reference.weight[j];
        if decay {
            p *= 1.0 - step.learning_rate * step.weight_decay;
        }
        let m = step.beta1 * reference.exp_avg[j] + (1.0 - step.beta1) * g;
        let v = step.beta2 * reference.exp_avg_sq[j] + (1.0 - step.beta2) * g * g;
        let denominator = v.sqrt() / bias_correction2_sqrt + step.eps;
        p -= step.learning_rate / bias_correction1 * m / denominator;
        reference.weight[j] = p;
        reference.exp_avg[j] = m;
        reference.exp_avg_sq[j] = v;
    }
}

fn host_f32(tensor: &Tensor) -> Result<Vec<f32>> {
    tensor
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()
}

/// max |ours - reference| <= relative * max(floor, max |reference|) (plus, for a rounded
/// weight, `rounding` * |reference| per element); the failure names what, where and how much.
/// A weight's floor is the learning rate, the size of its update: a weight that the update
/// nearly cancels keeps the f32 rounding error of the terms, not of the small result.
fn check_adamw(
    what: &str,
    ours: &[f32],
    reference: &[f64],
    (relative, floor): (f64, f64),
    rounding: f64,
) -> Result<()> {
    assert_eq!(ours.len(), reference.len(), "{what}: lengths");
    let scale = reference.iter().fold(floor, |m, v| m.max(v.abs()));
    let (mut worst, mut at) = (0f64, 0);
    for (j, (&o, &r)) in ours.iter().zip(reference).enumerate() {
        let excess = (f64::from(o) - r).abs() - rounding * r.abs();
        if excess > worst {
            (worst, at) = (excess, j);
        }
    }
    let tolerance = relative * scale.max(1e-30);
    if worst > tolerance {
        panic!(
            "{what}: |gpu - f64| exceeds its allowance by {worst:e} > {tolerance:e} at element {at} \
             (gpu {}, f64 {}, max |f64| {scale:e})",
            ours[at], reference[at]
        );
    }
    println!("{what}: worst excess {worst:e} (allowed {tolerance:e})");
    Ok(())
}

/// The fused AdamW against torch's step in f64 over 3 steps: f32 weights and bf16/f16
/// weights with f32 masters, of 1, 7, 4097 and 2^20 + 3 elements, decaying or not, with the
/// gradients unscaled, scaled by a host factor and by a device scalar; plus 70 small f32
/// tensors so that one dtype takes two launches. Moments and masters (and f32 weights)
/// within 1e-6 of the tensor's max |f64|; bf16/f16 weights within half an ulp more. Also
/// prints how many elements differ from the CPU path's bits (expected: none).
#[test]
fn adamw_kernel_matches_the_f64_reference() -> Result<()> {
    let gpu = oxtune_tensor::parse_device("cuda")?;
    let mut specs = Vec::new();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for (i, len) in [1usize, 7, 4097, (1 << 20) + 3].into_iter().enumerate() {
            specs.push((dtype, len, i % 2 == 0));
        }
    }
    for i in 0..70 {
        specs.push((DType::F32, 1 + (i * 37) % 300, i % 3 != 0));
    }
    let initial = specs
        .iter()
        .map(|&(dtype, len, _)| Tensor::randn(0f32, 1.0, len, &Device::Cpu)?.to_dtype(dtype))
        .collect::<Result<Vec<_>>>()?;
    let make = |device: &Device| -> Result<(Vec<Var>, MultiTensorAdamW)> {
        let vars = initial
            .iter()
            .map(|t| Var::from_tensor(&t.to_device(device)?))
            .collect::<Result<Vec<_>>>()?;
        let adam = MultiTensorAdamW::new(
            vars.iter()
                .cloned()
                .zip(specs.iter().map(|s| s.2))
                .collect(),
        )?;
        Ok((vars, adam))
    };
    let (gpu_vars, mut gpu_adam) = make(&gpu)?;
    let (cpu_vars, mut cpu_adam) = make(&Device::Cpu)?;
    let mut references = initial
        .iter()
        .map(|t| {
            let weight: Vec<f64> = host_f32(t)?.into_iter().map(f64::from).collect();
            let zeros = vec![0.0; weight.len()];
            Ok(AdamWReference {
                weight,
                exp_avg: zeros.clone(),
                exp_avg_sq: zeros,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    for t in 1..=3u64 {
        let step = AdamWStep {
            learning_rate: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
            step: t,
        };
        let grads = specs
            .iter()
            .map(|&(_, len, _)| Tensor::randn(0f32, 1.0, len, &Device::Cpu))
            .collect::<Result<Vec<_>>>()?;
        let gpu_grads = grads
            .iter()
            .map(|g| g.to_device(&gpu))
            .collect::<Result<Vec<_>>>()?;
        let factor = 0.37f32;
        let device_factor = Tensor::new(&[factor], &gpu)?;
        let (scale, gpu_scale, cpu_scale) = match t {
            1 => (1.0, GradScale::One, GradScale::One),
            2 => (
                f64::from(factor),
                GradScale::Factor(f64::from(factor)),
                GradScale::Factor(f64::from(factor)),
            ),
            _ => (
                f64::from(factor),
                GradScale::Device(&device_factor),
                GradScale::Factor(f64::from(factor)),
            ),
        };
        gpu_adam.step(&gpu_grads, &step, gpu_scale)?;
        cpu_adam.step(&grads, &step, cpu_scale)?;
        for (index, grad) in grads.iter().enumerate() {
            adamw_reference_step(
                &mut references[index],
                &host_f32(grad)?,
                scale,
                &step,
                specs[index].2,
            );
        }
        let mut differing_bits = 0usize;
        for (index, reference) in references.iter().enumerate() {
            let (dtype, len, decay) = specs[index];
            let name = format!("adamw step {t} {dtype:?} len {len} decay {decay}");
            let m = host_f32(&gpu_adam.exp_avg(index)?)?;
            let v = host_f32(&gpu_adam.exp_avg_sq(index)?)?;
            // exp_avg's floor is its update (1 - beta1) * |g|: gradients of opposite signs
            // can nearly cancel it, leaving the f32 rounding error of the terms.
            let largest_grad = host_f32(&grads[index])?
                .iter()
                .fold(0f64, |m, g| m.max(f64::from(*g).abs()));
            check_adamw(
                &format!("{name} exp_avg"),
                &m,
                &reference.exp_avg,
                (1e-6, (1.0 - step.beta1) * scale * largest_grad),
                0.0,
            )?;
            check_adamw(
                &format!("{name} exp_avg_sq"),
                &v,
                &reference.exp_avg_sq,
                (1e-6, 0.0),
                0.0,
            )?;
            let weight = host_f32(gpu_vars[index].as_tensor())?;
            let rounding = match dtype {
                DType::BF16 => 1.0 / 256.0,
                DType::F16 => 1.0 / 2048.0,
                _ => 0.0,
            };
            check_adamw(
                &format!("{name} weight"),
                &weight,
                &reference.weight,
                (1e-6, step.learning_rate),
                rounding,
            )?;
            if let Some(master) = gpu_adam.master(index)? {
                check_adamw(
                    &format!("{name} master"),
                    &host_f32(&master)?,
                    &reference.weight,
                    (1e-6, step.learning_rate),
                    0.0,
                )?;
            }
            let cpu_weight = host_f32(cpu_vars[index].as_tensor())?;
            let cpu_m = host_f32(&cpu_adam.exp_avg(index)?)?;
            differing_bits += weight
                .iter()
                .zip(&cpu_weight)
                .chain(m.iter().zip(&cpu_m))
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
        }
        println!(
            "adamw step {t}: {differing_bits} weights and moments differ from the CPU path's bits"
        );
    }
    Ok(())
}

/// The sum of squares for clipping against f64, over odd sizes and dtypes, and 200 small
/// tensors besides (two launches of the multi-tensor kernel).
#[test]
fn sum_of_squares_matches_f64() -> Result<()> {
    let gpu = oxtune_tensor::parse_device("cuda")?;
    let mut specs = vec![
        (1usize, DType::F32),
        (4097, DType::BF16),
        ((1 << 20) + 3, DType::F32),
    ];
    specs.extend((0..200).map(|i| (1 + (i * 53) % 700, DType::F32)));
    let tensors = specs
        .iter()
        .map(|&(len, dtype)| Tensor::randn(0f32, 1.0, len, &Device::Cpu)?.to_dtype(dtype))
        .collect::<Result<Vec<_>>>()?;
    let mut expected = 0f64;
    for t in &tensors {
        expected += host_f32(t)?
            .iter()
            .map(|v| f64::from(*v).powi(2))
            .sum::<f64>();
    }
    let on_gpu = tensors
        .iter()
        .map(|t| t.to_device(&gpu))
        .collect::<Result<Vec<_>>>()?;
    let got: f64 = sum_of_squares(&on_gpu, &gpu)?.to_scalar()?;
    println!("sum of squares: gpu {got}, f64 {expected}");
    assert!(
        ((got - expected) / expected).abs() < 1e-5,
        "sum of squares: gpu {got} vs f64 {expected}"
    );
    Ok(())
}

/// The AdamW step before the fused kernel: candle ops per parameter, then `Var::set`.
fn composed_adamw_step(
    vars: &[Var],
    masters: &mut [Option<Tensor>],
    moments: &mut [(Tensor, Tensor)],
    grads: &[Tensor],
    step: &AdamWStep,
) -> Result<()> {
    let t = i32::try_from(step.step).expect("few steps");
    let bias_correction2_sqrt = (1.0 - step.beta2.powi(t)).sqrt();
    let step_size = step.learning_rate / (1.0 - step.beta1.powi(t));
    for (index, var) in vars.iter().enumerate() {
        let grad = grads[index].to_dtype(DType::F32)?;
        let current = match &masters[index] {
            Some(master) => master.clone(),
            None => var.as_tensor().detach(),
        };
        let current = (current * (1.0 - step.learning_rate * step.weight_decay))?;
        let (exp_avg, exp_avg_sq) = &mut moments[index];
        *exp_avg = ((&*exp_avg * step.beta1)? + (&grad * (1.0 - step.beta1))?)?;
        *exp_avg_sq = ((&*exp_avg_sq * step.beta2)? + (grad.sqr()? * (1.0 - step.beta2))?)?;
        let denominator = ((exp_avg_sq.sqrt()? / bias_correction2_sqrt)? + step.eps)?;
        let updated = (current - (exp_avg.div(&denominator)? * step_size)?)?;
        var.set(&updated.to_dtype(var.dtype())?)?;
        if let Some(master) = &mut masters[index] {
            *master = updated;
        }
    }
    Ok(())
}

/// A LoRA r64 step of a Qwen3-0.6B-like model (28 layers; q 1024->2048, k/v 1024->1024,
/// o 2048->1024, gate/up 1024->3072, down 3072->1024; A (64, in), B (out, 64): 392 tensors,
/// 40.4M parameters): the fused step against the per-parameter candle ops, with f32 and
/// with bf16 weights (f32 masters); and the clip norm with one sync against one per
/// gradient. Printed, not asserted.
#[test]
fn adamw_speed_against_the_per_parameter_ops() -> Result<()> {
    let gpu = oxtune_tensor::parse_device("cuda")?;
    let rank = 64;
    let modules = [
        (1024, 2048),
        (1024, 1024),
        (1024, 1024),
        (2048, 1024),
        (1024, 3072),
        (1024, 3072),
        (3072, 1024),
    ];
    let mut shapes = Vec::new();
    for _ in 0..28 {
        for (input, output) in modules {
            shapes.push((rank, input));
            shapes.push((output, rank));
        }
    }
    let elements: usize = shapes.iter().map(|(a, b)| a * b).sum();
    let step = AdamWStep {
        learning_rate: 1e-4,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        step: 1,
    };
    let grads = shapes
        .iter()
        .map(|&shape| Tensor::randn(0f32, 1e-3, shape, &gpu))
        .collect::<Result<Vec<_>>>()?;
    println!(
        "| optimizer step | {} tensors, {:.1}M parameters | ms per step |",
        shapes.len(),
        elements as f64 / 1e6
    );
    for dtype in [DType::F32, DType::BF16] {
        let vars = shapes
            .iter()
            .map(|&shape| {
                Var::from_tensor(&Tensor::randn(0f32, 0.02, shape, &gpu)?.to_dtype(dtype)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut fused = MultiTensorAdamW::new(vars.iter().map(|v| (v.clone(), true)).collect())?;
        let mut t = 0;
        let fused_seconds = seconds_per_call(&gpu, || {
            t += 1;
            fused.step(
                &grads,
                &AdamWStep { step: t, ..step },
                GradScale::Factor(0.5),
            )
        })?;
        let mut masters = vars
            .iter()
            .map(|v| {
                (dtype != DType::F32)
                    .then(|| v.as_tensor().to_dtype(DType::F32))
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        let mut moments = vars
            .iter()
            .map(|v| {
                let zeros = Tensor::zeros(v.shape(), DType::F32, &gpu)?;
                Ok((zeros.clone(), zeros))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut t = 0;
        let composed_seconds = seconds_per_call(&gpu, || {
            t += 1;
            composed_adamw_step(
                &vars,
                &mut masters,
                &mut moments,
                &grads,
                &AdamWStep { step: t, ..step },
            )
        })?;
        // Read: grad, weight or master, m, v; written: m, v, master and/or weight.
        let bytes_per_element = if dtype == DType::F32 { 28.0 } else { 30.0 };
        let gb_per_s = elements as f64 * bytes_per_element / fused_seconds / 1e9;
        println!(
            "| AdamW {dtype:?} weights | fused {:.3} ms ({gb_per_s:.0} GB/s, {:.0} % of copy) | per-parameter candle ops {:.3} ms | {:.1}x |",
            fused_seconds * 1e3,
            100.0 * gb_per_s / COPY_GB_PER_S,
            composed_seconds * 1e3,
            composed_seconds / fused_seconds
        );
    }
    let offsets: Vec<usize> = shapes
        .iter()
        .scan(0, |total, (a, b)| {
            let offset = *total;
            *total += a * b;
            Some(offset)
        })
        .collect();
    let flat = Tensor::zeros(elements, DType::F32, &gpu)?;
    let bf16_grads = grads
        .iter()
        .map(|g| g.to_dtype(DType::BF16))
        .collect::<Result<Vec<_>>>()?;
    let flat_seconds = seconds_per_call(&gpu, || {
        oxtune_tensor::optim::accumulate_into(&flat, &offsets, &bf16_grads, false)
    })?;
    let mut sums = grads.clone();
    let per_parameter_seconds = seconds_per_call(&gpu, || {
        for (sum, grad) in sums.iter_mut().zip(&bf16_grads) {
            *sum = (&*sum + grad.to_dtype(DType::F32)?)?;
        }
        Ok(())
    })?;
    println!(
        "| accumulate a bf16 micro-batch | flat buffer {:.3} ms | convert + add per parameter {:.3} ms | {:.1}x |",
        flat_seconds * 1e3,
        per_parameter_seconds * 1e3,
        per_parameter_seconds / flat_seconds
    );
    let mut per_gradient_sum = 0f64;
    for grad in &grads {
        per_gradient_sum += f64::from(grad.sqr()?.sum_all()?.to_scalar::<f32>()?);
    }
    let one_sync_sum: f64 = sum_of_squares(&grads, &gpu)?.to_scalar()?;
    assert!(
        ((one_sync_sum - per_gradient_sum) / per_gradient_sum).abs() < 1e-5,
        "clip sum of squares: multi-tensor {one_sync_sum} vs per gradient {per_gradient_sum}"
    );
    let one_sync = seconds_per_call(&gpu, || {
        let _: f64 = sum_of_squares(&grads, &gpu)?.to_scalar()?;
        Ok(())
    })?;
    let per_gradient = seconds_per_call(&gpu, || {
        let mut squares = 0f64;
        for grad in &grads {
            squares += f64::from(grad.sqr()?.sum_all()?.to_scalar::<f32>()?);
        }
        assert!(squares.is_finite());
        Ok(())
    })?;
    println!(
        "| clip norm | one sync {:.3} ms | a sync per gradient {:.3} ms | {:.1}x |",
        one_sync * 1e3,
        per_gradient * 1e3,
        per_gradient / one_sync
    );
    Ok(())
}

/// Gradient accumulation into the flat f32 buffer on the GPU equals the CPU's candle adds
/// bit for bit: f32, bf16 and f16 sources of odd lengths and 130 small f32 ones (two launches
/// of one dtype), assigned on the first of three rounds.
#[test]
fn accumulate_into_matches_the_cpu() -> Result<()> {
    let gpu = oxtune_tensor::parse_device("cuda")?;
    let mut specs = vec![
        (1usize, DType::F32),
        (4097, DType::BF16),
        ((1 << 20) + 3, DType::F16),
        (7, DType::BF16),
    ];
    specs.extend((0..130).map(|i| (1 + (i * 41) % 500, DType::F32)));
    let mut offsets = Vec::new();
    let mut total = 0;
    for (len, _) in &specs {
        offsets.push(total);
        total += len;
    }
    let gpu_flat = Tensor::zeros(total, DType::F32, &gpu)?;
    let cpu_flat = Tensor::zeros(total, DType::F32, &Device::Cpu)?;
    for round in 0..3 {
        let sources = specs
            .iter()
            .map(|&(len, dtype)| Tensor::randn(0f32, 1.0, len, &Device::Cpu)?.to_dtype(dtype))
            .collect::<Result<Vec<_>>>()?;
        let gpu_sources = sources
            .iter()
            .map(|t| t.to_device(&gpu))
            .collect::<Result<Vec<_>>>()?;
        oxtune_tensor::optim::accumulate_into(&gpu_flat, &offsets, &gpu_sources, round == 0)?;
        oxtune_tensor::optim::accumulate_into(&cpu_flat, &offsets, &sources, round == 0)?;
        let got = host_f32(&gpu_flat)?;
        let expected = host_f32(&cpu_flat)?;
        if let Some(at) = (0..total).find(|&j| got[j].to_bits() != expected[j].to_bits()) {
            let index = offsets.iter().rposition(|&o| o <= at).unwrap_or(0);
            panic!(
                "accumulate round {round}: element {at} (gradient {index}, {:?} of {}) gpu {} cpu {}",
                specs[index].1, specs[index].0, got[at], expected[at]
            );
        }
        println!("accumulate round {round}: {total} elements equal to the CPU's bits");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// paged attention

/// Sequences of a paged attention test: per sequence, its context length and how many query
/// rows it has (its last ones: 1 for a decode row, more for a prefill chunk whose rows share
/// the sequence's slot table).
struct PagedCase {
    sequences: Vec<(usize, usize)>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

/// Slot tables scrambled over a pool of `pool_slots` (consecutive positions land far apart,
/// and sequences overlap in the pool), one per sequence.
fn paged_tables(sequences: &[(usize, usize)], pool_slots: usize) -> Vec<Vec<u32>> {
    sequences
        .iter()
        .enumerate()
        .map(|(s, &(len, _))| {
            (0..len)
                .map(|p| u32::try_from((s * 1013 + p * 7919) % pool_slots).unwrap_or(0))
                .collect()
        })
        .collect()
}

fn paged_context(
    tables: &[Vec<u32>],
    sequences: &[(usize, usize)],
    window: Option<usize>,
    device: &Device,
) -> Result<ops::PagedContext> {
    ops::PagedContext::from_sequences(
        tables
            .iter()
            .zip(sequences)
            .map(|(table, &(len, rows))| (table.as_slice(), len - rows..len)),
        window,
        device,
    )
}

/// Runs the kernel in `dtype` and the reference on the CPU in f64 from the same rounded
/// inputs and compares them; `max_context` overrides the launch hint (None: the true one).
fn check_paged(
    case: &PagedCase,
    dtype: DType,
    window: Option<usize>,
    max_context: Option<usize>,
) -> Result<()> {
    let gpu = oxtune_tensor::parse_device("cuda")?;
    let PagedCase {
        sequences,
        heads,
        kv_heads,
        head_dim,
    } = case;
    let (h, kv_h, d) = (*heads, *kv_heads, *head_dim);
    let n: usize = sequences.iter().map(|&(_, rows)| rows).sum();
    let pool_slots = 5003;
    let tables = paged_tables(sequences, pool_slots);
    let rounded = |t: Tensor| t.to_dtype(dtype)?.to_dtype(DType::F64);
    let q = rounded(randn(&[n, h, d], 1.5)?)?;
    let k_pool = rounded(randn(&[pool_slots, kv_h * d], 1.0)?)?;
    let v_pool = rounded(randn(&[pool_slots, kv_h * d], 1.0)?)?;
    #[expect(clippy::cast_precision_loss, reason = "small head sizes")]
    let scale = 1.0 / (d as f64).sqrt();
    let mut gpu_context = paged_context(&tables, sequences, window, &gpu)?;
    if let Some(hint) = max_context {
        gpu_context.max_context = hint;
    }
    let on_gpu = |t: &Tensor| t.to_dtype(dtype)?.to_device(&gpu);
    let got = ops::paged_attention(
        &on_gpu(&q)?,
        &on_gpu(&k_pool)?,
        &on_gpu(&v_pool)?,
        &gpu_context,
        scale,
    )?;
    assert_eq!(got.dtype(), dtype, "paged_attention: output dtype");
    let cpu_context = paged_context(&tables, sequences, window, &Device::Cpu)?;
    let expected = ops::paged_attention_reference(&q, &k_pool, &v_pool, &cpu_context, scale)?;
    let contexts: Vec<usize> = sequences.iter().map(|&(len, _)| len).collect();
    let label = format!(
        "paged_attention q ({n}, {h}, {d}), kv_h {kv_h}, contexts {contexts:?}, query rows \
         {:?}, window {window:?}, max_context hint {:?} (error rows are query row * {h} + head)",
        sequences.iter().map(|&(_, rows)| rows).collect::<Vec<_>>(),
        gpu_context.max_context
    );
    // The output averages values of magnitude ~1 with weights summing to 1; over long
    // contexts the average itself cancels towards 0, so errors are measured against 0.5 at
    // least (the scale of the terms summed), not against the small average.
    compare_rows(&label, "forward", dtype, &expected, &got, 0.5)
}

#[test]
fn paged_attention_kernel_matches_the_reference() -> Result<()> {
    let lengths = [1, 7, 16, 100, 1000, 4097];
    // n = 1: a long decode row; n = 5: ragged decode rows; n = 32: every length as a decode
    // row plus a prefill chunk of 26 rows sharing one table (positions 74..100)
    let layouts: [Vec<(usize, usize)>; 3] = [
        vec![(4097, 1)],
        lengths[..5].iter().map(|&len| (len, 1)).collect(),
        lengths
            .iter()
            .map(|&len| (len, 1))
            .chain([(100, 26)])
            .collect(),
    ];
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for head_dim in [64, 128] {
            for per_kv in [1, 2, 4] {
                for sequences in &layouts {
                    let case = PagedCase {
                        sequences: sequences.clone(),
                        heads: 2 * per_kv,
                        kv_heads: 2,
                        head_dim,
                    };
                    check_paged(&case, dtype, None, None)?;
                }
            }
        }
    }
    Ok(())
}

#[test]
fn paged_attention_kernel_handles_windows_odd_shapes_and_wrong_hints() -> Result<()> {
    let mixed = vec![(1, 1), (7, 1), (100, 1), (1000, 1), (4097, 1), (300, 20)];
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        // sliding windows (Mistral): shorter and longer than some contexts
        for window in [1, 64, 2048] {
            let case = PagedCase {
                sequences: mixed.clone(),
                heads: 8,
                kv_heads: 2,
                head_dim: 128,
            };
            check_paged(&case, dtype, Some(window), None)?;
        }
        // a hint far below the real contexts: one block loops over all partitions of a row;
        // a hint of half: several partitions per split, then the reduce
        for hint in [1, 2048] {
            let case = PagedCase {
                sequences: mixed.clone(),
                heads: 4,
                kv_heads: 4,
                head_dim: 64,
            };
            check_paged(&case, dtype, None, Some(hint))?;
        }
        // head sizes off the 16-byte vector (36 in bf16/f16, 7 everywhere), small ones (16,
        // the fixtures'), the largest (256); 6 and 16 query heads per kv head (blocks of 8
        // with idle heads, two head groups) and MQA
        for (heads, kv_heads, head_dim) in [
            (12, 2, 36),
            (3, 1, 7),
            (4, 2, 16),
            (32, 2, 256),
            (16, 1, 80),
            (24, 3, 128),
        ] {
            let case = PagedCase {
                sequences: vec![(1, 1), (33, 1), (1000, 1), (50, 9)],
                heads,
                kv_heads,
                head_dim,
            };
            check_paged(&case, dtype, None, None)?;
        }
    }
    Ok(())
}

#[test]
fn paged_attention_kernel_turns_bad_slots_into_nan() -> Result<()> {
    let gpu = oxtune_tensor::parse_device("cuda")?;
    let (h, kv_h, d, pool_slots) = (4, 2, 64, 16);
    // 2000 table entries, all inside the pool but entry 2 (slot 16 of a pool of 16)
    let slots: Vec<u32> = (0..2000u32)
        .map(|i| if i == 2 { 16 } else { i * 7 % 16 })
        .collect();
    // (offset, length): fine; a bad slot; a long table running past `slots` (whole split
    // partitions of bad entries); a short one running past; a long fine one
    let rows = [[0u32, 2], [1, 3], [0, 3000], [1990, 15], [3, 1500]];
    let expect_nan = [false, true, true, true, false];
    for dtype in [DType::F32, DType::BF16] {
        let q = Tensor::randn(0f32, 1.0, (rows.len(), h, d), &gpu)?.to_dtype(dtype)?;
        let pool = Tensor::randn(0f32, 1.0, (pool_slots, kv_h * d), &gpu)?.to_dtype(dtype)?;
        // the true longest context (splits and the reduce), then a hint of 1 (one block per
        // row loops over every partition)
        for max_context in [3000, 1] {
            let context = ops::PagedContext {
                slots: Tensor::new(slots.as_slice(), &gpu)?,
                rows: Tensor::new(&rows, &gpu)?,
                max_context,
                sliding_window: None,
            };
            let out: Vec<Vec<Vec<f32>>> = ops::paged_attention(&q, &pool, &pool, &context, 0.125)?
                .to_device(&Device::Cpu)?
                .to_dtype(DType::F32)?
                .to_vec3()?;
            for (row, nan) in expect_nan.iter().enumerate() {
                let values: Vec<f32> = out[row].iter().flatten().copied().collect();
                let ok = if *nan {
                    values.iter().all(|v| v.is_nan())
                } else {
                    values.iter().all(|v| v.is_finite())
                };
                assert!(
                    ok,
                    "paged_attention {dtype:?}, max_context hint {max_context}: row {row} \
                     (offset, length) {:?} should be {} (a slot outside the pool or a table \
                     past `slots` makes its row NaN, and only its row)",
                    rows[row],
                    if *nan { "all NaN" } else { "finite" }
                );
            }
        }
    }
    Ok(())
}

/// The serving path the kernel replaces (`Attention::forward_paged` per decode group): gather
/// every sequence's padded context, repeat the kv heads, f32 scores, additive mask, softmax,
/// cast, matmul. q (b, h, d) -> (b, h, d).
fn paged_gather_path(
    q: &Tensor,
    k_pool: &Tensor,
    v_pool: &Tensor,
    slots: &Tensor, // (b * l,)
    mask: &Tensor,  // (b, 1, 1, l) f32
    kv_heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let (b, h, d) = q.dims3()?;
    let l = slots.dim(0)? / b;
    let per_head = |pool: &Tensor| -> Result<Tensor> {
        let gathered = pool
            .index_select(slots, 0)?
            .reshape((b, l, kv_heads, d))?
            .transpose(1, 2)?;
        ops::repeat_kv(&gathered, h / kv_heads)?.contiguous()
    };
    let (keys, values) = (per_head(k_pool)?, per_head(v_pool)?);
    let q = q.unsqueeze(2)?; // (b, h, 1, d)
    let scores = q
        .to_dtype(DType::F32)?
        .matmul(&keys.to_dtype(DType::F32)?.t()?)?;
    let probs = ops::scaled_masked_softmax(&scores, scale, ScoreMask::Additive(mask))?
        .to_dtype(values.dtype())?;
    probs.matmul(&values)?.squeeze(2)
}

#[test]
fn paged_attention_speed_against_the_gather_path() -> Result<()> {
    let gpu = oxtune_tensor::parse_device("cuda")?;
    let dtype = DType::BF16;
    let d = 128;
    let scale = 1.0 / (d as f64).sqrt();
    println!(
        "| paged attention, bf16, d 128 | context K/V bytes | kernel | gather path (index_select, \
         repeat_kv, f32 scores, mask, softmax, matmul) |"
    );
    println!("| --- | --- | --- | --- |");
    // (label, heads, kv heads, sequences: (context, query rows))
    let cases = [
        ("Qwen3-8B decode, batch 1, ctx 512", 32, 8, vec![(512, 1)]),
        ("Qwen3-8B decode, batch 1, ctx 2048", 32, 8, vec![(2048, 1)]),
        ("Qwen3-8B decode, batch 1, ctx 8192", 32, 8, vec![(8192, 1)]),
        (
            "Qwen3-8B decode, batch 32, ctx 1024",
            32,
            8,
            vec![(1024, 1); 32],
        ),
        (
            "Qwen3-0.6B decode, batch 1, ctx 2048",
            16,
            8,
            vec![(2048, 1)],
        ),
        (
            "Qwen3-0.6B decode, batch 64, ctx 512",
            16,
            8,
            vec![(512, 1); 64],
        ),
        (
            "Qwen3-8B prefill chunk of 512 rows at ctx 2048 (no gather-path timing)",
            32,
            8,
            vec![(2048, 512)],
        ),
    ];
    for (label, h, kv_h, sequences) in cases {
        let total: usize = sequences.iter().map(|&(len, _)| len).sum();
        let n: usize = sequences.iter().map(|&(_, rows)| rows).sum();
        let pool_slots = total + 7;
        let tables = paged_tables(&sequences, pool_slots);
        let context = paged_context(&tables, &sequences, None, &gpu)?;
        let q = Tensor::randn(0f32, 1.0, (n, h, d), &gpu)?.to_dtype(dtype)?;
        let k_pool = Tensor::randn(0f32, 1.0, (pool_slots, kv_h * d), &gpu)?.to_dtype(dtype)?;
        let v_pool = Tensor::randn(0f32, 1.0, (pool_slots, kv_h * d), &gpu)?.to_dtype(dtype)?;
        let bytes = (2 * total * kv_h * d * dtype.size_in_bytes()) as f64;
        let kernel = seconds_per_call(&gpu, || {
            ops::paged_attention(&q, &k_pool, &v_pool, &context, scale).map(drop)
        })?;
        let gather = if sequences.iter().all(|&(_, rows)| rows == 1) {
            let b = sequences.len();
            let l = sequences[0].0;
            let slots = Tensor::new(tables.concat().as_slice(), &gpu)?;
            let mask = Tensor::zeros((b, 1, 1, l), DType::F32, &gpu)?;
            // same numbers as the kernel, before timing it
            let reference = paged_gather_path(&q, &k_pool, &v_pool, &slots, &mask, kv_h, scale)?;
            let got = ops::paged_attention(&q, &k_pool, &v_pool, &context, scale)?;
            compare_rows(label, "forward", dtype, &reference, &got, 0.5)?;
            let seconds = seconds_per_call(&gpu, || {
                paged_gather_path(&q, &k_pool, &v_pool, &slots, &mask, kv_h, scale).map(drop)
            })?;
            format!("{:.1} µs, {:.0} GB/s", seconds * 1e6, bytes / seconds / 1e9)
        } else {
            "-".to_owned()
        };
        println!(
            "| {label} | {:.1} MB | {:.1} µs, {:.0} GB/s ({:.0} % of copy) | {gather} |",
            bytes / 1e6,
            kernel * 1e6,
            bytes / kernel / 1e9,
            100.0 * bytes / kernel / 1e9 / COPY_GB_PER_S
        );
    }
    Ok(())
}

/// Every caller asking for a GPU gets the same device, hence the same stream: tensors made
/// by different parts of a program (a model, its data) can meet without racing.
#[test]
fn one_device_per_gpu() -> Result<()> {
    let first = oxtune_tensor::parse_device("cuda")?;
    let second = oxtune_tensor::parse_device("cuda:0")?;
    assert!(
        first.same_device(&second),
        "{first:?} and {second:?} differ"
    );
    Ok(())
}

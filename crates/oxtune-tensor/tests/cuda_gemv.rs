//! The decode-step linear layers (`ops::linear_rows`, `ops::swiglu_linear_rows`,
//! `kernels/gemv.cu`) on the GPU against an f64 CPU reference from the same dtype-rounded
//! inputs, then a timing print against candle's matmul at Qwen3 shapes. Built and run only
//! with `--features cuda` on a machine with a GPU:
//!
//!   .gpu/cuda-gemv --test-threads 1 --nocapture
#![cfg(feature = "cuda")]
#![allow(
    clippy::print_stdout,
    reason = "the tests print errors and timings for kernels/README.md"
)]

mod common;

use common::seconds_per_call;
use oxtune_tensor::cuda::{GEMV_MAX_ROWS, gemv_pays, linear_rows, swiglu_linear_rows};
use oxtune_tensor::{DType, Device, Result, Tensor, ops};

fn gpu() -> Result<Device> {
    oxtune_tensor::parse_device("cuda")
}

/// A (shape) tensor of N(0, std) values rounded to `dtype`, on the CPU and the GPU.
fn pair(shape: &[usize], std: f32, dtype: DType, gpu: &Device) -> Result<(Tensor, Tensor)> {
    let cpu = Tensor::randn(0f32, std, shape, &Device::Cpu)?.to_dtype(dtype)?;
    Ok((cpu.to_dtype(DType::F64)?, cpu.to_device(gpu)?))
}

/// The largest |got - expected| relative to the largest |expected|, and that bound per dtype:
/// one rounding of the output (f32 accumulation of k products differs from f64 by far less).
fn check(label: &str, expected: &Tensor, got: &Tensor, dtype: DType) -> Result<()> {
    let got = got.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let scale: f64 = expected.abs()?.flatten_all()?.max(0)?.to_scalar()?;
    let diff: f64 = (expected - &got)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar()?;
    let bound = match dtype {
        DType::F32 => 1e-5,
        DType::F16 => 2.0 / 1024.0,
        _ => 2.0 / 128.0,
    };
    println!(
        "{label}: max error {:.2e} of the output scale {scale:.2e}",
        diff / scale
    );
    assert!(
        diff <= bound * scale,
        "{label}: {diff:e} > {bound:e} x {scale:e}"
    );
    Ok(())
}

#[test]
fn linear_rows_matches_the_f64_reference() -> Result<()> {
    let gpu = gpu()?;
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        for rows in 1..=GEMV_MAX_ROWS {
            for (k, widths, with_bias) in [
                (8, vec![1], false),
                (64, vec![96, 32, 32], true),
                (1024, vec![2048, 1024, 1024], false),
                (4096, vec![77, 13, 5, 1000], true),
            ] {
                let (x_cpu, x) = pair(&[1, rows, k], 1.0, dtype, &gpu)?;
                // The weights are row blocks of one tensor (views with offsets), as a fused
                // q|k|v weight would be.
                let total: usize = widths.iter().sum();
                let (w_cpu, w) = pair(&[total, k], 0.05, dtype, &gpu)?;
                let mut views = Vec::new();
                let mut views_cpu = Vec::new();
                let mut biases = Vec::new();
                let mut start = 0;
                for (index, &n) in widths.iter().enumerate() {
                    views.push(w.narrow(0, start, n)?);
                    views_cpu.push(w_cpu.narrow(0, start, n)?);
                    biases.push(if with_bias && index % 2 == 0 {
                        Some(pair(&[n], 0.5, dtype, &gpu)?)
                    } else {
                        None
                    });
                    start += n;
                }
                // Views of one storage are refused by the kernel (one lock per storage), so
                // the kernel call takes copies; the ops function must fall back on the views.
                let owned: Vec<Tensor> = views.iter().map(Tensor::copy).collect::<Result<_>>()?;
                let weights: Vec<&Tensor> = owned.iter().collect();
                let bias_gpu: Vec<Option<&Tensor>> =
                    biases.iter().map(|b| b.as_ref().map(|(_, g)| g)).collect();
                let got = linear_rows(&x, &weights, &bias_gpu)?;
                let expected = views_cpu
                    .iter()
                    .zip(&biases)
                    .map(|(w, b)| {
                        let out = x_cpu.broadcast_matmul(&w.t()?)?;
                        match b {
                            Some((b, _)) => out.broadcast_add(b),
                            None => Ok(out),
                        }
                    })
                    .collect::<Result<Vec<_>>>()?;
                let expected = Tensor::cat(&expected, 2)?;
                let label = format!("linear_rows {dtype:?} rows {rows} k {k} n {widths:?}");
                check(&label, &expected, &got, dtype)?;
                let view_refs: Vec<&Tensor> = views.iter().collect();
                let fallback = ops::linear_rows(&x, &view_refs, &bias_gpu)?;
                check(&format!("{label} (views)"), &expected, &fallback, dtype)?;
                // ops::linear_rows takes the kernel where the measured policy says it pays,
                // and candle's matmul elsewhere.
                let through_ops = ops::linear_rows(&x, &weights, &bias_gpu)?;
                let bytes = total * k * dtype.size_in_bytes();
                if gemv_pays(rows, k, widths.len(), bytes, false) {
                    let same: f64 = (through_ops.to_dtype(DType::F64)?
                        - got.to_dtype(DType::F64)?)?
                    .abs()?
                    .flatten_all()?
                    .max(0)?
                    .to_scalar()?;
                    assert_eq!(same, 0.0, "{label}: ops::linear_rows takes the kernel");
                } else {
                    check(&format!("{label} (matmul)"), &expected, &through_ops, dtype)?;
                }
            }
        }
    }
    Ok(())
}

#[test]
fn swiglu_linear_rows_matches_the_f64_reference() -> Result<()> {
    let gpu = gpu()?;
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        for rows in [1, 3, GEMV_MAX_ROWS] {
            for (k, n) in [(16, 24), (1024, 3072), (4096, 1000)] {
                let (x_cpu, x) = pair(&[rows, k], 1.0, dtype, &gpu)?;
                let (gate_cpu, gate) = pair(&[n, k], 0.05, dtype, &gpu)?;
                let (up_cpu, up) = pair(&[n, k], 0.05, dtype, &gpu)?;
                // The composition's roundings: both projections to the dtype, then SwiGLU.
                let round = |t: Tensor| t.to_dtype(dtype)?.to_dtype(DType::F64);
                let g = round(x_cpu.matmul(&gate_cpu.t()?)?)?;
                let u = round(x_cpu.matmul(&up_cpu.t()?)?)?;
                let sigmoid = (g.neg()?.exp()? + 1.0)?.recip()?;
                let expected = ((&g * sigmoid)? * u)?;
                let got = swiglu_linear_rows(&x, &gate, &up)?;
                check(
                    &format!("swiglu_linear_rows {dtype:?} rows {rows} k {k} n {n}"),
                    &expected,
                    &got,
                    dtype,
                )?;
            }
        }
    }
    Ok(())
}

#[test]
fn more_rows_unaligned_rows_or_gradients_take_candles_matmul() -> Result<()> {
    let gpu = gpu()?;
    let x = Tensor::randn(0f32, 1.0, (GEMV_MAX_ROWS + 1, 64), &gpu)?.to_dtype(DType::BF16)?;
    let w = Tensor::randn(0f32, 0.1, (32, 64), &gpu)?.to_dtype(DType::BF16)?;
    assert!(linear_rows(&x, &[&w], &[None]).is_err());
    let out = ops::linear_rows(&x, &[&w], &[None])?;
    assert_eq!(out.dims(), [GEMV_MAX_ROWS + 1, 32]);
    // A one-row x starting 3 elements into its storage is contiguous but not 16-byte
    // aligned: the kernel refuses it and the ops function takes the matmul.
    let wide = Tensor::randn(0f32, 1.0, (1, 67), &gpu)?.to_dtype(DType::BF16)?;
    let unaligned = wide.narrow(1, 3, 64)?;
    assert!(linear_rows(&unaligned, &[&w], &[None]).is_err());
    let out = ops::linear_rows(&unaligned, &[&w], &[None])?;
    let expected = unaligned.matmul(&w.t()?)?;
    let diff: f32 = (out.to_dtype(DType::F32)? - expected.to_dtype(DType::F32)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar()?;
    assert!(diff < 1e-2, "unaligned x: {diff}");
    let var = oxtune_tensor::Var::from_tensor(&w)?;
    let one = x.narrow(0, 0, 1)?;
    assert!(linear_rows(&one, &[var.as_tensor()], &[None]).is_err());
    Ok(())
}

#[test]
fn gemv_speed_against_candles_matmul() -> Result<()> {
    let gpu = gpu()?;
    let dtype = DType::BF16;
    // (label, k, output widths, swiglu)
    let shapes: [(&str, usize, &[usize], bool); 9] = [
        ("0.6B q|k|v", 1024, &[2048, 1024, 1024], false),
        ("0.6B o", 2048, &[1024], false),
        ("0.6B gate+up swiglu", 1024, &[3072], true),
        ("0.6B down", 3072, &[1024], false),
        ("8B q|k|v", 4096, &[4096, 1024, 1024], false),
        ("8B o", 4096, &[4096], false),
        ("8B gate+up swiglu", 4096, &[12288], true),
        ("8B down", 12288, &[4096], false),
        ("8B lm_head", 4096, &[151_936], false),
    ];
    println!("| shape | rows | kernel µs | GB/s | candle matmul µs | GB/s |");
    println!("|---|---|---|---|---|---|");
    for (label, k, widths, swiglu) in shapes {
        let weights: Vec<Tensor> = if swiglu {
            (0..2)
                .map(|_| Tensor::randn(0f32, 0.05, (widths[0], k), &gpu)?.to_dtype(dtype))
                .collect::<Result<_>>()?
        } else {
            widths
                .iter()
                .map(|&n| Tensor::randn(0f32, 0.05, (n, k), &gpu)?.to_dtype(dtype))
                .collect::<Result<_>>()?
        };
        let refs: Vec<&Tensor> = weights.iter().collect();
        let bytes: usize = weights.iter().map(|w| w.elem_count() * 2).sum();
        for rows in [1, 2, 4, 8] {
            let x = Tensor::randn(0f32, 1.0, (1, rows, k), &gpu)?.to_dtype(dtype)?;
            let kernel = seconds_per_call(&gpu, || {
                if swiglu {
                    swiglu_linear_rows(&x, refs[0], refs[1])?;
                } else {
                    linear_rows(&x, &refs, &vec![None; refs.len()])?;
                }
                Ok(())
            })?;
            let matmul = seconds_per_call(&gpu, || {
                for w in &refs {
                    x.broadcast_matmul(&w.t()?)?;
                }
                Ok(())
            })?;
            #[expect(clippy::cast_precision_loss, reason = "byte counts for a print")]
            let gb = bytes as f64 / 1e9;
            println!(
                "| {label} | {rows} | {:.1} | {:.0} | {:.1} | {:.0} |",
                kernel * 1e6,
                gb / kernel,
                matmul * 1e6,
                gb / matmul
            );
        }
    }
    Ok(())
}

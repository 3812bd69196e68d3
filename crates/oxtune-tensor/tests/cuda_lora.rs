//! The fused LoRA linear op (`ops::lora_linear`, `src/cuda/lora.rs`) on the GPU against
//! `ops::lora_linear_reference` in f64 on the CPU from the same dtype-rounded inputs, output
//! and gradients, then a timing print against the composed path at Qwen3 training shapes; and
//! the products of `src/cuda/blas.rs`: the in-place accumulation (`ops::add_transposed_product`)
//! and the linear layer of a trainable weight (`ops::linear`).
//! Built and run only with `--features cuda` on a machine with a GPU:
//!
//!   .gpu/cuda-lora --test-threads 1 --nocapture
#![cfg(feature = "cuda")]
#![allow(
    clippy::print_stdout,
    reason = "the tests print errors and timings for kernels/README.md"
)]

mod common;

use common::seconds_per_call;
use oxtune_tensor::cuda::{
    accumulate_transposed_product, lora_linear_projected_takes, lora_linear_takes,
};
use oxtune_tensor::{DType, Device, Result, Tensor, Var, ops};

fn gpu() -> Result<Device> {
    oxtune_tensor::parse_device("cuda")
}

/// A (shape) tensor of N(0, std) values rounded to `dtype`: in f64 on the CPU, and on the GPU.
fn pair(shape: &[usize], std: f32, dtype: DType, gpu: &Device) -> Result<(Tensor, Tensor)> {
    let cpu = Tensor::randn(0f32, std, shape, &Device::Cpu)?.to_dtype(dtype)?;
    Ok((cpu.to_dtype(DType::F64)?, cpu.to_device(gpu)?))
}

/// The largest |got - expected| relative to the largest |expected|, within a few roundings
/// of `dtype` (the products accumulate in f32; the op rounds x A^T and dy B to the dtype as
/// the composed path does).
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
        DType::F16 => 4.0 / 1024.0,
        _ => 4.0 / 128.0,
    };
    println!(
        "{label}: max error {:.2e} of the scale {scale:.2e}",
        diff / scale
    );
    assert!(
        diff <= bound * scale,
        "{label}: {diff:e} > {bound:e} x {scale:e}"
    );
    Ok(())
}

/// (y, dx, dA, dB) of sum(y * g) through `lora` on these inputs (dx `None` when x is a
/// constant).
fn run(
    lora: impl Fn(&Tensor, &[&Tensor], &Tensor, &Tensor) -> Result<Tensor>,
    x: &Tensor,
    weights: &[Tensor],
    a: &Tensor,
    b: &Tensor,
    g: &Tensor,
    x_tracks: bool,
) -> Result<(Tensor, Option<Tensor>, Tensor, Tensor)> {
    let x_var = Var::from_tensor(x)?;
    let x = if x_tracks {
        x_var.as_tensor().clone()
    } else {
        x.clone()
    };
    let (a, b) = (Var::from_tensor(a)?, Var::from_tensor(b)?);
    let weights: Vec<&Tensor> = weights.iter().collect();
    let y = lora(&x, &weights, a.as_tensor(), b.as_tensor())?;
    let loss = (y.to_dtype(g.dtype())? * g)?.sum_all()?;
    let grads = loss.backward()?;
    let grad = |t: &Tensor| {
        grads
            .get(t)
            .cloned()
            .ok_or_else(|| oxtune_tensor::candle::Error::Msg("no gradient".into()))
    };
    let dx = if x_tracks { Some(grad(&x)?) } else { None };
    Ok((y, dx, grad(a.as_tensor())?, grad(b.as_tensor())?))
}

#[test]
fn lora_linear_matches_the_f64_reference() -> Result<()> {
    let gpu = gpu()?;
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        for (batch, t, k, widths, rank, x_tracks) in [
            (1, 5, 8, vec![3], 1, true),
            (2, 33, 64, vec![96, 32, 32], 8, true),
            (2, 64, 256, vec![384, 384], 16, false),
            (1, 100, 1024, vec![2048, 1024, 1024], 64, true),
            (3, 7, 72, vec![40], 4, true),
        ] {
            let label =
                format!("lora_linear {dtype:?} x ({batch}, {t}, {k}) widths {widths:?} r {rank}");
            let parts = widths.len();
            let total: usize = widths.iter().sum();
            #[expect(clippy::cast_precision_loss, reason = "small dims")]
            let (w_std, b_std) = (1.0 / (k as f32).sqrt(), 1.0 / (rank as f32).sqrt());
            let (x_cpu, x) = pair(&[batch, t, k], 1.0, dtype, &gpu)?;
            let (a_cpu, a) = pair(&[parts * rank, k], w_std, dtype, &gpu)?;
            let (b_cpu, b) = pair(&[total, rank], b_std, dtype, &gpu)?;
            let (g_cpu, g) = pair(&[batch, t, total], 1.0, DType::F32, &gpu)?;
            let mut weights = Vec::new();
            let mut weights_cpu = Vec::new();
            for &n in &widths {
                let (w_cpu, w) = pair(&[n, k], w_std, dtype, &gpu)?;
                weights.push(w);
                weights_cpu.push(w_cpu);
            }
            let views: Vec<&Tensor> = weights.iter().collect();
            assert!(
                lora_linear_takes(&x, &views, &a, &b),
                "{label}: the fused op refuses the inputs"
            );
            let got = run(ops::lora_linear, &x, &weights, &a, &b, &g, x_tracks)?;
            let expected = run(
                ops::lora_linear_reference,
                &x_cpu,
                &weights_cpu,
                &a_cpu,
                &b_cpu,
                &g_cpu.to_dtype(DType::F64)?,
                x_tracks,
            )?;
            assert_eq!(got.0.dims(), &[batch, t, total], "{label}: output shape");
            check(&format!("{label} y"), &expected.0, &got.0, dtype)?;
            match (&expected.1, &got.1) {
                (Some(expected), Some(got)) => check(&format!("{label} dx"), expected, got, dtype)?,
                (None, None) => {}
                _ => panic!("{label}: dx present on one side only"),
            }
            check(&format!("{label} dA"), &expected.2, &got.2, dtype)?;
            check(&format!("{label} dB"), &expected.3, &got.3, dtype)?;
        }
    }
    Ok(())
}

/// Forward + backward of the fused op and of the composed path at Qwen3 training shapes
/// (bf16, rank 64): printed for kernels/README.md, asserted nowhere.
#[test]
fn lora_linear_speed_against_the_composed_path() -> Result<()> {
    let gpu = gpu()?;
    let dtype = DType::BF16;
    let rank = 64;
    for (label, rows, k, widths) in [
        ("0.6B q_proj, 4 x 2048", 8192, 1024, vec![2048]),
        ("0.6B gate|up, 4 x 2048", 8192, 1024, vec![3072, 3072]),
        ("0.6B down_proj, 4 x 2048", 8192, 3072, vec![1024]),
        ("8B gate|up, 1 x 2048", 2048, 4096, vec![12288, 12288]),
        ("8B down_proj, 1 x 2048", 2048, 12288, vec![4096]),
    ] {
        let total: usize = widths.iter().sum();
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, rows, k), &gpu)?.to_dtype(dtype)?)?;
        let a = Var::from_tensor(
            &Tensor::randn(0f32, 0.02, (widths.len() * rank, k), &gpu)?.to_dtype(dtype)?,
        )?;
        let b =
            Var::from_tensor(&Tensor::randn(0f32, 0.02, (total, rank), &gpu)?.to_dtype(dtype)?)?;
        let weights = widths
            .iter()
            .map(|&n| Tensor::randn(0f32, 0.02, (n, k), &gpu)?.to_dtype(dtype))
            .collect::<Result<Vec<_>>>()?;
        let views: Vec<&Tensor> = weights.iter().collect();
        let g = Tensor::randn(0f32, 1.0, (1, rows, total), &gpu)?.to_dtype(dtype)?;
        let step = |lora: fn(&Tensor, &[&Tensor], &Tensor, &Tensor) -> Result<Tensor>| {
            let y = lora(x.as_tensor(), &views, a.as_tensor(), b.as_tensor())?;
            (y * &g)?.sum_all()?.backward().map(drop)
        };
        let fused = seconds_per_call(&gpu, || step(ops::lora_linear))?;
        let composed = seconds_per_call(&gpu, || step(ops::lora_linear_reference))?;
        println!(
            "{label} (k {k}, widths {widths:?}, r {rank}): fused {:.3} ms, composed {:.3} ms \
             forward + backward",
            fused * 1e3,
            composed * 1e3
        );
    }
    Ok(())
}

#[test]
fn accumulated_products_match_the_f64_reference() -> Result<()> {
    let gpu = gpu()?;
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        for (k, m, n) in [(1, 1, 1), (819, 300, 64), (2048, 1000, 72), (37, 5, 3)] {
            let label = format!("acc += lhs^T rhs {dtype:?} k {k} m {m} n {n}");
            let (acc_cpu, acc) = pair(&[m, n], 1.0, DType::F32, &gpu)?;
            let mut expected = acc_cpu;
            let before = acc.clone();
            // two chunks of rows, as the LM head's gradient sums them
            for _ in 0..2 {
                let (lhs_cpu, lhs) = pair(&[k, m], 1.0, dtype, &gpu)?;
                let (rhs_cpu, rhs) = pair(&[k, n], 1.0, dtype, &gpu)?;
                accumulate_transposed_product(&acc, &lhs, &rhs)?;
                expected = (expected + lhs_cpu.t()?.matmul(&rhs_cpu)?)?;
            }
            // in place: the tensor handed in holds the sum
            check(&label, &expected, &before, DType::F32)?;
            let via_ops = ops::add_transposed_product(
                Tensor::zeros((m, n), DType::F32, &gpu)?,
                &Tensor::ones((k, m), dtype, &gpu)?,
                &Tensor::ones((k, n), dtype, &gpu)?,
            )?;
            #[expect(clippy::cast_precision_loss, reason = "small k")]
            let k_f32 = k as f32;
            let ones: f32 = (via_ops - f64::from(k_f32))?
                .abs()?
                .max_all()?
                .to_scalar()?;
            assert!(
                ones == 0.0,
                "{label}: ops::add_transposed_product of ones is off by {ones}"
            );
        }
    }
    Ok(())
}

#[test]
fn trainable_linear_matches_the_f64_reference() -> Result<()> {
    let gpu = gpu()?;
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        for (batch, t, k, n, with_bias) in [
            (1, 1, 8, 1, false),
            (4, 33, 64, 96, true),
            (2, 100, 1024, 384, false),
        ] {
            let label = format!("linear {dtype:?} x ({batch}, {t}, {k}) weight ({n}, {k})");
            #[expect(clippy::cast_precision_loss, reason = "small dims")]
            let w_std = 1.0 / (k as f32).sqrt();
            let (x_cpu, x) = pair(&[batch, t, k], 1.0, dtype, &gpu)?;
            let (w_cpu, w) = pair(&[n, k], w_std, dtype, &gpu)?;
            let (b_cpu, b) = pair(&[n], 1.0, dtype, &gpu)?;
            let (g_cpu, g) = pair(&[batch, t, n], 1.0, DType::F32, &gpu)?;
            let grads = |x: &Tensor, w: &Tensor, b: &Tensor, g: &Tensor| -> Result<Vec<Tensor>> {
                let (x, w) = (Var::from_tensor(x)?, Var::from_tensor(w)?);
                let y = ops::linear(x.as_tensor(), w.as_tensor(), with_bias.then_some(b))?;
                let grads = (y.to_dtype(g.dtype())? * g)?.sum_all()?.backward()?;
                let grad = |t: &Tensor| {
                    grads
                        .get(t)
                        .cloned()
                        .ok_or_else(|| oxtune_tensor::candle::Error::Msg("no gradient".into()))
                };
                Ok(vec![y.clone(), grad(x.as_tensor())?, grad(w.as_tensor())?])
            };
            let got = grads(&x, &w, &b, &g)?;
            let expected = grads(&x_cpu, &w_cpu, &b_cpu, &g_cpu.to_dtype(DType::F64)?)?;
            for (what, (expected, got)) in ["y", "dx", "dW"].iter().zip(expected.iter().zip(&got)) {
                assert_eq!(expected.dims(), got.dims(), "{label} {what}: shape");
                check(&format!("{label} {what}"), expected, got, dtype)?;
            }
        }
    }
    Ok(())
}

/// `ops::lora_linear_projected` (the update reads a given h = x' A^T, as with dropout): output
/// and the gradients of x, h and B against the f64 reference.
#[test]
fn lora_linear_projected_matches_the_f64_reference() -> Result<()> {
    let gpu = gpu()?;
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        for (batch, t, k, widths, rank, x_tracks) in [
            (1, 5, 8, vec![3], 1, true),
            (2, 33, 64, vec![96, 32, 32], 8, true),
            (2, 64, 256, vec![384, 384], 16, false),
            (1, 100, 1024, vec![2048, 1024, 1024], 64, true),
        ] {
            let label = format!(
                "lora_linear_projected {dtype:?} x ({batch}, {t}, {k}) widths {widths:?} r {rank}"
            );
            let parts = widths.len();
            let total: usize = widths.iter().sum();
            #[expect(clippy::cast_precision_loss, reason = "small dims")]
            let (w_std, b_std) = (1.0 / (k as f32).sqrt(), 1.0 / (rank as f32).sqrt());
            let (x_cpu, x) = pair(&[batch, t, k], 1.0, dtype, &gpu)?;
            let (h_cpu, h) = pair(&[batch, t, parts * rank], 1.0, dtype, &gpu)?;
            let (b_cpu, b) = pair(&[total, rank], b_std, dtype, &gpu)?;
            let (g_cpu, g) = pair(&[batch, t, total], 1.0, DType::F32, &gpu)?;
            let mut weights = Vec::new();
            let mut weights_cpu = Vec::new();
            for &n in &widths {
                let (w_cpu, w) = pair(&[n, k], w_std, dtype, &gpu)?;
                weights.push(w);
                weights_cpu.push(w_cpu);
            }
            let views: Vec<&Tensor> = weights.iter().collect();
            assert!(
                lora_linear_projected_takes(&x, &views, &h, &b),
                "{label}: the fused op refuses the inputs"
            );
            let got = run(
                ops::lora_linear_projected,
                &x,
                &weights,
                &h,
                &b,
                &g,
                x_tracks,
            )?;
            let expected = run(
                ops::lora_linear_projected_reference,
                &x_cpu,
                &weights_cpu,
                &h_cpu,
                &b_cpu,
                &g_cpu.to_dtype(DType::F64)?,
                x_tracks,
            )?;
            check(&format!("{label} y"), &expected.0, &got.0, dtype)?;
            match (&expected.1, &got.1) {
                (Some(expected), Some(got)) => check(&format!("{label} dx"), expected, got, dtype)?,
                (None, None) => {}
                _ => panic!("{label}: dx present on one side only"),
            }
            check(&format!("{label} dh"), &expected.2, &got.2, dtype)?;
            check(&format!("{label} dB"), &expected.3, &got.3, dtype)?;
        }
    }
    Ok(())
}

//! The embedding lookup (`ops::embedding`, `kernels/embedding.cu`) on the GPU: the forward
//! against the weight's rows, the weight's gradient through candle's autograd against an f64
//! CPU sum, two backward runs compared bit for bit, then a timing print against candle's
//! index_select path (whose backward is candle's one-block `index_add`). Built and run only
//! with `--features cuda` on a machine with a GPU:
//!
//!   .gpu/cuda-embedding --test-threads 1 --nocapture
#![cfg(feature = "cuda")]
#![allow(
    clippy::print_stdout,
    reason = "the tests print errors and timings for kernels/README.md"
)]

mod common;

use std::collections::BTreeMap;

use common::seconds_per_call;
use oxtune_tensor::{DType, Device, Result, Tensor, Var, ops};

fn gpu() -> Result<Device> {
    oxtune_tensor::parse_device("cuda")
}

/// Qwen3's vocabulary and hidden size, and a training step's 4 x 2048 ids.
const VOCAB: usize = 151_936;
const HIDDEN: usize = 1024;
const BATCH: (usize, usize) = (4, 2048);
/// A token repeated over an eighth of the batch, as padding would be.
const PAD: u32 = 151_643;

/// `n` ids below `vocab` from a fixed LCG, with 0 and vocab - 1 at the front (0 twice), and
/// every `pad_every`-th id set to `pad` when given.
fn ids(n: usize, vocab: usize, pad: Option<(u32, usize)>) -> Vec<u32> {
    let mut state = 0x2545_f491_u64;
    let vocab_u32 = u32::try_from(vocab).expect("test vocabularies fit a u32");
    (0..n)
        .map(|i| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let random = u32::try_from(state >> 33).expect("31 bits") % vocab_u32;
            match (i, pad) {
                (0 | 2, _) => 0,
                (1, _) => vocab_u32 - 1,
                (_, Some((pad, every))) if i % every == 0 => pad,
                _ => random,
            }
        })
        .collect()
}

/// The weight's gradient of `loss = sum(embedding(w, ids) * dy)` through candle's autograd:
/// exactly dy flows into the op's output (dy holds dtype-rounded values).
fn weight_gradient(weight: &Var, ids: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let rows = ops::embedding(weight.as_tensor(), ids)?;
    let loss = (rows.to_dtype(DType::F32)? * dy.to_dtype(DType::F32)?)?.sum_all()?;
    let grads = loss.backward()?;
    grads
        .get(weight.as_tensor())
        .cloned()
        .ok_or_else(|| oxtune_tensor::candle::Error::Msg("the weight got no gradient".into()))
}

/// Checks one case: forward rows bit for bit against the CPU's index_select, and the weight's
/// gradient against the f64 sum of dy's rows per id (rows of ids seen once bit for bit, every
/// other row of the gradient exactly zero).
fn check_case(
    label: &str,
    vocab: usize,
    hidden: usize,
    ids_shape: &[usize],
    flat_ids: &[u32],
    dtype: DType,
    gpu: &Device,
) -> Result<()> {
    let n = flat_ids.len();
    let weight_cpu = Tensor::randn(0f32, 1.0, (vocab, hidden), &Device::Cpu)?.to_dtype(dtype)?;
    let dy_cpu = Tensor::randn(0f32, 1.0, (n, hidden), &Device::Cpu)?.to_dtype(dtype)?;
    let ids_cpu = Tensor::from_vec(flat_ids.to_vec(), ids_shape, &Device::Cpu)?;
    let ids_gpu = ids_cpu.to_device(gpu)?;
    let weight = Var::from_tensor(&weight_cpu.to_device(gpu)?)?;

    // Forward: the weight's rows, bit for bit, in ids.shape + (hidden,).
    let rows = ops::embedding(weight.as_tensor(), &ids_gpu)?;
    let mut dims = ids_shape.to_vec();
    dims.push(hidden);
    assert_eq!(rows.dims(), dims.as_slice(), "{label}: forward shape");
    let expected = weight_cpu
        .index_select(&ids_cpu.flatten_all()?, 0)?
        .to_dtype(DType::F32)?;
    let got = rows.reshape((n, hidden))?.to_dtype(DType::F32)?;
    let got: Vec<f32> = got.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?;
    let expected: Vec<f32> = expected.flatten_all()?.to_vec1()?;
    assert!(
        got.iter()
            .zip(&expected)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "{label}: forward rows differ from the weight's"
    );

    // Backward: f64 sums per id, in any order (the reference of the f32 sums).
    let dw = weight_gradient(
        &weight,
        &ids_gpu,
        &dy_cpu.reshape(dims.as_slice())?.to_device(gpu)?,
    )?;
    assert_eq!(dw.dims(), [vocab, hidden], "{label}: gradient shape");
    assert_eq!(dw.dtype(), dtype, "{label}: gradient dtype");
    let dy: Vec<Vec<f64>> = dy_cpu.to_dtype(DType::F64)?.to_vec2()?;
    let mut sums: BTreeMap<u32, (usize, Vec<f64>)> = BTreeMap::new();
    for (row, &id) in flat_ids.iter().enumerate() {
        let (count, sum) = sums.entry(id).or_insert_with(|| (0, vec![0.0; hidden]));
        *count += 1;
        for (s, g) in sum.iter_mut().zip(&dy[row]) {
            *s += g;
        }
    }
    let present: Vec<u32> = sums.keys().copied().collect();
    let present_gpu = Tensor::from_vec(present.clone(), present.len(), gpu)?;
    let got: Vec<Vec<f64>> = dw
        .index_select(&present_gpu, 0)?
        .to_dtype(DType::F64)?
        .to_device(&Device::Cpu)?
        .to_vec2()?;
    let bound = match dtype {
        DType::F32 => 1e-5,
        DType::F16 => 1.0 / 1024.0,
        _ => 1.0 / 128.0,
    };
    let mut worst = 0f64;
    for (got, (id, (count, expected))) in got.iter().zip(&sums) {
        if *count == 1 {
            let row = flat_ids.iter().position(|i| i == id).expect("a present id");
            assert_eq!(got, &dy[row], "{label}: id {id} seen once is its row of dy");
        }
        let scale = expected.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
        for (j, (g, e)) in got.iter().zip(expected).enumerate() {
            let error = (g - e).abs() / scale;
            worst = worst.max(error);
            assert!(
                error <= bound,
                "{label}: dweight [{id}, {j}] = {g}, expected {e} ({count} rows; error {error:.2e} of the row's scale {scale:.2e})"
            );
        }
    }
    // Rows of ids not present: exactly zero.
    let row_mass: Vec<f32> = dw
        .abs()?
        .to_dtype(DType::F32)?
        .sum(1)?
        .to_device(&Device::Cpu)?
        .to_vec1()?;
    for (v, mass) in row_mass.iter().enumerate() {
        let is_present = u32::try_from(v).is_ok_and(|v| sums.contains_key(&v));
        assert!(
            is_present || *mass == 0.0,
            "{label}: dweight row {v} has no id but sums to {mass}"
        );
    }
    println!(
        "{label}: forward exact, gradient worst error {worst:.2e} of its row's scale ({} ids, {} distinct)",
        n,
        present.len()
    );
    Ok(())
}

/// (label, vocab, hidden, ids shape, ids).
type Case = (&'static str, usize, usize, Vec<usize>, Vec<u32>);

#[test]
fn embedding_matches_the_f64_reference() -> Result<()> {
    let gpu = gpu()?;
    let (b, t) = BATCH;
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let cases: [Case; 5] = [
            (
                "Qwen3 batch, an eighth padding",
                VOCAB,
                HIDDEN,
                vec![b, t],
                ids(b * t, VOCAB, Some((PAD, 8))),
            ),
            ("odd hidden 7", 50, 7, vec![3, 5], ids(15, 50, None)),
            // hidden 68: bf16/f16 rows take the scalar path, f32 the vectors; one id over
            // 300 rows: its run spans several of the block's chunks
            (
                "one id repeated 300 times",
                1000,
                68,
                vec![300],
                vec![417; 300],
            ),
            ("a single id", 16, 8, vec![1], vec![15]),
            (
                "small vocab, many repeats",
                5,
                256,
                vec![2, 700],
                ids(1400, 5, None),
            ),
        ];
        for (label, vocab, hidden, shape, flat) in cases {
            check_case(
                &format!("{label} ({vocab} x {hidden}, {dtype:?})"),
                vocab,
                hidden,
                &shape,
                &flat,
                dtype,
                &gpu,
            )?;
        }
    }
    Ok(())
}

#[test]
fn embedding_backward_is_bit_identical_across_runs() -> Result<()> {
    let gpu = gpu()?;
    let (b, t) = BATCH;
    let flat = ids(b * t, VOCAB, Some((PAD, 4)));
    let ids_gpu = Tensor::from_vec(flat, (b, t), &gpu)?;
    for dtype in [DType::F32, DType::BF16] {
        let weight =
            Var::from_tensor(&Tensor::randn(0f32, 1.0, (VOCAB, HIDDEN), &gpu)?.to_dtype(dtype)?)?;
        let dy = Tensor::randn(0f32, 1.0, (b, t, HIDDEN), &gpu)?.to_dtype(dtype)?;
        let bits = |dw: Tensor| -> Result<Vec<u32>> {
            let values: Vec<f32> = dw
                .to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?
                .flatten_all()?
                .to_vec1()?;
            Ok(values.iter().map(|v| v.to_bits()).collect())
        };
        let first = bits(weight_gradient(&weight, &ids_gpu, &dy)?)?;
        let second = bits(weight_gradient(&weight, &ids_gpu, &dy)?)?;
        let differing = first.iter().zip(&second).filter(|(a, b)| a != b).count();
        assert_eq!(
            differing, 0,
            "{dtype:?}: two backward runs differ in {differing} elements"
        );
        println!(
            "{dtype:?}: two backward runs bit-identical ({} elements)",
            first.len()
        );
    }
    // Ids >= vocab get nothing (the kernel skips them) and the others are unaffected.
    let dy = Tensor::randn(0f32, 1.0, (3, 8), &gpu)?;
    let ids_gpu = Tensor::new(&[2u32, 16, u32::MAX], &gpu)?;
    let dw = oxtune_tensor::cuda::embedding_backward(&dy, &ids_gpu, 16)?;
    let expected = Tensor::zeros((16, 8), DType::F32, &gpu)?
        .slice_assign(&[2..3, 0..8], &dy.narrow(0, 0, 1)?)?;
    let diff: f32 = (dw - expected)?.abs()?.flatten_all()?.max(0)?.to_scalar()?;
    assert_eq!(diff, 0.0, "ids past the vocabulary");
    Ok(())
}

#[test]
fn frozen_weights_take_the_plain_index_select() -> Result<()> {
    let gpu = gpu()?;
    let weight = Tensor::randn(0f32, 1.0, (32, 16), &gpu)?.to_dtype(DType::BF16)?;
    let ids_gpu = Tensor::new(&[[3u32, 31], [0, 3]], &gpu)?;
    let rows = ops::embedding(&weight, &ids_gpu)?;
    assert!(!rows.track_op(), "a frozen weight records no op");
    let expected = ops::embedding_reference(&weight, &ids_gpu)?;
    let diff: f32 = (rows.to_dtype(DType::F32)? - expected.to_dtype(DType::F32)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar()?;
    assert_eq!(diff, 0.0);
    Ok(())
}

#[test]
fn embedding_speed_against_index_select() -> Result<()> {
    let gpu = gpu()?;
    let (b, t) = BATCH;
    println!(
        "| embedding ({VOCAB}, {HIDDEN}), {} ids | fwd + bwd (autograd) | bwd kernels alone | candle index_select fwd + bwd (index_add) |",
        b * t
    );
    println!("|---|---|---|---|");
    for dtype in [DType::BF16, DType::F32] {
        for (label, pad) in [("uniform ids", None), ("an eighth padding", Some((PAD, 8)))] {
            let flat = ids(b * t, VOCAB, pad);
            let ids_gpu = Tensor::from_vec(flat, (b, t), &gpu)?;
            let weight = Var::from_tensor(
                &Tensor::randn(0f32, 1.0, (VOCAB, HIDDEN), &gpu)?.to_dtype(dtype)?,
            )?;
            let dy = Tensor::randn(0f32, 1.0, (b * t, HIDDEN), &gpu)?.to_dtype(dtype)?;
            let ours = seconds_per_call(&gpu, || {
                let rows = ops::embedding(weight.as_tensor(), &ids_gpu)?;
                rows.backward()?;
                Ok(())
            })?;
            let kernels = seconds_per_call(&gpu, || {
                oxtune_tensor::cuda::embedding_backward(&dy, &ids_gpu, VOCAB)?;
                Ok(())
            })?;
            let candle = seconds_per_call(&gpu, || {
                let rows = ops::embedding_reference(weight.as_tensor(), &ids_gpu)?;
                rows.backward()?;
                Ok(())
            })?;
            println!(
                "| {dtype:?}, {label} | {:.3} ms | {:.3} ms | {:.3} ms |",
                ours * 1e3,
                kernels * 1e3,
                candle * 1e3
            );
        }
    }
    Ok(())
}

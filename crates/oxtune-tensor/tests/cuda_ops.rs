//! Every op the models use, on the GPU against the CPU, at the shapes of real checkpoints
//! (SmolLM2-135M: hidden 576, 9 heads of 64, 3 key/value heads, vocab 49152), in f32 and
//! bf16. Built and run only with `--features cuda` on a machine with a GPU.
#![cfg(feature = "cuda")]

use oxtune_tensor::{D, DType, Device, Result, Tensor, ops};

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

#[test]
fn ops_match_the_cpu() -> Result<()> {
    let gpu = oxtune_tensor::parse_device("cuda")?;
    for dtype in [DType::F32, DType::BF16] {
        let on = |t: &Tensor, device: &Device| t.to_dtype(dtype)?.to_device(device);
        let x = Tensor::randn(0f32, 1.0, (1, 30, 576), &Device::Cpu)?;
        let w = Tensor::randn(1f32, 0.1, 576, &Device::Cpu)?;
        let run = |device: &Device| ops::rms_norm(&on(&x, device)?, &on(&w, device)?, 1e-5);
        compare("rms_norm", &run(&Device::Cpu)?, &run(&gpu)?, dtype)?;

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

#!/usr/bin/env python3
"""PyTorch peer of `oxtune bench train`: the same training work in transformers + peft.

A random-weight model from a config.json (`--config`, `AutoModelForCausalLM.from_config`) or a
checkpoint (`--model DIR`), in bf16 with `attn_implementation="sdpa"`; LoRA on all linear layers
(peft `LoraConfig(target_modules="all-linear")`, adapters in bf16 like the reference numbers of
shared/docs/GPU.md, `--adapter_dtype float32` for oxtune's fp32 adapters) or full fine-tuning in
pure bf16 (bf16 weights, gradients and AdamW state, no fp32 master copy). The rows are oxtune's
synthetic ones (`SyntheticBatches`: two distinct micro-batches, alternated, so the loss falls;
labels = inputs, shifted inside the model), the optimizer torch's AdamW (fused when the device
supports it, else foreach; the JSON says which) with oxtune's settings: constant lr 1e-4,
betas (0.9, 0.999), eps 1e-8, weight decay 0, gradients clipped to norm 1.0.

`--max_steps` steps are timed after `--warmup_steps` untimed ones; the step time is the mean
of the timed steps, each from before the forward to after the optimizer step and the loss's
copy to the host (synchronised). MFU uses oxtune's FLOP formula exactly (bench.rs
`bench_train`, reproduced in `_common.oxtune_train_flops_per_token`):

    flops/token = 6 * N + 12 * L * H * d * T

N = oxtune's `num_parameters` of the config (all weights, also for LoRA), L layers, H query
heads, d head_dim, T = --max_length; MFU = flops/token * tokens/s / (--peak_tflops * 1e12).

Example (H200):
    python3 tools/bench/peer_train.py --config tools/bench/configs/qwen3-0.6b.json \
        --train_type lora --lora_rank 64 --per_device_train_batch_size 4 --max_length 2048 \
        --max_steps 10 --output_json /tmp/peer-train.json
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as common  # noqa: E402


def str2bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got `{value}`")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="config.json (or a directory holding one): random weights")
    src.add_argument("--model", help="a Hugging Face checkpoint directory")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    p.add_argument("--dtype", "--torch_dtype", dest="dtype", default="bfloat16",
                   help="weight and compute dtype (default bfloat16)")
    p.add_argument("--train_type", default="lora", choices=["lora", "full"])
    p.add_argument("--lora_rank", type=int, default=64)
    p.add_argument("--lora_alpha", type=float, default=128.0)
    p.add_argument("--adapter_dtype", default="bfloat16",
                   help="LoRA A/B dtype: bfloat16 (GPU.md's peer numbers) or float32 (oxtune's)")
    p.add_argument("--per_device_train_batch_size", type=int, default=1, help="rows per step")
    p.add_argument("--max_length", type=int, default=2048, help="tokens per row")
    p.add_argument("--max_steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup_steps", type=int, default=2, help="untimed steps first")
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping")
    p.add_argument("--gradient_checkpointing", type=str2bool, nargs="?", const=True, default=False)
    p.add_argument("--optimizer", default="auto", choices=["auto", "fused", "foreach", "for-loop"],
                   help="torch AdamW implementation (auto: fused where available, else foreach)")
    p.add_argument("--peak_tflops", type=float, default=790.0,
                   help="peak matmul TFLOP/s for MFU (default 790: an H200's bf16 cuBLAS rate)")
    p.add_argument("--output_json", help="also write the results as JSON here")
    return p.parse_args(argv)


def make_optimizer(params, args, device):
    """torch AdamW with oxtune's settings; fused where the device and dtype allow it."""
    import torch

    kwargs = dict(lr=args.learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    choices = {"auto": ["fused", "foreach", "for-loop"], "fused": ["fused"],
               "foreach": ["foreach"], "for-loop": ["for-loop"]}[args.optimizer]
    errors = []
    for kind in choices:
        extra = {"fused": {"fused": True}, "foreach": {"foreach": True},
                 "for-loop": {"foreach": False, "fused": False}}[kind]
        try:
            return torch.optim.AdamW(params, **kwargs, **extra), kind
        except (RuntimeError, ValueError, TypeError) as e:  # e.g. fused unsupported here
            errors.append(f"{kind}: {e}")
    raise SystemExit("no AdamW implementation could be built: " + "; ".join(errors))


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    device = common.resolve_device(args.device)
    dtype = common.torch_dtype(args.dtype)
    adapter_dtype = common.torch_dtype(args.adapter_dtype)
    torch.manual_seed(0)

    raw = common.read_raw_config(args.config, args.model)
    cfg = common.oxtune_config_numbers(raw)
    if args.max_steps < 1:
        raise SystemExit("no timed steps: raise --max_steps")

    built = time.perf_counter()
    model, name = common.build_model(args, dtype, device)
    model.config.use_cache = False
    if args.gradient_checkpointing:
        # Non-reentrant: no need for inputs that require grad under LoRA.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    parameters_counted = sum(p.numel() for p in model.parameters())

    if args.train_type == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=args.lora_rank,
            lora_alpha=args.lora_alpha,
            lora_dropout=0.0,
            bias="none",
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
        # autocast_adapter_dtype=False keeps the adapters in the base dtype instead of fp32;
        # then cast explicitly to --adapter_dtype.
        model = get_peft_model(model, lora, autocast_adapter_dtype=False)
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.to(adapter_dtype)
    else:
        for param in model.parameters():
            param.requires_grad_(True)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_count = sum(p.numel() for p in trainable)
    trainable_dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in trainable})
    optimizer, optimizer_kind = make_optimizer(trainable, args, device)
    build_seconds = time.perf_counter() - built

    batches = [
        torch.tensor(
            common.synthetic_rows(args.per_device_train_batch_size, args.max_length, cfg["vocab_size"], pattern),
            dtype=torch.long,
            device=device,
        )
        for pattern in range(2)
    ]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, step_times = [], []
    total = args.warmup_steps + args.max_steps
    for step in range(total):
        ids = batches[step % len(batches)]
        sync()
        started = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        sync()
        step_times.append(time.perf_counter() - started)
        losses.append(value)
        print(f"step {step + 1}/{total}  loss {value:.4f}  {step_times[-1]:.3f} s"
              + ("  (warm-up)" if step < args.warmup_steps else ""), file=sys.stderr, flush=True)
    if not all(math.isfinite(l) for l in losses):
        raise SystemExit(f"non-finite loss: {losses}")

    timed = step_times[args.warmup_steps:]
    step_seconds = sum(timed) / len(timed)
    tokens_per_step = args.per_device_train_batch_size * args.max_length
    tokens_per_second = tokens_per_step / step_seconds
    flops_per_token = common.oxtune_train_flops_per_token(cfg, args.max_length)
    mfu = flops_per_token * tokens_per_second / (args.peak_tflops * 1e12)
    memory = common.memory_report(device)

    report = {
        "side": "peer",
        "model": name,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "train_type": args.train_type,
        "lora_rank": args.lora_rank,
        "lora_alpha": args.lora_alpha,
        "adapter_dtype": str(adapter_dtype).removeprefix("torch.") if args.train_type == "lora" else None,
        "trainable_dtypes": trainable_dtypes,
        "batch_size": args.per_device_train_batch_size,
        "seq_len": args.max_length,
        "gradient_checkpointing": args.gradient_checkpointing,
        "optimizer": f"torch.optim.AdamW ({optimizer_kind})",
        "max_grad_norm": args.max_grad_norm,
        "learning_rate": args.learning_rate,
        "warmup_steps": args.warmup_steps,
        "timed_steps": len(timed),
        "step_seconds": step_seconds,
        "step_seconds_all": step_times,
        "tokens_per_second": tokens_per_second,
        "parameters": common.oxtune_num_parameters(cfg),
        "parameters_counted": parameters_counted,
        "trainable_parameters": trainable_count,
        "flops_per_token": flops_per_token,
        "peak_tflops": args.peak_tflops,
        "mfu": mfu,
        **memory,
        "losses": losses,
        "final_loss": losses[-1],
        "build_seconds": build_seconds,
        "versions": common.versions(device),
    }
    table = (
        f"model            {name}\n"
        f"training         {args.train_type} {report['dtype']}"
        + (f" (adapters {report['adapter_dtype']}, r {args.lora_rank})" if args.train_type == "lora" else "")
        + f", batch {args.per_device_train_batch_size} x {args.max_length} tokens, "
        f"checkpointing {str(args.gradient_checkpointing).lower()}\n"
        f"optimizer        {report['optimizer']}\n"
        f"step time        {step_seconds:.3f} s ({len(timed)} timed steps)\n"
        f"throughput       {tokens_per_second:.0f} tokens/s, MFU {100 * mfu:.1f} %\n"
        f"losses           {losses[0]:.4f} -> {losses[-1]:.4f}\n"
    )
    if memory["max_memory_allocated_bytes"] is not None:
        table += (
            f"GPU memory       {common.gib(memory['max_memory_allocated_bytes'])} peak allocated, "
            f"{common.gib(memory['max_memory_reserved_bytes'])} peak reserved, "
            f"{common.gib(memory['gpu_memory_bytes'])} device used at the end\n"
        )
    common.publish(table, report, args.output_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

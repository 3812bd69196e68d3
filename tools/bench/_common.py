"""Shared helpers of the PyTorch peers (`peer_train.py`, `peer_infer.py`).

Everything that must match `oxtune bench` exactly lives here: the parameter count of a
config.json (oxtune-models `ModelConfig::num_parameters`), the weight bytes read per decoded
token (`decode_bytes` of crates/oxtune/src/commands/bench.rs) and the synthetic token rows
(oxtune-train `SyntheticBatches`, the prompts of `bench infer`). Works with transformers 4.57
and 5.x (`torch_dtype` became `dtype` in 4.56).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
from typing import Any

DTYPES = {
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "float32": "float32",
    "fp32": "float32",
    "f32": "float32",
}

# A bf16/fp16/fp32 element, for the bandwidth bound.
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def torch_dtype(name: str):
    import torch

    try:
        return getattr(torch, DTYPES[name])
    except KeyError:
        raise SystemExit(f"unknown dtype `{name}`: expected bfloat16, float16 or float32") from None


def resolve_device(name: str):
    """`cuda`, `cuda:N` or `cpu` as a torch.device with an index for CUDA (set_device and the
    memory statistics need one), made the current device."""
    import torch

    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {name}: this PyTorch sees no CUDA device")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def read_raw_config(config: str | None, model: str | None) -> dict[str, Any]:
    """The config.json dict of `--config FILE_OR_DIR` or of the checkpoint `--model DIR`."""
    path = config if config is not None else model
    if path is None:
        raise SystemExit("pass --config CONFIG_JSON (random weights) or --model CHECKPOINT_DIR")
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def oxtune_config_numbers(raw: dict[str, Any]) -> dict[str, Any]:
    """The fields of oxtune's `ModelConfig` the formulas use, with oxtune's defaults.

    oxtune-models/src/config.rs: `num_key_value_heads` defaults to `num_attention_heads`,
    `head_dim` to `hidden_size / num_attention_heads`, `tie_word_embeddings` to false (every
    supported family: Llama, Mistral, Qwen2, Qwen3).
    """
    hidden = int(raw["hidden_size"])
    heads = int(raw["num_attention_heads"])
    kv_heads = int(raw.get("num_key_value_heads") or heads)
    head_dim = raw.get("head_dim")
    head_dim = int(head_dim) if head_dim else hidden // heads
    return {
        "hidden_size": hidden,
        "intermediate_size": int(raw["intermediate_size"]),
        "num_hidden_layers": int(raw["num_hidden_layers"]),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": int(raw["vocab_size"]),
        "tie_word_embeddings": bool(raw.get("tie_word_embeddings", False)),
        "max_position_embeddings": int(raw.get("max_position_embeddings") or 4096),
    }


def oxtune_num_parameters(c: dict[str, Any]) -> int:
    """`ModelConfig::num_parameters` (oxtune-models/src/config.rs), term for term.

    q, k, v, o projections + the three MLP matrices + two RMSNorm weights per layer, the
    embedding (twice when untied: the LM head) and the final norm. Biases and Qwen3's per-head
    q/k norms are not counted (they are < 0.01 % of the weights); `parameters_counted` in the
    peers' JSON is the model's real count, for reference.
    """
    attention = c["hidden_size"] * c["head_dim"] * (
        2 * c["num_attention_heads"] + 2 * c["num_key_value_heads"]
    )
    mlp = 3 * c["hidden_size"] * c["intermediate_size"]
    per_layer = attention + mlp + 2 * c["hidden_size"]
    embeddings = c["vocab_size"] * c["hidden_size"] * (1 if c["tie_word_embeddings"] else 2)
    return c["num_hidden_layers"] * per_layer + embeddings + c["hidden_size"]


def oxtune_train_flops_per_token(c: dict[str, Any], seq_len: int) -> float:
    """bench.rs `bench_train`: nanoGPT's estimate, 6 N flops per token for the weights (N =
    `num_parameters`, all of them, also for LoRA) plus 12 L H d T for attention (scores and
    values, forward and backward; H = query heads, d = head_dim, T = the row length)."""
    return 6.0 * oxtune_num_parameters(c) + 12.0 * (
        c["num_hidden_layers"] * c["num_attention_heads"] * c["head_dim"] * seq_len
    )


def oxtune_decode_weight_elements(c: dict[str, Any]) -> int:
    """bench.rs `decode_bytes` (before multiplying by the dtype size): every parameter but the
    input-embedding lookup; a tied LM head is still read once per token."""
    embedding = c["vocab_size"] * c["hidden_size"]
    lm_head_separate = embedding if c["tie_word_embeddings"] else 0
    return oxtune_num_parameters(c) - embedding + lm_head_separate


def synthetic_rows(batch: int, seq_len: int, vocab: int, pattern: int) -> list[list[int]]:
    """oxtune-train `SyntheticBatches::next_batch`: micro-batch number `pattern` (bench train
    cycles through 2 distinct ones), the same ids as oxtune's (usize arithmetic, 64-bit)."""
    mask = (1 << 64) - 1
    flat = [
        (((i * 2_654_435_761) & mask) ^ ((pattern * 40_503) & mask)) % vocab
        for i in range(batch * seq_len)
    ]
    return [flat[r * seq_len : (r + 1) * seq_len] for r in range(batch)]


def bench_prompt(prompt_tokens: int, vocab: int, seed: int) -> list[int]:
    """bench.rs `bench_infer`'s prompts: seed 0 for prefill, 1..=B for a decode batch of B."""
    return [(i * 7919 + 13 + seed * 104_729) % vocab for i in range(prompt_tokens)]


def _transformers_dtype_kwarg() -> str:
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def build_model(args, dtype, device):
    """A random-weight model from `--config` or a checkpoint from `--model`, sdpa attention,
    on `device`. Returns (model, name)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {_transformers_dtype_kwarg(): dtype, "attn_implementation": "sdpa"}
    if args.config is not None:
        config_dir = args.config
        scratch = None
        if not os.path.isdir(config_dir):
            # AutoConfig reads a directory: give the file its expected name.
            scratch = tempfile.mkdtemp(prefix="peer-config-")
            shutil.copy(args.config, os.path.join(scratch, "config.json"))
            config_dir = scratch
        try:
            config = AutoConfig.from_pretrained(config_dir)
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
        # Build directly on the device: initialising 8B random weights on the host is slow.
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, **kwargs)
        name = f"{args.config} (random weights)"
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, **kwargs)
        name = args.model
    # Device only: the dtype is already the weights' (a module-wide .to(dtype) would also
    # round fp32 buffers such as RoPE's inv_freq).
    model = model.to(device)
    return model, name


def versions(device) -> dict[str, Any]:
    import torch
    import transformers

    out: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
    }
    try:
        import peft

        out["peft"] = peft.__version__
    except ImportError:
        out["peft"] = None
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def memory_report(device) -> dict[str, Any]:
    """Peak allocated / reserved by PyTorch's caching allocator, and the whole device's used
    memory (total - free: the figure oxtune reports as `gpu_memory_bytes`)."""
    import torch

    if device.type != "cuda":
        return {
            "gpu_memory_bytes": None,
            "max_memory_allocated_bytes": None,
            "max_memory_reserved_bytes": None,
        }
    free, total = torch.cuda.mem_get_info(device)
    return {
        "gpu_memory_bytes": total - free,
        "max_memory_allocated_bytes": torch.cuda.max_memory_allocated(device),
        "max_memory_reserved_bytes": torch.cuda.max_memory_reserved(device),
    }


def gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / (1 << 30):.1f} GiB"


def publish(table: str, report: dict[str, Any], output_json: str | None) -> None:
    sys.stdout.write(table)
    sys.stdout.flush()
    if output_json:
        with open(output_json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")

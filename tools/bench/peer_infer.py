#!/usr/bin/env python3
"""PyTorch peer of `oxtune bench infer`: prefill and greedy decode in transformers.

The model: random weights from a config.json (`--config`) or a checkpoint (`--model DIR`),
bf16, `attn_implementation="sdpa"`, eval mode. The prompts are oxtune's (bench.rs: token
`i` of the prompt with seed `s` is `(7919 i + 13 + 104729 s) % vocab`; seed 0 for prefill,
1..=B for a decode batch of B), so both sides compute the same tokens.

- Prefill: one forward over a `--prompt_tokens` prompt (KV cache written, logits of the last
  position only, as `generate` does) and the argmax copied to the host; tokens/s of the best
  of `--repeats` after `--prefill_warmups` (2) untimed runs (oxtune: 1; its runs go through
  the serving engine, from scheduling to the first token).
- Decode: `model.generate` greedy, exactly `--max_new_tokens` tokens (no end-of-sequence),
  with HF's static KV cache (`cache_implementation="static"`), whose decode step transformers
  compiles itself (`torch.compile`, its default `CompileConfig`: inductor, mode
  "reduce-overhead" = CUDA graphs) — the setup of the reference numbers in shared/docs/GPU.md.
  `--no_compile` falls back to the dynamic cache, eager. Each generated token is timestamped
  when it reaches the host (a streamer); like oxtune, the rate is
  B * (max_new_tokens - 1) / (time of the last token - time of the first token), i.e. from the
  moment every sequence is decoding, best of `--repeats` after one untimed run (which also
  compiles). Batch 1 always; `--batch_size N` (repeatable) or `--batch_sizes 1,8` add batches
  of N sequences decoded together, N different prompts.
- Bandwidth bound (bench.rs `decode_bytes`, exactly): bandwidth / (bytes of every parameter
  but the input-embedding lookup, N = oxtune's `num_parameters`; a tied LM head still counts
  once), bandwidth = --bandwidth_gb_s, default 4260 GB/s on CUDA (the H200's measured device
  copy), none on the CPU.

Example (H200):
    python3 tools/bench/peer_infer.py --config tools/bench/configs/qwen3-8b.json \
        --prompt_tokens 512 --max_new_tokens 128 --repeats 2 --output_json /tmp/peer-infer.json
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as common  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="config.json (or a directory holding one): random weights")
    src.add_argument("--model", help="a Hugging Face checkpoint directory")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    p.add_argument("--dtype", "--torch_dtype", dest="dtype", default="bfloat16",
                   help="weight and compute dtype (default bfloat16)")
    p.add_argument("--prompt_tokens", type=int, default=512)
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="timed runs, best reported (after one untimed)")
    p.add_argument("--batch_size", type=int, action="append", default=[],
                   help="also decode N sequences together (repeatable)")
    p.add_argument("--batch_sizes", default="1",
                   help="comma-separated decode batch sizes, like oxtune's (default 1)")
    p.add_argument("--prefill_warmups", type=int, default=2,
                   help="untimed prefill passes first (default 2: the first passes pay one-time "
                        "library setup, e.g. cuBLAS/sdpa heuristics, oneDNN JIT on the CPU)")
    p.add_argument("--no_compile", action="store_true",
                   help="dynamic KV cache, no torch.compile (default: static cache, compiled)")
    p.add_argument("--bandwidth_gb_s", type=float, default=None,
                   help="memory bandwidth for the bound (default on CUDA 4260, none on CPU)")
    p.add_argument("--output_json", help="also write the results as JSON here")
    return p.parse_args(argv)


class TokenClock:
    """A `generate` streamer that timestamps every put: the prompt first, then one put per
    generated token (its ids already copied to the host, so the step is complete)."""

    def __init__(self):
        self.prompt_at = None
        self.token_times: list[float] = []

    def put(self, value):
        now = time.perf_counter()
        if self.prompt_at is None:
            self.prompt_at = now
        else:
            self.token_times.append(now)

    def end(self):
        pass


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    device = common.resolve_device(args.device)
    dtype = common.torch_dtype(args.dtype)
    torch.manual_seed(0)

    raw = common.read_raw_config(args.config, args.model)
    cfg = common.oxtune_config_numbers(raw)
    batch_sizes = sorted({int(b) for b in args.batch_sizes.split(",") if b.strip()} | {1} | set(args.batch_size))
    context = args.prompt_tokens + args.max_new_tokens
    if args.prompt_tokens < 1 or args.max_new_tokens < 2 or context >= cfg["max_position_embeddings"]:
        raise SystemExit(
            f"--prompt_tokens {args.prompt_tokens} + --max_new_tokens {args.max_new_tokens} must fit the "
            f"model's context ({cfg['max_position_embeddings']}), with at least 1 prompt and 2 new tokens")
    if args.repeats < 1 or min(batch_sizes) < 1:
        raise SystemExit("--repeats and batch sizes must be at least 1")

    built = time.perf_counter()
    model, name = common.build_model(args, dtype, device)
    model.eval()
    parameters_counted = sum(p.numel() for p in model.parameters())
    # Exactly max_new_tokens per sequence: no end-of-sequence token anywhere.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    build_seconds = time.perf_counter() - built
    vocab = cfg["vocab_size"]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # Prefill.
    prompt = torch.tensor([common.bench_prompt(args.prompt_tokens, vocab, 0)], dtype=torch.long, device=device)
    prefill_seconds = float("inf")
    with torch.no_grad():
        for repeat in range(args.prefill_warmups + args.repeats):
            sync()
            started = time.perf_counter()
            out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
            out.logits[:, -1].argmax(-1).item()
            seconds = time.perf_counter() - started
            del out
            if repeat >= args.prefill_warmups:
                prefill_seconds = min(prefill_seconds, seconds)
    prefill_rate = args.prompt_tokens / prefill_seconds

    # Decode.
    gen = copy.deepcopy(model.generation_config)
    gen.do_sample = False
    gen.num_beams = 1
    gen.max_new_tokens = args.max_new_tokens
    gen.min_new_tokens = None
    gen.eos_token_id = None
    gen.pad_token_id = 0
    for unset in ("temperature", "top_p", "top_k"):
        if hasattr(gen, unset):
            setattr(gen, unset, None)
    if args.no_compile:
        gen.cache_implementation = None
        gen.disable_compile = True
        cache_implementation = "dynamic"
    else:
        gen.cache_implementation = "static"
        gen.disable_compile = False
        cache_implementation = "static"
        if device.type != "cuda":
            # transformers compiles the decode step on CUDA only unless told otherwise.
            from transformers import CompileConfig

            gen.compile_config = CompileConfig()
            gen.compile_config._compile_all_devices = True

    batches = []
    ttft = None
    for batch in batch_sizes:
        ids = torch.tensor(
            [common.bench_prompt(args.prompt_tokens, vocab, b + 1) for b in range(batch)],
            dtype=torch.long, device=device)
        mask = torch.ones_like(ids)
        best = 0.0
        for repeat in range(args.repeats + 1):
            clock = TokenClock()
            sync()
            started = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen, streamer=clock)
            if out.shape[1] != args.prompt_tokens + args.max_new_tokens or len(clock.token_times) != args.max_new_tokens:
                raise SystemExit(f"generate returned {out.shape[1] - args.prompt_tokens} new tokens "
                                 f"({len(clock.token_times)} streamed), expected {args.max_new_tokens}")
            first, last = clock.token_times[0], clock.token_times[-1]
            rate = batch * (args.max_new_tokens - 1) / max(last - first, 1e-9)
            print(f"decode batch {batch} run {repeat}{' (warm-up)' if repeat == 0 else ''}: "
                  f"{rate:.1f} tokens/s, first token after {first - started:.3f} s",
                  file=sys.stderr, flush=True)
            if repeat > 0:
                best = max(best, rate)
                if batch == 1:
                    ttft = first - started if ttft is None else min(ttft, first - started)
        batches.append({
            "batch_size": batch,
            "decode_tokens_per_second": best,
            "per_sequence_tokens_per_second": best / batch,
        })
    compiled = (not args.no_compile) and hasattr(model, "_compiled_call")
    if not args.no_compile and not compiled:
        print("warning: transformers did not compile the decode step", file=sys.stderr)

    decode_rate = next(b["decode_tokens_per_second"] for b in batches if b["batch_size"] == 1)
    bytes_per_token = common.oxtune_decode_weight_elements(cfg) * common.DTYPE_BYTES[str(dtype).removeprefix("torch.")]
    bandwidth = args.bandwidth_gb_s if args.bandwidth_gb_s is not None else (4260.0 if device.type == "cuda" else None)
    bound = bandwidth * 1e9 / bytes_per_token if bandwidth is not None else None
    memory = common.memory_report(device)

    report = {
        "side": "peer",
        "model": name,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "parameters": common.oxtune_num_parameters(cfg),
        "parameters_counted": parameters_counted,
        "prompt_tokens": args.prompt_tokens,
        "prefill_warmups": args.prefill_warmups,
        "repeats": args.repeats,
        "decode_tokens": args.max_new_tokens,
        "cache_implementation": cache_implementation,
        "compiled": compiled,
        "prefill_tokens_per_second": prefill_rate,
        "decode_tokens_per_second": decode_rate,
        "decode_ms_per_token": 1000.0 / decode_rate,
        "time_to_first_token_seconds": ttft,
        "batches": batches,
        "weight_bytes_per_decoded_token": bytes_per_token,
        "bandwidth_gb_s": bandwidth,
        "bandwidth_bound_tokens_per_second": bound,
        "fraction_of_bound": decode_rate / bound if bound else None,
        **memory,
        "build_seconds": build_seconds,
        "versions": common.versions(device),
    }
    table = (
        f"model            {name}\n"
        f"device, dtype    {device}, {report['dtype']}; {cache_implementation} cache, "
        f"{'compiled' if compiled else 'eager'}\n"
        f"parameters       {report['parameters'] / 1e9:.3f} B\n"
        f"prefill          {prefill_rate:.1f} tokens/s ({args.prompt_tokens} tokens)\n"
    )
    for b in batches:
        table += (f"decode, batch {b['batch_size']:<3}{b['decode_tokens_per_second']:.1f} tokens/s "
                  f"({1000.0 * b['batch_size'] / b['decode_tokens_per_second']:.2f} ms/step, "
                  f"{args.max_new_tokens} tokens each)\n")
    if bound:
        table += f"bandwidth bound  {bound:.1f} tokens/s at batch 1 -> {100 * decode_rate / bound:.1f} % reached\n"
    if memory["max_memory_allocated_bytes"] is not None:
        table += (f"GPU memory       {common.gib(memory['max_memory_allocated_bytes'])} peak allocated, "
                  f"{common.gib(memory['max_memory_reserved_bytes'])} peak reserved\n")
    common.publish(table, report, args.output_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

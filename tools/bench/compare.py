#!/usr/bin/env python3
"""Side-by-side: `oxtune bench` and its PyTorch peer on the same GPU, one call, one table.

For every named case the driver runs oxtune's bench (`oxtune bench train` or `oxtune bench
infer`) and then the peer (`peer_train.py` / `peer_infer.py`, next to this file) with the same
settings, one after the other in separate processes (so each starts with the whole GPU),
collects both JSON reports, prints a markdown table (case, oxtune, peer, ratio oxtune/peer,
memory of both) and writes everything to `--output_json` — after every side, so a run cut
short still leaves the cases done so far. A side that fails (out of memory, a crash, a
timeout) is recorded as failed with the tail of its output; the driver goes on.

Built-in cases (random weights from tools/bench/configs/*.json, seq 2048, bf16):

    qwen3-0.6b-lora    train: LoRA r64 (alpha 128) all-linear, micro-batch 4 x 2048
    qwen3-8b-lora      train: LoRA r64 (alpha 128) all-linear, micro-batch 1 x 2048
    qwen3-0.6b-full    train: full fine-tuning, micro-batch 4 x 2048 (peer: pure bf16)
    qwen3-8b-decode    infer: prefill 512 tokens; greedy decode 128 tokens at batch 1 and 8
    qwen3-0.6b-decode  infer: prefill 512 tokens; greedy decode 256 tokens at batch 1 and 8

Training cases time 10 steps after 2 warm-up steps; decode cases report the best of 3 runs
(8B: 2) after one untimed run. Flags override the built-in settings for every selected case
(`--config`, `--max_steps`, `--max_length`, `--per_device_train_batch_size`,
`--prompt_tokens`, `--max_new_tokens`, `--batch_sizes`, `--repeats`, ...), e.g. a tiny
config on the CPU to check the plumbing.

On the H200 (device tool, repository root; the binary built by scripts/build-cuda.sh and
copied to .gpu/, carried with `carry: [".gpu"]`). The machine's Python has everything the
peer needs — torch 2.11, transformers 5.x, peft 0.21 in /opt/torch/.venv (its `python3`);
install nothing there. oxtune finds the CUDA libraries of that PyTorch through
LD_LIBRARY_PATH (shared/docs/GPU.md; the driver also prepends them for the oxtune process
when they exist and are missing):

    export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib:/opt/torch/.venv/lib/python3.12/site-packages/nvidia/nccl/lib:$LD_LIBRARY_PATH
    python3 tools/bench/compare.py --oxtune .gpu/oxtune \\
        --cases qwen3-0.6b-lora,qwen3-0.6b-full,qwen3-0.6b-decode --output_json $OUT/compare.json
    python3 tools/bench/compare.py --oxtune .gpu/oxtune \\
        --cases qwen3-8b-lora,qwen3-8b-decode --output_json $OUT/compare-8b.json

(two calls: the device tool stops a command after 10 minutes; the compile of the peer's
decode step takes a minute or two per batch size.) If `python3` there lacks torch, run the
driver with /opt/torch/.venv/bin/python3 or pass `--python /opt/torch/.venv/bin/python3`.

Locally on the CPU (plumbing only; tiny config, debug build):

    ~/.cache/oxtune-bench-venv/bin/python tools/bench/compare.py --oxtune target/debug/oxtune \\
        --device cpu --config /tmp/tiny-qwen3-bench.json --max_length 128 --max_steps 3 \\
        --warmup_steps 1 --prompt_tokens 32 --max_new_tokens 16 --repeats 2 --no_compile \\
        --output_json /tmp/compare.json

Only the standard library is imported here; the peers need torch, transformers and peft.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import glob
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(HERE, "configs")

TRAIN_DEFAULTS = {
    "kind": "train",
    "train_type": "lora",
    "lora_rank": 64,
    "lora_alpha": 128.0,
    "per_device_train_batch_size": 1,
    "max_length": 2048,
    "max_steps": 10,
    "warmup_steps": 2,
    "gradient_checkpointing": False,
    # GPU.md's peer numbers were taken with bf16 adapters; oxtune keeps fp32 adapters.
    "adapter_dtype": "bfloat16",
}
INFER_DEFAULTS = {
    "kind": "infer",
    "prompt_tokens": 512,
    "max_new_tokens": 256,
    "batch_sizes": [1, 8],
    "repeats": 3,
    "no_compile": False,
}


def _case(defaults, **settings):
    case = dict(defaults)
    case.update(settings)
    return case


CASES = {
    "qwen3-0.6b-lora": _case(TRAIN_DEFAULTS, config=os.path.join(CONFIGS, "qwen3-0.6b.json"),
                             per_device_train_batch_size=4),
    "qwen3-8b-lora": _case(TRAIN_DEFAULTS, config=os.path.join(CONFIGS, "qwen3-8b.json"),
                           per_device_train_batch_size=1),
    "qwen3-0.6b-full": _case(TRAIN_DEFAULTS, config=os.path.join(CONFIGS, "qwen3-0.6b.json"),
                             train_type="full", per_device_train_batch_size=4),
    "qwen3-8b-decode": _case(INFER_DEFAULTS, config=os.path.join(CONFIGS, "qwen3-8b.json"),
                             max_new_tokens=128, repeats=2),
    "qwen3-0.6b-decode": _case(INFER_DEFAULTS, config=os.path.join(CONFIGS, "qwen3-0.6b.json")),
}

# Flags that override a case setting (name -> type); None = not given.
OVERRIDES = {
    "config": str,
    "train_type": str,
    "lora_rank": int,
    "lora_alpha": float,
    "per_device_train_batch_size": int,
    "max_length": int,
    "max_steps": int,
    "warmup_steps": int,
    "adapter_dtype": str,
    "prompt_tokens": int,
    "max_new_tokens": int,
    "repeats": int,
}

OOM_MARKERS = ("out of memory", "outofmemoryerror", "cuda_error_out_of_memory", "cudaerrormemoryallocation")


def str2bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got `{value}`")


def default_python() -> str:
    """This interpreter when it has torch, else the H200's PyTorch venv when present."""
    if importlib.util.find_spec("torch") is not None:
        return sys.executable
    for candidate in ("/opt/torch/.venv/bin/python3", "/opt/torch/.venv/bin/python"):
        if os.access(candidate, os.X_OK):
            return candidate
    return sys.executable


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--oxtune", default=".gpu/oxtune", help="the oxtune binary (default .gpu/oxtune)")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated case names (default: all)")
    p.add_argument("--list_cases", action="store_true", help="print the built-in cases and exit")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    p.add_argument("--dtype", default="bfloat16",
                   help="weight/compute dtype of both sides (oxtune --torch_dtype; default bfloat16)")
    p.add_argument("--python", default=None, help="interpreter for the peers (default: see docstring)")
    p.add_argument("--output_json", help="write all results here (rewritten after every side)")
    p.add_argument("--work_dir", help="per-side JSON and logs (default: a temporary directory)")
    p.add_argument("--timeout_s", type=float, default=900.0, help="per side (default 900)")
    p.add_argument("--skip_oxtune", action="store_true", help="run the peers only")
    p.add_argument("--skip_peer", action="store_true", help="run oxtune only")
    p.add_argument("--peak_tflops", type=float, default=790.0, help="for MFU, both sides (default 790)")
    p.add_argument("--bandwidth_gb_s", type=float, default=None,
                   help="for the decode bound, both sides (default: 4260 on CUDA, none on CPU)")
    # Overrides of the case settings.
    p.add_argument("--config", help="config.json for every selected case (e.g. a tiny one)")
    p.add_argument("--train_type", choices=["lora", "full"])
    p.add_argument("--lora_rank", type=int)
    p.add_argument("--lora_alpha", type=float)
    p.add_argument("--per_device_train_batch_size", type=int)
    p.add_argument("--max_length", type=int)
    p.add_argument("--max_steps", type=int)
    p.add_argument("--warmup_steps", type=int)
    p.add_argument("--gradient_checkpointing", type=str2bool)
    p.add_argument("--adapter_dtype", help="peer's LoRA adapter dtype (default bfloat16)")
    p.add_argument("--prompt_tokens", type=int)
    p.add_argument("--max_new_tokens", type=int)
    p.add_argument("--batch_sizes", help="decode batch sizes, e.g. 1,8")
    p.add_argument("--repeats", type=int)
    p.add_argument("--no_compile", action="store_true", help="peer decode: dynamic cache, eager")
    return p.parse_args(argv)


def case_settings(name: str, args) -> dict:
    case = copy.deepcopy(CASES[name])
    for key in OVERRIDES:
        value = getattr(args, key, None)
        if value is not None:
            case[key] = value
    if args.gradient_checkpointing is not None and case["kind"] == "train":
        case["gradient_checkpointing"] = args.gradient_checkpointing
    if args.batch_sizes is not None and case["kind"] == "infer":
        case["batch_sizes"] = sorted({int(b) for b in args.batch_sizes.split(",") if b.strip()} | {1})
    if args.no_compile and case["kind"] == "infer":
        case["no_compile"] = True
    return case


def oxtune_command(case: dict, args, out_json: str) -> list[str]:
    common = ["--device", args.device, "--torch_dtype", args.dtype, "--config", case["config"],
              "--output_json", out_json]
    if case["kind"] == "train":
        return [args.oxtune, "bench", "train", *common,
                "--train_type", case["train_type"],
                "--lora_rank", str(case["lora_rank"]),
                "--lora_alpha", str(case["lora_alpha"]),
                "--per_device_train_batch_size", str(case["per_device_train_batch_size"]),
                "--max_length", str(case["max_length"]),
                "--max_steps", str(case["max_steps"]),
                "--warmup_steps", str(case["warmup_steps"]),
                "--gradient_checkpointing", str(case["gradient_checkpointing"]).lower(),
                "--peak_tflops", str(args.peak_tflops)]
    command = [args.oxtune, "bench", "infer", *common,
               "--prompt_tokens", str(case["prompt_tokens"]),
               "--max_new_tokens", str(case["max_new_tokens"]),
               "--batch_sizes", ",".join(str(b) for b in case["batch_sizes"]),
               "--repeats", str(case["repeats"])]
    if args.bandwidth_gb_s is not None:
        command += ["--bandwidth_gb_s", str(args.bandwidth_gb_s)]
    return command


def peer_command(case: dict, args, python: str, out_json: str) -> list[str]:
    common = ["--device", args.device, "--dtype", args.dtype, "--config", case["config"],
              "--output_json", out_json]
    if case["kind"] == "train":
        return [python, os.path.join(HERE, "peer_train.py"), *common,
                "--train_type", case["train_type"],
                "--lora_rank", str(case["lora_rank"]),
                "--lora_alpha", str(case["lora_alpha"]),
                "--adapter_dtype", case["adapter_dtype"],
                "--per_device_train_batch_size", str(case["per_device_train_batch_size"]),
                "--max_length", str(case["max_length"]),
                "--max_steps", str(case["max_steps"]),
                "--warmup_steps", str(case["warmup_steps"]),
                "--gradient_checkpointing", str(case["gradient_checkpointing"]).lower(),
                "--peak_tflops", str(args.peak_tflops)]
    command = [python, os.path.join(HERE, "peer_infer.py"), *common,
               "--prompt_tokens", str(case["prompt_tokens"]),
               "--max_new_tokens", str(case["max_new_tokens"]),
               "--batch_sizes", ",".join(str(b) for b in case["batch_sizes"]),
               "--repeats", str(case["repeats"])]
    if case["no_compile"]:
        command.append("--no_compile")
    if args.bandwidth_gb_s is not None:
        command += ["--bandwidth_gb_s", str(args.bandwidth_gb_s)]
    return command


def oxtune_env(args) -> dict:
    """LD_LIBRARY_PATH with the H200 PyTorch's CUDA libraries first, when they exist."""
    env = dict(os.environ)
    if not args.device.startswith("cuda"):
        return env
    present = env.get("LD_LIBRARY_PATH", "").split(":")
    extra = []
    for pattern in ("/opt/torch/.venv/lib/python3*/site-packages/nvidia/cu13/lib",
                    "/opt/torch/.venv/lib/python3*/site-packages/nvidia/nccl/lib"):
        for folder in sorted(glob.glob(pattern)):
            if folder not in present:
                extra.append(folder)
    if extra:
        env["LD_LIBRARY_PATH"] = ":".join(extra + [p for p in present if p])
    return env


def tail(text: str, chars: int = 3000) -> str:
    return text[-chars:]


ERROR_LINE = re.compile(r"(?i)(error|panicked|out of memory|exception|hint:)")
BACKTRACE_FRAME = re.compile(r"^\s+(\d+: |at )")


def error_lines(text: str, keep: int = 6) -> list[str]:
    """The lines that say what went wrong (Rust backtrace frames and duplicates left out)."""
    seen, out = set(), []
    for line in text.splitlines():
        if ERROR_LINE.search(line) and not BACKTRACE_FRAME.match(line) and line not in seen:
            seen.add(line)
            out.append(line.rstrip())
    return out[-keep:]


def run_side(command: list[str], out_json: str, log_base: str, env: dict, timeout: float) -> dict:
    """Runs one side; never raises. stdout (the side's table) and stderr (progress, logs) go to
    `log_base`.stdout / .stderr. Returns {ok, result | error + error_tail, ...}."""
    paths = {"stdout": log_base + ".stdout", "stderr": log_base + ".stderr"}
    record = {"command": " ".join(shlex.quote(c) for c in command), "logs": paths}
    if os.path.exists(out_json):
        os.remove(out_json)
    started = time.perf_counter()
    error = None
    try:
        with open(paths["stdout"], "w", encoding="utf-8") as out, open(paths["stderr"], "w", encoding="utf-8") as err:
            # Its own process group: a timeout ends the side and whatever it started (e.g.
            # torch.compile's worker processes), nothing else.
            proc = subprocess.Popen(command, stdout=out, stderr=err, env=env, start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
                if rc != 0:
                    error = f"exit status {rc}"
            except subprocess.TimeoutExpired:
                error = f"timed out after {timeout:.0f} s"
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                rc = proc.wait()
            except BaseException:  # Ctrl-C, SIGTERM (see main): do not leave the side running
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                raise
    except OSError as e:  # missing binary, not executable
        rc, error = None, f"could not start: {e}"
        with open(paths["stderr"], "a", encoding="utf-8") as err:
            err.write(f"{error}\n")
    record["seconds"] = time.perf_counter() - started
    record["rc"] = rc
    texts = {}
    for key, path in paths.items():
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                texts[key] = f.read()
        except OSError:
            texts[key] = ""
    record["stdout"] = tail(texts["stdout"], 2000)
    result = None
    if error is None:
        try:
            with open(out_json, encoding="utf-8") as f:
                result = json.load(f)
        except (OSError, ValueError) as e:
            error = f"no JSON report: {e}"
    if error is None:
        record["ok"] = True
        record["result"] = result
        return record
    # stdout first, so that the last lines are the error on stderr.
    combined = (f"--- stdout ---\n{tail(texts['stdout'], 1000)}\n--- stderr ---\n" if texts["stdout"].strip() else "") + texts["stderr"]
    if any(marker in combined.lower() for marker in OOM_MARKERS):
        error = f"out of memory ({error})"
    record["ok"] = False
    record["error"] = error
    record["error_lines"] = error_lines(combined)
    record["error_tail"] = tail(combined)
    return record


# ---------------------------------------------------------------- table


def fmt_rate(value) -> str:
    if value is None:
        return "n/a"
    if value >= 10_000:
        return f"{value / 1000:.1f}k"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}"


def gib(n) -> str:
    return "n/a" if n is None else f"{n / (1 << 30):.1f} GiB"


def ratio(a, b) -> str:
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.2f}x"


def failed_cell(side: dict | None, first_row: bool = True) -> str:
    if side is None:
        return "skipped"
    return f"FAILED: {side['error']}" if first_row else "FAILED"


def batch_rate(result: dict, batch: int):
    for b in result.get("batches") or []:
        if b.get("batch_size") == batch:
            return b.get("decode_tokens_per_second")
    return None


def case_rows(entry: dict) -> list[list[str]]:
    """Table rows and the ratios (stored into entry["ratios"])."""
    name, case = entry["name"], entry["settings"]
    ox, peer = entry.get("oxtune"), entry.get("peer")
    oxr = ox["result"] if ox and ox.get("ok") else None
    per = peer["result"] if peer and peer.get("ok") else None
    rows, ratios = [], {}

    def cell(result, side, text):
        return text if result is not None else failed_cell(side)

    if case["kind"] == "train":
        label = (f"{case['train_type']}"
                 + (f" r{case['lora_rank']}" if case["train_type"] == "lora" else "")
                 + f", {case['per_device_train_batch_size']}x{case['max_length']}"
                 + (", ckpt" if case["gradient_checkpointing"] else "")
                 + ": tokens/s (MFU; step; loss first->last)")

        def text(r):
            losses = r.get("losses") or [float("nan")]
            return (f"{fmt_rate(r['tokens_per_second'])} ({100 * r['mfu']:.1f} %; {r['step_seconds']:.3f} s; "
                    f"{losses[0]:.3f}->{losses[-1]:.3f})")

        ox_tps = oxr["tokens_per_second"] if oxr else None
        peer_tps = per["tokens_per_second"] if per else None
        ratios["tokens_per_second"] = ox_tps / peer_tps if ox_tps and peer_tps else None
        ox_mem = gib(oxr.get("gpu_memory_bytes")) + " device used" if oxr and oxr.get("gpu_memory_bytes") is not None else "n/a"
        peer_mem = (f"{gib(per.get('max_memory_allocated_bytes'))} alloc / {gib(per.get('max_memory_reserved_bytes'))} reserved"
                    if per and per.get("max_memory_allocated_bytes") is not None else "n/a")
        rows.append([name, label, cell(oxr, ox, text(oxr) if oxr else ""), cell(per, peer, text(per) if per else ""),
                     ratio(ox_tps, peer_tps), ox_mem, peer_mem])
        return rows, ratios

    peer_mem = (f"{gib(per.get('max_memory_allocated_bytes'))} alloc / {gib(per.get('max_memory_reserved_bytes'))} reserved"
                if per and per.get("max_memory_allocated_bytes") is not None else "n/a")
    ox_pre = oxr.get("prefill_tokens_per_second") if oxr else None
    peer_pre = per.get("prefill_tokens_per_second") if per else None
    ratios["prefill_tokens_per_second"] = ox_pre / peer_pre if ox_pre and peer_pre else None
    rows.append([name, f"prefill {case['prompt_tokens']} tokens: tokens/s",
                 cell(oxr, ox, fmt_rate(ox_pre)), cell(per, peer, fmt_rate(peer_pre)),
                 ratio(ox_pre, peer_pre), "not reported", peer_mem])
    for batch in case["batch_sizes"]:
        ox_rate = batch_rate(oxr, batch) if oxr else None
        peer_rate = batch_rate(per, batch) if per else None
        ratios[f"decode_batch_{batch}_tokens_per_second"] = ox_rate / peer_rate if ox_rate and peer_rate else None

        def text(r, rate):
            bound = r.get("bandwidth_bound_tokens_per_second")
            extra = f" ({100 * rate / bound:.1f} % of {fmt_rate(bound)})" if batch == 1 and bound and rate else ""
            return fmt_rate(rate) + extra

        label = f"decode batch {batch}, {case['max_new_tokens']} tokens: tokens/s" + (
            " (% of bandwidth bound)" if batch == 1 else "")
        if batch == 1 and per is not None:
            label += "; peer " + ("static cache, compiled" if per.get("compiled") else
                                  f"{per.get('cache_implementation')} cache, eager")
        rows.append(["", label, text(oxr, ox_rate) if oxr else failed_cell(ox, False),
                     text(per, peer_rate) if per else failed_cell(peer, False), ratio(ox_rate, peer_rate), "", ""])
    return rows, ratios


def markdown(entries: list[dict]) -> str:
    header = ["case", "measure", "oxtune", "peer (PyTorch)", "oxtune / peer", "memory oxtune", "memory peer"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in entries:
        rows, ratios = case_rows(entry)
        entry["ratios"] = ratios
        for row in rows:
            lines.append("| " + " | ".join(c.replace("|", "/") for c in row) + " |")
    return "\n".join(lines) + "\n"


def failures(entries: list[dict]) -> str:
    out = []
    for entry in entries:
        for side in ("oxtune", "peer"):
            record = entry.get(side)
            if record and not record.get("ok"):
                last = record["error_tail"].strip().splitlines()[-6:]
                lines = record.get("error_lines", [])
                shown = lines + (["..."] if lines else []) + [l for l in last if l not in lines]
                body = "\n".join(shown)
                out.append(f"### {entry['name']} / {side}: {record['error']}\n\n```\n{body}\n```\n")
    return "\n".join(out)


# ---------------------------------------------------------------- main


def machine_info(args, python: str) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "device": args.device,
        "dtype": args.dtype,
        "oxtune": args.oxtune,
        "peer_python": python,
    }
    if shutil.which("nvidia-smi") and args.device.startswith("cuda"):
        try:
            info["gpu"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            info["gpu"] = f"nvidia-smi failed: {e}"
    try:
        info["oxtune_version"] = subprocess.run([args.oxtune, "--version"], capture_output=True, text=True,
                                                timeout=30, env=oxtune_env(args)).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        info["oxtune_version"] = f"unavailable: {e}"
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                            timeout=30, cwd=HERE).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list_cases:
        for name, case in CASES.items():
            print(f"{name}: {json.dumps(case)}")
        return 0
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        print(f"unknown case(s) {', '.join(unknown)}; built in: {', '.join(CASES)}", file=sys.stderr)
        return 2
    # SIGTERM (e.g. a time limit) unwinds like Ctrl-C, so the running side is ended too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    python = args.python or default_python()
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="oxtune-compare-")
    os.makedirs(work_dir, exist_ok=True)
    env_ox = oxtune_env(args)
    env_peer = dict(os.environ)

    report = {"machine": machine_info(args, python), "work_dir": work_dir, "cases": []}

    def save():
        report["table"] = markdown(report["cases"])
        if args.output_json:
            tmp = args.output_json + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(report, f, indent=2)
                f.write("\n")
            os.replace(tmp, args.output_json)

    for name in names:
        case = case_settings(name, args)
        entry = {"name": name, "settings": case, "oxtune": None, "peer": None}
        report["cases"].append(entry)
        sides = []
        if not args.skip_oxtune:
            out = os.path.join(work_dir, f"{name}.oxtune.json")
            sides.append(("oxtune", oxtune_command(case, args, out), out, env_ox))
        if not args.skip_peer:
            out = os.path.join(work_dir, f"{name}.peer.json")
            sides.append(("peer", peer_command(case, args, python, out), out, env_peer))
        for side, command, out, env in sides:
            print(f"[{name}] {side}: {' '.join(shlex.quote(c) for c in command)}", file=sys.stderr, flush=True)
            record = run_side(command, out, os.path.join(work_dir, f"{name}.{side}"), env, args.timeout_s)
            entry[side] = record
            status = "ok" if record["ok"] else f"FAILED: {record['error']}"
            print(f"[{name}] {side}: {status} in {record['seconds']:.1f} s", file=sys.stderr, flush=True)
            if record["ok"]:
                sys.stderr.write(record["stdout"])
            save()
        save()

    save()
    print(report["table"])
    failed = failures(report["cases"])
    if failed:
        print("## Failed sides\n\n" + failed)
    if args.output_json:
        print(f"wrote {args.output_json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""GPU time per kernel of a command, from Nsight Compute: where a step's time goes.

Runs COMMAND under `ncu` measuring only each kernel's duration and DRAM bytes read (caches
and clocks left alone, so durations are close to a normal run's, but kernels run one at a
time: launch gaps are not counted), or reads a CSV that ncu wrote before, and prints the
kernels grouped by name (and, with --by_shape, by launch grid) with their count, total, share
of the GPU time and DRAM read rate (what a bandwidth-bound kernel is judged by).

With --step_marker TEXT only the last whole step counts: the kernels after the second-to-last
run of kernels whose name contains TEXT, through the last run (a decode step ends with the
greedy argmax, whose two stages are one run). CUDA graphs are profiled node by node.

    python3 tools/bench/kernel_profile.py --csv_out $OUT/train.csv -- \
        .gpu/oxtune bench train --device cuda --config tools/bench/configs/qwen3-0.6b.json \
        --max_length 2048 --warmup_steps 0 --max_steps 1
    python3 tools/bench/kernel_profile.py --from_csv train.csv.gz --top 30
    python3 tools/bench/kernel_profile.py --by_shape --step_marker argmax --csv_out $OUT/decode.csv -- \
        .gpu/oxtune bench infer --device cuda --config tools/bench/configs/qwen3-8b.json \
        --prompt_tokens 16 --max_new_tokens 4 --repeats 1 --batch_sizes 1

Standard library only. ncu is looked up on PATH, then in /usr/local/cuda/bin.
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip
import os
import shutil
import subprocess
import sys
from typing import NamedTuple


DURATION = "gpu__time_duration.sum"
DRAM_READ = "dram__bytes_read.sum"
TIME_UNITS = {"ns": 1.0, "nsecond": 1.0, "us": 1e3, "usecond": 1e3, "ms": 1e6, "msecond": 1e6}
BYTE_UNITS = {"byte": 1.0, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "KB": 1e3, "MB": 1e6, "GB": 1e9}


class Kernel(NamedTuple):
    name: str
    grid: str
    duration_ns: float
    dram_read_bytes: float  # 0 where the CSV has no DRAM metric


def find_ncu() -> str:
    found = shutil.which("ncu") or "/usr/local/cuda/bin/ncu"
    if not os.path.exists(found):
        sys.exit("ncu (Nsight Compute) not found on PATH or in /usr/local/cuda/bin")
    return found


def profile(command: list[str], csv_out: str) -> None:
    ncu = [
        find_ncu(),
        "--metrics", f"{DURATION},{DRAM_READ}",
        "--csv",
        "--cache-control", "none",
        "--clock-control", "none",
    ]
    with open(csv_out, "w") as out:
        status = subprocess.call(ncu + command, stdout=out)
    if status != 0:
        sys.exit(f"the profiled command exited with {status}; its output is in {csv_out}")


def read_kernels(path: str) -> list[Kernel]:
    """Every profiled kernel in launch order, from ncu's CSV (one row per kernel and metric)."""
    opener = gzip.open if path.endswith(".gz") else open
    metrics: dict[str, dict[str, str]] = {}
    values: dict[str, dict[str, float]] = collections.defaultdict(dict)
    with opener(path, "rt") as lines:
        header = None
        for row in csv.reader(line for line in lines if line.startswith('"')):
            if header is None:
                header = row
                continue
            record = dict(zip(header, row))
            metric = record.get("Metric Name")
            units = {DURATION: TIME_UNITS, DRAM_READ: BYTE_UNITS}.get(metric)
            if units is None:
                continue
            kernel_id = record["ID"]
            metrics.setdefault(kernel_id, record)
            value = float(record["Metric Value"].replace(",", ""))
            values[kernel_id][metric] = value * units.get(record.get("Metric Unit", ""), 1.0)
    kernels = [
        Kernel(record["Kernel Name"], record.get("Grid Size", ""), values[kernel_id][DURATION],
               values[kernel_id].get(DRAM_READ, 0.0))
        for kernel_id, record in metrics.items()
        if DURATION in values[kernel_id]
    ]
    if not kernels:
        sys.exit(f"{path}: no kernel durations found (was it written by ncu --csv?)")
    return kernels


def last_step(kernels: list[Kernel], marker: str) -> list[Kernel]:
    """The kernels after the second-to-last run of `marker` kernels, through the last run."""
    run_ends = [
        i for i, kernel in enumerate(kernels)
        if marker in kernel.name and (i + 1 == len(kernels) or marker not in kernels[i + 1].name)
    ]
    if len(run_ends) < 2:
        sys.exit(f"fewer than two runs of kernels named like {marker!r}: no whole step to show")
    return kernels[run_ends[-2] + 1 : run_ends[-1] + 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from_csv", help="summarise this ncu CSV (.csv or .csv.gz) instead of profiling")
    parser.add_argument("--csv_out", default="kernel_profile.csv", help="where ncu's CSV goes")
    parser.add_argument("--top", type=int, default=25, help="rows to print")
    parser.add_argument("--by_shape", action="store_true", help="group by kernel name and launch grid")
    parser.add_argument("--step_marker", help="summarise only the last step, ended by kernels named like this")
    parser.add_argument("command", nargs="*", help="the command to profile, after --")
    args = parser.parse_args()
    if args.from_csv:
        path = args.from_csv
    else:
        if not args.command:
            parser.error("give a command to profile after --, or --from_csv")
        profile(args.command, args.csv_out)
        path = args.csv_out
    kernels = read_kernels(path)
    if args.step_marker:
        kernels = last_step(kernels, args.step_marker)
    print(summary(kernels, args.by_shape, args.top))


def summary(kernels: list[Kernel], by_shape: bool, top: int) -> str:
    """A Markdown table of the kernels grouped by name (and grid), heaviest first."""
    groups: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0, 0.0, 0.0])
    for kernel in kernels:
        # Template arguments make C++ kernel names unreadable; keep the name before them.
        short = kernel.name.split("(")[0].split("<")[0][:60]
        group = groups[(short, kernel.grid if by_shape else "")]
        group[0] += 1
        group[1] += kernel.duration_ns
        group[2] += kernel.dram_read_bytes
    total = sum(kernel.duration_ns for kernel in kernels)
    shape = " | grid" if by_shape else ""
    lines = [
        f"{len(kernels)} kernels, {total / 1e6:.3f} ms of GPU time",
        f"| kernel{shape} | launches | ms | µs a launch | share | DRAM read |",
        f"|---{'|---' if by_shape else ''}|---|---|---|---|---|",
    ]
    ranked = sorted(groups.items(), key=lambda item: -item[1][1])
    for (name, grid), (count, duration, read) in ranked[:top]:
        cell = f" | {grid}" if by_shape else ""
        lines.append(
            f"| `{name}`{cell} | {count} | {duration / 1e6:.3f} | {duration / count / 1e3:.2f} "
            f"| {100 * duration / total:.1f} % | {read / duration:.0f} GB/s |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""GPU time per kernel of a command, from Nsight Compute: where a step's time goes.

Runs COMMAND under `ncu` measuring only each kernel's duration (caches and clocks left alone,
so durations are close to a normal run's, but kernels run one at a time: launch gaps are not
counted), or reads a CSV that ncu wrote before, and prints the kernels grouped by name (and,
with --by_shape, by launch grid) with their count, total and share of the GPU time.

    python3 tools/bench/kernel_profile.py --csv_out $OUT/train.csv -- \
        .gpu/oxtune bench train --device cuda --config tools/bench/configs/qwen3-0.6b.json \
        --max_length 2048 --warmup_steps 0 --max_steps 1
    python3 tools/bench/kernel_profile.py --from_csv train.csv.gz --top 30

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


def find_ncu() -> str:
    found = shutil.which("ncu") or "/usr/local/cuda/bin/ncu"
    if not os.path.exists(found):
        sys.exit("ncu (Nsight Compute) not found on PATH or in /usr/local/cuda/bin")
    return found


def profile(command: list[str], csv_out: str) -> None:
    ncu = [
        find_ncu(),
        "--metrics", "gpu__time_duration.sum",
        "--csv",
        "--cache-control", "none",
        "--clock-control", "none",
    ]
    with open(csv_out, "w") as out:
        status = subprocess.call(ncu + command, stdout=out)
    if status != 0:
        sys.exit(f"the profiled command exited with {status}; its output is in {csv_out}")


def read_kernels(path: str) -> list[tuple[str, str, float]]:
    """(kernel name, grid, duration in ns) of every profiled kernel, in launch order."""
    opener = gzip.open if path.endswith(".gz") else open
    kernels = []
    with opener(path, "rt") as lines:
        header = None
        for row in csv.reader(line for line in lines if line.startswith('"')):
            if header is None:
                header = row
                continue
            record = dict(zip(header, row))
            if record.get("Metric Name") != "gpu__time_duration.sum":
                continue
            value = float(record["Metric Value"].replace(",", ""))
            unit = record.get("Metric Unit", "ns")
            scale = {"ns": 1.0, "nsecond": 1.0, "us": 1e3, "usecond": 1e3, "ms": 1e6, "msecond": 1e6}
            kernels.append((record["Kernel Name"], record.get("Grid Size", ""), value * scale.get(unit, 1.0)))
    if not kernels:
        sys.exit(f"{path}: no kernel durations found (was it written by ncu --csv?)")
    return kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from_csv", help="summarise this ncu CSV (.csv or .csv.gz) instead of profiling")
    parser.add_argument("--csv_out", default="kernel_profile.csv", help="where ncu's CSV goes")
    parser.add_argument("--top", type=int, default=25, help="rows to print")
    parser.add_argument("--by_shape", action="store_true", help="group by kernel name and launch grid")
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
    groups: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for name, grid, duration in kernels:
        # Template arguments make C++ kernel names unreadable; keep the name before them.
        short = name.split("(")[0].split("<")[0][:60]
        key = (short, grid if args.by_shape else "")
        groups[key][0] += 1
        groups[key][1] += duration
    total = sum(duration for _, _, duration in kernels)
    print(f"{len(kernels)} kernels, {total / 1e6:.2f} ms of GPU time")
    print(f"| kernel{' | grid' if args.by_shape else ''} | launches | ms | share |")
    print(f"|---{'|---' if args.by_shape else ''}|---|---|---|")
    ranked = sorted(groups.items(), key=lambda item: -item[1][1])
    for (name, grid), (count, duration) in ranked[: args.top]:
        shape = f" | {grid}" if args.by_shape else ""
        print(f"| `{name}`{shape} | {count} | {duration / 1e6:.2f} | {100 * duration / total:.1f} % |")


if __name__ == "__main__":
    main()

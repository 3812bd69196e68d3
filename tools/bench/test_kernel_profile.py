"""kernel_profile.py on a CSV in ncu's format (no GPU needed): scripts/test.sh runs these."""

import gzip
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import kernel_profile  # noqa: E402

HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream",'
          '"Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit",'
          '"Metric Value"')


def row(kernel_id, name, grid, metric, unit, value):
    return (f'"{kernel_id}","7","oxtune","127.0.0.1","{name}","1","13","(256, 1, 1)","{grid}",'
            f'"0","9.0","Command line profiler metrics","{metric}","{unit}","{value}"')


# Two decode steps, each ending in the two-stage argmax, after some set-up work.
LAUNCHES = [
    ("init_weights(float *)", "(64, 1, 1)", "1,000", "4,096"),
    ("gemv(const bf16 *)", "(384, 1, 1)", "20,000", "60,000,000"),
    ("fast_argmax_f32", "(128, 1, 1)", "5,000", "1,000"),
    ("fast_argmax_f32", "(1, 1, 1)", "3,000", "0"),
    ("gemv(const bf16 *)", "(384, 1, 1)", "10,000", "40,000,000"),
    ("gemv(const bf16 *)", "(384, 1, 1)", "30,000", "80,000,000"),
    ("paged_attention<4>(const bf16 *)", "(1, 8, 1)", "16,000", "16,000"),
    ("fast_argmax_f32", "(128, 1, 1)", "5,000", "1,000"),
    ("fast_argmax_f32", "(1, 1, 1)", "3,000", "0"),
]


@pytest.fixture
def csv_path(tmp_path):
    lines = ["==PROF== Connected to process 7", HEADER]
    for kernel_id, (name, grid, duration, read) in enumerate(LAUNCHES):
        # ncu writes one row per metric; the DRAM bytes of some kernels come in other units
        lines.append(row(kernel_id, name, grid, "gpu__time_duration.sum", "ns", duration))
        if kernel_id == 5:
            lines.append(row(kernel_id, name, grid, "dram__bytes_read.sum", "Mbyte", "80.00"))
        else:
            lines.append(row(kernel_id, name, grid, "dram__bytes_read.sum", "byte", read))
    path = tmp_path / "profile.csv.gz"
    with gzip.open(path, "wt") as out:
        out.write("\n".join(lines) + "\n")
    return str(path)


def test_reads_every_kernel_in_launch_order_with_units_applied(csv_path):
    kernels = kernel_profile.read_kernels(csv_path)
    assert [k.name for k in kernels] == [name for name, *_ in LAUNCHES]
    assert kernels[1] == kernel_profile.Kernel("gemv(const bf16 *)", "(384, 1, 1)", 20000.0, 6e7)
    assert kernels[5].dram_read_bytes == pytest.approx(8e7)


def test_the_last_step_runs_from_one_run_of_the_marker_through_the_next(csv_path):
    step = kernel_profile.last_step(kernel_profile.read_kernels(csv_path), "argmax")
    assert [k.duration_ns for k in step] == [10000.0, 30000.0, 16000.0, 5000.0, 3000.0]


def test_a_profile_without_two_marker_runs_is_refused(csv_path):
    kernels = kernel_profile.read_kernels(csv_path)[:4]
    with pytest.raises(SystemExit, match="fewer than two runs"):
        kernel_profile.last_step(kernels, "argmax")


def test_the_summary_groups_by_name_and_grid_heaviest_first(csv_path):
    out = subprocess.run(
        [sys.executable, os.path.join(HERE, "kernel_profile.py"), "--from_csv", csv_path,
         "--by_shape", "--step_marker", "argmax"],
        check=True, capture_output=True, text=True).stdout.splitlines()
    assert out[0] == "5 kernels, 0.064 ms of GPU time"
    # 120 MB over 40 µs of the two gemv launches: 3000 GB/s
    assert out[3] == "| `gemv` | (384, 1, 1) | 2 | 0.040 | 20.00 | 62.5 % | 3000 GB/s |"
    assert out[4].startswith("| `paged_attention` | (1, 8, 1) | 1 | 0.016 | 16.00 | 25.0 % |")
    assert len(out) == 3 + 4  # gemv, paged_attention, and the argmax at its two grids

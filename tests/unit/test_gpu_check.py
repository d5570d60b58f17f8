"""``make gpu-check``: one line and exit 0 without a GPU; a readable report from what it gathered."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tools import gpu_check  # noqa: E402
from tools.bench_measure import ok, skipped  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_without_a_gpu_it_says_so_in_one_line_and_exits_0() -> None:
    done = subprocess.run([sys.executable, "tools/gpu_check.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no GPU here"), done.stdout


def test_the_report_names_every_test_figure_and_benchmark_line() -> None:
    check = {
        "date": "2026-11-29", "torch": "2.11.0", "cuda": "12.8", "command": "python tools/gpu_check.py",
        "nvml": {"driver": "580.1", "gpus": [{"name": "NVIDIA H200", "memory_total_gib": 139.8, "compute_mode": 0}],
                 "mps_control": "/usr/bin/nvidia-cuda-mps-control"},
        "tests": {"seconds": 80.0, "exit": 1, "figures": ["one job 40.0 ms, 8 concurrent jobs of 8 models 60.0 ms (1.50x)"],
                  "tests": [{"test": "test_cuda::test_a", "outcome": "passed", "seconds": 1.0, "detail": ""},
                            {"test": "test_gpu_mps::test_b", "outcome": "failed", "seconds": 2.0, "detail": "boom"}]},
        "bench": {"seconds": 90.0, "exit": 0, "report": {"workloads": [{"name": "w1", "modes": {
            # Records as the benchmark writes them (tools.bench_measure.ok / skipped).
            "processes_mps": {**ok(1234.5, "samples/s", [0.002, 0.004], 1.0),
                              "mps": {"server": {"children_are_clients": True}}},
            "cohort_fused": ok(9999.0, "samples/s", [0.001], 1.0),
            "vmap_compiled": skipped("no compiler")}}]}},
    }
    text = gpu_check.render(check)
    assert "1 passed, 1 failed, 0 skipped" in text and "| test_gpu_mps::test_b | failed | 2.0 | boom |" in text
    assert "8 concurrent jobs" in text
    assert "w1/processes_mps: ok 1,234.5 samples/s, p50 2.000 ms (clients of the MPS server: True)" in text
    assert "w1/cohort_fused: ok 9,999.0 samples/s, p50 1.000 ms" in text
    assert "w1/vmap_compiled: skipped no compiler" in text
    assert "NVIDIA H200 (139.8 GiB" in text

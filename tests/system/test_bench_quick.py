"""``tools/bench.py --quick`` end to end: real coordinator, real processes, real files.

One small workload plus the control plane, into a temporary directory; the figures
must be there and positive, every mode measured or skipped with a reason, and no
process the benchmark started may outlive it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cohort_harness import started_by

ROOT = Path(__file__).resolve().parents[2]
MODES = ("sequential", "processes", "processes_mps", "vmap", "vmap_compiled", "cohort_per_model", "cohort_fused",
         "cohort_fused_pipelined", "cohort_fused_compiled")  # cohort_fused_shared: shared-batch workloads only
RUN_TIMEOUT_S = 200


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short private directory: ipc:// socket paths inside it must stay under ~107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="cbq-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)




def _run_bench(tmp: Path, out: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "tools/bench.py", "--quick", "--workload", "w1_mlp_infer", "control_plane", "--out", str(out)]
    env = {**os.environ, "TMPDIR": str(tmp)}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)  # bench.py unwinds and stops what it started
        stdout, stderr = process.communicate(timeout=60)
        pytest.fail(f"bench.py --quick ran past {RUN_TIMEOUT_S} s; stderr:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _check_mode(mode: str, result: dict[str, Any]) -> None:
    assert result["status"] in ("ok", "skipped"), f"{mode}: {result}"
    if result["status"] == "skipped":
        assert result["reason"], mode
        return
    assert result["throughput"] > 0 and result["unit"] == "samples/s", mode
    assert 0 < result["p50_ms"] <= result["p99_ms"], mode
    assert result["steps"] >= 1 and result["wall_s"] > 0, mode
    assert result["vs_sequential"] > 0 and result["vs_vmap"] > 0, mode


@pytest.mark.timeout(RUN_TIMEOUT_S + 90)
def test_quick_run_writes_every_figure_and_leaves_nothing_behind(short_tmp: Path) -> None:
    out = short_tmp / "report" / "quick.json"
    try:
        done = _run_bench(short_tmp, out)
        leftovers = started_by(short_tmp)
    finally:
        for process in started_by(short_tmp):  # never let a failed run leak into the next test
            process.kill()
    assert done.returncode == 0, done.stderr[-3000:]
    assert not leftovers, [p.cmdline() for p in leftovers]

    report = json.loads(out.read_text())
    assert report["quick"] is True
    assert report["machine"]["cores"] >= 1 and report["machine"]["cpu_model"]
    assert {"python", "torch", "cohort", "pyzmq"} <= set(report["versions"])
    assert "--quick" in report["command"] and str(out) in report["command"]

    [workload] = report["workloads"]
    assert workload["name"] == "w1_mlp_infer" and workload["count"] > 1
    assert tuple(workload["modes"]) == MODES
    for mode, result in workload["modes"].items():
        _check_mode(mode, result)
    modes = workload["modes"]
    assert modes["sequential"]["vs_sequential"] == 1.0
    for mode in ("sequential", "processes", "vmap", "cohort_per_model", "cohort_fused", "cohort_fused_pipelined"):
        assert modes[mode]["status"] == "ok", (mode, modes[mode])
    if report["device"] == "cpu":
        assert modes["processes_mps"]["status"] == "skipped" and "GPU" in modes["processes_mps"]["reason"]
    assert modes["cohort_fused"]["check"]["ok"], modes["cohort_fused"]["check"]

    control = report["control_plane"]
    for name in ("cohort", "zmq_echo", "process_pool"):
        system = control["systems"][name]
        assert system["status"] == "ok", (name, system)
        assert 0 < system["p50_ms"] <= system["p99_ms"] and system["jobs_s"] > 0, name
    assert control["ratios"]["cohort_p50_over_echo_p50"] > 0
    assert control["ratios"]["cohort_jobs_s_over_pool_jobs_s"] > 0

    markdown = out.with_suffix(".md").read_text()
    assert f"`{report['command']}`" in markdown
    assert "| w1_mlp_infer (infer, batch 64) |" in markdown and "| cohort p50 / echo p50 |" in markdown
    plot = report["artifacts"]["plot"]
    if plot["status"] == "ok":
        assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    else:
        assert plot["status"] == "skipped" and "matplotlib" in plot["reason"]

    for mode in MODES:  # one progress line per mode on stderr, so a long run is not silent
        assert f"w1_mlp_infer           {mode}" in done.stderr

#!/usr/bin/env python
"""Everything only a GPU can show, in one command: ``make gpu-check`` (at most ~8 minutes).

    python tools/gpu_check.py [--out-dir docs/bench] [--skip-bench] [--pytest-args ...]

On a machine without a CUDA GPU it says so in one line and exits 0. On a GPU it runs:

1. NVML figures: the GPU, driver, memory, compute mode, whether MPS can run;
2. the GPU tests (``tests/gpu``: CUDA IPC, equivalence with torch.optim in fp32 and bf16,
   stream overlap, every compile mode on four streams, bank operations while training,
   out of memory, a device fault under MPS, the hot path under sync-debug "error", MPS
   clients), each with its outcome and duration;
3. the benchmark's quick set on ``cuda``, ``processes_mps`` included, with MPS proven on;

and writes ``<out-dir>/<date>-cuda-check.json`` and ``.md``, then prints a summary that fits
on one screen. Exit code 0 when every test passed (skips allowed), 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TESTS_TIMEOUT_S = 330
BENCH_TIMEOUT_S = 150
FIGURE_LINES = re.compile(r"^(one job .*|MPS: .*|calls \d+, joined jobs \d+.*)$", re.M)


def has_cuda() -> tuple[bool, str]:
    try:
        import torch
    except ImportError as exc:
        return False, f"torch cannot be imported ({exc})"
    if not torch.cuda.is_available():
        return False, f"torch {torch.__version__} sees no CUDA GPU (torch.cuda.is_available() is False)"
    return True, ""


def nvml_figures() -> dict[str, Any]:
    try:
        import pynvml as nvml

        nvml.nvmlInit()
    except Exception as exc:  # reported, not fatal: the tests still run
        return {"error": f"NVML unavailable: {exc}"}
    try:
        gpus = []
        for i in range(nvml.nvmlDeviceGetCount()):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            mem = nvml.nvmlDeviceGetMemoryInfo(h)
            gpus.append({"index": i, "name": _text(nvml.nvmlDeviceGetName(h)), "uuid": _text(nvml.nvmlDeviceGetUUID(h)),
                         "memory_total_gib": round(mem.total / 2**30, 1), "memory_used_gib": round(mem.used / 2**30, 2),
                         "compute_mode": int(nvml.nvmlDeviceGetComputeMode(h))})
        return {"driver": _text(nvml.nvmlSystemGetDriverVersion()), "cuda_driver": nvml.nvmlSystemGetCudaDriverVersion(),
                "gpus": gpus, "mps_control": shutil.which("nvidia-cuda-mps-control")}
    finally:
        nvml.nvmlShutdown()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def run_tests(work: Path, extra: list[str]) -> dict[str, Any]:
    junit = work / "gpu-tests.xml"
    log = work / "gpu-tests.log"
    command = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "tests/gpu",
               f"--junitxml={junit}", "-o", "timeout=600", *extra]
    began = time.monotonic()
    with open(log, "w") as out:
        try:
            code = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=TESTS_TIMEOUT_S).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    text = log.read_text(errors="replace")
    tests = []
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            outcome, detail = "passed", ""
            for kind in ("failure", "error", "skipped"):
                node = case.find(kind)
                if node is not None:
                    outcome = "skipped" if kind == "skipped" else "failed"
                    detail = (node.get("message") or "")[:300]
            tests.append({"test": f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}",
                          "outcome": outcome, "seconds": round(float(case.get("time", 0)), 2), "detail": detail})
    return {"exit": code, "seconds": round(time.monotonic() - began, 1), "tests": tests,
            "figures": FIGURE_LINES.findall(text), "log_tail": text[-4000:]}


def run_bench(work: Path) -> dict[str, Any]:
    out = work / "bench-quick.json"
    command = [sys.executable, "tools/bench.py", "--quick", "--device", "cuda", "--out", str(out)]
    began = time.monotonic()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S)
        code: Any = done.returncode
        tail = (done.stdout + done.stderr)[-3000:]
    except subprocess.TimeoutExpired as exc:
        code, tail = "timeout", str(exc.stdout or "")[-3000:]
    report = json.loads(out.read_text()) if out.exists() else None
    return {"exit": code, "seconds": round(time.monotonic() - began, 1), "report": report, "log_tail": tail}


def bench_lines(bench: dict[str, Any]) -> list[str]:
    """One line per workload and mode: its figure, and for processes_mps whether MPS was proven."""
    report = bench.get("report") or {}
    lines = []
    for workload in report.get("workloads", []):
        for mode, result in sorted(workload.get("modes", {}).items()):
            status = result.get("status", "?")
            if status != "ok":
                figure = str(result.get("reason", ""))[:120]
            elif "throughput" in result:  # tools.bench_measure.ok
                figure = f"{result['throughput']:,.1f} {result.get('unit', '')}, p50 {result.get('p50_ms', float('nan')):.3f} ms"
            else:  # the control plane's record
                figure = f"p50 {result.get('p50_ms', float('nan')):.3f} ms"
            proof = ""
            if mode == "processes_mps":
                mps = result.get("mps") or {}
                proof = f" (clients of the MPS server: {mps.get('server', {}).get('children_are_clients')})"
            lines.append(f"{workload.get('name', '?')}/{mode}: {status} {figure}{proof}")
    return lines


def render(check: dict[str, Any]) -> str:
    nvml = check["nvml"]
    gpus = ", ".join(f"{g['name']} ({g['memory_total_gib']} GiB, compute mode {g['compute_mode']})"
                     for g in nvml.get("gpus", [])) or nvml.get("error", "?")
    tests = check["tests"]["tests"]
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "skipped")}
    lines = [f"# cohort GPU check, {check['date']}", "",
             f"- GPU: {gpus}; driver {nvml.get('driver', '?')}; MPS control: {nvml.get('mps_control') or 'absent'}",
             f"- torch {check['torch']}, CUDA {check['cuda']}", f"- command: `{check['command']}`", "",
             f"## GPU tests: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped "
             f"({check['tests']['seconds']} s)", "", "| test | outcome | s | detail |", "|---|---|---:|---|"]
    lines += [f"| {t['test']} | {t['outcome']} | {t['seconds']} | {t['detail'][:120]} |" for t in tests]
    lines += ["", "## Figures printed by the tests", ""] + [f"- {f}" for f in check["tests"]["figures"]]
    if check.get("bench") is not None:
        lines += ["", f"## Benchmark, quick set on cuda ({check['bench']['seconds']} s, exit {check['bench']['exit']})", ""]
        lines += [f"- {line}" for line in bench_lines(check["bench"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default=str(ROOT / "docs" / "bench"))
    parser.add_argument("--skip-bench", action="store_true", help="only NVML figures and the GPU tests")
    parser.add_argument("--pytest-args", nargs=argparse.REMAINDER, default=[], help="passed on to pytest")
    args = parser.parse_args(argv)
    ok, why = has_cuda()
    if not ok:
        print(f"gpu-check: no GPU here: {why}; nothing to check.")
        return 0
    import torch

    date = datetime.date.today().isoformat()
    work = Path(tempfile.mkdtemp(prefix="cohort-gpu-check-"))
    check: dict[str, Any] = {"date": date, "torch": torch.__version__, "cuda": torch.version.cuda,
                             "command": " ".join([os.path.basename(sys.executable), *sys.argv]), "nvml": nvml_figures()}
    print("gpu-check: NVML", json.dumps(check["nvml"]), flush=True)
    print(f"gpu-check: GPU tests (up to {TESTS_TIMEOUT_S} s) ...", flush=True)
    check["tests"] = run_tests(work, args.pytest_args)
    if not args.skip_bench:
        print(f"gpu-check: benchmark quick set on cuda (up to {BENCH_TIMEOUT_S} s) ...", flush=True)
        check["bench"] = run_bench(work)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{date}-cuda-check.json").write_text(json.dumps(check, indent=2, default=str) + "\n")
    markdown = render(check)
    (out_dir / f"{date}-cuda-check.md").write_text(markdown)
    print(markdown)
    print(f"gpu-check: written {out_dir / f'{date}-cuda-check.json'} and .md")
    failed = any(t["outcome"] == "failed" for t in check["tests"]["tests"]) or check["tests"]["exit"] not in (0, 5)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Benchmark: what users would do otherwise, against cohort, on the same workloads in one run.

    python tools/bench.py [--quick] [--out FILE.json] [--workload NAME ...] [--mode NAME ...]

Workloads (``--workload``, default all): w1_mlp_infer, w1_scaling, w2_cnn_train,
w3_transformer_train, control_plane. Modes (``--mode``, default all), each on the
same models, seeds and data:

    sequential        one process looping over the K models (the baseline)
    processes         N plain processes, each with its share of the models, side by side
    processes_mps     the same under a private CUDA MPS daemon (GPU only)
    vmap              raw in-process torch.func.vmap over stacked weights (the reference)
    vmap_compiled     the same through torch.compile
    cohort_per_model  a real coordinator; K concurrent per-model jobs per step
    cohort_fused      the same coordinator; one ensemble / train_round per step

Writes FILE.json (default docs/bench/<date>-<device>.json), FILE.md (a table for the
README) and FILE.png (when matplotlib is installed: ``pip install 'cohort[bench]'``).
Progress goes to stderr, one line per mode. A mode that fails is recorded with its
error and the run goes on; every process it starts is stopped before it exits.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import signal
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `tools`, `scheduler` and `examples` importable
    sys.path.insert(0, str(ROOT))

# Only light imports up here: spawned benchmark processes re-import this file.
from tools.bench_measure import Result, describe, error, with_gpu_metrics  # noqa: E402

MODES = (
    "sequential",
    "processes",
    "processes_mps",
    "vmap",
    "vmap_compiled",
    "cohort_per_model",
    "cohort_fused",
)
WORKLOADS = ("w1_mlp_infer", "w1_scaling", "w2_cnn_train", "w3_transformer_train", "control_plane")

Progress = Callable[[str, str, Result], None]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes and few steps: a smoke run of about a minute")
    parser.add_argument("--out", help="JSON file to write (.md and .png go beside it); default docs/bench/<date>-<device>.json")
    parser.add_argument("--workload", nargs="+", action="extend", choices=WORKLOADS, metavar="NAME",
                        help=f"workloads to run (default all): {', '.join(WORKLOADS)}")
    parser.add_argument("--mode", nargs="+", action="extend", choices=MODES, metavar="NAME",
                        help=f"modes to run (default all): {', '.join(MODES)}")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda if available")
    return parser.parse_args(argv)


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.py: --device cuda, but torch sees no CUDA device")
    return name


# ---------------------------------------------------------------------- progress


def figure(result: Result) -> str:
    """A result in a few words, for the progress line."""
    if result.get("status") != "ok":
        return f"{result.get('status', '?').upper()}: {result.get('reason', '')}"
    if "throughput" in result:
        return f"{result['throughput']:>12,.0f} {result['unit']}  p50 {result['p50_ms']:.2f} ms  p99 {result['p99_ms']:.2f} ms"
    return f"p50 {result['p50_ms']:.3f} ms  p99 {result['p99_ms']:.3f} ms  {result['jobs_s']:,.0f} jobs/s"


def progress_printer(started: float) -> Progress:
    def show(workload: str, mode: str, result: Result) -> None:
        print(f"[bench {time.monotonic() - started:6.1f}s] {workload:<22} {mode:<17} {figure(result)}", file=sys.stderr, flush=True)

    return show


# ---------------------------------------------------------------------- running


def attempt(run: Callable[[], Result]) -> Result:
    """Run one mode; any exception becomes that mode's recorded error."""
    try:
        return run()
    except Exception as exc:  # noqa: BLE001 - the run goes on with the other modes
        return error(describe(exc))


def baseline_runners(quick: bool) -> dict[str, Callable[[Any, str], Result]]:
    from tools.bench_baselines import run_processes, run_processes_mps, run_sequential
    from tools.bench_vmap import run_vmap, run_vmap_compiled

    return {
        "sequential": run_sequential,
        "processes": run_processes,
        "processes_mps": run_processes_mps,
        "vmap": run_vmap,
        "vmap_compiled": lambda w, d: run_vmap_compiled(w, d, quick),
    }


def workload_record(workload: Any) -> dict[str, Any]:
    return {
        "name": workload.name,
        "task": workload.task,
        "factory": workload.factory,
        "kwargs": workload.kwargs,
        "count": workload.count,
        "batch": workload.batch,
        "input_shape": list(workload.input_shape),
        "input_dtype": workload.input_dtype,
        "loss": workload.loss,
        "optimizer": workload.optimizer,
        "warmup_steps": workload.warmup,
        "max_steps": workload.steps,
        "budget_s": workload.budget_s,
    }


def run_workload(workload: Any, device: str, modes: list[str], quick: bool, progress: Progress) -> dict[str, Any]:
    """Every asked-for mode on one workload, baselines first, then cohort on one coordinator."""
    from tools.bench_cohort import COHORT_MODES, run_cohort
    from tools.bench_report import add_ratios

    runners = baseline_runners(quick)
    results: dict[str, Result] = {}
    for mode in (m for m in modes if m in runners):
        began = time.monotonic()
        results[mode] = attempt(lambda: with_gpu_metrics(device, lambda: runners[mode](workload, device)))
        results[mode]["mode_s"] = time.monotonic() - began
        progress(workload.name, mode, results[mode])
    cohort_modes = [m for m in modes if m in COHORT_MODES]
    if cohort_modes:
        results.update(run_cohort(workload, device, cohort_modes, lambda m, r: progress(workload.name, m, r)))
    ordered = {mode: results[mode] for mode in MODES if mode in results}
    add_ratios(ordered)
    return {**workload_record(workload), "modes": ordered}


def clean(value: Any) -> Any:
    """JSON without NaN or infinity (not JSON): those become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(clean(report), indent=2) + "\n")
    partial.replace(path)


def command_line(argv: list[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    script = Path(__file__).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return shlex.join(["python", str(shown), *args])


def default_out(date: str, label: str) -> Path:
    return ROOT / "docs" / "bench" / f"{date}-{label}.json"


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    from tools.bench_control import run_control_plane
    from tools.bench_report import device_label, render_markdown, system_info, write_plot
    from tools.bench_workloads import ControlPlane, select

    started = time.monotonic()
    progress = progress_printer(started)
    device = resolve_device(args.device)
    info = system_info(device)
    now = datetime.now().astimezone()
    out = Path(args.out) if args.out else default_out(now.date().isoformat(), device_label(device, info["gpu"]))
    modes = list(dict.fromkeys(args.mode or MODES))
    report: dict[str, Any] = {
        "schema": 1,
        "date": now.date().isoformat(),
        "started_at": now.isoformat(timespec="seconds"),
        "command": command,
        "quick": args.quick,
        "device": device,
        **info,
        "modes": modes,
        "workloads": [],
    }
    print(f"[bench] {device} ({info['machine']['cpu_model']}, {info['machine']['cores']} cores) -> {out}", file=sys.stderr)
    for workload in select(args.workload, args.quick):
        if isinstance(workload, ControlPlane):
            report["control_plane"] = run_control_plane(workload, device, lambda n, r: progress("control_plane", n, r))
        else:
            report["workloads"].append(run_workload(workload, device, modes, args.quick, progress))
        report["duration_s"] = time.monotonic() - started
        write_json(report, out)  # after every workload: a crash late in a long run keeps the rest
    markdown, plot = out.with_suffix(".md"), out.with_suffix(".png")
    markdown.write_text(render_markdown(report))
    report["artifacts"] = {"json": str(out), "markdown": str(markdown), "plot": write_plot(report, plot)}
    report["duration_s"] = time.monotonic() - started
    write_json(report, out)
    return report


def _terminated(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through every finally: coordinators get stopped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminated)
    report = run(args, command_line(argv))
    failed = [
        f"{w['name']}/{m}" for w in report["workloads"] for m, r in w["modes"].items() if r.get("status") == "error"
    ] + [f"control_plane/{n}" for n, r in report.get("control_plane", {}).get("systems", {}).items() if r.get("status") == "error"]
    artifacts = report["artifacts"]
    plot = artifacts["plot"]
    print(f"[bench] done in {report['duration_s']:.0f} s: {artifacts['json']}, {artifacts['markdown']}, "
          f"plot {plot.get('path') or plot['status'] + ': ' + plot['reason']}", file=sys.stderr)
    if failed:
        print(f"[bench] {len(failed)} mode(s) failed, errors recorded in the JSON: {', '.join(failed)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

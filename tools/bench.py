#!/usr/bin/env python
"""Benchmark: what users would do otherwise, against cohort, on the same workloads in one run.

    python tools/bench.py [--quick] [--out FILE.json] [--workload NAME ...] [--mode NAME ...]
                          [--repeat N] [--device auto|cpu|cuda]

Workloads (``--workload``, default all): w1_mlp_infer, w1_scaling, w2_cnn_train,
w3_transformer_train, w4_sweep_train (a sweep: every model trains on one shared batch),
control_plane, load_curve (per-job cost against jobs in flight, per plan and as the workers
choose: tools/bench_load.py). Modes (``--mode``, default all), each on the same models, seeds and data:

    sequential        one process looping over the K models (the baseline)
    processes         N plain processes, each with its share of the models, side by side
    processes_mps     the same under a private CUDA MPS daemon (GPU only)
    vmap              raw in-process torch.func.vmap over stacked weights (the reference)
    vmap_compiled     the same through torch.compile
    cohort_per_model  a real coordinator; K concurrent per-model jobs per step
    cohort_fused      the same coordinator; one ensemble / train_round per step (a round's
                      inputs stacked [K, B, ...]: K copies of the batch in a sweep)
    cohort_fused_pipelined  the same requests kept 4 in flight (as Client.map keeps them),
                      so the coordinator and workers work on the next while one answers
    cohort_fused_shared  w4_sweep_train only: one train_round(group, x, t) per step, the
                      shared batch sent once for every model
    cohort_fused_compiled  the same with the group's fused calls through torch.compile
                      (batching.compile = true); skipped with --quick

Writes FILE.json (default docs/bench/<date>-<device>.json), FILE.md (a table for the
README) and FILE.png (when matplotlib is installed: ``pip install 'cohort[bench]'``).
Progress goes to stderr, one line per mode. A mode that fails is recorded with its
error and the run goes on; every process it starts is stopped before it exits.
``--repeat N`` (default 2; 1 with --quick) runs every workload N times and keeps each
mode's best run: other load on a shared machine only ever slows a run down.
"""

from __future__ import annotations

import argparse
import json
import math
import os
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
from tools.bench_measure import Result, best_of, describe, error, release, with_gpu_metrics  # noqa: E402

MODES = (
    "sequential",
    "processes",
    "processes_mps",
    "vmap",
    "vmap_compiled",
    "cohort_per_model",
    "cohort_fused",
    "cohort_fused_pipelined",
    "cohort_fused_shared",
    "cohort_fused_compiled",
)
FULL_REPEAT = 2  # a full run takes each mode's best of two
WORKLOADS = ("w1_mlp_infer", "w1_scaling", "w2_cnn_train", "w3_transformer_train", "w4_sweep_train", "control_plane",
             "load_curve")

Progress = Callable[[str, str, Result], None]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes and few steps: a smoke run of about a minute")
    parser.add_argument("--out", help="JSON file to write (.md and .png go beside it); default docs/bench/<date>-<device>.json")
    parser.add_argument("--workload", nargs="+", action="extend", choices=WORKLOADS, metavar="NAME",
                        help=f"workloads to run (default all): {', '.join(WORKLOADS)}")
    parser.add_argument("--mode", nargs="+", action="extend", choices=MODES, metavar="NAME",
                        help=f"modes to run (default all): {', '.join(MODES)}")
    parser.add_argument("--repeat", type=_positive, metavar="N",
                        help="run each workload N times and keep each mode's best; damps other load on the "
                             f"machine (default {FULL_REPEAT}, or 1 with --quick)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda if available")
    args = parser.parse_args(argv)
    if args.repeat is None:
        args.repeat = 1 if args.quick else FULL_REPEAT
    return args


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
        print(f"[bench {time.monotonic() - started:6.1f}s] {workload:<22} {mode:<22} {figure(result)}", file=sys.stderr, flush=True)

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
        "shared_batch": workload.shared,
    }


def run_workloads(workloads: list[Any], device: str, modes: list[str], quick: bool, progress: Progress) -> list[dict[str, Any]]:
    """Every asked-for mode on workloads that go together (the K sweep): the baselines of
    each, then cohort on one coordinator holding all of them, one group per workload."""
    from tools.bench_cohort import COHORT_MODES, COMPILED_MODE, run_cohort
    from tools.bench_measure import skipped

    runners = baseline_runners(quick)
    results: dict[str, dict[str, Result]] = {w.name: {} for w in workloads}
    for workload in workloads:
        for mode in (m for m in modes if m in runners):
            began = time.monotonic()
            result = attempt(lambda: with_gpu_metrics(device, lambda: runners[mode](workload, device)))  # noqa: B023
            result["mode_s"] = time.monotonic() - began
            release(device)
            results[workload.name][mode] = result
            progress(workload.name, mode, result)
    cohort_modes = [m for m in modes if m in COHORT_MODES]
    if quick and COMPILED_MODE in cohort_modes:
        cohort_modes.remove(COMPILED_MODE)
        for workload in workloads:
            results[workload.name][COMPILED_MODE] = skipped("--quick: compiling takes longer than the whole quick run")
            progress(workload.name, COMPILED_MODE, results[workload.name][COMPILED_MODE])
    if cohort_modes:
        for name, by_mode in run_cohort(workloads, device, cohort_modes, progress).items():
            results[name].update(by_mode)
    return [
        {**workload_record(w), "modes": {m: results[w.name][m] for m in MODES if m in results[w.name]}}
        for w in workloads
    ]


def repeated(run_once: Callable[[Progress], Any], repeat: int, progress: Progress) -> list[Any]:
    """``run_once`` ``repeat`` times; progress lines say which repeat when there are several."""
    if repeat == 1:
        return [run_once(progress)]
    return [
        run_once(lambda w, m, r, i=i: progress(f"{w} {i + 1}/{repeat}", m, r))
        for i in range(repeat)
    ]


def merge_workload_runs(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Repeats of the same workloads as one record each: every mode's best repeat, then ratios
    and model-steps/s."""
    from tools.bench_report import add_model_steps, add_ratios

    records = []
    for index, first in enumerate(runs[0]):
        modes = {mode: best_of([run[index]["modes"][mode] for run in runs]) for mode in first["modes"]}
        add_ratios(modes)
        add_model_steps(modes, first.get("batch"))
        records.append({**first, "modes": modes})
    return records


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


def environment() -> dict[str, Any]:
    """Settings that move the figures: thread counts, OpenMP's wait policy, the load before the run."""
    import torch

    return {
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": list(os.getloadavg()),
    }


def default_out(date: str, label: str) -> Path:
    return ROOT / "docs" / "bench" / f"{date}-{label}.json"


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    from tools.bench_control import merge_control_runs, run_control_plane
    from tools.bench_report import device_label, render_markdown, system_info, write_plot
    from tools.bench_workloads import ControlPlane, all_workloads

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
        "repeat": args.repeat,
        "device": device,
        **info,
        "environment": environment(),
        "modes": modes,
        "workloads": [],
    }
    print(f"[bench] {device} ({info['machine']['cpu_model']}, {info['machine']['cores']} cores) -> {out}", file=sys.stderr)
    table = all_workloads(args.quick)
    for name in dict.fromkeys(args.workload or WORKLOADS):
        if name == "load_curve":
            from tools.bench_load import run_load_curve

            report["load_curve"] = run_load_curve(args.quick, device, lambda line: print(line, file=sys.stderr, flush=True))
            report["duration_s"] = time.monotonic() - started
            write_json(report, out)
            continue
        items = table[name]
        if isinstance(items[0], ControlPlane):
            runs = repeated(
                lambda show: run_control_plane(items[0], device, lambda n, r: show(name, n, r)),  # noqa: B023
                args.repeat, progress,
            )
            report["control_plane"] = merge_control_runs(runs)
        else:
            runs = repeated(lambda show: run_workloads(items, device, modes, args.quick, show), args.repeat, progress)  # noqa: B023
            report["workloads"] += merge_workload_runs(runs)
        report["duration_s"] = time.monotonic() - started
        write_json(report, out)  # after every workload: a crash late in a long run keeps the rest
    report["environment"]["load_average_at_end"] = list(os.getloadavg())
    markdown, plot = out.with_suffix(".md"), out.with_suffix(".png")
    markdown.write_text(render_markdown(report))
    report["artifacts"] = {"json": str(out), "markdown": str(markdown), "plot": write_plot(report, plot)}
    if report.get("load_curve"):
        from tools.bench_load import write_plot as write_load_plot

        report["artifacts"]["load_plot"] = write_load_plot(report["load_curve"], out.with_name(out.stem + "-load.png"))
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

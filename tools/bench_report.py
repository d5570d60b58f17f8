"""What a benchmark run leaves behind: the machine it ran on, ratios, Markdown and a plot.

Pure functions of the report dictionary (except ``system_info``, which looks at the
machine, and ``write_plot``, which writes a file), so the tests can check them on
made-up figures.
"""

from __future__ import annotations

import math
import os
import platform
import re
import sys
from pathlib import Path
from typing import Any

from tools.bench_measure import Result, nvml_available, nvml_device_info

SEQUENTIAL, REFERENCE = "sequential", "vmap"
DASH = "–"


# ---------------------------------------------------------------------- the machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def system_info(device: str) -> dict[str, Any]:
    """Machine, GPU and library versions: what a reader needs to compare two reports."""
    import msgspec
    import psutil
    import torch
    import zmq

    import scheduler

    gpu: dict[str, Any] | None = None
    if device.startswith("cuda"):
        gpu = {"name": torch.cuda.get_device_name(0), "cuda": torch.version.cuda}
        if nvml_available() is None:
            gpu.update(nvml_device_info(0))
    return {
        "machine": {
            "cpu_model": _cpu_model(),
            "cores": os.cpu_count(),
            "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(),
        },
        "gpu": gpu,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cohort": scheduler.__version__,
            "pyzmq": zmq.__version__,
            "libzmq": zmq.zmq_version(),
            "msgspec": msgspec.__version__,
            "python_executable": sys.executable,
        },
    }


def device_label(device: str, gpu: dict[str, Any] | None) -> str:
    """``cpu``, or the GPU's name as a file-name slug (``nvidia-h100-80gb-hbm3``)."""
    if gpu is None or not device.startswith("cuda"):
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", str(gpu.get("gpu_name") or gpu["name"]).lower()).strip("-") or "cuda"


# ---------------------------------------------------------------------- ratios


def add_ratios(modes: dict[str, Result]) -> None:
    """Give every measured mode its throughput as a multiple of sequential's and of vmap's."""
    for base, key in ((SEQUENTIAL, "vs_sequential"), (REFERENCE, "vs_vmap")):
        reference = modes.get(base, {})
        ok = reference.get("status") == "ok" and reference.get("throughput", 0) > 0
        for result in modes.values():
            if result.get("status") == "ok":
                result[key] = result["throughput"] / reference["throughput"] if ok else None


def add_model_steps(modes: dict[str, Result], batch: int | None) -> None:
    """Give every measured mode its throughput in model-steps/s (one model's step on one batch)."""
    if not batch:
        return
    for result in modes.values():
        if result.get("status") == "ok" and "throughput" in result:
            result["model_steps_per_s"] = result["throughput"] / batch


# ---------------------------------------------------------------------- markdown


def _number(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return DASH
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _times(value: Any) -> str:
    return DASH if value is None else f"{value:.2f}×"


def _mode_row(label: str, count: str, mode: str, result: Result, gpu_column: bool) -> str:
    if result.get("status") != "ok":
        reason = str(result.get("reason", "")).replace("|", "/")
        return f"| {label} | {count} | {mode} | {result.get('status')}: {reason} | | | | |" + (" |" if gpu_column else "")
    row = (
        f"| {label} | {count} | {mode} | {_number(result['throughput'])} {result['unit']} | "
        f"{_number(result['p50_ms'], 2)} | {_number(result['p99_ms'], 2)} | "
        f"{_times(result.get('vs_sequential'))} | {_times(result.get('vs_vmap'))} |"
    )
    if gpu_column:
        gpu = result.get("gpu") or {}
        row += f" {_number(gpu.get('mean_util_pct'))} / {_number(gpu.get('peak_memory_mib'), 0)} |" if gpu else f" {DASH} |"
    return row


def _workload_rows(workload: dict[str, Any], gpu_column: bool) -> list[str]:
    rows = []
    label = f"{workload['name']} ({workload['task']}, batch {workload['batch']})"
    for index, (mode, result) in enumerate(workload["modes"].items()):
        first = index == 0
        rows.append(_mode_row(label if first else "", str(workload["count"]) if first else "", mode, result, gpu_column))
    return rows


def _checks(workloads: list[dict[str, Any]]) -> list[str]:
    """One line per cohort group checked against plain PyTorch (the compiled twin has its own)."""
    lines = []
    for workload in workloads:
        seen: set[bool] = set()  # the workload's group, and its compiled twin: one check each
        for mode, result in workload["modes"].items():
            check, compiled = result.get("check"), mode.endswith("_compiled")
            if not check or not mode.startswith("cohort") or compiled in seen:
                continue
            seen.add(compiled)
            who = "cohort's compiled group's" if compiled else "cohort's"
            if "max_abs_diff" not in check:
                lines.append(f"- {workload['name']}: {who} results could not be checked: {check.get('error')}.")
                continue
            verdict = "match" if check["ok"] else "DIFFER from"
            lines.append(
                f"- {workload['name']}: {who} {check['compared']} {verdict} {check['against']}"
                f" (max abs diff {check['max_abs_diff']:.1e})."
            )
    return lines


SWEEP_MODES = {
    "cohort_per_model": "K train_step jobs",
    "cohort_fused": "train_round, inputs stacked [K, B, ...]",
    "cohort_fused_pipelined": "train_round stacked, 4 in flight",
    "cohort_fused_shared": "train_round(group, x, t), one batch",
    "cohort_fused_compiled": "train_round stacked, compiled",
}


def _bytes(value: Any) -> str:
    if value is None:
        return DASH
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:,.2f} {unit}"
    return f"{value} B"


def _sweeps(workloads: list[dict[str, Any]]) -> list[str]:
    """Shared-batch workloads: what each cohort mode sends per step, and what it gets done."""
    sweeps = [w for w in workloads if w.get("shared_batch")]
    if not sweeps:
        return []
    lines = [
        "## Sweeps: one shared batch against stacked copies",
        "",
        "Every model trains on the same batch. `cohort_fused` sends it stacked `[K, B, ...]` (K copies); "
        "`cohort_fused_shared` sends it once (`train_round(group, x, t)`). Bytes are the inputs and targets "
        "as the client encodes them, per step of all K models.",
        "",
        "| Workload | K | Mode | Request | Sent per step | Model-steps/s | × stacked |",
        "|---|---:|---|---|---:|---:|---:|",
    ]
    for workload in sweeps:
        modes = workload["modes"]
        stacked = modes.get("cohort_fused", {})
        base = stacked.get("model_steps_per_s") if stacked.get("status") == "ok" else None
        label = f"{workload['name']} (batch {workload['batch']}, input {workload.get('input_shape')})"
        first = True
        for mode, request in SWEEP_MODES.items():
            result = modes.get(mode)
            if result is None:
                continue
            head = f"| {label if first else ''} | {workload['count'] if first else ''} | {mode} | {request} |"
            first = False
            if result.get("status") != "ok":
                reason = str(result.get("reason", "")).replace("|", "/")
                lines.append(f"{head} {result.get('status')}: {reason} | | |")
                continue
            rate = result.get("model_steps_per_s")
            ratio = rate / base if rate is not None and base else None
            lines.append(f"{head} {_bytes(result.get('bytes_sent_per_step'))} | {_number(rate)} | {_times(ratio)} |")
    return lines


def _control_plane(cp: dict[str, Any]) -> list[str]:
    names = {"cohort": "cohort (Client.infer)", "zmq_echo": "raw ZeroMQ two-hop echo", "process_pool": "ProcessPoolExecutor no-op"}
    lines = [
        f"## Control plane (payload {cp['payload_bytes']} B, {cp['window']} jobs in flight when pipelined)",
        "",
        "| System | p50 ms | p99 ms | pipelined jobs/s |",
        "|---|---:|---:|---:|",
    ]
    for key, result in cp["systems"].items():
        if result.get("status") != "ok":
            lines.append(f"| {names.get(key, key)} | {result.get('status')}: {result.get('reason', '')} | | |")
            continue
        lines.append(
            f"| {names.get(key, key)} | {_number(result['p50_ms'], 3)} | {_number(result['p99_ms'], 3)} | {_number(result['jobs_s'])} |"
        )
    ratios = cp["ratios"]

    def met(flag: bool | None) -> str:
        return DASH if flag is None else ("yes" if flag else "no")

    lines += [
        "",
        "| Ratio | Value | Goal | Met |",
        "|---|---:|---:|---|",
        f"| cohort p50 / echo p50 | {_number(ratios['cohort_p50_over_echo_p50'], 2)} | ≤ {ratios['cohort_p50_goal_max']} "
        f"| {met(ratios['latency_goal_met'])} |",
        f"| cohort jobs/s / pool jobs/s | {_number(ratios['cohort_jobs_s_over_pool_jobs_s'], 2)} | "
        f"≥ {ratios['cohort_jobs_s_goal_min']} | {met(ratios['throughput_goal_met'])} |",
    ]
    return lines


def _environment_lines(env: dict[str, Any] | None) -> list[str]:
    if not env:
        return []
    loads = [env.get("load_average_at_start"), env.get("load_average_at_end")]
    load_text = " and ".join(f"{load[0]:.2f}" for load in loads if load)
    return [
        f"- Settings: OMP_WAIT_POLICY={env.get('OMP_WAIT_POLICY') or 'unset'}; {env.get('torch_threads')} torch threads in one process,"
        " shared out among processes where a mode has several. 1-minute load average at start and end: "
        f"{load_text or DASH}."
    ]


def render_markdown(report: dict[str, Any]) -> str:
    """The run as a Markdown section for the README: context, one table per part, the command."""
    machine, versions, gpu = report["machine"], report["versions"], report.get("gpu")
    gpu_text = "none" if not gpu else f"{gpu.get('gpu_name') or gpu.get('name')} (driver {gpu.get('driver_version', '?')})"
    lines = [
        f"# cohort benchmark: {report['date']}, {report['device']}{' (quick)' if report.get('quick') else ''}",
        "",
        f"Produced by `{report['command']}`.",
        "",
        f"- Machine: {machine['cpu_model']}, {machine['cores']} cores, {machine['ram_gib']} GiB RAM; GPU: {gpu_text}.",
        f"- Versions: cohort {versions['cohort']}, torch {versions['torch']}, Python {versions['python']}, "
        f"pyzmq {versions['pyzmq']} (libzmq {versions['libzmq']}).",
        *_environment_lines(report.get("environment")),
        "- Throughput counts samples (K models × batch) per second over the timed steps; warm-up excluded"
        + (f"; each figure the best of {report['repeat']} runs." if report.get("repeat", 1) > 1 else "."),
        "  A step is one pass of every model; p50/p99 are step latencies. "
        "× columns divide by `sequential` and by the raw in-process `vmap` reference.",
        "",
    ]
    workloads = report.get("workloads", [])
    if workloads:
        gpu_column = any(r.get("gpu") for w in workloads for r in w["modes"].values())
        header = "| Workload | K | Mode | Throughput | p50 ms | p99 ms | × sequential | × vmap |"
        rule = "|---|---:|---|---:|---:|---:|---:|---:|"
        if gpu_column:
            header, rule = header + " GPU util % / peak MiB |", rule + "---:|"
        lines += ["## Workloads", "", header, rule]
        for workload in workloads:
            lines += _workload_rows(workload, gpu_column)
        checks = _checks(workloads)
        if checks:
            lines += ["", *checks]
        lines.append("")
        sweeps = _sweeps(workloads)
        if sweeps:
            lines += [*sweeps, ""]
    if report.get("control_plane"):
        lines += [*_control_plane(report["control_plane"]), ""]
    if report.get("load_curve"):
        from tools.bench_load import render_load_curve

        lines += [*render_load_curve(report["load_curve"]), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------- plot


def _bar_panel(axis: Any, workloads: list[dict[str, Any]], modes: list[str]) -> None:
    width = 0.8 / max(1, len(modes))
    for m, mode in enumerate(modes):
        values = [w["modes"].get(mode, {}).get("vs_sequential") or 0.0 for w in workloads]
        positions = [i + (m - (len(modes) - 1) / 2) * width for i in range(len(workloads))]
        axis.bar(positions, values, width, label=mode)
    axis.axhline(1.0, color="black", linewidth=0.8)
    axis.set_xticks(range(len(workloads)), [w["name"] for w in workloads], rotation=20, ha="right", fontsize=8)
    axis.set_yscale("log")
    axis.set_ylabel("throughput × sequential (log)")
    axis.set_title("Speed-up over one process looping over the models")
    axis.legend(fontsize=7, ncol=2)


def _scaling_panel(axis: Any, workloads: list[dict[str, Any]], modes: list[str]) -> None:
    sweep = sorted((w for w in workloads if w["name"].startswith("w1_scaling")), key=lambda w: w["count"])
    for mode in modes:
        points = [(w["count"], w["modes"][mode]["throughput"]) for w in sweep if w["modes"].get(mode, {}).get("status") == "ok"]
        if points:
            axis.plot(*zip(*points), marker="o", label=mode)
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("K models")
    axis.set_ylabel("samples/s (log)")
    axis.set_title("MLP inference as K grows")
    axis.legend(fontsize=7)


def _control_panel(axis: Any, cp: dict[str, Any]) -> None:
    systems = [(k, v) for k, v in cp["systems"].items() if v.get("status") == "ok"]
    axis.bar([k for k, _ in systems], [v["p50_ms"] for _, v in systems], color="tab:blue", label="p50 ms")
    axis.set_ylabel("round trip p50 (ms)")
    twin = axis.twinx()
    twin.plot([k for k, _ in systems], [v["jobs_s"] for _, v in systems], "o", color="tab:red", label="jobs/s")
    twin.set_ylabel("pipelined jobs/s", color="tab:red")
    axis.set_title("Control plane: tiny jobs")


def write_plot(report: dict[str, Any], path: Path) -> dict[str, Any]:
    """A PNG of the figures; skipped (with the reason) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return {"status": "skipped", "reason": f"matplotlib is not installed ({exc}); pip install 'cohort[bench]'"}
    workloads = report.get("workloads", [])
    modes = list(dict.fromkeys(m for w in workloads for m, r in w["modes"].items() if r.get("status") == "ok"))
    panels = [p for p in ("bars", "scaling", "control") if _wanted(p, report, workloads)]
    if not panels:
        return {"status": "skipped", "reason": "nothing measured to plot"}
    figure, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False)
    for axis, panel in zip(axes[0], panels):
        if panel == "bars":
            _bar_panel(axis, workloads, modes)
        elif panel == "scaling":
            _scaling_panel(axis, workloads, modes)
        else:
            _control_panel(axis, report["control_plane"])
    figure.suptitle(f"cohort benchmark {report['date']} on {report['device']}: {report['machine']['cpu_model']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return {"status": "ok", "path": str(path)}


def _wanted(panel: str, report: dict[str, Any], workloads: list[dict[str, Any]]) -> bool:
    if panel == "bars":
        return bool(workloads)
    if panel == "scaling":
        return sum(w["name"].startswith("w1_scaling") for w in workloads) >= 2
    cp = report.get("control_plane")
    return bool(cp) and any(v.get("status") == "ok" for v in cp["systems"].values())

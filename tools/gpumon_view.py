"""The monitor's terminal view, drawn with rich.

`render(sample, history)` is pure: it reads a sample dict (see gpumon_sample) and the
sparkline history and returns a renderable, so it can be tested by printing to a
recording console. Values are read with .get and formatted defensively, because the
coordinator's stats may come from a newer or older cohort than this monitor.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from gpumon_history import History, gpu_index, sparkline
from rich.columns import Columns
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

TOP_MODELS = 24
MODELS_PER_BLOCK = 8
# The coordinator's worker states (scheduler/workerpool.py WorkerHandle.state).
_STATE_STYLES = {
    "new": "dim",
    "starting": "yellow",
    "ready": "green",
    "stopping": "yellow",
    "dead": "red",
}
MPS_NOTE = (
    "under MPS, NVML credits all GPU activity to nvidia-cuda-mps-server: utilization "
    "is per GPU only; memory per process is reliable"
)


def render(sample: Mapping[str, Any], history: History) -> RenderableType:
    """The whole view: header, GPUs, GPU processes, host, jobs, history, workers, models."""
    stats = sample.get("coordinator")
    # Most important first: a terminal too short for the whole view loses the bottom.
    parts: list[RenderableType] = [_header(sample)]
    parts.extend(_gpu_section(sample))
    parts.append(_host_line(sample))
    if stats:
        parts.append(_jobs_line(stats))
    else:
        parts.append(_coordinator_down_line(sample))
    parts.append(_sparklines(sample, history))
    if stats:
        parts.append(_workers_table(stats))
        plans = _plans_table(stats)
        if plans is not None:
            parts.append(plans)
        parts.append(_models_table(stats))
    return Group(*parts)


def _coordinator_down_line(sample: Mapping[str, Any]) -> Text:
    address = sample.get("address") or "?"
    down_since, now = sample.get("coordinator_down_since"), sample.get("time")
    since = ""
    if _is_number(down_since) and _is_number(now) and now - down_since >= 1:
        since = f" for {_duration(now - down_since)}"
    line = Text(f"coordinator: unreachable at {address}{since} (retrying)", style="bold red")
    if sample.get("coordinator_error"):
        line.append(f"  {sample['coordinator_error']}", style="dim")
    return line


def _header(sample: Mapping[str, Any]) -> Text:
    stats = sample.get("coordinator") or {}
    header = Text("cohort gpumon", style="bold")
    header.append(f"  {stats.get('address') or sample.get('address') or '?'}")
    header.append(f"  {_clock(sample.get('time'))}", style="dim")
    if stats:
        header.append("\ncoordinator", style="bold")
        header.append(f"  up {_duration(stats.get('uptime_s'))}")
        header.append(f"  device {stats.get('device', '?')}")
        header.append(f"  MPS {_mps_text(stats.get('mps') or {})}")
        if stats.get("cohort_version"):
            header.append(f"  cohort {stats['cohort_version']}", style="dim")
    return header


def _mps_text(mps: Mapping[str, Any]) -> str:
    """'on', or 'off (requested auto: device is cpu)' when the mode is not the one asked."""
    mode, requested = str(mps.get("mode", "?")), mps.get("requested")
    reason = str(mps.get("reason") or "")
    if requested and requested != mode:
        return f"{mode} (requested {requested}{': ' + reason if reason else ''})"
    return f"{mode} ({reason})" if reason and mode != "on" else mode


def _gpu_section(sample: Mapping[str, Any]) -> list[RenderableType]:
    gpus = sample.get("gpus") or []
    if not gpus:
        return [
            Text(f"no GPU figures: {sample.get('gpu_error') or 'no GPU found'}", style="yellow")
        ]
    table = Table(title="GPUs", title_justify="left", expand=False)
    for column in (
        "GPU",
        "Name",
        "Util",
        "Mem util",
        "Memory",
        "Power",
        "Temp",
        "SM clk",
        "Mem clk",
    ):
        table.add_column(column, justify="left" if column == "Name" else "right")
    for gpu in gpus:
        table.add_row(
            str(gpu.get("index", "?")),
            Text(str(gpu.get("name") or "?")),
            _percent(gpu.get("utilization")),
            _percent(gpu.get("memory_utilization")),
            _used_of(gpu.get("memory_used"), gpu.get("memory_total")),
            _power(gpu.get("power_w"), gpu.get("power_limit_w")),
            _unit(gpu.get("temperature_c"), " °C"),
            _unit(gpu.get("clock_sm_mhz"), " MHz"),
            _unit(gpu.get("clock_mem_mhz"), " MHz"),
        )
    return [table, _process_table(gpus, sample.get("coordinator") or {})]


def _process_table(gpus: list[Mapping[str, Any]], stats: Mapping[str, Any]) -> RenderableType:
    rows = [(gpu, proc) for gpu in gpus for proc in gpu.get("processes") or []]
    mps = stats.get("mps") or {}
    under_mps = mps.get("mode") == "on" or any(
        proc.get("mps_server") or proc.get("mps_client") for _, proc in rows
    )
    if not rows:
        line = Text("GPU processes: none", style="dim")
        if under_mps:
            line.append(f"  ({MPS_NOTE})", style="dim")
        return line
    table = Table(title="GPU processes", title_justify="left", expand=False)
    for column in ("GPU", "PID", "Name", "Memory", "Role", "Command"):
        table.add_column(column, justify="right" if column in ("GPU", "PID", "Memory") else "left")
    for gpu, proc in rows:
        role = _process_role(proc)
        table.add_row(
            str(gpu.get("index", "?")),
            str(proc.get("pid", "?")),
            Text(str(proc.get("name") or "?")),
            _bytes(proc.get("memory_used")),
            Text(role, style="magenta" if proc.get("mps_server") else "cyan"),
            Text(_shorten(str(proc.get("command") or ""), 50), style="dim"),
        )
    if under_mps:
        # Users otherwise read the MPS server's row as one process hogging the GPU.
        return Group(table, Text(MPS_NOTE, style="dim"))
    return table


def _process_role(proc: Mapping[str, Any]) -> str:
    if proc.get("mps_server"):
        return "MPS server"
    worker = proc.get("cohort_worker")
    role = "" if worker is None else f"cohort worker {worker}"
    if proc.get("mps_client"):
        role = f"{role} (MPS client)" if role else "MPS client"
    return role


def _host_line(sample: Mapping[str, Any]) -> Text:
    host = sample.get("host")
    if not host:
        return Text(f"host: {sample.get('host_error') or 'no figures'}", style="yellow")
    line = Text("host", style="bold")
    line.append(f"  CPU {_percent(host.get('cpu_percent'))}")
    line.append(f"  memory {_used_of(host.get('memory_used'), host.get('memory_total'))}")
    return line


def _jobs_line(stats: Mapping[str, Any]) -> Text:
    jobs = stats.get("jobs") or {}
    latency = stats.get("latency_ms") or {}
    line = Text("jobs", style="bold")
    line.append(f"  {_number(stats.get('jobs_per_s'), '.1f')} jobs/s")
    line.append(
        f"  queued {_number(stats.get('queued'))}  in flight {_number(stats.get('in_flight'))}"
    )
    line.append(
        f"  submitted {_number(jobs.get('submitted'))}  completed {_number(jobs.get('completed'))}"
    )
    line.append(
        f"  failed {_number(jobs.get('failed'))}",
        style="red" if _is_positive(jobs.get("failed")) else "",
    )
    errors = jobs.get("errors")
    if isinstance(errors, Mapping) and errors:
        ranked = sorted(errors.items(), key=lambda item: -_as_float(item[1]))
        line.append(
            " (" + ", ".join(f"{name} {_number(n)}" for name, n in ranked) + ")",
            style="red",
        )
    # p50 and p99 are the figures users watch; p90 only when the coordinator sends it.
    quantiles = ("p50", "p90", "p99") if "p90" in latency else ("p50", "p99")
    line.append("\nlatency", style="bold")
    line.append("  " + "  ".join(f"{q} {_number(latency.get(q), '.1f')} ms" for q in quantiles))
    for snap in stats.get("snapshots") or []:  # files being written in the background
        line.append("\nsnapshot", style="bold")
        line.append(f"  {snap.get('path')}: {_number(snap.get('files_done'))}/{_number(snap.get('files'))} files, "
                    f"{_bytes(snap.get('bytes_done'))} of {_bytes(snap.get('bytes'))}, {_duration(snap.get('elapsed_s'))}")
    return line


def _workers_table(stats: Mapping[str, Any]) -> Table:
    table = Table(title="Workers", title_justify="left", expand=False)
    for column in (
        "Worker",
        "PID",
        "State",
        "Device",
        "Models",
        "Queued",
        "In flight",
        "Done",
        "Restarts",
        "Compiled",
    ):
        table.add_column(column, justify="left" if column in ("State", "Device") else "right")
    for worker in stats.get("workers") or []:
        state = str(worker.get("state", "?"))
        table.add_row(
            str(worker.get("id", "?")),
            str(worker.get("pid", "?")),
            Text(state, style=_STATE_STYLES.get(state, "")),
            Text(str(worker.get("device", "?"))),
            str(len(worker.get("models") or [])),
            _number(worker.get("queued")),
            _number(worker.get("in_flight")),
            _number(worker.get("jobs_done")),
            _number(worker.get("restarts")),
            _compile_text(worker.get("compile")),
        )
    return table


def _compile_text(compile_stats: Any) -> Text:
    """Compiled call shapes: how many were loaded from the cache, how many compiled here, and the
    seconds spent; a worker compiling shapes at run time (not loading them) is what to look at."""
    if not isinstance(compile_stats, Mapping):
        return Text("-")
    loaded, compiled = compile_stats.get("loaded") or 0, compile_stats.get("compiled") or 0
    if not loaded and not compiled:
        return Text("-")
    text = Text(f"{loaded} loaded")
    if compiled:
        text.append(f", {compiled} compiled in {_number(compile_stats.get('seconds'), '.1f')} s", style="yellow")
    recompiles = compile_stats.get("recompiles") or 0
    if recompiles:  # steady state forbids them: each ran eagerly, and the log says why
        text.append(f", {recompiles} refused recompiles", style="bold red")
    return text


def _plans_table(stats: Mapping[str, Any]) -> Table | None:
    """How each worker runs each kind of call: the plan in use per load, and the cheapest measured
    costs per job (``batching.plan``; the workers choose by measuring unless it is pinned)."""
    rows = [(w.get("id", "?"), p) for w in stats.get("workers") or [] for p in (w.get("plans") or [])
            if isinstance(p, Mapping)]
    if not rows:
        return None
    table = Table(title="Plans (jobs at once: plan; measured cost per job)", title_justify="left", expand=False)
    for column in ("Worker", "Group", "Op", "Inputs", "In use", "Per job"):
        table.add_column(column, justify="right" if column == "Worker" else "left")
    for worker_id, plan in rows:
        in_use = plan.get("in_use") or {}
        use = Text(", ".join(f"{n}: {label}" for n, label in in_use.items()) if isinstance(in_use, Mapping) else "-")
        if plan.get("pinned"):
            use.append(" (pinned)", style="dim")
        costs = plan.get("per_job_us") or {}
        ranked = sorted(costs.items(), key=lambda item: _as_float(item[1])) if isinstance(costs, Mapping) else []
        cost = Text("  ".join(f"{label} {_micros(us)}" for label, us in ranked[:4]))
        for note in plan.get("notes") or []:
            cost.append(f"\n{note}", style="yellow")
        table.add_row(str(worker_id), str(plan.get("group", "?")), str(plan.get("op", "?")),
                      str(plan.get("inputs", "?")), use, cost)
    return table


def _micros(value: Any) -> str:
    if not _is_number(value):
        return "-"
    return f"{value / 1000:.2f} ms" if value >= 1000 else f"{value:.0f} us"


def _models_table(stats: Mapping[str, Any]) -> RenderableType:
    """Models by jobs run, in side-by-side blocks so that many fit on one screen."""
    models = stats.get("models") or {}
    ranked = sorted(models.items(), key=lambda item: -_as_float((item[1] or {}).get("jobs")))
    shown = ranked[:TOP_MODELS]
    title = Text("Models", style="italic")
    title.append(f" by jobs run, {len(shown)} of {len(ranked)}" if ranked else ": none")
    blocks = []
    for start in range(0, len(shown), MODELS_PER_BLOCK):
        table = Table(expand=False)
        for column in ("Model", "Worker", "Version", "Unfinished", "Jobs"):
            table.add_column(column, justify="left" if column == "Model" else "right")
        for model_id, entry in shown[start : start + MODELS_PER_BLOCK]:
            info = entry if isinstance(entry, Mapping) else {}
            table.add_row(
                Text(str(model_id)),
                _number(info.get("worker")),
                _number(info.get("version")),
                # The coordinator's per-model "queued": accepted and not yet finished.
                _number(info.get("queued")),
                _number(info.get("jobs")),
            )
        blocks.append(table)
    return Group(title, Columns(blocks)) if blocks else title


def _sparklines(sample: Mapping[str, Any], history: History) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.add_column(justify="right")
    gpus = {gpu_index(g, i): g for i, g in enumerate(sample.get("gpus") or [])}
    for index, series in sorted(history.gpu_util.items()):
        current = gpus.get(index, {}).get("utilization")
        table.add_row(f"GPU {index} util", sparkline(series, 0, 100), _percent(current))
    stats = sample.get("coordinator") or {}
    table.add_row("jobs/s", sparkline(history.jobs_per_s), _number(stats.get("jobs_per_s"), ".1f"))
    return table


# Formatting: every helper accepts anything and falls back to "-", so one odd value
# from a newer coordinator costs one cell, not the view.


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _as_float(value: Any) -> float:
    return float(value) if _is_number(value) else 0.0


def _is_positive(value: Any) -> bool:
    return _is_number(value) and value > 0


def _number(value: Any, spec: str = "") -> str:
    if not _is_number(value):
        return "-"
    return format(value, spec) if spec else str(value)


def _unit(value: Any, unit: str) -> str:
    return f"{value:.0f}{unit}" if _is_number(value) else "-"


def _percent(value: Any) -> str:
    return f"{value:.0f}%" if _is_number(value) else "-"


def _bytes(value: Any) -> str:
    if not _is_number(value):
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value} B"


def _used_of(used: Any, total: Any) -> str:
    if not (_is_number(used) and _is_number(total) and total > 0):
        return _bytes(used)
    used_text, total_text = _bytes(used), _bytes(total)
    number, unit = used_text.split(" ")
    # "20.0/80.0 GiB" rather than "20.0 GiB/80.0 GiB": keeps the GPU row on one line.
    if total_text.endswith(f" {unit}"):
        used_text = number
    return f"{used_text}/{total_text} ({used / total:.0%})"


def _power(watts: Any, limit: Any) -> str:
    if not _is_number(watts):
        return "-"
    return f"{watts:.0f} / {limit:.0f} W" if _is_number(limit) else f"{watts:.0f} W"


def _duration(seconds: Any) -> str:
    if not _is_number(seconds):
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _clock(epoch: Any) -> str:
    return time.strftime("%H:%M:%S", time.localtime(epoch)) if _is_number(epoch) else ""


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"

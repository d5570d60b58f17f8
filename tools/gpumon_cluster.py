"""``gpumon.py --cluster``: one view of every coordinator of a cohort cluster, and of its GPU.

A sample is taken through ``ClusterClient`` (the directory through Ray, then ``stats()``
of every coordinator over ZeroMQ) and, for each coordinator on a GPU, from its
supervisor actor, which reads that GPU through NVML on its own node (the monitor may
run on any node, or none with a GPU). Its shape:

    {"time": epoch seconds, "cluster": True, "ray_address": what was asked,
     "coordinators": [{"index", "address", "state", "incarnation", "node", "gpu" (UUID or ""),
                       "stats": Client.stats() dict or None, "error": None or one line,
                       "gpu_figures": {"uuid", "name", "utilization", "memory_used", "memory_total",
                                       "power_w", "temperature_c"} or None}],
     "totals": {"coordinators", "up", "models", "jobs_per_s", "queued", "in_flight"},
     "error": None or one line (no cluster reachable)}

The view is one table, a row per coordinator. Without a cluster it says why and retries.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

GPU_TIMEOUT_S = 2.0


class ClusterSampler:
    """Samples a cluster; never raises. Call from one thread (the monitor's loop)."""

    def __init__(self, ray_address: str, timeout: float, connect: Any = None) -> None:
        self.ray_address = ray_address
        self.timeout = timeout
        self._connect = connect or _cluster_client
        self._client: Any = None

    def sample(self) -> dict[str, Any]:
        now = time.time()
        try:
            if self._client is None:
                self._client = self._connect(self.ray_address, self.timeout)
            stats = self._client.stats(timeout=self.timeout)
            figures = self._gpu_figures(stats["coordinators"])
        except Exception as exc:  # noqa: BLE001 - any failure is a line in the view
            self.close()
            return {"time": now, "cluster": True, "ray_address": self.ray_address, "coordinators": [],
                    "totals": {}, "error": " ".join(f"{type(exc).__name__}: {exc}".split())}
        rows = [{**{k: e.get(k) for k in ("index", "address", "state", "incarnation", "node", "gpu", "stats",
                                           "error")}, "gpu_figures": figures.get(e.get("index"))}
                for e in stats["coordinators"]]
        totals = {"coordinators": len(rows), "up": sum(1 for r in rows if r["stats"]),
                  "models": len(stats.get("models", {})),
                  **{k: stats.get(k, 0) for k in ("jobs_per_s", "queued", "in_flight")}}
        return {"time": now, "cluster": True, "ray_address": self.ray_address, "coordinators": rows,
                "totals": totals, "error": None}

    def _gpu_figures(self, entries: list[Mapping[str, Any]]) -> dict[int, Any]:
        """Each GPU coordinator's NVML figures, read by its supervisor on its node."""
        ray = self._client._ray
        asked = {}
        for entry in entries:
            if entry.get("gpu"):
                with contextlib.suppress(Exception):
                    asked[entry["index"]] = ray.supervisor(entry["index"]).gpu_sample.remote()
        out: dict[int, Any] = {}
        for index, ref in asked.items():
            try:
                out[index] = ray.ray.get(ref, timeout=GPU_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - shown in its row
                out[index] = {"error": f"{type(exc).__name__}: {exc}"}
        return out

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()


def _cluster_client(ray_address: str, timeout: float) -> Any:
    from scheduler import ClusterClient

    return ClusterClient(ray_address, timeout=timeout)


def render_cluster(sample: Mapping[str, Any]) -> RenderableType:
    """The cluster view: a header line, then a row per coordinator."""
    when = time.strftime("%H:%M:%S", time.localtime(sample.get("time") or time.time()))
    if sample.get("error"):
        return Text(f"cohort cluster ({sample.get('ray_address')}) at {when}: unreachable: {sample['error']} "
                    "(retrying)", style="red")
    totals = sample.get("totals", {})
    header = Text(f"cohort cluster ({sample.get('ray_address')}) at {when}: {totals.get('up', 0)}/"
                  f"{totals.get('coordinators', 0)} coordinators answering, {totals.get('models', 0)} models, "
                  f"{_number(totals.get('jobs_per_s'))} jobs/s, {totals.get('queued', 0)} queued, "
                  f"{totals.get('in_flight', 0)} in flight", style="bold")
    table = Table(box=None, header_style="bold")
    for column in ("coord", "state", "inc", "node", "GPU", "util", "memory", "power", "jobs/s", "queued",
                   "in flight", "p50 ms", "p99 ms", "workers", "address / error"):
        table.add_column(column, justify="right" if column in ("inc", "util", "jobs/s", "queued", "in flight",
                                                               "p50 ms", "p99 ms", "workers") else "left")
    for row in sample.get("coordinators", []):
        stats = row.get("stats") or {}
        gpu = row.get("gpu_figures") or {}
        latency = stats.get("latency_ms") or {}
        workers = stats.get("workers") or []
        state = str(row.get("state"))
        table.add_row(
            str(row.get("index")), Text(state, style={"up": "green", "failed": "red"}.get(state, "yellow")),
            str(row.get("incarnation")), str(row.get("node") or "")[:8],
            (str(gpu.get("name") or "") + " " + str(row.get("gpu") or "")[:12]).strip() or "cpu",
            _percent(gpu.get("utilization")), _memory(gpu.get("memory_used"), gpu.get("memory_total")),
            f"{gpu['power_w']:.0f} W" if isinstance(gpu.get("power_w"), (int, float)) else "",
            _number(stats.get("jobs_per_s")), str(stats.get("queued", "")), str(stats.get("in_flight", "")),
            _number(latency.get("p50")), _number(latency.get("p99")),
            f"{sum(1 for w in workers if w.get('state') == 'ready')}/{len(workers)}" if workers else "",
            str(row.get("error") or gpu.get("error") or row.get("address") or ""),
        )
    return Group(header, table)


def _number(value: Any) -> str:
    return f"{value:,.1f}" if isinstance(value, (int, float)) else ""


def _percent(value: Any) -> str:
    return f"{value:.0f}%" if isinstance(value, (int, float)) else ""


def _memory(used: Any, total: Any) -> str:
    if not isinstance(used, (int, float)) or not isinstance(total, (int, float)) or not total:
        return ""
    return f"{used / 2**30:.1f}/{total / 2**30:.0f} GiB"

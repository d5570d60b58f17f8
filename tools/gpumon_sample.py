"""One monitor sample: GPU, host and coordinator figures in one plain dict.

Every output of the monitor (live view, JSON, Prometheus) is drawn from the same
sample dict, so the three never disagree. Its shape:

    {"time": epoch seconds, "address": coordinator address,
     "host": {"cpu_percent", "memory_used", "memory_total"} or None,
     "host_error": None or one line,
     "gpus": [{"index", "name", "uuid", "utilization", "memory_utilization",
               "memory_used", "memory_total", "power_w", "power_limit_w",
               "temperature_c", "clock_sm_mhz", "clock_mem_mhz",
               "processes": [{"pid", "name", "command", "memory_used",
                              "mps_server", "mps_client", "cohort_worker"}]}],
     "gpu_error": None or one line,
     "coordinator": Client.stats() dict or None,
     "coordinator_error": None or one line,
     "coordinator_down_since": None, or epoch seconds of the first failed sample}

Utilization is in percent, memory in bytes, power in watts, clocks in MHz. A GPU
process's `cohort_worker` is the id of the cohort worker with that pid, else None.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Protocol

import psutil


class GpuSource(Protocol):
    def sample(self) -> tuple[list[dict[str, Any]], str | None]: ...


class CoordinatorSource(Protocol):
    address: str

    def sample(self) -> tuple[dict[str, Any] | None, str | None]: ...


class HostSource:
    """Host CPU and memory: a starved host CPU starves the GPU too."""

    def __init__(self) -> None:
        self._primed = False

    def sample(self) -> tuple[dict[str, Any] | None, str | None]:
        """Return (host figures, None) or (None, one-line reason)."""
        try:
            # psutil measures CPU between two calls; the first call has no earlier
            # one, so it waits briefly to give a real figure (this matters for --once).
            cpu = psutil.cpu_percent(interval=None if self._primed else 0.1)
            self._primed = True
            memory = psutil.virtual_memory()
        except (psutil.Error, OSError) as exc:
            return None, " ".join(str(exc).split()) or type(exc).__name__
        return {
            "cpu_percent": cpu,
            # total - available: memory that cannot be reclaimed from caches, the
            # figure that predicts swapping or the OOM killer.
            "memory_used": memory.total - memory.available,
            "memory_total": memory.total,
        }, None


class Sampler:
    """Takes samples from its sources.

    Call it from one thread (the monitor's loop does): cohort's Client keeps a socket
    for every thread that calls it. The lock only makes a second caller wait its turn.
    """

    def __init__(
        self,
        gpu: GpuSource,
        coordinator: CoordinatorSource,
        host: HostSource | None = None,
    ) -> None:
        self.gpu = gpu
        self.coordinator = coordinator
        self.host = host or HostSource()
        self._lock = threading.Lock()
        self._down_since: float | None = None

    def sample(self) -> dict[str, Any]:
        """One sample dict (shape in the module docstring); never raises."""
        with self._lock:
            gpus, gpu_error = _guard(self.gpu.sample, [])
            stats, coordinator_error = _guard(self.coordinator.sample, None)
            host, host_error = _guard(self.host.sample, None)
            now = time.time()
            if stats:
                self._down_since = None
            elif self._down_since is None:
                self._down_since = now
            down_since = self._down_since
        mark_workers(gpus, stats)
        return {
            "time": now,
            "address": self.coordinator.address,
            "host": host,
            "host_error": host_error,
            "gpus": gpus,
            "gpu_error": gpu_error,
            "coordinator": stats,
            "coordinator_error": coordinator_error,
            "coordinator_down_since": down_since,
        }

    def close(self) -> None:
        """Release the sources' resources (NVML handle, client socket)."""
        for source in (self.gpu, self.coordinator):
            # A fake without close(), or a source already broken: nothing to release.
            with contextlib.suppress(Exception):
                source.close()  # type: ignore[attr-defined]


def mark_workers(gpus: list[dict[str, Any]], stats: dict[str, Any] | None) -> None:
    """Set each GPU process's `cohort_worker` to the id of the worker with its pid.

    Done once here so the view, the JSON and Prometheus name the same workers. Under
    a container's PID namespace NVML's pids may match nothing: then all are None.
    """
    workers = stats.get("workers") if isinstance(stats, dict) else None
    by_pid = {
        w.get("pid"): w.get("id")
        for w in (workers if isinstance(workers, list) else [])
        if isinstance(w, dict) and isinstance(w.get("pid"), int)
    }
    for gpu in gpus if isinstance(gpus, list) else []:
        processes = gpu.get("processes") if isinstance(gpu, dict) else None
        for proc in processes if isinstance(processes, list) else []:
            if isinstance(proc, dict):
                proc["cohort_worker"] = by_pid.get(proc.get("pid"))


def _guard(sample: Any, empty: Any) -> tuple[Any, str | None]:
    """Call a source's sample(); a source that raises anyway becomes an error line.

    Sources are written not to raise, but a test fake or a future source might; one
    bad source must never take the monitor down.
    """
    try:
        value, error = sample()
    except Exception as exc:  # noqa: BLE001 - one bad source must not stop the others
        return empty, " ".join(f"{type(exc).__name__}: {exc}".split())
    return (empty if value is None else value), error

"""Timing, result records and GPU sampling shared by every benchmark mode.

Kept free of a top-level ``torch`` import: the control-plane helpers start child
processes that import this module, and a child that needs only ZeroMQ should not
pay for loading torch.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any

Result = dict[str, Any]
MIN_STEPS = 5  # a time budget never cuts a mode below this many timed steps


def latency_ms(latencies_s: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of latencies in seconds, in milliseconds; NaN when there are none.

    Taken with the coordinator's own ``percentile`` (``scheduler.stats``: the nearest
    rank), so a benchmark figure and ``stats()`` mean the same thing. Imported here, not
    at the top: ``scheduler`` loads torch.
    """
    from scheduler.stats import percentile

    return percentile(sorted(latencies_s), q) * 1e3 if latencies_s else math.nan


def ok(throughput: float, unit: str, latencies_s: list[float], wall_s: float, **extra: Any) -> Result:
    """A measured mode: throughput plus per-step latency percentiles in milliseconds."""
    result: Result = {
        "status": "ok",
        "throughput": throughput,
        "unit": unit,
        "p50_ms": latency_ms(latencies_s, 0.5),
        "p99_ms": latency_ms(latencies_s, 0.99),
        "steps": len(latencies_s),
        "wall_s": wall_s,
    }
    result.update(extra)
    return result


def best_of(results: list[Result]) -> Result:
    """Of one mode's repeats, the one with the highest throughput, with every repeat's figure.

    Other load on the machine only ever slows a run down, so the best repeat is the
    closest to what the mode can do. A mode that failed or was skipped in every repeat
    keeps its last record.
    """
    measured = [r for r in results if r.get("status") == "ok"]
    if not measured:
        return dict(results[-1])
    best = dict(max(measured, key=lambda r: r["throughput"]))
    if len(results) > 1:
        best["repeats"] = [r["throughput"] if r.get("status") == "ok" else r.get("status") for r in results]
    return best


def skipped(reason: str) -> Result:
    """A mode that could not run here for a known reason (no GPU, no MPS, quick run)."""
    return {"status": "skipped", "reason": reason}


def error(reason: str) -> Result:
    """A mode that was attempted and failed; the run goes on with the other modes."""
    return {"status": "error", "reason": reason}


def describe(exc: BaseException) -> str:
    """One line naming the exception type, so a failure in the report is actionable."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def synchronize(device: str) -> None:
    """Wait for queued GPU work so that the clock reads finished work, not launches."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def release(device: str) -> None:
    """Give back what the last mode left in this process, so the next mode's GPU memory
    figure (NVML sees the whole device) does not carry it."""
    import gc

    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def warm_up(step: Callable[[int], object], count: int, device: str) -> None:
    """Run steps that are excluded from timing: allocator, caches, lazy init, compile."""
    for index in range(count):
        step(index)
    synchronize(device)


def measure_steps(
    step: Callable[[int], object], count: int, device: str, budget_s: float = math.inf
) -> list[float]:
    """Time each step on its own, synchronized; durations in seconds.

    Stops after ``count`` steps, or earlier once ``budget_s`` has passed and at least
    ``MIN_STEPS`` were timed, so one slow mode cannot stretch the whole run.
    """
    durations: list[float] = []
    began = time.perf_counter()
    for index in range(count):
        start = time.perf_counter()
        step(index)
        synchronize(device)
        durations.append(time.perf_counter() - start)
        if len(durations) >= MIN_STEPS and time.perf_counter() - began >= budget_s:
            break
    return durations


def time_steps(
    step: Callable[[int], object],
    warmup: int,
    steps: int,
    device: str,
    samples_per_step: int,
    budget_s: float = math.inf,
) -> Result:
    """Warm up, then time up to ``steps`` steps; throughput counts samples over the measured wall time."""
    began = time.perf_counter()
    warm_up(step, warmup, device)
    start = time.perf_counter()
    durations = measure_steps(step, steps, device, budget_s)
    wall = time.perf_counter() - start
    return ok(samples_per_step * len(durations) / wall, "samples/s", durations, wall, warmup_s=start - began)


def nvml_available() -> str | None:
    """None when NVML can be used, else the reason it cannot."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return None
    except Exception as exc:  # noqa: BLE001 - any NVML failure means "no GPU metrics"
        return describe(exc)


def nvml_device_info(index: int = 0) -> dict[str, str]:
    """Device name and driver version from NVML, for the report's metadata."""
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    name = pynvml.nvmlDeviceGetName(handle)
    driver = pynvml.nvmlSystemGetDriverVersion()
    return {
        "gpu_name": name.decode() if isinstance(name, bytes) else str(name),
        "driver_version": driver.decode() if isinstance(driver, bytes) else str(driver),
    }


class GpuSampler:
    """Samples NVML utilization and memory in a background thread while a mode runs.

    NVML sees every process on the GPU, so the figures cover child processes and MPS
    servers too, which in-process CUDA counters would miss.
    """

    def __init__(self, index: int = 0, interval_s: float = 0.05) -> None:
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self._interval = interval_s
        self._stop = threading.Event()
        self._utilization: list[float] = []
        self._peak_memory = 0
        self._thread = threading.Thread(target=self._loop, name="gpu-sampler", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self._interval)

    def _sample(self) -> None:
        rates = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
        memory = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
        self._utilization.append(float(rates.gpu))
        self._peak_memory = max(self._peak_memory, int(memory.used))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> Result:
        """Stop sampling and summarize: mean utilization (%) and peak memory used (MiB)."""
        self._stop.set()
        self._thread.join(timeout=5)
        samples = len(self._utilization)
        mean = sum(self._utilization) / samples if samples else math.nan
        return {
            "mean_util_pct": mean,
            "peak_memory_mib": self._peak_memory / 2**20,
            "samples": samples,
        }


def with_gpu_metrics(device: str, run: Callable[[], Result]) -> Result:
    """Run one mode; on a GPU with NVML, add its mean utilization and peak memory as ``gpu``."""
    if not device.startswith("cuda") or nvml_available() is not None:
        return run()
    sampler = GpuSampler()
    sampler.start()
    try:
        result = run()
    finally:
        metrics = sampler.stop()
    result["gpu"] = metrics
    return result

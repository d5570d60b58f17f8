"""What users do without cohort: one process looping over the models, or N processes.

``sequential`` runs the K models one after another in this process. ``processes``
splits them over N spawned processes that run side by side; ``processes_mps`` does
the same under a CUDA MPS daemon started for the occasion (``bench_mps``).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from tools.bench_measure import Result, describe, ok, skipped, synchronize, time_steps, warm_up
from tools.bench_mps import MpsUnavailable, mps_daemon
from tools.bench_workloads import (
    Batch,
    Workload,
    build_models,
    loss_function,
    make_batches,
    make_optimizer,
)

START_TIMEOUT_S = 300.0
MAX_PROCESSES = 8


class SequentialRunner:
    """Plain PyTorch modules, each with its own optimizer, stepped one after another."""

    def __init__(self, workload: Workload, indices: list[int], device: str) -> None:
        self.workload = workload
        self.indices = indices
        self.models = build_models(workload, indices, device)
        self.loss = loss_function(workload)
        self.optimizers = [make_optimizer(workload, m) for m in self.models] if workload.task == "train" else []

    def infer(self, batch: Batch) -> list[torch.Tensor]:
        """Every model on the shared input: what an ensemble user loops over."""
        with torch.no_grad():
            return [model(batch.x) for model in self.models]

    def train(self, batch: Batch) -> list[torch.Tensor]:
        """One optimizer step per model on that model's own batch; returns the losses."""
        losses = []
        for slot, index in enumerate(self.indices):
            model, optimizer = self.models[slot], self.optimizers[slot]
            optimizer.zero_grad(set_to_none=True)
            loss = self.loss(model(batch.xs[index]), batch.ts[index])
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        return losses

    def step(self, batch: Batch) -> list[torch.Tensor]:
        return self.train(batch) if self.workload.task == "train" else self.infer(batch)


def _stepper(runner: SequentialRunner, batches: list[Batch]) -> Callable[[int], object]:
    return lambda i: runner.step(batches[i % len(batches)])


def run_sequential(workload: Workload, device: str) -> Result:
    """One process, one model at a time: the baseline every ratio is taken against."""
    runner = SequentialRunner(workload, list(range(workload.count)), device)
    batches = make_batches(workload, device)
    return time_steps(
        _stepper(runner, batches), workload.warmup, workload.steps, device, workload.samples_per_step, workload.budget_s
    )


def process_count(workload: Workload, device: str) -> int:
    """N: one process per model, capped by MAX_PROCESSES and, on the CPU, by the core count."""
    cap = MAX_PROCESSES if device.startswith("cuda") else min(MAX_PROCESSES, os.cpu_count() or 1)
    return max(1, min(workload.count, cap))


def shards(count: int, parts: int) -> list[list[int]]:
    """Split model indices 0..count-1 into ``parts`` nearly equal contiguous runs."""
    base, extra = divmod(count, parts)
    bounds = [0]
    for part in range(parts):
        bounds.append(bounds[-1] + base + (1 if part < extra else 0))
    return [list(range(bounds[p], bounds[p + 1])) for p in range(parts)]


def process_context() -> Any:
    """Children forked from a server that has torch imported already: each starts in
    milliseconds instead of re-importing torch. The server itself never touches CUDA
    or starts threads, so forking from it is safe (unlike forking this process)."""
    context = mp.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def _process_main(workload: Workload, indices: list[int], device: str, threads: int, go: Any, stop: Any, results: Any) -> None:
    """Child: build its shard, warm up, say ready, time steps from ``go`` until ``stop``, report."""
    try:
        torch.set_num_threads(threads)
        runner = SequentialRunner(workload, indices, device)
        step = _stepper(runner, make_batches(workload, device))
        warm_up(step, workload.warmup, device)
        results.put(("ready", None))
        if not go.wait(timeout=START_TIMEOUT_S):
            raise TimeoutError("never told to start")
        durations: list[float] = []
        for index in range(workload.steps):
            if stop.is_set():
                break
            start = time.perf_counter()
            step(index)
            synchronize(device)
            durations.append(time.perf_counter() - start)
        results.put(("ok", (durations, len(indices) * workload.batch)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the mode
        results.put(("error", describe(exc)))


def _gather(results: Any, kind: str, processes: list[Any], timeout_s: float) -> list[Any]:
    """One ``kind`` message from every child; fail at once if a child errs or dies silently."""
    payloads: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while len(payloads) < len(processes):
        try:
            status, payload = results.get(timeout=0.2)
        except queue.Empty:
            dead = [p.exitcode for p in processes if p.exitcode is not None and p.exitcode != 0]
            if dead:
                raise RuntimeError(f"a benchmark process died (exit codes {dead})") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"benchmark processes sent no {kind!r} within {timeout_s:.0f} s") from None
            continue
        if status == "error":
            raise RuntimeError(f"benchmark process failed: {payload}")
        payloads.append(payload)
    return payloads


def _run_children(workload: Workload, device: str, parts: int) -> tuple[float, list[tuple[list[float], int]]]:
    """Start ``parts`` spawned processes, run them together for the budget, always reap them.

    The measured phase runs from ``go`` until every child has reported; children stop
    at ``workload.steps`` steps or at ``stop``, set once the time budget has passed.
    """
    context = process_context()
    go, stop, results = context.Event(), context.Event(), context.Queue()
    threads = max(1, (os.cpu_count() or 1) // parts)
    processes = [
        context.Process(target=_process_main, args=(workload, shard, device, threads, go, stop, results), daemon=True)
        for shard in shards(workload.count, parts)
    ]
    for process in processes:
        process.start()
    timer = threading.Timer(workload.budget_s, stop.set)
    try:
        _gather(results, "ready", processes, START_TIMEOUT_S)
        start = time.perf_counter()
        go.set()
        timer.start()
        reports = _gather(results, "ok", processes, START_TIMEOUT_S)
        return time.perf_counter() - start, reports
    finally:
        timer.cancel()
        stop.set()
        _reap(processes)


def _reap(processes: list[Any]) -> None:
    for process in processes:
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
            process.join(timeout=10)


def run_processes(workload: Workload, device: str) -> Result:
    """N plain processes, each looping over its K/N models; throughput = all samples / wall."""
    parts = process_count(workload, device)
    wall, reports = _run_children(workload, device, parts)
    samples = sum(len(durations) * per_step for durations, per_step in reports)
    common = min(len(durations) for durations, _ in reports)
    slowest = [max(durations[i] for durations, _ in reports) for i in range(common)]
    threads = max(1, (os.cpu_count() or 1) // parts)
    note = f"N={parts} processes; step latency = slowest process's step"
    if not device.startswith("cuda"):
        note += f"; {threads} torch thread(s) each"
    result = ok(samples / wall, "samples/s", slowest, wall, processes=parts)
    result["notes"] = note
    return result


def run_processes_mps(workload: Workload, device: str) -> Result:
    """The same N processes as clients of a private CUDA MPS daemon."""
    if not device.startswith("cuda"):
        return skipped("no GPU")
    try:
        with mps_daemon():
            result = run_processes(workload, device)
    except MpsUnavailable as exc:
        return skipped(f"MPS unavailable: {exc}")
    result["notes"] = result.get("notes", "") + "; under CUDA MPS"
    return result

"""What users do without cohort: one process looping over the models, or N processes.

``sequential`` runs the K models one after another in this process. ``processes``
splits them over N processes that run side by side, forked from a forkserver;
``processes_mps`` does the same under a CUDA MPS daemon started for the occasion
(``bench_mps``), with processes of its own: freshly spawned after the daemon is up, so
its variables are in their environment from the start. The forkserver cannot serve
that mode: it was started (by ``processes``) before the daemon, and its children get
its environment, not this process's of now.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch

from tools.bench_measure import Result, describe, ok, skipped, synchronize, time_steps, warm_up
from tools.bench_mps import MpsUnavailable, client_evidence, mps_daemon, seen_variables
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


def mps_context() -> Any:
    """Fresh interpreters for the MPS mode: each starts with this process's environment of
    the moment it is started (the daemon's variables included), not the forkserver's."""
    return mp.get_context("spawn")


def _process_main(workload: Workload, indices: list[int], device: str, threads: int, go: Any, stop: Any, results: Any) -> None:
    """Child: build its shard, warm up, say ready (with its pid and the MPS variables it
    started with), time steps from ``go`` until ``stop``, report."""
    started_with = seen_variables()  # before anything touches CUDA
    try:
        torch.set_num_threads(threads)
        runner = SequentialRunner(workload, indices, device)
        step = _stepper(runner, make_batches(workload, device))
        warm_up(step, workload.warmup, device)
        results.put(("ready", (os.getpid(), started_with)))
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


OnReady = Callable[[list[Any]], None]  # every child's ready payload: (pid, MPS variables it started with)


def _run_children(
    workload: Workload, device: str, parts: int, context: Any, on_ready: OnReady | None = None
) -> tuple[float, list[tuple[list[float], int]]]:
    """Start ``parts`` processes from ``context``, run them together for the budget, always reap them.

    ``on_ready`` sees what every child said when it was ready, before the measured
    phase; raising there fails the mode. The measured phase runs from ``go`` until
    every child has reported; children stop at ``workload.steps`` steps or at
    ``stop``, set once the time budget has passed.
    """
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
        ready = _gather(results, "ready", processes, START_TIMEOUT_S)
        if on_ready is not None:
            on_ready(ready)
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


def run_processes(workload: Workload, device: str, context: Any = None, on_ready: OnReady | None = None) -> Result:
    """N plain processes, each looping over its K/N models; throughput = all samples / wall.

    The processes come from ``context`` (default: the forkserver of ``process_context``).
    """
    parts = process_count(workload, device)
    wall, reports = _run_children(workload, device, parts, context or process_context(), on_ready)
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
    """The same N processes as clients of a private CUDA MPS daemon (GPU only)."""
    if not device.startswith("cuda"):
        return skipped("no GPU")
    return processes_under_mps(workload, device)


def processes_under_mps(
    workload: Workload,
    device: str,
    daemon: Callable[[], AbstractContextManager[dict[str, str]]] = mps_daemon,
    context: Any = None,
) -> Result:
    """N processes started once ``daemon`` is up, from ``context`` (default: fresh spawned
    interpreters, ``mps_context``), with the daemon's variables in their environment.

    Before the measured phase every child reports the MPS variables it started with; if
    one did not see the daemon's, it is no MPS client and the mode fails rather than
    time plain processes under the MPS label. The record's ``mps`` holds the evidence
    (``bench_mps.client_evidence``): each child's variables, the daemon's server and
    client pids, and on a GPU the processes NVML sees.
    """
    evidence: dict[str, Any] = {}
    try:
        with daemon() as variables:

            def check(ready: list[Any]) -> None:
                evidence.update(client_evidence(variables, [(pid, seen) for pid, seen in ready], device))
                if not evidence["children_saw_mps_env"]:
                    raise RuntimeError(f"benchmark processes started without the MPS daemon's variables, so they "
                                       f"are not its clients: they saw {evidence['children'][:2]}, the daemon has "
                                       f"{variables}")

            result = run_processes(workload, device, context or mps_context(), check)
    except MpsUnavailable as exc:
        return skipped(f"MPS unavailable: {exc}")
    result["notes"] = result.get("notes", "") + "; under CUDA MPS (processes spawned after the daemon started)"
    result["mps"] = evidence
    return result

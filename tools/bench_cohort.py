"""cohort itself under the benchmark: a real coordinator, driven through the public Client.

``coordinator()`` starts ``python -m scheduler run`` through ``tools/harness.py``: a
TOML config in a private temporary directory, an ``ipc://`` address inside it, ready
once ``stats()`` answers; and it always stops the process tree again (SIGINT, then
SIGKILL) and removes what it left, whatever happened in between.

``run_cohort`` measures workloads (each one group, named after the workload) on one
coordinator in these modes: ``cohort_per_model`` (K concurrent ``submit("infer" |
"train_step", "g/i", ...)`` per step), ``cohort_fused`` (one ``ensemble`` or
``train_round`` per step; a training round's inputs stacked ``[K, B, ...]``),
``cohort_fused_shared`` (shared-batch workloads only: one ``train_round(group, x, t)``
with the batch sent once for every model) and ``cohort_fused_compiled`` (as
``cohort_fused`` on a twin group, ``<workload>_compiled``, whose fused calls go through
``torch.compile``), ``cohort_fused_pipelined`` (the fused requests of ``cohort_fused`` kept
4 in flight, as ``Client.map`` keeps them: a step ends when the oldest answers and the next
is already sent; its p50/p99 are the times between answers). Every cohort mode records the bytes its requests carry per step
(inputs and targets, as the client encodes them).
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from scheduler import Client
from scheduler.client_core import job
from tools import harness
from tools.bench_measure import Result, describe, error, time_steps, with_gpu_metrics
from tools.bench_workloads import Batch, Workload, build_models, loss_function, make_batches

COHORT_MODES = ("cohort_per_model", "cohort_fused", "cohort_fused_pipelined", "cohort_fused_shared",
                "cohort_fused_compiled")
COMPILED_MODE = "cohort_fused_compiled"
PIPELINED_MODE = "cohort_fused_pipelined"
PIPELINE_DEPTH = 4  # fused calls in flight, as ``Client.map(..., depth=4)`` keeps them
SHARED_MODE = "cohort_fused_shared"  # runs only for shared-batch workloads (``Workload.shared``)
READY_TIMEOUT_S = 180.0
JOB_TIMEOUT_S = 300.0
MAX_CPU_WORKERS = 8

OnResult = Callable[[str, str, Result], None]  # (workload, mode, result)


# ---------------------------------------------------------------------- config


def group_name(workload: Workload, mode: str) -> str:
    """The group a mode runs on: the workload's, or its compiled twin."""
    return f"{workload.name}_compiled" if mode == COMPILED_MODE else workload.name


def group_table(name: str, workload: Workload, compiled: bool = False) -> dict[str, Any]:
    """The ``[[group]]`` for a workload: same factory, seeds, loss and optimizer as the baselines."""
    # The compiled twin pins vmap so that its column shows compiled fused calls; the other modes run
    # with batching.plan = "auto", as a user's group does by default.
    extra = {"batching": {"compile": True, "plan": "vmap"}} if compiled else {}
    return {
        "name": name,
        "factory": workload.factory,
        "kwargs": workload.kwargs,
        "count": workload.count,
        "input": {"shape": [-1, *workload.input_shape], "dtype": workload.input_dtype},
        "loss": workload.loss,
        "optimizer": workload.optimizer,
        "init": {"seed": workload.seed},
        **extra,
    }


def cohort_workers(device: str) -> int:
    """Workers per coordinator: two on a GPU; on the CPU as many as the ``processes`` baseline
    runs (one per core, at most 8), each with its share of the cores as torch threads.

    Measured on a 2-core CPU: two single-threaded workers beat one two-threaded worker by
    1.5x (MLP inference) to 2-4x (CNN training), as two plain processes beat one.
    """
    if device.startswith("cuda"):
        return 2
    return max(1, min(MAX_CPU_WORKERS, os.cpu_count() or 1))


def worker_threads(device: str, workers: int) -> int | None:
    """Torch threads per worker on the CPU: the cores shared out, as the process baseline does."""
    if device.startswith("cuda"):
        return None
    return max(1, (os.cpu_count() or 1) // workers)


# ---------------------------------------------------------------------- lifecycle


@dataclass
class Running:
    """A coordinator that answers: where to reach it and how it was set up."""

    address: str
    pid: int
    workers: int
    threads: int | None
    log_path: Path


@contextmanager
def coordinator(
    groups: list[dict[str, Any]], device: str, workers: int | None = None, ready_timeout_s: float = READY_TIMEOUT_S
) -> Iterator[Running]:
    """A real coordinator on a private ``ipc://`` address for the duration of the block
    (``tools/harness.py`` starts it, and stops it and everything it started afterwards)."""
    workers = workers or cohort_workers(device)
    settings = {
        "workers": workers,
        "device": "cuda" if device.startswith("cuda") else "cpu",
        "mps": "auto" if device.startswith("cuda") else "off",
    }
    threads = worker_threads(device, workers)
    env = {} if threads is None else {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with harness.start(groups, settings, prefix="cohort-bench-", env=env, args=["--log-level", "WARNING"],
                       ready_timeout_s=ready_timeout_s) as running:
        yield Running(running.address, running.process.pid, workers, threads, running.log_path)


# ---------------------------------------------------------------------- modes


Job = tuple[str, str, Any, Any]  # (op, target, inputs, targets): one request, as ``Client.submit`` takes it


def step_jobs(mode: str, group: str, workload: Workload, batch: Batch) -> list[Job]:
    """The requests of one step of ``mode``: what is sent, and what its bytes are counted from.

    ``cohort_per_model``: one job per model, in flight together; the fused modes: one
    request for the whole group, ``ensemble`` or ``train_round`` with inputs stacked
    ``[K, B, ...]``, or (``cohort_fused_shared``) the one batch every model trains on.
    """
    train = workload.task == "train"
    if mode == "cohort_per_model":
        if train:
            return [("train_step", f"{group}/{k}", batch.xs[k], batch.ts[k]) for k in range(workload.count)]
        return [("infer", f"{group}/{k}", batch.x, None) for k in range(workload.count)]
    if mode == SHARED_MODE:
        if batch.t is None:
            raise ValueError(f"{mode} needs a shared-batch workload; {workload.name} gives each model its own batch")
        return [("train_round", group, batch.x, batch.t)]
    return [("train_round", group, batch.xs, batch.ts) if train else ("ensemble", group, batch.x, None)]


def bytes_sent(jobs: list[Job]) -> int:
    """The tensor bytes the client sends for these jobs (inputs and targets, as it encodes them)."""
    return sum(job(op, target, inputs, targets).size for op, target, inputs, targets in jobs)


def _wait_all(futures: list[Any]) -> list[Any]:
    return [future.result(timeout=JOB_TIMEOUT_S) for future in futures]


def _call(client: Client, op: str, target: str, inputs: Any, targets: Any) -> Any:
    """One job as a blocking call on this thread's socket (``ensemble``, ``train_round``)."""
    if targets is None:
        return getattr(client, op)(target, inputs, timeout=JOB_TIMEOUT_S)
    return getattr(client, op)(target, inputs, targets, timeout=JOB_TIMEOUT_S)


def make_step(client: Client, jobs: list[Job]) -> Callable[[], object]:
    """One step: a lone request as a blocking call; several submitted together, the step
    ending when all have answered."""
    if len(jobs) == 1:
        return lambda: _call(client, *jobs[0])
    return lambda: _wait_all([client.submit(*j) for j in jobs])


class Pipeline:
    """Steps of one request each, kept ``depth`` in flight: step ``i`` submits what keeps the
    window full and waits for the oldest answer. ``drain`` waits for the rest."""

    def __init__(self, client: Client, jobs: list[list[Job]], depth: int) -> None:
        if any(len(step) != 1 for step in jobs):
            raise ValueError("a pipelined step is one request")
        self.client, self.jobs, self.depth = client, jobs, depth
        self.in_flight: deque[Any] = deque()
        self.sent = 0

    def step(self, _: int) -> object:
        while len(self.in_flight) < self.depth:
            op, target, inputs, targets = self.jobs[self.sent % len(self.jobs)][0]
            self.in_flight.append(self.client.submit(op, target, inputs, targets, timeout=JOB_TIMEOUT_S))
            self.sent += 1
        return self.in_flight.popleft().result(timeout=JOB_TIMEOUT_S)

    def drain(self) -> None:
        while self.in_flight:
            self.in_flight.popleft().result(timeout=JOB_TIMEOUT_S)


def reference_check(client: Client, group: str, workload: Workload, batch: Batch) -> dict[str, Any]:
    """cohort against plain PyTorch with the same seeds, on fresh weights, before anything is timed.

    Inference compares the ensemble's outputs; training compares the first round's
    losses (computed before the step). A large difference means the modes do not
    compute the same thing and their figures should not be compared.
    """
    models = build_models(workload, range(workload.count), "cpu")
    with torch.no_grad():
        if workload.task == "train":
            loss = loss_function(workload)
            expected = torch.stack([loss(m(batch.xs[k]), batch.ts[k]) for k, m in enumerate(models)])
            got = torch.tensor(client.train_round(group, batch.xs, batch.ts, timeout=JOB_TIMEOUT_S))
            what = "first train_round losses"
        else:
            expected = torch.stack([m(batch.x) for m in models])
            got = client.ensemble(group, batch.x, timeout=JOB_TIMEOUT_S)
            what = "ensemble outputs"
    diff = float((got.to(expected.dtype) - expected).abs().max())
    return {"compared": what, "against": "plain PyTorch, same seeds", "max_abs_diff": diff, "ok": diff < 1e-3}


def _measure(client: Client, workload: Workload, mode: str, device: str) -> Result:
    group = group_name(workload, mode)
    jobs = [step_jobs(mode, group, workload, b) for b in make_batches(workload, "cpu")]
    if mode == PIPELINED_MODE:
        pipeline = Pipeline(client, jobs, PIPELINE_DEPTH)
        step: Callable[[int], object] = pipeline.step
    else:
        steps = [make_step(client, j) for j in jobs]
        step = lambda i: steps[i % len(steps)]()  # noqa: E731
    result = with_gpu_metrics(
        device,
        lambda: time_steps(step, workload.warmup, workload.steps, device, workload.samples_per_step,
                           workload.budget_s),
    )
    if mode == PIPELINED_MODE:
        pipeline.drain()  # the calls still in flight must not run into the next mode's timing
    result["bytes_sent_per_step"] = bytes_sent(jobs[0])
    op = jobs[0][0][0]
    count = f"{workload.count} concurrent" if len(jobs[0]) > 1 else "one"
    if mode == PIPELINED_MODE:
        count = f"one (kept {PIPELINE_DEPTH} in flight; p50/p99 between answers)"
    how = ""
    if op == "train_round":
        how = " on one shared batch, sent once" if mode == SHARED_MODE else " with inputs stacked [K, B, ...]"
    result["notes"] = f"{count} {op} job(s) per step{how}" + (
        "; fused calls through torch.compile, compiled during the reference check and warm-up"
        if mode == COMPILED_MODE else "")
    return result


def _setup(client: Client, running: Running) -> dict[str, Any]:
    stats = client.stats()
    return {"workers": running.workers, "worker_threads": running.threads, "device": stats.get("device"),
            "mps": stats.get("mps")}


def _run_one(client: Client, workload: Workload, device: str, modes: list[str], setup: dict[str, Any],
             report: OnResult) -> dict[str, Result]:
    results: dict[str, Result] = {}
    checks: dict[str, dict[str, Any]] = {}
    for mode in modes:
        if mode == SHARED_MODE and not workload.shared:
            continue  # each model has its own batch: nothing to share
        began = time.monotonic()
        group = group_name(workload, mode)
        if group not in checks:  # once per group, before any of its timing
            try:
                checks[group] = reference_check(client, group, workload, make_batches(workload, "cpu")[0])
            except Exception as exc:  # noqa: BLE001 - the timing can still be taken; the check says why not
                checks[group] = {"ok": False, "error": describe(exc)}
        try:
            results[mode] = _measure(client, workload, mode, device)
        except Exception as exc:  # noqa: BLE001 - recorded; the other mode still runs
            results[mode] = error(describe(exc))
        results[mode].update(mode_s=time.monotonic() - began, cohort=setup, check=checks[group])
        report(workload.name, mode, results[mode])
    return results


def run_cohort(
    workloads: list[Workload], device: str, modes: list[str], on_result: OnResult | None = None
) -> dict[str, dict[str, Result]]:
    """The cohort modes for several workloads, each a group of one coordinator started once.

    A mode that fails is recorded and the next one runs; if the coordinator cannot
    start, every mode of every workload records that error.
    """
    results: dict[str, dict[str, Result]] = {w.name: {} for w in workloads}
    report = on_result or (lambda workload, mode, result: None)
    try:
        groups = [group_table(w.name, w) for w in workloads]
        if COMPILED_MODE in modes:
            groups += [group_table(group_name(w, COMPILED_MODE), w, compiled=True) for w in workloads]
        with coordinator(groups, device) as running, Client(running.address, timeout=JOB_TIMEOUT_S) as client:
            setup = _setup(client, running)
            for workload in workloads:
                results[workload.name] = _run_one(client, workload, device, modes, setup, report)
    except Exception as exc:  # noqa: BLE001 - start-up or shut-down failed: every mode left fails with it
        for workload in workloads:
            for mode in modes:
                if mode not in results[workload.name]:
                    results[workload.name][mode] = error(describe(exc))
                    report(workload.name, mode, results[workload.name][mode])
    return results

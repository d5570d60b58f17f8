"""From a job as it arrives to the computation it runs: decode, check, plan, call.

Both executors share these steps. Inputs were checked against the group's spec by the
coordinator, from their headers; what only the worker can check is the targets'
values against the model's output (a class index out of range would be a device-side
assert on a GPU), done here on the host before anything reaches the device.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from core.errors import BadInput, JobTimeout
from core.messages import RunJob
from core.tensors import decode_tensors
from workers import bank_ops
from workers.batching import MULTI_MODEL_OPS, Ready, Run, plan, run_joined
from workers.execute import GroupRuntime, index_rows
from workers.losses import check_target
from workers.outcome import Finished, failure
from workers.plans import ONE_BY_ONE


def run_job(runtime: GroupRuntime, job: Ready, plan: str = ONE_BY_ONE) -> tuple[Any, Any]:
    """Run one job's computation; return ``(outputs, losses tensor or None)`` on the device. ``plan``:
    how an ensemble, round or evaluation runs (``one_by_one``, ``vmap``, ``vmap_compiled``)."""
    op, slots = job.op, job.slots
    if op == "infer":
        return runtime.infer(slots[0], job.inputs), None
    if op == "train_step":
        return None, runtime.train_step(slots[0], job.inputs, job.targets).reshape(1)
    if op == "ensemble":
        return runtime.ensemble(slots, job.inputs, plan), None
    if op == "train_round":
        return None, runtime.train_round(slots, job.inputs, job.targets, job.shared, plan)
    if op == "evaluate":
        return None, runtime.evaluate(slots, job.inputs, job.targets, job.shared, plan)
    if op == "set_hparams":
        runtime.set_hparams(slots, job.hparams)
        return None, None
    if op == "get_hparams":
        return None, runtime.get_hparams(slots[0])
    if op == "reset":
        runtime.reset(slots[0], job.seed)
        return None, None
    if op == "read":
        return bank_ops.read(runtime.bank, slots[0], job.option == "all"), None
    if op == "write":
        bank_ops.write(runtime.bank, slots[0], job.inputs, job.option == "all")
        return None, None
    if op == "copy":
        bank_ops.copy(runtime.bank, slots, job.source)
        return None, None
    if op == "mirror":
        if runtime.mirror is None:
            raise BadInput(f"group {job.group!r} has no host copy on this worker")
        bank_ops.mirror(runtime.bank, runtime.mirror, slots)
        return None, None
    raise BadInput(f"unknown op {op!r}")


def check_targets(runtime: GroupRuntime, op: str, inputs: Any, targets: Any, shared: bool) -> None:
    """Training and evaluation targets against the output's shape on meta and their values, on the host."""
    if op not in ("train_step", "train_round", "evaluate"):
        return
    stacked = op in ("train_round", "evaluate") and not shared
    first = index_rows(inputs, 0) if stacked else inputs
    output = runtime.output_meta(first)
    for target in (targets.unbind(0) if stacked else (targets,)):
        check_target(runtime.spec.loss, output, target)


def check_deadline(job: RunJob) -> None:
    """A job whose deadline passed while it waited in the worker is not run."""
    if job.deadline is not None and time.monotonic() > job.deadline:
        raise JobTimeout(f"job passed its deadline by {time.monotonic() - job.deadline:.3f} s before it started")


def planned_runs(runtimes: dict[str, GroupRuntime], items: list[tuple[RunJob, list[Any]]], pinned: bool,
                 failed: deque[Finished]) -> list[Run]:
    """Jobs that arrived together, prepared and split into runs of neighbours that can share one
    call; a job that fails to prepare goes to ``failed``, its neighbours go on."""
    ready = []
    for job, buffers in items:
        try:
            ready.append(prepare(runtimes, job, buffers, pinned))
        except Exception as exc:
            failed.append(failure(job.job_id, exc))
    return plan(ready, runtimes)


def prepare(runtimes: dict[str, GroupRuntime], job: RunJob, buffers: list[Any], pinned: bool) -> Ready:
    """Decode a job's tensors (into pinned memory when headed for a GPU) and check them on the host."""
    check_deadline(job)
    runtime = runtimes[job.group]
    n_in = job.inputs.frames
    # The coordinator checked the sizes against its bound; these only must match their headers.
    inputs = decode_tensors(job.inputs, buffers[:n_in], 1 << 62, pinned)
    targets = decode_tensors(job.targets, buffers[n_in:], 1 << 62, pinned)
    check_targets(runtime, job.op, inputs, targets, job.shared)
    return Ready(job.job_id, job.op, job.group, list(job.slots), inputs, targets, job.option, list(job.source),
                 job.shared, job.hparams, job.seed)


def run_measured(runtime: GroupRuntime, run: Run,
                 synchronize: Callable[[], None] | None = None) -> list[tuple[Any, torch.Tensor | None]]:
    """``run_on_device``, timed for the group's chooser when the run's choice asks. On a GPU
    ``synchronize`` waits for the device before and after, so the time is this call's alone."""
    choice = run.choice
    if choice is None or not choice.measure or run.measured_as is None:
        return run_on_device(runtime, run)
    if synchronize is not None:
        synchronize()
    compiling = runtime.compile_seconds()
    began = time.perf_counter()
    results = run_on_device(runtime, run)
    if synchronize is not None:
        synchronize()
    seconds = time.perf_counter() - began
    if runtime.compile_seconds() == compiling:  # a call that compiled says nothing of its steady cost
        work = len(run.jobs[0].slots) if run.jobs[0].op in MULTI_MODEL_OPS else len(run.jobs)
        runtime.plans.record(choice, seconds, work, run.measured_as)
    return results


def run_on_device(runtime: GroupRuntime, run: Run) -> list[tuple[Any, torch.Tensor | None]]:
    """A run's computation, ``(outputs, losses)`` per job in order: one joined call, or one job."""
    if len(run.jobs) > 1:
        return run_joined(runtime, run)
    return [run_job(runtime, run.jobs[0], run.plan)]



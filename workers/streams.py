"""Executors: where a worker's jobs run, synchronously on the CPU or on CUDA streams.

Both have the same two calls: ``submit`` a job, and ``poll`` for the jobs that have
finished. On the CPU ``submit`` runs the job at once. On a GPU it only enqueues:
inputs land in pinned host memory, go to the device on the copy stream, the job runs
on its model's compute stream (a model always maps to the same stream, so its jobs
keep their order; jobs of different models overlap), results come back to pinned
memory, and ``poll`` checks CUDA events, so the worker's loop never blocks on the GPU.
"""

from __future__ import annotations

import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from scheduler.errors import BadInput, CohortError, JobFailed, JobTimeout
from scheduler.protocol import RunJob, TensorTree, check_buffers
from workers.batching import Ready, plan, run_joined
from workers.execute import GroupRuntime, index_rows
from workers.losses import check_target

FATAL_CUDA_MARKERS = ("device-side assert", "illegal memory access", "unspecified launch failure", "CUDA error: an illegal")


@dataclass
class Finished:
    """A job's outcome, ready to be sent back."""

    job_id: int
    outputs: Any = None
    losses: list[float] | None = None
    error: CohortError | None = None
    traceback: str = ""
    fatal: bool = False  # the device is unusable after this; the worker must exit


def run_job(runtime: GroupRuntime, op: str, slots: list[int], inputs: Any, targets: Any) -> tuple[Any, Any]:
    """Run one job's computation; return ``(outputs, losses tensor or None)`` on the device."""
    if op == "infer":
        return runtime.infer(slots[0], inputs), None
    if op == "train_step":
        return None, runtime.train_step(slots[0], inputs, targets).reshape(1)
    if op == "ensemble":
        return runtime.ensemble(slots, inputs), None
    if op == "train_round":
        return None, runtime.train_round(slots, inputs, targets)
    raise BadInput(f"unknown op {op!r}")


def check_job(runtime: GroupRuntime, op: str, slots: list[int], inputs: Any, targets: Any) -> None:
    """Checks that need the tensors, done on the host before anything reaches the device."""
    stacked = op == "train_round"
    runtime.check_inputs(inputs, stacked=len(slots) if stacked else None)
    if op in ("train_step", "train_round"):
        if not isinstance(targets, torch.Tensor):
            raise BadInput(f"{op} needs a target tensor")
        if stacked and (targets.dim() < 1 or targets.shape[0] != len(slots)):
            raise BadInput(f"train_round targets must be stacked [K={len(slots)}, ...], got {list(targets.shape)}")
        first = index_rows(inputs, 0) if stacked else inputs
        batch = (next(iter(first.values())) if isinstance(first, dict) else first).shape[0]
        tb = targets.shape[1] if stacked else (targets.shape[0] if targets.dim() else None)
        if tb != batch:
            raise BadInput(f"target batch size {tb} does not match the input batch size {batch}")
        # Against the output's shape on meta, on the host: a class index out of range would
        # be a device-side assert on a GPU, and checking device tensors would block the loop.
        output = runtime.output_meta(first)
        for target in (targets.unbind(0) if stacked else (targets,)):
            check_target(runtime.spec.loss, output, target)


def check_deadline(job: RunJob) -> None:
    """A job whose deadline passed while it waited in the worker is not run."""
    if job.deadline is not None and time.monotonic() > job.deadline:
        raise JobTimeout(f"job passed its deadline by {time.monotonic() - job.deadline:.3f} s before it started")


def failure(job_id: int, exc: BaseException) -> Finished:
    """Turn an exception into a reply, keeping a ``CohortError``'s type."""
    text = traceback.format_exc()
    if isinstance(exc, CohortError):
        return Finished(job_id, error=exc, traceback=text)
    message = f"{type(exc).__name__}: {exc}"
    fatal = any(m in str(exc) for m in FATAL_CUDA_MARKERS)
    return Finished(job_id, error=JobFailed(message), traceback=text, fatal=fatal)


Decode = Callable[[TensorTree, list[Any], bool], Any]


def decode_into(tree: TensorTree, buffers: list[Any], pinned: bool) -> Any:
    """Decode tensors, into page-locked memory when they are headed for a GPU."""
    from scheduler.protocol import DTYPES

    check_buffers(tree, buffers, 1 << 62)
    made = []
    for meta, buf in zip(tree.metas, buffers):
        t = torch.empty(meta.shape, dtype=DTYPES[meta.dtype], pin_memory=pinned)
        if t.numel():
            t.reshape(-1).view(torch.uint8).numpy()[:] = memoryview(buf).cast("B")
        made.append(t)
    if tree.layout == "none":
        return None
    if tree.layout == "tensor":
        return made[0]
    if tree.layout == "tuple":
        return tuple(made)
    return dict(zip(tree.keys, made))


class SyncExecutor:
    """CPU: every job runs to completion inside ``submit``."""

    def __init__(self, runtimes: dict[str, GroupRuntime]) -> None:
        self.runtimes = runtimes
        self.policies = {name: rt.spec.batching for name, rt in runtimes.items()}
        self._done: deque[Finished] = deque()
        self.calls = 0
        self.joined_jobs = 0

    @property
    def busy(self) -> bool:
        return bool(self._done)

    def submit(self, job: RunJob, buffers: list[Any]) -> None:
        self.submit_many([(job, buffers)])

    def submit_many(self, items: list[tuple[RunJob, list[Any]]]) -> None:
        """Run jobs that arrived together, neighbours joined into one call where they can be."""
        ready = []
        for job, buffers in items:
            try:
                ready.append(self._prepare(job, buffers))
            except Exception as exc:
                self._done.append(failure(job.job_id, exc))
        for run in plan(ready, self.policies):
            if len(run.jobs) > 1:
                try:
                    results = run_joined(self.runtimes[run.jobs[0].group], run)
                except Exception:
                    pass  # one job's bad data must not fail its neighbours: run them one by one
                else:
                    self.calls += 1
                    self.joined_jobs += len(run.jobs)
                    for job, (outputs, losses) in zip(run.jobs, results):
                        self._done.append(Finished(job.job_id, outputs, None if losses is None else losses.tolist()))
                    continue
            for job in run.jobs:
                self._run_one(job)

    def _prepare(self, job: RunJob, buffers: list[Any]) -> Ready:
        check_deadline(job)
        runtime = self.runtimes[job.group]
        n_in = len(job.inputs.metas)
        inputs = decode_into(job.inputs, buffers[:n_in], False)
        targets = decode_into(job.targets, buffers[n_in:], False)
        check_job(runtime, job.op, job.slots, inputs, targets)
        return Ready(job.job_id, job.op, job.group, list(job.slots), inputs, targets)

    def _run_one(self, job: Ready) -> None:
        self.calls += 1
        try:
            outputs, losses = run_job(self.runtimes[job.group], job.op, job.slots, job.inputs, job.targets)
            self._done.append(Finished(job.job_id, outputs, None if losses is None else losses.tolist()))
        except Exception as exc:
            self._done.append(failure(job.job_id, exc))

    def poll(self) -> list[Finished]:
        done = list(self._done)
        self._done.clear()
        return done


@dataclass
class _InFlight:
    job_id: int
    done: torch.cuda.Event
    outputs: Any
    losses: torch.Tensor | None
    keep: list[Any] = field(default_factory=list)  # device tensors that must live until ``done``


class StreamExecutor:
    """GPU: jobs enqueued on a pool of compute streams plus a copy stream, reaped by event."""

    def __init__(self, runtimes: dict[str, GroupRuntime], device: torch.device, streams: int) -> None:
        self.runtimes = runtimes
        self.device = device
        self.compute = [torch.cuda.Stream(device) for _ in range(max(1, streams))]
        self.copy = torch.cuda.Stream(device)
        # Last event that touched each (group, slot): a job on another stream waits on it.
        self._last: dict[tuple[str, int], tuple[torch.cuda.Stream, torch.cuda.Event]] = {}
        self._in_flight: deque[_InFlight] = deque()
        self._done: deque[Finished] = deque()

    @property
    def busy(self) -> bool:
        return bool(self._in_flight or self._done)

    def stream_for(self, group: str, slot: int) -> torch.cuda.Stream:
        return self.compute[hash((group, slot)) % len(self.compute)]

    def submit_many(self, items: list[tuple[RunJob, list[Any]]]) -> None:
        # Each job goes to its model's stream; streams already overlap jobs of different models.
        for job, buffers in items:
            self.submit(job, buffers)

    def submit(self, job: RunJob, buffers: list[Any]) -> None:
        try:
            self._enqueue(job, buffers)
        except Exception as exc:
            self._done.append(failure(job.job_id, exc))

    def _enqueue(self, job: RunJob, buffers: list[Any]) -> None:
        check_deadline(job)
        runtime = self.runtimes[job.group]
        n_in = len(job.inputs.metas)
        host_inputs = decode_into(job.inputs, buffers[:n_in], True)
        host_targets = decode_into(job.targets, buffers[n_in:], True)
        check_job(runtime, job.op, job.slots, host_inputs, host_targets)
        stream = self.stream_for(job.group, job.slots[0])
        with torch.cuda.stream(self.copy):
            inputs = _to_device(host_inputs, self.device)
            targets = _to_device(host_targets, self.device)
            copied = torch.cuda.Event()
            copied.record(self.copy)
        stream.wait_event(copied)
        for slot in job.slots:
            previous = self._last.get((job.group, slot))
            if previous is not None and previous[0] is not stream:
                stream.wait_event(previous[1])
        with torch.cuda.stream(stream):
            _record_stream([inputs, targets], stream)
            outputs, losses = run_job(runtime, job.op, job.slots, inputs, targets)
            host_out = _to_host(outputs)
            host_losses = _to_host(losses)
            done = torch.cuda.Event()
            done.record(stream)
        for slot in job.slots:
            self._last[(job.group, slot)] = (stream, done)
        self._in_flight.append(_InFlight(job.job_id, done, host_out, host_losses, [inputs, targets, outputs, losses]))

    def poll(self) -> list[Finished]:
        finished = list(self._done)
        self._done.clear()
        still: deque[_InFlight] = deque()
        for item in self._in_flight:
            try:
                ready = item.done.query()
            except Exception as exc:  # a fatal CUDA error surfaces here
                finished.append(failure(item.job_id, exc))
                continue
            if not ready:
                still.append(item)
                continue
            losses = None if item.losses is None else item.losses.tolist()
            finished.append(Finished(item.job_id, item.outputs, losses))
        self._in_flight = still
        return finished


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: fn(v) for k, v in value.items()}
    return tuple(fn(v) for v in value)


def _to_device(value: Any, device: torch.device) -> Any:
    return _map_tensors(value, lambda t: t.to(device, non_blocking=True))


def _to_host(value: Any) -> Any:
    def copy(t: torch.Tensor) -> torch.Tensor:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host

    return _map_tensors(value, copy)


def _record_stream(values: list[Any], stream: torch.cuda.Stream) -> None:
    # Tensors made on the copy stream are used on ``stream``: tell the caching allocator.
    for value in values:
        _map_tensors(value, lambda t: (t.record_stream(stream), t)[1])


def make_executor(runtimes: dict[str, GroupRuntime], device: torch.device, streams: int) -> SyncExecutor | StreamExecutor:
    if device.type == "cuda":
        return StreamExecutor(runtimes, device, streams)
    return SyncExecutor(runtimes)

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

from core.errors import BadInput, CohortError, JobFailed, JobTimeout
from core.messages import RunJob
from core.tensors import TensorTree, decode_into
from workers.batching import Ready, Run, plan, run_joined
from workers.execute import GroupRuntime, index_rows
from workers.losses import check_target

# Errors after which a CUDA context cannot be trusted (most CUDA errors are sticky): the
# worker exits and is replaced. Running out of memory is not one of them.
FATAL_CUDA_MARKERS = ("CUDA error", "device-side assert", "illegal memory access", "unspecified launch failure",
                      "misaligned address", "MPS client", "CUBLAS_STATUS_EXECUTION_FAILED")
NOT_FATAL_MARKERS = ("out of memory",)


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
    fatal = any(m in message for m in FATAL_CUDA_MARKERS) and not any(m in message for m in NOT_FATAL_MARKERS)
    return Finished(job_id, error=JobFailed(message), traceback=text, fatal=fatal)


Decode = Callable[[TensorTree, list[Any], bool], Any]


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
    return plan(ready, {name: rt.spec.batching for name, rt in runtimes.items()})


def prepare(runtimes: dict[str, GroupRuntime], job: RunJob, buffers: list[Any], pinned: bool) -> Ready:
    """Decode a job's tensors (into pinned memory when headed for a GPU) and check them on the host."""
    check_deadline(job)
    runtime = runtimes[job.group]
    n_in = len(job.inputs.metas)
    inputs = decode_into(job.inputs, buffers[:n_in], pinned)
    targets = decode_into(job.targets, buffers[n_in:], pinned)
    check_job(runtime, job.op, job.slots, inputs, targets)
    return Ready(job.job_id, job.op, job.group, list(job.slots), inputs, targets)


def run_on_device(runtime: GroupRuntime, run: Run) -> list[tuple[Any, torch.Tensor | None]]:
    """A run's computation, ``(outputs, losses)`` per job in order: one joined call, or one job."""
    if len(run.jobs) > 1:
        return run_joined(runtime, run)
    job = run.jobs[0]
    return [run_job(runtime, job.op, job.slots, job.inputs, job.targets)]


class SyncExecutor:
    """CPU: every job runs to completion inside ``submit``."""

    def __init__(self, runtimes: dict[str, GroupRuntime]) -> None:
        self.runtimes = runtimes
        self._done: deque[Finished] = deque()
        self.calls = 0
        self.joined_jobs = 0

    @property
    def busy(self) -> bool:
        return bool(self._done)

    def wait_ms(self) -> int | None:
        """How long the worker's loop may wait for messages: 0 with results to send, else no limit."""
        return 0 if self._done else None

    def submit(self, job: RunJob, buffers: list[Any]) -> None:
        self.submit_many([(job, buffers)])

    def submit_many(self, items: list[tuple[RunJob, list[Any]]]) -> None:
        """Run jobs that arrived together, neighbours joined into one call where they can be."""
        for run in planned_runs(self.runtimes, items, False, self._done):
            self._run(run)

    def _run(self, run: Run) -> None:
        try:
            results = run_on_device(self.runtimes[run.jobs[0].group], run)
        except Exception as exc:
            if len(run.jobs) > 1:  # one job's bad data must not fail its neighbours: run them one by one
                for job in run.jobs:
                    self._run(Run("single", [job]))
            else:
                self._done.append(failure(run.jobs[0].job_id, exc))
            return
        self.calls += 1
        if len(run.jobs) > 1:
            self.joined_jobs += len(run.jobs)
        for job, (outputs, losses) in zip(run.jobs, results):
            self._done.append(Finished(job.job_id, outputs, None if losses is None else losses.tolist()))

    def poll(self) -> list[Finished]:
        done = list(self._done)
        self._done.clear()
        return done


@dataclass
class _InFlight:
    """A launched run: its jobs' host copies, valid once ``done`` has completed."""

    done: torch.cuda.Event
    results: list[tuple[int, Any, torch.Tensor | None]]  # job id, host outputs, host losses
    error: Finished | None = None  # a launch that failed: reported once what it queued has finished
    keep: list[Any] = field(default_factory=list)  # device tensors that must live until ``done``


# The loop polls without waiting this long after its last launch or completion (GPU jobs of
# small models finish within it), then waits 1 ms at a time instead of spinning a core.
SPIN_S = 0.002


class StreamExecutor:
    """GPU: runs enqueued on a pool of compute streams plus a copy stream, reaped by event.

    Jobs are joined as on the CPU (``plan``). A run goes to the stream of its first
    model and waits on the last event of every model it touches, so each model's jobs
    keep their order while runs of other models overlap.
    """

    def __init__(self, runtimes: dict[str, GroupRuntime], device: torch.device, streams: int) -> None:
        self.runtimes = runtimes
        self.device = device
        self.compute = [torch.cuda.Stream(device) for _ in range(max(1, streams))]
        self.copy = torch.cuda.Stream(device)
        # Last event that touched each (group, slot): a run on another stream waits on it.
        self._last: dict[tuple[str, int], tuple[torch.cuda.Stream, torch.cuda.Event]] = {}
        self._stream_of: dict[tuple[str, int], torch.cuda.Stream] = {}
        self._in_flight: deque[_InFlight] = deque()
        self._done: deque[Finished] = deque()
        self._progress = 0.0
        self.calls = 0
        self.joined_jobs = 0

    @property
    def busy(self) -> bool:
        return bool(self._in_flight or self._done)

    def wait_ms(self) -> int | None:
        if self._done:
            return 0
        if self._in_flight:
            return 0 if time.monotonic() - self._progress < SPIN_S else 1
        return None

    def stream_for(self, group: str, slot: int) -> torch.cuda.Stream:
        """A model's stream: given round-robin on first use, the same one ever after."""
        key = (group, slot)
        stream = self._stream_of.get(key)
        if stream is None:
            stream = self._stream_of[key] = self.compute[len(self._stream_of) % len(self.compute)]
        return stream

    def submit(self, job: RunJob, buffers: list[Any]) -> None:
        self.submit_many([(job, buffers)])

    def submit_many(self, items: list[tuple[RunJob, list[Any]]]) -> None:
        for run in planned_runs(self.runtimes, items, True, self._done):
            self._launch(run)
        self._progress = time.monotonic()

    def _launch(self, run: Run) -> None:
        group = run.jobs[0].group
        slots = sorted({s for job in run.jobs for s in job.slots})
        stream = self.stream_for(group, run.jobs[0].slots[0])
        with torch.cuda.stream(self.copy):
            moved = Run(run.kind, [Ready(j.job_id, j.op, j.group, j.slots, _to_device(j.inputs, self.device),
                                         _to_device(j.targets, self.device)) for j in run.jobs])
            copied = torch.cuda.Event()
            copied.record(self.copy)
        stream.wait_event(copied)
        for slot in slots:
            previous = self._last.get((group, slot))
            if previous is not None and previous[0] is not stream:
                stream.wait_event(previous[1])
        keep: list[Any] = [value for j in moved.jobs for value in (j.inputs, j.targets)]
        results: list[tuple[int, Any, torch.Tensor | None]] = []
        error: BaseException | None = None
        with torch.cuda.stream(stream):
            _record_stream(keep, stream)
            try:
                for job, (outputs, losses) in zip(run.jobs, run_on_device(self.runtimes[group], moved)):
                    keep += [outputs, losses]
                    results.append((job.job_id, _to_host(outputs), _to_host(losses)))
            except Exception as exc:
                error = exc
            # Recorded even after a failure: what the launch queued finishes before the next
            # job of these models runs, and before its answer lets a barrier through.
            done = torch.cuda.Event()
            done.record(stream)
        for slot in slots:
            self._last[(group, slot)] = (stream, done)
        if error is None:
            self.calls += 1
            if len(run.jobs) > 1:
                self.joined_jobs += len(run.jobs)
            self._in_flight.append(_InFlight(done, results, keep=keep))
        elif len(run.jobs) > 1:  # one job's bad data must not fail its neighbours: launch them one by one
            for job in run.jobs:
                self._launch(Run("single", [job]))
        else:
            self._in_flight.append(_InFlight(done, [], failure(run.jobs[0].job_id, error), keep))

    def poll(self) -> list[Finished]:
        finished = list(self._done)
        self._done.clear()
        still: deque[_InFlight] = deque()
        for item in self._in_flight:
            try:
                ready = item.done.query()
            except Exception as exc:  # an error from the device itself: the context cannot be trusted
                for job_id, _, _ in item.results or [(item.error.job_id if item.error else -1, None, None)]:
                    lost = failure(job_id, exc)
                    lost.fatal = True
                    finished.append(lost)
                continue
            if not ready:
                still.append(item)
                continue
            if item.error is not None:
                finished.append(item.error)
            for job_id, outputs, losses in item.results:
                finished.append(Finished(job_id, outputs, None if losses is None else losses.tolist()))
        if len(still) != len(self._in_flight):
            self._progress = time.monotonic()
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

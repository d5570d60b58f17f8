"""The GPU executor: runs enqueued on CUDA streams, reaped by event; the loop never blocks.

Inputs land in pinned host memory, go to the device on the copy stream, the job runs
on its model's compute stream (a model always maps to the same stream, so its jobs
keep their order; jobs of different models overlap), results come back to pinned
memory, and ``poll`` checks CUDA events.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from core.messages import RunJob
from workers.batching import Ready, Run
from workers.execute import GroupRuntime
from workers.executors import rerun_singly
from workers.outcome import Finished, failure
from workers.prepare import planned_runs, run_on_device


@dataclass
class _InFlight:
    """A launched run: its jobs' host copies, valid once ``done`` has completed."""

    done: torch.cuda.Event
    results: list[tuple[int, Any, torch.Tensor | None]]  # job id, host outputs, host losses
    errors: list[Finished] = field(default_factory=list)  # a failed launch: reported once what it queued has finished
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
        elif rerun_singly(run, error):
            for job in run.jobs:
                self._launch(Run("single", [job]))
        else:
            self._in_flight.append(_InFlight(done, [], [failure(job.job_id, error) for job in run.jobs], keep=keep))

    def poll(self) -> list[Finished]:
        finished = list(self._done)
        self._done.clear()
        still: deque[_InFlight] = deque()
        for item in self._in_flight:
            try:
                ready = item.done.query()
            except Exception as exc:  # an error from the device itself: the context cannot be trusted
                for job_id in [r[0] for r in item.results] + [e.job_id for e in item.errors]:
                    lost = failure(job_id, exc)
                    lost.fatal = True
                    finished.append(lost)
                continue
            if not ready:
                still.append(item)
                continue
            finished.extend(item.errors)
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

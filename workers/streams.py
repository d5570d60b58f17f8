"""The GPU executor: runs enqueued on CUDA streams, reaped by event; the loop never blocks.

Inputs land in pinned host memory, go to the device on the copy stream, the job runs
on its model's compute stream (a model always maps to the same stream, so its jobs
keep their order; jobs of different models overlap), results come back to pinned
memory, and ``poll`` checks CUDA events.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from core.messages import JOB_OPS, RunJob
from workers.batching import Run
from workers.execute import GroupRuntime
from workers.executors import rerun_singly
from workers.outcome import Finished, failure
from workers.prepare import planned_runs, run_measured


@dataclass
class _InFlight:
    """A launched run: its jobs' host copies, valid once ``done`` has completed."""

    done: torch.cuda.Event
    results: list[tuple[int, Any, torch.Tensor | None]]  # job id, host outputs, host losses
    errors: list[Finished] = field(default_factory=list)  # a failed launch: reported once what it queued has finished
    keep: list[Any] = field(default_factory=list)  # device tensors that must live until ``done``


# torch hands out CUDA streams from a pool of 32 per priority, round-robin: more compute
# streams than that would share. The copy stream has the high priority, a pool of its own.
MAX_STREAMS = 32
COPY_PRIORITY = -1


class EventWaiter:
    """Threads that wait for CUDA events without spinning a core, and wake the worker's loop.

    Events are made with ``blocking=True`` (``cudaEventBlockingSync``): waiting on one puts
    the waiting thread to sleep until the GPU signals, and the GIL is released meanwhile.
    Each completion writes a byte to a pipe that the loop polls with its socket.

    One thread per stream: events recorded on one stream complete in the order they were
    recorded, so waiting for them in that order never wakes the loop late. A single thread
    for every stream would: a short run on one stream would wait, unreported, behind a
    long run launched before it on another."""

    def __init__(self) -> None:
        self.read_fd, self._write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        self._queues: dict[Any, queue.SimpleQueue[Any]] = {}
        self._threads: list[threading.Thread] = []

    def watch(self, event: Any, stream: Any) -> None:
        """Wake the loop once ``event`` (recorded on ``stream``) has completed."""
        waiting = self._queues.get(stream)
        if waiting is None:
            waiting = self._queues[stream] = queue.SimpleQueue()
            thread = threading.Thread(target=self._run, args=(waiting,), name=f"cohort-events-{len(self._threads)}",
                                      daemon=True)
            self._threads.append(thread)
            thread.start()
        waiting.put(event)

    def drain(self) -> None:
        try:
            while os.read(self.read_fd, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        """End the threads once the events they wait for have completed."""
        for waiting in self._queues.values():
            waiting.put(None)
        for thread in self._threads:
            thread.join(timeout=5)

    def _run(self, waiting: queue.SimpleQueue[Any]) -> None:
        while (event := waiting.get()) is not None:
            try:
                event.synchronize()
            except Exception:  # a device fault: the loop's query of the same event reports it
                pass
            os.write(self._write_fd, b"x")


class StreamExecutor:
    """GPU: runs enqueued on a pool of compute streams plus a copy stream, reaped by event.

    Jobs are joined as on the CPU (``plan``). A run goes to the stream of its first
    model and waits on the last event of every model it touches, so each model's jobs
    keep their order while runs of other models overlap. Anything that fails while a
    run is placed (the inputs' copy to the device running out of memory, say) fails that
    run's jobs and nothing else.
    """

    def __init__(self, runtimes: dict[str, GroupRuntime], device: torch.device, streams: int) -> None:
        self.runtimes = runtimes
        self.device = device
        self.compute = [torch.cuda.Stream(device) for _ in range(min(max(1, streams), MAX_STREAMS))]
        self.copy = torch.cuda.Stream(device, priority=COPY_PRIORITY)
        # Last event that touched each (group, slot): a run on another stream waits on it.
        self._last: dict[tuple[str, int], tuple[torch.cuda.Stream, torch.cuda.Event]] = {}
        self._stream_of: dict[tuple[str, int], torch.cuda.Stream] = {}
        self._in_flight: deque[_InFlight] = deque()
        self._done: deque[Finished] = deque()
        self._waiter = EventWaiter()
        self.calls = 0
        self.joined_jobs = 0

    @property
    def busy(self) -> bool:
        return bool(self._in_flight or self._done)

    def wake_fds(self) -> list[int]:
        return [self._waiter.read_fd]

    def wait_ms(self) -> int | None:
        """0 with results to send; else the loop sleeps until a message or an event wakes it."""
        return 0 if self._done else None

    def stream_for(self, group: str, slot: int) -> torch.cuda.Stream:
        """A model's stream: given round-robin on first use, the same one ever after."""
        key = (group, slot)
        stream = self._stream_of.get(key)
        if stream is None:
            stream = self._stream_of[key] = self.compute[len(self._stream_of) % len(self.compute)]
        return stream

    def submit_many(self, items: list[tuple[RunJob, list[Any]]]) -> None:
        for run in planned_runs(self.runtimes, items, True, self._done):
            self._launch(run)

    def _launch(self, run: Run) -> None:
        group = run.jobs[0].group
        slots = sorted({s for job in run.jobs for s in (*job.slots, *job.source)})
        stream = self.stream_for(group, run.jobs[0].slots[0])
        keep: list[Any] = []
        results: list[tuple[int, Any, torch.Tensor | None]] = []
        error: BaseException | None = None
        try:
            with torch.cuda.stream(self.copy):
                moved = replace(run, jobs=[replace(j, inputs=_to_device(j.inputs, self.device),
                                                   targets=_to_device(j.targets, self.device)) for j in run.jobs])
                copied = torch.cuda.Event()
                copied.record(self.copy)
            keep += [value for j in moved.jobs for value in (j.inputs, j.targets)]
            stream.wait_event(copied)
            for slot in slots:
                previous = self._last.get((group, slot))
                if previous is not None and previous[0] is not stream:
                    stream.wait_event(previous[1])
            with torch.cuda.stream(stream):
                _record_stream(keep, stream)
                computed = run_measured(self.runtimes[group], moved, self._synchronize)
                for job, (outputs, losses) in zip(run.jobs, computed):
                    keep += [outputs, losses]
                    results.append((job.job_id, _to_host(outputs), _to_host(losses)))
        except Exception as exc:
            error = exc
        # Recorded even after a failure: what the launch queued finishes before the next job
        # of these models runs, and before its answer lets anything through.
        done = torch.cuda.Event(blocking=True)
        done.record(stream)
        for slot in slots:
            self._last[(group, slot)] = (stream, done)
        if error is None:
            if run.jobs[0].op in JOB_OPS:  # compute calls; bank operations are not counted
                self.calls += 1
            if len(run.jobs) > 1:
                self.joined_jobs += len(run.jobs)
            self._in_flight.append(_InFlight(done, results, keep=keep))
        elif rerun_singly(run, error):
            for job in run.jobs:
                self._launch(Run("single", [job]))
            return
        else:
            self._in_flight.append(_InFlight(done, [], [failure(job.job_id, error) for job in run.jobs], keep=keep))
        self._waiter.watch(done, stream)

    def _synchronize(self) -> None:
        """Wait for everything queued on the device: a call the plan chooser times runs alone."""
        torch.cuda.synchronize(self.device)

    def poll(self) -> list[Finished]:
        """Finished runs, in launch order. Events are queried newest first: a run that waits for an
        earlier one can only be complete if that one is, so a model's results never overtake each other."""
        self._waiter.drain()
        finished = list(self._done)
        self._done.clear()
        states: list[bool | BaseException] = [False] * len(self._in_flight)
        for i in range(len(self._in_flight) - 1, -1, -1):
            try:
                states[i] = self._in_flight[i].done.query()
            except Exception as exc:  # an error from the device itself: the context cannot be trusted
                states[i] = exc
        still: deque[_InFlight] = deque()
        for item, state in zip(self._in_flight, states):
            if isinstance(state, BaseException):
                for job_id in [r[0] for r in item.results] + [e.job_id for e in item.errors]:
                    lost = failure(job_id, state)
                    lost.fatal = True
                    finished.append(lost)
            elif not state:
                still.append(item)
            else:
                finished.extend(item.errors)
                for job_id, outputs, losses in item.results:
                    finished.append(Finished(job_id, outputs, None if losses is None else losses.tolist()))
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

"""The CPU executor, and the choice between it and the GPU's (``workers.streams``).

Both have the same calls: ``submit_many`` jobs that arrived together, and ``poll`` for
the ones that have finished. On the CPU every job runs to completion inside
``submit_many``.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch

from core.messages import JOB_OPS, RunJob
from workers.batching import Run
from workers.execute import GroupRuntime
from workers.outcome import AlreadyStepped, Finished, failure
from workers.prepare import planned_runs, run_measured


def rerun_singly(run: Run, exc: BaseException) -> bool:
    """Whether a joined run that failed is run again job by job: so one job's bad data does
    not fail its neighbours. Never once the call had stepped some of its models."""
    return len(run.jobs) > 1 and not isinstance(exc, AlreadyStepped)


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

    def wake_fds(self) -> list[int]:
        """File descriptors the worker's loop also waits on (none: nothing finishes behind its back)."""
        return []

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
            results = run_measured(self.runtimes[run.jobs[0].group], run)
        except Exception as exc:
            if rerun_singly(run, exc):
                for job in run.jobs:
                    self._run(Run("single", [job]))
            else:
                self._done.extend(failure(job.job_id, exc) for job in run.jobs)
            return
        if run.jobs[0].op in JOB_OPS:  # compute calls; bank operations are not counted
            self.calls += 1
        if len(run.jobs) > 1:
            self.joined_jobs += len(run.jobs)
        for job, (outputs, losses) in zip(run.jobs, results):
            self._done.append(Finished(job.job_id, outputs, None if losses is None else losses.tolist()))

    def poll(self) -> list[Finished]:
        done = list(self._done)
        self._done.clear()
        return done




def make_executor(runtimes: dict[str, GroupRuntime], device: torch.device, streams: int) -> Any:
    """The executor for ``device``: CUDA streams on a GPU, synchronous elsewhere."""
    if device.type == "cuda":
        from workers.streams import StreamExecutor

        return StreamExecutor(runtimes, device, streams)
    return SyncExecutor(runtimes)

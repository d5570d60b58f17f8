"""A job the coordinator is done with is freed at once, by reference counting: its parts point back
at it, and a cycle left for the collector keeps the job, its result frames and its messages alive,
and costs the loop a collection every few hundred jobs (measured: most of the coordinator's
collector time under pipelined tiny jobs)."""

from __future__ import annotations

import gc
import heapq
import time
from types import SimpleNamespace

import pytest

from core.errors import JobFailed
from core.tensors import TensorMeta, TensorTree
from scheduler.jobs import Job, Part
from tests.unit.test_deferred_errors import coordinator

ONE = TensorTree("tensor", (TensorMeta("float32", (1, 4)),))


def one_model_job(job_id: int) -> Job:
    job = Job(job_id, b"client", job_id, "infer", "g", [("g", 0)], time.monotonic(), None)
    job.parts.append(Part(job, 0, [0], [0], ONE, TensorTree("none"), [bytearray(16)]))
    job.open_parts = 1
    return job


def tracked_objects_after(jobs: int, failed: bool) -> int:
    """Objects the collector tracks after ``jobs`` jobs were answered by their worker (with a result,
    or ``failed``) and let go, with the collector off."""
    c, replies = coordinator()
    c._reply = lambda *a: None
    gc.collect()
    gc.disable()
    try:
        before = len(gc.get_objects())
        for job_id in range(jobs):
            job = one_model_job(job_id)
            c.jobs[job_id] = job
            if failed:
                c._finish_part(job.parts[0], None, JobFailed("too hot"))
            else:
                c._finish_part(job.parts[0], (ONE, [bytearray(16)], None), None)
            del job
        grown = len(gc.get_objects()) - before
    finally:
        gc.enable()
    assert not c.jobs and len(replies) == (jobs if failed else 0)
    return grown


@pytest.mark.parametrize("failed", [False, True], ids=["result", "error"])
def test_answered_jobs_are_freed_without_the_collector(failed: bool) -> None:
    grown = tracked_objects_after(1000, failed)
    assert grown < 100, f"{grown} objects left for the collector by 1000 answered jobs"


def test_a_blocked_job_answered_at_its_deadline_is_not_failed_again() -> None:
    """A copy between workers: the write waits for the read; when the write passed its deadline
    first, a failing read must not answer it a second time (nor count it out of its model twice)."""
    c, _ = coordinator()
    answers: list[str | None] = []
    now = time.monotonic()
    write = Job(7, b"", 0, "write", "g", [("g", 0)], now, now - 0.001)
    write.on_done = lambda job, error: answers.append(None if error is None else type(error).__name__)
    write.blocked = True
    part = Part(write, 0, [0], [0], TensorTree("none"), TensorTree("none"), [])
    write.parts.append(part)
    write.open_parts = 1
    c.workers[0].pending.append(part)
    c.jobs[write.id] = write
    c.queued_per_model[("g", 0)] = 2  # the write, and another job on the model
    heapq.heappush(c.deadlines, (write.deadline, write.id))
    c._expire_deadlines()
    c._fail_blocked(write, JobFailed("the read failed"))
    assert answers == ["JobTimeout"]
    assert c.queued_per_model[("g", 0)] == 1 and not c.workers[0].pending


def test_the_deadline_heap_keeps_the_live_jobs_and_not_every_answered_one() -> None:
    """Each job with a timeout leaves an entry in the deadline heap until that deadline passes: at
    thousands of jobs a second and a minute's timeout, hundreds of thousands of dead entries."""
    c, replies = coordinator()
    c.barriers = SimpleNamespace(fences_for=lambda models: [], job_finished=lambda *a: None)
    now = time.monotonic()
    slow = one_model_job(0)
    slow.deadline = now + 0.05
    c._queue(slow)  # still queued when its deadline passes
    c.workers[0].pending.clear()
    for job_id in range(1, 20_000):
        job = one_model_job(job_id)
        job.deadline = now + 60
        c._queue(job)
        c.workers[0].pending.clear()
        c._retire(job)  # answered
        assert len(c.deadlines) <= 2 * (len(c.jobs) + 1) + 1024  # the bound, counted before this one retired
    assert (slow.deadline, slow.id) in c.deadlines
    time.sleep(0.06)
    c._answer = lambda job, error: replies.append(type(error).__name__)
    c._expire_deadlines()
    assert replies == ["JobTimeout"] and not c.jobs

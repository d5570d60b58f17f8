"""A group call whose inputs lie in the client's memory and one of whose parts failed is answered once
no other part may still read that memory, with the first failure, and never trips the coordinator."""

from __future__ import annotations

import heapq
import time
from collections import Counter, deque
from types import SimpleNamespace

from core.errors import JobFailed, WorkerDied
from core.tensors import ShmRef, TensorMeta, TensorTree
from scheduler.coordinator import Coordinator
from scheduler.jobs import Job, Part

IN_ARENA = TensorTree("tensor", (TensorMeta("float32", (4, 65536)),), (), (ShmRef("cohort-1-aaaaaaaa-arena", 64, 1),))


def coordinator() -> tuple[Coordinator, list[str]]:
    """Just enough of a coordinator for its part bookkeeping; the replies it sends, by error name and text."""
    c = object.__new__(Coordinator)
    replies: list[str] = []
    c.workers = [SimpleNamespace(id=i, pending=deque(), in_flight={}, state="ready") for i in range(2)]
    c.jobs, c.deadlines, c.queued_per_model = {}, [], Counter()
    c.stats = SimpleNamespace(record_finish=lambda *a: None)
    c.barriers = SimpleNamespace(job_finished=lambda *a: None)
    c.id_of = {("g", 0): "g/0", ("g", 1): "g/1"}
    c._reply_error = lambda client, req, exc: replies.append(f"{type(exc).__name__}: {exc.message}")
    return c, replies


def group_job(c: Coordinator, deadline: float | None, sent: bool) -> Job:
    now = time.monotonic()
    job = Job(1, b"c", 1, "ensemble", "g", [("g", 0), ("g", 1)], now, deadline)
    for w in (0, 1):
        part = Part(job, w, [0], [w], IN_ARENA, TensorTree("none"), [], sent=sent)
        job.parts.append(part)
        if not sent:
            c.workers[w].pending.append(part)
    job.open_parts = 2
    c.jobs[job.id] = job
    return job


def test_the_answer_waits_for_the_other_part_and_names_the_first_failure() -> None:
    c, replies = coordinator()
    job = group_job(c, None, sent=True)
    c._finish_part(job.parts[0], None, JobFailed("model 0: too hot (the cause)"))
    assert replies == [] and not job.answered  # worker 1 may still read the client's arena
    c._finish_part(job.parts[1], None, WorkerDied("worker 1 died"))
    assert replies == ["JobFailed: model 0: too hot (the cause)"]


def test_a_deadline_after_a_failed_unsent_part_answers_with_the_failure_and_goes_on() -> None:
    c, replies = coordinator()
    job = group_job(c, time.monotonic() + 0.05, sent=False)
    heapq.heappush(c.deadlines, (job.deadline, job.id))
    # worker 0 is given up after a crash loop: its queue fails and is cleared
    c._finish_part(job.parts[0], None, WorkerDied("worker 0 is down"))
    c.workers[0].pending.clear()
    time.sleep(0.1)  # worker 1's part is still queued at the deadline
    c._expire_deadlines()
    assert replies == ["WorkerDied: worker 0 is down"]
    assert not c.workers[1].pending and job.id not in c.jobs

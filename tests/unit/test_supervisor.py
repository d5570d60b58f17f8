"""The supervisor's decisions, with stand-in worker processes: replace one, give up on a crash loop,
and after a CUDA fault under MPS recycle every worker of the GPU."""

from __future__ import annotations

import time
from collections import deque

import pytest

from core.errors import WorkerDied
from core.messages import WorkerFailed
from scheduler.config import CoordinatorConfig
from scheduler.jobs import Job, Part
from scheduler.placement import Block
from scheduler.supervisor import FATAL_DEVICE_EXIT, MAX_RESTARTS, Supervisor
from scheduler.workerpool import WorkerHandle


class FakeProcess:
    def __init__(self, code: int | None = None) -> None:
        self.code = code
        self.pid = 1000

    def poll(self) -> int | None:
        return self.code

    def wait(self, timeout: float | None = None) -> int:
        return self.code or -9


class FakeMps:
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.terminated: list[int] = []

    def terminate_client(self, pid: int) -> None:
        self.terminated.append(pid)


def make(mode: str, workers: int = 3):
    handles = []
    for i in range(workers):
        w = WorkerHandle(i, [Block("g", i, 2 * i, 2)], [])
        w.process, w.pid, w.state, w.device = FakeProcess(), 100 + i, "ready", "cuda:0"
        w.kill = lambda w=w: setattr(w.process, "code", -9)  # noqa: B023
        w.silent_for = lambda now: 0.0  # its heartbeat is fresh
        handles.append(w)
    finished: list[tuple[Part, object]] = []
    mps = FakeMps(mode)
    sup = Supervisor(CoordinatorConfig(), handles, None, {}, mps, "cuda:0", {}, None,  # type: ignore[arg-type]
                     lambda part, result, error: finished.append((part, error)))
    return sup, handles, finished, mps


def in_flight(w: WorkerHandle, job_id: int) -> Part:
    job = Job(job_id, b"c", job_id, "infer", "g", [("g", w.id * 2)], 0.0, None)
    part = Part(job, w.id, [0], [w.id * 2], None, None, [])  # type: ignore[arg-type]
    part.sent = True
    w.in_flight[job_id] = part
    return part


def test_a_dead_worker_is_replaced_and_its_running_job_fails() -> None:
    sup, (w0, w1, w2), finished, _ = make("off")
    running = in_flight(w1, 7)
    w1.process.code = 1
    respawned: list[int] = []
    sup.check(lambda w: respawned.append(w.id))
    assert respawned == [1] and w1.restore and w1.restarts == 1
    assert [(p.job.id, type(e)) for p, e in finished] == [(7, WorkerDied)] and running.job.id == 7
    assert w0.state == w2.state == "ready"


def test_a_cuda_fault_under_mps_recycles_every_worker() -> None:
    sup, workers, finished, mps = make("on")
    for w in workers:
        in_flight(w, 10 + w.id)
    workers[2].process.code = FATAL_DEVICE_EXIT
    respawned: list[int] = []
    sup.check(lambda w: respawned.append(w.id))
    assert respawned == [0, 1, 2], "every client of the GPU must go before the MPS server takes a new one"
    assert sorted(mps.terminated) == [100, 101, 102]
    assert all(w.restarts == 1 and w.restore for w in workers)
    assert sorted(p.job.id for p, _ in finished) == [10, 11, 12]
    assert len(sup.recycles) == 1 and "worker 2" in sup.recycles[0]["reason"]


def test_without_mps_a_device_fault_replaces_only_that_worker() -> None:
    sup, workers, _, _ = make("off")
    workers[0].process.code = FATAL_DEVICE_EXIT
    respawned: list[int] = []
    sup.check(lambda w: respawned.append(w.id))
    assert respawned == [0] and sup.recycles == []


def test_a_crash_loop_is_given_up_and_its_queue_fails() -> None:
    sup, (w0, _, _), finished, _ = make("off")
    queued = Part(Job(3, b"c", 3, "infer", "g", [("g", 0)], 0.0, None), 0, [0], [0], None, None, [])  # type: ignore[arg-type]
    w0.pending = deque([queued])
    for _ in range(MAX_RESTARTS + 1):
        w0.process.code, w0.state = 1, "ready"
        sup.check(lambda w: setattr(w, "state", "ready") or setattr(w.process, "code", None))
    assert w0.state == "failed"
    assert [(p.job.id, type(e)) for p, e in finished] == [(3, WorkerDied)]
    assert not w0.pending


@pytest.mark.parametrize("state", ["dead", "failed", "stopping"])
def test_workers_that_are_not_running_are_left_alone(state: str) -> None:
    sup, (w0, _, _), _, _ = make("off")
    w0.state, w0.process.code = state, 1
    w0.respawn_at = time.monotonic() + 60  # a dead one: its replacement is not due yet
    sup.check(lambda w: pytest.fail("respawned"))


def test_a_replacement_that_fails_to_start_is_started_again_after_a_pause() -> None:
    # Under MPS after a fault the server refuses new clients for a while: the replacement
    # says WorkerFailed. It must be tried again (not left dead with its queue stuck), after a pause.
    sup, (w0, _, _), finished, _ = make("off")
    queued = Part(Job(5, b"c", 5, "infer", "g", [("g", 0)], 0.0, None), 0, [0], [0], None, None, [])  # type: ignore[arg-type]
    w0.pending = deque([queued])
    w0.process.code = 1
    respawned: list[int] = []

    def respawn(w: WorkerHandle) -> None:
        respawned.append(w.id)
        w.state, w.process.code = "starting", None

    sup.check(respawn)
    assert respawned == [0] and w0.state == "starting"
    sup.on_failed(w0, WorkerFailed(0, "JobFailed", "all CUDA-capable devices are busy or unavailable"), [])
    w0.process.code = 1
    assert w0.state == "dead" and w0.restore
    sup.check(respawn)
    assert respawned == [0], "restarted at once after dying again: no pause"
    assert w0.respawn_at > time.monotonic()
    w0.respawn_at = time.monotonic()  # the pause is over
    sup.check(respawn)
    assert respawned == [0, 0] and w0.state == "starting"
    assert list(w0.pending) == [queued] and finished == [], "the queued job waits for the replacement"


def test_a_silent_worker_is_replaced() -> None:
    sup, (w0, _, _), _, _ = make("off")
    w0.silent_for = lambda now: sup.config.heartbeat_timeout_s + 1
    respawned: list[int] = []
    sup.check(lambda w: respawned.append(w.id))
    assert respawned == [0]


def test_what_a_dead_worker_sent_is_read_before_its_jobs_fail() -> None:
    """A job the worker answered (a client got its answer directly) or finished before it died counts
    as done: the supervisor reads the worker's last messages before it fails or requeues the rest."""
    sup, (w0, w1, _), finished, _ = make("off")
    answered, running = in_flight(w1, 7), in_flight(w1, 8)
    read: list[int] = []

    def read_last(w: WorkerHandle) -> None:  # the coordinator's: a JobAnswered for job 7 was waiting
        assert w.link is not None, "read after the link was closed"
        read.append(w.id)
        w.in_flight.pop(7)

    w1.link = object()  # type: ignore[assignment]  # closed by bury: a stand-in that close_link drops
    w1.close_link = lambda: setattr(w1, "link", None)  # type: ignore[method-assign]
    sup.read_last = read_last
    w1.process.code = 1
    sup.check(lambda w: None)
    assert read == [1] and answered.job.id == 7
    assert [(p.job.id, type(e)) for p, e in finished] == [(8, WorkerDied)] and running.job.id == 8

"""A coordinator that dies, stops or restarts under a client that keeps working.

Calls in flight when the connection drops fail at once with ``ProtocolError`` (not at
their deadline); calls made while no coordinator listens time out and are never run by
a coordinator started later; the same ``Client`` and ``AsyncClient`` carry on with
the new coordinator; nothing hangs, whatever was queued.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from concurrent.futures import wait
from pathlib import Path
from typing import Any

import pytest
import torch
from cohort_harness import RunningCohort, alive, leftover_shm, start_cohort
from fixture_models import group

from scheduler import AsyncClient, Client, JobTimeout, ProtocolError

SLEEP_S = 8.0  # the in-flight job sleeps this long in the worker: far longer than a drop takes to see


@pytest.fixture
def restartable(tmp_path: Path) -> Any:
    """``start()`` starts a coordinator on the same private address each time; all are stopped at the end."""
    started: list[RunningCohort] = []

    def start() -> RunningCohort:
        running = start_cohort(tmp_path, [group("slow", "sleepy", count=2)], name="same")
        started.append(running)
        return running

    yield start
    for running in started:
        running.close()


def _sleepy_input(seconds: float) -> torch.Tensor:
    return torch.full((1, 4), float(seconds))


def _kill_coordinator(running: RunningCohort) -> None:
    """SIGKILL the coordinator alone."""
    os.kill(running.process.pid, signal.SIGKILL)
    running.process.wait(10)


def _workers_go(running: RunningCohort) -> None:
    """The workers of a killed coordinator notice and go by themselves (after the job they are running)."""
    workers = [w["pid"] for w in running.info["workers"]]
    deadline = time.monotonic() + SLEEP_S + 10
    while alive(workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert alive(workers) == [], "workers outlived their coordinator"


def test_calls_in_flight_fail_at_once_and_the_client_carries_on_after_a_restart(restartable) -> None:
    first = restartable()
    with Client(first.address, timeout=60) as c:
        assert c.infer("slow/1", _sleepy_input(0)).shape == (1, 4)
        queued = c.submit("infer", "slow/0", _sleepy_input(SLEEP_S))  # through the I/O thread
        blocking: list[BaseException] = []

        def call() -> None:
            try:
                c.infer("slow/1", _sleepy_input(SLEEP_S))  # on the calling thread's own socket
            except BaseException as exc:  # noqa: BLE001 - inspected below
                blocking.append(exc)

        thread = threading.Thread(target=call)
        thread.start()
        time.sleep(1.0)  # both jobs are in the worker now
        killed = time.monotonic()
        _kill_coordinator(first)

        with pytest.raises(ProtocolError, match="dropped while the call was in flight"):
            queued.result(timeout=SLEEP_S)
        thread.join(SLEEP_S)
        assert not thread.is_alive()
        assert time.monotonic() - killed < SLEEP_S / 2, "the drop was not noticed before the job would have ended"
        assert len(blocking) == 1 and isinstance(blocking[0], ProtocolError), blocking
        _workers_go(first)

        second = restartable()
        assert second.info["pid"] != first.info["pid"]
        assert c.infer("slow/0", _sleepy_input(0)).shape == (1, 4)
        assert c.submit("infer", "slow/1", _sleepy_input(0)).result(timeout=30).shape == (1, 4)
        assert [m.version for m in c.models()] == [0, 0]


def test_calls_while_no_coordinator_listens_time_out_and_never_run_later(restartable) -> None:
    first = restartable()
    with Client(first.address, timeout=30) as c:
        c.models()
        assert first.stop().exit_code == 0
        assert leftover_shm(first.info["run_id"]) == []

        began = time.monotonic()
        with pytest.raises(JobTimeout, match="could not reach the coordinator"):
            c.train_step("slow/0", torch.zeros(2, 4), torch.ones(2, 4), timeout=0.5)
        assert time.monotonic() - began < 3
        # Far more single requests than ZeroMQ's send queue holds: none may block the client.
        futures = []
        for _ in range(1500):
            futures.append(c.submit("train_step", "slow/1", torch.zeros(2, 4), torch.ones(2, 4), timeout=1.0))
            time.sleep(0.0002)
        done, not_done = wait(futures, timeout=15)
        assert not not_done, f"{len(not_done)} futures never resolved"
        assert all(isinstance(f.exception(), JobTimeout) for f in futures)

        restartable()
        assert [m.version for m in c.models()] == [0, 0]
        jobs = c.stats()["jobs"]
        assert jobs["submitted"] == 0 and jobs["rejected"] == 0, jobs  # nothing stale reached the new one
        assert c.train_step("slow/0", torch.zeros(2, 4), torch.ones(2, 4)) >= 0
        assert [m.version for m in c.models()] == [1, 0]


def test_async_client_fails_calls_in_flight_and_carries_on(restartable) -> None:
    first = restartable()

    async def scenario() -> None:
        async with AsyncClient(first.address, timeout=60) as c:
            await c.infer("slow/0", _sleepy_input(0))
            in_flight = asyncio.ensure_future(c.infer("slow/0", _sleepy_input(SLEEP_S)))
            await asyncio.sleep(1.0)
            began = time.monotonic()
            await asyncio.get_running_loop().run_in_executor(None, _kill_coordinator, first)
            with pytest.raises(ProtocolError, match="dropped while the call was in flight"):
                await asyncio.wait_for(in_flight, SLEEP_S)
            assert time.monotonic() - began < SLEEP_S / 2
            await asyncio.get_running_loop().run_in_executor(None, _workers_go, first)
            with pytest.raises(JobTimeout, match="could not reach the coordinator"):
                await c.models(timeout=0.5)
            await asyncio.get_running_loop().run_in_executor(None, restartable)
            assert (await c.infer("slow/1", _sleepy_input(0))).shape == (1, 4)

    asyncio.run(scenario())

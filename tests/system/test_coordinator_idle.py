"""The coordinator's loop sleeps while it has nothing it may send: it must not spin a core."""

from __future__ import annotations

import threading
import time
from typing import Any

import psutil
import torch
from cohort_harness import stop_and_check_clean
from fixture_models import group


def cpu_seconds_over(pid: int, seconds: float) -> float:
    process = psutil.Process(pid)
    before = process.cpu_times()
    time.sleep(seconds)
    after = process.cpu_times()
    return (after.user - before.user) + (after.system - before.system)


def test_a_full_window_or_a_fenced_queue_does_not_spin_the_loop(cohort) -> None:
    running = cohort([group("slow", "sleepy", count=2)], workers=1, window=1)
    with running.client(timeout=60) as c:
        busy = c.submit("infer", "slow/0", torch.full((1, 4), 4.0))  # in flight for 4 s: the window is full
        queued = [c.submit("infer", "slow/1", torch.zeros(1, 4)) for _ in range(3)]  # waiting behind it
        time.sleep(0.5)
        spent = cpu_seconds_over(running.process.pid, 2.0)
        print(f"coordinator CPU while it could send nothing: {spent:.3f} s in 2 s")
        assert spent < 0.5, f"the coordinator's loop spun: {spent:.2f} s of CPU in 2 s"
        for f in [busy, *queued]:
            f.result(timeout=30)
    assert stop_and_check_clean(running) == 0


def test_a_client_that_asks_during_start_up_does_not_spin_the_loop(cohort) -> None:
    """The harness asks for stats until the coordinator answers: its request waits in the client
    socket while the workers start, and must not wake the start-up loop again and again."""
    me = psutil.Process()
    started: list[Any] = []
    starting = threading.Thread(target=lambda: started.append(cohort([group("slow", "slow_start", count=1)])))
    starting.start()
    try:
        worker = None
        deadline = time.monotonic() + 60
        while worker is None and time.monotonic() < deadline:  # the worker: the coordinator's child
            coordinators = [p for p in me.children() if "scheduler" in " ".join(p.cmdline())]
            workers = [w for c in coordinators for w in c.children()]
            worker = workers[0] if workers and coordinators else None
            time.sleep(0.1)
        assert worker is not None, "no worker started within 60 s"
        time.sleep(1.0)
        spent = cpu_seconds_over(coordinators[0].pid, 2.0)  # the worker sleeps 8 s building its model
        print(f"coordinator CPU while its worker started: {spent:.3f} s in 2 s")
        assert spent < 0.5, f"the start-up loop spun: {spent:.2f} s of CPU in 2 s"
    finally:
        starting.join(timeout=120)
    assert started, "the coordinator did not come up"
    assert stop_and_check_clean(started[0]) == 0

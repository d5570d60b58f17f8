"""The coordinator's loop sleeps while it has nothing it may send: it must not spin a core."""

from __future__ import annotations

import time

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

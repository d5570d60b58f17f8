"""Compiled calls shared by every worker of a machine: a replacement and a second coordinator load
what the first compiled (the ``aot_eager`` backend keeps this quick; the benchmark measures Inductor)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch
from cohort_harness import mlp_group, stop_and_check_clean

from workers.compile_cache import BACKEND_ENV

COMPILED = mlp_group("c", 4, batching={"compile": "default"})


@pytest.fixture(autouse=True)
def fast_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BACKEND_ENV, "aot_eager")


def first_calls(c) -> float:
    """An ensemble and a shared-batch round; their time."""
    began = time.monotonic()
    x, t = torch.randn(6, 8), torch.randint(0, 4, (6,))
    assert c.ensemble("c", x).shape == (4, 6, 4)
    assert len(c.train_round("c", x, t)) == 4
    return time.monotonic() - began


def test_a_replacement_worker_loads_what_its_predecessor_compiled(cohort, tmp_path) -> None:
    running = cohort([COMPILED], workers=1, compile_cache_dir=str(tmp_path / "cache"), heartbeat_timeout_s=10)
    with running.client(timeout=180) as c:
        cold = first_calls(c)
        time.sleep(0.6)  # counts come with the worker's reports
        compile_stats = c.stats()["workers"][0]["compile"]
        assert compile_stats["compiled"] == 2 and compile_stats["loaded"] == 0, compile_stats
        pid = c.stats()["workers"][0]["pid"]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 90
        while not (c.stats()["workers"][0]["state"] == "ready" and c.stats()["workers"][0]["pid"] != pid):
            assert time.monotonic() < deadline, "no replacement"
            time.sleep(0.2)
        warm = first_calls(c)
        time.sleep(0.6)
        worker = c.stats()["workers"][0]
    print(f"first compiled calls: cold {cold:.2f} s, replacement {warm:.2f} s; {worker['compile']}")
    assert worker["compile"]["compiled"] == 0 and worker["compile"]["loaded"] == 2, worker["compile"]
    assert worker["compiled_calls"] >= 2 and worker["eager_calls"] == 0
    assert warm < cold
    assert stop_and_check_clean(running) == 0


def test_two_coordinators_starting_at_once_on_one_cache_both_work(cohort, tmp_path) -> None:
    cache = str(tmp_path / "shared-cache")
    runs = [cohort([COMPILED], workers=1, compile_cache_dir=cache) for _ in range(2)]
    errors: list[BaseException] = []

    def use(running) -> None:
        try:
            with running.client(timeout=240) as c:
                first_calls(c)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=use, args=(r,)) for r in runs]
    for th in threads:
        th.start()
    for th in threads:
        th.join(300)
    assert not errors, errors
    time.sleep(0.6)
    counts = []
    for running in runs:
        with running.client(timeout=30) as c:
            counts.append(c.stats()["workers"][0]["compile"])
    assert sum(s["compiled"] for s in counts) == 2 and sum(s["loaded"] for s in counts) == 2, counts
    for running in runs:
        assert stop_and_check_clean(running) == 0

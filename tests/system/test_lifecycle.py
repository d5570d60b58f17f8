"""Start-up, shutdown and worker death: nothing left behind, nothing lost."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from cohort_harness import alive, mlp_group, stop_and_check_clean
from fixture_models import group

from scheduler import WorkerDied


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_shutdown_leaves_no_process_and_no_shared_memory(cohort, sig) -> None:
    running = cohort([mlp_group("a", 3), mlp_group("b", 2)], workers=2)
    with running.client(timeout=30) as c:
        c.train_step("a/1", torch.randn(4, 8), torch.zeros(4, dtype=torch.int64))
        assert len({m.worker for m in c.models()}) == 2
    assert stop_and_check_clean(running, sig) == 0
    assert "stopped" in running.log()


def test_startup_reports_address_workers_and_device(cohort) -> None:
    running = cohort([mlp_group("a", 4)], workers=2)
    log = running.log()
    assert running.address in log
    assert "worker 0" in log and "worker 1" in log
    assert "device cpu" in log


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_killed_worker_fails_in_flight_jobs_restarts_and_restores(cohort) -> None:
    running = cohort([group("slow", "sleepy", count=2)], workers=1, heartbeat_timeout_s=5)
    with running.client(timeout=60) as c:
        # Train, then take a barrier: the host copy the replacement is restored from.
        x = torch.zeros(2, 4)
        t = torch.ones(2, 4)
        for _ in range(3):
            c.train_step("slow/0", x, t)
        c.barrier()
        trained = c.get_weights("slow/0")
        version = {m.id: m.version for m in c.models()}["slow/0"]
        assert version == 3
        pid = c.stats()["workers"][0]["pid"]

        in_flight = c.submit("infer", "slow/0", torch.full((1, 4), 5.0))   # sleeps 5 s in the worker
        queued = c.submit("infer", "slow/0", torch.zeros(1, 4))           # waits behind it on the same model
        wait_for(lambda: c.stats()["in_flight"] >= 1, 10, "the job to start")
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(WorkerDied):
            in_flight.result(timeout=10)
        noticed = time.monotonic() - killed_at
        assert noticed < 1.5, f"worker death noticed after {noticed:.2f} s"

        # The job that never started runs on the replacement, with the restored weights.
        y = queued.result(timeout=60)
        recovered = time.monotonic() - killed_at
        stats = c.stats()
        worker = stats["workers"][0]
        assert worker["pid"] != pid and worker["state"] == "ready" and worker["restarts"] == 1
        assert alive([pid]) == []
        restored = c.get_weights("slow/0")
        for name in trained:
            assert torch.equal(restored[name], trained[name]), name
        assert {m.id: m.version for m in c.models()}["slow/0"] == version
        with torch.no_grad():
            want = torch.nn.functional.linear(torch.zeros(1, 4), trained["linear.weight"], trained["linear.bias"])
        torch.testing.assert_close(y, want)
        print(f"worker death noticed in {noticed:.3f} s, recovered in {recovered:.3f} s")
    assert stop_and_check_clean(running) == 0


def test_periodic_snapshot_restores_without_an_explicit_barrier(cohort, tmp_path) -> None:
    snapdir = tmp_path / "periodic"
    running = cohort([mlp_group("p", 2)], workers=1, snapshot_interval_s=0.3, snapshot_dir=str(snapdir))
    x, t = torch.randn(4, 8), torch.zeros(4, dtype=torch.int64)
    with running.client(timeout=60) as c:
        for _ in range(4):
            c.train_step("p/1", x, t)
        wait_for(lambda: (snapdir / "p" / "1.safetensors").exists(), 10, "the periodic snapshot file")
        time.sleep(0.8)  # at least one more period, after the last step
        pid = c.stats()["workers"][0]["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: c.stats()["workers"][0]["restarts"] == 1 and c.stats()["workers"][0]["state"] == "ready",
                 30, "the replacement worker")
        assert {m.id: m.version for m in c.models()}["p/1"] == 4
    from safetensors.torch import load_file

    saved = load_file(str(snapdir / "p" / "1.safetensors"))
    with running.client(timeout=30) as c:
        now = c.get_weights("p/1")
    for name, value in saved.items():
        assert torch.equal(now[name], value), name

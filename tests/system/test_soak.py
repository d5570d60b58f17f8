"""A short soak: tools/soak.py's mixed load while workers are SIGKILLed every few seconds."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from cohort_harness import mlp_group, stop_and_check_clean

from scheduler import WorkerDied
from scheduler.supervisor import MAX_RESTARTS

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import soak  # noqa: E402

LOAD_S = 15
KILL_EVERY_S = 4


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_short_soak_with_worker_kills(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    code = soak.main(["--seconds", str(LOAD_S), "--kill-every", str(KILL_EVERY_S), "--workers", "2",
                      "--clients", "4", "--json", str(out), "--seed", "1"])
    report = json.loads(out.read_text())
    jobs, kills, leaks = report["jobs"], report["kills"], report["leaks"]
    print(f"jobs {jobs['submitted']} answered {jobs['answered']} failed {jobs['failed_by_error']} "
          f"hung {jobs['hung']}; kills {kills['count']} recovered {kills['recovered']} "
          f"recovery {kills['recovery_s']}; coordinator RSS {report['memory']}")

    assert jobs["hung"] == 0, report["examples"].get("hung")
    assert jobs["untyped"] == 0, report["examples"].get("untyped")
    assert jobs["bad_inputs_wrong"] == 0, report["examples"].get("bad_input_wrong")
    assert jobs["bad_inputs_sent"] > 0
    assert jobs["wrong_results"] == 0, report["examples"].get("wrong_result")
    assert jobs["answered"] > 300, jobs
    assert kills["recovered"] >= 2, kills
    assert kills["recovered"] == kills["count"], kills
    assert leaks["checked"] and leaks["processes_left"] == [] and leaks["shm_left"] == [], leaks
    assert report["stop"]["exit_code"] == 0 and not report["stop"]["needed_sigkill"], report["stop"]
    assert code == 0, report["reasons"]


def wait_for_worker(c, predicate, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        worker = c.stats()["workers"][0]
        if predicate(worker):
            return worker
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}: {c.stats()['workers'][0]}")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_worker_given_up_after_a_crash_loop_fails_new_jobs_at_once(cohort) -> None:
    """Past the restart limit the coordinator stops restarting a worker; a job for one of its models
    must then fail at once with WorkerDied, not wait in a queue nobody serves until its deadline."""
    running = cohort([mlp_group("a", 2)], workers=1)
    x = torch.randn(2, 8)
    with running.client(timeout=30) as c:
        for death in range(1, MAX_RESTARTS + 2):
            worker = wait_for_worker(c, lambda w: w["state"] == "ready", 60, "a ready worker")
            os.kill(worker["pid"], signal.SIGKILL)
            wait_for_worker(c, lambda w, n=death: w["restarts"] >= n, 30, f"death {death} to be seen")
        worker = wait_for_worker(c, lambda w: w["state"] != "starting", 60, "the last restart decision")
        assert worker["state"] != "ready", f"restarted after {MAX_RESTARTS + 1} deaths in a row: {worker}"
        print(f"after {MAX_RESTARTS + 1} deaths: {worker}")

        t0 = time.monotonic()
        with pytest.raises(WorkerDied):
            c.infer("a/0", x, timeout=10)
        took = time.monotonic() - t0
        print(f"a job for a model of the given-up worker failed after {took:.2f} s")
        assert took < 2.0
        with pytest.raises(WorkerDied):
            c.get_weights("a/1", timeout=10)
    assert stop_and_check_clean(running) == 0

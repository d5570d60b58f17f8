"""A worker's lifeline: long jobs are not deaths, orphans end at once, a killed run is cleaned up."""

from __future__ import annotations

import signal
import tempfile
import time
from pathlib import Path

import pytest
import torch
from cohort_harness import alive, kill_group, leftover_shm, mlp_group, stop_and_check_clean
from fixture_models import group


def test_a_job_longer_than_the_heartbeat_timeout_is_not_a_death(cohort) -> None:
    """The heartbeat comes from a thread: a 3 s job under a 1 s heartbeat timeout runs to its end."""
    running = cohort([group("slow", "sleepy", count=1)], workers=1, heartbeat_timeout_s=1.0)
    with running.client(timeout=30) as c:
        pid = c.stats()["workers"][0]["pid"]
        y = c.infer("slow/0", torch.full((1, 4), 3.0))  # the model sleeps x[0, 0] seconds
        assert y.shape == (1, 4)
        worker = c.stats()["workers"][0]
        assert worker["pid"] == pid and worker["restarts"] == 0, worker
    assert stop_and_check_clean(running) == 0


@pytest.mark.alone
def test_workers_of_a_killed_coordinator_end_at_once_and_the_next_start_cleans_up(cohort) -> None:
    running = cohort([group("slow", "sleepy", count=2)], workers=2)
    run_id = running.info["run_id"]
    with running.client(timeout=30) as c:
        pids = [w["pid"] for w in c.stats()["workers"]]
        c.submit("infer", "slow/0", torch.full((1, 4), 20.0))  # a worker busy for 20 s
        time.sleep(0.5)
    running.process.send_signal(signal.SIGKILL)
    running.process.wait(10)
    killed = time.monotonic()
    while alive(pids) and time.monotonic() - killed < 10:
        time.sleep(0.05)
    took = time.monotonic() - killed
    assert alive(pids) == [], "workers outlived their coordinator"
    assert took < 2.0, f"the busy worker took {took:.1f} s to notice its coordinator died"
    # The coordinator could not remove its run directory or its host copies; the next start does.
    run_dirs = list(Path(tempfile.gettempdir()).glob(f"cohort-{run_id}-*"))
    assert run_dirs, "expected the killed run's directory to be left behind"
    assert leftover_shm(run_id), "expected the killed run's host copies to be left behind"
    again = cohort([mlp_group("m", 2)], workers=1)
    try:
        assert not any(p.exists() for p in run_dirs)
        assert leftover_shm(run_id) == []
        assert "run directory of a dead coordinator" in again.log()
    finally:
        assert stop_and_check_clean(again) == 0
        kill_group(running.process.pid)


def test_a_stalled_coordinator_does_not_take_its_workers_for_dead(cohort) -> None:
    """Silence is the worker's own heartbeat: a coordinator that froze for longer than the timeout
    (a long copy, a debugger, SIGSTOP) finds its workers alive when it resumes."""
    running = cohort([mlp_group("m", 2)], workers=2, heartbeat_timeout_s=1.0)
    with running.client(timeout=30) as c:
        pids = [w["pid"] for w in c.stats()["workers"]]
        running.process.send_signal(signal.SIGSTOP)
        time.sleep(2.5)
        running.process.send_signal(signal.SIGCONT)
        time.sleep(0.5)
        workers = c.stats()["workers"]
        assert [w["pid"] for w in workers] == pids and all(w["restarts"] == 0 for w in workers), workers
        assert c.infer("m/1", torch.randn(2, 8)).shape == (2, 4)
    assert stop_and_check_clean(running) == 0


@pytest.mark.alone
def test_a_new_coordinator_restores_a_killed_runs_host_copies(cohort) -> None:
    """``restore_run``: the models start where the killed coordinator's last host copies had them:
    weights, optimizer state, run-time hyperparameters, step counts and versions."""
    groups = [mlp_group("m", 3, optimizer={"name": "adam", "lr": 0.01})]
    running = cohort(groups, workers=2)
    run_id = running.info["run_id"]
    x, t = torch.randn(6, 8), torch.randint(0, 4, (6,))
    with running.client(timeout=30) as c:
        for _ in range(3):
            c.train_round("m", x, t)
        c.set_hparams("m/1", lr=0.003)
        c.train_step("m/1", x, t)
        c.barrier()  # the host copies: the restore point
        saved = {f"m/{k}": c.get_weights(f"m/{k}", optimizer_state=True) for k in range(3)}
        hparams = {m: c.get_hparams(m) for m in saved}
        versions = {m.id: m.version for m in c.models()}
        c.train_step("m/0", x, t)  # after the restore point: lost with the coordinator
    running.process.send_signal(signal.SIGKILL)
    running.process.wait(10)
    assert leftover_shm(run_id), "the killed run's host copies should be left for a restart"
    again = cohort(groups, workers=2, restore_run=run_id)
    try:
        with again.client(timeout=30) as c:
            assert {m.id: m.version for m in c.models()} == versions == {"m/0": 3, "m/1": 4, "m/2": 3}
            for model, want in saved.items():
                got = c.get_weights(model, optimizer_state=True)
                assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), model
                assert c.get_hparams(model) == hparams[model], model
            assert hparams["m/1"]["lr"] == pytest.approx(0.003) and hparams["m/1"]["step"] == 4
            assert c.stats()["restored_from"] == run_id
            c.train_round("m", x, t)  # and training goes on from there
        assert leftover_shm(run_id) == [], "the adopted host copies were not removed"
        assert "restored from the host copies of run" in again.log()
    finally:
        assert stop_and_check_clean(again) == 0
        kill_group(running.process.pid)

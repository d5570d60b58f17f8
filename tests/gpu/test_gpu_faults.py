"""Failures on a real GPU: out of memory while placing inputs or computing, a device fault under
MPS (every worker recycled, models restored), and a hot path that never synchronises."""

from __future__ import annotations

import shutil
import time

import msgspec
import pytest
import torch
from cohort_harness import mlp_group
from fixture_models import DeviceFaultOnDemand, OutOfMemoryOnDemand, group

from scheduler import JobFailed, WorkerDied

pytestmark = pytest.mark.gpu


def test_out_of_memory_placing_inputs_fails_the_job_and_the_worker_lives(gpu_cohort) -> None:
    running = gpu_cohort([group("tight", "tight_memory", count=2, d=1024)], mps="off", workers=1,
                         max_message_bytes=1 << 30)
    with running.client(timeout=120) as c:
        pid = c.stats()["workers"][0]["pid"]
        small = torch.randn(2, 1024)
        assert c.infer("tight/0", small).shape == (2, 1024)  # caps the worker's memory (see TightMemory)
        with pytest.raises(JobFailed, match="out of memory"):
            c.infer("tight/1", torch.randn(64 * 1024, 1024))  # 256 MB: more than the capped worker may hold
        assert c.infer("tight/1", small).shape == (2, 1024)
        assert c.stats()["workers"][0]["pid"] == pid


def test_out_of_memory_computing_fails_the_job_and_keeps_fusion(gpu_cohort) -> None:
    running = gpu_cohort([{**group("oom", "out_of_memory_on_demand", count=4), "batching": {"plan": "vmap"}}],
                         mps="off", workers=1)
    with running.client(timeout=120) as c:
        pid = c.stats()["workers"][0]["pid"]
        with pytest.raises(JobFailed, match="out of memory"):
            c.ensemble("oom", torch.randn(OutOfMemoryOnDemand.OOM_BATCH, 4))
        assert c.ensemble("oom", torch.randn(3, 4)).shape == (4, 3, 4)
        worker = c.stats()["workers"][0]
        assert worker["pid"] == pid and worker["eager_calls"] >= 1  # fused calls still run


@pytest.mark.skipif(shutil.which("nvidia-cuda-mps-control") is None, reason="needs nvidia-cuda-mps-control")
def test_a_device_fault_under_mps_recycles_every_worker_with_models_restored(gpu_cohort) -> None:
    running = gpu_cohort([group("f", "device_fault_on_demand", count=4)], mps="on", workers=2)
    x, t = torch.randn(2, 4), torch.randn(2, 4)
    with running.client(timeout=180) as c:
        for k in range(4):
            c.train_step(f"f/{k}", x, t)
        c.barrier()  # host copies of every model at version 1
        before = {k: c.get_weights(f"f/{k}") for k in range(4)}
        pids = [w["pid"] for w in c.stats()["workers"]]
        with pytest.raises((WorkerDied, JobFailed)):
            c.infer("f/0", torch.randn(DeviceFaultOnDemand.FAULT_BATCH, 4))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            stats = c.stats()
            if all(w["state"] == "ready" and w["pid"] not in pids for w in stats["workers"]):
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"workers not recycled: {c.stats()['workers']}")
        assert len(stats["mps"]["recycles"]) == 1, stats["mps"]
        assert all(w["restarts"] == 1 for w in stats["workers"])
        for k in range(4):
            after = c.get_weights(f"f/{k}")
            for name in before[k]:
                assert torch.equal(after[name], before[k][name]), (k, name)
        assert c.infer("f/2", x).shape == (2, 4)
    assert "CUDA fault under MPS" in running.log()


def test_the_hot_path_never_synchronises_the_device(tmp_path) -> None:
    """Jobs placed, launched, joined, trained and reaped under torch.cuda.set_sync_debug_mode('error')."""
    from core.bank import Bank
    from core.definition import build_definition
    from scheduler.config import parse_config
    from tests.unit.runtimes import run_job
    from workers import execute
    from workers.streams import StreamExecutor

    device = torch.device("cuda", 0)
    raw = {"coordinator": {"device": "cuda"}, "group": [mlp_group("m", 6, optimizer={"name": "adam", "lr": 1e-3},
                                                                 batching={"plan": "vmap"})]}  # the fused hot path
    spec = build_definition(parse_config(raw).groups[0])
    bank = Bank.create("m", spec.entries, 6, device, "unused")
    runtime = execute.GroupRuntime(spec, bank, device)
    runtime.initialise()
    executor = StreamExecutor({"m": runtime}, device, 4)
    x, t = torch.randn(5, 8), torch.randint(0, 4, (5,))
    jobs = [run_job(1, "infer", "m", [0], x), run_job(2, "infer", "m", [3], x),  # joined: stacked vmap
            run_job(3, "train_step", "m", [1], x, t), run_job(4, "train_step", "m", [2], x, t),
            run_job(5, "ensemble", "m", list(range(6)), x),
            run_job(6, "train_round", "m", list(range(6)), torch.stack([x] * 6), torch.stack([t] * 6))]
    executor.submit_many(jobs)  # the first calls warm up (vmap, cuBLAS handles, allocator)
    torch.cuda.synchronize()
    executor.poll()
    torch.cuda.set_sync_debug_mode("error")
    try:
        executor.submit_many([(msgspec.structs.replace(job, job_id=job.job_id + 10), buffers) for job, buffers in jobs])
        finished: list = []
        deadline = time.monotonic() + 30
        while len(finished) < len(jobs) and time.monotonic() < deadline:
            finished += executor.poll()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(finished) == len(jobs) and all(f.error is None for f in finished), finished

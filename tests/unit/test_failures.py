"""Failures while a job runs: transient ones leave fusion on, no model is ever stepped twice,
the executor (and so the worker) lives on."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from core.errors import JobFailed
from tests.unit.runtimes import run_job, runtime_for
from workers import training as training_module
from workers.executors import SyncExecutor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "system"))
from fixture_models import OutOfMemoryOnDemand  # noqa: E402

K = 4
OOM_GROUP = {"name": "oom", "factory": "fixture_models:out_of_memory_on_demand", "kwargs": {"d": 4}, "count": K,
             "input": {"shape": [-1, 4], "dtype": "float32"}, "loss": "mse", "optimizer": {"name": "sgd", "lr": 0.1},
             "init": {"seed": 0}, "batching": {"plan": "vmap"}}  # fused calls, as these tests need, not measured
MLP_GROUP = {"name": "mlp", "factory": "examples.models:mlp", "kwargs": {"d_in": 4, "hidden": 8, "d_out": 3},
             "count": K, "input": {"shape": [-1, 4], "dtype": "float32"}, "loss": "cross_entropy",
             "optimizer": {"name": "adam", "lr": 0.01}, "init": {"seed": 0}}


@pytest.fixture
def oom_runtime():
    rt, bank = runtime_for(OOM_GROUP)
    yield rt
    OutOfMemoryOnDemand.fused_calls_fail = False
    bank.close()


def test_an_out_of_memory_fused_call_fails_its_job_and_leaves_fusion_on(oom_runtime) -> None:
    rt = oom_runtime
    executor = SyncExecutor({"oom": rt})
    x = torch.randn(3, 4)
    OutOfMemoryOnDemand.fused_calls_fail = True
    executor.submit_many([run_job(1, "ensemble", "oom", list(range(K)), x)])
    (done,) = executor.poll()
    assert isinstance(done.error, JobFailed) and "OutOfMemoryError" in done.error.message, done.error
    assert not done.fatal
    assert rt.fused.enabled, "a transient error turned fusion off for good"
    OutOfMemoryOnDemand.fused_calls_fail = False
    executor.submit_many([run_job(2, "ensemble", "oom", list(range(K)), x)])
    (done,) = executor.poll()
    assert done.error is None and done.outputs.shape == (K, 3, 4)
    assert rt.fused.eager_calls == 2  # both went the fused way


def test_an_out_of_memory_batch_fails_only_its_job(oom_runtime) -> None:
    executor = SyncExecutor({"oom": oom_runtime})
    jobs = [run_job(1, "infer", "oom", [0], torch.randn(2, 4)),
            run_job(2, "infer", "oom", [1], torch.randn(OutOfMemoryOnDemand.OOM_BATCH, 4)),
            run_job(3, "infer", "oom", [2], torch.randn(2, 4))]
    executor.submit_many(jobs)
    done = {f.job_id: f for f in executor.poll()}
    assert done[1].error is None and done[3].error is None
    assert isinstance(done[2].error, JobFailed) and "out of memory" in done[2].error.message


def test_a_model_vmap_cannot_run_turns_fusion_off(monkeypatch) -> None:
    rt, bank = runtime_for(MLP_GROUP)
    try:
        def unsupported(*_a, **_k):
            raise RuntimeError("vmap: data-dependent control flow is not supported")

        monkeypatch.setattr(rt.fused, "forward", unsupported)
        x = torch.randn(2, 4)
        torch.testing.assert_close(rt.ensemble(list(range(K)), x), torch.stack([rt.infer(k, x) for k in range(K)]))
        assert not rt.fused.enabled
    finally:
        bank.close()


def _weights(rt) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in rt.tables.params.items()}


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "per-model"])
def test_a_joined_training_run_that_fails_mid_step_is_never_run_again(monkeypatch, fuse: bool) -> None:
    """The optimizer runs out of memory after stepping one parameter: every job of the run fails,
    and no model takes that step a second time (before, the run was re-launched job by job)."""
    rt, bank = runtime_for({**MLP_GROUP, "batching": {"plan": "vmap" if fuse else "one_by_one"}}, fuse=fuse)
    try:
        target_module = training_module
        real_step = target_module.optimizer_step
        calls = []

        def failing_step(optimizer, params, grads, state, hparams):
            calls.append(1)
            if len(calls) == 1:
                first = next(iter(params))
                real_step(optimizer, {first: params[first]}, {first: grads[first]}, state, hparams)
                raise torch.OutOfMemoryError("out of memory in the optimizer step")
            return real_step(optimizer, params, grads, state, hparams)

        monkeypatch.setattr(target_module, "optimizer_step", failing_step)
        before = _weights(rt)
        executor = SyncExecutor({"mlp": rt})
        g = torch.Generator().manual_seed(0)
        jobs = [run_job(j + 1, "train_step", "mlp", [j], torch.randn(5, 4, generator=g),
                        torch.randint(0, 3, (5,), generator=g)) for j in range(K)]
        executor.submit_many(jobs)
        done = {f.job_id: f for f in executor.poll()}
        failed = [j for j, f in done.items() if f.error is not None]
        if fuse:  # one joined call for the four jobs: all fail together
            assert failed == [1, 2, 3, 4] and len(calls) == 1
            for f in done.values():
                assert isinstance(f.error, JobFailed) and "not run again" in f.error.message
        else:  # one call per job: only the first fails
            assert failed == [1] and len(calls) == K
        first = next(iter(before))
        changed = (rt.tables.params[first] != before[first]).flatten(1).any(1)
        assert changed.all(), "every model was stepped once"
        # The failed call stepped only the first parameter; had it been re-run, the others would have moved too.
        for name in list(before)[1:]:
            moved = (rt.tables.params[name] != before[name]).flatten(1).any(1)
            assert moved.tolist() == ([False] * K if fuse else [False] + [True] * (K - 1)), name
    finally:
        bank.close()

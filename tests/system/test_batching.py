"""Coalescing in the worker: joined calls give the per-model results, and only when allowed."""

from __future__ import annotations

import time

import pytest
import torch
from cohort_harness import mlp_group
from torch import nn

from examples.models import mlp


def reference(seed: int, k: int) -> nn.Module:
    torch.manual_seed(seed + k)
    return mlp(d_in=8, hidden=16, d_out=4)


def settled_stats(c, jobs: int) -> dict:
    """Stats once ``jobs`` jobs are done and the workers' heartbeats (every 0.25 s) have reported them."""
    deadline = time.monotonic() + 5
    while c.stats()["jobs"]["completed"] < jobs and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.6)
    return c.stats()


def test_pipelined_jobs_of_many_models_are_joined_and_correct(cohort) -> None:
    running = cohort([mlp_group("m", 8, init={"seed": 0})], workers=1)
    models = [reference(0, k) for k in range(8)]
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(16, 8, generator=g) for _ in range(400)]
    with running.client(timeout=60) as c:
        futures = [c.submit("infer", f"m/{j % 8}", x) for j, x in enumerate(xs)]
        for j, f in enumerate(futures):
            with torch.no_grad():
                torch.testing.assert_close(f.result(), models[j % 8](xs[j]), atol=1e-5, rtol=0)
        # Dynamic batching on one model: several batch sizes, concatenated and split back.
        sizes = [1 + (j % 7) for j in range(200)]
        inputs = [torch.randn(n, 8, generator=g) for n in sizes]
        futures = [c.submit("infer", "m/3", x) for x in inputs]
        for x, f in zip(inputs, futures):
            with torch.no_grad():
                torch.testing.assert_close(f.result(), models[3](x), atol=1e-5, rtol=0)
        worker = settled_stats(c, 600)["workers"][0]
    assert worker["joined_jobs"] > 0, worker
    assert worker["calls"] < 600, worker


def test_max_jobs_one_turns_joining_off(cohort) -> None:
    running = cohort([mlp_group("m", 4, init={"seed": 0}, batching={"max_jobs": 1})], workers=1)
    x = torch.randn(4, 8)
    with running.client(timeout=60) as c:
        for f in [c.submit("infer", f"m/{j % 4}", x) for j in range(200)]:
            f.result()
        worker = settled_stats(c, 200)["workers"][0]
    assert worker["joined_jobs"] == 0 and worker["calls"] >= 200, worker


def test_joined_training_steps_match_plain_pytorch(cohort) -> None:
    """train_step jobs of distinct models pipelined together run as fused steps, results unchanged."""
    running = cohort([mlp_group("t", 4, init={"seed": 2}, optimizer={"name": "sgd", "lr": [0.1, 0.2, 0.3, 0.4],
                                                                    "momentum": 0.5})], workers=1)
    models = [reference(2, k) for k in range(4)]
    opts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=0.5) for m, lr in zip(models, [0.1, 0.2, 0.3, 0.4])]
    g = torch.Generator().manual_seed(5)
    steps = [(torch.randn(8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(30)]
    with running.client(timeout=60) as c:
        futures = [[c.submit("train_step", f"t/{k}", x, t) for k in range(4)] for x, t in steps]
        got = [[f.result() for f in row] for row in futures]
        worker = settled_stats(c, 120)["workers"][0]
        weights = [c.get_weights(f"t/{k}") for k in range(4)]
    for step, (x, t) in enumerate(steps):
        for k in range(4):
            opts[k].zero_grad()
            loss = nn.functional.cross_entropy(models[k](x), t)
            loss.backward()
            opts[k].step()
            assert abs(got[step][k] - loss.item()) < 1e-5, (step, k)
    for k in range(4):
        for name, value in models[k].state_dict().items():
            torch.testing.assert_close(weights[k][name], value, atol=1e-5, rtol=0)
    assert worker["joined_jobs"] > 0, worker


def test_max_wait_gathers_jobs_that_arrive_close_together(cohort) -> None:
    running = cohort([mlp_group("w", 4, init={"seed": 0}, batching={"max_wait_ms": 200})], workers=1)
    x = torch.randn(2, 8)
    with running.client(timeout=60) as c:
        for _ in range(5):
            futures = [c.submit("infer", f"w/{k}", x) for k in range(4)]
            for f in futures:
                f.result()
        worker = settled_stats(c, 20)["workers"][0]
    assert worker["joined_jobs"] >= 8, worker


def test_compiled_fused_calls_match_eager_ones_and_the_worker_survives_compiling(cohort) -> None:
    """``batching.compile``: the same results as eager fusion; compiling (seconds on a CPU, far past the
    2 s heartbeat timeout here) does not get the worker declared dead."""
    compiled = mlp_group("fast", 4, init={"seed": 3}, batching={"compile": True})
    eager = mlp_group("ref", 4, init={"seed": 3})
    running = cohort([compiled, eager], workers=1, heartbeat_timeout_s=2.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, generator=g)
    with running.client(timeout=300) as c:
        torch.testing.assert_close(c.ensemble("fast", x), c.ensemble("ref", x), atol=1e-5, rtol=1e-5)
        for _ in range(3):
            xs, ts = torch.randn(4, 6, 8, generator=g), torch.randint(0, 4, (4, 6), generator=g)
            assert c.train_round("fast", xs, ts) == pytest.approx(c.train_round("ref", xs, ts), abs=1e-5)
        for k in range(4):
            fast, ref = c.get_weights(f"fast/{k}"), c.get_weights(f"ref/{k}")
            for name in ref:
                torch.testing.assert_close(fast[name], ref[name], atol=1e-5, rtol=1e-5)
        worker = c.stats()["workers"][0]
    assert worker["restarts"] == 0 and worker["state"] == "ready"
    assert "torch.compile" not in running.log(), running.log()[-2000:]  # no fallback to eager


def test_stats_show_each_calls_plan_and_its_measured_costs(cohort) -> None:
    """Under load the workers measure their plans and report them; a pinned group says so."""
    running = cohort([mlp_group("a", 8, init={"seed": 0}),
                      mlp_group("p", 4, init={"seed": 0}, batching={"plan": "one_by_one"})], workers=1)
    models = [reference(0, k) for k in range(8)]
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(16, 8, generator=g) for _ in range(800)]
    with running.client(timeout=60) as c:
        futures = [c.submit("infer", f"a/{j % 8}", x) for j, x in enumerate(xs)]
        pinned = [c.submit("infer", f"p/{j % 4}", x) for j, x in enumerate(xs[:200])]
        for j, f in enumerate(futures):
            with torch.no_grad():
                torch.testing.assert_close(f.result(), models[j % 8](xs[j]), atol=1e-5, rtol=0)
        for f in pinned:
            f.result()
        worker = settled_stats(c, 1000)["workers"][0]
    plans = {(p["group"], p["op"]): p for p in worker["plans"]}
    auto = plans[("a", "infer")]
    assert auto["inputs"] == "16x8 float32" and not auto["pinned"]
    assert auto["in_use"] and set(auto["in_use"].values()) <= set(auto["per_job_us"]), auto
    assert "one_by_one" in auto["per_job_us"] and any(k.startswith("vmap@") for k in auto["per_job_us"]), auto
    assert all(cost > 0 for cost in auto["per_job_us"].values())
    fixed = plans[("p", "infer")]
    assert fixed["pinned"] and set(fixed["in_use"].values()) == {"one_by_one"}, fixed

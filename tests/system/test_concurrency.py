"""Many threads and clients at once: every result correct, jobs on one model in order."""

from __future__ import annotations

import asyncio
import threading

import torch
from cohort_harness import mlp_group
from torch import nn

from examples.models import mlp
from scheduler import AsyncClient

THREADS = 8
JOBS = 500
TRAIN_EVERY = 5


def local_model(seed: int, index: int) -> nn.Module:
    torch.manual_seed(seed + index)
    return mlp(d_in=8, hidden=16, d_out=4)


def thread_plan(k: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1000 + k)
    plan = []
    for j in range(JOBS):
        x = torch.randn(4, 8, generator=g)
        t = torch.randint(0, 4, (4,), generator=g)
        plan.append(("train_step" if j % TRAIN_EVERY == 0 else "infer", x, t))
    return plan


def expected(k: int, plan) -> list:
    """What model k answers to the plan, run in order in plain PyTorch."""
    model = local_model(0, k)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = []
    for op, x, t in plan:
        if op == "infer":
            with torch.no_grad():
                out.append(model(x))
        else:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), t)
            loss.backward()
            opt.step()
            out.append(loss.item())
    return out


def check(k: int, got: list, want: list) -> None:
    for j, (g, w) in enumerate(zip(got, want)):
        if isinstance(w, float):
            assert abs(g - w) < 1e-5, f"model {k} job {j}: loss {g} != {w}"
        else:
            torch.testing.assert_close(g, w, atol=1e-5, rtol=0, msg=f"model {k} job {j}")


def test_threads_pipelining_jobs_get_correct_results_in_order(cohort) -> None:
    """8 threads x 500 jobs, one model each, submitted pipelined: results equal sequential PyTorch."""
    running = cohort([mlp_group("m", THREADS, init={"seed": 0})], workers=2)
    plans = [thread_plan(k) for k in range(THREADS)]
    results: list[list | None] = [None] * THREADS
    errors: list[BaseException] = []

    with running.client(timeout=120) as c:
        def work(k: int) -> None:
            try:
                futures = [c.submit(op, f"m/{k}", x, t if op == "train_step" else None) for op, x, t in plans[k]]
                results[k] = [f.result(timeout=120) for f in futures]
            except BaseException as exc:  # reported below, in the main thread
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert not errors, errors[:3]
        stats = c.stats()
    for k in range(THREADS):
        check(k, results[k], expected(k, plans[k]))
    assert stats["jobs"]["completed"] >= THREADS * JOBS
    assert stats["jobs"]["failed"] == 0


def test_many_clients_blocking_and_async(cohort) -> None:
    """Several sync clients (blocking calls) and an asyncio client at once on shared models."""
    running = cohort([mlp_group("m", 4, init={"seed": 0})], workers=2)
    x = torch.randn(3, 8)
    want = []
    for k in range(4):
        with torch.no_grad():
            want.append(local_model(0, k)(x))
    failures: list[str] = []

    def blocking(k: int) -> None:
        with running.client(timeout=60) as c:
            for j in range(100):
                y = c.infer(f"m/{(k + j) % 4}", x)
                if not torch.allclose(y, want[(k + j) % 4], atol=1e-5):
                    failures.append(f"client {k} job {j}")

    async def asynchronous() -> None:
        async with AsyncClient(running.address, timeout=60) as c:
            ys = await asyncio.gather(*[c.infer(f"m/{j % 4}", x) for j in range(200)])
            for j, y in enumerate(ys):
                if not torch.allclose(y, want[j % 4], atol=1e-5):
                    failures.append(f"async job {j}")
            ens = await c.ensemble("m", x)
            torch.testing.assert_close(ens, torch.stack(want), atol=1e-5, rtol=0)

    threads = [threading.Thread(target=blocking, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    asyncio.run(asynchronous())
    for t in threads:
        t.join(120)
    assert failures == []


def test_submit_then_blocking_call_keeps_order(cohort) -> None:
    """A thread's blocking call after its own submitted train_step sees the trained weights."""
    running = cohort([mlp_group("m", 1, init={"seed": 0})])
    x, t = torch.randn(4, 8), torch.randint(0, 4, (4,))
    model = local_model(0, 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with running.client(timeout=60) as c:
        for _ in range(20):
            future = c.submit("train_step", "m/0", x, t)
            y = c.infer("m/0", x)  # must run after the train_step
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), t).backward()
            opt.step()
            with torch.no_grad():
                torch.testing.assert_close(y, model(x), atol=1e-5, rtol=0)
            future.result()

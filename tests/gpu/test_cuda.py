"""The GPU path for real: CUDA IPC banks, stream overlap, equivalence on cuda, MPS.

Marked ``gpu``; they skip cleanly where there is no CUDA.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

import pytest
import torch
from cohort_harness import mlp_group
from torch import nn

from examples.models import mlp

pytestmark = pytest.mark.gpu


def _export_child(queue, done) -> None:
    from core.bank import Bank
    from core.spec import EntrySpec

    # Something allocated first: the bank then sits inside the allocator's block at an
    # offset, which the importer must apply.
    pad = torch.empty(1000, device="cuda")
    bank = Bank.create("g", [EntrySpec("w", "param", (4, 4), "float32")], 3, torch.device("cuda"), "unused")
    bank.tensors["w"].fill_(7.0)
    pad.fill_(-1.0)
    torch.cuda.synchronize()
    queue.put(bank.handle)
    done.wait(60)  # the exporting process must outlive every mapping
    queue.put(float(bank.tensors["w"][1].sum()))


def test_bank_cuda_ipc_round_trip_between_processes() -> None:
    """A bank exported by one process is mapped by another: writes are seen both ways, no host copy."""
    from core.bank import Bank
    from core.spec import EntrySpec

    ctx = mp.get_context("spawn")
    queue, done = ctx.Queue(), ctx.Event()
    child = ctx.Process(target=_export_child, args=(queue, done))
    child.start()
    try:
        handle = queue.get(timeout=120)
        assert handle.kind == "cuda" and handle.cuda.storage_offset > 0, handle
        bank = Bank.open(handle, [EntrySpec("w", "param", (4, 4), "float32")])
        assert bank.tensors["w"].is_cuda
        assert torch.equal(bank.tensors["w"].cpu(), torch.full((3, 4, 4), 7.0))
        bank.tensors["w"][1].fill_(1.0)
        torch.cuda.synchronize()
        done.set()
        assert queue.get(timeout=60) == 16.0
        bank.close()
    finally:
        done.set()
        child.join(30)


def test_weights_set_and_copied_while_other_models_train(gpu_cohort) -> None:
    """Bank operations run in the workers' queues, on their streams, while other models train."""
    running = gpu_cohort([mlp_group("a", 8), mlp_group("b", 4)], mps="off", workers=2, streams=4)
    x = torch.randn(3, 8)
    g = torch.Generator().manual_seed(0)
    with running.client(timeout=120) as c:
        stop = threading.Event()
        errors: list[BaseException] = []

        def train() -> None:
            try:
                while not stop.is_set():
                    c.train_round("a", torch.randn(8, 4, 8, generator=g), torch.randint(0, 4, (8, 4), generator=g))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        trainer = threading.Thread(target=train)
        trainer.start()
        try:
            for _ in range(10):
                zero = {k: torch.zeros_like(v) for k, v in c.get_weights("b/0").items()}
                c.set_weights("b/0", zero)
                assert torch.count_nonzero(c.infer("b/0", x)) == 0
                c.train_step("b/1", x, torch.zeros(3, dtype=torch.int64))
                c.copy_weights("b/1", "b/3")  # b/1 and b/3 sit on different workers
                c.copy_weights("b/1", "b/0")
                want = c.get_weights("b/1")
                for other in ("b/0", "b/3"):
                    got = c.get_weights(other)
                    for name in want:
                        assert torch.equal(got[name], want[name]), (other, name)
        finally:
            stop.set()
            trainer.join(60)
        assert not errors, errors
        assert c.stats()["jobs"]["failed"] == 0


def test_training_on_cuda_matches_plain_pytorch(gpu_cohort) -> None:
    running = gpu_cohort([mlp_group("m", 3, init={"seed": 4},
                                    optimizer={"name": "adam", "lr": [1e-2, 3e-3, 1e-3]})], mps="off")
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(10)]
    models, opts = [], []
    for k, lr in enumerate([1e-2, 3e-3, 1e-3]):
        torch.manual_seed(4 + k)
        models.append(mlp(d_in=8, hidden=16, d_out=4).cuda())
        opts.append(torch.optim.Adam(models[-1].parameters(), lr=lr))
    with running.client(timeout=60) as c:
        for x, t in data:
            rounds = c.train_round("m", torch.stack([x] * 3), torch.stack([t] * 3))
            singles = []
            for k in range(3):
                opts[k].zero_grad()
                loss = nn.functional.cross_entropy(models[k](x.cuda()), t.cuda())
                loss.backward()
                opts[k].step()
                singles.append(loss.item())
            assert rounds == pytest.approx(singles, abs=1e-4)
        for k in range(3):
            got = c.get_weights(f"m/{k}")
            for name, value in models[k].state_dict().items():
                torch.testing.assert_close(got[name], value.cpu(), atol=1e-4, rtol=0)
        x = torch.randn(5, 8)
        with torch.no_grad():
            want = torch.stack([m(x.cuda()).cpu() for m in models])
        torch.testing.assert_close(c.ensemble("m", x), want, atol=1e-4, rtol=0)


def test_jobs_of_different_models_overlap_on_streams(gpu_cohort) -> None:
    group = {"name": "s", "factory": "fixture_models:spin", "kwargs": {"d": 4, "cycles": 100_000_000},
             "count": 8, "input": {"shape": [-1, 4], "dtype": "float32"}, "loss": "mse",
             "optimizer": {"name": "sgd", "lr": 0.01}, "batching": {"max_jobs": 1}}
    running = gpu_cohort([group], streams=8, mps="off")
    x = torch.randn(1, 4)
    with running.client(timeout=120) as c:
        c.infer("s/0", x)  # warm-up
        t0 = time.perf_counter()
        c.infer("s/0", x)
        one = time.perf_counter() - t0
        t0 = time.perf_counter()
        for f in [c.submit("infer", f"s/{k}", x) for k in range(8)]:
            f.result()
        eight = time.perf_counter() - t0
    print(f"one job {one * 1e3:.1f} ms, 8 concurrent jobs of 8 models {eight * 1e3:.1f} ms ({eight / one:.2f}x)")
    assert eight < 4 * one, f"8 concurrent jobs took {eight / one:.1f}x one job: no overlap"


def test_fused_calls_on_cuda_equal_per_model_calls(gpu_cohort) -> None:
    """vmap over the bank on the device: ensembles, and concurrent infers on scattered models joined."""
    running = gpu_cohort([mlp_group("m", 6, batching={"plan": "vmap"})], mps="off", workers=1)
    x = torch.randn(5, 8)
    with running.client(timeout=60) as c:
        singles = torch.stack([c.infer(f"m/{k}", x) for k in range(6)])
        torch.testing.assert_close(c.ensemble("m", x), singles, atol=1e-5, rtol=0)
        for _ in range(20):  # jobs that arrive together on models 0, 2, 4, 5 are joined
            futures = [c.submit("infer", f"m/{k}", x) for k in (0, 2, 4, 5)]
            for k, f in zip((0, 2, 4, 5), futures):
                torch.testing.assert_close(f.result(), singles[k], atol=1e-5, rtol=0)
        xs, ts = torch.randn(6, 5, 8), torch.randint(0, 4, (6, 5))
        before = c.get_weights("m/3")
        losses = c.train_round("m", xs, ts)
        assert len(losses) == 6 and all(loss > 0 for loss in losses)
        after = c.get_weights("m/3")
        assert any(not torch.equal(before[k], after[k]) for k in before)
        worker = c.stats()["workers"][0]
    print(f"calls {worker['calls']}, joined jobs {worker['joined_jobs']}")
    assert worker["joined_jobs"] > 0


def test_a_local_clients_cuda_tensors_reach_the_worker_by_cuda_ipc(gpu_cohort) -> None:
    """CUDA inputs of 1 MiB or more from a client on this machine are mapped in place by the worker:
    the same results as through host memory, the call's request carries no tensor bytes, and a
    non-contiguous input or one at an offset in its storage is read right."""
    from core.tensors import TensorTree
    from scheduler import client_core

    scale = {"name": "s", "factory": "examples.models:scale", "kwargs": {"d": 512}, "count": 2,
             "input": {"shape": [-1, 512], "dtype": "float32"}, "loss": "mse", "optimizer": {"name": "sgd", "lr": 0.1}}
    running = gpu_cohort([scale], mps="off")
    x = torch.randn(1024, 512)  # 2 MiB
    sent: list[TensorTree] = []
    start = client_core.ClientCore.start

    def spy(self, call, timeout, now=None):
        started = start(self, call, timeout, now)
        if call.op == "infer":
            sent.append(started.message.inputs)
        return started

    with running.client(timeout=120, shm=False) as host, running.client(timeout=120, cuda_ipc=True) as local:
        want = host.infer("s/0", x)
        client_core.ClientCore.start = spy
        try:
            got = local.infer("s/0", x.cuda())
            pad = torch.randn(4096, 512, device="cuda")
            pad[1000:2024].copy_(x)
            at_offset = local.infer("s/0", pad[1000:2024])
            transposed = local.infer("s/0", x.t().contiguous().cuda().t())
            trained = local.train_step("s/1", x.cuda(), torch.zeros(1024, 512, device="cuda"))
        finally:
            client_core.ClientCore.start = start
        assert torch.equal(got, want) and torch.equal(at_offset, want) and torch.equal(transposed, want)
        assert trained > 0
        assert all(tree.cuda and not tree.shm for tree in sent), sent
        assert host.train_step("s/1", x, torch.zeros(1024, 512)) < trained  # the step above did update s/1
        small = torch.randn(4, 512)
        assert torch.equal(local.infer("s/0", small.cuda()), host.infer("s/0", small))  # under 1 MiB: through the host

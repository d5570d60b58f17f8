"""``cohort cluster`` on a local Ray with two coordinators on the CPU, through ``ClusterClient``.

One cluster for the module (its start is most of the cost): ``python -m scheduler cluster
--coordinators 2`` finds no Ray under a private ``RAY_TMPDIR``, starts a local head as
``ray start --head`` does, and runs two coordinators, each with a block of every group.
The tests then check, in order: the models spread over both; ensembles and training
rounds equal plain PyTorch; weights copied across coordinators with their optimizer
state; snapshots under cluster indices; a coordinator killed with SIGKILL restarted by
Ray and serving its models restored from its last host copies; Ctrl-C leaving no process,
no shared memory, no directory and no Ray address file behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="the cluster needs Ray: pip install 'cohort[ray]'")

import torch  # noqa: E402
from cluster_harness import ROOT, RunningCluster, cohort_shm, ray_environment  # noqa: E402
from torch import nn  # noqa: E402

from examples.models import mlp  # noqa: E402
from scheduler import AsyncClusterClient, ClusterClient, ProtocolError  # noqa: E402

# Alone: a coordinator killed here must find its host copies when Ray restarts it, and another test's coordinator start would remove them.
pytestmark = [pytest.mark.timeout(300), pytest.mark.alone]

LRS = [0.3, 0.2, 0.1, 0.05, 0.02]
K = len(LRS)
GROUPS = [
    {"name": "mlp", "factory": "examples.models:mlp", "kwargs": {"d_in": 8, "hidden": 16, "d_out": 4}, "count": K,
     "input": {"shape": [-1, 8], "dtype": "float32"}, "loss": "cross_entropy",
     "optimizer": {"name": "sgd", "lr": LRS, "momentum": 0.9}, "init": {"seed": 11}},
    {"name": "adam", "factory": "examples.models:mlp", "kwargs": {"d_in": 8, "hidden": 16, "d_out": 4}, "count": 3,
     "input": {"shape": [-1, 8], "dtype": "float32"}, "loss": "cross_entropy",
     "optimizer": {"name": "adam", "lr": 0.01}, "init": {"seed": 40}},
]
SETTINGS = {"address": "ipc:///tmp/cohort-unused.sock", "workers": 1, "device": "cpu", "mps": "off"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCluster]:
    with ray_environment() as env:
        running = RunningCluster(tmp_path_factory.mktemp("cluster"), env, SETTINGS, GROUPS,
                                 ["--coordinators", "2", "--snapshot-interval", "0"])
        try:
            running.wait_ready()
            yield running
        finally:
            running.close()


@pytest.fixture(scope="module")
def client(cluster: RunningCluster) -> Iterator[ClusterClient]:
    c = ClusterClient(timeout=60)
    yield c
    c.close()


def reference(seed: int, count: int) -> list[nn.Module]:
    out = []
    for k in range(count):
        torch.manual_seed(seed + k)
        out.append(mlp(d_in=8, hidden=16, d_out=4))
    return out


def weights_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 0.0) -> bool:
    return got.keys() == want.keys() and all(torch.allclose(got[k], want[k], atol=atol, rtol=0) for k in want)


def test_models_are_spread_over_both_coordinators(cluster: RunningCluster, client: ClusterClient) -> None:
    log = cluster.log()
    assert "no Ray cluster running: started a local one" in log and "coordinator 1 up at" in log
    where = {m.id: m.coordinator for m in client.models()}
    assert where == {"mlp/0": 0, "mlp/1": 0, "mlp/2": 0, "mlp/3": 1, "mlp/4": 1,
                     "adam/0": 0, "adam/1": 1, "adam/2": 1}
    coordinators = client.coordinators()
    assert [(c.index, c.state, c.incarnation) for c in coordinators] == [(0, "up", 1), (1, "up", 1)]
    assert coordinators[0].address != coordinators[1].address


def test_ensemble_and_training_rounds_equal_plain_pytorch(client: ClusterClient) -> None:
    models = reference(11, K)
    optimizers = [torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9) for m, lr in zip(models, LRS)]
    x = torch.randn(7, 8)
    with torch.no_grad():
        torch.testing.assert_close(client.ensemble("mlp", x), torch.stack([m(x) for m in models]), atol=1e-6, rtol=0)
    g = torch.Generator().manual_seed(5)
    for _ in range(4):
        xs, ts = torch.randn(K, 16, 8, generator=g), torch.randint(0, 4, (K, 16), generator=g)
        want = []
        for k, (model, opt) in enumerate(zip(models, optimizers)):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xs[k]), ts[k])
            loss.backward()
            opt.step()
            want.append(loss.item())
        assert client.train_round("mlp", xs, ts) == pytest.approx(want, abs=1e-5, rel=0)
    x1, t1 = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)  # one batch for all
    want = []
    for model, opt in zip(models, optimizers):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x1), t1)
        loss.backward()
        opt.step()
        want.append(loss.item())
    assert client.train_round("mlp", x1, t1) == pytest.approx(want, abs=1e-5, rel=0)
    with torch.no_grad():
        want = [nn.functional.cross_entropy(m(x1), t1).item() for m in models]
    assert client.evaluate("mlp", x1, t1) == pytest.approx(want, abs=1e-5, rel=0)
    assert client.evaluate("mlp/4", x1, t1) == pytest.approx(want[4], abs=1e-5, rel=0)
    future = client.submit("ensemble", "mlp", x)
    with torch.no_grad():
        torch.testing.assert_close(future.result(60), torch.stack([m(x) for m in models]), atol=1e-5, rtol=0)
    for k in (0, 4):  # one on each coordinator
        assert weights_equal(client.get_weights(f"mlp/{k}"), models[k].state_dict(), atol=1e-5)
    versions = {m.id: m.version for m in client.models()}
    assert versions["mlp/0"] == versions["mlp/4"] == 5


def test_weights_are_copied_across_coordinators_with_their_optimizer_state(client: ClusterClient) -> None:
    x, t = torch.randn(6, 8), torch.randint(0, 4, (6,))
    for _ in range(3):
        client.train_step("adam/0", x, t)  # Adam's moments and step count now differ from adam/2's
    client.copy_weights(src="adam/0", dst="adam/2")  # coordinator 0 -> coordinator 1
    assert weights_equal(client.get_weights("adam/2", optimizer_state=True),
                         client.get_weights("adam/0", optimizer_state=True))
    assert client.train_step("adam/0", x, t) == client.train_step("adam/2", x, t)
    a, b = client.get_weights("adam/0", optimizer_state=True), client.get_weights("adam/2", optimizer_state=True)
    assert weights_equal(a, b)  # one more identical step each: the optimizer state came along
    client.copy_weights(src="adam/2", dst="adam/1")  # within coordinator 1: its own copy
    assert weights_equal(client.get_weights("adam/1", optimizer_state=True), b)
    with pytest.raises(Exception, match="different groups"):
        client.copy_weights(src="adam/0", dst="mlp/0")
    # Across nodes the two supervisors move the bytes through Ray's object store (forced here, on
    # one node), after this client's own calls on both models: the step just submitted comes first.
    stepped = client.submit("train_step", "adam/2", x, t)
    client._copy("adam/2", "adam/0", through_ray=True)
    assert isinstance(stepped.result(), float)
    assert weights_equal(client.get_weights("adam/0", optimizer_state=True),
                         client.get_weights("adam/2", optimizer_state=True))
    assert client.get_hparams("adam/0")["step"] == client.get_hparams("adam/2")["step"]


def test_hyperparameters_reset_and_map_follow_the_cluster_indices(client: ClusterClient) -> None:
    client.set_hparams("mlp", lr=[0.5, 0.4, 0.3, 0.2, 0.1], momentum=0.5)  # one value each, cut by block
    assert [client.get_hparams(f"mlp/{k}")["lr"] for k in range(K)] == pytest.approx([0.5, 0.4, 0.3, 0.2, 0.1])
    assert client.get_hparams("mlp/4")["momentum"] == pytest.approx(0.5)
    client.set_hparams("mlp/3", lr=0.01)
    assert client.get_hparams("mlp/3")["lr"] == pytest.approx(0.01)
    client.reset("mlp/4")  # the group's own rule: as the cluster's model 4 was built, seed 11 + 4
    assert weights_equal(client.get_weights("mlp/4"), reference(11, K)[4].state_dict())
    client.reset("mlp/0", seed=15)
    assert weights_equal(client.get_weights("mlp/0"), reference(11, K)[4].state_dict())
    batches = [torch.randn(3, 8) for _ in range(5)]
    assert [y.shape for y in client.map("ensemble", "mlp", batches, depth=2)] == [(K, 3, 4)] * 5
    ys = list(client.map("infer", "mlp/4", batches))
    torch.testing.assert_close(ys[2], client.infer("mlp/4", batches[2]), atol=1e-6, rtol=0)  # joined batches


def test_the_async_client_makes_the_same_calls(client: ClusterClient) -> None:
    x = torch.randn(3, 8)

    async def calls() -> None:
        async with AsyncClusterClient(timeout=60) as a:
            assert [m.id for m in await a.models()] == [m.id for m in client.models()]
            # The same results, to float32 rounding: each worker chooses how to run a call by measuring
            # (one vmap'd call, or model by model), and the two sum in different orders.
            torch.testing.assert_close(await a.ensemble("mlp", x), client.ensemble("mlp", x))
            torch.testing.assert_close(await a.infer("mlp/4", x), client.infer("mlp/4", x))
            stacked = torch.randn(K, 2, 8), torch.randint(0, 4, (K, 2))
            assert len(await a.submit("train_round", "mlp", *stacked)) == K  # awaited like any call
            await a.barrier(["mlp/0", "adam"])
            await a.copy_weights(src="mlp/4", dst="mlp/1")  # coordinator 1 -> coordinator 0
            assert weights_equal(await a.get_weights("mlp/1"), await a.get_weights("mlp/4"))
            assert [e["error"] for e in (await a.stats())["coordinators"]] == [None, None]
            await a.set_hparams("adam", lr=(0.1, 0.2, 0.3))
            assert (await a.get_hparams("adam/2"))["lr"] == pytest.approx(0.3)
            assert [y.shape async for y in a.map("infer", "adam/1", [x, x])] == [(3, 4), (3, 4)]

    asyncio.run(calls())


def test_snapshot_barrier_and_stats_span_the_cluster(client: ClusterClient, tmp_path: Path) -> None:
    client.barrier()
    client.barrier(["mlp/4", "adam"])
    detail = client.snapshot(tmp_path / "ckpt")
    assert detail["files"] == 8 and len(detail["coordinators"]) == 2
    assert sorted(p.name for p in (tmp_path / "ckpt" / "mlp").iterdir()) == [f"{k}.safetensors" for k in range(K)]
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(".")]  # staging removed
    from safetensors.torch import load_file

    assert weights_equal(load_file(str(tmp_path / "ckpt" / "mlp" / "4.safetensors")), client.get_weights("mlp/4"))
    stats = client.stats()
    assert [e["error"] for e in stats["coordinators"]] == [None, None]
    assert set(stats["models"]) == {m.id for m in client.models()}
    assert stats["models"]["mlp/4"]["coordinator"] == 1


def test_the_monitor_watches_the_whole_cluster(cluster: RunningCluster) -> None:
    command = [sys.executable, "tools/gpumon.py", "--cluster", "--once", "--interval", "2"]
    out = subprocess.run([*command, "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    sample = json.loads(out.stdout.strip().splitlines()[-1])
    assert sample["error"] is None, sample["error"]
    assert [(r["index"], r["state"], r["gpu_figures"]) for r in sample["coordinators"]] == [(0, "up", None),
                                                                                          (1, "up", None)]
    assert sample["totals"]["up"] == 2 and sample["totals"]["models"] == K + 3
    view = subprocess.run([*command, "--width", "160"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "2/2 coordinators answering, 8 models" in view.stdout, view.stdout + view.stderr


def test_a_killed_coordinator_is_restarted_by_ray_with_its_models_restored(
        cluster: RunningCluster, client: ClusterClient, tmp_path: Path) -> None:
    x, t = torch.randn(6, 8), torch.randint(0, 4, (6,))
    client.snapshot(tmp_path / "restore-point")  # a barrier: host copies of every model too
    saved = {m: client.get_weights(m) for m in ("mlp/3", "mlp/4", "adam/1")}
    on_victim = [m.id for m in client.models() if m.coordinator == 1]
    state = {m: client.get_weights(m, optimizer_state=True) for m in on_victim}
    hparams = {m: client.get_hparams(m) for m in on_victim}
    client.train_step("mlp/4", x, t)  # after the last host copy: lost with the coordinator
    on_zero = client.get_weights("mlp/0")
    victim = client.stats()["coordinators"][1]["stats"]["pid"]
    cluster.remember()
    os.kill(victim, signal.SIGKILL)
    began = time.monotonic()
    while True:  # the first calls may fail as the connection drops; later ones wait for the new coordinator
        try:
            restored = client.get_weights("mlp/4", timeout=120)
            break
        except ProtocolError:
            assert time.monotonic() - began < 120
            time.sleep(0.2)
    assert weights_equal(restored, saved["mlp/4"])
    assert weights_equal(client.get_weights("mlp/3"), saved["mlp/3"])
    assert weights_equal(client.get_weights("adam/1"), saved["adam/1"])
    assert weights_equal(client.get_weights("mlp/0"), on_zero)  # the other coordinator never noticed
    # Restored from the dead coordinator's host copies: optimizer state, run-time hyperparameters
    # and step counts too, not only the weights a snapshot file holds.
    for m in on_victim:
        assert weights_equal(client.get_weights(m, optimizer_state=True), state[m]), m
        assert client.get_hparams(m) == hparams[m], m
    deadline = time.monotonic() + 10  # the supervisor marks it up once it has seen it answer
    while client.coordinators()[1].state != "up" and time.monotonic() < deadline:
        time.sleep(0.1)
    coordinators = client.coordinators()
    assert (coordinators[1].state, coordinators[1].incarnation) == ("up", 2)
    assert client.stats()["coordinators"][1]["stats"]["pid"] != victim
    assert len(client.train_round("mlp", torch.randn(K, 4, 8), torch.randint(0, 4, (K, 4)))) == K
    deadline = time.monotonic() + 10
    while "coordinator 1 restarted (incarnation 2)" not in cluster.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "restored from its last host copies" in cluster.log()


def test_ctrl_c_leaves_no_process_shared_memory_or_file_behind(cluster: RunningCluster, client: ClusterClient) -> None:
    stats = client.stats()
    run_ids = [e["stats"]["run_id"] for e in stats["coordinators"]]
    homes = {Path(e["stats"]["address"][len("ipc://"):]).parent.parent for e in stats["coordinators"]}
    cluster.remember()
    client.close()
    ray_tmp = Path(os.environ["RAY_TMPDIR"])
    assert (ray_tmp / "ray" / "ray_current_cluster").exists()
    assert cluster.stop(signal.SIGINT) == 0, cluster.log()[-3000:]
    assert cluster.left() == []
    assert cohort_shm(run_ids) == []
    assert [h for h in homes if h.exists()] == []
    assert not (ray_tmp / "ray" / "ray_current_cluster").exists()
    assert [p.name for p in (ray_tmp / "ray").glob("session_*")] == []
    assert "stopped the local Ray cluster" in cluster.log()


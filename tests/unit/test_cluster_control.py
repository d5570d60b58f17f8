"""The cluster's control plane in plain Python: the directory, the GPU a supervisor was given,
addresses across restarts, how many coordinators (no Ray, no GPU: NVML is faked)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from core.errors import ConfigError
from scheduler.cluster.directory import DirectoryState
from scheduler.cluster.launcher import coordinator_count
from scheduler.cluster.supervisor import assigned_gpu, choose_address, retire
from scheduler.config import parse_config
from scheduler.gpu import Gpu

GPUS = [Gpu(0, "GPU-aaaa-0000", "H200", "default"), Gpu(1, "GPU-bbbb-1111", "H200", "default"),
        Gpu(2, "GPU-cccc-2222", "H200", "exclusive_process")]


def test_the_gpu_ray_gave_is_found_by_index_or_uuid_and_keyed_by_uuid() -> None:
    assert assigned_gpu({"CUDA_VISIBLE_DEVICES": "1"}, GPUS).uuid == "GPU-bbbb-1111"
    assert assigned_gpu({"CUDA_VISIBLE_DEVICES": "GPU-cccc"}, GPUS).index == 2  # a UUID prefix, as CUDA takes it
    with pytest.raises(ConfigError, match="exactly one GPU"):
        assigned_gpu({"CUDA_VISIBLE_DEVICES": "0,1"}, GPUS)
    with pytest.raises(ConfigError, match="exactly one GPU"):
        assigned_gpu({}, GPUS)
    with pytest.raises(ConfigError, match="which NVML does not show"):
        assigned_gpu({"CUDA_VISIBLE_DEVICES": "7"}, GPUS)


def test_addresses_stay_across_restarts_when_they_can(tmp_path: Path) -> None:
    bind, shown = choose_address("ipc:///anything.sock", None, "10.0.0.5", tmp_path)
    assert bind == shown == f"ipc://{tmp_path}/coordinator.sock"
    bind, shown = choose_address("tcp://127.0.0.1:5555", None, "10.0.0.5", tmp_path)
    port = int(bind.rsplit(":", 1)[1])
    assert bind == shown and bind.startswith("tcp://127.0.0.1:")
    again, _ = choose_address("tcp://127.0.0.1:5555", {"address": bind}, "10.0.0.5", tmp_path)
    assert again == bind  # the last incarnation's port, free again
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        moved, _ = choose_address("tcp://127.0.0.1:5555", {"address": bind}, "10.0.0.5", tmp_path)
    assert moved != bind
    bind, shown = choose_address("tcp://0.0.0.0:5555", None, "10.0.0.5", tmp_path)
    assert bind.startswith("tcp://0.0.0.0:") and shown == "tcp://10.0.0.5:" + bind.rsplit(":", 1)[1]


def test_a_former_coordinator_elsewhere_or_gone_is_not_waited_for() -> None:
    began = time.monotonic()
    retire(None, "node-a")
    retire({"node": "node-b", "pid": 1}, "node-a")  # another node's
    retire({"node": "node-a", "pid": 2**22 + 12345, "pid_created": 0.0}, "node-a")  # no such process
    assert time.monotonic() - began < 1.0


def test_the_directory_is_claimed_once_and_taken_over_from_a_dead_owner() -> None:
    d = DirectoryState()
    assert d.claim({"id": "a", "pid": 1}) is None
    d.set_layout({"coordinators": 2, "groups": {}})
    assert d.claim({"id": "b", "pid": 2}) == {"id": "a", "pid": 1}  # a live owner keeps it
    assert d.heartbeat("a") and not d.heartbeat("b")
    assert d.begin(0) == (None, 1)
    d.register(0, {"state": "up", "address": "ipc:///c0", "pid": 10})
    previous, incarnation = d.begin(0)
    assert previous["address"] == "ipc:///c0" and incarnation == 2
    d.register(0, {"state": "starting", "incarnation": 2})
    assert d.coordinator(0)["address"] == "ipc:///c0"  # merged with what was known
    for i in range(10):
        d.record_snapshot(f"/s{i}")
    d.record_snapshot("/s3")
    table = d.table()
    assert table["snapshots"][-1] == "/s3" and len(table["snapshots"]) == 8 and table["owner_alive"]
    version = d.get_version()
    assert d.claim({"id": "b", "pid": 2}, stale_after_s=0.0) is None  # silent past the limit: a dead cluster's
    assert d.table()["coordinators"] == {} and d.table()["layout"] is None and d.get_version() > version


def config(device: str) -> object:
    return parse_config({"coordinator": {"device": device},
                         "group": [{"name": "m", "factory": "a:b", "count": 2, "input": {"shape": [-1, 2]}}]})


def test_one_coordinator_per_gpu_unless_told() -> None:
    assert coordinator_count(None, config("auto"), {"GPU": 8.0, "CPU": 64}) == (8, True)
    assert coordinator_count(3, config("auto"), {"GPU": 8.0}) == (3, True)
    assert coordinator_count(2, config("auto"), {"CPU": 2}) == (2, False)
    assert coordinator_count(4, config("cpu"), {"GPU": 8.0}) == (4, False)
    with pytest.raises(ConfigError, match="--coordinators N"):
        coordinator_count(None, config("auto"), {"CPU": 2})
    with pytest.raises(ConfigError, match="the Ray cluster has 8"):
        coordinator_count(9, config("cuda"), {"GPU": 8.0})
    with pytest.raises(ConfigError, match="has no GPU"):
        coordinator_count(2, config("cuda:0"), {"CPU": 2})


def spec(**extra: object) -> dict:
    raw = {"coordinator": {"address": "tcp://127.0.0.1:5555", "workers": 2, "device": "auto", "mps": "auto"},
           "group": [{"name": "m", "factory": "examples.models:mlp", "count": 4, "input": {"shape": [-1, 8]},
                      "init": {"seed": 1}}]}
    from scheduler.cluster.layout import plan_layout

    return {"raw": raw, "layout": plan_layout(parse_config(raw), 2).as_dict(), "cpus": 8, "cwd": "/work/x", **extra}


def test_a_coordinator_on_a_gpu_sees_that_gpu_alone_by_uuid_whatever_index_ray_used(tmp_path: Path) -> None:
    """Ray wrote "2" (an NVML index) into the actor's CUDA_VISIBLE_DEVICES; the coordinator gets the UUID, and
    its own plan (scheduler.gpu, as `cohort run` makes it) then picks that GPU as cuda:0, with an MPS daemon
    of its own on that UUID and MPS clients without the variable."""
    from scheduler import gpu as gpu_plan
    from scheduler.cluster.supervisor import block_config, child_environment

    actor_env = {"CUDA_VISIBLE_DEVICES": "2", "RAY_RAYLET_PID": "1", "PYTHONPATH": "/user/lib", "PATH": "/bin"}
    gpu = assigned_gpu(actor_env, GPUS)
    env = child_environment(actor_env, spec(), gpu, "/work/cohort")
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-cccc-2222" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert "RAY_RAYLET_PID" not in env and env["PYTHONPATH"] == "/work/cohort:/work/x:/user/lib"
    assert env["OMP_NUM_THREADS"] == "4"  # 8 CPUs in the bundle, 2 workers
    config = parse_config(block_config(spec(), 1, "tcp://127.0.0.1:6000", gpu, {}, tmp_path))
    assert config.coordinator.device == "cuda:0" and config.groups[0].init_seed == 3
    plan = gpu_plan.plan_device(config.coordinator.device, GPUS, env, cuda_built=True)
    assert (plan.device, plan.gpu) == ("cuda:0", GPUS[2])
    assert plan.daemon_env() == {"CUDA_VISIBLE_DEVICES": "GPU-cccc-2222"}
    assert "CUDA_VISIBLE_DEVICES" not in gpu_plan.client_environment(plan, True, env)
    cpu = parse_config(block_config(spec(snapshot_interval_s=30.0), 0, "tcp://127.0.0.1:6001", None, {}, tmp_path))
    assert cpu.coordinator.device == "cpu"  # never a GPU Ray did not give it
    assert cpu.coordinator.snapshot_interval_s == 30.0 and cpu.coordinator.snapshot_dir.endswith("/snapshots/c0")
    assert child_environment({"OMP_NUM_THREADS": "1"}, spec(omp_num_threads="3"), None, "/r")["OMP_NUM_THREADS"] == "3"


def test_only_dead_clusters_of_this_host_lose_their_directory(tmp_path: Path) -> None:
    import os

    from scheduler.cluster.supervisor import cluster_home, new_cluster_id, remove_stale_homes

    mine = new_cluster_id()
    host = mine.split("-")[0]
    dead = f"{host}-{2**22 + 4321}-0123abcd"
    for name in (mine, dead, f"otherhost-{2**22 + 4321}-0123abcd", "garbage"):
        (tmp_path / f"cohort-cluster-{name}").mkdir()
    assert remove_stale_homes(tmp_path) == [str(tmp_path / f"cohort-cluster-{dead}")]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"cohort-cluster-{n}" for n in (mine, f"otherhost-{2**22 + 4321}-0123abcd", "garbage"))
    assert str(os.getpid()) in mine and cluster_home(mine).name == f"cohort-cluster-{mine}"

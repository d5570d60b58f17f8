"""Choosing the GPU with NVML before anything touches CUDA: CUDA_VISIBLE_DEVICES, MPS, compute modes.

NVML is replaced by a stand-in that reports GPUs; the coordinator is built with torch's
CUDA entry points made to fail, which proves it never initialises CUDA itself."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from core.errors import ConfigError
from scheduler import gpu
from scheduler.config import parse_config
from scheduler.gpu import (
    DevicePlan,
    Gpu,
    check_sharing,
    client_environment,
    plan_device,
    probe_gpus,
    visible_gpus,
)
from tests.unit.fake_mps import install_control

GPUS = [Gpu(i, f"GPU-{i}{i}{i}-uuid", "NVIDIA H200", "default") for i in range(4)]


class FakeNvml:
    def __init__(self, modes: list[int]) -> None:
        self.modes = modes
        self.shut = False

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        self.shut = True

    def nvmlDeviceGetCount(self) -> int:
        return len(self.modes)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetUUID(self, h: int) -> bytes:
        return f"GPU-{h}{h}{h}-uuid".encode()

    def nvmlDeviceGetName(self, h: int) -> str:
        return "NVIDIA H200"

    def nvmlDeviceGetComputeMode(self, h: int) -> int:
        return self.modes[h]


def test_probe_reads_uuid_name_and_compute_mode() -> None:
    nvml = FakeNvml([0, 3])
    gpus = probe_gpus(nvml)
    assert gpus == [Gpu(0, "GPU-000-uuid", "NVIDIA H200", "default"),
                    Gpu(1, "GPU-111-uuid", "NVIDIA H200", "exclusive_process")]
    assert nvml.shut


def test_no_driver_means_no_gpu() -> None:
    class Broken:
        def nvmlInit(self) -> None:
            raise RuntimeError("NVML Shared Library Not Found")

    assert probe_gpus(Broken()) == []


@pytest.mark.parametrize(("visible", "want"), [
    (None, [0, 1, 2, 3]),
    ("2,3", [2, 3]),
    ("3,1", [3, 1]),
    ("", []),
    ("-1", []),
    ("1,9,2", [1]),  # CUDA stops at the first entry it cannot match
    ("GPU-222,0", [2, 0]),  # UUID prefixes
    ("GPU-nope", []),
])
def test_visible_gpus_follow_cuda_visible_devices(visible, want) -> None:
    env = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    assert [g.index for g in visible_gpus(GPUS, env)] == want


def test_a_non_zero_index_under_slurm_names_the_right_gpu_for_the_daemon() -> None:
    """Slurm gives the job GPU 2: the daemon must see GPU 2 by UUID, its clients no variable at all."""
    env = {"CUDA_VISIBLE_DEVICES": "2", "PATH": "/bin"}
    plan = plan_device("auto", GPUS, env, cuda_built=True)
    assert plan.device == "cuda:0" and plan.gpu == GPUS[2]
    assert plan.daemon_env() == {"CUDA_VISIBLE_DEVICES": "GPU-222-uuid"}
    assert plan.worker_device(mps_on=True) == "cuda:0"
    assert client_environment(plan, True, env) == {"PATH": "/bin"}
    assert client_environment(plan, False, env) == env  # without MPS the workers keep the user's view


def test_cuda_n_is_counted_among_the_visible_gpus() -> None:
    env = {"CUDA_VISIBLE_DEVICES": "1,3"}
    plan = plan_device("cuda:1", GPUS, env, cuda_built=True)
    assert plan.gpu == GPUS[3] and plan.device == "cuda:1"
    assert plan.worker_device(mps_on=True) == "cuda:0"  # the daemon shows only that GPU
    assert plan.worker_device(mps_on=False) == "cuda:1"


def test_impossible_devices_fail_at_once_with_the_reason() -> None:
    with pytest.raises(ConfigError, match="only 2 GPU"):
        plan_device("cuda:2", GPUS, {"CUDA_VISIBLE_DEVICES": "0,1"}, cuda_built=True)
    with pytest.raises(ConfigError, match="hides them"):
        plan_device("cuda", GPUS, {"CUDA_VISIBLE_DEVICES": ""}, cuda_built=True)
    with pytest.raises(ConfigError, match="built without CUDA"):
        plan_device("cuda", GPUS, {}, cuda_built=False)
    prohibited = [Gpu(0, "GPU-x", "H100", "prohibited")]
    with pytest.raises(ConfigError, match="PROHIBITED"):
        plan_device("auto", prohibited, {}, cuda_built=True)
    assert plan_device("auto", [], {}, cuda_built=True) == DevicePlan("cpu")
    assert plan_device("auto", GPUS, {}, cuda_built=False) == DevicePlan("cpu")  # a CPU build of torch


def test_exclusive_process_needs_mps_for_several_workers() -> None:
    plan = DevicePlan("cuda:0", Gpu(0, "GPU-x", "H100", "exclusive_process"))
    check_sharing(plan, workers=1, mps_on=False, mps_reason="off")
    check_sharing(plan, workers=4, mps_on=True, mps_reason="started")
    with pytest.raises(ConfigError, match="EXCLUSIVE_PROCESS.*4 workers.*not running \\(mps = off"):
        check_sharing(plan, workers=4, mps_on=False, mps_reason="mps = off in the config")


FAKE_CONTROL = """#!/bin/sh
echo "args:$* visible:${CUDA_VISIBLE_DEVICES-unset}" >> "$FAKE_MPS_LOG"
if [ "$1" = "-d" ]; then exit 0; fi
read -r command
if [ "$command" = "get_server_list" ]; then echo 4242; fi
exit 0
"""


def test_the_coordinator_starts_mps_for_the_gpu_and_never_initialises_cuda(tmp_path: Path, monkeypatch) -> None:
    """With a GPU reported by NVML and torch's CUDA entry points broken, the coordinator still plans,
    starts the daemon on the GPU's UUID and hands the workers an environment without CUDA_VISIBLE_DEVICES."""
    from scheduler import coordinator as coordinator_module
    from scheduler import mps as mps_module

    def no_cuda(*_a, **_k):
        raise AssertionError("the coordinator initialised CUDA")

    for name in ("is_available", "init", "device_count", "synchronize", "current_device"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    monkeypatch.setattr(gpu, "probe_gpus", lambda: GPUS)
    monkeypatch.setattr(gpu, "cuda_built", lambda: True)
    monkeypatch.setattr(mps_module, "PROBE", "pass")
    install_control(tmp_path, monkeypatch, FAKE_CONTROL)
    log = tmp_path / "control.log"
    monkeypatch.setenv("FAKE_MPS_LOG", str(log))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    spawned = []
    monkeypatch.setattr(coordinator_module.Coordinator, "_spawn", lambda self, w: spawned.append(w.id))
    monkeypatch.setattr(coordinator_module.Supervisor, "wait_until_ready", lambda self, receive, stopping: None)
    raw = {"coordinator": {"address": f"ipc://{tmp_path}/c.sock", "device": "auto", "mps": "on", "workers": 2},
           "group": [{"name": "m", "factory": "examples.models:mlp", "count": 2,
                      "kwargs": {"d_in": 4, "hidden": 4, "d_out": 2}, "input": {"shape": [-1, 4]}}]}
    c = coordinator_module.Coordinator(parse_config(raw))
    try:
        c.start()
        assert spawned == [0, 1]
        assert c.mps.mode == "on"
        assert "args:-d visible:GPU-222-uuid" in log.read_text()
        env = c.supervisor.env
        assert "CUDA_VISIBLE_DEVICES" not in env and env["CUDA_MPS_PIPE_DIRECTORY"].startswith(c.run_dir)
        assert c.supervisor.device == "cuda:0"
        assert c.stats_dict()["gpu"]["uuid"] == "GPU-222-uuid"
    finally:
        c.shutdown()
    assert not os.path.exists(c.run_dir)

"""MPS for real: on where the control binary exists, with every worker a client of its server."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch
from cohort_harness import mlp_group

pytestmark = pytest.mark.gpu
CONTROL = "nvidia-cuda-mps-control"


def mps_clients(pipe_dir: str) -> set[int]:
    """The pids of every client of every MPS server the daemon at ``pipe_dir`` runs."""
    env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": pipe_dir}

    def ask(command: str) -> list[str]:
        out = subprocess.run([CONTROL], input=command + "\n", env=env, capture_output=True, text=True, timeout=10)
        return out.stdout.split()

    return {int(pid) for server in ask("get_server_list") for pid in ask(f"get_client_list {server}")}


def test_mps_mode_is_reported(gpu_cohort) -> None:
    running = gpu_cohort([mlp_group("m", 4)], mps="auto", workers=2)
    with running.client(timeout=60) as c:
        x = torch.randn(2, 8)
        assert c.infer("m/1", x).shape == (2, 4)
        zero = {k: torch.zeros_like(v) for k, v in c.get_weights("m/0").items()}
        c.set_weights("m/0", zero)
        assert torch.count_nonzero(c.infer("m/0", x)) == 0
        c.copy_weights("m/0", "m/3")  # across the two workers
        assert torch.count_nonzero(c.infer("m/3", x)) == 0
        stats = c.stats()
    mps = stats["mps"]
    print("MPS:", mps)
    assert "MPS" in running.log()
    if shutil.which(CONTROL) is None:
        assert mps["mode"] == "off" and CONTROL in mps["reason"]
        return
    assert mps["mode"] == "on", f"the control binary exists but MPS did not start: {mps['reason']}"
    clients = mps_clients(mps["pipe_dir"])
    workers = {w["pid"] for w in stats["workers"]}
    assert workers <= clients, f"workers {workers} are not all clients of the MPS server (clients {clients})"
    assert stats["pid"] not in clients  # the coordinator never opens CUDA

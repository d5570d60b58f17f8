"""Binding beyond loopback needs CURVE; with it, only allowed clients are answered."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
import zmq.auth
from cohort_harness import ROOT, config_text, mlp_group

from scheduler import Client, JobTimeout
from scheduler.security import CurveClient, make_keys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_public_address_without_keys_refuses_to_start(tmp_path) -> None:
    path = tmp_path / "open.toml"
    path.write_text(config_text({"address": f"tcp://0.0.0.0:{free_port()}", "device": "cpu"}, [mlp_group("m", 1)]))
    proc = subprocess.run([sys.executable, "-m", "scheduler", "run", "--config", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "coordinator.address" in proc.stderr and "curve_secret_key" in proc.stderr


def test_curve_admits_allowed_clients_only(cohort, tmp_path) -> None:
    keys = make_keys(tmp_path / "keys", clients=1)
    port = free_port()
    running = None
    # The harness's readiness probe is a plain Client: it takes its keys from the environment.
    os.environ["COHORT_CURVE_SERVER_KEY"] = str(keys["server_public"])
    os.environ["COHORT_CURVE_CLIENT_CERT"] = str(keys["client_0_secret"])
    try:
        running = cohort([mlp_group("m", 1)], address=f"tcp://0.0.0.0:{port}",
                         curve_secret_key=str(keys["server_secret"]), curve_allowed_keys=str(keys["allowed"]))
    finally:
        del os.environ["COHORT_CURVE_SERVER_KEY"], os.environ["COHORT_CURVE_CLIENT_CERT"]
    address = f"tcp://127.0.0.1:{port}"
    allowed = CurveClient.from_files(keys["server_public"], keys["client_0_secret"])
    with Client(address, timeout=10, curve=allowed) as c:
        assert c.infer("m/0", torch.randn(2, 8)).shape == (2, 4)

    # A client with a key pair the coordinator does not know is never answered.
    stranger_public, stranger_secret = zmq.auth.create_certificates(tmp_path, "stranger")
    stranger = CurveClient.from_files(keys["server_public"], stranger_secret)
    with Client(address, timeout=1.5, curve=stranger) as c, pytest.raises(JobTimeout):
        c.models()
    # Nor is a client without CURVE at all.
    with Client(address, timeout=1.5) as c, pytest.raises(JobTimeout):
        c.models()
    with Client(address, timeout=10, curve=allowed) as c:
        assert [m.id for m in c.models()] == ["m/0"]
    assert running is not None

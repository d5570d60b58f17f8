"""The CUDA MPS lifecycle against a stand-in ``nvidia-cuda-mps-control`` that records what it is told.

The real daemon needs a GPU (tests/gpu covers it there); these tests pin what cohort does
around it on any machine: private directories handed to the daemon and the workers,
the probe that proves a CUDA client can start, falling back (``auto``) or failing
(``on``) when it cannot, and stopping only a daemon cohort started.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.errors import ConfigError
from scheduler import mps as mps_module
from scheduler.mps import MpsDaemon
from scheduler.workerpool import allocator_env
from tests.unit.fake_mps import install_control

FAKE_CONTROL = """#!/bin/sh
echo "args:$* pipe:$CUDA_MPS_PIPE_DIRECTORY log:$CUDA_MPS_LOG_DIRECTORY" >> "$FAKE_MPS_LOG"
if [ "$1" = "-d" ]; then exit "${FAKE_MPS_START_CODE:-0}"; fi
read -r command
echo "command:$command" >> "$FAKE_MPS_LOG"
if [ "$command" = "get_server_list" ]; then echo 4242; fi
exit 0
"""


@pytest.fixture
def fake_control(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in control binary first on PATH; returns the file it records to."""
    install_control(tmp_path, monkeypatch, FAKE_CONTROL)
    log = tmp_path / "control.log"
    monkeypatch.setenv("FAKE_MPS_LOG", str(log))
    for name in ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)
    return log


def _commands(log: Path) -> list[str]:
    return [line.split(":", 1)[1] for line in log.read_text().splitlines() if line.startswith("command:")]


def test_auto_starts_probes_hands_private_directories_and_stops_its_daemon(fake_control, monkeypatch) -> None:
    monkeypatch.setattr(mps_module, "PROBE", "pass")  # a CUDA client that starts
    daemon = MpsDaemon("auto", thread_percentage=40)
    daemon.start("cuda")
    try:
        assert daemon.state()["mode"] == "on" and daemon.reason == "started by cohort"
        env = daemon.worker_env(2)
        pipe, log_dir = env["CUDA_MPS_PIPE_DIRECTORY"], env["CUDA_MPS_LOG_DIRECTORY"]
        assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "40"
        assert pipe != "/tmp/nvidia-mps" and (os.stat(pipe).st_mode & 0o077) == 0  # private
        started = fake_control.read_text().splitlines()[0]
        assert started == f"args:-d pipe:{pipe} log:{log_dir}"
        daemon.terminate_client(777)
        assert "terminate_client 4242 777" in _commands(fake_control)
    finally:
        daemon.stop()
    assert _commands(fake_control)[-1] == "quit"
    assert not os.path.exists(pipe) and not os.path.exists(log_dir)
    assert daemon.worker_env(2) == {}


def test_auto_goes_on_without_mps_when_no_cuda_client_can_start(fake_control, monkeypatch) -> None:
    monkeypatch.setattr(mps_module, "PROBE", "raise SystemExit('no CUDA device under MPS')")
    daemon = MpsDaemon("auto")
    daemon.start("cuda")
    assert daemon.mode == "off"
    assert "a CUDA client could not start under the MPS daemon: no CUDA device under MPS" in daemon.reason
    assert _commands(fake_control)[-1] == "quit", "the daemon cohort started was left running"
    assert daemon.worker_env(4) == {}


def test_on_fails_with_the_reason_and_stops_the_daemon(fake_control, monkeypatch) -> None:
    monkeypatch.setattr(mps_module, "PROBE", "raise SystemExit('server would not start')")
    daemon = MpsDaemon("on")
    with pytest.raises(ConfigError, match="mps = 'on', but MPS cannot start: .*server would not start"):
        daemon.start("cuda")
    assert _commands(fake_control)[-1] == "quit"


def test_a_daemon_that_will_not_start_is_never_told_to_quit(fake_control, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_MPS_START_CODE", "3")
    daemon = MpsDaemon("auto")
    daemon.start("cuda")
    assert daemon.mode == "off" and "-d exited 3" in daemon.reason
    assert _commands(fake_control) == []  # somebody else's daemon, if any, is left alone


def test_off_and_cpu_never_touch_the_daemon(fake_control) -> None:
    for requested, device in (("off", "cuda"), ("auto", "cpu"), ("on", "cpu")):
        daemon = MpsDaemon(requested)
        if requested == "on":
            with pytest.raises(ConfigError, match="device is cpu"):
                daemon.start(device)
        else:
            daemon.start(device)
            assert daemon.mode == "off" and daemon.reason
        daemon.stop()
    assert not fake_control.exists()


def test_allocator_env_turns_expandable_segments_off_and_keeps_other_options() -> None:
    env = allocator_env({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True,max_split_size_mb:128"})
    assert env == {
        "PYTORCH_ALLOC_CONF": "expandable_segments:False",
        "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128,expandable_segments:False",
    }
    assert allocator_env({})["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:False"

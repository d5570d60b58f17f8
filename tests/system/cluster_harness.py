"""Start ``python -m scheduler cluster`` (and, when a test wants one, a Ray head of its own), stop it,
and find what it left behind, for tests/system/test_cluster*.py.

Everything runs under a private, short ``RAY_TMPDIR`` (Ray's AF_UNIX sockets live there,
and a path past 107 bytes fails; a pytest ``tmp_path`` is too long), with
``RAY_AUTH_MODE=disabled`` (nothing is written to ``~/.ray``) and no ``RAY_ADDRESS``, so a
test never joins a Ray cluster of someone else's on the machine. Every process of the
tree is remembered with its start time while it runs (the cluster process, its Ray
head, the Ray workers that host the actors, the coordinators and their workers: all are
its descendants), so whatever happens, ``close`` can check and kill exactly those.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from tools.harness import alive, config_text, kill_processes, leftover_shm  # noqa: E402

READY_TIMEOUT_S = 180.0
READY_LINE = "cohort cluster: ready:"


@contextmanager
def ray_environment() -> Iterator[dict[str, str]]:
    """A private ``RAY_TMPDIR`` for this process and its children; removed (with what Ray left) at the end."""
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    keys = ("RAY_TMPDIR", "RAY_AUTH_MODE", "RAY_ADDRESS", "RAY_USAGE_STATS_ENABLED")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({"RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"})
    os.environ.pop("RAY_ADDRESS", None)
    paths = [str(ROOT), str(HERE), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}
    try:
        yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(ray_tmp, ignore_errors=True)


class RunningCluster:
    """One ``python -m scheduler cluster`` process and everything under it."""

    def __init__(self, directory: Path, env: dict[str, str], coordinator: dict[str, Any], groups: list[dict[str, Any]],
                 args: list[str]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.config = directory / "cluster.toml"
        self.config.write_text(config_text(coordinator, groups), encoding="ascii")
        self.log_path = directory / "cluster.log"
        self.pids: dict[int, float] = {}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "scheduler", "cluster", "--config", str(self.config), *args],
                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C meant for pytest does not reach it
            )
        self.remember()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while READY_LINE not in self.log():
            if self.process.poll() is not None:
                raise AssertionError(f"cohort cluster exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"cohort cluster not ready within {timeout_s:.0f} s:\n{self.log()[-4000:]}")
            self.remember()
            time.sleep(0.2)
        self.remember()

    def remember(self) -> None:
        """Every process now under the cluster process, with its start time."""
        try:
            root = psutil.Process(self.process.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        for p in tree:
            try:
                self.pids.setdefault(p.pid, p.create_time())
            except psutil.Error:
                pass

    def stop(self, sig: int = signal.SIGINT, timeout_s: float = 120.0) -> int | None:
        """``sig`` to the cluster process; its exit code (None if it had to be killed)."""
        self.remember()
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                return None
        return self.process.returncode

    def left(self, wait_s: float = 15.0) -> list[str]:
        """Processes of the tree still running after ``wait_s`` (each with its command line)."""
        deadline = time.monotonic() + wait_s
        while alive(self.pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        out = []
        for pid in alive(self.pids):
            try:
                out.append(f"{pid} {' '.join(psutil.Process(pid).cmdline())[:160]}")
            except psutil.Error:
                pass
        return out

    def close(self) -> None:
        """Whatever happened: stop it, then kill anything of the tree still there."""
        if self.process.poll() is None:
            self.stop(signal.SIGINT, 90.0)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        kill_processes(self.pids)


def cohort_shm(run_ids: list[str]) -> list[str]:
    return [name for run_id in run_ids if run_id for name in leftover_shm(run_id)]


class RayHead:
    """A Ray head of the test's own (the cluster then joins it), stopped as ``cohort cluster`` stops its own."""

    def __init__(self, directory: Path, num_cpus: int = 2) -> None:
        """Inside ``ray_environment``: its address file goes to the private ``RAY_TMPDIR``."""
        from scheduler.cluster.raylocal import LocalHead

        directory.mkdir(parents=True, exist_ok=True)
        self.head = LocalHead(num_cpus, directory / "ray-head.log")
        self.address = self.head.start()
        self.pids: dict[int, float] = {}
        root = psutil.Process(self.head.process.pid)  # type: ignore[union-attr]
        for p in [root, *root.children(recursive=True)]:
            self.pids[p.pid] = p.create_time()

    def stop(self) -> None:
        self.head.stop()
        kill_processes(self.pids)

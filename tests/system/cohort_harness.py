"""Start real coordinators for system tests, and prove that each one cleans up after itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from scheduler import Client

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return repr(value)


def config_text(coordinator: dict[str, Any], groups: list[dict[str, Any]]) -> str:
    lines = ["[coordinator]", *(f"{k} = {toml_value(v)}" for k, v in coordinator.items())]
    for group in groups:
        lines += ["", "[[group]]", *(f"{k} = {toml_value(v)}" for k, v in group.items())]
    return "\n".join(lines) + "\n"


def mlp_group(name: str = "mlp", count: int = 4, **overrides: Any) -> dict[str, Any]:
    group = {
        "name": name,
        "factory": "examples.models:mlp",
        "kwargs": {"d_in": 8, "hidden": 16, "d_out": 4},
        "count": count,
        "input": {"shape": [-1, 8], "dtype": "float32"},
        "loss": "cross_entropy",
        "optimizer": {"name": "sgd", "lr": 0.1},
        "init": {"seed": 0},
    }
    group.update(overrides)
    return group


@dataclass
class RunningCohort:
    """One coordinator process (and its workers) started from a config file."""

    address: str
    process: subprocess.Popen[bytes]
    log_path: Path
    config_path: Path
    info: dict[str, Any] = field(default_factory=dict)

    def client(self, **kwargs: Any) -> Client:
        return Client(self.address, **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_pids(self) -> list[int]:
        with self.client(timeout=10) as c:
            return [w["pid"] for w in c.stats()["workers"]]

    def stop(self, sig: int = signal.SIGINT, timeout: float = 20.0) -> int:
        """Stop the coordinator with ``sig`` and return its exit code (killing it if it hangs)."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                kill_group(self.process.pid)
                self.process.wait(5)
                raise AssertionError(f"coordinator did not stop within {timeout} s on {sig}:\n{self.log()[-3000:]}") from None
        return self.process.returncode


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def leftover_shm(run_id: str) -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").glob(f"cohort-{run_id}-*"))


def alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def start_cohort(tmp_path: Path, groups: list[dict[str, Any]], *, name: str = "cohort",
                 wait_s: float = 90.0, **coordinator: Any) -> RunningCohort:
    """Write a config, start ``python -m scheduler run`` on a private ipc:// path, wait until it answers."""
    directory = tmp_path / name
    directory.mkdir(parents=True, exist_ok=True)
    address = f"ipc://{directory}/coordinator.sock"
    settings = {"address": address, "workers": 1, "device": "cpu", "mps": "off", **coordinator}
    config_path = directory / "cohort.toml"
    config_path.write_text(config_text(settings, groups))
    log_path = directory / "coordinator.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)])}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "scheduler", "run", "--config", str(config_path)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    # A coordinator bound to every interface is reached through loopback.
    address = settings["address"].replace("tcp://0.0.0.0:", "tcp://127.0.0.1:")
    running = RunningCohort(address, process, log_path, config_path)
    deadline = time.monotonic() + wait_s
    with Client(address, timeout=2) as c:
        while True:
            if process.poll() is not None:
                raise AssertionError(f"coordinator exited with {process.returncode}:\n{running.log()[-4000:]}")
            try:
                running.info = c.stats(timeout=2)
                return running
            except Exception:
                if time.monotonic() > deadline:
                    kill_group(process.pid)
                    raise AssertionError(f"coordinator not up within {wait_s} s:\n{running.log()[-4000:]}") from None
                time.sleep(0.2)


def stop_and_check_clean(running: RunningCohort, sig: int = signal.SIGINT) -> int:
    """Stop a coordinator and assert that no process and no shared-memory segment is left."""
    pids = [running.process.pid, *[w["pid"] for w in running.info.get("workers", []) if w.get("pid")]]
    try:
        pids += running.worker_pids()
    except Exception:
        pass
    code = running.stop(sig)
    deadline = time.monotonic() + 5
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert alive(pids) == [], f"processes left behind: {alive(pids)}"
    assert leftover_shm(running.info["run_id"]) == [], "shared memory left behind"
    return code

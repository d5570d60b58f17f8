"""A private CUDA MPS control daemon for the ``processes_mps`` baseline, and the proof
that the baseline's processes were its clients.

The pipe and log directories are private temporary ones, never the system default,
so the benchmark neither joins nor disturbs an MPS daemon someone else runs, and it
stops exactly the daemon it started.

A CUDA process is an MPS client only if ``CUDA_MPS_PIPE_DIRECTORY`` names the daemon's
pipe when it initializes CUDA. ``client_evidence`` records, for the JSON, what each
benchmark process saw at its start, which clients the daemon's server lists
(``get_server_list`` / ``get_client_list``) and, on a GPU, which processes NVML shows
on the device (under MPS: ``nvidia-cuda-mps-server``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CONTROL_BINARY = "nvidia-cuda-mps-control"
START_TIMEOUT_S = 10.0
VARIABLES = ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY")
SERVER_NAME = "nvidia-cuda-mps-server"


class MpsUnavailable(RuntimeError):
    """MPS cannot run here: binary missing, daemon refused to start, or no control pipe."""


def _start(binary: str, env: dict[str, str], pipe_dir: Path) -> None:
    """Start the daemon and wait until its control pipe exists (it daemonizes at once)."""
    started = subprocess.run([binary, "-d"], env=env, capture_output=True, text=True, timeout=30, check=False)
    if started.returncode != 0:
        raise MpsUnavailable(f"{binary} -d exited {started.returncode}: {started.stderr.strip()[:200]}")
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (pipe_dir / "control").exists():
        if time.monotonic() > deadline:
            raise MpsUnavailable(f"no control pipe in {pipe_dir} after {START_TIMEOUT_S:.0f} s")
        time.sleep(0.05)


def _stop(binary: str, env: dict[str, str]) -> None:
    """Ask the daemon we started to quit; it stops its server once clients are gone."""
    subprocess.run([binary], input="quit\n", env=env, capture_output=True, text=True, timeout=30, check=False)


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set variables for processes started inside the block, then restore the old ones."""
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def mps_daemon() -> Iterator[dict[str, str]]:
    """Run the block with an MPS daemon up and its variables set for spawned children."""
    binary = shutil.which(CONTROL_BINARY)
    if binary is None:
        raise MpsUnavailable(f"{CONTROL_BINARY} not found on PATH")
    root = Path(tempfile.mkdtemp(prefix="cohort-bench-mps-"))
    variables = {
        "CUDA_MPS_PIPE_DIRECTORY": str(root / "pipe"),
        "CUDA_MPS_LOG_DIRECTORY": str(root / "log"),
    }
    for path in variables.values():
        Path(path).mkdir(mode=0o700)
    env = {**os.environ, **variables}
    try:
        _start(binary, env, root / "pipe")
        try:
            with _environment(variables):
                yield variables
        finally:
            _stop(binary, env)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------- proof of clients


def seen_variables() -> dict[str, str | None]:
    """The MPS variables in this process's environment: what its first CUDA call will use."""
    return {name: os.environ.get(name) for name in VARIABLES}


def _control(variables: dict[str, str], command: str) -> str:
    binary = shutil.which(CONTROL_BINARY)
    if binary is None:
        raise MpsUnavailable(f"{CONTROL_BINARY} not found on PATH")
    done = subprocess.run([binary], input=command + "\n", env={**os.environ, **variables}, capture_output=True,
                          text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise MpsUnavailable(f"{command!r}: exit {done.returncode}: {done.stderr.strip()[:200]}")
    return done.stdout


def _pids(text: str) -> list[int]:
    return [int(token) for token in text.split() if token.isdigit()]


def server_clients(variables: dict[str, str], children: list[int]) -> dict[str, Any]:
    """The daemon's servers and each one's client pids; whether every child is among them."""
    try:
        servers = _pids(_control(variables, "get_server_list"))
        clients = {server: _pids(_control(variables, f"get_client_list {server}")) for server in servers}
    except (MpsUnavailable, OSError, subprocess.SubprocessError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    every = {pid for pids in clients.values() for pid in pids}
    return {"servers": servers, "clients": {str(server): pids for server, pids in clients.items()},
            "children_are_clients": bool(children) and set(children) <= every,
            "children_not_clients": sorted(set(children) - every)}


def gpu_processes(index: int = 0) -> dict[str, Any]:
    """The compute processes NVML sees on the device: under MPS the server, not the clients."""
    try:
        import psutil
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        listed = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except Exception as exc:  # noqa: BLE001 - no NVML, no figure; the reason is recorded
        return {"skipped": f"NVML: {type(exc).__name__}: {exc}"[:300]}
    processes = []
    for entry in listed:
        try:
            name = psutil.Process(entry.pid).name()
        except psutil.Error:
            name = "?"  # another pid namespace, or gone
        used = getattr(entry, "usedGpuMemory", None)
        processes.append({"pid": entry.pid, "name": name, "used_mib": None if used is None else used / 2**20})
    return {"processes": processes, "mps_server_on_gpu": any(p["name"] == SERVER_NAME for p in processes)}


def client_evidence(variables: dict[str, str], children: list[tuple[int, dict[str, str | None]]],
                    device: str) -> dict[str, Any]:
    """What shows that ``children`` (pid, variables each saw at its start) were MPS clients.

    ``children_saw_mps_env`` is the part that holds on any machine; the server's client
    list needs the daemon, NVML a GPU (``{"skipped": reason}`` without one).
    """
    expected = {name: variables.get(name) for name in VARIABLES}
    return {
        "pipe_directory": variables.get("CUDA_MPS_PIPE_DIRECTORY"),
        "log_directory": variables.get("CUDA_MPS_LOG_DIRECTORY"),
        "children": [{"pid": pid, "env": seen} for pid, seen in children],
        "children_saw_mps_env": bool(children) and all(seen == expected for _, seen in children),
        "server": server_clients(variables, [pid for pid, _ in children]),
        "nvml": gpu_processes() if device.startswith("cuda") else {"skipped": "no GPU"},
    }

"""A private CUDA MPS control daemon for the ``processes_mps`` baseline.

The pipe and log directories are private temporary ones, never the system default,
so the benchmark neither joins nor disturbs an MPS daemon someone else runs, and it
stops exactly the daemon it started.
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

CONTROL_BINARY = "nvidia-cuda-mps-control"
START_TIMEOUT_S = 10.0


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

"""What a coordinator killed with SIGKILL leaves behind, found and removed at the next start.

Every name cohort gives a run's resources starts with ``cohort-<pid>-`` (the coordinator's
pid): its run directory under the temp dir (worker sockets, heartbeat files, the MPS
daemon's pipe and log directories), its shared-memory segments; PyTorch's CUDA IPC
reference-count files are ``torch_<pid>_*``. Only those whose owner is dead are removed,
and a dead run's MPS daemon is told to quit first.
"""

from __future__ import annotations

import array
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from core.bank import shm_dir

RUN = re.compile(r"^cohort-(\d+)-[0-9a-f]{8}-")
HOST_COPY = re.compile(r"^cohort-\d+-[0-9a-f]{8}-h")  # host copies of a run (scheduler.host_copies)
KEEP_HOST_COPIES_ENV = "COHORT_KEEP_HOST_COPIES"  # set for a cluster's coordinators (scheduler.cluster)
TORCH_SHM = re.compile(r"^torch_(\d+)_")
CONTROL = "nvidia-cuda-mps-control"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _owner(name: str, pattern: re.Pattern[str]) -> int | None:
    match = pattern.match(name)
    return int(match.group(1)) if match else None


def stale(directory: Path, pattern: re.Pattern[str]) -> list[Path]:
    """Entries of ``directory`` named by ``pattern`` whose owning process is gone."""
    try:
        entries = list(directory.iterdir())
    except OSError:
        return []
    return [p for p in entries if (pid := _owner(p.name, pattern)) is not None and pid != os.getpid() and not alive(pid)]


def quit_daemon(pipe_dir: Path) -> None:
    """Ask a dead run's MPS control daemon to quit (it outlives the coordinator that started it)."""
    if not pipe_dir.is_dir() or shutil.which(CONTROL) is None:
        return
    try:
        subprocess.run([CONTROL], input="quit\n", env={**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(pipe_dir)},
                       capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        pass


def host_copies_whole(run_id: str, shm: Path | None = None) -> bool:
    """Whether dead run ``run_id`` left host copies of every model, none half written: its manifest, and
    a version (``scheduler.host_copies``, int64, -1 while a copy is being written) for every model."""
    directory = shm or shm_dir()
    try:
        versions = array.array("q", (directory / f"cohort-{run_id}-hversions").read_bytes())
    except (OSError, ValueError):
        return False
    return (directory / f"cohort-{run_id}-hmanifest").exists() and len(versions) > 0 and min(versions) >= 0


def remove_stale(temp_dir: Path | None = None, shm: Path | None = None, keep: str = "", run: str = "",
                 keep_host_copies: bool = False) -> list[str]:
    """Remove dead runs' directories (quitting their MPS daemons) and shared memory; what was removed.

    ``run``: only that run's. ``keep``: not the host copies of run ``keep`` (a restart restores from
    them). ``keep_host_copies``: no dead run's host copies (in a cluster, where each restarted
    coordinator adopts its own run's and removes them)."""
    def ours(name: str) -> bool:
        return not run or name.startswith(f"cohort-{run}-")

    def kept(name: str) -> bool:  # a host copy that a restart will adopt
        return (bool(keep) and name.startswith(f"cohort-{keep}-h")) or (keep_host_copies and HOST_COPY.match(name) is not None)

    removed = []
    for run_dir in [d for d in stale(temp_dir or Path(tempfile.gettempdir()), RUN) if ours(d.name)]:
        quit_daemon(run_dir / "mps-pipe")
        shutil.rmtree(run_dir, ignore_errors=True)
        removed.append(f"the run directory of a dead coordinator: {run_dir}")
    for pattern in (RUN, TORCH_SHM):
        found = [p for p in stale(shm or shm_dir(), pattern) if pattern is not RUN or (ours(p.name) and not kept(p.name))]
        for path in found:
            path.unlink(missing_ok=True)
        if found:
            removed.append(f"{len(found)} shared-memory file(s) of dead processes ({found[0].name}, ...)")
    return removed

"""The system tests' view of ``tools/harness.py``: start real coordinators, prove each one cleans up.

Everything that starts, stops and checks a coordinator lives in the harness; this
module adds what only tests want: a small MLP group, the test folder on the workers'
import path (``fixture_models``), and assertions instead of records.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools import harness  # noqa: E402
from tools.harness import (  # noqa: E402, F401 - re-exported for the tests
    Cohort,
    Leaks,
    StartFailed,
    Stopped,
    alive,
    config_text,
    kill_group,
    leftover_run_dirs,
    leftover_shm,
    toml_value,
)

RunningCohort = Cohort


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


def start_cohort(tmp_path: Path, groups: list[dict[str, Any]], *, name: str = "cohort",
                 wait_s: float = 90.0, **coordinator: Any) -> Cohort:
    """Start ``python -m scheduler run`` in ``tmp_path/name`` on a private ipc:// path; wait until it answers."""
    try:
        return harness.start(groups, coordinator, directory=tmp_path / name, pythonpath=[HERE],
                             ready_timeout_s=wait_s)
    except StartFailed as exc:
        raise AssertionError(f"{exc.reason}:\n{exc.log_tail}") from None


def stop_and_check_clean(running: Cohort, sig: int = signal.SIGINT) -> int | None:
    """Stop a coordinator with ``sig``; assert that it stopped in time and left no process,
    no shared-memory segment and no run directory. Returns its exit code."""
    try:
        running.worker_pids()  # the workers of now, restarted ones included
    except Exception:  # noqa: BLE001 - a coordinator that does not answer is stopped all the same
        pass
    stopped = running.stop(sig)
    assert not stopped.needed_sigkill, f"coordinator did not stop on {sig!r}:\n{running.log_tail()}"
    leaks = running.leaks()
    running.clean_up()
    assert leaks.processes_left == [], f"processes left behind: {leaks.processes_left}"
    assert leaks.shm_left == [], f"shared memory left behind: {leaks.shm_left}"
    assert leaks.run_dirs_left == [], f"run directories left behind: {leaks.run_dirs_left}"
    return stopped.exit_code


def started_by(tmp: Path) -> list[psutil.Process]:
    """Processes that inherited ``TMPDIR=tmp``: everything a command run with it started, at any depth."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.pid != os.getpid() and process.environ().get("TMPDIR") == str(tmp):
                found.append(process)
        except psutil.Error:
            continue
    return found

"""A coordinator killed with SIGKILL leaves its run directory, shared memory and MPS daemon;
the next start removes them, and only those whose owner is dead."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from scheduler.leftovers import remove_stale


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_only_a_dead_owners_leftovers_are_removed(tmp_path: Path) -> None:
    temp, shm = tmp_path / "tmp", tmp_path / "shm"
    temp.mkdir()
    shm.mkdir()
    dead, live = dead_pid(), os.getppid()
    dead_run = temp / f"cohort-{dead}-0123abcd-x1y2"
    (dead_run / "mps-pipe").mkdir(parents=True)
    (dead_run / "worker-0-1.sock").write_text("")
    live_run = temp / f"cohort-{live}-0123abcd-x1y2"
    live_run.mkdir()
    other = temp / "cohort-not-a-run"
    other.mkdir()
    for name in (f"cohort-{dead}-0123abcd-w0g1-mlp", f"cohort-{dead}-0123abcd-h0-mlp", f"torch_{dead}_7",
                 f"cohort-{live}-0123abcd-w0g1-mlp", f"torch_{live}_3", "torch_shm_unrelated"):
        (shm / name).write_bytes(b"x")
    removed = remove_stale(temp, shm)
    assert not dead_run.exists() and live_run.exists() and other.exists()
    assert sorted(p.name for p in shm.iterdir()) == sorted([f"cohort-{live}-0123abcd-w0g1-mlp", f"torch_{live}_3",
                                                             "torch_shm_unrelated"])
    assert any("run directory" in r for r in removed) and any("shared-memory" in r for r in removed)
    assert remove_stale(temp, shm) == []  # nothing left to remove


def test_own_leftovers_are_never_removed(tmp_path: Path) -> None:
    mine = tmp_path / f"cohort-{os.getpid()}-0123abcd-zz"
    mine.mkdir()
    remove_stale(tmp_path, tmp_path)
    assert mine.exists()


def test_host_copies_a_restart_will_adopt_are_kept(tmp_path: Path) -> None:
    """``keep``: one dead run's host copies stay for its restart; ``keep_host_copies`` (a cluster's
    coordinators): every dead run's do; ``run``: only that run's leftovers go (another coordinator
    on the node may be waiting for its own restart)."""
    temp, shm = tmp_path / "tmp", tmp_path / "shm"
    temp.mkdir()
    shm.mkdir()
    a, b = f"{dead_pid()}-0123abcd", f"{dead_pid()}-4567abcd"

    def leave() -> None:
        for run in (a, b):
            (temp / f"cohort-{run}-hzz1").mkdir(exist_ok=True)  # a run directory whose random part starts with h
            for name in ("h0-mlp", "hversions", "hmanifest", "w0g1-mlp"):
                (shm / f"cohort-{run}-{name}").write_bytes(b"x")

    def left() -> list[str]:
        return sorted(p.name for p in [*shm.iterdir(), *temp.iterdir()])

    leave()
    remove_stale(temp, shm, keep=a)
    assert left() == sorted(f"cohort-{a}-{n}" for n in ("h0-mlp", "hversions", "hmanifest"))
    leave()
    remove_stale(temp, shm, keep_host_copies=True)
    assert left() == sorted(f"cohort-{r}-{n}" for r in (a, b) for n in ("h0-mlp", "hversions", "hmanifest"))
    leave()
    remove_stale(temp, shm, run=a, keep=a)
    assert left() == sorted([*(f"cohort-{a}-{n}" for n in ("h0-mlp", "hversions", "hmanifest")),
                             *(f"cohort-{b}-{n}" for n in ("h0-mlp", "hversions", "hmanifest", "w0g1-mlp", "hzz1"))])

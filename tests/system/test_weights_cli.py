"""``cohort snapshot DIR`` and ``cohort load DIR`` against a real coordinator, and the writer behind them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from cohort_harness import ROOT, mlp_group
from safetensors.torch import load_file

from scheduler.snapshots import SnapshotWriter


def cohort_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "scheduler", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "120"})


def test_snapshot_then_load_puts_every_model_back(cohort, tmp_path: Path) -> None:
    running = cohort([mlp_group("a", 3, init={"seed": 1}), mlp_group("b", 2, init={"seed": 9})], workers=2)
    x, t = torch.randn(4, 8), torch.zeros(4, dtype=torch.int64)
    with running.client(timeout=30) as c:
        c.train_step("a/1", x, t)
        before = {m.id: c.get_weights(m.id) for m in c.models()}

        done = cohort_cli("snapshot", str(tmp_path / "ckpt"), "--address", running.address)
        assert done.returncode == 0, done.stderr
        assert "snapshot: 5 models" in done.stderr and str(tmp_path / "ckpt") in done.stderr
        for model_id, weights in before.items():
            group, index = model_id.split("/")
            saved = load_file(str(tmp_path / "ckpt" / group / f"{index}.safetensors"))
            assert saved.keys() == weights.keys()
            assert all(torch.equal(saved[n], weights[n]) for n in weights)
        assert c.stats()["snapshots"] == []  # finished and answered: nothing left in progress

        for model_id in before:
            c.set_weights(model_id, {n: torch.zeros_like(v) for n, v in before[model_id].items()})
        done = cohort_cli("load", str(tmp_path / "ckpt"), "--address", running.address)
        assert done.returncode == 0, done.stderr
        assert "load: 5 models" in done.stderr
        for model_id, weights in before.items():
            got = c.get_weights(model_id)
            assert all(torch.equal(got[n], weights[n]) for n in weights), model_id


def test_load_with_a_missing_file_loads_nothing(cohort, tmp_path: Path) -> None:
    running = cohort([mlp_group("a", 3, init={"seed": 1})])
    with running.client(timeout=30) as c:
        assert cohort_cli("snapshot", str(tmp_path / "ckpt"), "--address", running.address).returncode == 0
        (tmp_path / "ckpt" / "a" / "2.safetensors").unlink()
        zero = {n: torch.zeros_like(v) for n, v in c.get_weights("a/0").items()}
        c.set_weights("a/0", zero)
        done = cohort_cli("load", str(tmp_path / "ckpt"), "--address", running.address)
        assert done.returncode == 1
        assert "1 of 3 files missing" in done.stderr and "2.safetensors" in done.stderr
        assert all(torch.count_nonzero(v) == 0 for v in c.get_weights("a/0").values())  # untouched


def test_snapshot_to_an_unwritable_place_fails_cleanly(cohort, tmp_path: Path) -> None:
    running = cohort([mlp_group("a", 2)])
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    done = cohort_cli("snapshot", str(blocker / "ckpt"), "--address", running.address)
    assert done.returncode == 1 and "snapshot failed" in done.stderr and "JobFailed" in done.stderr
    with running.client(timeout=30) as c:  # the coordinator serves on
        assert c.infer("a/0", torch.randn(2, 8)).shape == (2, 4)
        assert c.stats()["snapshots"] == []


def test_writer_reports_progress_and_errors(tmp_path: Path) -> None:
    tensors = {"w": torch.ones(256, 256), "b": torch.zeros(256)}
    files = [(tmp_path / "g" / f"{k}.safetensors", tensors) for k in range(4)]
    writer = SnapshotWriter(tmp_path, files).start()
    assert writer.wait(30)
    progress = writer.progress()
    assert writer.error is None and progress["files_done"] == progress["files"] == 4
    assert progress["bytes_done"] == progress["bytes"] == 4 * (256 * 256 + 256) * 4
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == [f"{k}.safetensors" for k in range(4)]

    (tmp_path / "blocked").write_text("")
    failing = SnapshotWriter(tmp_path, [(tmp_path / "blocked" / "x" / "0.safetensors", tensors)]).start()
    assert failing.wait(30) and failing.error is not None and failing.done == 0

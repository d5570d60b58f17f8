"""A stand-in ``nvidia-cuda-mps-control`` for tests without a GPU: a shell script put first on PATH."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest


def install_control(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> Path:
    """Write ``script`` as ``nvidia-cuda-mps-control`` in ``tmp_path/bin``, first on PATH; the script's path."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    control = bin_dir / "nvidia-cuda-mps-control"
    control.write_text(script)
    control.chmod(control.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return control

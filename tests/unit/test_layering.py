"""The packages' layering (DESIGN section 2): ``core`` at the bottom imports neither side;
``scheduler`` (client and coordinator) and ``workers`` import ``core`` and never each other."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# package -> the first-party packages it may import
ALLOWED = {"core": {"core"}, "scheduler": {"core", "scheduler"}, "workers": {"core", "workers"}}


def imported_packages(path: Path) -> set[tuple[str, int]]:
    """Top-level first-party packages a module imports, with the line, at any depth in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {(name.split(".")[0], node.lineno) for name in names if name.split(".")[0] in ALLOWED}
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_no_import_breaks_the_layering(package: str) -> None:
    broken = [
        f"{path.relative_to(ROOT)}:{line} imports {imported}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for imported, line in imported_packages(path)
        if imported not in ALLOWED[package]
    ]
    assert broken == [], "\n".join(broken)


def test_the_walk_sees_a_forbidden_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from scheduler.client import Client\n    import workers.worker\n")
    assert imported_packages(module) == {("scheduler", 2), ("workers", 3)}


def test_a_worker_process_loads_no_client_library() -> None:
    code = ("import sys, workers.worker, workers.__main__; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'scheduler' or m in ('zmq.asyncio', 'zmq.auth')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

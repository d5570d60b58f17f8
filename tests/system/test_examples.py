"""The training examples end to end: ``examples/pbt.py`` and ``examples/sweep.py`` each start a
coordinator of their own, train, print their figures, and stop everything they started (also
on Ctrl-C): no process, no ``/dev/shm/cohort-<run>-*``, no run directory is left."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from cohort_harness import started_by

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples import pbt, sweep  # noqa: E402
from scheduler.config import parse_config  # noqa: E402
from tools.harness import leftover_run_dirs, leftover_shm  # noqa: E402

RUN_ID = re.compile(r"Coordinator at \S+ \(run ([\w-]+),")
RUN_TIMEOUT_S = 150


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """The examples' TMPDIR: short (ipc:// paths live in it), private (what they leave is theirs)."""
    path = Path(tempfile.mkdtemp(prefix="cex-"))
    yield path
    for process in started_by(path):  # never let a failed run leak into the next test
        process.kill()
    shutil.rmtree(path, ignore_errors=True)




def _ctrl_c_as_from_a_terminal() -> None:
    """The example started as a terminal starts it: a suite run in the background (``make test &``)
    ignores SIGINT, every child inherits that, and a Python started so never turns it into
    KeyboardInterrupt (it ran to the end: the test failed for the way it was run)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1", "COLUMNS": "160"}


def run_example(tmp: Path, script: str, *args: str) -> str:
    """Run an example to the end; its output (it must exit 0)."""
    command = [sys.executable, f"examples/{script}", *args]
    process = subprocess.Popen(command, cwd=ROOT, env=_env(tmp), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = process.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)  # the example unwinds and stops its coordinator
        output, _ = process.communicate(timeout=60)
        pytest.fail(f"{script} ran past {RUN_TIMEOUT_S} s:\n{output[-3000:]}")
    assert process.returncode == 0, output[-3000:]
    return output


def assert_nothing_left(tmp: Path, output: str) -> None:
    found = RUN_ID.search(output)
    assert found, f"no 'Coordinator at ... (run ID' line in:\n{output[-2000:]}"
    run_id = found[1]
    assert "Coordinator stopped" in output and "removed what it left" not in output, output[-2000:]
    assert leftover_shm(run_id) == []
    assert leftover_run_dirs(run_id, tmp) == []
    assert list(tmp.glob("cohort-example-*")) == []  # the config, log and socket directory
    left = started_by(tmp)
    assert left == [], [p.cmdline() for p in left]


@pytest.mark.timeout(RUN_TIMEOUT_S + 90)
def test_pbt_beats_the_same_population_trained_without_it(short_tmp: Path) -> None:
    output = run_example(short_tmp, "pbt.py", "--rounds", "300", "--population", "8", "--interval", "20",
                         "--seed", "0")
    assert_nothing_left(short_tmp, output)
    figures = pbt.parse_summary(output)
    assert set(figures) == {"PBT", "baseline"}, output[-3000:]
    with_pbt, without = figures["PBT"], figures["baseline"]
    # The population: every PBT model ends near the best learning rate's accuracy; without
    # PBT the badly drawn learning rates stay bad.
    assert with_pbt["mean_acc"] >= without["mean_acc"] + 0.05, figures
    # The model one would keep (lowest validation loss) is at least as good on the test split.
    assert with_pbt["best_acc"] >= without["best_acc"], figures
    assert "PBT over the baseline:" in output and "PBT replaced" in output


@pytest.mark.timeout(RUN_TIMEOUT_S + 90)
def test_sweep_prints_the_best_learning_rate(short_tmp: Path) -> None:
    output = run_example(short_tmp, "sweep.py", "--steps", "150", "--models", "8")
    assert_nothing_left(short_tmp, output)
    found = re.search(r"Best learning rate: ([\d.e-]+) \(sweep/(\d)\): validation loss ([\d.]+), "
                      r"test accuracy ([\d.]+)%.* step (\d+)", output)
    assert found, output[-3000:]
    lr, index, accuracy, steps = float(found[1]), int(found[2]), float(found[4]), int(found[5])
    lrs = sweep.sweep_lrs(8)
    assert lr == pytest.approx(lrs[index], rel=1e-2)
    assert 0 < index < 7, "the best lr should lie inside the swept range, not at an end"
    assert accuracy > 90 and steps == 150


@pytest.mark.timeout(120)
def test_ctrl_c_stops_the_examples_coordinator(short_tmp: Path) -> None:
    process = subprocess.Popen([sys.executable, "examples/pbt.py"], cwd=ROOT, env=_env(short_tmp),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               preexec_fn=_ctrl_c_as_from_a_terminal)
    lines: list[str] = []
    try:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if RUN_ID.search(line):
                break
        time.sleep(1.0)  # into the training
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    output = "".join(lines) + rest
    assert process.returncode == 130, output[-2000:]
    assert "Interrupted." in output
    assert_nothing_left(short_tmp, output)


@pytest.mark.parametrize(("path", "groups"), [
    ("examples/pbt.toml", [pbt.group(pbt.PBT, 16), pbt.group(pbt.BASELINE, 16)]),
    ("examples/sweep.toml", [sweep.group(8, 500)]),
])
def test_shipped_configs_hold_the_groups_the_examples_start(path: str, groups: list[dict]) -> None:
    """``--address`` runs against ``python -m scheduler run --config examples/*.toml``: the same
    groups as an example's own coordinator with its default settings."""
    shipped = parse_config(tomllib.loads((ROOT / path).read_text()))
    made = parse_config({"group": groups})
    assert shipped.groups == made.groups

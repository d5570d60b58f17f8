"""tools/harness.py itself: the TOML it writes, and a started tree leaving nothing after stop.

The TOML tests start no process; the others start real coordinators and end them the
ways the tests, the soak and the benchmark do: SIGINT, SIGKILL of the coordinator alone,
and a coordinator (and a worker) that cannot act on any signal.
"""

from __future__ import annotations

import math
import os
import signal
import time
import tomllib
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from cohort_harness import HERE, mlp_group
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.config import parse_config
from tools import harness
from tools.harness import StartFailed, TomlError, config_text, toml_document, toml_value

NASTY = [
    "",
    'a "quoted" word',
    "back\\slash and \\n not a newline",
    "C:\\Users\\x\\",
    "\\",
    '"',
    "'single' and '''triple'''",
    '"""',
    "line\nbreak\r\ncarriage\ttab\fform\bback",
    "\x00\x01\x1f\x7f",
    "caf\u00e9 \u4e2d\u6587 \u00df \u2603",
    "\U0001F600 emoji beyond the BMP",
    "\u202e right-to-left override",
    "\\u0041 written out, not an escape",
    "# not a comment",
    "key = value",
    "[not.a.table]",
    "ipc:///tmp/x y/coordinator.sock",
]


@pytest.mark.parametrize("text", NASTY)
def test_nasty_strings_round_trip(text: str) -> None:
    rendered = toml_value(text)
    assert rendered.isascii()
    assert tomllib.loads(f"k = {rendered}") == {"k": text}


def test_nasty_keys_nested_tables_lists_and_bools_round_trip() -> None:
    document = {
        "title": "top-level keys come before the tables",
        "coordinator": {
            "address": "ipc:///tmp/a \"b\"/c.sock",
            "workers": 2,
            "snapshot_interval_s": 0.5,
            "weird key": True,
            "dotted.key": False,
            "quoted \"key\"": 1,
            "caf\u00e9": -3,
            "": "empty key",
            "big": 2**63 - 1,
            "small": -(2**63),
            "tiny": 5e-324,
            "huge": 1.7976931348623157e308,
            "negative_zero": -0.0,
        },
        "group": [
            {"name": "a", "kwargs": {"inner": {"deeper": {"deepest": [1, [2, [3, []]]]}}, "empty": {}},
             "optimizer": {"name": "sgd", "lr": [0.1, 0.05, 1e-3]}, "flags": [True, False]},
            {"name": "b\\\"", "input": {"shape": [-1, 3, 32, 32], "dtype": "float32"}, "mixed": [1, "two", 3.0]},
        ],
    }
    text = toml_document(document)
    assert text.isascii()
    assert tomllib.loads(text) == document


def test_paths_and_tuples_are_written_as_strings_and_lists(tmp_path: Path) -> None:
    parsed = tomllib.loads(f"p = {toml_value(tmp_path / 'a b')}\nt = {toml_value((1, 2))}")
    assert parsed == {"p": str(tmp_path / "a b"), "t": [1, 2]}


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_infinity_are_refused_naming_the_key(bad: float) -> None:
    with pytest.raises(TomlError, match=r"group\[0\]\.optimizer\.lr\[1\].*NaN or infinity"):
        config_text({"workers": 1}, [{"name": "g", "optimizer": {"lr": [0.1, bad]}}])
    with pytest.raises(ValueError):
        toml_value(bad)


@pytest.mark.parametrize(("value", "error"), [
    (None, TomlError), (2**63, TomlError), (-(2**63) - 1, TomlError), ("\ud800", TomlError),
    (object(), TypeError), ({1: "x"}, TypeError), (b"bytes", TypeError),
])
def test_values_toml_cannot_hold_are_refused(value: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        toml_value(value)


_scalars = (st.booleans() | st.integers(min_value=-(2**63), max_value=2**63 - 1)
            | st.floats(allow_nan=False, allow_infinity=False) | st.text())
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=8), _values, max_size=6))
def test_any_value_round_trips(table: dict[str, Any]) -> None:
    assert tomllib.loads(toml_document({"t": table})) == {"t": table}


def test_config_text_is_accepted_by_cohort() -> None:
    snapshots = 'C:\\snap "shots"\\caf\u00e9'
    text = config_text({"address": "ipc:///tmp/x/c.sock", "workers": 2, "device": "cpu", "mps": "off",
                        "snapshot_dir": snapshots},
                       [mlp_group("a", 2), mlp_group("b", 3, optimizer={"name": "sgd", "lr": [0.1, 0.2, 0.3]})])
    config = parse_config(tomllib.loads(text))
    assert [g.name for g in config.groups] == ["a", "b"]
    assert config.coordinator.workers == 2 and config.coordinator.snapshot_dir == snapshots
    assert config.groups[1].hparams["lr"] == [0.1, 0.2, 0.3]


# ---------------------------------------------------------------------- a real tree


def _start(tmp_path: Path, **settings: Any) -> harness.Cohort:
    return harness.start([mlp_group("m", 4)], {"workers": 2, **settings}, directory=tmp_path / "c",
                         pythonpath=[HERE])


def _tree(cohort: harness.Cohort) -> dict[int, float]:
    """The coordinator and its workers, each with its start time."""
    pids = [cohort.process.pid, *cohort.worker_pids()]
    return {pid: psutil.Process(pid).create_time() for pid in pids}


def _nothing_left(cohort: harness.Cohort, tree: dict[int, float]) -> None:
    assert harness.alive(tree) == []
    assert harness.leftover_shm(cohort.run_id) == []
    assert harness.leftover_run_dirs(cohort.run_id, cohort.temp_dir) == []


def test_sigint_stops_the_tree_cleanly_and_a_private_directory_goes_too() -> None:
    cohort = harness.start([mlp_group("m", 4)], {"workers": 2}, prefix="cohort-harness-test-",
                           pythonpath=[HERE])
    with cohort.client(timeout=30) as c:
        c.train_step("m/1", torch.randn(4, 8), torch.zeros(4, dtype=torch.int64))
    tree = _tree(cohort)
    assert len(tree) == 3 and cohort.run_id
    assert harness.leftover_shm(cohort.run_id), "the workers' banks should be in shared memory while it runs"
    leaks = cohort.close()
    stopped = cohort.stopped
    assert stopped is not None and stopped.was_running and stopped.exit_code == 0 and not stopped.needed_sigkill
    assert leaks.checked and leaks.clean and leaks.pids_seen >= 3, leaks
    _nothing_left(cohort, tree)
    assert not cohort.directory.exists()
    assert cohort.close() == leaks  # a second close changes nothing


@pytest.mark.alone
def test_after_a_sigkill_of_the_coordinator_nothing_is_left(tmp_path: Path) -> None:
    cohort = _start(tmp_path)
    tree = _tree(cohort)
    os.kill(cohort.process.pid, signal.SIGKILL)
    cohort.process.wait(10)
    leaks = cohort.close()
    stopped = cohort.stopped
    assert stopped is not None and not stopped.was_running and stopped.exit_code == -signal.SIGKILL
    # The workers go by themselves (their parent died); what the coordinator could not remove
    # (its run directory, maybe segments) was counted, then removed by the harness.
    assert leaks.processes_left == [], leaks
    assert leaks.run_dirs_left, "a SIGKILLed coordinator cannot remove its run directory"
    _nothing_left(cohort, tree)
    assert (tmp_path / "c" / "coordinator.log").exists()  # a directory the caller gave is kept


def test_a_tree_that_ignores_every_signal_is_killed(tmp_path: Path) -> None:
    """A stopped (SIGSTOP) coordinator and worker cannot act on SIGINT or their parent's death:
    the harness SIGKILLs the coordinator's group after the grace, then the worker, and says so."""
    cohort = _start(tmp_path)
    tree = _tree(cohort)
    frozen_worker = cohort.worker_pids()[0]
    os.kill(frozen_worker, signal.SIGSTOP)
    os.kill(cohort.process.pid, signal.SIGSTOP)
    began = time.monotonic()
    stopped = cohort.stop(grace_s=1.0, wait_s=5.0)
    assert time.monotonic() - began < 30
    assert stopped.was_running and stopped.needed_sigkill and stopped.exit_code == -signal.SIGKILL
    assert frozen_worker in stopped.processes_left  # counted as left, then killed
    assert harness.alive(tree) == []
    cohort.close()
    _nothing_left(cohort, tree)


def test_a_coordinator_that_fails_at_start_up_says_why_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(StartFailed, match="exited with code 2") as failed:
        harness.start([mlp_group("m", 2, factory="examples.models:nope")], directory=tmp_path / "bad")
    assert "ConfigError" in failed.value.log_tail and "factory" in str(failed.value)
    assert not any("scheduler" in " ".join(p.cmdline()) and str(tmp_path) in " ".join(p.cmdline())
                   for p in psutil.process_iter() if p.pid != os.getpid() and _readable(p))


def _readable(process: psutil.Process) -> bool:
    try:
        process.cmdline()
        return True
    except psutil.Error:
        return False


def test_an_ipc_path_too_long_for_a_socket_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ipc:// path longer"):
        harness.start([mlp_group("m", 1)], directory=tmp_path / ("x" * 120))

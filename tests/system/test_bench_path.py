"""``tools/bench_path.py``'s bulk-tensor part end to end, on a real coordinator: cohort's result is
checked against the model's own before anything is timed, and every figure is there."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.bench_path import bulk_tensors  # noqa: E402

MODES = ("shared_memory", "shared_input", "unix_socket", "sockets")


@pytest.mark.timeout(180)
def test_bulk_tensors_checks_results_and_writes_every_figure() -> None:
    figures = bulk_tensors(repeats=3)

    assert figures["bytes_each_way"] == 16 * 2**20
    for name in ("memcpy_ms", "torch_copy_ms", "model_pass_ms"):
        assert figures[name] > 0, name
    for mode in MODES:
        took = figures[f"{mode}_round_trip_ms"]
        assert took > 0, mode
        for floor in ("memcpy", "torch_copy"):
            assert 0 < figures[f"{mode}_over_{floor}"] < math.inf, (mode, floor)
            path = figures[f"{mode}_path_over_{floor}"]
            # The path's own part leaves the model's pass out, so it is never slower than the whole trip.
            assert path is None or path >= figures[f"{mode}_over_{floor}"], (mode, floor)


@pytest.mark.timeout(240)
def test_bench_warm_times_the_handler_both_ways_and_leaves_nothing_behind(tmp_path: Path) -> None:
    import json
    import os
    import tempfile

    from tools.bench_warm import main

    before = {name for name in os.listdir(tempfile.gettempdir()) if name.startswith("cohort-warm-")}
    out = tmp_path / "warm.json"
    assert main(["--calls", "150", "--out", str(out)]) == 0
    report = json.loads(out.read_text())

    assert report["calls"] == 150
    assert report["on_submit_in_loop_p50_us"] > 0 and report["on_submit_warm_us"] > 0
    assert report["cold_over_warm"] == pytest.approx(report["on_submit_in_loop_p50_us"] / report["on_submit_warm_us"], rel=0.05)
    assert report["p50_us_loop_sleeping"] > 0 and report["p50_us_loop_spinning"] > 0
    after = {name for name in os.listdir(tempfile.gettempdir()) if name.startswith("cohort-warm-")}
    assert after == before  # its socket's directory is gone


@pytest.mark.timeout(120)
def test_both_relays_echo_and_leave_no_process() -> None:
    import multiprocessing

    from tools.bench_relay import relay_round_trips, unix_relay_round_trips

    for relay in (unix_relay_round_trips, relay_round_trips):
        took = relay(50, 5, 30.0, payload=b"x" * 300)
        assert len(took) == 50 and all(t > 0 for t in took), relay.__name__
    assert multiprocessing.active_children() == []

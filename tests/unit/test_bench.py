"""Unit tests for the pure pieces of tools/bench.py: no coordinator, no child processes.

The end-to-end run of ``tools/bench.py --quick`` is tests/system/test_bench_quick.py.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import random
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scheduler.config import parse_config  # noqa: E402
from scheduler.stats import percentile as stats_percentile  # noqa: E402
from tests.unit.fake_mps import install_control  # noqa: E402
from tools import bench  # noqa: E402
from tools.bench_baselines import (  # noqa: E402
    process_context,
    process_count,
    processes_under_mps,
    run_processes,
    shards,
)
from tools.bench_cohort import SHARED_MODE, Pipeline, _run_one, bytes_sent, group_table, step_jobs  # noqa: E402
from tools.bench_control import control_ratios, merge_control_runs, pipelined, round_trips  # noqa: E402
from tools.bench_measure import MIN_STEPS, best_of, latency_ms, measure_steps, ok, skipped  # noqa: E402
from tools.bench_report import (  # noqa: E402
    add_model_steps,
    add_ratios,
    device_label,
    render_markdown,
    write_plot,
)
from tools.bench_vmap import StackedEnsemble  # noqa: E402
from tools.bench_workloads import all_workloads, build_models, make_batches, make_optimizer, select  # noqa: E402
from tools.harness import config_text, toml_value  # noqa: E402

# ---------------------------------------------------------------------- percentiles


def test_latencies_use_the_coordinators_percentile() -> None:
    """One percentile for the whole project: scheduler.stats's (nearest rank), as stats() reports."""
    rng = random.Random(0)
    for size in (1, 2, 3, 10, 101):
        values = [rng.uniform(0, 1) for _ in range(size)]
        for q in (0.0, 0.5, 0.9, 0.99, 1.0):
            assert latency_ms(values, q) == stats_percentile(sorted(values), q) * 1e3
    assert math.isnan(latency_ms([], 0.5))  # nothing measured: no figure (null in the JSON)
    assert latency_ms([0.004, 0.001, 0.003, 0.002], 0.5) in (2.0, 3.0)  # unsorted input, a measured value
    assert latency_ms([0.001, 0.002], 1.0) == 2.0


def test_no_tool_defines_a_percentile_of_its_own() -> None:
    own = [path.name for path in sorted((ROOT / "tools").glob("*.py")) if "def percentile(" in path.read_text()]
    assert own == []


def test_ok_reports_latencies_in_milliseconds() -> None:
    result = ok(100.0, "samples/s", [0.001, 0.002, 0.003], wall_s=0.006, processes=2)
    assert result["p50_ms"] == pytest.approx(2.0)
    assert result["p99_ms"] == pytest.approx(3.0)
    assert result["steps"] == 3
    assert result["processes"] == 2


# ---------------------------------------------------------------------- ratios


def _modes() -> dict[str, Any]:
    return {
        "sequential": ok(100.0, "samples/s", [0.01], 1.0),
        "processes": ok(250.0, "samples/s", [0.01], 1.0),
        "processes_mps": skipped("no GPU"),
        "vmap": ok(400.0, "samples/s", [0.01], 1.0),
        "cohort_fused": ok(300.0, "samples/s", [0.01], 1.0),
        "cohort_per_model": {"status": "error", "reason": "RuntimeError: boom"},
    }


def test_add_ratios_divides_by_sequential_and_vmap() -> None:
    modes = _modes()
    add_ratios(modes)
    assert modes["sequential"]["vs_sequential"] == 1.0
    assert modes["processes"]["vs_sequential"] == pytest.approx(2.5)
    assert modes["cohort_fused"]["vs_sequential"] == pytest.approx(3.0)
    assert modes["cohort_fused"]["vs_vmap"] == pytest.approx(0.75)
    assert modes["vmap"]["vs_vmap"] == 1.0
    assert "vs_sequential" not in modes["processes_mps"]
    assert "vs_sequential" not in modes["cohort_per_model"]


def test_add_ratios_without_a_baseline_gives_none() -> None:
    modes = {"sequential": {"status": "error", "reason": "x"}, "cohort_fused": ok(300.0, "samples/s", [0.01], 1.0)}
    add_ratios(modes)
    assert modes["cohort_fused"]["vs_sequential"] is None
    assert modes["cohort_fused"]["vs_vmap"] is None


def _system(p50_ms: float, jobs_s: float) -> dict[str, Any]:
    return {"status": "ok", "p50_ms": p50_ms, "p99_ms": 2 * p50_ms, "jobs_s": jobs_s}


def test_control_ratios_and_goals() -> None:
    met = control_ratios({"cohort": _system(0.12, 9000), "zmq_echo": _system(0.1, 20000), "process_pool": _system(0.2, 5000)})
    assert met["cohort_p50_over_echo_p50"] == pytest.approx(1.2)
    assert met["latency_goal_met"] is True
    assert met["cohort_jobs_s_over_pool_jobs_s"] == pytest.approx(1.8)
    assert met["throughput_goal_met"] is True
    missed = control_ratios({"cohort": _system(0.6, 4000), "zmq_echo": _system(0.1, 20000), "process_pool": _system(0.2, 8000)})
    assert missed["latency_goal_met"] is False
    assert missed["throughput_goal_met"] is False
    broken = control_ratios({"cohort": {"status": "error", "reason": "x"}, "zmq_echo": _system(0.1, 1.0)})
    assert broken["cohort_p50_over_echo_p50"] is None and broken["latency_goal_met"] is None
    assert broken["cohort_jobs_s_over_pool_jobs_s"] is None


def test_best_of_keeps_the_fastest_repeat_and_every_figure() -> None:
    runs = [ok(100.0, "samples/s", [0.02], 1.0), {"status": "error", "reason": "x"}, ok(300.0, "samples/s", [0.01], 1.0)]
    best = best_of(runs)
    assert best["throughput"] == 300.0 and best["p50_ms"] == pytest.approx(10.0)
    assert best["repeats"] == [100.0, "error", 300.0]
    assert "repeats" not in best_of(runs[:1])
    assert best_of([skipped("no GPU"), skipped("no GPU")]) == skipped("no GPU")


def test_repeated_workloads_merge_then_ratios() -> None:
    def run(sequential: float, fused: float) -> list[dict[str, Any]]:
        modes = {"sequential": ok(sequential, "samples/s", [0.01], 1.0), "cohort_fused": ok(fused, "samples/s", [0.01], 1.0)}
        return [{"name": "w", "count": 2, "modes": modes}]

    [merged] = bench.merge_workload_runs([run(100.0, 500.0), run(200.0, 300.0)])
    assert merged["modes"]["sequential"]["throughput"] == 200.0
    assert merged["modes"]["cohort_fused"]["throughput"] == 500.0
    assert merged["modes"]["cohort_fused"]["vs_sequential"] == pytest.approx(2.5)


def test_control_plane_repeats_keep_each_best_figure() -> None:
    def run(p50: float, jobs: float) -> dict[str, Any]:
        systems = {name: {**_system(p50, jobs), "pipelined_jobs": 10} for name in ("cohort", "zmq_echo", "process_pool")}
        return {"payload_bytes": 64, "window": 8, "systems": systems, "ratios": control_ratios(systems)}

    merged = merge_control_runs([run(0.5, 1000.0), run(0.3, 800.0)])
    cohort = merged["systems"]["cohort"]
    assert cohort["p50_ms"] == 0.3 and cohort["p99_ms"] == 0.6 and cohort["jobs_s"] == 1000.0
    assert cohort["repeats"] == [{"p50_ms": 0.5, "jobs_s": 1000.0}, {"p50_ms": 0.3, "jobs_s": 800.0}]
    assert merged["ratios"]["cohort_p50_over_echo_p50"] == pytest.approx(1.0)


# ---------------------------------------------------------------------- markdown


def _report(gpu_metrics: bool = False) -> dict[str, Any]:
    modes = _modes()
    add_ratios(modes)
    if gpu_metrics:
        modes["vmap"]["gpu"] = {"mean_util_pct": 87.5, "peak_memory_mib": 1234.0, "samples": 10}
    systems = {"cohort": _system(0.5, 4000), "zmq_echo": _system(0.1, 20000), "process_pool": _system(0.2, 8000)}
    return {
        "date": "2026-11-24",
        "device": "cpu",
        "quick": False,
        "command": "python tools/bench.py --out docs/bench/x.json",
        "machine": {"cpu_model": "Test CPU", "cores": 2, "ram_gib": 8.0},
        "gpu": None,
        "versions": {"cohort": "0.1.0", "torch": "2.13.0", "python": "3.11.7", "pyzmq": "27", "libzmq": "4.3.5"},
        "environment": {"OMP_WAIT_POLICY": "PASSIVE", "torch_threads": 2, "load_average_at_start": [0.5, 0, 0]},
        "workloads": [{"name": "w1_mlp_infer", "task": "infer", "batch": 64, "count": 32, "modes": modes}],
        "control_plane": {"payload_bytes": 64, "window": 64, "systems": systems, "ratios": control_ratios(systems)},
    }


def test_markdown_has_the_command_every_mode_and_the_control_plane() -> None:
    text = render_markdown(_report())
    assert "`python tools/bench.py --out docs/bench/x.json`" in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    for mode in _modes():
        assert any(f"| {mode} |" in row for row in rows), mode
    assert "| w1_mlp_infer (infer, batch 64) | 32 | sequential | 100.0 samples/s |" in text
    assert "| 2.50× |" in text  # processes over sequential
    assert "skipped: no GPU" in text
    assert "error: RuntimeError: boom" in text
    assert "GPU util" not in text  # no GPU figures, no GPU column
    assert "| cohort p50 / echo p50 | 5.00 | ≤ 1.5 | no |" in text
    assert "| cohort jobs/s / pool jobs/s | 0.50 | ≥ 1.5 | no |" in text
    assert "OMP_WAIT_POLICY=PASSIVE" in text
    assert "best of" not in text
    assert "each figure the best of 3 runs" in render_markdown({**_report(), "repeat": 3})


def test_markdown_tables_have_consistent_columns() -> None:
    for gpu in (False, True):
        text = render_markdown(_report(gpu_metrics=gpu))
        tables: list[list[str]] = []
        for line in text.splitlines():
            if line.startswith("|"):
                if not tables or not tables[-1]:
                    tables.append([])
                tables[-1].append(line)
            elif tables and tables[-1]:
                tables.append([])
        for table in (t for t in tables if t):
            widths = {row.count("|") for row in table}
            assert len(widths) == 1, table


def test_markdown_gpu_column_when_measured() -> None:
    text = render_markdown(_report(gpu_metrics=True))
    assert "GPU util % / peak MiB" in text
    assert "87.5 / 1,234 |" in text


def test_plot_is_written_or_skipped_with_a_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "plot.png"
    if importlib.util.find_spec("matplotlib") is not None:
        assert write_plot(_report(), path) == {"status": "ok", "path": str(path)}
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import now raises ImportError
    missing = write_plot(_report(), tmp_path / "none.png")
    assert missing["status"] == "skipped" and "matplotlib" in missing["reason"]
    assert not (tmp_path / "none.png").exists()


def test_clean_makes_json_safe() -> None:
    assert bench.clean({"a": math.nan, "b": [math.inf, 1.5], "c": (1, "x")}) == {"a": None, "b": [None, 1.5], "c": [1, "x"]}


def test_device_label() -> None:
    assert device_label("cpu", None) == "cpu"
    assert device_label("cuda", {"gpu_name": "NVIDIA H100 80GB HBM3"}) == "nvidia-h100-80gb-hbm3"


# ---------------------------------------------------------------------- command line


def test_command_line_choices() -> None:
    args = bench.parse_args(["--quick", "--workload", "w1_mlp_infer", "control_plane", "--mode", "vmap", "--mode", "cohort_fused"])
    assert args.quick and args.workload == ["w1_mlp_infer", "control_plane"]
    assert args.mode == ["vmap", "cohort_fused"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--workload", "nope"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--mode", "nope"])
    assert bench.parse_args(["--quick"]).repeat == 1 and bench.parse_args([]).repeat == bench.FULL_REPEAT
    assert bench.parse_args(["--repeat", "3"]).repeat == 3
    with pytest.raises(SystemExit):
        bench.parse_args(["--repeat", "0"])


def test_every_workload_name_is_selectable() -> None:
    for quick in (True, False):
        assert set(all_workloads(quick)) | {"load_curve"} == set(bench.WORKLOADS)  # load_curve: tools/bench_load.py
    full = {w.name: w for w in select(None, quick=False)}
    assert full["w1_mlp_infer"].count == 32 and full["w1_mlp_infer"].batch == 64
    assert [full[f"w1_scaling_k{k}"].count for k in (8, 32, 128)] == [8, 32, 128]
    assert full["w2_cnn_train"].count == 16 and full["w2_cnn_train"].input_shape == (3, 32, 32)
    assert full["w3_transformer_train"].count == 8
    sweep = full["w4_sweep_train"]
    assert (sweep.count, sweep.batch, sweep.input_shape, sweep.task, sweep.shared) == (16, 128, (3, 32, 32), "train", True)
    assert sweep.factory == "examples.models:cnn"
    small = select(["w4_sweep_train"], quick=True)[0]
    assert small.shared and small.count < sweep.count and small.batch < sweep.batch
    assert [w.name for w in full.values() if getattr(w, "shared", False)] == ["w4_sweep_train"]
    with pytest.raises(ValueError):
        select(["nope"], quick=True)


# ---------------------------------------------------------------------- config for cohort


def test_toml_values_round_trip() -> None:
    value = {"s": 'a "quoted" path\\x', "i": 3, "f": 1e-3, "b": True, "l": [-1, 64], "d": {"name": "adam", "lr": 0.5}}
    parsed = tomllib.loads("\n".join(f"{k} = {toml_value(v)}" for k, v in value.items()))
    assert parsed == value
    with pytest.raises(ValueError):
        toml_value(math.nan)


@pytest.mark.parametrize("name", ["w1_mlp_infer", "w2_cnn_train", "w3_transformer_train", "w1_scaling", "w4_sweep_train"])
def test_generated_config_is_accepted_by_cohort(name: str) -> None:
    workloads = select([name], quick=True)
    text = config_text(
        {"address": "ipc:///tmp/x/coordinator.sock", "workers": 1, "device": "cpu", "mps": "off"},
        [group_table(w.name, w) for w in workloads],
    )
    config = parse_config(tomllib.loads(text))
    assert [g.name for g in config.groups] == [w.name for w in workloads]
    for group, workload in zip(config.groups, workloads):
        assert group.count == workload.count
        assert group.factory == workload.factory
        assert group.optimizer == workload.optimizer["name"]
        assert group.hparams["lr"] == [workload.optimizer["lr"]] * workload.count


# ---------------------------------------------------------------------- measuring


def test_measure_steps_stops_at_the_budget_but_not_below_min_steps() -> None:
    assert len(measure_steps(lambda i: None, 7, "cpu")) == 7
    slow = measure_steps(lambda i: time.sleep(0.01), 1000, "cpu", budget_s=0.0)
    assert len(slow) == MIN_STEPS
    assert all(d >= 0.009 for d in slow)
    timed = measure_steps(lambda i: time.sleep(0.005), 1000, "cpu", budget_s=0.1)
    assert MIN_STEPS <= len(timed) < 100


def test_round_trips_and_pipelined_window() -> None:
    calls: list[int] = []
    durations = round_trips(lambda: calls.append(1), count=50, warmup=5, budget_s=10.0)
    assert len(durations) == 50 and len(calls) == 55

    in_flight, peak = 0, 0

    def job() -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        time.sleep(0.001)
        in_flight -= 1

    with ThreadPoolExecutor(max_workers=16) as pool:
        jobs, seconds = pipelined(lambda: pool.submit(job), count=200, window=4, budget_s=10.0)
    assert jobs == 200 and seconds > 0
    assert 1 <= peak <= 4


def test_pipelined_raises_a_failing_job() -> None:
    def fail() -> None:
        raise RuntimeError("job failed")

    with ThreadPoolExecutor(max_workers=2) as pool, pytest.raises(RuntimeError, match="job failed"):
        pipelined(lambda: pool.submit(fail), count=20, window=2, budget_s=10.0)


def test_shards_cover_every_model_once() -> None:
    for count in (1, 7, 32, 128):
        for parts in range(1, min(count, 8) + 1):
            pieces = shards(count, parts)
            assert len(pieces) == parts
            assert sum(pieces, []) == list(range(count))
            assert max(map(len, pieces)) - min(map(len, pieces)) <= 1
    workload = select(["w1_mlp_infer"], quick=True)[0]
    assert 1 <= process_count(workload, "cpu") <= workload.count


# ---------------------------------------------------------------------- the vmap reference


@pytest.mark.parametrize(
    ("name", "optimizer"),
    [
        ("w2_cnn_train", {"name": "sgd", "lr": 0.01}),
        ("w2_cnn_train", {"name": "adam", "lr": 1e-3}),
        # Not Adam here: attention's key bias has a zero gradient, which Adam turns into
        # +-lr steps of rounding noise that no two implementations agree on.
        ("w3_transformer_train", {"name": "sgd", "lr": 0.05}),
    ],
)
def test_vmap_reference_steps_exactly_as_torch_optim(name: str, optimizer: dict[str, Any]) -> None:
    """The stacked optimizer must take the same steps as K separate torch.optim optimizers."""
    workload = dataclasses.replace(select([name], quick=True)[0], optimizer=optimizer)
    ensemble = StackedEnsemble(workload, "cpu")
    models = build_models(workload, range(workload.count), "cpu")
    optimizers = [make_optimizer(workload, m) for m in models]
    loss_fn = ensemble.loss
    for batch in make_batches(workload, "cpu", count=2):
        losses = ensemble.train(batch).detach()
        for k, (model, optimizer) in enumerate(zip(models, optimizers)):
            optimizer.zero_grad()
            loss = loss_fn(model(batch.xs[k]), batch.ts[k])
            loss.backward()
            optimizer.step()
            assert float(losses[k]) == pytest.approx(float(loss), rel=1e-4, abs=1e-5)
    for k, model in enumerate(models):
        for pname, param in model.named_parameters():
            torch.testing.assert_close(ensemble.params[pname][k], param.detach(), rtol=1e-4, atol=1e-5)


def test_vmap_reference_inference_matches_the_models() -> None:
    workload = select(["w1_mlp_infer"], quick=True)[0]
    batch = make_batches(workload, "cpu", count=1)[0]
    got = StackedEnsemble(workload, "cpu").infer(batch)
    with torch.no_grad():
        expected = torch.stack([m(batch.x) for m in build_models(workload, range(workload.count), "cpu")])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_markdown_lists_the_compiled_groups_check_too() -> None:
    report = _report()
    check = {"compared": "ensemble outputs", "against": "plain PyTorch, same seeds", "max_abs_diff": 0.0, "ok": True}
    modes = report["workloads"][0]["modes"]
    modes["cohort_fused"] = {**modes["cohort_fused"], "check": check}
    modes["cohort_fused_compiled"] = {**modes["cohort_fused"], "check": {**check, "max_abs_diff": 2e-6}}
    text = render_markdown(report)
    assert "w1_mlp_infer: cohort's ensemble outputs match plain PyTorch, same seeds (max abs diff 0.0e+00)." in text
    assert "w1_mlp_infer: cohort's compiled group's ensemble outputs match" in text and "2.0e-06" in text


# ---------------------------------------------------------------------- processes under MPS

# Stand-in for nvidia-cuda-mps-control: "-d" makes the control pipe; "get_client_list"
# names every process whose start-up environment holds this daemon's pipe directory,
# which is what makes a CUDA process a client of the real daemon.
FAKE_MPS_CONTROL = r"""#!/bin/sh
if [ "$1" = "-d" ]; then : > "$CUDA_MPS_PIPE_DIRECTORY/control"; exit 0; fi
read -r command argument
case "$command" in
  get_server_list) echo 4242 ;;
  get_client_list)
    for environ in /proc/[0-9]*/environ; do
      if tr '\0' '\n' < "$environ" 2>/dev/null | grep -qxF "CUDA_MPS_PIPE_DIRECTORY=$CUDA_MPS_PIPE_DIRECTORY"; then
        pid=${environ#/proc/}
        echo "${pid%/environ}"
      fi
    done ;;
esac
exit 0
"""


@pytest.fixture
def fake_mps_control(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stand-in first on PATH: bench_mps.mps_daemon starts it, with private (fake) directories."""
    install_control(tmp_path, monkeypatch, FAKE_MPS_CONTROL)


@pytest.mark.timeout(300)
def test_processes_mps_children_start_with_the_daemons_variables(fake_mps_control: None) -> None:
    """The MPS mode's processes must be started after the daemon, with its variables: the
    forkserver that the ``processes`` mode started earlier hands its children its own
    environment, without them, so they would not be MPS clients (the bug this pins)."""
    workload = dataclasses.replace(select(["w1_mlp_infer"], quick=True)[0], count=2, warmup=1, steps=3, budget_s=0.05)
    assert run_processes(workload, "cpu")["status"] == "ok"  # as in a benchmark run: the forkserver starts here

    result = processes_under_mps(workload, "cpu")
    assert result["status"] == "ok", result
    mps = result["mps"]
    expected = {"CUDA_MPS_PIPE_DIRECTORY": mps["pipe_directory"], "CUDA_MPS_LOG_DIRECTORY": mps["log_directory"]}
    assert mps["pipe_directory"] and mps["log_directory"]
    assert len(mps["children"]) == result["processes"] == 2
    assert [child["env"] for child in mps["children"]] == [expected, expected]
    assert mps["children_saw_mps_env"] is True
    assert mps["server"]["servers"] == [4242], mps["server"]
    assert mps["server"]["children_are_clients"] is True, mps["server"]
    assert mps["nvml"] == {"skipped": "no GPU"}
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ and not Path(mps["pipe_directory"]).exists()

    # The old way: children of the forkserver started before the daemon. The mode refuses to time them.
    with pytest.raises(RuntimeError, match="not its clients"):
        processes_under_mps(workload, "cpu", context=process_context())


# ---------------------------------------------------------------------- the sweep workload


def test_a_sweeps_batches_are_one_batch_for_every_model() -> None:
    workload = select(["w4_sweep_train"], quick=True)[0]
    for batch in make_batches(workload, "cpu"):
        assert batch.t is not None and batch.t.shape == (workload.batch,)
        assert batch.xs.shape == (workload.count, workload.batch, *workload.input_shape)
        for k in range(workload.count):
            assert torch.equal(batch.xs[k], batch.x) and torch.equal(batch.ts[k], batch.t)
    assert make_batches(select(["w2_cnn_train"], quick=True)[0], "cpu")[0].t is None


def test_shared_batches_send_one_copy_where_stacked_inputs_send_k() -> None:
    workload = select(["w4_sweep_train"], quick=True)[0]
    batch = make_batches(workload, "cpu", count=1)[0]
    one = batch.x.numel() * 4 + batch.t.numel() * 8  # float32 inputs, int64 targets
    shared = step_jobs(SHARED_MODE, "g", workload, batch)
    assert [(op, target) for op, target, _, _ in shared] == [("train_round", "g")]
    assert bytes_sent(shared) == one
    assert bytes_sent(step_jobs("cohort_fused", "g", workload, batch)) == workload.count * one
    per_model = step_jobs("cohort_per_model", "g", workload, batch)
    assert [target for _, target, _, _ in per_model] == [f"g/{k}" for k in range(workload.count)]
    assert bytes_sent(per_model) == workload.count * one
    infer = select(["w1_mlp_infer"], quick=True)[0]
    infer_batch = make_batches(infer, "cpu", count=1)[0]
    assert bytes_sent(step_jobs("cohort_fused", "g", infer, infer_batch)) == infer_batch.x.numel() * 4
    with pytest.raises(ValueError, match="shared-batch"):
        step_jobs(SHARED_MODE, "g", infer, infer_batch)


def test_the_shared_mode_runs_only_for_shared_batch_workloads() -> None:
    workload = select(["w2_cnn_train"], quick=True)[0]
    seen: list[str] = []
    assert _run_one(None, workload, "cpu", [SHARED_MODE], {}, lambda w, m, r: seen.append(m)) == {}  # type: ignore[arg-type]
    assert seen == []


def test_model_steps_per_second_divide_the_samples_by_the_batch() -> None:
    modes = {"a": ok(1280.0, "samples/s", [0.01], 1.0), "b": skipped("no GPU")}
    add_model_steps(modes, 128)
    assert modes["a"]["model_steps_per_s"] == pytest.approx(10.0)
    assert "model_steps_per_s" not in modes["b"]
    add_model_steps(modes, None)  # a record without a batch size is left as it is


def _sweep_report() -> dict[str, Any]:
    modes = {
        "sequential": ok(2048.0, "samples/s", [0.5], 1.0),
        "cohort_per_model": ok(1024.0, "samples/s", [1.0], 1.0, bytes_sent_per_step=26_279_936),
        "cohort_fused": ok(1280.0, "samples/s", [0.8], 1.0, bytes_sent_per_step=26_279_936),
        "cohort_fused_shared": ok(1920.0, "samples/s", [0.6], 1.0, bytes_sent_per_step=1_642_496),
        "cohort_fused_compiled": skipped("--quick: compiling takes longer than the whole quick run"),
    }
    add_ratios(modes)
    add_model_steps(modes, 128)
    report = _report()
    report["workloads"].append({"name": "w4_sweep_train", "task": "train", "batch": 128, "count": 16,
                                "input_shape": [3, 32, 32], "shared_batch": True, "modes": modes})
    return report


def test_markdown_has_a_sweep_table_with_bytes_and_model_steps() -> None:
    text = render_markdown(_sweep_report())
    assert "## Sweeps: one shared batch against stacked copies" in text
    rows = [line for line in text.split("## Sweeps")[1].splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| Workload | K | Mode | Request | Sent per step | Model-steps/s | × stacked |")
    assert "| cohort_fused | train_round, inputs stacked [K, B, ...] | 26.28 MB | 10.0 | 1.00× |" in text
    assert "| cohort_fused_shared | train_round(group, x, t), one batch | 1.64 MB | 15.0 | 1.50× |" in text
    assert "| cohort_per_model | K train_step jobs | 26.28 MB | 8.0 | 0.80× |" in text
    assert "| cohort_fused_compiled | train_round stacked, compiled | skipped: --quick" in text
    assert "| w4_sweep_train (train, batch 128) | 16 | sequential |" in text  # and in the main table
    assert "Sweeps" not in render_markdown(_report())  # no shared-batch workload, no sweep table


def test_markdown_tables_with_a_sweep_have_consistent_columns() -> None:
    tables: list[list[str]] = [[]]
    for line in render_markdown(_sweep_report()).splitlines():
        if line.startswith("|"):
            tables[-1].append(line)
        elif tables[-1]:
            tables.append([])
    for table in (t for t in tables if t):
        assert len({row.count("|") for row in table}) == 1, table


def test_pipelined_mode_keeps_the_window_full_and_answers_in_order() -> None:
    from concurrent.futures import Future

    class FakeClient:
        def __init__(self) -> None:
            self.sent: list[tuple[str, str, Any]] = []
            self.futures: list[Future[Any]] = []

        def submit(self, op: str, target: str, inputs: Any, targets: Any, timeout: float) -> Future[Any]:
            self.sent.append((op, target, inputs))
            future: Future[Any] = Future()
            future.set_result(("answer", inputs))
            self.futures.append(future)
            return future

    client = FakeClient()
    jobs = [[("ensemble", "g", b, None)] for b in range(3)]  # three batches, cycled
    pipeline = Pipeline(client, jobs, depth=4)  # type: ignore[arg-type]
    assert pipeline.step(0) == ("answer", 0)
    assert len(client.sent) == 4 and len(pipeline.in_flight) == 3  # the window was filled before waiting
    assert [pipeline.step(i) for i in range(1, 6)] == [("answer", b % 3) for b in range(1, 6)]
    assert len(client.sent) == 9 and [x for _, _, x in client.sent] == [b % 3 for b in range(9)]
    pipeline.drain()
    assert not pipeline.in_flight
    with pytest.raises(ValueError, match="one request"):
        Pipeline(client, [[("infer", "g/0", 0, None), ("infer", "g/1", 0, None)]], depth=2)  # type: ignore[arg-type]


def test_the_load_curve_report_checks_the_goals_on_what_was_measured() -> None:
    from tools.bench_load import goals, render_load_curve

    def curve(*ms: float) -> dict:
        return {"per_job_ms": {str(d): v for d, v in zip((1, 8), ms)},
                "vs_alone": {str(d): round(v / ms[0], 3) for d, v in zip((1, 8), ms)}}

    curves = {"bn_cnn infer": {"auto": curve(4.0, 4.4), "vmap": curve(4.0, 9.0)},
              "mlp infer": {"auto": curve(1.0, 0.2)}}
    checked = goals(curves, (1, 8))
    assert checked["auto_worst_vs_alone"] == 1.1 and checked["under_load_met"]
    assert checked["mlp_deepest_vs_alone"] == [0.2] and checked["fusion_pays_met"]
    curves["bn_cnn infer"]["auto"] = curve(4.0, 5.0)  # 1.25x alone: the promise broken
    assert not goals(curves, (1, 8))["under_load_met"]
    record = {"depths": [1, 8], "curves": curves, "goals": goals(curves, (1, 8)),
              "auto_chose": [{"worker": 0, "group": "mlp", "op": "infer", "inputs": "64x64 float32",
                              "in_use": {"1": "one_by_one", "8": "vmap@8"}}]}
    text = "\n".join(render_load_curve(record))
    assert "| bn_cnn infer | auto | 4.000 (1.00×) | 5.000 (1.25×) |" in text
    assert "| bn_cnn infer | vmap | 4.000 | 9.000 |" in text
    assert "goal ≤ 1.2×: not met" in text and "1: one_by_one, 8: vmap@8" in text

"""Choosing each call's plan by measuring it (workers.plans, and the executor using it).

The chooser is driven here with made-up costs and a fake clock; then a real group on the
CPU executor, with one way of running made slow on purpose, must end up on the other
way, with results unchanged."""

from __future__ import annotations

import logging
import time

import pytest
import torch

from core.errors import ConfigError
from tests.unit.runtimes import run_job, runtime_for
from workers import plans as plans_module
from workers.executors import SyncExecutor
from workers.plans import CONCAT, ONE_BY_ONE, VMAP, Candidate, PlanChooser

ALONE = Candidate(ONE_BY_ONE)


def vmaps(*sizes: int) -> list[Candidate]:
    return [Candidate(VMAP, n) for n in sizes]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def drive(chooser: PlanChooser, costs: dict[Candidate, float], candidates: list[Candidate], load: int,
          calls: int) -> list[Candidate]:
    """``calls`` decisions for ``load`` jobs; each choice is 'run' at its per-job cost."""
    chosen = []
    for _ in range(calls):
        choice = chooser.choose("case", "infer", "16x8 float32", candidates, load)
        chosen.append(choice.candidate)
        if choice.measure:
            jobs = choice.candidate.size
            chooser.record(choice, costs[choice.candidate] * jobs, jobs)
    return chosen


def test_every_candidate_is_measured_then_the_cheapest_is_used() -> None:
    chooser = PlanChooser("g", clock=Clock())
    candidates = [ALONE, *vmaps(2, 4, 8)]
    costs = {ALONE: 1.0, Candidate(VMAP, 2): 0.8, Candidate(VMAP, 4): 0.5, Candidate(VMAP, 8): 0.3}
    chosen = drive(chooser, costs, candidates, 8, 40)
    assert set(chosen[:16]) == set(candidates), "each candidate is tried while it is learnt"
    assert chosen[-10:] == [Candidate(VMAP, 8)] * 10
    [report] = chooser.report()
    assert report.in_use == {8: "vmap@8"}
    assert report.per_job_us == {"one_by_one": 1e6, "vmap@2": 8e5, "vmap@4": 5e5, "vmap@8": 3e5}


def test_a_climbing_vmap_curve_is_not_followed_up_and_loses_to_the_loop() -> None:
    """vmap over convolutions on a CPU: the bigger the call, the worse per job. Sizes past the point
    where the curve runs far above the best are never tried (each try would cost a lot)."""
    chooser = PlanChooser("g", clock=Clock())
    candidates = [ALONE, *vmaps(2, 4, 8, 16, 32, 64)]
    costs = {ALONE: 1.0, **{c: 1.5 * c.size ** 0.5 for c in candidates[1:]}}  # 2.1, 3, 4.2, 6, ...
    chosen = drive(chooser, costs, candidates, 64, 60)
    assert Candidate(VMAP, 8) not in chosen and Candidate(VMAP, 64) not in chosen
    assert chosen[-10:] == [ALONE] * 10


def test_a_change_of_plan_waits_for_a_clear_win_and_is_logged(caplog) -> None:
    clock = Clock()
    chooser = PlanChooser("g", clock=clock)
    candidates = [ALONE, Candidate(CONCAT, 8)]
    costs = {ALONE: 1.0, Candidate(CONCAT, 8): 0.5}
    with caplog.at_level(logging.INFO, logger="cohort.worker"):
        drive(chooser, costs, candidates, 8, 12)
    assert chooser.report()[0].in_use == {8: "concat@8"}
    assert any("concat@8" in r.getMessage() and "per job" in r.getMessage() for r in caplog.records)
    # The loop becomes a little cheaper than concat: not enough to switch.
    costs[ALONE] = 0.47
    clock.now += 100
    drive(chooser, costs, candidates, 8, 30)
    assert chooser.report()[0].in_use == {8: "concat@8"}
    # Much cheaper: noticed at a re-check, and the plan changes.
    costs[ALONE] = 0.1
    for _ in range(6):
        clock.now += plans_module.RECHECK_S + 1
        drive(chooser, costs, candidates, 8, 5)
    assert chooser.report()[0].in_use == {8: "one_by_one"}


def test_without_timing_every_call_only_learning_calls_are_timed() -> None:
    """On a GPU timing means a synchronisation: once costs are known, calls run untimed until a re-check."""
    clock = Clock()
    chooser = PlanChooser("g", always_measure=False, clock=clock)
    candidates = [ALONE, *vmaps(2)]
    costs = {ALONE: 1.0, Candidate(VMAP, 2): 0.2}
    drive(chooser, costs, candidates, 2, 10)
    measured = [chooser.choose("case", "infer", "x", candidates, 2).measure for _ in range(20)]
    assert not any(measured)
    clock.now += plans_module.RECHECK_S * 10
    again = chooser.choose("case", "infer", "x", candidates, 2)
    assert again.measure and again.learning


def test_a_pinned_plan_is_used_wherever_it_can_run() -> None:
    chooser = PlanChooser("g", pinned="vmap", clock=Clock())
    costs = {ALONE: 0.1, **{c: 1.0 for c in vmaps(2, 4)}}
    assert drive(chooser, costs, [ALONE, *vmaps(2, 4)], 5, 5) == [Candidate(VMAP, 4)] * 5
    assert drive(chooser, costs, [ALONE], 1, 2) == [ALONE] * 2  # nothing to stack: alone
    assert chooser.report()[0].pinned


# ---------------------------------------------------------------------------- on a real group

GROUP = {"name": "mlp", "factory": "examples.models:mlp", "kwargs": {"d_in": 8, "hidden": 16, "d_out": 3},
         "count": 8, "input": {"shape": [-1, 8], "dtype": "float32"}, "loss": "cross_entropy",
         "optimizer": {"name": "sgd", "lr": 0.1}, "init": {"seed": 0}}


def slowed(fn, seconds: float):
    def slow(*args, **kwargs):
        time.sleep(seconds)
        return fn(*args, **kwargs)

    return slow


def submit_rounds(executor: SyncExecutor, rounds: int, jobs: int, slots: list[int]) -> list:
    g = torch.Generator().manual_seed(0)
    done = []
    for r in range(rounds):
        items = [run_job(r * 1000 + j, "infer", "mlp", [slots[j % len(slots)]], torch.randn(4, 8, generator=g))
                 for j in range(jobs)]
        executor.submit_many(items)
        done += executor.poll()
    return done


@pytest.mark.parametrize("slow", ["vmap", "per_model"])
def test_the_group_runs_joined_jobs_the_way_that_is_faster_and_results_do_not_change(monkeypatch, slow: str) -> None:
    rt, bank = runtime_for(GROUP)
    try:
        if slow == "vmap":  # vmap made to lose, as over convolutions on a CPU
            monkeypatch.setattr(rt.fused, "forward", slowed(rt.fused.forward, 0.02))
        else:  # each per-model call made to cost more, as on a GPU where vmap wins
            monkeypatch.setattr(rt, "infer", slowed(rt.infer, 0.004))
        executor = SyncExecutor({"mlp": rt})
        submit_rounds(executor, 30, 8, list(range(8)))  # 8 jobs, 8 models, at once: learnt here
        chosen_before = executor.joined_jobs
        g = torch.Generator().manual_seed(5)
        xs = [torch.randn(4, 8, generator=g) for _ in range(8)]
        executor.submit_many([run_job(90_000 + j, "infer", "mlp", [j], xs[j]) for j in range(8)])
        done = sorted(executor.poll(), key=lambda f: f.job_id)
        for j, finished in enumerate(done):
            assert finished.error is None
            with torch.no_grad():
                torch.testing.assert_close(finished.outputs, rt.slots.get(j, False)(xs[j]))
        [report] = [r for r in rt.plan_reports() if r.op == "infer"]
        if slow == "vmap":
            assert report.in_use[8] == "one_by_one", report
            assert executor.joined_jobs == chosen_before, "the last call joined nothing"
            tried = [cost for label, cost in report.per_job_us.items() if label.startswith("vmap")]
            assert tried and min(tried) > 2 * report.per_job_us["one_by_one"]
        else:  # joined, in one call of 8 or two of 4: on a busy CPU the two measure within noise of each other
            assert report.in_use[8].startswith("vmap@"), report  # joined (@4 or @2 when a busy machine times them near @8)
            assert executor.joined_jobs == chosen_before + 8
            assert report.per_job_us["one_by_one"] > 2 * report.per_job_us[report.in_use[8]]
    finally:
        bank.close()


def test_jobs_of_one_model_are_concatenated_when_that_pays(monkeypatch) -> None:
    rt, bank = runtime_for(GROUP, fuse=False)
    try:
        monkeypatch.setattr(rt, "infer", slowed(rt.infer, 0.004))  # a fixed cost per call: fewer calls pay
        executor = SyncExecutor({"mlp": rt})
        done = submit_rounds(executor, 20, 8, [0, 1])
        assert all(f.error is None for f in done)
        [report] = rt.plan_reports()
        assert report.in_use[8] == "concat@4", report
        assert not any(label.startswith("vmap") for label in report.per_job_us), "fuse = false: no vmap"
    finally:
        bank.close()


def test_an_ensemble_runs_fused_or_model_by_model_as_measured(monkeypatch) -> None:
    rt, bank = runtime_for(GROUP)
    try:
        monkeypatch.setattr(rt.fused, "forward", slowed(rt.fused.forward, 0.03))
        executor = SyncExecutor({"mlp": rt})
        x = torch.randn(4, 8)
        for i in range(12):
            executor.submit_many([run_job(i, "ensemble", "mlp", list(range(8)), x)])
        finished = executor.poll()
        assert all(f.error is None for f in finished)
        torch.testing.assert_close(finished[-1].outputs, torch.stack([rt.infer(k, x) for k in range(8)]))
        [report] = rt.plan_reports()
        assert report.op == "ensemble" and report.in_use == {8: "one_by_one"}, report
        assert "over 8 models" in report.inputs
    finally:
        bank.close()


def test_operators_without_a_vmap_batching_rule_are_named_in_the_report() -> None:
    group = {"name": "tf", "factory": "examples.models:tiny_transformer",
             "kwargs": {"vocab": 16, "d_model": 8, "heads": 2, "layers": 1, "seq_len": 4}, "count": 4,
             "input": {"shape": [-1, 4], "dtype": "int64"}, "loss": "cross_entropy",
             "optimizer": {"name": "sgd", "lr": 0.1}, "init": {"seed": 0}, "batching": {"plan": "vmap"}}
    rt, bank = runtime_for(group)
    try:
        executor = SyncExecutor({"tf": rt})
        executor.submit_many([run_job(1, "ensemble", "tf", list(range(4)), torch.randint(0, 16, (2, 4)))])
        assert executor.poll()[0].error is None
        [report] = rt.plan_reports()
        assert report.pinned and report.in_use == {4: "vmap@4"}
        assert any("no batching rule for aten::" in note for note in report.notes), report.notes
    finally:
        bank.close()


@pytest.mark.parametrize("batching, key", [({"plan": "fastest"}, "batching.plan"),
                                           ({"plan": "vmap", "fuse": False}, "batching.plan")])
def test_a_bad_plan_is_a_config_error_naming_the_key(batching, key) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        runtime_for({**GROUP, "batching": batching}, fuse=batching.get("fuse", True))

"""Compiled fused calls shared through the machine's cache: compiled once, loaded everywhere else,
keyed so that a changed model compiles afresh, robust to a corrupt file and to two processes at once.

The compiler backend is ``aot_eager`` (``COHORT_COMPILE_BACKEND``): the same ahead-of-time
path as Inductor's, in seconds rather than minutes; the benchmark measures Inductor."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.unit.runtimes import runtime_for
from workers.compile_cache import BACKEND_ENV, CompileCache

ROOT = Path(__file__).resolve().parents[2]
GROUP = {"name": "c", "factory": "examples.models:mlp", "kwargs": {"d_in": 4, "hidden": 8, "d_out": 3}, "count": 4,
         "input": {"shape": [-1, 4], "dtype": "float32"}, "loss": "cross_entropy",
         "optimizer": {"name": "sgd", "lr": 0.1}, "init": {"seed": 0}}


@pytest.fixture(autouse=True)
def fast_backend(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(BACKEND_ENV, "aot_eager")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))


def worker_like(tmp_path: Path, group: dict = GROUP):
    """A runtime as a worker builds it with compiling on and the cache in ``tmp_path``."""
    rt, bank = runtime_for(group, True)
    cache = CompileCache(torch.device("cpu"), str(tmp_path / "cache"))
    calls = rt.enable_compile("default", cache)
    return rt, bank, calls, cache


def check_calls(rt) -> None:
    x, t = torch.randn(3, 4), torch.randint(0, 3, (3,))
    want = torch.stack([rt.infer(k, x) for k in range(4)])
    torch.testing.assert_close(rt.ensemble(list(range(4)), x), want)
    assert rt.train_round(list(range(4)), x, t, shared=True).shape == (4,)


def test_one_worker_compiles_every_later_one_loads(tmp_path: Path) -> None:
    first, b1, calls1, _ = worker_like(tmp_path)
    try:
        check_calls(first)
        assert calls1.compiled_here == 2 and calls1.loaded == 0
    finally:
        b1.close()
    second, b2, calls2, _ = worker_like(tmp_path)  # a replacement or a restart: found at start
    try:
        assert calls2.preload(second.fused.eager) == 2
        check_calls(second)
        assert calls2.compiled_here == 0 and calls2.loaded == 2
        assert second.fused.compiled_calls == 2 and second.fused.eager_calls == 0
        assert all("loaded" in s for s in calls2.shapes)
    finally:
        b2.close()


def test_a_changed_kwarg_or_model_source_compiles_afresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rt, bank, calls, _ = worker_like(tmp_path)
    try:
        check_calls(rt)
    finally:
        bank.close()
    wider = {**GROUP, "kwargs": {**GROUP["kwargs"], "hidden": 16}}
    rt, bank, calls, _ = worker_like(tmp_path, wider)
    try:
        assert calls.preload(rt.fused.eager) == 0
        check_calls(rt)
        assert calls.compiled_here == 2 and calls.loaded == 0
    finally:
        bank.close()
    # A model defined in a file of the user's: the same shapes, another forward.
    models = tmp_path / "mymodels"
    models.mkdir()
    source = models / "zoo.py"
    source.write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.linear = nn.Linear(4, 3)

            def forward(self, x):
                return torch.relu(self.linear(x))

        def net():
            return Net()
    """))
    monkeypatch.syspath_prepend(str(models))
    user = {**GROUP, "factory": "zoo:net", "kwargs": {}}
    rt, bank, calls, _ = worker_like(tmp_path, user)
    try:
        check_calls(rt)
        assert calls.compiled_here == 2
    finally:
        bank.close()
    source.write_text(source.read_text().replace("torch.relu", "torch.tanh"))
    sys.modules.pop("zoo", None)
    rt, bank, calls, _ = worker_like(tmp_path, user)
    try:
        assert calls.preload(rt.fused.eager) == 0, "a stale artifact of the old forward was loaded"
        check_calls(rt)  # the tanh model's results, compared with its own eager calls
        assert calls.compiled_here == 2
    finally:
        bank.close()
        sys.modules.pop("zoo", None)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "drop_marker_field"])
def test_a_corrupt_or_partial_entry_is_ignored_with_a_warning(tmp_path: Path, caplog, damage: str) -> None:
    rt, bank, _, cache = worker_like(tmp_path)
    try:
        check_calls(rt)
    finally:
        bank.close()
    for path in sorted(cache.calls.glob("*.bin")):
        data = path.read_bytes()
        if damage == "truncate":
            path.write_bytes(data[: len(data) // 2])
        elif damage == "garbage":
            path.write_bytes(b"not a pickle" * 10)
        else:
            marker = path.with_suffix(".json")
            marker.write_text(marker.read_text().replace('"sha256"', '"sha"'))
    rt, bank, calls, cache = worker_like(tmp_path)
    try:
        with caplog.at_level("WARNING", logger="cohort.worker"):
            calls.preload(rt.fused.eager)
            check_calls(rt)
        assert calls.compiled_here == 2 and calls.loaded == 0
        assert any("unusable" in r.getMessage() for r in caplog.records)
        assert list(cache.calls.glob("*.bad"))
    finally:
        bank.close()


def test_two_processes_at_once_on_one_empty_cache_both_work_and_compile_once(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from tests.unit.runtimes import runtime_for
        from tests.unit.test_compile_cache import GROUP, check_calls
        from workers.compile_cache import CompileCache
        rt, bank = runtime_for(GROUP, True)
        calls = rt.enable_compile("default", CompileCache(torch.device("cpu"), {str(tmp_path / "cache")!r}))
        check_calls(rt)
        print("compiled", calls.compiled_here, "loaded", calls.loaded)
        bank.close()
    """)
    env = {**__import__("os").environ, BACKEND_ENV: "aot_eager", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "ind")}
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    counts = sorted(tuple(int(v) for v in o[0].split()[1::2]) for o in outs)
    assert sum(c for c, _ in counts) == 2 and sum(loaded for _, loaded in counts) == 2, counts  # each shape once


def test_a_call_that_would_recompile_in_steady_state_runs_eagerly_and_is_counted(tmp_path: Path, caplog) -> None:
    """Inputs of a compiled shape but other strides fail the compiled call's guards: the call is refused
    (no recompile), runs eagerly with the right result, is counted and logged once; compiling stays on."""
    rt, bank, calls, _ = worker_like(tmp_path)
    try:
        x = torch.randn(4, 4)
        torch.testing.assert_close(rt.ensemble(list(range(4)), x), torch.stack([rt.infer(k, x) for k in range(4)]))
        assert calls.recompiles == 0 and rt.fused.compiled_calls == 1
        odd = torch.randn(4, 4).t()  # the same shape, transposed strides
        with caplog.at_level("WARNING", logger="cohort.worker"):
            for _ in range(2):
                got = rt.ensemble(list(range(4)), odd)
                torch.testing.assert_close(got, torch.stack([rt.infer(k, odd) for k in range(4)]))
        assert calls.recompiles == 2 and calls.compiled_here == 1, calls.shapes
        assert sum("would recompile" in r.message for r in caplog.records) == 1
        assert rt.fused.enabled and rt.fused.compiled is calls
        torch.testing.assert_close(rt.ensemble(list(range(4)), x), torch.stack([rt.infer(k, x) for k in range(4)]))
    finally:
        bank.close()

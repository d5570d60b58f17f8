"""Fused (vmap'd) execution equals per-model execution, in process on the CPU bank."""

from __future__ import annotations

import pytest
import torch

from core.spec import BatchingSpec
from tests.unit.runtimes import runtime_for

K = 6


# Adam's update divides by the root of the gradient's second moment, so where a gradient is
# zero by construction (an attention key bias) it turns floating-point noise into steps of
# size lr: weights are compared under SGD there, Adam is compared on the MLP.
@pytest.fixture(params=[
    ("examples.models:mlp", {"d_in": 8, "hidden": 16, "d_out": 4}, {"shape": [-1, 8], "dtype": "float32"}, "adam"),
    ("examples.models:cnn", {"channels": 3, "width": 4, "classes": 4}, {"shape": [-1, 3, 32, 32], "dtype": "float32"}, "sgd"),
    ("examples.models:tiny_transformer", {"vocab": 16, "d_model": 16, "heads": 2, "layers": 1, "seq_len": 8},
     {"shape": [-1, 8], "dtype": "int64"}, "sgd"),
], ids=["mlp", "cnn", "transformer"])
def pair(request):
    factory, kwargs, inp, opt = request.param
    group = {"name": "g", "factory": factory, "kwargs": kwargs, "count": K, "input": inp, "loss": "cross_entropy",
             "optimizer": {"name": opt, "lr": [0.01 * (k + 1) for k in range(K)]}, "init": {"seed": 7}}
    fused, b1 = runtime_for(group, True)
    loop, b2 = runtime_for(group, False)
    yield fused, loop, inp
    for b in (b1, b2):
        b.close()


def make_inputs(inp: dict, lead: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    shape = [*lead, *[d for d in inp["shape"][1:]]]
    if inp["dtype"] == "int64":
        return torch.randint(0, 16, shape, generator=g)
    return torch.randn(shape, generator=g)


def test_fused_ensemble_and_stacked_infer_equal_per_model(pair) -> None:
    fused, loop, inp = pair
    g = torch.Generator().manual_seed(0)
    x = make_inputs(inp, (5,), g)
    slots = list(range(K))
    torch.testing.assert_close(fused.ensemble(slots, x), loop.ensemble(slots, x), atol=1e-5, rtol=0)
    xs = make_inputs(inp, (4, 5), g)
    for chosen in ([1, 2, 3, 4], [4, 0, 2, 5]):  # contiguous window, and a gather
        torch.testing.assert_close(fused.infer_stacked(chosen, xs), loop.infer_stacked(chosen, xs), atol=1e-5, rtol=0)
    assert fused.fused.enabled, "fused execution fell back to the loop"


def test_fused_train_rounds_end_where_per_model_steps_end(pair) -> None:
    fused, loop, inp = pair
    g = torch.Generator().manual_seed(1)
    for step, slots in enumerate([list(range(K)), list(range(K)), [5, 1, 3, 0], [2, 3, 4, 5], [1, 2]]):
        xs = make_inputs(inp, (len(slots), 4), g)
        out = fused.output_meta(xs[0])
        ts = torch.randint(0, out.shape[-1], (len(slots), *out.shape[:-1]), generator=g)
        torch.testing.assert_close(fused.train_round(slots, xs, ts), loop.train_round(slots, xs, ts),
                                   atol=1e-5, rtol=0, msg=f"losses of round {step}")
    assert fused.fused.enabled, "fused execution fell back to the loop"
    for name, t in fused.bank.tensors.items():
        torch.testing.assert_close(t, loop.bank.tensors[name], atol=1e-5, rtol=0, msg=lambda m, name=name: f"{name}: {m}")


def test_batching_defaults() -> None:
    assert BatchingSpec() == BatchingSpec(fuse=True, max_jobs=64, max_wait_ms=0.0)


def test_initialise_reports_progress_when_it_takes_long(monkeypatch, caplog) -> None:
    from workers import execute

    monkeypatch.setattr(execute, "PROGRESS_EVERY_S", 0.0)  # every model counts as slow
    group = {"name": "slow", "factory": "examples.models:mlp", "kwargs": {"d_in": 4, "hidden": 4, "d_out": 2},
             "count": 3, "input": {"shape": [-1, 4], "dtype": "float32"}, "loss": "mse",
             "optimizer": {"name": "sgd", "lr": 0.1}, "init": {"seed": 0}}
    with caplog.at_level("INFO", logger="cohort.worker"):
        _, bank = runtime_for(group, True)
    bank.close()
    lines = [r.getMessage() for r in caplog.records]
    assert any("group slow: 2/3 models initialised" in line for line in lines), lines
    assert any("group slow: all 3 models initialised" in line for line in lines), lines


MLP_GROUP = {"name": "c", "factory": "examples.models:mlp", "kwargs": {"d_in": 4, "hidden": 8, "d_out": 3},
             "count": 4, "input": {"shape": [-1, 4], "dtype": "float32"}, "loss": "cross_entropy",
             "optimizer": {"name": "sgd", "lr": 0.1}, "init": {"seed": 0}}


def test_a_compile_failure_falls_back_to_eager_but_bad_data_keeps_compiling(monkeypatch) -> None:
    from workers import compiled as compiled_module

    def broken_compile(fn, **_):
        def run(*args):
            raise RuntimeError("inductor could not compile this")
        return run

    monkeypatch.setattr(compiled_module.torch, "compile", broken_compile)
    rt, bank = runtime_for(MLP_GROUP, True)
    try:
        rt.enable_compile("default", None)
        with pytest.raises(Exception):  # noqa: B017 - the model's own error for bad data, whatever its type
            rt.ensemble([0, 1, 2, 3], torch.randn(2, 5))  # wrong width: eager fails too
        assert rt.fused.compiled is not None  # bad data is not the compiler's fault
        x = torch.randn(2, 4)
        got = rt.ensemble([0, 1, 2, 3], x)
        assert rt.fused.compiled is None  # the compiler's failure: eager from now on
        torch.testing.assert_close(got, torch.stack([rt.infer(k, x) for k in range(4)]))
    finally:
        bank.close()


def test_every_new_call_shape_compiles_and_is_announced(monkeypatch) -> None:
    from workers import compiled as compiled_module

    compiled_calls = []
    monkeypatch.setattr(compiled_module.torch, "compile", lambda fn, **_: lambda *a: compiled_calls.append(1) or fn(*a))
    rt, bank = runtime_for({**MLP_GROUP, "batching": {"buckets": []}}, True)  # no padding: every batch size
    try:
        notices = []
        calls = rt.enable_compile("default", None)
        calls.on_compile = lambda: notices.append(1)
        shapes = compiled_module.MANY_SHAPES + 3
        for batch in range(1, shapes + 1):
            rt.ensemble([0, 1, 2, 3], torch.randn(batch, 4))
            rt.ensemble([0, 1, 2, 3], torch.randn(batch, 4))  # the same shape again: no new notice
        assert len(notices) == shapes and calls.compiled_here == shapes and len(calls.shapes) == shapes
        assert len(compiled_calls) == 2 * shapes and rt.fused.compiled_calls == 2 * shapes
        assert rt.fused.eager_calls == 0
    finally:
        bank.close()


def test_batch_sizes_are_padded_to_buckets_and_results_cut_back(monkeypatch) -> None:
    """Batches of 5, 6 and 7 rows share the bucket of 8: one compiled shape; every result equals eager,
    training included (padded rows carry the ignored target), and a partial selection of models too."""
    from workers import compiled as compiled_module

    traced = []
    monkeypatch.setattr(compiled_module.torch, "compile", lambda fn, **_: lambda *a: traced.append(1) or fn(*a))
    group = {**MLP_GROUP, "count": 6, "optimizer": {"name": "adam", "lr": 0.01}}
    compiled, b1 = runtime_for(group, True)
    eager, b2 = runtime_for(group, True)
    try:
        calls = compiled.enable_compile("default", None)
        g = torch.Generator().manual_seed(0)
        for batch in (5, 6, 7):
            x = torch.randn(batch, 4, generator=g)
            torch.testing.assert_close(compiled.ensemble(list(range(6)), x), eager.ensemble(list(range(6)), x))
            xs = torch.randn(4, batch, 4, generator=g)
            torch.testing.assert_close(compiled.infer_stacked([5, 0, 2, 3], xs), eager.infer_stacked([5, 0, 2, 3], xs))
            t = torch.randint(0, 3, (batch,), generator=g)
            torch.testing.assert_close(compiled.train_round(list(range(6)), x, t, shared=True),
                                       eager.train_round(list(range(6)), x, t, shared=True))
            ts = torch.randint(0, 3, (4, batch), generator=g)
            torch.testing.assert_close(compiled.train_round([1, 2, 3, 4], xs, ts), eager.train_round([1, 2, 3, 4], xs, ts))
            torch.testing.assert_close(compiled.evaluate(list(range(6)), x, t, shared=True),
                                       eager.evaluate(list(range(6)), x, t, shared=True))
        for name, value in compiled.bank.tensors.items():
            torch.testing.assert_close(value, eager.bank.tensors[name], msg=name)
        signatures = [s.split(":")[0] for s in calls.shapes]
        assert len(signatures) == 5 and all("[8, 4]" in s or "[6, 8, 4]" in s for s in signatures), signatures
        assert compiled.fused.eager_calls == 0
    finally:
        b1.close()
        b2.close()


def counting_compile(monkeypatch) -> list:
    """torch.compile through a backend that records each graph it is given (a list, filled as they come)."""
    import torch._dynamo

    from workers import compiled as compiled_module

    torch._dynamo.reset()
    graphs: list = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    real_compile = torch.compile
    monkeypatch.setattr(compiled_module.torch, "compile",
                        lambda fn, **kw: real_compile(fn, backend=counting_backend, dynamic=False))
    return graphs


def test_more_compiled_wrappers_than_dynamos_recompile_limit_all_compile(monkeypatch) -> None:
    """Every torch.compile(vmap(...)) traces one code object inside torch; dynamo's recompile limit
    (8) is counted per code object, so without wrappers of their own the 9th shape on ran eagerly."""
    graphs = counting_compile(monkeypatch)
    runtimes = [runtime_for({**MLP_GROUP, "name": f"g{i}", "batching": {"buckets": []}}, True) for i in range(3)]
    try:
        wanted = 0
        for rt, _ in runtimes:
            rt.enable_compile("default", None)
            for batch in range(1, 5):  # 3 groups x 4 shapes: 12 compiled wrappers
                x = torch.randn(batch, 4)
                torch.testing.assert_close(rt.ensemble([0, 1, 2, 3], x), torch.stack([rt.infer(k, x) for k in range(4)]))
                wanted += 1
        assert len(graphs) == wanted == 12
        assert all(rt.fused.compiled_calls == 4 and rt.fused.eager_calls == 0 for rt, _ in runtimes)
    finally:
        for _, bank in runtimes:
            bank.close()
        torch._dynamo.reset()


def test_plain_torch_compile_refuses_recompiles_in_steady_state(monkeypatch) -> None:
    """Without the machine's cache (plain torch.compile), a compiled shape past its first call runs under
    dynamo's fail_on_recompile stance: inputs that would recompile run eagerly instead and are counted."""
    graphs = counting_compile(monkeypatch)
    rt, bank = runtime_for({**MLP_GROUP, "batching": {"buckets": []}}, True)
    try:
        calls = rt.enable_compile("default", None)
        x = torch.randn(4, 4)
        for inputs in (x, x, torch.randn(4, 4).t()):  # the last: the same shape, other strides
            torch.testing.assert_close(rt.ensemble([0, 1, 2, 3], inputs), torch.stack([rt.infer(k, inputs) for k in range(4)]))
        assert len(graphs) == 1, "a call recompiled in steady state"
        assert calls.recompiles == 1 and rt.fused.compiled is calls and rt.fused.enabled
    finally:
        bank.close()
        torch._dynamo.reset()

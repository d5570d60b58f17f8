"""Sweeps and PBT against plain PyTorch, in process: shared batches, schedules, clipping,
evaluation, run-time hyperparameters, new trials and precision, fused and per-model."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from examples.models import mlp
from scheduler.config import parse_config
from tests.unit.runtimes import runtime_for
from workers.training import scheduled_lr

K = 4  # the fusion threshold: fused runs use vmap
STEPS = 12
KW = {"d_in": 6, "hidden": 12, "d_out": 3}


def group(**over: Any) -> dict[str, Any]:
    table = {"name": "g", "factory": "examples.models:mlp", "kwargs": KW, "count": K,
             "input": {"shape": [-1, 6], "dtype": "float32"}, "loss": "cross_entropy",
             "optimizer": {"name": "sgd", "lr": [0.05, 0.1, 0.2, 0.4], "momentum": 0.9}, "init": {"seed": 11}}
    table.update(over)
    return table


@pytest.fixture(params=[True, False], ids=["fused", "per-model"])
def fuse(request) -> bool:
    return request.param


def reference(k: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(11 + k)
    return mlp(**KW).to(dtype)


def data(steps: int = STEPS, batch: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 6, generator=g), torch.randint(0, 3, (batch,), generator=g)) for _ in range(steps)]


def torch_losses(model: nn.Module, opt: torch.optim.Optimizer, batches, scheduler=None, clip: float = 0.0) -> list[float]:
    out = []
    for x, t in batches:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), t)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if scheduler is not None:
            scheduler.step()
        out.append(loss.item())
    return out


def sgd(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


LRS = [0.05, 0.1, 0.2, 0.4]


def test_shared_batch_rounds_train_every_model_on_that_batch(fuse) -> None:
    rt, bank = runtime_for(group(), fuse)
    try:
        batches = data()
        got = torch.stack([rt.train_round(list(range(K)), x, t, shared=True) for x, t in batches])
        for k in range(K):
            model = reference(k)
            want = torch_losses(model, sgd(model, LRS[k]), batches)
            torch.testing.assert_close(got[:, k], torch.tensor(want), atol=1e-4, rtol=0, msg=f"model {k}")
        assert rt.fused.eager_calls == (STEPS if fuse else 0)
    finally:
        bank.close()


SCHEDULES = {
    "cosine": ({"name": "cosine", "total_steps": 10, "min_lr": 0.01},
               lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=0.01)),
    "step": ({"name": "step", "step_size": 3, "gamma": 0.5}, lambda opt: torch.optim.lr_scheduler.StepLR(opt, 3, 0.5)),
    "linear": ({"name": "linear", "total_steps": 8, "start_factor": 1.0, "end_factor": 0.25},
               lambda opt: torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.25, total_iters=8)),
}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedules_follow_torch_lr_schedulers(fuse, name: str) -> None:
    table, make = SCHEDULES[name]
    rt, bank = runtime_for(group(schedule=table), fuse)
    try:
        batches = data()
        got = torch.stack([rt.train_round(list(range(K)), x, t, shared=True) for x, t in batches])
        for k in range(K):
            model = reference(k)
            opt = sgd(model, LRS[k])
            want = torch_losses(model, opt, batches, make(opt))
            torch.testing.assert_close(got[:, k], torch.tensor(want), atol=1e-4, rtol=0, msg=f"model {k}")
    finally:
        bank.close()


def test_cosine_warmup_and_each_models_own_step_count() -> None:
    sched = parse_config({"group": [group(schedule={"name": "cosine", "total_steps": 10, "warmup_steps": 2,
                                                    "min_lr": 0.0})]}).groups[0].schedule
    base = torch.tensor([1.0, 1.0], dtype=torch.float64)
    got = [scheduled_lr(sched, base, torch.tensor([t, 0.0])).tolist() for t in range(10)]
    want = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * s / 8)) for s in range(8)]
    assert [g[0] for g in got] == pytest.approx(want)
    assert all(g[1] == pytest.approx(0.5) for g in got)  # the second model has taken no step: it is still warming up


def test_gradient_clipping_is_clip_grad_norm_per_model(fuse) -> None:
    clips = [0.05, 0.1, 0.0, 1e6]  # 0 is off
    rt, bank = runtime_for(group(optimizer={"name": "sgd", "lr": LRS, "momentum": 0.9, "clip_grad_norm": clips}), fuse)
    try:
        batches = data()
        got = torch.stack([rt.train_round(list(range(K)), x, t, shared=True) for x, t in batches])
        for k in range(K):
            model = reference(k)
            want = torch_losses(model, sgd(model, LRS[k]), batches, clip=clips[k])
            torch.testing.assert_close(got[:, k], torch.tensor(want), atol=1e-4, rtol=0, msg=f"model {k}")
    finally:
        bank.close()


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "stacked"])
def test_evaluate_is_the_loss_without_a_step(fuse, shared: bool) -> None:
    rt, bank = runtime_for(group(), fuse)
    try:
        before = {n: t.clone() for n, t in rt.tables.params.items()}
        x, t = data(1)[0]
        xs, ts = (x, t) if shared else (torch.stack([x] * K) + torch.arange(K).reshape(K, 1, 1), torch.stack([t] * K))
        got = rt.evaluate(list(range(K)), xs, ts, shared)
        for k in range(K):
            model = reference(k).eval()
            xk, tk = (x, t) if shared else (xs[k], ts[k])
            with torch.no_grad():
                assert got[k].item() == pytest.approx(nn.functional.cross_entropy(model(xk), tk).item(), abs=1e-5)
        assert all(torch.equal(before[n], rt.tables.params[n]) for n in before), "evaluate took a step"
        assert rt.evaluate_one(2, x, t).item() == pytest.approx(got[2].item() if shared else got[2].item(), abs=1)
    finally:
        bank.close()


def test_hyperparameters_changed_mid_training_take_effect_from_the_next_step(fuse) -> None:
    """PBT's explore step: lr and momentum changed for some models after 5 steps, as a param group edit."""
    rt, bank = runtime_for(group(), fuse)
    try:
        batches = data()
        slots = list(range(K))
        got = [rt.train_round(slots, x, t, shared=True) for x, t in batches[:5]]
        rt.set_hparams([1, 3], {"lr": [0.01, 0.02], "momentum": [0.5, 0.5]})
        got += [rt.train_round(slots, x, t, shared=True) for x, t in batches[5:]]
        got_t = torch.stack(got)
        for k in range(K):
            model = reference(k)
            opt = sgd(model, LRS[k])
            want = torch_losses(model, opt, batches[:5])
            if k in (1, 3):
                for g in opt.param_groups:
                    g["lr"], g["momentum"] = {1: 0.01, 3: 0.02}[k], 0.5
            want += torch_losses(model, opt, batches[5:])
            torch.testing.assert_close(got_t[:, k], torch.tensor(want), atol=1e-4, rtol=0, msg=f"model {k}")
        values = rt.get_hparams(3).tolist()
        names = list(rt.spec.hparams)
        assert dict(zip(names, values))["lr"] == pytest.approx(0.02) and values[-1] == STEPS
    finally:
        bank.close()


def test_reset_makes_a_new_trial_in_the_slot() -> None:
    rt, bank = runtime_for(group(optimizer={"name": "adam", "lr": 0.01}))
    try:
        for x, t in data(3):
            rt.train_round(list(range(K)), x, t, shared=True)
        rt.reset(2, seed=123)
        torch.manual_seed(123)
        fresh = mlp(**KW)
        for name, value in fresh.state_dict().items():
            assert torch.equal(rt.bank.model_state(2)[name], value), name
        state = {n: t[2] for n, t in rt.tables.state.items()}
        assert all(torch.count_nonzero(t) == 0 for t in state.values()), "optimizer state and step count cleared"
        assert rt.get_hparams(2).tolist()[-1] == 0 and rt.get_hparams(1).tolist()[-1] == 3
        rt.reset(1, seed=None)  # the group's own rule: seed + index
        for name, value in reference(1).state_dict().items():
            assert torch.equal(rt.bank.model_state(1)[name], value), name
    finally:
        bank.close()


def test_bf16_mixed_trains_as_torch_autocast_does(fuse) -> None:
    rt, bank = runtime_for(group(precision="bf16-mixed"), fuse)
    try:
        assert all(t.dtype == torch.float32 for t in rt.tables.params.values())
        batches = data()
        got = torch.stack([rt.train_round(list(range(K)), x, t, shared=True) for x, t in batches])
        for k in range(K):
            model, out = reference(k), []
            opt = sgd(model, LRS[k])
            for x, t in batches:
                opt.zero_grad()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = nn.functional.cross_entropy(model(x), t)
                loss.backward()
                opt.step()
                out.append(loss.item())
            torch.testing.assert_close(got[:, k].float(), torch.tensor(out), atol=2e-2, rtol=2e-2, msg=f"model {k}")
    finally:
        bank.close()


def test_bf16_stores_weights_and_state_in_half_the_memory_and_trains_like_torch_optim(fuse) -> None:
    adam = {"name": "adam", "lr": 0.01}
    full, b32 = runtime_for(group(optimizer=adam), fuse)
    half, b16 = runtime_for(group(optimizer=adam, precision="bf16"), fuse)
    try:
        floats = [e for e in half.spec.entries if e.role in ("param", "buffer") or e.name.startswith("optim.exp")]
        assert floats and all(e.dtype == "bfloat16" for e in floats)
        float_bytes = lambda bank: sum(t.numel() * t.element_size() for n, t in bank.tensors.items()  # noqa: E731
                                       if t.dtype in (torch.float32, torch.bfloat16) and not n.startswith("optim.step"))
        assert float_bytes(b16) * 2 == float_bytes(b32)
        batches = data()
        got = torch.stack([half.train_round(list(range(K)), x, t, shared=True) for x, t in batches])  # float32 inputs
        for k in range(K):
            model = reference(k, torch.bfloat16)
            opt = torch.optim.Adam(model.parameters(), lr=0.01)
            want = []
            for x, t in batches:
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x.bfloat16()), t)
                loss.backward()
                opt.step()
                want.append(loss.item())
            torch.testing.assert_close(got[:, k].float(), torch.tensor(want), atol=3e-2, rtol=3e-2, msg=f"model {k}")
    finally:
        b32.close()
        b16.close()


def test_bf16_inputs_into_a_float32_group_whose_spec_says_bfloat16() -> None:
    rt, bank = runtime_for(group(input={"shape": [-1, 6], "dtype": "bfloat16"}))
    try:
        x, t = data(1)[0]
        got = rt.ensemble(list(range(K)), x.bfloat16())
        assert got.dtype == torch.float32
        with torch.no_grad():
            want = torch.stack([reference(k)(x.bfloat16().float()) for k in range(K)])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert rt.train_round(list(range(K)), x.bfloat16(), t, shared=True).shape == (K,)
    finally:
        bank.close()

"""workers/optim.py: stepping a bank of K models equals torch.optim run on each model alone.

Every check is fp32 and within 1e-6 (absolute and relative), step by step, for parameters
and optimizer state, both fused (all K at once) and per model (k = 1 windows, as
workers/execute.py calls it).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from core.definition import optimizer_state_entries, state_name
from core.spec import EntrySpec
from scheduler.config import OPTIMIZER_DEFAULTS
from tests.unit.optim_support import torch_optimizer
from workers.optim import optimizer_step

K = 3
STEPS = 6
SHAPES: dict[str, tuple[int, ...]] = {"w": (4, 5), "b": (5,), "scale": ()}
TOL: dict[str, Any] = {"atol": 1e-6, "rtol": 1e-6}

HPARAMS: dict[str, dict[str, list[float]]] = {
    "sgd": {
        "lr": [0.1, 0.05, 0.01],
        "momentum": [0.9, 0.0, 0.5],
        "dampening": [0.0, 0.0, 0.1],
        "weight_decay": [0.0, 1e-2, 1e-3],
        "nesterov": [1.0, 0.0, 0.0],
    },
    "sgd_plain": {"lr": [0.1, 0.2, 0.3], "momentum": [0.0] * 3, "dampening": [0.0] * 3, "weight_decay": [0.0] * 3, "nesterov": [0.0] * 3},
    "sgd_nesterov": {"lr": [0.1, 0.02, 0.3], "momentum": [0.9, 0.5, 0.99], "dampening": [0.0] * 3, "weight_decay": [0.0, 0.1, 1e-4], "nesterov": [1.0] * 3},
    "adam": {
        "lr": [1e-3, 1e-2, 3e-4],
        "beta1": [0.9, 0.8, 0.95],
        "beta2": [0.999, 0.99, 0.9],
        "eps": [1e-8, 1e-6, 1e-8],
        "weight_decay": [0.0, 0.1, 0.01],
    },
    "adamw": {
        "lr": [1e-3, 1e-2, 3e-4],
        "beta1": [0.9, 0.8, 0.95],
        "beta2": [0.999, 0.99, 0.9],
        "eps": [1e-8, 1e-6, 1e-8],
        "weight_decay": [0.01, 0.1, 0.0],
    },
}
KIND = {"sgd": "sgd", "sgd_plain": "sgd", "sgd_nesterov": "sgd", "adam": "adam", "adamw": "adamw"}


class Setup:
    """A bank of K models and K separate torch optimizers starting from the same weights."""

    def __init__(self, case: str, seed: int = 0, overrides: dict[str, list[float]] | None = None) -> None:
        self.kind = KIND[case]
        g = torch.Generator().manual_seed(seed)
        self.params = {n: torch.randn(K, *s, generator=g) for n, s in SHAPES.items()}
        specs = [EntrySpec(n, "param", s, "float32") for n, s in SHAPES.items()]
        entries = optimizer_state_entries(self.kind, specs)
        self.state = {e.name: torch.zeros(K, *e.shape, dtype=torch.float32) for e in entries}
        hp = {**HPARAMS[case], **(overrides or {})}
        assert set(hp) == set(OPTIMIZER_DEFAULTS[self.kind]) - {"clip_grad_norm"}, "the test must give every hyperparameter the config gives"
        # As workers/execute.py holds them: float64, one value per model.
        self.hparams = {k: torch.tensor(v, dtype=torch.float64) for k, v in hp.items()}
        self.ref_params = [
            {n: torch.nn.Parameter(self.params[n][k].clone()) for n in SHAPES} for k in range(K)
        ]
        self.ref_opts = [
            torch_optimizer(self.kind, list(self.ref_params[k].values()), {h: v[k] for h, v in hp.items()})
            for k in range(K)
        ]
        self.grad_gen = torch.Generator().manual_seed(seed + 1)

    def grads(self) -> dict[str, torch.Tensor]:
        return {n: torch.randn(K, *s, generator=self.grad_gen) for n, s in SHAPES.items()}

    def ref_step(self, k: int, grads: dict[str, torch.Tensor | None]) -> None:
        for n, p in self.ref_params[k].items():
            g = grads[n]
            p.grad = None if g is None else g.clone()
        self.ref_opts[k].step()

    def step_models(self, models: list[int], grads: dict[str, torch.Tensor], fused: bool) -> None:
        if fused:
            idx = torch.tensor(models)
            if models == list(range(K)):
                optimizer_step(self.kind, self.params, grads, self.state, self.hparams)
                return
            # A fused step over a subset: gather, step, scatter back (what a worker would do
            # with a contiguous block is a slice; the result must be the same).
            params = {n: t[idx].clone() for n, t in self.params.items()}
            state = {n: t[idx].clone() for n, t in self.state.items()}
            optimizer_step(self.kind, params, {n: g[idx] for n, g in grads.items()}, state,
                           {h: v[idx] for h, v in self.hparams.items()})
            for n, t in params.items():
                self.params[n][idx] = t
            for n, t in state.items():
                self.state[n][idx] = t
            return
        for k in models:
            w = slice(k, k + 1)
            optimizer_step(
                self.kind,
                {n: t[w] for n, t in self.params.items()},
                {n: g[w] for n, g in grads.items()},
                {n: t[w] for n, t in self.state.items()},
                {h: v[w] for h, v in self.hparams.items()},
            )

    def check(self, k: int, step: int) -> None:
        for n, p in self.ref_params[k].items():
            where = f"model {k} {n} step {step}"
            torch.testing.assert_close(self.params[n][k], p.detach(), **TOL, msg=lambda m, w=where: f"{w}: {m}")
            st = self.ref_opts[k].state.get(p, {})
            kinds = ["momentum_buffer"] if self.kind == "sgd" else ["exp_avg", "exp_avg_sq"]
            for kind in kinds:
                ref = st.get(kind)
                if ref is None:
                    continue
                mine = self.state[state_name("momentum" if kind == "momentum_buffer" else kind, n)][k]
                label = f"model {k} {n} {kind} step {step}"
                torch.testing.assert_close(mine, ref, **TOL, msg=lambda m, w=label: f"{w}: {m}")


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "per_model"])
@pytest.mark.parametrize("case", list(HPARAMS))
def test_matches_torch_optim_per_model(case: str, fused: bool) -> None:
    s = Setup(case)
    for step in range(1, STEPS + 1):
        grads = s.grads()
        s.step_models(list(range(K)), grads, fused)
        for k in range(K):
            s.ref_step(k, {n: g[k] for n, g in grads.items()})
            s.check(k, step)
    for n in SHAPES:
        assert s.state[state_name("step", n)].tolist() == [float(STEPS)] * K
    # The models really differ: the per-model hyperparameters were not collapsed into one.
    assert not torch.allclose(s.params["w"][0], s.params["w"][1])


@pytest.mark.parametrize("case", ["sgd", "adam", "adamw"])
def test_models_stepping_at_different_times(case: str) -> None:
    """Each model's step count (bias correction, first momentum step) is its own."""
    s = Setup(case, seed=3)
    schedule = [[0], [0, 2], [0], [1, 2], [0, 1, 2], [2], [0, 1]]
    for step, models in enumerate(schedule, 1):
        grads = s.grads()
        s.step_models(models, grads, fused=(step % 2 == 0))
        for k in models:
            s.ref_step(k, {n: g[k] for n, g in grads.items()})
        for k in range(K):
            s.check(k, step)
    for n in SHAPES:
        assert s.state[state_name("step", n)].tolist() == [5.0, 3.0, 4.0]


def test_reset_state_restarts_like_a_fresh_optimizer() -> None:
    s = Setup("adam", seed=5)
    for _ in range(3):
        s.step_models(list(range(K)), s.grads(), fused=True)
    # Zero model 1's state (what Bank.reset_optimizer_state does after set_weights).
    for t in s.state.values():
        t[1].zero_()
    hp = {h: v[1].item() for h, v in s.hparams.items()}
    s.ref_params[1] = {n: torch.nn.Parameter(s.params[n][1].clone()) for n in SHAPES}
    s.ref_opts[1] = torch_optimizer("adam", list(s.ref_params[1].values()), hp)
    for step in range(2):
        grads = s.grads()
        s.step_models([1], grads, fused=False)
        s.ref_step(1, {n: g[1] for n, g in grads.items()})
        s.check(1, step)


@pytest.mark.parametrize("case", ["adam", "sgd"])
def test_parameter_without_gradient_keeps_its_own_step(case: str) -> None:
    """workers/execute.py passes only the parameters that got a gradient (as torch.optim
    skips ``grad is None``) but the whole state, step counts included. torch.optim counts steps per
    parameter, so a parameter that sat out a step must see the same bias correction (Adam)
    and the same momentum start (SGD with dampening) as under torch.optim."""
    overrides = {"momentum": [0.9] * 3, "dampening": [0.5] * 3, "nesterov": [0.0] * 3} if case == "sgd" else None
    s = Setup(case, seed=11, overrides=overrides)
    # Parameter "b" gets no gradient at steps 1 and 2 (e.g. a branch that was not taken).
    for step in range(1, 5):
        grads = s.grads()
        used = [n for n in SHAPES if not (n == "b" and step <= 2)]
        for k in range(K):
            w = slice(k, k + 1)
            optimizer_step(
                s.kind,
                {n: s.params[n][w] for n in used},
                {n: grads[n][w] for n in used},
                {n: t[w] for n, t in s.state.items()},
                {h: v[w] for h, v in s.hparams.items()},
            )
            s.ref_step(k, {n: (grads[n][k] if n in used else None) for n in SHAPES})
            s.check(k, step)


def test_state_entries_layout() -> None:
    specs = [EntrySpec("w", "param", (2, 3), "float32"), EntrySpec("b", "param", (3,), "bfloat16")]
    sgd = optimizer_state_entries("sgd", specs)
    assert sgd[:2] == [EntrySpec("optim.step.w", "state", (), "float32"), EntrySpec("optim.step.b", "state", (), "float32")]
    assert [(e.name, e.shape, e.dtype) for e in sgd[2:]] == [
        ("optim.momentum.w", (2, 3), "float32"), ("optim.momentum.b", (3,), "bfloat16")
    ]
    adam = optimizer_state_entries("adam", specs)
    assert [e.name for e in adam] == ["optim.step.w", "optim.step.b", "optim.exp_avg.w", "optim.exp_avg.b", "optim.exp_avg_sq.w", "optim.exp_avg_sq.b"]
    assert all(e.role == "state" for e in adam)
    assert [e.name for e in optimizer_state_entries("adamw", specs)] == [e.name for e in adam]

"""The raw in-process ``torch.func.vmap`` reference: the upper bound cohort aims at.

All K models' weights are stacked into ``[K, ...]`` tensors and one vmapped
``functional_call`` runs them together. Training takes per-model gradients with
``torch.func.grad_and_value`` inside the vmap and applies SGD or Adam by hand to the
stacked tensors, with the same arithmetic as ``torch.optim`` so results match.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

from tools.bench_measure import Result, describe, skipped, time_steps
from tools.bench_workloads import Batch, Workload, build_models, loss_function, make_batches

Tensors = dict[str, torch.Tensor]
COMPILE_WARMUP = 3  # the first calls compile (and may recompile); keep them out of timing


class StackedOptimizer:
    """SGD or Adam over stacked ``[K, ...]`` tensors, step for step as ``torch.optim`` does it."""

    def __init__(self, settings: dict[str, Any], params: Tensors) -> None:
        self.name = settings["name"]
        self.lr = float(settings["lr"])
        self.betas = tuple(settings.get("betas", (0.9, 0.999)))
        self.eps = float(settings.get("eps", 1e-8))
        self.steps = 0
        self.exp_avg = {name: torch.zeros_like(p) for name, p in params.items()}
        self.exp_avg_sq = {name: torch.zeros_like(p) for name, p in params.items()}

    @torch.no_grad()
    def step(self, params: Tensors, grads: Tensors) -> None:
        self.steps += 1
        for name, param in params.items():
            if self.name == "sgd":
                param.add_(grads[name], alpha=-self.lr)
            else:
                self._adam(param, grads[name], self.exp_avg[name], self.exp_avg_sq[name])

    def _adam(self, param: torch.Tensor, grad: torch.Tensor, avg: torch.Tensor, avg_sq: torch.Tensor) -> None:
        beta1, beta2 = self.betas
        avg.lerp_(grad, 1 - beta1)
        avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = self.lr / (1 - beta1**self.steps)
        denominator = (avg_sq.sqrt() / math.sqrt(1 - beta2**self.steps)).add_(self.eps)
        param.addcdiv_(avg, denominator, value=-step_size)


class StackedEnsemble:
    """K models as one set of stacked weights, run by one vmapped call."""

    def __init__(self, workload: Workload, device: str, compile_fn: Callable[[Any], Any] | None = None) -> None:
        self.task = workload.task
        models = build_models(workload, range(workload.count), device)
        params, buffers = stack_module_state(models)  # type: ignore[arg-type]
        self.params: Tensors = {name: p.detach() for name, p in params.items()}
        self.buffers: Tensors = dict(buffers)
        self.base = copy.deepcopy(models[0]).to("meta")
        self.loss = loss_function(workload)
        self.optimizer = StackedOptimizer(workload.optimizer, self.params)
        wrap = compile_fn or (lambda fn: fn)
        self._forward = wrap(vmap(self._one_forward, in_dims=(0, 0, None)))
        self._grads = wrap(vmap(grad_and_value(self._one_loss), in_dims=(0, 0, 0, 0)))

    def _one_forward(self, params: Tensors, buffers: Tensors, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.base, (params, buffers), (x,))

    def _one_loss(self, params: Tensors, buffers: Tensors, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.loss(self._one_forward(params, buffers, x), t)

    def infer(self, batch: Batch) -> torch.Tensor:
        """The shared input through every model at once: ``[K, B, ...]``."""
        with torch.no_grad():
            return self._forward(self.params, self.buffers, batch.x)  # type: ignore[no-any-return]

    def train(self, batch: Batch) -> torch.Tensor:
        """One optimizer step for every model on its own batch; returns the K losses."""
        grads, losses = self._grads(self.params, self.buffers, batch.xs, batch.ts)
        self.optimizer.step(self.params, grads)
        return losses  # type: ignore[no-any-return]

    def step(self, batch: Batch) -> torch.Tensor:
        return self.train(batch) if self.task == "train" else self.infer(batch)


def _warning_notes(caught: list[warnings.WarningMessage]) -> str:
    """Distinct warnings raised while running, shortened: e.g. ops vmap runs as a loop."""
    lines = dict.fromkeys(str(w.message).split(". ")[0][:120] for w in caught)
    return "; ".join(lines)


def _run(workload: Workload, device: str, compile_fn: Callable[[Any], Any] | None, warmup: int) -> Result:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ensemble = StackedEnsemble(workload, device, compile_fn)
        batches = make_batches(workload, device)
        result = time_steps(
            lambda i: ensemble.step(batches[i % len(batches)]),
            warmup,
            workload.steps,
            device,
            workload.samples_per_step,
            workload.budget_s,
        )
    notes = _warning_notes(caught)
    if notes:
        result["notes"] = notes
    return result


def run_vmap(workload: Workload, device: str) -> Result:
    """Eager vmap over stacked weights: the in-process reference."""
    return _run(workload, device, None, workload.warmup)


def run_vmap_compiled(workload: Workload, device: str, quick: bool) -> Result:
    """The same with ``torch.compile``; compilation happens during the warm-up steps."""
    if quick:
        return skipped("--quick: compiling takes longer than the whole quick run")
    torch._dynamo.reset()  # each workload compiles afresh, never against another's cache limit
    try:
        result = _run(workload, device, torch.compile, max(workload.warmup, COMPILE_WARMUP))
    except Exception as exc:  # noqa: BLE001 - a compile failure is a finding, not a crash
        return skipped(f"torch.compile failed: {describe(exc)}")
    result["notes"] = "; ".join(filter(None, [f"warm-up incl. compile {result['warmup_s']:.1f} s", result.get("notes")]))
    return result
